"""Device config-space model: loaders, safe capability walks, TPH and MSI-X views.

Sources: a sysfs ``config`` file (binary, 64/256/4096 bytes) or a sysfs device directory,
``lspci -x``/``-xxx``/``-xxxx`` text (one or many devices, picked by BDF; the format pciutils'
``lib/dump.c`` reads with ``lspci -F``), and plain hex strings.

Walks follow Linux ``drivers/pci/pci.c`` (``__pci_find_next_cap_ttl``: at most 48 standard
capabilities, pointers below 0x40 end the list, low two bits ignored; ``pci_find_next_ext_capability``:
extended list starts at 0x100, at most (4096 - 256) / 8 entries, next pointers below 0x100 end
it). Anything malformed raises :class:`DeviceError` naming the file and dump line, or, where the
device is still usable, becomes a warning; nothing here can loop or index past the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DeviceError
from .layouts import (
    EXT_CAP_HEADER,
    MSIX_FLAGS,
    MSIX_TABLE_BIR,
    PCI_STATUS_REG,
    TPH_CAP,
    TPH_CTRL,
)
from .spec import (
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
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
    StLocation,
)

__all__ = [
    "Capability",
    "ConfigSpace",
    "MsixInfo",
    "TphInfo",
    "load_device",
    "load_devices",
    "normalize_bdf",
    "parse_hex_config",
    "parse_lspci",
]

PCI_FIND_CAP_TTL = 48
PCI_EXT_CAP_TTL = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8
VALID_SIZES = (64, PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE)

# Fixed capability lengths, from Linux vfio_pci_config.c pci_cap_length / pci_ext_cap_length,
# for the byte-ownership map. Variable or unknown ones are left as None.
STD_CAP_NAMES = {
    0x01: "Power Management",
    0x05: "MSI",
    0x09: "Vendor Specific",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA",
    0x13: "Advanced Features",
}
STD_CAP_LENGTHS = {0x01: 8, 0x03: 8, 0x04: 4, 0x06: 8, 0x0A: 4, 0x0D: 8, 0x11: 12, 0x12: 8, 0x13: 6}
EXT_CAP_NAMES = {
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
    0x01: 0x48,  # PCI_ERR_ROOT_ERR_SRC + 4
    0x03: 0x0C,  # PCI_EXT_CAP_DSN_SIZEOF
    0x0D: 0x08,  # PCI_EXT_CAP_ACS_SIZEOF (without egress vector)
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
    table_ok: bool  # the in-capability table fits and overlaps nothing
    problems: tuple[str, ...]

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
        if self.location is StLocation.CAP:
            return PCI_TPH_BASE_SIZEOF + 2 * self.table_size
        return PCI_TPH_BASE_SIZEOF

    @property
    def region_length(self) -> int:
        """:attr:`length` rounded up to a dword: what the filter claims (padding is dropped)."""
        return (self.length + 3) & ~3


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


@dataclass(frozen=True)
class ConfigSpace:
    """A snapshot of one function's config space with its capabilities decoded.

    Build it with :func:`ConfigSpace.from_bytes` or the loaders; construction walks both
    capability lists once and raises :class:`DeviceError` on a malformed space.
    """

    data: bytes
    source: str = "<config>"
    bdf: str | None = None
    line_map: tuple[int, ...] = ()  # dump line of each 16-byte row, for text sources
    caps: tuple[Capability, ...] = field(default=(), compare=False)
    tph: TphInfo | None = field(default=None, compare=False)
    msix: MsixInfo | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

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
        caps, warnings = _walk(probe)
        tph, msix = None, None
        tph_warnings: tuple[str, ...] = ()
        for cap in caps:
            if cap.kind == "ext" and cap.cap_id == PCI_EXT_CAP_ID_TPH and tph is None:
                tph = _tph_info(probe, cap, caps)
                tph_warnings = tph.problems
            elif cap.kind == "std" and cap.cap_id == PCI_CAP_ID_MSIX and msix is None:
                msix = MsixInfo(
                    cap.offset,
                    probe.u16(cap.offset + PCI_MSIX_FLAGS),
                    probe.u32(cap.offset + PCI_MSIX_TABLE),
                    probe.u32(cap.offset + PCI_MSIX_PBA),
                )
        if tph is not None and tph.location is StLocation.MSIX and msix is None:
            tph_warnings += ("ST table location is MSI-X but the device has no MSI-X capability",)
            tph = TphInfo(tph.offset, tph.cap_raw, tph.ctrl_raw, (), False, tph_warnings)
        return cls(
            bytes(data),
            source,
            bdf,
            tuple(line_map),
            tuple(caps),
            tph,
            msix,
            tuple(warnings) + tph_warnings,
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
        are copied to the first free dword-aligned spot after this device's ext capabilities
        and linked in as the last entry.
        """
        if overlay.tph is None:
            raise DeviceError(overlay.source, "overlay source has no TPH capability")
        if self.tph is not None:
            return self
        tph = overlay.tph
        length = tph.region_length
        blob = overlay.data[tph.offset : tph.offset + length]
        data = bytearray(self.data.ljust(PCI_CFG_SPACE_EXP_SIZE, b"\x00"))
        if len(self.data) < PCI_CFG_SPACE_EXP_SIZE:
            data[PCI_CFG_SPACE_SIZE:] = bytes(PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE)
        ext = [c for c in self.caps if c.kind == "ext"]
        used_end = max((c.end or c.offset + 4) for c in ext) if ext else PCI_CFG_SPACE_SIZE
        place = (used_end + 3) & ~3
        if not ext:
            place = PCI_CFG_SPACE_SIZE
        if place + length > PCI_CFG_SPACE_EXP_SIZE:
            raise DeviceError(self.source, "no room in extended config space for a TPH overlay")
        header = EXT_CAP_HEADER["next"].put(int.from_bytes(blob[:4], "little"), 0)
        data[place : place + length] = header.to_bytes(4, "little") + blob[4:]
        if ext:
            last = ext[-1]
            hdr = int.from_bytes(data[last.offset : last.offset + 4], "little")
            hdr = EXT_CAP_HEADER["next"].put(hdr, place)
            data[last.offset : last.offset + 4] = hdr.to_bytes(4, "little")
        return ConfigSpace.from_bytes(bytes(data), f"{self.source}+tph({overlay.source})", self.bdf)


