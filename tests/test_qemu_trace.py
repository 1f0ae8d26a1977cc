"""The QEMU trace reader: line formats, width inference, BAR tracking, MSI-X attribution.

The traces under fixtures/traces/qemu-*.log are written by hand in the exact formats QEMU's
``log`` trace backend prints (see the tphtrap.qemu_trace docstring for the sources).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.errors import DeviceError, TraceError
from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, Policy, VmPolicy
from tphtrap.qemu_trace import (
    MAX_LINE,
    MemoryRegionRead,
    MemoryRegionWrite,
    PciCfgRead,
    PciCfgWrite,
    PciMappingAdd,
    PciMappingDel,
    QemuRecord,
    QemuTraceReader,
    VfioConfigRead,
    VfioConfigWrite,
    VfioRegionRead,
    VfioRegionWrite,
    VfioReset,
    open_trace,
    parse_line,
)
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

TRACES = Path(__file__).resolve().parent.parent / "fixtures" / "traces"
NIC = "0000:00:03.0"
FIXTURE_IDS = {"vendor_id": 0x15B3, "device_id": 0x101D}  # what qemu-msix-bar.log's guest reads
HOST = "0000:3b:00.0"


@functools.cache
def nic_config() -> ConfigSpace:
    """TPH with the ST table in MSI-X; MSI-X table of 32 entries in BAR 2 at 0x4000."""
    data = build_config(
        **FIXTURE_IDS,
        tph=TphSpec(location=StLocation.MSIX, table_size=32),
        msix=MsixSpec(table_size=32, bir=2, table_offset=0x4000),
    )
    return ConfigSpace.from_bytes(data, "nic", NIC)


def read(
    lines: list[str] | Iterator[str],
    *,
    devices: dict[str, ConfigSpace] | None = None,
    vm: str | None = "web",
    name: str = "t.log",
    **kw: object,
) -> tuple[QemuTraceReader, list[QemuRecord]]:
    reader = QemuTraceReader(
        lines,
        name=name,
        devices=devices if devices is not None else {},
        vm_of=lambda bdf: vm,
        **kw,  # type: ignore[arg-type]
    )
    return reader, list(reader)


def accesses(records: list[QemuRecord]) -> list[tuple[int, object]]:
    return [(r.lineno, r.access) for r in records if r.access is not None]


# --- line parser ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "event"),
    [
        (
            "pci_cfg_write e1000e 00:03.0 @0x150 <- 0x101",
            PciCfgWrite("e1000e", 0, 3, 0, 0x150, 0x101),
        ),
        (
            "pci_cfg_read virtio-net-pci 01:1f.7 @0xffc -> 0xffffffff\n",
            PciCfgRead("virtio-net-pci", 1, 0x1F, 7, 0xFFC, 0xFFFFFFFF),
        ),
        # QEMU before 7.0: "%s %02u:%u": decimal slot, no bus
        ("pci_cfg_write e1000e 12:0 @0x4 <- 0x7", PciCfgWrite("e1000e", None, 12, 0, 4, 7)),
        (
            "pci_update_mappings_add e1000e 00:03.0 2,0xfe000000+0x8000",
            PciMappingAdd("e1000e", 0, 3, 0, 2, 0xFE000000, 0x8000),
        ),
        (
            "pci_update_mappings_del d=0x55d0c0b4e000 00:03.0 6,0xfeb80000+0x40000",
            PciMappingDel(None, 0, 3, 0, 6, 0xFEB80000, 0x40000),
        ),
        (
            "memory_region_ops_write cpu 1 mr 0x55d0c0b4e8f0 addr 0xfe00405c value 0x230000 "
            "size 4 name 'msix-table'",
            MemoryRegionWrite(1, 0x55D0C0B4E8F0, 0xFE00405C, 0x230000, 4, "msix-table"),
        ),
        (
            "memory_region_ops_read cpu -1 mr (nil) addr 0xcfc value 0x15938086 size 4",
            MemoryRegionRead(-1, 0, 0xCFC, 0x15938086, 4, None),
        ),
        (
            "vfio_pci_write_config  (0000:3b:00.0, @0x4, 0x6, len=0x2)",
            VfioConfigWrite(HOST, 4, 6, 2),
        ),
        (
            "vfio_pci_read_config  (0000:3b:00.0, @0x100, len=0x4) 0x14820001",
            VfioConfigRead(HOST, 0x100, 0x14820001, 4),
        ),
        (
            "vfio_region_write  (0000:3b:00.0:region2+0x405c, 0x230000, 4)",
            VfioRegionWrite(HOST, 2, 0x405C, 0x230000, 4),
        ),
        (
            "vfio_region_read  (0000:3b:00.0:region0+0x8, 8) = 0xdeadbeef00000000",
            VfioRegionRead(HOST, 0, 8, 0xDEADBEEF00000000, 8),
        ),
        ("vfio_pci_reset  (0000:3b:00.0)", VfioReset(HOST)),
        # the two -msg timestamp=on prefixes
        (
            "4242@1700000000.000201:pci_cfg_write e1000e 00:03.0 @0x4 <- 0x407",
            PciCfgWrite("e1000e", 0, 3, 0, 4, 0x407, 4242),
        ),
        (
            "2025-09-10T18:05:12.123456Z vfio_pci_reset  (0000:3b:00.0)\r\n",
            VfioReset(HOST),
        ),
    ],
)
def test_parse_line_formats(line: str, event: object) -> None:
    assert parse_line(line) == event


def test_parse_line_guest_bdf() -> None:
    ev = parse_line("pci_cfg_read e1000e 0a:1f.3 @0x0 -> 0x1")
    assert isinstance(ev, PciCfgRead)
    assert ev.bdf == "0000:0a:1f.3"
    old = parse_line("pci_cfg_read e1000e 31:3 @0x0 -> 0x1")
    assert isinstance(old, PciCfgRead)
    assert (old.bdf, old.slot, old.function) == (None, 31, 3)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\n",
        "qemu-system-x86_64: terminating on signal 15",
        "kvm_set_user_memory Slot#3 flags=0x0 gpa=0xfd000000 size=0x8000",
        "pci_cfg_wri",  # cut inside the event name: not one of ours
        "12345 not a prefix pci_cfg_write e1000e 00:03.0 @0x4 <- 0x7",
        "msix_write_config dev e1000e enabled 1 masked 0",
    ],
)
def test_parse_line_unrelated(line: str) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("pci_cfg_write e1000e 00:03.0 @0x15", "does not match"),
        ("pci_cfg_write", "no arguments"),
        ("pci_cfg_write e1000e 00:20.0 @0x4 <- 0x1", "slot 0x20"),
        ("pci_cfg_read e1000e 00:03.0 @0x1000 -> 0x1", "past the 4 KiB"),
        ("pci_update_mappings_add e1000e 00:03.0 7,0xfe000000+0x8000", "region 7"),
        ("pci_update_mappings_add e1000e 00:03.0 0,0xfe000000+0x0", "size 0"),
        ("memory_region_ops_write cpu 0 mr 0x1 addr 0x10 value 0x1ff size 1", "fit 1 bytes"),
        ("memory_region_ops_write cpu 0 mr 0x1 addr 0x10 value 0x1 size 3", "size 3"),
        ("vfio_pci_write_config  (0000:3b:00.0, @0xffe, 0x1, len=0x4)", "past the 4 KiB"),
        ("vfio_pci_read_config  (0000:3b:00.0, @0x4, len=0x3) 0x1", "length 3"),
        ("vfio_region_write  (0000:3b:00.0:region0+0x10, 0x1ffff, 1)", "fit 1 bytes"),
        ("vfio_region_read  (0000:3b:00.0:region0+0x10, 4)", "does not match"),
        ("pci_cfg_read e1000e 00:03.0 @0x0 -> 0x" + "f" * 9000, "characters long"),
    ],
)
def test_parse_line_malformed(line: str, why: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_line(line, "x.log:7")
    assert info.value.where == "x.log:7"
    assert why in info.value.reason
    assert str(info.value).startswith("x.log:7: ")


# --- the MSI-X / BAR trace ----------------------------------------------------------------
def test_msix_writes_attributed_through_bar_mappings() -> None:
    reader, records = read(
        open_trace(TRACES / "qemu-msix-bar.log"), devices={NIC: nic_config()}, name="bar.log"
    )
    virtio = "0000:00:04.0"
    assert accesses(records) == [
        (2, ConfigRead("web", NIC, 0x0, 4)),
        (3, ConfigWrite("web", NIC, 0x18, 4, 0xFFFFFFFF)),
        (4, ConfigRead("web", NIC, 0x18, 4)),
        (5, ConfigWrite("web", NIC, 0x18, 4, 0xFE000000)),
        # 2-byte access through port 0xcfc: the memory_region_ops_write line gives the width
        (7, ConfigWrite("web", NIC, 0x4, 2, 0x407)),
        # BAR 2 at 0xfe000000, table at 0x4000: entry 0 address, entry 5 Vector Control
        (11, MsixWrite("web", NIC, 2, 0x4000, 4, 0xFEE00000)),
        (12, MsixWrite("web", NIC, 2, 0x405C, 4, 0x00230000)),
        # ECAM access (bus 0, devfn 0x18, offset 0x150) of 4 bytes: TPH control
        (14, ConfigWrite("web", NIC, 0x150, 4, 0x101)),
        # another device, config not known: BAR offset only
        (16, MsixWrite("web", virtio, 1, 0xC, 4, 0)),
        # BAR 2 moved to 0xfd000000: entry 13 Vector Control
        (20, MsixWrite("web", NIC, 2, 0x40DC, 4, 0x10000)),
        (21, MsixRead("web", NIC, 2, 0x40DC, 4)),
        (22, ConfigRead("web", NIC, 0x150, 4)),
    ]
    notes = {r.lineno: r.note for r in records}
    assert "no traced BAR mapping holds the MSI-X table address 0xfe0040dc" in notes[18]
    assert notes[16] == "MSI-X capability not known: table position not checked"
    assert notes[6] == "config access-size view of the access on line 7"
    assert "pci-conf-data" in notes[7] and "line 6" in notes[7]
    assert notes[9] == "BAR 2 at 0xfe000000+0x8000 mapped for 0000:00:03.0"
    assert notes[17] == "BAR 2 at 0xfe000000+0x8000 unmapped for 0000:00:03.0"
    assert notes[23] == "config access-size view of the access on line 22"
    # one record per relevant line, in line order; 1 and 24 unrelated, 10 another region
    assert [r.lineno for r in records] == [n for n in range(2, 24) if n != 10]
    st_ = reader.stats
    assert (st_.lines, st_.skipped, st_.other_regions, st_.malformed) == (24, 2, 1, 0)
    assert (st_.accesses, st_.unattributed, st_.records) == (12, 1, 21)
    assert reader.device_names() == [NIC, virtio]
    assert reader.device_config(NIC) is not None


def test_gzip_trace_reads_like_the_plain_one() -> None:
    assert (TRACES / "qemu-msix-bar.log.gz").read_bytes()[:2] == b"\x1f\x8b"
    plain = read(open_trace(TRACES / "qemu-msix-bar.log"), devices={NIC: nic_config()})[1]
    packed = read(open_trace(TRACES / "qemu-msix-bar.log.gz"), devices={NIC: nic_config()})[1]
    assert packed == plain
    assert len(plain) == 21


def test_timestamp_prefixes_and_thread_pairing() -> None:
    _, records = read(open_trace(TRACES / "qemu-timestamp.log"), devices={NIC: nic_config()})
    assert accesses(records) == [
        (2, MsixWrite("web", NIC, 2, 0x405C, 4, 0x230000)),
        # the 2-byte pci-conf-data write on line 3 is from thread 4243, this write from 4242:
        # not the same access, so the width comes from the offset
        (4, ConfigWrite("web", NIC, 0x4, 4, 0x407)),
        (6, ConfigWrite("web", NIC, 0x150, 4, 0x101)),
        (7, ConfigWrite("web", NIC, 0x150, 4, 0)),  # ISO 8601 prefix
        (8, MsixWrite("web", NIC, 2, 0x406C, 4, 1)),
    ]
    notes = {r.lineno: r.note for r in records}
    assert "no matching pci_cfg_write" in notes[3]
    assert notes[5] == "config access-size view of the access on line 6"


def test_interleaved_threads_keep_a_config_access_together() -> None:
    lines = [
        "7@1.000001:pci_cfg_write vfio-pci 00:05.0 @0x4 <- 0x6",
        "8@1.000002:pci_update_mappings_add vfio-pci 00:05.0 0,0xfe800000+0x100000",
        "8@1.000003:memory_region_ops_write cpu 1 mr 0x5 addr 0xfe80005c value 0x1 size 4 "
        "name 'msix-table'",
        "7@1.000004:vfio_pci_write_config  (0000:3b:00.0, @0x4, 0x6, len=0x2)",
    ]
    _, records = read(lines)
    guest = "0000:00:05.0"
    assert [r.lineno for r in records] == [1, 2, 3, 4]
    assert accesses(records) == [
        (1, ConfigWrite("web", guest, 4, 2, 6)),
        (3, MsixWrite("web", guest, 0, 0x5C, 4, 1)),
    ]
    assert records[3].note == "vfio view of the access on line 1"


# --- vfio -----------------------------------------------------------------------------------
@functools.cache
def vfio_config() -> ConfigSpace:
    data = build_config(msix=MsixSpec(table_size=8, bir=0, table_offset=0x0, pba_offset=0x800))
    return ConfigSpace.from_bytes(data, "host-nic", HOST)


def test_vfio_trace_bound_by_host_address() -> None:
    reader, records = read(open_trace(TRACES / "qemu-vfio.log"), devices={HOST: vfio_config()})
    assert accesses(records) == [
        (2, ConfigRead("web", HOST, 0, 4)),
        (4, ConfigWrite("web", HOST, 4, 2, 6)),
        (7, MsixWrite("web", HOST, 0, 0x1040, 4, 1)),
        (8, MsixRead("web", HOST, 0, 0x1040, 4)),
        (9, ConfigWrite("web", HOST, 0x150, 4, 0x101)),
        # msix-table write at the guest BAR 0 address of 00:05.0, which is 0000:3b:00.0
        (11, MsixWrite("web", HOST, 0, 0x5C, 4, 0x10000)),
        (12, Reset("web", HOST)),
    ]
    notes = {r.lineno: r.note for r in records}
    assert notes[1] == "vfio view of the access on line 2"
    assert notes[3] == "config access-size view of the access on line 2"
    assert notes[2] == "len from vfio_pci_read_config (line 1)"
    assert notes[5] == "vfio view of the access on line 4"
    assert notes[11] == ""  # inside the known MSI-X table: fully checked
    assert notes[13] == "vfio region 7 of 0000:3b:00.0 is not a BAR"
    assert reader.device_names() == [HOST]
    assert reader.device_config("0000:00:05.0") is reader.device_config(HOST)


def test_vfio_trace_bound_by_guest_address_learns_the_config() -> None:
    seen: list[str] = []

    def vm_of(bdf: str) -> str | None:
        seen.append(bdf)
        return "web" if bdf == "0000:00:05.0" else None

    reader = QemuTraceReader(
        open_trace(TRACES / "qemu-vfio.log"), name="v.log", devices={}, vm_of=vm_of
    )
    records = list(reader)
    assert {a.bdf for _, a in accesses(records)} == {"0000:00:05.0"}  # type: ignore[attr-defined]
    assert set(seen) == {"0000:00:05.0"}
    cfg = reader.device_config(HOST)
    assert cfg is not None and cfg.vendor_id == 0x8086 and cfg.device_id == 0x1593
    assert reader.config_generation(HOST) == 1


# --- QEMU before 7.0 / 6.1 ------------------------------------------------------------------
def test_old_formats() -> None:
    reader, records = read(open_trace(TRACES / "qemu-old-format.log"), devices={NIC: nic_config()})
    assert accesses(records) == [
        (1, ConfigRead("web", NIC, 0, 4)),
        (3, ConfigWrite("web", NIC, 0x150, 4, 0x101)),
        # no region name: counted only because it falls inside the known MSI-X table
        (4, MsixWrite("web", NIC, 2, 0x405C, 4, 0x230000)),
    ]
    assert "no bus number" in records[0].note
    assert reader.stats.other_regions == 1  # line 5: outside the table, no name
    assert [r.lineno for r in records] == [1, 2, 3, 4, 6]


def test_old_format_bus_comes_from_other_names() -> None:
    lines = [
        "pci_update_mappings_add d=0x5 02:01.0 0,0xfe000000+0x1000",
        "pci_cfg_write e1000e 01:0 @0x4 <- 0x6",
        "pci_cfg_write e1000e 09:0 @0x4 <- 0x6",
    ]
    _, records = read(lines)
    assert [a.bdf for _, a in accesses(records)] == [  # type: ignore[attr-defined]
        "0000:02:01.0",
        "0000:00:09.0",
    ]


# --- width inference ------------------------------------------------------------------------
def st_in_cap_config() -> ConfigSpace:
    data = build_config(tph=TphSpec(location=StLocation.CAP, table_size=8))
    return ConfigSpace.from_bytes(data, "cap", NIC)


def test_width_inference_rules() -> None:
    cfg = st_in_cap_config()
    assert cfg.tph is not None
    table = cfg.tph.table_offset  # 0x154: dword aligned
    lines = [
        f"pci_cfg_write e1000e 00:03.0 @{table:#x} <- 0x23",  # ST entry 0: 2 bytes
        f"pci_cfg_write e1000e 00:03.0 @{table + 4:#x} <- 0x240023",  # two entries: widened
        f"pci_cfg_write e1000e 00:03.0 @{table - 4:#x} <- 0x101",  # control: 4
        "pci_cfg_write e1000e 00:03.0 @0x6 <- 0x10",  # offset % 4 == 2: 2
        "pci_cfg_write e1000e 00:03.0 @0x3d <- 0x1",  # odd: 1
        "pci_cfg_write e1000e 00:03.0 @0x3d <- 0x100",  # does not fit 1 byte: malformed
        "pci_cfg_write e1000e 00:03.0 @0x4 <- 0x407",  # 4 (the usual guess)
    ]
    reader, records = read(lines, devices={NIC: cfg})
    assert accesses(records) == [
        (1, ConfigWrite("web", NIC, table, 2, 0x23)),
        (2, ConfigWrite("web", NIC, table + 4, 4, 0x240023)),
        (3, ConfigWrite("web", NIC, table - 4, 4, 0x101)),
        (4, ConfigWrite("web", NIC, 6, 2, 0x10)),
        (5, ConfigWrite("web", NIC, 0x3D, 1, 1)),
        (7, ConfigWrite("web", NIC, 4, 4, 0x407)),
    ]
    assert reader.stats.malformed == 1
    assert "naturally aligned" in records[5].note
    assert records[5].note.startswith("t.log:6: pci_cfg_write value 0x100")


def test_width_from_config_access_regions() -> None:
    lines = [
        # 1 byte at port 0xcfe -> offset lane 2; pci_cfg offset 0x52 (the PCIe cap's flags + 2)
        "memory_region_ops_write cpu 0 mr 0x1 addr 0xcfe value 0x5 size 1 name 'pci-conf-data'",
        "pci_cfg_write e1000e 00:03.0 @0x52 <- 0x5",
        # ECAM: devfn of 00:04.0 is 0x20, not 0x18: the size does not belong to this access
        "memory_region_ops_write cpu 0 mr 0x2 addr 0xb0020150 value 0x1 size 2 "
        "name 'pcie-mmcfg-mmio'",
        "pci_cfg_write e1000e 00:03.0 @0x150 <- 0x1",
        # different value: not the same access either
        "memory_region_ops_write cpu 0 mr 0x1 addr 0xcfc value 0x7 size 2 name 'pci-conf-data'",
        "pci_cfg_write e1000e 00:03.0 @0x4 <- 0x6",
        # old QEMU name of the ECAM region
        "memory_region_ops_write cpu 0 mr 0x2 addr 0xe0018100 value 0x1 size 1 name 'pcie-mmcfg'",
        "pci_cfg_write e1000e 00:03.0 @0x100 <- 0x1",
        # read: the size line follows the pci_cfg_read line
        "pci_cfg_read e1000e 00:03.0 @0x4 -> 0x406",
        "memory_region_ops_read cpu 0 mr 0x1 addr 0xcfc value 0x406 size 2 name 'pci-conf-data'",
    ]
    _, records = read(lines)
    assert accesses(records) == [
        (2, ConfigWrite("web", NIC, 0x52, 1, 5)),
        (4, ConfigWrite("web", NIC, 0x150, 4, 1)),
        (6, ConfigWrite("web", NIC, 4, 4, 6)),
        (8, ConfigWrite("web", NIC, 0x100, 1, 1)),
        (9, ConfigRead("web", NIC, 4, 2)),
    ]
    assert [r.lineno for r in records] == list(range(1, 11))


def test_inferred_reads_learn_only_certain_bytes() -> None:
    full = build_config()  # status has the capability-list bit
    lines = [
        f"pci_cfg_read e1000e 00:03.0 @0x0 -> {int.from_bytes(full[0:4], 'little'):#x}",
        f"pci_cfg_read e1000e 00:03.0 @0x4 -> {int.from_bytes(full[4:8], 'little'):#x}",
        f"pci_cfg_read e1000e 00:03.0 @0x34 -> {full[0x34]:#x}",
        # a 16-bit read of the command register looks like a 32-bit read of 0x406: it must
        # not clear the status register learned above
        "pci_cfg_read e1000e 00:03.0 @0x4 -> 0x406",
    ]
    reader, _ = read(lines)
    cfg = reader.device_config(NIC)
    assert cfg is not None
    assert cfg.u16(4) == 0x406 and cfg.u16(6) == int.from_bytes(full[6:8], "little")
    assert cfg.caps  # the capability list is still reachable
    assert reader.config_generation(NIC) == 3  # the last read taught nothing new


# --- devices, VMs, overlays -----------------------------------------------------------------
def test_bound_device_id_read_keeps_its_inferred_width() -> None:
    """Found by the garbled-trace test: the identity check of a bound device compares only the
    bytes an inferred read certainly returned, and used to shrink the access to them too (a
    32-bit read of 0x1 at offset 0 became a 1-byte read)."""
    _, records = read(["pci_cfg_read e1000e 03:0 @0x0 -> 0x1"], devices={NIC: nic_config()})
    (rec,) = records
    assert rec.access == ConfigRead("web", NIC, 0, 4)
    reader = QemuTraceReader(
        iter(["pci_cfg_read e1000e 00:03.0 @0x0 -> 0x1"]),
        name="t.log",
        devices={NIC: nic_config()},
        vm_of=lambda bdf: "web",
    )
    list(reader)
    mismatch, _ = reader.not_judgeable(NIC)
    assert mismatch is not None and "identity mismatch" in mismatch


def test_device_without_vm_is_not_replayed() -> None:
    _, records = read(open_trace(TRACES / "qemu-msix-bar.log"), vm=None)
    unbound = [r for r in records if r.bucket == "unbound"]
    assert len(unbound) == 11 and all(r.access is not None and r.access.vm == "" for r in unbound)
    assert [r for r in records if r.access is not None and r.bucket != "unbound"] == []
    assert "device 0000:00:03.0 is not bound to a VM" in unbound[0].note
    assert unbound[0].reason == "no VM for the device"


def test_tph_overlay_on_a_learned_device() -> None:
    overlay = ConfigSpace.from_bytes(build_config(tph=TphSpec(table_size=4)), "ov")
    reader, _ = read(open_trace(TRACES / "qemu-no-tph.log"), overlays={"0000:00:06.0": overlay})
    cfg = reader.device_config("0000:00:06.0")
    assert cfg is not None and cfg.tph is not None and cfg.tph.table_size == 4
    assert cfg.msix is not None and cfg.msix.table_offset == 0x2000  # learned part kept
    no_tph = ConfigSpace.from_bytes(build_config(), "plain")
    with pytest.raises(DeviceError):
        QemuTraceReader([], name="x", devices={}, vm_of=lambda b: None, overlays={NIC: no_tph})


def test_overlapping_mappings() -> None:
    msix_cfg = nic_config()
    lines = [
        "pci_update_mappings_add e1000e 00:03.0 2,0xfe000000+0x8000",
        # a stale mapping of another (unknown) device over the same range
        "pci_update_mappings_add virtio-net-pci 00:04.0 4,0xfe000000+0x8000",
        # inside the MSI-X table of 00:03.0: settled by its MSI-X capability
        "memory_region_ops_write cpu 0 mr 0xa addr 0xfe00400c value 0x1 size 4 name 'msix-table'",
        # outside that table: two unknown possibilities -> not attributed
        "memory_region_ops_write cpu 0 mr 0xb addr 0xfe006000 value 0x1 size 4 name 'msix-table'",
    ]
    _, records = read(lines, devices={NIC: msix_cfg})
    assert accesses(records) == [
        (3, MsixWrite("web", NIC, 2, 0x400C, 4, 1)),
        # not in the table of 00:03.0, so the other device's (position unchecked)
        (4, MsixWrite("web", "0000:00:04.0", 4, 0x6000, 4, 1)),
    ]
    assert records[3].note == "MSI-X capability not known: table position not checked"
    two_unknown = [
        "pci_update_mappings_add a 00:03.0 2,0xfe000000+0x8000",
        "pci_update_mappings_add b 00:04.0 4,0xfe000000+0x8000",
        "memory_region_ops_write cpu 0 mr 0xa addr 0xfe00400c value 0x1 size 4 name 'msix-table'",
    ]
    _, records = read(two_unknown)
    assert records[2].access is None
    assert records[2].note.endswith("is mapped by 0000:00:03.0, 0000:00:04.0")


def test_mr_pointer_breaks_ties() -> None:
    lines = [
        "pci_update_mappings_add a 00:03.0 2,0xfe000000+0x8000",
        "memory_region_ops_write cpu 0 mr 0xa addr 0xfe00400c value 0x1 size 4 name 'msix-table'",
        "pci_update_mappings_add b 00:04.0 4,0xfe000000+0x8000",
        "memory_region_ops_write cpu 0 mr 0xa addr 0xfe00401c value 0x1 size 4 name 'msix-table'",
    ]
    _, records = read(lines)
    assert accesses(records) == [
        (2, MsixWrite("web", NIC, 2, 0x400C, 4, 1)),
        (4, MsixWrite("web", NIC, 2, 0x401C, 4, 1)),
    ]


# --- malformed lines, strict mode ---------------------------------------------------------
def test_garbage_and_truncated_lines() -> None:
    reader, records = read(open_trace(TRACES / "qemu-garbage.log"), name="qemu-garbage.log")
    bad = [2, 5, 8, 9, 10, 12]
    assert [r.lineno for r in records if r.note.startswith("qemu-garbage.log:")] == bad
    assert [e.where for e in reader.errors] == [f"qemu-garbage.log:{n}" for n in bad]
    assert all(
        f"qemu-garbage.log:{n}: " in r.note
        for n, r in zip(bad, [r for r in records if r.access is None], strict=True)
    )
    assert accesses(records) == [
        (1, ConfigWrite("web", NIC, 0x150, 4, 0x101)),
        (11, ConfigRead("web", NIC, 0, 4)),
        (13, ConfigRead("web", NIC, 4, 4)),  # last line, no newline
    ]
    st_ = reader.stats
    assert (st_.lines, st_.skipped, st_.malformed) == (13, 4, 6)


def test_strict_mode_stops_at_the_first_malformed_line() -> None:
    reader = QemuTraceReader(
        open_trace(TRACES / "qemu-garbage.log"),
        name="qemu-garbage.log",
        devices={},
        vm_of=lambda b: "web",
        strict=True,
    )
    got: list[QemuRecord] = []
    with pytest.raises(TraceError) as info:
        for rec in reader:
            got.append(rec)
    assert info.value.where == "qemu-garbage.log:2"
    assert [r.lineno for r in got] == [1]


def test_strict_mode_rejects_an_impossible_width() -> None:
    lines = ["pci_update_mappings_add a 00:03.0 2,0xfe000000+0x8000"] * 3 + [
        "pci_cfg_write e1000e 00:03.0 @0x3d <- 0x100",
        "pci_update_mappings_add a 00:03.0 2,0xfe000000+0x8000",
    ]
    with pytest.raises(TraceError) as info:
        read(lines, strict=True, name="w.log")
    assert info.value.where == "w.log:4"


@pytest.mark.parametrize("strict", [False, True])
def test_vfio_length_that_cannot_hold_the_value(strict: bool) -> None:
    lines = [
        "pci_update_mappings_add a 00:03.0 2,0xfe000000+0x8000",
        "pci_cfg_write vfio-pci 00:05.0 @0x4 <- 0x1ffff",
        "vfio_pci_write_config  (0000:3b:00.0, @0x4, 0x1ffff, len=0x2)",
        "pci_update_mappings_add a 00:03.0 2,0xfe000000+0x8000",
    ]
    if strict:
        with pytest.raises(TraceError) as info:
            read(lines, strict=True, name="v.log")
        assert info.value.where == "v.log:2"
        return
    reader, records = read(lines, name="v.log")
    assert [r.lineno for r in records] == [1, 2, 3, 4]
    assert records[1].note.startswith("v.log:2: value 0x1ffff")
    assert records[2].note == "vfio view of the access on line 2"
    assert reader.stats.malformed == 1


# --- streaming and opening ----------------------------------------------------------------
def test_reader_streams() -> None:
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield (
                f"memory_region_ops_write cpu 0 mr 0xa addr {0xFE004000 + 4 * (i % 128):#x} "
                "value 0x0 size 4 name 'msix-table'"
                if i
                else "pci_update_mappings_add e1000e 00:03.0 2,0xfe000000+0x8000"
            )

    reader = QemuTraceReader(lines(), name="inf", devices={}, vm_of=lambda b: "web")
    it = iter(reader)
    first = [next(it) for _ in range(3)]
    assert [r.lineno for r in first] == [1, 2, 3]
    assert consumed <= 4
    for _ in range(20000):
        next(it)
    assert consumed <= 20004
    assert len(reader._out) == 0 and not reader._groups  # nothing accumulates


def test_reader_iterates_once() -> None:
    reader = QemuTraceReader([], name="x", devices={}, vm_of=lambda b: None)
    assert list(reader) == []
    with pytest.raises(RuntimeError):
        iter(reader)


def test_open_trace_lines(tmp_path: Path) -> None:
    p = tmp_path / "t.log"
    p.write_bytes(b"a\r\nb\rc\n" + b"x" * (MAX_LINE + 10) + b"\nlast\xff")
    got = list(open_trace(p))
    assert got[:2] == ["a\r\n", "b\rc\n"]  # split at \n only, like grep -n
    assert len(got[2]) == MAX_LINE  # cut, and the rest of that line skipped
    assert got[3] == "last\ufffd"
    assert len(got) == 4
    gz = tmp_path / "t.log.gz"
    gz.write_bytes(gzip.compress(b"one\ntwo\n"))
    assert list(open_trace(gz)) == ["one\n", "two\n"]


def test_open_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as info:
        open_trace(tmp_path / "missing.log")
    assert info.value.where.endswith("missing.log")
    cut = tmp_path / "cut.log.gz"
    cut.write_bytes(gzip.compress(b"pci_cfg_read e1000e 00:03.0 @0x0 -> 0x1\n" * 2000)[:300])
    with pytest.raises(TraceError) as info2:
        list(open_trace(cut))
    assert info2.value.where.startswith(f"{cut}:")


# --- no TPH anywhere: every record passes unchanged ---------------------------------------
def test_trace_without_tph_passes_every_record_unchanged() -> None:
    plain = ConfigSpace.from_bytes(
        build_config(**FIXTURE_IDS, msix=MsixSpec(bir=2, table_offset=0x4000)), "p"
    )
    devices = {NIC: plain}
    reader = QemuTraceReader(
        itertools.chain(
            open_trace(TRACES / "qemu-no-tph.log"), open_trace(TRACES / "qemu-msix-bar.log")
        ),
        name="no-tph",
        devices=devices,
        vm_of=lambda b: "web",
    )
    bdfs = [NIC, "0000:00:04.0", "0000:00:06.0", "0000:00:07.0"]
    policy = Policy(
        HostPolicy({0: CpuTags(0, 0x23, 0x123)}),
        {"web": VmPolicy("web", frozenset({0}), devices={b: DeviceSettings(b) for b in bdfs})},
    )
    engine = Engine(policy)
    attached: set[str] = set()
    n = 0
    for rec in reader:
        a = rec.access
        if a is None:
            continue
        if a.bdf not in attached:
            cfg = reader.device_config(a.bdf)
            if cfg is None:  # nothing learned yet: an empty config space, no TPH
                cfg = ConfigSpace.from_bytes(bytes(4096), "empty")
            assert cfg.tph is None
            assert engine.attach(a.vm, a.bdf, cfg).verdict is Verdict.PASS
            attached.add(a.bdf)
        d = engine.handle(a)
        n += 1
        assert d.verdict is Verdict.PASS, (rec, d)
        if isinstance(a, ConfigWrite):
            assert d.writes == (DeviceWrite("config", a.offset, a.width, a.value),)
        elif isinstance(a, MsixWrite):
            assert d.writes == (DeviceWrite("bar", a.offset, a.width, a.value, a.bar),)
        else:
            assert d.read_mask == 0
    assert n == reader.stats.accesses > 80
    assert attached == set(bdfs)


# --- robustness -----------------------------------------------------------------------------
SAMPLES = [
    line.rstrip("\n")
    for name in ("qemu-msix-bar.log", "qemu-vfio.log", "qemu-old-format.log", "qemu-timestamp.log")
    for line in (TRACES / name).read_text().splitlines()
]


@st.composite
def garbled_lines(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(SAMPLES))
    kind = draw(st.integers(0, 3))
    if kind == 0:  # cut
        return base[: draw(st.integers(0, len(base)))]
    if kind == 1:  # one character replaced
        i = draw(st.integers(0, max(0, len(base) - 1)))
        return base[:i] + draw(st.characters()) + base[i + 1 :]
    if kind == 2:  # a digit run replaced by random text
        i = draw(st.integers(0, len(base)))
        return base[:i] + draw(st.text(max_size=12)) + base[i:]
    return draw(st.text(max_size=200))


@settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(garbled_lines(), max_size=40))
def test_garbled_traces_only_raise_trace_errors(lines: list[str]) -> None:
    for line in lines:
        with contextlib.suppress(TraceError):
            parse_line(line)
    reader, records = read(lines, devices={NIC: nic_config()})
    assert all(0 < r.lineno <= len(lines) for r in records)
    assert [r.lineno for r in records] == sorted(r.lineno for r in records)
    assert reader.stats.malformed == sum(r.note.startswith("t.log:") for r in records)
    try:
        _, strict_records = read(lines, devices={NIC: nic_config()}, strict=True)
    except TraceError as exc:
        bad_line = int(exc.where.rpartition(":")[2])
        assert 1 <= bad_line <= len(lines)
        assert str(exc) in {r.note for r in records}
    else:
        assert reader.stats.malformed == 0
        assert strict_records == records


@functools.cache
def overlay_config() -> ConfigSpace:
    return ConfigSpace.from_bytes(build_config(tph=TphSpec(table_size=4)), "ov")


_ints = st.integers(0, 0x1_0000_0000)
_small = st.integers(0, 0x1100)
_bdf = st.sampled_from(["00:03.0", "00:04.0", "00:05.0", "01:00.0"])
_region = st.sampled_from(["msix-table", "pci-conf-data", "pcie-mmcfg-mmio", "e1000e-mmio"])
_vname = st.sampled_from([HOST, "0000:3b:00.1", "6f3b0a3c-uuid"])
_tid = st.sampled_from(["", "7@1.000001:", "8@1.000002:"])


@st.composite
def structured_lines(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    b, v, x, y = draw(_bdf), draw(_vname), draw(_small), draw(_ints)
    size = draw(st.sampled_from([1, 2, 4, 8]))
    body = [
        f"pci_cfg_write e1000e {b} @{x:#x} <- {y:#x}",
        f"pci_cfg_read e1000e {b} @{x:#x} -> {y:#x}",
        f"pci_update_mappings_add e {b} {draw(st.integers(0, 6))},{0xFE000000 + x:#x}+0x8000",
        f"pci_update_mappings_del e {b} {draw(st.integers(0, 6))},{0xFE000000 + x:#x}+0x8000",
        f"memory_region_ops_write cpu 0 mr {draw(st.sampled_from(['0xa', '0xb']))} "
        f"addr {draw(st.sampled_from([0xFE000000, 0xB0018000, 0xCFC])) + x:#x} "
        f"value {y % (1 << (8 * size)):#x} size {size} name '{draw(_region)}'",
        f"memory_region_ops_read cpu 0 mr 0xa addr {0xCFC + x % 4:#x} value {y % 256:#x} size 1 "
        f"name '{draw(_region)}'",
        f"vfio_pci_write_config  ({v}, @{x % 0xFFC:#x}, {y:#x}, len={size % 8 or 4:#x})",
        f"vfio_pci_read_config  ({v}, @{x % 0xFFC:#x}, len={size % 8 or 4:#x}) {y:#x}",
        f"vfio_region_write  ({v}:region{draw(st.integers(0, 9))}+{x:#x}, "
        f"{y % (1 << (8 * size)):#x}, {size})",
        f"vfio_pci_reset  ({v})",
    ][kind]
    return draw(_tid) + body


@settings(max_examples=200, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(structured_lines(), max_size=60), st.booleans(), st.booleans())
def test_structured_traces_never_crash(lines: list[str], strict: bool, bound: bool) -> None:
    devices = {NIC: nic_config(), HOST: vfio_config()} if bound else {}
    try:
        reader, records = read(
            lines, devices=devices, strict=strict, overlays={"0000:00:04.0": overlay_config()}
        )
    except TraceError:
        assert strict
        return
    assert [r.lineno for r in records] == sorted(r.lineno for r in records)
    assert len({r.lineno for r in records}) == len(records)  # one record per line at most
    for _, a in accesses(records):
        assert isinstance(a, ConfigWrite | ConfigRead | MsixWrite | MsixRead | Reset)
        if isinstance(a, ConfigWrite | ConfigRead):
            assert a.width in (1, 2, 4) and a.offset + a.width <= 4096
        if isinstance(a, ConfigWrite):
            assert a.value < 1 << (8 * a.width)
        if isinstance(a, MsixWrite | MsixRead):
            assert 0 <= a.bar <= 5 and a.width in (1, 2, 4, 8)
    for name in reader.device_names():
        reader.device_config(name)
