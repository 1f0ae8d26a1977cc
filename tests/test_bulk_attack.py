"""The C loops of tphtrap/_bulk.c on hostile inputs: the Python loop's result, or None with
nothing changed, and never a crash, a leak or an exception the Python loop would not raise.

Inputs that could crash the process (callbacks that drop what the C side holds) run in a
child interpreter.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bulk import python_loops

from tphtrap import bulk, wire
from tphtrap.engine import session as session_module
from tphtrap.engine.check import Checker, _all_allowed
from tphtrap.engine.render import RawWrites
from tphtrap.engine.session import Session
from tphtrap.engine.target import KEEP, LATCH, REFUSE
from tphtrap.events import DeviceWrite

pytestmark = pytest.mark.skipif(bulk.C is None, reason="tphtrap._bulk is not built")


def c() -> Any:
    assert bulk.C is not None
    return bulk.C


def child(code: str) -> str:
    """Run ``code`` in a child interpreter; its output (it must exit 0)."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
    return run.stdout


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as e:
        return "raised", (type(e), str(e))


class Weird(int):
    """An int equal to everything."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = int.__hash__


# --- reference runs of Session._resolve's loop --------------------------------------------
def resolve_args(
    n: int = 4,
    msix: bool = True,
    results: dict[Any, tuple[Any, Any]] | None = None,
    entries: Any = None,
    touched: Any = None,
) -> list[Any]:
    results = results or {}

    def resolver(guest: Any, written: Any, dev: Any, *rest: Any) -> Any:
        return results.get(guest, (0x10, "tag-allowed"))

    class Rules:
        fallback = {8: 0x11}

    return [
        range(n) if entries is None else entries,
        list(range(n)) if msix else (lambda i: i),
        [True] * n,
        [0] * n,
        [1] * n,
        [1] * n,
        msix,
        8,
        True,
        Rules(),
        resolver,
        {},
        set() if touched is None else touched,
        {},
        [],
    ]


def python_resolve(args: list[Any]) -> Any:
    """Session._resolve's own Python loop on resolve()'s arguments: (result, latched)."""
    entries, guest_of, written, dev_ent, guest_low, dev_low, msix = args[:7]
    width, in_use, rules, resolver, resolved, touched, changes, reasons = args[7:]
    sess = SimpleNamespace(
        rules=rules,
        geo=SimpleNamespace(in_msix=msix),
        guest_tag=guest_of,
        guest_entry=guest_of,
        written=written,
        dev_ent=dev_ent,
        guest_low=guest_low,
        dev_low=dev_low,
        _resolved=resolved,
        latched=False,
    )
    real, session_module.resolve_entry = session_module.resolve_entry, resolver
    try:
        with python_loops():
            got = Session._resolve(sess, entries, width, in_use, changes, reasons, touched)
    finally:
        session_module.resolve_entry = real
    return got, sess.latched


def both_resolve(args: list[Any]) -> tuple[Any, Any]:
    """(C's answer and state, the reference's) on copies of ``args``."""
    a, b = copy.deepcopy(args), copy.deepcopy(args)
    a[10], b[10] = args[10], args[10]
    a[9], b[9] = args[9], args[9]
    got = outcome(lambda: c().resolve(*a))
    want = outcome(lambda: python_resolve(b))
    state = lambda x: (x[13], x[14], x[2:6], x[0] if isinstance(x[0], list) else None)  # noqa: E731
    return (got, state(a)), (want, state(b))


def test_resolve_plain_case_matches() -> None:
    args = resolve_args(results={1: (KEEP, None), 2: (0x10, "tag-fallback")})
    args[3][2] = None
    args[4][1] = 0
    (got, gs), (want, ws) = both_resolve(args)
    assert got == ("ok", False) and want == ("ok", (False, False))
    assert gs == ws


def test_resolve_int_subclass_value() -> None:
    """An int subclass's own == decides in Python (Weird == LATCH): C must not read it as a
    plain number."""
    args = resolve_args(results={1: (Weird(5), "tag-allowed")})
    (got, gs), (want, ws) = both_resolve(args)
    assert want[1][0] is True  # the reference latches
    assert got == ("ok", None) or (got[1] == want[1][0] and gs == ws)


def test_resolve_set_subclass_touched() -> None:
    """``i in touched`` is the set's own __contains__ in Python."""

    class All(set[int]):
        def __contains__(self, o: object) -> bool:
            return True

    args = resolve_args(results={0: (0, None)}, touched=All())
    (got, gs), (_, ws) = both_resolve(args)
    assert ws[0] == {0: 0, 1: 0x10, 2: 0x10, 3: 0x10}
    assert got == ("ok", None) or gs == ws


