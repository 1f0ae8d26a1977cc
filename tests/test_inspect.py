"""``tphtrap inspect``: the lspci oracle on every fixture, the JSON document, errors, fixtures."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DEVICES,
    REPO,
    TPHTRAP,
    BadCase,
    bad_cases,
    good_lspci_fixtures,
    lspci_vvv,
    parse_lspci_vvv,
)

from tphtrap.cli import main
from tphtrap.report import SCHEMA
from tphtrap.synth import build_config, generate

LSPCI_LOCATION = {
    "No steering table available": "none",
    "Steering table in TPH capability structure": "cap",
    "Steering table in MSI-X table": "msix",
    "Reserved steering table location": "reserved",
}


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(["inspect", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


# --- the lspci oracle -----------------------------------------------------------------------
@pytest.mark.parametrize("path", good_lspci_fixtures(), ids=lambda p: p.name)
def test_decode_agrees_with_lspci(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What ``lspci -F FILE -vvv`` prints about TPH and MSI-X agrees with ``inspect --json``."""
    oracle = parse_lspci_vvv(lspci_vvv(path))
    docs = {d["bdf"]: d for d in inspect_json(capsys, str(path), "--all")}
    assert set(oracle) == set(docs)
    for bdf, seen in oracle.items():
        doc = docs[bdf]
        ours = [c["offset"] for c in doc["capabilities"]]
        assert seen.cap_offsets == ours, f"{bdf}: capability walk"
        tph = doc["tph"]
        if seen.tph_offset is None:
            assert tph is None, bdf
        else:
            assert tph is not None, bdf
            assert (tph["offset"], tph["version"]) == (seen.tph_offset, seen.tph_version)
            lines = seen.tph_lines
            assert ("Interrupt vector mode supported" in lines) == tph["modes"]["interrupt_vector"]
            assert ("Device specific mode supported" in lines) == tph["modes"]["device_specific"]
            assert ("Extended requester support" in lines) == tph["extended_tph"]
            locations = [LSPCI_LOCATION[line] for line in lines if line in LSPCI_LOCATION]
            assert locations == [tph["st_table"]["location"]], lines
        msix = doc["msix"]
        if seen.msix is None:
            assert msix is None, bdf
        else:
            assert msix is not None, bdf
            assert seen.msix == {
                "enabled": msix["enabled"],
                "count": msix["table_size"],
                "masked": msix["function_mask"],
                "table_bar": msix["table_bir"],
                "table_offset": msix["table_offset"],
                "pba_bar": msix["pba_bir"],
                "pba_offset": msix["pba_offset"],
            }


def test_oracle_sees_tph_in_the_fixtures_that_have_it() -> None:
    """Guard the oracle itself: it must actually find TPH and MSI-X lines."""
    seen = parse_lspci_vvv(lspci_vvv(DEVICES / "ext-tph.lspci"))["0000:af:00.0"]
    assert seen.tph_offset == 0x148 and seen.tph_version == 1
    assert seen.tph_lines == [
        "Interrupt vector mode supported",
        "Device specific mode supported",
        "Extended requester support",
        "Steering table in TPH capability structure",
    ]
    assert seen.msix is not None and seen.msix["count"] == 64 and seen.msix["table_bar"] == 4


# --- the JSON document ----------------------------------------------------------------------
TOP_KEYS = {
    "schema",
    "source",
    "bdf",
    "vendor_id",
    "device_id",
    "revision",
    "class_code",
    "class_name",
    "config_size",
    "ext_visible",
    "capabilities",
    "pcie",
    "root_port",
    "tph",
    "msix",
    "verdict",
    "warnings",
}


