"""Fuzzing every reader of untrusted input: only the project's typed errors, never a hang.

Targets: the protocol decoder (``wire.parse_request``) and the whole request handler
(``Server.handle_line``), the native and QEMU trace readers, the config-space loaders, the
policy loader, and the libvirt domain and steering-tags readers of ``policy init``. Each input
runs under a time limit (``fuzzlib.LIMIT``). Inputs are both arbitrary and structure-aware:
valid requests, traces, dumps, policies and domain XML mutated field by field, token by token
or byte by byte.

``make test`` runs a short campaign; ``make fuzz`` (``TPHTRAP_FUZZ=long``) a long one. The
minimized inputs that found bugs are kept in ``fixtures/hostile/`` (see its README), which
``tests/test_hostile.py`` replays on every run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzzlib import (
    ATTACHED,
    DEVICES,
    PARSE_ERROR_CODES,
    POLICY,
    POLICY_PATH,
    REPO,
    Obj,
    Raw,
    check_audit,
    check_reply,
    fresh_server,
    serve_lines,
    time_limit,
    to_json,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy

from tphtrap.device import (
    ConfigSpace,
    load_device,
    normalize_bdf,
    parse_hex_config,
    parse_lspci,
)
from tphtrap.errors import DeviceError, PolicyError, Problem, TraceError, WireError
from tphtrap.libvirt import DomainError, parse_domain, parse_libvirt_cpuset
from tphtrap.policy import Policy
from tphtrap.policyfile import RULES, check_policy_text, load_policy_text, read_policy_text
from tphtrap.policyread import read_steering_tags
from tphtrap.qemu_trace import QemuTraceReader, parse_line
from tphtrap.replay import NotJudged, Replayer
from tphtrap.spec import StLocation
from tphtrap.synth import ExtCapSpec, MsixSpec, TphSpec, build_config
from tphtrap.wire import MAX_ID_LEN, MAX_LINE, MAX_NAME_LEN, OPS, Request, parse_request

LONG = os.environ.get("TPHTRAP_FUZZ") == "long"


def fuzz(short: int, long: int) -> Callable[[Any], Any]:
    """Hypothesis settings: ``short`` examples in ``make test``, ``long`` in ``make fuzz``.

    The time limit is ours (``time_limit``), so Hypothesis' own deadline is off; the health
    checks about slow or large inputs are off because slow and large inputs are the point.
    """
    return settings(
        max_examples=long if LONG else short,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# =============================================================================================
# JSON values and protocol requests
# =============================================================================================
EDGE_INTS = [
    0,
    1,
    -1,
    2,
    3,
    4,
    5,
    6,
    8,
    16,
    0xFF,
    0x100,
    0xFFFF,
    0x10000,
    4095,
    4096,
    0xFFFFFFFF,
    1 << 32,
    (1 << 53) + 1,
    (1 << 63) - 1,
    1 << 63,
    -(1 << 63),
    -(1 << 63) - 1,
    (1 << 64) - 1,
    1 << 64,
    10**30,
]
# Tokens json.dumps never writes: non-standard constants, numbers beyond every limit, near-JSON.
RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "-0",
    "0.0",
    "1.5",
    "1E2",
    "4.0e3",
    "9" * 400,
    "-" + "9" * 30,
    "9" * 4301,
    "1" + "0" * 5000,
    "0x10",
    "01",
    "+1",
    ".5",
    "1e",
    "tru",
    "nul",
    "undefined",
    '"\\ud800"',
    '"\\u0000"',
    '"\\udfff\\ud800"',
    '"a\\u0000b"',
    "'single'",
    "[",
    "{",
    "}",
    "",
]

scalars: SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(RAW_TOKENS).map(Raw),
)
json_values: SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(st.text(max_size=8), inner), max_size=4).map(Obj),
    ),
    max_leaves=12,
)


def hex_string(hi: int) -> SearchStrategy[str]:
    """A valid ``"0x..."`` string for a value in 0..hi (any case, leading zeros)."""
    return st.tuples(
        st.integers(0, hi), st.sampled_from(["0x", "0X"]), st.booleans(), st.integers(0, 3)
    ).map(lambda t: t[1] + "0" * t[3] + (f"{t[0]:X}" if t[2] else f"{t[0]:x}"))


# TPH registers of the attached fixtures (capability at 0x148: header, cap, control, table) and
# the MSI-X table of nic-st-in-msix (BAR 2 at 0x4000): where the engine has work to do.
TPH_OFFSETS = [0x148, 0x14C, 0x150, 0x151, 0x152, 0x154, 0x155, 0x156, 0x162, 0x164, 0x166]
MSIX_OFFSETS = [0x4000 + 16 * i + o for i in (0, 1, 31, 32) for o in (0, 4, 8, 12, 14, 15)]
VMS = ["tenant-a", "tenant-b", "ghost", "tenant-a ", "TENANT-A"]
BDFS = ["0000:3b:00.0", "3b:00.0", "0000:3b:00.1", "3b:00.1", "0001:3b:00.0", "00:1f.7"]
BAD_BDFS = ["3b:20.0", "3b:00.8", "0000:3b:00", "g0:00.0", "0000:3b:00.0\n", "", " 3b:00.0 "]
DUMP_PATHS = [str(p) for _, _, p in ATTACHED] + [
    str(DEVICES / "ds-only.lspci"),
    str(DEVICES / "multi.lspci"),
    str(DEVICES / "nic-st-in-cap.hex"),
    str(DEVICES / "sysfs" / "0000:3b:00.0"),
    str(DEVICES / "bad" / "ext-cap-loop.lspci"),
    str(DEVICES / "bad" / "wrong-size.bin"),
    str(REPO / "no-such-file"),
    str(REPO),
    "",
    "/",
    "fixtures/\x00devices",
    "\ud800",
]
POLICY_PATHS = [
    str(POLICY_PATH),
    str(REPO / "policies" / "strict-baseline.yaml"),
    str(REPO / "fixtures" / "policies" / "bad" / "alias.yaml"),
    str(REPO / "no-such-policy.yaml"),
    str(REPO),
    "",
    "a\x00b",
    "\udcff",
]


@functools.cache
def nic_hex() -> str:
    return load_device(ATTACHED[0][2]).data.hex()


def _field(op: str, name: str) -> SearchStrategy[Any]:
    cfg = op.startswith("cfg_")
    if name == "vm":
        return st.one_of(st.sampled_from(VMS), st.text(max_size=MAX_NAME_LEN + 2))
    if name in ("bdf", "source_bdf"):
        return st.one_of(st.sampled_from(BDFS), st.sampled_from(BAD_BDFS), st.text(max_size=14))
    if name == "offset":
        hi = 4095 if cfg else (1 << 64) - 1
        return st.one_of(
            st.sampled_from(TPH_OFFSETS if cfg else MSIX_OFFSETS),
            st.integers(0, hi),
            hex_string(hi),
            st.sampled_from(EDGE_INTS),
        )
    if name == "width":
        return st.one_of(st.sampled_from([1, 2, 4] if cfg else [1, 2, 4, 8]), st.integers(-1, 9))
    if name == "value":
        hi = 0xFFFFFFFF if cfg else (1 << 64) - 1
        return st.one_of(
            st.sampled_from([0, 1, 2, 0x101, 0x102, 0x301, 0x0101, 0x0202, 0x01010000]),
            st.integers(0, hi),
            hex_string(hi),
            st.sampled_from(EDGE_INTS),
        )
    if name == "bar":
        return st.one_of(st.just(2), st.integers(-1, 7))
    if name == "versions":
        return st.one_of(st.just([1]), st.lists(st.integers(-2, 3), max_size=17))
    if name == "client":
        return st.text(max_size=130)
    if name == "config":
        return st.one_of(
            st.builds(nic_hex),
            st.text(alphabet="0123456789abcdefABCDEFx \n\t", max_size=600),
        )
    if name == "path":
        return st.sampled_from(DUMP_PATHS)
    if name == "policy":
        return st.sampled_from(POLICY_PATHS)
    if name in ("replace", "rciep", "tags_cleared"):
        return st.one_of(st.booleans(), json_values)
    if name == "backend":
        return st.one_of(st.sampled_from(["writes", "host", "kernel"]), json_values)
    if name == "completer":
        return st.one_of(st.sampled_from([0, 1, 3]), st.integers(-1, 4), json_values)
    if name == "allocated":
        return st.one_of(st.lists(st.integers(-1, 2048), max_size=8), json_values)
    if name == "failed":
        return st.one_of(
            st.fixed_dictionaries(
                {"op": st.sampled_from(["st_set", "tph_enable", "tph_disable", "x"])},
                optional={"index": st.integers(-1, 2048)},
            ),
            json_values,
        )
    if name == "errno":
        return st.one_of(st.sampled_from([-22, -6, -16]), st.integers(-5000, 1), json_values)
    return json_values


request_ids: SearchStrategy[Any] = st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.text(min_size=1, max_size=MAX_ID_LEN),
    st.sampled_from(EDGE_INTS),
)


@st.composite
def requests(draw: DrawFn, ops: list[str] | None = None) -> Obj:
    """A request as (key, value) pairs, usually valid, biased to the attached devices."""
    op = draw(st.sampled_from(ops or sorted(OPS)))
    required, optional = OPS[op]
    pairs: list[tuple[str, Any]] = [("id", draw(request_ids)), ("op", op)]
    for name in required:
        pairs.append((name, draw(_field(op, name))))
    if op == "attach":
        one = draw(st.sampled_from(["config", "path"]))
        pairs.append((one, draw(_field(op, one))))
        if draw(st.booleans()):
            pairs.append(("source_bdf", draw(_field(op, "source_bdf"))))
        if draw(st.booleans()):
            pairs.append(("replace", draw(_field(op, "replace"))))
        if draw(st.booleans()):
            pairs.append(("backend", draw(_field(op, "backend"))))
            pairs.append(("completer", draw(_field(op, "completer"))))
    else:
        for name in optional:
            if draw(st.booleans()):
                pairs.append((name, draw(_field(op, name))))
    if draw(st.integers(0, 9)) == 0:
        pairs.append(("expect", draw(json_values)))
    order = draw(st.permutations(range(len(pairs))))
    return Obj(pairs[i] for i in order)


FIELD_NAMES = sorted({f for req, opt in OPS.values() for f in (*req, *opt)} | {"id", "op"})


@st.composite
def mutated_requests(draw: DrawFn, ops: list[str] | None = None) -> Obj | Any:
    """A request with 0-3 structural mutations: a field set to any JSON value, removed, added,
    repeated or renamed, the object nested or replaced."""
    pairs = list(draw(requests(ops)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "drop", "add", "dup", "rename", "nest", "whole"]))
        i = draw(st.integers(0, max(0, len(pairs) - 1)))
        if kind == "set" and pairs:
            pairs[i] = (pairs[i][0], draw(json_values))
        elif kind == "drop" and pairs:
            del pairs[i]
        elif kind == "add":
            name = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)))
            pairs.insert(i, (name, draw(json_values)))
        elif kind == "dup" and pairs:
            value = pairs[i][1] if draw(st.booleans()) else draw(json_values)
            pairs.insert(draw(st.integers(0, len(pairs))), (pairs[i][0], value))
        elif kind == "rename" and pairs:
            pairs[i] = (pairs[i][0].upper() + draw(st.sampled_from(["", " ", "\x00"])), pairs[i][1])
        elif kind == "nest":
            return draw(st.sampled_from([[Obj(pairs)], Obj([("request", Obj(pairs))])]))
        elif kind == "whole":
            return draw(json_values)
    return Obj(pairs)


@st.composite
def request_lines(draw: DrawFn, ops: list[str] | None = None) -> bytes:
    """A protocol line: a (mutated) request as JSON text, then 0-2 byte-level edits."""
    value = draw(mutated_requests(ops))
    ascii_only = draw(st.booleans())
    text = to_json(value, ascii_only=ascii_only)
    if draw(st.booleans()):
        text = text.replace(",", draw(st.sampled_from([", ", " ,", ",\t", ",\r", ",\n "])))
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8
    for _ in range(draw(st.integers(0, 2))):
        data = draw(byte_edits(data))
    return data


@st.composite
def byte_edits(draw: DrawFn, data: bytes) -> bytes:
    pos = draw(st.integers(0, len(data)))
    kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "prefix", "suffix"]))
    junk = draw(
        st.one_of(
            st.binary(min_size=1, max_size=4),
            st.sampled_from(
                [b"\x00", b"\xef\xbb\xbf", b"\r", b"\n", b"\xff", b"\xc3", b"\xed\xa0\x80", b" "]
            ),
        )
    )
    if kind == "flip" and pos < len(data):
        bit = draw(st.integers(0, 7))
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]
    if kind == "insert":
        return data[:pos] + junk + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + draw(st.integers(1, 8)) :]
    if kind == "truncate":
        return data[:pos]
    if kind == "prefix":
        return junk + data
    return data + junk


# --- what a valid request must look like (docs/protocol.md section 5) ----------------------------
_BDF_NORMAL = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]\Z")
_HEX_VALUE = re.compile(r"0[xX][0-9a-fA-F]+\Z")


def check_request(req: Request) -> None:
    """Every field of a request ``parse_request`` accepted is within its documented range."""
    assert isinstance(req, Request)
    if isinstance(req.id, int):
        assert not isinstance(req.id, bool) and -(1 << 63) <= req.id < 1 << 64
    else:
        assert isinstance(req.id, str) and 1 <= len(req.id) <= MAX_ID_LEN
    required, optional = OPS[req.op]
    assert set(required) <= set(req.args) <= {*required, *optional, "expect"}
    a = req.args
    if "vm" in a:
        vm = a["vm"]
        assert isinstance(vm, str) and 1 <= len(vm) <= MAX_NAME_LEN and vm.isprintable()
    for key in ("bdf", "source_bdf"):
        if key in a:
            assert _BDF_NORMAL.match(a[key]), a[key]
    if "width" in a:
        assert a["width"] in ((1, 2, 4) if req.op.startswith("cfg_") else (1, 2, 4, 8))
    for key in ("offset", "value", "bar"):
        if key in a:
            assert type(a[key]) is int and a[key] >= 0, a
    if req.op.startswith("cfg_"):
        assert a["offset"] + a["width"] <= 4096
    if req.op.startswith("msix_"):
        assert a["offset"] < 1 << 64 and 0 <= a["bar"] <= 5
    if "value" in a:
        assert a["value"] < 1 << (8 * a["width"])
    if req.op == "hello":
        v = a["versions"]
        assert isinstance(v, list) and 1 <= len(v) <= 16
        assert all(type(x) is int for x in v)
    if req.op == "attach":
        assert ("config" in a) != ("path" in a)
    for key, limit in (("client", 128), ("config", MAX_LINE), ("path", 4096), ("policy", 4096)):
        if key in a:
            assert isinstance(a[key], str) and len(a[key]) <= limit


def parse_checked(line: bytes | str) -> Request | None:
    """``parse_request`` under the time limit: a valid request, or None after a WireError."""
    with time_limit():
        try:
            req = parse_request(line)
        except WireError as exc:
            assert exc.code in PARSE_ERROR_CODES, exc.code
            assert exc.request_id is None or exc.code not in ("bad-json", "bad-utf8")
            return None
    check_request(req)
    return req


# =============================================================================================
# (a) the protocol decoder
# =============================================================================================
@fuzz(1_000, 50_000)
@given(st.binary(max_size=300))
def test_wire_arbitrary_bytes(data: bytes) -> None:
    parse_checked(data)


@fuzz(600, 25_000)
@given(request_lines())
def test_wire_mutated_requests(line: bytes) -> None:
    req = parse_checked(line)
    if req is not None:
        # The str form (replay reads text) decides the same way.
        again = parse_request(line.decode("utf-8"))
        assert again == req


@fuzz(200, 10_000)
@given(requests())
def test_wire_valid_requests_round_trip(pairs: Obj) -> None:
    """Requests built within the documented ranges are accepted and read back as written."""
    obj = dict(pairs)
    line = to_json(pairs).encode()
    fields = {k: v for k, v in obj.items() if k not in ("id", "op", "expect")}
    valid = _all_valid(obj, fields)
    req = parse_checked(line)
    if not valid:
        return
    assert req is not None, line
    assert req.id == obj["id"] and req.op == obj["op"]
    for key, value in fields.items():
        if key in ("offset", "value") and isinstance(value, str):
            assert req.args[key] == int(value, 16)
        elif key == "allocated":
            assert req.args[key] == frozenset(value)
        elif key == "failed":
            assert req.args[key].op == value["op"]
        elif key not in ("bdf", "source_bdf"):
            assert req.args[key] == value, key


def _plain_json(value: Any) -> bool:
    """``value`` reads back as JSON: no repeated key, no number beyond ``int``'s digit limit."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("repeated key")
        return dict(pairs)

    try:
        json.loads(to_json(value), object_pairs_hook=unique)
    except ValueError:
        return False
    return True


