#!/usr/bin/env python3
"""Profiles of the three hot paths the benchmarks measure, as pyinstrument call trees.

    .venv/bin/pip install pyinstrument      # not a dependency of tphtrap or of make bench
    .venv/bin/python bench/profile.py [serve|native|qemu ...]

* serve: ``Server.handle_line`` (no pipes) on the latency request kinds, audit to a file;
* native: ``Replayer.native`` on a 100,000-record native trace;
* qemu: ``Replayer.qemu`` on a 100,000-line QEMU trace.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

if TYPE_CHECKING:
    from tphtrap.replay import Replayer


def profile_serve(workdir: Path) -> None:
    from tphtrap.audit import Auditor
    from tphtrap.policyfile import load_policy
    from tphtrap.serve import Server

    with open(workdir / "audit.jsonl", "w", buffering=1, encoding="utf-8") as audit:
        server = Server(load_policy(str(workload.POLICY)), str(workload.POLICY), Auditor(audit))
        for req in workload.setup_requests():
            server.handle_line(json.dumps(req).encode())
        lines = [
            line.rstrip(b"\n")
            for kind in workload.LATENCY_KINDS
            for line in workload.latency_requests(kind)
        ]
        run(
            "serve: Server.handle_line x 40,000",
            lambda: [server.handle_line(x) for x in lines * 156],
        )


def _replayer(devices: bool) -> Replayer:
    from tphtrap.device import ConfigSpace, load_device
    from tphtrap.policyfile import load_policy
    from tphtrap.replay import Replayer

    policy = load_policy(str(workload.POLICY))
    bound = {}
    if devices:
        for spec in workload.QEMU_DEVICES:
            bdf, path = spec.split("=", 1)
            dev = load_device(path)
            bound[bdf] = ConfigSpace.from_bytes(dev.data, dev.source, bdf, dev.line_map)

    def vm_of(bdf: str) -> str | None:
        owner = policy.vm_of_device(bdf)
        return owner.name if owner else None

    return Replayer(policy, devices=bound, vm_of=vm_of)


def profile_native(workdir: Path) -> None:
    path = workdir / "native.jsonl"
    workload.write_native_trace(path, 100_000)
    rp = _replayer(False)
    run("replay native: 100,000 records", lambda: sum(1 for _ in rp.native(str(path))))


def profile_qemu(workdir: Path) -> None:
    path = workdir / "qemu.log"
    workload.write_qemu_trace(path, 100_000)
    rp = _replayer(True)
    run("replay qemu: 100,000 lines", lambda: sum(1 for _ in rp.qemu(str(path))))


def run(title: str, fn: Callable[[], object]) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    fn()
    profiler.stop()
    print(f"=== {title}")
    print(profiler.output_text(unicode=False, color=False))


def main(argv: list[str]) -> int:
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        print("needs pyinstrument: .venv/bin/pip install pyinstrument", file=sys.stderr)
        return 2
    which = argv or ["serve", "native", "qemu"]
    paths = {"serve": profile_serve, "native": profile_native, "qemu": profile_qemu}
    with tempfile.TemporaryDirectory(prefix="tphtrap-profile-") as tmp:
        for name in which:
            paths[name](Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
