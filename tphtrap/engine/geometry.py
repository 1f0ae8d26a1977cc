"""Where a device's filtered registers are: derived once at attach from its config snapshot.

A device's geometry names every register the engine owns or watches, by byte:

- every TPH Requester capability: header and capability register (read-only), control, the ST
  entries located in the capability, and the padding up to the next dword (read-only);
- the registers whose guest write resets the function: PCI Express Device Control (Initiate
  FLR), Advanced Features control (Initiate FLR), the PM capability's PMCSR (D3hot -> D0
  without No_Soft_Reset);
- when the ST table lives in MSI-X: the Vector Control dword of every table entry.

It also says whether the device can be trapped at all, and if not, why (a reason code).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..device import ConfigSpace, TphInfo
from ..errors import TphtrapError
from ..layouts import PM_CTRL, TPH_CTRL, TPH_ST_ENTRY
from ..spec import (
    PCI_AF_CTRL,
    PCI_CAP_ID_AF,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_PM,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_EXP_DEVCTL,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_PM_CTRL,
    PCI_TPH_BASE_SIZEOF,
    PCI_TPH_CAP,
    PCI_TPH_CTRL,
    StLocation,
)

__all__ = [
    "CTRL_SIZE",
    "CTRL_WRITABLE",
    "ENTRY_SIZE",
    "K_CTRL",
    "K_ENTRY",
    "K_FLR_AF",
    "K_FLR_EXP",
    "K_PAD",
    "K_PMCSR",
    "K_RO",
    "AttachRefused",
    "Geometry",
    "Reg",
    "TphRegs",
]

CTRL_SIZE = TPH_CTRL.size
CTRL_WRITABLE = TPH_CTRL.mask("st_mode_select", "tph_requester_enable")
ENTRY_SIZE = TPH_ST_ENTRY.size

# Register kinds (small ints: this is the VM-exit path).
K_RO = 0  # TPH header or capability register: writes never reach the device
K_PAD = 1  # past the ST table inside the capability's dword: writes never reach the device
K_CTRL = 2
K_ENTRY = 3  # ST table entry in the capability
K_FLR_EXP = 4  # PCI Express Device Control: Initiate FLR
K_FLR_AF = 5  # Advanced Features control: Initiate FLR
K_PMCSR = 6  # PM control/status: D3hot -> D0 may reset


class AttachRefused(TphtrapError):
    """The engine will not attach a device: ``code`` is a reason or error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Reg:
    kind: int
    start: int  # config offset
    size: int
    cap: int = 0  # which TPH capability (index into Geometry.caps)
    index: int = 0  # ST entry index


@dataclass(frozen=True, slots=True)
class TphRegs:
    """One TPH Requester capability's byte ranges."""

    start: int
    end: int  # the dword-rounded end: what the filter claims
    ctrl: int  # config offset of the control register
    reserved: int  # the control register's reserved bits in the snapshot (RsvdP)
    info: TphInfo