def _all_valid(obj: dict[str, Any], fields: dict[str, Any]) -> bool:
    """A conservative oracle: True only when every field is plainly within its range."""
    op = obj["op"]
    rid = obj["id"]
    if isinstance(rid, int) and not -(1 << 63) <= rid < 1 << 64:
        return False
    if any(isinstance(v, Raw) for v in fields.values()):
        return False
    if "expect" in obj and not _plain_json(obj["expect"]):
        return False
    if fields.get("vm") not in (None, *VMS[:3]) or fields.get("bdf") not in (None, *BDFS):
        return False
    if fields.get("source_bdf") not in (None, *BDFS):
        return False
    if "replace" in fields and not isinstance(fields["replace"], bool):
        return False
    cfg = op.startswith("cfg_")
    width = fields.get("width")
    if width is not None and width not in ((1, 2, 4) if cfg else (1, 2, 4, 8)):
        return False
    for key in ("offset", "value"):
        v = fields.get(key)
        if isinstance(v, str):
            v = int(v, 16)
        if v is not None and (isinstance(v, bool) or v < 0):
            return False
        if key == "value" and v is not None and width is not None and v >> (8 * width):
            return False
        if key == "offset" and v is not None:
            if cfg and width is not None and v + width > 4096:
                return False
            if v >= 1 << 64 or (width is not None and v + width > 1 << 64):
                return False  # (a BAR access past 2^64)
    bar = fields.get("bar")
    if bar is not None and not 0 <= bar <= 5:
        return False
    versions = fields.get("versions")
    if versions is not None and (not versions or len(versions) > 16):
        return False
    if not _host_fields_valid(op, fields):
        return False
    return len(fields.get("client", "")) <= 128


