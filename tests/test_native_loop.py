"""``tphtrap serve``'s loop with and without the native path: the same bytes out, the same audit.

While every line is one the native path answers, the loop runs in C (``_steady.pump``) and hands
the Python loop what it did not do. Two real ``serve`` processes, one with ``--no-native``, get
the same byte stream in the same pieces (lines cut across writes, ``\\r\\n``, blank lines, lines
the native path declines amid lines it answers, a wire error, a burst of requests in one write,
a last line without its newline); their standard output must be the same bytes, their audit
files the same lines but for the timestamps, their ``stats`` the same but for the uptime.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tphtrap import native
from tphtrap.audit import Auditor
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server, serve_forever

ROOT = Path(__file__).resolve().parent.parent
SERVE = [str(ROOT / ".venv" / "bin" / "tphtrap"), "serve", "--policy", "policies/two-tenants.yaml"]
A = '"vm":"tenant-a","bdf":"0000:3b:00.0"'
B = '"vm":"tenant-b","bdf":"0000:3b:00.1"'

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="the native path is not built")


def _setup() -> list[str]:
    power_on = ",".join(["1"] * 32)
    return [
        '{"id":0,"op":"hello","versions":[2]}',
        f'{{"id":1,"op":"attach",{A},"path":"fixtures/devices/nic-st-in-cap.lspci"}}',
        f'{{"id":2,"op":"attach",{B},"path":"fixtures/devices/nic-st-in-msix.lspci",'
        f'"vector_ctrl":[{power_on}]}}',
        f'{{"id":3,"op":"cfg_write",{B},"offset":336,"width":4,"value":769}}',
    ]


def _traffic(rng: random.Random, n: int) -> list[str]:
    """Plain lines of the four kinds the native path answers, and some it declines."""
    out: list[str] = []
    for i in range(n):
        rid = 100 + i
        kind = rng.randrange(8)
        if kind == 0:
            value = rng.choice([0x001, 0x101, 0x201, 0x301, 0x100])
            out.append(
                f'{{"id":{rid},"op":"cfg_write",{A},"offset":336,"width":4,"value":{value}}}'
            )
        elif kind == 1:
            off, tag = 0x154 + 2 * rng.randrange(8), rng.choice([0, 1, 2, 7, 0x55])
            out.append(
                f'{{"id":{rid},"op":"cfg_write",{A},"offset":{off},"width":2,"value":{tag}}}'
            )
        elif kind == 2:
            off = 0x4000 + 16 * rng.randrange(4) + 12
            value = (rng.choice([0x0202, 0x0303, 0x0001, 0x7777]) << 16) | rng.randrange(2)
            out.append(
                f'{{"id":{rid},"op":"msix_write",{B},"bar":2,"offset":{off},"width":4,'
                f'"value":{value}}}'
            )
        elif kind == 3:
            out.append(f'{{"id":{rid},"op":"cfg_write",{A},"offset":4,"width":2,"value":1030}}')
        elif kind == 4:  # the same write, not in the plainest form: the Python path's
            out.append(
                f'{{"id": {rid}, "op": "cfg_write", {A}, "offset": 340, "width": 2, "value": 1}}'
            )
        elif kind == 5:
            out.append(f'{{"id":"r{rid}","op":"cfg_read",{A},"offset":336,"width":4}}')
        elif kind == 6:
            out.append(f'{{"id":{rid},"op":"cfg_write",{A},"offset":336,"width":4}}')  # no value
        else:
            out.append(rng.choice(["", "   ", "\t", f'{{"id":{rid},"op":"reset",{A}}}']))
    return out


def _stream(lines: list[str], rng: random.Random) -> list[bytes]:
    """The lines as one byte stream (some ending in \\r\\n), cut at random points."""
    data = b"".join((line + rng.choice(["\n", "\n", "\r\n"])).encode() for line in lines)
    data += b'{"id":"last","op":"stats"}'  # no newline: still a request at EOF
    cuts = sorted(rng.sample(range(1, len(data)), min(40, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _run(extra: list[str], pieces: list[bytes], audit: Path) -> bytes:
    proc = subprocess.Popen(
        [*SERVE, "--audit", str(audit), *extra],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    for piece in pieces:
        proc.stdin.write(piece)
        proc.stdin.flush()
        time.sleep(0.001)  # (so that the pieces arrive as separate reads, mostly)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    return out


def _audit(path: Path) -> list[str]:
    return [re.sub(r'"timestamp":"[^"]*"', "", line) for line in path.read_text().splitlines()]


def _stats(out: bytes) -> dict[str, object]:
    """The last reply, ``stats``, without its uptime and the native path's count."""
    stats: dict[str, object] = json.loads(out.splitlines()[-1])
    del stats["uptime_s"], stats["native"]
    return stats


