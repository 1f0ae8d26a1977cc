"""A byte-level simulated PCIe function (config space and MSI-X table) and its builder.

Written from the register facts (``/work/shared/reference/tph-registers.md``, PCIe and Linux
``pci_regs.h``), not from the engine: the bit positions are restated here on purpose so that the
engine tests' oracle shares no model with ``tphtrap``. Only the byte building of the fixture
reuses :func:`tphtrap.synth.build_config`; everything the oracle judges by (which bytes are
read-only, where the ST entries are, which table is usable) is computed here from the shape.

The simulated device:

* applies every write byte by byte, in order: read-only bytes (capability headers, the TPH
  capability register, the padding after the ST table, IDs, MSI-X table location) keep their
  value, the TPH control register keeps its RsvdP bits (only ST Mode 2:0 and Requester Enable
  9:8 are writable), MSI-X Vector Control holds whatever dword is written;
* resets on Initiate FLR (PCIe Device Control bit 15, Advanced Features control bit 0) and on
  PMCSR D3hot -> D0 with No_Soft_Reset clear, and on :meth:`SimDevice.reset` (the hypervisor's
  reset), with one of the device behaviours of :class:`ResetKind`;
* knows what it does not know: MSI-X steering tags nobody wrote, and ST entries after a reset
  under the "kept or zeroed" uncertainty, are sets of possible values (``None``: any value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from tphtrap.events import DeviceWrite
from tphtrap.spec import StLocation
from tphtrap.synth import ExtCapSpec, MsixSpec, TphSpec, build_config

__all__ = [
    "AF_CTRL",
    "CAP_DS",
    "CAP_EXT",
    "CAP_IV",
    "CAP_NS",
    "CFG_SIZE",
    "CTRL",
    "CTRL_RW",
    "DEVCTL",
    "ENTRY",
    "LOC_CAP",
    "LOC_MSIX",
    "LOC_NONE",
    "LOC_RESERVED",
    "OTHER",
    "PAD",
    "PMCSR",
    "RO",
    "VC",
    "VC_POWER_ON",
    "Device",
    "ResetKind",
    "Shape",
    "SimDevice",
    "TphCap",
    "TphShape",
    "build_device",
]

CFG_SIZE = 4096
# TPH Requester capability (PCIe 7.9.13; pci_regs.h PCI_TPH_*)
TPH_ID = 0x17
CAP_NS, CAP_IV, CAP_DS, CAP_EXT = 0x1, 0x2, 0x4, 0x100
LOC_SHIFT, SIZE_SHIFT = 9, 16
LOC_NONE, LOC_CAP, LOC_MSIX, LOC_RESERVED = 0, 1, 2, 3
CTRL_MODE, CTRL_REQ = 0x007, 0x300
CTRL_RW = CTRL_MODE | CTRL_REQ  # every other control bit is RsvdP
ST_TABLE_MAX_IN_CAP = 64
# Extended capabilities placed around TPH (ids and the bytes each owns for an endpoint)
AER_ID, AER_AT, AER_LEN = 0x01, 0x100, 0x2C  # vfio's length when not a root port
DSN_ID, DSN_AT, DSN_LEN = 0x03, 0x400, 0x0C
LTR_ID, LTR_LEN = 0x18, 0x08
# Standard capabilities as tphtrap.synth lays them out, plus an Advanced Features capability
PM_AT, MSIX_AT, EXP_AT, AF_AT = 0x40, 0x70, 0xA0, 0xE0
PMCSR = PM_AT + 4  # PowerState 1:0, No_Soft_Reset bit 3 (read-only)
PM_NO_SOFT_RESET = 0x08
DEVCAP = EXP_AT + 4
DEVCAP_FLR = 0x1000_0000
DEVCTL = EXP_AT + 8  # bit 15: Initiate Function Level Reset (reads 0)
AF_ID, AF_CAP_FLR, AF_CTRL = 0x13, 0x02, AF_AT + 4  # AF control bit 0: Initiate FLR
# MSI-X table entry: Vector Control at +12: bit 0 mask, bits 31:16 steering tag (location MSI-X)
MSIX_ENTRY, VC = 16, 12
VC_POWER_ON = (0x01, 0x00)  # bytes +12, +13 after reset: masked, reserved bits 0

PossibleTags = frozenset[int] | None  # None: any value


@dataclass(frozen=True)
class TphShape:
    """One TPH Requester capability as built: supported modes, table, initial control."""

    no_st: bool = True
    iv: bool = True
    ds: bool = False
    ext: bool = False
    location: int = LOC_CAP
    size: int = 8  # N (the register holds N-1)
    entries: tuple[int, ...] = ()
    ctrl: int = 0  # raw control at power-up, reserved bits included

    def cap(self) -> int:
        """The read-only capability register (PCI_TPH_CAP)."""
        modes = CAP_NS * self.no_st | CAP_IV * self.iv | CAP_DS * self.ds | CAP_EXT * self.ext
        return modes | self.location << LOC_SHIFT | (self.size - 1) << SIZE_SHIFT


@dataclass(frozen=True)
class Shape:
    """A whole function: its TPH capabilities, neighbours, MSI-X and reset capabilities."""

    tph: TphShape = TphShape()
    tph_at: int = 0x148
    second_tph: TphShape | None = None
    second_at: int = 0x200
    neighbour: str = "none"  # "adjacent": an LTR right after TPH; "overlap": inside its table
    msix_size: int = 4
    bir: int = 2
    table_off: int = 0x1000
    af: bool = False
    no_soft_reset: bool = False


@dataclass(frozen=True)
class TphCap:
    """Where one TPH capability's registers are, as the oracle sees them."""

    offset: int
    cap: int
    end: int  # past its last dword (table and padding included), clipped to config space
    entry_count: int  # ST entries present in config space (table in the capability)
    valid_table: bool  # a standard ST table the engine can filter

    @property
    def ctrl_at(self) -> int:
        return self.offset + 8

    @property
    def entries_at(self) -> int:
        return self.offset + 0xC

    @property
    def location(self) -> int:
        return (self.cap >> LOC_SHIFT) & 3

    @property
    def table_size(self) -> int:
        return ((self.cap >> SIZE_SHIFT) & 0x7FF) + 1

    def supports(self, bit: int) -> bool:
        return bool(self.cap & bit)


