"""``tphtrap replay``: native and QEMU traces through the engine, summaries, --expect, errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tphtrap.cli import main
from tphtrap.device import load_device
from tphtrap.errors import TraceError
from tphtrap.events import ConfigWrite, MsixWrite
from tphtrap.policyfile import load_policy
from tphtrap.replay import Replayer, detect_format
from tphtrap.replay_summary import BUCKETS

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "fixtures" / "traces"
POLICY = str(ROOT / "policies" / "two-tenants.yaml")
MSIX_DEV = str(ROOT / "fixtures" / "devices" / "nic-st-in-msix.lspci")


def replay_json(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    rc = main(["replay", *args, "--policy", POLICY, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_demo_session_replays_identically(capsys: pytest.CaptureFixture[str]) -> None:
    rc, s = replay_json(str(TRACES / "demo-session.jsonl"), "--expect", capsys=capsys)
    assert rc == 0
    assert s["mismatches"] == 0 and s["malformed"]["count"] == 0
    assert s["records"]["count"] == 54 and s["expected"] == 54
    assert s["skipped"]["reasons"] == {"attach request (no access)": 2}
    assert s["lines"] == 56 == sum(s[b]["count"] for b in BUCKETS)
    assert s["vms"] == {"tenant-a": 35, "tenant-b": 19}
    assert s["verdicts"] == {"pass": 39, "rewrite": 12, "drop": 3}
    assert s["reasons"]["foreign-tag"] == 5
    assert s["reasons"]["device-specific-mode"] == 1
    assert s["reasons"]["unknown-device"] == 1
    # what a reviewer looks at first: the accesses that were refused or changed
    trace = str(TRACES / "demo-session.jsonl")
    assert s["notable"][0] == (
        f"{trace}:3: tenant-a 0000:3b:00.0 write @0x150/4=0x101 -> rewrite tag-fallback "
        "[config@0x154/2=0x1,config@0x156/2=0x1,config@0x158/2=0x1,... 5 more ...,"
        "config@0x150/4=0x101]"
    )
    assert s["notable"][-1].endswith("-> drop unknown-device []")
    # writes only, and never a pass: a widened write (line 31) is a change, a read is not
    assert len(s["notable"]) == 10
    widened = s["notable"][4]
    assert widened.startswith(f"{trace}:31: ") and " -> rewrite control-granted " in widened
    assert not [n for n in s["notable"] if " -> pass " in n]


def test_qemu_msix_writes_are_attributed_through_bar_mappings(tmp_path: Path) -> None:
    decisions = tmp_path / "d.jsonl"
    rc = main(
        [
            "replay",
            str(TRACES / "qemu-msix-bar.log"),
            "--policy",
            POLICY,
            "--vm",
            "tenant-b",
            "--device",
            f"0000:00:03.0={MSIX_DEV}",
            "--decisions",
            str(decisions),
        ]
    )
    assert rc == 5  # 00:04.0 has no dump and the guest never read its config space
    rows = [json.loads(x) for x in decisions.read_text().splitlines()]
    msix = [
        (
            r["line"],
            r["bdf"],
            r["bar"],
            r["offset"],
            r["guest_value"],
            r["decision"]["verdict"],
            r["decision"]["reason"],
            [(w["bar"], w["offset"], w["value"]) for w in r["decision"]["writes"]],
        )
        for r in rows
        if r["region"] == "msix" and r["op"] == "write"
    ]
    assert msix == [
        # BAR 2 mapped at 0xfe000000: entry 0 address, entry 5 Vector Control
        (11, "0000:00:03.0", 2, 0x4000, 0xFEE00000, "pass", "not-tph", [(2, 0x4000, 0xFEE00000)]),
        # tag 0x23 belongs to no CPU: tenant-b drops it, the mask bits still reach the device
        (
            12,
            "0000:00:03.0",
            2,
            0x405C,
            0x230000,
            "rewrite",
            "foreign-tag",
            [(2, 0x405C, 0x2_0000)],
        ),
        # line 16, another device's table (BAR 1 of 00:04.0): its capabilities were never
        # seen, so whether it has TPH is not known: unjudged, not "pass not-tph"
        # line 18 falls while BAR 2 is unmapped: not attributed; line 20 after the remap
        (20, "0000:00:03.0", 2, 0x40DC, 0x10000, "rewrite", "foreign-tag", [(2, 0x40DC, 0x2_0000)]),
    ]
    enable = next(r for r in rows if r["line"] == 14)
    # The guest never wrote the other 30 vectors' Vector Control words: their mask bits are
    # the guest's and unknown, so no steering tag can be written there and TPH stays off.
    assert enable["decision"]["verdict"] == "drop"
    assert enable["decision"]["reason"] == "msix-state-unknown"
    assert enable["decision"]["writes"] == []


def test_trace_without_tph_passes_every_record_unchanged(tmp_path: Path) -> None:
    for trace in ("qemu-no-tph.log",):
        decisions = tmp_path / f"{trace}.jsonl"
        rc = main(
            [
                "replay",
                str(TRACES / trace),
                "--policy",
                POLICY,
                "--vm",
                "tenant-a",
                "--decisions",
                str(decisions),
            ]
        )
        assert rc == 5  # three accesses beyond the extended capabilities the guest read
        rows = [json.loads(x) for x in decisions.read_text().splitlines()]
        assert len(rows) == 68
        for r in rows:
            d = r["decision"]
            assert d["verdict"] == "pass", r
            if r["op"] == "write":
                (w,) = d["writes"]
                assert (w["offset"], w["width"], w["value"]) == (
                    r["offset"],
                    r["width"],
                    r["guest_value"],
                ), r
                assert w.get("bar") == r.get("bar")
            else:
                assert d["writes"] == [] and "read_mask" not in d


def test_gzip_trace_reads_like_the_plain_one(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--vm", "tenant-b", "--device", f"0000:00:03.0={MSIX_DEV}"]
    rc1, plain = replay_json(str(TRACES / "qemu-msix-bar.log"), *args, capsys=capsys)
    rc2, gz = replay_json(str(TRACES / "qemu-msix-bar.log.gz"), *args, capsys=capsys)
    assert rc1 == rc2 == 5
    for key in ("verdicts", "reasons", "lines"):
        assert plain[key] == gz[key]
    assert {k: v["accesses"] for k, v in plain["devices"].items()} == {
        k: v["accesses"] for k, v in gz["devices"].items()
    }
    for key in BUCKETS:
        assert plain[key]["count"] == gz[key]["count"]
        assert plain[key]["reasons"] == gz[key]["reasons"]


def test_malformed_lines_are_counted_with_positions_and_strict_stops(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trace = str(TRACES / "qemu-garbage.log")
    rc, s = replay_json(trace, "--vm", "tenant-a", capsys=capsys)
    assert rc == 5  # malformed lines were not judged either
    assert s["malformed"]["count"] == 6 and s["records"]["count"] == 2
    # line 1 writes TPH control of a device whose config space the trace never showed
    assert s["unjudged"]["count"] == 1 and s["unjudged"]["first_lines"][0].startswith(
        f"{trace}:1: 0000:00:03.0 capabilities never seen"
    )
    assert [m.split(": ")[0] for m in s["malformed_lines"]] == [
        f"{trace}:{n}" for n in (2, 5, 8, 9, 10, 12)
    ]
    # --strict stops at the first line not judged: line 1, not judged (exit 5) ...
    base = ["replay", trace, "--policy", POLICY, "--vm", "tenant-a", "--strict"]
    assert main(base) == 5
    err = capsys.readouterr().err
    assert err == (
        f"tphtrap: error: {trace}:1: not judged (unjudged): 0000:00:03.0 capabilities never "
        "seen: the guest read none of its config space\n"
    )
    # ... or, when unjudged accesses are expected, at the first malformed line (exit 1)
    assert main([*base, "--allow-unjudged"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tphtrap: error: {trace}:2: pci_cfg_write does not match")
    assert err.count("\n") == 1


def test_native_malformed_lines_do_not_stop_the_replay(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    good = json.loads((TRACES / "demo-session.jsonl").read_text().splitlines()[0])
    good["path"] = str(ROOT / good["path"])
    lines = [
        json.dumps(good),
        "not json",
        json.dumps(
            {
                "id": 9,
                "op": "cfg_write",
                "vm": "tenant-a",
                "bdf": "0000:3b:00.0",
                "offset": 0x150,
                "width": 3,
                "value": 1,
            }
        ),
        json.dumps(
            {
                "id": 10,
                "op": "cfg_write",
                "vm": "tenant-a",
                "bdf": "0000:3b:00.0",
                "offset": 0x150,
                "width": 4,
                "value": 0x101,
            }
        ),
    ]
    trace.write_text("\n".join(lines) + "\n\n")
    rp = Replayer(load_policy(POLICY))
    records = list(rp.native(str(trace)))
    assert [(r.line, r.decision.reason) for r in records] == [(4, "tag-fallback")]
    assert rp.summary.buckets["malformed"].count == 2
    assert rp.summary.malformed_lines == [
        f"{trace}:2: bad-json: not JSON: Expecting value at column 1",
        f"{trace}:3: out-of-range: 'width': 3 is not one of 1, 2, 4",
    ]
    strict = Replayer(load_policy(POLICY), strict=True)
    with pytest.raises(TraceError, match=rf"{trace}:2: bad-json"):
        list(strict.native(str(trace)))


def test_overlay_asks_what_if_a_learned_device_had_tph(tmp_path: Path) -> None:
    """A device learned from the trace's reads, with a TPH capability grafted on."""
    base = load_device(ROOT / "fixtures" / "devices" / "no-tph.lspci")
    trace = tmp_path / "q.log"
    lines = [
        f"pci_cfg_read e1000e 00:05.0 @0x{off:x} -> 0x{base.u32(off):x}"
        for off in range(0, 0x1000, 4)
        if base.u32(off) or off == 0x100  # the guest reads 0x100 even when it is empty
    ]
    overlaid = base.with_tph_overlay(load_device(ROOT / "fixtures/devices/nic-st-in-cap.lspci"))
    assert overlaid.tph is not None
    ctrl = overlaid.tph.offset + 8
    lines.append(f"pci_cfg_write e1000e 00:05.0 @0x{ctrl:x} <- 0x102")  # Device Specific
    trace.write_text("\n".join(lines) + "\n")
    decisions = tmp_path / "d.jsonl"
    args = [
        "replay",
        str(trace),
        "--policy",
        POLICY,
        "--vm",
        "tenant-a",
        "--decisions",
        str(decisions),
    ]
    assert main(args) == 0
    last = json.loads(decisions.read_text().splitlines()[-1])
    assert last["decision"]["reason"] == "not-tph"  # without the overlay, no TPH there
    nic = ROOT / "fixtures/devices/nic-st-in-cap.lspci"
    assert main([*args, "--overlay", f"0000:00:05.0={nic}"]) == 0
    last = json.loads(decisions.read_text().splitlines()[-1])
    assert last["decision"]["reason"] == "device-specific-mode"
    assert last["decision"]["writes"] == []  # refused: the device stays disabled as it was