def _walk(cfg: ConfigSpace) -> tuple[list[Capability], list[str]]:
    caps: list[Capability] = []
    warnings: list[str] = []
    size = cfg.size
    if size < 64:
        return caps, warnings
    status = cfg.u16(PCI_STATUS)
    if PCI_STATUS_REG["capabilities_list"].get(status):
        if size <= PCI_CAPABILITY_LIST:
            raise DeviceError(cfg.source, "capability pointer outside the dump")
        if size == 64:
            warnings.append(
                "only the 64-byte header is present (lspci -x); capabilities need -xxx or -xxxx"
            )
        else:
            caps.extend(_walk_std(cfg))
    if size < PCI_CFG_SPACE_EXP_SIZE:
        if size == PCI_CFG_SPACE_SIZE:
            warnings.append(
                "config space is 256 bytes: extended capabilities (TPH) are not visible; "
                "dump with lspci -xxxx as root or read the 4096-byte sysfs config"
            )
        return caps, warnings
    caps.extend(_walk_ext(cfg))
    return caps, warnings


def _walk_std(cfg: ConfigSpace) -> Iterator[Capability]:
    pos = cfg.u8(PCI_CAPABILITY_LIST)
    ptr_at = PCI_CAPABILITY_LIST
    seen: list[int] = []
    for _ in range(PCI_FIND_CAP_TTL):
        if pos < 0x40:
            if pos != 0:
                raise DeviceError(
                    cfg.where(ptr_at),
                    f"capability pointer {pos:#04x} at {ptr_at:#x} points into the header",
                )
            return
        pos &= ~3
        if pos in seen:
            chain = " -> ".join(f"{p:#x}" for p in [*seen, pos])
            raise DeviceError(cfg.where(ptr_at), f"capability loop: {chain}")
        if pos + 2 > cfg.size or pos >= PCI_CFG_SPACE_SIZE:
            raise DeviceError(
                cfg.where(ptr_at), f"capability pointer {pos:#x} at {ptr_at:#x} is past the end"
            )
        seen.append(pos)
        cap_id = cfg.u8(pos)
        if cap_id == 0xFF:
            raise DeviceError(cfg.where(pos), f"capability at {pos:#x} reads 0xff (no device?)")
        length = STD_CAP_LENGTHS.get(cap_id)
        if length is not None and pos + length > PCI_CFG_SPACE_SIZE:
            raise DeviceError(
                cfg.where(pos), f"capability {cap_id:#04x} at {pos:#x} runs past 0x100"
            )
        yield Capability("std", cap_id, pos, length)
        ptr_at = pos + 1
        pos = cfg.u8(pos + 1)
    raise DeviceError(cfg.where(ptr_at), f"more than {PCI_FIND_CAP_TTL} capabilities (loop?)")


