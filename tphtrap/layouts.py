"""Register layouts, declared once with ``construct``; every mask and shift is derived from them.

This is the only module that imports ``construct``. Each register is a little-endian dword or
word, so it is declared as ``ByteSwapped(BitStruct(...))`` with its fields listed from the most
significant bit down (``BitStruct`` reads bits MSB-first in stream order). Reserved ranges are
named ``_rsvd*`` so that a parse/build round trip keeps them.

The hot paths never parse: :class:`Register` derives, once at import, a :class:`Field` (shift,
width, mask) for every named field, and callers use plain integer arithmetic on the raw value.
Rewrites are mask arithmetic, so reserved bits always survive. ``construct`` parsing is used for
``inspect`` and the tests, where it cross-checks the derived masks.

Field names follow the PCIe spec, snake_cased, next to the Linux ``pci_regs.h`` mask they match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import construct as cs

from .errors import LayoutError

__all__ = [
    "AF_CAP",
    "AF_CTRL",
    "EXP_DEVCAP",
    "EXP_DEVCTL",
    "EXT_CAP_HEADER",
    "MSIX_ENTRY",
    "MSIX_FLAGS",
    "MSIX_TABLE_BIR",
    "MSIX_VECTOR_CTRL",
    "PCIE_DEVCAP2",
    "PCIE_FLAGS",
    "PCI_CAP_HEADER",
    "PCI_HEADER",
    "PCI_STATUS_REG",
    "PM_CTRL",
    "TPH_CAP",
    "TPH_CTRL",
    "TPH_ST_ENTRY",
    "Field",
    "Register",
    "parse_struct",
]


@dataclass(frozen=True, slots=True)
class Field:
    """One bit field of a register: ``(raw >> shift) & (2**width - 1)``."""

    name: str
    shift: int
    width: int
    #: ``2**width - 1`` and that shifted into place: derived once, the engine's hot path reads
    #: and replaces fields on every control write.
    max: int = field(init=False, repr=False, compare=False)
    mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max", (1 << self.width) - 1)
        object.__setattr__(self, "mask", ((1 << self.width) - 1) << self.shift)

    def get(self, raw: int) -> int:
        return (raw >> self.shift) & self.max

    def put(self, raw: int, value: int) -> int:
        """Return ``raw`` with this field replaced by ``value`` (other bits untouched)."""
        if not 0 <= value <= self.max:
            raise ValueError(f"{self.name}: {value:#x} does not fit in {self.width} bits")
        return (raw & ~self.mask) | (value << self.shift)


class Register:
    """A fixed-size little-endian register declared as ``ByteSwapped(BitStruct(...))``.

    The field table is derived from the declaration; nothing about bit positions is restated.
    """

    def __init__(self, name: str, size: int, *fields: Any) -> None:
        self.name = name
        self.size = size
        self.struct = cs.ByteSwapped(cs.BitStruct(*fields))
        total = size * 8
        declared = 0
        table: dict[str, Field] = {}
        # Fields are declared MSB first: the first field's top bit is bit total-1.
        for sub in fields:
            width = sub.sizeof()
            shift = total - declared - width
            declared += width
            if sub.name and not sub.name.startswith("_"):
                table[sub.name] = Field(sub.name, shift, width)
        if declared != total:
            raise AssertionError(f"{name}: declared {declared} bits, register has {total}")
        self.fields: Mapping[str, Field] = table
        self.defined_mask = 0
        for f in table.values():
            self.defined_mask |= f.mask
        self.reserved_mask = ((1 << total) - 1) & ~self.defined_mask

    def __getitem__(self, name: str) -> Field:
        return self.fields[name]

    def mask(self, *names: str) -> int:
        m = 0
        for n in names:
            m |= self.fields[n].mask
        return m

    def decode(self, raw: int) -> dict[str, int]:
        """Full ``construct`` parse of ``raw`` (not for hot paths)."""
        try:
            parsed = self.struct.parse(raw.to_bytes(self.size, "little"))
        except (cs.ConstructError, OverflowError) as exc:
            raise LayoutError(f"{self.name}: {exc}", path=getattr(exc, "path", None)) from exc
        return {k: int(v) for k, v in parsed.items() if not k.startswith("_")}

    def encode(self, **values: int) -> int:
        """Build a raw value with ``construct`` (fixtures and tests; unnamed bits are zero)."""
        full: dict[str, int] = {}
        for sub in self.struct.subcon.subcon.subcons:
            if sub.name:
                full[sub.name] = 0
        unknown = set(values) - set(self.fields)
        if unknown:
            raise LayoutError(f"{self.name}: unknown field(s) {sorted(unknown)}")
        full.update(values)
        try:
            data = self.struct.build(full)
        except (cs.ConstructError, OverflowError) as exc:
            raise LayoutError(f"{self.name}: {exc}", path=getattr(exc, "path", None)) from exc
        return int.from_bytes(data, "little")


def _bits(name: str, width: int) -> Any:
    return name / cs.BitsInteger(width)


# --- PCI header (type 0 and type 1 share these offsets) ---------------------------------------
# PCI_STATUS (0x06): only the Capabilities List bit matters here (PCI_STATUS_CAP_LIST 0x10).
PCI_STATUS_REG = Register(
    "PCI_STATUS",
    2,
    _bits("detected_parity_error", 1),  # PCI_STATUS_DETECTED_PARITY 0x8000
    _bits("signaled_system_error", 1),  # PCI_STATUS_SIG_SYSTEM_ERROR 0x4000
    _bits("received_master_abort", 1),  # PCI_STATUS_REC_MASTER_ABORT 0x2000
    _bits("received_target_abort", 1),  # PCI_STATUS_REC_TARGET_ABORT 0x1000
    _bits("signaled_target_abort", 1),  # PCI_STATUS_SIG_TARGET_ABORT 0x0800
    _bits("devsel_timing", 2),  # PCI_STATUS_DEVSEL_MASK 0x0600
    _bits("master_data_parity_error", 1),  # PCI_STATUS_PARITY 0x0100
    _bits("fast_back_to_back", 1),  # PCI_STATUS_FAST_BACK 0x0080
    _bits("_rsvd6", 1),
    _bits("capable_66mhz", 1),  # PCI_STATUS_66MHZ 0x0020
    _bits("capabilities_list", 1),  # PCI_STATUS_CAP_LIST 0x0010
    _bits("interrupt_status", 1),  # PCI_STATUS_INTERRUPT 0x0008
    _bits("_rsvd0", 3),
)

# The first 0x40 bytes of config space, as far as tphtrap reads them.
PCI_HEADER = cs.Struct(
    "vendor_id" / cs.Int16ul,  # PCI_VENDOR_ID 0x00
    "device_id" / cs.Int16ul,  # PCI_DEVICE_ID 0x02
    "command" / cs.Int16ul,  # PCI_COMMAND 0x04
    "status" / cs.Int16ul,  # PCI_STATUS 0x06, decoded with PCI_STATUS_REG
    "revision_id" / cs.Int8ul,  # PCI_REVISION_ID 0x08
    "class_prog" / cs.Int8ul,  # PCI_CLASS_PROG 0x09
    "class_device" / cs.Int16ul,  # PCI_CLASS_DEVICE 0x0a (subclass, class)
    "cache_line_size" / cs.Int8ul,  # 0x0c
    "latency_timer" / cs.Int8ul,  # 0x0d
    "header_type" / cs.Int8ul,  # PCI_HEADER_TYPE 0x0e (bit 7: multi-function)
    "bist" / cs.Int8ul,  # 0x0f
    "bars" / cs.Array(6, cs.Int32ul),  # PCI_BASE_ADDRESS_0..5 (type 0)
    "cardbus_cis" / cs.Int32ul,  # 0x28
    "subsystem_vendor_id" / cs.Int16ul,  # PCI_SUBSYSTEM_VENDOR_ID 0x2c
    "subsystem_id" / cs.Int16ul,  # PCI_SUBSYSTEM_ID 0x2e
    "rom_address" / cs.Int32ul,  # PCI_ROM_ADDRESS 0x30
    "capabilities_pointer" / cs.Int8ul,  # PCI_CAPABILITY_LIST 0x34
    "_rsvd" / cs.Bytes(7),
    "interrupt_line" / cs.Int8ul,  # 0x3c
    "interrupt_pin" / cs.Int8ul,  # 0x3d
    "min_gnt" / cs.Int8ul,
    "max_lat" / cs.Int8ul,
)

# Standard capability header: PCI_CAP_LIST_ID (+0), PCI_CAP_LIST_NEXT (+1).
PCI_CAP_HEADER = cs.Struct("cap_id" / cs.Int8ul, "cap_next" / cs.Int8ul)

# Extended capability header: PCI_EXT_CAP_ID 15:0, PCI_EXT_CAP_VER 19:16, PCI_EXT_CAP_NEXT 31:20.
EXT_CAP_HEADER = Register(
    "PCI_EXT_CAP_HEADER",
    4,
    _bits("next", 12),
    _bits("version", 4),
    _bits("id", 16),
)

# --- Registers whose guest writes reset the function (the engine must see them) ------------
# PCI Express capability: PCI_EXP_DEVCAP (+4) and PCI_EXP_DEVCTL (+8).
EXP_DEVCAP = Register(
    "PCI_EXP_DEVCAP",
    4,
    _bits("_rsvd29", 3),
    _bits("flr", 1),  # PCI_EXP_DEVCAP_FLR 0x10000000: Function Level Reset capable
    _bits("_rsvd0", 28),
)
EXP_DEVCTL = Register(
    "PCI_EXP_DEVCTL",
    2,
    _bits("initiate_flr", 1),  # PCI_EXP_DEVCTL_BCR_FLR 0x8000 (Linux vfio resets on it)
    _bits("_rsvd0", 15),
)
# Power Management capability: PCI_PM_CTRL (+4), the PMCSR. D3hot -> D0 resets the function
# unless No_Soft_Reset is set.
PM_CTRL = Register(
    "PCI_PM_CTRL",
    2,
    _bits("_rsvd4", 12),
    _bits("no_soft_reset", 1),  # PCI_PM_CTRL_NO_SOFT_RESET 0x0008 (read-only)
    _bits("_rsvd2", 1),
    _bits("power_state", 2),  # PCI_PM_CTRL_STATE_MASK 0x0003: D0..D3hot
)
# Advanced Features capability (PCI_CAP_ID_AF 0x13): PCI_AF_CAP (+3) and PCI_AF_CTRL (+4).
AF_CAP = Register(
    "PCI_AF_CAP",
    1,
    _bits("_rsvd2", 6),
    _bits("flr", 1),  # PCI_AF_CAP_FLR 0x02
    _bits("tp", 1),  # PCI_AF_CAP_TP 0x01
)
AF_CTRL = Register(
    "PCI_AF_CTRL",
    1,
    _bits("_rsvd1", 7),
    _bits("initiate_flr", 1),  # PCI_AF_CTRL_FLR 0x01
)

# --- PCI Express capability (PCI_CAP_ID_EXP 0x10) ------------------------------------------
# PCI_EXP_FLAGS (+0x2), the PCI Express Capabilities register.
PCIE_FLAGS = Register(
    "PCI_EXP_FLAGS",
    2,
    _bits("_rsvd14", 2),
    _bits("interrupt_message_number", 5),  # PCI_EXP_FLAGS_IRQ 0x3e00
    _bits("slot_implemented", 1),  # PCI_EXP_FLAGS_SLOT 0x0100
    _bits("device_port_type", 4),  # PCI_EXP_FLAGS_TYPE 0x00f0 (PcieType)
    _bits("capability_version", 4),  # PCI_EXP_FLAGS_VERS 0x000f
)

# PCI_EXP_DEVCAP2 (+0x24), Device Capabilities 2: only in a version 2 capability (Linux
# pcie_capability_read_dword reads it as 0 from a version 1 capability).
PCIE_DEVCAP2 = Register(
    "PCI_EXP_DEVCAP2",
    4,
    _bits("frs_supported", 1),  # PCI_EXP_DEVCAP2_FRS 0x80000000
    _bits("_rsvd27", 4),
    _bits("emergency_power_reduction_init", 1),  # PCI_EXP_DEVCAP2_EPR_INIT 0x04000000
    _bits("emergency_power_reduction", 2),  # PCI_EXP_DEVCAP2_EPR(x) bits 25:24
    _bits("max_end_end_tlp_prefixes", 2),  # PCI_EXP_DEVCAP2_MEE_TLP(x) bits 23:22
    _bits("end_end_tlp_prefix", 1),  # PCI_EXP_DEVCAP2_EE_PREFIX 0x00200000
    _bits("extended_fmt_field", 1),  # PCI_EXP_DEVCAP2_EXTFMT 0x00100000
    _bits("obff", 2),  # PCI_EXP_DEVCAP2_OBFF_MASK 0x000c0000
    _bits("ten_bit_tag_requester", 1),  # PCI_EXP_DEVCAP2_10BIT_TAG_REQ 0x00020000
    _bits("ten_bit_tag_completer", 1),  # PCI_EXP_DEVCAP2_10BIT_TAG_COMP 0x00010000
    _bits("ln_system_cls", 2),  # PCI_EXP_DEVCAP2_LN_CLS(x) bits 15:14
    _bits("tph_completer", 2),  # PCI_EXP_DEVCAP2_TPH_COMP_MASK 0x3000 (TphCompleter)
    _bits("ltr", 1),  # PCI_EXP_DEVCAP2_LTR 0x0800
    _bits("no_ro_enabled_pr_pr_passing", 1),  # PCI_EXP_DEVCAP2_NROPRPRP 0x0400
    _bits("cas128_completer", 1),  # PCI_EXP_DEVCAP2_ATOMIC_COMP128 0x0200
    _bits("atomic64_completer", 1),  # PCI_EXP_DEVCAP2_ATOMIC_COMP64 0x0100
    _bits("atomic32_completer", 1),  # PCI_EXP_DEVCAP2_ATOMIC_COMP32 0x0080
    _bits("atomic_routing", 1),  # PCI_EXP_DEVCAP2_ATOMIC_ROUTE 0x0040
    _bits("ari_forwarding", 1),  # PCI_EXP_DEVCAP2_ARI 0x0020
    _bits("completion_timeout_disable", 1),  # PCI_EXP_DEVCAP2_COMP_TMOUT_DIS 0x0010
    _bits("completion_timeout_ranges", 4),  # PCI_EXP_DEVCAP2_TIMEOUT_RANGE(x) bits 3:0
)

# --- TPH Requester extended capability (PCI_EXT_CAP_ID_TPH 0x17) ------------------------------
# PCI_TPH_CAP (+0x4)
TPH_CAP = Register(
    "PCI_TPH_CAP",
    4,
    _bits("_rsvd27", 5),
    _bits("st_table_size", 11),  # PCI_TPH_CAP_ST_MASK 0x07FF0000, encoded N-1
    _bits("_rsvd11", 5),
    _bits("st_table_location", 2),  # PCI_TPH_CAP_LOC_MASK 0x600 (StLocation)
    _bits("extended_tph_requester", 1),  # PCI_TPH_CAP_EXT_TPH 0x100
    _bits("_rsvd3", 5),
    _bits("device_specific_mode", 1),  # PCI_TPH_CAP_ST_DS 0x4
    _bits("interrupt_vector_mode", 1),  # PCI_TPH_CAP_ST_IV 0x2
    _bits("no_st_mode", 1),  # PCI_TPH_CAP_ST_NS 0x1
)

# PCI_TPH_CTRL (+0x8)
TPH_CTRL = Register(
    "PCI_TPH_CTRL",
    4,
    _bits("_rsvd10", 22),
    _bits("tph_requester_enable", 2),  # PCI_TPH_CTRL_REQ_EN_MASK 0x300 (ReqEnable)
    _bits("_rsvd3", 5),
    _bits("st_mode_select", 3),  # PCI_TPH_CTRL_MODE_SEL_MASK 0x7 (StMode)
)

# ST table entry (+0xC + 2*i when the table is in the capability).
TPH_ST_ENTRY = Register(
    "PCI_TPH_ST_ENTRY",
    2,
    _bits("st_upper", 8),  # used with Extended TPH only
    _bits("st_lower", 8),
)

# --- MSI-X (PCI_CAP_ID_MSIX 0x11) -----------------------------------------------------------
# PCI_MSIX_FLAGS (+2), Message Control.
MSIX_FLAGS = Register(
    "PCI_MSIX_FLAGS",
    2,
    _bits("msix_enable", 1),  # PCI_MSIX_FLAGS_ENABLE 0x8000
    _bits("function_mask", 1),  # PCI_MSIX_FLAGS_MASKALL 0x4000
    _bits("_rsvd11", 3),
    _bits("table_size", 11),  # PCI_MSIX_FLAGS_QSIZE 0x7FF, encoded N-1
)

# PCI_MSIX_TABLE (+4) and PCI_MSIX_PBA (+8): BIR 2:0, offset 31:3 (offset = raw & ~7).
MSIX_TABLE_BIR = Register(
    "PCI_MSIX_TABLE",
    4,
    _bits("offset_qw", 29),  # PCI_MSIX_TABLE_OFFSET 0xfffffff8, in units of 8 bytes
    _bits("bir", 3),  # PCI_MSIX_TABLE_BIR 0x7
)

# MSI-X table entry Vector Control (PCI_MSIX_ENTRY_VECTOR_CTRL, entry +0xC).
MSIX_VECTOR_CTRL = Register(
    "PCI_MSIX_ENTRY_VECTOR_CTRL",
    4,
    _bits("st", 16),  # PCI_MSIX_ENTRY_CTRL_ST 0xffff0000 (TPH tag when location is MSI-X)
    _bits("_rsvd1", 15),
    _bits("mask", 1),  # PCI_MSIX_ENTRY_CTRL_MASKBIT 0x1
)

# One 16-byte MSI-X table entry (PCI_MSIX_ENTRY_SIZE).
MSIX_ENTRY = cs.Struct(
    "lower_addr" / cs.Int32ul,  # PCI_MSIX_ENTRY_LOWER_ADDR
    "upper_addr" / cs.Int32ul,  # PCI_MSIX_ENTRY_UPPER_ADDR
    "data" / cs.Int32ul,  # PCI_MSIX_ENTRY_DATA
    "vector_ctrl" / MSIX_VECTOR_CTRL.struct,  # PCI_MSIX_ENTRY_VECTOR_CTRL
)


def parse_struct(struct: Any, data: bytes, what: str) -> Any:
    """Parse ``data`` with a ``construct`` struct, mapping its errors to :class:`LayoutError`."""
    try:
        return struct.parse(data)
    except cs.ConstructError as exc:
        raise LayoutError(f"{what}: {exc}", path=getattr(exc, "path", None)) from exc