@pytest.mark.parametrize("seed", range(3))
def test_serve_gives_the_same_bytes_with_and_without_the_native_path(
    seed: int, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    pieces = _stream(_setup() + _traffic(rng, 400), rng)
    fast = _run([], pieces, tmp_path / "native.jsonl")
    slow = _run(["--no-native"], pieces, tmp_path / "python.jsonl")
    # The stats reply's uptime differs; everything before it is the same bytes.
    assert fast.splitlines()[:-1] == slow.splitlines()[:-1]
    assert _stats(fast) == _stats(slow)
    assert _audit(tmp_path / "native.jsonl") == _audit(tmp_path / "python.jsonl")
    answered = json.loads(fast.splitlines()[-1])["native"]
    print(f"native answers: {answered} of {len(fast.splitlines())}")
    assert answered > 100 and json.loads(slow.splitlines()[-1])["native"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_the_c_loop_on_msix_table_writes(seed: int, tmp_path: Path) -> None:
    """MSI-X table writes of every width around and inside the table (its address and data
    words, Vector Control words between): the same bytes and audit with the native path."""
    rng = random.Random(seed)
    lines = _setup()
    for i in range(600):
        off, width = 0x4000 + rng.randrange(-12, 16 * 32 + 12), rng.choice([1, 2, 4, 8])
        bar = 2 if rng.random() < 0.9 else rng.randrange(6)
        value = rng.getrandbits(8 * width) % 10**19
        if rng.random() < 0.15:
            off, width = 0x4000 + 16 * rng.randrange(32) + 12, 4
            value = rng.choice([0x0202, 0x0303, 0x0001]) << 16 | rng.randrange(2)
        lines.append(
            f'{{"id":{100 + i},"op":"msix_write",{B},"bar":{bar},"offset":{off},'
            f'"width":{width},"value":{value}}}'
        )
    pieces = _stream(lines, rng)
    fast = _run([], pieces, tmp_path / "native.jsonl")
    slow = _run(["--no-native"], pieces, tmp_path / "python.jsonl")
    assert fast.splitlines()[:-1] == slow.splitlines()[:-1]
    assert _stats(fast) == _stats(slow)
    assert _audit(tmp_path / "native.jsonl") == _audit(tmp_path / "python.jsonl")
    assert json.loads(fast.splitlines()[-1])["native"] > 300


def test_a_burst_in_one_write_is_answered_in_order(tmp_path: Path) -> None:
    rng = random.Random(7)
    lines = _setup() + [
        line for line in _traffic(rng, 3000) if line.strip() and '"reset"' not in line
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"id":"last","op":"stats"}\n'
    fast = _run([], [data], tmp_path / "native.jsonl")
    slow = _run(["--no-native"], [data], tmp_path / "python.jsonl")
    assert fast.splitlines()[:-1] == slow.splitlines()[:-1]
    assert _stats(fast) == _stats(slow)
    assert json.loads(fast.splitlines()[-1])["native"] > 1000
    ids = [json.loads(line)["id"] for line in fast.splitlines()]
    assert ids[:-1] == [json.loads(line)["id"] for line in lines] and ids[-1] == "last"


class _DiskFullUntilTheEnd(Server):
    """A server whose audit file is full until the session ends (its last event is written)."""

    good: Any = None

    def session_ended(self, reason: str, level: str = "info") -> None:
        self.audit._writer.switch(self.good, self.good.fileno())
        super().session_ended(reason, level)


def _served(native_path: bool, audit: Path, lines: list[str]) -> tuple[bytes, dict[str, object]]:
    """``serve_forever`` in this process on pipes: the set-up through ``handle_line``, then
    ``lines`` with the audit stream on /dev/full (every write of it fails: disk full)."""
    auditor = Auditor.to_file(str(audit))
    server = _DiskFullUntilTheEnd(
        load_policy(str(ROOT / "policies/two-tenants.yaml")), None, auditor, native=native_path
    )
    for line in _setup():
        assert b'"ok":true' in server.handle_line(line.encode())
    full = open("/dev/full", "a", encoding="utf-8")  # noqa: SIM115
    server.good = auditor._writer.switch(full, full.fileno())
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    os.write(w_in, ("\n".join(lines) + "\n").encode())
    os.close(w_in)
    try:
        assert serve_forever(server, r_in, w_out) == 0
        os.close(w_out)
        with os.fdopen(r_out, "rb") as f:
            out = f.read()
    finally:
        os.close(r_in)
        full.close()
    stats = json.loads(server.handle_line(b'{"id":"s","op":"stats"}'))
    del stats["uptime_s"], stats["native"]
    return out, stats


def test_a_failed_audit_write_freezes_the_device_as_the_python_path_does(tmp_path: Path) -> None:
    """A decision whose audit line cannot be written does not go out: its device is frozen
    instead, by either path alike. Every reply, from the first, turns Requester Enable off on
    the control register and writes nothing else (the later ones: the frozen device's drop
    could not be audited either); the counts agree."""
    lines = [
        f'{{"id":{10 + i},"op":"cfg_write",{A},"offset":{0x154 + 2 * (i % 8)},"width":2,"value":1}}'
        for i in range(20)
    ] + [f'{{"id":40,"op":"cfg_write",{A},"offset":4,"width":2,"value":1030}}']
    fast = _served(True, tmp_path / "native.jsonl", lines)
    slow = _served(False, tmp_path / "python.jsonl", lines)
    assert fast == slow
    replies = [json.loads(line) for line in fast[0].splitlines()]
    assert [r["id"] for r in replies] == [*range(10, 30), 40]
    for r in replies:
        d = r["decision"]
        assert r["ok"] and d["reason"] == "internal-error", r
        assert "audit line could not be written" in d["detail"]
        [write] = d["writes"]  # the control register (at 0x150), Requester Enable (9:8) off
        assert write["offset"] == 0x150 and write["width"] == 4 and not write["value"] >> 8 & 3
    [dev_a] = [d for d in fast[1]["devices"] if d["vm"] == "tenant-a"]  # type: ignore[attr-defined]
    assert dev_a["frozen"] and not dev_a["tph_enabled"]


_CONVERSATION = r"""
import json, os, sys, threading
sys.path.insert(0, "tests")
from test_native_loop import _setup
from tphtrap.audit import Auditor
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server, serve_forever

server = Server(load_policy("policies/two-tenants.yaml"), None, Auditor.to_file(sys.argv[1]))
for line in _setup():
    assert b'"ok":true' in server.handle_line(line.encode())
r_in, w_in = os.pipe()
r_out, w_out = os.pipe()
got = []

def talk():  # one request at a time, each after the reply to the one before
    with os.fdopen(r_out, "rb") as replies:
        for i in range(20):
            line = f'{{"id":{i},"op":"cfg_read",{sys.argv[2]},"offset":336,"width":4}}\n'
            os.write(w_in, line.encode())
            got.append(json.loads(replies.readline()))
        os.close(w_in)

t = threading.Thread(target=talk)
t.start()
assert serve_forever(server, r_in, w_out) == 0
t.join()
assert [r["id"] for r in got] == list(range(20)) and server.native_answers >= 20, got
print("ok")
"""


def test_the_c_loop_waits_without_holding_the_interpreter(tmp_path: Path) -> None:
    """The C loop's wait for the next line lets the process's other threads run: here the
    thread that writes each request only after it has read the reply to the one before (with
    the wait holding the interpreter's lock, that thread never ran again: a deadlock)."""
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", _CONVERSATION, str(tmp_path / "a.jsonl"), A],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
