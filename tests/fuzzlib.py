"""Shared pieces of the fuzzers and the hostile-input tests: paths, the per-input time limit,
JSON text that ``json.dumps`` cannot write (repeated keys, NaN, huge numbers), and the checks
every reply of ``tphtrap serve`` must pass."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from tphtrap.audit import Auditor
from tphtrap.errors import WireError
from tphtrap.policy import Policy
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server
from tphtrap.wire import ACCESS_OPS, MAX_REPLY, parse_request

__all__ = [
    "ATTACHED",
    "DEVICES",
    "ERROR_CODES",
    "LIMIT",
    "PARSE_ERROR_CODES",
    "POLICY",
    "POLICY_PATH",
    "REPO",
    "Hang",
    "Obj",
    "Raw",
    "check_audit",
    "check_reply",
    "frame",
    "fresh_server",
    "serve_lines",
    "time_limit",
    "to_json",
]

REPO = Path(__file__).resolve().parent.parent
DEVICES = REPO / "fixtures" / "devices"
POLICY_PATH = REPO / "policies" / "two-tenants.yaml"
POLICY: Policy = load_policy(POLICY_PATH)
# The two devices of policies/two-tenants.yaml and the dumps attached for them.
ATTACHED = (
    ("tenant-a", "0000:3b:00.0", DEVICES / "nic-st-in-cap.lspci"),
    ("tenant-b", "0000:3b:00.1", DEVICES / "nic-st-in-msix.lspci"),
)

#: Seconds one input may take in any target (parsing, loading, deciding).
LIMIT = 2.0

#: The error codes ``wire.parse_request`` itself raises (the line, before any state).
PARSE_ERROR_CODES = frozenset(
    {
        "bad-json",
        "bad-utf8",
        "line-too-long",
        "not-an-object",
        "missing-field",
        "bad-type",
        "out-of-range",
        "unknown-op",
        "unknown-field",
    }
)

#: Every error code of docs/protocol.md section 6.
ERROR_CODES = PARSE_ERROR_CODES | frozenset(
    {
        "handshake-required",
        "already-attached",
        "unsupported-version",
        "unknown-vm",
        "unknown-device",
        "bad-config",
        "policy-invalid",
        "wrong-backend",
        "internal-error",
    }
)


class Hang(Exception):
    """A target ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float = LIMIT) -> Iterator[None]:
    """Fail when the body takes ``seconds`` or more; interrupt it after five times that.

    The interruption (SIGALRM) stops real hangs, including a regular expression that
    backtracks forever (``re`` checks for signals while it matches); the measured time catches
    slow work done in C code that never looks at signals. It is the process's CPU time, so a
    busy machine (another process on the CPU) does not make a target look slow.
    """

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {5 * seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 5 * seconds)
    start = time.process_time()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.process_time() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s (limit {seconds} s)"


# --- JSON text beyond json.dumps ---------------------------------------------------------------
class Raw(str):
    """JSON text written as it is: ``NaN``, ``1e999``, a 5000-digit number, broken tokens."""

    __slots__ = ()


class Obj(tuple[tuple[str, Any], ...]):
    """A JSON object as its (key, value) pairs, in order; a key may repeat."""

    __slots__ = ()


