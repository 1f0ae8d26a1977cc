"""The wire codec's fast paths give exactly what the generic path gives.

``parse_request`` decodes a line with msgspec when it provably means what the reference decoder
(``json`` with the repeated-key check) makes of it, and validates the common access requests
without the generic validators; ``encode`` uses the C encoder directly; ``access_reply`` writes
the per-access reply from pieces. Each must be indistinguishable from the plain implementation:
same Request (fields in the same order), same error code, message, field and id, same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import DECISIONS, IDS, WRITES

from tphtrap import wire
from tphtrap.audit import Auditor
from tphtrap.errors import WireError
from tphtrap.events import ConfigWrite, Decision, DeviceWrite, Verdict

FIELDS = ["id", "op", "vm", "bdf", "offset", "width", "value", "bar", "expect", "config", "x"]
VALUES: list[Any] = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    -1,
    0x150,
    4092,
    4095,
    4096,
    0xFFFF,
    0x0202_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    True,
    False,
    None,
    1.0,
    "",
    "tenant-a",
    "tenant\x00",
    "a" * 65,
    "a" * 129,
    "3b:00.0",
    "0000:3b:00.1",
    " 3b:00.0 ",
    "3b:20.0",
    "zz",
    "0x150",
    "0x",
    [],
    [1],
    {},
    {"verdict": "pass"},
]


def generic(text: str) -> wire.Request | tuple[str, str, str | None, object]:
    """The reference: the plain decoder and the generic validators."""
    try:
        obj = wire._DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return ("bad-json", f"not JSON: {exc.msg} at column {exc.colno}", None, None)
    except wire._DuplicateKey as exc:
        return ("bad-json", f"duplicate key {exc.args[0]!r}", None, None)
    try:
        return wire._validate(obj)
    except WireError as exc:
        return (exc.code, exc.message, exc.field, exc.request_id)


def actual(text: str) -> wire.Request | tuple[str, str, str | None, object]:
    try:
        return wire.parse_request(text)
    except WireError as exc:
        return (exc.code, exc.message, exc.field, exc.request_id)


def same(text: str) -> None:
    want, got = generic(text), actual(text)
    assert got == want, text
    if isinstance(got, wire.Request) and isinstance(want, wire.Request):
        assert list(got.args.items()) == list(want.args.items()), text
        assert type(got.id) is type(want.id)


BASES: list[dict[str, Any]] = [
    {"id": 1, "op": "cfg_write", "vm": "v", "bdf": "3b:00.0", "offset": 4, "width": 2, "value": 6},
    {"id": 1, "op": "cfg_read", "vm": "v", "bdf": "3b:00.0", "offset": 0x150, "width": 4},
    {"id": 1, "op": "msix_write", "vm": "v", "bdf": "0:3b:00.1", "bar": 2, "offset": 0x400C}
    | {"width": 4, "value": 0x0202_0000},
    {
        "id": 1,
        "op": "msix_read",
        "vm": "v",
        "bdf": "0000:3b:00.1",
        "bar": 0,
        "offset": 8,
        "width": 8,
    },
    {"id": "a", "op": "reset", "vm": "v", "bdf": "3b:00.0"},
]

# A well-formed access request, then up to three edits: a field set to an odd value, removed,
# or added; the keys in any order.
mutation = st.tuples(st.sampled_from(FIELDS), st.sampled_from([*VALUES, "<drop>"]))
requests = st.builds(
    lambda base, edits, order: (base, edits, order),
    st.sampled_from(BASES),
    st.lists(mutation, max_size=3),
    st.randoms(use_true_random=False),
)


@settings(max_examples=2000, deadline=None)
@given(requests)
def test_fast_path_matches_generic(case: tuple[dict[str, Any], list[Any], Any]) -> None:
    base, edits, rnd = case
    req = dict(base)
    for key, value in edits:
        if value == "<drop>":
            req.pop(key, None)
        else:
            req[key] = value
    keys = list(req)
    rnd.shuffle(keys)
    same(json.dumps({k: req[k] for k in keys}, separators=(",", ":")))


COLON_VALUES: list[Any] = ["a:b", ":", "0000:3b:00.0", "3b:00.0", "tenant-a", 1, 0x150, 2, True]
ESCAPED_COLON = "\\u003a"  # ":" as an escape (a repeated key can hide behind it)
BLANKS = ["", "", "", " ", "\t", "\r", "\n", "\x0b", "\x0c", "\xa0", "\u2028", "\x00"]


@settings(max_examples=3000, deadline=None)
@given(
    requests,
    st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(COLON_VALUES)), max_size=2),
    st.lists(st.tuples(st.integers(0, 400), st.sampled_from(BLANKS)), max_size=2),
    st.booleans(),
    st.booleans(),
)
def test_typed_path_matches_generic_on_any_text(
    case: tuple[dict[str, Any], list[Any], Any],
    repeats: list[tuple[str, Any]],
    blanks: list[tuple[int, str]],
    ascii_only: bool,
    escape: bool,
) -> None:
    """Lines as text, not as an encoder writes them: keys repeated (with values holding the
    colons the typed path counts), blanks and other characters between tokens, escapes."""
    base, edits, rnd = case
    members = list(base.items())
    for key, value in edits:
        members = [(k, v) for k, v in members if k != key]
        if value != "<drop>":
            members.append((key, value))
    members += repeats
    rnd.shuffle(members)

    def value(v: Any, i: int) -> str:
        out = json.dumps(v, ensure_ascii=ascii_only)
        return out.replace(":", ESCAPED_COLON) if escape and i % 2 else out

    text = "{" + ",".join(f"{json.dumps(k)}:{value(v, i)}" for i, (k, v) in enumerate(members))
    text += "}"
    for at, blank in blanks:
        at %= len(text) + 1
        text = text[:at] + blank + text[at:]
    same(text)
    line = text.encode("utf-8", "surrogatepass")
    want = generic(text)
    try:
        got: object = wire.parse_request(line)
    except WireError as exc:
        got = (exc.code, exc.message, exc.field, exc.request_id)
    assert got == want, line


def test_typed_path_is_taken() -> None:
    for base in BASES:
        line = json.dumps(base, separators=(",", ":"))
        if "expect" not in base:
            assert wire._typed_request(line) == wire._typed_request(line.encode()) is not None
    a = '"vm":"v:w","bdf":"0000:3b:00.0"'
    assert wire._typed_request('{"id":"x:y","op":"reset",' + a + "}") is not None
    for refused in [
        '{"id":1,"op":"reset",' + a + ',"vm":"v"}',  # a repeated key
        '{"id":1,"op":"reset",' + a + ',"id":1}',
        '{"id":1,"op":"reset","op":"reset",' + a + "}",
        '{"id":1,"op":"reset",' + a.replace("v:w", "v\\u003aw") + "}",  # an escape
        '{"id":1,"op":"reset","vm":"x",' + a.replace("v:w", ESCAPED_COLON) + "}",
        '{"id":1,"op":"reset",' + a + ',"expect":null}',
        '{"id":1.0,"op":"reset",' + a + "}",
        '{"id":true,"op":"reset",' + a + "}",
    ]:
        assert wire._typed_request(refused) is None, refused
        same(refused)


def test_fast_path_is_taken() -> None:
    for base in BASES:
        assert wire._FAST[base["op"]](base, base["op"]) is not None
        same(json.dumps(base, separators=(",", ":")))


def test_fast_path_on_well_formed_accesses() -> None:
    a = {"vm": "tenant-a", "bdf": "3b:00.0"}
    for req in [
        {"id": 1, "op": "cfg_write", **a, "offset": 0x150, "width": 4, "value": 0x101},
        {"id": "x", "op": "cfg_read", **a, "offset": 4094, "width": 2},
        {"id": 2, "op": "cfg_read", **a, "offset": 4095, "width": 2},  # past 4096
        {"id": 3, "op": "msix_write", **a, "bar": 2, "offset": 2**64 - 1, "width": 8, "value": 1},
        {"id": 4, "op": "msix_read", **a, "bar": 6, "offset": 0, "width": 4},
        {"id": 5, "op": "reset", **a, "expect": {"verdict": "pass", "writes": []}},
        {"id": 6, "op": "cfg_write", **a, "offset": "0x150", "width": 2, "value": "0x1"},
        {"id": 7, "op": "cfg_write", **a, "offset": 0x154, "width": 2, "value": 0x10000},
    ]:
        same(json.dumps(req, separators=(",", ":")))
        same(json.dumps(req))  # with blanks: the fast decode does not apply


def test_fast_decode_matches_decode() -> None:
    for text in [
        '{"id":1}',
        '{"id":1} ',
        ' {"id":1}',
        '{"id":1}{"id":2}',
        '{"id":1,"id":2}',
        # a repeated key must be refused whatever hides it from the key count
        '{"id":1,"value":1,"value":2}',
        '{"id":1,"e":{"a":1,"a":2}}',
        '{"id":1,"e":{"a":1}}',
        '{"id":1,"vm":"x\\":","vm":2}',
        '{"id":1,"vm":"\\":","id":2}',
        '{"id":1,"vm":":\\"","x":{"id":1,"id":2}}',
        '{"id":1,"value" :1,"value":2}',
        '{"id":1,"value"\t:1,"value":2}',
        '{"id":1,"value"\r:1,"value":2}',
        '{"id":1,"a\\u0022":1,"a\\"":2}',
        '{"id":1,"\\u0069d":2}',
        '{"id":1,}',
        '{"id":[1,2}',
        "{}",
        "{",
        "}",
        '{"a":{"b":{"c":[{}]}}}',
        "[1]",
        '"s"',
        "",
        "{" * 100_000 + "}" * 100_000,
        '{"id":' + "1" * 5000 + "}",  # past Python's digit limit for int()
        '{"id":' + "1" * 400 + "}",
        '{"id":' + "[" * 63 + "]" * 63 + "}",  # the deepest the fast decoder takes
        '{"id":' + "[" * 64 + "]" * 64 + "}",
        '{"id":NaN}',
        '{"id":Infinity}',
        '{"id":1e400}',
        '{"id":-1e400}',
        '{"id":1.5e-400}',
        '{"id":2.2250738585072011e-308}',
        '{"id":0.30000000000000004}',
        '{"id":-0,"x":-0.0}',
        '{"id":"\\ud800"}',  # a lone surrogate, escaped
        '{"id":"\\ud83d\\ude00"}',
        '{"id":"\\udfff\\ud800"}',
        '{"id":"\ud800"}',  # a lone surrogate in the text itself (not UTF-8 as bytes)
        '{"id":"\x7f\u2028é"}',
        '{"id":"\x01"}',
        '{"id":01}',
        '{"id":1.}',
        '{"id":.5}',
        '{"id":+1}',
        '{"id":tru}',
        '{"id":1}}',
        '{"id":1}x',
    ]:
        decodes_alike(text)


def _reference(line: bytes | str) -> object:
    """What the reference decoder makes of a line: the object, or its error."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        return wire._DECODER.decode(text)
    except (ValueError, RecursionError, wire._DuplicateKey) as exc:
        return (type(exc), str(exc))


