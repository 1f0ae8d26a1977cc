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
"""

from __future__ import annotations

from ..device import ConfigSpace
from ..events import DeviceWrite
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

#: a register's possible values: one value, several (after a reset), or None (anything)
Value = int | frozenset[int] | None


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
    def __init__(self, cfg: ConfigSpace) -> None:
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

    # --- the device -------------------------------------------------------------------------
    def _set(self, regs: list[Value], i: int, v: Value) -> None:
        self._undo.append((regs, i, regs[i]))
        regs[i] = v

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
    def _violation(self, rules: TagRules, revoked: bool, entries: set[int] | None) -> str | None:
        """What is unsafe now (None: nothing). ``entries``: only those changed."""
        for k, c in enumerate(self.ctrl):
            possible = _values(c)
            if possible is None:
                return "control register unknown"
            for ctrl in possible:
                problem = self._unsafe(k, ctrl, rules, revoked, entries)
                if problem is not None:
                    return problem
        return None

    def _unsafe(
        self, k: int, ctrl: int, rules: TagRules, revoked: bool, entries: set[int] | None
    ) -> str | None:
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
        shift = 0 if self.in_cap else 16
        for i in range(self.n) if entries is None else entries:
            values = _values(self.ent[i])
            if values is None:
                return f"entry {i} is unknown while in use"
            for v in values:
                if (v >> shift) & width.mask not in allowed:
                    return f"entry {i} holds a tag not allowed at {int(width)} bits: {v:#x}"
        return None

    # --- plans -------------------------------------------------------------------------------
    def reset(self) -> None:
        """The hypervisor reset the device."""
        self._fork()
        self._undo.clear()

    def verify(
        self, writes: tuple[DeviceWrite, ...], rules: TagRules, revoked: bool, full: bool
    ) -> None:
        """Apply ``writes`` one by one, checking after each; undo them all if one is unsafe.

        ``full``: check everything after the first write (the rules or the device changed
        outside this plan); otherwise only what each write touches, on a state already checked.
        """
        self._undo.clear()
        try:
            if full and not writes:
                problem = self._violation(rules, revoked, None)
                if problem is not None:
                    raise UnsafePlan(problem)
            for w in writes:
                touched: set[int] = set()
                ctrl = reset = False
                if w.space == "config":
                    if w.offset + w.width > self.watch_lo and w.offset < self.watch_hi:
                        ctrl, reset = self._config(w, touched)
                elif w.bar == self.msix_bir:
                    self._bar(w, touched)
                if reset:
                    self._fork()
                if full or ctrl or reset:
                    problem = self._violation(rules, revoked, None)
                elif touched:
                    problem = self._violation(rules, revoked, touched)
                else:
                    problem = None
                if problem is not None:
                    raise UnsafePlan(f"after {_show(w)}: {problem}")
                full = False
        except UnsafePlan:
            for regs, i, old in reversed(self._undo):
                regs[i] = old
            raise
        finally:
            self._undo.clear()

    def disable_all(self) -> tuple[DeviceWrite, ...]:
        """Writes that clear Requester Enable on every TPH capability (the poison path)."""
        writes = []
        for k, (start, _) in enumerate(self.caps):
            possible = _values(self.ctrl[k]) or (0,)
            value = possible[0] & ~_EN_MASK
            writes.append(DeviceWrite("config", start + PCI_TPH_CTRL, 4, value))
            self.ctrl[k] = _either(frozenset(c & ~_EN_MASK for c in possible), value)
        return tuple(writes)


def _show(w: DeviceWrite) -> str:
    where = "config" if w.bar is None else f"bar{w.bar}"
    return f"{where}[{w.offset:#x}/{w.width}]={w.value:#x}"
