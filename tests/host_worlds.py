"""Random worlds for the host backend's state machine: hosts, VMs, devices (the tags a VM may
use are the oracle's, tests/oracle.py's ``allowed_tags``)."""

from __future__ import annotations

from hypothesis import strategies as st

from tphtrap.device import ConfigSpace
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, OnViolation, VmPolicy
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

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