def _walk_ext(cfg: ConfigSpace) -> Iterator[Capability]:
    pos = PCI_CFG_SPACE_SIZE
    ptr_at = pos
    header = cfg.u32(pos)
    if header in (0, 0xFFFFFFFF):
        return
    seen: list[int] = []
    for _ in range(PCI_EXT_CAP_TTL):
        if pos in seen:
            chain = " -> ".join(f"{p:#x}" for p in [*seen, pos])
            raise DeviceError(cfg.where(ptr_at), f"extended capability loop: {chain}")
        if pos + 4 > cfg.size:
            raise DeviceError(
                cfg.where(ptr_at), f"extended capability pointer {pos:#x} is past the end"
            )
        seen.append(pos)
        header = cfg.u32(pos)
        cap_id = EXT_CAP_HEADER["id"].get(header)
        version = EXT_CAP_HEADER["version"].get(header)
        nxt = EXT_CAP_HEADER["next"].get(header) & ~3
        length = EXT_CAP_LENGTHS.get(cap_id)
        if cap_id == PCI_EXT_CAP_ID_TPH:
            length = _tph_length(cfg.u32(pos + PCI_TPH_CAP)) if pos + 8 <= cfg.size else None
        if not (cap_id == 0 and version == 0 and pos == PCI_CFG_SPACE_SIZE):
            yield Capability("ext", cap_id, pos, length, version)
        if nxt == 0:
            return
        if nxt < PCI_CFG_SPACE_SIZE:
            raise DeviceError(
                cfg.where(pos),
                f"extended capability at {pos:#x} has next pointer {nxt:#x} below 0x100",
            )
        ptr_at = pos
        pos = nxt
    raise DeviceError(cfg.where(ptr_at), "too many extended capabilities (loop?)")


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
    info = TphInfo(pos, cap_raw, ctrl_raw, (), True, ())
    table_ok = info.location in (StLocation.CAP, StLocation.MSIX)
    entries: tuple[int, ...] = ()
    if info.location is StLocation.CAP:
        n = info.table_size
        end = pos + info.length
        if n > PCI_TPH_ST_TABLE_MAX_IN_CAP:
            problems.append(
                f"ST table in the capability has {n} entries; PCIe allows at most "
                f"{PCI_TPH_ST_TABLE_MAX_IN_CAP} there"
            )
        if end > cfg.size:
            problems.append(f"ST table ({n} entries) runs past the end of config space")
            table_ok = False
        for other in caps:
            if other.offset != pos and pos < other.offset < (end + 3) & ~3:
                problems.append(
                    f"ST table ({n} entries, up to {end:#x}) overlaps {other.name} at "
                    f"{other.offset:#x}"
                )
                table_ok = False
        if table_ok:
            base = info.table_offset
            entries = tuple(cfg.u16(base + 2 * i) for i in range(n))
    elif info.location is StLocation.RESERVED:
        problems.append("ST table location is the reserved encoding 3")
    if not info.no_st_mode:
        problems.append("No ST mode supported bit is clear (PCIe requires it)")
    return TphInfo(pos, cap_raw, ctrl_raw, entries, table_ok, tuple(problems))