def test_resolve_does_not_consume_an_iterator() -> None:
    """An iterator of entries: C may not take it (it would be empty for the Python loop)."""
    args = resolve_args(results={2: (LATCH, "foreign-tag")})
    args[0] = iter(range(4))
    assert c().resolve(*args) is None
    assert list(args[0]) == [0, 1, 2, 3]
    assert args[13] == {} and args[14] == []


def test_resolve_huge_entry_declines() -> None:
    """An entry index beyond Py_ssize_t: the Python loop raises IndexError, not C an
    OverflowError."""
    args = resolve_args(entries=[2**70])
    got = outcome(lambda: c().resolve(*args))
    assert got == ("ok", None) or got[1][0] is IndexError


def test_resolve_resolver_raises_keeps_python_state() -> None:
    """A resolver raising at the third entry: the first two entries' changes and reasons are
    in place, as the Python loop leaves them."""
    calls = []

    def resolver(guest: Any, *rest: Any) -> Any:
        calls.append(guest)
        if guest == 2:
            raise KeyError("boom")
        return (0x10 + guest, "tag-translated")

    args = resolve_args()
    args[10] = resolver
    (got, gs), (want, ws) = both_resolve(args)
    assert want[0] == "raised" and got == want
    assert ws[0] == {0: 0x10, 1: 0x11} and ws[1] == ["tag-translated"]
    assert gs == ws


def test_resolve_fallback_error_keeps_python_state() -> None:
    """rules.fallback[width] raising: the entry's own reason is already in."""

    class Rules:
        fallback: dict[int, int] = {}

    args = resolve_args(results={1: (KEEP, "foreign-tag")})
    args[3][1] = None  # unknown on the device: the fallback is asked
    args[4][1] = 0
    args[9] = Rules()
    (got, gs), (want, ws) = both_resolve(args)
    assert want[0] == "raised" and got == want
    assert ws[1] == ["tag-allowed", "foreign-tag"]
    assert gs == ws


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_resolve_generated(data: st.DataObject) -> None:
    """Generated columns with odd values (bools, negatives, huge ints, None): C's answer is
    the reference's or None with nothing changed."""
    n = data.draw(st.integers(1, 6))
    odd = st.sampled_from([None, 0, 1, 0x10, 7, -1, True, False, 2**64, 2**63 - 1])

    def column(values: st.SearchStrategy[Any]) -> list[Any]:
        return data.draw(st.lists(values, min_size=n, max_size=n))

    msix = data.draw(st.booleans())
    value = st.sampled_from([KEEP, REFUSE, LATCH, 0, 0x10, -7, True, 2**63, 2**64 + 3, None])
    code = st.sampled_from([None, "tag-allowed", "tag-fallback", "foreign-tag", 3])
    results = data.draw(st.dictionaries(odd, st.tuples(value, code) | st.none() | st.just(())))
    args = resolve_args(n, msix, results)
    args[0] = data.draw(
        st.sampled_from([range(n), list(range(n)), tuple(range(n))])
        | st.lists(st.sampled_from([0, n - 1, -1, n, True, 2**64]), max_size=4)
    )
    if msix:
        args[1] = column(odd)
    args[2] = column(st.booleans())
    args[3], args[4], args[5] = column(odd), column(odd), column(odd)
    args[8] = data.draw(st.booleans())
    args[12] = set(data.draw(st.lists(st.integers(0, n))))
    args[14] = data.draw(st.lists(st.sampled_from(["tag-allowed", "foreign-tag", "x"])))
    a = copy.deepcopy(args)
    a[9], a[10] = args[9], args[10]
    got = outcome(lambda: c().resolve(*a))
    if got == ("ok", None):  # declined: nothing changed but the cache (the loop clears it)
        a[11] = {}
        assert a[:9] + a[11:] == args[:9] + args[11:]
        return
    (g, gs), (w, ws) = both_resolve(args)
    if w[0] == "ok":
        assert g == ("ok", w[1][0]) and not w[1][1], (g, w)
    else:
        assert g == w
    assert gs == ws


