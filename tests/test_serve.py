"""``tphtrap serve``: full sessions over real pipes, malformed input, and the Server in-process."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import AuditSink

from tphtrap.audit import Auditor
from tphtrap.cli import EXIT_MISMATCH
from tphtrap.errors import PolicyError
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server, serve_forever
from tphtrap.wire import expand_runs, hex_values

ROOT = Path(__file__).resolve().parent.parent
TPHTRAP = [sys.executable, "-m", "tphtrap"]
POLICY = "policies/two-tenants.yaml"
A = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
B = {"vm": "tenant-b", "bdf": "0000:3b:00.1"}
RULE_A = "vms.tenant-a.devices.0000:3b:00.0"
RULE_B = "vms.tenant-b.devices.0000:3b:00.1"


def run_serve(
    lines: list[str | bytes], *args: str, timeout: float = 30
) -> tuple[list[dict[str, Any]], str, int]:
    """Feed ``lines`` to ``tphtrap serve`` and return (replies, stderr, exit status)."""
    payload = b"".join(
        (line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines
    )
    proc = subprocess.run(
        [*TPHTRAP, "serve", "--policy", POLICY, *args],
        cwd=ROOT,
        input=payload,
        capture_output=True,
        timeout=timeout,
    )
    out = proc.stdout.decode()
    replies = [json.loads(line) for line in out.splitlines()]  # every line must be JSON
    assert out.endswith("\n") or not out
    return replies, proc.stderr.decode(), proc.returncode


def req(rid: Any, op: str, **fields: Any) -> str:
    return json.dumps({"id": rid, "op": op, **fields})


def decision(
    verdict: str,
    reason: str,
    detail: str,
    writes: list[dict[str, Any]],
    rule: str,
    reasons: list[str] | None = None,
    **view: int,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "verdict": verdict,
        "reason": reason,
        "reasons": reasons or [reason],
        "detail": detail,
        "writes": writes,
    }
    d.update(view)
    d["rule"] = rule
    return d


def cfg(offset: int, width: int, value: int) -> dict[str, Any]:
    return {"space": "config", "offset": offset, "width": width, "value": value}


def bar(offset: int, width: int, value: int, index: int = 2) -> dict[str, Any]:
    return {"space": "bar", "bar": index, "offset": offset, "width": width, "value": value}


ALLOWED = "steering tag allowed for this VM"
FOREIGN = "steering tag not allowed for this VM (owned by a CPU outside its set)"
FALLBACK = (
    "ST entry the guest never wrote gets the VM's fallback tag; "
    "ST entries re-resolved for the tag width and mode being enabled"
)
VIRT = "TPH register read served from the guest's own view"
RELOADED = "state re-checked against the reloaded policy"


def test_full_session_exact_replies() -> None:
    """Handshake, attach, enable, allowed and foreign tags, MSI-X, reset, reload, stats."""
    ctrl, entry0, entry1 = 0x148 + 8, 0x148 + 0xC, 0x148 + 0xE
    table = 0x4000
    session = [
        req(0, "hello", versions=[2, 7], client="tests"),
        req(1, "attach", path="fixtures/devices/nic-st-in-cap.lspci", **A),
        req(  # the hypervisor's emulated MSI-X table: every vector at power-on (masked)
            2,
            "attach",
            vm="tenant-b",
            bdf="3b:00.1",
            path="fixtures/devices/nic-st-in-msix.lspci",
            vector_ctrl=[1] * 32,
        ),
        req(3, "cfg_write", offset=ctrl, width=4, value=0x101, **A),
        req(4, "cfg_write", offset=entry0, width=2, value=0x01, **A),
        req(5, "cfg_write", offset=entry1, width=2, value=0x02, **A),  # tenant-b's socket
        req(6, "cfg_read", offset=entry0, width=4, **A),
        req(7, "cfg_write", offset=ctrl, width=4, value="0x102", **A),  # Device Specific
        req(8, "msix_write", bar=2, offset=table + 12, width=4, value=0x0202_0000, **B),
        req(9, "cfg_write", offset=ctrl, width=4, value=0x301, **B),  # IV + Extended TPH
        req(10, "msix_write", bar=2, offset=table + 24, width=8, value="0x0101000000000041", **B),
        req(11, "msix_read", bar=2, offset=table + 24, width=8, **B),
        req(12, "reset", **A),
        req(13, "reload"),
        req("s", "stats"),
        req(14, "shutdown"),
    ]
    replies, stderr, rc = run_serve(session)
    assert rc == 0, stderr
    device_a = {
        "tph": {
            "offset": 0x148,
            "location": "cap",
            "table_size": 8,
            "extended": False,
            "modes": ["no_st", "interrupt_vector"],
        },
        "msix": {"table_size": 16, "bir": 0, "offset": 0x2000},
        "trappable": True,
    }
    device_b = {
        "tph": {
            "offset": 0x148,
            "location": "msix",
            "table_size": 32,
            "extended": True,
            "modes": ["no_st", "interrupt_vector"],
        },
        "msix": {"table_size": 32, "bir": 2, "offset": 0x4000},
        "trappable": True,
    }
    attached = "device attached"
    # Enabling Extended TPH on B: its MSI-X tags are unknown to tphtrap, so every entry the
    # guest did not program (1..31) gets tenant-b's fallback tag, with the power-on mask bit,
    # before the control.
    # Identical writes at a constant stride travel as one run (count, stride).
    corrections_b = [{**bar(table + 16 + 12, 4, 0x0202_0001), "count": 31, "stride": 16}]
    # Enabling on A: the 8 entries the guest never wrote get tenant-a's fallback tag first.
    fallback_a = [{**cfg(0x148 + 0xC, 2, 0x01), "count": 8, "stride": 2}]
    trap_a = {
        "config": [
            {"offset": 0x40 + 4, "length": 2, "what": "pmcsr", "reads": False},  # PM cap at 0x40
            {
                "offset": 0xA0 + 8,
                "length": 2,
                "what": "pcie-devctl",
                "reads": False,
            },  # PCIe at 0xa0
            {"offset": 0x148, "length": 0x1C, "what": "tph", "reads": True},
        ],
        "bar": [],
    }
    trap_b = {
        "config": [*trap_a["config"][:2], {**trap_a["config"][2], "length": 0xC}],
        "bar": [
            {
                "bar": 2,
                "offset": table + 12,
                "length": 4,
                "stride": 16,
                "count": 32,
                "what": "msix-vector-control",
                "reads": True,
            }
        ],
    }
    expected: list[dict[str, Any]] = [
        {
            "id": 0,
            "ok": True,
            "op": "hello",
            "version": 2,
            "server": "tphtrap 0.1.0",
            "max_line": 65536,
            "max_reply": 262144,
            "backends": ["writes", "host"],
        },
        {
            "id": 1,
            "ok": True,
            "decision": decision("pass", "attached", attached, [], RULE_A),
            "device": device_a,
            "backend": {"name": "writes"},
            "trap": trap_a,
        },
        {
            "id": 2,
            "ok": True,
            "decision": decision("pass", "attached", attached, [], RULE_B),
            "device": device_b,
            "backend": {"name": "writes"},
            "trap": trap_b,
        },
        {
            "id": 3,
            "ok": True,
            "decision": decision(
                "rewrite",
                "tag-fallback",
                FALLBACK,
                [*fallback_a, cfg(ctrl, 4, 0x101)],
                RULE_A,
                reasons=["control-granted", "tag-fallback", "entries-corrected"],
                guest_value=0x101,
                read_mask=0xFFFFFFFF,
            ),
        },
        {
            "id": 4,
            "ok": True,
            "decision": decision(
                "pass",
                "tag-allowed",
                ALLOWED,
                [cfg(entry0, 2, 0x01)],
                RULE_A,
                guest_value=0x01,
                read_mask=0xFFFF,
            ),
        },
        {
            "id": 5,
            "ok": True,
            "decision": decision(
                "rewrite",
                "foreign-tag",
                FOREIGN,
                [cfg(entry1, 2, 0x01)],
                RULE_A + ".on_violation",
                guest_value=0x02,
                read_mask=0xFFFF,
            ),
        },
        {
            "id": 6,
            "ok": True,
            "decision": decision(
                "rewrite",
                "tph-virtualized",
                VIRT,
                [],
                RULE_A,
                guest_value=0x0002_0001,
                read_mask=0xFFFFFFFF,
            ),
        },
        {
            "id": 7,
            "ok": True,
            "decision": decision(
                "rewrite",
                "device-specific-mode",
                "Device Specific mode uses tags no hypervisor can trap: kept disabled",
                [cfg(ctrl, 4, 0x000)],
                RULE_A,
                guest_value=0x102,
                read_mask=0xFFFFFFFF,
            ),
        },
        {
            "id": 8,
            "ok": True,
            "decision": decision(
                "pass",
                "tag-allowed",
                ALLOWED,
                [bar(table + 12, 4, 0x0202_0000)],
                RULE_B,
                guest_value=0x0202_0000,
                read_mask=0xFFFF_0000,
            ),
        },
        {
            "id": 9,
            "ok": True,
            "decision": decision(
                "rewrite",
                "tag-fallback",
                FALLBACK,
                [*corrections_b, cfg(ctrl, 4, 0x301)],
                RULE_B,
                reasons=["control-granted", "tag-allowed", "tag-fallback", "entries-corrected"],
                guest_value=0x301,
                read_mask=0xFFFFFFFF,
            ),
        },
        # tenant-a's 16-bit tag in a qword write: the data goes through, the tag is dropped
        # (tenant-b's policy) and the entry keeps the fallback it got when TPH was enabled.
        {
            "id": 10,
            "ok": True,
            "decision": decision(
                "rewrite",
                "foreign-tag",
                FOREIGN,
                [bar(table + 24, 8, 0x0202_0000 << 32 | 0x41)],
                RULE_B + ".on_violation",
                guest_value=0x0101 << 48,
                read_mask=0xFFFF << 48,
            ),
        },
        {
            "id": 11,
            "ok": True,
            "decision": decision(
                "rewrite",
                "tph-virtualized",
                VIRT,
                [],
                RULE_B,
                guest_value=0x0101 << 48,
                read_mask=0xFFFF << 48,
            ),
        },
        {
            "id": 12,
            "ok": True,
            "decision": decision(
                "rewrite",
                "reset",
                "device reset: TPH control and steering tags back to power-on state",
                [cfg(ctrl, 4, 0)],  # whatever the device kept, control is written again
                RULE_A,
            ),
        },
        # A reload's corrections come as one event line per device, then the reply.
        {
            "id": None,
            "event": "corrections",
            "policy": POLICY,
            "corrections": [
                {**A, "decision": decision("pass", "policy-reloaded", RELOADED, [], RULE_A)}
            ],
        },
        {
            "id": None,
            "event": "corrections",
            "policy": POLICY,
            "corrections": [
                {**B, "decision": decision("pass", "policy-reloaded", RELOADED, [], RULE_B)}
            ],
        },
        {"id": 13, "ok": True, "op": "reload", "policy": POLICY, "devices": 2},
    ]
    assert replies[: len(expected)] == expected
    stats = replies[len(expected)]
    assert stats.pop("uptime_s") >= 0
    assert 0 <= stats.pop("native") <= stats["requests"]
    assert stats == {
        "id": "s",
        "ok": True,
        "requests": 15,
        "errors": {},
        "verdicts": {"pass": 2, "rewrite": 8},
        "reasons": {
            "tag-fallback": 2,
            "tag-allowed": 2,
            "foreign-tag": 2,
            "tph-virtualized": 2,
            "device-specific-mode": 1,
            "reset": 1,
        },
        "devices": [
            {
                **A,
                "tph_enabled": False,
                "latched_off": False,
                "frozen": False,
                "revoked": False,
                "decisions": {"pass": 3, "rewrite": 5},
            },
            {
                **B,
                "tph_enabled": True,
                "latched_off": False,
                "frozen": False,
                "revoked": False,
                "decisions": {"pass": 3, "rewrite": 3},
            },
        ],
        "policy": POLICY,
        "policy_loads": 2,
        "policy_rejects": 0,
    }
    assert replies[-1] == {"id": 14, "ok": True, "op": "shutdown"}
    assert len(replies) == len(session) + 2  # and the two event lines of the reload
    # The audit trail went to stderr: one JSON object per line, with the foreign tag in it.
    events = [json.loads(line) for line in stderr.splitlines()]
    foreign = [e for e in events if e.get("reason") == "foreign-tag"]
    assert [(e["vm"], e["offset"], e["guest_value"]) for e in foreign] == [
        ("tenant-a", entry1, 0x02),
        ("tenant-b", table + 24, 0x0101_0000_0000_0041),
    ]


HELLO = req(0, "hello", versions=[2])
ATTACH = req(1, "attach", path="fixtures/devices/nic-st-in-cap.lspci", **A)
W = {**A, "offset": 0x150, "width": 4}

MALFORMED: list[tuple[str, bytes | str, str, Any, str | None]] = [
    # (what, line, error code, reply id, field)
    ("not JSON", "not json", "bad-json", None, None),
    ("truncated JSON", '{"id": 5, "op": "stats"', "bad-json", None, None),
    ("a JSON array", "[1, 2]", "not-an-object", None, None),
    ("a JSON string", '"stats"', "not-an-object", None, None),
    ("a JSON number", "42", "not-an-object", None, None),
    ("no id", '{"op": "stats"}', "missing-field", None, "id"),
    ("boolean id", '{"id": true, "op": "stats"}', "bad-type", None, "id"),
    ("float id", '{"id": 1.5, "op": "stats"}', "bad-type", None, "id"),
    ("id too long", json.dumps({"id": "x" * 200, "op": "stats"}), "bad-type", None, "id"),
    ("no op", '{"id": 10}', "missing-field", 10, "op"),
    ("op not a string", '{"id": 11, "op": 5}', "bad-type", 11, "op"),
    ("unknown op", '{"id": 12, "op": "frobnicate"}', "unknown-op", 12, "op"),
    ("unknown field", '{"id": 13, "op": "stats", "verbose": 1}', "unknown-field", 13, "verbose"),
    (
        "missing vm",
        json.dumps(
            {"id": 14, "op": "cfg_write", "bdf": A["bdf"], "offset": 0, "width": 4, "value": 0}
        ),
        "missing-field",
        14,
        "vm",
    ),
    ("empty vm", req(15, "cfg_write", **{**W, "vm": ""}, value=0), "out-of-range", 15, "vm"),
    (
        "bad bdf",
        req(16, "cfg_write", **{**W, "bdf": "zz:zz.z"}, value=0),
        "out-of-range",
        16,
        "bdf",
    ),
    (
        "negative offset",
        req(17, "cfg_write", **{**W, "offset": -1}, value=0),
        "out-of-range",
        17,
        "offset",
    ),
    (
        "offset 4096",
        req(18, "cfg_write", **{**W, "offset": 4096}, value=0),
        "out-of-range",
        18,
        "offset",
    ),
    (
        "bad hex offset",
        req(19, "cfg_write", **{**W, "offset": "0xZZ"}, value=0),
        "out-of-range",
        19,
        "offset",
    ),
    ("width 3", req(20, "cfg_write", **{**W, "width": 3}, value=0), "out-of-range", 20, "width"),
    (
        "boolean width",
        req(21, "cfg_write", **{**W, "width": True}, value=0),
        "bad-type",
        21,
        "width",
    ),
    ("value 2**32", req(22, "cfg_write", **W, value=2**32), "out-of-range", 22, "value"),
    (
        "value wider than width",
        req(23, "cfg_write", **{**W, "width": 1}, value=0x100),
        "out-of-range",
        23,
        "value",
    ),
    ("negative value", req(24, "cfg_write", **W, value=-1), "out-of-range", 24, "value"),
    (
        "NaN value",
        '{"id": 25, "op": "cfg_write", "vm": "tenant-a", "bdf": "0000:3b:00.0", '
        '"offset": 336, "width": 4, "value": NaN}',
        "bad-type",
        25,
        "value",
    ),
    (
        "past config space",
        req(26, "cfg_write", **{**W, "offset": 4094}, value=0),
        "out-of-range",
        26,
        "offset",
    ),
    (
        "BAR 6",
        req(27, "msix_write", **A, bar=6, offset=0, width=4, value=0),
        "out-of-range",
        27,
        "bar",
    ),
    (
        "width 16",
        req(28, "msix_write", **A, bar=0, offset=0, width=16, value=0),
        "out-of-range",
        28,
        "width",
    ),
    (
        "offset 2**64",
        req(29, "msix_write", **A, bar=0, offset=2**64, width=4, value=0),
        "out-of-range",
        29,
        "offset",
    ),
    (
        "string value",
        req(30, "msix_write", **A, bar=0, offset=0, width=4, value="12"),
        "bad-type",
        30,
        "value",
    ),
    (
        "attach with config and path",
        req(31, "attach", **A, config="00", path="x"),
        "bad-type",
        31,
        "config",
    ),
    ("attach with neither", req(32, "attach", **A), "missing-field", 32, "config"),
    ("attach bad hex", req(33, "attach", **A, config="zz"), "bad-config", 33, "config"),
    ("attach wrong size", req(34, "attach", **A, config="00" * 100), "bad-config", 34, "config"),
    (
        "attach missing file",
        req(35, "attach", **A, path="/nonexistent/config"),
        "bad-config",
        35,
        "path",
    ),
    (
        "attach unknown VM",
        req(36, "attach", vm="nobody", bdf=A["bdf"], path="fixtures/devices/nic-st-in-cap.lspci"),
        "unknown-vm",
        36,
        "vm",
    ),
    (
        "attach another VM's device",
        req(
            37, "attach", vm="tenant-a", bdf=B["bdf"], path="fixtures/devices/nic-st-in-msix.lspci"
        ),
        "unknown-device",
        37,
        "bdf",
    ),
    (
        "access to a device never attached",
        req(38, "cfg_write", vm="tenant-b", bdf=B["bdf"], offset=0, width=4, value=0),
        "unknown-device",
        38,
        "bdf",
    ),
    (
        "access for an unknown VM",
        req(39, "cfg_read", vm="nobody", bdf=A["bdf"], offset=0, width=4),
        "unknown-vm",
        39,
        "vm",
    ),
    ("unsupported version", req(40, "hello", versions=[99]), "unsupported-version", 40, "versions"),
    ("versions not a list", req(41, "hello", versions=1), "bad-type", 41, "versions"),
    ("invalid UTF-8", b'{"id": 42, "op": "stats", "x": "\xff\xfe"}', "bad-utf8", None, None),
    ("duplicate key", '{"id": 45, "op": "stats", "op": "shutdown"}', "bad-json", None, None),
    ("deeply nested JSON", "[" * 30_000 + "]" * 30_000, "bad-json", None, None),
    ("detach of a device never attached", req(43, "detach", **B), "unknown-device", 43, "bdf"),
    (
        "reload of a missing policy",
        req(44, "reload", policy="/nonexistent.yaml"),
        "policy-invalid",
        44,
        "policy",
    ),
]


def test_malformed_lines_each_get_an_error_and_serving_continues() -> None:
    lines: list[str | bytes] = [HELLO, ATTACH]
    for _, line, *_rest in MALFORMED:
        lines.append(line)
    lines.append("x" * 70_000)  # over the 64 KiB line limit
    lines.append(req(99, "cfg_write", **W, value=0x101))  # a valid request still works
    replies, stderr, rc = run_serve(lines, "--log-level", "debug")
    assert rc == 0
    assert "Traceback" not in stderr
    assert len(replies) == len(lines)
    assert replies[0]["ok"] and replies[1]["ok"]
    for (what, _, code, rid, field), rep in zip(MALFORMED, replies[2:], strict=False):
        assert rep["ok"] is False, what
        assert rep["id"] == rid, what
        assert rep["error"]["code"] == code, (what, rep)
        assert rep["error"].get("field") == field, (what, rep)
        assert rep["error"]["message"], what
        assert rep["decision"]["verdict"] == "drop", what  # fail closed
        assert rep["decision"]["writes"] == [], what
    too_long = replies[-2]
    assert too_long["ok"] is False and too_long["error"]["code"] == "line-too-long"
    last = replies[-1]
    assert last["ok"] and last["decision"]["reason"] == "tag-fallback"
    # With debug logging on, stderr has the received requests and the rejections, as JSON.
    events = [json.loads(line) for line in stderr.splitlines()]
    assert sum(e["event"] == "wire.rejected" for e in events) >= 30
    assert any(e["event"] == "wire.received" for e in events)
    assert len(MALFORMED) >= 30


def test_requests_before_hello_are_refused() -> None:
    replies, _, rc = run_serve([req(1, "stats"), HELLO, req(2, "stats")])
    assert rc == 0
    assert replies[0]["error"]["code"] == "handshake-required"
    assert replies[0]["decision"]["verdict"] == "drop"
    assert replies[1]["ok"] and replies[2]["ok"]


def test_eof_exits_zero_and_a_last_line_without_newline_is_served() -> None:
    proc = subprocess.run(
        [*TPHTRAP, "serve", "--policy", POLICY],
        cwd=ROOT,
        input=(HELLO + "\n" + req(1, "stats")).encode(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0
    replies = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert [r["id"] for r in replies] == [0, 1]


def test_pipelined_requests_come_back_in_order() -> None:
    lines: list[str | bytes] = [HELLO, ATTACH]
    lines += [req(i, "cfg_read", **A, offset=0x148 + (i % 16), width=1) for i in range(2, 2002)]
    replies, _, rc = run_serve(lines)
    assert rc == 0
    assert [r["id"] for r in replies] == list(range(2002))


def test_a_broken_policy_at_start_is_reported_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nhost:\n  steering_tags: {0: {st8: on, st16: 1}}\nvms: {}\n")
    proc = subprocess.run(
        [*TPHTRAP, "serve", "--policy", str(bad)],
        cwd=ROOT,
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert f"{bad}:3:" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_record_then_replay_with_expect_gives_identical_decisions(tmp_path: Path) -> None:
    record = tmp_path / "session.jsonl"
    session = [
        HELLO,
        ATTACH,
        req(2, "cfg_write", **W, value=0x101),
        req(3, "cfg_write", **{**W, "offset": 0x154, "width": 2}, value=0x02),
        req(4, "cfg_write", **{**W, "offset": 0x156, "width": 1}, value=0x01),
        req(5, "cfg_write", **W, value=0x301),
        req(6, "reset", **A),
        req(7, "cfg_read", **W),
    ]
    replies, _, rc = run_serve(session, "--record", str(record))
    assert rc == 0 and all(r["ok"] for r in replies)
    recorded = [json.loads(x) for x in record.read_text().splitlines()]
    assert [r["op"] for r in recorded] == [
        "attach",
        "cfg_write",
        "cfg_write",
        "cfg_write",
        "cfg_write",
        "reset",
        "cfg_read",
    ]
    # A record lists every write (replies carry runs of identical ones compactly).
    assert [r["expect"] for r in recorded[1:]] == [expand_runs(r["decision"]) for r in replies[2:]]
    proc = subprocess.run(
        [*TPHTRAP, "replay", str(record), "--policy", POLICY, "--expect", "--json"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary["records"]["count"] == summary["expected"] == 6
    assert summary["mismatches"] == 0 and summary["not_judged"] == 0
    assert summary["lines"] == 7 and summary["skipped"]["reasons"] == {
        "attach request (no access)": 1
    }
    # Change one expectation: replay --expect must notice, name the line, and exit 4.
    tampered = tmp_path / "tampered.jsonl"
    rows = record.read_text().splitlines()
    row = json.loads(rows[2])
    row["expect"]["verdict"] = "pass"
    rows[2] = json.dumps(row)
    tampered.write_text("\n".join(rows) + "\n")
    proc = subprocess.run(
        [*TPHTRAP, "replay", str(tampered), "--policy", POLICY, "--expect"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == EXIT_MISMATCH == 4
    assert f"{tampered}:3: expected pass foreign-tag" in proc.stdout.decode()


# --- in-process ------------------------------------------------------------------------------
def make_server(policy: str = POLICY) -> tuple[Server, AuditSink]:
    sink = AuditSink()
    server = Server(load_policy(ROOT / policy), str(ROOT / policy), Auditor(sink))  # type: ignore[arg-type]
    return server, sink


def call(server: Server, line: str) -> dict[str, Any]:
    out = server.handle_line(line.encode())
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    reply: dict[str, Any] = json.loads(out)
    return reply


def test_internal_error_answers_drop_and_is_audited(monkeypatch: pytest.MonkeyPatch) -> None:
    server, sink = make_server()
    call(server, HELLO)
    attach = json.loads(ATTACH)
    attach["path"] = str(ROOT / attach["path"])
    assert call(server, json.dumps(attach))["ok"]

    def boom(*_: object) -> None:
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(server, "_access", boom)
    rep = call(server, req(5, "cfg_write", **W, value=0x101))
    assert rep["ok"] is False and rep["error"]["code"] == "internal-error"
    assert rep["decision"]["verdict"] == "drop"
    events = [json.loads(x) for x in sink.lines]
    assert events[-1]["event"] == "engine.failed" and events[-1]["vm"] == "tenant-a"
    monkeypatch.undo()
    assert call(server, req(6, "stats"))["ok"]  # still serving


def test_reload_refuses_a_broken_policy_and_keeps_the_old_one(tmp_path: Path) -> None:
    server, sink = make_server()
    call(server, HELLO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nvms:\n  a:\n    cpus: 0-3\n    cpus: 4\n")
    rep = call(server, req(1, "reload", policy=str(bad)))
    assert rep["ok"] is False and rep["error"]["code"] == "policy-invalid"
    assert f"{bad}:" in rep["error"]["message"]
    assert server.policy_path == str(ROOT / POLICY)
    rejected = [json.loads(x) for x in sink.lines if "policy.rejected" in x]
    assert rejected and rejected[0]["path"] == str(bad)
    assert call(server, req(2, "stats"))["policy_rejects"] == 1


def test_reload_that_fails_inside_keeps_the_old_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception while loading or applying a policy (SIGHUP or the reload op)
    is a refused reload: the old policy and every device's rules stay, and it is audited."""
    server, sink = make_server()
    call(server, HELLO)
    attach = json.loads(ATTACH)
    attach["path"] = str(ROOT / attach["path"])
    assert call(server, json.dumps(attach))["ok"]
    before = server.engine.policy
    rules = [s.rules for s in server.engine.sessions()]

    def boom(*_: object) -> None:
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(type(before), "rules", boom)  # fails while building the new rules
    rep = call(server, req(1, "reload"))
    assert rep["ok"] is False and rep["error"]["code"] == "policy-invalid"
    assert "internal error: RuntimeError: simulated fault" in rep["error"]["message"]
    assert server.engine.policy is before
    assert [s.rules for s in server.engine.sessions()] == rules
    monkeypatch.undo()
    monkeypatch.setattr("tphtrap.serve._load_policy", boom)
    assert isinstance(server.reload(server.policy_path or ""), PolicyError)
    assert call(server, req(2, "stats"))["policy_rejects"] == 2
    rejected = [json.loads(x) for x in sink.lines if "policy.rejected" in x]
    assert len(rejected) == 2 and "simulated fault" in rejected[-1]["problems"][0]
    w = call(server, req(3, "cfg_write", **W, value=0x101))
    assert w["ok"] and w["decision"]["verdict"] in ("pass", "rewrite")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sighup_reloads_the_policy(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text((ROOT / POLICY).read_text())
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [*TPHTRAP, "serve", "--policy", str(policy), "--audit", str(audit)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout
    try:
        proc.stdin.write((HELLO + "\n").encode())
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["ok"]
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = audit.read_text() if audit.exists() else ""
            if text.count('"policy.loaded"') >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("SIGHUP did not reload the policy")
        # The reload's corrections come first, as an unsolicited event line (protocol 2).
        event = json.loads(proc.stdout.readline())
        assert event["id"] is None and event["event"] == "corrections"
        assert event["policy"] == str(policy) and event["corrections"] == []
        proc.stdin.write((req(1, "stats") + "\n").encode())
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["policy_loads"] == 2
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


# --- attach twice, suggestions, counts, hex -----------------------------------------------
def attached_server() -> tuple[Server, AuditSink]:
    server, sink = make_server()
    call(server, HELLO)
    attach = json.loads(ATTACH)
    attach["path"] = str(ROOT / attach["path"])
    assert call(server, json.dumps(attach))["ok"]
    return server, sink


def test_a_second_attach_is_refused_unless_detached_or_replaced() -> None:
    server, sink = attached_server()
    path = str(ROOT / "fixtures/devices/nic-st-in-cap.lspci")
    assert call(server, req(2, "cfg_write", **W, value=0x101))["ok"]  # the guest enables TPH
    again = call(server, req(3, "attach", path=path, **A))
    assert again["ok"] is False and again["error"]["code"] == "already-attached"
    assert again["error"]["field"] == "bdf" and '"replace": true' in again["error"]["message"]
    assert again["decision"]["verdict"] == "drop"
    stats = call(server, req(4, "stats"))
    assert stats["devices"][0]["tph_enabled"] is True  # the device's state was kept
    replaced = call(server, req(5, "attach", path=path, replace=True, **A))
    assert replaced["ok"] and replaced["decision"]["reason"] == "attached"
    assert call(server, req(6, "stats"))["devices"][0]["tph_enabled"] is False
    events = [json.loads(x) for x in sink.lines if '"device.attached"' in x]
    assert [e.get("replaced") for e in events] == [None, True]
    assert call(server, req(7, "detach", **A))["ok"]
    assert call(server, req(8, "attach", path=path, **A))["ok"]  # detached first: fine
    bad = call(server, req(9, "attach", path=path, replace="yes", **A))
    assert bad["error"]["code"] == "bad-type" and bad["error"]["field"] == "replace"


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        (
            '{"id":1,"op":"helo","versions":[1]}',
            "unknown-op",
            "unknown op 'helo' (did you mean 'hello'?)",
        ),
        (
            '{"id":1,"op":"cfg_wrte"}',
            "unknown-op",
            "unknown op 'cfg_wrte' (did you mean 'cfg_write'?)",
        ),
        ('{"id":1,"op":"frobnicate"}', "unknown-op", "unknown op 'frobnicate'"),
        (
            '{"id":1,"op":"hello","version":[1]}',
            "unknown-field",
            "hello takes no field 'version' (did you mean 'versions'?)",
        ),
        (
            '{"id":1,"op":"attach","vm":"a","bdf":"3b:00.0","pth":"x"}',
            "unknown-field",
            "attach takes no field 'pth' (did you mean 'path'?)",
        ),
        (
            '{"id":1,"op":"cfg_write","vm":"a","bdf":"3b:00.0","offset":1,"width":1,"valeu":1}',
            "unknown-field",
            "cfg_write takes no field 'valeu' (did you mean 'value'?)",
        ),
        ('{"id":1,"op":"stats","verbose":true}', "unknown-field", "stats takes no field 'verbose'"),
    ],
)
def test_unknown_ops_and_fields_suggest_the_closest(line: str, code: str, message: str) -> None:
    server, _ = make_server()
    call(server, HELLO)
    rep = call(server, line)
    assert (rep["error"]["code"], rep["error"]["message"]) == (code, message)


