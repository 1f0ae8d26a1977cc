"""Build config spaces from the register layouts: fixtures, tests and "what if" overlays.

Every register value here is produced by :meth:`tphtrap.layouts.Register.encode` (construct),
so fixture bytes and the decoder share one declaration. :func:`to_lspci` writes the
``lspci -xxxx`` text format that ``lspci -F`` reads back (pciutils ``lib/dump.c``).

``python -m tphtrap.synth OUTDIR`` regenerates every device fixture (``fixtures/devices``):
well-formed dumps for the cases that matter, malformed ones under ``bad/`` with the error each
must produce in ``bad/EXPECTED.tsv``, and a binary sysfs-style ``config``. The output is
deterministic; a test checks the checked-in fixtures against it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

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
    PCI_MSIX_FLAGS,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_STATUS,
    PCI_TPH_BASE_SIZEOF,
    PCI_TPH_CAP,
    PCI_TPH_CTRL,
    PcieType,
    StLocation,
    TphCompleter,
)

__all__ = [
    "BAD_FIXTURES",
    "FIXTURES",
    "BadFixture",
    "ExtCapSpec",
    "Fixture",
    "MsixSpec",
    "TphSpec",
    "build_config",
    "generate",
    "main",
    "to_lspci",
]

PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_PM = 0x01
PCI_EXT_CAP_ID_ERR = 0x01
PCI_EXT_CAP_ID_DSN = 0x03
PCI_EXT_CAP_ID_ARI = 0x0E
PCI_EXT_CAP_ID_SRIOV = 0x10
PCI_EXT_CAP_ID_LTR = 0x18

# 64-bit prefetchable memory BARs: BAR0/1 and BAR2/3 (the BAR numbers MSI-X BIRs name).
DEFAULT_BARS = (0xF000000C, 0x0000003F, 0xF200000C, 0x0000003F, 0x0, 0x0)


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
    function_mask: bool = False


@dataclass(frozen=True)
class ExtCapSpec:
    """Any other extended capability: its header is built here, ``body`` follows it."""

    offset: int
    cap_id: int
    version: int = 1
    body: bytes = b""


@dataclass(frozen=True)
class _Layout:
    pm_at: int = 0x40
    msix_at: int = 0x70
    exp_at: int = 0xA0  # PCIe capability (v2 endpoint: 0x34 bytes); lspci needs it for ext caps
    aer_at: int = 0x100
    dsn_at: int = 0x1F0


def build_config(
    *,
    vendor_id: int = 0x8086,
    device_id: int = 0x1593,
    class_code: int = 0x020000,
    revision: int = 0x02,
    subsystem_vendor_id: int | None = None,
    subsystem_id: int = 0x0001,
    bars: Sequence[int] = DEFAULT_BARS,
    tph: TphSpec | None = None,
    msix: MsixSpec | None = None,
    tph_at: int = 0x148,
    msix_at: int = 0x70,
    with_aer: bool = True,
    with_dsn: bool = True,
    dsn_at: int = 0x1F0,
    extra_ext: Sequence[ExtCapSpec] = (),
    size: int = PCI_CFG_SPACE_EXP_SIZE,
    pcie_type: int = PcieType.ENDPOINT,
    tph_completer: int = TphCompleter.EXT_TPH,
) -> bytes:
    """A type-0 PCIe endpoint config space with PM, MSI-X, PCIe, AER, TPH, DSN and extras.

    ``pcie_type`` and ``tph_completer`` set the PCI Express capability's Device/Port Type and
    TPH Completer Supported (a root port above a device is built with ``PcieType.ROOT_PORT``).

    The standard list is PM (0x40) -> MSI-X (``msix_at``, when given) -> PCIe (0xa0). The
    extended list links AER (0x100), TPH (``tph_at``), DSN (``dsn_at``) and ``extra_ext`` in
    offset order. ST table entries that would fall past the end of config space are left out.
    The space is built at 4096 bytes and cut to ``size`` (64, 256 or 4096).
    """
    cfg = bytearray(PCI_CFG_SPACE_EXP_SIZE)
    lay = _Layout(msix_at=msix_at, dsn_at=dsn_at)

    def put(off: int, width: int, value: int) -> None:
        if off + width <= len(cfg):
            cfg[off : off + width] = value.to_bytes(width, "little")

    put(0x00, 2, vendor_id)
    put(0x02, 2, device_id)
    put(0x04, 2, 0x0406)  # memory space, bus master, INTx disable
    put(PCI_STATUS, 2, PCI_STATUS_REG.encode(capabilities_list=1))
    put(0x08, 1, revision)
    put(0x09, 3, class_code)
    put(0x0E, 1, 0x00)  # header type 0
    for i, bar in enumerate(bars[:6]):
        put(0x10 + 4 * i, 4, bar)
    put(0x2C, 2, vendor_id if subsystem_vendor_id is None else subsystem_vendor_id)
    put(0x2E, 2, subsystem_id)
    put(0x3D, 1, 0x01)  # INTA
    # Standard list: PM -> MSI-X -> PCIe
    put(PCI_CAPABILITY_LIST, 1, lay.pm_at)
    put(lay.pm_at, 1, PCI_CAP_ID_PM)
    put(lay.pm_at + 1, 1, lay.msix_at if msix else lay.exp_at)
    put(lay.pm_at + 2, 2, 0x0003)  # PM version 3
    if msix:
        put(lay.msix_at, 1, PCI_CAP_ID_MSIX)
        put(lay.msix_at + 1, 1, lay.exp_at)
        flags = MSIX_FLAGS.encode(
            table_size=msix.table_size - 1,
            msix_enable=int(msix.enabled),
            function_mask=int(msix.function_mask),
        )
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
    put(lay.exp_at, 1, PCI_CAP_ID_EXP)
    put(lay.exp_at + 1, 1, 0)
    put(
        lay.exp_at + PCI_EXP_FLAGS,
        2,
        PCIE_FLAGS.encode(capability_version=2, device_port_type=pcie_type),
    )
    put(lay.exp_at + 4, 4, 0x00008FC0)  # DevCap
    put(lay.exp_at + PCI_EXP_DEVCAP2, 4, PCIE_DEVCAP2.encode(tph_completer=tph_completer))
    # Extended list, linked in offset order
    chain: list[tuple[int, str]] = []
    if with_aer:
        chain.append((lay.aer_at, "aer"))
    if tph is not None:
        chain.append((tph_at, "tph"))
    if with_dsn:
        chain.append((lay.dsn_at, "dsn"))
    extras = {e.offset: e for e in extra_ext}
    chain.extend((e.offset, "extra") for e in extra_ext)
    chain.sort()
    for i, (at, kind) in enumerate(chain):
        nxt = chain[i + 1][0] if i + 1 < len(chain) else 0
        if kind == "aer":
            put(at, 4, EXT_CAP_HEADER.encode(id=PCI_EXT_CAP_ID_ERR, version=2, next=nxt))
        elif kind == "dsn":
            put(at, 4, EXT_CAP_HEADER.encode(id=PCI_EXT_CAP_ID_DSN, version=1, next=nxt))
            put(at + 4, 8, 0x0123456789ABCDEF)
        elif kind == "extra":
            e = extras[at]
            put(at, 4, EXT_CAP_HEADER.encode(id=e.cap_id, version=e.version, next=nxt))
            for j, byte in enumerate(e.body):
                put(at + 4 + j, 1, byte)
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
    assert len(cfg) == PCI_CFG_SPACE_EXP_SIZE
    if size not in (64, PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
        raise ValueError(f"size must be 64, 256 or 4096, not {size}")
    return bytes(cfg[:size])


def to_lspci(
    data: bytes, bdf: str = "0000:3b:00.0", description: str = "Ethernet controller"
) -> str:
    """The ``lspci -xxxx`` rendering of ``data`` (pciutils ``show_hex_dump``), one device."""
    lines = [f"{bdf} {description}"]
    for row in range(0, len(data), 16):
        chunk = " ".join(f"{b:02x}" for b in data[row : row + 16])
        lines.append(f"{row:02x}: {chunk}")
    return "\n".join(lines) + "\n"


def _to_hex(data: bytes) -> str:
    return "".join(data[i : i + 32].hex() + "\n" for i in range(0, len(data), 32))


def _patch(data: bytes, off: int, width: int, value: int) -> bytes:
    out = bytearray(data)
    out[off : off + width] = value.to_bytes(width, "little")
    return bytes(out)


# --- the fixture set ----------------------------------------------------------------------
E810 = "Ethernet controller: Intel Corporation Ethernet Controller E810-C for SFP (rev 02)"
CX6DX = "Ethernet controller: Mellanox Technologies MT2892 Family [ConnectX-6 Dx]"
BCM57508 = (
    "Ethernet controller: Broadcom Inc. and subsidiaries BCM57508 NetXtreme-E "
    "10Gb/25Gb/40Gb/50Gb/100Gb/200Gb Ethernet (rev 11)"
)
X710 = "Ethernet controller: Intel Corporation Ethernet Controller X710 for 10GbE SFP+ (rev 02)"

_ARI = ExtCapSpec(0x170, PCI_EXT_CAP_ID_ARI, 1, bytes([0x00, 0x01, 0x00, 0x00]))
_SRIOV = ExtCapSpec(
    0x1A0,
    PCI_EXT_CAP_ID_SRIOV,
    1,
    # IOVCap, IOVCtl/Sta, InitialVFs=128, TotalVFs=128, NumVFs=0, VF offset=8, stride=1,
    # VF device id 0x1889, supported page sizes 0x553.
    bytes.fromhex("00000000000000008000800000000000080001000000891853050000"),
)
_E810_EXT = (_ARI, _SRIOV)


def _e810(**kw: object) -> bytes:
    args: dict[str, object] = {
        "vendor_id": 0x8086,
        "device_id": 0x1593,
        "revision": 0x02,
        "subsystem_id": 0x0005,
        "msix": MsixSpec(table_size=16, bir=0, table_offset=0x2000, pba_offset=0x3000),
        "extra_ext": _E810_EXT,
    }
    args.update(kw)
    return build_config(**args)  # type: ignore[arg-type]


def _bcm(**kw: object) -> bytes:
    args: dict[str, object] = {
        "vendor_id": 0x14E4,
        "device_id": 0x1750,
        "revision": 0x11,
        "subsystem_id": 0x2100,
        "msix": MsixSpec(table_size=74, bir=4, table_offset=0x0, pba_bir=4, pba_offset=0x2000),
    }
    args.update(kw)
    return build_config(**args)  # type: ignore[arg-type]


_CAP8 = TphSpec()  # snapshot entries are 0 (the state after reset): neutral tags


@dataclass(frozen=True)
class Fixture:
    """A well-formed dump: one or more devices (``devices`` of ``(bdf, description, data)``)."""

    name: str
    devices: tuple[tuple[str, str, bytes], ...]
    about: str = ""


@dataclass(frozen=True)
class BadFixture:
    """A malformed source and the error it must produce (``line`` 0: the whole file)."""

    name: str
    content: bytes
    line: int
    fragment: str
    about: str = ""


def _fixtures() -> tuple[Fixture, ...]:
    st_in_cap = _e810(tph=_CAP8)
    st_in_msix = build_config(
        vendor_id=0x15B3,
        device_id=0x101D,
        revision=0x00,
        subsystem_id=0x0016,
        bars=(0xE000000C, 0x0000003F, 0xE200000C, 0x0000003F, 0, 0),
        tph=TphSpec(extended=True, location=StLocation.MSIX, table_size=32),
        msix=MsixSpec(table_size=32, bir=2, table_offset=0x4000, pba_bir=2, pba_offset=0x5000),
    )
    ds_only = _bcm(
        tph=TphSpec(
            interrupt_vector=False,
            device_specific=True,
            location=StLocation.NONE,
            table_size=1,
        )
    )
    ext_tph = _bcm(
        tph=TphSpec(
            device_specific=True,
            extended=True,
            table_size=16,
        ),
        msix=MsixSpec(table_size=64, bir=4, table_offset=0x0, pba_bir=4, pba_offset=0x2000),
    )
    no_tph = build_config(
        vendor_id=0x8086,
        device_id=0x1572,
        subsystem_id=0x0000,
        msix=MsixSpec(table_size=129, bir=3, table_offset=0x0, pba_bir=3, pba_offset=0x1000),
        bars=(0xF000000C, 0x3F, 0x0, 0xF200000C, 0x3F, 0x0),
    )
    one = _e810(tph=TphSpec(table_size=1, entries=(0x42,)))
    sixty_four = _e810(
        tph=TphSpec(table_size=64, entries=tuple((4 * i) & 0xFF for i in range(64))),
        extra_ext=(),
    )
    sixty_five = _e810(tph=TphSpec(table_size=65), extra_ext=())
    overflow = _e810(tph=TphSpec(table_size=64), tph_at=0xF80)
    reserved_loc = _e810(tph=TphSpec(location=StLocation.RESERVED))
    no_msix = _e810(tph=TphSpec(location=StLocation.MSIX, table_size=16), msix=None)
    overlap = _e810(
        tph=TphSpec(table_size=16),
        extra_ext=(ExtCapSpec(0x160, PCI_EXT_CAP_ID_LTR, 1, bytes([0x03, 0x10, 0x03, 0x10])),),
    )
    enabled = _e810(tph=replace(_CAP8, st_mode=1, req_enable=1))
    rsvd = _e810(
        tph=replace(_CAP8, cap_reserved=0xA800A8A8, ctrl_reserved=0xAAAAA8A8),
    )
    return (
        Fixture(
            "nic-st-in-cap.lspci",
            (("0000:3b:00.0", E810, st_in_cap),),
            "ST table of 8 entries in the TPH capability; IV and No ST modes; MSI-X 16, BAR 0",
        ),
        Fixture(
            "nic-st-in-msix.lspci",
            (("0000:3b:00.1", CX6DX, st_in_msix),),
            "ST table in MSI-X Vector Control; extended TPH; MSI-X 32 vectors in BAR 2 at 0x4000",
        ),
        Fixture(
            "ds-only.lspci",
            (("0000:5e:00.0", BCM57508, ds_only),),
            "Device Specific mode only, ST table location none: TPH must be forced off",
        ),
        Fixture(
            "ext-tph.lspci",
            (("0000:af:00.0", BCM57508, ext_tph),),
            "extended TPH, 16 16-bit entries in the capability; IV, DS and No ST modes",
        ),
        Fixture("no-tph.lspci", (("0000:18:00.0", X710, no_tph),), "MSI-X but no TPH"),
        Fixture(
            "table-1-entry.lspci",
            (("0000:3b:00.0", E810, one),),
            "smallest table: 1 entry in the capability (capability 0xe bytes, claimed 0x10)",
        ),
        Fixture(
            "table-64-entries.lspci",
            (("0000:3b:00.0", E810, sixty_four),),
            "largest legal table in the capability: 64 entries",
        ),
        Fixture(
            "table-65-entries.lspci",
            (("0000:3b:00.0", E810, sixty_five),),
            "65 entries in the capability: over the PCIe limit of 64, TPH must be forced off",
        ),
        Fixture(
            "table-overflow.lspci",
            (("0000:3b:00.0", E810, overflow),),
            "TPH at 0xf80 with 64 entries: the table runs past 0x1000",
        ),
        Fixture(
            "table-overlap.lspci",
            (("0000:3b:00.0", E810, overlap),),
            "16-entry table overlapped by an LTR capability at 0x160",
        ),
        Fixture(
            "location-reserved.lspci",
            (("0000:3b:00.0", E810, reserved_loc),),
            "ST table location is the reserved encoding 3",
        ),
        Fixture(
            "st-in-msix-no-msix.lspci",
            (("0000:3b:00.0", E810, no_msix),),
            "ST table location MSI-X on a device without MSI-X",
        ),
        Fixture(
            "enabled-at-snapshot.lspci",
            (("0000:3b:00.0", E810, enabled),),
            "control register already has TPH enabled in Interrupt Vector mode",
        ),
        Fixture(
            "reserved-bits.lspci",
            (("0000:3b:00.0", E810, rsvd),),
            "reserved bits set in the TPH capability and control registers",
        ),
        Fixture(
            "cfg-256.lspci",
            (("0000:3b:00.0", E810, st_in_cap[:PCI_CFG_SPACE_SIZE]),),
            "256-byte dump (lspci -xxx): TPH presence unknown",
        ),
        Fixture(
            "header-only.lspci",
            (("0000:3b:00.0", E810, st_in_cap[:64]),),
            "64-byte dump (lspci -x): header only",
        ),
        Fixture(
            "multi.lspci",
            (
                ("0000:3b:00.0", E810, st_in_cap),
                ("0000:3b:00.1", CX6DX, st_in_msix),
                ("0001:02:00.0", BCM57508, ds_only),
                ("0000:18:00.0", X710, no_tph),
            ),
            "four devices, one in PCI domain 0001",
        ),
    )


FIXTURES: tuple[Fixture, ...] = _fixtures()


def _row_line(off: int, header_lines: int = 1) -> int:
    """Line number of the dump row holding byte ``off`` (after ``header_lines`` lines)."""
    return header_lines + 1 + off // 16


def _bad_fixtures() -> tuple[BadFixture, ...]:
    good = _e810(tph=_CAP8)
    text = to_lspci(good, "0000:3b:00.0", E810)
    lines = text.splitlines(keepends=True)

    def with_line(row: int, new: str) -> bytes:
        out = list(lines)
        out[row + 1] = new
        return "".join(out).encode()

    row3 = lines[4].split()
    truncated = " ".join(row3[:10]) + "\n"  # "30:" and 9 bytes
    row0 = lines[1].split()
    odd = " ".join([row0[0], "086", *row0[2:]]) + "\n"
    row1 = lines[2].split()
    nonhex = " ".join([row1[0], *row1[1:5], "zz", *row1[6:]]) + "\n"

    # std loop: the last standard capability (PCIe at 0xa0) points back to PM at 0x40.
    std_loop = _patch(good, 0xA1, 1, 0x40)
    # ext loop: DSN (0x1f0, the last) points back to AER at 0x100.
    dsn_hdr = int.from_bytes(good[0x1F0:0x1F4], "little")
    ext_loop = _patch(good, 0x1F0, 4, EXT_CAP_HEADER["next"].put(dsn_hdr, 0x100))
    # AER's next pointer below 0x100.
    aer_hdr = int.from_bytes(good[0x100:0x104], "little")
    below = _patch(good, 0x100, 4, EXT_CAP_HEADER["next"].put(aer_hdr, 0x0C0))
    # MSI-X at 0xf8 in a 256-byte dump: its 12 bytes would end at 0x104.
    past_256 = build_config(msix=MsixSpec(table_size=16), msix_at=0xF8, size=PCI_CFG_SPACE_SIZE)
    # A Device Serial Number capability at 0xff8 needs 0xc bytes: past 0x1000.
    past_4k = _e810(tph=_CAP8, dsn_at=0xFF8)
    gap = "".join(lines[:6] + lines[7:]).encode()  # row 0x50 missing

    def dump(data: bytes, bdf: str = "0000:3b:00.0") -> bytes:
        return to_lspci(data, bdf, E810).encode()

    second = "\n" + to_lspci(good, "0000:3b:00.0", E810)
    dup_line = len(lines) + 2
    return (
        BadFixture("truncated-line.lspci", with_line(3, truncated), 5, "9 bytes on the line"),
        BadFixture("odd-digits.lspci", with_line(0, odd), 2, "bad hex byte '086'"),
        BadFixture(
            "odd-digits.hex", (_to_hex(good)[:-2] + "\n").encode(), 128, "odd number of hex"
        ),
        BadFixture("non-hex.lspci", with_line(1, nonhex), 3, "bad hex byte 'zz'"),
        BadFixture("non-hex.hex", _hex_with_typo(good, 3), 3, "not hex"),
        BadFixture("std-cap-loop.lspci", dump(std_loop), _row_line(0xA1), "capability loop"),
        BadFixture(
            "ext-cap-loop.lspci", dump(ext_loop), _row_line(0x1F0), "extended capability loop"
        ),
        BadFixture(
            "next-below-100.lspci",
            dump(below),
            _row_line(0x100),
            "next pointer 0xc0 below 0x100",
        ),
        BadFixture(
            "ptr-past-end-256.lspci",
            dump(past_256),
            _row_line(0x41),
            "run past the end of the standard config space",
        ),
        BadFixture(
            "ext-cap-past-end.lspci",
            dump(past_4k),
            _row_line(0x1A0),  # SR-IOV at 0x1a0 holds the pointer to 0xff8
            "runs past the end of config space",
        ),
        BadFixture("offset-gap.lspci", gap, 7, "offset 0x60 where 0x50 was expected"),
        BadFixture(
            "data-before-device.lspci", "".join(lines[1:]).encode(), 1, "before any device line"
        ),
        BadFixture("truncated-dump.lspci", "".join(lines[:9]).encode(), 9, "ends at 0x80 bytes"),
        BadFixture("not-a-dump-line.lspci", with_line(2, "hello world\n"), 4, "not an lspci"),
        BadFixture(
            "bad-bdf.lspci",
            text.replace("0000:3b:00.0", "0000:3b:20.0", 1).encode(),
            1,
            "device number 0x20 out of range",
        ),
        BadFixture("duplicate-bdf.lspci", (text + second).encode(), dup_line, "appears twice"),
        BadFixture("empty.lspci", b"", 0, "empty file"),
        BadFixture("wrong-size.bin", good[:300], 0, "binary config is 300 bytes"),
    )


def _hex_with_typo(data: bytes, line: int) -> bytes:
    """The hex rendering of ``data`` with a non-hex character at the start of ``line``."""
    rows = _to_hex(data).splitlines(keepends=True)
    rows[line - 1] = "g" + rows[line - 1][1:]
    return "".join(rows).encode()


BAD_FIXTURES: tuple[BadFixture, ...] = _bad_fixtures()

SYSFS_BDF = "0000:3b:00.0"


def generate(outdir: Path) -> list[Path]:
    """Write every fixture under ``outdir``; returns the paths written (sorted)."""
    written: list[Path] = []

    def write(rel: str, content: bytes) -> None:
        path = outdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        written.append(path)

    index = ["# Device fixtures (generated by `python -m tphtrap.synth fixtures/devices`)", ""]
    for fx in FIXTURES:
        text = "\n".join(to_lspci(data, bdf, desc) for bdf, desc, data in fx.devices)
        write(fx.name, text.encode())
        index.append(f"- `{fx.name}`: {fx.about}")
    cap = FIXTURES[0].devices[0][2]
    write("nic-st-in-cap.hex", _to_hex(cap).encode())
    index.append("- `nic-st-in-cap.hex`: nic-st-in-cap.lspci as a plain hex string")
    write(f"sysfs/{SYSFS_BDF}/config", cap)
    index.append(f"- `sysfs/{SYSFS_BDF}/config`: nic-st-in-cap as a binary sysfs config file")
    index += ["", "Malformed sources are in `bad/`; `bad/EXPECTED.tsv` lists the error each gives."]
    tsv = [
        "# file\tline (0: no line, whole-file error)\tmessage fragment",
    ]
    for bad in BAD_FIXTURES:
        write(f"bad/{bad.name}", bad.content)
        tsv.append(f"{bad.name}\t{bad.line}\t{bad.fragment}")
    write("bad/EXPECTED.tsv", ("\n".join(tsv) + "\n").encode())
    write("README.md", ("\n".join(index) + "\n").encode())
    return sorted(written)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tphtrap.synth",
        description="Regenerate the device fixtures (lspci -xxxx text, malformed dumps, sysfs).",
    )
    parser.add_argument("outdir", type=Path, help="output directory, e.g. fixtures/devices")
    args = parser.parse_args(argv)
    paths = generate(args.outdir)
    print(f"wrote {len(paths)} files under {args.outdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
