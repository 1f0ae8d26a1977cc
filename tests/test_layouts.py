"""Register layouts: little-endian bit order, derived masks, reserved bits.

The oracle for every mask is the Linux ``include/uapi/linux/pci_regs.h`` constant, written out
here by hand; the layouts derive theirs from the ``construct`` declarations.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tphtrap.errors import LayoutError
from tphtrap.layouts import (
    EXT_CAP_HEADER,
    MSIX_ENTRY,
    MSIX_FLAGS,
    MSIX_TABLE_BIR,
    MSIX_VECTOR_CTRL,
    PCI_HEADER,
    PCI_STATUS_REG,
    PCIE_DEVCAP2,
    PCIE_FLAGS,
    TPH_CAP,
    TPH_CTRL,
    TPH_ST_ENTRY,
    Field,
    Register,
    parse_struct,
)

# include/uapi/linux/pci_regs.h
PCI_STATUS_CAP_LIST = 0x10
PCI_EXT_CAP_ID_MASK = 0x0000FFFF  # PCI_EXT_CAP_ID(header) = header & 0x0000ffff
PCI_EXT_CAP_VER_MASK = 0x000F0000  # PCI_EXT_CAP_VER(header) = (header >> 16) & 0xf
PCI_EXT_CAP_NEXT_MASK = 0xFFF00000  # PCI_EXT_CAP_NEXT(header) = (header >> 20) & 0xffc
PCI_TPH_CAP_ST_NS = 0x00000001
PCI_TPH_CAP_ST_IV = 0x00000002
PCI_TPH_CAP_ST_DS = 0x00000004
PCI_TPH_CAP_EXT_TPH = 0x00000100
PCI_TPH_CAP_LOC_MASK = 0x00000600
PCI_TPH_CAP_ST_MASK = 0x07FF0000
PCI_TPH_CAP_ST_SHIFT = 16
PCI_TPH_CTRL_MODE_SEL_MASK = 0x00000007
PCI_TPH_CTRL_REQ_EN_MASK = 0x00000300
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE_BIR = 0x00000007
PCI_MSIX_TABLE_OFFSET = 0xFFFFFFF8
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x00000001
PCI_MSIX_ENTRY_CTRL_ST = 0xFFFF0000
PCI_EXP_FLAGS_VERS = 0x000F
PCI_EXP_FLAGS_TYPE = 0x00F0
PCI_EXP_FLAGS_SLOT = 0x0100
PCI_EXP_FLAGS_IRQ = 0x3E00
PCI_EXP_DEVCAP2_ARI = 0x00000020
PCI_EXP_DEVCAP2_LTR = 0x00000800
PCI_EXP_DEVCAP2_TPH_COMP_MASK = 0x00003000
PCI_EXP_DEVCAP2_OBFF_MASK = 0x000C0000
PCI_EXP_DEVCAP2_EE_PREFIX = 0x00200000

MASKS = [
    (PCI_STATUS_REG, "capabilities_list", PCI_STATUS_CAP_LIST),
    (EXT_CAP_HEADER, "id", PCI_EXT_CAP_ID_MASK),
    (EXT_CAP_HEADER, "version", PCI_EXT_CAP_VER_MASK),
    (EXT_CAP_HEADER, "next", PCI_EXT_CAP_NEXT_MASK),
    (TPH_CAP, "no_st_mode", PCI_TPH_CAP_ST_NS),
    (TPH_CAP, "interrupt_vector_mode", PCI_TPH_CAP_ST_IV),
    (TPH_CAP, "device_specific_mode", PCI_TPH_CAP_ST_DS),
    (TPH_CAP, "extended_tph_requester", PCI_TPH_CAP_EXT_TPH),
    (TPH_CAP, "st_table_location", PCI_TPH_CAP_LOC_MASK),
    (TPH_CAP, "st_table_size", PCI_TPH_CAP_ST_MASK),
    (TPH_CTRL, "st_mode_select", PCI_TPH_CTRL_MODE_SEL_MASK),
    (TPH_CTRL, "tph_requester_enable", PCI_TPH_CTRL_REQ_EN_MASK),
    (MSIX_FLAGS, "table_size", PCI_MSIX_FLAGS_QSIZE),
    (MSIX_FLAGS, "function_mask", PCI_MSIX_FLAGS_MASKALL),
    (MSIX_FLAGS, "msix_enable", PCI_MSIX_FLAGS_ENABLE),
    (MSIX_TABLE_BIR, "bir", PCI_MSIX_TABLE_BIR),
    (MSIX_TABLE_BIR, "offset_qw", PCI_MSIX_TABLE_OFFSET),
    (MSIX_VECTOR_CTRL, "mask", PCI_MSIX_ENTRY_CTRL_MASKBIT),
    (MSIX_VECTOR_CTRL, "st", PCI_MSIX_ENTRY_CTRL_ST),
    (TPH_ST_ENTRY, "st_lower", 0x00FF),
    (TPH_ST_ENTRY, "st_upper", 0xFF00),
    (PCIE_FLAGS, "capability_version", PCI_EXP_FLAGS_VERS),
    (PCIE_FLAGS, "device_port_type", PCI_EXP_FLAGS_TYPE),
    (PCIE_FLAGS, "slot_implemented", PCI_EXP_FLAGS_SLOT),
    (PCIE_FLAGS, "interrupt_message_number", PCI_EXP_FLAGS_IRQ),
    (PCIE_DEVCAP2, "ari_forwarding", PCI_EXP_DEVCAP2_ARI),
    (PCIE_DEVCAP2, "ltr", PCI_EXP_DEVCAP2_LTR),
    (PCIE_DEVCAP2, "tph_completer", PCI_EXP_DEVCAP2_TPH_COMP_MASK),
    (PCIE_DEVCAP2, "obff", PCI_EXP_DEVCAP2_OBFF_MASK),
    (PCIE_DEVCAP2, "end_end_tlp_prefix", PCI_EXP_DEVCAP2_EE_PREFIX),
]


@pytest.mark.parametrize(("reg", "name", "mask"), MASKS, ids=[f"{r.name}.{n}" for r, n, _ in MASKS])
def test_derived_mask_equals_pci_regs_h(reg: Register, name: str, mask: int) -> None:
    assert reg[name].mask == mask
    assert reg.mask(name) == mask


def test_tph_st_shift_matches_linux() -> None:
    assert TPH_CAP["st_table_size"].shift == PCI_TPH_CAP_ST_SHIFT


REGISTERS = [PCI_STATUS_REG, EXT_CAP_HEADER, TPH_CAP, TPH_CTRL, TPH_ST_ENTRY]
REGISTERS += [MSIX_FLAGS, MSIX_TABLE_BIR, MSIX_VECTOR_CTRL]


@pytest.mark.parametrize("reg", REGISTERS, ids=[r.name for r in REGISTERS])
def test_defined_and_reserved_masks_partition_the_register(reg: Register) -> None:
    full = (1 << (8 * reg.size)) - 1
    assert reg.defined_mask & reg.reserved_mask == 0
    assert reg.defined_mask | reg.reserved_mask == full
    seen = 0
    for f in reg.fields.values():
        assert f.mask & seen == 0, f"{f.name} overlaps another field"
        seen |= f.mask


def test_reserved_masks_of_tph_registers() -> None:
    # Everything pci_regs.h does not name in PCI_TPH_CAP / PCI_TPH_CTRL is reserved.
    named_cap = PCI_TPH_CAP_ST_NS | PCI_TPH_CAP_ST_IV | PCI_TPH_CAP_ST_DS | PCI_TPH_CAP_EXT_TPH
    named_cap |= PCI_TPH_CAP_LOC_MASK | PCI_TPH_CAP_ST_MASK
    assert TPH_CAP.reserved_mask == 0xFFFFFFFF & ~named_cap == 0xF800F8F8
    assert TPH_CTRL.reserved_mask == 0xFFFFFFFF & ~(
        PCI_TPH_CTRL_MODE_SEL_MASK | PCI_TPH_CTRL_REQ_EN_MASK
    )


# Known bytes, field values chosen so that a swapped, shifted or byte-reversed field shows up:
# each register has two vectors whose fields differ in every position.
VECTORS = [
    (
        TPH_CAP,
        bytes([0x05, 0x05, 0xA3, 0x05]),
        {
            "st_table_size": 0x5A3,
            "st_table_location": 2,
            "extended_tph_requester": 1,
            "device_specific_mode": 1,
            "interrupt_vector_mode": 0,
            "no_st_mode": 1,
        },
    ),
    (
        TPH_CAP,
        bytes([0x02, 0x02, 0x5C, 0x02]),
        {
            "st_table_size": 0x25C,
            "st_table_location": 1,
            "extended_tph_requester": 0,
            "device_specific_mode": 0,
            "interrupt_vector_mode": 1,
            "no_st_mode": 0,
        },
    ),
    (TPH_CTRL, bytes([0x05, 0x02, 0, 0]), {"tph_requester_enable": 2, "st_mode_select": 5}),
    (TPH_CTRL, bytes([0x02, 0x01, 0, 0]), {"tph_requester_enable": 1, "st_mode_select": 2}),
    (TPH_ST_ENTRY, bytes([0x34, 0x12]), {"st_upper": 0x12, "st_lower": 0x34}),
    (TPH_ST_ENTRY, bytes([0x12, 0x34]), {"st_upper": 0x34, "st_lower": 0x12}),
    (MSIX_FLAGS, bytes([0xA3, 0x85]), {"msix_enable": 1, "function_mask": 0, "table_size": 0x5A3}),
    (MSIX_FLAGS, bytes([0x5C, 0x42]), {"msix_enable": 0, "function_mask": 1, "table_size": 0x25C}),
    (MSIX_TABLE_BIR, bytes([0x7D, 0x56, 0x34, 0x12]), {"offset_qw": 0x12345678 >> 3, "bir": 5}),
    (MSIX_TABLE_BIR, bytes([0x02, 0x30, 0x00, 0x00]), {"offset_qw": 0x3000 >> 3, "bir": 2}),
    (MSIX_VECTOR_CTRL, bytes([0x01, 0x00, 0xEF, 0xBE]), {"st": 0xBEEF, "mask": 1}),
    (MSIX_VECTOR_CTRL, bytes([0x00, 0x00, 0x12, 0x00]), {"st": 0x0012, "mask": 0}),
    (EXT_CAP_HEADER, bytes([0x17, 0x00, 0x01, 0x1F]), {"next": 0x1F0, "version": 1, "id": 0x17}),
    (EXT_CAP_HEADER, bytes([0x01, 0x00, 0x82, 0x14]), {"next": 0x148, "version": 2, "id": 0x1}),
    (PCI_STATUS_REG, bytes([0x10, 0x00]), None),
]


def _expect(reg: Register, fields: dict[str, int] | None) -> dict[str, int]:
    out = dict.fromkeys(reg.fields, 0)
    out.update(fields or {"capabilities_list": 1})
    return out


@pytest.mark.parametrize(("reg", "data", "fields"), VECTORS, ids=lambda v: getattr(v, "name", ""))
def test_parse_known_bytes(reg: Register, data: bytes, fields: dict[str, int] | None) -> None:
    raw = int.from_bytes(data, "little")
    assert reg.decode(raw) == _expect(reg, fields)
    for name, value in _expect(reg, fields).items():
        assert reg[name].get(raw) == value, name


@pytest.mark.parametrize(("reg", "data", "fields"), VECTORS, ids=lambda v: getattr(v, "name", ""))
def test_build_known_bytes(reg: Register, data: bytes, fields: dict[str, int] | None) -> None:
    raw = reg.encode(**_expect(reg, fields))
    assert raw.to_bytes(reg.size, "little") == data
    assert reg.struct.build(reg.struct.parse(data)) == data
    manual = 0
    for name, value in _expect(reg, fields).items():
        manual = reg[name].put(manual, value)
    assert manual == raw


def test_msix_table_offset_is_qword_units() -> None:
    raw = int.from_bytes(bytes([0x7D, 0x56, 0x34, 0x12]), "little")
    assert raw & MSIX_TABLE_BIR["offset_qw"].mask == 0x12345678
    assert MSIX_TABLE_BIR.decode(raw)["offset_qw"] << 3 == 0x12345678


def test_reserved_bits_survive_a_construct_round_trip() -> None:
    for reg in REGISTERS:
        raw = reg.reserved_mask | (0x5A5A5A5A & ((1 << (8 * reg.size)) - 1))
        data = raw.to_bytes(reg.size, "little")
        assert reg.struct.build(reg.struct.parse(data)) == data, reg.name


def test_field_put_keeps_reserved_and_other_fields() -> None:
    raw = 0xF800F8F8 | 0x05A30505  # every reserved bit set, plus fields
    out = TPH_CAP["st_table_location"].put(raw, 1)
    assert out & TPH_CAP.reserved_mask == TPH_CAP.reserved_mask
    assert out == (raw & ~PCI_TPH_CAP_LOC_MASK) | 0x200
    ctrl = 0xFFFFFCF8 | 0x301
    out = TPH_CTRL["tph_requester_enable"].put(ctrl, 0)
    assert out == 0xFFFFFCF8 | 0x001
    vc = 0x0000FFFE | 0x1  # reserved 15:1 set, mask bit set
    assert MSIX_VECTOR_CTRL["st"].put(vc, 0xBEEF) == 0xBEEFFFFF


def test_field_put_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        TPH_CTRL["st_mode_select"].put(0, 8)
    with pytest.raises(ValueError):
        TPH_CAP["st_table_size"].put(0, -1)


def test_field_properties() -> None:
    f = Field("x", 4, 3)
    assert (f.mask, f.max, f.get(0xF0), f.put(0xFFFF, 0)) == (0x70, 7, 7, 0xFF8F)


def test_layout_errors_are_layout_errors() -> None:
    with pytest.raises(LayoutError):
        TPH_CAP.decode(1 << 32)
    with pytest.raises(LayoutError, match="unknown field"):
        TPH_CAP.encode(bogus=1)
    with pytest.raises(LayoutError):
        TPH_CTRL.encode(st_mode_select=8)
    with pytest.raises(LayoutError):
        parse_struct(PCI_HEADER, b"\x00" * 10, "header")


@given(st.integers(0, 0xFFFFFFFF))
def test_construct_and_derived_masks_agree(raw: int) -> None:
    for reg in (TPH_CAP, TPH_CTRL, MSIX_TABLE_BIR, MSIX_VECTOR_CTRL, EXT_CAP_HEADER):
        decoded = reg.decode(raw)
        rebuilt = 0
        for name, f in reg.fields.items():
            assert decoded[name] == f.get(raw) == (raw & f.mask) >> f.shift
            rebuilt = f.put(rebuilt, decoded[name])
        assert rebuilt == raw & reg.defined_mask
        assert reg.encode(**decoded) == raw & reg.defined_mask


def test_pci_header_and_msix_entry_parse_little_endian() -> None:
    hdr = bytearray(64)
    hdr[0:4] = bytes([0x86, 0x80, 0x93, 0x15])
    hdr[0x06:0x08] = bytes([0x10, 0x00])
    hdr[0x09:0x0C] = bytes([0x00, 0x00, 0x02])
    hdr[0x10:0x14] = bytes([0x0C, 0x00, 0x00, 0xF0])
    hdr[0x34] = 0x40
    h = parse_struct(PCI_HEADER, bytes(hdr), "header")
    assert (h.vendor_id, h.device_id, h.status, h.class_device) == (0x8086, 0x1593, 0x10, 0x0200)
    assert (h.bars[0], h.capabilities_pointer) == (0xF000000C, 0x40)
    entry = bytes.fromhex("0000e0fe00000000214300000100efbe")
    e = parse_struct(MSIX_ENTRY, entry, "entry")
    assert (e.lower_addr, e.upper_addr, e.data) == (0xFEE00000, 0, 0x4321)
    assert (e.vector_ctrl.st, e.vector_ctrl.mask) == (0xBEEF, 1)
