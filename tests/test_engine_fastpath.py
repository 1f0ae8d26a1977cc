"""The engine's whole-register fast paths decide exactly as its general path.

``Engine.fast_paths`` sends a write of one whole ST entry or Vector Control word, in the usual
state, through a shorter path (``Session.steady_entry``). Here two engines, one as it runs and
one with every shortcut off (the fast paths, the session's kept grants and kept entry
resolutions, the self-check's single-write path, all-disabled test, kept control rules and
batched entry runs, and the C loops of tphtrap.bulk), are driven in lockstep by the attacker
of tests/test_engine_stateful.py (its device simulator and oracle check the fast engine as
always), and on large ST tables below: after every call, both must have answered the same and
hold the same state, down to the self-check's copy of the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_check_shortcuts import NeverKept, without_shortcuts
from test_engine import CAP, MSIX, A, B, fixture, policy, tph_base
from test_engine_stateful import TphMachine
from test_host_stateful import HostMachine

from tphtrap import bulk
from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.engine.render import HostOps
from tphtrap.engine.session import Session
from tphtrap.events import ConfigWrite, Decision, MsixWrite, Reset, Verdict
from tphtrap.policy import OnViolation, Policy
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

EXAMPLES = int(os.environ.get("TPHTRAP_EXAMPLES", 2_000)) // 4

# Everything a session decides from, and the self-check's copy of the device (``_grants`` is
# a cache of a pure function and left out).
SESSION_STATE = (
    "image", "ctrl_written", "written", "guest_tag", "guest_low", "dev_ctrl", "dev_ent",
    "dev_low", "pm_state", "latched", "revoked", "poisoned", "settled", "dirty", "prospective",
    "counts", "rules",
)  # fmt: skip
CHECKER_STATE = ("ctrl", "ent", "pm", "_host_marks", "_host_undo")


def state(engine: Engine) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, sess in engine._sessions.items():
        assert isinstance(sess, Session)
        backend = sess.backend
        out[key] = (
            [getattr(sess, name) for name in SESSION_STATE],
            [getattr(sess.checker, name) for name in CHECKER_STATE],
            (backend.width, backend.refusal, backend.allocated, backend.last)
            if isinstance(backend, HostOps)
            else None,
        )
    return out


class GeneralEngine(Engine):
    """The engine with every shortcut off: each decision made by the general path."""

    fast_paths = False

    def attach(self, vm: str, bdf: str, *args: Any, **kwargs: Any) -> Decision:
        try:
            return super().attach(vm, bdf, *args, **kwargs)
        finally:  # (attach's own full check has nothing kept yet, nor a single-write plan)
            sess = self._sessions.get((vm, bdf))
            if sess is not None:
                sess._grants = NeverKept()
                sess._resolved = NeverKept()
                without_shortcuts(sess.checker)


class TwinEngine:
    """Two engines answering every call; anything that differs fails the test."""

    def __init__(self, policy: Policy) -> None:
        self.fast = Engine(policy)
        self.slow = GeneralEngine(policy)
        self.calls = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fast, slow = getattr(self.fast, name), getattr(self.slow, name)

        def both(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            got = [_outcome(fast, args, kwargs), _in_python(slow, args, kwargs)]
            what = f"{name}{args}"
            assert _comparable(got[0]) == _comparable(got[1]), f"{what}: the answers differ"
            assert state(self.fast) == state(self.slow), f"{what}: the states differ"
            if isinstance(got[0], BaseException):
                raise got[0]
            return got[0]

        return both


def _outcome(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as exc:
        return exc


def _in_python(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """:func:`_outcome` with every loop of :mod:`tphtrap.bulk` in Python."""
    kept, bulk.C = bulk.C, None
    try:
        return _outcome(call, args, kwargs)
    finally:
        bulk.C = kept


def _comparable(result: Any) -> Any:
    """A call's result with the sessions it names replaced by their (vm, bdf)."""
    if isinstance(result, BaseException):
        return (type(result), str(result))
    if isinstance(result, list):
        return [_comparable(r) for r in result]
    if isinstance(result, tuple):
        return tuple(_comparable(r) for r in result)
    if isinstance(result, Session):
        return ("session", result.vm, result.bdf)
    return result


class TwinMachine(TphMachine):
    ENGINE = TwinEngine


class TwinHostMachine(HostMachine):
    """The host backend's attack (a simulated Linux host kernel) on the two engines."""

    ENGINE = TwinEngine


