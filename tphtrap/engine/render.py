"""Renderings of a plan: one plan, carried out by raw device writes or by host kernel operations.

The planner (:mod:`.session`) produces *steps*, ``(0, cap, control value)`` and ``(1, entry,
tag value)``, ordered so that every prefix is safe on a device tphtrap writes itself. A
rendering turns them into what the hypervisor performs, and says what the device then holds
(the *effects* the session commits):

- :class:`RawWrites` (backend ``writes``): config and BAR writes, for emulated devices and
  replay; the effects are the steps themselves.
- :class:`HostOps` (backend ``host``): the operations of the Linux kernel's TPH interface
  (``drivers/pci/tph.c``), for a device assigned through vfio, whose TPH capability the VMM
  cannot write and whose MSI-X Vector Control the host kernel owns:

  * ``tph_enable`` (``pcie_enable_tph``): refused (-EBUSY) while enabled, so a change of
    mode goes through ``tph_disable`` first; the kernel picks the request type itself
    (Extended TPH only if the device has it and the root port completes it, unless the device
    is a root-complex integrated endpoint), which the planner was told (:class:`HostLimit`);
  * ``st_set`` (``pcie_tph_set_st_entry``): only while enabled (-EINVAL otherwise), and it
    clears Requester Enable around the write itself, which is the safe order the planner's
    "disable, write, enable" asks for; in No ST mode it writes nothing; for the MSI-X
    location only for vectors the host has allocated (-ENXIO otherwise). Entries planned
    while TPH is off stay dirty and are set at the next enable; entries of vectors the host
    lacks are set when it reports them (``vectors`` re-plans every entry);
  * ``tph_disable`` (``pcie_disable_tph``): control 0.

  Raw writes keep only the guest's bytes outside the TPH capability and the steering-tag half
  of Vector Control: the VMM performs them where it performs them today (its emulated MSI-X
  table keeps the mask bit).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, NamedTuple

from .. import bulk
from ..events import DeviceWrite, HostOp
from ..layouts import MSIX_VECTOR_CTRL
from ..spec import (
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    ReqEnable,
    StMode,
    TagWidth,
)
from .geometry import CTRL_SIZE, ENTRY_SIZE, K_ENTRY
from .target import MODE, REQ, WIDTH_OF_ENABLE, HostLimit, control_value

if TYPE_CHECKING:
    from .session import Session, Step

__all__ = [
    "ERRNO",
    "HostFacts",
    "HostOps",
    "HostResultRefused",
    "RawWrites",
    "Rendering",
    "predict_width",
]

_VC_ST = MSIX_VECTOR_CTRL["st"]
_VC_LOW = ((1 << (8 * MSIX_VECTOR_CTRL.size)) - 1) & ~_VC_ST.mask
_ST_BYTE = PCI_MSIX_ENTRY_VECTOR_CTRL + _VC_ST.shift // 8
_CTRL_STEP = 0

#: The errors Linux's TPH functions return, by name (negative, as the kernel returns them).
ERRNO = {-22: "EINVAL", -6: "ENXIO", -16: "EBUSY"}
_EINVAL, _ENXIO, _EBUSY = -22, -6, -16


class Rendering(NamedTuple):
    """What the hypervisor performs for one decision, and what the device then holds."""

    writes: list[DeviceWrite]
    ops: list[HostOp] | None  # None: the writes backend
    effects: list[Step]  # committed to the session: the device's registers afterwards
    deferred: frozenset[int] = frozenset()  # planned entries to set at the next enable
    planned: tuple[int, ...] = ()  # every entry the plan named (host: mask bits in sync)


# --- raw writes ---------------------------------------------------------------------------------
class RawWrites:
    """Backend ``writes``: the steps as config and BAR writes."""

    name = "writes"

    def limit(self, sess: Session) -> HostLimit | None:
        return None

    def window_safe(self, sess: Session, width: TagWidth, full: bool) -> bool:
        return True

    def writes(self, sess: Session, steps: list[Step]) -> list[DeviceWrite]:
        geo = sess.geo
        if bulk.C is not None:
            got = bulk.C.raw_writes(
                steps,
                geo.ctrl_offsets,
                geo.in_msix,
                sess.guest_low,
                sess.dev_low,
                geo.vc_offsets if geo.in_msix else geo.entry_offsets,
                geo.msix_bir,
                _VC_ST.shift,
                _VC_LOW,
                CTRL_SIZE,
                ENTRY_SIZE,
            )
            if got is not None:
                return got
        return self._writes(sess, steps)

    def _writes(self, sess: Session, steps: list[Step]) -> list[DeviceWrite]:
        """:meth:`writes`' loop, in Python."""
        geo = sess.geo
        out: list[DeviceWrite] = []
        add = out.append
        msix = geo.in_msix
        guest_low, dev_low, bir = sess.guest_low, sess.dev_low, geo.msix_bir
        where = geo.vc_offsets if msix else geo.entry_offsets
        shift = _VC_ST.shift
        for what, index, value in steps:
            if what == _CTRL_STEP:
                add(DeviceWrite("config", geo.caps[index].ctrl, CTRL_SIZE, value))
            elif msix:
                low = guest_low[index]
                if low is None:
                    low = dev_low[index]
                assert low is not None
                add(DeviceWrite("bar", where[index], 4, (low & _VC_LOW) | (value << shift), bir))
            else:
                add(DeviceWrite("config", where[index], ENTRY_SIZE, value))
        return out

    def access(
        self, sess: Session, steps: list[Step], through: list[DeviceWrite], own: DeviceWrite
    ) -> Rendering:
        writes = self.writes(sess, steps)
        if through:
            writes += through
        writes = _as_guest_wrote(sess, steps, writes, own)
        return Rendering(writes, None, steps)

    def settle(self, sess: Session, steps: list[Step]) -> Rendering:
        return Rendering(self.writes(sess, steps), None, steps)

    def reset_write(
        self, sess: Session, pre: list[Step], through: list[DeviceWrite], reasons: list[str]
    ) -> Rendering:
        """A guest write that resets the function: disable first, the write, then settle."""
        first = self.writes(sess, pre)
        sess.commit(pre)
        sess.reset_state()
        post = sess.plan(set(), True, reasons)
        return Rendering(first + through + self.writes(sess, post), None, post)

    def check(self, sess: Session, r: Rendering, full: bool) -> None:
        sess.checker.verify(r.writes, sess.rules, sess.revoked, full)

    def commit(self, sess: Session, r: Rendering) -> None:
        sess.commit(r.effects)

    def poison(self, sess: Session) -> Rendering:
        writes = sess.checker.disable_all()
        return Rendering(list(writes), None, [(0, k, w.value) for k, w in enumerate(writes)])

    def reset(self) -> None:
        pass


