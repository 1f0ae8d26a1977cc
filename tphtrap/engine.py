"""The sans-IO trap-and-filter engine: one access in, one decision out.

No I/O and no logging happen here; the engine owns only its shadow state per (VM, device).

How a write is decided (the vfio ``vfio_pci_config.c`` pattern, made explicit):

1. The bytes of the access are grouped by the register that owns them. Registers come from a
   per-device map built once at attach from the layouts: the TPH capability header and
   capability register (read-only), the control register, one 16-bit register per ST table
   entry, and dword padding past the table (read-only); in the MSI-X table, the Vector Control
   dword of each entry (only its ST bits 31:16 are filtered, when the ST table lives there).
   Bytes owned by no filtered register pass untouched.
2. Each touched register merges the guest's bytes into the guest's view, and a handler
   computes the value the device must hold (mask arithmetic on raw integers: reserved bits
   keep the device's value, pass-through bits keep the guest's).
3. The device writes are assembled: the guest's own access when nothing changed; the same
   access with other bytes when only values changed; otherwise aligned pieces, whole-register
   writes where a partial write would not produce the right device value, and corrective writes
   (ST entries re-resolved when TPH is enabled or the tag width changes) placed *before* them.

Ordering rule: the device never holds, even between two writes of one decision, a usable tag
that is not allowed. Corrective ST entry writes come before the control write that makes them
usable, and when the device is using its ST table while entries must change (the tag width or
mode changes while enabled), Requester Enable is cleared first, as Linux
``pcie_tph_set_st_entry`` does ("Disable TPH before updating ST to avoid potential instability
as cautioned in PCIe r6.2, sec 6.17.3").

Tag writes while the requester is enabled are filtered like any other tag write and, when
allowed, reach the device directly: both the old and the new value are allowed tags, and a
single 16-bit config write (or 32-bit Vector Control write) changes an entry atomically, so no
foreign tag is ever usable. A partial (one byte) update is decided on the whole merged entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .device import ConfigSpace
from .errors import TphtrapError
from .events import (
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from .layouts import MSIX_VECTOR_CTRL, TPH_CTRL, TPH_ST_ENTRY
from .policy import OnViolation, Policy, TagRules
from .spec import (
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_TPH_BASE_SIZEOF,
    PCI_TPH_CAP,
    PCI_TPH_CTRL,
    ReqEnable,
    StLocation,
    StMode,
    TagWidth,
)

__all__ = ["AttachRefused", "Engine", "Session", "describe_reason"]

# --- masks derived from the layouts (never restated by hand) ---------------------------------
_MODE = TPH_CTRL["st_mode_select"]
_REQ = TPH_CTRL["tph_requester_enable"]
CTRL_WRITABLE = TPH_CTRL.mask("st_mode_select", "tph_requester_enable")
ST_ENTRY_SIZE = TPH_ST_ENTRY.size
CTRL_SIZE = TPH_CTRL.size
_VC_ST = MSIX_VECTOR_CTRL["st"]
VC_SIZE = MSIX_VECTOR_CTRL.size
VC_PASS_MASK = ((1 << (8 * VC_SIZE)) - 1) & ~_VC_ST.mask  # mask bit and reserved: guest's own

_VALID_MODES = frozenset(int(m) for m in StMode)
_PASS, _REWRITE, _DROP = Verdict.PASS, Verdict.REWRITE, Verdict.DROP
_VC_ST_MASK = _VC_ST.mask
_VC_ST_SHIFT = _VC_ST.shift
_ST_BYTE = PCI_MSIX_ENTRY_VECTOR_CTRL + _VC_ST_SHIFT // 8  # first ST byte of an entry
_CONFIG_WIDTHS = (1, 2, 4)
# Requester Enable -> the width of the tags the device emits (none when disabled or reserved)
_WIDTH_OF_ENABLE: dict[int, TagWidth] = {
    ReqEnable.TPH: TagWidth.ST8,
    ReqEnable.EXT_TPH: TagWidth.ST16,
}
_BAR_WIDTHS = (1, 2, 4, 8)

# Reason codes that describe an access that went through as the guest asked.
_BENIGN = frozenset(
    {"not-tph", "control-granted", "tag-allowed", "tph-disabled", "reset", "tph-virtualized"}
)

REASONS: dict[str, str] = {
    "not-tph": "outside the TPH capability and MSI-X steering tags: passed untouched",
    "control-granted": "TPH control write allowed as requested",
    "tph-disabled": "TPH Requester Enable cleared as requested",
    "tag-allowed": "steering tag allowed for this VM",
    "tag-translated": "virtual steering tag translated to the host tag of the pinned CPU",
    "foreign-tag": "steering tag not allowed for this VM (owned by a CPU outside its set)",
    "unknown-virtual-tag": "virtual steering tag names no vCPU with an allowed host tag",
    "tph-forced-off": "TPH Requester Enable forced off after a steering-tag violation",
    "tph-latched-off": "TPH stays off for this device until reset (earlier violation)",
    "enable-refused": "enable refused: the ST table holds tags not allowed at this width",
    "entries-corrected": "ST entries re-resolved for the tag width and mode being enabled",
    "ext-downgraded": "Extended TPH not granted (device or VM lacks 16-bit tags): TPH only",
    "req-enable-reserved": "Requester Enable 2 is a reserved encoding: kept disabled",
    "mode-reserved": "ST Mode Select 3..7 is reserved: kept disabled in No ST mode",
    "mode-unsupported": "ST mode not supported by the device: kept disabled",
    "device-specific-mode": "Device Specific mode uses tags no hypervisor can trap: kept disabled",
    "no-st-table": "device has no standard ST table: TPH must stay disabled in a VM",
    "tph-forbidden": "policy forbids TPH for this device",
    "no-st-tag-foreign": "No ST mode emits tag 0, which is not allowed for this VM",
    "reserved-bits": "reserved bits keep the device's value",
    "read-only": "read-only register of the TPH capability",
    "beyond-st-table": "past the end of the ST table inside the TPH capability",
    "msix-sub-dword": "partial Vector Control write widened to the whole dword",
    "tph-virtualized": "TPH register read served from the guest's own view",
    "reset": "device reset: TPH control and steering tags back to power-on state",
    "attached": "device attached",
    "attach-disabled-tph": "TPH was enabled in the snapshot: disabled until the guest enables it",
    "detached": "device detached",
    "policy-reloaded": "state re-checked against the reloaded policy",
    "device-revoked": "the reloaded policy no longer assigns this device to this VM",
    "unknown-vm": "no such VM in the policy",
    "unknown-device": "device not attached for this VM",
    "bad-access": "malformed access (offset, width or value out of range)",
    "internal-error": "internal error: access dropped, device frozen until re-attached",
}


def describe_reason(code: str) -> str:
    return REASONS.get(code, code)


_VIOLATIONS = frozenset(
    {"foreign-tag", "unknown-virtual-tag", "no-st-tag-foreign", "enable-refused"}
)
# reasons (as collected) -> (distinct reasons, main reason, detail text, is a violation)
_META: dict[tuple[str, ...], tuple[tuple[str, ...], str, str, bool]] = {}


def _meta(reasons: tuple[str, ...]) -> tuple[tuple[str, ...], str, str, bool]:
    uniq = tuple(dict.fromkeys(reasons))
    main = next((r for r in uniq if r not in _BENIGN), uniq[0] if uniq else "not-tph")
    text = "; ".join(describe_reason(r) for r in uniq if r not in _BENIGN or r == main)
    return uniq, main, text, any(r in _VIOLATIONS for r in uniq)


class AttachRefused(TphtrapError):
    """The engine will not attach a device: ``code`` is a reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Register kinds (plain ints: this is the VM-exit path).