def _host_fields_valid(op: str, fields: dict[str, Any]) -> bool:
    """The fields of the host backend (attach's backend facts, vectors, host_result)."""
    for flag in ("rciep", "tags_cleared"):
        if flag in fields and not isinstance(fields[flag], bool):
            return False
    if op == "attach":
        host = fields.get("backend", "writes")
        if host not in ("writes", "host"):
            return False
        completer = fields.get("completer")
        if "completer" in fields and (type(completer) is not int or completer not in (0, 1, 3)):
            return False
        rciep = fields.get("rciep", False)
        given = "completer" in fields or "rciep" in fields
        if host == "writes" and given:
            return False
        if host == "host" and ("completer" in fields) == bool(rciep):
            return False
    # (a field given as null is a field of the wrong type, not an absent one)
    allocated = fields.get("allocated")
    if "allocated" in fields and not (
        isinstance(allocated, list) and all(type(x) is int and 0 <= x < 2048 for x in allocated)
    ):
        return False
    failed = fields.get("failed")
    if "failed" in fields:
        if not isinstance(failed, dict) or failed.get("op") not in (
            "st_set",
            "tph_enable",
            "tph_disable",
        ):
            return False
        index = failed.get("index", 0)
        if type(index) is not int or not 0 <= index < 2048:
            return False
        if failed["op"] == "st_set" and "index" not in failed:
            return False
    errno = fields.get("errno")
    return "errno" not in fields or (type(errno) is int and -4095 <= errno <= -1)