def test_json_for_st_in_cap(capsys: pytest.CaptureFixture[str]) -> None:
    doc = inspect_json(capsys, str(DEVICES / "nic-st-in-cap.lspci"))
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == SCHEMA
    assert (doc["bdf"], doc["vendor_id"], doc["device_id"]) == ("0000:3b:00.0", 0x8086, 0x1593)
    assert (doc["class_code"], doc["class_name"], doc["revision"]) == (
        0x020000,
        "Ethernet controller",
        2,
    )
    assert doc["config_size"] == 4096 and doc["ext_visible"] is True
    tph_cap = next(c for c in doc["capabilities"] if c["id"] == 0x17 and c["kind"] == "ext")
    assert tph_cap == {
        "kind": "ext",
        "id": 0x17,
        "name": "TPH Requester",
        "offset": 0x148,
        "length": 0x1C,
        "end": 0x164,
        "version": 1,
    }
    assert doc["tph"] == {
        "offset": 0x148,
        "version": 1,
        "length": 0x1C,
        "region_length": 0x1C,
        "cap_raw": 0x00070203,
        "ctrl_raw": 0,
        "modes": {"no_st": True, "interrupt_vector": True, "device_specific": False},
        "extended_tph": False,
        "st_table": {
            "location": "cap",
            "size": 8,
            "size_field": 7,
            "offset": 0x154,
            "end": 0x164,
            "entries": [0] * 8,
            "ok": True,
        },
        "control": {
            "st_mode": 0,
            "st_mode_name": "no-st",
            "requester_enable": 0,
            "requester_enable_name": "disabled",
            "enabled": False,
            "reserved_bits": 0,
        },
        "cap_reserved_bits": 0,
        "problems": [],
    }
    assert doc["msix"] == {
        "offset": 0x70,
        "flags_raw": 0x000F,
        "table_size": 16,
        "table_bir": 0,
        "table_offset": 0x2000,
        "table_bytes": 0x100,
        "pba_bir": 0,
        "pba_offset": 0x3000,
        "enabled": False,
        "function_mask": False,
    }
    assert doc["pcie"] == {
        "offset": 0xA0,
        "version": 2,
        "type": 0,
        "type_name": "endpoint",
        "tph_completer": 3,
        "tph_completer_name": "extended-tph",
    }
    assert doc["root_port"] is None  # a dump: nothing says what is above the device
    assert doc["verdict"]["status"] == "trappable" and doc["verdict"]["trappable"] is True
    assert doc["verdict"]["notes"] == [
        "root port TPH Completer not checked: the source is not a sysfs device (inspect the "
        "device on its host, or run inspect --host there)"
    ]
    assert doc["warnings"] == []


