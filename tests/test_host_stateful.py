"""The security invariant with the host backend, proven against a model of the Linux kernel.

The same random devices, policies and guest accesses as ``test_engine_stateful.py``, but every
decision is carried out the way a VMM on a real Linux host carries it out: its ``ops`` by a
model of ``drivers/pci/tph.c`` written here from the kernel source (``pcie_enable_tph``:
-EBUSY while enabled, -EINVAL for a mode the device lacks or a root port completing no TPH,
the request type from the capability and the root port; ``pcie_tph_set_st_entry``: -EINVAL
while disabled, nothing in No ST mode, Requester Enable cleared around the write, -ENXIO for
an MSI-X vector the host has not allocated, and TPH disabled on any error;
``pcie_disable_tph``: control 0), its raw ``writes`` on the config space (never a TPH
register) and the VMM's emulated MSI-X table (never a steering tag). A failing operation is
reported back with ``host_result`` and the follow-up performed, as a VMM must.

After *every kernel step* the device is checked with the oracle of ``test_engine_stateful``:
no usable steering tag outside the VM's set, TPH never enabled where forbidden. Every
``st_set`` names a CPU of the VM whose tag (at the width in force) is the tag, or none; guest
read-back equals what the guest wrote. The host also re-creates MSI-X vectors (tags lost),
resets the device (Linux restores its saved TPH state), and fails operations on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

from host_worlds import (
    BDF,
    BIR,
    CTRL_MODE,
    CTRL_REQ,
    CTRL_WRITABLE,
    TABLE_OFF,
    VM,
    build_device,
    devices,
    hosts,
    vms,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from oracle import allowed_tags

from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.engine.render import HostFacts
from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    Decision,
    HostOp,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from tphtrap.policy import HostPolicy, Policy, VmPolicy
from tphtrap.spec import StLocation
from tphtrap.synth import TphSpec

LONG = os.environ.get("TPHTRAP_FUZZ") == "long"
EXAMPLES = int(os.environ.get("TPHTRAP_HOST_EXAMPLES", 5_000 if LONG else 600))
STEPS = 50 if LONG else 30
EINVAL, ENXIO, EBUSY = -22, -6, -16
#: (which op of a decision the host fails by itself, -1: none; with which errno)
FAILS = st.tuples(st.integers(-10, 3), st.sampled_from([EINVAL, ENXIO])).map(
    lambda f: f if f[0] >= 0 else (-1, 0)
)


@st.composite
def host_devices(draw: st.DrawFn) -> tuple[TphSpec, int]:
    """Devices as in test_engine_stateful, most of them with a table of zeros (what a reset
    leaves): with the host backend an enable needs every entry safe before it."""
    tph, at = draw(devices())
    if draw(st.integers(0, 9)) < 7:
        tph = replace(tph, entries=(0,) * len(tph.entries))
    return tph, at


@st.composite
def host_hosts(draw: st.DrawFn) -> HostPolicy:
    host = draw(hosts())
    if draw(st.booleans()):
        host = HostPolicy(host.steering_tags, host.neutral_tags | {0})
    return host


class KernelError(Exception):
    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


class LinuxHost:
    """The host kernel's TPH state for one device, and the device itself (config space and the
    physical MSI-X table the kernel owns)."""

    def __init__(self, cfg: ConfigSpace, completer: int, rciep: bool, msix_st: bytes) -> None:
        tph = cfg.tph
        msix = cfg.msix
        assert tph is not None and msix is not None
        self.cfg = bytearray(cfg.data)
        self.ctrl_at = tph.offset + 8
        self.cap_bits = tph.cap_raw
        self.in_cap = tph.location is StLocation.CAP and tph.table_ok
        self.in_msix = tph.location is StLocation.MSIX and tph.table_ok
        self.n = tph.table_size if self.in_cap else msix.table_size if self.in_msix else 0
        self.table_at = tph.offset + 0xC
        self.vc = [
            0x1 | (int.from_bytes(msix_st[2 * i : 2 * i + 2], "little") << 16)
            for i in range(msix.table_size)
        ]
        self.completer = completer
        self.rciep = rciep
        self.enabled = bool(self.ctrl & CTRL_REQ)  # what the kernel believes
        self.req = (self.ctrl & CTRL_REQ) >> 8
        self.allocated: set[int] = set()
        self.check = lambda where: None  # set by the machine: the oracle after every step

    @property
    def ctrl(self) -> int:
        return int.from_bytes(self.cfg[self.ctrl_at : self.ctrl_at + 4], "little")

    @ctrl.setter
    def ctrl(self, value: int) -> None:
        self.cfg[self.ctrl_at : self.ctrl_at + 4] = value.to_bytes(4, "little")

    def tags(self) -> list[int]:
        if self.in_cap:
            base = self.table_at
            return [
                int.from_bytes(self.cfg[base + 2 * i : base + 2 * i + 2], "little")
                for i in range(self.n)
            ]
        if self.in_msix:
            return [self.vc[i] >> 16 for i in range(self.n)]
        return []

    # --- drivers/pci/tph.c ----------------------------------------------------------------
    def pcie_enable_tph(self, mode: int) -> None:
        if self.enabled:
            raise KernelError(EBUSY)
        if not (self.cap_bits >> mode) & 1:
            raise KernelError(EINVAL)
        req = 3 if self.cap_bits & 0x100 else 1
        if not self.rciep:
            req = min(req, self.completer)
        if req == 0:
            raise KernelError(EINVAL)
        self.ctrl = (self.ctrl & ~CTRL_WRITABLE) | mode | (req << 8)
        self.req = req
        self.enabled = True
        self.check("after pcie_enable_tph")

    def pcie_disable_tph(self) -> None:
        self.ctrl = 0
        self.enabled = False
        self.req = 0
        self.check("after pcie_disable_tph")

    def pcie_tph_set_st_entry(self, index: int, tag: int) -> None:
        if not self.enabled:
            raise KernelError(EINVAL)
        if self.ctrl & CTRL_MODE == 0:
            return  # No ST mode: nothing to write
        self.ctrl = self.ctrl & ~CTRL_REQ
        self.check("after set_st_entry cleared Requester Enable")
        if (self.in_msix and index not in self.allocated) or index >= self.n:
            self.pcie_disable_tph()
            raise KernelError(ENXIO)
        if self.in_cap:
            at = self.table_at + 2 * index
            self.cfg[at : at + 2] = tag.to_bytes(2, "little")
        else:
            self.vc[index] = (self.vc[index] & 0xFFFF) | (tag << 16)
        self.check(f"after set_st_entry wrote entry {index}")
        self.ctrl = self.ctrl | (self.req << 8)
        self.check("after set_st_entry restored Requester Enable")

    # --- the rest of the host ---------------------------------------------------------------
    def reset(self, scratch: bytes) -> None:
        """A reset through the kernel: pci_save_state / reset / pci_restore_state. Each ST
        entry is kept or zeroed by the reset (PCIe's default is 0): the host backend relies on
        that, since the kernel writes entries only while TPH is enabled."""
        saved_ctrl, saved = self.ctrl, self.tags()
        self.ctrl = self.ctrl & ~CTRL_WRITABLE
        for i in range(self.n if self.in_cap else 0):
            if scratch[i % 16] & 1:
                at = self.table_at + 2 * i
                self.cfg[at : at + 2] = b"\0\0"
        if self.enabled:  # pci_restore_tph_state: control first, then the entries
            self.ctrl = saved_ctrl
            for i in range(self.n if self.in_cap else 0):
                at = self.table_at + 2 * i
                self.cfg[at : at + 2] = saved[i].to_bytes(2, "little")

    def recreate_vectors(self, allocated: set[int]) -> None:
        """MSI-X enabled afresh: msix_mask_all writes Vector Control = mask bit everywhere."""
        self.vc = [0x1] * len(self.vc)
        self.allocated = allocated


class HostMachine(RuleBasedStateMachine):
    ENGINE: Callable[[Policy], Engine] = Engine

    @initialize(
        device=host_devices(),
        msix_size=st.integers(1, 4),
        host=host_hosts(),
        vm=vms(),
        msix_st=st.binary(min_size=16, max_size=16),
        root=st.sampled_from([(0, False), (1, False), (3, False), (3, False), (0, True)]),
    )
    def setup(
        self,
        device: tuple[TphSpec, int],
        msix_size: int,
        host: HostPolicy,
        vm: VmPolicy,
        msix_st: bytes,
        root: tuple[int, bool],
    ) -> None:
        cfg = build_device(*device, msix_size)
        self.host = host
        self.vm = vm
        self.engine = self.ENGINE(Policy(host, {VM: vm}))
        self.kernel = LinuxHost(cfg, root[0], root[1], msix_st)
        self.kernel.check = self.check_device
        tph = cfg.tph
        assert tph is not None and cfg.msix is not None
        self.tph = tph
        self.msix = cfg.msix
        self.t0, self.t_end = tph.offset, tph.offset + tph.region_length
        self.guest_cfg = bytearray(cfg.data)
        self.guest_bar = bytearray(TABLE_OFF + 16 * self.msix.table_size + 16)
        for i in range(self.msix.table_size):
            self.guest_bar[TABLE_OFF + 16 * i + 12] = 1
        self.guest_ctrl = tph.ctrl_raw & ~CTRL_WRITABLE
        self.guest_entries = [0] * (tph.table_size if self.kernel.in_cap else 0)
        self.guest_tags = [0] * self.msix.table_size
        self.perform(self.engine.attach(VM, BDF, cfg, HostFacts(root[0], root[1])))

    # --- the oracle ------------------------------------------------------------------------
    def check_device(self, where: str) -> None:
        k = self.kernel
        ctrl = k.ctrl
        en, mode = (ctrl & CTRL_REQ) >> 8, ctrl & CTRL_MODE
        if en == 0:
            return
        ctx = f"{where}: ctrl={ctrl:#x}"
        dev = self.vm.devices[BDF]
        assert en in (1, 3) and mode in (0, 1), ctx
        assert (k.in_cap or k.in_msix) and self.vm.tph and dev.tph, f"{ctx}: TPH where forbidden"
        assert (self.tph.cap_raw >> mode) & 1, f"{ctx}: a mode the device lacks"
        bits = 16 if en == 3 else 8
        ok = allowed_tags(self.host, self.vm, bits)
        if bits == 16:
            assert self.vm.extended_tph and dev.extended_tph and ok, f"{ctx}: ext forbidden"
        if mode == 0:
            assert 0 in ok, f"{ctx}: No ST mode where tag 0 is not allowed"
            return
        for i, tag in enumerate(k.tags()):
            assert tag & ((1 << bits) - 1) in ok, f"{ctx}: entry {i} = {tag:#x}, ok {sorted(ok)}"

    def vm_tag(self, cpu: int, bits: int) -> int | None:
        tags = self.host.steering_tags.get(cpu)
        return None if tags is None else (tags.st8 if bits == 8 else tags.st16)

    # --- carrying a decision out -----------------------------------------------------------
    def perform(self, d: Decision, fail: tuple[int, int] = (-1, 0), reset: bool = False) -> None:
        """The VMM's part: the ops in order (op ``fail[0]`` fails on its own with errno
        ``fail[1]``; on a failure the rest is skipped and reported), then the raw writes;
        ``reset``: the writes reset the function (vfio resets it through the kernel)."""
        assert d.reason not in ("internal-error", "unsafe-plan"), d.detail
        assert d.ops is not None, "a host-backend decision always lists its ops"
        if d.verdict is Verdict.PASS:
            assert not d.ops
        for n, op in enumerate(d.ops):
            if n == fail[0] and op.op != "tph_disable":  # pcie_disable_tph cannot fail
                errno = self.inject(op, fail[1])
            else:
                self.run(op)
                continue
            follow = self.engine.host_result(VM, BDF, op, errno)
            self.raw(d, reset)
            self.perform(follow)
            return
        self.raw(d, reset)

    def inject(self, op: HostOp, errno: int) -> int:
        """The host fails ``op`` by itself, leaving the kernel as Linux would."""
        k = self.kernel
        if op.op == "tph_enable":
            return EINVAL  # nothing written
        if errno == ENXIO and k.in_msix:
            k.allocated.discard(op.index)  # the host has no vector for it after all
        k.pcie_disable_tph()  # pcie_tph_set_st_entry disables TPH on any error
        return errno

    def run(self, op: HostOp) -> None:
        """One op, which the kernel must accept: tphtrap's model of the host is exact."""
        k = self.kernel
        try:
            if op.op == "tph_enable":
                assert op.mode in ("iv", "ns")
                k.pcie_enable_tph(1 if op.mode == "iv" else 0)
                assert op.width == (16 if k.req == 3 else 8), "the width is the kernel's"
            elif op.op == "tph_disable":
                k.pcie_disable_tph()
            else:
                assert op.op == "st_set"
                bits = 16 if k.req == 3 else 8
                assert op.tag < (1 << bits), op
                if op.cpu is not None:
                    assert op.cpu in self.vm.cpus, f"{op}: a CPU outside the VM"
                    assert self.vm_tag(op.cpu, bits) == op.tag, f"{op}: not that CPU's tag"
                k.pcie_tph_set_st_entry(op.index, op.tag)
        except KernelError as exc:
            raise AssertionError(f"the kernel refuses {op}: {exc.errno}") from None

    def raw(self, d: Decision, reset: bool) -> None:
        """The raw writes: config space, or the VMM's emulated MSI-X table."""
        for w in d.writes:
            blob = w.value.to_bytes(w.width, "little")
            if w.space == "config":
                assert w.offset + w.width <= self.t0 or w.offset >= self.t_end, f"{w}: TPH"
                self.kernel.cfg[w.offset : w.offset + w.width] = blob
            else:
                for b in range(w.width):
                    rel = w.offset + b - TABLE_OFF
                    tagbyte = 0 <= rel < 16 * self.msix.table_size and rel % 16 >= 14
                    assert not (self.kernel.in_msix and tagbyte), f"{w}: a steering tag"
        if reset:
            self.kernel.reset(b"\0" * 16)
            self.guest_reset()
        self.check_device("after the raw writes")

    # --- the guest ---------------------------------------------------------------------------
    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]), fail=FAILS)
    def config_write(self, data: st.DataObject, width: int, fail: tuple[int, int]) -> None:
        off = data.draw(
            st.integers(self.t0 - 4, self.t_end + 2)
            | st.sampled_from([0x44, 0xA8, 0xA9])  # PMCSR, Device Control (the resets)
            | st.integers(0, 4096 - width)
        )
        off = max(0, min(off, 4096 - width))
        value = data.draw(
            st.sampled_from([0x101, 0x301, 0x001, 0x100, 0x102, 0x1, 0x2, 0x3, 0x80, 0x105])
            | st.integers(0, (1 << (8 * width)) - 1)
        ) & ((1 << (8 * width)) - 1)
        d = self.engine.handle(ConfigWrite(VM, BDF, off, width, value))
        self.record(self.guest_cfg_write, off, width, value)
        self.perform(d, fail, reset="reset" in d.reasons)
        self.check_view(d, "config", off, width)

    @rule(
        action=st.sampled_from(["enable", "enable", "set", "set", "set", "disable"]),
        mode=st.sampled_from([1, 1, 0]),
        req=st.sampled_from([1, 3]),
        index=st.integers(0, 7),
        tag=st.sampled_from([0, 1, 2, 3, 0x100, 0x101, 0x105]),
        fail=FAILS,
    )
    def linux_driver(
        self, action: str, mode: int, req: int, index: int, tag: int, fail: tuple[int, int]
    ) -> None:
        """What a Linux guest driver does: pcie_enable_tph, pcie_tph_set_st_entry (clear
        Requester Enable, write the entry, restore it), pcie_disable_tph."""
        ctrl_at = self.t0 + 8
        keep = self.guest_ctrl & ~CTRL_WRITABLE
        if action == "enable":
            self.guest_write(ctrl_at, 4, keep | mode | req << 8, fail)
        elif action == "disable":
            self.guest_write(ctrl_at, 4, keep, fail)
        else:
            en = self.guest_ctrl & CTRL_WRITABLE
            self.guest_write(ctrl_at, 4, keep | (en & CTRL_MODE), fail)
            if self.guest_entries:
                i = index % len(self.guest_entries)
                self.guest_write(self.t0 + 0xC + 2 * i, 2, tag, fail)
            elif self.kernel.in_msix:
                i = index % self.msix.table_size
                off = TABLE_OFF + 16 * i + 12
                d = self.engine.handle(MsixWrite(VM, BDF, BIR, off, 4, tag << 16))
                self.record(self.guest_bar_write, off, 4, tag << 16)
                self.perform(d, fail)
                self.check_view(d, "bar", off, 4)
            self.guest_write(ctrl_at, 4, keep | en, fail)

    def guest_write(self, off: int, width: int, value: int, fail: tuple[int, int]) -> None:
        d = self.engine.handle(ConfigWrite(VM, BDF, off, width, value))
        self.record(self.guest_cfg_write, off, width, value)
        self.perform(d, fail)
        self.check_view(d, "config", off, width)

    @rule(data=st.data(), width=st.sampled_from([4, 8, 2]), fail=FAILS)
    def msix_write(self, data: st.DataObject, width: int, fail: tuple[int, int]) -> None:
        end = TABLE_OFF + 16 * self.msix.table_size
        off = data.draw(st.integers(TABLE_OFF, end - width))
        off -= off % width
        tags = [0, 1, 2, 3, 0x100, 0x101, 0x105, 0xFFFF]
        t = data.draw(st.sampled_from(tags))
        value = (data.draw(st.integers(0, 1)) | t << 16 | t << 48) & ((1 << (8 * width)) - 1)
        d = self.engine.handle(MsixWrite(VM, BDF, BIR, off, width, value))
        self.record(self.guest_bar_write, off, width, value)
        self.perform(d, fail)
        self.check_view(d, "bar", off, width)

    @rule(data=st.data())
    def read_back(self, data: st.DataObject) -> None:
        off = data.draw(st.integers(self.t0, self.t_end - 1))
        d = self.engine.handle(ConfigRead(VM, BDF, off, 1))
        assert d.read_mask == 0xFF and d.guest_value == self.guest_byte(off), (off, d)
        if self.kernel.in_msix:
            i = data.draw(st.integers(0, self.msix.table_size - 1))
            d = self.engine.handle(MsixRead(VM, BDF, BIR, TABLE_OFF + 16 * i + 12, 4))
            assert d.read_mask == 0xFFFF0000 and d.guest_value == self.guest_tags[i] << 16

    # --- the host ------------------------------------------------------------------------------
    @rule(scratch=st.binary(min_size=16, max_size=16))
    def host_reset(self, scratch: bytes) -> None:
        self.kernel.reset(scratch)
        self.guest_reset()
        self.perform(self.engine.handle(Reset(VM, BDF)))

    @rule(data=st.data(), cleared=st.booleans(), fail=FAILS)
    def vectors(self, data: st.DataObject, cleared: bool, fail: tuple[int, int]) -> None:
        n = self.msix.table_size
        allocated = data.draw(st.frozensets(st.integers(0, n - 1)))
        if cleared:
            self.kernel.recreate_vectors(set(allocated))
        else:
            self.kernel.allocated = set(allocated)
        self.perform(self.engine.host_vectors(VM, BDF, allocated, cleared), fail)

    @rule(vm=vms(), host=host_hosts())
    def reload(self, vm: VmPolicy, host: HostPolicy) -> None:
        self.vm, self.host = vm, host
        [(_, d)] = self.engine.reload(Policy(host, {VM: vm}))
        self.perform(d)

    # --- the guest's own view ----------------------------------------------------------------
    def guest_reset(self) -> None:
        self.guest_ctrl &= ~CTRL_WRITABLE
        self.guest_entries = [0] * len(self.guest_entries)
        self.guest_tags = [0] * len(self.guest_tags)

    def record(self, put: object, off: int, width: int, value: int) -> None:
        for k in range(width):
            put(off + k, (value >> (8 * k)) & 0xFF)  # type: ignore[operator]

    def guest_cfg_write(self, pos: int, byte: int) -> None:
        rel = pos - self.t0
        if 8 <= rel < 12:
            shift = 8 * (rel - 8)
            merged = (self.guest_ctrl & ~(0xFF << shift)) | (byte << shift)
            self.guest_ctrl = (self.guest_ctrl & ~CTRL_WRITABLE) | (merged & CTRL_WRITABLE)
        elif 12 <= rel < 12 + 2 * len(self.guest_entries):
            i, half = divmod(rel - 12, 2)
            e = self.guest_entries[i] & ~(0xFF << (8 * half))
            self.guest_entries[i] = e | (byte << (8 * half))
        elif not 0 <= rel < self.t_end - self.t0:
            self.guest_cfg[pos] = byte

    def guest_bar_write(self, pos: int, byte: int) -> None:
        rel = pos - TABLE_OFF
        if self.kernel.in_msix and rel % 16 >= 14:
            i, half = rel // 16, rel % 16 - 14
            e = self.guest_tags[i] & ~(0xFF << (8 * half))
            self.guest_tags[i] = e | (byte << (8 * half))

    def guest_byte(self, pos: int) -> int:
        rel = pos - self.t0
        if 8 <= rel < 12:
            return (self.guest_ctrl >> (8 * (rel - 8))) & 0xFF
        if 12 <= rel < 12 + 2 * len(self.guest_entries):
            return (self.guest_entries[(rel - 12) // 2] >> (8 * ((rel - 12) % 2))) & 0xFF
        return self.guest_cfg[pos]

    def check_view(self, d: Decision, space: str, off: int, width: int) -> None:
        for k in range(width):
            if d.read_mask >> (8 * k) & 0xFF:
                assert d.guest_value is not None
                got = (d.guest_value >> (8 * k)) & 0xFF
                if space == "config":
                    want = self.guest_byte(off + k)
                else:
                    rel = off + k - TABLE_OFF
                    want = (self.guest_tags[rel // 16] >> (8 * (rel % 16 - 14))) & 0xFF
                assert got == want, f"{space} byte {off + k:#x}: reads {got:#x}, wrote {want:#x}"


HostMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_host_invariant = HostMachine.TestCase