@fuzz(300, 20_000)
@given(
    st.one_of(
        st.text(alphabet="0123456789abcdefABCDEFxX_ +-\n\t\u0660\u0661\uff10", max_size=12),
        st.text(alphabet="0123456789abcdefABCDEFxX_ +-\n\t\u0660\u0661\uff10", max_size=10).map(
            lambda t: "0x" + t
        ),
        hex_string(0xFFFFFFFF),
        st.text(max_size=8),
    )
)
def test_wire_hex_strings_mean_what_strtoull_reads(text: str) -> None:
    """A ``"0x..."`` value is accepted only when it is plain hex digits: what C's ``strtoull``
    reads from it, a hypervisor written in C reads from it. No underscores, no whitespace, no
    non-ASCII digits (Python's ``int`` accepts all three)."""
    line = json.dumps(
        {"id": 1, "op": "cfg_write", "vm": "v", "bdf": "3b:00.0", "offset": 0, "width": 4}
        | {"value": text}
    )
    req = parse_checked(line.encode())
    if _HEX_VALUE.match(text) and int(text, 16) <= 0xFFFFFFFF:
        assert req is not None and req.args["value"] == int(text, 16)
    else:
        assert req is None


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"[" * 100_000, id="10^5 arrays"),
        pytest.param(b'{"a":' * 30_000, id="3*10^4 objects"),
        pytest.param(
            b'{"id":1,"op":"stats","expect":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            id="deep expect",
        ),
        pytest.param(b'{"id":' + b"9" * 5000 + b',"op":"stats"}', id="5000-digit id"),
        pytest.param(b"a" * 10_000_000, id="10 MB line"),
    ],
)
def test_wire_extremes(line: bytes) -> None:
    """Deep nesting (a RecursionError inside ``json``) and huge numbers are WireErrors."""
    assert parse_checked(line) is None
    assert parse_checked(line.decode("utf-8")) is None


# =============================================================================================
# (b) the request handler, end to end in-process
# =============================================================================================
ACCESS = ["cfg_write", "cfg_read", "msix_write", "msix_read", "reset"]

lines_for_server: SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=200),
    request_lines(),
    request_lines(ACCESS),
    requests(ACCESS).map(lambda r: to_json(r).encode()),
)


@fuzz(150, 6_000)
@given(st.lists(lines_for_server, min_size=1, max_size=10))
def test_server_answers_every_line(lines: list[bytes]) -> None:
    """One line of JSON per line, with ``id`` and ``ok``; every error drops the access."""
    serve_lines(lines)


@fuzz(150, 6_000)
@given(
    st.lists(
        st.one_of(requests(ACCESS), requests(["attach", "detach", "stats"])),
        min_size=1,
        max_size=25,
    )
)
def test_server_valid_sequences(reqs: list[Obj]) -> None:
    """Long runs of well-formed requests on the attached devices: never an internal error."""
    server, audit = fresh_server()
    for pairs in reqs:
        line = to_json(pairs).encode()
        with time_limit():
            reply = server.handle_line(line)
        check_reply(line, reply)
    stats = json.loads(server.handle_line(b'{"id":0,"op":"stats"}'))
    assert stats["ok"] and "internal-error" not in stats["errors"], stats
    assert not any(d["frozen"] for d in stats["devices"]), stats
    check_audit(audit)


# =============================================================================================
# (c) trace readers
# =============================================================================================
TRACES = REPO / "fixtures" / "traces"
DEMO = [
    line.replace('"path":"fixtures/', f'"path":"{REPO}/fixtures/')
    for line in (TRACES / "demo-session.jsonl").read_text().splitlines()
]


decision_shaped: SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "verdict": st.sampled_from(["pass", "rewrite", "drop", "", "PASS"]),
        "reason": st.sampled_from(["tag-allowed", "attached", "not-tph", "x"]),
        "writes": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "space": st.sampled_from(["config", "bar", "x"]),
                    "bar": st.integers(0, 5),
                    "offset": st.integers(0, 1 << 64),
                    "width": st.sampled_from([1, 2, 4, 8]),
                    "value": st.integers(0, 1 << 64),
                },
            ),
            max_size=3,
        ),
        "detail": st.text(max_size=10),
    },
)


@st.composite
def native_lines(draw: DrawFn, any_expect: bool) -> str:
    """A line of a recorded session, mutated: fields, its ``expect``, or its bytes.

    With ``any_expect`` the ``expect`` object takes any JSON value; otherwise it keeps the
    shape of a decision (see ``test_hostile``: replay --expect cannot yet describe a
    mismatch against an ``expect`` of another shape).
    """
    base = draw(st.sampled_from(DEMO))
    kind = draw(st.sampled_from(["as-is", "fields", "expect", "bytes", "request"]))
    if kind == "fields":
        pairs = list(json.loads(base).items())
        i = draw(st.integers(0, len(pairs) - 1))
        if any_expect or pairs[i][0] != "expect":
            pairs[i] = (pairs[i][0], draw(json_values))
        return to_json(Obj(pairs))
    if kind == "expect":
        obj = json.loads(base)
        obj["expect"] = draw(json_values if any_expect else decision_shaped)
        return to_json(Obj(obj.items()))
    if kind == "bytes":
        data = base.encode()
        for _ in range(draw(st.integers(1, 3))):
            data = draw(byte_edits(data))
        return data.decode("utf-8", "replace")
    if kind == "request":
        ops = None if any_expect else sorted(set(OPS) - set(ACCESS))
        return draw(request_lines(ops)).decode("utf-8", "replace")
    return base


@fuzz(120, 5_000)
@given(
    st.booleans().flatmap(
        lambda expect: st.tuples(
            st.just(expect), st.lists(native_lines(not expect), min_size=1, max_size=20)
        )
    ),
    st.booleans(),
)
def test_native_trace_reader(case: tuple[bool, list[str]], strict: bool) -> None:
    """``Replayer.native``: malformed lines are counted (or, strict, one TraceError)."""
    expect, lines = case
    rp = Replayer(POLICY, strict=strict, check_expect=expect)
    with time_limit():
        try:
            records = list(rp.native("fuzz.jsonl", lines))
        except TraceError as exc:
            assert strict, exc
            assert exc.where.startswith("fuzz.jsonl:")
            return
    s = rp.summary
    malformed = s.buckets["malformed"].count
    assert s.records == len(records)
    assert malformed <= len(lines) and (not strict or malformed == 0)
    assert s.lines == len(lines) == s.accounted  # every line in exactly one bucket
    assert s.mismatches <= s.records
    for rec in records:
        assert rec.decision.reason != "internal-error", rec


