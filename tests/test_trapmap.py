"""The trap map of the attach reply is exact: an access outside it never changes a decision.

Random sessions on the bundled devices, in both backends: the accesses the map lists (and the
host's feedback) are decided twice, once alone and once with random accesses outside the map
mixed in. The decisions must be identical, and every access outside the map must be ``pass``
with the guest's own bytes (reads: not virtualized). Every decision's reason is in the one
table of reason codes, with a verdict that table allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tphtrap.device import ConfigSpace, load_device
from tphtrap.engine import REASONS, Engine
from tphtrap.engine.render import HostFacts
from tphtrap.engine.trapmap import trap_map, trapped
from tphtrap.events import (
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Verdict,
)
from tphtrap.policyfile import load_policy

ROOT = Path(__file__).resolve().parent.parent
POLICY = load_policy(ROOT / "policies" / "two-tenants.yaml")
A = ("tenant-a", "0000:3b:00.0")
FIXTURES = [
    "nic-st-in-cap",
    "nic-st-in-msix",
    "ext-tph",
    "table-1-entry",
    "enabled-at-snapshot",
    "reserved-bits",
    "ds-only",
    "no-tph",
    "table-overlap",
]
CONFIGS = {
    name: ConfigSpace.from_bytes(
        load_device(str(ROOT / "fixtures" / "devices" / f"{name}.lspci")).data, name, A[1]
    )
    for name in FIXTURES
}
Feedback = tuple[str, frozenset[int], bool]
Step = Access | Feedback


def ranges(tm: dict[str, list[dict[str, Any]]], reads: bool) -> tuple[list[range], list[range]]:
    """(config byte ranges, BAR byte ranges of bar ``tm['bar'][k]['bar']``) of the map."""
    cfg = [
        range(r["offset"], r["offset"] + r["length"])
        for r in tm["config"]
        if r["reads"] or not reads
    ]
    bar = [
        range(b["offset"] + k * b["stride"], b["offset"] + k * b["stride"] + b["length"])
        for b in tm["bar"]
        for k in range(b["count"])
    ]
    return cfg, bar


def overlaps(off: int, width: int, rs: list[range]) -> bool:
    return any(off < r.stop and r.start < off + width for r in rs)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[str, bool, list[tuple[bool, Step]]]:
    """(device, host backend?, steps); a step is (outside the map?, access or feedback)."""
    name = draw(st.sampled_from(FIXTURES))
    host = draw(st.booleans())
    cfg = CONFIGS[name]
    from tphtrap.engine.geometry import Geometry

    tm = trap_map(Geometry(cfg))
    wcfg, wbar = ranges(tm, reads=False)
    rcfg, rbar = ranges(tm, reads=True)
    bir = tm["bar"][0]["bar"] if tm["bar"] else 0
    steps: list[tuple[bool, Step]] = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["cw", "cr", "mw", "mr", "vectors"]))
        outside = draw(st.booleans())
        width = draw(st.sampled_from([1, 2, 4] if kind[0] == "c" else [1, 2, 4, 8]))
        value = draw(st.sampled_from([0x101, 0x301, 0x1, 0x0, 0x0202_0000, 0x0101_0001]))
        value &= (1 << (8 * width)) - 1
        if kind == "vectors":
            if host and not outside:
                n = cfg.msix.table_size if cfg.msix else 1
                steps.append(
                    (
                        False,
                        (
                            "vectors",
                            draw(st.frozensets(st.integers(0, n - 1))),
                            draw(st.booleans()),
                        ),
                    )
                )
            continue
        if kind[0] == "c":
            rs = wcfg if kind == "cw" else rcfg
            if outside:
                free = [o for o in range(4096 - width + 1) if not overlaps(o, width, rs)]
                off = draw(st.sampled_from(free))
            elif rs:
                r = draw(st.sampled_from(rs))
                off = max(0, min(draw(st.integers(r.start - width + 1, r.stop - 1)), 4096 - width))
            else:
                continue
            access: Access = (
                ConfigWrite(*A, off, width, value) if kind == "cw" else ConfigRead(*A, off, width)
            )
        else:
            rs = wbar if kind == "mw" else rbar
            if outside:
                bar = draw(st.integers(0, 5))
                off = draw(st.integers(0, 0x5000))
                if bar == bir and overlaps(off, width, rs):
                    continue
            elif rs:
                bar = bir
                r = draw(st.sampled_from(rs))
                off = draw(st.integers(r.start - width + 1, r.stop - 1))
            else:
                continue
            access = (
                MsixWrite(*A, bar, off, width, value)
                if kind == "mw"
                else MsixRead(*A, bar, off, width)
            )
        steps.append((outside, access))
    return name, host, steps


def run(name: str, host: bool, steps: list[Step]) -> list[Decision]:
    engine = Engine(POLICY)
    facts = HostFacts(3) if host else None
    out = [engine.attach(*A, CONFIGS[name], facts)]
    for step in steps:
        if isinstance(step, tuple):
            out.append(engine.host_vectors(*A, step[1], step[2]))
        else:
            out.append(engine.handle(step))
    return out


def check_reason(d: Decision) -> None:
    for code in d.reasons:
        assert code in REASONS, code
    assert d.verdict.value in REASONS[d.reason].verdicts.split(), (d.reason, d.verdict)


@settings(max_examples=300, deadline=None)
@given(sessions())
def test_no_access_outside_the_map_changes_a_decision(
    session: tuple[str, bool, list[tuple[bool, Step]]],
) -> None:
    name, host, steps = session
    mixed = run(name, host, [s for _, s in steps])
    alone = run(name, host, [s for outside, s in steps if not outside])
    inside = [mixed[0]] + [
        d for (outside, _), d in zip(steps, mixed[1:], strict=True) if not outside
    ]
    assert inside == alone
    for d in mixed:
        check_reason(d)
    for (outside, step), d in zip(steps, mixed[1:], strict=True):
        if not outside:
            continue
        assert d.verdict is Verdict.PASS and d.reason == "not-tph", (step, d)
        assert not d.ops and not d.read_mask, (step, d)
        if isinstance(step, ConfigWrite | MsixWrite):
            space = "config" if isinstance(step, ConfigWrite) else "bar"
            bar = step.bar if isinstance(step, MsixWrite) else None
            assert d.writes == (DeviceWrite(space, step.offset, step.width, step.value, bar),)


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(FIXTURES),
    space=st.sampled_from(["config", "bar"]),
    offset=st.integers(0, 4095) | st.integers(0x3F00, 0x4300),
    width=st.sampled_from([1, 2, 4, 8]),
    write=st.booleans(),
    bar=st.integers(0, 5),
)
def test_trapped_reads_the_map_as_written(
    name: str, space: str, offset: int, width: int, write: bool, bar: int
) -> None:
    """``trapped`` (for VMMs and the benchmarks) says what this file's own reading says."""
    from tphtrap.engine.geometry import Geometry

    tm = trap_map(Geometry(CONFIGS[name]))
    cfg, bars = ranges(tm, reads=not write)
    if space == "config":
        want = overlaps(offset, width, cfg)
    else:
        want = bool(tm["bar"]) and bar == tm["bar"][0]["bar"] and overlaps(offset, width, bars)
    assert trapped(tm, space, offset, width, write=write, bar=bar) == want
