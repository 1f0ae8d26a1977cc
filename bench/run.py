#!/usr/bin/env python3
"""tphtrap benchmarks: plugin latency and throughput against an echo floor, replay throughput
against a bare decode loop, the engine alone. Writes a Markdown report (``bench/results.md``).

    .venv/bin/python bench/run.py --output bench/results.md      # what `make bench` runs
    .venv/bin/python bench/run.py --quick --output /tmp/r.md      # seconds, for a smoke test

Everything is measured side by side in one run and reported as absolute numbers and as ratios
to its baseline; nothing here is a pass/fail test of the code (the goals are only compared).
Progress goes to standard error. Generated traces live in a temporary directory (``--workdir``
to choose it, ``--keep`` to keep it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import fastpath  # noqa: E402
import workload  # noqa: E402
from engine_probe import no_check  # noqa: E402

GOAL_P50 = 1.25
GOAL_P99 = 1.5
GOAL_REPLAY = 0.5
# The fast-path goals: the guest's cost of a TPH decision over the physical floor of a plugin
# on pipes (a C client against a C echo child, pinned to one CPU).
GOAL_ADDED_P50_US = 8.0
GOAL_P99_VS_ECHO = 2.0
GOAL_TPH_PER_S = 150_000
GOAL_WORST_MS = 2.0
GOAL_CHECK_SHARE = 0.20
LATENCY_CHILDREN = ("serve", "echo-json", "echo-bytes")


@dataclass(frozen=True)
class Sizes:
    rounds: int  # latency, pipelined and engine rounds (median reported)
    blocks: int  # alternating blocks per child per latency round
    block: int  # ping-pongs per block
    warmup: int  # ping-pongs per child and request kind before measuring
    pipelined: int  # requests per pipelined measurement
    windows: tuple[int, ...]
    engine: int  # decisions per engine round
    native_big: int  # records
    native_small: int
    qemu_big: int  # lines
    qemu_small: int
    replay_rounds: int  # decode/replay pairs on the small traces (one pair on the big ones)
    c_pingpong: int  # round trips per C client measurement
    c_rounds: int  # C client measurements per row, the three children alternating
    worst_rounds: int  # width changes of the 2048-vector device
    updates: int  # Linux ST entry updates per child
    check_cycles: int  # workload cycles counted under callgrind (0: not measured)


FULL = Sizes(
    rounds=5,
    blocks=10,
    block=500,
    warmup=500,
    pipelined=20_000,
    windows=(64, 256),
    engine=150_000,
    native_big=1_000_000,
    native_small=100_000,
    qemu_big=1_000_000,
    qemu_small=100_000,
    replay_rounds=3,
    c_pingpong=10_000,
    c_rounds=3,
    worst_rounds=21,
    updates=2_000,
    check_cycles=100,
)
QUICK = Sizes(
    rounds=1,
    blocks=2,
    block=40,
    warmup=20,
    pipelined=400,
    windows=(64,),
    engine=3_000,
    native_big=4_000,
    native_small=1_000,
    qemu_big=4_000,
    qemu_small=1_000,
    replay_rounds=1,
    c_pingpong=100,
    c_rounds=1,
    worst_rounds=1,
    updates=20,
    check_cycles=0,
)


def progress(msg: str) -> None:
    elapsed = time.monotonic() - _T0
    print(f"[bench {elapsed:6.1f}s] {msg}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


# --- statistics -------------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- children -----------------------------------------------------------------------------------
class Child:
    """A plugin-shaped child on two pipes, driven with raw os.read/os.write."""

    def __init__(self, name: str, argv: list[str], stderr_path: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()

    def call(self, line: bytes) -> bytes:
        os.write(self.wfd, line)
        data = os.read(self.rfd, 1 << 16)
        while not data.endswith(b"\n"):
            more = os.read(self.rfd, 1 << 16)
            if not more:
                raise RuntimeError(f"{self.name} exited (see its stderr)")
            data += more
        return data

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()


def serve_argv(audit: Path) -> list[str]:
    """``tphtrap serve`` with the benchmark policy, auditing to ``audit``."""
    policy = str(workload.POLICY)
    return [sys.executable, "-m", "tphtrap", "serve", "--policy", policy, "--audit", str(audit)]


#: The audit file of the latency runs' serve child, in the work directory.
SERVE_AUDIT = "audit.jsonl"


def start_children(workdir: Path) -> dict[str, Child]:
    py = sys.executable
    argv = {
        "serve": serve_argv(workdir / SERVE_AUDIT),
        "echo-json": [py, str(HERE / "echo_child.py"), "json"],
        "echo-bytes": [py, str(HERE / "echo_child.py"), "bytes"],
    }
    children = {name: Child(name, cmd, workdir / f"{name}.stderr") for name, cmd in argv.items()}
    for child in children.values():
        for req in workload.setup_requests():
            reply = child.call(json.dumps(req, separators=(",", ":")).encode() + b"\n")
            if child.name == "serve" and b'"ok":true' not in reply:
                raise RuntimeError(f"serve refused the benchmark setup: {reply[:300]!r}")
    return children


# --- plugin latency -----------------------------------------------------------------------------
def pingpong(child: Child, lines: list[bytes], n: int, offset: int) -> list[int]:
    """``n`` request/reply round trips, one in flight; nanoseconds each."""
    wfd, rfd = child.wfd, child.rfd
    write, read, clock = os.write, os.read, time.perf_counter_ns
    k = len(lines)
    out = []
    for i in range(offset, offset + n):
        line = lines[i % k]
        t0 = clock()
        write(wfd, line)
        data = read(rfd, 65536)
        while data[-1:] != b"\n":
            data += read(rfd, 65536)
        out.append(clock() - t0)
    if child.name == "serve" and b'"ok":true' not in data:
        raise RuntimeError(f"serve refused a benchmark request: {data[:300]!r}")
    return out


@dataclass
class LatencyRow:
    kind: str
    # child -> per-round (p50, p99, mean) in microseconds
    rounds: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    samples: int = 0

    def stat(self, child: str, i: int) -> float:
        return median([r[i] for r in self.rounds[child]])

    def ratio(self, child: str, base: str, i: int) -> float:
        """Median over rounds of the per-round ratio (each round's drift cancels)."""
        return median(
            [a[i] / b[i] for a, b in zip(self.rounds[child], self.rounds[base], strict=True)]
        )


def bench_latency(children: dict[str, Child], sizes: Sizes, audit: Path) -> list[LatencyRow]:
    """Each kind's rounds; serve's audit file (``audit``) is emptied before each round, as
    logrotate's ``copytruncate`` does (serve appends: its next line starts the file again),
    so that no round pays for writing back what the rounds before it left."""
    rows = []
    names = list(LATENCY_CHILDREN)
    for kind in workload.LATENCY_KINDS:
        lines = workload.latency_requests(kind)
        row = LatencyRow(kind)
        for name in names:
            for i in range(0, sizes.warmup, 50):  # warm up, and check every reply once
                pingpong(children[name], lines, min(50, sizes.warmup - i), i)
            row.rounds[name] = []
        for rnd in range(sizes.rounds):
            os.truncate(audit, 0)
            samples: dict[str, list[int]] = {name: [] for name in names}
            for b in range(sizes.blocks):
                order = names[b % 3 :] + names[: b % 3]  # rotate who goes first
                for name in order:
                    samples[name] += pingpong(children[name], lines, sizes.block, b * sizes.block)
            for name in names:
                s = sorted(v / 1000 for v in samples[name])
                row.rounds[name].append(
                    (percentile(s, 0.5), percentile(s, 0.99), statistics.fmean(s))
                )
            row.samples = len(samples["serve"])
            progress(
                f"latency {kind} round {rnd + 1}/{sizes.rounds}: p50 "
                + ", ".join(f"{n} {row.rounds[n][-1][0]:.1f}us" for n in names)
            )
        rows.append(row)
    return rows


# --- pipelined throughput ---------------------------------------------------------------------
def mixed_lines() -> list[bytes]:
    per_kind = [workload.latency_requests(kind) for kind in workload.LATENCY_KINDS]
    return [line for group in zip(*per_kind, strict=True) for line in group]


def pipelined(child: Child, lines: list[bytes], n: int, window: int) -> float:
    """Requests per second with up to ``window`` requests in flight."""
    wfd, rfd = child.wfd, child.rfd
    k = len(lines)
    sent = received = refused = 0
    start = time.perf_counter()
    while received < n:
        room = min(window - (sent - received), n - sent)
        if room > 0:
            data = b"".join([lines[(sent + j) % k] for j in range(room)])
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view) :]
            sent += room
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            raise RuntimeError(f"{child.name} exited (see its stderr)")
        received += chunk.count(b"\n")
        refused += chunk.count(b'"ok":false')
    seconds = time.perf_counter() - start
    if refused:
        raise RuntimeError(f"{child.name} refused {refused} benchmark requests")
    return n / seconds


