"""The config-space model: loaders, capability walks, TPH and MSI-X views, malformed input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import DEVICES, BadCase, bad_cases, require_lspci
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tphtrap import device as device_mod
from tphtrap.device import (
    ConfigSpace,
    load_device,
    load_devices,
    normalize_bdf,
    parse_hex_config,
    parse_lspci,
)
from tphtrap.errors import DeviceError
from tphtrap.report import describe, render
from tphtrap.spec import StLocation
from tphtrap.synth import ExtCapSpec, MsixSpec, TphSpec, build_config, to_lspci

CAP = DEVICES / "nic-st-in-cap.lspci"


def dev(name: str, bdf: str | None = None) -> ConfigSpace:
    return load_device(DEVICES / name, bdf)


# --- loaders --------------------------------------------------------------------------------
def test_every_loader_yields_the_same_bytes(tmp_path: Path) -> None:
    ref = dev("nic-st-in-cap.lspci")
    assert ref.bdf == "0000:3b:00.0" and ref.size == 4096
    hexed = dev("nic-st-in-cap.hex")
    sysfs_dir = load_device(DEVICES / "sysfs" / "0000:3b:00.0")
    sysfs_file = load_device(DEVICES / "sysfs" / "0000:3b:00.0" / "config")
    inline = parse_hex_config("0x" + ref.data.hex(), "inline")
    spaced = parse_hex_config(" ".join(f"{b:02X}" for b in ref.data), "spaced")
    for other in (hexed, sysfs_dir, sysfs_file, inline, spaced):
        assert other.data == ref.data
        assert other.tph == ref.tph and other.msix == ref.msix and other.caps == ref.caps
    assert sysfs_dir.bdf == sysfs_file.bdf == "0000:3b:00.0"
    assert hexed.bdf is None
    assert sysfs_dir.source.endswith("0000:3b:00.0/config")


def test_fake_sysfs_directory(tmp_path: Path) -> None:
    d = tmp_path / "0000:af:00.0"
    d.mkdir()
    data = build_config(tph=TphSpec(), msix=MsixSpec())
    (d / "config").write_bytes(data)
    cfg = load_device(d)
    assert cfg.bdf == "0000:af:00.0" and cfg.data == data and cfg.tph is not None
    # a 256-byte config (what an unprivileged read of a conventional device gives) also loads
    (d / "config").write_bytes(data[:256])
    small = load_device(d)
    assert small.size == 256 and small.tph is None and not small.ext_visible


def test_bare_address_means_the_sysfs_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "0000:3b:00.0"
    d.mkdir()
    (d / "config").write_bytes(build_config())
    monkeypatch.setattr(device_mod, "SYSFS_DEVICES", tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    assert load_device("3b:00.0").bdf == "0000:3b:00.0"
    with pytest.raises(DeviceError, match="cannot read"):
        load_device("3b:00.1")


def test_sysfs_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"config: cannot read"):
        load_device(tmp_path)


def test_missing_file() -> None:
    with pytest.raises(DeviceError, match="cannot read"):
        load_device(DEVICES / "does-not-exist.lspci")


def test_multi_device_dump_pick_by_bdf() -> None:
    devices = load_devices(DEVICES / "multi.lspci")
    assert [d.bdf for d in devices] == [
        "0000:3b:00.0",
        "0000:3b:00.1",
        "0001:02:00.0",
        "0000:18:00.0",
    ]
    assert dev("multi.lspci", "3b:00.1").data == dev("nic-st-in-msix.lspci").data
    assert dev("multi.lspci", "0001:02:00.0").data == dev("ds-only.lspci").data
    assert dev("multi.lspci", "1:02:00.0").bdf == "0001:02:00.0"
    with pytest.raises(DeviceError, match=r"no device 0000:3b:00\.2 .*have: 0000:3b:00\.0"):
        dev("multi.lspci", "3b:00.2")
    with pytest.raises(DeviceError, match="4 devices in the dump; pick one with --bdf"):
        dev("multi.lspci")
    with pytest.raises(DeviceError, match="not a PCI address"):
        dev("multi.lspci", "nonsense")  # a DeviceError, not a ValueError


def test_lines_of_a_multi_device_dump() -> None:
    devices = load_devices(DEVICES / "multi.lspci")
    # 257 lines per 4096-byte device plus a blank separator line
    assert [d.line_map[0] for d in devices] == [2, 260, 518, 776]
    assert devices[1].where(0x148) == f"{DEVICES / 'multi.lspci'}:{260 + 0x14}"


def test_normalize_bdf() -> None:
    assert normalize_bdf("3b:00.0") == "0000:3b:00.0"
    assert normalize_bdf(" 10000:AF:1f.7 ") == "10000:af:1f.7"
    for bad in ("3b:00", "3b:20.0", "3b:00.8", "x:00.0", ""):
        with pytest.raises(ValueError):
            normalize_bdf(bad)


def test_lspci_text_with_verbose_lines_and_crlf() -> None:
    data = build_config(tph=TphSpec(), msix=MsixSpec())
    text = to_lspci(data, "3b:00.0", "Ethernet controller: x")
    lines = text.splitlines()
    verbose = [lines[0], "\tSubsystem: x", "\tCapabilities: [40] Power Management", *lines[1:]]
    cfgs = parse_lspci("\r\n".join(verbose) + "\r\n", "v.lspci")
    assert len(cfgs) == 1 and cfgs[0].data == data and cfgs[0].bdf == "0000:3b:00.0"
    assert cfgs[0].line_map[0] == 4


def test_lspci_writes_what_we_read(tmp_path: Path) -> None:
    """``lspci -F FILE -xxxx -vvv`` output (details and all) parses back to the same bytes."""
    exe = require_lspci()
    for name in ("nic-st-in-cap.lspci", "multi.lspci", "cfg-256.lspci"):
        path = DEVICES / name
        out = subprocess.run(
            [exe, "-F", str(path), "-D", "-vvv", "-xxxx"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        again = {d.bdf: d.data for d in parse_lspci(out, "lspci-out")}
        assert again == {d.bdf: d.data for d in load_devices(path)}, name


def test_only_indented_lines_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "x.lspci"
    p.write_text("\tCapabilities: nothing\n")
    with pytest.raises(DeviceError, match="no device found"):
        load_device(p)


def test_config_space_sizes() -> None:
    with pytest.raises(DeviceError, match="300 bytes"):
        ConfigSpace.from_bytes(bytes(300))
    assert ConfigSpace.from_bytes(bytes(64)).caps == ()
    with pytest.raises(DeviceError, match="bytes of hex"):
        parse_hex_config("00" * 100, "h")


# --- capability walks and byte ranges -------------------------------------------------------
def test_capability_byte_ranges() -> None:
    cfg = dev("nic-st-in-cap.lspci")
    got = [(c.kind, c.cap_id, c.offset, c.length) for c in cfg.caps]
    assert got == [
        ("std", 0x01, 0x40, 8),  # Power Management
        ("std", 0x11, 0x70, 12),  # MSI-X
        ("std", 0x10, 0xA0, 0x34),  # PCIe v2 endpoint (PCI_CAP_EXP_ENDPOINT_SIZEOF_V2)
        ("ext", 0x01, 0x100, 0x2C),  # AER of an endpoint (vfio: PCI_ERR_ROOT_COMMAND)
        ("ext", 0x17, 0x148, 0xC + 2 * 8),  # TPH with 8 entries in the capability
        ("ext", 0x0E, 0x170, 8),  # ARI
        ("ext", 0x10, 0x1A0, 0x40),  # SR-IOV
        ("ext", 0x03, 0x1F0, 0xC),  # DSN
    ]
    owner = cfg.owner
    assert owner(0x148) is owner(0x163) is cfg.caps[4]
    assert owner(0x164) is None and owner(0x3F) is None
    assert owner(0x7B) is cfg.caps[1] and owner(0x7C) is None
    assert cfg.caps[4].name == "TPH Requester" and cfg.caps[4].version == 1
    assert cfg.ext_visible and cfg.warnings == ()


def test_tph_and_msix_views() -> None:
    cap = dev("nic-st-in-cap.lspci")
    t, m = cap.tph, cap.msix
    assert t is not None and m is not None
    assert (t.offset, t.location, t.table_size, t.table_offset, t.length, t.region_length) == (
        0x148,
        StLocation.CAP,
        8,
        0x154,
        0x1C,
        0x1C,
    )
    assert t.no_st_mode and t.interrupt_vector_mode and not t.device_specific_mode
    assert not t.extended_tph and t.table_ok and t.entries == (0,) * 8 and not t.enabled
    assert (m.offset, m.table_size, m.table_bir, m.table_offset, m.table_bytes) == (
        0x70,
        16,
        0,
        0x2000,
        0x100,
    )
    assert (m.pba_bir, m.pba_offset, m.enabled, m.function_mask) == (0, 0x3000, False, False)

    mx = dev("nic-st-in-msix.lspci")
    assert mx.tph is not None and mx.msix is not None
    assert mx.tph.location is StLocation.MSIX and mx.tph.extended_tph and mx.tph.table_ok
    assert mx.tph.length == 0xC and mx.tph.entries == ()
    assert (mx.msix.table_size, mx.msix.table_bir, mx.msix.table_offset) == (32, 2, 0x4000)

    ext = dev("ext-tph.lspci")
    assert ext.tph is not None and ext.tph.extended_tph and ext.tph.device_specific_mode
    assert ext.tph.table_size == 16 and ext.tph.table_ok

    snap = dev("enabled-at-snapshot.lspci")
    assert snap.tph is not None and snap.tph.enabled and snap.tph.st_mode == 1


@pytest.mark.parametrize(
    ("name", "location", "size", "ok", "problem"),
    [
        ("table-1-entry.lspci", StLocation.CAP, 1, True, None),
        ("table-64-entries.lspci", StLocation.CAP, 64, True, None),
        ("table-65-entries.lspci", StLocation.CAP, 65, False, "at most 64"),
        ("table-overflow.lspci", StLocation.CAP, 64, False, "runs past the end"),
        ("table-overlap.lspci", StLocation.CAP, 16, False, "overlaps Latency Tolerance"),
        ("location-reserved.lspci", StLocation.RESERVED, 8, False, "reserved encoding"),
        ("ds-only.lspci", StLocation.NONE, 1, False, None),
        ("st-in-msix-no-msix.lspci", StLocation.MSIX, 16, False, "no MSI-X capability"),
        ("reserved-bits.lspci", StLocation.CAP, 8, True, None),
    ],
)
def test_table_edge_cases(
    name: str, location: StLocation, size: int, ok: bool, problem: str | None
) -> None:
    t = dev(name).tph
    assert t is not None
    assert (t.location, t.table_size, t.table_ok) == (location, size, ok)
    if problem is None:
        assert t.problems == ()
    else:
        assert any(problem in p for p in t.problems), t.problems
    if ok and location is StLocation.CAP:
        assert len(t.entries) == size
    else:
        assert t.entries == ()


def test_table_1_entry_lengths() -> None:
    t = dev("table-1-entry.lspci").tph
    assert t is not None and (t.length, t.region_length, t.entries) == (0xE, 0x10, (0x42,))


def test_table_64_entries_contents_little_endian() -> None:
    t = dev("table-64-entries.lspci").tph
    assert t is not None and t.entries == tuple((4 * i) & 0xFF for i in range(64))


def test_reserved_bits_are_kept_in_the_raw_values() -> None:
    t = dev("reserved-bits.lspci").tph
    assert t is not None and t.cap_raw == 0xA807AAAB and t.ctrl_raw == 0xAAAAA8A8
    assert t.st_mode == 0 and not t.enabled  # the reserved bits do not leak into fields


def test_snapshots_that_hide_the_extended_space() -> None:
    small = dev("cfg-256.lspci")
    assert small.size == 256 and small.tph is None and small.msix is not None
    assert not small.ext_visible and "256 bytes" in small.warnings[0]
    header = dev("header-only.lspci")
    assert header.caps == () and header.msix is None and "64-byte header" in header.warnings[0]


def test_no_tph() -> None:
    cfg = dev("no-tph.lspci")
    assert cfg.tph is None and cfg.msix is not None and cfg.ext_visible
    assert (cfg.msix.table_size, cfg.msix.table_bir) == (129, 3)


def _chain_of_vendor_caps(count: int) -> bytes:
    """A 256-byte space whose standard list is ``count`` 4-byte vendor capabilities."""
    cfg = bytearray(256)
    cfg[0:2] = (0x8086).to_bytes(2, "little")
    cfg[6] = 0x10
    cfg[0x34] = 0x40
    for i in range(count):
        pos = 0x40 + 4 * i
        nxt = pos + 4 if i + 1 < count else 0
        cfg[pos : pos + 4] = bytes([0x09, nxt & 0xFF, 4, 0])
    return bytes(cfg)


def test_a_full_standard_list_of_48_capabilities_is_not_an_error() -> None:
    cfg = ConfigSpace.from_bytes(_chain_of_vendor_caps(48))
    assert len(cfg.caps) == 48 and cfg.caps[-1].offset == 0xFC and cfg.caps[-1].length == 4


def test_std_pointer_into_the_header_ends_the_list_with_a_warning() -> None:
    data = bytearray(_chain_of_vendor_caps(2))
    data[0x45] = 0x20  # second cap points into the header
    cfg = ConfigSpace.from_bytes(bytes(data))
    assert len(cfg.caps) == 2 and "points into the header" in cfg.warnings[0]


def test_std_id_ff_ends_the_list_with_a_warning() -> None:
    data = bytearray(_chain_of_vendor_caps(3))
    data[0x48] = 0xFF
    cfg = ConfigSpace.from_bytes(bytes(data))
    assert len(cfg.caps) == 2 and "0xff" in cfg.warnings[0]


def test_all_ones_config_space() -> None:
    cfg = ConfigSpace.from_bytes(b"\xff" * 4096)
    assert cfg.caps == () and cfg.tph is None and "0xffff" in cfg.warnings[0]


def test_ext_list_without_pcie_capability_is_not_walked() -> None:
    data = bytearray(build_config(tph=TphSpec()))
    data[0x41] = 0  # PM -> PCIe becomes PM -> end: no PCIe capability in the list
    cfg = ConfigSpace.from_bytes(bytes(data))
    assert cfg.tph is None and not cfg.ext_visible
    assert any("no PCI Express capability" in w for w in cfg.warnings)


def test_ext_pointer_to_an_empty_dword_ends_the_list_with_a_warning() -> None:
    data = build_config(tph=TphSpec(), with_dsn=False, extra_ext=(ExtCapSpec(0x300, 0x0E),))
    patched = bytearray(data)
    patched[0x300:0x304] = bytes(4)  # the last capability's slot is now all zero
    cfg = ConfigSpace.from_bytes(bytes(patched))
    assert cfg.tph is not None and cfg.caps[-1].offset == 0x148
    assert any("empty dword at 0x300" in w for w in cfg.warnings)


def test_second_tph_capability_makes_the_table_untrusted() -> None:
    second = TphSpec()
    data = bytearray(build_config(tph=second, with_dsn=False))
    # Graft a copy of the TPH capability at 0x400 and link it after the first.
    data[0x400:0x41C] = data[0x148:0x164]
    data[0x400:0x404] = (0x00010017).to_bytes(4, "little")  # TPH, version 1, next 0
    data[0x148:0x14C] = ((0x400 << 20) | (1 << 16) | 0x17).to_bytes(4, "little")
    cfg = ConfigSpace.from_bytes(bytes(data))
    assert cfg.tph is not None and cfg.tph.offset == 0x148 and not cfg.tph.table_ok
    assert "second TPH Requester capability" in cfg.tph.problems[-1]


def test_msix_reserved_bir_untrusts_an_msix_st_table() -> None:
    data = build_config(
        tph=TphSpec(location=StLocation.MSIX, table_size=8),
        msix=MsixSpec(table_size=8, bir=7),
    )
    cfg = ConfigSpace.from_bytes(data)
    assert cfg.tph is not None and not cfg.tph.table_ok
    assert any("BIR 7 is reserved" in w for w in cfg.warnings)


# --- malformed sources ----------------------------------------------------------------------
@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c.path.name)
def test_malformed_sources_name_file_and_line(case: BadCase) -> None:
    with pytest.raises(DeviceError) as info:
        load_devices(case.path)
    msg = str(info.value)
    where = f"{case.path}:{case.line}" if case.line else str(case.path)
    assert msg.startswith(where + ": "), msg
    assert info.value.where == where
    assert case.fragment in msg
    assert "\n" not in msg


def test_every_bad_fixture_is_listed() -> None:
    listed = {c.path.name for c in bad_cases()}
    present = {p.name for p in (DEVICES / "bad").iterdir() if p.name != "EXPECTED.tsv"}
    assert listed == present


# --- overlay --------------------------------------------------------------------------------
def test_tph_overlay_onto_a_device_without_tph() -> None:
    base = dev("no-tph.lspci")
    out = base.with_tph_overlay(dev("nic-st-in-cap.lspci"))
    assert out.tph is not None and out.tph.table_ok and out.tph.offset >= 0x1FC
    assert out.data[:0x100] == base.data[:0x100]
    assert [c.offset for c in out.caps if c.kind == "ext"][:-1] == [0x100, 0x1F0]


def test_tph_overlay_skips_the_body_of_a_capability_of_unknown_length() -> None:
    body = bytes(range(1, 0x21))  # a capability (id 0x2a, unknown length) with a 0x24-byte body
    base = ConfigSpace.from_bytes(
        build_config(with_dsn=False, extra_ext=(ExtCapSpec(0x200, 0x2A, 1, body),))
    )
    out = base.with_tph_overlay(dev("nic-st-in-cap.lspci"))
    assert out.tph is not None and out.tph.offset >= 0x224
    assert out.data[0x204:0x224] == body


def test_tph_overlay_onto_a_256_byte_snapshot() -> None:
    out = dev("cfg-256.lspci").with_tph_overlay(dev("ext-tph.lspci"))
    assert out.tph is not None and out.tph.offset == 0x100 and out.tph.extended_tph


# --- robustness -----------------------------------------------------------------------------
def _check_never_crashes(data: bytes) -> None:
    try:
        cfg = ConfigSpace.from_bytes(data, "fuzz", None, tuple(range(2, 2 + len(data) // 16)))
    except DeviceError as exc:
        assert exc.where.startswith("fuzz")
        return
    describe(cfg)
    render(cfg)
    for c in cfg.caps:
        assert c.offset < cfg.size
    if cfg.tph is not None and cfg.tph.entries:
        assert cfg.tph.table_offset + 2 * len(cfg.tph.entries) <= cfg.size


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([256, 4096]).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_arbitrary_bytes_only_raise_device_errors(data: bytes) -> None:
    _check_never_crashes(data)


_SEEDS = [
    build_config(tph=TphSpec(), msix=MsixSpec()),
    build_config(tph=TphSpec(location=StLocation.MSIX, extended=True), msix=MsixSpec()),
    build_config(tph=TphSpec(table_size=64), tph_at=0xF80),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEEDS),
    st.lists(
        st.tuples(
            st.one_of(
                st.integers(0x00, 0xFF),  # standard list and header
                st.sampled_from([0x100, 0x101, 0x102, 0x103, 0x148, 0x14A, 0x14B, 0x14C]).flatmap(
                    lambda o: st.integers(o, o + 0x10)
                ),  # ext headers, TPH registers
                st.integers(0xF80, 0xFFF),
            ),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_config_spaces_only_raise_device_errors(
    seed: bytes, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(seed)
    for off, val in edits:
        data[off] = val
    _check_never_crashes(bytes(data))
    _check_never_crashes(bytes(data[:256]))


def test_self_sized_capability_past_the_end_is_a_warning() -> None:
    vsec = ExtCapSpec(0xF00, 0x0B, 1, (0xFFF << 20 | 0x1).to_bytes(4, "little"))
    cfg = ConfigSpace.from_bytes(build_config(tph=TphSpec(), extra_ext=(vsec,)))
    assert cfg.caps[-1].offset == 0xF00 and cfg.caps[-1].length is None
    assert any("treated as unknown" in w for w in cfg.warnings)
    assert cfg.tph is not None and cfg.tph.table_ok


def test_vendor_specific_lengths_come_from_the_capability() -> None:
    vsec = ExtCapSpec(0x300, 0x0B, 1, (0x18 << 20 | 0x1).to_bytes(4, "little"))
    cfg = ConfigSpace.from_bytes(build_config(extra_ext=(vsec,), with_dsn=False))
    assert [(c.offset, c.length) for c in cfg.caps if c.cap_id == 0x0B] == [(0x300, 0x18)]
