"""The security invariant, proven by a hypothesis state machine.

Random sequences of guest writes and reads of every width and offset (aligned or not) over the
TPH capability, the MSI-X table and neighbouring registers, resets and policy reloads, against
random devices and policies. Each decision's device writes are applied, one by one, to a
simulated device, and after *every single device write* the test checks, with its own oracle
(not the engine's rules):

* every steering tag the device can use, given its Requester Enable and mode, is allowed for
  the VM at the width in force (strict ownership or neutral);
* TPH is never enabled where policy or device forbids it (no standard ST table, Device Specific
  or reserved mode, reserved Requester Enable, Extended TPH without device support or 16-bit
  tags, ``tph: false``);
* the engine never writes the read-only TPH registers or the bytes past the ST table.

After every step: every non-TPH byte (config space and MSI-X table) holds what the guest wrote,
and guest read-back (device value patched with the decision's mask) equals the guest's own view.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, OnViolation, Policy, VmPolicy
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

LONG = os.environ.get("TPHTRAP_FUZZ") == "long"
EXAMPLES = int(os.environ.get("TPHTRAP_EXAMPLES", 20_000 if LONG else 2_000))
STEPS = 60 if LONG else 30

VM = "guest"
BDF = "0000:3b:00.0"
NCPU = 8
BIR = 2
TABLE_OFF = 0x1000
# Bits of the control register, written out independently of the layouts (PCIe / pci_regs.h).
CTRL_MODE = 0x7
CTRL_REQ = 0x300
CTRL_WRITABLE = CTRL_MODE | CTRL_REQ


# --- random worlds ---------------------------------------------------------------------------
@st.composite
def hosts(draw: st.DrawFn) -> HostPolicy:
    tags = {}
    for cpu in range(NCPU):
        st8 = draw(st.one_of(st.none(), st.integers(0, 5))) if draw(st.booleans()) else cpu // 2
        st16 = draw(st.one_of(st.none(), st.integers(0, 0x105)))
        tags[cpu] = CpuTags(cpu, st8, st16)
    neutral = draw(st.frozensets(st.sampled_from([0, 1, 0x100]), max_size=2))
    return HostPolicy(tags, neutral)


@st.composite
def vms(draw: st.DrawFn) -> VmPolicy:
    cpus = draw(st.frozensets(st.integers(0, NCPU - 1), min_size=1, max_size=NCPU))
    vcpus = None
    if draw(st.booleans()):
        vcpus = tuple(draw(st.lists(st.sampled_from(sorted(cpus)), min_size=1, max_size=4)))
    dev = DeviceSettings(
        BDF,
        tph=draw(st.booleans()) or draw(st.booleans()),
        extended_tph=draw(st.booleans()) or draw(st.booleans()),
        on_violation=draw(st.one_of(st.none(), st.sampled_from(list(OnViolation)))),
    )
    return VmPolicy(
        VM,
        cpus,
        on_violation=draw(st.sampled_from(list(OnViolation))),
        vcpus=vcpus,
        devices={BDF: dev},
    )


@st.composite
def devices(draw: st.DrawFn) -> tuple[TphSpec, int]:
    """A TPH capability (and where it sits); built into a config space in setup."""
    location = draw(
        st.sampled_from([StLocation.CAP] * 3 + [StLocation.MSIX] * 3 + [StLocation.NONE])
        | st.just(StLocation.RESERVED)
    )
    size = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    tph = TphSpec(
        no_st=draw(st.booleans()) or draw(st.booleans()),
        interrupt_vector=draw(st.booleans()) or draw(st.booleans()),
        device_specific=draw(st.booleans()),
        extended=draw(st.booleans()),
        location=location,
        table_size=size,
        entries=tuple(draw(st.lists(st.integers(0, 0xFFFF), min_size=size, max_size=size))),
        st_mode=draw(st.integers(0, 7)),
        req_enable=draw(st.integers(0, 3)),
        cap_reserved=draw(st.sampled_from([0, 0xF8000000, 0x0000F800])),
        ctrl_reserved=draw(st.sampled_from([0, 0x80000000, 0x400])),
    )
    return tph, draw(st.sampled_from([0x148, 0x160, 0x1C4]))


def build_device(tph: TphSpec, tph_at: int, msix_size: int) -> ConfigSpace:
    size = tph.table_size if tph.location is StLocation.MSIX else msix_size
    msix = MsixSpec(table_size=size, bir=BIR, table_offset=TABLE_OFF)
    data = build_config(tph=tph, msix=msix, tph_at=tph_at, with_dsn=tph_at != 0x1C4)
    return ConfigSpace.from_bytes(data, "<sim>", BDF)


def allowed(host: HostPolicy, vm: VmPolicy, bits: int) -> set[int]:
    """Independent oracle: tags whose every owner is in the VM's CPUs, or neutral."""
    owners: dict[int, set[int]] = {}
    for cpu, tags in host.steering_tags.items():
        t = tags.st8 if bits == 8 else tags.st16
        if t is not None:
            owners.setdefault(t, set()).add(cpu)
    ok = {t for t, cpus in owners.items() if cpus <= vm.cpus}
    ok |= {t for t in host.neutral_tags if t < (1 << bits)}
    return ok