_RO = 0  # read-only header/capability register: writes dropped
_PAD = 1  # past the ST table, inside the capability: writes dropped
_CTRL = 2
_ST = 3  # ST table entry in the capability
_VC = 4  # MSI-X Vector Control (only its ST bits are filtered)


@dataclass(frozen=True, slots=True)
class _Reg:
    kind: int
    start: int  # offset in its space (config offset or BAR offset)
    size: int
    index: int = 0


@dataclass(slots=True)
class _Outcome:
    """What a register handler decided: the new device value (None: write dropped)."""

    new_dev: int | None
    old_dev: int | None
    reasons: list[str]


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
    """Shadow state and per-device geometry for one (VM, device)."""

    def __init__(self, vm: str, bdf: str, config: ConfigSpace, rules: TagRules) -> None:
        self.vm = vm
        self.bdf = bdf
        self.config = config
        self.rules = rules
        self.poisoned: str | None = None
        self.revoked = False
        tph = config.tph
        msix = config.msix
        self.has_tph = tph is not None
        # --- geometry (derived once) ---
        self.tph_start = tph.offset if tph else -1
        self.tph_end = tph.offset + tph.region_length if tph else -1
        self.ctrl_off = self.tph_start + PCI_TPH_CTRL
        self.location = tph.location if tph else StLocation.NONE
        self.untrappable: str | None = None
        standard = self.location in (StLocation.CAP, StLocation.MSIX)
        if tph is None or not tph.table_ok or not standard:
            self.untrappable = "no-st-table"
        self.ns_ok = bool(tph and tph.no_st_mode)
        self.iv_ok = bool(tph and tph.interrupt_vector_mode)
        self.ext_ok = bool(tph and tph.extended_tph)
        self.snap = config.data[self.tph_start : self.tph_end] if tph else b""
        self.msix_st = bool(tph and msix and self.location is StLocation.MSIX and tph.table_ok)
        self.msix_bir = msix.table_bir if msix else -1
        self.msix_start = msix.table_offset if msix else -1
        self.msix_end = msix.table_offset + msix.table_bytes if msix else -1
        if self.location is StLocation.CAP and tph and tph.table_ok:
            self.n_entries = tph.table_size
        elif self.msix_st and msix:
            self.n_entries = msix.table_size
        else:
            self.n_entries = 0
        # config byte (relative to the TPH capability) -> register
        regs: list[_Reg] = []
        if tph:
            base = self.tph_start
            regs.append(_Reg(_RO, base, PCI_TPH_CAP))
            regs.append(_Reg(_RO, base + PCI_TPH_CAP, PCI_TPH_CTRL - PCI_TPH_CAP))
            regs.append(_Reg(_CTRL, self.ctrl_off, CTRL_SIZE))
            table = base + PCI_TPH_BASE_SIZEOF
            cap_entries = self.n_entries if self.location is StLocation.CAP else 0
            for i in range(cap_entries):
                regs.append(_Reg(_ST, table + ST_ENTRY_SIZE * i, ST_ENTRY_SIZE, i))
            pad = table + ST_ENTRY_SIZE * cap_entries
            if pad < self.tph_end:
                regs.append(_Reg(_PAD, pad, self.tph_end - pad))
        self._cfg_map: list[_Reg] = []
        for reg in regs:
            self._cfg_map.extend([reg] * reg.size)
        # start offset -> the control register or ST entry there: an access that is exactly one
        # of them (what drivers issue) skips the general byte-wise assembly in ``write``.
        self._exact_cfg: dict[int, _Reg] = {r.start: r for r in regs if r.kind >= _CTRL}
        self._vc_regs = [
            _Reg(
                _VC,
                self.msix_start + i * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL,
                4,
                i,
            )
            for i in range(self.n_entries if self.msix_st else 0)
        ]
        self._exact_vc: dict[int, _Reg] = {r.start: r for r in self._vc_regs}
        # --- state ---
        snap_ctrl = tph.ctrl_raw if tph else 0
        self.snap_ctrl = snap_ctrl
        self.guest_ctrl = snap_ctrl
        self.dev_ctrl = snap_ctrl
        if self.location is StLocation.CAP and tph and tph.table_ok:
            self.guest_st: list[int] = list(tph.entries)
            self.dev_st: list[int | None] = list(tph.entries)
        else:
            self.guest_st = [0] * self.n_entries
            self.dev_st = [None] * self.n_entries  # MSI-X table contents are not in the snapshot
        self.vc_low = [1] * (self.n_entries if self.msix_st else 0)  # PCIe: Mask bit resets to 1
        self.latched = False
        self.prospective = TagWidth.ST8
        # Entries outside ``dirty`` hold, on the device, exactly what plan_enable would put
        # there at ``clean_width``: an enable at that width re-checks only the dirty ones.
        self.clean_width: TagWidth | None = None
        self.dirty: set[int] = set(range(self.n_entries))
        self.counts: dict[str, int] = {}

    # --- which filtered registers an access touches ---------------------------------------
    def cfg_regs(self, off: int, end: int) -> list[_Reg]:
        """Registers of the TPH capability overlapping config bytes [off, end)."""
        lo = max(off, self.tph_start)
        hi = min(end, self.tph_end)
        cmap, base = self._cfg_map, self.tph_start
        regs: list[_Reg] = []
        pos = lo
        while pos < hi:
            reg = cmap[pos - base]
            regs.append(reg)
            pos = reg.start + reg.size
        return regs

    def msix_regs(self, off: int, end: int) -> list[_Reg]:
        """Vector Control registers overlapping BAR bytes [off, end) of the MSI-X table."""
        lo = max(off, self.msix_start)
        hi = min(end, self.msix_end)
        if lo >= hi:
            return []
        first = (lo - self.msix_start) // PCI_MSIX_ENTRY_SIZE
        last = (hi - 1 - self.msix_start) // PCI_MSIX_ENTRY_SIZE
        return [r for r in self._vc_regs[first : last + 1] if r.start < hi and lo < r.start + 4]

    # --- small helpers -------------------------------------------------------------------
    def dev_enabled(self) -> bool:
        return _REQ.get(self.dev_ctrl) != ReqEnable.DISABLED

    def dev_width(self) -> TagWidth | None:
        return _WIDTH_OF_ENABLE.get(_REQ.get(self.dev_ctrl))

    def _width_for_tags(self) -> TagWidth:
        return self.dev_width() or self.prospective

    def register_view(self, reg: _Reg) -> tuple[int, int]:
        """(read mask, guest value) of one filtered register: what the guest reads back."""
        if reg.kind == _CTRL:
            return 0xFFFFFFFF, self.guest_ctrl
        if reg.kind == _ST:
            return 0xFFFF, self.guest_st[reg.index]
        return _VC_ST_MASK, self.guest_st[reg.index] << _VC_ST_SHIFT

    def _uses_entries(self) -> bool:
        return self.dev_enabled() and _MODE.get(self.dev_ctrl) == StMode.INT_VEC

    def _ctrl_write(self, value: int) -> DeviceWrite:
        return DeviceWrite("config", self.ctrl_off, CTRL_SIZE, value)

    def _entry_write(self, i: int, tag: int) -> DeviceWrite:
        if self.msix_st:
            reg = self._vc_regs[i]
            value = (self.vc_low[i] & VC_PASS_MASK) | (tag) << _VC_ST_SHIFT
            return DeviceWrite("bar", reg.start, VC_SIZE, value, bar=self.msix_bir)
        off = self.tph_start + PCI_TPH_BASE_SIZEOF + ST_ENTRY_SIZE * i
        return DeviceWrite("config", off, ST_ENTRY_SIZE, tag)

    def _disable_value(self) -> int:
        return _REQ.put(self.dev_ctrl, ReqEnable.DISABLED)

    def force_off(self, pre: list[DeviceWrite]) -> None:
        """Clear Requester Enable on the device now (appends the write)."""
        if self.dev_enabled():
            self.dev_ctrl = self._disable_value()
            pre.append(self._ctrl_write(self.dev_ctrl))

    # --- register values for reads ---------------------------------------------------------
    def guest_cfg_byte(self, off: int) -> int:
        reg = self._cfg_map[off - self.tph_start]
        if reg.kind is _CTRL:
            return (self.guest_ctrl >> (8 * (off - reg.start))) & 0xFF
        if reg.kind is _ST:
            return (self.guest_st[reg.index] >> (8 * (off - reg.start))) & 0xFF
        return self.snap[off - self.tph_start]

    # --- the tag rules -------------------------------------------------------------------
    def resolve_tag(self, guest_tag: int, width: TagWidth) -> tuple[int | None, str]:
        host = self.rules.resolve(guest_tag, width)
        if host is None:
            code = "unknown-virtual-tag" if self.rules.translate is not None else "foreign-tag"
            return None, code
        return host, ("tag-allowed" if host == guest_tag else "tag-translated")

    def on_tag_write(self, i: int, guest_tag: int, pre: list[DeviceWrite]) -> _Outcome:
        """Entry ``i`` now holds ``guest_tag`` in the guest's view: what the device gets."""
        self.guest_st[i] = guest_tag
        old = self.dev_st[i]
        width = self._width_for_tags()
        host, code = self.resolve_tag(guest_tag, width)
        if host is None and self.rules.on_violation is OnViolation.REWRITE:
            host = self.rules.fallback[width]  # None: no allowed fallback, drop (fail closed)
        if host is not None:
            self.dev_st[i] = host
            self._mark(i, width, True)
            return _Outcome(host, old, [code])
        if self.rules.on_violation is OnViolation.DISABLE:
            self.latched = True
            self.force_off(pre)
            self.dirty.add(i)
            return _Outcome(None, old, [code, "tph-forced-off"])
        self._mark(i, width, old is not None and self.rules.host_ok(old, width))
        return _Outcome(None, old, [code])

    def _mark(self, i: int, width: TagWidth, clean: bool) -> None:
        if clean and width is self.clean_width:
            self.dirty.discard(i)
        else:
            self.dirty.add(i)

    def grant_ctrl(self, requested: int) -> tuple[int, list[str]]:
        """The control value the device may get for the guest's ``requested`` control value.

        Reserved bits come from the device; only mode and Requester Enable are decided here.
        Tags are not checked here (see :meth:`plan_enable`).
        """
        mode = _MODE.get(requested)
        en = _REQ.get(requested)
        base = self.dev_ctrl & ~CTRL_WRITABLE
        reasons: list[str] = []
        if requested & ~CTRL_WRITABLE != self.dev_ctrl & ~CTRL_WRITABLE:
            reasons.append("reserved-bits")
        if mode not in _VALID_MODES:
            return base, [*reasons, "mode-reserved"]
        base = _MODE.put(base, mode)
        if en == ReqEnable.DISABLED:
            return base, [*reasons, "tph-disabled"]
        if en == ReqEnable.RESERVED:
            return base, [*reasons, "req-enable-reserved"]
        want_ext = en == ReqEnable.EXT_TPH
        ext = want_ext and self.ext_ok and self.rules.ext_allowed
        self.prospective = TagWidth.ST16 if ext else TagWidth.ST8
        refusal = None
        if self.latched:
            refusal = "tph-latched-off"
        elif not self.rules.tph_allowed:
            refusal = "tph-forbidden"
        elif self.untrappable:
            refusal = self.untrappable
        elif mode == StMode.DEV_SPEC:
            refusal = "device-specific-mode"
        elif (mode == StMode.INT_VEC and not self.iv_ok) or (
            mode == StMode.NO_ST and not self.ns_ok
        ):
            refusal = "mode-unsupported"
        if refusal:
            return base, [*reasons, refusal]
        if want_ext and not ext:
            reasons.append("ext-downgraded")
        granted = _REQ.put(base, ReqEnable.EXT_TPH if ext else ReqEnable.TPH)
        return granted, reasons or ["control-granted"]

    def plan_enable(
        self, target: int, reasons: list[str], pre: list[DeviceWrite], refuse_keeps: bool
    ) -> int | None:
        """Make the ST table safe for ``target`` (an enabling control value) before it lands.

        Appends corrective writes to ``pre`` and returns the control value to write, or None
        when the control write must be dropped (``drop`` policy; with ``refuse_keeps`` False
        the device is forced off instead, for attach and reload).
        """
        width = TagWidth.ST16 if _REQ.get(target) == ReqEnable.EXT_TPH else TagWidth.ST8
        mode = _MODE.get(target)
        action = self.rules.on_violation
        off = _REQ.put(target, ReqEnable.DISABLED)
        if mode == StMode.NO_ST:
            if self.rules.host_ok(0, width):
                return target
            reasons.append("no-st-tag-foreign")
            if action is OnViolation.DISABLE:
                self.latched = True
                reasons.append("tph-forced-off")
            return None if action is OnViolation.DROP and refuse_keeps else off
        changes: list[tuple[int, int]] = []
        check = sorted(self.dirty) if width is self.clean_width else range(self.n_entries)
        for i in check:
            host, code = self.resolve_tag(self.guest_st[i], width)
            if host is None:
                if action is OnViolation.REWRITE and self.rules.fallback[width] is not None:
                    host = self.rules.fallback[width]
                elif action is OnViolation.DISABLE:
                    self.latched = True
                    reasons.extend((code, "tph-forced-off"))
                    return off
                else:
                    dev = self.dev_st[i]
                    if dev is not None and self.rules.host_ok(dev, width):
                        host = dev  # keep what the device holds: the write never reached it
                    else:
                        reasons.extend((code, "enable-refused"))
                        return None if refuse_keeps else off
                if self.dev_st[i] != host:
                    reasons.append(code)
            assert host is not None
            if self.dev_st[i] != host:
                changes.append((i, host))
        if changes:
            if self._uses_entries():
                # Entries are in use: clear Requester Enable before touching them.
                self.dev_ctrl = self._disable_value()
                pre.append(self._ctrl_write(self.dev_ctrl))
            for i, host in changes:
                self.dev_st[i] = host
                pre.append(self._entry_write(i, host))
            reasons.append("entries-corrected")
        self.clean_width = width
        self.dirty.clear()
        return target

    def on_ctrl_write(
        self, requested: int, pre: list[DeviceWrite], refuse_keeps: bool = True
    ) -> _Outcome:
        self.guest_ctrl = (self.snap_ctrl & ~CTRL_WRITABLE) | (requested & CTRL_WRITABLE)
        old = self.dev_ctrl
        target, reasons = self.grant_ctrl(requested)
        if _REQ.get(target) != ReqEnable.DISABLED:
            planned = self.plan_enable(target, reasons, pre, refuse_keeps)
            if planned is None:
                return _Outcome(None, old, reasons)
            target = planned
        # ``pre`` may have cleared Requester Enable already: the main write applies on top of
        # what the device holds after the corrective writes.
        old = self.dev_ctrl
        self.dev_ctrl = target
        return _Outcome(target, old, reasons)

    def reset(self) -> None:
        self.guest_ctrl = self.snap_ctrl & ~CTRL_WRITABLE
        self.dev_ctrl = self.guest_ctrl
        self.guest_st = [0] * self.n_entries
        self.dev_st = [None] * self.n_entries
        self.vc_low = [1] * len(self.vc_low)
        self.latched = False
        self.prospective = TagWidth.ST8
        self.clean_width = None
        self.dirty = set(range(self.n_entries))

    # --- write assembly ----------------------------------------------------------------
    def write(
        self,
        space: Literal["config", "bar"],
        off: int,
        width: int,
        value: int,
        regs: list[_Reg],
        bar: int | None,
    ) -> tuple[Verdict, tuple[DeviceWrite, ...], list[str]]:
        """Decide a write touching the filtered registers ``regs`` (in offset order)."""
        if len(regs) == 1:
            reg = regs[0]
            if reg.start == off and reg.size == width and reg.kind >= _CTRL:
                return self._write_register(space, reg, value, bar)
        data = value.to_bytes(width, "little")
        end = off + width
        out: list[int | None] = list(data)  # device byte per access byte; None = dropped
        pre: list[DeviceWrite] = []
        whole: list[DeviceWrite] = []
        reasons: list[str] = []
        covered = 0
        for reg in regs:
            lo = max(off, reg.start)
            hi = min(end, reg.start + reg.size)
            covered += hi - lo
            if reg.kind <= _PAD:
                for b in range(lo, hi):
                    out[b - off] = None
                reasons.append("read-only" if reg.kind == _RO else "beyond-st-table")
                continue
            # merge the guest's bytes into the register's guest view
            shift = 8 * (lo - reg.start)
            nbytes = hi - lo
            bmask = ((1 << (8 * nbytes)) - 1) << shift
            piece = int.from_bytes(data[lo - off : hi - off], "little") << shift
            outcome = self._handle(reg, bmask, piece, pre)
            reasons.extend(outcome.reasons)
            new = outcome.new_dev
            if new is None:
                for b in range(lo, hi):
                    out[b - off] = None
                continue
            old = outcome.old_dev
            if nbytes == reg.size:
                out[lo - off : hi - off] = list(new.to_bytes(reg.size, "little"))
            elif old is not None and (old & ~bmask) | piece == new:
                pass  # the guest's partial write produces exactly the right device value
            else:
                for b in range(lo, hi):
                    out[b - off] = None
                whole.append(self._reg_write(reg, new, bar))
                if reg.kind == _VC:
                    reasons.append("msix-sub-dword")
        if covered < width and not reasons:
            reasons.append("not-tph")
        if not pre and not whole and None not in out:
            new_value = int.from_bytes(bytes(b for b in out if b is not None), "little")
            if new_value == value:
                return _PASS, (DeviceWrite(space, off, width, value, bar),), reasons
            if off % width == 0:
                # Same shape, other value: an 8-byte MSI-X write stays one 8-byte write.
                return _REWRITE, (DeviceWrite(space, off, width, new_value, bar),), reasons
            # An unaligned access that must change: emit naturally aligned pieces below.
        writes = list(pre)
        run_start = None
        body: list[DeviceWrite] = []
        for idx in range(width + 1):
            cur = out[idx] if idx < width else None
            if cur is not None and run_start is None:
                run_start = idx
            elif cur is None and run_start is not None:
                for p, size in _chunks(off + run_start, off + idx):
                    seg = out[p - off : p - off + size]
                    v = int.from_bytes(bytes(x for x in seg if x is not None), "little")
                    body.append(DeviceWrite(space, p, size, v, bar))
                run_start = None
        body.extend(whole)
        body.sort(key=lambda w: w.offset)
        writes.extend(body)
        if not writes:
            return _DROP, (), reasons
        return _REWRITE, tuple(writes), reasons

    def _write_register(
        self, space: Literal["config", "bar"], reg: _Reg, value: int, bar: int | None
    ) -> tuple[Verdict, tuple[DeviceWrite, ...], list[str]]:
        """The common case: the access is exactly one filtered register."""
        pre: list[DeviceWrite] = []
        outcome = self._handle(reg, (1 << (8 * reg.size)) - 1, value, pre)
        new = outcome.new_dev
        if new is None:
            return (_REWRITE if pre else _DROP), tuple(pre), outcome.reasons
        main = DeviceWrite(space, reg.start, reg.size, new, bar)
        if pre:
            return _REWRITE, (*pre, main), outcome.reasons
        return (_PASS if new == value else _REWRITE), (main,), outcome.reasons

    def _reg_write(self, reg: _Reg, value: int, bar: int | None) -> DeviceWrite:
        if reg.kind is _VC:
            return DeviceWrite("bar", reg.start, reg.size, value, bar)
        return DeviceWrite("config", reg.start, reg.size, value)

    def _handle(self, reg: _Reg, bmask: int, piece: int, pre: list[DeviceWrite]) -> _Outcome:
        if reg.kind is _CTRL:
            requested = (self.guest_ctrl & ~bmask) | piece
            return self.on_ctrl_write(requested, pre)
        if reg.kind is _ST:
            entry = (self.guest_st[reg.index] & ~bmask) | piece
            return self.on_tag_write(reg.index, entry, pre)
        # MSI-X Vector Control: pass-through bits are the guest's, ST bits are filtered.
        i = reg.index
        old_guest = (self.vc_low[i] & VC_PASS_MASK) | (self.guest_st[i]) << _VC_ST_SHIFT
        merged = (old_guest & ~bmask) | piece
        self.vc_low[i] = merged & VC_PASS_MASK
        old_st = self.dev_st[i]
        old_dev = None if old_st is None else (old_guest & VC_PASS_MASK) | (old_st) << _VC_ST_SHIFT
        if not bmask & _VC_ST.mask:
            # Only the mask/reserved bits: not ours to filter, the guest's bytes go through.
            keep = (old_st or 0) << _VC_ST_SHIFT
            old_dev = (old_guest & VC_PASS_MASK) | keep
            return _Outcome((merged & VC_PASS_MASK) | keep, old_dev, ["not-tph"])
        outcome = self.on_tag_write(i, (merged & _VC_ST_MASK) >> _VC_ST_SHIFT, pre)
        tag = outcome.new_dev
        if tag is None:
            # The tag write is dropped, but the dword still carries the mask bit: keep the
            # device's tag (0 if never written; TPH is disabled then, see plan_enable).
            tag = old_st if old_st is not None else 0
            self.dev_st[i] = tag
        new_dev = (merged & VC_PASS_MASK) | (tag) << _VC_ST_SHIFT
        return _Outcome(new_dev, old_dev, outcome.reasons)


