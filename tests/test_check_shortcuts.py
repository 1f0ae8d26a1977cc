"""The self-check's shortcuts refuse exactly what its general loop refuses.

:meth:`Checker.verify` takes a plan of one whole-register write in one step
(``_verify_whole``), skips the entry test while every control value is known and disabled
(``_all_disabled``), keeps what each control value asks of the entries (``_control_rules``)
and applies a run of whole-entry writes, a re-written table, in one step (``batch_entries``).
The engine's plans are safe, so its tests never see the self-check refuse: here two copies of
one device, one with every shortcut and one with none, are given the same random plans, from
random device states (unknown and several-valued registers included), under changing rules
and revocation. Each must accept or refuse alike, with the same message, and hold the same
registers afterwards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine import CAP, MSIX, A, B, fixture, policy

from tphtrap.device import ConfigSpace
from tphtrap.engine.check import Checker, UnsafePlan, Value
from tphtrap.events import DeviceWrite
from tphtrap.policy import TagRules
from tphtrap.spec import PCI_MSIX_ENTRY_SIZE, PCI_TPH_CTRL, StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

# 8-bit host tags of VM a: 0 (neutral), 0x10, 0x11 allowed; 0x12, 0x13 another VM's.
TAGS = [0, 0, 0x10, 0x11, 0x10, 0x11, 0x12, 0x13, 0x1000, 0x1002, 0xFFFF]
# Control values: mostly what a driver writes (off, No ST, Interrupt Vector), sometimes not.
CTRLS = [0, 0, 1, 0x100, 0x101, 0x101, 0x301, 2, 0x102, 0x200, 0x201, 0x300, 0x501, 0x80000101]


@dataclass(frozen=True)
class World:
    name: str
    bdf: str
    vm: str

    def checker(self) -> Checker:
        return Checker(fixture(self.name))

    def rules(self) -> list[TagRules]:
        return [
            policy().rules(self.vm, self.bdf),
            policy({"tph": False}, {"tph": False}).rules(self.vm, self.bdf),
            policy({"extended_tph": False}, {"extended_tph": False}).rules(self.vm, self.bdf),
            policy({"cpus": frozenset({0})}, {"cpus": frozenset({4})}).rules(self.vm, self.bdf),
        ]


class LargeWorld(World):
    """Device b's rules on a device with 2048 MSI-X vectors, the ST table in MSI-X."""

    def checker(self) -> Checker:
        tph = TphSpec(extended=True, location=StLocation.MSIX, table_size=2048)
        msix = MsixSpec(2048, bir=4, table_offset=0xFFFF0000)
        return Checker(ConfigSpace.from_bytes(build_config(tph=tph, msix=msix), self.name, B))


WORLDS = {"cap": World(CAP, A, "a"), "msix": World(MSIX, B, "b")}
RUN_WORLDS = {**WORLDS, "msix-2048": LargeWorld("msix-2048", B, "b")}


def values(word: st.SearchStrategy[int]) -> st.SearchStrategy[Value]:
    """A register's possible values: one (mostly), several (after a reset), or unknown."""
    return st.one_of(word, word, word, st.frozensets(word, min_size=2, max_size=3), st.none())


def entry_words(msix: bool) -> st.SearchStrategy[int]:
    tag = st.sampled_from(TAGS)
    if not msix:
        return tag
    return st.builds(lambda t, low: t << 16 | low, tag, st.sampled_from([0, 1, 0xFFFF]))


@st.composite
def writes(draw: st.DrawFn, c: Checker) -> DeviceWrite:
    """A write the engine might plan, or one it must never plan."""
    start = c.caps[0][0]
    if c.in_cap:
        kind = draw(st.sampled_from(["entry", "entry", "ctrl", "ctrl", "near", "reset"]))
    else:
        kind = draw(st.sampled_from(["vc", "vc", "vc8", "bar", "ctrl", "ctrl", "near", "reset"]))
    if kind == "entry":
        i = draw(st.integers(0, c.n - 1))
        return DeviceWrite("config", c.table_at + 2 * i, 2, draw(st.sampled_from(TAGS)))
    if kind == "ctrl":
        return DeviceWrite("config", start + PCI_TPH_CTRL, 4, draw(st.sampled_from(CTRLS)))
    if kind == "reset":
        return DeviceWrite("config", c.flr_exp - 1, 2, 0x8000)  # Initiate FLR
    if kind == "near":
        width = draw(st.sampled_from([1, 2, 4]))
        off = start + draw(st.integers(PCI_TPH_CTRL - 2, 0x20))
        return DeviceWrite("config", off, width, draw(st.integers(0, (1 << 8 * width) - 1)))
    i = draw(st.integers(0, min(c.n, 4) - 1))
    word = draw(entry_words(True))
    vc = c.msix_start + PCI_MSIX_ENTRY_SIZE * i + 12
    if kind == "vc":
        return DeviceWrite("bar", vc, 4, word, c.msix_bir)
    if kind == "vc8":  # message data and Vector Control, or Vector Control and the next address
        low = draw(st.integers(0, 2**32 - 1))
        if draw(st.booleans()):
            return DeviceWrite("bar", vc - 4, 8, word << 32 | low, c.msix_bir)
        return DeviceWrite("bar", vc, 8, low << 32 | word, c.msix_bir)
    width = draw(st.sampled_from([1, 2, 4, 8]))
    off = vc + draw(st.integers(-14, 6))
    bar = draw(st.sampled_from([c.msix_bir, c.msix_bir, c.msix_bir ^ 1]))
    return DeviceWrite("bar", off, width, draw(st.integers(0, (1 << 8 * width) - 1)), bar)