def bench_pipelined(children: dict[str, Child], sizes: Sizes) -> dict[int, dict[str, list[float]]]:
    lines = mixed_lines()
    results: dict[int, dict[str, list[float]]] = {}
    names = list(LATENCY_CHILDREN)
    for window in sizes.windows:
        results[window] = {name: [] for name in names}
        for name in names:
            pipelined(children[name], lines, min(2000, sizes.pipelined), window)  # warm-up
        for rnd in range(sizes.rounds):
            order = names[rnd % 3 :] + names[: rnd % 3]
            for name in order:
                results[window][name].append(
                    pipelined(children[name], lines, sizes.pipelined, window)
                )
            progress(
                f"pipelined window {window} round {rnd + 1}/{sizes.rounds}: "
                + ", ".join(f"{n} {results[window][n][-1]:,.0f} req/s" for n in names)
            )
    return results


# --- the C client: ping-pong against serve and against a C echo child -----------------------------
C_KINDS = {
    "tph-control": "TPH control of tenant-a, enable / disable alternating",
    "st-entry": "ST table entry of tenant-a (allowed tag)",
    "vector-control": "Vector Control of tenant-b (16-bit tag, mask bit toggled)",
    "non-tph": "PCI Command register (outside TPH)",
    "msix-non-tph": "Message Address of a tenant-b vector, moved (MSI-X table, not Vector Control)",
    "tph-control-read": "TPH control of tenant-a read (served from the guest's view)",
    "vector-control-read": "Vector Control of tenant-b read (its tag from the guest's view)",
}


#: The latency request kind (bench/workload.py) each C client kind sends.
C_KIND_OF = {
    "tph-control": "cfg_write TPH control",
    "st-entry": "cfg_write ST entry",
    "vector-control": "msix_write Vector Control",
    "non-tph": "cfg_write non-TPH",
    "msix-non-tph": "msix_write non-TPH",
    "tph-control-read": "cfg_read TPH control",
    "vector-control-read": "msix_read Vector Control",
}
C_STATS = ("p50_us", "p99_us", "mean_us")
#: The C echo child auditing to a file (``echo --audit FILE``): the floor of a plugin that
#: writes a line per decision to a file before its reply, as serve does.
AUDITED = "echo+audit"


@dataclass
class CRow:
    pinned: bool
    backend: str  # "writes" | "host" | "" for the echo child | AUDITED for it auditing to a file
    kind: str
    p50: float
    p99: float
    mean: float


