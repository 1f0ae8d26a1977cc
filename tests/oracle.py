"""The security invariant and the guest's own view, judged on a simulated device (tests/devsim).

Independent of the engine: which tags a VM may use is computed here from the raw
``HostPolicy``/``VmPolicy`` data, and what the device can emit is read from the simulated
device's bytes. :class:`Rig` is what the engine tests drive: it applies each decision's writes to
the device in order, checks the invariant after every single write, and keeps the guest's view
(what the guest itself wrote, from power-on state) to judge what the guest reads back.

The invariant, for every TPH capability of the device whose Requester Enable is not 0:

* Requester Enable is 1 (8-bit tags) or 3 (Extended, 16-bit); the mode is No ST (0) or
  Interrupt Vector (1) and the device's capability register supports it;
* the device has exactly one TPH capability, and it has a standard ST table (in the
  capability, within config space, overlapping nothing; or in the MSI-X table);
* policy grants TPH (``tph`` of the VM and the device), the device was not revoked by a reload
  since it was attached; for Extended TPH also CAP bit 8, ``extended_tph`` and at least one
  16-bit tag allowed;
* every tag the device can use at the width in force is allowed: tag 0 in No ST mode, every ST
  entry in Interrupt Vector mode (an entry the device's value is not known for is unsafe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devsim import (
    CAP_EXT,
    CAP_IV,
    CAP_NS,
    CFG_SIZE,
    CTRL,
    CTRL_RW,
    ENTRY,
    LOC_MSIX,
    PAD,
    RO,
    VC,
    VC_POWER_ON,
    Device,
    ResetKind,
    SimDevice,
)

from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
)
from tphtrap.policy import HostPolicy, VmPolicy

__all__ = [
    "Grant",
    "GuestView",
    "InvariantBroken",
    "Outcome",
    "Rig",
    "allowed_tags",
    "broken",
    "check",
    "describe",
    "raise_broken",
    "violations",
]

GuestAccess = ConfigWrite | ConfigRead | MsixWrite | MsixRead


def allowed_tags(host: HostPolicy, vm: VmPolicy, bits: int) -> frozenset[int]:
    """Tags the VM may have the device emit at ``bits`` (8 or 16).

    Neutral tags that fit the width, and tags some host CPU owns at that width whose every
    owner is one of the VM's CPUs.
    """
    owners: dict[int, set[int]] = {}
    for cpu, tags in host.steering_tags.items():
        tag = tags.st8 if bits == 8 else tags.st16
        if tag is not None:
            owners.setdefault(tag, set()).add(cpu)
    ok = {t for t, cpus in owners.items() if cpus <= vm.cpus}
    ok |= {t for t in host.neutral_tags if t < 1 << bits}
    return frozenset(ok)


@dataclass(frozen=True)
class Grant:
    """What policy grants one device of one VM (computed from the raw policy data)."""

    host: HostPolicy
    vm: VmPolicy
    bdf: str
    revoked: bool = False
    allowed: Mapping[int, frozenset[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = {bits: allowed_tags(self.host, self.vm, bits) for bits in (8, 16)}
        object.__setattr__(self, "allowed", table)

    @property
    def assigned(self) -> bool:
        return self.bdf in self.vm.devices

    @property
    def tph(self) -> bool:
        return self.assigned and self.vm.tph and self.vm.devices[self.bdf].tph

    @property
    def extended(self) -> bool:
        return self.tph and self.vm.extended_tph and self.vm.devices[self.bdf].extended_tph


def violations(sim: SimDevice, grant: Grant) -> list[tuple[str, str]]:
    """Every way the device's current state breaks the invariant, as (kind, what); empty: safe."""
    dev = sim.device
    out: list[tuple[str, str]] = []
    for k, cap in enumerate(dev.tph_caps):
        ctrl = sim.u32(cap.ctrl_at)
        enable, mode = (ctrl >> 8) & 3, ctrl & 7
        if enable == 0:
            continue
        at = f"TPH@{cap.offset:#x} ctrl={ctrl:#x}"

        def bad(kind: str, why: str, at: str = at) -> None:
            out.append((kind, f"{at}: {why}"))

        if len(dev.tph_caps) > 1:
            bad("two-tph-caps", f"enabled on a device with {len(dev.tph_caps)} TPH capabilities")
        if not cap.valid_table:
            bad("no-st-table", "enabled without a standard ST table")
        if grant.revoked:
            bad("revoked", "enabled after the device was revoked")
        elif not grant.tph:
            bad("tph-false", "enabled where policy says tph: false")
        if enable == 2:
            bad("reserved-mode", "Requester Enable 2 (reserved)")
        if mode == 2:
            bad("device-specific", "Device Specific mode enabled")
        elif mode > 2:
            bad("reserved-mode", f"reserved ST mode {mode} enabled")
        if mode == 0 and not cap.supports(CAP_NS):
            bad("unsupported-mode", "No ST mode on a device without No ST support")
        if mode == 1 and not cap.supports(CAP_IV):
            bad("unsupported-mode", "Interrupt Vector mode on a device without IV support")
        bits = 16 if enable == 3 else 8
        if enable == 3:
            if not cap.supports(CAP_EXT):
                bad("extended", "Extended TPH on a device without CAP bit 8")
            if not grant.extended:
                bad("extended", "Extended TPH where policy says extended_tph: false")
            if not grant.allowed[16]:
                bad("extended", "Extended TPH for a VM with no 16-bit tag")
        if enable not in (1, 3) or mode > 1 or not cap.valid_table:
            continue
        ok = grant.allowed[bits]
        mask = (1 << bits) - 1
        if mode == 0:
            if 0 not in ok:
                bad("no-st-tag", f"No ST mode emits tag 0, not allowed at {bits} bits")
            continue
        for i, values in enumerate(_usable_entries(sim, k)):
            if values is None:
                bad(
                    "unknown-tag",
                    f"ST entry {i} holds a value nobody wrote (unknown) and is usable",
                )
                continue
            foreign = sorted({v & mask for v in values} - ok)
            if foreign:
                shown = ", ".join(f"{t:#x}" for t in foreign[:4])
                bad("foreign-tag", f"ST entry {i} may hold {shown}, not allowed at {bits} bits")
    return out


