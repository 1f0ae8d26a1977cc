"""Audit events: one JSON line per decision, with every field a reviewer needs, never on stdout."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import ACCESSES, DECISIONS

from tphtrap.audit import Auditor
from tphtrap.device import load_device
from tphtrap.engine import Engine
from tphtrap.events import (
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    MsixWrite,
    Reset,
)
from tphtrap.policyfile import load_policy

ROOT = Path(__file__).resolve().parent.parent
A = ("tenant-a", "0000:3b:00.0")
B = ("tenant-b", "0000:3b:00.1")


def engine() -> Engine:
    eng = Engine(load_policy(ROOT / "policies" / "two-tenants.yaml"))
    eng.attach(*A, load_device(ROOT / "fixtures/devices/nic-st-in-cap.lspci"))
    eng.attach(*B, load_device(ROOT / "fixtures/devices/nic-st-in-msix.lspci"))
    return eng


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_decision_becomes_one_complete_event() -> None:
    out = io.StringIO()
    auditor = Auditor(out)
    eng = engine()
    access = ConfigWrite(*A, 0x156, 2, 0x02)  # tenant-b's tag in tenant-a's ST entry 1
    auditor.decided(access, eng.handle(access), {"id": 7})
    (ev,) = events(out)
    ts = ev.pop("timestamp")
    assert ts.endswith("Z") and "T" in ts
    assert ev == {
        "event": "access.decided",
        "level": "info",
        "id": 7,
        "vm": "tenant-a",
        "bdf": "0000:3b:00.0",
        "region": "config",
        "op": "write",
        "offset": 0x156,
        "width": 2,
        "guest_value": 0x02,
        "device_value": 0x01,
        "device_writes": [{"space": "config", "offset": 0x156, "width": 2, "value": 0x01}],
        "guest_view": 0x02,
        "read_mask": 0xFFFF,
        "verdict": "rewrite",
        "reason": "foreign-tag",
        "reasons": ["foreign-tag"],
        "rule": "vms.tenant-a.devices.0000:3b:00.0.on_violation",
    }


def test_msix_events_carry_the_bar_and_drops_carry_no_device_value() -> None:
    out = io.StringIO()
    auditor = Auditor(out)
    eng = engine()
    for access in (
        MsixWrite(*B, 2, 0x400C, 4, 0x0101_0000),  # tenant-a's tag: dropped, mask bit kept
        ConfigWrite(*A, 0x148, 4, 0),  # read-only header: dropped
        Reset(*A),
    ):
        auditor.decided(access, eng.handle(access))
    msix, header, reset = events(out)
    assert (msix["region"], msix["bar"], msix["offset"], msix["verdict"]) == (
        "msix",
        2,
        0x400C,
        "rewrite",
    )
    assert msix["device_value"] == 0x0002_0000  # unknown tag: the fallback, mask as written
    assert (header["verdict"], header["reason"]) == ("drop", "read-only")
    assert "device_value" not in header and "device_writes" not in header
    assert (reset["op"], reset["reason"]) == ("reset", "reset")


def test_passes_outside_tph_are_left_out_unless_asked_for() -> None:
    quiet, loud = io.StringIO(), io.StringIO()
    eng = engine()
    access = ConfigWrite(*A, 0x04, 2, 0x0406)  # PCI_COMMAND
    decision = eng.handle(access)
    Auditor(quiet).decided(access, decision)
    Auditor(loud, include_passes=True).decided(access, decision)
    assert quiet.getvalue() == ""
    (ev,) = events(loud)
    assert ev["reason"] == "not-tph"
    read = ConfigRead(*A, 0x150, 4)
    Auditor(quiet).decided(read, eng.handle(read))  # a TPH read is about TPH: logged
    assert events(quiet)[0]["reason"] == "tph-virtualized"


def test_audit_never_goes_to_stdout() -> None:
    with pytest.raises(ValueError, match="stdout"):
        Auditor(sys.stdout)


def test_audit_file_is_line_buffered_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"earlier"}\n')
    auditor = Auditor.to_file(str(path))
    auditor.emit("policy.loaded", path="p.yaml")
    # visible before close: every event is one whole, flushed line
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"event": "earlier"}
    assert json.loads(lines[1])["event"] == "policy.loaded"
    auditor.close()


@pytest.mark.parametrize("whole", [b"", b'{"event":"earlier"}\n'], ids=["only-torn", "after-whole"])
@pytest.mark.parametrize("torn_len", [1, 4000, 200_000])
def test_a_torn_last_line_is_sealed_and_named(tmp_path: Path, whole: bytes, torn_len: int) -> None:
    """A file whose last line was cut (SIGKILL mid-write) keeps every byte; the next writer
    ends that line and says where it was, so every line after it is whole."""
    path = tmp_path / "audit.jsonl"
    torn = (b'{"vm":"tenant-a","bdf":"0000:3b:00.0","region":"msix","pad":"' + b"x" * torn_len)[
        :torn_len
    ]
    path.write_bytes(whole + torn)
    auditor = Auditor.to_file(str(path))
    auditor.emit("policy.loaded", path="p.yaml")
    auditor.close()
    data = path.read_bytes()
    assert data.startswith(whole + torn + b"\n")
    later = [json.loads(line) for line in data[len(whole + torn) + 1 :].splitlines()]
    assert [e["event"] for e in later] == ["audit.torn", "policy.loaded"]
    assert later[0]["level"] == "warning"
    assert (later[0]["offset"], later[0]["bytes"], later[0]["path"]) == (
        len(whole),
        len(torn),
        str(path),
    )


def test_a_whole_or_empty_file_is_left_as_it_is(tmp_path: Path) -> None:
    for before in (b"", b'{"event":"earlier"}\n'):
        path = tmp_path / "audit.jsonl"
        path.write_bytes(before)
        Auditor.to_file(str(path)).close()
        assert path.read_bytes() == before


def test_a_character_device_is_never_read(tmp_path: Path) -> None:
    auditor = Auditor.to_file(os.devnull)
    auditor.emit("policy.loaded", path="p.yaml")
    auditor.close()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_reopening_a_torn_file_seals_it_after_audit_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    auditor = Auditor.to_file(str(path))
    path.rename(tmp_path / "audit.jsonl.1")
    path.write_bytes(b'{"event":"x"}\n{"vm":"tenant')
    assert auditor.reopen("SIGUSR1") is None
    auditor.close()
    lines = path.read_bytes().splitlines()
    assert lines[1] == b'{"vm":"tenant'
    later = [json.loads(line) for line in lines[2:]]
    assert [e["event"] for e in later] == ["audit.reopened", "audit.torn"]
    assert (later[1]["offset"], later[1]["bytes"]) == (14, 13)


# --- the access.decided line, written directly ----------------------------------------------
EXTRAS = st.none() | st.fixed_dictionaries(
    {"id": st.integers(-(2**63), 2**64 - 1) | st.text(min_size=1, max_size=8)}
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(access=ACCESSES, decision=DECISIONS, extra=EXTRAS, passes=st.booleans())
def test_fast_line_is_the_processor_chain_line(
    monkeypatch: pytest.MonkeyPatch,
    access: Access,
    decision: Decision,
    extra: dict[str, Any] | None,
    passes: bool,
) -> None:
    """``decided`` writes the per-access line itself; ``decided_slow`` builds the field
    dictionaries and runs structlog's processor chain. Same bytes, every time."""
    monkeypatch.setattr("tphtrap.audit._UtcClock.now", lambda self: "2026-11-29T00:00:00.000001Z")
    fast, slow = io.StringIO(), io.StringIO()
    a, b = Auditor(fast, include_passes=passes), Auditor(slow, include_passes=passes)
    a.decided(access, decision, extra)
    b.decided_slow(access, decision, extra)
    assert fast.getvalue() == slow.getvalue()
    assert a.events == b.events
