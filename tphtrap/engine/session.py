"""One attached (VM, device): the guest's view, the device's state, and how an access is decided.

Every decision follows the same four steps, whatever the access looked like:

1. **view**: the guest's bytes are merged into the guest's view of the registers they hit
   (control request, ST entries, MSI-X Vector Control); bytes outside the filtered registers
   are the guest's own and go through as written;
2. **target**: what the device may hold, from the view, the policy, the device's capabilities
   and the latches (:mod:`tphtrap.engine.target`);
3. **plan**: the ordered steps from the device's current state to the target, every prefix
   safe: Requester Enable cleared first when entries in use must change or the device's state
   is unknown, tags before the enable that makes them usable, a disable before the tags;
4. **check**: the plan, rendered by the device's backend (:mod:`tphtrap.engine.render`: raw
   device writes, or host kernel operations), is tried on the self-check's copy of the device
   (:mod:`tphtrap.engine.check`); a plan it refuses is a bug, and turns the decision into
   "TPH off, device frozen".

The host backend constrains the target through two hooks (:meth:`Session._grant`): the tag
width is the host kernel's, and Interrupt Vector mode is enabled only where the entries the
device holds are safe before the kernel's entry writes (it makes them only while enabled).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Literal

from .. import bulk
from ..device import ConfigSpace
from ..events import DeviceWrite
from ..layouts import MSIX_VECTOR_CTRL, PM_CTRL
from ..policy import TagRules
from ..spec import (
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    ReqEnable,
    StMode,
    TagWidth,
)
from .check import Checker
from .geometry import (
    CTRL_SIZE,
    CTRL_WRITABLE,
    ENTRY_SIZE,
    K_CTRL,
    K_ENTRY,
    K_FLR_AF,
    K_FLR_EXP,
    K_PAD,
    K_PMCSR,
    K_RO,
    Geometry,
)
from .reasons import VIOLATIONS
from .render import HostFacts, HostOps, RawWrites
from .target import (
    KEEP,
    LATCH,
    MODE,
    REFUSE,
    REQ,
    WIDTH_OF_ENABLE,
    Grant,
    HostLimit,
    control_value,
    grant_control,
    resolve_entry,
)

__all__ = ["Session"]

_VC_ST = MSIX_VECTOR_CTRL["st"]
_VC_LOW = ((1 << (8 * MSIX_VECTOR_CTRL.size)) - 1) & ~_VC_ST.mask  # mask + reserved: the guest's
_VC_POWER_ON = MSIX_VECTOR_CTRL["mask"].mask  # PCIe: Vector Control resets to "masked"
_ST_BYTE = PCI_MSIX_ENTRY_VECTOR_CTRL + _VC_ST.shift // 8  # first tag byte of an MSI-X entry
_PM_STATE = PM_CTRL["power_state"]
_D0, _D3HOT = 0, 3

Step = tuple[int, int, int]  # (what, index, value): what 0 = control of cap ``index``, 1 = entry
_CTRL_STEP, _ENTRY_STEP = 0, 1
_REFUSALS = frozenset({"enable-refused", "msix-state-unknown"})
_GRANTS_KEPT = 16


def _chunks(start: int, end: int) -> list[tuple[int, int]]:
    """Split [start, end) into naturally aligned 4/2/1-byte pieces (vfio_config_do_rw)."""
    out = []
    pos = start
    while pos < end:
        for size in (4, 2, 1):
            if pos % size == 0 and pos + size <= end:
                out.append((pos, size))
                pos += size
                break
    return out


class Session:
    """Guest view, device state and latches of one (VM, device)."""

    def __init__(
        self,
        vm: str,
        bdf: str,
        config: ConfigSpace,
        rules: TagRules,
        host: HostFacts | None = None,
        vector_ctrl: Sequence[int] | None = None,
    ) -> None:
        self.vm = vm
        self.bdf = bdf
        self.config = config
        self.rules = rules
        self.geo = geo = Geometry(config)
        self.checker = Checker(config)
        self.poisoned: str | None = None
        self.revoked = False
        self.latched = False
        self.counts: dict[str, int] = {}
        n = geo.n_entries
        # --- the guest's view: power-on state, never what the snapshot (a host) left there ---
        self.image = bytearray(config.data)  # TPH bytes are served from here
        for cap in geo.caps:
            ctrl = int.from_bytes(self.image[cap.ctrl : cap.ctrl + CTRL_SIZE], "little")
            self._put_image(cap.ctrl, CTRL_SIZE, ctrl & ~CTRL_WRITABLE)
            for pos in range(cap.ctrl + CTRL_SIZE, cap.end):
                reg = geo.regs[pos]
                if reg is not None and reg.kind == K_ENTRY:
                    self.image[pos] = 0
        self.ctrl_written = False
        self.written = [False] * n  # ST entries the guest wrote since attach or reset
        self.guest_tag = [0] * n  # MSI-X location: the guest's tag bits
        self.guest_low: list[int | None] = [None] * n  # MSI-X: the guest's mask/reserved bits
        # --- what the device holds (None: unknown) ---
        self.dev_ctrl: list[int | None] = [cap.info.ctrl_raw for cap in geo.caps]
        if geo.in_msix:
            self.dev_ent: list[int | None] = [None] * n  # not part of a config snapshot
            # The MSI-X table's mask bits are the guest's: unknown until the guest writes them,
            # or until the hypervisor says what its (emulated) table holds.
            self.dev_low: list[int | None] = [None] * n
            if vector_ctrl is not None:
                self.guest_low = [v & _VC_LOW for v in vector_ctrl[:n]] + [None] * (
                    n - len(vector_ctrl)
                )
                self.dev_low = list(self.guest_low)
        else:
            info = geo.caps[0].info if geo.caps else None
            self.dev_ent = list(info.entries) if info is not None and n else [None] * n
            self.dev_low = []
        self.pm_state = _PM_STATE.get(config.u16(geo.pm_offset)) if geo.pm_offset >= 0 else 0
        self.backend: RawWrites | HostOps = RawWrites() if host is None else HostOps(self, host)
        if host is not None and geo.in_msix:
            # The VMM emulates the mask bits (the host kernel owns the physical ones): they
            # never block or take part in a host operation.
            self.guest_low = [_VC_POWER_ON] * n
            self.dev_low = [_VC_POWER_ON] * n
        # Entries outside ``dirty`` hold their in-use target at ``settled``: an enable at that
        # width re-resolves only the dirty ones (a pure optimisation, the check sees all).
        self.settled: TagWidth | None = None
        self.dirty: set[int] = set(range(n))
        self.prospective = TagWidth.ST8  # the width of the guest's last enable request
        self._grants: dict[tuple[int, bool, bool, HostLimit | None], Grant] = {}  # _kept_grant
        self._grants_rules: TagRules | None = None
        #: _resolve's answers of resolve_entry within one call, by (guest, written, device)
        self._resolved: dict[tuple[int, bool, int | None], tuple[int, str | None]] = {}

    # --- the guest's view -------------------------------------------------------------------
    def _put_image(self, off: int, size: int, value: int) -> None:
        self.image[off : off + size] = value.to_bytes(size, "little")

    def guest_ctrl(self, k: int = 0) -> int:
        off = self.geo.caps[k].ctrl
        return int.from_bytes(self.image[off : off + CTRL_SIZE], "little")

    def guest_entry(self, i: int) -> int:
        if self.geo.in_msix:
            return self.guest_tag[i]
        off = self.geo.entry_offsets[i]
        return int.from_bytes(self.image[off : off + ENTRY_SIZE], "little")

    def dev_enabled(self) -> bool:
        return any(c is None or REQ.get(c) != ReqEnable.DISABLED for c in self.dev_ctrl)

    @property
    def untrappable(self) -> str | None:
        return self.geo.refusal

    # --- resets -------------------------------------------------------------------------------
    def reset_state(self) -> None:
        """The function was reset: the guest sees power-on state, the device is unknown."""
        geo = self.geo
        for cap in geo.caps:
            self._put_image(cap.ctrl, CTRL_SIZE, cap.reserved)
        for i in range(geo.n_entries if not geo.in_msix else 0):
            self._put_image(geo.entry_offsets[i], ENTRY_SIZE, 0)
        n = geo.n_entries
        self.ctrl_written = False
        self.written = [False] * n
        self.guest_tag = [0] * n
        self.dev_ctrl = [None] * len(geo.caps)
        self.dev_ent = [None] * n
        if geo.in_msix:
            self.guest_low = [_VC_POWER_ON] * n
            self.dev_low = [_VC_POWER_ON] * n
        self.pm_state = _D0
        self.latched = False
        self.prospective = TagWidth.ST8
        self.settled = None
        self.dirty = set(range(n))
        self.backend.reset()

    # --- target and plan ------------------------------------------------------------------------
    def _grant(self, full: bool = True) -> Grant:
        limit = self.backend.limit(self)
        off = self.geo.caps[0].ctrl
        ctrl = int.from_bytes(self.image[off : off + CTRL_SIZE], "little")  # guest_ctrl()
        grant = self._kept_grant(ctrl, limit)
        if (
            limit is not None
            and grant.uses_entries
            and grant.width is not None
            and not self.backend.window_safe(self, grant.width, full)
        ):
            grant = self._kept_grant(ctrl, HostLimit(limit.width, "host-entries-unsafe"))
        return grant

    def _kept_grant(self, ctrl: int, limit: HostLimit | None) -> Grant:
        """``grant_control``'s answer: a pure function of these and the rules, kept (every ST
        entry write asks) until the rules change."""
        if self._grants_rules is not self.rules or len(self._grants) >= _GRANTS_KEPT:
            self._grants.clear()
            self._grants_rules = self.rules
        key = (ctrl, self.latched, self.revoked, limit)
        grant = self._grants.get(key)
        if grant is None:
            grant = grant_control(ctrl, self.geo, self.rules, self.latched, self.revoked, limit)
            self._grants[key] = grant
        return grant

    def plan(
        self,
        touched: set[int] | frozenset[int],
        full: bool,
        reasons: list[str],
        ctrl_touched: bool = False,
    ) -> list[Step]:
        """Steps from the device's state to the target.

        ``touched``: entries the guest wrote in this access (each is written even when the
        device already holds its value, so that the guest's own write can pass);
        ``ctrl_touched``: the access wrote the control register (likewise); ``full``:
        re-resolve every entry (reload, reset, attach).
        """
        geo = self.geo
        steps: list[Step] = []
        if not geo.trappable:
            for k, cap in enumerate(geo.caps):
                dev = self.dev_ctrl[k]
                if dev is None or REQ.get(dev) != ReqEnable.DISABLED:
                    steps.append((_CTRL_STEP, k, control_value(cap.reserved, 0)))
            if steps or any(REQ.get(self.guest_ctrl(k)) for k in range(len(geo.caps))):
                reasons.append(geo.refusal or "no-st-table")
            return steps
        grant = self._grant(full)
        if ctrl_touched or full:
            reasons.extend(grant.reasons)
        changes: dict[int, int] = {}
        if grant.uses_entries:
            width = grant.width
            assert width is not None
            check: range | list[int] = (
                range(geo.n_entries)
                if full or width is not self.settled
                else sorted(self.dirty | set(touched))
                if self.dirty or touched
                else []
            )
            trial: list[str] = []
            refused = bool(check) and self._resolve(check, width, True, changes, trial, touched)
            if refused:
                # Only why the enable failed: the entries it would have written were not.
                reasons.extend(r for r in trial if r in VIOLATIONS or r in _REFUSALS)
                changes.clear()
                grant = Grant(MODE.put(0, grant.mode), None, [], grant.width, True)
                self._resolve(sorted(touched), width, False, changes, reasons, touched)
                # (resolved at a width the table is not settled at: the next enable checks
                # them, whatever its width)
                self.dirty.update(touched)
            else:
                reasons.extend(trial)
                self.settled = width
                self.dirty.clear()
        else:
            width = grant.requested_width or self.prospective
            if touched:
                self._resolve(sorted(touched), width, False, changes, reasons, touched)
            if self.latched and grant.width is not None:
                grant = Grant(MODE.put(0, grant.mode), None, [], grant.width, True)
            for i in touched:
                self.dirty.add(i)
        self.prospective = grant.requested_width or self.prospective
        return self._order(grant, changes, touched, full, reasons, ctrl_touched)

    def _resolve(
        self,
        entries: range | list[int],
        width: TagWidth,
        in_use: bool,
        changes: dict[int, int],
        reasons: list[str],
        touched: set[int] | frozenset[int],
    ) -> bool:
        """Fill ``changes`` (entry -> device value) for ``entries``; True: enable refused."""
        rules = self.rules
        msix = self.geo.in_msix
        guest_of = self.guest_tag.__getitem__ if msix else self.guest_entry
        written, dev_ent, guest_low, dev_low = (
            self.written,
            self.dev_ent,
            self.guest_low,
            self.dev_low,
        )
        resolved = self._resolved  # resolve_entry is a pure function: entries alike ask once
        if bulk.C is not None:
            done = bulk.C.resolve(
                entries,
                self.guest_tag if msix else self.guest_entry,
                written,
                dev_ent,
                guest_low,
                dev_low,
                msix,
                width,
                in_use,
                rules,
                resolve_entry,
                resolved,
                touched,
                changes,
                reasons,
            )
            if done is not None:
                return done
        resolved.clear()
        for i in entries:
            guest = guest_of(i)
            dev = dev_ent[i]
            key = (guest, written[i], dev)
            got = resolved.get(key)
            if got is None:
                got = resolved[key] = resolve_entry(guest, written[i], dev, width, in_use, rules)
            value, code = got
            if (
                code is not None
                and code not in reasons
                and (code != "tag-fallback" or value != dev)
            ):
                reasons.append(code)
            if value == LATCH:
                self.latched = True
                reasons.append("tph-forced-off")
                if in_use:
                    return True
                value = KEEP  # the tag is dropped; the guest's other bits still go through
            if value == REFUSE:
                reasons.append("enable-refused")
                return True
            if msix:
                low = guest_low[i]
                if low is None:
                    low = dev_low[i]
                if value == KEEP:
                    if low == dev_low[i] or low is None:
                        continue
                    if dev is not None:
                        value = dev
                    elif code is None:
                        value = guest  # unused, and the guest's own: goes through as written
                    else:
                        value = rules.fallback[width] or 0  # never a tag the rules refused
                if low is None:
                    reasons.append("msix-state-unknown")
                    if in_use:
                        return True
                    continue
                if value != dev or low != dev_low[i] or i in touched:
                    changes[i] = value
            elif value != KEEP and (value != dev or i in touched):
                changes[i] = value
        return False

    def _order(
        self,
        grant: Grant,
        changes: dict[int, int],
        touched: set[int] | frozenset[int],
        full: bool,
        reasons: list[str],
        ctrl_touched: bool,
    ) -> list[Step]:
        cap = self.geo.caps[0]
        dev = self.dev_ctrl[0]
        target = self._control_target(grant, dev)
        steps: list[Step] = []
        if changes and grant.uses_entries and not touched.issuperset(changes):
            reasons.append("entries-corrected")
        # The guest wrote the control register: write it even if unchanged (it may pass).
        rewrite_ctrl = ctrl_touched and dev == target and not grant.refused
        if grant.width is None:
            if dev != target:
                steps.append((_CTRL_STEP, 0, target))
                dev = target
        elif changes and (
            dev is None
            or (self._uses(dev) and (full or dev != target or not self._safe(changes, dev)))
        ):
            off = REQ.put(dev if dev is not None else target, ReqEnable.DISABLED)
            off = control_value(cap.reserved, off & CTRL_WRITABLE)
            if dev != off:
                steps.append((_CTRL_STEP, 0, off))
                dev = off
        if changes:
            order = sorted(changes)
            steps += zip(repeat(_ENTRY_STEP), order, map(changes.__getitem__, order))
        if dev != target or (rewrite_ctrl and not any(s[0] == _CTRL_STEP for s in steps)):
            steps.append((_CTRL_STEP, 0, target))
        return steps

    def steady_entry(self, i: int, guest: int, written: bool) -> tuple[int, str, Grant] | None:
        """What :meth:`plan` makes of a write of the whole entry ``i`` (new guest tag
        ``guest``; ``written``: the entry counts as written), in the usual state; None
        otherwise (then the caller takes the general path). Changes nothing.

        The usual state: one capability, no latch, the device's control register is what the
        guest's request grants, and either Interrupt Vector mode is in force at the width the
        other entries were settled at and the new tag is allowed at it (the plan is this one
        entry), or the entries are not in use and the tag resolves to a value. Returns that
        value (the plan's only step), its reason and the grant, for :meth:`settle_entry`.
        """
        if self.latched or not self.geo.trappable:
            return None
        dev = self.dev_ctrl[0]
        if dev is None:
            return None
        grant = self._grant(False)
        if dev != self._control_target(grant, dev):
            return None
        if grant.uses_entries:
            width = grant.width
            if width is None or width is not self.settled or (self.dirty and self.dirty != {i}):
                return None
            value, code = resolve_entry(guest, written, self.dev_ent[i], width, True, self.rules)
            if value < 0 or code is None or code == "tag-fallback":
                return None
            if not self.rules.host_ok(value, width):
                return None
            return value, code, grant
        if grant.width is not None:
            return None
        width = grant.requested_width or self.prospective
        value, code = resolve_entry(guest, written, self.dev_ent[i], width, False, self.rules)
        if value < 0 or code is None:
            return None
        return value, code, grant

    def _control_target(self, grant: Grant, dev: int | None) -> int:
        """The control register the plan leaves on the device, for ``grant``."""
        if (
            grant.width is None
            and (grant.refused or not self.ctrl_written)
            and dev is not None
            and REQ.get(dev) == ReqEnable.DISABLED
        ):
            return dev  # disabled, and the guest got nothing it asked for: leave it alone
        return control_value(self.geo.caps[0].reserved, grant.bits)

    def settle_entry(self, i: int, grant: Grant) -> None:
        """The bookkeeping :meth:`plan` does for the plan :meth:`steady_entry` returned."""
        if grant.uses_entries:
            self.settled = grant.width
            self.dirty.clear()
        else:
            self.dirty.add(i)
        self.prospective = grant.requested_width or self.prospective

    @staticmethod
    def _uses(ctrl: int) -> bool:
        return REQ.get(ctrl) != ReqEnable.DISABLED and MODE.get(ctrl) == StMode.INT_VEC

    def _safe(self, changes: dict[int, int], ctrl: int) -> bool:
        """Are the new entry values allowed at the width ``ctrl`` has in force?"""
        width = WIDTH_OF_ENABLE.get(REQ.get(ctrl))
        if width is None:
            return False
        return all(self.rules.host_ok(v, width) for v in changes.values())

    def commit(self, steps: list[Step]) -> None:
        """The device now holds what ``steps`` wrote."""
        dev_ctrl, dev_ent, msix = self.dev_ctrl, self.dev_ent, self.geo.in_msix
        guest_low, dev_low = self.guest_low, self.dev_low
        if bulk.C is not None and bulk.C.commit(steps, dev_ctrl, dev_ent, msix, guest_low, dev_low):
            return
        for what, index, value in steps:
            if what == _CTRL_STEP:
                dev_ctrl[index] = value
            else:
                dev_ent[index] = value
                if msix:
                    low = guest_low[index]
                    if low is not None:
                        dev_low[index] = low

    # --- accesses ---------------------------------------------------------------------------
    def config_write(
        self, off: int, width: int, value: int
    ) -> tuple[list[DeviceWrite], list[str], bool, set[int], bool]:
        """Merge a config write into the view.

        Returns the writes that go through as the guest wrote them, the reasons, whether the
        write resets the function, the ST entries it wrote and whether it wrote control.
        """
        geo = self.geo
        reg = geo.exact.get(off)
        if reg is not None and reg.size == width and (reg.kind == K_ENTRY or reg.cap == 0):
            # Exactly the control register or one ST entry (what drivers write).
            if reg.kind == K_CTRL:
                old = int.from_bytes(self.image[off : off + width], "little")
                self._put_image(off, width, (old & ~CTRL_WRITABLE) | (value & CTRL_WRITABLE))
                self.ctrl_written = True
                bits = ["reserved-bits"] if (value ^ old) & ~CTRL_WRITABLE else []
                return [], bits, False, set(), True
            if reg.cap == 0 and geo.trappable:
                self.put_entry(reg.index, DeviceWrite("config", off, width, value))
                return [], [], False, {reg.index}, False
            self._put_image(off, width, value)
            return [], [geo.refusal or "no-st-table"], False, set(), False  # kept from the device
        regs = geo.regs
        reasons: list[str] = []
        through: list[tuple[int, int]] = []  # (offset, byte) that go through as written
        touched: set[int] = set()
        reset = ctrl = False
        for b in range(width):
            pos = off + b
            byte = (value >> (8 * b)) & 0xFF
            reg = regs[pos]
            if reg is None:
                through.append((pos, byte))
                continue
            kind = reg.kind
            if kind == K_CTRL:
                shift = 8 * (pos - reg.start)
                writable = (CTRL_WRITABLE >> shift) & 0xFF
                old = self.image[pos]
                if (byte ^ old) & ~writable & 0xFF:
                    reasons.append("reserved-bits")
                self.image[pos] = (old & ~writable) | (byte & writable)
                self.ctrl_written = ctrl = True
            elif kind == K_ENTRY:
                self.image[pos] = byte
                if reg.cap == 0 and geo.trappable:
                    self.written[reg.index] = True
                    touched.add(reg.index)
                else:
                    reasons.append(geo.refusal or "no-st-table")  # kept from the device
            elif kind == K_RO:
                reasons.append("read-only")
            elif kind == K_PAD:
                reasons.append("beyond-st-table")
            else:
                through.append((pos, byte))
                reset |= self._resets(kind, pos - reg.start, byte)
        return self.pieces("config", through, None), reasons, reset, touched, ctrl

    def _resets(self, kind: int, rel: int, byte: int) -> bool:
        """Does this byte of a reset register start a reset of the function?"""
        if kind == K_FLR_EXP:
            return rel == 1 and bool(byte & 0x80)  # Device Control bit 15: Initiate FLR
        if kind == K_FLR_AF:
            return bool(byte & 0x1)  # AF control bit 0: Initiate FLR
        if kind == K_PMCSR and rel == 0:
            old, self.pm_state = self.pm_state, _PM_STATE.get(byte)
            return old == _D3HOT and self.pm_state == _D0 and not self.geo.no_soft_reset
        return False

    def msix_write(
        self, off: int, width: int, value: int, bar: int
    ) -> tuple[list[DeviceWrite], set[int]]:
        """Merge a write to the MSI-X table BAR into the view; returns (passthrough, touched)."""
        geo = self.geo
        i = geo.vc_index.get(off, -1)
        if width == 4 and i >= 0:
            # A whole Vector Control word (what drivers write): mask bits and tag at once.
            self.put_entry(i, DeviceWrite("bar", off, width, value, bar))
            return [], {i}
        if width == 8 and not off % 4:
            # Two aligned dwords: each a whole Vector Control word or no part of one.
            out: list[DeviceWrite] = []
            words: set[int] = set()
            for k in (0, 4):
                part = (value >> (8 * k)) & 0xFFFF_FFFF
                j = geo.vc_index.get(off + k, -1)
                if j >= 0:
                    self.put_entry(j, DeviceWrite("bar", off + k, 4, part, bar))
                    words.add(j)
                else:
                    out.append(DeviceWrite("bar", off + k, 4, part, bar))
            return out, words
        through: list[tuple[int, int]] = []
        touched: set[int] = set()
        low_bytes: dict[int, dict[int, int]] = {}
        for b in range(width):
            pos = off + b
            byte = (value >> (8 * b)) & 0xFF
            rel = pos - geo.msix_start
            if not 0 <= rel < geo.n_entries * PCI_MSIX_ENTRY_SIZE:
                through.append((pos, byte))
                continue
            i, field = divmod(rel, PCI_MSIX_ENTRY_SIZE)
            if field < PCI_MSIX_ENTRY_VECTOR_CTRL:
                through.append((pos, byte))
            elif field < _ST_BYTE:
                low_bytes.setdefault(i, {})[field - PCI_MSIX_ENTRY_VECTOR_CTRL] = byte
                touched.add(i)
            else:
                shift = 8 * (field - _ST_BYTE)
                old = self.guest_tag[i]
                new = (old & ~(0xFF << shift)) | (byte << shift)
                if new != old:
                    self.guest_tag[i] = new
                    self.written[i] = True
                touched.add(i)
        for i, parts in low_bytes.items():
            low = self.guest_low[i]
            if low is None and len(parts) < 2:
                # Half of an unknown word stays unknown: the guest's byte goes through as
                # written (the device merges it), tphtrap cannot rewrite the word.
                base = geo.vc_offsets[i]
                through.extend((base + k, byte) for k, byte in parts.items())
                through.sort()
                continue
            low = low or 0
            for k, byte in parts.items():
                low = (low & ~(0xFF << 8 * k)) | (byte << 8 * k)
            self.guest_low[i] = low
        return self.pieces("bar", through, bar), touched

    def put_entry(self, i: int, w: DeviceWrite) -> None:
        """The guest's write ``w`` of the whole entry ``i`` (an ST entry of the capability's
        table, or entry i's Vector Control word) merged into the view."""
        if self.geo.in_msix:
            tag = w.value >> _VC_ST.shift
            if tag != self.guest_tag[i]:
                self.guest_tag[i] = tag
                self.written[i] = True
            self.guest_low[i] = w.value & _VC_LOW  # mask bits and tag at once
            return
        self._put_image(w.offset, w.width, w.value)
        self.written[i] = True

    @staticmethod
    def pieces(
        space: Literal["config", "bar"], through: list[tuple[int, int]], bar: int | None
    ) -> list[DeviceWrite]:
        """Runs of guest bytes as naturally aligned writes."""
        out: list[DeviceWrite] = []
        if not through:
            return out
        runs: list[list[tuple[int, int]]] = [[through[0]]]
        for pos, byte in through[1:]:
            if pos == runs[-1][-1][0] + 1:
                runs[-1].append((pos, byte))
            else:
                runs.append([(pos, byte)])
        for run in runs:
            start = run[0][0]
            data = bytes(b for _, b in run)
            for p, size in _chunks(start, start + len(run)):
                v = int.from_bytes(data[p - start : p - start + size], "little")
                out.append(DeviceWrite(space, p, size, v, bar))
        return out

    # --- reads --------------------------------------------------------------------------------
    def view_of(self, w: DeviceWrite) -> tuple[int, int]:
        """(mask, value): what a read of ``w``'s bytes sees from the guest's view."""
        if w.space == "config":
            return self.config_view(w.offset, w.width)
        return self.msix_view(w.offset, w.width)

    def config_view(self, off: int, width: int) -> tuple[int, int]:
        """(mask, value): the bytes of [off, off+width) served from the guest's view."""
        reg = self.geo.exact.get(off)
        if reg is not None and reg.size == width:  # one whole register of a capability
            return (1 << (8 * width)) - 1, int.from_bytes(self.image[off : off + width], "little")
        mask = patch = 0
        for cap in self.geo.caps:
            lo, hi = max(off, cap.start), min(off + width, cap.end)
            if lo < hi:
                shift = 8 * (lo - off)
                mask |= ((1 << (8 * (hi - lo))) - 1) << shift
                patch |= int.from_bytes(self.image[lo:hi], "little") << shift
        return mask, patch

    def msix_view(self, off: int, width: int) -> tuple[int, int]:
        geo = self.geo
        if not geo.in_msix or off + width <= geo.msix_start or off >= geo.msix_end:
            return 0, 0
        if width == 4 and off in geo.vc_index:  # one whole Vector Control word
            return _VC_ST.mask, self.guest_tag[geo.vc_index[off]] << _VC_ST.shift
        mask = patch = 0
        for k in range(width):
            rel = off + k - geo.msix_start
            if not 0 <= rel < geo.n_entries * PCI_MSIX_ENTRY_SIZE:
                continue
            i, field = divmod(rel, PCI_MSIX_ENTRY_SIZE)
            if field >= _ST_BYTE:
                mask |= 0xFF << (8 * k)
                patch |= ((self.guest_tag[i] >> (8 * (field - _ST_BYTE))) & 0xFF) << (8 * k)
        return mask, patch