QEMU_FILES = sorted(p for p in TRACES.glob("qemu-*.log"))
QEMU_LINES = [line for p in QEMU_FILES for line in p.read_text("utf-8", "replace").splitlines()]
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+")
QEMU_JUNK = [
    *"0123456789abcdefx ()@:,.+-<>='\t\x00\ufffd",
    "0x",
    "ffffffffffffffffffff",
    "99999999999",
    " name '",
    "region",
    "len=0x",
    "(nil)",
    "@",
    "1@1.5:",
    "2024-05-01T10:00:00.000001Z ",
    "\u0663",
]


@st.composite
def qemu_line_edits(draw: DrawFn, line: str) -> str:
    kind = draw(st.sampled_from(["char", "insert", "delete", "truncate", "number", "dup-field"]))
    pos = draw(st.integers(0, len(line)))
    if kind == "char" and pos < len(line):
        return line[:pos] + draw(st.sampled_from(QEMU_JUNK)) + line[pos + 1 :]
    if kind == "insert":
        return line[:pos] + draw(st.sampled_from(QEMU_JUNK)) + line[pos:]
    if kind == "delete":
        return line[:pos] + line[pos + draw(st.integers(1, 6)) :]
    if kind == "truncate":
        return line[:pos]
    if kind == "number":
        numbers = list(_NUMBER.finditer(line))
        if numbers:
            m = draw(st.sampled_from(numbers))
            new = draw(
                st.one_of(
                    st.integers(0, (1 << 72) - 1).map(hex),
                    st.integers(0, 10**12).map(str),
                    st.sampled_from(["0x", "-1", "0x-1", "08", "1e3", ""]),
                )
            )
            return line[: m.start()] + new + line[m.end() :]
        return line
    words = line.split(" ")
    i = draw(st.integers(0, len(words) - 1))
    return " ".join([*words[: i + 1], *words[i:]])


@st.composite
def qemu_traces(draw: DrawFn) -> list[str]:
    lines = draw(st.lists(st.sampled_from(QEMU_LINES), min_size=1, max_size=40))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = draw(qemu_line_edits(lines[i]))
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    return [line + draw(st.sampled_from(["", "\n", "\r\n"])) for line in lines]


@functools.cache
def qemu_nic() -> ConfigSpace:
    return ConfigSpace.from_bytes(
        build_config(tph=TphSpec(), msix=MsixSpec(bir=2, table_offset=0x4000, table_size=32)),
        "nic",
        "0000:00:03.0",
    )


@fuzz(300, 8_000)
@given(qemu_traces(), st.booleans(), st.sampled_from(["none", "bound", "overlay"]))
def test_qemu_trace_reader(lines: list[str], strict: bool, devices: str) -> None:
    """``QemuTraceReader``: records in line order, malformed lines counted (or one TraceError)."""
    bound = {"0000:00:03.0": qemu_nic()} if devices == "bound" else {}
    overlays = {"0000:00:03.0": qemu_nic()} if devices == "overlay" else None
    reader = QemuTraceReader(
        lines,
        name="fuzz.log",
        devices=bound,
        vm_of=lambda name: "tenant-a" if name.endswith(".0") else None,
        overlays=overlays,
        strict=strict,
    )
    got = []
    with time_limit():
        try:
            for rec in reader:
                got.append(rec)
        except TraceError as exc:
            assert strict, exc
            assert exc.where.startswith("fuzz.log:")
            line = int(exc.where.rsplit(":", 1)[1])
            assert all(r.lineno < line for r in got), (exc, got)
            return
    numbers = [r.lineno for r in got]
    assert numbers == sorted(numbers), numbers
    assert all(1 <= n <= len(lines) for n in numbers)
    s = reader.stats
    assert s.lines == len(lines) and s.malformed <= len(lines)
    assert strict is False or s.malformed == 0
    assert len(reader.errors) == min(s.malformed, 100)


@fuzz(100, 4_000)
@given(qemu_traces(), st.booleans())
def test_qemu_replay(lines: list[str], strict: bool) -> None:
    """``Replayer.qemu`` end to end: every line in one bucket, every judged access decided;
    strict stops with a TraceError (malformed) or NotJudged (an access it cannot judge)."""
    rp = Replayer(POLICY, strict=strict, vm_of=lambda name: "tenant-a")
    with time_limit():
        try:
            records = list(rp.qemu("fuzz.log", lines))
        except (TraceError, NotJudged) as exc:
            assert strict, exc
            return
    s = rp.summary
    assert s.records == len(records)
    assert s.lines == len(lines) == s.accounted
    for rec in records:
        assert rec.decision.reason != "internal-error", rec


QEMU_EVENTS = [
    "pci_cfg_write",
    "pci_cfg_read",
    "pci_update_mappings_add",
    "pci_update_mappings_del",
    "memory_region_ops_write",
    "memory_region_ops_read",
    "vfio_pci_write_config",
    "vfio_pci_read_config",
    "vfio_region_write",
    "vfio_region_read",
    "vfio_pci_reset",
]
REGEX_ALPHABET = " ()@,:.+-<>='x0123456789abcdefn\t"


@fuzz(500, 20_000)
@given(
    st.sampled_from(["", "1@2.3:", "2024-01-01T00:00:00Z ", "2024-01-01 00:00:00.1+01:00 "]),
    st.sampled_from(QEMU_EVENTS),
    st.one_of(
        st.text(alphabet=REGEX_ALPHABET, max_size=200),
        st.tuples(
            st.text(alphabet=REGEX_ALPHABET, min_size=1, max_size=12), st.integers(1, 400)
        ).map(lambda t: t[0] * t[1]),
    ),
)
def test_qemu_parse_line_backtracking(prefix: str, event: str, rest: str) -> None:
    """Lines built from the characters the format regexes care about, repeated up to the
    event line limit: parsing stays fast (no catastrophic backtracking)."""
    line = f"{prefix}{event} {rest}"[:4200]
    with time_limit():
        try:
            parse_line(line, "x.log:1")
        except TraceError as exc:
            assert exc.where == "x.log:1"


# =============================================================================================
# (d) config-space loaders
# =============================================================================================
LSPCI = sorted(DEVICES.glob("*.lspci")) + sorted((DEVICES / "bad").glob("*.lspci"))
LSPCI_TEXT = {p.name: p.read_text() for p in LSPCI}
DUMP_JUNK = [*"0123456789abcdefABCDEFg :.\t\r\n\x00\x0b\u2028", "00 ", "ff", "0000:"]