def test_session_ended_counts_the_requests() -> None:
    replies, stderr, rc = run_serve(
        [
            HELLO,
            ATTACH,
            req(2, "cfg_write", **W, value=0x101),
            req(3, "cfg_read", **W),
            "{",
            req(4, "stats"),
        ]
    )
    assert rc == 0 and len(replies) == 6
    ended = [json.loads(x) for x in stderr.splitlines() if '"session.ended"' in x]
    assert len(ended) == 1
    assert {k: ended[0][k] for k in ("reason", "requests", "ops", "errors", "verdicts")} == {
        "reason": "eof",
        "requests": 6,
        "ops": {"hello": 1, "attach": 1, "cfg_write": 1, "cfg_read": 1, "stats": 1},
        "errors": 1,
        "verdicts": {"rewrite": 2},
    }


def test_hex_renders_values_for_people_and_only_when_asked() -> None:
    lines = [
        HELLO,
        ATTACH,
        req(2, "cfg_write", vm="tenant-a", bdf="3b:00.0", offset="0x156", width=2, value=2),
    ]
    plain, _, _ = run_serve(lines)
    shown, _, rc = run_serve(lines, "--hex")
    assert rc == 0
    assert plain[2]["decision"]["writes"] == [
        {"space": "config", "offset": 342, "width": 2, "value": 1}
    ]
    assert shown[2]["decision"]["writes"] == [
        {"space": "config", "offset": "0x156", "width": 2, "value": "0x1"}
    ]
    assert (shown[2]["decision"]["guest_value"], shown[2]["decision"]["read_mask"]) == (
        "0x2",
        "0xffff",
    )
    assert (
        shown[1]["device"]["msix"]["offset"] == "0x2000" and shown[1]["device"]["msix"]["bir"] == 0
    )
    # Everything else is the same reply, and the ids stay as sent.
    assert hex_values(plain) == shown and shown[2]["id"] == 2


