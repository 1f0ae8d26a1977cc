"""QEMU trace logs (the ``log`` trace backend) as a stream of guest accesses for offline replay.

Sources, all in the qemu/qemu repository:

* ``hw/pci/trace-events``: ``pci_cfg_write "%s %02x:%02x.%x @0x%x <- 0x%x"``, ``pci_cfg_read
  "%s %02x:%02x.%x @0x%x -> 0x%x"`` and ``pci_update_mappings_add/del "%s %02x:%02x.%x
  %d,0x%"PRIx64"+0x%"PRIx64`` since "trace-events,pci: unify trace events format" (QEMU 7.0).
  Before it: ``pci_cfg_*  "%s %02u:%u @0x%x ..."`` (device name, *decimal* slot, function, no
  bus number) and ``pci_update_mappings_* "d=%p %02x:%02x.%x %d,0x%"PRIx64"+0x%"PRIx64``.
* ``hw/pci/pci_host.c``: ``pci_host_config_write_common`` traces ``pci_cfg_write`` *before*
  calling the device's ``config_write``; ``pci_host_config_read_common`` traces ``pci_cfg_read``
  *after* ``config_read``. Neither prints the access length. ``pci_host_data_write`` (the
  ``pci-conf-data`` region, ports 0xcfc-0xcff) forwards ``config_reg | (addr & 3)``;
  ``hw/pci/pcie_host.c`` decodes ECAM addresses (``pcie-mmcfg-mmio``, ``pcie-mmcfg`` in old
  QEMU) as bus << 20 | devfn << 12 | offset.
* ``system/trace-events`` (``softmmu/trace-events`` before 8.1, the top-level ``trace-events``
  before that): ``memory_region_ops_write/read "cpu %d mr %p addr 0x%"PRIx64" value
  0x%"PRIx64" size %u name '%s'"``; the ``name '%s'`` part arrived in 2021 ("memory: Display
  MemoryRegion name in read/write ops trace events"), older lines end after ``size %u``.
  ``system/memory.c`` prints ``memory_region_to_absolute_addr(mr, addr)``: the offset inside
  ``mr`` plus ``mr->addr`` of the region and of every container up to the root. For the
  ``msix-table`` region (``hw/pci/msix.c``: a subregion at ``table_offset`` of the BAR's region)
  that is the BAR's bus address plus the offset in the BAR, the same address space as the
  ``pci_update_mappings_add`` addresses. The write is traced before the region's handler runs,
  a read after it returns. ``msix_table_mmio_ops`` allows 4..8-byte accesses implemented as
  4-byte ones, so an 8-byte guest write shows as two 4-byte lines.
* ``hw/vfio/trace-events``: ``vfio_pci_write_config " (%s, @0x%x, 0x%x, len=0x%x)"``,
  ``vfio_pci_read_config " (%s, @0x%x, len=0x%x) 0x%x"``, ``vfio_region_write
  " (%s:region%d+0x%"PRIx64", 0x%"PRIx64 ", %d)"``, ``vfio_region_read " (%s:region%d+0x%"PRIx64",
  %d) = 0x%"PRIx64`` (listed under ``common.c``, later ``region.c``; the strings did not change),
  ``vfio_pci_reset " (%s)"``. ``hw/vfio/pci.c`` traces ``vfio_pci_write_config`` first thing in
  the write handler and ``vfio_pci_read_config`` last thing in the read handler, so around a
  guest access the order is ``pci_cfg_write``, ``vfio_pci_write_config`` and
  ``vfio_pci_read_config``, ``pci_cfg_read``.
* ``scripts/tracetool/backend/log.py`` and ``util/log.c``: a line is ``name`` + ``" "`` + the
  format. With ``-msg timestamp=on`` older QEMU prefixes ``"%d@%zu.%06zu:"`` (thread id @
  seconds.microseconds, no space before the name); recent QEMU prefixes an ISO 8601 UTC time and
  a space (``g_date_time_format_iso8601``).

Width rule (config accesses; the trace does not print the length of a ``pci_cfg_*`` access):

1. the ``len`` of the paired vfio line (``vfio_pci_*_config`` with the same offset and value,
   right after a ``pci_cfg_write`` or right before a ``pci_cfg_read``);
2. else the ``size`` of the paired ``memory_region_ops_*`` line on a config-access region
   (``pci-conf-data``, ``pcie-mmcfg-mmio``, ``pcie-mmcfg``) whose address selects the same byte
   (``addr & 3`` for the data port, ``addr & 0xfff`` and the devfn for ECAM) and whose value is
   equal: right before a ``pci_cfg_write``, right after a ``pci_cfg_read``;
3. else inferred: 2 inside the ST table of a TPH capability (the entry width; Linux writes
   entries with 16-bit accesses), otherwise the natural alignment of the offset (4 if
   ``offset % 4 == 0``, 2 if ``offset % 2 == 0``, else 1). While the value does not fit, the
   width doubles up to the alignment limit; QEMU's memory core refuses unaligned config
   accesses, so a value that does not fit the alignment width is a malformed line.

"Paired" means the next (or previous) *known* trace event, from the same thread when the
timestamp prefix names it; unrelated lines in between do not break a pair. An inferred width may
be too large (a 16-bit write at a dword-aligned offset reads as a 32-bit one): enable the
``memory_region_ops_*`` events (or, for assigned devices, the vfio events) for exact widths. A
config space learned from reads takes only the bytes an inferred read certainly returned (up to
the most significant non-zero byte).

MSI-X attribution: a ``memory_region_ops_write`` (or ``_read``) named ``msix-table`` is given to
the device whose traced BAR mapping contains the absolute address; when the device's MSI-X
capability is known the BAR must be the table BIR and the address must fall inside the table,
which settles overlapping (stale) mappings; the ``mr`` pointer of an earlier attribution breaks
remaining ties. The access becomes ``MsixWrite(bar, offset=address - bar_base)``. Lines without
a region name (QEMU before 6.1) count only when they fall inside a known MSI-X table.

Device names: ``pci_cfg_*`` and ``pci_update_mappings_*`` give the guest address, read as
``0000:BB:DD.F``. vfio lines give the vfio device name (the host address for vfio-pci,
normalised when it parses as one, else kept verbatim). A paired pci/vfio config access teaches
that both names are one device. Accesses carry the vfio name when the caller bound that name
(``devices`` or ``overlays``), else the guest address. Unknown config bytes of a device learned
from reads are 0, which ends every capability walk: a capability is visible once the guest has
read its header.
"""

from __future__ import annotations

import gzip
import io
import re
import sys
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO, Final, NamedTuple

from .device import ConfigSpace, normalize_bdf
from .errors import DeviceError, TphtrapError, TraceError
from .events import Access, ConfigRead, ConfigWrite, MsixRead, MsixWrite, Reset
from .spec import PCI_CFG_SPACE_EXP_SIZE, PCI_TPH_BASE_SIZEOF, StLocation

__all__ = [
    "CONFIG_REGIONS",
    "MAX_LINE",
    "MSIX_TABLE_REGION",
    "MemoryRegionRead",
    "MemoryRegionWrite",
    "PciCfgRead",
    "PciCfgWrite",
    "PciMappingAdd",
    "PciMappingDel",
    "QemuEvent",
    "QemuRecord",
    "QemuTraceReader",
    "QemuTraceStats",
    "VfioConfigRead",
    "VfioConfigWrite",
    "VfioRegionRead",
    "VfioRegionWrite",
    "VfioReset",
    "open_trace",
    "parse_line",
]

CONFIG_REGIONS: Final = frozenset({"pci-conf-data", "pcie-mmcfg-mmio", "pcie-mmcfg"})
MSIX_TABLE_REGION: Final = "msix-table"
MAX_LINE: Final = 65536  # longer lines are cut here by open_trace
MAX_EVENT_LINE: Final = 4096  # a known event longer than this is malformed
MAX_KEPT_ERRORS: Final = 100
MAX_DEVICES: Final = 4096  # distinct device names kept; more come from a garbled trace
GROUP_WINDOW: Final = 64  # lines a config access waits for its other views, at most
VFIO_BAR_REGIONS: Final = 6  # BARs are 0-5 (PCI and vfio); 6 is the ROM (vfio: 7 config, 8 VGA)
# Lines whose (immutable) event the reader keeps, so that a line seen again is not parsed again
# (a guest repeats its accesses, and a trace without timestamps their lines); when full, the
# reader starts again with the lines that follow.
DECODED_LINES: Final = 4096