def test_progress_only_on_request_or_terminal(tmp_path: Path) -> None:
    first = json.loads((TRACES / "demo-session.jsonl").read_text().splitlines()[0])
    first["path"] = str(ROOT / first["path"])
    read = {"op": "cfg_read", "vm": "tenant-a", "bdf": "0000:3b:00.0", "offset": 0x150, "width": 4}
    trace = tmp_path / "long.jsonl"
    rows = [json.dumps(first)] + [json.dumps({"id": i, **read}) for i in range(60_000)]
    trace.write_text("\n".join(rows) + "\n")
    base = [sys.executable, "-m", "tphtrap", "replay", str(trace), "--policy", POLICY]
    quiet = subprocess.run(base, cwd=ROOT, capture_output=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == b""  # not a terminal: no progress
    assert quiet.stdout.decode().startswith("replayed 60,000 records from 1 trace(s)")
    shown = subprocess.run(
        [*base, "--progress", "always"], cwd=ROOT, capture_output=True, timeout=120
    )
    assert shown.returncode == 0
    err = shown.stderr.decode()
    assert "long.jsonl: " in err and " records, " in err and err.endswith("\r\x1b[K")
    # the same summary apart from the timing on its first line
    assert shown.stdout.split(b"\n")[1:] == quiet.stdout.split(b"\n")[1:]


def test_replayer_api_is_streaming() -> None:
    """Records come out one by one, before the trace has been read to the end."""
    rp = Replayer(load_policy(POLICY))
    first = json.loads((TRACES / "demo-session.jsonl").read_text().splitlines()[0])
    first["path"] = str(ROOT / first["path"])
    consumed: list[int] = []

    def lines() -> Any:
        yield json.dumps(first)
        for i in range(10_000_000):  # far more than could be held
            consumed.append(i)
            yield json.dumps(
                {
                    "id": i,
                    "op": "cfg_read",
                    "vm": "tenant-a",
                    "bdf": "0000:3b:00.0",
                    "offset": 0x150,
                    "width": 4,
                }
            )

    it = rp.native("gen", lines())
    for _ in range(3):
        rec = next(it)
        assert isinstance(rec.access, (ConfigWrite, MsixWrite)) is False
    assert len(consumed) <= 4


def test_detect_format() -> None:
    assert detect_format(str(TRACES / "demo-session.jsonl")) == "native"
    assert detect_format(str(TRACES / "qemu-msix-bar.log")) == "qemu"
    assert detect_format(str(TRACES / "qemu-msix-bar.log.gz")) == "qemu"


def test_unknown_vm_binding_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["replay", str(TRACES / "qemu-no-tph.log"), "--policy", POLICY, "--vm", "nope"])
    assert rc == 1
    assert "no VM 'nope'" in capsys.readouterr().err


def test_gzip_native_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = (TRACES / "demo-session.jsonl").read_bytes()
    gz = tmp_path / "demo.jsonl.gz"
    gz.write_bytes(gzip.compress(src))
    rc, s = replay_json(str(gz), "--expect", capsys=capsys)
    assert rc == 0 and s["records"]["count"] == 54 and s["mismatches"] == 0
