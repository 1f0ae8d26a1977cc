"""The plugin protocol codec (docs/protocol.md): JSON lines in, JSON lines out. Pure.

``parse_request`` turns one line into a validated :class:`Request` or raises
:class:`~tphtrap.errors.WireError` carrying an error code, the request id when it could be read,
and the offending field. ``reply`` / ``error_reply`` / ``decision_json`` build the answers.
Every field of every operation is declared once, in :data:`OPS`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .device import normalize_bdf
from .errors import WireError
from .events import (
    VERDICT_NAMES,
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)

_V = TypeVar("_V")

__all__ = [
    "HEX_FIELDS",
    "MAX_LINE",
    "OPS",
    "PROTOCOL_VERSIONS",
    "Request",
    "access_reply",
    "decision_json",
    "decision_text",
    "did_you_mean",
    "encode",
    "error_reply",
    "hex_reply",
    "hex_values",
    "parse_request",
    "reply",
    "to_access",
]

PROTOCOL_VERSIONS = (2,)  # 2: unsolicited event lines (reload corrections); 1 is refused
# A 4096-byte config space as hex is 8192 characters; 64 KiB leaves ample room and bounds the
# memory one line can take (the reader refuses longer lines without buffering them).
MAX_LINE = 65536
MAX_ID_LEN = 128
MAX_NAME_LEN = 64


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    op: str
    args: Mapping[str, Any]


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
        },
    ),
    "detach": (_DEVICE, {}),
    "cfg_write": ({**_CFG, "value": _int_in(0, 0xFFFFFFFF)}, {}),
    "cfg_read": (_CFG, {}),
    "msix_write": ({**_BAR, "value": _int_in(0, _U64)}, {}),
    "msix_read": (_BAR, {}),
    "reset": (_DEVICE, {}),
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


# One decoder, built once (json.loads with a hook would build one per call).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``, minus its whitespace handling when the line is one object
    without surrounding blanks (what every client sends). Same results, same errors: anything
    else, including trailing data, goes through ``decode`` itself."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            obj, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end == len(text):
            return obj
    return _DECODER.decode(text)


def parse_request(line: bytes | str) -> Request:
    """Validate one protocol line (without its newline). Raises :class:`WireError`."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise WireError("line-too-long", f"line longer than {MAX_LINE} bytes")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("bad-utf8", f"not UTF-8 at byte {exc.start}") from None
    else:
        text = line
    try:
        obj = _decode(text)
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
    if type(obj) is dict:
        op = obj.get("op")
        if type(op) is str:
            fast = _FAST.get(op)
            if fast is not None:
                req = fast(obj, op)
                if req is not None:
                    return req
    return _validate(obj)


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
    if "expect" in obj:
        args["expect"] = obj["expect"]
    return Request(rid, op, args)


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


def _fast_device(obj: dict[str, Any], op: str) -> tuple[int | str, str, str] | None:
    """(id, vm, normalised bdf) when the id, vm and bdf are plainly valid, and the request
    carries no field ``op`` does not take."""
    if not obj.keys() <= _ALLOWED[op]:
        return None
    rid = obj.get("id")
    if type(rid) is int:
        if not _ID_MIN <= rid < _ID_MAX:
            return None
    elif type(rid) is not str or not 0 < len(rid) <= MAX_ID_LEN:
        return None
    vm = obj.get("vm")
    if type(vm) is not str or not 0 < len(vm) <= MAX_NAME_LEN or not vm.isprintable():
        return None
    raw = obj.get("bdf")
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


def _fast_cfg(obj: dict[str, Any], op: str) -> Request | None:
    head = _fast_device(obj, op)
    if head is None:
        return None
    offset = obj.get("offset")
    width = obj.get("width")
    if (
        type(offset) is not int
        or type(width) is not int
        or width not in _CFG_WIDTHS
        or not 0 <= offset <= 4096 - width
    ):
        return None
    rid, vm, bdf = head
    args: dict[str, Any] = {"vm": vm, "bdf": bdf, "offset": offset, "width": width}
    return _fast_finish(obj, op, rid, args, width)