def _as_guest_wrote(
    sess: Session, steps: list[Step], writes: list[DeviceWrite], own: DeviceWrite
) -> list[DeviceWrite]:
    """The guest's own access shape when it puts exactly the planned values on the device.

    Two shapes qualify: one register write whose value is the device's old value with the
    guest's bytes merged in (a partial write), and entry writes plus pass-through bytes that
    tile the guest's access exactly (an 8-byte MSI-X write stays one write).
    """
    if len(writes) == 1 and _merges(sess, writes[0], own):
        return [own]
    if not writes or any(what == 0 for what, _, _ in steps) or own.offset % own.width:
        return writes  # a control step orders the writes, or the access is unaligned
    lo, hi = own.offset, own.offset + own.width
    inside = all(
        w.space == own.space and lo <= w.offset and w.offset + w.width <= hi for w in writes
    )
    if not inside or sum(w.width for w in writes) != own.width:
        return writes
    value = 0
    for w in writes:
        value |= w.value << (8 * (w.offset - lo))
    return [replace(own, value=value)]


def _merges(sess: Session, w: DeviceWrite, own: DeviceWrite) -> bool:
    """Is ``w`` (one register write) what the guest's ``own`` write leaves in the device?"""
    if w.space != own.space or w.bar != own.bar:
        return False
    if not (w.offset <= own.offset and own.offset + own.width <= w.offset + w.width):
        return False
    if (w.offset, w.width) == (own.offset, own.width):
        return w.value == own.value
    old = _prior(sess, w)
    if old is None:
        return False
    shift = 8 * (own.offset - w.offset)
    bmask = ((1 << (8 * own.width)) - 1) << shift
    return (old & ~bmask) | (own.value << shift) == w.value