# Per-byte roles inside a TPH capability (Device.tph_bytes).
RO, PAD, CTRL, ENTRY, OTHER = "ro", "pad", "ctrl", "entry", "other"


@dataclass(frozen=True)
class Device:
    """A built function: its power-up bytes and the facts the oracle judges by."""

    shape: Shape
    data: bytes
    tph_caps: tuple[TphCap, ...]
    ext_caps: tuple[tuple[int, int, int], ...]  # (offset, id, length)
    wmask: bytes  # writable bits of each config byte
    # offset -> (role, cap index, entry index or control byte); only inside TPH capabilities
    tph_bytes: dict[int, tuple[str, int, int]] = field(repr=False)

    @property
    def msix_tags(self) -> bool:
        """Vector Control bits 31:16 are steering tags (some TPH capability says so)."""
        return any(c.location == LOC_MSIX for c in self.tph_caps)

    @property
    def trappable(self) -> bool:
        return len(self.tph_caps) == 1 and self.tph_caps[0].valid_table

    @property
    def table_end(self) -> int:
        return self.shape.table_off + MSIX_ENTRY * self.shape.msix_size

    def vc_field(self, bar: int, off: int) -> tuple[int, int] | None:
        """(entry, byte within the entry) when ``bar``/``off`` is in the MSI-X table."""
        s = self.shape
        if bar != s.bir or not s.table_off <= off < self.table_end:
            return None
        return divmod(off - s.table_off, MSIX_ENTRY)

    def tph_extent(self) -> list[tuple[int, int]]:
        return [(c.offset, c.end) for c in self.tph_caps]