def build_c(workdir: Path) -> tuple[Path, Path] | str:
    """(pingpong, echo) built with cc, or why not."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc): install gcc"
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2"]
    lib = ROOT / "clients" / "c"
    pingpong, echo = workdir / "pingpong", workdir / "echo"
    for out, srcs in (
        (pingpong, [HERE / "c" / "pingpong.c", lib / "tphtrap.c"]),
        (echo, [HERE / "c" / "echo.c"]),
    ):
        cmd = [cc, *flags, "-I", str(lib), "-o", str(out), *map(str, srcs)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"building {out.name} failed: {done.stderr.strip()[:300]}"
    return pingpong, echo


def bench_c(
    sizes: Sizes, workdir: Path, built: tuple[Path, Path] | str, cpu: int
) -> list[CRow] | str:
    """The C client library's ping-pong (one request in flight) against serve in both backends
    and against the C echo child, unpinned and pinned to one CPU with taskset."""
    if isinstance(built, str):
        return built
    pingpong, echo = built
    taskset = shutil.which("taskset")
    # Each run audits to a new file, removed after it: a file grown by every run before would
    # have each later run pay for writing back what the earlier ones left.
    audit_files = (workdir / "audit-c.jsonl", workdir / "audit-c-echo.jsonl")
    serve = serve_argv(audit_files[0])
    audited = [str(echo), "--audit", str(audit_files[1])]
    rows: list[CRow] = []
    for pinned in (False, True):
        if pinned and taskset is None:
            continue
        prefix = [taskset, "-c", str(cpu)] if pinned and taskset else []
        for kind in C_KINDS:
            runs = [
                ("writes", serve, False),
                ("host", serve, False),
                ("", [str(echo)], True),
                (AUDITED, audited, True),
            ]
            got: dict[str, list[dict[str, float]]] = {backend: [] for backend, _, _ in runs}
            for rnd in range(sizes.c_rounds):
                turn = rnd % len(runs)
                for backend, child, is_echo in runs[turn:] + runs[:turn]:
                    argv = [*prefix, str(pingpong), kind, "host" if backend == "host" else "writes"]
                    argv += [str(sizes.c_pingpong), str(ROOT)]
                    argv += [*(["--echo"] if is_echo else []), "--", *child]
                    done = subprocess.run(
                        argv, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300
                    )
                    for path in audit_files:
                        path.unlink(missing_ok=True)
                    if done.returncode != 0:
                        raise RuntimeError(f"C ping-pong {kind} {backend} failed: {done.stderr}")
                    got[backend].append(json.loads(done.stdout))
            for backend, results in got.items():
                p50, p99, mean = (median([r[k] for r in results]) for k in C_STATS)
                rows.append(CRow(pinned, backend, kind, p50, p99, mean))
            progress(
                f"C ping-pong {'pinned' if pinned else 'unpinned'} {kind}: p50 "
                + ", ".join(f"{x.backend or 'echo'} {x.p50:.1f}us" for x in rows[-len(runs) :])
            )
    return rows


# --- in-process costs: the server without pipes, the engine alone ------------------------------
def bench_inprocess(sizes: Sizes, workdir: Path) -> dict[str, dict[str, float]]:
    """Microseconds per request of ``Server.handle_line`` (audit to a file, as in the latency
    runs) and of the echo child's json reply, per latency kind."""
    import echo_child

    from tphtrap.audit import Auditor
    from tphtrap.policyfile import load_policy
    from tphtrap.serve import Server
    from tphtrap.wire import access_reply, parse_request, to_access

    auditor = Auditor.to_file(str(workdir / "audit-inprocess.jsonl"))  # as serve --audit does
    policy = load_policy(str(workload.POLICY))
    server = Server(policy, str(workload.POLICY), auditor)
    # The Python path, and the engine its parts are timed on (a server's engine is changed
    # through its handle_line only: the native path arms sessions from what that did).
    python = Server(policy, str(workload.POLICY), auditor, native=False)
    for req in workload.setup_requests():
        server.handle_line(json.dumps(req).encode())
        python.handle_line(json.dumps(req).encode())
    n = max(200, sizes.engine // 20)
    out: dict[str, dict[str, float]] = {}
    for kind in workload.LATENCY_KINDS:
        lines = [line.rstrip(b"\n") for line in workload.latency_requests(kind)]
        k = len(lines)
        accesses = [to_access(parse_request(line)) for line in lines]
        decisions = [python.engine.handle(a) for a in accesses]  # one cycle of the same states
        steps: dict[str, Any] = {
            "serve": server.handle_line,
            "python": python.handle_line,
            "echo-json": echo_child.reply_json,
            "parse": parse_request,
            "engine": lambda i, acc=accesses: python.engine.handle(acc[i]),
            "audit": lambda i, acc=accesses, dec=decisions: auditor.decided(
                acc[i], dec[i], {"id": i}
            ),
            "reply": lambda i, dec=decisions: access_reply(i, dec[i]),
        }
        costs: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(sizes.rounds):
            for name, fn in steps.items():
                by_index = name in ("engine", "audit", "reply")
                start = time.perf_counter()
                for i in range(n):
                    fn(i % k if by_index else lines[i % k])
                costs[name].append((time.perf_counter() - start) / n * 1e6)
        out[kind] = {name: median(v) for name, v in costs.items()}
    auditor.close()
    return out


def bench_engine(sizes: Sizes) -> dict[str, list[float]]:
    """Decisions per second of ``Engine.handle`` on the mixed native-trace workload, with the
    self-check on (``checked``, what tphtrap runs) and off (``unchecked``, measurement only),
    rounds alternating so both see the same machine."""
    from tphtrap.engine.render import RawWrites

    accesses = workload.cycle_accesses()
    loops = max(1, sizes.engine // len(accesses))
    check = RawWrites.check
    rates: dict[str, list[float]] = {"checked": [], "unchecked": []}
    try:
        for _ in range(sizes.rounds + 2):
            for mode in rates:
                RawWrites.check = check if mode == "checked" else no_check  # type: ignore[method-assign]
                handle = workload.attached_engine().handle
                start = time.perf_counter()
                for _ in range(loops):
                    for access in accesses:
                        handle(access)
                rates[mode].append(loops * len(accesses) / (time.perf_counter() - start))
    finally:
        RawWrites.check = check  # type: ignore[method-assign]
    # the first rounds warm up
    return {mode: r[2:] if len(r) > 2 else r for mode, r in rates.items()}


def bench_check_instructions(cycles: int) -> dict[str, float] | str:
    """Instructions per decision of ``bench/engine_probe.py`` with the self-check on and
    off, counted by ``valgrind --tool=callgrind``: the difference between one warm-up cycle
    and 1 + CYCLES (start-up and first-use costs cancel), or why not."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return "valgrind not installed (apt-get install valgrind)"
    out: dict[str, float] = {}
    for mode in ("checked", "unchecked"):
        counts = []
        for n in (1, 1 + cycles):
            done = subprocess.run(
                [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                 sys.executable, str(HERE / "engine_probe.py"), mode, str(n)],
                cwd=ROOT, capture_output=True, text=True, check=False, timeout=600,
            )  # fmt: skip
            found = re.search(r"Collected : (\d+)", done.stderr)
            if done.returncode != 0 or found is None:
                return f"callgrind failed: {done.stderr.strip()[-300:]}"
            counts.append(int(found[1]))
            per_cycle = int(done.stdout.strip() or 0)
        out[mode] = (counts[1] - counts[0]) / (cycles * per_cycle)
    return out


# --- replay ----------------------------------------------------------------------------------
@dataclass
class ReplayRow:
    trace: str
    kind: str  # native | qemu
    lines: int
    records: int = 0
    baseline_s: list[float] = field(default_factory=list)
    replay_s: list[float] = field(default_factory=list)
    baseline_rss_kb: int = 0
    replay_rss_kb: int = 0
    size_bytes: int = 0
    from_memory: int = 0  # records the replay's memo counted (a line again in the same state)
    fresh_s: float | None = None  # one replay with --no-memo (the small traces)

    def ratio(self) -> float:
        return median([b / r for b, r in zip(self.baseline_s, self.replay_s, strict=True)])


def probe(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "replay_probe.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"replay probe {args[:2]} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def bench_replay(sizes: Sizes, workdir: Path) -> list[ReplayRow]:
    rows: list[ReplayRow] = []
    specs: list[tuple[str, str, int, int]] = [
        ("native", "native", sizes.native_small, sizes.replay_rounds),
        ("native", "native", sizes.native_big, 1),
        ("qemu", "qemu", sizes.qemu_small, sizes.replay_rounds),
        ("qemu", "qemu", sizes.qemu_big, 1),
    ]
    device_args = [a for d in workload.QEMU_DEVICES for a in ("--device", d)]
    for kind, _, size, rounds in specs:
        if kind == "native":
            path = workdir / f"native-{size}.jsonl"
            progress(f"writing a native trace of {size:,} records")
            lines = workload.write_native_trace(path, size)
            base_mode, replay_args = "decode-native", [str(path), "--policy", str(workload.POLICY)]
        else:
            path = workdir / f"qemu-{size}.log"
            progress(f"writing a QEMU trace of {size:,} lines")
            lines = workload.write_qemu_trace(path, size)
            base_mode = "decode-qemu"
            replay_args = [str(path), "--policy", str(workload.POLICY), *device_args]
        row = ReplayRow(path.name, kind, lines, size_bytes=path.stat().st_size)
        for rnd in range(rounds):
            base = probe(base_mode, str(path))
            rep = probe("replay", *replay_args)
            if rep["rc"] != 0 or rep["malformed"]:
                raise RuntimeError(f"replay of {path.name} did not run cleanly: {rep}")
            if kind == "native" and rep["records"] != size:
                raise RuntimeError(f"replay of {path.name}: {rep['records']} records, not {size}")
            row.records = rep["records"]
            row.baseline_s.append(base["seconds"])
            row.replay_s.append(rep["seconds"])
            row.baseline_rss_kb = max(row.baseline_rss_kb, base["maxrss_kb"])
            row.replay_rss_kb = max(row.replay_rss_kb, rep["maxrss_kb"])
            row.from_memory = rep["from_memory"]
            progress(
                f"replay {path.name} round {rnd + 1}/{rounds}: decode {base['seconds']:.2f}s, "
                f"replay {rep['seconds']:.2f}s ({rep['records'] / rep['seconds']:,.0f} records/s,"
                f" {rep['from_memory'] / max(rep['records'], 1):.0%} from memory,"
                f" peak RSS {rep['maxrss_kb'] / 1024:.0f} MiB)"
            )
        if rounds > 1:  # what the memo saves: every access decided afresh, once
            fresh = probe("replay", *replay_args, "--no-memo")
            if fresh["rc"] != 0 or fresh["records"] != row.records or fresh["from_memory"]:
                raise RuntimeError(f"--no-memo replay of {path.name} differs: {fresh}")
            row.fresh_s = fresh["seconds"]
            progress(f"replay {path.name} --no-memo: {fresh['seconds']:.2f}s")
        path.unlink()  # the big traces are large; keep the disk footprint to one at a time
        rows.append(row)
    return rows


# --- the machine ------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": load,
        "memory": host_memory(),
    }
    try:
        from tphtrap import __version__

        info["tphtrap"] = __version__
    except ImportError:  # pragma: no cover
        info["tphtrap"] = "?"

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        info["commit"] = head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "n/a"
    return info


def host_memory() -> str:
    """What gives this machine's memory back to its host, as Linux shows it: running DAMON
    schemes (``pageout`` drops cold page-cache pages) and a bound virtio balloon. Memory the
    host takes back is faulted in again on next use, which a file that grows (an audit file)
    meets page by page."""
    found = []
    for kdamond in sorted(Path("/sys/kernel/mm/damon/admin/kdamonds").glob("[0-9]*")):
        try:
            if (kdamond / "state").read_text().strip() != "on":
                continue
            actions = sorted(
                {a.read_text().strip() for a in kdamond.glob("contexts/*/schemes/*/action")}
            )
        except OSError:
            continue
        found.append(f"DAMON on ({', '.join(actions) or 'monitoring only'})")
    balloon = Path("/sys/bus/virtio/drivers/virtio_balloon")
    if any(balloon.glob("virtio*")):
        found.append("virtio balloon bound")
    return "; ".join(found) or "nothing found (no running DAMON scheme, no virtio balloon)"


# --- the report ---------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


@dataclass
class FastPath:
    kind_piped: dict[str, dict[str, list[float]]]  # kind -> child -> req/s per round
    worst: fastpath.Worst
    trap: fastpath.TrapShare
    instructions: dict[str, float] | str  # per decision, self-check on and off; or why not
    update: dict[str, dict[str, list[float]]]  # child -> request of the update -> round trips


def fastpath_section(
    fast: FastPath, c_rows: list[CRow] | str, engine: dict[str, list[float]]
) -> list[str]:
    """The fast-path goals (the guest's cost of a TPH decision) and their table."""
    out: list[str] = []
    w = out.append
    w("## Fast path: the guest's cost of a decision")
    w("")
    w(
        "The plugin sits in the guest's VM-exit path. The floor of any plugin on pipes is a C "
        "client against a C echo child on the same pipes (`bench/c/`), both pinned to one CPU; "
        "the goals are what `tphtrap serve` adds to it, with the self-check on, in both "
        "backends. Pipelined: each request kind alone, "
        f"{fastpath.PIPE_WINDOW} in flight, driven from Python (`bench/run.py`, pinned like "
        "the latency runs), serve against "
        "the C echo child."
    )
    w("")
    pinned = [] if isinstance(c_rows, str) else [r for r in c_rows if r.pinned]
    got = {(r.backend, r.kind): r for r in pinned}
    kinds_c = C_KIND_OF
    if pinned:
        w(
            "| request | serve p50 / p99 (writes) | serve p50 / p99 (host) | C echo p50 / p99 | "
            "C echo + audit file p50 / p99 | added p50 writes / host | "
            "serve req/s (64 in flight) | C echo req/s |"
        )
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        for ck, kind in kinds_c.items():
            wr, ho, ec = got.get(("writes", ck)), got.get(("host", ck)), got.get(("", ck))
            ea = got.get((AUDITED, ck))
            if wr is None or ho is None or ec is None or ea is None:
                continue
            piped = fast.kind_piped.get(kind, {})
            s = f"{median(piped['serve']):,.0f}" if piped.get("serve") else "n/a"
            e = f"{median(piped['c-echo']):,.0f}" if piped.get("c-echo") else "n/a"
            w(
                f"| {kind} | {wr.p50:.1f} / {wr.p99:.1f} | {ho.p50:.1f} / {ho.p99:.1f} | "
                f"{ec.p50:.1f} / {ec.p99:.1f} | {ea.p50:.1f} / {ea.p99:.1f} | "
                f"{wr.p50 - ec.p50:+.1f} / {ho.p50 - ec.p50:+.1f} | {s} | {e} |"
            )
        w("")
        w(
            "The goals compare serve with the C echo, which writes nothing else. Serve writes "
            "the `access.decided` line of each TPH decision to its audit file before the reply "
            "(the two non-TPH kinds are not audited); the C echo + audit file "
            "(`bench/c/echo.c --audit FILE`) appends a line of that size and shape per request "
            "to a file in the same directory before its replies: what that write alone costs "
            "this machine, beside the floor."
        )
        w("")
    w("| goal | measured | target | |")
    w("|---|---|---|---|")
    for backend in ("writes", "host"):
        for ck, kind in kinds_c.items():
            r, e = got.get((backend, ck)), got.get(("", ck))
            if r is None or e is None:
                continue
            added, ratio = r.p50 - e.p50, r.p99 / e.p99
            w(
                f"| added p50 over the C echo, pinned, {backend} backend, {kind} | "
                f"{added:+.1f} µs | <= {GOAL_ADDED_P50_US:.0f} µs | "
                f"{verdict(added <= GOAL_ADDED_P50_US)} |"
            )
            w(
                f"| p99 against the C echo's p99, pinned, {backend} backend, {kind} | "
                f"{ratio:.1f}x | <= {GOAL_P99_VS_ECHO:.0f}x | "
                f"{verdict(ratio <= GOAL_P99_VS_ECHO)} |"
            )
    audited = [
        (r.p99 / a.p99, r.backend, kind)
        for ck, kind in kinds_c.items()
        if kind in fastpath.TPH_KINDS and (a := got.get((AUDITED, ck))) is not None
        for r in (got.get(("writes", ck)), got.get(("host", ck)))
        if r is not None
    ]
    if audited:
        ratio, backend, kind = max(audited)
        w(
            f"| p99 against the C echo + audit file's p99, pinned (the highest: {backend} "
            f"backend, {kind}) | {ratio:.1f}x | (measured, no target) | |"
        )
    if not pinned:
        why = c_rows if isinstance(c_rows, str) else "no taskset"
        w(f"| the C client goals | not measured: {why} | | |")
    tph = [
        (median(v["serve"]), kind)
        for kind, v in fast.kind_piped.items()
        if kind in fastpath.TPH_KINDS and v.get("serve")
    ]
    if tph:
        rate, kind = min(tph)
        w(
            f"| TPH decisions/s, {fastpath.PIPE_WINDOW} in flight (slowest kind: {kind}) | "
            f"{rate:,.0f} | >= {GOAL_TPH_PER_S:,} | {verdict(rate >= GOAL_TPH_PER_S)} |"
        )
    update = update_rows(fast.update)
    for step, (p50, _, echo50, _) in update.items():
        added = p50 - echo50
        w(
            f"| added p50 over the C echo, Linux ST entry update: {step} (pinned, Python "
            f"driver) | {added:+.1f} µs | <= {GOAL_ADDED_P50_US:.0f} µs | "
            f"{verdict(added <= GOAL_ADDED_P50_US)} |"
        )
    ms = median(fast.worst.rounds)
    w(
        f"| worst single decision ({fast.worst.vectors} vectors, width change: "
        f"{fast.worst.writes:,} writes), round trip | {ms:.2f} ms | <= {GOAL_WORST_MS:.0f} ms | "
        f"{verdict(ms <= GOAL_WORST_MS)} |"
    )
    w(
        f"| ... its reply | {fast.worst.reply_bytes:,} bytes | <= max_reply "
        f"{fast.worst.max_reply:,} | {verdict(fast.worst.reply_bytes <= fast.worst.max_reply)} |"
    )
    share = median([1 - c / u for c, u in zip(engine["checked"], engine["unchecked"], strict=True)])
    w(
        f"| self-check share of a decision (engine alone, time) | {share:.1%} | < "
        f"{GOAL_CHECK_SHARE:.0%} | {verdict(share < GOAL_CHECK_SHARE)} |"
    )
    ins = fast.instructions
    if isinstance(ins, str):
        w(f"| self-check share of a decision (instructions) | not measured: {ins} | | |")
    else:
        ishare = 1 - ins["unchecked"] / ins["checked"]
        w(
            f"| self-check share of a decision (instructions: {ins['checked']:,.0f} per "
            f"decision, {ins['unchecked']:,.0f} without it) | {ishare:.1%} | < "
            f"{GOAL_CHECK_SHARE:.0%} | {verdict(ishare < GOAL_CHECK_SHARE)} |"
        )
    t = fast.trap
    kept = t.accesses - t.trapped
    w(
        f"| a real guest's accesses the trap map keeps away (0 µs each) | {kept:,} of "
        f"{t.accesses:,} ({kept / max(1, t.accesses):.1%}) | (measured, no target) | |"
    )
    w("")
    w(
        f"The trap map: `{t.trace}` (recorded by `make traces`: Debian's QEMU, a Linux guest "
        f"loading three virtio drivers and moving MSI-X affinities), replayed with the TPH "
        f"capability of `{fastpath.OVERLAY.relative_to(ROOT)}` grafted onto its first NIC "
        f"({fastpath.OVERLAY_BDF}: ST table in MSI-X, so its Vector Control words are trapped "
        "too). A VMM handles every access outside the map itself; per device (accesses, of "
        "them in the map):"
    )
    w("")
    w("| device | accesses | in the trap map |")
    w("|---|---:|---:|")
    for bdf, (total, hits) in t.by_device.items():
        mark = " (TPH)" if bdf in t.tph_devices else ""
        w(f"| {bdf}{mark} | {total:,} | {hits:,} |")
    w("")
    if update:
        n = len(fast.update["serve"][fastpath.UPDATE_STEPS[0]])
        w(
            "Linux's ST entry update (`pcie_tph_set_st_entry` in drivers/pci/tph.c, the ST table "
            "in the capability): the control register read and written with Requester Enable "
            "off, the entry written, the control register read and written back with it on. "
            f"{n:,} updates of tenant-a's entries (tags alternating), one request in flight, "
            "driven from Python, `serve` and the C echo child alternating update by update, "
            "pinned like the latency runs. Microseconds:"
        )
        w("")
        w("| request | serve p50 | serve p99 | C echo p50 | C echo p99 | added p50 |")
        w("|---|---:|---:|---:|---:|---:|")
        for step, (p50, p99, echo50, echo99) in update.items():
            w(
                f"| {step} | {p50:.1f} | {p99:.1f} | {echo50:.1f} | {echo99:.1f} | "
                f"{p50 - echo50:+.1f} |"
            )
        w("")
    return out


def update_rows(update: dict[str, dict[str, list[float]]]) -> dict[str, tuple[float, ...]]:
    """Per request of Linux's ST entry update: serve's p50 and p99, the C echo child's (none
    without both children's round trips)."""
    serve, echo = update.get("serve", {}), update.get("c-echo", {})
    out = {}
    for step, times in serve.items():
        if times and echo.get(step):
            s, e = sorted(times), sorted(echo[step])
            p = (0.5, 0.99)
            out[step] = (*(percentile(s, q) for q in p), *(percentile(e, q) for q in p))
    return out


def report(
    info: dict[str, str],
    sizes: Sizes,
    quick: bool,
    latency: list[LatencyRow],
    piped: dict[int, dict[str, list[float]]],
    inproc: dict[str, dict[str, float]],
    engine: dict[str, list[float]],
    replay: list[ReplayRow],
    total_s: float,
    load_end: str,
    c_rows: list[CRow] | str = "not run",
    fast: FastPath | None = None,
    cpu: int = 0,
) -> str:
    out: list[str] = []
    w = out.append
    w("# tphtrap benchmarks")
    w("")
    w(
        "Written by `make bench` (`bench/run.py`); do not edit by hand. Every figure comes from "
        "one run, each measurement side by side with its baseline, and ratios are medians of "
        "per-round ratios. These are measurements, not tests: nothing fails when a goal is "
        "missed."
    )
    if quick:
        w("")
        w("**Quick mode** (`--quick`): tiny sample sizes, for a smoke test only. Not figures.")
    w("")
    w("## Machine")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| CPU | {info['cpu']} ({info['cores']} cores) |")
    w(f"| Python | {info['python']} (the project's `.venv`) |")
    w(f"| OS | {info['os']} |")
    w(f"| date | {info['date']} |")
    w(f"| tphtrap | {info['tphtrap']}, commit {info['commit']} |")
    w(f"| load average | {info['load']} at the start, {load_end} at the end |")
    w(f"| memory given back to the host | {info['memory']} |")
    w(f"| total run time | {total_s:.0f} s |")
    w("")

    # --- goals
    worst_p50 = max(latency, key=lambda r: r.ratio("serve", "echo-json", 0))
    worst_p99 = max(latency, key=lambda r: r.ratio("serve", "echo-json", 1))
    w("## Goals")
    w("")
    w("| goal | measured | target | |")
    w("|---|---|---|---|")
    for row in latency:
        r50 = row.ratio("serve", "echo-json", 0)
        r99 = row.ratio("serve", "echo-json", 1)
        w(
            f"| serve latency p50, {row.kind} | {r50:.2f}x echo floor | "
            f"<= {GOAL_P50}x | {verdict(r50 <= GOAL_P50)} |"
        )
        w(
            f"| serve latency p99, {row.kind} | {r99:.2f}x echo floor | "
            f"<= {GOAL_P99}x | {verdict(r99 <= GOAL_P99)} |"
        )
    for rrow in replay:
        ratio = rrow.ratio()
        w(
            f"| replay throughput, {rrow.kind} {rrow.lines:,} lines | {ratio:.2f}x bare decode | "
            f">= {GOAL_REPLAY}x | {verdict(ratio >= GOAL_REPLAY)} |"
        )
    for kind in ("native", "qemu"):
        rows = [r for r in replay if r.kind == kind]
        small, big = min(rows, key=lambda r: r.lines), max(rows, key=lambda r: r.lines)
        growth = (big.replay_rss_kb - small.replay_rss_kb) / 1024
        flat = big.replay_rss_kb <= small.replay_rss_kb * 1.1 + 4096
        w(
            f"| replay peak memory flat, {kind} | {small.replay_rss_kb / 1024:.0f} MiB at "
            f"{small.lines:,} lines, {big.replay_rss_kb / 1024:.0f} MiB at {big.lines:,} "
            f"({growth:+.1f} MiB) | flat | {verdict(flat)} |"
        )
    w("")
    w(
        f"The latency goals compare `tphtrap serve` with the **echo-json** floor (below). The "
        f"worst request kinds are `{worst_p50.kind}` (p50) and `{worst_p99.kind}` (p99)."
    )
    w("")

    if fast is not None:
        out.extend(fastpath_section(fast, c_rows, engine))

    # --- latency
    w("## Plugin latency (ping-pong)")
    w("")
    w(
        f"One request in flight: the driver writes a request line, reads until the reply's "
        f"newline, and takes `perf_counter_ns` around both. Per request kind, each child gets "
        f"{sizes.warmup} warm-up round trips, then each of {sizes.rounds} rounds runs "
        f"{sizes.blocks} blocks of {sizes.block} round trips per child, the children "
        f"alternating block by block (who goes first rotates) so that drift hits all alike. "
        f"{latency[0].samples:,} samples per child per round; figures are medians over rounds. "
        f"Microseconds."
    )
    w("")
    w(
        "| request | serve p50 | serve p99 | serve mean | echo-json p50 | echo-json p99 | "
        "echo-json mean | echo-bytes p50 | echo-bytes p99 | echo-bytes mean |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in latency:
        cells = [f"{row.stat(c, i):.1f}" for c in LATENCY_CHILDREN for i in range(3)]
        w(f"| {row.kind} | " + " | ".join(cells) + " |")
    w("")
    w(
        "| request | p50 vs echo-json | p99 vs echo-json | mean vs echo-json | "
        "p50 vs echo-bytes | p99 vs echo-bytes |"
    )
    w("|---|---:|---:|---:|---:|---:|")
    for row in latency:
        r50 = row.ratio("serve", "echo-json", 0)
        r99 = row.ratio("serve", "echo-json", 1)
        rmean = row.ratio("serve", "echo-json", 2)
        b50 = row.ratio("serve", "echo-bytes", 0)
        b99 = row.ratio("serve", "echo-bytes", 1)
        c50 = f"{r50:.2f}x" + ("" if r50 <= GOAL_P50 else f" (goal {GOAL_P50}x)")
        c99 = f"{r99:.2f}x" + ("" if r99 <= GOAL_P99 else f" (goal {GOAL_P99}x)")
        w(f"| {row.kind} | {c50} | {c99} | {rmean:.2f}x | {b50:.2f}x | {b99:.2f}x |")
    w("")
    for kind, text in workload.LATENCY_KINDS.items():
        w(f"- `{kind}`: {text}.")
    w("")
    w("### The children")
    w("")
    w(
        "- **serve**: `tphtrap serve --policy policies/two-tenants.yaml --audit FILE` (audit "
        "events to a file in the work directory, as a deployment would, emptied before each "
        "round as logrotate's `copytruncate` does; `not-tph` accesses are not audited by "
        "default), after `hello` and both attaches. The request kinds "
        "are ones its native path answers (docs/engine.md), in the `writes` backend; while "
        "every line is native, its loop runs in C too."
    )
    w(
        "- **echo-json** (`bench/echo_child.py json`), the floor the goals use: serve's own "
        "I/O loop in Python, `serve_forever` (`poll` on stdin, the signal pipe and, while "
        "replies wait, "
        "stdout; one `os.read` of up to 64 KiB, split at newlines, replies of that read "
        "written at once on the non-blocking stdout), with a stand-in plugin doing per line "
        "a decode of the request with serve's own JSON decoder (msgspec's, in C) and "
        '`msgspec` encoding `{"id": <id>, "ok": true, "decision": {...}}` with a '
        "fixed decision, the one serve gives a granted control write: a reply of the same "
        "size and shape. Any JSON-lines plugin of this shape decodes a request and encodes a "
        "reply, so that is its floor."
    )
    w(
        "- **echo-bytes** (`bench/echo_child.py bytes`): the same loop writing the request "
        "line straight back: the transport alone (pipes, `select`, two context switches), "
        "shown for reference."
    )
    w("")
    w(
        f"Same interpreter (`sys.executable` of the run), same pipes; the driver and every "
        f"child pinned to CPU {cpu} (`--cpu`), so that no round trip pays for waking another "
        "CPU from idle (on a VM that can cost tens of microseconds, and it hits a slow child "
        "more than a fast one)."
    )
    w("")

    # --- in-process
    w("### Where serve's time goes (in-process, no pipes)")
    w("")
    w(
        "`Server.handle_line` called directly (parse, validate, engine, audit event to a "
        "file, reply), with the native path (as serve runs) and without it (the Python path), "
        "and the echo-json child's per-line work, on the same request lines. Microseconds per "
        "request, median of rounds."
    )
    w("")
    w(
        "| request | Server.handle_line | Python path | echo-json reply | of the Python path: "
        "parse | engine | audit line | reply |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, costs in inproc.items():
        w(
            f"| {kind} | {costs['serve']:.1f} | {costs['python']:.1f} | "
            f"{costs['echo-json']:.1f} | {costs['parse']:.1f} | {costs['engine']:.1f} | "
            f"{costs['audit']:.1f} | {costs['reply']:.1f} |"
        )
    w("")
    w(
        "The parts of the Python path: `parse_request` of the line, `Engine.handle` of its "
        "access, the `access.decided` line written to the audit file, the reply encoded, each "
        "timed alone over the same requests (the audit line is not written for a `not-tph` "
        "pass); what is left of its `Server.handle_line` is the dispatch between them. The "
        "native path's `Server.handle_line` includes its audit line's `write` (about 1.5 µs)."
    )
    w("")

    # --- pipelined
    w("## Pipelined throughput")
    w("")
    w(
        f"Up to *window* requests in flight (every request kind above, interleaved), "
        f"{sizes.pipelined:,} requests per measurement, the children alternating, median of "
        f"{sizes.rounds} rounds. Requests per second."
    )
    w("")
    w("| window | serve | echo-json | echo-bytes | serve / echo-json | serve / echo-bytes |")
    w("|---:|---:|---:|---:|---:|---:|")
    for window, res in piped.items():
        s, j, b = (median(res[n]) for n in LATENCY_CHILDREN)
        rj = median([x / y for x, y in zip(res["serve"], res["echo-json"], strict=True)])
        rb = median([x / y for x, y in zip(res["serve"], res["echo-bytes"], strict=True)])
        w(f"| {window} | {s:,.0f} | {j:,.0f} | {b:,.0f} | {rj:.2f}x | {rb:.2f}x |")
    w("")

    # --- the C client
    w("## C client ping-pong (the physical floor)")
    w("")
    w(
        "The C client library (`clients/c`, built with `cc -std=c11 -O2`) in `bench/c/pingpong.c`: "
        f"one request in flight, {sizes.c_rounds} runs of {sizes.c_pingpong:,} timed round "
        "trips per row (the four children alternating run by run; medians of the runs), "
        "each after a "
        "warm-up, `CLOCK_MONOTONIC` around each library call (format the request, write it, "
        "read the reply, parse it with the library's JSON reader). Against `tphtrap serve` "
        "with both devices attached in each backend, and against `bench/c/echo.c`, a C child on "
        "the same pipes that answers every line with a fixed decision of the same size: the "
        "floor of any plugin on pipes; and against the same child with `--audit FILE`, which "
        "first appends an audit line of serve's size per request to a file (the floor of a "
        "plugin that audits to a file before it replies). Each run, serve's or the echo's, "
        "audits to a new file in the work directory, removed after the run (a file grown "
        "by all the runs before had each later run pay for writing back what they left). "
        f"Pinned: `taskset -c {cpu}` on the client, which its child inherits (both on one "
        "CPU); unpinned: the scheduler places them. Microseconds."
    )
    w("")
    if isinstance(c_rows, str):
        w(f"Not measured: {c_rows}.")
    else:
        w(
            "| CPUs | request | serve writes p50 | serve writes p99 | serve host p50 | "
            "serve host p99 | C echo p50 | C echo p99 | C echo + audit p50 | "
            "C echo + audit p99 | writes / echo p50 | host / echo p50 |"
        )
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for pinned in (False, True):
            for kind in C_KINDS:
                got = {r.backend: r for r in c_rows if r.pinned == pinned and r.kind == kind}
                if len(got) < 4:
                    continue
                wr, ho, ec, ea = got["writes"], got["host"], got[""], got[AUDITED]
                w(
                    f"| {'one (pinned)' if pinned else 'any'} | {kind} | {wr.p50:.1f} | "
                    f"{wr.p99:.1f} | {ho.p50:.1f} | {ho.p99:.1f} | {ec.p50:.1f} | {ec.p99:.1f} | "
                    f"{ea.p50:.1f} | {ea.p99:.1f} | "
                    f"{wr.p50 / ec.p50:.1f}x | {ho.p50 / ec.p50:.1f}x |"
                )
        if not any(r.pinned for r in c_rows):
            w("")
            w("Pinned rows missing: `taskset` (util-linux) was not found.")
        w("")
        for kind, text in C_KINDS.items():
            w(f"- `{kind}`: {text}.")
    w("")

    # --- engine
    w("## Engine alone")
    w("")
    rate = median(engine["checked"])
    bare = median(engine["unchecked"])
    share = median([1 - c / u for c, u in zip(engine["checked"], engine["unchecked"], strict=True)])
    rounds = len(engine["checked"])
    w(
        f"`Engine.handle` in a loop over the accesses of one cycle of the native trace "
        f"workload ({len(workload.native_cycle())} accesses: resets, TPH control and ST "
        f"entry writes with one foreign tag per device, MSI-X 8- and 4-byte writes, reads, "
        f"non-TPH accesses), median of {rounds} rounds of {sizes.engine:,} decisions, with "
        "the self-check on (as tphtrap runs) and, to measure its cost, off."
    )
    w("")
    w("| workload | decisions/s | µs per decision |")
    w("|---|---:|---:|")
    w(f"| mixed, self-check on | {rate:,.0f} | {1e6 / rate:.2f} |")
    w(f"| mixed, self-check off | {bare:,.0f} | {1e6 / bare:.2f} |")
    w("")
    w(
        f"Self-check share of a decision's time: {share:.1%} (goal under 20%: "
        f"{verdict(share < 0.20)})."
    )
    w("")

    # --- replay
    w("## Replay")
    w("")
    w(
        "Each measurement runs in a fresh interpreter (`bench/replay_probe.py`); "
        "`tphtrap replay TRACE --policy policies/two-tenants.yaml --json` runs in-process "
        "through `tphtrap.cli.main` (policy and devices loaded, summary printed: the whole "
        "command less interpreter start-up). The baselines read the same file with "
        "`open()` line iteration and:"
    )
    w("")
    w(
        "- native: `json.loads(line)` on every line (stdlib decoder, no validation); the "
        "trace is what `serve --record` writes (every request with its `expect`-ed "
        "decision), a two-tenant driver session repeated with fresh ids;"
    )
    w(
        "- QEMU: `tphtrap.qemu_trace.parse_line(line)` on every line; the trace is in the "
        "format of `fixtures/traces/qemu-msix-bar.log` (`pci_cfg_*` with their "
        "`pcie-mmcfg-mmio` access lines, `msix-table` writes and reads, BAR mappings) with "
        "about 40% unrelated lines (other MMIO regions, kvm and virtio events); devices "
        "bound with `--device`."
    )
    w("")
    w(
        "Ratio = baseline time / replay time on the same file (so >= 0.5x means replay "
        f"costs at most twice the bare decode); the {sizes.native_small:,}-record and "
        f"{sizes.qemu_small:,}-line traces are measured {sizes.replay_rounds} times "
        "alternating, the large ones once. Peak RSS is the measuring process's high-water "
        "mark (`VmHWM`)."
    )
    w("")
    w(
        "These traces repeat a driver session, as a guest does: most records are the same "
        "line (access) again in the same device state, which replay's memo counts without "
        "deciding it again (`from memory`; docs/replay.md, Speed). `--no-memo` decides every "
        "access afresh; its ratio (the small traces, once) is what a trace that never "
        "repeats itself costs."
    )
    w("")
    w(
        "| trace | size | lines | records | decode lines/s | replay lines/s | "
        "replay records/s | from memory | ratio | goal | ratio, --no-memo | decode peak RSS | "
        "replay peak RSS |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for rrow in replay:
        b = median(rrow.baseline_s)
        r = median(rrow.replay_s)
        ratio = rrow.ratio()
        fresh = "-" if rrow.fresh_s is None else f"{b / rrow.fresh_s:.2f}x"
        w(
            f"| {rrow.kind} | {rrow.size_bytes / 2**20:,.0f} MiB | {rrow.lines:,} | "
            f"{rrow.records:,} | {rrow.lines / b:,.0f} | {rrow.lines / r:,.0f} | "
            f"{rrow.records / r:,.0f} | {rrow.from_memory / max(rrow.records, 1):.1%} | "
            f"{ratio:.2f}x | >= {GOAL_REPLAY}x {verdict(ratio >= GOAL_REPLAY)} | {fresh} | "
            f"{rrow.baseline_rss_kb / 1024:.0f} MiB | {rrow.replay_rss_kb / 1024:.0f} MiB |"
        )
    w("")

    # --- reproduce
    w("## Reproduce")
    w("")
    w("```sh")
    w("make bench                                   # this file, about 4 minutes on 2 cores")
    w(".venv/bin/python bench/run.py --quick --output /tmp/bench.md   # a smoke run, seconds")
    w(".venv/bin/pip install pyinstrument && .venv/bin/python bench/profile.py   # profiles")
    w("```")
    w("")
    w(
        "The machine is not isolated: other processes, frequency scaling and a shared host "
        "move absolute figures from run to run (the load average above says how busy it "
        "was); the ratios, measured side by side, move much less."
    )
    w("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default=str(HERE / "results.md"), help="Markdown report")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--workdir", help="where traces go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--cpu",
        type=int,
        help="the CPU the latency runs are pinned to (default: the last one this process may use)",
    )
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    random.seed(1)
    info = machine()
    progress(f"{info['cpu']}, {info['cores']} cores, {info['python']}, load {info['load']}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tphtrap-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    allowed = os.sched_getaffinity(0)
    cpu = args.cpu if args.cpu is not None else max(allowed)
    try:
        built = build_c(workdir)
        os.sched_setaffinity(0, {cpu})  # the children started now inherit it
        children = start_children(workdir)
        try:
            latency = bench_latency(children, sizes, workdir / SERVE_AUDIT)
            piped = bench_pipelined(children, sizes)
            kinds = {"serve": children["serve"]}
            if not isinstance(built, str):
                kinds["c-echo"] = Child("c-echo", [str(built[1])], workdir / "c-echo.stderr")
            progress("each request kind pipelined")
            kind_piped = fastpath.kind_pipelined(kinds, pipelined, sizes.pipelined, sizes.rounds)
            progress("Linux's ST entry update, request by request")
            update = fastpath.linux_update(kinds, sizes.updates)
            if "c-echo" in kinds:
                kinds["c-echo"].close()
            progress("the worst single decision")
            worst = fastpath.worst_decision(children["serve"], workdir, sizes.worst_rounds)
            progress(f"worst decision: {median(worst.rounds):.2f} ms, {worst.reply_bytes:,} bytes")
        finally:
            for child in children.values():
                child.close()
            os.sched_setaffinity(0, allowed)
        progress("trap map on a real guest's trace")
        trap = fastpath.trap_share()
        progress("C client ping-pong")
        c_rows = bench_c(sizes, workdir, built, cpu)
        if isinstance(c_rows, str):
            progress(f"C client ping-pong skipped: {c_rows}")
        progress("in-process request costs")
        inproc = bench_inprocess(sizes, workdir)
        progress("engine alone")
        engine = bench_engine(sizes)
        progress(f"engine: {median(engine['checked']):,.0f} decisions/s")
        instructions: dict[str, float] | str = "not measured in quick mode"
        if sizes.check_cycles:
            progress("the self-check's share in instructions (valgrind)")
            instructions = bench_check_instructions(sizes.check_cycles)
        replay = bench_replay(sizes, workdir)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        load_end = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load_end = "n/a"
    total = time.monotonic() - _T0
    fast = FastPath(kind_piped, worst, trap, instructions, update)
    text = report(
        info, sizes, args.quick, latency, piped, inproc, engine, replay, total, load_end, c_rows,
        fast, cpu,
    )  # fmt: skip
    Path(args.output).write_text(text, encoding="utf-8")
    progress(f"done in {total:.0f}s; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