TWINS = settings(
    max_examples=max(1, EXAMPLES),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TwinHostMachine.TestCase.settings = TWINS
test_host_twin_engines = TwinHostMachine.TestCase

TwinMachine.TestCase.settings = TWINS
test_fast_paths_decide_as_the_general_path = TwinMachine.TestCase


@pytest.mark.parametrize("where", ["cap", "msix"])
def test_the_fast_path_is_taken(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver's ST entry / Vector Control write while enabled takes the fast path (or the
    machine above compares the general path with itself)."""
    taken: list[bool] = []
    original = Engine._steady_entry

    def spy(self: Engine, *args: Any) -> Any:
        result = original(self, *args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(Engine, "_steady_entry", spy)
    engine = Engine(policy())
    if where == "cap":
        cfg = fixture(CAP)
        engine.attach("a", A, cfg)
        base = tph_base(cfg)
        engine.handle(ConfigWrite("a", A, base + 0xC, 2, 0x10))
        engine.handle(ConfigWrite("a", A, base + 8, 4, 0x101))  # Interrupt Vector, enabled
        d = engine.handle(ConfigWrite("a", A, base + 0xE, 2, 0x11))
    else:
        cfg = fixture(MSIX)
        engine.attach("b", B, cfg, vector_ctrl=[1] * 32)
        engine.handle(ConfigWrite("b", B, tph_base(cfg) + 8, 4, 0x101))
        d = engine.handle(MsixWrite("b", B, 2, 0x4000 + 12, 4, 0x0002_0000))  # vCPU 2, unmasked
    assert d.verdict in (Verdict.PASS, Verdict.REWRITE), d
    assert taken and taken[-1], f"{d.reasons}: the general path decided"


# --- large tables: a width change re-writes every entry ------------------------------------
# Tags of either VM at either width, another's, virtual ones, and raw values.
TABLE_TAGS = [0, 0x10, 0x11, 0x12, 0x13, 0x1000, 0x1001, 0x1002, 0xFFFF, 1, 4, 5, 7]
CONTROLS = [0x1, 0x101, 0x301, 0x101, 0x301, 0x100, 0x300, 0x0, 0x201, 0x102, 0x80000301]


@st.composite
def table_devices(draw: st.DrawFn) -> tuple[str, str, ConfigSpace, int]:
    """(VM, device, its config, its ST table size): ST table in MSI-X (up to 2048 vectors,
    Extended TPH or not) or in the capability (64 entries); TPH left enabled or not."""
    ext = draw(st.booleans())
    enabled = draw(st.sampled_from([0, 0, 0x101, 0x301]))
    if draw(st.integers(0, 3)):
        n = draw(st.sampled_from([33, 300, 2048]))
        tph = TphSpec(extended=ext, location=StLocation.MSIX, table_size=n)
        msix = MsixSpec(n, bir=4, table_offset=0xFFFF0000)
    else:
        n = 64
        entries = tuple(draw(st.lists(st.sampled_from(TABLE_TAGS), min_size=n, max_size=n)))
        tph = TphSpec(extended=ext, location=StLocation.CAP, table_size=n, entries=entries)
        msix = None
    tph = replace(tph, st_mode=enabled & 7, req_enable=enabled >> 8)
    vm, bdf = draw(st.sampled_from([("a", A), ("b", B)]))
    return vm, bdf, ConfigSpace.from_bytes(build_config(tph=tph, msix=msix), "<table>", bdf), n


@settings(max_examples=max(1, EXAMPLES // 5), deadline=None)
@given(data=st.data(), device=table_devices())
def test_a_table_rewrite_decides_as_the_general_path(
    data: st.DataObject, device: tuple[str, str, ConfigSpace, int]
) -> None:
    """Twin engines on large ST tables: entries programmed (whole words, halves, pairs), then
    width changes, disables, resets and reloads (tighter rules, a revoked device)."""
    vm, bdf, cfg, n = device
    policies = [
        policy(),
        policy({"on_violation": OnViolation.DISABLE}, {"on_violation": OnViolation.REWRITE}),
        policy({"cpus": frozenset({0})}, {"cpus": frozenset({4})}),
        policy({"extended_tph": False}, {"extended_tph": False}),
        policy({"devices": {}}, {"devices": {}}),  # the device revoked
    ]
    twin = TwinEngine(policies[0])
    known = data.draw(st.sampled_from([None, n, n // 2]), "vector_ctrl")
    lows = [data.draw(st.sampled_from([0, 1])) for _ in range(known)] if known else None
    twin.attach(vm, bdf, cfg, vector_ctrl=lows)
    ctrl = tph_base(cfg) + 8
    msix = cfg.tph is not None and cfg.tph.location is StLocation.MSIX
    table = 0xFFFF0000
    for _ in range(data.draw(st.integers(1, 5), "rounds")):
        for _ in range(data.draw(st.integers(0, 12), "entries")):
            i = data.draw(st.integers(0, n - 1))
            tag = data.draw(st.sampled_from(TABLE_TAGS))
            if not msix:
                twin.handle(ConfigWrite(vm, bdf, tph_base(cfg) + 0xC + 2 * i, 2, tag))
                continue
            vc = table + 16 * i + 12
            low = data.draw(st.sampled_from([0, 1]))
            how = data.draw(st.sampled_from(["word", "word", "half", "pair"]))
            if how == "word":
                twin.handle(MsixWrite(vm, bdf, 4, vc, 4, tag << 16 | low))
            elif how == "half":
                twin.handle(MsixWrite(vm, bdf, 4, vc + 2, 2, tag))
            else:  # message data and Vector Control in one 8-byte write
                twin.handle(MsixWrite(vm, bdf, 4, vc - 4, 8, (tag << 16 | low) << 32 | 0x4000))
        what = data.draw(st.sampled_from(["ctrl"] * 6 + ["reset", "reload"]), "what")
        if what == "ctrl":
            twin.handle(ConfigWrite(vm, bdf, ctrl, 4, data.draw(st.sampled_from(CONTROLS))))
        elif what == "reset":
            twin.handle(Reset(vm, bdf))
        else:
            twin.reload(data.draw(st.sampled_from(policies)))
    assert twin.calls > 1
