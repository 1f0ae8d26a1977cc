"""Replay's decision memo is invisible: with it and without it, the same traces give the same
summary and leave the engine in the same state.

Traces are drawn from a small alphabet so that accesses repeat in repeated device states (what
the memo remembers), mixed with what must not be taken from memory: ids of every shape
(a line equal to a remembered one but for an id that does not decode alike), malformed lines,
expectations that fail, attaches, detaches and reloads between repetitions, more notable
writes than the summary lists. Each draw is replayed with and without the memo, with and
without ``--expect`` and a filter, then both engines answer the same probe accesses.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tphtrap import replay_memo
from tphtrap.cli import main
from tphtrap.device import ConfigSpace, load_device
from tphtrap.events import ConfigRead, ConfigWrite, MsixRead, MsixWrite, Reset
from tphtrap.policyfile import load_policy
from tphtrap.replay import Replayer
from tphtrap.wire import decision_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import workload  # noqa: E402  (the benchmark's traces: a two-tenant driver session)

TRACES = ROOT / "fixtures" / "traces"
DEVICES = ROOT / "fixtures" / "devices"
POLICY_PATH = ROOT / "policies" / "two-tenants.yaml"
POLICY = load_policy(str(POLICY_PATH))
A, B = workload.A, workload.B
PATHS = {A["bdf"]: workload.DEV_A, B["bdf"]: workload.DEV_B}

ACCESSES: list[dict[str, Any]] = [
    {"op": "cfg_write", "offset": workload.CTRL_A, "width": 4, "value": 0x101, **A},
    {"op": "cfg_write", "offset": workload.CTRL_A, "width": 4, "value": 0x001, **A},
    {"op": "cfg_write", "offset": workload.CTRL_A, "width": 4, "value": 0x0, **A},
    {"op": "cfg_write", "offset": workload.CTRL_A + 1, "width": 1, "value": 0x1, **A},
    {"op": "cfg_write", "offset": workload.TABLE_A, "width": 2, "value": 0x01, **A},
    {"op": "cfg_write", "offset": workload.TABLE_A + 2, "width": 2, "value": 0x02, **A},
    {"op": "cfg_write", "offset": workload.TABLE_A + 1, "width": 2, "value": 0x0100, **A},
    {"op": "cfg_write", "offset": workload.TABLE_A, "width": 4, "value": 0x0001_0001, **A},
    {"op": "cfg_read", "offset": workload.CTRL_A, "width": 4, **A},
    {"op": "cfg_read", "offset": workload.TABLE_A, "width": 4, **A},
    {"op": "cfg_write", "offset": 0x04, "width": 2, "value": 0x0406, **A},
    {"op": "reset", **A},
    {"op": "cfg_write", "offset": workload.CTRL_B, "width": 4, "value": 0x301, **B},
    {"op": "cfg_write", "offset": workload.CTRL_B, "width": 4, "value": 0x0, **B},
    {
        "op": "msix_write",
        "bar": 2,
        "offset": workload.MSIX_B + 12,
        "width": 4,
        "value": 0x0202_0000,
        **B,
    },
    {
        "op": "msix_write",
        "bar": 2,
        "offset": workload.MSIX_B + 12,
        "width": 4,
        "value": 0x0101_0001,
        **B,
    },
    {
        "op": "msix_write",
        "bar": 2,
        "offset": workload.MSIX_B + 28,
        "width": 4,
        "value": 0x0202_0001,
        **B,
    },
    {
        "op": "msix_write",
        "bar": 2,
        "offset": workload.MSIX_B + 8,
        "width": 8,
        "value": 0x0202_0001 << 32,
        **B,
    },
    {
        "op": "msix_write",
        "bar": 2,
        "offset": workload.MSIX_B + 14,
        "width": 2,
        "value": 0x0303,
        **B,
    },
    {"op": "msix_read", "bar": 2, "offset": workload.MSIX_B + 12, "width": 4, **B},
    {"op": "reset", **B},
]
EXPECTS = [None, {"verdict": "pass"}, {"verdict": "drop"}, {"verdict": "pass", "writes": []}]
# ids that decode alike (the memo may count their line from memory) and ids that do not
IDS = ["7", "0", "-12", "123456789012345678", '"req-1.a"', '"x"']
ODD_IDS = [
    "-0",
    "00",
    "1.0",
    "true",
    "null",
    str(2**64),
    str(-(2**63) - 1),
    '"a:b"',
    '""',
    '"\\u0041"',
    '"' + "y" * 129 + '"',
    "1e3",
]


def _tail(req: dict[str, Any], expect: Any) -> str:
    body = json.dumps({**req, **({"expect": expect} if expect is not None else {})})
    return body[1:]  # without the opening brace: the line is '{"id":' + id + ',' + tail


def _attach(bdf: str) -> str:
    vm = A["vm"] if bdf == A["bdf"] else B["vm"]
    return json.dumps({"id": 1, "op": "attach", "vm": vm, "bdf": bdf, "path": str(PATHS[bdf])})


SPECIAL = [
    "",
    "not json",
    '{"id":3,"id":4,' + _tail(ACCESSES[0], None),  # a duplicate key
    '{"id":5,' + _tail(ACCESSES[0], None)[:-1],  # cut short
    json.dumps({"id": 9, "op": "detach", **A}),
    _attach(A["bdf"]),
    _attach(B["bdf"]),
    json.dumps({"id": 9, "op": "reload", "policy": str(POLICY_PATH)}),
    json.dumps(
        {"id": 9, "op": "reload", "policy": str(ROOT / "policies" / "strict-baseline.yaml")}
    ),
    json.dumps({"id": 9, "op": "attach", "vm": A["vm"], "bdf": A["bdf"], "path": "/nonexistent"}),
]

access_lines = st.tuples(
    st.sampled_from(IDS),
    st.integers(0, len(ACCESSES) - 1),
    st.sampled_from(range(len(EXPECTS))),
    st.sampled_from(["\n", "\n", "\n", "\r\n"]),
).map(lambda t: f'{{"id":{t[0]},{_tail(ACCESSES[t[1]], EXPECTS[t[2]])}{t[3]}')
odd_lines = st.tuples(st.sampled_from(ODD_IDS), st.integers(0, len(ACCESSES) - 1)).map(
    lambda t: f'{{"id":{t[0]},{_tail(ACCESSES[t[1]], None)}\n'
)
junk_lines = st.sampled_from(SPECIAL[:4]).map(lambda s: s + "\n")
structural_lines = st.sampled_from(SPECIAL[4:]).map(lambda s: s + "\n")  # the memo settles
lines_strategy = st.lists(  # mostly accesses that decode: the lines the memo may learn
    st.sampled_from(
        [access_lines] * 16 + [odd_lines] * 2 + [junk_lines] * 2 + [structural_lines]
    ).flatmap(lambda s: s),
    min_size=4,
    max_size=40,
)
RESETS = [f'{{"id":2,{_tail(ACCESSES[11], None)}\n', f'{{"id":2,{_tail(ACCESSES[20], None)}\n']


def _replayers(**kw: Any) -> tuple[Replayer, Replayer]:
    return Replayer(POLICY, memo=True, **kw), Replayer(POLICY, memo=False, **kw)


def _summary(rp: Replayer) -> dict[str, Any]:
    out = rp.summary.to_json()
    out.pop("seconds", None)
    out.pop("records_per_second", None)
    out["records"].pop("from_memory")
    return out


PROBES = [
    ConfigRead(A["vm"], A["bdf"], workload.CTRL_A, 4),
    ConfigRead(A["vm"], A["bdf"], workload.TABLE_A, 4),
    ConfigWrite(A["vm"], A["bdf"], workload.CTRL_A, 4, 0x101),
    ConfigWrite(A["vm"], A["bdf"], workload.TABLE_A + 4, 2, 0x2),
    MsixRead(B["vm"], B["bdf"], 2, workload.MSIX_B + 12, 4),
    ConfigWrite(B["vm"], B["bdf"], workload.CTRL_B, 4, 0x301),
    MsixWrite(B["vm"], B["bdf"], 2, workload.MSIX_B + 44, 4, 0x0202_0000),
    Reset(A["vm"], A["bdf"]),
    ConfigRead(A["vm"], A["bdf"], workload.CTRL_A, 4),
]


def _same_afterwards(memo: Replayer, plain: Replayer) -> None:
    """Both engines hold the same devices in the same state, with the same decision counts:
    the same probes get the same decisions, and the summary's views of the devices hold the
    same registers."""
    for bdf, view in plain.summary.tph.items():
        other = memo.summary.tph[bdf]
        assert (other.dev_ctrl, other.entry_values) == (view.dev_ctrl, view.entry_values)
    assert sorted((s.vm, s.bdf) for s in memo.engine.sessions()) == sorted(
        (s.vm, s.bdf) for s in plain.engine.sessions()
    )
    counts = {(s.vm, s.bdf): s.counts for s in plain.engine.sessions()}
    assert {(s.vm, s.bdf): s.counts for s in memo.engine.sessions()} == counts
    for probe in PROBES:
        got = [decision_json(rp.engine.handle(probe)) for rp in (memo, plain)]
        assert got[0] == got[1], probe


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(SPECIAL[4:7]), max_size=1),
    lines_strategy,
    st.booleans(),
    st.integers(3, 12),
    st.booleans(),
    st.sampled_from([None, "tph", "device"]),
)
def test_native_traces_replay_alike_with_and_without_the_memo(
    head: list[str], body: list[str], resets: bool, repeat: int, expect: bool, shown: str | None
) -> None:
    """A cycle of lines (after a reset of both devices, or not), repeated."""
    cycle = [*(RESETS if resets else []), *body]
    lines = [_attach(A["bdf"]) + "\n", _attach(B["bdf"]) + "\n", *head, *cycle * repeat]
    select, filter_text = None, shown
    if shown == "tph":
        select = lambda rec: rec.decision.reason != "not-tph"  # noqa: E731
    elif shown == "device":
        select = lambda rec: rec.access.bdf == A["bdf"]  # noqa: E731
    memo, plain = _replayers(check_expect=expect, select=select, filter_text=filter_text)
    list(memo.native("t.jsonl", lines))
    list(plain.native("t.jsonl", lines))
    assert _summary(memo) == _summary(plain)
    _same_afterwards(memo, plain)


@pytest.mark.parametrize("expect", [{"verdict": "pass"}, {"verdict": "drop"}])
def test_expectations_are_counted_and_mismatches_listed_as_without_the_memo(
    expect: dict[str, str],
) -> None:
    """A matching expectation is counted from memory; a mismatch is listed, at its line."""
    lines = [_attach(A["bdf"]) + "\n"]
    lines += [f'{{"id":{i},{_tail(ACCESSES[10], expect)}\n' for i in range(80)]
    memo, plain = _replayers(check_expect=True)
    list(memo.native("t.jsonl", lines))
    list(plain.native("t.jsonl", lines))
    assert _summary(memo) == _summary(plain)
    assert memo.summary.expected == 80
    assert memo.memo is not None
    if expect["verdict"] == "pass":
        assert memo.summary.mismatches == 0 and memo.memo.replayed > 70
    else:
        assert memo.summary.mismatches == 80 and memo.memo.replayed == 0


CYCLE = [*RESETS] + [
    f'{{"id":{n},{_tail(ACCESSES[i], None)}\n'
    for n, i in enumerate([0, 4, 5, 14, 15, 16, 12, 14, 15, 10, 8, 19, 1, 6, 17, 18])
]


@pytest.mark.parametrize("between", range(4, len(SPECIAL)))
def test_a_structural_change_between_repetitions_is_seen(between: int) -> None:
    """A cycle the memo has learned, then a detach, attach or reload, then the cycle again:
    what the engine decides after the change is what counts."""
    lines = [_attach(A["bdf"]) + "\n", _attach(B["bdf"]) + "\n", *CYCLE * 6]
    lines += [SPECIAL[between] + "\n", *CYCLE * 6]
    memo, plain = _replayers()
    list(memo.native("t.jsonl", lines))
    list(plain.native("t.jsonl", lines))
    assert _summary(memo) == _summary(plain)
    _same_afterwards(memo, plain)
    assert memo.memo is not None and memo.memo.replayed > 4 * len(CYCLE)


@pytest.mark.parametrize("vm", [B["vm"], "nobody"])
def test_an_access_naming_a_remembered_device_under_another_vm_is_seen(vm: str) -> None:
    """The summary's view of a device is kept by device: a reset naming it under another VM
    resets that view, and the memo of the device's own VM does not write it back."""
    read = f'{{"id":1,{_tail(ACCESSES[8], None)}\n'
    enable = f'{{"id":1,{_tail(ACCESSES[0], None)}\n'
    foreign = json.dumps({"id": 1, "op": "reset", "vm": vm, "bdf": A["bdf"]}) + "\n"
    lines = [_attach(A["bdf"]) + "\n", _attach(B["bdf"]) + "\n"]
    lines += [*[read] * 6, enable, *[read] * 10, foreign, *[read] * 3, enable, *[read] * 4]
    memo, plain = _replayers()
    list(memo.native("t.jsonl", lines))
    list(plain.native("t.jsonl", lines))
    assert _summary(memo) == _summary(plain)
    assert plain.summary.tph[A["bdf"]].enables == 2
    _same_afterwards(memo, plain)


