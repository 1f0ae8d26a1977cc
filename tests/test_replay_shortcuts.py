"""The shortcuts replay takes per record, held to the plain computations they stand for.

* ``compare_decision(expected, d)`` is ``compare(expected, decision_json(d))``, on decisions
  and expectations of every shape (matching, off by one field, hostile JSON);
* the summary's verdict, reason, VM and device tables (derived from one tally) are the
  counters one would keep record by record, keys in the same order.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn

from tphtrap.device import ConfigSpace, load_device
from tphtrap.events import VERDICT_NAMES, Decision, DeviceWrite, Verdict
from tphtrap.policyfile import load_policy
from tphtrap.replay import Record, Replayer, compare, compare_decision
from tphtrap.wire import decision_json

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "fixtures" / "traces"
DEVICES = ROOT / "fixtures" / "devices"
POLICY = load_policy(str(ROOT / "policies" / "two-tenants.yaml"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 1 << 33) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
device_writes = st.builds(
    DeviceWrite,
    space=st.sampled_from(["config", "bar"]),
    offset=st.integers(0, 0x1000),
    width=st.sampled_from([1, 2, 4]),
    value=st.integers(0, 0xFFFF_FFFF),
    bar=st.none() | st.integers(0, 5),
)
decisions = st.builds(
    Decision,
    verdict=st.sampled_from(list(Verdict)),
    reason=st.sampled_from(["not-tph", "tag-fallback", "foreign-tag", "reset", ""]),
    detail=st.text(max_size=8),
    writes=st.lists(device_writes, max_size=4).map(tuple),
    reasons=st.lists(st.sampled_from(["not-tph", "reset", "tag-fallback"]), max_size=3).map(tuple),
    rule=st.none() | st.just("vms.a"),
)


@st.composite
def expectation(draw: DrawFn, d: Decision) -> Any:
    """The decision's own JSON form, then a few edits of it: a key dropped, added or set to
    any JSON value, a write's key likewise, a write dropped or added; or any JSON value."""
    if draw(st.sampled_from([False] * 9 + [True])):
        return draw(json_values)
    e: dict[str, Any] = json.loads(json.dumps(decision_json(d)))
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["drop", "set", "write-drop", "write-set", "writes"]))
        keys = ["verdict", "reason", "writes", "reasons", "detail", "x"]
        writes = e.get("writes")
        if edit == "drop":
            e.pop(draw(st.sampled_from(keys)), None)
        elif edit == "set":
            e[draw(st.sampled_from(keys))] = draw(json_values | st.sampled_from(["pass", "drop"]))
        elif edit == "writes" and isinstance(writes, list):
            if writes and draw(st.booleans()):
                writes.pop(draw(st.integers(0, len(writes) - 1)))
            else:
                writes.append(draw(device_writes).to_json())
        elif isinstance(writes, list) and writes and isinstance(writes[0], dict):
            w = writes[draw(st.integers(0, len(writes) - 1))]
            key = draw(st.sampled_from(["space", "offset", "width", "value", "bar", "y"]))
            if edit == "write-drop":
                w.pop(key, None)
            else:
                w[key] = draw(
                    json_values | st.integers(0, 0x1000) | st.sampled_from(["config", "bar"])
                )
    return e


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_compare_decision_is_compare_of_the_json_form(data: st.DataObject) -> None:
    d = data.draw(decisions)
    expected = data.draw(expectation(d))
    assert compare_decision(expected, d) == compare(expected, decision_json(d))


def _counted_one_by_one(records: list[Record]) -> dict[str, list[tuple[str, int]]]:
    """The tables as counters kept record by record (the definition of their order)."""
    verdicts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    vms: Counter[str] = Counter()
    devices: Counter[str] = Counter()
    for rec in records:
        verdicts[VERDICT_NAMES[rec.decision.verdict]] += 1
        reasons[rec.decision.reason] += 1
        vms[rec.access.vm] += 1
        devices[rec.access.bdf] += 1
    return {
        "verdicts": list(verdicts.items()),
        "reasons": list(reasons.items()),
        "vms": list(vms.items()),
        "records.devices": devices.most_common(),
        "records.reasons": reasons.most_common(),
    }


def _tables(summary: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    return {
        "verdicts": list(summary["verdicts"].items()),
        "reasons": list(summary["reasons"].items()),
        "vms": list(summary["vms"].items()),
        "records.devices": list(summary["records"]["devices"].items()),
        "records.reasons": list(summary["records"]["reasons"].items()),
    }


ACCESS_REQUESTS = st.one_of(
    st.builds(
        lambda off, w, v: {"op": "cfg_write", "offset": off, "width": w, "value": v},
        st.sampled_from([0x4, 0x148, 0x14C, 0x150, 0x154, 0x156, 0x158]),
        st.sampled_from([2, 4]),
        st.integers(0, 0x707),
    ),
    st.builds(
        lambda off: {"op": "cfg_read", "offset": off, "width": 4},
        st.sampled_from([0x0, 0x14C, 0x150]),
    ),
    st.builds(
        lambda off, v: {"op": "msix_write", "bar": 2, "offset": off, "width": 4, "value": v},
        st.sampled_from([0x200C, 0x201C, 0x3000]),
        st.sampled_from([0, 1, 0x0202_0001, 0x0303_0000]),
    ),
    st.just({"op": "reset"}),
)
DEVICE_OF = {
    "0000:3b:00.0": ("tenant-a", DEVICES / "nic-st-in-cap.lspci"),
    "0000:3b:00.1": ("tenant-b", DEVICES / "nic-st-in-msix.lspci"),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(DEVICE_OF)), ACCESS_REQUESTS), max_size=40))