@st.composite
def mutated_dumps(draw: DrawFn) -> str:
    text = LSPCI_TEXT[draw(st.sampled_from(sorted(LSPCI_TEXT)))]
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["char", "delete", "dup", "swap", "shuffle", "truncate"]))
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "char" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + draw(st.sampled_from(DUMP_JUNK)) + lines[i][j + 1 :]
        elif kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "shuffle":
            lines = draw(st.permutations(lines))
        elif kind == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
            lines = lines[: i + 1]
    return "\n".join(lines)


def check_config(cfg: ConfigSpace) -> None:
    """What the rest of tphtrap relies on in a decoded config space."""
    assert cfg.size in (64, 256, 4096)
    for cap in cfg.caps:
        assert 0x40 <= cap.offset < cfg.size
        if cap.end is not None and not (cap.kind == "ext" and cap.cap_id == 0x17):
            assert cap.end <= (256 if cap.kind == "std" else 4096), cap
    tph = cfg.tph
    if tph is not None:
        assert tph.offset + 0xC <= cfg.size
        if tph.entries:
            assert tph.table_ok and tph.table_offset + 2 * len(tph.entries) <= cfg.size
            assert len(tph.entries) == tph.table_size <= 64


def loads_dump(text: str) -> list[ConfigSpace] | None:
    with time_limit():
        try:
            devices = parse_lspci(text, "fuzz.lspci")
        except DeviceError as exc:
            assert exc.where.startswith("fuzz.lspci"), exc
            return None
    for cfg in devices:
        check_config(cfg)
    return devices


@fuzz(400, 10_000)
@given(mutated_dumps())
def test_lspci_mutated_dumps(text: str) -> None:
    loads_dump(text)


@fuzz(300, 8_000)
@given(
    st.one_of(
        st.text(alphabet="0123456789abcdefABCDEFxX \n\t\r:g\x00", max_size=700),
        st.builds(nic_hex).flatmap(
            lambda h: st.tuples(
                st.integers(0, len(h)), st.sampled_from(["", "g", " ", "0x", "0"])
            ).map(lambda t: h[: t[0]] + t[1] + h[t[0] :])
        ),
    ),
    st.booleans(),
)
def test_hex_config(text: str, lines: bool) -> None:
    with time_limit():
        try:
            cfg = parse_hex_config(text, "fuzz.hex", lines=lines)
        except DeviceError as exc:
            assert exc.where.startswith("fuzz.hex")
            return
    check_config(cfg)


_CFG_SEEDS = [
    build_config(tph=TphSpec(), msix=MsixSpec()),
    build_config(tph=TphSpec(location=StLocation.MSIX, extended=True), msix=MsixSpec()),
    build_config(tph=TphSpec(table_size=64), tph_at=0xF80),
    build_config(tph=TphSpec(table_size=64), tph_at=0xF70, with_dsn=False),
    build_config(
        tph=TphSpec(),
        extra_ext=[ExtCapSpec(0x300, 0x0B, body=b"\x00\x00\x00\xff"), ExtCapSpec(0x400, 0x0D)],
    ),
    build_config(tph=TphSpec(), size=256),
    build_config(msix=MsixSpec(), size=64),
]
# Bytes that steer the capability walks: status, the list head, standard next pointers and
# lengths, extended headers, the TPH registers, the last dword.
_HOT = [
    *(0x06, 0x34, 0x40, 0x41, 0x42, 0x70, 0x71, 0x72, 0xA0, 0xA1, 0xA2, 0xFC, 0xFD, 0xFE, 0xFF),
    *(0x100, 0x101, 0x102, 0x103, 0x148, 0x14A, 0x14B, 0x14C, 0x14D, 0x14E, 0x150, 0x1F2),
    *(0x1F3, 0xF80, 0xF82, 0xF83, 0xFFC, 0xFFD, 0xFFE, 0xFFF),
]


@st.composite
def config_blobs(draw: DrawFn) -> bytes:
    kind = draw(st.sampled_from(["seed", "random", "chain", "size"]))
    if kind == "random":
        n = draw(st.sampled_from([64, 256, 4096]))
        return draw(st.binary(min_size=n, max_size=n))
    if kind == "size":
        return draw(st.binary(max_size=300)) + bytes(draw(st.sampled_from([0, 4032, 3900])))
    data = bytearray(draw(st.sampled_from(_CFG_SEEDS)))
    if kind == "chain" and len(data) == 4096:
        # A random extended list: headers at random dword offsets, each pointing at the next,
        # the last one pointing anywhere (often back into the list: a loop).
        spots = draw(
            st.lists(
                st.integers(0x40, 0x3FF).map(lambda x: x * 4), min_size=1, max_size=8, unique=True
            )
        )
        last = draw(st.one_of(st.sampled_from(spots), st.integers(0, 0xFFF)))
        for pos, nxt in zip(spots, [*spots[1:], last], strict=True):
            cap_id = draw(st.sampled_from([0x17, 0x17, 0x01, 0x0B, 0x0D, 0x15, 0x23, 0x00, 0xFFFF]))
            header = cap_id | draw(st.integers(0, 15)) << 16 | nxt << 20
            data[pos : pos + 4] = header.to_bytes(4, "little")
            if pos + 8 <= 4096:
                data[pos + 4 : pos + 8] = draw(st.binary(min_size=4, max_size=4))
        head = 0x17 | 1 << 16 | spots[0] << 20
        data[0x100:0x104] = head.to_bytes(4, "little")
    for _ in range(draw(st.integers(0, 8))):
        off = draw(st.one_of(st.sampled_from(_HOT), st.integers(0, len(data) - 1)))
        if off < len(data):
            data[off] = draw(st.integers(0, 255))
    return bytes(data)


