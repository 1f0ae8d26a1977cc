"""The C loops of a big decision (tphtrap/_bulk.c) give what their Python loops give.

Each loop's Python version is the reference: here both run on the same generated inputs, the
odd ones included (values that are not plain ints, unknown low bits, every kind of result a
resolution can have), and must leave the same results and the same state, or the C one must
decline (answer None) having changed nothing. tests/test_engine_fastpath.py's twins run whole
engines with and without these loops side by side.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import A, policy

from tphtrap import bulk, wire
from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.engine import session as session_module
from tphtrap.engine.check import Checker
from tphtrap.engine.session import Session
from tphtrap.engine.target import KEEP, LATCH, REFUSE
from tphtrap.events import ConfigWrite, DeviceWrite, MsixWrite
from tphtrap.spec import StLocation, TagWidth
from tphtrap.synth import MsixSpec, TphSpec, build_config

pytestmark = pytest.mark.skipif(bulk.C is None, reason="tphtrap._bulk is not built")

TABLE = 0xFFFF0000
ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def python_loops() -> Iterator[None]:
    kept, bulk.C = bulk.C, None
    try:
        yield
    finally:
        bulk.C = kept


class Counting:
    """bulk.C, counting each function's answers that were not None."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answered: dict[str, int] = {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        real = getattr(self.real, name)

        def call(*args: Any) -> Any:
            got = real(*args)
            if got is not None:
                self.answered[name] = self.answered.get(name, 0) + 1
            return got

        return call


def msix_session(n: int, ext: bool = True) -> tuple[Engine, Session]:
    tph = TphSpec(extended=ext, location=StLocation.MSIX, table_size=n)
    cfg = ConfigSpace.from_bytes(
        build_config(tph=tph, msix=MsixSpec(n, bir=4, table_offset=TABLE)), "<t>", A
    )
    engine = Engine(policy())
    engine.attach("a", A, cfg, vector_ctrl=[1] * n)
    return engine, engine.session("a", A)


def test_the_big_decision_takes_every_c_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """An enable after a width change on a 2048-vector device runs each loop in C (so the
    twins of test_engine_fastpath compare C with Python there, not Python with itself)."""
    engine, sess = msix_session(2048)
    ctrl = sess.geo.caps[0].ctrl
    engine.handle(ConfigWrite("a", A, ctrl, 4, 0x1))
    for i in range(2048):
        engine.handle(MsixWrite("a", A, 4, TABLE + 16 * i + 12, 4, 0x1_0000 | i % 2))
    engine.handle(ConfigWrite("a", A, ctrl, 4, 0x101))
    counting = Counting(bulk.C)
    monkeypatch.setattr(bulk, "C", counting)
    d = engine.handle(ConfigWrite("a", A, ctrl, 4, 0x301))
    wire.writes_text(tuple(d.writes))
    wire.access_reply(1, d)
    assert len(d.writes) == 2050
    assert set(counting.answered) == {
        "resolve",
        "run_starts",
        "raw_writes",
        "entry_indices",
        "apply_disabled",
        "commit",
        "tags_allowed",
        "writes_text",
    }, counting.answered


# --- writes_text ---------------------------------------------------------------------------
ODD_INTS = st.one_of(
    st.integers(0, 2**16),
    st.integers(0, 2**70),
    st.integers(-(2**64), -1),
    st.booleans(),
)
SPACES = st.sampled_from(["config", "bar", "other", 'q"uote', "é"])
#: values alike often (runs), now and then one that is not plain
VALUES = st.one_of(st.sampled_from([0, 1, 1, 0x10001]), ODD_INTS)


@given(
    st.lists(
        st.builds(DeviceWrite, SPACES, ODD_INTS, ODD_INTS, ODD_INTS, st.none() | ODD_INTS),
        max_size=6,
    )
)
def test_writes_text(writes: list[DeviceWrite]) -> None:
    """The C text is the Python loop's, or None for a write that is not plain."""
    t = tuple(writes)
    assert bulk.C is not None
    got = bulk.C.writes_text(t)
    want = wire._writes_text(t)
    assert got is None or got == want
    plain = all(
        w.space in ("config", "bar")
        and all(type(v) is int and 0 <= v < 2**64 for v in (w.offset, w.width, w.value))
        and (w.bar is None or (type(w.bar) is int and 0 <= w.bar < 2**64))
        for w in writes
    )
    assert (got is not None) == plain, (got, want)


