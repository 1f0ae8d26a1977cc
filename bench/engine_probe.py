#!/usr/bin/env python3
"""``Engine.handle`` over CYCLES cycles of the mixed native-trace workload, the self-check on
or off: what ``bench/run.py`` runs under ``valgrind --tool=callgrind`` to count the
self-check's share of a decision in instructions (a count that does not move with the
machine's load, unlike time).

    .venv/bin/python bench/engine_probe.py checked|unchecked CYCLES
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

from tphtrap.engine.render import RawWrites  # noqa: E402


def no_check(self: object, sess: object, rendering: object, full: bool) -> None:
    """Stands in for the self-check, to measure what it costs."""


def main() -> int:
    mode, cycles = sys.argv[1], int(sys.argv[2])
    if mode == "unchecked":
        RawWrites.check = no_check  # type: ignore[method-assign]
    engine = workload.attached_engine()
    accesses = workload.cycle_accesses()
    for _ in range(cycles):
        for access in accesses:
            engine.handle(access)
    print(len(accesses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