@fuzz(500, 20_000)
@given(config_blobs())
def test_config_space_from_bytes(data: bytes) -> None:
    with time_limit():
        try:
            cfg = ConfigSpace.from_bytes(data, "fuzz", None, tuple(range(len(data) // 16)))
        except DeviceError as exc:
            assert exc.where.startswith("fuzz")
            return
    check_config(cfg)


@st.composite
def device_accesses(draw: DrawFn, vm: str, bdf: str) -> bytes:
    """A well-formed access to one device, at the registers that matter."""
    op = draw(st.sampled_from(ACCESS))
    req: dict[str, Any] = {"id": draw(st.integers(0, 999)), "op": op, "vm": vm, "bdf": bdf}
    if op.startswith("cfg_"):
        width = draw(st.sampled_from([1, 2, 4]))
        offset = draw(st.one_of(st.sampled_from(TPH_OFFSETS), st.integers(0, 4095)))
        req |= {"offset": min(offset, 4096 - width), "width": width}
    elif op.startswith("msix_"):
        width = draw(st.sampled_from([1, 2, 4, 8]))
        offset = draw(st.one_of(st.sampled_from(MSIX_OFFSETS), st.integers(0, 0x10000)))
        req |= {"bar": draw(st.integers(0, 5)), "offset": offset, "width": width}
    if op.endswith("_write"):
        req["value"] = draw(
            st.one_of(
                st.sampled_from([0x101, 0x102, 0x301, 1, 2, 0x01010000]),
                st.integers(0, (1 << (8 * req["width"])) - 1),
            )
        ) & ((1 << (8 * req["width"])) - 1)
    return json.dumps(req).encode()


@fuzz(100, 4_000)
@given(
    config_blobs().filter(lambda b: len(b) in (256, 4096)),
    st.lists(device_accesses("tenant-a", "0000:3b:00.0"), max_size=8),
)
def test_attach_any_config_space(data: bytes, accesses: list[bytes]) -> None:
    """A decodable config space of any shape attaches (or is refused as ``bad-config``) and
    every access to it is decided: the engine never fails on a strange device."""
    server, audit = fresh_server()
    server.handle_line(b'{"id":"d","op":"detach","vm":"tenant-a","bdf":"3b:00.0"}')
    attach = json.dumps(
        {"id": "x", "op": "attach", "vm": "tenant-a", "bdf": "3b:00.0", "config": data.hex()}
    ).encode()
    with time_limit():
        reply = check_reply(attach, server.handle_line(attach))
    assert reply["ok"] or reply["error"]["code"] == "bad-config", reply
    for line in accesses:
        with time_limit():
            check_reply(line, server.handle_line(line))
    check_audit(audit)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tphtrap-fuzz-") as tmp:
        yield Path(tmp)


@fuzz(200, 6_000)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.sampled_from([64, 256, 4096, 4095, 4097]).flatmap(
            lambda n: st.binary(min_size=n, max_size=n)
        ),
        config_blobs(),
        mutated_dumps().map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    st.sampled_from(["dump", "config", "0000:3b:00.0/config", "00:1f.7"]),
    st.one_of(st.none(), st.sampled_from(["3b:00.0", "0000:3b:00.1", "zz"])),
)
def test_load_device_files(scratch: Path, blob: bytes, name: str, bdf: str | None) -> None:
    """``load_device`` on any file: one config space or a DeviceError, nothing else."""
    path = scratch / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    with time_limit():
        try:
            cfg = load_device(path, bdf)
        except DeviceError as exc:
            assert str(scratch) in exc.where or exc.where == "", exc
            return
    check_config(cfg)


# =============================================================================================
# (e) the policy loader
# =============================================================================================
POLICY_TEXTS = {
    p.name: p.read_bytes().decode("utf-8", "replace")
    for p in [
        *sorted((REPO / "policies").glob("*.yaml")),
        *sorted((REPO / "fixtures" / "policies" / "bad").glob("*.yaml")),
    ]
}
_TOKEN = re.compile(r"\s+|0x[0-9a-fA-F]+|[A-Za-z_][\w.-]*|\d+|.", re.S)
YAML_JUNK = [
    "&a ",
    "*a",
    "<<: *a",
    "!!int ",
    "!!str ",
    "!x ",
    "---\n",
    "...\n",
    "? ",
    "|\n",
    ">-\n",
    "{",
    "}",
    "[",
    "]",
    "- ",
    ": ",
    ",",
    "#",
    "'",
    '"',
    "\t",
    "\ufeff",
    "\x00",
    "\x85",
    "\u2028",
    "%YAML 1.1\n",
    "on",
    "yes",
    "~",
    "null",
    "010",
    "0o17",
    "1:30",
    "0x",
    "0xFFFFFFFFFFFFFFFFFFFF",
    "9" * 5000,
    "-1",
    "8192",
    "0-8191",
    "0-7:1/2",
    "0-7:0/0",
    "N",
    "all",
    "\n",
    "\n  ",
    "\r\n",
    "\r",
    "@",
    "`",
    "%",
    "&",
    "*",
    "!",
    "\\",
    "3b:00.0",
    "0000:3b:00.0",
    "tenant-a",
    "vms",
    "host",
    "cpus",
    "vcpus",
    "devices",
    "steering_tags",
    "neutral_tags",
]


@st.composite
def mutated_policies(draw: DrawFn) -> str:
    text = POLICY_TEXTS[draw(st.sampled_from(sorted(POLICY_TEXTS)))]
    tokens = _TOKEN.findall(text)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "dup", "swap", "truncate"]))
        if kind == "replace":
            tokens[i] = draw(st.sampled_from(YAML_JUNK))
        elif kind == "insert":
            tokens.insert(i, draw(st.sampled_from(YAML_JUNK)))
        elif kind == "delete" and len(tokens) > 1:
            del tokens[i]
        elif kind == "dup":
            j = draw(st.integers(i, min(len(tokens), i + 30)))
            tokens[j:j] = tokens[i:j]
        elif kind == "swap" and i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        elif kind == "truncate":
            tokens = tokens[: i + 1]
    return "".join(tokens)


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["0-3", "0x1f", "010", "1:30", "on", "0000:3b:00.0", "drop", "rewrite"]),
)
yaml_trees = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(0, 70)), inner, max_size=5),
    ),
    max_leaves=25,
)
SKELETON = yaml.safe_load((REPO / "policies" / "two-tenants.yaml").read_text())


@st.composite
def random_policies(draw: DrawFn) -> str:
    """YAML from a random tree: a whole document, or the two-tenant policy with one subtree
    replaced, written in block or flow style."""
    if draw(st.booleans()):
        doc: Any = draw(yaml_trees)
    else:
        doc = json.loads(json.dumps(SKELETON))
        node = doc
        path = draw(
            st.sampled_from(
                [
                    ["version"],
                    ["host"],
                    ["host", "steering_tags"],
                    ["host", "neutral_tags"],
                    ["vms"],
                    ["vms", "tenant-a"],
                    ["vms", "tenant-a", "cpus"],
                    ["vms", "tenant-a", "devices"],
                    ["vms", "tenant-b", "on_violation"],
                    ["vms", "tenant-b", "vcpus"],
                ]
            )
        )
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = draw(yaml_trees)
    return yaml.safe_dump(
        doc,
        default_flow_style=draw(st.sampled_from([False, True, None])),
        allow_unicode=draw(st.booleans()),
        sort_keys=False,
    )