def decodes_alike(text: str) -> None:
    """``_decode_plain`` gives what ``_DECODER.decode`` gives, or nothing (then the reference
    decides): as text and as the bytes serve reads."""
    for line in (text, text.encode("utf-8", "surrogatepass")):
        want = _reference(line)
        got = wire._decode_plain(line)
        if got is None:
            continue
        assert got == want, line[:200]
        assert type(got) is dict and type(want) is dict
        assert list(got) == list(want)
        assert [type(v) for v in got.values()] == [type(v) for v in want.values()]


# Keys as written on the line: few names (so they repeat, at any depth), some spelled with
# escapes ("\u0061" is "a") or holding the ``":`` the key count looks for.
KEY_TEXTS = ['"a"', '"b"', '"id"', '"\\u0061"', '"a\\":"', '"\\":"', '""']
SCALARS = st.sampled_from(
    ["1", "-0", "1e3", "true", "null", '""', '"x"', '":"', '"\\":"', '"a\\":1,\\"a"', "[]", "{}"]
)


def _object(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in members) + "}"


JSON_TEXTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(st.tuples(st.sampled_from(KEY_TEXTS), inner), max_size=4).map(_object),
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
    ),
    max_leaves=12,
)


@settings(max_examples=1500)
@given(
    members=st.lists(st.tuples(st.sampled_from(KEY_TEXTS), JSON_TEXTS), max_size=5),
    blank=st.sampled_from(["", "", "", " ", "\t", "\r", "\n"]),
    at=st.integers(0, 200),
)
def test_fast_decode_matches_decode_on_any_object(
    members: list[tuple[str, str]], blank: str, at: int
) -> None:
    """Objects nested in any way, with keys repeated at any depth or spelled differently, and
    strings holding what the key count looks for (a blank inserted somewhere, sometimes)."""
    text = _object(members)
    at %= len(text) + 1
    decodes_alike(text[:at] + blank + text[at:])