def test_resolve_guest_of_clears_the_cache() -> None:
    """guest_of (a callable) empties ``resolved`` at every call: what C took from it must
    stay alive."""
    out = child(
        """
        from tphtrap import bulk
        class Rules:
            fallback = {8: 0}
        resolved = {}
        def guest_of(i):
            resolved.clear()
            return 5
        def resolver(*a):
            return (int("1000") + 1, "tag-" + "translated")
        changes, reasons = {}, []
        got = bulk.C.resolve([0, 1, 2], guest_of, [True] * 3, [0] * 3, [1] * 3, [1] * 3, False,
                             8, True, Rules(), resolver, resolved, set(), changes, reasons)
        print(got, changes, reasons, flush=True)
        """
    )
    assert out.split("\n")[0] in (
        "False {0: 1001, 1: 1001, 2: 1001} ['tag-translated']",
        "None {} []",
    )


def test_resolve_callback_shortens_the_lists() -> None:
    """A resolver that empties the session lists: the Python loop raises IndexError; C must
    not read past their ends."""
    out = child(
        """
        from tphtrap import bulk
        class Rules:
            fallback = {8: 0}
        n = 64
        cols = [[True] * n, [0] * n, [1] * n, [1] * n]
        def resolver(guest, *a):
            for col in cols:
                col.clear()
            return (0x10 + guest, None)
        changes, reasons = {}, []
        try:
            got = bulk.C.resolve(range(n), list(range(n)), *cols, True, 8, True, Rules(),
                                 resolver, {}, set(), changes, reasons)
        except IndexError as e:
            got = "IndexError"
        print(got, changes, flush=True)
        """
    )
    assert out.split("\n")[0] in ("IndexError {}", "None {}")


def test_resolve_callback_shortens_the_entries() -> None:
    """A resolver that empties the list of entries: the Python loop stops after the entry."""
    out = child(
        """
        from tphtrap import bulk
        class Rules:
            fallback = {8: 0}
        n = 64
        entries = list(range(n))
        def resolver(guest, *a):
            entries.clear()
            return (0x10 + guest, None)
        changes = {}
        got = bulk.C.resolve(entries, list(range(n)), [True] * n, [0] * n, [1] * n, [1] * n,
                             True, 8, True, Rules(), resolver, {}, set(), changes, [])
        print(got, changes, flush=True)
        """
    )
    assert out.split("\n")[0] in ("False {0: 16}", "None {}")


# --- commit --------------------------------------------------------------------------------
def python_commit(steps: Any, dev_ctrl: Any, dev_ent: Any, msix: Any, gl: Any, dl: Any) -> None:
    """Session.commit's own Python loop on commit()'s arguments."""
    sess = SimpleNamespace(
        dev_ctrl=dev_ctrl,
        dev_ent=dev_ent,
        geo=SimpleNamespace(in_msix=msix),
        guest_low=gl,
        dev_low=dl,
    )
    with python_loops():
        Session.commit(sess, steps)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_commit_generated(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 5))
    index = st.sampled_from([0, n - 1, n, -1, True, 2**64, None])
    step = st.tuples(st.sampled_from([0, 1, 2, False, -1, None]), index, st.integers(0, 9))
    steps = data.draw(st.lists(step | st.just((1, 0)) | st.just([0, 0, 1]), max_size=5))
    lists = [data.draw(st.lists(st.sampled_from([None, 0, 1]), min_size=n, max_size=n))]
    lists *= 4
    msix = data.draw(st.sampled_from([True, False, 1, 0]))
    a, b = copy.deepcopy(lists), copy.deepcopy(lists)
    got = outcome(lambda: c().commit(steps, a[0], a[1], msix, a[2], a[3]))
    if got == ("ok", None):
        assert a == lists
        return
    want = outcome(lambda: python_commit(steps, b[0], b[1], msix, b[2], b[3]))
    assert got == (("ok", True) if want[0] == "ok" else want)
    assert a == b


def test_commit_index_drops_the_step() -> None:
    """An index whose __index__ empties ``steps``: the step's value must stay alive (the
    Python loop holds it in a local)."""
    out = child(
        """
        from tphtrap import bulk
        dead = []
        class Value:
            def __del__(self):
                dead.append(1)
        class Index:
            def __index__(self):
                steps.clear()
                return 0
        steps = [(1, Index(), Value())]
        dev_ent = [None]
        got = bulk.C.commit(steps, [None], dev_ent, False, [None], [None])
        print(got, dead, flush=True)
        if got is None:
            for what, index, value in [(1, Index(), Value())]:
                dev_ent[index] = value
        print(type(dev_ent[0]).__name__, flush=True)
        """
    )
    assert out.split("\n")[:2] in (["None []", "Value"], ["True []", "Value"])