@given(
    st.lists(
        st.builds(DeviceWrite, st.just("config"), st.integers(0, 9), st.just(4), VALUES, st.none()),
        max_size=8,
    )
)
def test_run_starts(writes: list[DeviceWrite]) -> None:
    """The C loop finds where the Python one does, or declines a value that is not plain."""
    assert bulk.C is not None
    got = bulk.C.run_starts(tuple(writes))
    values = [w.value for w in writes]
    want = [i for i in range(len(values) - 1) if values[i] == values[i + 1]]
    plain = all(type(v) is int and 0 <= v < 2**64 for v in values)
    assert got == (want if plain else None), (values, got)
    assert wire._run_starts(tuple(writes)) == want  # (either loop, the same answer)


# --- the session's loops -------------------------------------------------------------------
LOWS = st.sampled_from([None, 0, 1, 0, 1])
RESULTS = st.tuples(
    st.sampled_from([KEEP, REFUSE, LATCH, 0, 0x10, 0x11, 0x1001, 7]),
    st.sampled_from([None, "tag-allowed", "tag-fallback", "foreign-tag", "tag-translated"]),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_resolve(data: st.DataObject) -> None:
    """Session._resolve with C and in Python, a generated resolution for every key."""
    n = data.draw(st.sampled_from([3, 17]))
    _engine, sess = msix_session(n)

    def column(values: st.SearchStrategy[Any]) -> list[Any]:
        return data.draw(st.lists(values, min_size=n, max_size=n))

    sess.guest_tag = column(st.sampled_from([0, 1, 2, 0x11]))
    sess.written = column(st.booleans())
    sess.dev_ent = column(st.sampled_from([None, 0, 0x10, 7]))
    sess.guest_low = column(LOWS)
    sess.dev_low = column(LOWS)
    table = data.draw(st.dictionaries(st.tuples(st.integers(0, 0x11), st.booleans()), RESULTS))
    default = data.draw(RESULTS)

    def resolve_entry(guest: int, written: bool, *rest: Any) -> tuple[int, str | None]:
        return table.get((guest, written), default)

    some = sorted(set(data.draw(st.lists(st.integers(0, n - 1)))))
    entries = data.draw(st.sampled_from([range(n), some]))
    touched = set(data.draw(st.lists(st.integers(0, n - 1))))
    width = data.draw(st.sampled_from([TagWidth.ST8, TagWidth.ST16]))
    in_use = data.draw(st.booleans())
    reasons0 = data.draw(st.lists(st.sampled_from(["tag-allowed", "foreign-tag", "x"])))
    twin = copy.deepcopy(sess)
    outcomes = []
    real, session_module.resolve_entry = session_module.resolve_entry, resolve_entry
    try:
        for s, in_python in ((sess, False), (twin, True)):
            changes: dict[int, int] = {}
            reasons = list(reasons0)
            if in_python:
                with python_loops():
                    got = s._resolve(entries, width, in_use, changes, reasons, touched)
            else:
                got = s._resolve(entries, width, in_use, changes, reasons, touched)
            outcomes.append((got, changes, reasons, s.latched))
    finally:
        session_module.resolve_entry = real
    assert outcomes[0] == outcomes[1]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_commit_and_raw_writes(data: st.DataObject) -> None:
    """RawWrites.writes and Session.commit with C and in Python, on generated steps."""
    n = data.draw(st.sampled_from([3, 17]))
    _engine, sess = msix_session(n)
    sess.guest_low = data.draw(st.lists(st.sampled_from([None, 0, 1]), min_size=n, max_size=n))
    sess.dev_low = data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))
    steps = data.draw(
        st.lists(
            st.one_of(
                st.tuples(st.just(0), st.just(0), st.integers(0, 2**32 - 1)),
                st.tuples(st.just(1), st.integers(0, n - 1), st.integers(0, 0xFFFF)),
            )
        )
    )
    twin = copy.deepcopy(sess)
    backend = sess.backend
    got = backend.writes(sess, steps)
    with python_loops():
        want = backend.writes(twin, steps)
    assert got == want
    sess.commit(steps)
    with python_loops():
        twin.commit(steps)
    for name in ("dev_ctrl", "dev_ent", "guest_low", "dev_low"):
        assert getattr(sess, name) == getattr(twin, name), name