def to_json(value: Any, *, ascii_only: bool = True) -> str:
    """JSON text for ``value`` (``Raw`` and ``Obj`` included); NaN and infinities as tokens."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        inner = ",".join(
            f"{json.dumps(k, ensure_ascii=ascii_only)}:{to_json(v, ascii_only=ascii_only)}"
            for k, v in value
        )
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v, ascii_only=ascii_only) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # NaN, Infinity, -Infinity: Python's non-standard tokens
    return json.dumps(value, ensure_ascii=ascii_only)


def frame(data: bytes) -> list[bytes]:
    """Split a byte stream into request lines the way ``serve_forever`` does (blank lines and a
    trailing ``\\r`` dropped; an over-long line stays whole: ``parse_request`` refuses it)."""
    out = []
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            out.append(line)
    return out


# --- serve ---------------------------------------------------------------------------------
def fresh_server() -> tuple[Server, io.StringIO]:
    """A server on the two-tenant policy after ``hello``, with both of its devices attached."""
    audit = io.StringIO()
    server = Server(POLICY, str(POLICY_PATH), Auditor(audit))
    setup = [{"id": "h", "op": "hello", "versions": [2]}]
    for vm, bdf, path in ATTACHED:
        setup.append({"id": f"a-{vm}", "op": "attach", "vm": vm, "bdf": bdf, "path": str(path)})
    for req in setup:
        reply = json.loads(server.handle_line(json.dumps(req).encode()))
        assert reply["ok"], reply
    return server, audit


_BDF_OUT = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]\Z")
_VERDICTS = frozenset({"pass", "rewrite", "drop"})


def _check_decision(d: Any, *, error: bool) -> None:
    assert isinstance(d, dict), d
    assert d["verdict"] in _VERDICTS, d
    assert isinstance(d["reason"], str) and d["reason"] in d["reasons"], d
    assert d["reason"] != "internal-error", f"the engine failed: {d}"
    if error:
        assert d["verdict"] == "drop" and d["writes"] == [], d
    for w in d["writes"]:
        assert w["width"] in (1, 2, 4, 8), w
        assert 0 <= w["value"] < 1 << (8 * w["width"]), w
        if w["space"] == "config":
            assert w["offset"] >= 0 and w["offset"] + w["width"] <= 4096, w
        else:
            assert w["space"] == "bar" and 0 <= w["bar"] <= 5 and w["offset"] >= 0, w
    for o in d.get("ops", []):
        assert o["op"] in ("tph_enable", "tph_disable", "st_set"), o


def check_reply(line: bytes, reply: bytes) -> dict[str, Any]:
    """The protocol's promises about the one reply to ``line``; returns the decoded reply.

    Exactly one line of JSON with ``id`` and ``ok`` (after the event lines of a ``reload``,
    each with ``"id": null``); no line longer than ``MAX_REPLY``; an error carries a known code
    (never ``internal-error``, which means a bug) and a ``drop`` decision with no writes; a
    line that parses as a request is answered under its id; an access is answered with a
    decision.
    """
    assert reply.endswith(b"\n"), reply[:200]
    *events, last = reply.splitlines()
    for raw in events:
        ev = json.loads(raw)
        assert ev["id"] is None and ev["event"] == "corrections", raw[:200]
        assert b'"op":"reload"' in last, last[:200]
    assert all(len(x) <= MAX_REPLY for x in reply.splitlines())
    obj = json.loads(last)
    assert isinstance(obj, dict) and "id" in obj and isinstance(obj.get("ok"), bool), obj
    try:
        req = parse_request(line)
    except WireError as exc:
        assert obj["ok"] is False, obj
        assert obj["error"]["code"] == exc.code, (obj, exc.code)
        assert obj["id"] == exc.request_id, obj
        req = None
    if req is not None:
        assert obj["id"] == req.id, (obj, req.id)
    if not obj["ok"]:
        err = obj["error"]
        assert err["code"] in ERROR_CODES and err["code"] != "internal-error", obj
        assert isinstance(err["message"], str), obj
        _check_decision(obj["decision"], error=True)
    elif req is not None and (req.op in ACCESS_OPS or req.op in ("attach", "detach")):
        _check_decision(obj["decision"], error=False)
    return obj


def check_audit(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every audit line is one whole JSON object with an event name."""
    events = []
    for line in stream.getvalue().splitlines():
        ev = json.loads(line)
        assert isinstance(ev, dict) and isinstance(ev.get("event"), str), line[:200]
        events.append(ev)
    return events


def serve_lines(lines: list[bytes]) -> None:
    """Every line through a fresh server, in order: each gets one well-formed reply in time
    (:func:`check_reply`), and the audit stream holds whole events only."""
    server, audit = fresh_server()
    for line in lines:
        with time_limit():
            reply = server.handle_line(line)
        check_reply(line, reply)
    check_audit(audit)