def test_odd_ids_are_never_counted_from_memory() -> None:
    """A line the memo knows but for an id that does not decode alike is decided afresh:
    it is malformed (or not), as without the memo."""
    learned = [f'{{"id":{i},{_tail(ACCESSES[0], None)}\n' for i in range(40)]
    odd = [f'{{"id":{tok},{_tail(ACCESSES[0], None)}\n' for tok in ODD_IDS]
    lines = [_attach(A["bdf"]) + "\n", *learned, *odd, *learned]
    memo, plain = _replayers()
    list(memo.native("t.jsonl", lines))
    list(plain.native("t.jsonl", lines))
    assert _summary(memo) == _summary(plain)
    assert plain.summary.buckets["malformed"].count >= 8
    assert memo.memo is not None and memo.memo.replayed > 60


def _qemu_pool() -> list[str]:
    rng = random.Random(7)
    return [line for _ in range(3) for line in workload._qemu_cycle(rng)]


QEMU_POOL = _qemu_pool()
QEMU_DEVICES = {
    bdf: ConfigSpace.from_bytes(dev.data, dev.source, bdf, dev.line_map)
    for bdf, dev in (
        (b, load_device(p)) for b, p in (item.split("=", 1) for item in workload.QEMU_DEVICES)
    )
}


def _vm_of(bdf: str) -> str | None:
    owner = POLICY.vm_of_device(bdf)
    return owner.name if owner else None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, len(QEMU_POOL) - 1), max_size=200),
    st.integers(1, 3),
    st.booleans(),
)
def test_qemu_traces_replay_alike_with_and_without_the_memo(
    picks: list[int], repeat: int, bound: bool
) -> None:
    lines = [*workload._qemu_header(), *[QEMU_POOL[i] for i in picks] * repeat]
    kw: dict[str, Any] = {"vm_of": _vm_of, "devices": QEMU_DEVICES if bound else {}}
    memo, plain = _replayers(**kw)
    list(memo.qemu("t.log", lines))
    list(plain.qemu("t.log", lines))
    assert _summary(memo) == _summary(plain)
    _same_afterwards(memo, plain)