@pytest.mark.parametrize(
    ("name", "status", "reason"),
    [
        ("nic-st-in-cap.lspci", "trappable", "in the TPH capability, 8 entries"),
        ("nic-st-in-msix.lspci", "trappable", "in the MSI-X table, 32 vectors in BAR 2 at 0x4000"),
        ("ext-tph.lspci", "trappable", "16 entries"),
        ("table-1-entry.lspci", "trappable", "1 entry at 0x154-0x155"),
        ("table-64-entries.lspci", "trappable", "64 entries"),
        ("enabled-at-snapshot.lspci", "trappable", "8 entries"),
        ("reserved-bits.lspci", "trappable", "8 entries"),
        ("ds-only.lspci", "force-off", "Device Specific mode only"),
        ("location-reserved.lspci", "force-off", "reserved encoding 3"),
        ("table-65-entries.lspci", "force-off", "at most 64"),
        ("table-overflow.lspci", "force-off", "runs past the end of config space"),
        ("table-overlap.lspci", "force-off", "overlaps"),
        ("st-in-msix-no-msix.lspci", "force-off", "no MSI-X capability"),
        ("no-tph.lspci", "no-tph", "no TPH Requester capability"),
        ("cfg-256.lspci", "unknown", "256-byte config space hides the extended capabilities"),
        ("header-only.lspci", "unknown", "TPH presence is unknown"),
    ],
)
def test_verdicts(name: str, status: str, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    v = inspect_json(capsys, str(DEVICES / name))["verdict"]
    assert v["status"] == status and reason in v["reason"]
    assert v["trappable"] is (status == "trappable")


def test_json_details_for_special_devices(capsys: pytest.CaptureFixture[str]) -> None:
    mx = inspect_json(capsys, str(DEVICES / "nic-st-in-msix.lspci"))["tph"]
    assert mx["st_table"] == {
        "location": "msix",
        "size": 32,
        "size_field": 31,
        "offset": None,
        "end": None,
        "entries": None,
        "ok": True,
    }
    assert mx["extended_tph"] is True and mx["length"] == 0xC
    snap = inspect_json(capsys, str(DEVICES / "enabled-at-snapshot.lspci"))
    assert snap["tph"]["control"] == {
        "st_mode": 1,
        "st_mode_name": "interrupt-vector",
        "requester_enable": 1,
        "requester_enable_name": "tph",
        "enabled": True,
        "reserved_bits": 0,
    }
    assert any("already enabled" in n for n in snap["verdict"]["notes"])
    rsvd = inspect_json(capsys, str(DEVICES / "reserved-bits.lspci"))["tph"]
    assert (rsvd["cap_reserved_bits"], rsvd["control"]["reserved_bits"]) == (
        0xA800A8A8,
        0xAAAAA8A8,
    )
    ext = inspect_json(capsys, str(DEVICES / "ext-tph.lspci"))
    assert any("Device Specific mode is supported" in n for n in ext["verdict"]["notes"])
    small = inspect_json(capsys, str(DEVICES / "cfg-256.lspci"))
    assert small["tph"] is None and small["ext_visible"] is False and small["msix"] is not None


def test_all_and_bdf(capsys: pytest.CaptureFixture[str]) -> None:
    multi = str(DEVICES / "multi.lspci")
    docs = inspect_json(capsys, multi, "--all")
    assert [d["bdf"] for d in docs] == [
        "0000:3b:00.0",
        "0000:3b:00.1",
        "0001:02:00.0",
        "0000:18:00.0",
    ]
    one = inspect_json(capsys, multi, "--bdf", "0001:02:00.0")
    assert one == docs[2]
    assert main(["inspect", multi, "--all"]) == 0
    text = capsys.readouterr().out
    assert text.count("Verdict:") == 4 and "0001:02:00.0  14e4:1750" in text
    assert main(["inspect", multi, "--all", "--bdf", "3b:00.0"]) == 2  # a usage error


def test_sysfs_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = inspect_json(capsys, str(DEVICES / "nic-st-in-cap.lspci"))
    d = tmp_path / "0000:3b:00.0"
    d.mkdir()
    (d / "config").write_bytes((DEVICES / "sysfs" / "0000:3b:00.0" / "config").read_bytes())
    doc = inspect_json(capsys, str(d))
    assert doc["source"] == str(d / "config")
    # A lone copy of a device directory: what is above it is not known.
    assert doc["root_port"]["kind"] == "unknown"
    assert "not below a host bridge directory" in doc["root_port"]["summary"]
    assert doc["verdict"]["notes"] == [
        f"{doc['root_port']['summary']}; whether Linux can enable TPH is unknown"
    ]
    same = {**doc, "source": ref["source"], "root_port": None, "verdict": ref["verdict"]}
    assert same == ref
    assert doc["verdict"]["status"] == ref["verdict"]["status"] == "trappable"


def test_hex_source(capsys: pytest.CaptureFixture[str]) -> None:
    doc = inspect_json(capsys, str(DEVICES / "nic-st-in-cap.hex"))
    assert doc["bdf"] is None and doc["verdict"]["status"] == "trappable"


# --- human output ---------------------------------------------------------------------------
def test_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(DEVICES / "nic-st-in-cap.lspci")]) == 0
    out = capsys.readouterr().out
    for needle in (
        "0000:3b:00.0  8086:1593  Ethernet controller (class 020000, rev 02)",
        "0x148-0x163  TPH Requester",
        "0x070-0x07b  MSI-X",
        "modes supported    No ST, Interrupt Vector",
        "extended TPH       no",
        "ST table           in the TPH capability at 0x154-0x163",
        "ST table size      8 entries (field 7)",
        "control            0x00000000: ST mode No ST (0), requester enable disabled (0)",
        "[00-07]  00 00 00 00 00 00 00 00",
        "table              16 vectors in BAR 0 at 0x2000-0x20ff",
        "PBA                BAR 0 at 0x3000",
        "Verdict: trappable: yes (standard ST table in the TPH capability",
    ):
        assert needle in out, needle
    assert main(["inspect", str(DEVICES / "ds-only.lspci")]) == 0
    out = capsys.readouterr().out
    assert "Verdict: TPH must be forced off in a VM: no standard ST table" in out
    assert main(["inspect", str(DEVICES / "cfg-256.lspci")]) == 0
    out = capsys.readouterr().out
    assert "TPH must be forced off in a VM: the 256-byte config space hides" in out
    assert "TPH presence is unknown" in out