class NeverKept(dict[Any, Any]):
    """A cache that keeps nothing: every look-up misses."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def without_shortcuts(c: Checker) -> None:
    """From now on ``c`` checks every plan with its general loop and keeps nothing."""
    c._verify_whole = lambda *args: False  # type: ignore[method-assign]
    c._all_disabled = lambda: False  # type: ignore[method-assign]
    c._control_rules = NeverKept()
    c.batch_entries = False


def outcome(c: Checker, plan: list[DeviceWrite], rules: TagRules, revoked: bool, full: bool) -> Any:
    try:
        c.verify(plan, rules, revoked, full)
    except UnsafePlan as exc:
        return str(exc)
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), where=st.sampled_from(sorted(WORLDS)))
def test_shortcuts_refuse_what_the_general_check_refuses(data: st.DataObject, where: str) -> None:
    world = WORLDS[where]
    fast = world.checker()
    msix = not fast.in_cap
    fast.ctrl = [data.draw(values(st.sampled_from(CTRLS)), "ctrl")]
    fast.ent = data.draw(st.lists(values(entry_words(msix)), min_size=fast.n, max_size=fast.n))
    slow = world.checker()  # the same registers (the same sets: they name a bad value alike)
    slow.ctrl, slow.ent = list(fast.ctrl), list(fast.ent)
    without_shortcuts(slow)
    rules = world.rules()
    for _ in range(data.draw(st.integers(1, 8), "plans")):
        plan = data.draw(st.lists(writes(fast), min_size=1, max_size=3), "plan")
        alike(data, fast, slow, plan, rules, full_one_in=4)


def alike(
    data: st.DataObject,
    fast: Checker,
    slow: Checker,
    plan: list[DeviceWrite],
    rules: list[TagRules],
    full_one_in: int,
) -> None:
    """``plan`` checked by both copies under drawn rules, revocation and fullness: the same
    answer, the same registers afterwards."""
    r = rules[data.draw(st.integers(0, len(rules) - 1), "rules")]
    revoked = data.draw(st.integers(0, 4), "revoked") == 0
    full = data.draw(st.integers(1, full_one_in), "full") == 1
    got = outcome(fast, plan, r, revoked, full)
    want = outcome(slow, plan, r, revoked, full)
    assert got == want, f"{plan}: shortcuts say {got!r}, the general check {want!r}"
    assert (fast.ctrl, fast.ent, fast.pm) == (slow.ctrl, slow.ent, slow.pm), plan


def test_a_kept_control_rule_follows_the_rules_and_revocation() -> None:
    """The same control value asks for other tags once the rules change (a reload), and
    for TPH off once the device is revoked: the kept answer must not be served then."""
    world = WORLDS["cap"]
    c = world.checker()
    own, _, _, fewer = world.rules()  # VM a's CPUs 0-3; then CPU 0 only: 0x11 is not its tag
    c.verify([DeviceWrite("config", c.caps[0][0] + PCI_TPH_CTRL, 4, 0x101)], own, False, False)
    entry = DeviceWrite("config", c.table_at + 2, 2, 0x11)
    c.verify([entry], own, False, False)  # Interrupt Vector at 8 bits, kept for ``own``
    refused = f"after config[{entry.offset:#x}/2]=0x11: "
    assert outcome(c, [entry], fewer, False, False) == (
        refused + "entry 1 holds a tag not allowed at 8 bits: 0x11"
    )
    assert outcome(c, [entry], own, True, False) == (
        refused + "TPH enabled where the policy forbids it"
    )
    assert outcome(c, [entry], own, False, False) is None  # and back: the rule for ``own``


def entry_write(c: Checker, i: int, word: int) -> DeviceWrite:
    """The whole-entry write of entry ``i`` (an ST entry, or a Vector Control word)."""
    if c.in_cap:
        return DeviceWrite("config", c.table_at + 2 * i, 2, word)
    return DeviceWrite("bar", c.msix_start + PCI_MSIX_ENTRY_SIZE * i + 12, 4, word, c.msix_bir)


def random_value(rnd: random.Random, msix: bool) -> Value:
    """:func:`values` drawn by ``rnd`` (a table of 2048 entries is too many to draw one by one
    from hypothesis)."""

    def word() -> int:
        tag = rnd.choice(TAGS)
        return tag << 16 | rnd.choice([0, 1, 0xFFFF]) if msix else tag

    kind = rnd.randrange(6)
    if kind == 0:
        return None
    if kind == 1:
        return frozenset({word(), word() ^ 0x10_0000 if msix else word() ^ 0x10})
    return word()


@st.composite
def table_plans(draw: st.DrawFn, c: Checker, rnd: random.Random) -> list[DeviceWrite]:
    """A plan re-writing a stretch of the table (what a width change or a reload plans), with
    what may come around it: a control write, a single write of any kind, an entry written
    twice, a write just outside the table, an aligned dword of an entry that is not its Vector
    Control word."""
    msix = not c.in_cap
    first = draw(st.integers(0, c.n - 1), "first")
    count = draw(st.integers(2, min(c.n - first, 300)) if c.n - first >= 2 else st.just(1))
    words = [random_value(rnd, msix) for _ in range(count)]
    plan = [entry_write(c, first + k, w if type(w) is int else 0) for k, w in enumerate(words)]
    if draw(st.booleans(), "twice") and plan:
        k = draw(st.integers(0, len(plan) - 1))
        plan.insert(k, entry_write(c, first + k, draw(entry_words(msix))))
    if draw(st.booleans(), "outside"):
        past = (
            DeviceWrite("config", c.table_at + 2 * c.n, 2, 0)
            if c.in_cap
            else DeviceWrite("bar", c.msix_end + 12, 4, 0, c.msix_bir)
        )
        plan.insert(draw(st.integers(0, len(plan))), past)
    if msix and draw(st.booleans(), "neighbour"):  # an aligned dword of an entry's message
        k = draw(st.integers(0, len(plan) - 1))
        vc = c.msix_start + PCI_MSIX_ENTRY_SIZE * (first + min(k, count - 1)) + 12
        dword = DeviceWrite(
            "bar", vc - 4 * draw(st.integers(1, 3)), 4, rnd.getrandbits(32), c.msix_bir
        )
        plan.insert(k, dword)
    for _ in range(draw(st.integers(0, 2), "others")):
        plan.insert(draw(st.integers(0, len(plan))), draw(writes(c)))
    return plan


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), where=st.sampled_from(sorted(RUN_WORLDS)), seed=st.integers(0, 2**32))
def test_a_rewritten_table_is_checked_as_the_general_loop_checks_it(
    data: st.DataObject, where: str, seed: int
) -> None:
    """``Checker.batch_entries``: a run of whole-entry writes applied in one step (TPH off
    everywhere) or entry by entry (else), against the general loop: large MSI-X tables, both
    widths, revoked devices, unknown and several-valued registers."""
    world = RUN_WORLDS[where]
    rnd = random.Random(seed)
    fast = world.checker()
    msix = not fast.in_cap
    disabled = st.sampled_from([0, 0, 1, 0x200, 0x80000001])  # mostly off: the batched case
    fast.ctrl = [data.draw(values(st.one_of(disabled, st.sampled_from(CTRLS))), "ctrl")]
    fast.ent = [random_value(rnd, msix) for _ in range(fast.n)]
    slow = world.checker()
    slow.ctrl, slow.ent = list(fast.ctrl), list(fast.ent)
    without_shortcuts(slow)
    rules = world.rules()
    for _ in range(data.draw(st.integers(1, 4), "plans")):
        alike(data, fast, slow, data.draw(table_plans(fast, rnd), "plan"), rules, full_one_in=6)


def test_a_rewritten_table_takes_the_batched_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disabled width change's plan (disable, every Vector Control, enable) is applied
    as one run (or the test above compares the general loop with itself)."""
    c = RUN_WORLDS["msix-2048"].checker()
    runs: list[int] = []
    original = Checker._apply_run

    def spy(self: Checker, writes: Any, start: int, run: list[int], *args: Any) -> None:
        runs.append(len(run))
        original(self, writes, start, run, *args)

    monkeypatch.setattr(Checker, "_apply_run", spy)
    ctrl = DeviceWrite("config", c.caps[0][0] + PCI_TPH_CTRL, 4, 0x1)
    plan = [ctrl, *(entry_write(c, i, 0x1_0000 | i % 2) for i in range(c.n))]
    c.verify(plan, WORLDS["msix"].rules()[0], False, False)
    assert runs == [c.n]
    assert c.ent[c.n - 1] == 0x1_0001
