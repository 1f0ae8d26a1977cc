"""The floor for a plugin of tphtrap's shape: a child speaking the same framing, doing nothing.

It runs the I/O loop of ``tphtrap.serve.serve_forever`` without the plugin: ``select`` on
standard input, on a second pipe (serve's signal wake-up pipe, never written here) and, while
replies wait, on standard output; then one ``os.read`` of up to 64 KiB, split into lines at
``\\n`` (a trailing ``\\r`` and blank lines dropped), one reply line per request, and the
replies of that read written at once with ``os.write`` on the non-blocking standard output
(what the pipe does not take waits for the next ``select``). EOF ends it.

Two modes, given as the only argument:

``json``
    the floor of any JSON-lines plugin: ``json.loads`` the request, then encode
    ``{"id": <its id>, "ok": true, "decision": {...}}`` with a reused compact
    ``json.JSONEncoder`` and a fixed decision, the one ``serve`` gives a granted TPH control
    write (a reply of the same size and shape as serve's).
``bytes``
    the transport floor: the request line itself is written back (no JSON at all).

Same interpreter as the plugin (the one running the benchmark), same pipes, nothing imported
from tphtrap.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
from collections.abc import Callable

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
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def reply_json(line: bytes) -> bytes:
    req = json.loads(line)
    rid = req.get("id") if isinstance(req, dict) else None
    return _ENCODE({"id": rid, "ok": True, "decision": DECISION}).encode() + b"\n"


def reply_bytes(line: bytes) -> bytes:
    return line + b"\n"


def serve(reply: Callable[[bytes], bytes], in_fd: int = 0, out_fd: int = 1) -> int:
    """The shape of ``tphtrap.serve.serve_forever``: one select on stdin, the signal pipe and
    (while replies wait) stdout; non-blocking stdout, replies written as soon as they exist."""
    rpipe, wpipe = os.pipe()
    os.set_blocking(rpipe, False)
    os.set_blocking(out_fd, False)
    buf = bytearray()
    out = bytearray()
    eof = False
    try:
        while True:
            if out:
                with contextlib.suppress(BlockingIOError):
                    del out[: os.write(out_fd, out)]
            if eof and not out:
                return 0
            ready, _, _ = select.select(
                [rpipe] if eof else [in_fd, rpipe], [out_fd] if out else [], []
            )
            if in_fd not in ready:
                continue
            chunk = os.read(in_fd, 1 << 16)
            eof = not chunk
            if eof and buf:
                buf += b"\n"
            buf += chunk
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line = bytes(buf[start:nl])
                start = nl + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line.strip():
                    continue
                out += reply(line)
            del buf[:start]
    except BrokenPipeError:
        return 0
    finally:
        os.set_blocking(out_fd, True)
        os.close(rpipe)
        os.close(wpipe)


def main(argv: list[str]) -> int:
    modes = {"json": reply_json, "bytes": reply_bytes}
    if len(argv) != 1 or argv[0] not in modes:
        print("usage: echo_child.py json|bytes", file=sys.stderr)
        return 2
    return serve(modes[argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