def test_commit_setitem_mutates_steps() -> None:
    """A dev_ent whose __setitem__ empties ``steps`` (a list subclass)."""
    out = child(
        """
        from tphtrap import bulk
        class Ent(list):
            def __setitem__(self, i, v):
                steps.clear()
                list.__setitem__(self, i, v)
        steps = [(1, 0, object()), (1, 1, object())]
        ent = Ent([None, None])
        got = bulk.C.commit(steps, [None], ent, True, [int("500") + 1] * 2, [None] * 2)
        print(got, len(steps), flush=True)
        """
    )
    assert out.split("\n")[0] in ("None 2", "True 0")


# --- apply_disabled ------------------------------------------------------------------------
def python_apply(
    undo: list[Any], ent: list[Any], writes: Any, start: Any, run: Any, mask: int
) -> None:
    """Checker._apply_run's own Python loop, every control disabled, on apply_disabled()'s
    arguments (the mask is the one its table's place gives)."""
    checker = SimpleNamespace(ent=ent, in_cap=mask == -1, _undo=undo)
    with python_loops():
        Checker._apply_run(checker, writes, start, run, None, False, True)


def w(value: Any) -> DeviceWrite:
    return DeviceWrite("bar", 0, 4, value, 4)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_apply_disabled_generated(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 5))
    ent = data.draw(st.lists(st.sampled_from([None, 0, 1, frozenset({1})]), min_size=n, max_size=n))
    value = st.sampled_from([0, 1, 2**64 + 5, -3, True, 1.5, None])
    writes = data.draw(st.lists(st.builds(w, value) | st.just("x"), max_size=6))
    writes_t = data.draw(st.sampled_from([list, tuple]))(writes)
    start = data.draw(st.sampled_from([0, 1, -1, 2**70, True]))
    run = data.draw(st.lists(st.sampled_from([0, n - 1, n, -1, True, 2**70]), max_size=5))
    mask = data.draw(st.sampled_from([-1, 0xFFFF_FFFF]))
    a, b = copy.deepcopy(ent), copy.deepcopy(ent)
    ua: list[Any] = []
    ub: list[Any] = []
    got = outcome(lambda: c().apply_disabled(ua, a, writes_t, start, run, mask))
    if got == ("ok", None):
        assert a == ent and ua == []
        return
    want = outcome(lambda: python_apply(ub, b, writes_t, start, run, mask))
    assert got == (("ok", True) if want[0] == "ok" else want), (got, want)
    assert a == b
    assert [(x is a, i, old) for x, i, old in ua] == [(x is b, i, old) for x, i, old in ub]


def test_apply_disabled_huge_start() -> None:
    """start beyond Py_ssize_t: Python slices to nothing and raises ValueError from zip()."""
    got = outcome(lambda: c().apply_disabled([], [0], [w(1)], 2**70, [0], -1))
    assert got == ("ok", None) or got[1][0] is ValueError


def test_apply_disabled_does_not_consume_an_iterator() -> None:
    """Writes given as an iterator: Python cannot slice it (TypeError); C must not take it."""
    got = outcome(lambda: c().apply_disabled([], [0], iter([w(1)]), 0, [0], -1))
    assert got == ("ok", None) or got[1][0] is TypeError


def test_apply_disabled_value_and_mutates_run() -> None:
    """A value whose & empties ``run`` and ``ent``: C must not index past them."""
    out = child(
        """
        from tphtrap import bulk
        from tphtrap.events import DeviceWrite
        class V:
            def __and__(self, m):
                run.clear()
                ent.clear()
                return 7
        ent = [0] * 64
        run = list(range(64))
        writes = [DeviceWrite("bar", 0, 4, V(), 4) for _ in range(64)]
        undo = []
        try:
            got = bulk.C.apply_disabled(undo, ent, writes, 0, run, -1)
        except Exception as e:
            got = type(e).__name__
        print(got, len(undo), flush=True)
        """
    )
    assert out.split("\n")[0] in ("None 0",)


