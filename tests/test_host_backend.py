"""The host backend through ``serve``: Linux-like bring-ups, the predicted width, vectors,
host results and the attach checks. The random sessions are in test_host_stateful.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tphtrap.audit import Auditor
from tphtrap.policy import parse_cpulist
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server
from tphtrap.synth import MsixSpec, TphSpec, build_config
from tphtrap.wire import expand_runs

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "two-tenants.yaml"
A = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
B = {"vm": "tenant-b", "bdf": "0000:3b:00.1"}
CPUS = {"tenant-a": parse_cpulist("0-15,32-47"), "tenant-b": parse_cpulist("16-31,48-63")}
TAGS = {  # policies/two-tenants.yaml: (8-bit, 16-bit) tag per socket
    "tenant-a": (0x01, 0x0101),
    "tenant-b": (0x02, 0x0202),
}
CAP_DEV = ROOT / "fixtures" / "devices" / "nic-st-in-cap.lspci"
MSIX_DEV = ROOT / "fixtures" / "devices" / "nic-st-in-msix.lspci"
TPH, CTRL, TABLE = 0x148, 0x150, 0x154
MSIX = 0x4000


class Session:
    """A Server in-process, answering one request line at a time (events kept apart)."""

    def __init__(self) -> None:
        self.audit = io.StringIO()
        self.server = Server(load_policy(POLICY), str(POLICY), Auditor(self.audit))
        self.n = 0
        self.events: list[dict[str, Any]] = []
        assert self.call("hello", versions=[2])["ok"]

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.n += 1
        out = self.server.handle_line(json.dumps({"id": self.n, "op": op, **fields}).encode())
        lines = [json.loads(x) for x in out.splitlines()]
        self.events += lines[:-1]
        reply: dict[str, Any] = lines[-1]
        assert reply["id"] == self.n
        return reply

    def attach(self, who: dict[str, str], path: Path, **host: Any) -> dict[str, Any]:
        return self.call("attach", **who, path=str(path), backend="host", **host)

    def decide(self, op: str, who: dict[str, str], **fields: Any) -> dict[str, Any]:
        reply = self.call(op, **who, **fields)
        assert reply["ok"], reply
        return expand_runs(reply["decision"])


def no_raw_tph(d: dict[str, Any], msix_location: bool) -> None:
    """The host backend never writes a TPH register or a steering tag raw."""
    for w in d["writes"]:
        lo, hi = w["offset"], w["offset"] + w["width"]
        if w["space"] == "config":
            assert hi <= TPH or lo >= TPH + 0x1C, w
        elif msix_location:
            for pos in range(lo, hi):
                rel = pos - MSIX
                assert not (0 <= rel < 32 * 16 and rel % 16 >= 14), w


def host_ops(d: dict[str, Any], vm: str) -> list[dict[str, Any]]:
    """Only the three operations, and every st_set names a CPU of the VM whose tag it is
    (or none, for the neutral tag 0 no CPU owns)."""
    for op in d["ops"]:
        assert op["op"] in ("tph_enable", "tph_disable", "st_set"), op
        if op["op"] == "st_set":
            if op["cpu"] is None:
                assert op["tag"] == 0, op
            else:
                assert op["cpu"] in CPUS[vm] and op["tag"] in TAGS[vm], op
    return list(d["ops"])


def test_linux_bring_up_on_a_table_in_the_capability() -> None:
    s = Session()
    reply = s.attach(A, CAP_DEV, completer=3)
    assert reply["backend"] == {"name": "host", "width": 8}  # no Extended TPH on the device
    assert reply["decision"]["ops"] == []
    # pcie_enable_tph(IV): every entry gets the VM's fallback tag, after the enable.
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    ops = host_ops(d, "tenant-a")
    assert ops[0] == {"op": "tph_enable", "mode": "iv", "width": 8}
    assert [o["index"] for o in ops[1:]] == list(range(8))
    assert d["writes"] == [] and d["guest_value"] == 0x101
    # pcie_tph_set_st_entry in the guest, per entry: clear Requester Enable, write, restore.
    # 0x01 is what the entries hold already; 0x02 is tenant-b's (rewritten to the fallback,
    # 0x01, held already); 0x00 is neutral: no CPU owns it, so the st_set names none.
    sets = {2: [{"op": "st_set", "index": 2, "cpu": None, "tag": 0}]}
    for i, tag in enumerate([0x01, 0x02, 0x00, 0x01]):
        d0 = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x001)
        assert host_ops(d0, "tenant-a") == [{"op": "tph_disable"}]
        d1 = s.decide("cfg_write", A, offset=TABLE + 2 * i, width=2, value=tag)
        assert d1["ops"] == [] and d1["writes"] == []  # set once TPH is on again
        assert d1["guest_value"] == tag
        d2 = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
        enable = {"op": "tph_enable", "mode": "iv", "width": 8}
        assert host_ops(d2, "tenant-a") == [enable, *sets.get(i, [])]
        for x in (d0, d1, d2):
            no_raw_tph(x, False)
    for i, tag in enumerate([0x01, 0x02, 0x00, 0x01]):
        read = s.decide("cfg_read", A, offset=TABLE + 2 * i, width=2)
        assert read["guest_value"] == tag and read["read_mask"] == 0xFFFF


def test_linux_bring_up_on_msix_waits_for_the_hosts_vectors() -> None:
    s = Session()
    reply = s.attach(B, MSIX_DEV, completer=3)
    assert reply["backend"] == {"name": "host", "width": 16}
    assert reply["trap"]["bar"] == [
        {
            "bar": 2,
            "offset": MSIX + 12,
            "length": 4,
            "stride": 16,
            "count": 32,
            "what": "msix-vector-control",
            "reads": True,
        }
    ]
    # Before the host has MSI-X vectors their tags are unknown: no enable yet.
    d = s.decide("cfg_write", B, offset=CTRL, width=4, value=0x101)
    assert d["ops"] == [] and d["reason"] == "host-entries-unsafe"
    # The host enables MSI-X with 4 vectors (every tag cleared): tphtrap enables at the
    # host's width (Extended TPH: the guest asked for TPH only) and sets those 4 entries.
    d = s.decide("vectors", B, allocated=[0, 1, 2, 3], tags_cleared=True)
    ops = host_ops(d, "tenant-b")
    assert ops == [
        {"op": "tph_enable", "mode": "iv", "width": 16},
        *({"op": "st_set", "index": i, "cpu": 16, "tag": 0x0202} for i in range(4)),
    ]
    assert "host-width" in d["reasons"]
    # The guest programs entry 2 the Linux way; the mask bit stays the VMM's.
    s.decide("cfg_write", B, offset=CTRL, width=4, value=0x001)
    d = s.decide("msix_write", B, bar=2, offset=MSIX + 2 * 16 + 12, width=4, value=0x0202_0000)
    assert d["writes"] == [{"space": "bar", "bar": 2, "offset": MSIX + 44, "width": 2, "value": 0}]
    d = s.decide("cfg_write", B, offset=CTRL, width=4, value=0x301)
    assert host_ops(d, "tenant-b") == [{"op": "tph_enable", "mode": "iv", "width": 16}]
    # A tag for vector 9, which the host has not allocated: kept for later.
    d = s.decide("msix_write", B, bar=2, offset=MSIX + 9 * 16 + 12, width=4, value=0x0202_0001)
    assert d["ops"] == []
    d = s.decide("vectors", B, allocated=[0, 1, 2, 3, 9])
    assert host_ops(d, "tenant-b") == [{"op": "st_set", "index": 9, "cpu": 16, "tag": 0x0202}]
    read = s.decide("msix_read", B, bar=2, offset=MSIX + 9 * 16 + 12, width=4)
    assert read["guest_value"] == 0x0202_0000 and read["read_mask"] == 0xFFFF_0000
    # The host re-creates its vectors (an older kernel growing the set): every tag again.
    d = s.decide("vectors", B, allocated=[0, 1, 2, 3, 9, 10], tags_cleared=True)
    assert [o["index"] for o in host_ops(d, "tenant-b")] == [0, 1, 2, 3, 9, 10]


@pytest.mark.parametrize(
    ("facts", "extended", "width", "reason"),
    [
        ({"completer": 0}, False, None, "host-no-tph"),
        ({"completer": 1}, True, 8, "host-width"),
        ({"completer": 3}, True, 16, "control-granted"),
        ({"completer": 3}, False, 8, "host-width"),
    ],
)
def test_the_width_is_what_pcie_enable_tph_will_choose(
    tmp_path: Path, facts: dict[str, Any], extended: bool, width: int | None, reason: str
) -> None:
    dev = tmp_path / "dev.bin"
    dev.write_bytes(build_config(tph=TphSpec(extended=extended), msix=MsixSpec()))
    s = Session()
    assert s.attach(A, dev, **facts)["backend"] == {"name": "host", "width": width}
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x301)
    assert reason in d["reasons"]
    enables = [o for o in d["ops"] if o["op"] == "tph_enable"]
    assert enables == (
        [] if width is None else [{"op": "tph_enable", "mode": "iv", "width": width}]
    )


def test_a_root_complex_integrated_endpoint_skips_the_completer(tmp_path: Path) -> None:
    dev = tmp_path / "rciep.bin"
    dev.write_bytes(build_config(tph=TphSpec(extended=True), msix=MsixSpec(), pcie_type=0x9))
    s = Session()
    assert s.attach(A, dev, rciep=True)["backend"] == {"name": "host", "width": 16}
    # The snapshot is the judge: an RCiEP with a completer, an endpoint said to be an RCiEP.
    bad = s.call("attach", **A, path=str(dev), backend="host", completer=3, replace=True)
    assert bad["error"]["code"] == "out-of-range" and bad["decision"]["verdict"] == "drop"
    bad = s.call("attach", **B, path=str(MSIX_DEV), backend="host", rciep=True)
    assert bad["error"]["code"] == "out-of-range" and bad["error"]["field"] == "rciep"


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"backend": "host"}, "missing-field", "completer"),
        ({"backend": "host", "completer": 2}, "out-of-range", "completer"),
        ({"completer": 3}, "out-of-range", "completer"),
        ({"backend": "kernel"}, "out-of-range", "backend"),
        ({"backend": "host", "completer": 3, "rciep": True}, "out-of-range", "rciep"),
    ],
)
def test_attach_checks_the_backend_fields(fields: dict[str, Any], code: str, field: str) -> None:
    s = Session()
    reply = s.call("attach", **A, path=str(CAP_DEV), **fields)
    assert reply["error"]["code"] == code and reply["error"]["field"] == field


def test_host_feedback_needs_the_host_backend() -> None:
    s = Session()
    assert s.call("attach", **A, path=str(CAP_DEV))["ok"]
    reply = s.call("vectors", **A, allocated=[0])
    assert reply["error"]["code"] == "wrong-backend" and reply["decision"]["verdict"] == "drop"
    s.attach(B, MSIX_DEV, completer=3)
    reply = s.call("vectors", **B, allocated=[40])
    assert reply["error"]["code"] == "out-of-range"


def test_a_failed_st_set_leaves_tph_off_until_reset() -> None:
    s = Session()
    s.attach(A, CAP_DEV, completer=1)
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    failed = d["ops"][3]
    # Linux disabled TPH on the error; the ops after it did not happen.
    d = s.decide("host_result", A, failed=failed, errno=-22)
    assert d["reason"] == "host-op-failed" and d["ops"] == []
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    assert d["ops"] == [] and "host-op-failed" in d["reasons"]
    stats = s.call("stats")
    assert stats["devices"][0]["tph_enabled"] is False
    d = s.decide("reset", A)
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    assert d["ops"][0]["op"] == "tph_enable"


def test_a_vector_the_host_lacks_waits_for_it() -> None:
    s = Session()
    s.attach(B, MSIX_DEV, completer=3)
    s.decide("cfg_write", B, offset=CTRL, width=4, value=0x301)
    d = s.decide("vectors", B, allocated=[0, 1, 2], tags_cleared=True)
    # The host had no vector 1 after all (-ENXIO; entry 0 was set, Linux then disabled
    # TPH): TPH is enabled again, and the entries not yet set are, all but 1.
    d = s.decide("host_result", B, failed={"op": "st_set", "index": 1}, errno=-6)
    assert d["ops"] == [
        {"op": "tph_enable", "mode": "iv", "width": 16},
        {"op": "st_set", "index": 2, "cpu": 16, "tag": 0x0202},
    ]
    d = s.decide("vectors", B, allocated=[0, 1, 2])
    assert d["ops"] == [{"op": "st_set", "index": 1, "cpu": 16, "tag": 0x0202}]


def test_a_busy_enable_is_disabled_and_an_unknown_result_freezes() -> None:
    s = Session()
    s.attach(A, CAP_DEV, completer=3)
    s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    d = s.decide("host_result", A, failed={"op": "tph_enable"}, errno=-16)
    assert d["ops"] == [{"op": "tph_disable"}]
    reply = s.call("host_result", **A, failed={"op": "st_set", "index": 5}, errno=-22)
    assert reply["decision"]["reason"] == "host-state-unknown"
    assert reply["decision"]["ops"] == [{"op": "tph_disable"}]
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    assert d["verdict"] == "drop" and d["reason"] == "internal-error"


def test_a_guest_reset_disables_before_the_write_and_enables_nothing() -> None:
    s = Session()
    s.attach(A, CAP_DEV, completer=3)
    s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    d = s.decide("cfg_write", A, offset=0xA8 + 1, width=1, value=0x80)  # Initiate FLR
    assert d["reason"] == "reset"
    assert d["ops"] == [{"op": "tph_disable"}]
    assert d["writes"] == [{"space": "config", "offset": 0xA9, "width": 1, "value": 0x80}]
    read = s.decide("cfg_read", A, offset=CTRL, width=4)
    assert read["guest_value"] == 0


def test_a_plugin_restart_re_attaches_without_enabling_anything(tmp_path: Path) -> None:
    """A snapshot taken while TPH was on (tphtrap restarted under a running guest): attach
    turns it off; nothing is enabled until the guest asks again."""
    dev = tmp_path / "on.bin"
    dev.write_bytes(
        build_config(tph=TphSpec(st_mode=1, req_enable=1, entries=(1,) * 8), msix=MsixSpec())
    )
    s = Session()
    reply = s.attach(A, dev, completer=3)
    assert reply["decision"]["reasons"] == ["attached", "attach-disabled-tph"]
    assert reply["decision"]["ops"] == [{"op": "tph_disable"}]
    d = s.decide("cfg_write", A, offset=CTRL, width=4, value=0x101)
    assert d["ops"] == [{"op": "tph_enable", "mode": "iv", "width": 8}]  # entries already 0x01


def test_host_operations_are_audited() -> None:
    s = Session()
    s.attach(B, MSIX_DEV, completer=3)
    s.decide("vectors", B, allocated=[0, 1], tags_cleared=True)
    s.decide("cfg_write", B, offset=CTRL, width=4, value=0x301)
    events = [json.loads(line) for line in s.audit.getvalue().splitlines()]
    vectors = [e for e in events if e["event"] == "host.vectors"]
    assert vectors and vectors[0]["allocated"] == [0, 1] and vectors[0]["tags_cleared"] is True
    decided = [e for e in events if e["event"] == "access.decided"]
    assert decided[-1]["host_ops"][0] == {"op": "tph_enable", "mode": "iv", "width": 16}
    assert len(decided[-1]["host_ops"]) == 3  # and the two vectors' st_set, one by one