def _tph_body(t: TphShape) -> bytes:
    body = t.cap().to_bytes(4, "little") + t.ctrl.to_bytes(4, "little")
    if t.location == LOC_CAP:
        entries = list(t.entries[: t.size]) + [0] * (t.size - len(t.entries))
        body += b"".join(e.to_bytes(2, "little") for e in entries)
    return body


def _tph_len(t: TphShape) -> int:
    return 0xC + 2 * t.size if t.location == LOC_CAP else 0xC


def _claimed(at: int, length: int) -> int:
    return (at + length + 3) & ~3


def build_device(shape: Shape) -> Device:
    """The 4096 power-up bytes of ``shape`` and where every register is."""
    t = shape.tph
    extras: list[ExtCapSpec] = []
    ltr_at = None
    if shape.neighbour == "adjacent":
        ltr_at = _claimed(shape.tph_at, _tph_len(t))
    elif shape.neighbour == "overlap":
        ltr_at = shape.tph_at + 0x14  # inside a table of five or more entries
    if ltr_at is not None and ltr_at + LTR_LEN <= CFG_SIZE:
        extras.append(ExtCapSpec(ltr_at, LTR_ID, 1, bytes([0x03, 0x10, 0x03, 0x10])))
    else:
        ltr_at = None
    if shape.second_tph is not None:
        extras.append(ExtCapSpec(shape.second_at, TPH_ID, 1, _tph_body(shape.second_tph)))
    data = bytearray(
        build_config(
            tph=TphSpec(
                no_st=t.no_st,
                interrupt_vector=t.iv,
                device_specific=t.ds,
                extended=t.ext,
                location=StLocation(t.location),
                table_size=t.size,
                entries=t.entries,
                st_mode=t.ctrl & CTRL_MODE,
                req_enable=(t.ctrl & CTRL_REQ) >> 8,
                ctrl_reserved=t.ctrl & ~CTRL_RW,
            ),
            msix=MsixSpec(
                table_size=shape.msix_size,
                bir=shape.bir,
                table_offset=shape.table_off,
                pba_bir=shape.bir,
                pba_offset=shape.table_off + 0x1000,
            ),
            tph_at=shape.tph_at,
            dsn_at=DSN_AT,
            extra_ext=tuple(extras),
        )
    )
    _put(data, DEVCAP, 4, int.from_bytes(data[DEVCAP : DEVCAP + 4], "little") | DEVCAP_FLR)
    if shape.no_soft_reset:
        data[PMCSR] |= PM_NO_SOFT_RESET
    if shape.af:
        data[EXP_AT + 1] = AF_AT  # PCIe -> AF: the last standard capability
        data[AF_AT : AF_AT + 6] = bytes([AF_ID, 0x00, 0x06, 0x01 | AF_CAP_FLR, 0x00, 0x00])
    ext = [(AER_AT, AER_ID, AER_LEN), (DSN_AT, DSN_ID, DSN_LEN)]
    ext.append((shape.tph_at, TPH_ID, _tph_len(t)))
    if shape.second_tph is not None:
        ext.append((shape.second_at, TPH_ID, _tph_len(shape.second_tph)))
    if ltr_at is not None:
        ext.append((ltr_at, LTR_ID, LTR_LEN))
    ext.sort()
    caps = [_tph_cap(shape.tph_at, t, ext)]
    if shape.second_tph is not None:
        caps.append(_tph_cap(shape.second_at, shape.second_tph, ext))
    wmask, roles = _byte_roles(shape, caps, ext)
    return Device(shape, bytes(data), tuple(caps), tuple(ext), bytes(wmask), roles)


def _put(data: bytearray, off: int, width: int, value: int) -> None:
    data[off : off + width] = value.to_bytes(width, "little")