class Geometry:
    """The filtered registers of one device, and whether TPH can ever be enabled on it."""

    def __init__(self, cfg: ConfigSpace) -> None:
        _check_snapshot(cfg)
        self.caps = tuple(
            TphRegs(
                t.offset,
                min(t.offset + t.region_length, PCI_CFG_SPACE_EXP_SIZE),
                t.offset + PCI_TPH_CTRL,
                t.ctrl_raw & ~CTRL_WRITABLE,
                t,
            )
            for t in cfg.tph_all
        )
        _check_tph_caps_apart(cfg.source, self.caps)
        self.ctrl_offsets = tuple(cap.ctrl for cap in self.caps)  # each control register
        tph = cfg.tph
        self.has_tph = tph is not None
        self.refusal: str | None = None
        if tph is None:
            self.refusal = "no-st-table"
        elif len(self.caps) > 1:
            self.refusal = "multiple-tph-caps"
        elif not tph.table_ok:
            self.refusal = tph.table_refusal or "no-st-table"
        self.trappable = self.refusal is None
        self.ns_ok = bool(tph and tph.no_st_mode)
        self.iv_ok = bool(tph and tph.interrupt_vector_mode)
        self.ext_ok = bool(tph and tph.extended_tph)
        loc = tph.location if tph is not None and self.trappable else StLocation.NONE
        msix = cfg.msix
        self.in_msix = loc is StLocation.MSIX and msix is not None
        self.msix_enabled = bool(msix and msix.enabled)
        if self.trappable and tph is not None and loc is StLocation.CAP:
            self.n_entries = tph.table_size
        elif self.in_msix and msix is not None:
            self.n_entries = msix.table_size
        else:
            self.n_entries = 0
        self.msix_bir = msix.table_bir if self.in_msix and msix else -1
        self.msix_start = msix.table_offset if self.in_msix and msix else -1
        self.msix_end = self.msix_start + self.n_entries * PCI_MSIX_ENTRY_SIZE
        self.vc_offsets = tuple(
            self.msix_start + i * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL
            for i in range(self.n_entries if self.in_msix else 0)
        )
        self.vc_index = {off: i for i, off in enumerate(self.vc_offsets)}
        #: config offset of each ST entry in the (only) capability's table
        self.entry_offsets = tuple(
            self.caps[0].start + PCI_TPH_BASE_SIZEOF + ENTRY_SIZE * i
            for i in range(self.n_entries if not self.in_msix and self.caps else 0)
        )
        self.no_soft_reset = False
        self.pm_offset = -1  # PMCSR
        self.regs: list[Reg | None] = [None] * PCI_CFG_SPACE_EXP_SIZE
        self._map_tph(cfg)
        self._map_resets(cfg)
        #: the control register or ST entry starting at an offset (the exact-register path)
        self.exact = {
            r.start: r for r in self.regs if r is not None and r.kind in (K_CTRL, K_ENTRY)
        }
        self.lo = min((c.start for c in self.caps), default=PCI_CFG_SPACE_EXP_SIZE)
        watched = [i for i, r in enumerate(self.regs) if r is not None]
        self.watch_lo = min(watched, default=PCI_CFG_SPACE_EXP_SIZE)
        self.watch_hi = max(watched, default=-1) + 1

    def _put(self, reg: Reg) -> None:
        for b in range(reg.start, reg.start + reg.size):
            self.regs[b] = reg

    def _map_tph(self, cfg: ConfigSpace) -> None:
        for k, cap in enumerate(self.caps):
            base = cap.start
            self._put(Reg(K_RO, base, PCI_TPH_CAP, k))
            self._put(Reg(K_RO, base + PCI_TPH_CAP, PCI_TPH_CTRL - PCI_TPH_CAP, k))
            self._put(Reg(K_CTRL, cap.ctrl, CTRL_SIZE, k))
            table = base + PCI_TPH_BASE_SIZEOF
            info = cap.info
            n = 0
            if info.table_ok and info.location is StLocation.CAP:
                n = info.table_size
            for i in range(n):
                self._put(Reg(K_ENTRY, table + ENTRY_SIZE * i, ENTRY_SIZE, k, i))
            pad = table + ENTRY_SIZE * n
            if pad < cap.end:
                self._put(Reg(K_PAD, pad, cap.end - pad, k))

    def _map_resets(self, cfg: ConfigSpace) -> None:
        for c in cfg.caps:
            if c.kind != "std":
                continue
            if c.cap_id == PCI_CAP_ID_EXP:
                # Linux vfio resets only a function that advertises FLR: plan for any.
                self._put(Reg(K_FLR_EXP, c.offset + PCI_EXP_DEVCTL, 2))
            elif c.cap_id == PCI_CAP_ID_AF:
                self._put(Reg(K_FLR_AF, c.offset + PCI_AF_CTRL, 1))
            elif c.cap_id == PCI_CAP_ID_PM:
                pmcsr = cfg.u16(c.offset + PCI_PM_CTRL)
                self.no_soft_reset = bool(PM_CTRL["no_soft_reset"].get(pmcsr))
                self.pm_offset = c.offset + PCI_PM_CTRL
                self._put(Reg(K_PMCSR, c.offset + PCI_PM_CTRL, 2))


def _check_tph_caps_apart(source: str, caps: tuple[TphRegs, ...]) -> None:
    """Refuse TPH capabilities whose claimed ranges overlap (fail closed): one's control
    register would be another's header or ST entry, so no write can keep both disabled, and
    the self-check refuses every plan that tries (a broken capability list; no device has it)."""
    for a, b in itertools.pairwise(sorted(caps, key=lambda c: c.start)):
        if b.start < a.end:
            raise AttachRefused(
                "bad-config",
                f"{source}: the TPH capabilities at {a.start:#x} ({a.start:#x}-{a.end - 1:#x}) "
                f"and {b.start:#x} ({b.start:#x}-{b.end - 1:#x}) overlap: the registers of one "
                "are the other's, and neither can be kept disabled",
            )


def _check_snapshot(cfg: ConfigSpace) -> None:
    """Refuse a snapshot that cannot show what the engine must see (fail closed)."""
    if cfg.size not in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
        raise AttachRefused(
            "bad-config",
            f"{cfg.source}: a {cfg.size}-byte config snapshot cannot show the capabilities; "
            "give the whole config space (4096 bytes: sysfs config read as root, lspci -xxxx)",
        )
    pcie = any(c.kind == "std" and c.cap_id == PCI_CAP_ID_EXP for c in cfg.caps)
    if pcie and cfg.size < PCI_CFG_SPACE_EXP_SIZE:
        raise AttachRefused(
            "bad-config",
            f"{cfg.source}: a PCI Express function with a 256-byte snapshot: its extended "
            "capabilities (TPH) are not visible; give all 4096 bytes (sysfs config read as "
            "root, lspci -xxxx)",
        )