# --- loaders --------------------------------------------------------------------------------
_DEV_LINE = re.compile(r"^((?:[0-9a-fA-F]{4,5}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])(?: |$)")
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
            cur = _Dump(bdf, lineno)
            dumps.append(cur)
            continue
        d = _DATA_LINE.match(line)
        if not d:
            raise DeviceError(f"{name}:{lineno}", f"not an lspci dump line: {_clip(line)}")
        if cur is None:
            raise DeviceError(f"{name}:{lineno}", "hex data before any device line (BB:DD.F)")
        off = int(d.group(1), 16)
        if off != len(cur.data):
            raise DeviceError(
                f"{name}:{lineno}",
                f"offset {off:#x} where {len(cur.data):#x} was expected (missing or repeated line)",
            )
        if off % 16:
            raise DeviceError(f"{name}:{lineno}", f"offset {off:#x} is not a multiple of 16")
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
    return out


def parse_hex_config(text: str, name: str = "<hex>", bdf: str | None = None) -> ConfigSpace:
    """A plain hex string (whitespace and an optional ``0x`` ignored) as a config space."""
    compact = "".join(text.split())
    if compact[:2].lower() == "0x":
        compact = compact[2:]
    if len(compact) % 2:
        raise DeviceError(name, f"odd number of hex digits ({len(compact)})")
    try:
        data = bytes.fromhex(compact)
    except ValueError:
        bad = next((i for i, ch in enumerate(compact) if ch not in "0123456789abcdefABCDEF"), 0)
        raise DeviceError(name, f"not hex at digit {bad}: {compact[bad:bad + 8]!r}") from None
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


def load_devices(source: str | Path) -> list[ConfigSpace]:
    """Every device in ``source``: a sysfs device dir, a binary config, lspci text or hex."""
    path = Path(source)
    name = str(source)
    if path.is_dir():
        cfg_path = path / "config"
        bdf = None
        try:
            bdf = normalize_bdf(path.resolve().name)
        except ValueError:
            pass
        try:
            blob = cfg_path.read_bytes()
        except OSError as exc:
            raise DeviceError(str(cfg_path), f"cannot read: {exc.strerror or exc}") from None
        return [_binary(blob, str(cfg_path), bdf)]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DeviceError(name, f"cannot read: {exc.strerror or exc}") from None
    if _looks_binary(blob):
        bdf = None
        try:
            bdf = normalize_bdf(path.resolve().parent.name) if path.name == "config" else None
        except ValueError:
            pass
        return [_binary(blob, name, bdf)]
    text = blob.decode("ascii")
    if not text.strip():
        raise DeviceError(name, "empty file")
    if re.fullmatch(r"\s*(0x)?[0-9a-fA-F\s]+", text) and not _DEV_LINE.search(text):
        return [parse_hex_config(text, name)]
    return parse_lspci(text, name)


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
        want = normalize_bdf(bdf)
        for dev in devices:
            if dev.bdf == want:
                return dev
        have = ", ".join(d.bdf or "?" for d in devices) or "none"
        raise DeviceError(str(source), f"no device {want} in the dump (have: {have})")
    if len(devices) > 1:
        have = ", ".join(d.bdf or "?" for d in devices)
        raise DeviceError(str(source), f"{len(devices)} devices in the dump; pick one with --bdf ({have})")
    return devices[0]
