"""Build config spaces from the register layouts: fixtures, tests and "what if" overlays.

Every register value here is produced by :meth:`tphtrap.layouts.Register.encode` (construct),
so fixture bytes and the decoder share one declaration. :func:`to_lspci` writes the
``lspci -xxxx`` text format that ``lspci -F`` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    PCI_MSIX_FLAGS,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_STATUS,
    PCI_TPH_BASE_SIZEOF,
    PCI_TPH_CAP,
    PCI_TPH_CTRL,
    StLocation,
)

__all__ = ["MsixSpec", "TphSpec", "build_config", "to_lspci"]

PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_PM = 0x01
PCI_EXT_CAP_ID_ERR = 0x01
PCI_EXT_CAP_ID_DSN = 0x03


@dataclass(frozen=True)
class TphSpec:
    """A TPH Requester capability to place in extended config space."""

    no_st: bool = True
    interrupt_vector: bool = True
    device_specific: bool = False
    extended: bool = False
    location: StLocation = StLocation.CAP
    table_size: int = 8  # decoded N (the register holds N-1)
    entries: tuple[int, ...] = ()
    st_mode: int = 0
    req_enable: int = 0
    version: int = 1
    cap_reserved: int = 0  # raw reserved bits to OR into the capability register
    ctrl_reserved: int = 0


@dataclass(frozen=True)
class MsixSpec:
    table_size: int = 8
    bir: int = 0
    table_offset: int = 0x2000
    pba_bir: int = 0
    pba_offset: int = 0x3000
    enabled: bool = False


@dataclass(frozen=True)
class _Layout:
    pm_at: int = 0x40
    exp_at: int = 0x50  # PCIe capability (needed for lspci to walk extended caps)
    msix_at: int = 0x70
    aer_at: int = 0x100
    tph_at: int = 0x148
    dsn_at: int = 0x1F0
    extra: dict[str, int] = field(default_factory=dict)


def build_config(
    *,
    vendor_id: int = 0x8086,
    device_id: int = 0x1593,
    class_code: int = 0x020000,
    tph: TphSpec | None = None,
    msix: MsixSpec | None = None,
    tph_at: int = 0x148,
    with_aer: bool = True,
    with_dsn: bool = True,
    size: int = PCI_CFG_SPACE_EXP_SIZE,
) -> bytes:
    """A type-0 PCIe endpoint config space with PM, PCIe, optional MSI-X, AER, TPH and DSN.

    The extended list is AER (0x100) -> TPH (``tph_at``) -> DSN, each linked by next pointers.
    """
    cfg = bytearray(size)
    lay = _Layout(tph_at=tph_at)

    def put(off: int, width: int, value: int) -> None:
        cfg[off : off + width] = value.to_bytes(width, "little")

    put(0x00, 2, vendor_id)
    put(0x02, 2, device_id)
    put(0x04, 2, 0x0406)  # memory space, bus master, INTx disable
    put(PCI_STATUS, 2, PCI_STATUS_REG.encode(capabilities_list=1))
    put(0x08, 1, 0x02)  # revision
    put(0x09, 3, class_code)
    put(0x0E, 1, 0x00)  # header type 0
    put(0x10, 4, 0xF000000C)  # BAR0: 64-bit prefetchable memory
    put(0x14, 4, 0x0000003F)
    put(0x2C, 2, vendor_id)
    put(0x2E, 2, 0x0001)
    put(0x3D, 1, 0x01)  # INTA
    # Standard list: PM -> PCIe -> MSI-X
    put(PCI_CAPABILITY_LIST, 1, lay.pm_at)
    put(lay.pm_at, 1, PCI_CAP_ID_PM)
    put(lay.pm_at + 1, 1, lay.exp_at)
    put(lay.pm_at + 2, 2, 0x0003)  # PM version 3
    put(lay.exp_at, 1, PCI_CAP_ID_EXP)
    put(lay.exp_at + 1, 1, lay.msix_at if msix else 0)
    put(lay.exp_at + 2, 2, 0x0002)  # PCIe cap version 2, endpoint
    put(lay.exp_at + 4, 4, 0x00008FC0)  # DevCap
    put(lay.exp_at + 0x24, 4, 0x00003000)  # DevCap2: TPH Completer = TPH and Extended TPH
    if msix:
        put(lay.msix_at, 1, PCI_CAP_ID_MSIX)
        put(lay.msix_at + 1, 1, 0)
        flags = MSIX_FLAGS.encode(table_size=msix.table_size - 1, msix_enable=int(msix.enabled))
        put(lay.msix_at + PCI_MSIX_FLAGS, 2, flags)
        put(
            lay.msix_at + PCI_MSIX_TABLE,
            4,
            MSIX_TABLE_BIR.encode(offset_qw=msix.table_offset >> 3, bir=msix.bir),
        )
        put(
            lay.msix_at + PCI_MSIX_PBA,
            4,
            MSIX_TABLE_BIR.encode(offset_qw=msix.pba_offset >> 3, bir=msix.pba_bir),
        )
    if size < PCI_CFG_SPACE_EXP_SIZE:
        return bytes(cfg)
    # Extended list
    chain: list[int] = []
    if with_aer:
        chain.append(lay.aer_at)
    if tph is not None:
        chain.append(tph_at)
    if with_dsn:
        chain.append(lay.dsn_at)
    for i, at in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else 0
        if at == lay.aer_at:
            hdr = EXT_CAP_HEADER.encode(id=PCI_EXT_CAP_ID_ERR, version=2, next=nxt)
            put(at, 4, hdr)
        elif at == lay.dsn_at:
            put(at, 4, EXT_CAP_HEADER.encode(id=PCI_EXT_CAP_ID_DSN, version=1, next=nxt))
            put(at + 4, 8, 0x0123456789ABCDEF)
        else:
            assert tph is not None
            put(at, 4, EXT_CAP_HEADER.encode(id=PCI_EXT_CAP_ID_TPH, version=tph.version, next=nxt))
            cap = TPH_CAP.encode(
                no_st_mode=int(tph.no_st),
                interrupt_vector_mode=int(tph.interrupt_vector),
                device_specific_mode=int(tph.device_specific),
                extended_tph_requester=int(tph.extended),
                st_table_location=int(tph.location),
                st_table_size=tph.table_size - 1,
            )
            put(at + PCI_TPH_CAP, 4, cap | tph.cap_reserved)
            ctrl = TPH_CTRL.encode(st_mode_select=tph.st_mode, tph_requester_enable=tph.req_enable)
            put(at + PCI_TPH_CTRL, 4, ctrl | tph.ctrl_reserved)
            if tph.location is StLocation.CAP:
                for i_e, entry in enumerate(tph.entries[: tph.table_size]):
                    put(at + PCI_TPH_BASE_SIZEOF + 2 * i_e, 2, entry)
    assert len(cfg) in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE)
    return bytes(cfg)


def to_lspci(data: bytes, bdf: str = "0000:3b:00.0", description: str = "Ethernet controller") -> str:
    """The ``lspci -xxxx`` rendering of ``data`` (pciutils ``show_hex_dump``), one device."""
    lines = [f"{bdf} {description}"]
    for row in range(0, len(data), 16):
        chunk = " ".join(f"{b:02x}" for b in data[row : row + 16])
        lines.append(f"{row:02x}: {chunk}")
    return "\n".join(lines) + "\n"
