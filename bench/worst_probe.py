#!/usr/bin/env python3
"""The worst single decision (``bench/fastpath.py``: enable Extended TPH on a 2048-vector
MSI-X device, every Vector Control re-written) in process, split into the engine's decision,
the audit line and the reply; medians of ROUNDS rounds.

    taskset -c 1 .venv/bin/python bench/worst_probe.py [ROUNDS]

``--count PART ROUNDS`` sets the state up ROUNDS times after one warm-up and each time runs
PART: ``none``, ``engine`` (the decision) or ``all`` (the decision, its audit line and its
reply), for ``valgrind --tool=callgrind --callgrind-out-file=/dev/null``: the set-up is the
same in every mode, so the differences between the modes' instruction counts are what the
engine and the two lines cost (the lines of one decision share its writes' text, so they are
counted together, each round's decision a new one).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import fastpath  # noqa: E402
import workload  # noqa: E402


def count(part: str, rounds: int, audit_path: Path) -> None:
    from tphtrap.audit import Auditor
    from tphtrap.engine import Engine
    from tphtrap.policyfile import load_policy
    from tphtrap.wire import access_reply

    engine = Engine(load_policy(str(workload.POLICY)))
    _sess, prepare, access = fastpath.worst_state(engine)
    auditor = Auditor.to_file(str(audit_path))
    prepare()
    decision = engine.handle(access)  # warm-up: first-use costs stay out of the count
    auditor.decided(access, decision, {"id": 0})
    access_reply(0, decision)
    for n in range(rounds):
        prepare()
        if part in ("engine", "all"):
            decision = engine.handle(access)
        if part == "all":
            auditor.decided(access, decision, {"id": n})
            access_reply(n, decision)
    auditor.close()


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="tphtrap-worst-") as tmp:
        audit = Path(tmp) / "audit.jsonl"
        if argv[:1] == ["--count"]:
            count(argv[1], int(argv[2]), audit)
            return 0
        rounds = int(argv[0]) if argv else 30
        fastpath.worst_in_process(2, audit)  # warm-up
        got = fastpath.worst_in_process(rounds, audit)
    total = [e + a + r for e, a, r in zip(got.engine, got.audit, got.reply, strict=True)]
    print(f"worst decision in process, {got.writes:,} writes, reply {got.reply_bytes:,} bytes,")
    print(f"median of {rounds} rounds (ms):")
    for name, values in (
        ("engine", got.engine),
        ("audit line", got.audit),
        ("reply", got.reply),
        ("total", total),
    ):
        print(f"  {name:<11} {median(values):7.3f}   (min {min(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