def test_ext_tph_entries_show_16_bits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tphtrap.synth import TphSpec, to_lspci

    data = build_config(tph=TphSpec(extended=True, table_size=3, entries=(0x1234, 0xABCD, 0x0010)))
    p = tmp_path / "e.lspci"
    p.write_text(to_lspci(data))
    assert main(["inspect", str(p)]) == 0
    assert "[00-02]  1234 abcd 0010" in capsys.readouterr().out
    assert inspect_json(capsys, str(p))["tph"]["st_table"]["entries"] == [0x1234, 0xABCD, 0x10]


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c.path.name)
def test_malformed_dump_exit_1_one_line(case: BadCase) -> None:
    res = subprocess.run(
        [str(TPHTRAP), "inspect", str(case.path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 1, res.stderr
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    where = f"{case.path}:{case.line}" if case.line else str(case.path)
    assert lines[0].startswith(f"tphtrap: error: {where}: "), lines[0]
    assert case.fragment in lines[0]


def test_malformed_dump_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    bad = DEVICES / "bad" / "std-cap-loop.lspci"
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"tphtrap: error: {bad}:12: capability loop: 0x40 -> 0x70 -> 0xa0 -> 0x40\n"


def test_bad_bdf_argument_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(DEVICES / "multi.lspci"), "--bdf", "zz"]) == 1
    assert "not a PCI address" in capsys.readouterr().err


def test_demo_command() -> None:
    """``make demo`` runs this first: it must print a decoded device."""
    res = subprocess.run(
        [str(TPHTRAP), "inspect", "fixtures/devices/nic-st-in-cap.lspci"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 0 and res.stderr == ""
    assert "TPH Requester:" in res.stdout and "trappable: yes" in res.stdout


# --- fixtures and docs ----------------------------------------------------------------------
def test_checked_in_fixtures_match_the_generator(tmp_path: Path) -> None:
    written = generate(tmp_path)
    made = {p.relative_to(tmp_path).as_posix() for p in written}
    present = {p.relative_to(DEVICES).as_posix() for p in DEVICES.rglob("*") if p.is_file()}
    assert made == present, "run: .venv/bin/python -m tphtrap.synth fixtures/devices"
    for rel in sorted(made):
        assert (tmp_path / rel).read_bytes() == (DEVICES / rel).read_bytes(), (
            f"{rel} differs from the generator; run: .venv/bin/python -m tphtrap.synth "
            "fixtures/devices"
        )


def test_docs_describe_every_json_field(capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "docs" / "inspect.md").read_text()
    doc = inspect_json(capsys, str(DEVICES / "nic-st-in-cap.lspci"))
    keys = set(doc) | set(doc["tph"]) | set(doc["msix"]) | set(doc["verdict"])
    keys |= set(doc["tph"]["st_table"]) | set(doc["tph"]["control"]) | set(doc["tph"]["modes"])
    keys |= set(doc["capabilities"][0]) | set(doc["pcie"])
    keys |= {"kind", "bdf", "completer", "completer_name", "summary", "error"}  # root_port
    documented = set(re.findall(r"`([a-z_]+)`", text))
    assert keys <= documented, sorted(keys - documented)


def _doc_block(text: str, command: str) -> str:
    start = text.index(f"$ {command}\n") + len(command) + 3
    return text[start : text.index("```", start)]


def test_docs_examples_are_real_output(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (REPO / "docs" / "inspect.md").read_text()
    monkeypatch.chdir(REPO)
    assert main(["inspect", "fixtures/devices/nic-st-in-cap.lspci"]) == 0
    assert _doc_block(text, "tphtrap inspect fixtures/devices/nic-st-in-cap.lspci") == (
        capsys.readouterr().out
    )
    assert main(["inspect", "fixtures/devices/nic-st-in-msix.lspci", "--json"]) == 0
    assert _doc_block(text, "tphtrap inspect fixtures/devices/nic-st-in-msix.lspci --json") == (
        capsys.readouterr().out
    )


def test_missing_lspci_fails_unless_skipping_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import helpers

    monkeypatch.setattr(helpers.shutil, "which", lambda name: None)
    monkeypatch.setattr(helpers.os, "access", lambda path, mode: False)
    monkeypatch.delenv("TPHTRAP_SKIP_LSPCI", raising=False)
    with pytest.raises(pytest.fail.Exception, match="TPHTRAP_SKIP_LSPCI=1"):
        helpers.require_lspci()
    monkeypatch.setenv("TPHTRAP_SKIP_LSPCI", "1")
    with pytest.raises(pytest.skip.Exception):
        helpers.require_lspci()