def _usable_entries(sim: SimDevice, cap_index: int) -> Iterable[frozenset[int] | None]:
    cap = sim.device.tph_caps[cap_index]
    if cap.location == LOC_MSIX:
        return list(sim.vc_tags)
    return [sim.entry_values(cap_index, i) for i in range(cap.entry_count)]


class GuestView:
    """What the guest wrote to the TPH registers, from power-on state (all zero)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.power_on()

    def power_on(self) -> None:
        dev = self.device
        self.ctrl = [0] * len(dev.tph_caps)
        self.entries = [[0] * c.entry_count for c in dev.tph_caps]
        self.vc_tags = [0] * (dev.shape.msix_size if dev.msix_tags else 0)

    def record_config(self, off: int, width: int, value: int) -> None:
        for k in range(width):
            role = self.device.tph_bytes.get(off + k)
            if role is None:
                continue
            kind, cap, idx = role
            byte = (value >> (8 * k)) & 0xFF
            if kind == CTRL:
                shift = 8 * idx
                merged = (self.ctrl[cap] & ~(0xFF << shift)) | (byte << shift)
                self.ctrl[cap] = merged & CTRL_RW
            elif kind == ENTRY:
                shift = 8 * ((off + k - self.device.tph_caps[cap].entries_at) % 2)
                e = self.entries[cap][idx] & ~(0xFF << shift)
                self.entries[cap][idx] = e | (byte << shift)

    def record_bar(self, bar: int, off: int, width: int, value: int) -> None:
        if not self.device.msix_tags:
            return
        for k in range(width):
            where = self.device.vc_field(bar, off + k)
            if where is None or where[1] < VC + 2:
                continue
            shift = 8 * (where[1] - VC - 2)
            byte = (value >> (8 * k)) & 0xFF
            i = where[0]
            self.vc_tags[i] = (self.vc_tags[i] & ~(0xFF << shift)) | (byte << shift)

    def config_byte(self, off: int) -> tuple[int, int] | None:
        """(value, bits to compare) the guest must read at TPH byte ``off``; None: not TPH."""
        role = self.device.tph_bytes.get(off)
        if role is None:
            return None
        kind, cap, idx = role
        if kind == CTRL:
            return (self.ctrl[cap] >> (8 * idx)) & 0xFF, (CTRL_RW >> (8 * idx)) & 0xFF
        if kind == ENTRY and self.device.trappable:
            shift = 8 * ((off - self.device.tph_caps[cap].entries_at) % 2)
            return (self.entries[cap][idx] >> shift) & 0xFF, 0xFF
        return 0, 0  # read-only, padding, or an entry of a table nobody can filter

    def bar_byte(self, bar: int, off: int) -> tuple[int, int] | None:
        """(value, bits to compare) for an MSI-X steering-tag byte; None: not a tag byte."""
        if not self.device.msix_tags:
            return None
        where = self.device.vc_field(bar, off)
        if where is None or where[1] < VC + 2:
            return None
        if not self.device.trappable:
            return 0, 0
        return (self.vc_tags[where[0]] >> (8 * (where[1] - VC - 2))) & 0xFF, 0xFF


@dataclass(frozen=True)
class Outcome:
    """A decision in the form the hypervisor acts on (from the engine or a protocol reply)."""

    verdict: str
    writes: tuple[DeviceWrite, ...] = ()
    guest_value: int | None = None
    read_mask: int = 0
    reason: str = ""

    @classmethod
    def of(cls, d: Decision) -> Outcome:
        return cls(d.verdict.value, d.writes, d.guest_value, d.read_mask, d.reason)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Outcome:
        writes = tuple(
            DeviceWrite(w["space"], w["offset"], w["width"], w["value"], w.get("bar"))
            for w in d.get("writes", [])
        )
        return cls(d["verdict"], writes, d.get("guest_value"), d.get("read_mask", 0), d["reason"])

    def __str__(self) -> str:
        ws = ", ".join(_fmt_write(w) for w in self.writes)
        return f"{self.verdict} {self.reason} [{ws}]"


def _fmt_write(w: DeviceWrite) -> str:
    where = "cfg" if w.space == "config" else f"bar{w.bar}"
    return f"{where} {w.offset:#x}/{w.width}={w.value:#x}"


class InvariantBroken(AssertionError):
    """A broken rule; each kind has its own subclass so hypothesis reports each kind apart."""

    kind = "invariant"


_KINDS: dict[str, type[InvariantBroken]] = {}


def broken(kind: str) -> type[InvariantBroken]:
    """The exception class for violations of ``kind`` (``foreign-tag``: ``ForeignTagBroken``)."""
    if kind not in _KINDS:
        name = "".join(part.capitalize() for part in kind.split("-")) + "Broken"
        _KINDS[kind] = type(name, (InvariantBroken,), {"kind": kind})
    return _KINDS[kind]


def raise_broken(kind: str, message: str) -> None:
    """Report a violation of ``kind`` (raises; the one place every violation goes through)."""
    raise broken(kind)(f"[{kind}] {message}")


def check(condition: bool, kind: str, message: str) -> None:
    if not condition:
        raise_broken(kind, message)


Decide = Callable[[], Outcome]


def describe(access: GuestAccess) -> str:
    """``cfg_write 0x150/4=0x101``, ``msix_read bar2 0x100c/4``: for failure messages."""
    if isinstance(access, ConfigWrite | ConfigRead):
        where = f"cfg_{'write' if access.is_write else 'read'} {access.offset:#x}/{access.width}"
    else:
        kind = "write" if access.is_write else "read"
        where = f"msix_{kind} bar{access.bar} {access.offset:#x}/{access.width}"
    if isinstance(access, ConfigWrite | MsixWrite):
        return f"{where}={access.value:#x}"
    return where


def _whole_msix_access(offset: int, width: int) -> bool:
    """An aligned full dword or qword: the only accesses the MSI-X table takes (PCIe)."""
    return width in (4, 8) and offset % width == 0


def _joined(found: list[tuple[str, str]]) -> str:
    return "; ".join(what for _, what in found)


class Rig:
    """A simulated device, the guest's expectations of it, and the policy in force.

    ``ref`` is the same device driven by the guest's own accesses unfiltered: every byte that
    is not a TPH register must end up the same on the real device. ``owned`` is False while the
    guest's accesses are not expected to reach the device (revoked, refused attach).
    """

    def __init__(self, device: Device, grant: Grant, sim: SimDevice) -> None:
        self.device = device
        self.grant = grant
        self.sim = sim
        self.ref = sim.copy()
        self.ref.choose_reset = lambda: ResetKind.ZEROED  # non-TPH effects are the same
        self.view = GuestView(device)
        self.owned = True
        self.log: list[str] = []  # what happened, for failure messages
        self.enabled_writes = 0  # device writes after which some TPH Requester was enabled

    # --- the guest's side --------------------------------------------------------------------
    def guest_writes(self, access: ConfigWrite | MsixWrite) -> None:
        """Record what the guest meant by ``access``, before the engine decides it."""
        if not self.owned:
            return
        if isinstance(access, ConfigWrite):
            self.view.record_config(access.offset, access.width, access.value)
            if self.ref.write_config(access.offset, access.width, access.value):
                self.view.power_on()  # the guest reset its own device
        else:
            self.view.record_bar(access.bar, access.offset, access.width, access.value)
            self.ref.write_bar(access.bar, access.offset, access.width, access.value)

    def guest_write(self, access: ConfigWrite | MsixWrite, decide: Decide) -> Outcome:
        """The guest writes: record what it meant, have ``decide`` decide, perform that."""
        label = describe(access)
        self.guest_writes(access)
        outcome = decide()
        self.apply(outcome, access, label=label)
        self.check_untouched_bytes(label)
        return outcome

    def guest_read(self, access: ConfigRead | MsixRead, decide: Decide) -> Outcome:
        """The guest reads: what it sees must be its own view."""
        outcome = decide()
        self.check_read(access, outcome, describe(access))
        return outcome

    def hypervisor_reset(self, kind: ResetKind) -> None:
        self.sim.reset(kind)
        self.ref.reset(ResetKind.ZEROED)
        self.view.power_on()
        self.log.append(f"hypervisor reset ({kind.value})")
        self.assert_safe("after the hypervisor's reset")

    def resync(self) -> None:
        """A (re-)attach: the guest's TPH view is power-on, its other bytes the device's."""
        self.ref = self.sim.copy()
        self.ref.choose_reset = lambda: ResetKind.ZEROED
        self.view.power_on()
        self.owned = True

    # --- the device's side -------------------------------------------------------------------
    def apply(
        self,
        outcome: Outcome,
        access: GuestAccess | None = None,
        *,
        label: str,
        strict: bool = True,
    ) -> None:
        """Perform ``outcome`` and check the invariant after every single write.

        ``strict`` False is for decisions that may start from a state the new grant forbids
        (attach of an enabled device, a reload): from the first safe prefix on, every prefix
        must stay safe, and the end state must be safe.
        """
        self.log.append(f"{label} -> {outcome}")
        if outcome.verdict == "pass" and isinstance(access, ConfigWrite):
            writes: tuple[DeviceWrite, ...] = (
                DeviceWrite("config", access.offset, access.width, access.value),
            )
        elif outcome.verdict == "pass" and isinstance(access, MsixWrite):
            writes = (DeviceWrite("bar", access.offset, access.width, access.value, access.bar),)
        else:
            writes = outcome.writes
        safe = strict or not violations(self.sim, self.grant)
        # The writes tphtrap composes must be valid MSI-X table accesses, unless the guest's
        # own access was not one (then no rendering of it can be).
        composed = outcome.verdict != "pass" and not (
            isinstance(access, MsixWrite) and not _whole_msix_access(access.offset, access.width)
        )
        for n, w in enumerate(writes):
            self.check_not_read_only(w, label, composed)
            self.sim.apply(w)
            found = violations(self.sim, self.grant)
            self.enabled_writes += self._enabled()
            if found and safe:
                self.fail(
                    found[0][0],
                    f"{label}: after write {n + 1} ({_fmt_write(w)}): " + _joined(found),
                )
            safe = safe or not found
        self.assert_safe(f"{label}: at the end")
        if self.owned and isinstance(access, ConfigWrite | MsixWrite):
            self.check_write_view(outcome, access, label)

    def _enabled(self) -> bool:
        return any(self.sim.u32(c.ctrl_at) & 0x300 for c in self.device.tph_caps)

    def assert_safe(self, where: str) -> None:
        found = violations(self.sim, self.grant)
        if found:
            self.fail(found[0][0], f"{where}: " + _joined(found))

    def fail(self, kind: str, message: str) -> None:
        history = "\n  ".join(self.log[-12:])
        raise_broken(kind, f"{message}\n  recent history:\n  {history}")

    def check_not_read_only(self, w: DeviceWrite, label: str, composed: bool) -> None:
        """No write touches the TPH header, capability register or padding; the writes the
        engine composes itself reach the MSI-X table as whole dwords or qwords."""
        if w.space != "config":
            in_table = w.bar is not None and self.device.vc_field(w.bar, w.offset) is not None
            if composed and in_table and not _whole_msix_access(w.offset, w.width):
                self.fail(
                    "msix-sub-dword",
                    f"{label}: {_fmt_write(w)} is not a dword/qword MSI-X access",
                )
            return
        for pos in range(w.offset, w.offset + w.width):
            role = self.device.tph_bytes.get(pos)
            if role is not None and role[0] in (RO, PAD):
                what = "read-only TPH byte" if role[0] == RO else "padding after the ST table"
                self.fail("read-only-write", f"{label}: {_fmt_write(w)} writes {what} {pos:#x}")

    # --- what the guest sees -----------------------------------------------------------------
    def expected_config(self, off: int) -> tuple[int, int]:
        tph = self.view.config_byte(off)
        if tph is not None:
            return tph
        return self.ref.cfg[off], 0xFF

    def expected_bar(self, bar: int, off: int) -> tuple[int, int]:
        tag = self.view.bar_byte(bar, off)
        if tag is not None:
            return tag
        value, known = self.ref.read_bar(bar, off, 1)
        return value, known

    def check_read(self, access: ConfigRead | MsixRead, outcome: Outcome, label: str) -> None:
        self.log.append(f"{label} -> {outcome}")
        if not self.owned:
            return
        if outcome.verdict == "drop":
            self.fail("read-dropped", f"{label}: a read of an owned device was dropped ({outcome})")
        if isinstance(access, ConfigRead):
            raw, known = self.sim.read_config(access.offset, access.width), -1
        else:
            raw, known = self.sim.read_bar(access.bar, access.offset, access.width)
        mask, gv = outcome.read_mask, outcome.guest_value or 0
        seen = (raw & ~mask) | (gv & mask)
        for k in range(access.width):
            pos = access.offset + k
            if isinstance(access, ConfigRead):
                want, bits = self.expected_config(pos)
            else:
                want, bits = self.expected_bar(access.bar, pos)
            byte_known = ((known | mask) >> (8 * k)) & 0xFF == 0xFF
            got = (seen >> (8 * k)) & 0xFF
            if bits and byte_known and got & bits != want & bits:
                self.fail(
                    "read-back",
                    f"{label}: guest reads {got:#04x} at byte {pos:#x}, its own view is "
                    f"{want & bits:#04x} (bits {bits:#04x})",
                )

    def check_write_view(
        self, outcome: Outcome, access: ConfigWrite | MsixWrite, label: str
    ) -> None:
        if not outcome.read_mask or outcome.guest_value is None:
            return
        for k in range(access.width):
            if not (outcome.read_mask >> (8 * k)) & 0xFF:
                continue
            pos = access.offset + k
            if isinstance(access, ConfigWrite):
                want, bits = self.expected_config(pos)
            else:
                want, bits = self.expected_bar(access.bar, pos)
            got = (outcome.guest_value >> (8 * k)) & 0xFF
            if got & bits != want & bits:
                self.fail(
                    "write-view",
                    f"{label}: guest_value byte {pos:#x} is {got:#04x}, the guest wrote "
                    f"{want & bits:#04x}",
                )

    def check_untouched_bytes(self, where: str) -> None:
        """Non-TPH config bytes and MSI-X bytes hold what the guest wrote (or power-up)."""
        if not self.owned:
            return
        last = 0
        for start, end in [*sorted(self.device.tph_extent()), (CFG_SIZE, CFG_SIZE)]:
            if self.sim.cfg[last:start] != self.ref.cfg[last:start]:
                off = next(i for i in range(last, start) if self.sim.cfg[i] != self.ref.cfg[i])
                self.fail(
                    "guest-bytes-config",
                    f"{where}: config byte {off:#x} is {self.sim.cfg[off]:#04x}, the guest "
                    f"wrote {self.ref.cfg[off]:#04x}",
                )
            last = max(last, end)
        for bar in set(self.sim.bars) | set(self.ref.bars):
            mine, theirs = self.sim.bars.get(bar, {}), self.ref.bars.get(bar, {})
            for off in set(mine) | set(theirs):
                got, want = mine.get(off), theirs.get(off)
                if want is not None and got != want:
                    self.fail(
                        "guest-bytes-msix",
                        f"{where}: BAR {bar} byte {off:#x} is {got}, guest wrote {want:#x}",
                    )
                if want is None and got is not None and not self._power_on_vc(bar, off, got):
                    self.fail(
                        "guest-bytes-msix",
                        f"{where}: BAR {bar} byte {off:#x} written ({got:#x}), not by guest",
                    )

    def _power_on_vc(self, bar: int, off: int, value: int) -> bool:
        where = self.device.vc_field(bar, off)
        return (
            where is not None and where[1] in (VC, VC + 1) and value == VC_POWER_ON[where[1] - VC]
        )