def test_raw_writes_declines_unknown_low_bits() -> None:
    """A Vector Control whose low bits neither the guest nor the device view knows: C leaves
    it to the Python loop (which refuses it)."""
    _engine, sess = msix_session(3)
    sess.guest_low = [None] * 3
    sess.dev_low = [None] * 3
    assert bulk.C is not None
    args = ([(1, 0, 5)], (0,), True, sess.guest_low, sess.dev_low, sess.geo.vc_offsets, 4)
    assert bulk.C.raw_writes(*args, 16, 0xFFFF, 4, 2) is None
    with pytest.raises(AssertionError):
        sess.backend.writes(sess, [(1, 0, 5)])


# --- the self-check's loops ----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    allowed=st.frozensets(st.sampled_from([0, 1, 0x10, 0x1001, 0xFFFF])),
    ent=st.lists(
        st.sampled_from([0, 1, 0x10_0000, 0x1001_0000, 0xFFFF_0001, 2**64, -1, True, None, (1,)])
    ),
    shift=st.sampled_from([0, 16]),
    mask=st.sampled_from([0xFF, 0xFFFF]),
)
def test_tags_allowed(allowed: frozenset[int], ent: list[Any], shift: int, mask: int) -> None:
    """The C pass: None for an entry anywhere that is not a plain int (the Python loop's: it
    takes every tag before it asks), else False for one whose tag is not allowed, else True."""
    assert bulk.C is not None
    want: bool | None = True
    if not all(type(v) is int and 0 <= v < 2**64 for v in ent):
        want = None
    elif not all((v >> shift) & mask in allowed for v in ent):
        want = False
    assert bulk.C.tags_allowed(allowed, ent, shift, mask) is want


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_entry_indices_and_apply_disabled(data: st.DataObject) -> None:
    """Checker._entry_indices and _apply_run (every control disabled), C and Python."""
    n = data.draw(st.sampled_from([3, 17]))
    _engine, sess = msix_session(n)
    checker: Checker = sess.checker
    vc = [TABLE + 16 * i + 12 for i in range(n)]
    writes = data.draw(
        st.lists(
            st.builds(
                DeviceWrite,
                st.sampled_from(["bar", "config"]),
                st.sampled_from([*vc, TABLE, 0x40]),
                st.sampled_from([4, 2, 8]),
                st.integers(0, 2**64 - 1),
                st.sampled_from([4, 4, 0, None]),
            ),
            max_size=8,
        )
    )
    got = checker._entry_indices(writes)
    with python_loops():
        want = checker._entry_indices(writes)
    assert got == want
    run = [i for i in want[:-1] if i is not None]
    whole = [w for w, i in zip(writes, want, strict=False) if i is not None]
    twin = copy.deepcopy(checker)
    checker._undo.clear()
    checker._apply_run(whole, 0, run, sess.rules, False, True)
    twin._undo.clear()
    with python_loops():
        twin._apply_run(whole, 0, run, sess.rules, False, True)
    assert checker.ent == twin.ent
    assert [(i, old) for _, i, old in checker._undo] == [(i, old) for _, i, old in twin._undo]
    assert all(e is checker.ent for e, _, _ in checker._undo)


@pytest.mark.parametrize(("flag", "in_python"), [([], False), (["--no-native"], True)])
def test_serve_no_native_runs_every_loop_in_python(flag: list[str], in_python: bool) -> None:
    """``serve --no-native`` decides everything in Python: the C loops too."""
    script = (
        "import sys\n"
        "from tphtrap import bulk\n"
        "from tphtrap.cli import main\n"
        f"rc = main(['serve', '--policy', 'policies/two-tenants.yaml', *{flag!r}])\n"
        "print(rc, bulk.C is None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.split()[-2:] == ["0", str(in_python)], done.stderr[-500:]