def test_the_bench_traces_are_mostly_counted_from_memory(tmp_path: Path) -> None:
    native = tmp_path / "n.jsonl"
    workload.write_native_trace(native, 3000)
    memo, plain = _replayers()
    list(memo.native(str(native)))
    list(plain.native(str(native)))
    assert _summary(memo) == _summary(plain)
    assert memo.memo is not None and memo.memo.replayed > 2500
    _same_afterwards(memo, plain)

    qemu = tmp_path / "q.log"
    workload.write_qemu_trace(qemu, 6000)
    memo, plain = _replayers(vm_of=_vm_of, devices=QEMU_DEVICES)
    list(memo.qemu(str(qemu)))
    list(plain.qemu(str(qemu)))
    assert _summary(memo) == _summary(plain)
    assert memo.memo is not None and memo.memo.replayed > 0.8 * memo.summary.records
    _same_afterwards(memo, plain)


@pytest.mark.parametrize(
    ("nodes", "edges", "device_bytes"), [(2, 64, 1 << 24), (1024, 1, 1 << 24), (1024, 64, 8000)]
)
def test_a_full_memo_gives_up_on_the_device_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: int, edges: int, device_bytes: int
) -> None:
    monkeypatch.setattr(replay_memo, "MAX_NODES", nodes)
    monkeypatch.setattr(replay_memo, "MAX_EDGES", edges)
    monkeypatch.setattr(replay_memo, "MAX_DEVICE_BYTES", device_bytes)
    native = tmp_path / "n.jsonl"
    workload.write_native_trace(native, 1500)
    memo, plain = _replayers()
    list(memo.native(str(native)))
    list(plain.native(str(native)))
    assert _summary(memo) == _summary(plain)
    _same_afterwards(memo, plain)


