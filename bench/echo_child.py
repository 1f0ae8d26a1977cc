"""The floor for a plugin of tphtrap's shape: a child speaking the same framing, doing nothing.

It runs the I/O loop of ``tphtrap serve`` itself, ``tphtrap.serve.serve_forever``, with a
stand-in for the plugin: ``poll`` on standard input, on the signal wake-up pipe and, while
replies wait, on standard output; one ``os.read`` of up to 64 KiB, split into lines at
``\\n`` (a trailing ``\\r`` and blank lines dropped), one reply line per request, and the
replies of that read written at once on the non-blocking standard output. EOF ends it. Any
change to serve's loop is a change to this floor too.

Two modes, given as the only argument:

``json``
    the floor of any JSON-lines plugin: decode the request with the JSON decoder ``serve``
    uses (msgspec's, in C), then encode ``{"id": <its id>, "ok": true, "decision": {...}}``
    with msgspec's encoder and a fixed decision, the one ``serve`` gives a granted TPH control
    write (a reply of the same size and shape as serve's).
``bytes``
    the transport floor: the request line itself is written back (no JSON at all).

Same interpreter as the plugin (the one running the benchmark), same pipes; nothing of
tphtrap runs per line but the loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import msgspec

from tphtrap.serve import serve_forever

# What serve answers for a granted TPH control write of tenant-a (docs/protocol.md).
DECISION = {
    "verdict": "pass",
    "reason": "control-granted",
    "reasons": ["control-granted"],
    "detail": "TPH control write allowed as requested",
    "writes": [{"space": "config", "offset": 336, "width": 4, "value": 257}],
    "guest_value": 257,
    "read_mask": 4294967295,
    "rule": "vms.tenant-a.devices.0000:3b:00.0",
}
_DECODE = msgspec.json.Decoder().decode
_ENCODE = msgspec.json.Encoder().encode


def reply_json(line: bytes) -> bytes:
    req = _DECODE(line)
    rid = req.get("id") if isinstance(req, dict) else None
    return _ENCODE({"id": rid, "ok": True, "decision": DECISION}) + b"\n"


def reply_bytes(line: bytes) -> bytes:
    return line + b"\n"


class _Echo:
    """What ``serve_forever`` needs of a ``Server``, answering every line with ``reply``."""

    policy_path = None
    stopping = False

    def __init__(self, reply: Callable[[bytes], bytes]) -> None:
        self.reply = reply
        self.requests = 0
        self.audit = self  # emit() below: no audit stream

    def handle_line(self, line: bytes) -> bytes:
        self.requests += 1
        return self.reply(line)

    def done(self) -> bool:
        return False

    def pump(self, *_: object) -> None:
        return None  # (no native path: every line through the Python loop)

    def session_ended(self, *_: object) -> None:
        pass

    def emit(self, *_: object, **__: object) -> None:
        pass

    def _wire_error(self, err: Exception, line: bytes) -> bytes:
        return b'{"id":null,"ok":false}\n'


def serve(reply: Callable[[bytes], bytes], in_fd: int = 0, out_fd: int = 1) -> int:
    """``tphtrap.serve.serve_forever`` itself, with ``reply`` in place of the plugin."""
    return serve_forever(_Echo(reply), in_fd, out_fd)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    modes = {"json": reply_json, "bytes": reply_bytes}
    if len(argv) != 1 or argv[0] not in modes:
        print("usage: echo_child.py json|bytes", file=sys.stderr)
        return 2
    return serve(modes[argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
