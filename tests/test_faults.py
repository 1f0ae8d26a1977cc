"""Faults around ``tphtrap serve``: the hypervisor side going away, signals, a broken policy.

Every test drives a real ``tphtrap serve`` child over pipes. Every wait has a timeout, so a
hang fails the test instead of blocking the run; a child still alive at the end of a test is
killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzlib import REPO

from tphtrap.policyfile import check_policy_text

TPHTRAP = REPO / ".venv" / "bin" / "tphtrap"
POLICY = REPO / "policies" / "two-tenants.yaml"
A = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
B = {"vm": "tenant-b", "bdf": "0000:3b:00.1"}
DUMP_A = str(REPO / "fixtures" / "devices" / "nic-st-in-cap.lspci")
DUMP_B = str(REPO / "fixtures" / "devices" / "nic-st-in-msix.lspci")
CTRL, ENTRY0, ENTRY1 = 0x148 + 8, 0x148 + 0xC, 0x148 + 0xE  # nic-st-in-cap's TPH registers
WAIT = 10.0  # seconds any single wait may take


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class Serve:
    """One ``tphtrap serve`` child; replies are read with a deadline."""

    def __init__(self, policy: Path, audit: Path | None, *args: str) -> None:
        self.events: list[dict[str, Any]] = []
        cmd = [str(TPHTRAP), "serve", "--policy", str(policy)]
        if audit is not None:
            cmd += ["--audit", str(audit)]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pending = b""

    def send(self, *items: dict[str, Any] | bytes) -> None:
        assert self.proc.stdin is not None
        for item in items:
            self.proc.stdin.write(item if isinstance(item, bytes) else line(item))
        self.proc.stdin.flush()

    def recv(self, n: int = 1, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The next ``n`` replies; fails after ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self.pending.count(b"\n") < n:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply within {timeout} s (have {self.pending[:200]!r})"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                assert chunk, f"stdout closed; exit status {self.proc.poll()}"
                self.pending += chunk
        *done, self.pending = self.pending.split(b"\n", n)
        return [json.loads(x) for x in done]

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send ``req`` and return its reply; unsolicited event lines are kept in ``events``."""
        self.send(req)
        while True:
            line = self.recv()[0]
            if line.get("id") is not None or "event" not in line:
                return line
            self.events.append(line)

    def start(self, *devices: tuple[dict[str, str], str]) -> None:
        assert self.ask({"id": "h", "op": "hello", "versions": [2]})["ok"]
        for n, (who, dump) in enumerate(devices):
            reply = self.ask({"id": f"a{n}", "op": "attach", **who, "path": dump})
            assert reply["ok"], reply

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tphtrap serve still running {timeout} s later")

    def stderr(self) -> str:
        assert self.proc.stderr is not None and self.proc.poll() is not None
        return self.proc.stderr.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(policy: Path = POLICY, audit: Path | None = None, *args: str) -> Serve:
        child = Serve(policy, audit, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


PAGE = os.sysconf("SC_PAGE_SIZE")


def audit_events(path: Path, *, killed: bool = False, start: int = 0) -> list[dict[str, Any]]:
    """Every line of an audit file from byte ``start``, each of which must be whole JSON (the
    last one too).

    ``killed``: the writer was SIGKILLed, which may cut its last line, but only where the
    kernel stops a buffered write for a fatal signal: at a page boundary. That cut line is
    left out."""
    data = path.read_bytes()[start:]
    if killed and data and not data.endswith(b"\n"):
        assert len(data) % PAGE == 0, f"audit cut off the page boundary: {data[-200:]!r}"
        data = data[: data.rfind(b"\n") + 1]
    text = data.decode("utf-8")
    assert text == "" or text.endswith("\n"), f"audit ends inside a line: {text[-200:]!r}"
    events = []
    for n, raw in enumerate(text.splitlines(), 1):
        try:
            ev = json.loads(raw)
        except ValueError:
            pytest.fail(f"audit line {n} is not whole JSON: {raw[:200]!r}")
        assert isinstance(ev, dict) and isinstance(ev.get("event"), str), raw[:200]
        events.append(ev)
    return events


def wait_for_event(path: Path, name: str, count: int = 1) -> list[dict[str, Any]]:
    """The ``name`` events of an audit file once it has ``count`` of them. Serve may be
    writing to it: a read may see the line being written half done (a line crossing a page
    is copied a page at a time), so only the whole lines are looked at, each whole JSON."""
    deadline = time.monotonic() + WAIT
    while True:
        data = path.read_bytes() if path.exists() else b""
        text = data[: data.rfind(b"\n") + 1].decode("utf-8")
        found = [e for e in map(json.loads, text.splitlines()) if e["event"] == name]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {name!r} event (#{count}) in the audit"
        time.sleep(0.02)


def access_stream(stop: threading.Event) -> Iterator[bytes]:
    """Guest accesses that touch TPH state (so each is audited), forever."""
    n = 0
    values = [(CTRL, 4, 0x101), (ENTRY0, 2, 0x01), (ENTRY1, 2, 0x02), (CTRL, 4, 0x001)]
    while not stop.is_set():
        offset, width, value = values[n % len(values)]
        yield line(
            {"id": n, "op": "cfg_write", **A, "offset": offset, "width": width, "value": value}
        )
        n += 1


class Pump:
    """Writes an endless stream of requests and drains the replies, in two threads."""

    def __init__(self, child: Serve) -> None:
        self.child = child
        self.stop = threading.Event()
        self.replies = bytearray()
        self.threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._read, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _write(self) -> None:
        stdin = self.child.proc.stdin
        assert stdin is not None
        try:
            batch = []
            for req in access_stream(self.stop):
                batch.append(req)
                if len(batch) == 50:
                    stdin.write(b"".join(batch))
                    stdin.flush()
                    batch.clear()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the child is gone

    def _read(self) -> None:
        stdout = self.child.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            self.replies += chunk

    def wait_replies(self, n: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.replies.count(b"\n") < n:
            assert time.monotonic() < deadline, "the stream is not being answered"
            time.sleep(0.01)

    def finish(self, *, whole: bool) -> list[dict[str, Any]]:
        """The replies read; with ``whole``, the stream must not end inside a reply."""
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
            assert not t.is_alive()
        text = bytes(self.replies)
        if whole:
            assert text.endswith(b"\n"), text[-200:]
        return [json.loads(x) for x in text.split(b"\n")[:-1]]


# --- the hypervisor side goes away --------------------------------------------------------------
@pytest.mark.parametrize(
    ("tail", "last"),
    [
        pytest.param(b'{"id": 99, "op": "cfg_wr', ("bad-json", None), id="partial-request"),
        pytest.param(b'{"id":5,"op":"stats"}', ("ok", 5), id="complete-without-newline"),
    ],
)
def test_stdin_closed_mid_request(
    serve: Callable[..., Serve], tmp_path: Path, tail: bytes, last: tuple[str, Any]
) -> None:
    """EOF in the middle of a line: the partial line is answered (refused, or served when it
    is a whole request), then serve exits 0 promptly, cleanly, with a whole audit."""
    audit = tmp_path / "audit.jsonl"
    child = serve(POLICY, audit)
    child.start((A, DUMP_A))
    child.send({"id": 1, "op": "cfg_write", **A, "offset": CTRL, "width": 4, "value": 0x101})
    assert child.recv()[0]["ok"]
    child.send(tail)
    assert child.proc.stdin is not None
    child.proc.stdin.close()
    reply = child.recv()[0]
    code = "ok" if reply["ok"] else reply["error"]["code"]
    assert (code, reply["id"]) == last, reply
    if not reply["ok"]:
        assert reply["decision"]["verdict"] == "drop", reply
    assert child.wait() == 0
    assert "Traceback" not in child.stderr()
    events = audit_events(audit)
    assert events[-1]["event"] == "session.ended" and events[-1]["reason"] == "eof", events[-1]


def test_stdout_closed_while_requests_pending(serve: Callable[..., Serve], tmp_path: Path) -> None:
    """The hypervisor closes its end of the reply pipe with requests in flight: serve notices
    on its next reply, audits why, and exits 0 without a traceback."""
    audit = tmp_path / "audit.jsonl"
    child = serve(POLICY, audit)
    child.start((A, DUMP_A))
    assert child.proc.stdout is not None
    child.proc.stdout.close()
    stop = threading.Event()
    payload = b"".join(req for req, _ in zip(access_stream(stop), range(2000), strict=False))
    with contextlib.suppress(BrokenPipeError):  # it may already be gone: that is the point
        child.send(payload)
    assert child.wait() == 0
    assert "Traceback" not in child.stderr()
    ended = [e for e in audit_events(audit) if e["event"] == "session.ended"]
    assert [e["reason"] for e in ended] == ["stdout-closed"], ended


# --- signals ------------------------------------------------------------------------------------
def test_sigterm_during_stream(serve: Callable[..., Serve], tmp_path: Path) -> None:
    """SIGTERM while requests stream in: exit 0, every reply and every audit line whole."""
    audit = tmp_path / "audit.jsonl"
    child = serve(POLICY, audit)
    child.start((A, DUMP_A), (B, DUMP_B))
    pump = Pump(child)
    pump.wait_replies(500)
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait() == 0
    replies = pump.finish(whole=True)
    assert len(replies) >= 500 and all(r["ok"] for r in replies)
    assert "Traceback" not in child.stderr()
    events = audit_events(audit)
    assert sum(e["event"] == "access.decided" for e in events) >= 500
    assert events[-1]["event"] == "session.ended" and events[-1]["reason"] == "SIGTERM"


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6])
def test_sigkill_during_stream(serve: Callable[..., Serve], tmp_path: Path, delay: float) -> None:
    """SIGKILL while audit lines are being written as fast as serve can: every line already
    in the file is whole, parseable JSON, but for a last line cut at a page boundary. The
    next serve on that file seals a cut line and names it; every line after it is whole."""
    audit = tmp_path / "audit.jsonl"
    child = serve(POLICY, audit, "--audit-passes")
    child.start((A, DUMP_A), (B, DUMP_B))
    pump = Pump(child)
    pump.wait_replies(50)
    time.sleep(delay)
    child.proc.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    replies = pump.finish(whole=False)
    events = audit_events(audit, killed=True)
    decided = {e["id"] for e in events if e["event"] == "access.decided"}
    assert len(decided) >= 50
    # Write-ahead: every reply the client got has its line, whole, in the file.
    assert {r["id"] for r in replies if r.get("id") is not None} <= decided
    left = audit.read_bytes()
    size, whole = len(left), left.rfind(b"\n") + 1
    again = serve(POLICY, audit)
    again.start()
    again.send({"id": "bye", "op": "shutdown"})
    assert again.wait() == 0
    # The killed session's bytes stay; a cut line is ended, and stays unparseable.
    sealed = left + b"\n" if whole < size else left
    assert audit.read_bytes().startswith(sealed)
    later = audit_events(audit, start=len(sealed))
    torn = [(e["offset"], e["bytes"]) for e in later if e["event"] == "audit.torn"]
    assert torn == ([(whole, size - whole)] if whole < size else [])
    assert later[-1]["event"] == "session.ended"


def test_serve_seals_an_audit_file_cut_by_an_earlier_kill(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    """What a SIGKILL at a page boundary leaves (one whole line, then the start of the next,
    the file a page long), given to a new serve: the bytes stay, the cut line is ended and
    named, and the new session's lines are whole."""
    audit = tmp_path / "audit.jsonl"
    whole = b'{"event":"session.started","level":"info"}\n'
    cut = b'{"vm":"tenant-a","bdf":"0000:3b:00.0","region":"config","op":"wri'
    cut += b" " * (PAGE - len(whole) - len(cut))
    audit.write_bytes(whole + cut)
    child = serve(POLICY, audit)
    child.start((A, DUMP_A))
    assert child.ask({"id": 1, "op": "cfg_write", **A, "offset": CTRL, "width": 4, "value": 1})[
        "ok"
    ]
    child.send({"id": "bye", "op": "shutdown"})
    assert child.wait() == 0
    data = audit.read_bytes()
    assert data.startswith(whole + cut + b"\n")
    later = [json.loads(x) for x in data[PAGE + 1 :].splitlines()]
    assert later[0]["event"] == "audit.torn"
    assert (later[0]["offset"], later[0]["bytes"]) == (len(whole), len(cut))
    assert [e["id"] for e in later if e["event"] == "access.decided"] == [1]
    assert later[-1]["event"] == "session.ended"


@pytest.mark.parametrize("name", ["missing/audit.jsonl", "."], ids=["no-directory", "a-directory"])
def test_an_audit_file_that_cannot_be_opened_is_one_line_of_error(
    serve: Callable[..., Serve], tmp_path: Path, name: str
) -> None:
    audit = tmp_path / name
    child = serve(POLICY, audit)
    assert child.wait() == 1
    why = "No such file or directory" if name != "." else "Is a directory"
    assert child.stderr().splitlines() == [
        f"tphtrap: error: {audit}: cannot open the audit file: {why}"
    ]
    assert child.proc.stdout is not None and child.proc.stdout.read() == b""


def test_sigterm_while_stdout_is_full(serve: Callable[..., Serve], tmp_path: Path) -> None:
    child = serve(POLICY, tmp_path / "audit.jsonl")
    child.start()
    assert child.proc.stdin is not None
    fd = child.proc.stdin.fileno()
    os.set_blocking(fd, False)
    deadline = time.monotonic() + WAIT
    blocked_since = None
    while blocked_since is None or time.monotonic() - blocked_since < 0.5:
        # Fill both pipes: replies nobody reads, then requests serve cannot get to.
        assert time.monotonic() < deadline, "the pipes never filled up"
        try:
            os.write(fd, b'{"id":1,"op":"stats"}\n' * 100)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            time.sleep(0.05)
    child.proc.send_signal(signal.SIGTERM)
    try:
        rc = child.proc.wait(2)
    except subprocess.TimeoutExpired:
        pytest.fail("tphtrap serve ignored SIGTERM while its stdout was full")
    assert rc == 0


def test_line_at_the_limit_with_crlf_split_across_reads(serve: Callable[..., Serve]) -> None:
    child = serve()
    child.start()
    head = b'{"id":7,"op":"stats"'
    request = head + b" " * (65536 - len(head) - 1) + b"}"
    child.send(request + b"\r")
    time.sleep(0.3)  # serve reads the line and its \r before the \n arrives
    child.send(b"\n")
    reply = child.recv()[0]
    assert reply["ok"] and reply["id"] == 7, reply


# --- a policy file replaced by a broken one, then SIGHUP ----------------------------------------
def _probe(child: Serve) -> list[tuple[str, str, list[Any]]]:
    """tenant-a writes its own socket's tags and the other socket's: what does the device get?"""
    out = []
    for n, (offset, value) in enumerate([(ENTRY0, 0x01), (ENTRY1, 0x02)]):
        reply = child.ask(
            {"id": f"p{n}", "op": "cfg_write", **A, "offset": offset, "width": 2, "value": value}
        )
        assert reply["ok"], reply
        d = reply["decision"]
        out.append((d["verdict"], d["reason"], d["writes"]))
    return out


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_sighup_broken_policy_keeps_the_old_one(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    original = POLICY.read_text()
    policy = tmp_path / "policy.yaml"
    policy.write_text(original)
    audit = tmp_path / "audit.jsonl"
    child = serve(policy, audit)
    child.start((A, DUMP_A))
    enable = {"id": "e", "op": "cfg_write", **A, "offset": CTRL, "width": 4, "value": 0x101}
    assert child.ask(enable)["decision"]["reason"] == "tag-fallback"  # unwritten entries
    before = _probe(child)
    assert [(v, r) for v, r, _ in before] == [("pass", "tag-allowed"), ("rewrite", "foreign-tag")]

    # A broken policy (an unclosed flow list), then SIGHUP: refused, audited, old one kept.
    broken = original.replace("  neutral_tags: [0x00]", "  neutral_tags: [0x00\n  oops: 1")
    assert broken != original
    first = next(p for p in check_policy_text(broken, str(policy)) if p.level == "error")
    _replace(policy, broken)
    child.proc.send_signal(signal.SIGHUP)
    rejected = wait_for_event(audit, "policy.rejected")
    assert len(rejected) == 1 and rejected[0]["path"] == str(policy)
    assert rejected[0]["problems"][0].startswith(f"{policy}:{first.line}:{first.column}: ")
    assert _probe(child) == before
    stats = child.ask({"id": "s", "op": "stats"})
    assert (stats["policy_loads"], stats["policy_rejects"]) == (1, 1), stats

    # A valid policy that swaps the sockets, then SIGHUP: loaded, and decisions change.
    swapped = original.replace("cpus: 0-15,32-47", "cpus: X").replace(
        "cpus: 16-31,48-63", "cpus: 0-15,32-47"
    )
    swapped = swapped.replace("cpus: X", "cpus: 16-31,48-63")
    assert not [p for p in check_policy_text(swapped) if p.level == "error"]
    _replace(policy, swapped)
    child.proc.send_signal(signal.SIGHUP)
    loaded = wait_for_event(audit, "policy.loaded", count=2)
    assert loaded[-1]["path"] == str(policy)
    after = _probe(child)
    assert [(v, r) for v, r, _ in after] == [("rewrite", "foreign-tag"), ("pass", "tag-allowed")]
    assert after[0][2] == [{"space": "config", "offset": ENTRY0, "width": 2, "value": 0x02}]
    stats = child.ask({"id": "s2", "op": "stats"})
    assert (stats["policy_loads"], stats["policy_rejects"]) == (2, 1), stats
    assert child.proc.stdin is not None
    child.proc.stdin.close()
    assert child.wait() == 0
    assert "Traceback" not in child.stderr()
    audit_events(audit)


# --- audit log rotation -------------------------------------------------------------------------
def decided_ids(*paths: Path) -> list[Any]:
    return [e["id"] for p in paths for e in audit_events(p) if e["event"] == "access.decided"]


def test_audit_rotation_under_load_loses_nothing(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    """The audit file is moved away five times while requests stream in, each time followed
    by SIGHUP (reload, then reopen) or SIGUSR1 (reopen only): every decision is audited exactly
    once, in one of the files, and each new file starts with ``audit.reopened``."""
    audit = tmp_path / "audit.jsonl"
    child = serve(POLICY, audit)
    child.start((A, DUMP_A))
    pump = Pump(child)
    rotated = []
    for n in range(1, 6):
        pump.wait_replies(300 * n)
        moved = tmp_path / f"audit.jsonl.{n}"
        audit.rename(moved)
        rotated.append(moved)
        sig = signal.SIGHUP if n % 2 else signal.SIGUSR1
        child.proc.send_signal(sig)
        reopened = wait_for_event(audit, "audit.reopened")
        assert reopened == [
            {**reopened[0], "path": str(audit), "reason": sig.name, "event": "audit.reopened"}
        ]
    pump.wait_replies(300 * 6)
    pump.stop.set()
    pump.threads[0].join(WAIT)
    assert child.proc.stdin is not None
    child.proc.stdin.close()
    assert child.wait() == 0
    lines = pump.finish(whole=True)
    replies = [r for r in lines if r.get("id") is not None]  # SIGHUP adds an event line
    assert all(r["event"] == "corrections" for r in lines if r.get("id") is None)
    assert len(replies) >= 1800 and all(r["ok"] for r in replies)
    ids = decided_ids(*rotated, audit)
    assert sorted(ids) == sorted(r["id"] for r in replies)  # each once: nothing lost
    assert all(decided_ids(p) for p in rotated)  # every file got events under load
    for later in [*rotated[1:], audit]:
        assert audit_events(later)[0]["event"] == "audit.reopened"
    loads = [e for p in rotated for e in audit_events(p) if e["event"] == "policy.loaded"]
    assert len(loads) == 1 + 3  # start, then the three SIGHUPs reloaded before reopening
    ended = audit_events(audit)[-1]
    assert ended["event"] == "session.ended" and ended["reason"] == "eof"
    assert ended["ops"]["cfg_write"] == len(replies) and ended["errors"] == 0


def test_audit_reopen_failure_keeps_the_old_file(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    """The name cannot be opened again (its directory is gone): events stay in the old file,
    which says why, and serving goes on."""
    logs = tmp_path / "logs"
    logs.mkdir()
    audit = logs / "audit.jsonl"
    child = serve(POLICY, audit)
    child.start((A, DUMP_A))
    kept = tmp_path / "kept.jsonl"
    audit.rename(kept)
    logs.rmdir()
    child.proc.send_signal(signal.SIGUSR1)
    failed = wait_for_event(kept, "audit.reopen-failed")
    assert failed[0]["path"] == str(audit) and "No such file" in failed[0]["error"]
    reply = child.ask({"id": 7, "op": "cfg_write", **A, "offset": CTRL, "width": 4, "value": 1})
    assert reply["ok"]
    assert decided_ids(kept) == [7]


def doc_logrotate_stanza() -> str:
    text = (REPO / "docs" / "audit.md").read_text()
    start = text.index("```conf\n/var/log/tph.jsonl {") + len("```conf\n")
    return text[start : text.index("```", start)]


def test_logrotate_with_the_documented_stanza(serve: Callable[..., Serve], tmp_path: Path) -> None:
    """The stanza of docs/audit.md, run by the real logrotate (paths moved to a temporary
    directory): the rotated file holds the events before, the new one the events after."""
    from helpers import require_tool

    logrotate = require_tool("logrotate", "logrotate")
    if os.geteuid() != 0:
        pytest.skip("the stanza's 'create 0640 root adm' needs root, as logrotate runs")
    audit, pid_file = tmp_path / "tph.jsonl", tmp_path / "tphtrap.pid"
    conf = tmp_path / "logrotate.conf"
    stanza = doc_logrotate_stanza()
    conf.write_text(
        stanza.replace("/var/log/tph.jsonl", str(audit)).replace("/run/tphtrap.pid", str(pid_file))
    )
    child = serve(POLICY, audit, "--pid-file", str(pid_file))
    child.start((A, DUMP_A))
    write = {"op": "cfg_write", **A, "offset": CTRL, "width": 4}
    assert child.ask({"id": 1, **write, "value": 0x101})["ok"]
    assert pid_file.read_text() == f"{child.proc.pid}\n"
    res = subprocess.run(
        [logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    wait_for_event(audit, "audit.reopened")
    assert child.ask({"id": 2, **write, "value": 0})["ok"]
    assert child.ask({"id": "bye", "op": "shutdown"})["ok"]
    assert child.wait() == 0
    rotated = tmp_path / "tph.jsonl.1"  # delaycompress: not compressed yet
    assert decided_ids(rotated) == [1] and decided_ids(audit) == [2]
    assert oct(audit.stat().st_mode & 0o777) == "0o640"
    assert not pid_file.exists()  # removed at exit