# --- events ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _PciCfg:
    device: str  # QEMU's device (type) name
    bus: int | None  # None: QEMU before 7.0 prints no bus number
    slot: int
    function: int
    offset: int
    value: int
    tid: int | None = None

    @property
    def bdf(self) -> str | None:
        if self.bus is None:
            return None
        return f"0000:{self.bus:02x}:{self.slot:02x}.{self.function}"


@dataclass(frozen=True, slots=True)
class PciCfgWrite(_PciCfg):
    """``pci_cfg_write``: a config write reached the device model (length not traced)."""


@dataclass(frozen=True, slots=True)
class PciCfgRead(_PciCfg):
    """``pci_cfg_read``: a config read and the value the device model returned."""


@dataclass(frozen=True, slots=True)
class _PciMapping:
    device: str | None  # None in the QEMU < 7.0 form, which prints a pointer
    bus: int
    slot: int
    function: int
    bar: int  # 0-5 BARs, 6 expansion ROM
    addr: int
    size: int
    tid: int | None = None

    @property
    def bdf(self) -> str:
        return f"0000:{self.bus:02x}:{self.slot:02x}.{self.function}"


@dataclass(frozen=True, slots=True)
class PciMappingAdd(_PciMapping):
    """``pci_update_mappings_add``: BAR ``bar`` now decodes ``[addr, addr + size)``."""


@dataclass(frozen=True, slots=True)
class PciMappingDel(_PciMapping):
    """``pci_update_mappings_del``: BAR ``bar`` no longer decodes ``[addr, addr + size)``."""


@dataclass(frozen=True, slots=True)
class _MemoryRegion:
    cpu: int  # -1: not from a vCPU
    mr: int  # the MemoryRegion pointer (0 for "(nil)")
    addr: int  # absolute address (see the module docstring)
    value: int
    size: int
    name: str | None  # None: QEMU before 6.1 prints no region name
    tid: int | None = None


@dataclass(frozen=True, slots=True)
class MemoryRegionWrite(_MemoryRegion):
    """``memory_region_ops_write``."""


@dataclass(frozen=True, slots=True)
class MemoryRegionRead(_MemoryRegion):
    """``memory_region_ops_read``."""


@dataclass(frozen=True, slots=True)
class _VfioConfig:
    name: str  # vfio device name: the host address for vfio-pci
    offset: int
    value: int
    length: int
    tid: int | None = None


@dataclass(frozen=True, slots=True)
class VfioConfigWrite(_VfioConfig):
    """``vfio_pci_write_config``."""


@dataclass(frozen=True, slots=True)
class VfioConfigRead(_VfioConfig):
    """``vfio_pci_read_config``."""


@dataclass(frozen=True, slots=True)
class _VfioRegion:
    name: str
    region: int  # 0-5: BARs
    offset: int
    value: int
    size: int
    tid: int | None = None


@dataclass(frozen=True, slots=True)
class VfioRegionWrite(_VfioRegion):
    """``vfio_region_write``: a BAR (region) write QEMU forwarded to the assigned device."""


@dataclass(frozen=True, slots=True)
class VfioRegionRead(_VfioRegion):
    """``vfio_region_read``."""


@dataclass(frozen=True, slots=True)
class VfioReset:
    """``vfio_pci_reset``: QEMU resets the assigned device."""

    name: str
    tid: int | None = None


QemuEvent = (
    PciCfgWrite
    | PciCfgRead
    | PciMappingAdd
    | PciMappingDel
    | MemoryRegionWrite
    | MemoryRegionRead
    | VfioConfigWrite
    | VfioConfigRead
    | VfioRegionWrite
    | VfioRegionRead
    | VfioReset
)


# --- line parser ----------------------------------------------------------------------------
class _Malformed(Exception):
    """A line names a known event but does not match its format (no position yet)."""


_X8 = r"([0-9a-fA-F]{1,8})"
_X16 = r"([0-9a-fA-F]{1,16})"
_ADDR = (
    r"(?:([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])"  # QEMU >= 7.0: bus:slot.fn (hex)
    r"|(\d{1,2}):([0-7]))"  # QEMU < 7.0: slot:fn, slot in decimal, no bus
)
_RE_CFG_W = re.compile(rf"(\S+) {_ADDR} @0x{_X8} <- 0x{_X8}\s*")
_RE_CFG_R = re.compile(rf"(\S+) {_ADDR} @0x{_X8} -> 0x{_X8}\s*")
_RE_MAP = re.compile(
    rf"(\S+) ([0-9a-fA-F]{{1,2}}):([0-9a-fA-F]{{1,2}})\.([0-7]) (\d{{1,2}}),0x{_X16}\+0x{_X16}\s*"
)
_RE_MR = re.compile(
    rf"cpu (-?\d{{1,6}}) mr (0x[0-9a-fA-F]{{1,16}}|\(nil\)) addr 0x{_X16} value 0x{_X16} "
    r"size (\d{1,2})(?: name '(.*)')?\s*"
)
_RE_VFIO_CFG_W = re.compile(rf"\s*\((.+), @0x{_X8}, 0x{_X8}, len=0x([0-9a-fA-F]{{1,2}})\)\s*")
_RE_VFIO_CFG_R = re.compile(rf"\s*\((.+), @0x{_X8}, len=0x([0-9a-fA-F]{{1,2}})\) 0x{_X8}\s*")
_RE_VFIO_REG_W = re.compile(rf"\s*\((.+):region(\d{{1,3}})\+0x{_X16}, 0x{_X16}, (\d{{1,2}})\)\s*")
_RE_VFIO_REG_R = re.compile(rf"\s*\((.+):region(\d{{1,3}})\+0x{_X16}, (\d{{1,2}})\) = 0x{_X16}\s*")
_RE_VFIO_RESET = re.compile(r"\s*\((.+)\)\s*")
_PFX_TID = re.compile(r"(\d{1,10})@\d{1,20}\.\d{1,9}:")
_PFX_ISO = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d(?::?\d\d)?)? "
)

_FORMATS: Final = {
    "pci_cfg_write": '"%s %02x:%02x.%x @0x%x <- 0x%x"',
    "pci_cfg_read": '"%s %02x:%02x.%x @0x%x -> 0x%x"',
    "pci_update_mappings_add": '"%s %02x:%02x.%x %d,0x%lx+0x%lx"',
    "pci_update_mappings_del": '"%s %02x:%02x.%x %d,0x%lx+0x%lx"',
    "memory_region_ops_write": "\"cpu %d mr %p addr 0x%lx value 0x%lx size %u name '%s'\"",
    "memory_region_ops_read": "\"cpu %d mr %p addr 0x%lx value 0x%lx size %u name '%s'\"",
    "vfio_pci_write_config": '" (%s, @0x%x, 0x%x, len=0x%x)"',
    "vfio_pci_read_config": '" (%s, @0x%x, len=0x%x) 0x%x"',
    "vfio_region_write": '" (%s:region%d+0x%lx, 0x%lx, %d)"',
    "vfio_region_read": '" (%s:region%d+0x%lx, %d) = 0x%lx"',
    "vfio_pci_reset": '" (%s)"',
}


def _bad(event: str, why: str = "") -> _Malformed:
    text = f"{event} does not match QEMU's format {_FORMATS[event]}"
    return _Malformed(f"{text}: {why}" if why else f"{text} (truncated or edited line?)")


def _cfg_fields(m: re.Match[str], event: str) -> tuple[str, int | None, int, int, int, int]:
    dev, bus_s, slot_s, fn_s, oslot_s, ofn_s, off_s, val_s = m.groups()
    if bus_s is not None:
        bus: int | None = int(bus_s, 16)
        slot, fn = int(slot_s, 16), int(fn_s)
    else:
        bus, slot, fn = None, int(oslot_s), int(ofn_s)
    if slot > 0x1F:
        raise _bad(event, f"slot {slot:#x} is out of range (0-0x1f)")
    off = int(off_s, 16)
    if off >= PCI_CFG_SPACE_EXP_SIZE:
        raise _bad(event, f"offset {off:#x} is past the 4 KiB config space")
    return dev, bus, slot, fn, off, int(val_s, 16)


