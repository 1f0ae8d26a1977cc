"""Device config-space model: loaders, safe capability walks, TPH and MSI-X views.

Sources: a sysfs ``config`` file (binary, 64/256/4096 bytes) or a sysfs device directory,
``lspci -x``/``-xxx``/``-xxxx`` text (one or many devices, picked by BDF; the format pciutils'
``lib/dump.c`` reads with ``lspci -F``), and plain hex strings.

The walks follow Linux and pciutils:

- standard list (Linux ``drivers/pci/pci.c`` ``__pci_find_next_cap_ttl``): at most
  ``PCI_FIND_CAP_TTL`` (48) entries, a pointer below 0x40 ends the list, the low two bits of a
  pointer are ignored, an id of 0xff ends it (pciutils ``ls-caps.c`` prints "<chain broken>");
- extended list (Linux ``pci_find_next_ext_capability``): starts at 0x100, at most
  (4096 - 256) / 8 entries, a header of 0 ends it, ``PCI_EXT_CAP_NEXT`` is ``(header >> 20) &
  0xffc``. It is only walked when the standard list has a PCI Express (or PCI-X) capability,
  as pciutils ``ls-caps.c`` ``show_caps`` does (``can_have_ext_caps``) and as Linux does when it
  sizes config space.

Capability lengths (the byte ranges a capability owns) follow Linux
``drivers/vfio/pci/vfio_pci_config.c`` (``pci_cap_length``, ``vfio_cap_len``,
``vfio_ext_cap_len``).

Anything malformed raises :class:`DeviceError` naming the file and dump line (or byte offset
for binaries); where the device is still usable it becomes a warning. Every loop is bounded
and every read is checked against the data, so nothing here can hang or index past the end.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DeviceError
from .layouts import (
    EXT_CAP_HEADER,
    MSIX_FLAGS,
    MSIX_TABLE_BIR,
    PCI_STATUS_REG,
    PCIE_DEVCAP2,
    PCIE_FLAGS,
    TPH_CAP,
    TPH_CTRL,
)
from .spec import (
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_EXP_DEVCAP2,
    PCI_EXP_FLAGS,
    PCI_EXT_CAP_ID_TPH,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_STATUS,
    PCI_TPH_BASE_SIZEOF,
    PCI_TPH_CAP,
    PCI_TPH_CTRL,
    PCI_TPH_ST_TABLE_MAX_IN_CAP,
    PcieType,
    ReqEnable,
    StLocation,
    StMode,
    TphCompleter,
)

__all__ = [
    "COMPLETER_TEXT",
    "PCI_STD_HEADER_SIZEOF",
    "SYSFS_DEVICES",
    "Capability",
    "ConfigSpace",
    "MsixInfo",
    "RootPortCheck",
    "TphInfo",
    "check_root_port",
    "load_device",
    "load_devices",
    "normalize_bdf",
    "parse_hex_config",
    "parse_lspci",
    "sysfs_device_dir",
    "sysfs_functions",
]

PCI_STD_HEADER_SIZEOF = 64
PCI_FIND_CAP_TTL = 48
PCI_EXT_CAP_TTL = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8
VALID_SIZES = (PCI_STD_HEADER_SIZEOF, PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE)
SYSFS_DEVICES = Path("/sys/bus/pci/devices")

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_PCIX = 0x07
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100
PCI_EXT_CAP_ID_ERR = 0x01
PCI_ERR_ROOT_ERR_SRC = 0x34
PCI_EXT_CAP_ID_VNDR = 0x0B
PCI_EXT_CAP_ID_ACS = 0x0D
PCI_EXT_CAP_ID_REBAR = 0x15
PCI_EXT_CAP_ID_DVSEC = 0x23
PCI_ACS_EC = 0x20
MSIX_BIR_MAX = 5  # BIR 6 and 7 are reserved

STD_CAP_NAMES = {
    0x01: "Power Management",
    0x02: "AGP",
    0x03: "Vital Product Data",
    0x04: "Slot ID",
    0x05: "MSI",
    0x06: "CompactPCI Hot Swap",
    0x07: "PCI-X",
    0x08: "HyperTransport",
    0x09: "Vendor Specific",
    0x0A: "Debug port",
    0x0D: "Subsystem ID",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA",
    0x13: "Advanced Features",
    0x14: "Enhanced Allocation",
}
# Fixed lengths from vfio_pci_config.c pci_cap_length; variable ones are computed below.
STD_CAP_LENGTHS = {0x01: 8, 0x03: 8, 0x04: 4, 0x06: 8, 0x0A: 4, 0x0D: 8, 0x11: 12, 0x12: 8, 0x13: 6}
EXT_CAP_NAMES = {
    0x00: "Null",
    0x01: "Advanced Error Reporting",
    0x02: "Virtual Channel",
    0x03: "Device Serial Number",
    0x04: "Power Budgeting",
    0x0B: "Vendor Specific",
    0x0D: "Access Control Services",
    0x0E: "Alternative Routing-ID",
    0x0F: "Address Translation Services",
    0x10: "SR-IOV",
    0x13: "Page Request",
    0x15: "Resizable BAR",
    0x17: "TPH Requester",
    0x18: "Latency Tolerance Reporting",
    0x19: "Secondary PCI Express",
    0x1B: "PASID",
    0x1E: "L1 PM Substates",
    0x1F: "Precision Time Measurement",
    0x23: "Designated Vendor-Specific",
    0x25: "Data Link Feature",
    0x26: "Physical Layer 16.0 GT/s",
}
EXT_CAP_LENGTHS = {
    0x00: 0x04,  # Null: only the header (vfio hides it behind a 4-byte placeholder)
    0x01: 0x2C,  # PCI_ERR_ROOT_COMMAND (a root port's is longer: _ext_cap_length)
    0x03: 0x0C,  # PCI_EXT_CAP_DSN_SIZEOF
    0x0E: 0x08,  # PCI_EXT_CAP_ARI_SIZEOF
    0x0F: 0x08,  # PCI_EXT_CAP_ATS_SIZEOF
    0x10: 0x40,  # PCI_EXT_CAP_SRIOV_SIZEOF
    0x13: 0x10,  # PCI_EXT_CAP_PRI_SIZEOF
    0x18: 0x08,  # PCI_EXT_CAP_LTR_SIZEOF
    0x1B: 0x08,  # PCI_EXT_CAP_PASID_SIZEOF
    0x1F: 0x0C,  # PCI_EXT_CAP_PTM_SIZEOF
}

_BDF_RE = re.compile(
    r"^(?:(?P<dom>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7])$"
)


def normalize_bdf(text: str) -> str:
    """``3b:00.0`` or ``0000:3b:00.0`` -> ``0000:3b:00.0``; raises ValueError otherwise."""
    m = _BDF_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a PCI address (expected [DDDD:]BB:DD.F): {text!r}")
    dom = int(m["dom"] or "0", 16)
    bus, dev, fn = int(m["bus"], 16), int(m["dev"], 16), int(m["fn"])
    if dev > 0x1F:
        raise ValueError(f"device number {dev:#x} out of range (0-1f) in {text!r}")
    return f"{dom:04x}:{bus:02x}:{dev:02x}.{fn}"


@dataclass(frozen=True, slots=True)
class Capability:
    """One capability in config space and the bytes it owns (``length`` None: unknown)."""

    kind: str  # "std" or "ext"
    cap_id: int
    offset: int
    length: int | None
    version: int = 0

    @property
    def name(self) -> str:
        names = STD_CAP_NAMES if self.kind == "std" else EXT_CAP_NAMES
        return names.get(self.cap_id, f"{self.kind} cap {self.cap_id:#04x}")

    @property
    def end(self) -> int | None:
        return None if self.length is None else self.offset + self.length


@dataclass(frozen=True, slots=True)
class TphInfo:
    """The TPH Requester capability as found in a config-space snapshot."""

    offset: int
    cap_raw: int
    ctrl_raw: int
    entries: tuple[int, ...]  # ST table contents when located in the capability
    table_ok: bool  # a standard ST table exists, fits and overlaps nothing
    problems: tuple[str, ...]
    version: int = 0
    #: why the ST table cannot be used (a reason code), None when ``table_ok``:
    #: ``no-st-table`` (location none or reserved, or MSI-X without a usable MSI-X table),
    #: ``st-table-invalid`` (too many entries, or past the end of config space),
    #: ``cap-overlap`` (the capability or its table overlaps another capability)
    table_refusal: str | None = None

    @property
    def no_st_mode(self) -> bool:
        return bool(TPH_CAP["no_st_mode"].get(self.cap_raw))

    @property
    def interrupt_vector_mode(self) -> bool:
        return bool(TPH_CAP["interrupt_vector_mode"].get(self.cap_raw))

    @property
    def device_specific_mode(self) -> bool:
        return bool(TPH_CAP["device_specific_mode"].get(self.cap_raw))

    @property
    def extended_tph(self) -> bool:
        return bool(TPH_CAP["extended_tph_requester"].get(self.cap_raw))

    @property
    def location(self) -> StLocation:
        return StLocation(TPH_CAP["st_table_location"].get(self.cap_raw))

    @property
    def table_size(self) -> int:
        """Decoded ST Table Size (the field holds N-1)."""
        return TPH_CAP["st_table_size"].get(self.cap_raw) + 1

    @property
    def table_offset(self) -> int:
        return self.offset + PCI_TPH_BASE_SIZEOF

    @property
    def length(self) -> int:
        """Bytes the capability owns (vfio_ext_cap_len)."""
        return _tph_length(self.cap_raw)

    @property
    def region_length(self) -> int:
        """:attr:`length` rounded up to a dword: what the filter claims (padding is dropped)."""
        return (self.length + 3) & ~3

    @property
    def st_mode(self) -> int:
        """ST Mode Select of the snapshot's control register (a :class:`StMode` value or 3..7)."""
        return TPH_CTRL["st_mode_select"].get(self.ctrl_raw)

    @property
    def req_enable(self) -> ReqEnable:
        """TPH Requester Enable of the snapshot's control register."""
        return ReqEnable(TPH_CTRL["tph_requester_enable"].get(self.ctrl_raw))

    @property
    def enabled(self) -> bool:
        """TPH Requester Enable is not 0 in the snapshot."""
        return self.req_enable is not ReqEnable.DISABLED

    @property
    def st_mode_known(self) -> StMode | None:
        try:
            return StMode(self.st_mode)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class MsixInfo:
    """The MSI-X capability: where the table lives in which BAR."""

    offset: int
    flags_raw: int
    table_raw: int
    pba_raw: int

    @property
    def table_size(self) -> int:
        return MSIX_FLAGS["table_size"].get(self.flags_raw) + 1

    @property
    def enabled(self) -> bool:
        return bool(MSIX_FLAGS["msix_enable"].get(self.flags_raw))

    @property
    def function_mask(self) -> bool:
        return bool(MSIX_FLAGS["function_mask"].get(self.flags_raw))

    @property
    def table_bir(self) -> int:
        return MSIX_TABLE_BIR["bir"].get(self.table_raw)

    @property
    def table_offset(self) -> int:
        return self.table_raw & MSIX_TABLE_BIR["offset_qw"].mask

    @property
    def table_bytes(self) -> int:
        return self.table_size * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_bir(self) -> int:
        return MSIX_TABLE_BIR["bir"].get(self.pba_raw)

    @property
    def pba_offset(self) -> int:
        return self.pba_raw & MSIX_TABLE_BIR["offset_qw"].mask

    @property
    def pba_bytes(self) -> int:
        """One pending bit per vector, in whole qwords."""
        return ((self.table_size + 63) // 64) * 8


@dataclass(frozen=True)
class ConfigSpace:
    """A snapshot of one function's config space with its capabilities decoded.

    Build it with :func:`ConfigSpace.from_bytes` or the loaders; construction walks both
    capability lists once and raises :class:`DeviceError` on a malformed space.
    ``ext_visible`` is False when the extended capabilities (where TPH lives) could not be
    examined: a 64- or 256-byte snapshot, or no PCI Express capability.
    """

    data: bytes
    source: str = "<config>"
    bdf: str | None = None
    line_map: tuple[int, ...] = ()  # dump line of each 16-byte row, for text sources
    caps: tuple[Capability, ...] = field(default=(), compare=False)
    tph: TphInfo | None = field(default=None, compare=False)
    msix: MsixInfo | None = field(default=None, compare=False)
    #: every TPH Requester capability, in list order (``tph`` is the first; a device with
    #: more than one cannot be trapped: which one it obeys is unknown)
    tph_all: tuple[TphInfo, ...] = field(default=(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    ext_visible: bool = field(default=False, compare=False)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        source: str = "<config>",
        bdf: str | None = None,
        line_map: Sequence[int] = (),
    ) -> ConfigSpace:
        if len(data) not in VALID_SIZES:
            raise DeviceError(
                source,
                f"config space is {len(data)} bytes; expected 64, 256 or 4096 "
                "(truncated dump or not a config space)",
            )
        probe = cls(bytes(data), source, bdf, tuple(line_map))
        caps, warnings, ext_visible = _walk(probe)
        tph: TphInfo | None = None
        msix: MsixInfo | None = None
        tph_all: list[TphInfo] = []
        for cap in caps:
            if cap.kind == "ext" and cap.cap_id == PCI_EXT_CAP_ID_TPH:
                tph_all.append(_tph_info(probe, cap, caps))
                if tph is None:
                    tph = tph_all[0]
                else:
                    tph = _with_problem(
                        tph,
                        f"a second TPH Requester capability at {cap.offset:#x}: which one the "
                        "device obeys is unknown",
                        "multiple-tph-caps",
                    )
            elif cap.kind == "std" and cap.cap_id == PCI_CAP_ID_MSIX:
                if msix is None:
                    msix = MsixInfo(
                        cap.offset,
                        probe.u16(cap.offset + PCI_MSIX_FLAGS),
                        probe.u32(cap.offset + PCI_MSIX_TABLE),
                        probe.u32(cap.offset + PCI_MSIX_PBA),
                    )
                    warnings.extend(_msix_warnings(msix))
                else:
                    warnings.append(f"second MSI-X capability at {cap.offset:#x} ignored")
        if tph is not None and tph.location is StLocation.MSIX:
            if msix is None:
                tph = _with_problem(
                    tph, "ST table location is MSI-X but the device has no MSI-X capability"
                )
            elif msix.table_bir > MSIX_BIR_MAX:
                tph = _with_problem(
                    tph,
                    f"ST table location is MSI-X but the MSI-X table BIR {msix.table_bir} "
                    "is reserved",
                )
        tph_warnings = tph.problems if tph is not None else ()
        return cls(
            bytes(data),
            source,
            bdf,
            tuple(line_map),
            tuple(caps),
            tph,
            msix,
            tuple(tph_all),
            tuple(warnings) + tph_warnings,
            ext_visible,
        )

    # --- raw access ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.data)

    def u8(self, off: int) -> int:
        return self.data[off]

    def u16(self, off: int) -> int:
        return int.from_bytes(self.data[off : off + 2], "little")

    def u32(self, off: int) -> int:
        return int.from_bytes(self.data[off : off + 4], "little")

    def where(self, off: int) -> str:
        """``file:line`` of the dump line holding byte ``off`` (``file@0xOFF`` for binaries)."""
        row = off // 16
        if self.line_map and 0 <= row < len(self.line_map):
            return f"{self.source}:{self.line_map[row]}"
        return f"{self.source}@{off:#x}"

    @property
    def vendor_id(self) -> int:
        return self.u16(0)

    @property
    def device_id(self) -> int:
        return self.u16(2)

    @property
    def revision(self) -> int:
        return self.u8(0x08)

    @property
    def class_code(self) -> int:
        """The 24-bit class code (base class, subclass, programming interface)."""
        return int.from_bytes(self.data[0x09:0x0C], "little")

    # --- PCI Express ---------------------------------------------------------------------------
    @property
    def pcie(self) -> Capability | None:
        """The PCI Express capability, or None (conventional PCI, or not in the snapshot)."""
        return next((c for c in self.caps if c.kind == "std" and c.cap_id == PCI_CAP_ID_EXP), None)

    @property
    def pcie_type(self) -> int | None:
        """Device/Port Type of the PCI Express capability (compare with :class:`PcieType`)."""
        cap = self.pcie
        if cap is None:
            return None
        return PCIE_FLAGS["device_port_type"].get(self.u16(cap.offset + PCI_EXP_FLAGS))

    @property
    def tph_completer(self) -> TphCompleter | None:
        """TPH Completer Supported (Device Capabilities 2 bits 13:12): what a root port above a
        TPH requester completes. A version 1 PCI Express capability has no Device Capabilities
        2 and reads as :attr:`TphCompleter.NONE`, as in Linux; None without the capability."""
        cap = self.pcie
        if cap is None:
            return None
        if PCIE_FLAGS["capability_version"].get(self.u16(cap.offset + PCI_EXP_FLAGS)) < 2:
            return TphCompleter.NONE
        devcap2 = self.u32(cap.offset + PCI_EXP_DEVCAP2)
        return TphCompleter(PCIE_DEVCAP2["tph_completer"].get(devcap2))

    def owner(self, off: int) -> Capability | None:
        """The capability that owns config byte ``off`` (vfio's pci_config_map), if known."""
        for cap in self.caps:
            end = cap.end
            if end is not None and cap.offset <= off < end:
                return cap
        return None

    def with_tph_overlay(self, overlay: ConfigSpace) -> ConfigSpace:
        """A copy of this device with ``overlay``'s TPH capability grafted onto its ext list.

        Used by replay's "what if this device had TPH": the TPH capability bytes of ``overlay``
        are copied to the first free, all-zero, dword-aligned spot after this device's ext
        capabilities and linked in as the last entry.
        """
        if overlay.tph is None:
            raise DeviceError(overlay.source, "overlay source has no TPH capability")
        if self.tph is not None:
            return self
        tph = overlay.tph
        length = tph.region_length
        blob = overlay.data[tph.offset : tph.offset + length]
        data = bytearray(self.data.ljust(PCI_CFG_SPACE_EXP_SIZE, b"\x00"))
        ext = [c for c in self.caps if c.kind == "ext"] if self.ext_visible else []
        if not ext:
            place = PCI_CFG_SPACE_SIZE
            data[PCI_CFG_SPACE_SIZE:] = bytes(PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE)
        else:
            # A capability of unknown length owns at least its header; then skip anything
            # that is not zero, so the graft never lands inside a capability's body.
            used_end = max(c.end if c.end is not None else c.offset + 4 for c in ext)
            place = (used_end + 3) & ~3
            while place + length <= PCI_CFG_SPACE_EXP_SIZE and any(data[place : place + length]):
                place += 4
        if place + length > PCI_CFG_SPACE_EXP_SIZE:
            raise DeviceError(self.source, "no room in extended config space for a TPH overlay")
        header = EXT_CAP_HEADER["next"].put(int.from_bytes(blob[:4], "little"), 0)
        data[place : place + length] = header.to_bytes(4, "little") + blob[4:]
        if ext:
            last = ext[-1]
            hdr = int.from_bytes(data[last.offset : last.offset + 4], "little")
            hdr = EXT_CAP_HEADER["next"].put(hdr, place)
            data[last.offset : last.offset + 4] = hdr.to_bytes(4, "little")
        out = ConfigSpace.from_bytes(bytes(data), f"{self.source}+tph({overlay.source})", self.bdf)
        if out.tph is None:
            raise DeviceError(
                self.source,
                "cannot graft a TPH capability: the device has no PCI Express capability, so "
                "its extended config space is not reachable",
            )
        return out


def _with_problem(tph: TphInfo, problem: str, refusal: str = "no-st-table") -> TphInfo:
    return TphInfo(
        tph.offset,
        tph.cap_raw,
        tph.ctrl_raw,
        (),
        False,
        (*tph.problems, problem),
        tph.version,
        tph.table_refusal or refusal,
    )


def _msix_warnings(msix: MsixInfo) -> list[str]:
    out: list[str] = []
    if msix.table_bir > MSIX_BIR_MAX:
        out.append(f"MSI-X table BIR {msix.table_bir} is reserved (valid: 0-5)")
    if msix.pba_bir > MSIX_BIR_MAX:
        out.append(f"MSI-X PBA BIR {msix.pba_bir} is reserved (valid: 0-5)")
    if msix.table_bir == msix.pba_bir:
        t0, t1 = msix.table_offset, msix.table_offset + msix.table_bytes
        p0, p1 = msix.pba_offset, msix.pba_offset + msix.pba_bytes
        if t0 < p1 and p0 < t1:
            out.append(
                f"MSI-X table ({t0:#x}-{t1 - 1:#x}) and PBA ({p0:#x}-{p1 - 1:#x}) overlap "
                f"in BAR {msix.table_bir}"
            )
    return out


# --- walks ----------------------------------------------------------------------------------
def _walk(cfg: ConfigSpace) -> tuple[list[Capability], list[str], bool]:
    caps: list[Capability] = []
    warnings: list[str] = []
    size = cfg.size
    if cfg.vendor_id == 0xFFFF:
        warnings.append(
            "vendor id reads 0xffff: the function is absent or its config space was not "
            "readable when the snapshot was taken"
        )
        return caps, warnings, False
    status = cfg.u16(PCI_STATUS)
    if PCI_STATUS_REG["capabilities_list"].get(status):
        if size == PCI_STD_HEADER_SIZEOF:
            warnings.append(
                "only the 64-byte header is present (lspci -x, or sysfs read without root): "
                "capabilities need lspci -xxx or -xxxx"
            )
        else:
            caps.extend(_walk_std(cfg, warnings))
    can_have_ext = any(c.cap_id in (PCI_CAP_ID_EXP, PCI_CAP_ID_PCIX) for c in caps)
    if size < PCI_CFG_SPACE_EXP_SIZE:
        if size == PCI_CFG_SPACE_SIZE:
            warnings.append(
                "config space is 256 bytes: extended capabilities (TPH) are not visible; "
                "dump with lspci -xxxx as root or read the 4096-byte sysfs config"
            )
        return caps, warnings, False
    if not can_have_ext:
        if any(cfg.data[PCI_CFG_SPACE_SIZE:]):
            warnings.append(
                "no PCI Express capability: extended config space is not reachable and was "
                "not examined"
            )
        return caps, warnings, False
    ext = _walk_ext(cfg, warnings)
    caps.extend(ext)
    warnings.extend(_overlaps(caps))
    return caps, warnings, True


def _std_cap_length(cfg: ConfigSpace, cap_id: int, pos: int) -> int | None:
    """vfio_cap_len: the bytes a standard capability owns, or None when unknown."""
    if cap_id == PCI_CAP_ID_MSI:
        flags = cfg.u16(pos + 2)
        length = 10
        if flags & PCI_MSI_FLAGS_64BIT:
            length += 4
        if flags & PCI_MSI_FLAGS_MASKBIT:
            length += 10
        return length
    if cap_id == PCI_CAP_ID_VNDR:
        return cfg.u8(pos + 2) or None  # length follows the next pointer
    if cap_id == PCI_CAP_ID_EXP:
        flags = cfg.u16(pos + PCI_EXP_FLAGS)
        rc_end = PCIE_FLAGS["device_port_type"].get(flags) == PcieType.RC_END
        if PCIE_FLAGS["capability_version"].get(flags) == 1:
            return 0x0C if rc_end else 0x14  # PCI_CAP_EXP_ENDPOINT_SIZEOF_V1
        return 0x2C if rc_end else 0x34  # PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 (0x34, not 0x32)
    return STD_CAP_LENGTHS.get(cap_id)


def _walk_std(cfg: ConfigSpace, warnings: list[str]) -> list[Capability]:
    out: list[Capability] = []
    ptr_at = PCI_CAPABILITY_LIST
    pos = cfg.u8(ptr_at)
    seen: list[int] = []
    while True:
        if pos < PCI_STD_HEADER_SIZEOF:
            if pos != 0:
                warnings.append(
                    f"capability pointer {pos:#04x} at {ptr_at:#x} points into the header; "
                    "the list ends there (as in Linux)"
                )
            return out
        pos &= ~3
        if pos in seen:
            chain = " -> ".join(f"{p:#x}" for p in [*seen, pos])
            raise DeviceError(cfg.where(ptr_at), f"capability loop: {chain}")
        if len(seen) >= PCI_FIND_CAP_TTL:
            raise DeviceError(cfg.where(ptr_at), f"more than {PCI_FIND_CAP_TTL} capabilities")
        seen.append(pos)
        cap_id = cfg.u8(pos)
        if cap_id == 0xFF:
            warnings.append(
                f"capability at {pos:#x} reads id 0xff: the list is broken and ends there"
            )
            return out
        length = _std_cap_length(cfg, cap_id, pos)
        end = pos + (length if length is not None else 2)
        if end > PCI_CFG_SPACE_SIZE:
            name = STD_CAP_NAMES.get(cap_id, f"capability {cap_id:#04x}")
            raise DeviceError(
                cfg.where(ptr_at),
                f"capability pointer {pos:#x} at {ptr_at:#x} leads to {name}, whose "
                f"{end - pos} bytes run past the end of the standard config space (0x100)",
            )
        out.append(Capability("std", cap_id, pos, length))
        ptr_at = pos + 1
        pos = cfg.u8(ptr_at)


def _ext_cap_length(cfg: ConfigSpace, cap_id: int, pos: int) -> int | None:
    """vfio_ext_cap_len: the bytes an extended capability owns, or None when unknown."""
    if cap_id == PCI_EXT_CAP_ID_TPH:
        return _tph_length(cfg.u32(pos + PCI_TPH_CAP))
    if cap_id in (PCI_EXT_CAP_ID_VNDR, PCI_EXT_CAP_ID_DVSEC):
        # PCI_VNDR_HEADER_LEN / PCI_DVSEC_HEADER1_LEN: bits 31:20 of the dword at +4.
        return (cfg.u32(pos + 4) >> 20) or None
    if cap_id == PCI_EXT_CAP_ID_ERR and _is_root_port(cfg):
        return PCI_ERR_ROOT_ERR_SRC + 4
    # Reads near the end of a 4096-byte space may fall off it: slices read short (as 0).
    if cap_id == PCI_EXT_CAP_ID_ACS:
        acs_cap = cfg.u16(pos + 4)  # PCI_ACS_CAP, then PCI_ACS_EGRESS_BITS in the high byte
        if acs_cap & PCI_ACS_EC:
            bits = acs_cap >> 8
            bits = ((bits + 31) // 32) * 32 if bits else 256
            return 8 + bits // 8
        return 8
    if cap_id == PCI_EXT_CAP_ID_REBAR:
        nbar = (cfg.u32(pos + 8) & 0xE0) >> 5  # PCI_REBAR_CTRL_NBAR_MASK / _SHIFT
        return 4 + nbar * 8
    return EXT_CAP_LENGTHS.get(cap_id)


def _is_root_port(cfg: ConfigSpace) -> bool:
    """Does the standard list hold a PCI Express capability of type Root Port?"""
    pos = cfg.u8(PCI_CAPABILITY_LIST)
    for _ in range(PCI_FIND_CAP_TTL):
        if pos < PCI_STD_HEADER_SIZEOF:
            return False
        pos &= ~3
        if cfg.u8(pos) == PCI_CAP_ID_EXP:
            return PCIE_FLAGS["device_port_type"].get(cfg.u16(pos + 2)) == PcieType.ROOT_PORT
        pos = cfg.u8(pos + 1)
    return False


# Capabilities whose length is read from their own registers: a bad value there is the
# capability's problem, not a malformed list.
_SELF_SIZED_EXT_CAPS = frozenset(
    {PCI_EXT_CAP_ID_VNDR, PCI_EXT_CAP_ID_DVSEC, PCI_EXT_CAP_ID_ACS, PCI_EXT_CAP_ID_REBAR}
)


def _walk_ext(cfg: ConfigSpace, warnings: list[str]) -> list[Capability]:
    out: list[Capability] = []
    pos = PCI_CFG_SPACE_SIZE
    ptr_at = pos
    seen: list[int] = []
    while True:
        header = cfg.u32(pos)
        if header == 0:
            if pos != PCI_CFG_SPACE_SIZE:
                warnings.append(
                    f"extended capability pointer at {ptr_at:#x} leads to an empty dword at "
                    f"{pos:#x}; the list ends there"
                )
            return out
        if header == 0xFFFFFFFF:
            warnings.append(f"extended capability at {pos:#x} reads all ones; the list ends there")
            return out
        if pos in seen:
            chain = " -> ".join(f"{p:#x}" for p in [*seen, pos])
            raise DeviceError(cfg.where(ptr_at), f"extended capability loop: {chain}")
        if len(seen) >= PCI_EXT_CAP_TTL:
            raise DeviceError(cfg.where(ptr_at), "too many extended capabilities")
        seen.append(pos)
        cap_id = EXT_CAP_HEADER["id"].get(header)
        version = EXT_CAP_HEADER["version"].get(header)
        nxt = EXT_CAP_HEADER["next"].get(header) & ~3
        length = _ext_cap_length(cfg, cap_id, pos)
        if length is not None and pos + length > PCI_CFG_SPACE_EXP_SIZE:
            name = EXT_CAP_NAMES.get(cap_id, f"extended capability {cap_id:#06x}")
            if cap_id == PCI_EXT_CAP_ID_TPH and pos + PCI_TPH_BASE_SIZEOF <= cfg.size:
                pass  # only its ST table overflows: _tph_info reports it as a TPH problem
            elif cap_id in _SELF_SIZED_EXT_CAPS:
                warnings.append(
                    f"{name} at {pos:#x} says it is {length:#x} bytes, past the end of config "
                    "space; its length is treated as unknown"
                )
                length = None
            else:
                raise DeviceError(
                    cfg.where(ptr_at),
                    f"{name} at {pos:#x} needs {length:#x} bytes and runs past the end of "
                    "config space (0x1000)",
                )
        out.append(Capability("ext", cap_id, pos, length, version))
        if nxt == 0:
            return out
        if nxt < PCI_CFG_SPACE_SIZE:
            raise DeviceError(
                cfg.where(pos),
                f"extended capability at {pos:#x} has next pointer {nxt:#x} below 0x100",
            )
        ptr_at = pos
        pos = nxt


def _overlaps(caps: Sequence[Capability]) -> list[str]:
    """vfio_cap_init's "PCI config conflict" check, as warnings."""
    out: list[str] = []
    known = sorted((c for c in caps if c.end is not None), key=lambda c: c.offset)
    for a, b in itertools.pairwise(known):
        if a.kind == b.kind == "ext" and PCI_EXT_CAP_ID_TPH in (a.cap_id, b.cap_id):
            continue  # reported as a TPH problem, with what it means for the ST table
        a_end = a.end
        if a_end is not None and a_end > b.offset:
            out.append(
                f"{a.name} at {a.offset:#x} ({a.length} bytes) overlaps {b.name} at {b.offset:#x}"
            )
    return out


def _tph_length(cap_raw: int) -> int:
    if TPH_CAP["st_table_location"].get(cap_raw) == StLocation.CAP:
        return PCI_TPH_BASE_SIZEOF + 2 * (TPH_CAP["st_table_size"].get(cap_raw) + 1)
    return PCI_TPH_BASE_SIZEOF


def _tph_info(cfg: ConfigSpace, cap: Capability, caps: Sequence[Capability]) -> TphInfo:
    pos = cap.offset
    problems: list[str] = []
    if pos + PCI_TPH_BASE_SIZEOF > cfg.size:
        raise DeviceError(cfg.where(pos), f"TPH capability at {pos:#x} runs past the end")
    cap_raw = cfg.u32(pos + PCI_TPH_CAP)
    ctrl_raw = cfg.u32(pos + PCI_TPH_CTRL)
    info = TphInfo(pos, cap_raw, ctrl_raw, (), True, (), cap.version)
    refusal: str | None = None
    entries: tuple[int, ...] = ()
    end = pos + info.length
    if info.location is StLocation.CAP:
        n = info.table_size
        if n > PCI_TPH_ST_TABLE_MAX_IN_CAP:
            problems.append(
                f"ST table in the capability has {n} entries; PCIe allows at most "
                f"{PCI_TPH_ST_TABLE_MAX_IN_CAP} there"
            )
            refusal = "st-table-invalid"
        if end > cfg.size:
            problems.append(
                f"ST table ({n} entries, up to {end - 1:#x}) runs past the end of config space"
            )
            refusal = "st-table-invalid"
    elif info.location is StLocation.NONE:
        refusal = "no-st-table"
    elif info.location is StLocation.RESERVED:
        problems.append("ST table location is the reserved encoding 3")
        refusal = "no-st-table"
    claimed = (end + 3) & ~3
    for other in caps:
        if other is cap or other.kind != "ext":
            continue
        o_end = other.end if other.end is not None else other.offset + 4
        if other.offset < claimed and pos < o_end:
            what = "ST table" if other.offset >= pos + PCI_TPH_BASE_SIZEOF else "TPH capability"
            problems.append(
                f"{what} ({pos:#x}-{end - 1:#x}) overlaps {other.name} at {other.offset:#x}"
            )
            refusal = refusal or "cap-overlap"
    table_ok = refusal is None
    if table_ok and info.location is StLocation.CAP:
        base = info.table_offset
        entries = tuple(cfg.u16(base + 2 * i) for i in range(info.table_size))
    if not info.no_st_mode:
        problems.append("No ST Mode Supported bit is clear (PCIe requires it set)")
    return TphInfo(pos, cap_raw, ctrl_raw, entries, table_ok, tuple(problems), cap.version, refusal)


# --- loaders --------------------------------------------------------------------------------
# pciutils lib/dump.c accepts "BB:DD.F ", "DDDD:BB:DD.F " and "DDDDD:BB:DD.F " device lines,
# and "OFF: " data lines with 2 to 8 hex offset digits followed by two-digit hex bytes.
_DEV_LINE = re.compile(r"^((?:[0-9a-fA-F]{4,5}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])(?:\s|$)")
_DATA_LINE = re.compile(r"^([0-9a-fA-F]{2,8}):(.*)$")
_HEX_BYTE = re.compile(r"^[0-9a-fA-F]{2}$")


@dataclass
class _Dump:
    bdf: str
    header_line: int
    data: bytearray = field(default_factory=bytearray)
    line_map: list[int] = field(default_factory=list)


def parse_lspci(text: str, name: str = "<lspci>") -> list[ConfigSpace]:
    """Parse ``lspci -x/-xxx/-xxxx`` output (any number of devices) into config spaces.

    Lines indented with whitespace (``-v`` details) are skipped, as ``lspci -F`` does.
    Raises :class:`DeviceError` with ``name:line`` on anything malformed.
    """
    dumps: list[_Dump] = []
    cur: _Dump | None = None
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            cur = None
            continue
        if line[0] in " \t":
            continue
        m = _DEV_LINE.match(line)
        if m:
            try:
                bdf = normalize_bdf(m.group(1))
            except ValueError as exc:
                raise DeviceError(f"{name}:{lineno}", str(exc)) from None
            if bdf in first_line:
                raise DeviceError(
                    f"{name}:{lineno}",
                    f"device {bdf} appears twice (first at line {first_line[bdf]})",
                )
            first_line[bdf] = lineno
            cur = _Dump(bdf, lineno)
            dumps.append(cur)
            continue
        d = _DATA_LINE.match(line)
        if not d:
            raise DeviceError(f"{name}:{lineno}", f"not an lspci dump line: {_clip(line)!r}")
        if cur is None:
            raise DeviceError(f"{name}:{lineno}", "hex data before any device line (BB:DD.F)")
        off = int(d.group(1), 16)
        if off != len(cur.data):
            raise DeviceError(
                f"{name}:{lineno}",
                f"offset {off:#x} where {len(cur.data):#x} was expected (missing or repeated line)",
            )
        body = d.group(2)
        if body and not body.startswith(" "):
            raise DeviceError(f"{name}:{lineno}", "expected a space after the offset")
        tokens = body.split()
        for tok in tokens:
            if not _HEX_BYTE.match(tok):
                raise DeviceError(
                    f"{name}:{lineno}", f"bad hex byte {_clip(tok)!r} (need two hex digits)"
                )
        if len(tokens) != 16:
            raise DeviceError(
                f"{name}:{lineno}",
                f"{len(tokens)} bytes on the line, 16 expected (truncated dump?)",
            )
        if off + 16 > PCI_CFG_SPACE_EXP_SIZE:
            raise DeviceError(f"{name}:{lineno}", "more than 4096 bytes of config space")
        cur.data.extend(int(t, 16) for t in tokens)
        cur.line_map.append(lineno)
    out: list[ConfigSpace] = []
    for dump in dumps:
        if not dump.data:
            raise DeviceError(f"{name}:{dump.header_line}", f"device {dump.bdf} has no hex dump")
        if len(dump.data) not in VALID_SIZES:
            last = dump.line_map[-1]
            raise DeviceError(
                f"{name}:{last}",
                f"dump of {dump.bdf} ends at {len(dump.data):#x} bytes; expected 0x40, 0x100 or "
                "0x1000 (truncated?)",
            )
        out.append(ConfigSpace.from_bytes(bytes(dump.data), name, dump.bdf, dump.line_map))
    if not out:
        raise DeviceError(name, "no device found (expected lspci -xxxx output)")
    return out


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_hex_config(
    text: str, name: str = "<hex>", bdf: str | None = None, *, lines: bool = False
) -> ConfigSpace:
    """A plain hex string (whitespace and an optional ``0x`` ignored) as a config space.

    With ``lines`` (a hex file), errors name the line they are on as ``name:line``.
    """
    text_lines = text.splitlines() or [""]
    digits: list[str] = []
    line_of_digit: list[int] = []
    for lineno, raw in enumerate(text_lines, 1):
        for word in raw.split():
            if not digits and word[:2].lower() == "0x":
                word = word[2:]
            for ch in word:
                if ch not in _HEX_DIGITS:
                    where = f"{name}:{lineno}" if lines else name
                    raise DeviceError(where, f"not hex at digit {len(digits)}: {_clip(word, 12)!r}")
                digits.append(ch)
                line_of_digit.append(lineno)
    last_line = line_of_digit[-1] if line_of_digit else 1
    where = f"{name}:{last_line}" if lines else name
    if len(digits) % 2:
        raise DeviceError(where, f"odd number of hex digits ({len(digits)})")
    data = bytes.fromhex("".join(digits))
    if len(data) not in VALID_SIZES:
        raise DeviceError(where, f"{len(data)} bytes of hex; expected 64, 256 or 4096 (truncated?)")
    return ConfigSpace.from_bytes(data, name, bdf)


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _looks_binary(blob: bytes) -> bool:
    if not blob:
        return False
    try:
        text = blob.decode("ascii")
    except UnicodeDecodeError:
        return True
    return any(ch not in "\t\n\r" and not 32 <= ord(ch) < 127 for ch in text)


def _bdf_of(path: Path) -> str | None:
    try:
        return normalize_bdf(path.resolve().name)
    except (ValueError, OSError):
        return None


def load_devices(source: str | Path) -> list[ConfigSpace]:
    """Every device in ``source``: a sysfs device dir, a binary config, lspci text or hex.

    A bare PCI address (``0000:3b:00.0``) that is not an existing path means the sysfs
    device directory ``/sys/bus/pci/devices/<address>``.
    """
    path = _source_path(source)
    name = str(source)
    if path.is_dir():
        cfg_path = path / "config"
        blob = _read_source(cfg_path, str(cfg_path))
        return [_binary(blob, str(cfg_path), _bdf_of(path))]
    blob = _read_source(path, name)
    if _looks_binary(blob):
        bdf = _bdf_of(path.parent) if path.name == "config" else None
        return [_binary(blob, name, bdf)]
    text = blob.decode("ascii")
    if not text.strip():
        raise DeviceError(name, "empty file")
    if ":" not in text:
        return [parse_hex_config(text, name, lines=True)]
    return parse_lspci(text, name)


def _source_path(source: str | Path) -> Path:
    """``source`` as a path; a bare PCI address that is no file means this host's sysfs."""
    path = Path(source)
    name = str(source)
    if not path.exists() and _BDF_RE.match(name.strip()):
        with contextlib.suppress(ValueError):
            return SYSFS_DEVICES / normalize_bdf(name)
    return path


# An lspci -xxxx dump is about 14 KiB per function; this allows thousands of them.
MAX_SOURCE_BYTES = 64 << 20


def _read_source(path: Path, name: str) -> bytes:
    """The bytes of a config-space source file, or a DeviceError.

    At most :data:`MAX_SOURCE_BYTES` are read: a source that never ends (``/dev/zero``) is
    refused instead of filling memory. A path the OS cannot take (a NUL byte, a lone
    surrogate) is a DeviceError too, not the ValueError ``open`` raises.
    """
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise DeviceError(name, f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # "embedded null byte", "surrogates not allowed"
        raise DeviceError(name, f"cannot read: not a usable path ({exc})") from None
    if len(blob) > MAX_SOURCE_BYTES:
        raise DeviceError(name, f"more than {MAX_SOURCE_BYTES >> 20} MiB: not a config-space dump")
    return blob


def _binary(blob: bytes, name: str, bdf: str | None) -> ConfigSpace:
    if len(blob) not in VALID_SIZES:
        raise DeviceError(
            name, f"binary config is {len(blob)} bytes; expected 64, 256 or 4096 (truncated?)"
        )
    return ConfigSpace.from_bytes(blob, name, bdf)


def load_device(source: str | Path, bdf: str | None = None) -> ConfigSpace:
    """One device from ``source``; with several devices in a dump, ``bdf`` picks one."""
    devices = load_devices(source)
    if bdf is not None:
        try:
            want = normalize_bdf(bdf)
        except ValueError as exc:
            raise DeviceError(str(source), str(exc)) from None
        for dev in devices:
            if dev.bdf == want:
                return dev
        have = ", ".join(d.bdf or "unknown address" for d in devices)
        raise DeviceError(str(source), f"no device {want} in the dump (have: {have})")
    if len(devices) > 1:
        have = ", ".join(d.bdf or "?" for d in devices)
        raise DeviceError(
            str(source), f"{len(devices)} devices in the dump; pick one with --bdf ({have})"
        )
    return devices[0]


# --- sysfs: the host's functions and the root port above each -----------------------------------
COMPLETER_TEXT = {
    TphCompleter.NONE: "none",
    TphCompleter.TPH: "TPH only",
    TphCompleter.RESERVED: "reserved encoding 2",
    TphCompleter.EXT_TPH: "TPH and Extended TPH",
}


def sysfs_functions(root: str | Path = "/sys") -> list[Path]:
    """The device directories of every PCI function under a sysfs ``root`` (``/sys`` or a copy
    made with its symbolic links, e.g. ``cp -a``), in address order."""
    devices = Path(root) / "bus" / "pci" / "devices"
    try:
        entries = list(devices.iterdir())
    except OSError as exc:
        raise DeviceError(str(devices), f"cannot list: {exc.strerror or exc}") from None
    named = [(_bdf_of(e), e) for e in entries]
    return [path for bdf, path in sorted((b, e) for b, e in named if b is not None)]


def sysfs_device_dir(source: str | Path) -> Path | None:
    """The sysfs-style device directory ``source`` names (the directory itself, its
    ``config`` file, or a bare address on this host), resolved; None for dump files."""
    path = _source_path(source)
    if path.name == "config" and not path.is_dir():
        path = path.parent
    if not path.is_dir() or not (path / "config").exists():
        return None
    with contextlib.suppress(OSError):
        return path.resolve()
    return None


@dataclass(frozen=True, slots=True)
class RootPortCheck:
    """The root port above a device and its TPH Completer field, found as Linux
    ``pcie_find_root_port`` finds it: the function itself, then each bridge above it (its
    parent directories in sysfs), the first PCI Express root port wins.

    ``kind`` is ``"root-port"`` (``port`` holds its config space), ``"integrated"`` (a
    root-complex integrated endpoint: it has no root port, and Linux skips the check),
    ``"missing"`` (no root port between the function and its host bridge: Linux then takes
    completer 0) or ``"unknown"`` (``problem`` says why: a config space on the way could not
    be read far enough, or the directories above are not a sysfs device tree).
    """

    kind: str
    port: ConfigSpace | None = None
    problem: str | None = None

    @property
    def completer(self) -> TphCompleter | None:
        """What caps TPH for the function; None when nothing does (integrated) or unknown."""
        if self.port is not None:
            return self.port.tph_completer
        return TphCompleter.NONE if self.kind == "missing" else None

    @property
    def summary(self) -> str:
        """One line for people, e.g. ``root port 0000:00:01.0: TPH Completer none``."""
        if self.port is not None:
            completer = self.completer
            text = COMPLETER_TEXT[completer] if completer is not None else "unknown"
            return f"root port {self.port.bdf}: TPH Completer {text}"
        if self.kind == "integrated":
            return "root-complex integrated endpoint: no root port (Linux skips the check)"
        if self.kind == "missing":
            return "no root port above the function (Linux then enables no TPH)"
        return self.problem or "root port unknown"


def check_root_port(device_dir: str | Path, cfg: ConfigSpace | None = None) -> RootPortCheck:
    """The :class:`RootPortCheck` of the sysfs device directory ``device_dir`` (``cfg``: its
    config space, when already loaded). Reads the config space of the bridges above it; as a
    non-root user those give 64 bytes only and the result is ``"unknown"``."""
    here = Path(device_dir).resolve()
    chain = [here]
    top: Path | None = None
    for parent in here.parents:  # up to the host bridge's pciDDDD:BB directory
        if _bdf_of(parent) is None:
            top = parent
            break
        chain.append(parent)
    for i, path in enumerate(chain):
        try:
            space = cfg if i == 0 and cfg is not None else load_devices(path)[0]
        except DeviceError as exc:
            return RootPortCheck("unknown", problem=f"root port unknown: {exc}")
        if i == 0 and space.pcie_type == PcieType.RC_END:
            return RootPortCheck("integrated")
        if space.pcie_type == PcieType.ROOT_PORT:
            if space.bdf is None:
                space = ConfigSpace.from_bytes(space.data, space.source, _bdf_of(path))
            return RootPortCheck("root-port", space)
        if space.size == PCI_STD_HEADER_SIZEOF:
            return RootPortCheck(
                "unknown",
                problem=(
                    f"root port unknown: only 64 bytes of {space.source} are readable (read "
                    "as root to see the PCI Express capabilities)"
                ),
            )
    if top is None or not _HOST_BRIDGE_DIR.match(top.name):
        return RootPortCheck(
            "unknown",
            problem=(
                f"root port unknown: {chain[-1]} is not below a host bridge directory "
                "(pciDDDD:BB): not a sysfs device tree, or copied without its parents"
            ),
        )
    return RootPortCheck("missing")


_HOST_BRIDGE_DIR = re.compile(r"^pci[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}$")