# --- entry_indices -------------------------------------------------------------------------
def python_entry_indices(at: dict[Any, int], writes: Any) -> list[int | None]:
    """Checker._entry_indices' own Python loop on entry_indices()'s arguments."""
    with python_loops():
        return Checker._entry_indices(SimpleNamespace(_entry_at=at), writes)


def test_entry_indices_matches_on_many_writes() -> None:
    """The key the C side reuses between lookups gives each write its own entry."""
    at = {("bar", 4, 16 * i + 12, 4): i for i in range(300)}
    writes = [DeviceWrite("bar", 16 * i + 12, 4, 0, 4) for i in range(300)] * 2
    writes.insert(5, DeviceWrite("config", 0x40, 2, 0))
    got = c().entry_indices(at, writes)
    assert got == python_entry_indices(at, writes)


def test_entry_indices_key_kept_by_eq() -> None:
    """A dict key whose __eq__ keeps the key it is compared with: the kept key must not
    change afterwards."""
    kept: list[Any] = []

    class Grab:
        def __hash__(self) -> int:
            return hash(("bar", 4, 12, 4))

        def __eq__(self, o: object) -> bool:
            kept.append(o)
            return False

    at = {Grab(): 99, ("bar", 4, 12, 4): 0, ("bar", 4, 28, 4): 1}
    writes = [DeviceWrite("bar", 12, 4, 0, 4), DeviceWrite("bar", 28, 4, 0, 4)]
    assert c().entry_indices(at, writes) == [0, 1, None]
    assert kept and kept[0] == ("bar", 4, 12, 4)


def test_entry_indices_does_not_consume_an_iterator() -> None:
    it = iter([DeviceWrite("bar", 12, 4, 0, 4), "not a write"])
    got = c().entry_indices({}, it)
    assert got is None
    assert len(list(it)) == 2


def test_entry_indices_unset_field_error_is_the_first() -> None:
    """A write with no fields set: AttributeError for ``space`` (attrgetter's first)."""
    bare = DeviceWrite.__new__(DeviceWrite)
    got = outcome(lambda: c().entry_indices({}, [bare]))
    assert got == outcome(lambda: python_entry_indices({}, [bare]))


def test_entry_indices_eq_mutates_writes() -> None:
    """A dict key whose __eq__ empties the list of writes: C must not read past its end."""
    out = child(
        """
        from tphtrap import bulk
        from tphtrap.events import DeviceWrite
        class Grab:
            def __hash__(self):
                return hash(("bar", 4, 12, 4))
            def __eq__(self, o):
                writes.clear()
                return False
        at = {Grab(): 99}
        writes = [DeviceWrite("bar", 12, 4, 0, 4) for _ in range(200)]
        got = bulk.C.entry_indices(at, writes)
        print(got, flush=True)
        """
    )
    assert out.split("\n")[0] in ("[None, None]", "None")


# --- writes_text ---------------------------------------------------------------------------
def test_writes_text_does_not_consume_an_iterator() -> None:
    it = iter([DeviceWrite("bar", 12, 4, 0, 4), DeviceWrite("bar", 12, 4, -1, 4)])
    assert c().writes_text(it) is None
    assert len(list(it)) == 2


def test_writes_text_unset_field_error_is_the_first() -> None:
    bare = DeviceWrite.__new__(DeviceWrite)
    got = outcome(lambda: c().writes_text((bare,)))
    want = outcome(lambda: wire._writes_text((bare,)))
    assert got == want


def test_writes_text_subclass_declines() -> None:
    class Sub(DeviceWrite):
        __slots__ = ()

    assert c().writes_text((Sub("bar", 1, 4, 1, 4),)) is None


# --- tags_allowed --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("allowed", "ent", "shift", "mask"),
    [
        (frozenset(), [2**64 - 1], 0, 2**64 - 1),  # a tag of 2**64 - 1 (the "none yet" mark)
        (frozenset({2**63}), [2**63], 0, 2**64 - 1),  # a tag above 2**63
        (frozenset({2**64 - 1}), [2**64 - 1, 2**64 - 1], 0, 2**64 - 1),
        (frozenset({0}), [0, 1 << 63], 63, 1),
    ],
)
def test_tags_allowed_wide_tags(
    allowed: frozenset[int], ent: list[int], shift: int, mask: int
) -> None:
    got = c().tags_allowed(allowed, ent, shift, mask)
    with python_loops():
        want = _all_allowed(allowed, ent, shift, mask)
    assert got is None or got is want