def _p_cfg_w(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_CFG_W.fullmatch(line, pos)
    if m is None:
        raise _bad("pci_cfg_write")
    return PciCfgWrite(*_cfg_fields(m, "pci_cfg_write"), tid)


def _p_cfg_r(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_CFG_R.fullmatch(line, pos)
    if m is None:
        raise _bad("pci_cfg_read")
    return PciCfgRead(*_cfg_fields(m, "pci_cfg_read"), tid)


def _map_fields(line: str, pos: int, event: str) -> tuple[str | None, int, int, int, int, int, int]:
    m = _RE_MAP.fullmatch(line, pos)
    if m is None:
        raise _bad(event)
    dev, bus_s, slot_s, fn_s, bar_s, addr_s, size_s = m.groups()
    slot, bar = int(slot_s, 16), int(bar_s)
    if slot > 0x1F:
        raise _bad(event, f"slot {slot:#x} is out of range (0-0x1f)")
    if bar > 6:
        raise _bad(event, f"region {bar} is not a BAR (0-5) or the ROM (6)")
    size = int(size_s, 16)
    if size == 0:
        raise _bad(event, "BAR size 0")
    device = None if dev.startswith("d=") else dev
    return device, int(bus_s, 16), slot, int(fn_s), bar, int(addr_s, 16), size


def _p_map_add(line: str, pos: int, tid: int | None) -> QemuEvent:
    return PciMappingAdd(*_map_fields(line, pos, "pci_update_mappings_add"), tid)


def _p_map_del(line: str, pos: int, tid: int | None) -> QemuEvent:
    return PciMappingDel(*_map_fields(line, pos, "pci_update_mappings_del"), tid)


def _mr_fields(line: str, pos: int, event: str) -> tuple[int, int, int, int, int, str | None]:
    m = _RE_MR.fullmatch(line, pos)
    if m is None:
        raise _bad(event)
    cpu_s, mr_s, addr_s, val_s, size_s, name = m.groups()
    size = int(size_s)
    if size not in (1, 2, 4, 8):
        raise _bad(event, f"access size {size} is not 1, 2, 4 or 8")
    value = int(val_s, 16)
    if value >> (8 * size):
        raise _bad(event, f"value 0x{val_s} does not fit {size} bytes")
    mr = 0 if mr_s == "(nil)" else int(mr_s, 16)
    return int(cpu_s), mr, int(addr_s, 16), value, size, name


def _p_mr_w(line: str, pos: int, tid: int | None) -> QemuEvent:
    return MemoryRegionWrite(*_mr_fields(line, pos, "memory_region_ops_write"), tid)


def _p_mr_r(line: str, pos: int, tid: int | None) -> QemuEvent:
    return MemoryRegionRead(*_mr_fields(line, pos, "memory_region_ops_read"), tid)


def _check_len(event: str, off: int, length: int) -> None:
    if length not in (1, 2, 4):
        raise _bad(event, f"length {length} is not 1, 2 or 4")
    if off + length > PCI_CFG_SPACE_EXP_SIZE:
        raise _bad(event, f"offset {off:#x} + length {length} is past the 4 KiB config space")


def _p_vfio_cfg_w(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_VFIO_CFG_W.fullmatch(line, pos)
    if m is None:
        raise _bad("vfio_pci_write_config")
    name, off_s, val_s, len_s = m.groups()
    off, length = int(off_s, 16), int(len_s, 16)
    _check_len("vfio_pci_write_config", off, length)
    return VfioConfigWrite(name, off, int(val_s, 16), length, tid)


def _p_vfio_cfg_r(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_VFIO_CFG_R.fullmatch(line, pos)
    if m is None:
        raise _bad("vfio_pci_read_config")
    name, off_s, len_s, val_s = m.groups()
    off, length = int(off_s, 16), int(len_s, 16)
    _check_len("vfio_pci_read_config", off, length)
    return VfioConfigRead(name, off, int(val_s, 16), length, tid)


def _region_fields(
    event: str, name: str, region_s: str, off_s: str, val_s: str, size_s: str
) -> tuple[str, int, int, int, int]:
    size = int(size_s)
    if size not in (1, 2, 4, 8):
        raise _bad(event, f"access size {size} is not 1, 2, 4 or 8")
    value = int(val_s, 16)
    if value >> (8 * size):
        raise _bad(event, f"value 0x{val_s} does not fit {size} bytes")
    return name, int(region_s), int(off_s, 16), value, size


def _p_vfio_reg_w(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_VFIO_REG_W.fullmatch(line, pos)
    if m is None:
        raise _bad("vfio_region_write")
    name, region_s, off_s, val_s, size_s = m.groups()
    return VfioRegionWrite(
        *_region_fields("vfio_region_write", name, region_s, off_s, val_s, size_s), tid
    )


def _p_vfio_reg_r(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_VFIO_REG_R.fullmatch(line, pos)
    if m is None:
        raise _bad("vfio_region_read")
    name, region_s, off_s, size_s, val_s = m.groups()
    return VfioRegionRead(
        *_region_fields("vfio_region_read", name, region_s, off_s, val_s, size_s), tid
    )


def _p_vfio_reset(line: str, pos: int, tid: int | None) -> QemuEvent:
    m = _RE_VFIO_RESET.fullmatch(line, pos)
    if m is None:
        raise _bad("vfio_pci_reset")
    return VfioReset(m.group(1), tid)


_PARSERS: Final[dict[str, Callable[[str, int, int | None], QemuEvent]]] = {
    "pci_cfg_write": _p_cfg_w,
    "pci_cfg_read": _p_cfg_r,
    "pci_update_mappings_add": _p_map_add,
    "pci_update_mappings_del": _p_map_del,
    "memory_region_ops_write": _p_mr_w,
    "memory_region_ops_read": _p_mr_r,
    "vfio_pci_write_config": _p_vfio_cfg_w,
    "vfio_pci_read_config": _p_vfio_cfg_r,
    "vfio_region_write": _p_vfio_reg_w,
    "vfio_region_read": _p_vfio_reg_r,
    "vfio_pci_reset": _p_vfio_reset,
}


class _OtherRegion:
    """Marker: a ``memory_region_ops_*`` line on a region that matters to no one here."""


_OTHER_REGION: Final = _OtherRegion()
_MR_EVENTS: Final = frozenset({"memory_region_ops_write", "memory_region_ops_read"})
_KEPT_REGIONS: Final = CONFIG_REGIONS | {MSIX_TABLE_REGION}


def _decode(line: str, skip_regions: bool = False) -> QemuEvent | _OtherRegion | None:
    """The event on ``line``, None for unrelated lines; raises :class:`_Malformed`.

    With ``skip_regions``, ``memory_region_ops_*`` lines naming a region that is neither a
    config-access region nor ``msix-table`` give :data:`_OTHER_REGION` without a full parse.
    """
    tid: int | None = None
    start = 0
    if line[:1].isdigit():
        m = _PFX_TID.match(line)
        if m is not None:
            tid = int(m.group(1))
            start = m.end()
        else:
            m = _PFX_ISO.match(line)
            if m is None:
                return None
            start = m.end()
    sp = line.find(" ", start)
    if sp < 0:
        name = line[start:].rstrip()
        if name in _PARSERS:
            raise _Malformed(f"{name} has no arguments (truncated line?)")
        return None
    event = line[start:sp]
    parser = _PARSERS.get(event)
    if parser is None:
        return None
    if len(line) > MAX_EVENT_LINE:
        raise _Malformed(f"{event} line is {len(line)} characters long (garbled?)")
    if skip_regions and event in _MR_EVENTS:
        at = line.rfind(" name '")
        if at > sp:
            close = line.rfind("'")
            if close > at + 6 and line[at + 7 : close] not in _KEPT_REGIONS:
                return _OTHER_REGION
    return parser(line, sp + 1, tid)


def parse_line(line: str, where: str = "<trace>") -> QemuEvent | None:
    """One trace line -> its event, or None when the line is not one of ours.

    Accepts both timestamp prefixes and the older and newer spellings listed in the module
    docstring. A line naming a known event that does not match its format raises
    :class:`TraceError` at ``where``.
    """
    try:
        ev = _decode(line)
    except _Malformed as exc:
        raise TraceError(where, str(exc)) from None
    assert not isinstance(ev, _OtherRegion)
    return ev


# --- opening traces -------------------------------------------------------------------------
def open_trace(path: str | Path) -> Iterator[str]:
    """The lines of a plain or gzip trace (``-``: standard input), read in constant memory.

    Lines split at ``\\n`` only (so line numbers match ``grep -n``), decode as UTF-8 with
    replacement characters, and longer than :data:`MAX_LINE` are cut there. I/O and gzip errors
    raise :class:`TraceError`.
    """
    name = str(path)
    raw: IO[bytes]
    try:
        if name == "-":
            raw = sys.stdin.buffer
            magic = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
        else:
            raw = open(path, "rb")  # noqa: SIM115 - closed in _lines
            magic = raw.read(2)
            raw.seek(0)
    except OSError as exc:
        raise TraceError(name, f"cannot read: {exc.strerror or exc}") from None
    binary: IO[bytes] = raw
    if magic == b"\x1f\x8b":
        binary = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    text = io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline="\n")
    return _lines(text, raw if name != "-" else None, name)


_CHUNK: Final = 1 << 16  # characters read at a time


def _lines(text: io.TextIOWrapper, closing: IO[bytes] | None, name: str) -> Iterator[str]:
    # Reads in chunks and splits them (one readline() call per line costs more than the rest
    # of this loop); memory stays within a chunk plus MAX_LINE.
    lineno = 0
    pending = ""  # the start of the next line: fewer than MAX_LINE characters
    skipping = False  # inside the rest of an overlong line
    try:
        while True:
            try:
                chunk = text.read(_CHUNK)
            except (OSError, EOFError, zlib.error) as exc:
                raise TraceError(f"{name}:{lineno + 1}", f"cannot read: {exc}") from None
            if not chunk:
                break
            if skipping:
                nl = chunk.find("\n")
                if nl < 0:
                    continue
                chunk = chunk[nl + 1 :]
                skipping = False
            parts = (pending + chunk).split("\n") if pending else chunk.split("\n")
            pending = parts.pop()
            for line in parts:
                lineno += 1
                if len(line) < MAX_LINE:
                    yield line + "\n"
                else:
                    yield line[:MAX_LINE]  # cut, without its newline
            if len(pending) >= MAX_LINE:
                lineno += 1
                yield pending[:MAX_LINE]
                pending = ""
                skipping = True
        if pending:
            yield pending
    finally:
        if closing is None:
            text.detach()  # standard input stays open
        else:
            text.close()
            closing.close()


# --- the attributor -------------------------------------------------------------------------
class QemuRecord(NamedTuple):
    """One relevant trace line: its access for the engine (None when it carries none) and why.

    ``bucket`` is empty for an access to judge; otherwise it says where the line ends:
    ``unbound`` (an access of a device with no VM: ``access.vm`` is empty), ``unattributed``
    (an access no device can be named for), ``malformed`` or ``skipped`` (a line that carries
    no access by nature: a BAR mapping, another view of an access). ``reason`` is the same for
    every line of one kind (one of the ``REASON_*`` texts, or the event of a malformed line);
    ``note`` is the line's own detail.
    """

    lineno: int
    access: Access | None
    note: str
    bucket: str
    reason: str


_record: Final[Callable[[tuple[int, Access | None, str, str, str]], QemuRecord]] = QemuRecord._make

# Why a line was not judged (the same text for every line of one kind, so they can be counted).
REASON_NO_VM: Final = "no VM for the device"
REASON_NO_MAPPING: Final = "MSI-X write no traced BAR mapping explains"
REASON_AMBIGUOUS: Final = "MSI-X access on an address several devices map"
REASON_LONE_HINT: Final = "config access-size line without its pci_cfg line"
REASON_NO_DEVICE: Final = "config access of an address with no device (QEMU traced no pci_cfg line)"
REASON_TOO_MANY: Final = f"more than {MAX_DEVICES} devices"
REASON_MAPPING: Final = "BAR mapping event (context)"
REASON_VIEW: Final = "another line of an access counted once"
REASON_NOT_BAR: Final = "vfio region that is not a BAR"
REASON_UNRELATED: Final = "not one of the events read"
REASON_OTHER_REGION: Final = "memory region not involved in config or MSI-X"
WIDTH_INFERRED: Final = "width inferred from the offset"  # the note of such an access starts so


@dataclass
class QemuTraceStats:
    lines: int = 0
    records: int = 0
    accesses: int = 0
    skipped: int = 0  # unrelated lines and events (including blank lines)
    other_regions: int = 0  # memory_region_ops_* on regions that matter to no one here
    malformed: int = 0
    unattributed: int = 0  # relevant lines that could not become an access
    unbound: int = 0  # accesses of devices with no VM


class _Dev:
    """One device of the trace under its guest address and/or its vfio name."""

    __slots__ = (
        "bars",
        "cfg",
        "cfg_err",
        "cfg_gen",
        "gen",
        "guest",
        "image",
        "key",
        "known",
        "mismatch",
        "msix_gen",
        "msix_span",
        "tph_table",
        "tph_table_gen",
        "vfio",
        "vm",
        "vm_done",
    )

    def __init__(self, guest: str | None, vfio: str | None) -> None:
        self.guest = guest
        self.vfio = vfio
        self.bars: dict[int, tuple[int, int]] = {}
        self.image: bytearray | None = None
        self.known: bytearray | None = None
        self.gen = 0
        self.cfg: ConfigSpace | None = None
        self.cfg_gen = -1
        self.cfg_err: str | None = None
        self.tph_table: tuple[int, int] | None = None
        self.tph_table_gen = -1
        self.msix_span: tuple[int, int, int] | None = None  # (BIR, start, end) in the BAR
        self.msix_gen = -1
        self.key: str | None = None
        self.vm: str | None = None
        self.vm_done = False
        self.mismatch: str | None = None  # a bound dump that is not the device the guest read

    def forget(self) -> None:
        self.cfg_gen = -1
        self.tph_table_gen = -1
        self.msix_gen = -1
        self.key = None
        self.vm_done = False


class _Overflow(Exception):
    """More distinct devices than :data:`MAX_DEVICES`."""


class _Group:
    """A config access seen from up to three lines (width hint, pci_cfg_*, vfio_pci_*)."""

    __slots__ = (
        "cfg",
        "cfg_line",
        "first",
        "hint",
        "hint_line",
        "tid",
        "vfio",
        "vfio_line",
        "write",
    )

    def __init__(self, write: bool, tid: int | None, first: int) -> None:
        self.write = write
        self.tid = tid
        self.first = first
        self.hint: MemoryRegionWrite | MemoryRegionRead | None = None
        self.hint_line = 0
        self.cfg: PciCfgWrite | PciCfgRead | None = None
        self.cfg_line = 0
        self.vfio: VfioConfigWrite | VfioConfigRead | None = None
        self.vfio_line = 0


_LINENO = itemgetter(0)


def _norm(name: str) -> str:
    try:
        return normalize_bdf(name)
    except ValueError:
        return name.strip()


_ID_END: Final = 4  # vendor and device ID
_LEARNED: Final = 1  # a byte of a learned config space the trace showed
_LEARNED_BYTE: Final = bytes([_LEARNED])
_SEEN: Final = 2  # a byte an inferred-width read covered above its top non-zero byte (0)
_EXT_START: Final = 0x100
_PCI_CAP_ID_EXP: Final = 0x10
_PCI_CAP_ID_MSIX: Final = 0x11
_EXT_CAP_ID_TPH: Final = 0x17
_MAX_CAPS: Final = 1024 // 4  # more links than this is a loop


def _ids(data: bytes | bytearray) -> str:
    return f"{int.from_bytes(data[0:2], 'little'):04x}:{int.from_bytes(data[2:4], 'little'):04x}"


class _CapWalk:
    """Walks the capability lists of a learned config space, byte by byte as far as it is
    known (``known`` non-zero). Offsets follow the PCI and PCIe list formats."""

    def __init__(self, image: bytearray, known: bytearray) -> None:
        self.image = image
        self.known = known

    def has(self, off: int, n: int) -> bool:
        return off + n <= len(self.known) and all(self.known[off : off + n])

    def standard(self) -> dict[int, int] | None:
        """Capability ID -> offset (first of each), or None where the list is not all known."""
        img = self.image
        if not self.has(0x06, 1):
            return None
        if not img[0x06] & 0x10:  # Status: Capabilities List
            return {}
        if not self.has(0x34, 1):
            return None
        found: dict[int, int] = {}
        pos = img[0x34] & 0xFC
        for _ in range(_MAX_CAPS):
            if pos == 0:
                return found
            if pos < 0x40 or not self.has(pos, 2):
                return None
            found.setdefault(img[pos], pos)
            pos = img[pos + 1] & 0xFC
        return None

    def extended(self) -> tuple[dict[int, int], frozenset[int], str | None]:
        """(extended capability ID -> offset, the header offsets read, why the list is not
        all known or None)."""
        img = self.image
        found: dict[int, int] = {}
        pos = _EXT_START
        walked: set[int] = set()
        for _ in range(_MAX_CAPS):
            if not self.has(pos, 4):
                where = "offset 0x100" if pos == _EXT_START else f"the header at {pos:#x}"
                why = f"extended capability list: the guest never read {where}"
                return found, frozenset(walked), why
            walked.add(pos)
            header = int.from_bytes(img[pos : pos + 4], "little")
            if header in (0, 0xFFFFFFFF):
                break
            found.setdefault(header & 0xFFFF, pos)
            pos = (header >> 20) & 0xFFC
            if pos < _EXT_START or pos in walked:
                break  # the end (0), or a broken list: ConfigSpace ends its walk there too
        return found, frozenset(walked), None


def _alignment(offset: int) -> int:
    return 4 if offset % 4 == 0 else 2 if offset % 2 == 0 else 1


def _hint_matches(
    hint: MemoryRegionWrite | MemoryRegionRead, cfg: PciCfgWrite | PciCfgRead
) -> bool:
    if hint.value != cfg.value or hint.size not in (1, 2, 4):
        return False
    if hint.name == "pci-conf-data":
        return (hint.addr & 3) == (cfg.offset & 3)
    return (hint.addr & 0xFFF) == cfg.offset and ((hint.addr >> 12) & 0xFF) == (
        cfg.slot << 3 | cfg.function
    )


class QemuTraceReader:
    """Streams a QEMU trace as :class:`QemuRecord` items, one per relevant line, in line order.

    ``devices`` binds device names (guest addresses or vfio names) to config spaces; a device
    without one is learned from the trace's reads. ``overlays`` grafts the TPH capability of a
    config space onto a device (learned or bound) to ask "what if it had TPH". ``vm_of`` names
    the VM of a device (None: not replayed). A malformed line gives a record without access
    whose note is the :class:`TraceError` text, ``f"{name}:{lineno}: reason"`` (no other note
    starts that way), or, with ``strict``, that error is raised once the records of the lines
    before it are out. Iterate once;
    :attr:`stats` and :attr:`errors` are complete when the iteration ends. Memory stays bounded
    by the number of devices, whatever the trace length.
    """

    def __init__(
        self,
        lines: Iterable[str],
        *,
        name: str,
        devices: Mapping[str, ConfigSpace],
        vm_of: Callable[[str], str | None],
        overlays: Mapping[str, ConfigSpace] | None = None,
        strict: bool = False,
    ) -> None:
        self._lines = lines
        self.name = name
        self._devices = {_norm(k): v for k, v in devices.items()}
        self._overlays = {_norm(k): v for k, v in (overlays or {}).items()}
        for key, ov in self._overlays.items():
            if ov.tph is None:
                raise DeviceError(ov.source, f"overlay for {key} has no TPH capability")
        self._bound = frozenset(self._devices) | frozenset(self._overlays)
        self._vm_of = vm_of
        self.strict = strict
        self.stats = QemuTraceStats()
        self._errors: list[tuple[int, TraceError]] = []
        self._fatal: TraceError | None = None  # strict: the first malformed line
        self._fatal_line = 0
        self._by_guest: dict[str, _Dev] = {}
        self._by_vfio: dict[str, _Dev] = {}
        self._windows: list[tuple[int, int, _Dev, int]] = []  # (base, end, device, bar)
        self._mr_owner: dict[int, _Dev] = {}
        self._old_bus: dict[tuple[int, int], str] = {}
        self._groups: dict[int | None, _Group] = {}  # pending config access, per thread
        self._cfg_traced = {True: False, False: False}  # pci_cfg_write / _read seen so far
        self._out: list[QemuRecord] = []
        self._started = False
        self._ndevs = 0
        self._names: dict[str, str] = {}
        self._handlers: dict[type, Callable[[int, QemuEvent], None]] = {
            PciCfgWrite: self._on_cfg_write,
            PciCfgRead: self._on_cfg_read,
            PciMappingAdd: self._on_mapping,
            PciMappingDel: self._on_mapping,
            MemoryRegionWrite: self._on_mr,
            MemoryRegionRead: self._on_mr,
            VfioConfigWrite: self._on_vfio_cfg_write,
            VfioConfigRead: self._on_vfio_cfg_read,
            VfioRegionWrite: self._on_vfio_region,
            VfioRegionRead: self._on_vfio_region,
            VfioReset: self._on_vfio_reset,
        }

    # --- public views ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[QemuRecord]:
        if self._started:
            raise RuntimeError("a QemuTraceReader can be iterated only once")
        self._started = True
        return self._run()

    def device_names(self) -> list[str]:
        """The names accesses were (or will be) reported under, in first-seen order."""
        seen: dict[str, None] = {}
        for dev in [*self._by_guest.values(), *self._by_vfio.values()]:
            seen.setdefault(self._key(dev), None)
        return list(seen)

    def device_config(self, name: str) -> ConfigSpace | None:
        """The config space of a device now: bound, or learned so far, with any TPH overlay."""
        dev = self._find(name)
        if dev is None:
            key = _norm(name)
            cfg = self._devices.get(key)
            overlay = self._overlays.get(key)
            if cfg is not None and overlay is not None:
                cfg = cfg.with_tph_overlay(overlay)
            return cfg
        return self._config(dev)

    def config_generation(self, name: str) -> int:
        """Bumped whenever a learned byte of the device changes (0: nothing learned)."""
        dev = self._find(name)
        return 0 if dev is None else dev.gen

    def not_judgeable(self, name: str) -> tuple[str | None, str | None]:
        """Why the device's accesses cannot be judged: (all of them, those in extended config
        space and the MSI-X table); None where nothing is missing. The first is an identity
        mismatch between a bound dump and what the guest read, the second a learned device
        whose extended capabilities (or the TPH registers on them) the guest never read."""
        dev = self._find(name)
        if dev is None:
            return None, None
        return dev.mismatch, self._unseen(dev)

    def ext_headers(self, name: str) -> frozenset[int]:
        """Offsets of the extended capability headers read so far (a learned device)."""
        dev = self._find(name)
        if dev is None or dev.image is None or dev.known is None:
            return frozenset()
        return _CapWalk(dev.image, dev.known).extended()[1]

    def knows(self, name: str) -> bool:
        """Whether the trace named this device (by guest address or vfio name) so far."""
        return self._find(name) is not None

    def overlaid(self, name: str) -> str | None:
        """The overlay name that applies to the device, if any."""
        dev = self._find(name)
        names = (name,) if dev is None else (dev.vfio, dev.guest)
        for n in names:
            if n is not None and _norm(n) in self._overlays:
                return _norm(n)
        return None

    def config_error(self, name: str) -> str | None:
        """Why the device's learned config space could not be built, if it could not."""
        dev = self._find(name)
        return None if dev is None else dev.cfg_err

    # --- main loop -------------------------------------------------------------------------
    def _run(self) -> Iterator[QemuRecord]:
        stats = self.stats
        out = self._out
        groups = self._groups
        handlers = self._handlers
        decode = _decode
        decoded: dict[str, QemuEvent | _OtherRegion] = {}  # only events, in fact
        remembered = decoded.get
        lineno = 0
        try:
            for lineno, line in enumerate(self._lines, 1):
                try:
                    ev = remembered(line)
                    if ev is None:
                        ev = decode(line, True)
                        if ev is None:
                            stats.skipped += 1
                            continue
                        if type(ev) in handlers:
                            if len(decoded) == DECODED_LINES:
                                decoded.clear()  # keep the recent ones
                            decoded[line] = ev
                    if isinstance(ev, _OtherRegion):
                        stats.other_regions += 1
                        continue
                    tid = ev.tid
                    group = groups.get(tid)
                    if group is None or not self._extend(group, lineno, ev):
                        if group is not None:
                            self._flush(tid)
                        handlers[type(ev)](lineno, ev)
                except _Malformed as exc:
                    self._malformed(lineno, str(exc))
                except _Overflow:
                    self._unattributed(
                        lineno, REASON_TOO_MANY, f"more than {MAX_DEVICES} devices: not followed"
                    )
                if self._fatal is not None:
                    break
                if out:
                    if not groups and len(out) == 1:
                        stats.records += 1
                        yield out.pop()
                        continue
                    ready = self._drain(lineno)
                    if ready:
                        stats.records += len(ready)
                        yield from ready
            for tid in list(groups):
                try:
                    self._flush(tid)
                except _Overflow:
                    self._unattributed(
                        lineno, REASON_TOO_MANY, f"more than {MAX_DEVICES} devices: not followed"
                    )
            ready = self._drain(lineno)
            fatal = self._fatal
            if fatal is not None:  # strict: what came before the first malformed line, then it
                ready = [r for r in ready if r.lineno < self._fatal_line]
            stats.records += len(ready)
            yield from ready
            if fatal is not None:
                raise fatal
        finally:
            stats.lines = lineno

    def _drain(self, lineno: int) -> list[QemuRecord]:
        """The records that can go out now, in line order: none past a pending access."""
        out = self._out
        groups = self._groups
        if groups:
            for tid, g in list(groups.items()):
                if g.first < lineno - GROUP_WINDOW:
                    try:
                        self._flush(tid)
                    except _Overflow:
                        self._unattributed(
                            g.first,
                            REASON_TOO_MANY,
                            f"more than {MAX_DEVICES} devices: not followed",
                        )
        if len(out) > 1:
            out.sort(key=_LINENO)
        if groups:
            limit = min(g.first for g in groups.values())
            k = bisect_left(out, limit, key=_LINENO)
            ready = out[:k]
            del out[:k]
            return ready
        ready = out[:]
        out.clear()
        return ready

    def _emit(self, lineno: int, access: Access, note: str) -> None:
        self.stats.accesses += 1
        self._out.append(_record((lineno, access, note, "", "")))

    def _unbound(self, lineno: int, access: Access, note: str) -> None:
        """An access of a device that has no VM (``access.vm`` is empty)."""
        self.stats.unbound += 1
        text = f"device {access.bdf} is not bound to a VM" + (f"; {note}" if note else "")
        self._out.append(_record((lineno, access, text, "unbound", REASON_NO_VM)))

    def _unattributed(self, lineno: int, reason: str, note: str) -> None:
        self.stats.unattributed += 1
        self._out.append(_record((lineno, None, note, "unattributed", reason)))

    def _info(self, lineno: int, reason: str, note: str) -> None:
        """A relevant line that carries no access by nature (a mapping, a merged view)."""
        self._out.append(_record((lineno, None, note, "skipped", reason)))

    @property
    def errors(self) -> list[TraceError]:
        """The first :data:`MAX_KEPT_ERRORS` malformed lines found, in line order."""
        return [err for _, err in sorted(self._errors, key=_LINENO)]

    def _malformed(self, lineno: int, message: str) -> None:
        err = TraceError(f"{self.name}:{lineno}", message)
        if self.strict:
            if self._fatal is None or lineno < self._fatal_line:
                self._fatal, self._fatal_line = err, lineno
            return
        self.stats.malformed += 1
        if len(self._errors) < MAX_KEPT_ERRORS:
            self._errors.append((lineno, err))
        self._out.append(_record((lineno, None, str(err), "malformed", message.split(" ", 1)[0])))

    # --- devices ---------------------------------------------------------------------------
    def _find(self, name: str) -> _Dev | None:
        dev = self._by_guest.get(name) or self._by_vfio.get(name)
        if dev is not None:
            return dev
        key = _norm(name)
        dev = self._by_guest.get(key) or self._by_vfio.get(key)
        if dev is not None:
            return dev
        for dev in [*self._by_guest.values(), *self._by_vfio.values()]:
            if self._key(dev) == key:
                return dev
        return None

    def _key(self, dev: _Dev) -> str:
        key = dev.key
        if key is None:
            if dev.vfio is not None and (dev.vfio in self._bound or dev.guest is None):
                key = dev.vfio
            else:
                assert dev.guest is not None
                key = dev.guest
            dev.key = key
        return key

    def _vm(self, dev: _Dev) -> str | None:
        if not dev.vm_done:
            key = self._key(dev)
            vm = self._vm_of(key)
            if vm is None:
                other = dev.guest if key == dev.vfio else dev.vfio
                if other is not None:
                    vm = self._vm_of(other)
            dev.vm = vm
            dev.vm_done = True
        return dev.vm

    def _new_dev(self, guest: str | None, vfio: str | None) -> _Dev:
        if self._ndevs >= MAX_DEVICES:
            raise _Overflow
        self._ndevs += 1
        if guest is not None:
            self._old_bus.clear()
        return _Dev(guest, vfio)

    def _is_bound(self, dev: _Dev) -> bool:
        return (dev.vfio is not None and dev.vfio in self._devices) or (
            dev.guest is not None and dev.guest in self._devices
        )

    def _guest_dev(self, bdf: str) -> _Dev:
        dev = self._by_guest.get(bdf)
        if dev is None:
            dev = self._by_guest[bdf] = self._new_dev(bdf, None)
        return dev

    def _vfio_key(self, name: str) -> str:
        key = self._names.get(name)
        if key is None:
            key = _norm(name)
            if len(self._names) < MAX_DEVICES:
                self._names[name] = key
        return key

    def _vfio_dev(self, name: str) -> _Dev:
        key = self._vfio_key(name)
        dev = self._by_vfio.get(key)
        if dev is None:
            dev = self._by_vfio[key] = self._new_dev(None, key)
        return dev

    def _pair(self, bdf: str, vfio_name: str) -> _Dev:
        key = self._vfio_key(vfio_name)
        g = self._by_guest.get(bdf)
        v = self._by_vfio.get(key)
        if g is not None and g is v:
            return g
        if g is None and v is None:
            g = self._new_dev(bdf, key)
        elif g is None:
            assert v is not None
            g = v
            if g.guest is not None:
                self._by_guest.pop(g.guest, None)
            g.guest = bdf
            self._old_bus.clear()
        else:
            if g.vfio is not None:
                self._by_vfio.pop(g.vfio, None)
            g.vfio = key
            if v is not None and v.image is not None and v.known is not None:
                for off in range(PCI_CFG_SPACE_EXP_SIZE):
                    if v.known[off] and not (g.known is not None and g.known[off]):
                        self._learn(g, off, 1, v.image[off], exact=True)
        self._by_guest[bdf] = g
        self._by_vfio[key] = g
        g.forget()
        return g

    def _guest_bdf(self, cfg: PciCfgWrite | PciCfgRead) -> tuple[str, str]:
        """(guest address, note) for a pci_cfg_* event; resolves the missing bus of QEMU < 7.0."""
        bdf = cfg.bdf
        if bdf is not None:
            return bdf, ""
        pair = (cfg.slot, cfg.function)
        cached = self._old_bus.get(pair)
        if cached is None:
            tail = f"{cfg.slot:02x}.{cfg.function}"
            known = {k for k in self._by_guest if k.endswith(tail)}
            known |= {k for k in self._bound if len(k) == 12 and k.endswith(tail)}
            cached = known.pop() if len(known) == 1 else f"0000:00:{tail}"
            self._old_bus[pair] = cached
        return cached, " (QEMU before 7.0 prints no bus number: bus taken from the other names)"

    def _learn(self, dev: _Dev, off: int, width: int, value: int, *, exact: bool) -> None:
        if dev.image is None or dev.known is None:
            dev.image = bytearray(PCI_CFG_SPACE_EXP_SIZE)
            dev.known = bytearray(PCI_CFG_SPACE_EXP_SIZE)
        known = dev.known
        changed = False
        if not exact:
            # Only the bytes an inferred read certainly returned: up to the top non-zero byte.
            # The zero bytes above it were read too if the inferred width is right: they are
            # marked as seen (_SEEN, they read as 0), which a later read may still correct.
            full = min(off + width, PCI_CFG_SPACE_EXP_SIZE)
            width = min(width, max(1, (value.bit_length() + 7) // 8))
            for i in range(off + width, full):
                if not known[i]:
                    known[i] = _SEEN
                    changed = True
        end = off + width
        if end <= PCI_CFG_SPACE_EXP_SIZE:
            new = value.to_bytes(width, "little")
            if dev.image[off:end] != new or known[off:end].count(_LEARNED) != width:
                dev.image[off:end] = new
                known[off:end] = _LEARNED_BYTE * width
                changed = True
        if changed:
            dev.gen += 1

    def _check_identity(self, dev: _Dev, off: int, width: int, value: int, line: int) -> None:
        """Compare a read of the ID registers with the bound dump; a difference marks the
        device as not the one the dump describes (its accesses cannot be judged on it)."""
        cfg = self._bound_config(dev)
        if cfg is None:
            return
        end = min(off + width, _ID_END)
        got = value.to_bytes(width, "little")[: end - off]
        if cfg.data[off:end] == got:
            return
        seen = f"{_ids(got)}" if (off, end) == (0, _ID_END) else f"{got[::-1].hex()} at {off:#x}"
        dev.mismatch = (
            f"device identity mismatch: the --device dump {cfg.source} is "
            f"{_ids(cfg.data)}, the guest read {seen} ({self.name}:{line})"
        )
        dev.gen += 1  # consumers re-check the device
        dev.msix_gen = -1  # its MSI-X table position is the dump's, so not known

    def _bound_config(self, dev: _Dev) -> ConfigSpace | None:
        for name in (dev.vfio, dev.guest):
            if name is not None and name in self._devices:
                return self._devices[name]
        return None

    def _unseen(self, dev: _Dev) -> str | None:
        """Why a learned device's TPH registers cannot be known from what the guest read
        (None: its extended capability list, and the TPH registers on it, were all read)."""
        if self._is_bound(dev):
            return None
        img, known = dev.image, dev.known
        if img is None or known is None:
            return "capabilities never seen: the guest read none of its config space"
        walk = _CapWalk(img, known)
        std = walk.standard()
        if std is not None and _PCI_CAP_ID_EXP not in std and not walk.has(_EXT_START, 4):
            return None  # conventional PCI: no extended config space
        ext, _, problem = walk.extended()
        if problem is not None:
            return f"capabilities never seen: {problem}"
        tph = ext.get(_EXT_CAP_ID_TPH)
        if tph is None:
            return None
        if not walk.has(tph + 4, 4):
            return f"capabilities never seen: TPH capability register at {tph + 4:#x} never read"
        location = (int.from_bytes(img[tph + 4 : tph + 8], "little") >> 9) & 3
        if location == int(StLocation.MSIX):
            msix = None if std is None else std.get(_PCI_CAP_ID_MSIX)
            if msix is None or not walk.has(msix + 2, 6):
                return (
                    "capabilities never seen: the ST table is in the MSI-X table, whose "
                    "position (MSI-X capability) the guest never read"
                )
        return None

    def _config(self, dev: _Dev) -> ConfigSpace | None:
        if dev.cfg_gen == dev.gen:
            return dev.cfg
        dev.cfg_err = None
        cfg: ConfigSpace | None = None
        for name in (dev.vfio, dev.guest):
            if name is not None and name in self._devices:
                cfg = self._devices[name]
                break
        overlay = None
        for name in (dev.vfio, dev.guest):
            if name is not None and name in self._overlays:
                overlay = self._overlays[name]
                break
        try:
            if cfg is None and (dev.image is not None or overlay is not None):
                data = bytes(dev.image) if dev.image is not None else bytes(PCI_CFG_SPACE_EXP_SIZE)
                cfg = ConfigSpace.from_bytes(
                    data, f"{self.name}:learned({self._key(dev)})", self._key(dev)
                )
            if cfg is not None and overlay is not None:
                cfg = cfg.with_tph_overlay(overlay)
        except TphtrapError as exc:
            dev.cfg_err = str(exc)
            cfg = None
        dev.cfg = cfg
        dev.cfg_gen = dev.gen
        return cfg

    def _tph_table(self, dev: _Dev) -> tuple[int, int] | None:
        """[start, end) of the device's in-capability ST table, if it has one."""
        if dev.tph_table_gen != dev.gen:
            cfg = self._config(dev)
            tph = cfg.tph if cfg is not None else None
            span = None
            if tph is not None and tph.location is StLocation.CAP:
                start = tph.offset + PCI_TPH_BASE_SIZEOF
                span = (start, start + 2 * tph.table_size)
            dev.tph_table = span
            dev.tph_table_gen = dev.gen
        return dev.tph_table

    def _msix_span(self, dev: _Dev) -> None:
        cfg = self._config(dev) if dev.mismatch is None else None
        mx = cfg.msix if cfg is not None else None
        dev.msix_span = None
        if mx is not None:
            dev.msix_span = (mx.table_bir, mx.table_offset, mx.table_offset + mx.table_bytes)
        dev.msix_gen = dev.gen

    # --- config accesses -------------------------------------------------------------------
    def _extend(self, g: _Group, lineno: int, ev: QemuEvent) -> bool:
        """Whether ``ev`` is another view of the pending config access (then it is taken)."""
        t = type(ev)
        if g.write:
            if t is PciCfgWrite:
                assert isinstance(ev, PciCfgWrite)
                hint = g.hint
                if (
                    g.cfg is None
                    and g.vfio is None
                    and hint is not None
                    and _hint_matches(hint, ev)
                ):
                    g.cfg, g.cfg_line = ev, lineno
                    return True
                return False
            if t is VfioConfigWrite:
                assert isinstance(ev, VfioConfigWrite)
                cfg = g.cfg
                if (
                    cfg is not None
                    and g.vfio is None
                    and ev.offset == cfg.offset
                    and ev.value == cfg.value
                ):
                    g.vfio, g.vfio_line = ev, lineno
                    self._flush(g.tid)
                    return True
            return False
        if t is PciCfgRead:
            assert isinstance(ev, PciCfgRead)
            vfio = g.vfio
            if (
                g.cfg is None
                and vfio is not None
                and ev.offset == vfio.offset
                and ev.value == vfio.value
            ):
                g.cfg, g.cfg_line = ev, lineno
                return True
            return False
        if t is MemoryRegionRead:
            assert isinstance(ev, MemoryRegionRead)
            cfg_r = g.cfg
            if (
                cfg_r is not None
                and g.hint is None
                and ev.name in CONFIG_REGIONS
                and _hint_matches(ev, cfg_r)
            ):
                g.hint, g.hint_line = ev, lineno
                self._flush(g.tid)
                return True
        return False

    def _on_cfg_write(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, PciCfgWrite)
        g = self._groups[ev.tid] = _Group(True, ev.tid, lineno)
        g.cfg, g.cfg_line = ev, lineno

    def _on_cfg_read(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, PciCfgRead)
        g = self._groups[ev.tid] = _Group(False, ev.tid, lineno)
        g.cfg, g.cfg_line = ev, lineno

    def _on_vfio_cfg_write(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, VfioConfigWrite)
        g = self._groups[ev.tid] = _Group(True, ev.tid, lineno)
        g.vfio, g.vfio_line = ev, lineno
        self._flush(ev.tid)

    def _on_vfio_cfg_read(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, VfioConfigRead)
        g = self._groups[ev.tid] = _Group(False, ev.tid, lineno)
        g.vfio, g.vfio_line = ev, lineno

    def _flush(self, tid: int | None) -> None:
        g = self._groups.pop(tid)
        cfg, vfio, hint = g.cfg, g.vfio, g.hint
        kind = "write" if g.write else "read"
        if cfg is None and vfio is None:
            assert hint is not None
            what = f"config {kind} of {hint.size} bytes on '{hint.name}' at {hint.addr:#x}"
            if self._cfg_traced[g.write]:
                # QEMU traces pci_cfg_* for every access that reaches a device; this trace has
                # them, so this access reached none (a probe of an empty slot or function).
                self._info(g.hint_line, REASON_NO_DEVICE, f"{what}: no device answered")
            else:
                why = f"{what} with no matching pci_cfg_{kind} line (enable pci_cfg_* events)"
                self._unattributed(g.hint_line, REASON_LONE_HINT, why)
            return
        note = ""
        if cfg is not None:
            self._cfg_traced[g.write] = True
            bdf, note = self._guest_bdf(cfg)
            dev = self._pair(bdf, vfio.name) if vfio is not None else self._guest_dev(bdf)
            offset, value, line = cfg.offset, cfg.value, g.cfg_line
        else:
            assert vfio is not None
            dev = self._vfio_dev(vfio.name)
            offset, value, line = vfio.offset, vfio.value, g.vfio_line
        exact = True
        if vfio is not None:
            width = vfio.length
            how = f"len from vfio_pci_{kind}_config"
            if cfg is not None:
                how += f" (line {g.vfio_line})"
            if hint is not None and hint.size != width:
                how += f"; '{hint.name}' access size {hint.size} differs (line {g.hint_line})"
        elif hint is not None:
            width = hint.size
            how = f"size from memory_region_ops_{kind} on '{hint.name}' (line {g.hint_line})"
        else:
            exact = False
            limit = _alignment(offset)
            width = limit
            if limit == 4 and offset >= 0x100:
                span = self._tph_table(dev)
                if span is not None and span[0] <= offset < span[1]:
                    width = 2
            while value >> (8 * width) and width < limit:
                width *= 2
            how = WIDTH_INFERRED
            if value >> (8 * width):
                self._bad_access(
                    g,
                    line,
                    f"pci_cfg_{kind} value {value:#x} does not fit the {limit}-byte access its "
                    f"offset {offset:#x} allows (QEMU config accesses are naturally aligned)",
                )
                return
        if value >> (8 * width) or offset + width > PCI_CFG_SPACE_EXP_SIZE:
            self._bad_access(
                g, line, f"value {value:#x} at offset {offset:#x} does not fit {width} bytes"
            )
            return
        if not g.write:
            if not self._is_bound(dev):
                self._learn(dev, offset, width, value, exact=exact)
            elif offset < _ID_END and dev.mismatch is None:
                # compare only the bytes the read certainly returned (the access keeps its width)
                known = width if exact else min(width, max(1, (value.bit_length() + 7) // 8))
                self._check_identity(dev, offset, known, value, line)
        vm = self._vm(dev)
        key = self._key(dev)
        note = how + note
        access: Access = (
            ConfigWrite(vm or "", key, offset, width, value)
            if g.write
            else ConfigRead(vm or "", key, offset, width)
        )
        if vm is None:
            self._unbound(line, access, note)
        else:
            self._emit(line, access, note)
        self._merged(g, line)

    def _merged(self, g: _Group, line: int) -> None:
        """Records for the other lines of a config access group, in line order."""
        views = (
            (g.hint_line, "config access-size view"),
            (g.vfio_line, "vfio view"),
            (g.cfg_line, "guest view"),
        )
        extra = [
            _record((n, None, f"{what} of the access on line {line}", "skipped", REASON_VIEW))
            for n, what in views
            if n and n != line
        ]
        if not extra:
            return
        extra.append(self._out.pop())
        extra.sort(key=_LINENO)
        self._out.extend(extra)

    def _bad_access(self, g: _Group, lineno: int, message: str) -> None:
        """A config access no QEMU can have made: malformed, at its pci_cfg (or vfio) line."""
        self._malformed(lineno, message)
        if not self.strict:
            self._merged(g, lineno)

    # --- BARs and MSI-X --------------------------------------------------------------------
    def _on_mapping(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, (PciMappingAdd, PciMappingDel))
        dev = self._guest_dev(ev.bdf)
        span = f"BAR {ev.bar} at {ev.addr:#x}+{ev.size:#x}"
        if isinstance(ev, PciMappingAdd):
            dev.bars[ev.bar] = (ev.addr, ev.size)
            note = f"{span} mapped for {self._key(dev)}"
        elif dev.bars.get(ev.bar) == (ev.addr, ev.size):
            del dev.bars[ev.bar]
            note = f"{span} unmapped for {self._key(dev)}"
        else:
            note = f"{span} unmapped for {self._key(dev)} (was not traced as mapped)"
            dev.bars.pop(ev.bar, None)
        self._windows = [  # the MSI-X table can live in BARs 0-5, not the ROM
            (base, base + size, d, bar)
            for d in self._by_guest.values()
            for bar, (base, size) in d.bars.items()
            if bar < VFIO_BAR_REGIONS
        ]
        self._info(lineno, REASON_MAPPING, note)

    def _on_mr(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, (MemoryRegionWrite, MemoryRegionRead))
        name = ev.name
        if name in CONFIG_REGIONS:
            g = self._groups[ev.tid] = _Group(isinstance(ev, MemoryRegionWrite), ev.tid, lineno)
            g.hint, g.hint_line = ev, lineno
            if not g.write:  # a read hint follows its pci_cfg_read: this one has none
                self._flush(ev.tid)
            return
        if name is not None and name != MSIX_TABLE_REGION:
            self.stats.other_regions += 1
            return
        self._msix(lineno, ev)

    def _msix(self, lineno: int, ev: MemoryRegionWrite | MemoryRegionRead) -> None:
        addr = ev.addr
        named = ev.name is not None
        strong: list[tuple[_Dev, int, int]] = []
        weak: list[tuple[_Dev, int, int]] = []
        for base, end, dev, bar in self._windows:
            if not base <= addr < end:
                continue
            if dev.msix_gen != dev.gen:
                self._msix_span(dev)
            span = dev.msix_span
            if span is None:
                weak.append((dev, bar, base))
            elif span[0] == bar and span[1] <= addr - base < span[2]:
                strong.append((dev, bar, base))
        picks = strong or (weak if named else weak[:0])
        if len(picks) == 1:
            dev, bar, base = picks[0]
        elif not picks:
            if not named:
                self.stats.other_regions += 1
                return
            why = f"no traced BAR mapping holds the MSI-X table address {addr:#x}"
            if not self._windows:
                why += " (enable pci_update_mappings_* before the guest programs its BARs)"
            self._unattributed(lineno, REASON_NO_MAPPING, why)
            return
        else:
            owner = self._mr_owner.get(ev.mr)
            mine = [p for p in picks if p[0] is owner]
            if len(mine) != 1:
                who = ", ".join(sorted(self._key(d) for d, _, _ in picks))
                why = f"MSI-X table address {addr:#x} is mapped by {who}"
                self._unattributed(lineno, REASON_AMBIGUOUS, why)
                return
            dev, bar, base = mine[0]
        owners = self._mr_owner
        if named and ev.mr and (ev.mr in owners or len(owners) < MAX_DEVICES):
            owners[ev.mr] = dev
        note = "" if strong else "MSI-X capability not known: table position not checked"
        key = dev.key or self._key(dev)
        vm = dev.vm if dev.vm_done else self._vm(dev)
        if type(ev) is MemoryRegionWrite:
            access: Access = MsixWrite(vm or "", key, bar, addr - base, ev.size, ev.value)
        else:
            access = MsixRead(vm or "", key, bar, addr - base, ev.size)
        if vm is None:
            self._unbound(lineno, access, note)
            return
        self.stats.accesses += 1
        self._out.append(_record((lineno, access, note, "", "")))

    # --- vfio ------------------------------------------------------------------------------
    def _on_vfio_region(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, (VfioRegionWrite, VfioRegionRead))
        dev = self._vfio_dev(ev.name)
        key = self._key(dev)
        if ev.region >= VFIO_BAR_REGIONS:
            self._info(lineno, REASON_NOT_BAR, f"vfio region {ev.region} of {key} is not a BAR")
            return
        vm = self._vm(dev)
        access: Access = (
            MsixWrite(vm or "", key, ev.region, ev.offset, ev.size, ev.value)
            if isinstance(ev, VfioRegionWrite)
            else MsixRead(vm or "", key, ev.region, ev.offset, ev.size)
        )
        if vm is None:
            self._unbound(lineno, access, "")
        else:
            self._emit(lineno, access, "")

    def _on_vfio_reset(self, lineno: int, ev: QemuEvent) -> None:
        assert isinstance(ev, VfioReset)
        dev = self._vfio_dev(ev.name)
        vm = self._vm(dev)
        key = self._key(dev)
        if vm is None:
            self._unbound(lineno, Reset("", key), "")
        else:
            self._emit(lineno, Reset(vm, key), "")