class SimDevice:
    """A device that stores what it is written (config space and the MSI-X BAR)."""

    def __init__(self, cfg: ConfigSpace, msix_st: bytes) -> None:
        self.cfg = bytearray(cfg.data)
        self.bar = bytearray(TABLE_OFF + 0x200)
        msix = cfg.msix
        assert msix is not None
        for i in range(msix.table_size):
            base = TABLE_OFF + 16 * i
            self.bar[base + 12] = 1  # Mask bit set at reset
            self.bar[base + 14 : base + 16] = msix_st[2 * i : 2 * i + 2]

    def apply(self, w: DeviceWrite) -> None:
        blob = w.value.to_bytes(w.width, "little")
        if w.space == "config":
            self.cfg[w.offset : w.offset + w.width] = blob
        else:
            assert w.bar == BIR, w
            self.bar[w.offset : w.offset + w.width] = blob

    def read(self, space: str, off: int, width: int) -> int:
        mem = self.cfg if space == "config" else self.bar
        return int.from_bytes(mem[off : off + width], "little")


class TphMachine(RuleBasedStateMachine):
    @initialize(
        device=devices(),
        msix_size=st.integers(1, 4),
        host=hosts(),
        vm=vms(),
        msix_st=st.binary(min_size=16, max_size=16),
    )
    def setup(
        self,
        device: tuple[TphSpec, int],
        msix_size: int,
        host: HostPolicy,
        vm: VmPolicy,
        msix_st: bytes,
    ) -> None:
        cfg = build_device(*device, msix_size)
        self.config = cfg
        self.host = host
        self.vm = vm
        self.policy = Policy(host, {VM: vm})
        self.engine = Engine(self.policy)
        self.dev = SimDevice(cfg, msix_st)
        tph = cfg.tph
        msix = cfg.msix
        assert tph is not None and msix is not None
        self.tph = tph
        self.msix = msix
        self.t0 = tph.offset
        self.t_end = tph.offset + tph.region_length
        self.cap_table = tph.location is StLocation.CAP and tph.table_ok
        self.n_cap = tph.table_size if self.cap_table else 0
        self.msix_st = tph.location is StLocation.MSIX
        self.latched_possible = False
        # The guest's own view.
        self.guest_cfg = bytearray(cfg.data)  # non-TPH bytes: what the guest wrote
        self.guest_bar = bytearray(self.dev.bar)
        decision = self.engine.attach(VM, BDF, cfg)
        self.apply(decision)
        # The guest's view starts at power-on, never at what the snapshot (a host) left there.
        ctrl = self.dev.read("config", self.t0 + 8, 4)
        self.guest_ctrl = ctrl & ~CTRL_WRITABLE
        self.guest_entries = [0] * self.n_cap
        self.guest_vc_st = [0] * msix.table_size

    # --- oracle -----------------------------------------------------------------------
    def tph_forbidden(self) -> bool:
        dev_settings = self.vm.devices[BDF]
        return (
            self.tph.location not in (StLocation.CAP, StLocation.MSIX)
            or not self.tph.table_ok
            or not (self.vm.tph and dev_settings.tph)
        )

    def check_device(self, where: str) -> None:
        ctrl = self.dev.read("config", self.t0 + 8, 4)
        en = (ctrl & CTRL_REQ) >> 8
        mode = ctrl & CTRL_MODE
        if en == 0:
            return
        ctx = f"{where}: ctrl={ctrl:#x}"
        assert en in (1, 3), f"{ctx}: reserved Requester Enable on the device"
        assert mode in (0, 1), f"{ctx}: mode {mode} enabled (device-specific or reserved)"
        assert not self.tph_forbidden(), f"{ctx}: TPH enabled where forbidden"
        if mode == 1:
            assert self.tph.interrupt_vector_mode, f"{ctx}: IV mode without IV support"
        else:
            assert self.tph.no_st_mode, f"{ctx}: No ST mode without support"
        bits = 16 if en == 3 else 8
        if bits == 16:
            dev_settings = self.vm.devices[BDF]
            assert self.tph.extended_tph, f"{ctx}: Extended TPH on a device without it"
            assert self.vm.extended_tph and dev_settings.extended_tph, f"{ctx}: ext forbidden"
            assert allowed(self.host, self.vm, 16), f"{ctx}: ext granted without 16-bit tags"
        ok = allowed(self.host, self.vm, bits)
        mask = (1 << bits) - 1
        if mode == 0:
            assert 0 in ok, f"{ctx}: No ST mode (tag 0) enabled but 0 is not allowed"
            return
        for i, tag in enumerate(self.device_tags()):
            assert tag & mask in ok, f"{ctx}: entry {i} holds {tag:#x}, allowed {sorted(ok)}"

    def device_tags(self) -> list[int]:
        if self.cap_table:
            base = self.t0 + 0xC
            return [self.dev.read("config", base + 2 * i, 2) for i in range(self.n_cap)]
        if self.msix_st:
            return [
                self.dev.read("bar", TABLE_OFF + 16 * i + 14, 2)
                for i in range(self.msix.table_size)
            ]
        return []

    def apply(self, decision: Decision, access: object = None) -> None:
        if decision.verdict is Verdict.PASS and isinstance(access, (ConfigWrite, MsixWrite)):
            assert len(decision.writes) == 1
            w = decision.writes[0]
            assert (w.offset, w.width, w.value) == (access.offset, access.width, access.value)
        if decision.verdict is Verdict.DROP:
            assert decision.writes == ()
        for w in decision.writes:
            if w.space == "config":
                self.check_not_read_only(w)
            if decision.verdict is Verdict.REWRITE:
                assert w.width in (1, 2, 4, 8) and w.offset % w.width == 0, w
            self.dev.apply(w)
            self.check_device(f"after {w}")

    def check_not_read_only(self, w: DeviceWrite) -> None:
        lo, hi = w.offset, w.offset + w.width
        ro_end = self.t0 + 8
        assert hi <= self.t0 or lo >= ro_end, f"write {w} touches the RO TPH header/capability"
        table_end = self.t0 + 0xC + 2 * self.n_cap
        past = lo < self.t_end and hi > table_end and table_end < self.t_end
        assert not past, f"write {w} touches bytes past the ST table"

    # --- the guest's view ---------------------------------------------------------------
    def guest_cfg_byte(self, off: int) -> int:
        if not self.t0 <= off < self.t_end:
            return self.guest_cfg[off]
        rel = off - self.t0
        if 8 <= rel < 12:
            return (self.guest_ctrl >> (8 * (rel - 8))) & 0xFF
        if 12 <= rel < 12 + 2 * self.n_cap:
            entry = self.guest_entries[(rel - 12) // 2]
            return (entry >> (8 * ((rel - 12) % 2))) & 0xFF
        return self.config.data[off]

    def guest_bar_byte(self, off: int) -> int:
        table_end = TABLE_OFF + 16 * self.msix.table_size
        if self.msix_st and TABLE_OFF <= off < table_end and (off - TABLE_OFF) % 16 >= 14:
            i = (off - TABLE_OFF) // 16
            return (self.guest_vc_st[i] >> (8 * ((off - TABLE_OFF) % 16 - 14))) & 0xFF
        return self.guest_bar[off]

    def record_cfg_write(self, off: int, width: int, value: int) -> None:
        for k in range(width):
            pos = off + k
            byte = (value >> (8 * k)) & 0xFF
            if not self.t0 <= pos < self.t_end:
                self.guest_cfg[pos] = byte
                continue
            rel = pos - self.t0
            if 8 <= rel < 12:
                shift = 8 * (rel - 8)
                keep = self.guest_ctrl & ~(0xFF << shift)
                merged = keep | (byte << shift)
                # Only writable bits stick; reserved bits read as the device reports them.
                self.guest_ctrl = (self.guest_ctrl & ~CTRL_WRITABLE) | (merged & CTRL_WRITABLE)
            elif 12 <= rel < 12 + 2 * self.n_cap:
                i, half = divmod(rel - 12, 2)
                e = self.guest_entries[i] & ~(0xFF << (8 * half))
                self.guest_entries[i] = e | (byte << (8 * half))

    def record_bar_write(self, off: int, width: int, value: int) -> None:
        table_end = TABLE_OFF + 16 * self.msix.table_size
        for k in range(width):
            pos = off + k
            byte = (value >> (8 * k)) & 0xFF
            if self.msix_st and TABLE_OFF <= pos < table_end and (pos - TABLE_OFF) % 16 >= 14:
                i = (pos - TABLE_OFF) // 16
                half = (pos - TABLE_OFF) % 16 - 14
                e = self.guest_vc_st[i] & ~(0xFF << (8 * half))
                self.guest_vc_st[i] = e | (byte << (8 * half))
            else:
                self.guest_bar[pos] = byte

    # --- rules ---------------------------------------------------------------------------
    def interesting_value(self, data: st.DataObject, width: int) -> int:
        tags = [0, 1, 2, 3, 5, 0x100, 0x101, 0x103, 0x105, 0xFFFF]
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            return data.draw(st.integers(0, (1 << (8 * width)) - 1))
        if choice == 1:
            ctrl = data.draw(st.integers(0, 7)) | (data.draw(st.integers(0, 3)) << 8)
            return ctrl & ((1 << (8 * width)) - 1)
        t1, t2 = data.draw(st.sampled_from(tags)), data.draw(st.sampled_from(tags))
        return (t1 | (t2 << 16) | (t1 << 32) | (t2 << 48)) & ((1 << (8 * width)) - 1)

    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]))
    def config_write(self, data: st.DataObject, width: int) -> None:
        off = data.draw(
            st.integers(self.t0 - 6, self.t_end + 6) | st.integers(0, 4096 - width), label="off"
        )
        off = max(0, min(off, 4096 - width))
        value = self.interesting_value(data, width)
        access = ConfigWrite(VM, BDF, off, width, value)
        decision = self.engine.handle(access)
        assert decision.reason != "internal-error", decision.detail
        self.record_cfg_write(off, width, value)
        self.apply(decision, access)
        self.check_write_view(decision, "config", off, width)

    @rule(data=st.data(), width=st.sampled_from([1, 2, 4, 8]))
    def msix_write(self, data: st.DataObject, width: int) -> None:
        table_end = TABLE_OFF + 16 * self.msix.table_size
        off = data.draw(st.integers(TABLE_OFF - 8, table_end + 8), label="off")
        if data.draw(st.booleans()):
            off -= off % width  # mostly aligned, as guests do
        value = self.interesting_value(data, width)
        access = MsixWrite(VM, BDF, BIR, off, width, value)
        decision = self.engine.handle(access)
        assert decision.reason != "internal-error", decision.detail
        self.record_bar_write(off, width, value)
        self.apply(decision, access)
        self.check_write_view(decision, "bar", off, width)

    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]))
    def config_read(self, data: st.DataObject, width: int) -> None:
        off = data.draw(st.integers(self.t0 - 4, self.t_end + 4) | st.integers(0, 4096 - width))
        off = max(0, min(off, 4096 - width))
        d = self.engine.handle(ConfigRead(VM, BDF, off, width))
        seen = self.seen("config", off, width, d)
        want = sum(self.guest_cfg_byte(off + k) << (8 * k) for k in range(width))
        assert seen == want, f"config read @{off:#x}/{width}: guest sees {seen:#x}, wants {want:#x}"

    @rule(data=st.data(), width=st.sampled_from([1, 2, 4, 8]))
    def msix_read(self, data: st.DataObject, width: int) -> None:
        table_end = TABLE_OFF + 16 * self.msix.table_size
        off = data.draw(st.integers(TABLE_OFF - 4, table_end + 4))
        d = self.engine.handle(MsixRead(VM, BDF, BIR, off, width))
        seen = self.seen("bar", off, width, d)
        want = sum(self.guest_bar_byte(off + k) << (8 * k) for k in range(width))
        assert seen == want, f"msix read @{off:#x}/{width}: guest sees {seen:#x}, wants {want:#x}"

    def seen(self, space: str, off: int, width: int, d: Decision) -> int:
        assert d.verdict is not Verdict.DROP
        raw = self.dev.read(space, off, width)
        if not d.read_mask:
            return raw
        assert d.guest_value is not None
        return (raw & ~d.read_mask) | (d.guest_value & d.read_mask)

    def check_write_view(self, d: Decision, space: str, off: int, width: int) -> None:
        if not d.read_mask:
            return
        assert d.guest_value is not None
        for k in range(width):
            if d.read_mask >> (8 * k) & 0xFF:
                got = (d.guest_value >> (8 * k)) & 0xFF
                want = (
                    self.guest_cfg_byte(off + k)
                    if space == "config"
                    else self.guest_bar_byte(off + k)
                )
                assert got == want, f"write view byte {off + k:#x}: {got:#x} != {want:#x}"

    @rule(st_bytes=st.binary(min_size=16, max_size=16), ctrl_byte=st.integers(0, 255))
    def reset(self, st_bytes: bytes, ctrl_byte: int) -> None:
        # The device resets (the hypervisor reports it after the fact): control writable bits
        # to 0; ST contents unknown (random here). The decision's writes come after.
        ctrl = self.dev.read("config", self.t0 + 8, 4) & ~CTRL_WRITABLE
        self.dev.apply(DeviceWrite("config", self.t0 + 8, 4, ctrl))
        for i in range(self.n_cap):
            self.dev.apply(DeviceWrite("config", self.t0 + 0xC + 2 * i, 2, st_bytes[i % 16]))
        for i in range(self.msix.table_size):
            base = TABLE_OFF + 16 * i
            # Vector Control resets to Mask=1, reserved bits 0. With the ST table in MSI-X the
            # tags left behind are unknown to tphtrap (random here); otherwise bits 31:16 are
            # reserved and read 0.
            self.dev.bar[base + 12 : base + 14] = b"\x01\x00"
            self.guest_bar[base + 12 : base + 14] = b"\x01\x00"
            if self.msix_st:
                self.dev.bar[base + 14 : base + 16] = st_bytes[2 * (i % 8) : 2 * (i % 8) + 2]
            else:
                self.dev.bar[base + 14 : base + 16] = b"\x00\x00"
                self.guest_bar[base + 14 : base + 16] = b"\x00\x00"
        self.guest_ctrl = ctrl
        self.guest_entries = [0] * self.n_cap
        self.guest_vc_st = [0] * self.msix.table_size
        self.check_device("after reset")
        self.apply(self.engine.handle(Reset(VM, BDF)))
        self.check_device("after the reset's writes")

    @rule(vm=vms(), host=hosts())
    def reload(self, vm: VmPolicy, host: HostPolicy) -> None:
        self.vm = vm
        self.host = host
        self.policy = Policy(host, {VM: vm})
        results = self.engine.reload(self.policy)
        assert len(results) == 1
        self.apply(results[0][1])

    @invariant()
    def non_tph_bytes_are_the_guests(self) -> None:
        if not hasattr(self, "dev"):
            return
        cfg, gcfg = self.dev.cfg, self.guest_cfg
        assert cfg[: self.t0] == gcfg[: self.t0]
        assert cfg[self.t_end :] == gcfg[self.t_end :]
        table_end = TABLE_OFF + 16 * self.msix.table_size
        bar, gbar = self.dev.bar, self.guest_bar
        assert bar[:TABLE_OFF] == gbar[:TABLE_OFF]
        assert bar[table_end:] == gbar[table_end:]
        for i in range(self.msix.table_size):
            base = TABLE_OFF + 16 * i
            n = 14 if self.msix_st else 16
            assert bar[base : base + n] == gbar[base : base + n], f"MSI-X entry {i}"


TphMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_tph_invariant = TphMachine.TestCase
