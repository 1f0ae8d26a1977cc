"""The self-check: a byte-accurate copy of the device that every plan is tried on first.

Before a decision leaves the engine its device writes are applied, one at a time, to this
copy, and the invariant is evaluated after every single write:

- TPH Requester Enable is 0, or: the device can be trapped (one TPH capability, a standard ST
  table), the policy allows TPH, the device was not revoked, Requester Enable is 1 or 3 (3 only
  with the device's Extended TPH bit and a policy that grants 16-bit tags), the mode is No ST or
  Interrupt Vector and the device's capability register has its bit;
- No ST enabled: tag 0 is allowed at the width in force; Interrupt Vector enabled: every ST
  entry (in the capability, or bits 31:16 of every MSI-X Vector Control) holds a known value
  whose tag at that width is allowed;
- no write touches a read-only TPH register or the padding after the ST table, and a control
  write keeps the device's reserved bits (RsvdP).

The copy is kept on its own terms, not the engine's: its layout is read again from the
snapshot's TPH capability registers, and it holds, per register, every value the device may
have: a reset (seen in a write of Initiate FLR or of PMCSR D3hot -> D0, or told by the
hypervisor) leaves each control register and each ST entry either kept or zeroed,
independently. The invariant must hold for every combination.

With the host backend the plan is a list of host kernel operations, applied to the same copy
with the effects the Linux functions have (written out here from ``drivers/pci/tph.c``, not
taken from the renderer): ``tph_enable`` refused while enabled, the request type chosen from
the capability and the root port; ``st_set`` only while enabled and for an allocated vector,
clearing Requester Enable around the entry write; ``tph_disable`` control 0. The invariant is
evaluated after each of those steps, and no raw write may touch a TPH register or a steering
tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import cast

from .. import bulk
from ..device import ConfigSpace
from ..events import DeviceWrite, HostOp
from ..policy import TagRules
from ..spec import (
    PCI_CAP_ID_AF,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_PM,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_TPH_BASE_SIZEOF,
    PCI_TPH_CTRL,
    StLocation,
    TagWidth,
)

__all__ = ["Checker", "UnsafePlan"]

# Written out from the PCIe spec (not taken from the layouts the engine uses).
_MODE_MASK = 0x7
_EN_SHIFT = 8
_EN_MASK = 0x300
_WRITABLE = _MODE_MASK | _EN_MASK
_VC_MASKBIT = 0x1  # power-on value of Vector Control

_WHERE = attrgetter("space", "bar", "offset", "width")  # (a config write's bar is None)

#: a register's possible values: one value, several (after a reset), or None (anything)
Value = int | frozenset[int] | None


#: What a control value asks of the entries: a problem, nothing, or (allowed tags, width).
_Rule = str | tuple[frozenset[int], TagWidth] | None


class UnsafePlan(Exception):
    """A plan that breaks the invariant at some step (a bug in the engine)."""


def _values(v: Value) -> tuple[int, ...] | None:
    if v is None:
        return None
    return (v,) if isinstance(v, int) else tuple(v)


def _either(a: Value, b: int) -> Value:
    """``a`` or ``b``: what a register holds after a reset that may or may not clear it."""
    if a is None:
        return None
    got = {a} if isinstance(a, int) else set(a)
    got.add(b)
    return got.pop() if len(got) == 1 else frozenset(got)


def _put_byte(v: Value, shift: int, byte: int) -> Value:
    if v is None:
        return None
    mask = ~(0xFF << shift)
    if isinstance(v, int):
        return (v & mask) | (byte << shift)
    return frozenset((x & mask) | (byte << shift) for x in v)


class Checker:
    #: A run of whole-entry writes (a re-written table) is applied in one step
    #: (tests/test_check_shortcuts.py compares it with the general loop).
    batch_entries = True

    def __init__(self, cfg: ConfigSpace) -> None:
        self.completer: int | None = None  # host backend: the root port's completer field
        self.rciep = False
        self.allocated: frozenset[int] = frozenset()
        # host backend: where each op of the last plan began in its undo records
        self._host_marks: tuple[int, ...] = ()
        self._host_undo: tuple[tuple[list[Value], int, Value], ...] = ()
        self.caps = [
            (t.offset, min(t.offset + ((t.length + 3) & ~3), cfg.size)) for t in cfg.tph_all
        ]
        tph = cfg.tph
        single = tph is not None and len(cfg.tph_all) == 1 and tph.table_ok
        self.trappable = single
        self.cap_bits = tph.cap_raw if tph is not None else 0
        loc = tph.location if tph is not None else StLocation.NONE
        msix = cfg.msix
        self.table_at = -1
        self.msix_bir = -1
        self.msix_start = self.msix_end = -1
        n = 0
        if single and tph is not None and loc is StLocation.CAP:
            n = tph.table_size
            self.table_at = tph.offset + PCI_TPH_BASE_SIZEOF
        elif single and loc is StLocation.MSIX and msix is not None:
            n = msix.table_size
            self.msix_bir = msix.table_bir
            self.msix_start = msix.table_offset
            self.msix_end = self.msix_start + n * PCI_MSIX_ENTRY_SIZE
        self.n = n
        self.in_cap = self.table_at >= 0
        # registers whose write may reset the function, found again from the capability list
        self.flr_exp = self.flr_af = self.pmcsr = -1
        for c in cfg.caps:
            if c.kind == "std" and c.cap_id == PCI_CAP_ID_EXP:
                self.flr_exp = c.offset + 9  # Device Control, high byte: bit 15 Initiate FLR
            elif c.kind == "std" and c.cap_id == PCI_CAP_ID_AF:
                self.flr_af = c.offset + 4  # AF control, bit 0 Initiate FLR
            elif c.kind == "std" and c.cap_id == PCI_CAP_ID_PM:
                self.pmcsr = c.offset + 4  # PowerState 1:0, No_Soft_Reset bit 3
        pm = cfg.data[self.pmcsr] if self.pmcsr >= 0 else 0
        self.no_soft_reset = bool(pm & 0x8)
        self.pm = pm & 0x3
        watched = [p for p in (self.flr_exp, self.flr_af, self.pmcsr) if p >= 0]
        watched += [x for start, end in self.caps for x in (start, end - 1)]
        self.watch_lo = min(watched, default=0)
        self.watch_hi = max(watched, default=-1) + 1
        self.ctrl: list[Value] = [cfg.u32(start + PCI_TPH_CTRL) for start, _ in self.caps]
        # (the MSI-X table is not part of a config snapshot: its words start unknown)
        self.ent: list[Value] = (
            [cfg.u16(self.table_at + 2 * i) for i in range(n)] if self.in_cap else [None] * n
        )
        self._undo: list[tuple[list[Value], int, Value]] = []
        # the writes that set one entry whole (_entry_indices), as (space, bar, offset, width),
        # and the entry each sets
        self._entry_at: dict[tuple[str, int | None, int, int], int] = {}
        if self.in_cap:
            self._entry_at = {("config", None, self.table_at + 2 * i, 2): i for i in range(n)}
        elif n and not self.msix_start % 4:
            vc = self.msix_start + PCI_MSIX_ENTRY_VECTOR_CTRL
            self._entry_at = {
                ("bar", self.msix_bir, vc + PCI_MSIX_ENTRY_SIZE * i, 4): i for i in range(n)
            }
        # _unsafe's kept answers of _control_rule, for the rules they were made with
        self._control_rules: dict[tuple[int, int, bool], _Rule] = {}
        self._rules_seen: TagRules | None = None

    # --- the device -------------------------------------------------------------------------
    def _set(self, regs: list[Value], i: int, v: Value) -> None:
        self._undo.append((regs, i, regs[i]))
        regs[i] = v

    def _whole_register(self, w: DeviceWrite) -> tuple[list[Value] | None, int, int] | None:
        """The register ``w`` sets whole, as (registers, index, value): the control register
        of the capability (its reserved bits checked), one ST entry of its table, or the one
        Vector Control word of a dword-aligned 4- or 8-byte write to the MSI-X BAR (a dword of
        the table is a whole Vector Control word or no part of one; registers None: ``w``
        holds no part of one). None: not such a write (the writes drivers issue)."""
        if w.space == "config":
            if not self.caps:
                return None
            if w.offset == self.caps[0][0] + PCI_TPH_CTRL and w.width == 4:
                c0 = self.ctrl[0]
                for c in (c0,) if type(c0) is int else _values(c0) or ():
                    if (w.value ^ c) & ~_WRITABLE:
                        raise UnsafePlan(f"control write at {w.offset:#x} changes reserved bits")
                return self.ctrl, 0, w.value
            rel = w.offset - self.table_at
            if self.in_cap and w.width == 2 and 0 <= rel < 2 * self.n and not rel % 2:
                return self.ent, rel // 2, w.value
            return None
        if w.bar != self.msix_bir or (w.width != 4 and w.width != 8) or w.offset % 4:
            return None
        found: tuple[list[Value] | None, int, int] = (None, -1, 0)
        for k in range(0, w.width, 4):
            rel = w.offset + k - self.msix_start
            if (
                0 <= rel < self.n * PCI_MSIX_ENTRY_SIZE
                and rel % PCI_MSIX_ENTRY_SIZE == PCI_MSIX_ENTRY_VECTOR_CTRL
            ):
                found = self.ent, rel // PCI_MSIX_ENTRY_SIZE, (w.value >> (8 * k)) & 0xFFFF_FFFF
        return found

    def _entry_indices(self, writes: Sequence[DeviceWrite]) -> list[int | None]:
        """For each write, the entry it sets whole (None: not such a write), then a None: ST
        entries of the capability's table written as 2-byte config writes, Vector Control
        words written as aligned 4-byte writes to the MSI-X BAR (what a plan that re-writes
        the table is made of), each what :meth:`_whole_register` finds."""
        if bulk.C is not None:
            got = bulk.C.entry_indices(self._entry_at, writes)
            if got is not None:
                return got
        at = list(map(self._entry_at.get, map(_WHERE, writes)))
        at.append(None)
        return at

    def _apply_run(
        self,
        writes: Sequence[DeviceWrite],
        start: int,
        run: list[int],
        rules: TagRules,
        revoked: bool,
        disabled: bool,
    ) -> None:
        """The writes ``writes[start:]`` setting the entries ``run`` whole one after the other
        (:meth:`_entry_indices`), applied and checked as the general loop does one by one:
        each entry test after its own write, or none while every control value is known and
        disabled (an entry cannot be unsafe then)."""
        ent = self.ent
        mask = -1 if self.in_cap else 0xFFFF_FFFF  # (the Vector Control word of a BAR write)
        if (
            disabled
            and bulk.C is not None
            and bulk.C.apply_disabled(self._undo, ent, writes, start, run, mask)
        ):
            return
        values = [w.value & mask for w in writes[start : start + len(run)]]
        if disabled:
            self._undo.extend(zip(repeat(ent), run, map(ent.__getitem__, run)))
            for i, value in zip(run, values, strict=True):
                ent[i] = value
            return
        for k, (i, value) in enumerate(zip(run, values, strict=True)):
            self._set(ent, i, value)
            problem = self._violation(rules, revoked, {i})
            if problem is not None:
                raise UnsafePlan(f"after {_show(writes[start + k])}: {problem}")

    def _whole_config(self, w: DeviceWrite, touched: set[int]) -> tuple[bool, bool]:
        """:meth:`_config`, with a whole control register or ST entry applied in one step."""
        regs, i, value = self._whole_register(w) or (None, -1, 0)
        if regs is None:  # (a config write always names its register when it has one)
            return self._config(w, touched)
        self._set(regs, i, value)
        if regs is self.ctrl:
            return True, False
        touched.add(i)
        return False, False

    def _verify_whole(self, w: DeviceWrite, rules: TagRules, revoked: bool) -> bool:
        """:meth:`verify` of a plan of one write that sets one register whole
        (:meth:`_whole_register`), in one step; False: not such a write."""
        got = self._whole_register(w)
        if got is None:
            return False
        regs, i, value = got
        if regs is None:
            return True  # no filtered byte: nothing changes, nothing to check
        entries = None if regs is self.ctrl else {i}
        old = regs[i]
        regs[i] = value
        ctrl = self.ctrl
        if len(ctrl) == 1 and type(ctrl[0]) is int:  # one capability, its one known value
            problem = self._unsafe(0, ctrl[0], rules, revoked, entries)
        else:
            problem = self._violation(rules, revoked, entries)
        if problem is not None:
            regs[i] = old
            raise UnsafePlan(f"after {_show(w)}: {problem}")
        return True

    def _whole_bar(self, w: DeviceWrite, touched: set[int]) -> None:
        """:meth:`_bar`, with the Vector Control word of an aligned write applied in one
        step."""
        got = self._whole_register(w)
        if got is None:
            self._bar(w, touched)
            return
        regs, i, value = got
        if regs is not None:
            self._set(regs, i, value)
            touched.add(i)

    def _config(self, w: DeviceWrite, touched: set[int]) -> tuple[bool, bool]:
        """Apply a config write; returns (control touched, reset)."""
        ctrl = reset = False
        for b in range(w.width):
            pos = w.offset + b
            byte = (w.value >> (8 * b)) & 0xFF
            for k, (start, end) in enumerate(self.caps):
                if not start <= pos < end:
                    continue
                rel = pos - start
                if rel < PCI_TPH_CTRL:
                    raise UnsafePlan(f"write to the read-only TPH register at {pos:#x}")
                if rel < PCI_TPH_CTRL + 4:
                    shift = 8 * (rel - PCI_TPH_CTRL)
                    keep = ~(_WRITABLE >> shift) & 0xFF
                    for c in _values(self.ctrl[k]) or ():
                        if (byte ^ (c >> shift)) & keep:
                            raise UnsafePlan(f"control write at {pos:#x} changes reserved bits")
                    self._set(self.ctrl, k, _put_byte(self.ctrl[k], shift, byte))
                    ctrl = True
                elif k == 0 and self.in_cap and self.table_at <= pos < self.table_at + 2 * self.n:
                    i, half = divmod(pos - self.table_at, 2)
                    # an unknown entry becomes known only when both its bytes are written
                    old = self.ent[i]
                    if old is None and w.width >= 2 and pos % 2 == 0 and b + 1 < w.width:
                        old = 0
                    self._set(self.ent, i, _put_byte(old, 8 * half, byte))
                    touched.add(i)
                else:
                    raise UnsafePlan(f"write to the TPH padding at {pos:#x}")
                break
            else:
                if (pos == self.flr_exp and byte & 0x80) or (pos == self.flr_af and byte & 0x1):
                    reset = True
                elif pos == self.pmcsr:
                    state, self.pm = self.pm, byte & 0x3
                    reset |= state == 3 and self.pm == 0 and not self.no_soft_reset
        return ctrl, reset

    def _bar(self, w: DeviceWrite, touched: set[int]) -> None:
        lo, hi = max(w.offset, self.msix_start), min(w.offset + w.width, self.msix_end)
        for pos in range(lo, hi):
            i, field = divmod(pos - self.msix_start, PCI_MSIX_ENTRY_SIZE)
            if field < PCI_MSIX_ENTRY_VECTOR_CTRL:
                continue
            touched.add(i)
            vc = pos - field + PCI_MSIX_ENTRY_VECTOR_CTRL
            old = self.ent[i]
            if old is None and w.offset <= vc and vc + 4 <= w.offset + w.width:
                old = 0  # the whole word is written: it becomes known
            byte = (w.value >> (8 * (pos - w.offset))) & 0xFF
            self._set(self.ent, i, _put_byte(old, 8 * (field - PCI_MSIX_ENTRY_VECTOR_CTRL), byte))

    def _fork(self) -> None:
        """A reset: every control register and every entry is either kept or zeroed."""
        for k, c in enumerate(self.ctrl):
            zero = (_values(c) or (0,))[0] & ~_WRITABLE
            self._set(self.ctrl, k, None if c is None else _either(c, zero))
        zero_ent = 0 if self.in_cap else _VC_MASKBIT
        for i, v in enumerate(self.ent):
            self._set(self.ent, i, _either(v, zero_ent))
        self.pm = 0

    # --- the invariant -----------------------------------------------------------------------
    def _violation(
        self,
        rules: TagRules,
        revoked: bool,
        entries: set[int] | None,
        pending: frozenset[int] | set[int] = frozenset(),
    ) -> str | None:
        """What is unsafe now (None: nothing). ``entries``: only those changed; ``pending``:
        capabilities that were unsafe before the plan and that it has not written yet."""
        for k, c in enumerate(self.ctrl):
            if k in pending:
                continue
            possible = (c,) if type(c) is int else _values(c)
            if possible is None:
                return "control register unknown"
            for ctrl in possible:
                problem = self._unsafe(k, ctrl, rules, revoked, entries)
                if problem is not None:
                    return problem
        return None

    def _all_disabled(self) -> bool:
        """Is every control register known, with Requester Enable clear in every value?"""
        for c in self.ctrl:
            possible = _values(c)
            if possible is None or any((v & _EN_MASK) for v in possible):
                return False
        return True

    def _others(self, k: int) -> set[int]:
        """Every capability but ``k``."""
        return set(range(len(self.caps))) - {k}

    def _unsafe(
        self, k: int, ctrl: int, rules: TagRules, revoked: bool, entries: set[int] | None
    ) -> str | None:
        if self._rules_seen is not rules:
            self._rules_seen = rules
            self._control_rules.clear()
        key = (k, ctrl, revoked)
        if key in self._control_rules:
            rule = self._control_rules[key]
        else:
            if len(self._control_rules) >= 64:
                self._control_rules.clear()
            rule = self._control_rules[key] = self._control_rule(k, ctrl, rules, revoked)
        if rule is None or isinstance(rule, str):
            return rule
        allowed, width = rule
        shift = 0 if self.in_cap else 16
        mask = width.mask
        ent = self.ent
        if entries is None and _all_allowed(allowed, ent, shift, mask):
            return None
        for i in range(self.n) if entries is None else entries:
            v = ent[i]
            if type(v) is int:  # one known value (the usual case)
                if (v >> shift) & mask in allowed:
                    continue
                values: tuple[int, ...] | None = (v,)
            else:
                values = _values(v)
            if values is None:
                return f"entry {i} is unknown while in use"
            for v in values:
                if (v >> shift) & mask not in allowed:
                    return f"entry {i} holds a tag not allowed at {int(width)} bits: {v:#x}"
        return None

    def _control_rule(self, k: int, ctrl: int, rules: TagRules, revoked: bool) -> _Rule:
        """What control value ``ctrl`` of capability ``k`` asks of the device: a problem, None
        (safe whatever the entries hold), or the tags its entries must hold at a width (a pure
        function of these and the device's capability, kept by :meth:`_unsafe`)."""
        en = (ctrl & _EN_MASK) >> _EN_SHIFT
        if en == 0:
            return None
        if en == 2:
            return "Requester Enable 2 (reserved) on the device"
        if not self.trappable or k:
            return "TPH enabled on a device that cannot be trapped"
        if revoked or not rules.tph_allowed:
            return "TPH enabled where the policy forbids it"
        mode = ctrl & _MODE_MASK
        if mode > 1 or not (self.cap_bits >> mode) & 1:
            return f"TPH enabled in ST mode {mode}, which is not allowed on this device"
        width = TagWidth.ST16 if en == 3 else TagWidth.ST8
        if width is TagWidth.ST16 and not (self.cap_bits & 0x100 and rules.ext_allowed):
            return "Extended TPH enabled without device support or 16-bit tags"
        allowed = rules.allowed[width]
        if mode == 0:
            return None if 0 in allowed else "No ST mode enabled where tag 0 is not allowed"
        return allowed, width

    # --- plans -------------------------------------------------------------------------------
    def reset(self) -> None:
        """The hypervisor reset the device."""
        self._fork()
        self._undo.clear()

    def verify(
        self, writes: Sequence[DeviceWrite], rules: TagRules, revoked: bool, full: bool
    ) -> None:
        """Apply ``writes`` one by one, checking after each; undo them all if one is unsafe.

        ``full``: check everything after the first write (the rules or the device changed
        outside this plan); otherwise only what each write touches, on a state already checked.
        """
        if not full and len(writes) == 1 and self._verify_whole(writes[0], rules, revoked):
            return
        self._undo.clear()
        try:
            # A plan made after a change outside it (attach, reset, reload) may start from an
            # unsafe device: each capability that is unsafe now must be written by the plan,
            # and every other part must stay safe at every step.
            pending: set[int] = set()
            if full:
                pending = {
                    k
                    for k in range(len(self.caps))
                    if self._violation(rules, revoked, None, self._others(k)) is not None
                }
            disabled: bool | None = None  # every control register known and disabled
            entry = self._entry_indices(writes) if self.batch_entries and not full else None
            at, end = 0, len(writes)
            while at < end:
                w = writes[at]
                at += 1
                if entry is not None and entry[at - 1] is not None and entry[at] is not None:
                    stop = entry.index(None, at)  # a run of whole-entry writes: in one step
                    if disabled is None:
                        disabled = self._all_disabled()
                    run = cast(list[int], entry[at - 1 : stop])
                    self._apply_run(writes, at - 1, run, rules, revoked, disabled)
                    at = stop
                    continue
                touched: set[int] = set()
                ctrl = reset = False
                if w.space == "config":
                    if w.offset + w.width > self.watch_lo and w.offset < self.watch_hi:
                        ctrl, reset = self._whole_config(w, touched)
                        pending -= {
                            k
                            for k, (start, _) in enumerate(self.caps)
                            if w.offset < start + PCI_TPH_CTRL + 4
                            and start + PCI_TPH_CTRL < w.offset + w.width
                        }
                elif w.bar == self.msix_bir:
                    self._whole_bar(w, touched)
                if reset:
                    self._fork()
                if full or ctrl or reset:
                    problem = self._violation(rules, revoked, None, pending)
                    disabled = None
                elif touched:
                    if disabled is None:
                        disabled = self._all_disabled()
                    # with TPH off everywhere an entry cannot be unsafe: _violation says None
                    problem = None if disabled else self._violation(rules, revoked, touched)
                else:
                    problem = None
                if problem is not None:
                    raise UnsafePlan(f"after {_show(w)}: {problem}")
            if full:
                problem = self._violation(rules, revoked, None)
                if problem is not None:
                    raise UnsafePlan(f"at the end of the plan: {problem}")
        except UnsafePlan:
            for regs, i, old in reversed(self._undo):
                regs[i] = old
            raise
        finally:
            self._undo.clear()

    # --- the host backend -------------------------------------------------------------------
    def host(self, completer: int, rciep: bool) -> None:
        """Plans are host operations from now on, below a root port completing ``completer``."""
        self.completer = completer
        self.rciep = rciep

    def _host_req(self) -> int:
        """Requester Enable ``pcie_enable_tph`` writes (0: it returns -EINVAL)."""
        req = 3 if self.cap_bits & 0x100 else 1
        if not self.rciep:
            req = min(req, self.completer or 0)
        return req

    def entries_allowed(self, width: TagWidth, rules: TagRules) -> bool:
        """Does every entry hold a known tag allowed at ``width``, whatever the device did?"""
        allowed = rules.allowed[width]
        shift = 0 if self.in_cap else 16
        for v in self.ent:
            values = _values(v)
            if values is None or any((x >> shift) & width.mask not in allowed for x in values):
                return False
        return True

    def host_vectors(self, allocated: frozenset[int], cleared: bool) -> None:
        """The host's MSI-X vectors; ``cleared``: every Vector Control is the mask bit now."""
        self.allocated = allocated
        if cleared and self.msix_start >= 0:
            self.ent = [_VC_MASKBIT] * self.n

    def verify_host(
        self,
        ops: tuple[HostOp, ...],
        writes: tuple[DeviceWrite, ...],
        rules: TagRules,
        revoked: bool,
        full: bool,
        allocated: frozenset[int],
    ) -> None:
        """Apply the host ``ops``, then the raw ``writes``, checking each step; undo all of
        them if one is unsafe. The ops stay undoable for :meth:`host_failed`."""
        self._undo.clear()
        marks: list[int] = []
        try:
            if full and not ops:
                problem = self._violation(rules, revoked, None)
                if problem is not None:
                    raise UnsafePlan(f"with nothing to do: {problem}")
            for op in ops:
                marks.append(len(self._undo))
                for step in self._host_steps(op, rules, allocated):
                    problem = self._violation(rules, revoked, None if full else step)
                    if problem is not None:
                        raise UnsafePlan(f"after {_show_op(op)}: {problem}")
                full = False
            host_undo = list(self._undo)
            reset = False
            for w in writes:
                for b in range(w.width):
                    pos = w.offset + b
                    if w.space == "config":
                        if any(start <= pos < end for start, end in self.caps):
                            raise UnsafePlan(
                                f"raw write {_show(w)} to a TPH register (host backend)"
                            )
                    elif self._tag_byte(w.bar, pos):
                        raise UnsafePlan(f"raw write {_show(w)} to a steering tag (host backend)")
                if w.space == "config" and w.offset + w.width > self.watch_lo:
                    reset |= self._config(w, set())[1]
            if reset:
                self._fork()
                problem = self._violation(rules, revoked, None)
                if problem is not None:
                    raise UnsafePlan(f"after the reset in the writes: {problem}")
        except UnsafePlan:
            for regs, i, old in reversed(self._undo):
                regs[i] = old
            self._undo.clear()
            raise
        self._host_marks = tuple(marks)
        self._host_undo = tuple(host_undo)
        self._undo.clear()

    def _tag_byte(self, bar: int | None, pos: int) -> bool:
        if self.msix_start < 0 or bar != self.msix_bir:
            return False
        rel = pos - self.msix_start
        return 0 <= rel < self.n * PCI_MSIX_ENTRY_SIZE and rel % PCI_MSIX_ENTRY_SIZE >= 14

    def _host_steps(
        self, op: HostOp, rules: TagRules, allocated: frozenset[int]
    ) -> list[set[int] | None]:
        """Apply ``op`` in the steps the kernel takes; after each, what to check (None:
        everything, a set: those entries; everything anyway on a full check)."""
        if not self.caps:
            raise UnsafePlan(f"{_show_op(op)} on a device without TPH")
        possible = _values(self.ctrl[0])
        if possible is None:
            raise UnsafePlan(f"{_show_op(op)} while the control register is unknown")
        ens = {(c & _EN_MASK) >> _EN_SHIFT for c in possible}
        ctrl = possible[0]
        if op.op == "tph_disable":
            self._set(self.ctrl, 0, 0)
            return [None]
        if op.op == "tph_enable":
            if ens != {0}:
                raise UnsafePlan("tph_enable while TPH may be enabled (the kernel returns -EBUSY)")
            mode = {"ns": 0, "iv": 1}.get(op.mode or "")
            if mode is None or not (self.cap_bits >> mode) & 1:
                raise UnsafePlan(f"tph_enable in a mode the device lacks: {op.mode}")
            req = self._host_req()
            if req == 0:
                raise UnsafePlan("tph_enable below a root port completing no TPH (-EINVAL)")
            if op.width != (16 if req == 3 else 8):
                raise UnsafePlan(f"tph_enable says width {op.width}, the kernel enables {req}")
            self._set(self.ctrl, 0, (ctrl & ~_WRITABLE) | mode | (req << _EN_SHIFT))
            return [None]
        if op.op != "st_set":
            raise UnsafePlan(f"unknown host operation {op.op!r}")
        if len(possible) != 1 or not ens - {0} or 0 in ens:
            raise UnsafePlan(f"{_show_op(op)} while TPH is not surely enabled (-EINVAL)")
        en = ens.pop()
        width = TagWidth.ST16 if en == 3 else TagWidth.ST8
        if op.cpu is not None and rules.cpu_tags.get(width, {}).get(op.cpu) != op.tag:
            raise UnsafePlan(f"{_show_op(op)} names a CPU that is not the VM's with that tag")
        if op.tag >> int(width):
            raise UnsafePlan(f"{_show_op(op)}: a tag wider than {int(width)} bits")
        if ctrl & _MODE_MASK == 0:
            return []  # No ST mode: pcie_tph_set_st_entry writes nothing
        i = op.index
        if not 0 <= i < self.n:
            raise UnsafePlan(f"{_show_op(op)} past the ST table (-ENXIO)")
        if self.msix_start >= 0 and i not in allocated:
            raise UnsafePlan(f"{_show_op(op)} for a vector the host has not allocated (-ENXIO)")
        self._set(self.ctrl, 0, ctrl & ~_EN_MASK)  # Requester Enable cleared, mode kept
        if self.in_cap:
            self._set(self.ent, i, op.tag)
        else:
            old = self.ent[i]
            lows = _values(old) or (_VC_MASKBIT,)
            words = frozenset((x & 0xFFFF) | (op.tag << 16) for x in lows)
            self._set(self.ent, i, next(iter(words)) if len(words) == 1 else words)
        self._set(self.ctrl, 0, ctrl)  # restored: only entry ``i`` differs from before the op
        return [None, {i}, {i}]

    def host_failed(self, k: int, op: str, errno: int) -> None:
        """Op ``k`` of the last plan failed: ops ``k``.. are taken back, then the failure's
        effect: a failed ``st_set`` leaves TPH disabled; a ``tph_enable`` refused with -EBUSY
        means the kernel had it enabled, in a state nobody knows."""
        if 0 <= k < len(self._host_marks):
            for regs, i, old in reversed(self._host_undo[self._host_marks[k] :]):
                regs[i] = old
        if op == "st_set":
            self.ctrl[0] = 0
        elif op == "tph_disable" or (op == "tph_enable" and errno == -16):
            possible = _values(self.ctrl[0]) or (0,)
            self.ctrl[0] = (possible[0] & ~_WRITABLE) | 1 | (3 << _EN_SHIFT)  # the worst
        self._host_marks = ()
        self._host_undo = ()

    def disable_host(self) -> None:
        """The poison path of the host backend: ``tph_disable``."""
        if self.caps:
            self.ctrl[0] = 0

    def power_on_controls(self) -> None:
        """A reset the engine did not follow (its device is frozen): each control register is
        taken to hold its power-on value, which the poison path writes next (a device that
        kept its own value gets it too)."""
        for k, c in enumerate(self.ctrl):
            self.ctrl[k] = (_values(c) or (0,))[0] & ~_WRITABLE

    def disable_all(self) -> tuple[DeviceWrite, ...]:
        """Writes that clear Requester Enable on every TPH capability (the poison path)."""
        writes = []
        for k, (start, _) in enumerate(self.caps):
            possible = _values(self.ctrl[k]) or (0,)
            value = possible[0] & ~_EN_MASK
            writes.append(DeviceWrite("config", start + PCI_TPH_CTRL, 4, value))
            self.ctrl[k] = _either(frozenset(c & ~_EN_MASK for c in possible), value)
        return tuple(writes)


def _show_op(op: HostOp) -> str:
    if op.op == "st_set":
        return f"st_set[{op.index}]={op.tag:#x} (cpu {op.cpu})"
    if op.op == "tph_enable":
        return f"tph_enable {op.mode} at {op.width} bits"
    return op.op


def _show(w: DeviceWrite) -> str:
    where = "config" if w.bar is None else f"bar{w.bar}"
    return f"{where}[{w.offset:#x}/{w.width}]={w.value:#x}"


def _all_allowed(allowed: frozenset[int], ent: list[Value], shift: int, mask: int) -> bool:
    """Is every entry one known value (the usual case) whose tag is allowed? In one pass."""
    got = bulk.C.tags_allowed(allowed, ent, shift, mask) if bulk.C is not None else None
    if got is not None:
        return got
    try:
        return allowed.issuperset([(v >> shift) & mask for v in ent])  # type: ignore[operator]
    except TypeError:  # an unknown entry, or one with several possible values
        return False
