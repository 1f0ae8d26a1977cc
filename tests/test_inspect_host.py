"""``tphtrap inspect --host``, several sources, the PCI Express type and the root port's TPH
Completer: sysfs trees built from synthetic and real config spaces, and the live host with
``lspci`` as the oracle."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import DEVICES, REPO, TPHTRAP, require_lspci

from tphtrap.cli import main
from tphtrap.device import ConfigSpace, RootPortCheck, check_root_port, load_device
from tphtrap.report import render, verdict
from tphtrap.spec import PcieType, TphCompleter
from tphtrap.synth import TphSpec, build_config

REAL_DUMPS = REPO.parent / "shared" / "real-dumps"
EXT_TPH = TphSpec(extended=True, table_size=4)


def make_tree(root: Path, functions: dict[str, bytes]) -> Path:
    """A sysfs copy at ``root``: ``devices/<path>/config`` for each entry of ``functions``
    (``"pci0000:00/0000:00:01.0/0000:01:00.0"``) and the relative links of
    ``bus/pci/devices``, as the kernel lays them out."""
    links = root / "bus" / "pci" / "devices"
    links.mkdir(parents=True)
    for rel, data in functions.items():
        where = root / "devices" / rel
        where.mkdir(parents=True, exist_ok=True)
        (where / "config").write_bytes(data)
        (links / where.name).symlink_to(Path("../../../devices") / rel)
    return root


def root_port(completer: int) -> bytes:
    return build_config(
        vendor_id=0x8086,
        device_id=0x2032,
        class_code=0x060400,
        pcie_type=PcieType.ROOT_PORT,
        tph_completer=completer,
        msix=None,
        with_aer=False,
        with_dsn=False,
    )


def endpoint(tph: TphSpec | None = EXT_TPH, **kw: Any) -> bytes:
    return build_config(tph=tph, **kw)


def host_json(capsys: pytest.CaptureFixture[str], tree: Path) -> dict[str, dict[str, Any]]:
    assert main(["inspect", "--sysfs", str(tree), "--json"]) == 0
    return {d["bdf"]: d for d in json.loads(capsys.readouterr().out)}


# --- the decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("completer", list(TphCompleter))
def test_completer_field_round_trips(completer: TphCompleter) -> None:
    cfg = ConfigSpace.from_bytes(root_port(completer))
    assert (cfg.pcie_type, cfg.tph_completer) == (PcieType.ROOT_PORT, completer)


def test_version_1_pcie_capability_has_no_completer() -> None:
    data = bytearray(root_port(TphCompleter.EXT_TPH))
    cfg = ConfigSpace.from_bytes(bytes(data))
    assert cfg.pcie is not None
    data[cfg.pcie.offset + 2] = (data[cfg.pcie.offset + 2] & 0xF0) | 1  # capability version 1
    old = ConfigSpace.from_bytes(bytes(data))
    assert old.tph_completer is TphCompleter.NONE  # as Linux reads DEVCAP2 of a v1 capability


def test_no_pcie_capability_means_no_tph_possible(capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(4096)
    data[0:4] = bytes.fromhex("8680570d")  # a host bridge: no capabilities at all
    data[0x0B] = 0x06
    cfg = ConfigSpace.from_bytes(bytes(data), "hb")
    assert cfg.pcie is None and cfg.pcie_type is None and cfg.tph_completer is None
    v = verdict(cfg)
    assert v["status"] == "no-tph" and v["reason"].endswith("so no TPH possible")
    assert "TPH presence is unknown" not in render(cfg)
    assert "TPH Requester: not possible (no PCI Express capability)" in render(cfg)


# --- real root ports (shared/real-dumps, with lspci as the oracle) -----------------------------
REAL_ROOT_PORTS = [
    ("intel-6thgen-rootport-8086-1901_pcitool-23c7a39_00-01-0.lspci", TphCompleter.NONE),
    ("intel-skylake-e-rootport-8086-2032_pcitool-ec8a5fc_17-02-0.lspci", TphCompleter.TPH),
    ("intel-skylake-e-rootport-8086-2033_pcitool-ec8a5fc_17-03-0.lspci", TphCompleter.TPH),
]


def real_dump(name: str) -> Path:
    path = REAL_DUMPS / name
    if not path.exists():
        pytest.skip(f"{path} not present (the shared real dumps sit beside the repository)")
    return path


@pytest.mark.parametrize(("name", "completer"), REAL_ROOT_PORTS, ids=lambda v: str(v)[:40])
def test_real_root_port_completer(name: str, completer: TphCompleter) -> None:
    path = real_dump(name)
    cfg = load_device(path)
    assert cfg.pcie_type == PcieType.ROOT_PORT
    assert cfg.tph_completer is completer
    lspci = subprocess.run(
        [require_lspci(), "-F", str(path), "-vvv"], capture_output=True, text=True, check=True
    ).stdout
    flags = re.search(r"TPHComp([+-]) ExtTPHComp([+-])", lspci)
    assert flags is not None, lspci
    assert (flags[1] == "+", flags[2] == "+") == (bool(completer & 1), bool(completer & 2))


def real_tree(tmp_path: Path) -> Path:
    """The two machines of the real dumps, each root port above the endpoint it served."""
    data = {
        "pci0000:00/0000:00:01.0": "intel-6thgen-rootport-8086-1901_pcitool-23c7a39_00-01-0",
        "pci0000:00/0000:00:01.0/0000:01:00.0": "intel-i350-8086-1521_pcitool-23c7a39_01-00-0",
        "pci0000:17/0000:17:02.0": "intel-skylake-e-rootport-8086-2032_pcitool-ec8a5fc_17-02-0",
        "pci0000:17/0000:17:02.0/0000:18:00.0": "intel-x550t-8086-1563_pcitool-ec8a5fc_18-00-0",
        "pci0000:17/0000:17:03.0": "intel-skylake-e-rootport-8086-2033_pcitool-ec8a5fc_17-03-0",
        "pci0000:17/0000:17:03.0/0000:19:00.0": "intel-i350-8086-1521_pcitool-ec8a5fc_19-00-0",
        "pci0000:6a/0000:6a:01.0": "intel-dsa-8086-0b25_pciutils-tests-pri-pasid",
    }
    functions = {rel: load_device(real_dump(f"{name}.lspci")).data for rel, name in data.items()}
    return make_tree(tmp_path / "sys", functions)


def test_real_machines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = host_json(capsys, real_tree(tmp_path))
    # The I350 under a completer-0 root port: Linux refuses to enable TPH (-EINVAL).
    i350 = docs["0000:01:00.0"]
    assert i350["root_port"] == {
        "kind": "root-port",
        "bdf": "0000:00:01.0",
        "completer": 0,
        "completer_name": "none",
        "summary": "root port 0000:00:01.0: TPH Completer none",
    }
    assert i350["verdict"]["status"] == "force-off"
    assert "Linux refuses to enable TPH below it" in i350["verdict"]["reason"]
    # The same NIC under a Skylake-E root port (TPH only): trappable.
    other = docs["0000:19:00.0"]
    assert (other["root_port"]["bdf"], other["root_port"]["completer"]) == ("0000:17:03.0", 1)
    assert other["verdict"]["status"] == "trappable"
    # X550T: No ST only and no table, whatever the root port.
    assert docs["0000:18:00.0"]["verdict"]["status"] == "force-off"
    assert "location none" in docs["0000:18:00.0"]["verdict"]["reason"]
    # DSA, a root-complex integrated endpoint: no root port, the check is skipped.
    dsa = docs["0000:6a:01.0"]
    assert dsa["root_port"]["kind"] == "integrated" and dsa["root_port"]["completer"] is None
    assert dsa["verdict"]["status"] == "trappable"
    # The root ports themselves have no TPH Requester.
    for bdf in ("0000:00:01.0", "0000:17:02.0", "0000:17:03.0"):
        assert docs[bdf]["verdict"]["status"] == "no-tph"
        assert docs[bdf]["pcie"]["type_name"] == "root-port"
        assert docs[bdf]["root_port"]["bdf"] == bdf  # a root port is its own (Linux)


def test_real_machines_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--sysfs", str(real_tree(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "BDF",
        "ID",
        "NAME",
        "TPH",
        "ST",
        "TABLE",
        "ROOT",
        "PORT",
        "VERDICT",
    ]
    row = next(line for line in lines if line.startswith("0000:01:00.0"))
    assert re.match(
        r"0000:01:00\.0 +8086:1521 +Ethernet controller +NS DS +cap 8 +0000:00:01\.0 none +"
        r"forced off: root port 0000:00:01\.0: TPH Completer none",
        row,
    ), row
    row = next(line for line in lines if line.startswith("0000:19:00.0"))
    assert "0000:17:03.0 tph" in row and "trappable: standard ST table" in row
    assert lines[-1] == "7 functions: 2 trappable, 2 forced off, 3 no TPH, 0 unknown"


def test_docs_host_example_is_real_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (REPO / "docs" / "inspect.md").read_text()
    start = text.index("$ tphtrap inspect --sysfs sys\n") + len("$ tphtrap inspect --sysfs sys\n")
    real_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--sysfs", "sys"]) == 0
    assert text[start : text.index("```", start)] == capsys.readouterr().out


# --- synthetic trees: every case of the root port check ------------------------------------
@pytest.mark.parametrize(
    ("completer", "status", "text"),
    [
        (TphCompleter.NONE, "force-off", "Linux refuses to enable TPH below it"),
        (TphCompleter.RESERVED, "force-off", "reserved"),
        (TphCompleter.TPH, "trappable", "Linux caps the device at TPH only"),
        (TphCompleter.EXT_TPH, "trappable", None),
    ],
)
def test_completer_in_the_verdict(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    completer: TphCompleter,
    status: str,
    text: str | None,
) -> None:
    tree = make_tree(
        tmp_path,
        {
            "pci0000:3a/0000:3a:00.0": root_port(completer),
            "pci0000:3a/0000:3a:00.0/0000:3b:00.0": endpoint(),
        },
    )
    v = host_json(capsys, tree)["0000:3b:00.0"]["verdict"]
    assert v["status"] == status
    seen = [v["reason"], *v["notes"]]
    if text is None:
        assert not any("root port" in line for line in seen), seen
    else:
        assert any(text in line for line in seen), seen


def test_root_port_found_through_a_switch(tmp_path: Path) -> None:
    port = "pci0000:00/0000:00:1c.0"
    up = f"{port}/0000:01:00.0"
    down = f"{up}/0000:02:03.0"
    tree = make_tree(
        tmp_path,
        {
            port: root_port(TphCompleter.TPH),
            up: build_config(pcie_type=PcieType.UPSTREAM, class_code=0x060400),
            down: build_config(pcie_type=PcieType.DOWNSTREAM, class_code=0x060400),
            f"{down}/0000:03:00.0": endpoint(),
        },
    )
    check = check_root_port(tree / "bus" / "pci" / "devices" / "0000:03:00.0")
    assert check.kind == "root-port" and check.completer is TphCompleter.TPH
    assert check.port is not None and check.port.bdf == "0000:00:1c.0"


def test_no_root_port_above_an_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_tree(tmp_path, {"pci0000:00/0000:00:03.0": endpoint()})
    doc = host_json(capsys, tree)["0000:00:03.0"]
    assert doc["root_port"]["kind"] == "missing" and doc["root_port"]["completer"] == 0
    assert doc["verdict"]["status"] == "force-off"
    assert "no root port above the function" in doc["verdict"]["reason"]


def test_integrated_endpoint_skips_the_check(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"pci0000:00/0000:00:03.0": endpoint(pcie_type=PcieType.RC_END)})
    check = check_root_port(tree / "devices" / "pci0000:00" / "0000:00:03.0")
    assert check == RootPortCheck("integrated")
    assert check.completer is None and "Linux skips the check" in check.summary


def test_unreadable_bridge_is_unknown_not_missing(tmp_path: Path) -> None:
    port = "pci0000:00/0000:00:1c.0"
    tree = make_tree(
        tmp_path,
        {port: root_port(TphCompleter.EXT_TPH)[:64], f"{port}/0000:01:00.0": endpoint()},
    )
    check = check_root_port(tree / "bus" / "pci" / "devices" / "0000:01:00.0")
    assert check.kind == "unknown" and check.completer is None
    assert "only 64 bytes" in check.summary and "as root" in check.summary


def test_functions_without_pcie_and_short_snapshots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conventional = bytearray(endpoint()[:256])
    conventional[0x34] = 0x40
    conventional[0x41] = 0  # PM only: the list ends before the PCI Express capability
    tree = make_tree(
        tmp_path,
        {
            "pci0000:00/0000:00:01.0": bytes(conventional),
            "pci0000:00/0000:00:02.0": endpoint()[:64],
        },
    )
    docs = host_json(capsys, tree)
    assert docs["0000:00:01.0"]["verdict"]["status"] == "no-tph"
    assert docs["0000:00:01.0"]["root_port"] is None
    assert docs["0000:00:02.0"]["verdict"]["status"] == "unknown"
    assert main(["inspect", "--sysfs", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "no PCI Express capability (a conventional PCI function), so no TPH possible" in out
    assert "note: 1 function gave only 64 bytes of config space: run as root" in out


def test_an_unreadable_function_is_listed_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = make_tree(
        tmp_path, {"pci0000:00/0000:00:01.0": endpoint(), "pci0000:00/0000:00:02.0": b"\x00" * 7}
    )
    assert main(["inspect", "--sysfs", str(tree)]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("0000:00:02.0"))
    assert "error: " in row and "7 bytes" in row
    assert out.splitlines()[-1].endswith(", 1 unreadable")


def test_missing_sysfs_root_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--sysfs", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tphtrap: error: ") and "cannot list" in err and err.count("\n") == 1


# --- several sources, and usage ----------------------------------------------------------------
def test_several_sources(capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(DEVICES / "nic-st-in-cap.lspci"), str(DEVICES / "ds-only.lspci")
    assert main(["inspect", a, b]) == 0
    assert capsys.readouterr().out.count("Verdict:") == 2
    assert main(["inspect", a, b, "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["source"] for d in docs] == [a, b]


def test_sysfs_sources_get_their_root_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = make_tree(
        tmp_path,
        {
            "pci0000:3a/0000:3a:00.0": root_port(TphCompleter.NONE),
            "pci0000:3a/0000:3a:00.0/0000:3b:00.0": endpoint(),
        },
    )
    dev = tree / "bus" / "pci" / "devices" / "0000:3b:00.0"
    assert main(["inspect", str(dev), str(dev / "config")]) == 0
    out = capsys.readouterr().out
    assert out.count("  root port          root port 0000:3a:00.0: TPH Completer none") == 2
    assert out.count("Verdict: TPH must be forced off in a VM: root port 0000:3a:00.0") == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect"],
        ["inspect", "--host", "x.lspci"],
        ["inspect", "--host", "--all"],
        ["inspect", "a.lspci", "b.lspci", "--bdf", "3b:00.0"],
        ["inspect", "--bdf", "1:0.0", "--all", "a.lspci"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# --- the live host: lspci is the oracle -----------------------------------------------------
def lspci_blocks(lspci: str) -> dict[str, str]:
    out = subprocess.run([lspci, "-D", "-vvv"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    blocks: dict[str, str] = {}
    for block in out.stdout.strip().split("\n\n"):
        blocks[block.split(" ", 1)[0]] = block
    return blocks


def test_live_host_lists_every_function_with_a_verdict() -> None:
    lspci = require_lspci()
    res = subprocess.run(
        [str(TPHTRAP), "inspect", "--host", "--json"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    docs = {d["bdf"]: d for d in json.loads(res.stdout)}
    blocks = lspci_blocks(lspci)
    assert sorted(docs) == sorted(blocks)
    if os.geteuid() != 0:
        pytest.skip("lspci shows capabilities to root only: the verdicts were not compared")
    for bdf, block in blocks.items():
        doc = docs[bdf]
        express = re.search(
            r"Capabilities: \[[0-9a-f]+\] Express \(v\d\) ([A-Za-z -]+?)[,\n]", block
        )
        if express is None:
            assert doc["pcie"] is None, bdf
            assert doc["verdict"]["status"] == "no-tph", bdf
            assert doc["verdict"]["reason"].endswith("so no TPH possible"), bdf
            continue
        assert doc["pcie"] is not None, bdf
        tph = "Transaction Processing Hints" in block
        assert (doc["tph"] is not None) == tph, bdf
        if doc["tph"] is None:
            assert doc["verdict"]["status"] == "no-tph", bdf
        flags = re.search(r"TPHComp([+-]) ExtTPHComp([+-])", block)
        if flags:
            completer = doc["pcie"]["tph_completer"]
            assert (flags[1] == "+", flags[2] == "+") == (bool(completer & 1), bool(completer & 2))


def test_live_host_table_names_every_function() -> None:
    res = subprocess.run(
        [str(TPHTRAP), "inspect", "--host"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    rows = [line for line in lines[1:] if re.match(r"[0-9a-f]{4}:", line)]
    counted = [re.match(r"(\d+) functions?: ", line) for line in lines]
    total = next(int(m[1]) for m in counted if m)
    assert len(rows) == total == len(list(Path("/sys/bus/pci/devices").iterdir()))
    for row in rows:
        assert re.search(r"  (trappable|forced off|no TPH|unknown): \S", row), row