class Engine:
    """The trap-and-filter engine for every attached (VM, device).

    ``attach`` builds a :class:`Session` from a config-space snapshot, ``handle`` decides one
    access, ``reload`` swaps the policy and re-checks every device. Unknown VMs or devices, and
    malformed accesses, get ``drop`` with a reason. An unexpected exception while deciding
    drops the access and freezes that device (every later access dropped) until re-attached.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._sessions: dict[tuple[str, str], Session] = {}

    @property
    def policy(self) -> Policy:
        return self._policy

    def session(self, vm: str, bdf: str) -> Session | None:
        return self._sessions.get((vm, bdf))

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # --- lifecycle -----------------------------------------------------------------------
    def attach(self, vm: str, bdf: str, config: ConfigSpace) -> Decision:
        if vm not in self._policy.vms:
            raise AttachRefused("unknown-vm", f"VM {vm!r} is not in the policy")
        vm_policy = self._policy.vms[vm]
        if bdf not in vm_policy.devices:
            owner = self._policy.vm_of_device(bdf)
            where = f" (it belongs to VM {owner.name!r})" if owner else ""
            raise AttachRefused(
                "unknown-device", f"device {bdf} is not assigned to VM {vm!r} in the policy{where}"
            )
        for other_vm, other_bdf in self._sessions:
            if other_bdf == bdf and other_vm != vm:
                raise AttachRefused(
                    "unknown-device", f"device {bdf} is already attached to VM {other_vm!r}"
                )
        rules = self._policy.rules(vm, bdf)
        sess = Session(vm, bdf, config, rules)
        self._sessions[(vm, bdf)] = sess
        pre: list[DeviceWrite] = []
        reasons = ["attached"]
        if sess.has_tph and sess.dev_enabled():
            # Start from a known state: whatever enabled TPH before the VM got the device,
            # the guest has not asked for it (and MSI-X tags are not in the snapshot).
            sess.force_off(pre)
            reasons.append("attach-disabled-tph")
        sess.guest_ctrl = sess.dev_ctrl
        verdict = _REWRITE if pre else _PASS
        return self._decision(sess, verdict, reasons, tuple(pre))

    def detach(self, vm: str, bdf: str) -> Decision:
        sess = self._sessions.pop((vm, bdf), None)
        if sess is None:
            return self._unknown(vm, bdf)
        return Decision(_PASS, "detached", describe_reason("detached"), reasons=("detached",))

    def add_device(self, policy: Policy, vm: str, bdf: str) -> None:
        """Swap in ``policy``, which differs from the current one only by assigning the free
        device ``bdf`` to ``vm`` (replay's implicit devices). Attached sessions keep their
        rules; anything more than that added device is a ValueError: use :meth:`reload`."""
        old = self._policy
        new_vm, old_vm = policy.vms.get(vm), old.vms.get(vm)
        if (
            new_vm is None
            or old_vm is None
            or policy.host is not old.host
            or policy.vms.keys() != old.vms.keys()
            or any(policy.vms[n] is not old.vms[n] for n in old.vms if n != vm)
            or old.vm_of_device(bdf) is not None
            or new_vm.devices.keys() != old_vm.devices.keys() | {bdf}
            or replace(new_vm, devices=old_vm.devices) != old_vm
        ):
            raise ValueError(f"not just device {bdf} added to VM {vm!r}: reload the policy")
        self._policy = policy

    def reload(self, policy: Policy) -> list[tuple[Session, Decision]]:
        """Swap in ``policy`` (already validated); re-check every device against it.

        A device the new policy no longer assigns to its VM is revoked: TPH is forced off and
        every later access is dropped. Returns one decision per session with the corrective
        writes the hypervisor must perform.
        """
        # Build every device's new rules first: if that fails, nothing has changed.
        rules: dict[tuple[str, str], TagRules] = {}
        for key, sess in self._sessions.items():
            vm = policy.vms.get(sess.vm)
            if vm is not None and sess.bdf in vm.devices:
                rules[key] = policy.rules(sess.vm, sess.bdf)
        self._policy = policy
        out: list[tuple[Session, Decision]] = []
        for key, sess in list(self._sessions.items()):
            pre: list[DeviceWrite] = []
            try:
                new = rules.get(key)
                if new is None:
                    sess.revoked = True
                    sess.force_off(pre)
                    reasons = ["device-revoked"]
                else:
                    sess.rules = new
                    sess.clean_width = None  # the allowed tags may have changed: re-check all
                    reasons = ["policy-reloaded"]
                    if sess.has_tph and sess.poisoned is None:
                        reasons += self._reconcile(sess, pre)
            except Exception as exc:  # fail closed: freeze the device, as handle() does
                out.append((sess, self._poison(sess, exc)))
                continue
            verdict = _REWRITE if pre else _PASS
            out.append((sess, self._decision(sess, verdict, reasons, tuple(pre))))
        return out

    def _reconcile(self, sess: Session, pre: list[DeviceWrite]) -> list[str]:
        """Re-grant the guest's control request under new rules (reload): fail closed.

        Works as if the guest re-wrote its control register, except that an enable the rules
        refuse turns TPH off instead of leaving the device as it was.
        """
        if not sess.dev_enabled() and _REQ.get(sess.guest_ctrl) == ReqEnable.DISABLED:
            return []
        outcome = sess.on_ctrl_write(sess.guest_ctrl, pre, refuse_keeps=False)
        new = outcome.new_dev
        if new is not None and new != outcome.old_dev:
            pre.append(sess._ctrl_write(new))
        return [r for r in outcome.reasons if r not in _BENIGN]

    # --- accesses ------------------------------------------------------------------------
    def handle(self, access: Access) -> Decision:
        sess = self._sessions.get((access.vm, access.bdf))
        if sess is None:
            return self._unknown(access.vm, access.bdf)
        if sess.poisoned is not None:
            return self._decision(sess, _DROP, ["internal-error"], detail=sess.poisoned)
        if sess.revoked:
            return self._decision(sess, _DROP, ["device-revoked"])
        try:
            return self._dispatch(sess, access)
        except Exception as exc:
            return self._poison(sess, exc)

    def _poison(self, sess: Session, exc: Exception) -> Decision:
        """Freeze ``sess`` after an unexpected exception: this and every later access drops."""
        sess.poisoned = f"internal error: {type(exc).__name__}: {exc}"
        return self._decision(sess, _DROP, ["internal-error"], detail=sess.poisoned)

    def _dispatch(self, sess: Session, access: Access) -> Decision:
        if isinstance(access, ConfigWrite):
            return self._config_write(sess, access)
        if isinstance(access, MsixWrite):
            return self._msix_write(sess, access)
        if isinstance(access, ConfigRead):
            return self._config_read(sess, access)
        if isinstance(access, MsixRead):
            return self._msix_read(sess, access)
        if isinstance(access, Reset):
            sess.reset()
            return self._decision(sess, _PASS, ["reset"])
        raise TypeError(f"not an access: {access!r}")

    @staticmethod
    def _valid(off: int, width: int, widths: tuple[int, ...], limit: int, value: int) -> bool:
        return (
            width in widths
            and off >= 0
            and off + width <= limit
            and 0 <= value < (1 << (8 * width))
        )

    def _config_write(self, sess: Session, a: ConfigWrite) -> Decision:
        off, width = a.offset, a.width
        if not self._valid(off, width, _CONFIG_WIDTHS, PCI_CFG_SPACE_EXP_SIZE, a.value):
            return self._decision(sess, _DROP, ["bad-access"])
        if not sess.has_tph or off + width <= sess.tph_start or off >= sess.tph_end:
            return self._pass(sess, DeviceWrite("config", off, width, a.value))
        reg = sess._exact_cfg.get(off)
        if reg is not None and reg.size == width:
            # Exactly the control register or one ST entry: what ``write`` and ``_written``
            # would do for it, without their general assembly.
            verdict, writes, reasons = sess._write_register("config", reg, a.value, None)
            mask, patch = sess.register_view(reg)
            return self._decision(sess, verdict, reasons, writes, guest_value=patch, read_mask=mask)
        regs = sess.cfg_regs(off, off + width)
        verdict, writes, reasons = sess.write("config", off, width, a.value, regs, None)
        return self._written(sess, verdict, writes, reasons, off, width, regs, config=True)

    def _msix_write(self, sess: Session, a: MsixWrite) -> Decision:
        off, width = a.offset, a.width
        if not self._valid(off, width, _BAR_WIDTHS, 1 << 64, a.value) or not 0 <= a.bar <= 5:
            return self._decision(sess, _DROP, ["bad-access"])
        if (
            not sess.msix_st
            or a.bar != sess.msix_bir
            or off + width <= sess.msix_start
            or off >= sess.msix_end
        ):
            return self._pass(sess, DeviceWrite("bar", off, width, a.value, a.bar))
        reg = sess._exact_vc.get(off)
        if reg is not None and width == reg.size:
            # Exactly one Vector Control register (see _config_write).
            verdict, writes, reasons = sess._write_register("bar", reg, a.value, a.bar)
            mask, patch = sess.register_view(reg)
            return self._decision(sess, verdict, reasons, writes, guest_value=patch, read_mask=mask)
        regs = sess.msix_regs(off, off + width)
        if not regs:
            return self._pass(sess, DeviceWrite("bar", off, width, a.value, a.bar))
        verdict, writes, reasons = sess.write("bar", off, width, a.value, regs, a.bar)
        return self._written(sess, verdict, writes, reasons, off, width, regs, config=False)

    def _written(
        self,
        sess: Session,
        verdict: Verdict,
        writes: tuple[DeviceWrite, ...],
        reasons: list[str],
        off: int,
        width: int,
        regs: list[_Reg],
        *,
        config: bool,
    ) -> Decision:
        reg = regs[0]
        if len(regs) == 1 and reg.start == off and reg.size == width and reg.kind >= _CTRL:
            mask, patch = sess.register_view(reg)  # exactly one register (the common case)
        elif config:
            mask, patch = self._cfg_view(sess, off, width)
        else:
            mask, patch = self._msix_view(sess, off, width)
        return self._decision(sess, verdict, reasons, writes, guest_value=patch, read_mask=mask)

    def _config_read(self, sess: Session, a: ConfigRead) -> Decision:
        if not self._valid(a.offset, a.width, _CONFIG_WIDTHS, PCI_CFG_SPACE_EXP_SIZE, 0):
            return self._decision(
                sess,
                _DROP,
                ["bad-access"],
                guest_value=(1 << (8 * a.width)) - 1 if a.width in _CONFIG_WIDTHS else None,
            )
        mask, patch = self._cfg_view(sess, a.offset, a.width)
        if not mask:
            return self._decision(sess, _PASS, ["not-tph"])
        return self._decision(
            sess, _REWRITE, ["tph-virtualized"], guest_value=patch, read_mask=mask
        )

    def _msix_read(self, sess: Session, a: MsixRead) -> Decision:
        if not self._valid(a.offset, a.width, _BAR_WIDTHS, 1 << 64, 0) or not 0 <= a.bar <= 5:
            return self._decision(sess, _DROP, ["bad-access"])
        if a.bar != sess.msix_bir:
            return self._decision(sess, _PASS, ["not-tph"])
        mask, patch = self._msix_view(sess, a.offset, a.width)
        if not mask:
            return self._decision(sess, _PASS, ["not-tph"])
        return self._decision(
            sess, _REWRITE, ["tph-virtualized"], guest_value=patch, read_mask=mask
        )

    @staticmethod
    def _cfg_view(sess: Session, off: int, width: int) -> tuple[int, int]:
        """(mask, patch): the bytes of [off, off+width) tphtrap serves from the guest's view."""
        if not sess.has_tph or off + width <= sess.tph_start or off >= sess.tph_end:
            return 0, 0
        mask = patch = 0
        for k in range(width):
            pos = off + k
            if sess.tph_start <= pos < sess.tph_end:
                mask |= 0xFF << (8 * k)
                patch |= sess.guest_cfg_byte(pos) << (8 * k)
        return mask, patch

    @staticmethod
    def _msix_view(sess: Session, off: int, width: int) -> tuple[int, int]:
        if not sess.msix_st or off + width <= sess.msix_start or off >= sess.msix_end:
            return 0, 0
        mask = patch = 0
        st_lo = PCI_MSIX_ENTRY_VECTOR_CTRL + _VC_ST.shift // 8
        for k in range(width):
            pos = off + k
            if not sess.msix_start <= pos < sess.msix_end:
                continue
            rel = pos - sess.msix_start
            field = rel % PCI_MSIX_ENTRY_SIZE
            if field >= st_lo:
                entry = rel // PCI_MSIX_ENTRY_SIZE
                mask |= 0xFF << (8 * k)
                patch |= ((sess.guest_st[entry] >> (8 * (field - st_lo))) & 0xFF) << (8 * k)
        return mask, patch

    # --- decisions -----------------------------------------------------------------------
    def _pass(self, sess: Session, write: DeviceWrite) -> Decision:
        sess.counts["pass"] = sess.counts.get("pass", 0) + 1
        return Decision(_PASS, "not-tph", REASONS["not-tph"], (write,), reasons=("not-tph",))

    def _unknown(self, vm: str, bdf: str) -> Decision:
        code = "unknown-vm" if vm not in self._policy.vms else "unknown-device"
        return Decision(_DROP, code, f"{describe_reason(code)}: vm={vm} bdf={bdf}", reasons=(code,))

    def _decision(
        self,
        sess: Session,
        verdict: Verdict,
        reasons: list[str],
        writes: tuple[DeviceWrite, ...] = (),
        *,
        guest_value: int | None = None,
        read_mask: int = 0,
        detail: str | None = None,
    ) -> Decision:
        key = tuple(reasons)
        meta = _META.get(key)
        if meta is None:
            meta = _META[key] = _meta(key)
        uniq, main, text, violation = meta
        sess.counts[verdict] = sess.counts.get(verdict, 0) + 1
        rule = sess.rules.rule_violation if violation else sess.rules.rule
        return Decision(verdict, main, detail or text, writes, guest_value, read_mask, uniq, rule)