def test_a_device_whose_accesses_never_repeat_is_decided_access_by_access(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the trial, a device the memo saved nothing on is no longer remembered (keeping
    its states would only cost), and the summary is the same."""
    lines = [_attach(A["bdf"]) + "\n"]
    for n in range(replay_memo.TRIAL + 50):  # every line a new one
        req = {"op": "cfg_write", "offset": workload.TABLE_A, "width": 2, "value": n, **A}
        lines.append(f'{{"id":{n},{_tail(req, None)}\n')
    lines += CYCLE * 4
    given_up: list[str] = []
    give_up = replay_memo.DecisionMemo._give_up

    def spy(self: replay_memo.DecisionMemo, dev: replay_memo.DeviceMemo) -> None:
        given_up.append(dev.bdf)
        give_up(self, dev)

    monkeypatch.setattr(replay_memo.DecisionMemo, "_give_up", spy)
    memo, plain = _replayers()
    list(memo.native("t.jsonl", lines))
    list(plain.native("t.jsonl", lines))
    assert _summary(memo) == _summary(plain)
    assert plain.summary.records == len(lines) - 1
    assert given_up == [A["bdf"]]
    _same_afterwards(memo, plain)


@pytest.mark.parametrize(
    ("trace", "args"),
    [
        ("demo-session.jsonl", ["--expect"]),
        ("demo-session.jsonl", ["--only-tph"]),
        ("qemu-guest-boot.log.gz", ["--vm", "tenant-a"]),
        ("qemu-guest-boot-timestamp.log.gz", ["--vm", "tenant-a", "--only-tph"]),
        ("qemu-guest-flr.log.gz", ["--vm", "tenant-b"]),
        ("qemu-vfio.log", ["--vm", "tenant-a"]),
        (
            "qemu-msix-bar.log",
            ["--vm", "tenant-b", "--device", f"0000:00:03.0={DEVICES / 'nic-st-in-msix.lspci'}"],
        ),
    ],
)
def test_the_command_prints_the_same_summary_with_no_memo(
    trace: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for extra in ([], ["--no-memo"]):
        rc = main(
            ["replay", str(TRACES / trace), "--policy", str(POLICY_PATH), *args, *extra, "--json"]
        )
        summary = json.loads(capsys.readouterr().out)
        summary.pop("seconds")
        summary.pop("records_per_second", None)
        summary["records"].pop("from_memory")
        outputs.append((rc, summary))
    assert outputs[0] == outputs[1]
    assert outputs[0][1]["records"]["count"] > 0


def test_decisions_are_written_for_every_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--decisions`` needs every record: it turns the memo off."""
    native = tmp_path / "n.jsonl"
    workload.write_native_trace(native, 500)
    out = tmp_path / "d.jsonl"
    main(["replay", str(native), "--policy", str(POLICY_PATH), "--decisions", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"]["count"] == 500
    assert len(out.read_text().splitlines()) == 500
