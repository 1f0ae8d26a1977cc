"""Unit checks of the native path's guards (tphtrap/native): what it must decline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tphtrap import native, wire
from tphtrap.audit import Auditor
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server

ROOT = Path(__file__).resolve().parent.parent
POLICY = str(ROOT / "policies/two-tenants.yaml")
A = '"vm":"tenant-a","bdf":"0000:3b:00.0"'

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="the native path is not built")


def _server(tmp_path: Path) -> Server:
    server = Server(load_policy(POLICY), POLICY, Auditor.to_file(str(tmp_path / "a.jsonl")))
    for line in (
        '{"id":0,"op":"hello","versions":[2]}',
        f'{{"id":1,"op":"attach",{A},"path":"fixtures/devices/nic-st-in-cap.lspci"}}',
    ):
        assert b'"ok":true' in server.handle_line(line.encode())
    return server


def _control(rid: int, value: int) -> bytes:
    return f'{{"id":{rid},"op":"cfg_write",{A},"offset":336,"width":4,"value":{value}}}'.encode()


def test_the_line_limit_is_the_protocols() -> None:
    from tphtrap.native import _steady

    assert _steady.MAX_LINE == wire.MAX_LINE


def _kept_enable(server: Server) -> tuple[Any, dict[Any, Any], Any, Any]:
    """Enable and disable tenant-a's TPH twice: (its session, its kept control decisions, the
    enable's key, the enable's kept decision)."""
    assert server.native is not None
    for rid, value in enumerate([0x101, 0x001, 0x101, 0x001], start=10):
        server.handle_line(_control(rid, value))
    sess = server.engine.session("tenant-a", "0000:3b:00.0")
    assert sess is not None
    kept = server.native._controls[b"tenant-a\x000000:3b:00.0"][2]
    key = native.control_key(sess, 0x101)
    memo = kept[key]
    assert memo is not None, "the enable was not kept"
    return sess, kept, key, memo


def test_a_kept_control_decision_is_replayed_under_its_own_rules_only(tmp_path: Path) -> None:
    """A kept decision whose key matches but whose rules are not the session's (new rules at
    a freed one's address) is declined by the C side."""
    server = _server(tmp_path)
    sess, kept, key, memo = _kept_enable(server)
    before = server.native_answers
    server.handle_line(_control(20, 0x101))
    assert server.native_answers == before + 1  # replayed
    server.handle_line(_control(21, 0x001))
    # The same key, as if other rules sat at the address: declined, the Python path decides.
    at = next(k for k, item in enumerate(memo) if item is sess.rules)  # (wherever it is kept)
    kept[key] = (*memo[:at], object(), *memo[at + 1 :])
    before = server.native_answers
    reply = json.loads(server.handle_line(_control(22, 0x101)))
    assert server.native_answers == before and reply["ok"]
    assert server.native is not None, "declined by a fault of the native path, not its guard"


def test_a_line_past_the_limit_is_the_python_paths(tmp_path: Path) -> None:
    server = _server(tmp_path)
    line = f'{{"id":5,"op":"cfg_write",{A},"offset":4,"width":2,"value":1030}}'.encode()
    long = line[:-1] + b" " * (wire.MAX_LINE + 1 - len(line)) + b"}"
    assert len(long) > wire.MAX_LINE and server.native is not None
    assert server.native.handle(long) is None
    assert server.native.handle(line) is not None


def test_a_kept_control_decision_of_another_layout_is_a_fault_not_a_crash(
    tmp_path: Path,
) -> None:
    """The C side reads a kept decision as NativePath._control_memo lays it out: one laid out
    otherwise (an item of another type where it reads a tuple) is a TypeError, which turns
    the native path off, and the Python path answers (never a read through a wrong type)."""
    server = _server(tmp_path)
    _, kept, key, memo = _kept_enable(server)
    for k, item in enumerate(memo):
        if type(item) is tuple:
            kept[key] = (*memo[:k], object(), *memo[k + 1 :])
            with pytest.raises(TypeError, match="control memo"):
                server.native.handle(_control(30 + k, 0x101))
    kept[key] = memo
    reply = json.loads(server.handle_line(_control(50, 0x101)))
    assert reply["ok"] and server.native is not None


def test_a_read_template_takes_each_mark_once_and_whole() -> None:
    """A read's text becomes pieces around its slots only where each mark stands once, and a
    number mark is not the middle of a longer number (a VM named with the digits of a mark,
    say): otherwise the read is the Python path's."""
    from tphtrap.native import _READ_MARKS, _template

    offset, width, bar, view, mask = _READ_MARKS
    text = f'{{"id":"\\u0000","offset":{offset},"width":{width},"view":{view},"mask":{mask}}}'
    assert _template(text) == (
        (b'{"id":', b',"offset":', b',"width":', b',"view":', b',"mask":', b"}"),
        b"iowvm",
    )
    assert _template(f"{text}\x00\n") == (
        (b'{"id":', b',"offset":', b',"width":', b',"view":', b',"mask":', b"}", b"\n"),
        b"iowvmt",
    )
    assert _template(text.replace('"view"', f'"vm":"{view}","view"')) is None  # twice
    assert _template(f'{{"bar":1{bar}}}') is None  # inside a longer number
    assert _template(f'{{"bar":{bar}0}}') is None
    assert _template('{"id":1}') == ((b'{"id":1}',), b"")  # nothing to fill in
