"""``bench/run.py --quick`` runs and writes a well-formed report (no timing is checked)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[bench" in proc.stderr  # progress goes to standard error
    text = out.read_text()
    for heading in (
        "## Machine",
        "## Goals",
        "## Plugin latency (ping-pong)",
        "## Pipelined throughput",
        "## C client ping-pong (the physical floor)",
        "## Engine alone",
        "Self-check share of a decision",
        "## Replay",
        "## Reproduce",
    ):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    # every table row has the same number of cells as its header
    tables: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            if not tables or not tables[-1]:
                tables.append([])
            tables[-1].append(line)
        elif tables and tables[-1]:
            tables.append([])
    for table in filter(None, tables):
        widths = {line.count("|") for line in table}
        assert len(widths) == 1, table
    goals = [r for r in rows if re.search(r"\*\*(pass|FAIL)\*\*", r)]
    assert len(goals) >= 4 * 2 + 4 + 2  # p50 and p99 per request kind, replay, memory
    for kind in ("TPH control", "ST entry", "non-TPH", "Vector Control"):
        latency = [r for r in rows if kind in r and re.search(r"\| [\d.]+ \|", r)]
        assert latency, kind
    assert re.search(r"\| mixed, self-check on \| [\d,]+ \| [\d.]+ \|", text)
    assert re.search(r"\| mixed, self-check off \| [\d,]+ \| [\d.]+ \|", text)
    assert re.search(
        r"Self-check share of a decision's time: -?[\d.]+% \(goal under 20%: \*\*", text
    )
    # the C client against serve (both backends), the C echo child and the same auditing to a
    # file, every request kind
    for kind in ("tph-control", "st-entry", "vector-control", "non-tph"):
        assert re.search(rf"\| any \| {kind} \|( [\d.]+x? \|){{10}}", text), kind
    assert re.search(r"\| p99 against the C echo \+ audit file's p99, .* \| [\d.]+x \|", text)
    assert "| memory given back to the host | " in text
    replay = [r for r in rows if r.startswith("| native |") or r.startswith("| qemu |")]
    assert len(replay) == 4
    for r in replay:
        assert re.search(r"\| [\d.]+x \|", r)
    # the fast-path goals: every request kind in both backends, pipelined, the worst decision,
    # the trap map on the real guest trace
    assert "## Fast path: the guest's cost of a decision" in text
    for backend in ("writes", "host"):
        for kind in ("TPH control", "ST entry", "non-TPH", "Vector Control"):
            assert re.search(
                rf"\| added p50 over the C echo, pinned, {backend} backend, cfg_write {kind}"
                rf"|\| added p50 over the C echo, pinned, {backend} backend, msix_write {kind}",
                text,
            ), (backend, kind)
    assert re.search(r"\| TPH decisions/s, 64 in flight .* \| [\d,]+ \| >= 150,000 \|", text)
    assert re.search(r"\| worst single decision \(2048 vectors.*\| [\d.]+ ms \| <= 2 ms \|", text)
    assert re.search(r"\| \.\.\. its reply \| [\d,]+ bytes \| <= max_reply 262,144 \|", text)
    share = re.search(r"keeps away \(0 µs each\) \| ([\d,]+) of ([\d,]+) ", text)
    assert share and 0 < int(share[1].replace(",", "")) < int(share[2].replace(",", ""))
    assert "| 0000:01:00.0 (TPH) |" in text


def _compare_with_head(*args: str) -> list[dict[str, Any]]:
    """The rows of ``bench/compare.py HEAD ARGS --json``."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), head.stdout.strip(), *args, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    for r in rows:
        assert r["this"]["p50"] > 0 and r["other"]["p50"] > 0 and r["p50_ratio"] > 0
    return rows


def test_compare_against_a_commit_runs() -> None:
    """``bench/compare.py`` (``make bench-compare``) against this very commit: both trees
    answer, every request kind is measured (a smoke run: no timing is checked)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import workload

    rows = _compare_with_head("--rounds", "1", "--block", "10")
    assert [r["kind"] for r in rows] == list(workload.LATENCY_KINDS)


def test_compare_with_the_c_client_runs() -> None:
    """``bench/compare.py --c``: the C client against both trees, in both backends."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    rows = _compare_with_head("--c", "--rounds", "1", "--calls", "20")
    assert [r["kind"] for r in rows] == [
        f"{run.C_KIND_OF[kind]} ({backend})"
        for backend in ("writes", "host")
        for kind in run.C_KINDS
    ]


def test_self_check_instructions_are_counted() -> None:
    """The self-check's share in instructions (``make bench``, under callgrind)."""
    import shutil

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    got = run.bench_check_instructions(4)
    assert isinstance(got, dict), got
    assert got["checked"] > got["unchecked"] > 1000


def test_the_c_kinds_are_the_latency_kinds() -> None:
    """Each C client request kind is reported under the latency kind it sends."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run
    import workload

    assert set(run.C_KIND_OF) == set(run.C_KINDS)
    assert sorted(run.C_KIND_OF.values()) == sorted(workload.LATENCY_KINDS)
    pingpong = (ROOT / "bench" / "c" / "pingpong.c").read_text()
    one = pingpong[pingpong.index("static int one(") :].split("\n}\n")[0]
    msix = {k for k in run.C_KINDS if f'"{k}") == 0)\n        return tphtrap_msix_write' in one}
    assert msix == {k for k, kind in run.C_KIND_OF.items() if kind.startswith("msix_write")}
