"""PCI, PCIe TPH and MSI-X constants, named as in Linux ``include/uapi/linux/pci_regs.h``.

Only offsets, capability ids and enumerations live here; the bit layout of each register is
declared once, in :mod:`tphtrap.layouts`, and every mask the engine uses is derived from it.

Sources checked:
- Linux ``include/uapi/linux/pci_regs.h`` (TPH names as of the 2024 ``drivers/pci/tph.c`` work),
- Linux ``drivers/pci/tph.c`` (``pcie_enable_tph``, ``pcie_tph_set_st_entry``),
- Linux ``drivers/vfio/pci/vfio_pci_config.c`` (``vfio_ext_cap_len``: TPH length is
  ``PCI_TPH_BASE_SIZEOF + 2 * N`` when the ST table is in the capability),
- pciutils ``ls-ecaps.c`` (``cap_tph``) and ``lspci`` dump format.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "PCI_AF_CAP",
    "PCI_AF_CTRL",
    "PCI_CAPABILITY_LIST",
    "PCI_CAP_ID_AF",
    "PCI_CAP_ID_EXP",
    "PCI_CAP_ID_MSIX",
    "PCI_CAP_ID_PM",
    "PCI_CFG_SPACE_EXP_SIZE",
    "PCI_CFG_SPACE_SIZE",
    "PCI_EXP_DEVCAP",
    "PCI_EXP_DEVCAP2",
    "PCI_EXP_DEVCTL",
    "PCI_EXP_FLAGS",
    "PCI_EXT_CAP_ID_TPH",
    "PCI_MSIX_ENTRY_CTRL_ST_OFFSET",
    "PCI_MSIX_ENTRY_DATA",
    "PCI_MSIX_ENTRY_LOWER_ADDR",
    "PCI_MSIX_ENTRY_SIZE",
    "PCI_MSIX_ENTRY_UPPER_ADDR",
    "PCI_MSIX_ENTRY_VECTOR_CTRL",
    "PCI_MSIX_FLAGS",
    "PCI_MSIX_PBA",
    "PCI_MSIX_TABLE",
    "PCI_PM_CTRL",
    "PCI_STATUS",
    "PCI_STATUS_CAP_LIST",
    "PCI_TPH_BASE_SIZEOF",
    "PCI_TPH_CAP",
    "PCI_TPH_CTRL",
    "PCI_TPH_ST_TABLE_MAX_IN_CAP",
    "PcieType",
    "ReqEnable",
    "StLocation",
    "StMode",
    "TagWidth",
    "TphCompleter",
]

# --- Type 0/1 header -------------------------------------------------------------------------
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10  # Support Capability List
PCI_CAPABILITY_LIST = 0x34  # Offset of first capability list entry
PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096

# --- Standard capabilities ---------------------------------------------------------------------
PCI_CAP_ID_PM = 0x01
PCI_PM_CTRL = 4  # PMCSR (layouts.PM_CTRL)
PCI_CAP_ID_EXP = 0x10
PCI_EXP_DEVCAP = 4  # Device Capabilities (layouts.EXP_DEVCAP)
PCI_EXP_DEVCTL = 8  # Device Control (layouts.EXP_DEVCTL)
PCI_CAP_ID_AF = 0x13  # Advanced Features
PCI_AF_CAP = 3  # layouts.AF_CAP
PCI_AF_CTRL = 4  # layouts.AF_CTRL
PCI_EXP_FLAGS = 0x2  # PCI Express capability: Capabilities register (version, type)
PCI_EXP_DEVCAP2 = 0x24  # PCI Express capability: Device Capabilities 2 (TPH Completer)

PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2  # Message Control
PCI_MSIX_TABLE = 4  # Table offset and BIR
PCI_MSIX_PBA = 8  # Pending Bit Array offset and BIR

# MSI-X table entry (in a memory BAR), PCI_MSIX_ENTRY_SIZE bytes each.
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0x0
PCI_MSIX_ENTRY_UPPER_ADDR = 0x4
PCI_MSIX_ENTRY_DATA = 0x8
PCI_MSIX_ENTRY_VECTOR_CTRL = 0xC
# PCI_MSIX_ENTRY_CTRL_ST is bits 31:16 of Vector Control, i.e. bytes +0xE..+0xF of the entry.
PCI_MSIX_ENTRY_CTRL_ST_OFFSET = PCI_MSIX_ENTRY_VECTOR_CTRL + 2

# --- Extended capabilities ---------------------------------------------------------------------
PCI_EXT_CAP_ID_TPH = 0x17  # TPH Requester
PCI_TPH_CAP = 0x4  # capability register
PCI_TPH_CTRL = 0x8  # control register
PCI_TPH_BASE_SIZEOF = 0xC  # size with no ST table; the table (when in the cap) starts here
# PCIe r6.x, 7.9.13.2: when the ST table is located in the TPH capability its size is limited
# to 64 entries (an encoded size of at most 63).
PCI_TPH_ST_TABLE_MAX_IN_CAP = 64


class StMode(IntEnum):
    """ST Mode Select, ``PCI_TPH_CTRL_MODE_SEL_MASK`` (control bits 2:0). 3..7 are reserved."""

    NO_ST = 0  # PCI_TPH_ST_NS_MODE: the requester uses tag 0 for every request
    INT_VEC = 1  # PCI_TPH_ST_IV_MODE: tag = ST entry of the request's interrupt vector
    DEV_SPEC = 2  # PCI_TPH_ST_DS_MODE: the device picks tags by its own (untrappable) means


class StLocation(IntEnum):
    """ST Table Location, ``PCI_TPH_CAP_LOC_MASK`` (capability bits 10:9)."""

    NONE = 0  # PCI_TPH_LOC_NONE
    CAP = 1  # PCI_TPH_LOC_CAP: 16-bit entries at PCI_TPH_BASE_SIZEOF + 2 * i
    MSIX = 2  # PCI_TPH_LOC_MSIX: bits 31:16 of each MSI-X Vector Control
    RESERVED = 3


class ReqEnable(IntEnum):
    """TPH Requester Enable, ``PCI_TPH_CTRL_REQ_EN_MASK`` (control bits 9:8). 2 is reserved."""

    DISABLED = 0  # PCI_TPH_REQ_DISABLE
    TPH = 1  # PCI_TPH_REQ_TPH_ONLY: 8-bit steering tags
    RESERVED = 2
    EXT_TPH = 3  # PCI_TPH_REQ_EXT_TPH: 16-bit steering tags


class PcieType(IntEnum):
    """Device/Port Type, ``PCI_EXP_FLAGS_TYPE`` (PCI Express Capabilities bits 7:4)."""

    ENDPOINT = 0x0  # PCI_EXP_TYPE_ENDPOINT
    LEG_END = 0x1  # PCI_EXP_TYPE_LEG_END: legacy endpoint
    ROOT_PORT = 0x4  # PCI_EXP_TYPE_ROOT_PORT
    UPSTREAM = 0x5  # PCI_EXP_TYPE_UPSTREAM: switch upstream port
    DOWNSTREAM = 0x6  # PCI_EXP_TYPE_DOWNSTREAM: switch downstream port
    PCI_BRIDGE = 0x7  # PCI_EXP_TYPE_PCI_BRIDGE: PCIe to PCI/PCI-X bridge
    PCIE_BRIDGE = 0x8  # PCI_EXP_TYPE_PCIE_BRIDGE: PCI/PCI-X to PCIe bridge
    RC_END = 0x9  # PCI_EXP_TYPE_RC_END: root complex integrated endpoint (no root port)
    RC_EC = 0xA  # PCI_EXP_TYPE_RC_EC: root complex event collector


class TphCompleter(IntEnum):
    """TPH Completer Supported, ``PCI_EXP_DEVCAP2_TPH_COMP_MASK`` (Device Capabilities 2
    bits 13:12). Linux enables TPH below a root port at ``min(requester, completer)`` and not
    at all when that is 0 (``drivers/pci/tph.c`` ``get_rp_completer_type``)."""

    NONE = 0  # PCI_EXP_DEVCAP2_TPH_COMP_NONE
    TPH = 1  # PCI_EXP_DEVCAP2_TPH_COMP_TPH_ONLY
    RESERVED = 2
    EXT_TPH = 3  # PCI_EXP_DEVCAP2_TPH_COMP_EXT_TPH: TPH and Extended TPH


class TagWidth(IntEnum):
    """Width of the steering tags the requester emits, in bits."""

    ST8 = 8
    ST16 = 16

    mask: (
        int  # all-ones in the low ``width`` bits: a plain attribute (tag checks read it per access)
    )

    def __init__(self, bits: int) -> None:
        self.mask = (1 << bits) - 1