def test_deep_lines_take_the_reference_path() -> None:
    """How deep a decoder may nest depends on the stack it is called from: the fast decoder
    takes no line with more than 64 brackets, so only the reference ever meets that limit."""
    assert wire._decode_plain('{"id":' + "[" * 63 + "]" * 63 + "}") is not None
    assert wire._decode_plain('{"id":' + "[" * 64 + "]" * 64 + "}") is None
    assert wire._decode_plain('{"id":' + "{" * 64 + "}" * 64 + "}") is None


# Any JSON value as a client's encoder could write it: numbers of any size and precision,
# strings of any code point (surrogates too), escaped or raw.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**200), 2**200)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=1500)
@given(
    st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=6),
    st.booleans(),
    st.binary(max_size=3),
    st.integers(0, 400),
)
def test_fast_decode_matches_decode_on_any_value(
    obj: dict[str, Any], ascii_only: bool, junk: bytes, at: int
) -> None:
    """The values a real encoder writes decode alike, and so do the same lines with a few
    arbitrary bytes inserted somewhere (invalid UTF-8, broken escapes, stray brackets)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only)
    decodes_alike(text)
    line = text.encode("utf-8", "surrogatepass")
    at %= len(line) + 1
    broken = line[:at] + junk + line[at:]
    want = _reference(broken)
    got = wire._decode_plain(broken)
    assert got is None or (got == want and list(got) == list(want)), broken[:200]  # type: ignore[call-overload]


def test_encode_matches_json_dumps() -> None:
    for obj in [
        {"id": 1, "ok": True},
        {"id": "é\u2028\x00", "ok": False, "n": [1, 2.5, None, 2**70], "e": {}, "l": []},
        {"id": None, "decision": {"verdict": "pass", "writes": [{"value": 2**64 - 1}]}},
    ]:
        want = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        assert wire.encode(obj) == want


# --- the access reply, written directly -------------------------------------------------------
# (strategies: tests/strategies.py)


@settings(max_examples=400)
@given(IDS, DECISIONS)
def test_access_reply_is_the_generic_reply(rid: int | str, d: Decision) -> None:
    assert wire.access_reply(rid, d) == wire.reply(rid, decision=wire.decision_wire(d))
    assert wire.expand_runs(wire.decision_wire(d)) == wire.decision_json(d)
    assert wire.decision_text(d) == json.dumps(
        wire.decision_wire(d), separators=(",", ":"), ensure_ascii=True
    )


# --- many writes: runs, and the text the audit line and the reply share ---------------------
def reference_groups(writes: Sequence[DeviceWrite]) -> list[tuple[DeviceWrite, int, int]]:
    """``_write_groups`` as it is specified, write by write: from each write, a run of the
    writes that follow with its value, space, BAR and width at the stride of the first two
    (positive), as long as they go on."""
    out: list[tuple[DeviceWrite, int, int]] = []
    i = 0
    while i < len(writes):
        w, j, stride = writes[i], i + 1, 0
        if j < len(writes) and same_but_offset(w, writes[j]) and writes[j].offset > w.offset:
            stride = writes[j].offset - w.offset
            while (
                j < len(writes)
                and same_but_offset(w, writes[j])
                and writes[j].offset - writes[j - 1].offset == stride
            ):
                j += 1
        out.append((w, j - i, stride))
        i = j
    return out


def same_but_offset(a: DeviceWrite, b: DeviceWrite) -> bool:
    return (a.value, a.width, a.space, a.bar) == (b.value, b.width, b.space, b.bar)


# Few values, spaces, BARs and widths, offsets on a few strides: runs, broken runs, lone writes.
RUNNY_WRITES = st.lists(
    st.builds(
        DeviceWrite,
        space=st.sampled_from(["config", "bar", "bar"]),
        offset=st.integers(0, 6).map(lambda k: 0x4000 + 4 * k),
        width=st.sampled_from([4, 4, 2]),
        value=st.sampled_from([0, 0x1_0000, 0x1_0001]),
        bar=st.sampled_from([2, 2, None]),
    ),
    max_size=40,
)


@st.composite
def strided(draw: st.DrawFn) -> list[DeviceWrite]:
    """Runs of a table re-written (offsets on a stride), with breaks."""
    out: list[DeviceWrite] = []
    offset = draw(st.integers(0, 64))
    for _ in range(draw(st.integers(0, 6))):
        stride = draw(st.sampled_from([0, 4, 16, 16, -16]))
        value = draw(st.sampled_from([0, 1, 0x1_0000]))
        width = draw(st.sampled_from([4, 4, 2]))
        for _ in range(draw(st.integers(1, 12))):
            out.append(DeviceWrite("bar", offset, width, value, 4))
            offset = max(0, offset + stride)
    return out


@settings(max_examples=400)
@given(st.one_of(RUNNY_WRITES, strided()))
def test_write_groups_are_the_runs_write_by_write(writes: list[DeviceWrite]) -> None:
    assert wire._write_groups(writes) == reference_groups(writes)
    assert wire._write_groups(tuple(writes)) == reference_groups(writes)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.one_of(RUNNY_WRITES, strided(), st.lists(WRITES, max_size=60)), rid=IDS)
def test_a_decision_of_many_writes_is_written_as_the_generic_path_writes_it(
    monkeypatch: pytest.MonkeyPatch, writes: list[DeviceWrite], rid: int | str
) -> None:
    """The audit line, then the reply, of one decision (the reply may take the writes' text
    the audit line made), against the processor chain and the JSON encoder."""
    monkeypatch.setattr("tphtrap.audit._UtcClock.now", lambda self: "2026-11-29T00:00:00.000001Z")
    d = Decision(Verdict.REWRITE, "entries-corrected", "text", tuple(writes), rule="r")
    access = ConfigWrite("vm", "0000:3b:00.0", 0x150, 4, 0x301)
    fast, slow = io.StringIO(), io.StringIO()
    Auditor(fast).decided(access, d, {"id": rid})
    Auditor(slow).decided_slow(access, d, {"id": rid})
    assert fast.getvalue() == slow.getvalue()
    assert wire.access_reply(rid, d) == wire.reply(rid, decision=wire.decision_wire(d))
    assert wire.writes_text(d.writes) == ",".join(wire.write_text(w) for w in writes)