def _prior(sess: Session, w: DeviceWrite) -> int | None:
    """What the device holds, before this decision, in the register ``w`` writes."""
    geo = sess.geo
    for k, cap in enumerate(geo.caps):
        if w.space == "config" and w.offset == cap.ctrl:
            return sess.dev_ctrl[k]
    if geo.in_msix:
        if w.space != "bar" or w.offset not in geo.vc_index:
            return None
        i = geo.vc_index[w.offset]
        low, tag = sess.dev_low[i], sess.dev_ent[i]
        return None if low is None or tag is None else low | tag << _VC_ST.shift
    reg = geo.regs[w.offset] if w.space == "config" else None
    if reg is not None and reg.kind == K_ENTRY and reg.cap == 0:
        return sess.dev_ent[reg.index]
    return None


# --- host operations ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the VMM told ``attach`` about the root port above the device."""

    completer: int | None  # TPH Completer Supported of the root port: 0, 1 or 3
    rciep: bool = False  # a root-complex integrated endpoint: no root port, no completer check


def predict_width(ext_capable: bool, facts: HostFacts) -> TagWidth | None:
    """The request type Linux ``pcie_enable_tph`` chooses (None: it returns -EINVAL).

    Extended TPH if the device's capability has it, else TPH only; then, unless the device is
    a root-complex integrated endpoint, the smaller of that and the root port's completer
    field (0 none, 1 TPH only, 3 TPH and Extended TPH).
    """
    req = int(ReqEnable.EXT_TPH if ext_capable else ReqEnable.TPH)
    if not facts.rciep:
        req = min(req, facts.completer or 0)
    return WIDTH_OF_ENABLE.get(req)


class HostResultRefused(Exception):
    """A ``host_result`` that names no operation of the device's last decision."""


class _Undo(NamedTuple):
    """How to take the ops of the last decision back: the ops, and per op (step kind, index,
    old value, old mask bits). Immutable: an empty one, or one a replayed decision keeps, is
    shared."""

    ops: tuple[HostOp, ...] = ()
    olds: tuple[tuple[int, int, int | None, int | None], ...] = ()


_NO_UNDO = _Undo()