def test_every_error_code_is_in_the_protocol_document() -> None:
    from fuzzlib import ERROR_CODES

    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## 8. Errors") : text.index("## 9.")]
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.M))
    assert documented == ERROR_CODES


def test_hex_also_renders_the_corrections_event_of_a_sighup(tmp_path: Path) -> None:
    from tphtrap.serve import HexServer

    server = HexServer(load_policy(ROOT / POLICY), str(ROOT / POLICY), Auditor(AuditSink()))  # type: ignore[arg-type]
    call(server, HELLO)
    attach = json.loads(ATTACH)
    attach["path"] = str(ROOT / attach["path"])
    assert call(server, json.dumps(attach))["ok"]
    assert call(server, req(2, "cfg_write", **W, value=0x101))["ok"]  # entries get tag 0x01
    # Socket 0's tag becomes 0x03: the entries holding 0x01 must be corrected.
    moved = tmp_path / "moved.yaml"
    text = (ROOT / POLICY).read_text()
    moved.write_text(text.replace("{st8: 0x01, st16: 0x0101}", "{st8: 0x03, st16: 0x0303}"))
    event = json.loads(server.reload_event(str(moved)))
    assert event["event"] == "corrections" and event["id"] is None
    writes = [w for c in event["corrections"] for w in c["decision"]["writes"]]
    assert writes and all(w["offset"].startswith("0x") for w in writes)
    assert {w["value"] for w in writes if w["width"] == 2} == {"0x3"}