def _tph_cap(at: int, t: TphShape, ext: list[tuple[int, int, int]]) -> TphCap:
    cap = t.cap()
    location = (cap >> LOC_SHIFT) & 3
    size = ((cap >> SIZE_SHIFT) & 0x7FF) + 1
    length = 0xC + 2 * size if location == LOC_CAP else 0xC
    claimed = _claimed(at, length)
    others = [o for o, _, _ in ext if o != at]
    overlap = min((o for o in others if at < o < claimed), default=None)
    valid = location == LOC_MSIX
    entry_count = 0
    if location == LOC_CAP:
        valid = size <= ST_TABLE_MAX_IN_CAP and claimed <= CFG_SIZE and overlap is None
        limit = min(CFG_SIZE, overlap if overlap is not None else CFG_SIZE)
        entry_count = max(0, min(size, (limit - at - 0xC) // 2))
    return TphCap(at, cap, min(claimed, CFG_SIZE), entry_count, valid)


def _byte_roles(
    shape: Shape, caps: list[TphCap], ext: list[tuple[int, int, int]]
) -> tuple[bytearray, dict[int, tuple[str, int, int]]]:
    wmask = bytearray([0xFF]) * CFG_SIZE

    def ro(off: int, n: int = 1, keep: int = 0) -> None:
        for i in range(off, off + n):
            wmask[i] = keep

    ro(0x00, 4)  # vendor, device
    ro(0x06, 2)  # status: Capabilities List is read-only, the rest RW1C (not modelled)
    ro(0x08, 4)  # revision, class
    ro(0x0E)  # header type
    ro(0x34)  # capabilities pointer
    std = [PM_AT, MSIX_AT, EXP_AT] + ([AF_AT] if shape.af else [])
    for at in std:
        ro(at, 2)  # id, next
    ro(PM_AT + 2, 2)  # PMC
    ro(PMCSR, 1, 0x03)  # PowerState; No_Soft_Reset is read-only
    ro(PMCSR + 1, 1, 0x01)  # PME_En
    ro(PMCSR + 2, 2)
    ro(MSIX_AT + 2, 1)  # table size
    ro(MSIX_AT + 3, 1, 0xC0)  # function mask, enable
    ro(MSIX_AT + 4, 8)  # table and PBA location
    ro(EXP_AT + 2, 2)  # PCIe capabilities
    ro(DEVCAP, 4)
    ro(DEVCTL + 1, 1, 0x7F)  # Initiate FLR reads 0
    ro(EXP_AT + 0x24, 4)  # DevCap2
    if shape.af:
        ro(AF_AT + 2, 4)  # length, AF capabilities, control (FLR reads 0), status
    roles: dict[int, tuple[str, int, int]] = {}
    for k, c in enumerate(caps):
        inside_other = {
            off
            for at, _, length in ext
            if at != c.offset
            for off in range(at, min(at + length, CFG_SIZE))
        }
        for off in range(c.offset, c.end):
            rel = off - c.offset
            if rel < 8:
                roles[off] = (RO, k, 0)
                wmask[off] = 0
            elif rel < 0xC:
                roles[off] = (CTRL, k, rel - 8)
                wmask[off] = (CTRL_RW >> (8 * (rel - 8))) & 0xFF
            elif (rel - 0xC) // 2 < c.entry_count:
                roles[off] = (ENTRY, k, (rel - 0xC) // 2)
            elif off in inside_other:
                roles[off] = (OTHER, k, 0)  # another capability's byte: which one is unknown
            else:
                roles[off] = (PAD, k, 0)
                wmask[off] = 0
    for at, _, _ in ext:
        ro(at, 4)  # extended capability headers
    return wmask, roles


class ResetKind(Enum):
    """What a device keeps over a reset (PCIe says zeroed; plan for devices that keep)."""

    ZEROED = "control and tags zeroed"
    TAGS_KEPT = "control zeroed, tags kept"
    TAGS_EITHER = "control zeroed, tags kept or zeroed (unknown which)"
    KEPT = "control and tags kept"

    def __repr__(self) -> str:
        return f"ResetKind.{self.name}"


ResetChooser = Callable[[], ResetKind]


class SimDevice:
    """The device: config bytes, MSI-X table bytes per BAR, steering-tag uncertainty."""

    def __init__(self, device: Device, choose_reset: ResetChooser) -> None:
        self.device = device
        self.choose_reset = choose_reset
        self.cfg = bytearray(device.data)
        self.bars: dict[int, dict[int, int]] = {}  # known BAR bytes; absent: never written
        # Config ST entries whose value is only known to be one of a set: (cap, entry) -> set.
        self.entry_alt: dict[tuple[int, int], frozenset[int]] = {}
        # MSI-X steering tags (bits 31:16 of Vector Control) when they are tags: None = any.
        n = device.shape.msix_size if device.msix_tags else 0
        self.vc_tags: list[PossibleTags] = [None] * n
        self.resets = 0

    # --- state -----------------------------------------------------------------------------
    def copy(self) -> SimDevice:
        out = SimDevice(self.device, self.choose_reset)
        out.cfg = bytearray(self.cfg)
        out.bars = {b: dict(m) for b, m in self.bars.items()}
        out.entry_alt = dict(self.entry_alt)
        out.vc_tags = list(self.vc_tags)
        return out

    def state(self) -> tuple[bytes, object, object, object]:
        return (bytes(self.cfg), repr(sorted(self.bars.items())), self.entry_alt, self.vc_tags)

    def snapshot(self, size: int = CFG_SIZE) -> bytes:
        """What the hypervisor reads from config space: uncertain entries become concrete."""
        self.entry_alt.clear()
        return bytes(self.cfg[:size])

    def u32(self, off: int) -> int:
        return int.from_bytes(self.cfg[off : off + 4], "little")

    def entry_values(self, cap: int, i: int) -> PossibleTags:
        """The values config ST entry ``i`` of TPH capability ``cap`` may hold."""
        alt = self.entry_alt.get((cap, i))
        if alt is not None:
            return alt
        at = self.device.tph_caps[cap].entries_at + 2 * i
        return frozenset({int.from_bytes(self.cfg[at : at + 2], "little")})

    # --- writes ----------------------------------------------------------------------------
    def apply(self, w: DeviceWrite) -> bool:
        """Perform one device write; True when it reset the function."""
        if w.space == "config":
            return self.write_config(w.offset, w.width, w.value)
        assert w.bar is not None, f"BAR write without a BAR index: {w}"
        self.write_bar(w.bar, w.offset, w.width, w.value)
        return False

    def write_config(self, off: int, width: int, value: int) -> bool:
        assert off >= 0 and off + width <= CFG_SIZE, f"config write {off:#x}/{width} out of range"
        old_state = self.cfg[PMCSR] & 3
        flr = False
        for k in range(width):
            pos, byte = off + k, (value >> (8 * k)) & 0xFF
            flr |= self._flr_byte(pos, byte)
            m = self.device.wmask[pos]
            self.cfg[pos] = (self.cfg[pos] & ~m) | (byte & m)
            role = self.device.tph_bytes.get(pos)
            if role is not None and role[0] == ENTRY and (role[1], role[2]) in self.entry_alt:
                key = (role[1], role[2])
                shift = 8 * ((pos - self.device.tph_caps[role[1]].entries_at) % 2)
                self.entry_alt[key] = _merge(self.entry_alt[key], byte, shift)
        pm_reset = (
            off <= PMCSR < off + width
            and old_state == 3
            and self.cfg[PMCSR] & 3 == 0
            and not self.cfg[PMCSR] & PM_NO_SOFT_RESET
        )
        if flr or pm_reset:
            self.reset(self.choose_reset())
            return True
        return False

    def _flr_byte(self, pos: int, byte: int) -> bool:
        if pos == DEVCTL + 1:
            return bool(byte & 0x80)
        if self.device.shape.af and pos == AF_CTRL:
            return bool(byte & 0x01) and bool(self.cfg[AF_AT + 3] & AF_CAP_FLR)
        return False

    def write_bar(self, bar: int, off: int, width: int, value: int) -> None:
        assert off >= 0 and off + width <= 1 << 64, f"BAR write {off:#x}/{width} out of range"
        mem = self.bars.setdefault(bar, {})
        for k in range(width):
            pos, byte = off + k, (value >> (8 * k)) & 0xFF
            where = self.device.vc_field(bar, pos)
            if where is not None and self.device.msix_tags and where[1] >= VC + 2:
                i, shift = where[0], 8 * (where[1] - VC - 2)
                self.vc_tags[i] = _merge(self.vc_tags[i], byte, shift)
            else:
                mem[pos] = byte

    # --- reads -----------------------------------------------------------------------------
    def read_config(self, off: int, width: int) -> int:
        return int.from_bytes(self.cfg[off : off + width], "little")

    def read_bar(self, bar: int, off: int, width: int) -> tuple[int, int]:
        """(value, mask of the bytes the device's value is known for)."""
        mem = self.bars.get(bar, {})
        value = known = 0
        for k in range(width):
            pos = off + k
            where = self.device.vc_field(bar, pos)
            if where is not None and self.device.msix_tags and where[1] >= VC + 2:
                tags = self.vc_tags[where[0]]
                if tags is not None and len(tags) == 1:
                    (tag,) = tags
                    value |= ((tag >> (8 * (where[1] - VC - 2))) & 0xFF) << (8 * k)
                    known |= 0xFF << (8 * k)
            elif pos in mem:
                value |= mem[pos] << (8 * k)
                known |= 0xFF << (8 * k)
        return value, known

    # --- reset -----------------------------------------------------------------------------
    def reset(self, kind: ResetKind) -> None:
        """Function Level Reset (or bus reset) with the device behaviour ``kind``."""
        self.resets += 1
        dev = self.device
        for k, c in enumerate(dev.tph_caps):
            if kind is not ResetKind.KEPT:
                ctrl = self.u32(c.ctrl_at) & ~CTRL_RW
                self.cfg[c.ctrl_at : c.ctrl_at + 4] = ctrl.to_bytes(4, "little")
            for i in range(c.entry_count):
                self._reset_tag_cell(kind, k, i)
        for i in range(dev.shape.msix_size):
            base = dev.shape.table_off + MSIX_ENTRY * i
            mem = self.bars.setdefault(dev.shape.bir, {})
            mem[base + VC], mem[base + VC + 1] = VC_POWER_ON
            if dev.msix_tags:
                old = self.vc_tags[i]
                self.vc_tags[i] = _after_reset(kind, old)
            else:
                mem[base + VC + 2] = mem[base + VC + 3] = 0
        self.cfg[PMCSR] &= ~3  # D0

    def _reset_tag_cell(self, kind: ResetKind, cap: int, i: int) -> None:
        at = self.device.tph_caps[cap].entries_at + 2 * i
        old = self.entry_values(cap, i)
        assert old is not None
        new = _after_reset(kind, old)
        assert new is not None
        self.entry_alt.pop((cap, i), None)
        if len(new) > 1:
            self.entry_alt[(cap, i)] = new
            return  # the concrete bytes stay the kept ones: one of the possibilities
        (value,) = new
        self.cfg[at : at + 2] = value.to_bytes(2, "little")


def _after_reset(kind: ResetKind, old: PossibleTags) -> PossibleTags:
    if kind is ResetKind.ZEROED:
        return frozenset({0})
    if kind is ResetKind.TAGS_EITHER:
        return None if old is None else old | {0}
    return old


def _merge(values: PossibleTags, byte: int, shift: int) -> frozenset[int]:
    """The possible 16-bit values after writing ``byte`` at bit ``shift`` of each."""
    keep = 0xFF00 if shift == 0 else 0x00FF
    if values is None:
        return frozenset((v << (8 - shift)) | (byte << shift) for v in range(256))
    return frozenset((v & keep) | (byte << shift) for v in values)
