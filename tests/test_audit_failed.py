"""An audit stream that fails: no decision goes out without its line, and the device whose
decision could not be audited is frozen (TPH off, every later access dropped until it is
attached again) instead of being left behind what the engine takes it to hold.

Each entry point that changes a device is taken in turn: an access (either path), attach, a
host report, a reload's corrections; and the ``--record`` trace, whose failure must not cost
the reply; and a disk that fills in the middle of a line, with a real ``serve``.
"""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import AuditSink

from tphtrap.audit import Auditor
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies/two-tenants.yaml"
NIC_CAP = str(ROOT / "fixtures/devices/nic-st-in-cap.lspci")
NIC_MSIX = str(ROOT / "fixtures/devices/nic-st-in-msix.lspci")
A = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
B = {"vm": "tenant-b", "bdf": "0000:3b:00.1"}
CTRL = 0x150  # the TPH control register of both fixtures
ENTRY0 = 0x154  # the first ST entry of the capability's table (nic-st-in-cap)
EN_IV = 0x101  # Interrupt Vector mode, Requester Enable (8-bit tags)


class FlakySink(AuditSink):
    """An audit stream whose writes fail with ENOSPC while ``fail`` says so for the line."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: Any = lambda line: False
        self.lost: list[str] = []

    def write(self, s: str) -> int:
        if self.fail(s):
            self.lost.append(s)
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(s)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self.lines) if e["event"] == name]


def server(native: bool = True, recorder: Any = None) -> tuple[Server, FlakySink]:
    sink = FlakySink()
    srv = Server(load_policy(POLICY), str(POLICY), Auditor(sink), native=native, recorder=recorder)  # type: ignore[arg-type]
    assert call(srv, "hello", versions=[2])["ok"]
    return srv, sink


def call(srv: Server, op: str, rid: Any = 1, **fields: Any) -> dict[str, Any]:
    out = srv.handle_line(json.dumps({"id": rid, "op": op, **fields}).encode())
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    reply: dict[str, Any] = json.loads(out)
    assert reply["id"] == rid
    return reply


def write(srv: Server, offset: int, value: int, width: int = 4, rid: Any = 1) -> dict[str, Any]:
    return call(srv, "cfg_write", rid, **A, offset=offset, width=width, value=value)


def frozen(srv: Server, who: dict[str, str]) -> bool:
    devices = call(srv, "stats", "s")["devices"]
    [dev] = [d for d in devices if d["vm"] == who["vm"]]
    return bool(dev["frozen"])


def assert_tph_off(decision: dict[str, Any]) -> None:
    """The freeze: reason internal-error, one write of the control register, Requester
    Enable (bits 9:8) clear, nothing else."""
    assert decision["reason"] == "internal-error", decision
    assert "audit line could not be written" in decision["detail"]
    [w] = decision["writes"]
    assert (w["space"], w["offset"], w["width"]) == ("config", CTRL, 4) and not w["value"] >> 8 & 3


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_an_unaudited_entry_write_freezes_the_device_and_a_reload_cannot_unfreeze_it(
    native: bool,
) -> None:
    """The corner this closes: tag 0x01 on the device with TPH on; the guest's write of
    entry 0 is decided but its line cannot be written. Delivering nothing left the device
    with 0x01 while the engine took it to hold 0x00, so a reload that forbids 0x01 had
    nothing to correct. Now the reply turns TPH off, and the device stays frozen."""
    srv, sink = server(native)
    assert call(srv, "attach", **A, path=NIC_CAP)["ok"]
    assert write(srv, CTRL, EN_IV)["ok"]
    for rid in (2, 3):  # the second one is the native path's when it is on
        assert write(srv, ENTRY0, 0x01, 2, rid)["decision"]["reason"] == "tag-allowed"
    sink.fail = lambda line: '"access.decided"' in line and '"id":4,' in line
    got = write(srv, ENTRY0, 0x00, 2, rid=4)
    assert got["ok"]
    assert_tph_off(got["decision"])
    [failed] = sink.events("audit.failed")  # the stream works again for the next line
    assert (failed["id"], failed["vm"], failed["bdf"]) == (4, A["vm"], A["bdf"])
    assert failed["writes"] == got["decision"]["writes"] and "No space left" in failed["error"]
    assert frozen(srv, A)
    # Frozen: the guest cannot enable TPH again, nor write a tag; a reload does not thaw it.
    for rid, (offset, value, width) in enumerate([(CTRL, EN_IV, 4), (ENTRY0, 1, 2)], 5):
        d = write(srv, offset, value, width, rid)["decision"]
        assert (d["verdict"], d["reason"], d["writes"]) == ("drop", "internal-error", [])
    *corrections, reloaded = srv.handle_line(b'{"id":7,"op":"reload"}').splitlines()
    assert json.loads(reloaded)["ok"] and frozen(srv, A)
    [[correction]] = [json.loads(c)["corrections"] for c in corrections]
    assert correction["decision"]["reason"] == "internal-error"
    # Attached again, from a fresh snapshot, it is served as any new device.
    assert call(srv, "attach", 8, **A, path=NIC_CAP, replace=True)["ok"]
    assert not frozen(srv, A)
    assert write(srv, CTRL, EN_IV, rid=9)["decision"]["reason"] != "internal-error"


def test_a_stream_that_stays_broken_freezes_again_on_every_access() -> None:
    """While nothing can be written, every access of the frozen device is answered with the
    freeze again (the first one's reply may be the one that was lost), never with a write
    that could enable TPH; the other device is frozen by its own first unaudited access."""
    srv, sink = server()
    assert call(srv, "attach", **A, path=NIC_CAP)["ok"]
    assert call(srv, "attach", **B, path=NIC_MSIX)["ok"]
    sink.fail = lambda line: True
    for rid in range(2, 6):
        assert_tph_off(write(srv, CTRL, EN_IV, rid=rid)["decision"])
    assert not frozen(srv, B)
    got = call(srv, "cfg_write", 6, **B, offset=CTRL, width=4, value=0x301)
    assert_tph_off(got["decision"])
    sink.fail = lambda line: False
    assert frozen(srv, A) and frozen(srv, B)
    assert sink.lost and all('"audit.failed"' not in x for x in sink.lines)


def test_an_unaudited_attach_is_attached_frozen() -> None:
    """An attach whose ``device.attached`` line cannot be written: the device is attached
    (a second attach says so) but frozen, its reply's decision the freeze."""
    srv, sink = server()
    sink.fail = lambda line: '"device.attached"' in line
    got = call(srv, "attach", **A, path=NIC_CAP)
    assert got["ok"]
    assert_tph_off(got["decision"])
    sink.fail = lambda line: False
    assert frozen(srv, A)
    assert call(srv, "attach", 2, **A, path=NIC_CAP)["error"]["code"] == "already-attached"


def test_a_reload_correction_that_cannot_be_audited_is_the_freeze_of_its_device(
    tmp_path: Path,
) -> None:
    """A reload whose ``policy.applied`` line of one device cannot be written: that device's
    correction is its freeze, the other device's correction is the reload's own, and the
    corrections still reach the hypervisor (nothing is lost with ``policy.loaded``)."""
    srv, sink = server()
    assert call(srv, "attach", **A, path=NIC_CAP)["ok"]
    assert call(srv, "attach", **B, path=NIC_MSIX)["ok"]
    assert write(srv, CTRL, EN_IV)["ok"]
    sink.fail = lambda line: '"policy.applied"' in line and A["bdf"] in line
    out = srv.handle_line(b'{"id":"r","op":"reload"}').decode().splitlines()
    sink.fail = lambda line: False
    *events, last = map(json.loads, out)
    assert last == {"id": "r", "ok": True, "op": "reload", "policy": str(POLICY), "devices": 2}
    corrections = {c["bdf"]: c["decision"] for e in events for c in e["corrections"]}
    assert_tph_off(corrections[A["bdf"]])
    assert corrections[B["bdf"]]["reason"] == "policy-reloaded"
    assert frozen(srv, A) and not frozen(srv, B)
    [failed] = sink.events("audit.failed")
    assert (failed["op"], failed["bdf"], failed["id"]) == ("reload", A["bdf"], None)

    sink.fail = lambda line: '"policy.loaded"' in line  # (after every correction's line)
    out = srv.handle_line(b'{"id":"r2","op":"reload"}').decode().splitlines()
    sink.fail = lambda line: False
    assert json.loads(out[-1])["ok"] and len(out) == 3


def test_an_unaudited_host_report_freezes_the_device() -> None:
    """``vectors`` (backend host) decided but not audited: the follow-up ops do not go out,
    the freeze (``tph_disable``) does."""
    srv, sink = server()
    got = call(srv, "attach", **B, path=NIC_MSIX, backend="host", completer=3)
    assert got["ok"], got
    assert call(srv, "cfg_write", 2, **B, offset=CTRL, width=4, value=0x101)["ok"]
    sink.fail = lambda line: '"host.vectors"' in line
    got = call(srv, "vectors", 3, **B, allocated=[0, 1, 2, 3])
    sink.fail = lambda line: False
    d = got["decision"]
    assert got["ok"] and d["reason"] == "internal-error" and d["writes"] == []
    assert d["ops"] == [{"op": "tph_disable"}]
    assert frozen(srv, B)


class FullTrace:
    """A ``--record`` stream on a full disk."""

    def write(self, s: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass


def test_a_record_trace_that_cannot_be_written_ends_and_costs_no_reply() -> None:
    """The trace is a copy for replay: when it cannot be written it ends there (one
    ``record.failed``), and every decision still goes out as made."""
    srv, sink = server(native=False, recorder=FullTrace())
    assert call(srv, "attach", **A, path=NIC_CAP)["ok"]
    assert srv.recorder is None
    [failed] = sink.events("record.failed")
    assert failed["op"] == "attach" and "No space left" in failed["error"]
    got = write(srv, CTRL, EN_IV, rid=2)
    assert got["ok"] and got["decision"]["reason"] != "internal-error"
    assert not frozen(srv, A)


def test_an_unaudited_read_is_dropped_without_freezing() -> None:
    """A read changes nothing the engine knows of the device: when its line cannot be
    written it is dropped (an internal-error reply), and the device is not frozen."""
    srv, sink = server()
    assert call(srv, "attach", **A, path=NIC_CAP)["ok"]
    sink.fail = lambda line: '"access.decided"' in line
    got = call(srv, "cfg_read", 2, **A, offset=CTRL, width=4)
    sink.fail = lambda line: False
    assert got["error"]["code"] == "internal-error" and got["decision"]["verdict"] == "drop"
    assert got["decision"]["writes"] == [] and not frozen(srv, A)


class FullDiskServe:
    """``tphtrap serve --audit FILE`` whose file may not grow past a limit that the test
    moves (``RLIMIT_FSIZE``, raised and lowered from outside with ``prlimit``): a write that
    crosses it is cut short, the next one fails with EFBIG, as on a disk that fills up."""

    def __init__(self, audit: Path) -> None:
        self.audit = audit
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tphtrap", "serve", "--policy", str(POLICY), "--audit", audit],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
        )

    def send(self, rid: Any, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def limit(self, size: int) -> None:
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="Linux prlimit")
def test_a_disk_that_fills_mid_line_and_frees_again(tmp_path: Path) -> None:
    """The disk fills in the middle of an ``access.decided`` line: its device is frozen; a
    SIGHUP then (its corrections, the reopening of the file) neither stops serve nor loses
    the corrections; once the disk has room, the cut line is ended before the next line, so
    every line after it is whole JSON."""
    audit = tmp_path / "audit.jsonl"
    serve = FullDiskServe(audit)
    try:
        assert serve.send(0, "hello", versions=[2])["ok"]
        assert serve.send(1, "attach", **A, path=NIC_CAP)["ok"]
        assert serve.send(2, "cfg_write", **A, offset=CTRL, width=4, value=EN_IV)["ok"]
        size = audit.stat().st_size
        serve.limit(size + 40)  # room for the first 40 bytes of the next line only
        got = serve.send(3, "cfg_write", **A, offset=ENTRY0, width=2, value=1)
        assert_tph_off(got["decision"])
        assert audit.stat().st_size == size + 40  # the cut line
        serve.proc.send_signal(signal.SIGHUP)  # reload and reopen on a full disk
        assert serve.proc.stdout
        event = json.loads(serve.proc.stdout.readline())
        assert event["event"] == "corrections" and event["corrections"][0]["bdf"] == A["bdf"]
        assert serve.proc.poll() is None
        serve.limit(resource.RLIM_INFINITY)  # room again
        later = serve.send(4, "cfg_write", **A, offset=CTRL, width=4, value=EN_IV)
        assert later["decision"]["verdict"] == "drop"  # frozen
        assert serve.send(5, "stats")["ok"]
    finally:
        assert serve.proc.stdin
        serve.proc.stdin.close()
        assert serve.proc.wait(timeout=10) == 0
    data = audit.read_bytes()
    head, cut, rest = data[:size], data[size : size + 40], data[size + 41 :]
    assert data[size + 40 : size + 41] == b"\n" and b"\n" not in cut  # the cut line, ended
    assert all(json.loads(x) for x in head.splitlines())
    events = [json.loads(x) for x in rest.splitlines()]  # every later line whole
    assert [e["event"] for e in events][-1] == "session.ended"
    # (what was written while the disk was full is lost: the SIGHUP's events, audit.failed)
    assert [(e["event"], e.get("id")) for e in events] == [
        ("engine.failed", 4),
        ("session.ended", None),
    ]
