"""The per-entry loops of a big decision in C (``_bulk.c``), or None where it is not built.

A decision re-writing every entry of a large table (an enable after a width change on a
2048-vector device) runs a handful of loops once per entry: the planner's resolution, the
rendering as device writes, the self-check's run, the commit, the writes' text and where
their runs start. Each of those Python loops asks ``C`` first and runs itself when ``C`` is
None or answers None (an input the C side does not take); the Python loop is the reference
the C one is tested against (tests/test_bulk.py).
"""

from __future__ import annotations

from .events import DeviceWrite

try:
    from . import _bulk as C
except ImportError:  # not built: every loop runs in Python
    C = None  # type: ignore[assignment]
else:
    C.bind(DeviceWrite)

__all__ = ["C", "in_python"]


def in_python() -> None:
    """Every loop in Python from now on (``serve --no-native``)."""
    global C
    C = None  # type: ignore[assignment]