def check_policy(text: str) -> None:
    """``check_policy_text`` gives positioned problems with known rules; ``load_policy_text``
    gives a Policy exactly when there is no error, else a PolicyError listing them."""
    with time_limit():
        problems = check_policy_text(text, "fuzz.yaml")
    n_lines = len(text.splitlines()) + 1
    for p in problems:
        assert isinstance(p, Problem) and p.rule in RULES, p
        assert p.level in ("error", "warning") and p.file == "fuzz.yaml", p
        assert 1 <= p.line <= n_lines and p.column >= 1, (p, n_lines)
    errors = [p for p in problems if p.level == "error"]
    with time_limit():
        try:
            policy = load_policy_text(text, "fuzz.yaml")
        except PolicyError as exc:
            assert errors, problems
            assert list(exc.problems) == sorted(errors)
            return
    assert not errors, errors
    assert isinstance(policy, Policy)


@fuzz(400, 10_000)
@given(mutated_policies())
def test_policy_mutated(text: str) -> None:
    check_policy(text)


@fuzz(300, 8_000)
@given(random_policies())
def test_policy_random_yaml(text: str) -> None:
    check_policy(text)


@st.composite
def large_policies(draw: DrawFn) -> str:
    """Policies of host size: up to 2048 CPUs, 300 VMs, 2000 neutral tags (the contents come
    from a seeded generator: drawing each of them would cost more than checking them)."""
    n_cpus, per, n_vms, n_neutral = (
        draw(st.integers(1, 2048)),
        draw(st.integers(1, 8)),
        draw(st.integers(0, 300)),
        draw(st.integers(0, 2000)),
    )
    rnd = draw(st.randoms(use_true_random=False))
    out = ["version: 1", "host:", "  steering_tags:"]
    for first in range(0, n_cpus, per):
        tag = rnd.randrange(0x100) if rnd.random() < 0.3 else first // per
        out.append(f"    {first}-{first + per - 1}: {{st8: {tag & 0xFF}, st16: {tag}}}")
    neutral = [rnd.randrange(0x10000) for _ in range(n_neutral)]
    out.append(f"  neutral_tags: [{', '.join(map(str, neutral))}]")
    out.append("vms:")
    for v in range(n_vms):
        lo = rnd.randrange(n_cpus + 8)
        hi = lo + rnd.randrange(64)
        out += [f"  vm{v}:", f"    cpus: {lo}-{hi}", "    devices:"]
        out.append(f"      {v // 32:02x}:{v % 32:02x}.0:")
        if rnd.random() < 0.5:
            out.append(f"    vcpus: [{', '.join(str(c) for c in range(lo, min(hi, lo + 8) + 1))}]")
    return "\n".join(out) + "\n"


@fuzz(10, 300)
@given(large_policies())
def test_policy_large_documents(text: str) -> None:
    """Host-sized policies are checked within the time limit (no quadratic check)."""
    with time_limit():
        policy, problems = read_policy_text(text, "large.yaml")
    assert all(p.rule in RULES for p in problems)
    assert (policy is None) == any(p.level == "error" for p in problems)


@fuzz(40, 500)
@given(
    st.sampled_from(["[", "{a: ", "- ", "? ", "a:\n", "[{", "&x [", "!!seq ["]),
    st.integers(1, 5_000),
    st.booleans(),
)
def test_policy_deep_nesting(opener: str, depth: int, indent: bool) -> None:
    """Nesting of any depth, flow or block: a problem, never a RecursionError."""
    if indent and opener in ("- ", "a:\n"):
        text = "".join(" " * i + opener for i in range(min(depth, 300)))
    else:
        text = opener * depth
    check_policy(text)


# =============================================================================================
# (f) libvirt domain XML and the steering tags of 'tphtrap acpi host'
# =============================================================================================
DOMAIN_TEXTS = {
    p.name: p.read_text() for p in sorted((REPO / "fixtures" / "libvirt").glob("*.xml"))
}
_XML_TOKEN = re.compile(r"\s+|<[/!?]?|/?>|'[^']*'|\"[^\"]*\"|[\w.:-]+|.", re.S)
XML_JUNK = [
    "<",
    ">",
    "/>",
    "</vcpu>",
    "<vcpupin vcpu='0' cpuset='^1'/>",
    "cpuset='0-'",
    "'",
    "&amp;",
    "&x;",
    "<!DOCTYPE d>",
    "<![CDATA[",
    "]]>",
    "\x00",
    "0x100",
    "99999999999",
    "^",
    ",",
    "-",
    "<hostdev type='pci'>",
    "<address bus='0x5e'/>",
    "\u00e9",
    "<domain>",
]


@st.composite
def mutated_domains(draw: DrawFn) -> bytes:
    tokens = _XML_TOKEN.findall(DOMAIN_TEXTS[draw(st.sampled_from(sorted(DOMAIN_TEXTS)))])
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        if kind == "replace":
            tokens[i] = draw(st.sampled_from(XML_JUNK))
        elif kind == "insert":
            tokens.insert(i, draw(st.sampled_from(XML_JUNK)))
        elif len(tokens) > 1:
            del tokens[i]
    return "".join(tokens).encode("utf-8", "surrogatepass")


@fuzz(300, 5_000)
@given(mutated_domains())
def test_domain_xml_mutated(data: bytes) -> None:
    """A domain file gives a consistent Domain or one DomainError naming file:line:col."""
    with time_limit():
        try:
            dom = parse_domain(data, "fuzz.xml")
        except DomainError as exc:
            assert re.match(r"fuzz\.xml(:\d+(:\d+)?)?$", exc.where), exc
            return
    assert len(dom.pins) == dom.vcpus >= 1
    assert all(p.cpus for p in dom.pins) and [p.vcpu for p in dom.pins] == list(range(dom.vcpus))
    assert all(d.bdf == normalize_bdf(d.bdf) for d in dom.hostdevs)


@fuzz(300, 5_000)
@given(st.text(alphabet="0123456789-,^ x", max_size=24))
def test_libvirt_cpuset_refuses_with_value_error_only(text: str) -> None:
    try:
        cpus = parse_libvirt_cpuset(text)
    except ValueError:
        return
    assert cpus and all(0 <= c < 8192 for c in cpus)


@fuzz(200, 4_000)
@given(mutated_policies())
def test_tags_file_mutated(text: str) -> None:
    """The tags file is read with the policy reader: positioned problems with known rules."""
    with time_limit():
        entries, out = read_steering_tags(text, "tags.yaml")
    assert all(p.rule in RULES for p in out.problems)
    seen: set[int] = set()
    for entry in entries:  # each CPU in one entry only (duplicate-cpu keeps the first)
        assert not entry.cpus & seen
        seen |= entry.cpus