class HostOps:
    """Backend ``host``: the steps as host kernel operations (see the module docstring)."""

    name = "host"

    def __init__(self, sess: Session, facts: HostFacts) -> None:
        self.facts = facts
        self.width = predict_width(sess.geo.ext_ok, facts)
        self.refusal: str | None = None  # a failed host operation keeps TPH off until reset
        self.allocated: frozenset[int] = frozenset()  # MSI-X vectors the host has allocated
        self.last = _NO_UNDO
        sess.checker.host(facts.completer or 0, facts.rciep)

    # --- what the planner is told -----------------------------------------------------------
    def limit(self, sess: Session) -> HostLimit | None:
        return HostLimit(self.width, self.refusal)

    def window_safe(self, sess: Session, width: TagWidth, full: bool) -> bool:
        """Can Interrupt Vector mode be on with the entries the device holds now? The kernel
        sets entries only while TPH is enabled, so those are used until each is set.

        Already on in that mode and width, outside a change of rules or facts (``full``):
        yes, the self-check verified every entry after the last operation.
        """
        kctrl = sess.dev_ctrl[0] if sess.geo.caps else None
        if (
            not full
            and kctrl is not None
            and WIDTH_OF_ENABLE.get(REQ.get(kctrl)) is width
            and MODE.get(kctrl) == StMode.INT_VEC
        ):
            return True
        return sess.checker.entries_allowed(width, sess.rules)

    # --- rendering ------------------------------------------------------------------------------
    def ops(self, sess: Session, steps: list[Step]) -> tuple[list[HostOp], list[Step], set[int]]:
        """(ops, their effects, one per op, entries left for later) for ``steps``.

        The VMM emulates the mask bits of Vector Control, so the device's mask bits are the
        guest's by definition here: only the steering tags are compared.
        """
        geo = sess.geo
        kctrl = sess.dev_ctrl[0] if geo.caps else 0
        target = kctrl
        entries: list[tuple[int, int]] = []
        for what, index, value in steps:
            if what == _CTRL_STEP:
                if index != 0:
                    raise AssertionError("the host kernel knows one TPH capability only")
                target = value
            else:
                entries.append((index, value))
        assert target is not None
        t_req = REQ.get(target)
        t_mode = MODE.get(target)
        ops: list[HostOp] = []
        effects: list[Step] = []
        later: set[int] = set()
        on = kctrl is not None and REQ.get(kctrl) != ReqEnable.DISABLED
        if kctrl is None or (on and (t_req != REQ.get(kctrl) or t_mode != MODE.get(kctrl))):
            ops.append(HostOp("tph_disable"))
            effects.append((0, 0, 0))
            kctrl, on = 0, False
        width = WIDTH_OF_ENABLE.get(t_req)
        if width is not None and not on:
            if width is not self.width or t_mode not in (StMode.NO_ST, StMode.INT_VEC):
                raise AssertionError(f"an enable the host kernel would not do: {target:#x}")
            mode: Literal["iv", "ns"] = "iv" if t_mode == StMode.INT_VEC else "ns"
            ops.append(HostOp("tph_enable", mode=mode, width=int(width)))
            kctrl = control_value(kctrl, REQ.put(MODE.put(0, t_mode), t_req))
            effects.append((0, 0, kctrl))
            on = True
        for i, value in entries:
            if width is None or t_mode != StMode.INT_VEC:
                later.add(i)  # no st_set while disabled; No ST mode writes nothing
                continue
            if geo.in_msix and i not in self.allocated:
                continue  # set when the host reports the vector (a full re-plan)
            tag = value & width.mask
            if sess.dev_ent[i] == tag:
                continue
            cpu = sess.rules.cpu_of_tag.get(width, {}).get(tag)
            ops.append(HostOp("st_set", index=i, cpu=cpu, tag=tag))
            effects.append((1, i, tag))
        return ops, effects, later

    def _guest_bytes(self, sess: Session, own: DeviceWrite) -> list[DeviceWrite]:
        """The guest's bytes of ``own`` that are not TPH state (they go through as written)."""
        geo = sess.geo
        if own.space == "config":
            end = own.offset + own.width
            if any(cap.start <= own.offset and end <= cap.end for cap in geo.caps):
                return []  # a TPH register: every byte is TPH state
        keep: list[tuple[int, int]] = []
        for b in range(own.width):
            pos = own.offset + b
            if own.space == "config":
                if any(cap.start <= pos < cap.end for cap in geo.caps):
                    continue
            elif geo.in_msix and own.bar == geo.msix_bir:
                rel = pos - geo.msix_start
                in_table = 0 <= rel < geo.n_entries * PCI_MSIX_ENTRY_SIZE
                if in_table and rel % PCI_MSIX_ENTRY_SIZE >= _ST_BYTE:
                    continue
            keep.append((pos, (own.value >> (8 * b)) & 0xFF))
        return sess.pieces(own.space, keep, own.bar)

    def access(
        self, sess: Session, steps: list[Step], through: list[DeviceWrite], own: DeviceWrite
    ) -> Rendering:
        ops, effects, later = self.ops(sess, steps)
        planned = tuple(i for what, i, _ in steps if what != _CTRL_STEP)
        return Rendering(self._guest_bytes(sess, own), ops, effects, frozenset(later), planned)

    def settle(self, sess: Session, steps: list[Step]) -> Rendering:
        ops, effects, later = self.ops(sess, steps)
        planned = tuple(i for what, i, _ in steps if what != _CTRL_STEP)
        return Rendering([], ops, effects, frozenset(later), planned)

    def reset_write(
        self, sess: Session, pre: list[Step], through: list[DeviceWrite], reasons: list[str]
    ) -> Rendering:
        """Disable TPH, then the guest's write. The kernel then holds TPH disabled (so its
        save/restore around the reset enables nothing), and the reset leaves control 0."""
        ops, effects, _ = self.ops(sess, pre)
        sess.commit(effects)
        sess.reset_state()
        sess.dev_ctrl[0] = 0
        post = sess.plan(set(), True, reasons)
        more, post_effects, later = self.ops(sess, post)
        if more:
            raise AssertionError(f"host operations after a reset write: {more}")
        return Rendering(through, ops, [(0, 0, 0), *post_effects], frozenset(later))

    def check(self, sess: Session, r: Rendering, full: bool) -> None:
        assert r.ops is not None
        sess.checker.verify_host(
            tuple(r.ops), tuple(r.writes), sess.rules, sess.revoked, full, self.allocated
        )

    def commit(self, sess: Session, r: Rendering) -> None:
        """Commit the effects, remembering how to take each op back (``host_result``)."""
        assert r.ops is not None
        olds: list[tuple[int, int, int | None, int | None]] = []
        if len(r.effects) == len(r.ops):
            for what, index, _ in r.effects:
                if what == _CTRL_STEP:
                    olds.append((what, index, sess.dev_ctrl[index], None))
                else:
                    low = sess.dev_low[index] if sess.geo.in_msix else None
                    olds.append((what, index, sess.dev_ent[index], low))
        self.last = _Undo(tuple(r.ops), tuple(olds)) if r.ops else _NO_UNDO
        sess.commit(r.effects)
        sess.dirty.update(r.deferred)
        if sess.geo.in_msix:
            for i in r.planned:
                sess.dev_low[i] = sess.guest_low[i]

    def idle(self, sess: Session) -> tuple[tuple[object, str, object], ...]:
        """What :meth:`commit` and the self-check's ``verify_host`` leave after a decision with
        no host operation, as (object, attribute, value): for a path that decides such a
        decision without them (tphtrap.native)."""
        checker = sess.checker
        return ((self, "last", _NO_UNDO), (checker, "_host_marks", ()), (checker, "_host_undo", ()))

    def poison(self, sess: Session) -> Rendering:
        sess.checker.disable_host()
        self.last = _NO_UNDO
        if not sess.geo.caps:
            return Rendering([], [], [])
        return Rendering([], [HostOp("tph_disable")], [(0, 0, 0)])

    # --- feedback ---------------------------------------------------------------------------------
    def set_allocated(self, sess: Session, allocated: frozenset[int], cleared: bool) -> None:
        """The host's MSI-X vectors now; ``cleared``: it (re)enabled MSI-X, which writes
        Vector Control = mask bit to every table entry (Linux ``msix_mask_all``)."""
        self.allocated = allocated
        sess.checker.host_vectors(allocated, cleared)
        if cleared and sess.geo.in_msix:
            n = sess.geo.n_entries
            sess.dev_ent = [0] * n
        sess.settled = None

    def failed(self, sess: Session, op: HostOp, errno: int) -> None:
        """The host reports that ``op`` of the last decision failed with ``errno`` (it
        performed the ops before it, not the ones after): take the state back to what the
        host now has. Raises :class:`HostResultRefused` if ``op`` is not one of them."""
        last = self.last
        k = next(
            (
                j
                for j, o in enumerate(last.ops)
                if o.op == op.op and (o.op != "st_set" or o.index == op.index)
            ),
            None,
        )
        if k is None or len(last.olds) != len(last.ops):
            raise HostResultRefused(
                f"{op.op}{f' {op.index}' if op.op == 'st_set' else ''} is not an operation of "
                "the last decision for this device"
            )
        for what, index, old, low in reversed(last.olds[k:]):  # not performed, or failed
            if what == _CTRL_STEP:
                sess.dev_ctrl[index] = old
            else:
                sess.dev_ent[index] = old
                sess.dirty.add(index)
                if low is not None:
                    sess.dev_low[index] = low
        failed = last.ops[k]
        if failed.op == "st_set":
            sess.dev_ctrl[0] = 0  # pcie_tph_set_st_entry disables TPH on any error
        elif failed.op == "tph_enable" and errno == _EBUSY:
            sess.dev_ctrl[0] = None  # the kernel had TPH enabled: in a state tphtrap lost
        elif failed.op == "tph_disable":
            sess.dev_ctrl[0] = None
        sess.checker.host_failed(k, failed.op, errno)
        sess.settled = None
        self.last = _NO_UNDO
        if failed.op == "st_set" and errno == _ENXIO and sess.geo.in_msix:
            # The host has no vector for that entry: set it when the host reports one.
            self.allocated = self.allocated - {failed.index}
            sess.checker.host_vectors(self.allocated, False)
        else:
            self.refusal = "host-op-failed"

    def reset(self) -> None:
        """The function was reset: a failed operation no longer keeps TPH off."""
        self.refusal = None
        self.last = _NO_UNDO
