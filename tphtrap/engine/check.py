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
snapshot's TPH capability registers, and a reset (seen in a write of Initiate FLR or of a
PMCSR D3hot -> D0, or told by the hypervisor) forks it into every outcome a device may show:
control kept or zeroed, times tags kept or zeroed. The invariant must hold in each.

With the host backend the plan is a list of host kernel operations, applied to the same copy
with the effects the Linux functions have (written out here from ``drivers/pci/tph.c``, not
taken from the renderer): ``tph_enable`` refused while enabled, the request type chosen from
the capability and the root port; ``st_set`` only while enabled and for an allocated vector,
clearing Requester Enable around the entry write; ``tph_disable`` control 0. The invariant is
evaluated after each of those steps, and no raw write may touch a TPH register or a steering
tag.
"""

from __future__ import annotations

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
_MAX_BRANCHES = 16


class UnsafePlan(Exception):
    """A plan that breaks the invariant at some step (a bug in the engine)."""


class _Branch:
    """One possible state of the device's TPH registers."""

    __slots__ = ("ctrl", "ent", "pm")

    def __init__(self, ctrl: list[int], ent: list[int | None], pm: int) -> None:
        self.ctrl = ctrl
        self.ent = ent  # capability: 16-bit entries; MSI-X: whole Vector Control dwords
        self.pm = pm

    def copy(self) -> _Branch:
        return _Branch(self.ctrl.copy(), self.ent.copy(), self.pm)

    def key(self) -> tuple[object, ...]:
        return (tuple(self.ctrl), tuple(self.ent), self.pm)


