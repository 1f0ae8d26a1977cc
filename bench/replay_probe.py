"""One replay measurement in a fresh interpreter; prints one JSON object on standard output.

    replay_probe.py decode-native TRACE     json.loads() every line (the native baseline)
    replay_probe.py decode-qemu TRACE       qemu_trace.parse_line() every line (the QEMU one)
    replay_probe.py replay TRACE ARGS...    tphtrap replay TRACE ARGS... --json, in-process

``seconds`` is the wall time of the measured part only (for ``replay``: the whole command,
policy and device loading included, interpreter start-up excluded). ``maxrss_kb`` is the
process's peak resident set size, which is what shows whether memory grows with the trace:
``VmHWM`` from ``/proc/self/status`` on Linux (``getrusage``'s ``ru_maxrss`` keeps the peak of
the process image before ``execve``, here the forked benchmark driver), else ``ru_maxrss``.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

# Measure the tree this script is in, whatever tphtrap the interpreter has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def decode_native(path: str) -> dict[str, Any]:
    loads = json.loads
    lines = 0
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            loads(line)
            lines += 1
    return {"seconds": time.perf_counter() - start, "lines": lines}


def decode_qemu(path: str) -> dict[str, Any]:
    from tphtrap.errors import TraceError
    from tphtrap.qemu_trace import parse_line

    lines = events = 0
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            lines += 1
            try:
                if parse_line(line) is not None:
                    events += 1
            except TraceError:
                pass
    return {"seconds": time.perf_counter() - start, "lines": lines, "events": events}


def replay(args: list[str]) -> dict[str, Any]:
    from tphtrap.cli import main

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main(["replay", *args, "--json", "--progress", "never"])
    seconds = time.perf_counter() - start
    summary = json.loads(out.getvalue())
    return {
        "seconds": seconds,
        "rc": rc,
        "records": summary["records"]["count"],
        "from_memory": summary["records"]["from_memory"],
        "skipped": summary["skipped"]["count"],
        "malformed": summary["malformed"]["count"],
        "not_judged": summary["not_judged"],
        "mismatches": summary["mismatches"],
    }


def peak_rss_kb() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "decode-native":
        result = decode_native(rest[0])
    elif mode == "decode-qemu":
        result = decode_qemu(rest[0])
    elif mode == "replay":
        result = replay(rest)
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    result["maxrss_kb"] = peak_rss_kb()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
