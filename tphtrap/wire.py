"""The plugin protocol codec (docs/protocol.md): JSON lines in, JSON lines out. Pure.

``parse_request`` turns one line into a validated :class:`Request` or raises
:class:`~tphtrap.errors.WireError` carrying an error code, the request id when it could be read,
and the offending field. ``reply`` / ``error_reply`` / ``decision_json`` build the answers.
Every field of every operation is declared once, in :data:`OPS`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import eq
from typing import Any, TypeVar

import msgspec

from . import bulk
from .device import normalize_bdf
from .errors import WireError
from .events import (
    VERDICT_NAMES,
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    HostOp,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)

_V = TypeVar("_V")

__all__ = [
    "ERRNOS",
    "ERRORS",
    "HEX_FIELDS",
    "MAX_LINE",
    "MAX_REPLY",
    "OPS",
    "PROTOCOL_VERSIONS",
    "Request",
    "access_reply",
    "decision_json",
    "decision_text",
    "decision_wire",
    "did_you_mean",
    "encode",
    "error_reply",
    "expand_runs",
    "hex_reply",
    "hex_values",
    "host_op",
    "op_runs",
    "op_text",
    "parse_request",
    "reply",
    "to_access",
]

PROTOCOL_VERSIONS = (2,)  # 2: unsolicited event lines (reload corrections); 1 is refused
# A 4096-byte config space as hex is 8192 characters; 64 KiB leaves ample room and bounds the
# memory one line can take (the reader refuses longer lines without buffering them).
MAX_LINE = 65536
#: Every line the server writes is at most this long (newline excluded): the largest decision,
#: a 2048-vector MSI-X device whose every entry differs from its neighbours being re-written
#: for a width change, is about 152 KiB (tests/test_reply_size.py builds and measures it).
MAX_REPLY = 262144
MAX_ID_LEN = 128
MAX_NAME_LEN = 64


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    op: str
    args: Mapping[str, Any]


#: Every error code a reply can carry: code -> (when, the ``field`` it names). The
#: decision of an error reply is a ``drop`` whose reason is the code. docs/protocol.md lists
#: this table (``python -m tphtrap.protodoc``); tests check that every code raised is here.
ERRORS: dict[str, tuple[str, str]] = {
    "bad-json": ("the line is not JSON, is nested too deeply, or repeats a key", "-"),
    "bad-utf8": ("the line is not UTF-8", "-"),
    "line-too-long": ("longer than `max_line`", "-"),
    "not-an-object": ("JSON, but not an object", "-"),
    "missing-field": ("a required field is absent (including `id` and `op`)", "the field"),
    "bad-type": ("a field has the wrong JSON type (booleans are not integers)", "the field"),
    "out-of-range": (
        "a value outside its range, a value wider than `width`, a config access past 4096, "
        "a BAR access past 2^64, backend facts that contradict each other or the snapshot",
        "the field",
    ),
    "unknown-op": ("`op` names no operation", "`op`"),
    "unknown-field": ("a field the operation does not take", "the field"),
    "handshake-required": ("a request before `hello`", "`op`"),
    "unsupported-version": ("no common protocol version", "`versions`"),
    "unknown-vm": ("the VM is not in the policy", "`vm`"),
    "unknown-device": ("the device is not attached for this VM, or not assigned to it", "`bdf`"),
    "bad-config": (
        "`attach` got a config space that does not decode, or one no filter can keep safe (a "
        "short snapshot, overlapping TPH capabilities)",
        "`config`/`path`",
    ),
    "already-attached": (
        '`attach` of a device attached to this VM, without `"replace": true`',
        "`bdf`",
    ),
    "wrong-backend": (
        "`vectors` or `host_result` for a device attached with the writes backend",
        "`bdf`",
    ),
    "policy-invalid": ("`reload` got a policy with problems (the old one stays)", "`policy`"),
    "internal-error": ("a bug; the access is dropped and the server keeps serving", "-"),
}


# --- field validators: (raw value) -> value, raising ValueError(reason) ----------------------
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, str) and v[:2].lower() == "0x":
            # Plain hex digits only, what C's strtoull reads: Python's int() would also take
            # "0x1_0" (0x10, where strtoull reads 1), surrounding whitespace and non-ASCII
            # digits, so the hypervisor and tphtrap could read different values.
            if len(v) == 2 or not _HEX_DIGITS.issuperset(v[2:]):
                raise ValueError("not a hex number")
            v = int(v, 16)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError('an integer (or a "0x..." string)')
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range {lo}..{hi:#x}")
        return v

    return check


def _choice(*allowed: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"one of {', '.join(map(str, allowed))}")
        if v not in allowed:
            raise ValueError(f"{v} is not one of {', '.join(map(str, allowed))}")
        return v

    return check


def _name(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    if not v or len(v) > MAX_NAME_LEN or not v.isprintable():
        raise ValueError(f"must be 1-{MAX_NAME_LEN} printable characters")
    return v


def _bdf(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError('a string like "0000:3b:00.0"')
    return normalize_bdf(v)


def _text(limit: int) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise TypeError("a string")
        if len(v) > limit:
            raise ValueError(f"longer than {limit} characters")
        return v

    return check


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _vector_ctrl(v: Any) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_MSIX_VECTORS:
        raise TypeError(f"a list of at most {MAX_MSIX_VECTORS} integers")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= 0xFFFFFFFF:
            raise ValueError("every Vector Control word is an integer 0..0xffffffff")
    return list(v)


def _backend(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError('"writes" or "host"')
    if v not in ("writes", "host"):
        raise ValueError(f'{v!r} is not "writes" or "host"')
    return v


def _vectors(v: Any) -> frozenset[int]:
    if not isinstance(v, list) or len(v) > 2048:
        raise TypeError("a list of at most 2048 vector indices")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError("a list of at most 2048 vector indices")
        if not 0 <= x < 2048:
            raise ValueError(f"vector {x} is out of range 0..2047")
    return frozenset(v)


#: The errors a host operation may report (what Linux drivers/pci/tph.c returns).
ERRNOS = {-22: "EINVAL", -6: "ENXIO", -16: "EBUSY"}


def host_op(v: Any) -> HostOp:
    """A host operation as a VMM reports it back: ``{"op": "st_set", "index": 3, ...}``."""
    if not isinstance(v, dict):
        raise TypeError('an operation object, e.g. {"op": "st_set", "index": 3}')
    name = v.get("op")
    if name not in ("tph_enable", "tph_disable", "st_set"):
        raise ValueError(f"op {name!r} is not tph_enable, tph_disable or st_set")
    index = v.get("index", 0)
    if name == "st_set" and (isinstance(index, bool) or not isinstance(index, int)):
        raise TypeError('st_set needs its "index"')
    if not 0 <= index < 2048:
        raise ValueError(f"index {index} is out of range 0..2047")
    return HostOp(name, index=index)


def _errno(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("a negative errno, e.g. -22 (EINVAL)")
    if not -4095 <= v <= -1:
        raise ValueError(f"{v} is not a negative errno (-4095..-1)")
    return v


def _versions(v: Any) -> list[int]:
    if not isinstance(v, list) or not v or len(v) > 16:
        raise TypeError("a non-empty list of integers")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError("a non-empty list of integers")
    return list(v)


_U64 = (1 << 64) - 1
MAX_MSIX_VECTORS = 2048  # PCI_MSIX_FLAGS_QSIZE + 1
_CFG_WIDTHS = (1, 2, 4)
_BAR_WIDTHS = (1, 2, 4, 8)
_BAR_MAX = 5
_Fields = dict[str, Callable[[Any], Any]]
_DEVICE: _Fields = {"vm": _name, "bdf": _bdf}
_CFG: _Fields = {**_DEVICE, "offset": _int_in(0, 4095), "width": _choice(*_CFG_WIDTHS)}
_BAR: _Fields = {
    **_DEVICE,
    "bar": _int_in(0, _BAR_MAX),
    "offset": _int_in(0, _U64),
    "width": _choice(*_BAR_WIDTHS),
}

# op -> (required fields, optional fields)
OPS: dict[str, tuple[_Fields, _Fields]] = {
    "hello": ({"versions": _versions}, {"client": _text(128)}),
    "attach": (
        _DEVICE,
        {
            "config": _text(MAX_LINE),
            "path": _text(4096),
            "source_bdf": _bdf,
            "replace": _flag,
            "vector_ctrl": _vector_ctrl,
            "backend": _backend,
            "completer": _choice(0, 1, 3),
            "rciep": _flag,
        },
    ),
    "detach": (_DEVICE, {}),
    "cfg_write": ({**_CFG, "value": _int_in(0, 0xFFFFFFFF)}, {}),
    "cfg_read": (_CFG, {}),
    "msix_write": ({**_BAR, "value": _int_in(0, _U64)}, {}),
    "msix_read": (_BAR, {}),
    "reset": (_DEVICE, {}),
    "vectors": ({**_DEVICE, "allocated": _vectors}, {"tags_cleared": _flag}),
    "host_result": ({**_DEVICE, "failed": host_op, "errno": _errno}, {}),
    "reload": ({}, {"policy": _text(4096)}),
    "stats": ({}, {}),
    "shutdown": ({}, {}),
}
# Fields every request may carry besides its own: the id, and in recorded traces the expected
# decision (ignored by serve, compared by replay --expect).
_COMMON = frozenset({"id", "op", "expect"})


_ID_MIN = -(2**63)  # ids are 64-bit integers, signed or unsigned, or short strings
_ID_MAX = 2**64


def _request_id(obj: Mapping[str, Any]) -> int | str | None:
    rid = obj.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) and _ID_MIN <= rid < _ID_MAX:
        return rid
    if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN:
        return rid
    return None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys: ``{"value": 1, "value": 2}`` means different things to
    different JSON parsers (first or last wins), so a filter must not guess."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


# One decoder, built once (json.loads with a hook would build one per call): the reference,
# whose results and errors every line gets.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
# msgspec's decoder (C, about ten times faster here), for the lines where it provably gives
# what the reference gives: see _decode_plain. It keeps a repeated key's last value.
_PLAIN_DECODE: Callable[[bytes | str], Any] = msgspec.json.Decoder().decode
_ENCODE_BACK: Callable[[Any], bytes] = msgspec.json.Encoder().encode
#: Lines with more brackets than this take the reference path: far below any recursion limit,
#: so that how deep either decoder may nest never decides what a line means.
_PLAIN_MAX_BRACKETS = 64


def _colons(line: bytes | str) -> int:
    """The ``:`` in a line msgspec may decode, or -1 for a line that goes to the reference:
    one with a backslash (an escape) or more than :data:`_PLAIN_MAX_BRACKETS` brackets."""
    if isinstance(line, bytes):
        if b"\\" in line or len(line) - len(line.translate(None, b"{[")) > _PLAIN_MAX_BRACKETS:
            return -1
        return line.count(b":")
    if "\\" in line or line.count("{") + line.count("[") > _PLAIN_MAX_BRACKETS:
        return -1
    return line.count(":")


def _no_key_repeated(colons: int, decoded: Any) -> bool:
    """Does the line that held ``colons`` colons and decoded to ``decoded`` repeat no key?

    Each member of an object holds exactly one ``:`` outside strings, and with no escape in
    the line the ``:`` inside its strings are those of the strings it decodes to, but for the
    strings of a repeated key's lost members. Encoded again, ``decoded`` holds one ``:`` per
    member it kept plus those of its strings. So the two counts are equal exactly when no
    member was lost: when no key is repeated, at any depth, blanks or not.
    """
    try:
        return _ENCODE_BACK(decoded).count(b":") == colons
    except (TypeError, ValueError, OverflowError):
        return False


def _decode_plain(line: bytes | str) -> Any:
    """The object ``line`` decodes to, by msgspec, or None: then the line goes to the
    reference, which decides (the same object, or its error).

    msgspec refuses what the reference would refuse (malformed JSON, invalid UTF-8, control
    characters), and a few things the reference takes (``NaN``, ``1e400``, numbers of thousands
    of digits): every refusal falls back, never answers; a repeated key, which msgspec takes,
    is ruled out by :func:`_no_key_repeated`.
    """
    colons = _colons(line)
    if colons < 0:
        return None
    obj = _decoded(_PLAIN_DECODE, line)
    if type(obj) is not dict or not _no_key_repeated(colons, obj):  # (None: refused)
        return None
    return obj


def _decoded(decode: Callable[[bytes | str], Any], line: bytes | str) -> Any:
    """``decode(line)``, or None where msgspec refuses the line (or a text is not UTF-8)."""
    try:
        return decode(line)
    except (ValueError, RecursionError):
        return None


def parse_request(line: bytes | str) -> Request:
    """Validate one protocol line (without its newline). Raises :class:`WireError`."""
    if isinstance(line, bytes) and len(line) > MAX_LINE:
        raise WireError("line-too-long", f"line longer than {MAX_LINE} bytes")
    req = _typed_request(line)
    if req is not None:
        return req
    obj = _decode_plain(line)
    if obj is None:
        obj = _reference_decode(line)
    if type(obj) is dict:
        op = obj.get("op")
        if type(op) is str:
            fast = _FAST.get(op)
            if fast is not None:
                req = fast(obj, op)
                if req is not None:
                    return req
    return _validate(obj)


def _reference_decode(line: bytes | str) -> Any:
    """The line decoded by the reference decoder, its errors as :class:`WireError`."""
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("bad-utf8", f"not UTF-8 at byte {exc.start}") from None
    else:
        text = line
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise WireError("bad-json", f"not JSON: {exc.msg} at column {exc.colno}") from None
    except _DuplicateKey as exc:
        raise WireError("bad-json", f"duplicate key {exc.args[0]!r}") from None
    except RecursionError:
        raise WireError("bad-json", "JSON nested too deeply") from None
    except ValueError:
        # Not a JSONDecodeError: int() refused a number of more than sys.get_int_max_str_digits()
        # digits (4300 by default), which json lets through as a plain ValueError.
        raise WireError("bad-json", "not JSON: a number with too many digits") from None


def _validate(obj: Any) -> Request:
    """The decoded line as a request: every check of :data:`OPS`, with its error."""
    if not isinstance(obj, dict):
        raise WireError("not-an-object", f"a request is a JSON object, got {type(obj).__name__}")
    rid = _request_id(obj)
    if "id" not in obj:
        raise WireError("missing-field", 'every request needs an "id"', field="id")
    if rid is None:
        raise WireError(
            "bad-type",
            f'"id" must be an integer or a string of 1-{MAX_ID_LEN} characters',
            field="id",
        )
    op = obj.get("op")
    if not isinstance(op, str):
        code = "missing-field" if op is None else "bad-type"
        raise WireError(
            code, '"op" must be a string naming the operation', request_id=rid, field="op"
        )
    spec = OPS.get(op)
    if spec is None:
        raise WireError(
            "unknown-op", f"unknown op {op!r}{did_you_mean(op, OPS)}", request_id=rid, field="op"
        )
    required, optional = spec
    args: dict[str, Any] = {}
    for key in obj:
        if key not in required and key not in optional and key not in _COMMON:
            hint = did_you_mean(key, [*required, *optional])
            raise WireError(
                "unknown-field", f"{op} takes no field {key!r}{hint}", request_id=rid, field=key
            )
    for key, check in required.items():
        if key not in obj:
            raise WireError("missing-field", f"{op} needs {key!r}", request_id=rid, field=key)
        args[key] = _checked(obj[key], check, rid, key)
    for key, check in optional.items():
        if key in obj:
            args[key] = _checked(obj[key], check, rid, key)
    if "value" in args and "width" in args and args["value"] >> (8 * args["width"]):
        raise WireError(
            "out-of-range",
            f"value {args['value']:#x} does not fit in {args['width']} bytes",
            request_id=rid,
            field="value",
        )
    if op.startswith("cfg_") and args["offset"] + args["width"] > 4096:
        raise WireError(
            "out-of-range",
            f"offset {args['offset']:#x} + width {args['width']} runs past 4096",
            request_id=rid,
            field="offset",
        )
    if op.startswith("msix_") and args["offset"] + args["width"] > _U64 + 1:
        raise WireError(
            "out-of-range",
            f"offset {args['offset']:#x} + width {args['width']} runs past 2^64",
            request_id=rid,
            field="offset",
        )
    if op == "attach" and ("config" in args) == ("path" in args):
        raise WireError(
            "missing-field" if "config" not in args else "bad-type",
            'attach needs exactly one of "config" (hex) or "path"',
            request_id=rid,
            field="config",
        )
    if op == "attach":
        _check_backend(args, rid)
    if "expect" in obj:
        args["expect"] = obj["expect"]
    return Request(rid, op, args)


def _check_backend(args: Mapping[str, Any], rid: int | str) -> None:
    """``backend: host`` needs the root port's completer, or ``rciep: true`` (not both);
    the writes backend takes neither."""
    host = args.get("backend", "writes") == "host"
    completer, rciep = "completer" in args, args.get("rciep", False)
    if not host and (completer or "rciep" in args):
        field = "completer" if completer else "rciep"
        raise WireError(
            "out-of-range",
            f'{field!r} is a fact about the host: only with "backend": "host"',
            request_id=rid,
            field=field,
        )
    if host and not completer and not rciep:
        raise WireError(
            "missing-field",
            'backend host needs "completer" (the root port\'s TPH Completer field: 0, 1 or 3) '
            'or "rciep": true (a root-complex integrated endpoint)',
            request_id=rid,
            field="completer",
        )
    if host and completer and rciep:
        raise WireError(
            "out-of-range",
            'a root-complex integrated endpoint has no root port: give "completer" or '
            '"rciep": true, not both',
            request_id=rid,
            field="rciep",
        )


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'hello'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the fast path: access requests as every client sends them ------------------------------
# The VM-exit path validates a handful of fields per request; going through the generic
# validators above costs more than decoding the JSON. These functions accept exactly the common
# case of the access operations (every field present, with its plain JSON type and in range, no
# other field) and build the same Request as _validate, fields in the same order. They return
# None for anything else, which _validate then decides, with its error messages.
_BDF_CACHE: dict[str, str] = {}


def _allowed(op: str) -> frozenset[str]:
    required, optional = OPS[op]
    return frozenset(required) | frozenset(optional) | _COMMON


_ALLOWED = {
    op: _allowed(op) for op in ("cfg_write", "cfg_read", "msix_write", "msix_read", "reset")
}


def _fast_head(rid: Any, vm: Any, raw: Any) -> tuple[int | str, str, str] | None:
    """(id, vm, normalised bdf) when the id, vm and bdf are plainly valid."""
    if type(rid) is int:
        if not _ID_MIN <= rid < _ID_MAX:
            return None
    elif type(rid) is not str or not 0 < len(rid) <= MAX_ID_LEN:
        return None
    if type(vm) is not str or not 0 < len(vm) <= MAX_NAME_LEN or not vm.isprintable():
        return None
    if type(raw) is not str:
        return None
    bdf = _BDF_CACHE.get(raw)
    if bdf is None:
        try:
            bdf = normalize_bdf(raw)
        except ValueError:
            return None
        cache_put(_BDF_CACHE, raw, bdf)
    return rid, vm, bdf


def _cfg_request(
    op: str, rid: Any, vm: Any, bdf: Any, offset: Any, width: Any, value: Any
) -> Request | None:
    head = _fast_head(rid, vm, bdf)
    if (
        head is None
        or type(offset) is not int
        or type(width) is not int
        or width not in _CFG_WIDTHS
        or not 0 <= offset <= 4096 - width
    ):
        return None
    args: dict[str, Any] = {"vm": head[1], "bdf": head[2], "offset": offset, "width": width}
    return _write_request(op, head[0], args, value, width)


def _bar_request(
    op: str, rid: Any, vm: Any, bdf: Any, bar: Any, offset: Any, width: Any, value: Any
) -> Request | None:
    head = _fast_head(rid, vm, bdf)
    if (
        head is None
        or type(bar) is not int
        or not 0 <= bar <= _BAR_MAX
        or type(offset) is not int
        or type(width) is not int
        or width not in _BAR_WIDTHS
        or not 0 <= offset <= _U64 + 1 - width
    ):
        return None  # the slow path names the field at fault
    args: dict[str, Any] = {
        "vm": head[1],
        "bdf": head[2],
        "bar": bar,
        "offset": offset,
        "width": width,
    }
    return _write_request(op, head[0], args, value, width)


def _reset_request(op: str, rid: Any, vm: Any, bdf: Any) -> Request | None:
    head = _fast_head(rid, vm, bdf)
    if head is None:
        return None
    return Request(head[0], op, {"vm": head[1], "bdf": head[2]})


_WRITE_OPS = frozenset({"cfg_write", "msix_write"})


def _write_request(
    op: str, rid: int | str, args: dict[str, Any], value: Any, width: int
) -> Request | None:
    """The request, with the value of a write (unsigned, within ``width`` bytes)."""
    if op in _WRITE_OPS:
        if type(value) is not int or value < 0 or value >> (8 * width):
            return None
        args["value"] = value
    return Request(rid, op, args)


# From a decoded object: every field the operation takes, and no other (expect may be there).
def _fast_cfg(obj: dict[str, Any], op: str) -> Request | None:
    if not obj.keys() <= _ALLOWED[op]:
        return None
    g = obj.get
    req = _cfg_request(op, g("id"), g("vm"), g("bdf"), g("offset"), g("width"), g("value"))
    return _with_expect(req, obj)


def _fast_bar(obj: dict[str, Any], op: str) -> Request | None:
    if not obj.keys() <= _ALLOWED[op]:
        return None
    g = obj.get
    req = _bar_request(
        op, g("id"), g("vm"), g("bdf"), g("bar"), g("offset"), g("width"), g("value")
    )
    return _with_expect(req, obj)


def _fast_reset(obj: dict[str, Any], op: str) -> Request | None:
    if not obj.keys() <= _ALLOWED[op]:
        return None
    return _with_expect(_reset_request(op, obj.get("id"), obj.get("vm"), obj.get("bdf")), obj)


def _with_expect(req: Request | None, obj: dict[str, Any]) -> Request | None:
    if req is not None and "expect" in obj:
        req.args["expect"] = obj["expect"]  # type: ignore[index]
    return req


_FAST: dict[str, Callable[[dict[str, Any], str], Request | None]] = {
    "cfg_write": _fast_cfg,
    "cfg_read": _fast_cfg,
    "msix_write": _fast_bar,
    "msix_read": _fast_bar,
    "reset": _fast_reset,
}


# --- the typed path: the access requests decoded and typed by msgspec in one step ----------
# One struct per access operation, its fields those OPS requires (strings for the device, the
# rest integers), tagged by "op"; no other field (a line with "expect" takes the paths above).
def _line_struct(op: str) -> Any:
    fields = [("id", int | str)] + [(k, str if k in _DEVICE else int) for k in OPS[op][0]]
    return msgspec.defstruct(
        f"_{op}", fields, tag_field="op", tag=op, forbid_unknown_fields=True, frozen=True
    )


_CFG_WRITE, _CFG_READ, _MSIX_WRITE, _MSIX_READ, _RESET = (
    _line_struct(op) for op in ("cfg_write", "cfg_read", "msix_write", "msix_read", "reset")
)
_TYPED_DECODE: Callable[[bytes | str], Any] = msgspec.json.Decoder(
    _CFG_WRITE | _CFG_READ | _MSIX_WRITE | _MSIX_READ | _RESET
).decode
_TYPED_BUILD: dict[Any, Callable[[Any], Request | None]] = {
    _CFG_WRITE: lambda r: _cfg_request("cfg_write", r.id, r.vm, r.bdf, r.offset, r.width, r.value),
    _CFG_READ: lambda r: _cfg_request("cfg_read", r.id, r.vm, r.bdf, r.offset, r.width, None),
    _MSIX_WRITE: lambda r: _bar_request(
        "msix_write", r.id, r.vm, r.bdf, r.bar, r.offset, r.width, r.value
    ),
    _MSIX_READ: lambda r: _bar_request(
        "msix_read", r.id, r.vm, r.bdf, r.bar, r.offset, r.width, None
    ),
    _RESET: lambda r: _reset_request("reset", r.id, r.vm, r.bdf),
}
#: The members of each struct's line: its fields and "op".
_TYPED_KEYS = {t: len(t.__struct_fields__) + 1 for t in _TYPED_BUILD}


def _typed_request(line: bytes | str) -> Request | None:
    """The access request ``line`` is, decoded and typed by msgspec, or None: then the
    paths above decide (the same request, or the error).

    A repeated key is ruled out as for any line msgspec decodes (:func:`_no_key_repeated`),
    the struct's count made directly; any key but a field's is refused. A value
    of the wrong JSON type (``true`` for an integer, ``1.0``, ``1e2``) is refused by msgspec;
    its ranges are the dictionary path's own checks.
    """
    # (No bracket limit: every field is a scalar, so msgspec never nests into a value.)
    if isinstance(line, bytes):
        if b"\\" in line or b'"expect"' in line:  # a recorded request: the dictionary path
            return None
        colons = line.count(b":")
    else:
        if "\\" in line or '"expect"' in line:
            return None
        colons = line.count(":")
    r = _decoded(_TYPED_DECODE, line)
    if r is None:
        return None
    t, rid = type(r), r.id
    # What _no_key_repeated would count, without encoding: the struct's members ("op" among
    # them) and the colons of its string values.
    again = _TYPED_KEYS[t] + r.vm.count(":") + r.bdf.count(":")
    if type(rid) is str:
        again += rid.count(":")
    if again != colons:
        return None
    return _TYPED_BUILD[t](r)


def _checked(v: Any, check: Callable[[Any], Any], rid: int | str, key: str) -> Any:
    try:
        return check(v)
    except TypeError as exc:
        raise WireError("bad-type", f"{key!r} must be {exc}", request_id=rid, field=key) from None
    except ValueError as exc:
        raise WireError("out-of-range", f"{key!r}: {exc}", request_id=rid, field=key) from None


def to_access(req: Request) -> Access:
    """The engine access a request carries (only for the access ops)."""
    a = req.args
    if req.op == "cfg_write":
        return ConfigWrite(a["vm"], a["bdf"], a["offset"], a["width"], a["value"])
    if req.op == "cfg_read":
        return ConfigRead(a["vm"], a["bdf"], a["offset"], a["width"])
    if req.op == "msix_write":
        return MsixWrite(a["vm"], a["bdf"], a["bar"], a["offset"], a["width"], a["value"])
    if req.op == "msix_read":
        return MsixRead(a["vm"], a["bdf"], a["bar"], a["offset"], a["width"])
    if req.op == "reset":
        return Reset(a["vm"], a["bdf"])
    raise ValueError(f"{req.op} is not an access")


ACCESS_OPS = frozenset({"cfg_write", "cfg_read", "msix_write", "msix_read", "reset"})


def decision_json(d: Decision) -> dict[str, Any]:
    """A decision as data, every write and op listed one by one (audit, records, replay)."""
    out: dict[str, Any] = {
        "verdict": VERDICT_NAMES[d.verdict],
        "reason": d.reason,
        "reasons": list(d.reasons),
        "detail": d.detail,
        "writes": [w.to_json() for w in d.writes],
    }
    if d.ops is not None:
        out["ops"] = [o.to_json() for o in d.ops]
    if d.read_mask:
        out["guest_value"] = d.guest_value
        out["read_mask"] = d.read_mask
    if d.rule:
        out["rule"] = d.rule
    return out


def decision_wire(d: Decision) -> dict[str, Any]:
    """A decision as the protocol sends it: :func:`decision_json` with runs of identical
    writes and ``st_set`` ops in their compact form (:func:`write_runs`, :func:`op_runs`)."""
    out = decision_json(d)
    out["writes"] = write_runs(d.writes)
    if d.ops is not None:
        out["ops"] = op_runs(d.ops)
    return out


def expand_runs(decision: Mapping[str, Any]) -> dict[str, Any]:
    """A protocol decision (``decision`` of a reply) with every run listed one by one: the
    inverse of :func:`decision_wire`, what :func:`decision_json` gives."""
    out = dict(decision)
    writes: list[dict[str, Any]] = []
    for w in decision.get("writes", []):
        count, stride = w.get("count", 1), w.get("stride", 0)
        base = {k: v for k, v in w.items() if k not in ("count", "stride")}
        writes.extend({**base, "offset": base["offset"] + k * stride} for k in range(count))
    out["writes"] = writes
    if "ops" in decision:
        ops: list[dict[str, Any]] = []
        for o in decision["ops"]:
            if "first" in o:
                ops.extend(
                    {"op": "st_set", "index": o["first"] + k, "cpu": o["cpu"], "tag": o["tag"]}
                    for k in range(o["count"])
                )
            else:
                ops.append(dict(o))
        out["ops"] = ops
    return out


def _write_groups(
    writes: Sequence[DeviceWrite], starts: list[int] | None = None
) -> list[tuple[DeviceWrite, int, int]]:
    """Consecutive writes of the same value, space, BAR and width at a constant positive
    stride, as (first, count, stride); a lone write is (it, 1, 0). ``starts``: the
    :func:`_run_starts` of ``writes``, when the caller has them."""
    out: list[tuple[DeviceWrite, int, int]] = []
    i, n = 0, len(writes)
    for start in _run_starts(writes) if starts is None else starts:
        if start < i:
            continue  # inside the run before
        if i < start:
            out += [(w, 1, 0) for w in writes[i:start]]
        w, x = writes[start], writes[start + 1]
        j, stride = start + 1, 0
        if _same_but_offset(w, x) and x.offset > w.offset:
            stride = x.offset - w.offset
            j += 1
            while (
                j < n
                and _same_but_offset(w, writes[j])
                and writes[j].offset - writes[j - 1].offset == stride
            ):
                j += 1
        out.append((w, j - start, stride))
        i = j
    if i < n:
        out += [(w, 1, 0) for w in writes[i:]]
    return out


def _run_starts(writes: Sequence[DeviceWrite]) -> list[int]:
    """Where a run may start: the writes whose next one has the same value (any other write
    is a lone write, or inside a run)."""
    starts = bulk.C.run_starts(writes) if bulk.C is not None else None
    if starts is None:
        values = [w.value for w in writes]
        starts = list(compress(range(len(values) - 1), map(eq, values, values[1:])))
    return starts


def _same_but_offset(a: DeviceWrite, b: DeviceWrite) -> bool:
    return a.value == b.value and a.width == b.width and a.space == b.space and a.bar == b.bar


def write_runs(writes: Sequence[DeviceWrite]) -> list[dict[str, Any]]:
    """Writes as the protocol lists them: a run of ``count`` >= 2 identical writes at
    ``offset``, ``offset + stride``, ... is one object with ``count`` and ``stride``."""
    out: list[dict[str, Any]] = []
    for w, count, stride in _write_groups(writes):
        item: dict[str, Any] = w.to_json()
        if count > 1:
            item["count"] = count
            item["stride"] = stride
        out.append(item)
    return out


def _op_groups(ops: Sequence[HostOp]) -> list[tuple[HostOp, int]]:
    """Consecutive ``st_set`` ops of the same CPU and tag on consecutive entries, as
    (first, count); any other op is (it, 1)."""
    out: list[tuple[HostOp, int]] = []
    i, n = 0, len(ops)
    while i < n:
        o = ops[i]
        j = i + 1
        if o.op == "st_set":
            while (
                j < n
                and ops[j].op == "st_set"
                and ops[j].cpu == o.cpu
                and ops[j].tag == o.tag
                and ops[j].index == o.index + (j - i)
            ):
                j += 1
        out.append((o, j - i))
        i = j
    return out


def op_runs(ops: Sequence[HostOp]) -> list[dict[str, Any]]:
    """Ops as the protocol lists them: ``count`` >= 2 ``st_set`` of one CPU and tag on
    entries ``first``.. ``first + count - 1`` are one object with ``first`` and ``count``."""
    out: list[dict[str, Any]] = []
    for o, count in _op_groups(ops):
        if count > 1:
            out.append(
                {"op": "st_set", "first": o.index, "count": count, "cpu": o.cpu, "tag": o.tag}
            )
        else:
            out.append(o.to_json())
    return out


def compact_encoder(default: Callable[[Any], Any] | None = None) -> Callable[[Any], str]:
    """``json.dumps(obj, separators=(",", ":"), ensure_ascii=True, default=default)`` without
    building an encoder per call: the C encoder, made once (no circular-reference bookkeeping:
    replies and audit events are trees built here). Falls back to a reused
    :class:`json.JSONEncoder`."""
    slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=default)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None:
        try:
            fast = make(
                None,
                slow.default,
                json.encoder.encode_basestring_ascii,
                None,
                ":",
                ",",
                False,
                False,
                True,
            )
            sample = {"id": "x\u00e9", "ok": True, "n": [1, 2.5, None], "e": {}}
            if "".join(fast(sample, 0)) == slow.encode(sample):

                def encode_fast(obj: Any) -> str:
                    return "".join(fast(obj, 0))

                return encode_fast
        except Exception:  # another interpreter's internals: use the public API
            pass
    return slow.encode


_ENCODE = compact_encoder()


def encode(obj: Mapping[str, Any]) -> bytes:
    return _ENCODE(obj).encode() + b"\n"


# --- the access reply, written directly --------------------------------------------------
# An access reply is the hot path of ``serve``: encoding it from decision_json through the
# JSON encoder cost as much as the engine's decision. These functions write the same bytes
# (tests/test_wire_fastpath.py checks them against encode(decision_json(...)) for generated
# decisions) from pieces: the parts of a decision that repeat (verdict, reasons, detail, rule)
# are encoded once and kept, numbers are written with str() as json does for ints.
#: A string as a JSON string literal (json's own C escaping, ASCII only, with the quotes).
json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
_ESC = json_string
_HEADS: dict[tuple[Verdict, str, tuple[str, ...], str], str] = {}
_RULES: dict[str | None, str] = {None: ""}
_SPACES = {"config": '"config"', "bar": '"bar"'}


CACHE_MAX = 4096


def cache_put(cache: dict[Any, Any], key: Any, value: _V) -> _V:
    """``cache[key] = value`` unless the cache holds :data:`CACHE_MAX` entries already (keys
    come from requests, so the caches must not grow without bound); returns ``value``."""
    if len(cache) < CACHE_MAX:
        cache[key] = value
    return value


_LAST_WRITES: list[Any] = [None, ""]


def writes_text(writes: tuple[DeviceWrite, ...]) -> str:
    """``writes``, each as :func:`write_text`, joined with commas; kept for the next call with
    the same tuple (a decision's): its audit line and its reply, when it has no runs, each
    list them all (the reference kept here keeps the tuple from being reused)."""
    if _LAST_WRITES[0] is writes:
        kept: str = _LAST_WRITES[1]
        return kept
    text = bulk.C.writes_text(writes) if bulk.C is not None else None
    if text is None:
        text = _writes_text(writes)
    _LAST_WRITES[0], _LAST_WRITES[1] = writes, text
    return text


def _writes_text(writes: tuple[DeviceWrite, ...]) -> str:
    """:func:`writes_text`'s loop, in Python."""
    out = []
    space: str | None = None
    bar: int | None = None
    head = ""
    for w in writes:
        if w.space is not space or w.bar != bar:
            space, bar = w.space, w.bar
            head = _write_head(w)
        # %d formats a number as str(int(...)) does, faster than int() and an f-string
        out.append('%s%d,"width":%d,"value":%d}' % (head, w.offset, w.width, w.value))  # noqa: UP031
    return ",".join(out)


def _write_head(w: DeviceWrite) -> str:
    """:func:`write_text` of ``w`` up to its offset: its space and BAR."""
    space = _SPACES.get(w.space) or _ESC(w.space)
    bar = "" if w.bar is None else f',"bar":{int(w.bar)}'
    return f'{{"space":{space}{bar},"offset":'


def write_text(w: DeviceWrite, count: int = 1, stride: int = 0) -> str:
    """``encode(w.to_json())`` without its newline (with ``count``/``stride``: a run)."""
    run = "" if count == 1 else f',"count":{count},"stride":{stride}'
    return f'{_write_head(w)}{int(w.offset)},"width":{int(w.width)},"value":{int(w.value)}{run}}}'


_LAST_WRITE: list[Any] = [None, ""]


def one_write_text(w: DeviceWrite) -> str:
    """:func:`write_text` of ``w``, kept for the next call with the same write: the audit line
    and the reply of one decision each write its only device write (writes are never changed
    once made, and the reference kept here keeps the object from being reused)."""
    if _LAST_WRITE[0] is w:
        text: str = _LAST_WRITE[1]
        return text
    text = write_text(w)
    _LAST_WRITE[0], _LAST_WRITE[1] = w, text
    return text


def _cpu_text(cpu: int | None) -> str:
    return "null" if cpu is None else str(int(cpu))


def op_text(o: HostOp, count: int = 1) -> str:
    """``encode(op_runs([o] * ...)[0])`` without its newline."""
    if o.op == "st_set":
        if count > 1:
            return (
                f'{{"op":"st_set","first":{int(o.index)},"count":{count},'
                f'"cpu":{_cpu_text(o.cpu)},"tag":{int(o.tag)}}}'
            )
        return (
            f'{{"op":"st_set","index":{int(o.index)},"cpu":{_cpu_text(o.cpu)},"tag":{int(o.tag)}}}'
        )
    if o.op == "tph_enable":
        mode = "null" if o.mode is None else _ESC(o.mode)
        width = "null" if o.width is None else str(int(o.width))
        return f'{{"op":"tph_enable","mode":{mode},"width":{width}}}'
    return f'{{"op":{_ESC(o.op)}}}'


def decision_head(d: Decision) -> str:
    """:func:`decision_text` of ``d`` up to its writes: verdict, reasons and detail."""
    key = (d.verdict, d.reason, d.reasons, d.detail)
    head = _HEADS.get(key)
    if head is None:
        head = cache_put(
            _HEADS,
            key,
            f'{{"verdict":{_ESC(VERDICT_NAMES[d.verdict])},"reason":{_ESC(d.reason)},'
            f'"reasons":[{",".join(_ESC(r) for r in d.reasons)}],"detail":{_ESC(d.detail)}',
        )
    return head


def rule_text(rule: str | None) -> str:
    """:func:`decision_text`'s last member: the policy rule (nothing without one)."""
    text = _RULES.get(rule)
    if text is None:
        text = cache_put(_RULES, rule, f',"rule":{_ESC(rule)}' if rule else "")
    return text


def decision_text(d: Decision) -> str:
    """``encode(decision_wire(d))`` without its newline."""
    head = decision_head(d)
    if len(d.writes) == 1:
        writes = one_write_text(d.writes[0])
    elif not d.writes:
        writes = ""
    elif not (starts := _run_starts(d.writes)):  # no runs: one by one, as in the audit line
        writes = writes_text(d.writes)
    else:
        groups = _write_groups(d.writes, starts)
        writes = ",".join([write_text(w, c, st) for w, c, st in groups])
    ops = ""
    if d.ops is not None:
        ops = ',"ops":[' + ",".join([op_text(o, c) for o, c in _op_groups(d.ops)]) + "]"
    view = ""
    if d.read_mask:
        gv = "null" if d.guest_value is None else str(int(d.guest_value))
        view = f',"guest_value":{gv},"read_mask":{int(d.read_mask)}'
    return f'{head},"writes":[{writes}]{ops}{view}{rule_text(d.rule)}}}'


def id_text(rid: int | str | None) -> str:
    """A request id as JSON."""
    if rid is None:
        return "null"
    if isinstance(rid, str):
        return _ESC(rid)
    return str(int(rid))


def access_reply(rid: int | str | None, d: Decision) -> bytes:
    """``reply(rid, decision=decision_wire(d))``, written directly (the per-access reply)."""
    return f'{{"id":{id_text(rid)},"ok":true,"decision":{decision_text(d)}}}\n'.encode()


def reply(rid: int | str | None, **fields: Any) -> bytes:
    return encode({"id": rid, "ok": True, **fields})


def error_reply(
    rid: int | str | None, code: str, message: str, field: str | None = None, **extra: Any
) -> bytes:
    """``{"id", "ok": false, "error": {code, message[, field]}, **extra}`` (e.g. a decision)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return encode({"id": rid, "ok": False, "error": err, **extra})


# --- values in hex, for people typing a session (serve --hex) -----------------------------
#: The reply fields holding register offsets and values: ``serve --hex`` writes them as
#: ``"0x..."`` strings. Requests accept that form anyway; programs must not ask for it.
HEX_FIELDS = frozenset({"offset", "value", "guest_value", "read_mask", "device_value"})


def hex_values(obj: Any) -> Any:
    """``obj`` with every integer of a :data:`HEX_FIELDS` key as a ``"0x..."`` string."""
    if isinstance(obj, dict):
        return {
            k: hex(v) if k in HEX_FIELDS and type(v) is int else hex_values(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [hex_values(v) for v in obj]
    return obj


def hex_reply(lines: bytes) -> bytes:
    """Reply (and event) lines with their values in hex (:func:`hex_values`)."""
    return b"".join(encode(hex_values(json.loads(line))) for line in lines.splitlines())