def test_the_loop_collects_garbage_between_requests_never_inside_one(tmp_path: Path) -> None:
    """``serve_forever`` runs the cyclic garbage collector before it waits, never while it
    handles a line, even with the interpreter's threshold at its lowest (where automatic
    collection would stop nearly every decision); automatic collection is back on after."""
    auditor = Auditor.to_file(str(tmp_path / "audit.jsonl"))
    server = Server(load_policy(str(ROOT / "policies/two-tenants.yaml")), None, auditor)
    inside = False
    during: list[int] = []
    between: list[int] = []
    real = server.handle_line

    def handle_line(line: bytes) -> bytes:
        nonlocal inside
        inside = True
        try:
            return real(line)
        finally:
            inside = False

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            (during if inside else between).append(info["generation"])

    server.handle_line = handle_line  # type: ignore[method-assign]
    dev = ROOT / "fixtures/devices/nic-st-in-cap.lspci"
    lines = [
        {"id": 0, "op": "hello", "versions": [2]},
        {"id": 1, "op": "attach", **A, "path": str(dev)},
        *(
            {"id": 10 + i, "op": "cfg_write", **A, "offset": 0x150, "width": 4, "value": v}
            for i, v in enumerate([0x101, 0x1, 0x301, 0x100] * 10)
        ),
        {"id": 99, "op": "stats"},
    ]
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    replies: list[bytes] = []

    def feed() -> None:
        for line in lines:
            os.write(w_in, json.dumps(line).encode() + b"\n")
        os.close(w_in)

    def drain() -> None:
        with os.fdopen(r_out, "rb") as f:
            replies.extend(f.read().splitlines())

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    old = gc.get_threshold()
    gc.set_threshold(1)
    gc.callbacks.append(seen)
    try:
        for t in threads:
            t.start()
        assert serve_forever(server, r_in, w_out) == 0
        os.close(w_out)
        for t in threads:
            t.join(10)
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*old)
        os.close(r_in)
        auditor.close()
    assert len(replies) == len(lines) and all(b'"ok":true' in r for r in replies)
    assert during == [], f"collections while a line was handled: {during}"
    assert between, "no collection between the requests"
    assert gc.isenabled()