def test_tags_allowed_set_subclass() -> None:
    """``allowed.issuperset`` is the set's own in Python."""

    class Everything(frozenset[int]):
        def issuperset(self, other: Any) -> bool:
            return True

    got = c().tags_allowed(Everything(), [5], 0, 0xFF)
    assert got is None or got is True


def test_tags_allowed_eq_mutates_ent() -> None:
    """An ``allowed`` member whose __eq__ empties ``ent``: C must not read past its end."""
    out = child(
        """
        from tphtrap import bulk
        class Grab:
            def __hash__(self):
                return 5
            def __eq__(self, o):
                ent.clear()
                return False
        ent = [5] + [6] * 100
        got = bulk.C.tags_allowed(frozenset({Grab(), 6}), ent, 0, 0xFF)
        print(got, flush=True)
        """
    )
    assert out.split("\n")[0] in ("False", "None")


# --- raw_writes ----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_raw_writes_generated(data: st.DataObject) -> None:
    """Odd steps: the DeviceWrites of the Python loop, or None."""
    n = data.draw(st.integers(1, 4))
    odd = st.sampled_from([0, 1, n - 1, n, -1, True, 2**64, 2**48, None])
    steps = data.draw(st.lists(st.tuples(st.sampled_from([0, 1, 2, -1]), odd, odd), max_size=5))
    msix = data.draw(st.booleans())
    gl = data.draw(st.lists(st.sampled_from([None, 0, 1, -1, 2**64]), min_size=n, max_size=n))
    dl = data.draw(st.lists(st.sampled_from([None, 0, 1]), min_size=n, max_size=n))
    where = tuple(range(100, 100 + n))
    ctrl_at = (0x40,)
    got = outcome(lambda: c().raw_writes(steps, ctrl_at, msix, gl, dl, where, 4, 16, 0xFFFF, 4, 2))
    if got == ("ok", None):
        return
    geo = SimpleNamespace(
        caps=[SimpleNamespace(ctrl=ctrl_at[0])],
        in_msix=msix,
        msix_bir=4,
        vc_offsets=where if msix else (),
        entry_offsets=() if msix else where,
    )
    sess = SimpleNamespace(geo=geo, guest_low=gl, dev_low=dl)

    def reference() -> list[DeviceWrite]:
        """RawWrites' own Python loop on these arguments."""
        return RawWrites()._writes(sess, steps)

    want = outcome(reference)
    assert got == want


# --- reference counts ----------------------------------------------------------------------
def test_no_leaks_over_many_calls() -> None:
    """Every function's answers, declines and errors over many calls hold no reference."""
    writes = tuple(DeviceWrite("bar", 16 * i + 12, 4, i, 4) for i in range(8))
    bad = (*writes, DeviceWrite("bar", 1, 4, -1, 4))
    at = {("bar", 4, 16 * i + 12, 4): i for i in range(8)}
    allowed = frozenset({0, 1})
    ent = [0x10000] * 8
    steps = [(1, i, i) for i in range(8)] + [(0, 0, 1)]
    res = resolve_args(8)
    raising = resolve_args(8)
    raising[10] = lambda *a: {}["x"]
    latch = resolve_args(8, results={3: (LATCH, "foreign-tag")})
    probes = [writes, bad, at, allowed, ent, steps, *res[1:6], *res[9:], *latch[9:12]]

    def once() -> None:
        c().writes_text(writes)
        c().writes_text(bad)
        c().entry_indices(at, writes)
        c().entry_indices(at, bad)
        c().tags_allowed(allowed, ent, 16, 0xFF)
        c().raw_writes(steps, (0x40,), True, [1] * 8, [1] * 8, tuple(range(8)), 4, 16, 0xFFFF, 4, 2)
        c().commit(steps, [0], [0] * 8, True, [1] * 8, [1] * 8)
        c().apply_disabled([], [0] * 8, writes, 0, list(range(8)), -1)
        res[13].clear()
        res[14].clear()
        c().resolve(*res)
        c().resolve(*latch)
        with pytest.raises(KeyError):
            c().resolve(*raising)

    once()
    before = [sys.getrefcount(p) for p in probes]
    for _ in range(2000):
        once()
    assert [sys.getrefcount(p) for p in probes] == before
    text = c().writes_text(writes)
    assert sys.getrefcount(text) == 2
    indices = c().entry_indices(at, writes)
    assert sys.getrefcount(indices) == 2
