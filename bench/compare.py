#!/usr/bin/env python3
"""Serve latency of this tree against another commit, side by side in one run.

    .venv/bin/python bench/compare.py 31d353d                # the commit before the engine rebuild
    .venv/bin/python bench/compare.py v0.1 --rounds 9 --cpu 1 --json
    .venv/bin/python bench/compare.py 31d353d --c        # the C client, both backends

The other commit is checked out into a temporary git worktree (removed afterwards), its C
extensions built there as its pyproject.toml declares them. Both trees run ``tphtrap serve``
under this tree's interpreter, each with its own benchmark policy
and request lines (its ``bench/workload.py``), pinned to one CPU with the driver (the
children inherit it), and answer the same ping-pong: per request kind, one block of warm-up
round trips each, then ``--rounds`` rounds of 10 blocks of ``--block`` (500) round trips per
child, the children alternating block by block. Reported: medians over rounds of p50 and
p99, and of the per-round ratios (this tree / the other), which cancel the machine's drift.

With ``--worst N``, the worst single decision instead (``bench/fastpath.py``: an enable at
another width re-writing 2048 Vector Controls), N rounds, the trees alternating round by round.

With ``--c``, the client is this tree's C library instead (``bench/c/pingpong.c``, as in
``make bench``), in both backends (writes and host): per backend and request kind, ``--rounds``
runs of ``--calls`` round trips against each tree's ``serve``, the trees alternating run by run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import C_KIND_OF, C_KINDS, Child, build_c  # noqa: E402

# Run inside a tree: its benchmark set-up, as JSON.
_DUMP = r"""
import json, sys
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import workload
print(json.dumps({
    "setup": [json.dumps(r, separators=(",", ":")) for r in workload.setup_requests()],
    "kinds": {k: [x.decode() for x in workload.latency_requests(k)]
              for k in workload.LATENCY_KINDS},
    "policy": str(workload.POLICY),
}))
"""


def build_extensions(tree: Path) -> list[str]:
    """Build the C extensions ``tree``'s pyproject.toml declares, in place, as pip builds them
    for this tree (its sources, its compile arguments): the other tree runs from its worktree,
    where nothing was built. Returns what was built; one that fails to build is left out, as
    pip leaves an optional one (the tree then runs without it, and this says so)."""
    import sysconfig
    import tomllib

    meta = tomllib.loads((tree / "pyproject.toml").read_text())
    mods = meta.get("tool", {}).get("setuptools", {}).get("ext-modules", [])
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    include = sysconfig.get_paths()["include"]
    cc = sysconfig.get_config_var("CC") or "cc"
    built = []
    for mod in mods:
        out = tree / (mod["name"].replace(".", "/") + suffix)
        cmd = [*cc.split(), "-shared", "-fPIC", f"-I{include}", *mod.get("extra-compile-args", [])]
        cmd += [*(str(tree / src) for src in mod["sources"]), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            built.append(mod["name"])
        else:
            print(f"compare: {mod['name']} not built: {done.stderr[-300:]}", file=sys.stderr)
    return built


class Serve(Child):
    """``tphtrap serve`` of one tree (its own policy and request lines), set up and ready."""

    def __init__(self, name: str, tree: Path, audit: Path) -> None:
        dump = subprocess.run(
            [sys.executable, "-c", _DUMP], cwd=tree, capture_output=True, text=True, check=True
        )
        self.setup: dict[str, Any] = json.loads(dump.stdout)
        argv = [sys.executable, "-m", "tphtrap", "serve", "--policy", self.setup["policy"]]
        super().__init__(name, [*argv, "--audit", str(audit)], audit.with_suffix(".stderr"), tree)
        for line in self.setup["setup"]:
            reply = self.call(line.encode() + b"\n")
            if b'"ok":true' not in reply:
                raise SystemExit(f"compare: {name} refused its set-up: {reply[:200]!r}")

    def pingpong(self, lines: list[bytes], n: int, offset: int) -> list[float]:
        out = []
        for i in range(offset, offset + n):
            t0 = time.perf_counter_ns()
            self.call(lines[i % len(lines)])
            out.append((time.perf_counter_ns() - t0) / 1000)
        return out


def measure(children: list[Serve], rounds: int, block: int) -> list[dict[str, Any]]:
    rows = []
    for kind in children[0].setup["kinds"]:
        lines = {c.name: [x.encode() for x in c.setup["kinds"].get(kind, [])] for c in children}
        if not all(lines.values()):
            continue  # a request kind one of the trees does not have
        for c in children:
            c.pingpong(lines[c.name], block, 0)
        per: dict[str, list[tuple[float, float]]] = {c.name: [] for c in children}
        for _ in range(rounds):
            samples: dict[str, list[float]] = {c.name: [] for c in children}
            for b in range(10):
                for c in children if b % 2 else children[::-1]:
                    samples[c.name] += c.pingpong(lines[c.name], block, b * block)
            for name, s in samples.items():
                s.sort()
                per[name].append((s[len(s) // 2], s[int(len(s) * 0.99)]))
        new, old = (per[c.name] for c in children)
        rows.append(_row(kind, new, old))
        print(f"compare: {kind} done", file=sys.stderr, flush=True)
    return rows


def _row(
    kind: str, new: list[tuple[float, float]], old: list[tuple[float, float]]
) -> dict[str, Any]:
    """Medians over rounds of (p50, p99) for this tree and the other, and of their ratios."""
    return {
        "kind": kind,
        "this": {"p50": statistics.median(x[0] for x in new),
                 "p99": statistics.median(x[1] for x in new)},
        "other": {"p50": statistics.median(x[0] for x in old),
                  "p99": statistics.median(x[1] for x in old)},
        "p50_ratio": statistics.median(a[0] / b[0] for a, b in zip(new, old, strict=True)),
        "p99_ratio": statistics.median(a[1] / b[1] for a, b in zip(new, old, strict=True)),
    }  # fmt: skip


def measure_c(trees: dict[str, Path], rounds: int, calls: int, tmp: Path) -> list[dict[str, Any]]:
    """The C client's ping-pong against each tree's ``serve``, in both backends."""
    built = build_c(tmp)
    if isinstance(built, str):
        raise SystemExit(f"compare: {built}")
    pingpong = built[0]
    rows = []
    for backend in ("writes", "host"):
        for kind in C_KINDS:
            per: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
            for rnd in range(rounds):
                for name in list(trees) if rnd % 2 == 0 else list(trees)[::-1]:
                    tree = trees[name]
                    serve = [
                        sys.executable,
                        "-m",
                        "tphtrap",
                        "serve",
                        "--policy",
                        str(tree / "policies" / "two-tenants.yaml"),
                        "--audit",
                        str(tmp / f"c-{len(per[name])}-{name[:12]}.jsonl"),
                    ]
                    argv = [str(pingpong), kind, backend, str(calls), str(tree), "--", *serve]
                    done = subprocess.run(
                        argv, cwd=tree, capture_output=True, text=True, check=False, timeout=300
                    )  # fmt: skip
                    if done.returncode != 0:
                        raise SystemExit(f"compare: {name} {kind} {backend}: {done.stderr[-300:]}")
                    got = json.loads(done.stdout)
                    per[name].append((got["p50_us"], got["p99_us"]))
            new, old = per.values()
            rows.append(_row(f"{C_KIND_OF[kind]} ({backend})", new, old))
            print(f"compare: {kind} {backend} done", file=sys.stderr, flush=True)
    return rows


def measure_worst(children: list[Serve], rounds: int, tmp: Path) -> dict[str, Any]:
    """The worst decision's round trip on each tree's ``serve`` (this tree's driver), in ms."""
    import fastpath

    per: dict[str, list[float]] = {c.name: [] for c in children}
    for rnd in range(rounds + 1):  # the first round warms both up
        for c in children if rnd % 2 == 0 else children[::-1]:
            got = fastpath.worst_decision(c, tmp, 1).rounds[0]
            if rnd:
                per[c.name].append(got)
        print(f"compare: worst decision round {rnd}/{rounds}", file=sys.stderr, flush=True)
    new, old = (per[c.name] for c in children)
    return {
        "kind": "worst decision (ms)",
        "this": statistics.median(new),
        "other": statistics.median(old),
        "ratio": statistics.median(a / b for a, b in zip(new, old, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("commit", help="the commit to compare against (anything git rev-parse takes)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per request kind (default 7)")
    ap.add_argument("--block", type=int, default=500, help="round trips per block (default 500)")
    ap.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (default 0)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument(
        "--c", action="store_true", help="the C client, in both backends (see the module help)"
    )
    ap.add_argument("--calls", type=int, default=5000, help="round trips per C run (default 5000)")
    ap.add_argument(
        "--worst", type=int, metavar="N", help="the worst single decision instead, N rounds"
    )
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    with tempfile.TemporaryDirectory(prefix="tphtrap-compare-") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(other), args.commit],
            cwd=ROOT,
            check=True,
        )
        try:
            for name in build_extensions(other):
                print(f"compare: built {name} in {args.commit}", file=sys.stderr, flush=True)
            if args.c and not args.worst:
                trees = {"this": ROOT, args.commit: other}
                rows = measure_c(trees, args.rounds, args.calls, Path(tmp))
            else:
                children = [
                    Serve("this", ROOT, Path(tmp) / "this.jsonl"),
                    Serve(args.commit, other, Path(tmp) / "other.jsonl"),
                ]
                try:
                    if args.worst:
                        worst = measure_worst(children, args.worst, Path(tmp))
                    else:
                        rows = measure(children, args.rounds, args.block)
                finally:
                    for c in children:
                        c.close()
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False
            )
    if args.worst:
        if args.json:
            print(json.dumps(worst, indent=2))
        else:
            print(
                f"worst single decision, this tree vs {args.commit}, pinned to CPU {args.cpu}: "
                f"{worst['this']:.2f} / {worst['other']:.2f} ms (median of {args.worst} "
                f"rounds), ratio {worst['ratio']:.3f}"
            )
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    client = "the C client" if args.c else "the Python driver"
    print(f"serve round trip, this tree vs {args.commit}, {client}, pinned to CPU {args.cpu}, µs")
    print(f"{'request':38s} {'this p50':>9s} {'other p50':>9s} {'ratio':>6s}   "
          f"{'this p99':>9s} {'other p99':>9s} {'ratio':>6s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['kind']:38s} {r['this']['p50']:9.1f} {r['other']['p50']:9.1f} "
            f"{r['p50_ratio']:6.3f}   {r['this']['p99']:9.1f} {r['other']['p99']:9.1f} "
            f"{r['p99_ratio']:6.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