def _fast_bar(obj: dict[str, Any], op: str) -> Request | None:
    head = _fast_device(obj, op)
    if head is None:
        return None
    bar = obj.get("bar")
    offset = obj.get("offset")
    width = obj.get("width")
    if (
        type(bar) is not int
        or not 0 <= bar <= _BAR_MAX
        or type(offset) is not int
        or type(width) is not int
        or width not in _BAR_WIDTHS
        or not 0 <= offset <= _U64 + 1 - width
    ):
        return None  # the slow path names the field at fault
    rid, vm, bdf = head
    args: dict[str, Any] = {"vm": vm, "bdf": bdf, "bar": bar, "offset": offset, "width": width}
    return _fast_finish(obj, op, rid, args, width)


_WRITE_OPS = frozenset({"cfg_write", "msix_write"})


def _fast_finish(
    obj: dict[str, Any], op: str, rid: int | str, args: dict[str, Any], width: int
) -> Request | None:
    """The value of a write (unsigned, within ``width`` bytes) and the optional ``expect``;
    ``width`` is not used for the other operations."""
    if op in _WRITE_OPS:
        value = obj.get("value")
        if type(value) is not int or value < 0 or value >> (8 * width):
            return None
        args["value"] = value
    if "expect" in obj:
        args["expect"] = obj["expect"]
    return Request(rid, op, args)


def _fast_reset(obj: dict[str, Any], op: str) -> Request | None:
    head = _fast_device(obj, op)
    if head is None:
        return None
    rid, vm, bdf = head
    return _fast_finish(obj, op, rid, {"vm": vm, "bdf": bdf}, 0)


_FAST: dict[str, Callable[[dict[str, Any], str], Request | None]] = {
    "cfg_write": _fast_cfg,
    "cfg_read": _fast_cfg,
    "msix_write": _fast_bar,
    "msix_read": _fast_bar,
    "reset": _fast_reset,
}


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
    out: dict[str, Any] = {
        "verdict": VERDICT_NAMES[d.verdict],
        "reason": d.reason,
        "reasons": list(d.reasons),
        "detail": d.detail,
        "writes": [w.to_json() for w in d.writes],
    }
    if d.read_mask:
        out["guest_value"] = d.guest_value
        out["read_mask"] = d.read_mask
    if d.rule:
        out["rule"] = d.rule
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


def write_text(w: DeviceWrite) -> str:
    """``encode(w.to_json())`` without its newline."""
    space = _SPACES.get(w.space) or _ESC(w.space)
    bar = "" if w.bar is None else f',"bar":{int(w.bar)}'
    return (
        f'{{"space":{space}{bar},"offset":{int(w.offset)},"width":{int(w.width)},'
        f'"value":{int(w.value)}}}'
    )


def decision_text(d: Decision) -> str:
    """``encode(decision_json(d))`` without its newline."""
    key = (d.verdict, d.reason, d.reasons, d.detail)
    head = _HEADS.get(key)
    if head is None:
        head = cache_put(
            _HEADS,
            key,
            f'{{"verdict":{_ESC(VERDICT_NAMES[d.verdict])},"reason":{_ESC(d.reason)},'
            f'"reasons":[{",".join(_ESC(r) for r in d.reasons)}],"detail":{_ESC(d.detail)}',
        )
    writes = ",".join([write_text(w) for w in d.writes])
    view = ""
    if d.read_mask:
        gv = "null" if d.guest_value is None else str(int(d.guest_value))
        view = f',"guest_value":{gv},"read_mask":{int(d.read_mask)}'
    rule = _RULES.get(d.rule)
    if rule is None:
        rule = cache_put(_RULES, d.rule, f',"rule":{_ESC(d.rule)}' if d.rule else "")
    return f'{head},"writes":[{writes}]{view}{rule}}}'


def id_text(rid: int | str | None) -> str:
    """A request id as JSON."""
    if rid is None:
        return "null"
    if isinstance(rid, str):
        return _ESC(rid)
    return str(int(rid))


def access_reply(rid: int | str | None, d: Decision) -> bytes:
    """``reply(rid, decision=decision_json(d))``, written directly (the per-access reply)."""
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


def hex_reply(line: bytes) -> bytes:
    """A reply line with its values in hex (:func:`hex_values`)."""
    return encode(hex_values(json.loads(line)))