class Checker:
    def __init__(self, cfg: ConfigSpace) -> None:
        self.completer: int | None = None  # host backend: the root port's completer field
        self.rciep = False
        self.allocated: frozenset[int] = frozenset()
        self._undo: list[tuple[list[int], int, list[int | None]]] = []
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
        self.msix_start = -1
        n = 0
        if single and tph is not None and loc is StLocation.CAP:
            n = tph.table_size
            self.table_at = tph.offset + PCI_TPH_BASE_SIZEOF
        elif single and loc is StLocation.MSIX and msix is not None:
            n = msix.table_size
            self.msix_bir = msix.table_bir
            self.msix_start = msix.table_offset
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
        ctrl = [cfg.u32(start + PCI_TPH_CTRL) for start, _ in self.caps]
        # (the MSI-X table is not part of a config snapshot: its words start unknown)
        ent: list[int | None] = (
            [cfg.u16(self.table_at + 2 * i) for i in range(n)] if self.in_cap else [None] * n
        )
        self.branches = [_Branch(ctrl, ent, pm & 0x3)]

    # --- the device -------------------------------------------------------------------------
    def _config_byte(self, br: _Branch, pos: int, byte: int) -> tuple[bool, int | None]:
        """Apply one config byte; returns (control touched, entry index touched)."""
        for k, (start, end) in enumerate(self.caps):
            if not start <= pos < end:
                continue
            rel = pos - start
            if rel < PCI_TPH_CTRL:
                raise UnsafePlan(f"write to the read-only TPH register at {pos:#x}")
            if rel < PCI_TPH_CTRL + 4:
                shift = 8 * (rel - PCI_TPH_CTRL)
                keep = ~(_WRITABLE >> shift) & 0xFF
                if (byte ^ (br.ctrl[k] >> shift)) & keep:
                    raise UnsafePlan(f"control write at {pos:#x} changes reserved bits")
                br.ctrl[k] = (br.ctrl[k] & ~(0xFF << shift)) | (byte << shift)
                return True, None
            if k == 0 and self.in_cap and self.table_at <= pos < self.table_at + 2 * self.n:
                i, half = divmod(pos - self.table_at, 2)
                old = br.ent[i] or 0
                br.ent[i] = (old & ~(0xFF << 8 * half)) | (byte << 8 * half)
                return False, i
            raise UnsafePlan(f"write to the TPH padding at {pos:#x}")
        if (pos == self.flr_exp and byte & 0x80) or (pos == self.flr_af and byte & 0x1):
            raise _Reset
        if pos == self.pmcsr:
            state, br.pm = br.pm, byte & 0x3
            if state == 3 and br.pm == 0 and not self.no_soft_reset:
                raise _Reset
        return False, None

    def _bar_byte(self, br: _Branch, bar: int | None, pos: int, byte: int) -> int | None:
        if bar != self.msix_bir or self.msix_start < 0:
            return None
        rel = pos - self.msix_start
        if not 0 <= rel < self.n * PCI_MSIX_ENTRY_SIZE:
            return None
        i, field = divmod(rel, PCI_MSIX_ENTRY_SIZE)
        if field < PCI_MSIX_ENTRY_VECTOR_CTRL:
            return None
        shift = 8 * (field - PCI_MSIX_ENTRY_VECTOR_CTRL)
        old = br.ent[i]
        if old is None:
            # An unknown word becomes known only when all of it is written (see apply).
            return i
        br.ent[i] = (old & ~(0xFF << shift)) | (byte << shift)
        return i

    # --- the invariant -----------------------------------------------------------------------
    def _tag(self, value: int | None, width: TagWidth) -> int | None:
        if value is None:
            return None
        return (value >> 16 if not self.in_cap else value) & width.mask

    def _violation(
        self, br: _Branch, rules: TagRules, revoked: bool, entries: set[int] | None
    ) -> str | None:
        """What is unsafe in ``br`` (None: nothing). ``entries``: only those changed."""
        for k, ctrl in enumerate(br.ctrl):
            en = (ctrl & _EN_MASK) >> _EN_SHIFT
            if en == 0:
                continue
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
                if 0 not in allowed:
                    return "No ST mode enabled where tag 0 is not allowed"
                continue
            check = range(self.n) if entries is None else entries
            for i in check:
                tag = self._tag(br.ent[i], width)
                if tag is None or tag not in allowed:
                    return f"entry {i} holds a tag not allowed at {int(width)} bits: {tag}"
        return None

    # --- plans -------------------------------------------------------------------------------
    def reset(self) -> None:
        """The hypervisor reset the device: fork into every outcome."""
        self.branches = self._forked(self.branches)

    def _forked(self, branches: list[_Branch]) -> list[_Branch]:
        out: dict[tuple[object, ...], _Branch] = {}
        zero_ent: list[int | None] = [0 if self.in_cap else _VC_MASKBIT] * self.n
        for br in branches:
            zero_ctrl = [c & ~_WRITABLE for c in br.ctrl]
            for ctrl in (br.ctrl, zero_ctrl):
                for ent in (br.ent, zero_ent):
                    b = _Branch(list(ctrl), list(ent), 0)
                    out.setdefault(b.key(), b)
        merged = list(out.values())
        if len(merged) > _MAX_BRANCHES:
            # Too many outcomes to follow: keep one, with every entry that differs unknown.
            first = merged[0]
            for b in merged[1:]:
                for i, v in enumerate(b.ent):
                    if first.ent[i] != v:
                        first.ent[i] = None
                first.ctrl = [c | (c2 & _EN_MASK) for c, c2 in zip(first.ctrl, b.ctrl, strict=True)]
            merged = [first]
        return merged

    def verify(
        self, writes: tuple[DeviceWrite, ...], rules: TagRules, revoked: bool, full: bool
    ) -> None:
        """Apply ``writes`` to a copy, checking after each; commit only if all are safe.

        ``full``: check every entry after the first write (rules or device changed outside
        this plan); otherwise only what each write touches, on a state already checked.
        """
        branches = [b.copy() for b in self.branches]
        if full and not writes:
            return
        for w in writes:
            step: list[_Branch] = []
            forked = False
            for br in branches:
                ctrl_touched = False
                touched: set[int] = set()
                try:
                    for b in range(w.width):
                        byte = (w.value >> (8 * b)) & 0xFF
                        if w.space == "config":
                            c, i = self._config_byte(br, w.offset + b, byte)
                            ctrl_touched |= c
                        else:
                            i = self._bar_byte(br, w.bar, w.offset + b, byte)
                        if i is not None:
                            touched.add(i)
                except _Reset:
                    forked = True
                step.append(br)
                if w.space == "bar" and touched:
                    # A whole-dword write makes an unknown Vector Control word known.
                    for i in touched:
                        vc = self.msix_start + i * PCI_MSIX_ENTRY_SIZE + 12
                        if br.ent[i] is None and w.offset <= vc and vc + 4 <= w.offset + w.width:
                            br.ent[i] = (w.value >> (8 * (vc - w.offset))) & 0xFFFFFFFF
                entries = None if full or ctrl_touched else touched
                if entries is None or entries:
                    problem = self._violation(br, rules, revoked, entries)
                    if problem is not None:
                        raise UnsafePlan(f"after {_show(w)}: {problem}")
            branches = self._forked(step) if forked else step
            if forked:
                for br in branches:
                    problem = self._violation(br, rules, revoked, None)
                    if problem is not None:
                        raise UnsafePlan(f"after the reset in {_show(w)}: {problem}")
            full = False
        self.branches = branches

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
        for br in self.branches:
            for i in range(self.n):
                tag = self._tag(br.ent[i], width)
                if tag is None or tag not in allowed:
                    return False
        return True

    def host_vectors(self, allocated: frozenset[int], cleared: bool) -> None:
        """The host's MSI-X vectors; ``cleared``: every Vector Control is the mask bit now."""
        self.allocated = allocated
        if cleared and self.msix_start >= 0:
            for br in self.branches:
                br.ent = [_VC_MASKBIT] * self.n

    def verify_host(
        self,
        ops: tuple[HostOp, ...],
        writes: tuple[DeviceWrite, ...],
        rules: TagRules,
        revoked: bool,
        full: bool,
        allocated: frozenset[int],
    ) -> None:
        """Apply the host ``ops``, then the raw ``writes``, to a copy, checking each step."""
        branches = [b.copy() for b in self.branches]
        undo: list[tuple[list[int], int, list[int | None]]] = []
        if full and not ops:
            for br in branches:
                problem = self._violation(br, rules, revoked, None)
                if problem is not None:
                    raise UnsafePlan(f"with nothing to do: {problem}")
        for op in ops:
            undo.append(
                ([b.ctrl[0] for b in branches], op.index, [b.ent[op.index] for b in branches])
                if op.op == "st_set" and 0 <= op.index < self.n
                else ([b.ctrl[0] for b in branches] if self.caps else [], -1, [])
            )
            for br in branches:
                for step in self._host_steps(br, op, rules, allocated):
                    problem = self._violation(br, rules, revoked, None if full else step)
                    if problem is not None:
                        raise UnsafePlan(f"after {_show_op(op)}: {problem}")
            full = False
        for w in writes:
            for b in range(w.width):
                pos = w.offset + b
                if w.space == "config":
                    if any(start <= pos < end for start, end in self.caps):
                        raise UnsafePlan(f"raw write {_show(w)} to a TPH register (host backend)")
                elif self._tag_byte(w.bar, pos):
                    raise UnsafePlan(f"raw write {_show(w)} to a steering tag (host backend)")
        forked = False
        for br in branches:
            try:
                for w in writes:
                    if w.space == "config":
                        for b in range(w.width):
                            self._config_byte(br, w.offset + b, (w.value >> (8 * b)) & 0xFF)
            except _Reset:
                forked = True
        if forked:
            branches = self._forked(branches)
            for br in branches:
                problem = self._violation(br, rules, revoked, None)
                if problem is not None:
                    raise UnsafePlan(f"after the reset in the writes: {problem}")
        self.branches = branches
        self._undo = undo

    def _tag_byte(self, bar: int | None, pos: int) -> bool:
        if self.msix_start < 0 or bar != self.msix_bir:
            return False
        rel = pos - self.msix_start
        return 0 <= rel < self.n * PCI_MSIX_ENTRY_SIZE and rel % PCI_MSIX_ENTRY_SIZE >= 14

    def _host_steps(
        self, br: _Branch, op: HostOp, rules: TagRules, allocated: frozenset[int]
    ) -> list[set[int] | None]:
        """Apply ``op`` to ``br`` in the steps the kernel takes; after each, what to check
        (None: everything, a set: those entries; everything anyway on a full check)."""
        if not self.caps:
            raise UnsafePlan(f"{_show_op(op)} on a device without TPH")
        ctrl = br.ctrl[0]
        en = (ctrl & _EN_MASK) >> _EN_SHIFT
        if op.op == "tph_disable":
            br.ctrl[0] = 0
            return [None]
        if op.op == "tph_enable":
            if en:
                raise UnsafePlan("tph_enable while TPH is enabled (the kernel returns -EBUSY)")
            mode = {"ns": 0, "iv": 1}.get(op.mode or "")
            if mode is None or not (self.cap_bits >> mode) & 1:
                raise UnsafePlan(f"tph_enable in a mode the device lacks: {op.mode}")
            req = self._host_req()
            if req == 0:
                raise UnsafePlan("tph_enable below a root port completing no TPH (-EINVAL)")
            if op.width != (16 if req == 3 else 8):
                raise UnsafePlan(f"tph_enable says width {op.width}, the kernel enables {req}")
            br.ctrl[0] = (ctrl & ~_WRITABLE) | mode | (req << _EN_SHIFT)
            return [None]
        if op.op != "st_set":
            raise UnsafePlan(f"unknown host operation {op.op!r}")
        if not en:
            raise UnsafePlan(f"{_show_op(op)} while TPH is disabled (the kernel returns -EINVAL)")
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
        br.ctrl[0] = ctrl & ~_EN_MASK  # Requester Enable cleared, mode kept
        steps: list[set[int] | None] = [None]
        if self.in_cap:
            br.ent[i] = op.tag
        else:
            old = br.ent[i]
            br.ent[i] = ((old if old is not None else _VC_MASKBIT) & 0xFFFF) | (op.tag << 16)
        steps.append({i})
        br.ctrl[0] = ctrl  # restored: only entry ``i`` differs from the state before the op
        steps.append({i})
        return steps

    def host_failed(self, k: int, op: str, errno: int) -> None:
        """Op ``k`` of the last plan failed: ops ``k``.. are taken back, then the failure's
        effect: a failed ``st_set`` leaves TPH disabled; a ``tph_enable`` refused with -EBUSY
        means the kernel had it enabled, in a state nobody knows."""
        for ctrls, i, ents in reversed(self._undo[k:]):
            for br, c in zip(self.branches, ctrls, strict=False):
                br.ctrl[0] = c
            if i >= 0:
                for br, e in zip(self.branches, ents, strict=False):
                    br.ent[i] = e
        if op == "st_set":
            for br in self.branches:
                br.ctrl[0] = 0
        elif op == "tph_disable" or (op == "tph_enable" and errno == -16):
            for br in self.branches:
                br.ctrl[0] = (br.ctrl[0] & ~_WRITABLE) | 1 | (3 << _EN_SHIFT)  # the worst
        self._undo = []

    def disable_host(self) -> None:
        """The poison path of the host backend: ``tph_disable``."""
        for br in self.branches:
            if self.caps:
                br.ctrl[0] = 0

    def disable_all(self) -> tuple[DeviceWrite, ...]:
        """Writes that clear Requester Enable on every TPH capability (the poison path)."""
        writes = []
        for k, (start, _) in enumerate(self.caps):
            value = self.branches[0].ctrl[k] & ~_EN_MASK
            writes.append(DeviceWrite("config", start + PCI_TPH_CTRL, 4, value))
            for br in self.branches:
                br.ctrl[k] &= ~_EN_MASK
        return tuple(writes)


class _Reset(Exception):
    """A write that resets the function (internal to :class:`Checker`)."""


def _show_op(op: HostOp) -> str:
    if op.op == "st_set":
        return f"st_set[{op.index}]={op.tag:#x} (cpu {op.cpu})"
    if op.op == "tph_enable":
        return f"tph_enable {op.mode} at {op.width} bits"
    return op.op


def _show(w: DeviceWrite) -> str:
    where = "config" if w.bar is None else f"bar{w.bar}"
    return f"{where}[{w.offset:#x}/{w.width}]={w.value:#x}"
