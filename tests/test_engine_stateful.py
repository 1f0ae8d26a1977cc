"""The security invariant, attacked by a hypothesis state machine with an independent oracle.

Random devices (one or two TPH capabilities, every ST table location, tables that overflow or
are overlapped, capabilities without No ST, Advanced Features FLR, PM with and without
No_Soft_Reset), random policies, and random sequences of guest config and BAR accesses of every
width and offset (straddling control + entry 0, entries + padding + the next capability), guest
resets (FLR, AF FLR, D3hot -> D0), hypervisor resets with every device behaviour of
:class:`devsim.ResetKind`, policy reloads (new, tighter, unchanged, revoking the device, giving it
back) and re-attaches from a fresh snapshot (4096, 256 and 64 bytes).

The oracle (tests/devsim.py, tests/oracle.py) shares nothing with the engine: it applies every
decision's writes in order to a byte-level device and checks the invariant after each one (see
:mod:`oracle`), and it checks what the guest reads against what the guest itself wrote.

The machine runs once per ``on_violation`` mode (a third of ``TPHTRAP_EXAMPLES`` each, 2,000 in
all by default, 20,000 with ``TPHTRAP_FUZZ=long``). Each kind of violation raises its own
exception class, so one run reports every kind it found, each with its shortest sequence.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from devsim import (
    AF_CTRL,
    CTRL,
    DEVCTL,
    ENTRY,
    LOC_CAP,
    LOC_MSIX,
    LOC_NONE,
    LOC_RESERVED,
    PMCSR,
    ResetKind,
    Shape,
    SimDevice,
    TphShape,
    build_device,
)
from hypothesis import HealthCheck, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from oracle import Grant, Outcome, Rig, allowed_tags, check, describe

from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.errors import TphtrapError
from tphtrap.events import ConfigRead, ConfigWrite, Decision, MsixRead, MsixWrite, Reset
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, OnViolation, Policy, VmPolicy

LONG = os.environ.get("TPHTRAP_FUZZ") == "long"
EXAMPLES = int(os.environ.get("TPHTRAP_EXAMPLES", 20_000 if LONG else 2_000))
STEPS = 60 if LONG else 30

VM, OTHER, BDF = "guest", "other", "0000:3b:00.0"
NCPU = 8
FULL = 4096
BAD_REASONS = ("internal-error", "unsafe-plan")


class Hex(int):
    """An int that hypothesis prints in hex (the failing sequences stay readable)."""

    def __repr__(self) -> str:
        return hex(self)


# Host tags are 0-5 and 0x100-0x105 (hosts()), virtual tags 0-3 (guest_vms()).
TAGS = st.sampled_from([0, 1, 2, 3, 5, 0x100, 0x101, 0x103, 0x105, 0x201, 0xFFFF]).map(Hex)
# What a guest writes as a tag: mostly one this VM may use ("own", as a driver would), or one
# it may not ("foreign"), resolved against the policy in force; or a raw value.
TagChoice = tuple[str, int] | int
TAG_CHOICES: st.SearchStrategy[TagChoice] = (
    st.tuples(st.sampled_from(["own", "own", "own", "foreign", "zero"]), st.integers(0, 3)) | TAGS
)


# --- random worlds ---------------------------------------------------------------------------
@st.composite
def tph_shapes(draw: st.DrawFn) -> TphShape:
    location = draw(st.sampled_from([LOC_CAP] * 4 + [LOC_MSIX] * 3 + [LOC_NONE, LOC_RESERVED]))
    size = draw(st.sampled_from([1, 2, 3, 4, 5, 8]) | st.sampled_from([16, 64, 65]))
    # Mostly what a reset leaves (control 0, entries 0); sometimes a device left enabled.
    ctrl = draw(
        st.just(0)
        | st.just(0)
        | st.integers(0, 7).map(lambda m: m | 0x100)
        | st.integers(0, 2**32 - 1)
    )
    entries = st.lists(st.integers(0, 0xFFFF) | TAGS, min_size=size, max_size=size)
    return TphShape(
        no_st=draw(st.booleans()) or draw(st.booleans()),
        iv=draw(st.booleans()) or draw(st.booleans()),
        ds=draw(st.booleans()),
        ext=draw(st.booleans()),
        location=location,
        size=size,
        entries=tuple(draw(st.just([0] * size) | entries)),
        ctrl=ctrl,
    )


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    tph = draw(tph_shapes())
    overflow = tph.location == LOC_CAP and tph.size == 64 and draw(st.booleans())
    return Shape(
        tph=tph,
        tph_at=0xF80 if overflow else draw(st.sampled_from([0x148, 0x140, 0x160])),
        second_tph=draw(tph_shapes()) if draw(st.integers(0, 7)) == 0 else None,
        neighbour=draw(st.sampled_from(["none", "adjacent", "adjacent", "overlap"])),
        msix_size=draw(st.integers(1, 4)),
        bir=draw(st.sampled_from([0, 2])),
        af=draw(st.booleans()),
        no_soft_reset=draw(st.integers(0, 3)) == 0,
    )


@st.composite
def hosts(draw: st.DrawFn) -> HostPolicy:
    tags = {}
    for cpu in range(NCPU):
        st8 = draw(st.one_of(st.none(), st.integers(0, 5))) if draw(st.booleans()) else cpu // 2
        st16 = draw(st.one_of(st.none(), st.integers(0, 5), st.integers(0x100, 0x105)))
        tags[cpu] = CpuTags(cpu, st8, st16)
    neutral = draw(
        st.sampled_from([frozenset({0}), frozenset()])
        | st.frozensets(st.sampled_from([0, 1, 0x100]))
    )
    return HostPolicy(tags, neutral)


@st.composite
def guest_vms(draw: st.DrawFn) -> VmPolicy:
    cpus = draw(st.frozensets(st.integers(0, NCPU - 1), min_size=1, max_size=NCPU))
    vcpus = None
    if draw(st.booleans()):
        vcpus = tuple(draw(st.lists(st.sampled_from(sorted(cpus)), min_size=1, max_size=4)))
    dev = DeviceSettings(
        BDF,
        tph=draw(st.booleans()) or draw(st.booleans()),
        extended_tph=draw(st.booleans()) or draw(st.booleans()),
        on_violation=draw(st.one_of(st.none(), st.sampled_from(list(OnViolation)))),
        fallback_cpu=draw(st.none() | st.sampled_from(sorted(cpus))),
    )
    return VmPolicy(
        VM,
        cpus,
        on_violation=draw(st.sampled_from(list(OnViolation))),
        vcpus=vcpus,
        devices={BDF: dev},
        tph=draw(st.booleans()) or draw(st.booleans()) or draw(st.booleans()),
        extended_tph=draw(st.booleans()) or draw(st.booleans()),
    )


@dataclass(frozen=True)
class Change:
    """One policy reload: ``kind`` and what it needs."""

    # unchanged | revoke | new | tph-off | dev-tph-off | ext-off | dev-ext-off | fewer-cpus |
    # on-violation
    kind: str
    host: HostPolicy | None = None
    vm: VmPolicy | None = None
    cpus: frozenset[int] = frozenset()
    on_violation: OnViolation = OnViolation.DROP


CHANGES = st.one_of(
    st.sampled_from([Change("unchanged"), Change("revoke")]),
    st.sampled_from([Change(k) for k in ("tph-off", "dev-tph-off", "ext-off", "dev-ext-off")]),
    st.builds(Change, st.just("fewer-cpus"), cpus=st.frozensets(st.integers(0, NCPU - 1))),
    st.builds(Change, st.just("on-violation"), on_violation=st.sampled_from(list(OnViolation))),
    st.builds(Change, st.just("new"), host=hosts(), vm=guest_vms()),
)
BYTES = [0x00, 0x01, 0x02, 0x03, 0x05, 0x07, 0x80, 0xFF]
VALUES = st.one_of(
    st.lists(st.sampled_from(BYTES), min_size=8, max_size=8).map(
        lambda bs: Hex(int.from_bytes(bytes(bs), "little"))
    ),
    st.integers(0, 2**64 - 1).map(Hex),
)
# What each byte of the TPH control register and of an ST entry is worth writing.
CTRL_BYTES = ([0, 1, 1, 2, 3, 7], [1, 1, 3, 0, 2], [0, 0, 1, 0x80], [0, 0, 1, 0x80])
TAG_BYTES = ([0, 1, 2, 3, 5, 0xFF], [0, 0, 1, 2])
PICKS = st.lists(st.integers(0, 255), min_size=4, max_size=4)
RESET_KINDS = st.sampled_from(list(ResetKind))
DELTAS = st.integers(-4, 0x24) | st.integers(-4, 0x9C)
# Register boundaries a straddling access starts at: (anchor, offset from it).
STRADDLES = st.sampled_from(
    [("ctrl", d) for d in (1, 1, 1, 2, 3, -2, -1)]
    + [("last-entry", d) for d in (-1, 0, 1)]
    + [("end", d) for d in (-2, -1, 0, 1)]
)


def other_cpus(vm: VmPolicy) -> frozenset[int]:
    """The other VM's CPUs: the host's rest (a CPU of the guest's when it has them all)."""
    return frozenset(range(NCPU)) - vm.cpus or frozenset({min(vm.cpus)})


class TphMachine(RuleBasedStateMachine):
    """The guest (VM ``guest``) attacks one device; ``other`` is where a reload may move it.

    ``PINNED`` (set by the subclasses that are run) fixes the VM's ``on_violation`` at setup,
    so that each mode gets its share of the search (a reload may still change it).
    """

    PINNED: OnViolation | None = None
    #: What decides (tests/test_engine_fastpath.py drives two engines in lockstep here).
    ENGINE: Callable[[Policy], Engine] = Engine

    @initialize(
        shape=shapes(), host=hosts(), vm=guest_vms(), size=st.sampled_from([FULL] * 6 + [256, 64])
    )
    def setup(self, shape: Shape, host: HostPolicy, vm: VmPolicy, size: int) -> None:
        if self.PINNED is not None:
            settings = replace(vm.devices[BDF], on_violation=None)
            vm = replace(vm, on_violation=self.PINNED, devices={BDF: settings})
        self.device = build_device(shape)
        self.reset_kind = ResetKind.ZEROED  # what the device does on a guest-initiated reset
        sim = SimDevice(self.device, lambda: self.reset_kind)
        self.host, self.vm = host, vm
        self.settings = vm.devices[BDF]
        self.other = VmPolicy(OTHER, other_cpus(vm))
        self.revoked = False
        self.reasons: set[str] = set()
        self.engine = self.ENGINE(self.policy())
        self.rig = Rig(self.device, self.grant(), sim)
        self.attach(size)

    # --- helpers --------------------------------------------------------------------------
    def policy(self) -> Policy:
        return Policy(self.host, {VM: self.vm, OTHER: self.other})

    def grant(self) -> Grant:
        return Grant(self.host, self.vm, BDF, self.revoked)

    def owns(self) -> bool:
        return BDF in self.vm.devices

    def decided(self, d: Decision, label: str) -> Outcome:
        check(d.reason not in BAD_REASONS, "engine-fault", f"{label}: {d.reason}: {d.detail}")
        self.reasons.add(d.reason)
        return Outcome.of(d)

    def teardown(self) -> None:
        """Steer the search towards runs that get TPH enabled and see many kinds of decision
        (guidance only: what passes or fails is the oracle's)."""
        if hasattr(self, "rig"):
            target(float(self.rig.enabled_writes), label="device writes with TPH enabled")
            target(float(len(self.reasons)), label="distinct decision reasons")

    def attach(self, size: int) -> None:
        """Attach from a fresh ``size``-byte snapshot; a short one must be refused, and then
        the hypervisor attaches the full 4096 bytes."""
        if size != FULL:
            self.attach_short(size)
        cfg = ConfigSpace.from_bytes(self.rig.sim.snapshot(FULL), "<sim>", BDF)
        d = self.engine.attach(VM, BDF, cfg)
        self.rig.resync()
        self.rig.apply(self.decided(d, "attach"), label="attach", strict=False)

    def attach_short(self, size: int) -> None:
        try:
            cfg = ConfigSpace.from_bytes(self.rig.sim.snapshot(size), "<sim>", BDF)
            d = self.engine.attach(VM, BDF, cfg)
        except TphtrapError:
            return
        check(
            d.verdict.value == "drop",
            "snapshot-accepted",
            f"attach of a {size}-byte snapshot of a PCI Express function was accepted "
            f"({d.reason}): its TPH capability at {self.device.tph_caps[0].offset:#x} "
            "would go unfiltered",
        )
        self.rig.apply(Outcome.of(d), label=f"refused attach ({size})", strict=False)
        with contextlib.suppress(TphtrapError):
            self.engine.detach(VM, BDF)  # whatever a refusal may have left behind

    def clamp(self, off: int, width: int) -> int:
        return max(0, min(off, FULL - width))

    def write_config(self, off: int, width: int, value: int) -> None:
        access = ConfigWrite(VM, BDF, off, width, value & ((1 << (8 * width)) - 1))
        self.rig.guest_write(access, lambda: self.decide(access))

    def write_bar(self, bar: int, off: int, width: int, value: int) -> None:
        access = MsixWrite(VM, BDF, bar, off, width, value & ((1 << (8 * width)) - 1))
        self.rig.guest_write(access, lambda: self.decide(access))

    def guest_read(self, access: ConfigRead | MsixRead) -> None:
        self.rig.guest_read(access, lambda: self.decide(access))

    def decide(self, access: ConfigWrite | MsixWrite | ConfigRead | MsixRead) -> Outcome:
        return self.decided(self.engine.handle(access), describe(access))

    def tag(self, choice: TagChoice, bits: int) -> int:
        """The tag value for ``choice`` under the policy in force (virtual with ``vcpus``)."""
        if isinstance(choice, int):
            return choice
        kind, n = choice
        if kind == "zero":
            return 0
        allowed = allowed_tags(self.host, self.vm, bits)
        if self.vm.vcpus is not None:
            own = [i for i, cpu in enumerate(self.vm.vcpus) if self.host_tag(cpu, bits) in allowed]
            foreign = [len(self.vm.vcpus)]
        else:
            own = sorted(allowed)
            every = {self.host_tag(cpu, bits) for cpu in self.host.steering_tags}
            foreign = sorted(t for t in every - allowed if t is not None) or [(1 << bits) - 1]
        pool = own if kind == "own" and own else foreign
        return Hex(pool[n % len(pool)])

    def host_tag(self, cpu: int, bits: int) -> int | None:
        tags = self.host.steering_tags.get(cpu)
        if tags is None:
            return None
        return tags.st8 if bits == 8 else tags.st16

    def tph_base(self, which: str) -> int:
        caps = self.device.tph_caps
        return caps[1 if which == "tph2" and len(caps) > 1 else 0].offset

    def bar_offset(self, entry: int, field: int, width: int, aligned: bool) -> int:
        off = self.device.shape.table_off + 16 * entry + field
        return off - off % width if aligned else off

    # --- guest accesses ---------------------------------------------------------------------
    @rule(
        tags=st.lists(st.tuples(st.integers(0, 7), TAG_CHOICES), max_size=3),
        mode=st.sampled_from([1, 1, 0]),
        enable=st.sampled_from([1, 1, 3]),
        linux=st.booleans(),
    )
    def driver_enables(
        self, tags: list[tuple[int, TagChoice]], mode: int, enable: int, linux: bool
    ) -> None:
        """A driver enables TPH and programs the entries of the vectors it uses: entries first,
        or (``linux``) as ``pcie_enable_tph`` + ``pcie_tph_set_st_entry`` do it."""
        cap = self.device.tph_caps[0]
        ctrl = mode | enable << 8
        if linux:
            self.write_config(cap.ctrl_at, 4, ctrl)
        for index, choice in tags:
            tag = self.tag(choice, 16 if enable == 3 else 8)
            if cap.location == LOC_MSIX:
                vc = self.bar_offset(index % self.device.shape.msix_size, 12, 4, True)
                self.write_bar(self.device.shape.bir, vc, 4, tag << 16)
                continue
            if cap.entry_count == 0:
                break
            if linux:
                self.write_config(cap.ctrl_at, 4, mode)  # Requester Enable off, mode kept
            self.write_config(cap.entries_at + 2 * (index % cap.entry_count), 2, tag)
            if linux:
                self.write_config(cap.ctrl_at, 4, ctrl)
        if not linux:
            self.write_config(cap.ctrl_at, 4, ctrl)

    @rule(
        mode=st.sampled_from([0, 1, 1, 2, 2, 3, 7]),
        enable=st.sampled_from([1, 1, 3, 3, 0, 2]),
        width=st.sampled_from([4, 2, 1, 1]),
        reserved=st.sampled_from([0] * 5 + [0x400, 0x10000, 0x8000_0000]).map(Hex),
        second=st.integers(0, 3).map(lambda n: n == 0),
    )
    def tph_control(self, mode: int, enable: int, width: int, reserved: int, second: bool) -> None:
        """ST Mode and Requester Enable (width 1: the mode byte alone)."""
        at = self.tph_base("tph2" if second else "tph") + 8
        self.write_config(at, width, mode | enable << 8 | reserved)

    @rule(index=st.integers(0, 7), choice=TAG_CHOICES, width=st.sampled_from([2, 2, 1, 4]))
    def tph_entry(self, index: int, choice: TagChoice, width: int) -> None:
        """An ST entry in the capability (width 4: two entries)."""
        cap = self.device.tph_caps[0]
        tag = self.tag(choice, 8)
        index = min(index, max(cap.entry_count - 1, 0))
        value = tag | tag << 16 if width == 4 else tag
        self.write_config(self.clamp(cap.entries_at + 2 * index, width), width, value)

    @rule(where=STRADDLES, width=st.sampled_from([4, 2, 4]), picks=PICKS)
    def config_straddle(self, where: tuple[str, int], width: int, picks: list[int]) -> None:
        """An access across a register boundary: control and entry 0, the last entry and
        the padding, the end of the capability and the next one. Each byte's value is one
        that means something to the register it lands in (``picks`` choose which)."""
        anchor, delta = where
        cap = self.device.tph_caps[0]
        base = {
            "ctrl": cap.ctrl_at,
            "last-entry": cap.entries_at + 2 * max(cap.entry_count - 1, 0),
            "end": cap.end,
        }[anchor]
        off = self.clamp(base + delta, width)
        self.write_config(off, width, self.meaningful(off, picks[:width]))

    def meaningful(self, off: int, picks: list[int]) -> int:
        """A value whose byte ``k`` is ``picks[k]``-th of the values that matter at ``off+k``."""
        value = 0
        for k, pick in enumerate(picks):
            role = self.device.tph_bytes.get(off + k)
            pool = BYTES
            if role is not None and role[0] == CTRL:
                pool = CTRL_BYTES[role[2]]
            elif role is not None and role[0] == ENTRY:
                pool = TAG_BYTES[(off + k - self.device.tph_caps[role[1]].entries_at) % 2]
            value |= pool[pick % len(pool)] << (8 * k)
        return value

    @rule(
        where=st.sampled_from(["tph", "tph", "tph2", "anywhere"]),
        delta=DELTAS,
        anywhere=st.integers(0, FULL - 1),
        width=st.sampled_from([1, 2, 4]),
        value=VALUES,
    )
    def config_write(self, where: str, delta: int, anywhere: int, width: int, value: int) -> None:
        """Any config write near a TPH capability, or anywhere."""
        off = anywhere if where == "anywhere" else self.tph_base(where) + delta
        self.write_config(self.clamp(off, width), width, value)

    @rule(
        where=st.sampled_from(["tph", "tph", "tph2", "msix"]),
        delta=DELTAS,
        width=st.sampled_from([1, 2, 4, 8]),
    )
    def read(self, where: str, delta: int, width: int) -> None:
        """A config read near a TPH capability, or a BAR read around the MSI-X table."""
        if where == "msix":
            off = self.bar_offset(0, delta - 4, width, True)
            self.guest_read(MsixRead(VM, BDF, self.device.shape.bir, off, width))
            return
        width = min(width, 4)
        off = self.clamp(self.tph_base(where) + delta, width)
        self.guest_read(ConfigRead(VM, BDF, off, width))

    @rule(
        entry=st.integers(0, 4),
        field=st.integers(-8, 23),
        width=st.sampled_from([4, 8, 4, 8, 1, 2]),
        aligned=st.booleans(),
        other_bar=st.integers(0, 7).map(lambda n: n == 0),
        value=VALUES,
    )
    def msix_write(
        self, entry: int, field: int, width: int, aligned: bool, other_bar: bool, value: int
    ) -> None:
        bar = self.device.shape.bir ^ (2 if other_bar else 0)
        self.write_bar(bar, self.bar_offset(entry, field, width, aligned), width, value)

    @rule(
        entry=st.integers(0, 4),
        choice=TAG_CHOICES,
        masked=st.booleans(),
        with_data=st.booleans(),
        data=st.integers(0, 2**32 - 1).map(Hex),
    )
    def msix_vector(
        self, entry: int, choice: TagChoice, masked: bool, with_data: bool, data: int
    ) -> None:
        """A driver programs one MSI-X vector: Vector Control (tag, mask), maybe with data."""
        vc = self.tag(choice, 8) << 16 | int(masked)
        if with_data:
            self.write_bar(
                self.device.shape.bir, self.bar_offset(entry, 8, 8, True), 8, vc << 32 | data
            )
        else:
            self.write_bar(self.device.shape.bir, self.bar_offset(entry, 12, 4, True), 4, vc)

    @rule(how=st.sampled_from(["flr", "af-flr", "pm"]), kind=RESET_KINDS)
    def guest_reset(self, how: str, kind: ResetKind) -> None:
        """The guest resets its device through config space (vfio performs the reset)."""
        self.reset_kind = kind
        ref = self.rig.ref.cfg
        if how == "af-flr" and self.device.shape.af:
            self.write_config(AF_CTRL, 1, 0x01)
        elif how == "pm":
            pmcsr = int.from_bytes(ref[PMCSR : PMCSR + 2], "little") & ~3
            self.write_config(PMCSR, 2, pmcsr | 3)  # D3hot
            self.write_config(PMCSR, 2, pmcsr)  # D0: a reset unless No_Soft_Reset
        else:
            devctl = int.from_bytes(ref[DEVCTL : DEVCTL + 2], "little")
            self.write_config(DEVCTL, 2, devctl | 0x8000)
        self.reset_kind = ResetKind.ZEROED

    # --- the hypervisor -------------------------------------------------------------------
    @rule(kind=RESET_KINDS)
    def hypervisor_reset(self, kind: ResetKind) -> None:
        self.rig.hypervisor_reset(kind)
        d = self.engine.handle(Reset(VM, BDF))
        self.rig.apply(self.decided(d, "reset"), label="reset")

    @rule(change=CHANGES)
    def reload(self, change: Change) -> None:
        """A reload: of the policy in force (nothing may change), or a stricter, different or
        brand new one."""
        if change.kind == "revoke" and not self.owns():
            return
        if change.kind != "unchanged":
            self.apply_change(change)
        before = self.rig.sim.state()
        decisions = self.reload_policy(change.kind)
        check(
            change.kind != "unchanged" or self.rig.sim.state() == before,
            "reload-not-noop",
            "a reload of the unchanged policy changed the device:\n  " + "\n  ".join(decisions),
        )

    @precondition(lambda self: not self.owns())
    @rule()
    def give_back(self) -> None:
        """A reload gives the device back: it stays revoked until detached and attached."""
        self.other = replace(self.other, devices={})
        self.vm = replace(self.vm, devices={BDF: self.settings})
        self.reload_policy("give back")

    def reload_policy(self, what: str) -> list[str]:
        """Reload the machine's policy; perform every correction. The decisions, as text."""
        results = self.engine.reload(self.policy())
        self.rig.grant = self.grant()
        for _, d in results:
            self.rig.apply(self.decided(d, "reload"), label=f"reload ({what})", strict=False)
        self.rig.check_untouched_bytes(f"reload ({what})")
        return self.rig.log[len(self.rig.log) - len(results) :]

    def apply_change(self, c: Change) -> None:
        """Update the machine's policy for ``c``."""
        vm, dev = self.vm, self.settings
        if c.kind == "revoke":  # the device moves to the other VM
            self.vm = replace(vm, devices={})
            self.other = replace(self.other, devices={BDF: DeviceSettings(BDF)})
            self.revoked = True
            self.rig.owned = False
            return
        if c.kind == "new":
            assert c.host is not None and c.vm is not None
            self.host, self.settings = c.host, c.vm.devices[BDF]
            vm = c.vm
            self.other = replace(self.other, cpus=other_cpus(vm))
        elif c.kind == "tph-off":
            vm = replace(vm, tph=False)
        elif c.kind == "ext-off":
            vm = replace(vm, extended_tph=False)
        elif c.kind in ("dev-tph-off", "dev-ext-off"):
            key = "tph" if c.kind == "dev-tph-off" else "extended_tph"
            self.settings = replace(dev, **{key: False})
        elif c.kind == "fewer-cpus":
            fewer = (vm.cpus & c.cpus) or frozenset({min(vm.cpus)})
            vcpus = tuple(x for x in vm.vcpus or () if x in fewer) or None
            vm = replace(vm, cpus=fewer, vcpus=vcpus)
            fb = self.settings.fallback_cpu
            if fb is not None and fb not in fewer:
                self.settings = replace(self.settings, fallback_cpu=None)
        elif c.kind == "on-violation":
            vm = replace(vm, on_violation=c.on_violation)
        self.vm = replace(vm, devices={BDF: self.settings} if self.owns() else {})

    @precondition(lambda self: self.owns())
    @rule(size=st.sampled_from([FULL, FULL, FULL, 256, 64]))
    def reattach(self, size: int) -> None:
        """Detach, then attach from a fresh snapshot of the (simulated) device."""
        try:
            d = self.engine.detach(VM, BDF)
        except TphtrapError:
            pass
        else:
            self.rig.apply(Outcome.of(d), label="detach", strict=False)
        self.revoked = False
        self.rig.grant = self.grant()
        self.attach(size)


def pinned(mode: OnViolation) -> type[TphMachine]:
    """The machine with ``on_violation: MODE``, given a third of the examples."""
    machine = type(f"{mode.value.capitalize()}Machine", (TphMachine,), {"PINNED": mode})
    machine.TestCase.settings = settings(
        max_examples=max(1, EXAMPLES // len(OnViolation)),
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return machine


test_invariant_on_violation_drop = pinned(OnViolation.DROP).TestCase
test_invariant_on_violation_rewrite = pinned(OnViolation.REWRITE).TestCase
test_invariant_on_violation_disable = pinned(OnViolation.DISABLE).TestCase