def test_summary_tables_are_the_counts_record_by_record(
    accesses: list[tuple[str, dict[str, Any]]],
) -> None:
    lines = [
        json.dumps({"op": "attach", "vm": vm, "bdf": bdf, "path": str(path)})
        for bdf, (vm, path) in DEVICE_OF.items()
    ]
    for n, (bdf, req) in enumerate(accesses):
        lines.append(json.dumps({"id": n, "vm": DEVICE_OF[bdf][0], "bdf": bdf, **req}))
    rp = Replayer(POLICY)
    records = list(rp.native("random.jsonl", lines))
    assert _tables(rp.summary.to_json()) == _counted_one_by_one(records)


def _bound(spec: dict[str, str]) -> dict[str, ConfigSpace]:
    out = {}
    for bdf, name in spec.items():
        dev = load_device(str(DEVICES / name))
        out[bdf] = ConfigSpace.from_bytes(dev.data, dev.source, bdf, dev.line_map)
    return out


@pytest.mark.parametrize(
    ("trace", "vm", "devices"),
    [
        ("demo-session.jsonl", None, {}),
        ("qemu-guest-boot.log.gz", "tenant-a", {}),
        ("qemu-msix-bar.log", "tenant-b", {"0000:00:03.0": "nic-st-in-msix.lspci"}),
        ("qemu-vfio.log", "tenant-a", {}),
        ("qemu-guest-flr.log.gz", "tenant-b", {}),
    ],
)
def test_summary_tables_of_the_fixture_traces(
    trace: str, vm: str | None, devices: dict[str, str]
) -> None:
    rp = Replayer(POLICY, devices=_bound(devices), vm_of=lambda bdf: vm)
    path = str(TRACES / trace)
    reader = rp.native if trace.endswith(".jsonl") else rp.qemu
    records = list(reader(path))
    assert records
    assert _tables(rp.summary.to_json()) == _counted_one_by_one(records)


DEVICE_WRITES = (
    DeviceWrite("config", 0x154, 2, 0x11),
    DeviceWrite("bar", 0x200C, 4, 0x0202_0001, bar=2),
)
WRITE_EDITS = [
    (i, key, value)
    for i, w in enumerate(DEVICE_WRITES)
    for key, value in [
        *((k, v + 1) for k, v in w.to_json().items() if isinstance(v, int)),
        ("space", "bar" if w.space == "config" else "config"),
        ("extra", 0),
    ]
]


@pytest.mark.parametrize(("index", "key", "value"), WRITE_EDITS)
def test_compare_decision_sees_every_field_of_every_write(index: int, key: str, value: Any) -> None:
    d = Decision(Verdict.REWRITE, "tag-fallback", "", DEVICE_WRITES)
    expected = decision_json(d)
    assert compare_decision(expected, d) is None
    expected["writes"][index][key] = value
    got = compare_decision(expected, d)
    assert got is not None and got == compare(expected, decision_json(d))
    del expected["writes"][index][key]
    assert compare_decision(expected, d) == compare(expected, decision_json(d))


BLANKISH = [
    "",
    "\n",
    "\r\n",
    " \t\n",
    "\r",
    " \r \r\n",
    "\x0b\x0c\x1c\x1f\x85\u3000\n",
    " {}\n",
    "\ufeff\n",
]


def test_blank_lines_are_what_strip_leaves_empty() -> None:
    rp = Replayer(POLICY)
    assert list(rp.native("blank.jsonl", BLANKISH)) == []
    blank = [line for line in BLANKISH if not line.strip()]
    s = rp.summary
    assert s.buckets["skipped"].reasons == {"blank line": len(blank)}
    assert s.buckets["malformed"].count == len(BLANKISH) - len(blank)


def test_the_other_lines_of_an_access_are_skipped_as_views() -> None:
    lines = [
        "memory_region_ops_write cpu 1 mr 0x5 addr 0xb3b00150 value 0x101 size 4 "
        "name 'pcie-mmcfg-mmio'",
        "pci_cfg_write e1000e 3b:00.0 @0x150 <- 0x101",
        "kvm_run_exit cpu_index 0, reason 2",
    ]
    devices = _bound({"0000:3b:00.0": "nic-st-in-cap.lspci"})
    rp = Replayer(POLICY, devices=devices, vm_of=lambda bdf: "tenant-a")
    records = list(rp.qemu("views.log", lines))
    assert [r.line for r in records] == [2]
    skipped = rp.summary.buckets["skipped"]
    assert skipped.reasons == {
        "another line of an access counted once": 1,
        "not one of the events read": 1,
    }
