"""What replay takes from the engine, checked on the real traces of fixtures/traces/.

- a ``pass`` never carries a violation reason (and a run where one did would fail, exit 3);
- Vector Control mask/unmask writes of a guest that never wrote tag bits pass unchanged:
  no host tag is injected into a device whose guest never asked for TPH;
- a guest FLR is a reset in ``Decision.reasons``, and replay's per-device view follows it;
- a snapshot the engine refuses (``AttachRefused.code == "bad-config"``) makes the device's
  accesses unjudged, "attach refused: ...", never judged on a snapshot that hides TPH.

qemu-guest-flr.log.gz was recorded by `make traces` like the boot traces (Debian's QEMU 7.2,
TCG, q35; Debian's 6.1 kernel), with a guest that, after loading the virtio drivers, writes the
registers of a TPH Requester capability at 0x100 of the first NIC through sysfs (ST entry 0 on
line 39995, Requester Enable on line 40016), resets the NIC by FLR (Device Control bit 15, line
40107) and enables TPH again (line 40305). The virtio NIC has no TPH capability, so QEMU ignores
those writes; replay's ``--overlay`` grafts the capability of nic-st-in-cap.lspci there.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tphtrap import replay as replay_mod
from tphtrap.cli import main
from tphtrap.engine import Engine
from tphtrap.engine.reasons import VIOLATIONS
from tphtrap.events import Access, Decision, Verdict
from tphtrap.qemu_trace import QemuTraceReader, open_trace
from tphtrap.replay_summary import BUCKETS

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "fixtures" / "traces"
BOOT = TRACES / "qemu-guest-boot.log.gz"
BOOT_TS = TRACES / "qemu-guest-boot-timestamp.log.gz"
FLR = TRACES / "qemu-guest-flr.log.gz"
DEMO = TRACES / "demo-session.jsonl"
POLICY = str(ROOT / "policies" / "two-tenants.yaml")
ST_IN_CAP = str(ROOT / "fixtures" / "devices" / "nic-st-in-cap.lspci")
ST_IN_MSIX = str(ROOT / "fixtures" / "devices" / "nic-st-in-msix.lspci")
NIC1 = "0000:01:00.0"


def replay(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trace: Path, *args: str
) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    out = tmp_path / "decisions.jsonl"
    rc = main(["replay", str(trace), "--policy", POLICY, "--json", "--decisions", str(out), *args])
    cap = capsys.readouterr()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    s = json.loads(cap.out)
    assert s["lines"] == sum(s[b]["count"] for b in BUCKETS), "a line in no bucket, or in two"
    return rc, s, rows, cap.err


# --- pass is never paired with a violation reason ---------------------------------------------
@pytest.mark.parametrize(
    ("trace", "args"),
    [
        (BOOT, ["--vm", "tenant-a"]),
        (BOOT_TS, ["--vm", "tenant-a"]),
        (BOOT, ["--vm", "tenant-a", "--overlay", f"{NIC1}={ST_IN_MSIX}"]),
        (FLR, ["--vm", "tenant-a", "--overlay", f"{NIC1}={ST_IN_CAP}"]),
        (DEMO, ["--expect"]),
    ],
    ids=["boot", "boot-timestamp", "boot-overlay-msix", "flr-overlay", "demo"],
)
def test_pass_never_carries_a_violation_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trace: Path, args: list[str]
) -> None:
    rc, s, rows, _ = replay(capsys, tmp_path, trace, *args)
    assert rc == 0
    assert len(rows) == s["records"]["count"] > 0
    passed = [r["decision"] for r in rows if r["decision"]["verdict"] == "pass"]
    assert passed and not [d for d in passed if VIOLATIONS & set(d["reasons"])]
    assert s["contradictions"] == {"count": 0, "lines": []}
    # and what the summary lists as refused or changed is never a pass
    assert not [n for n in s["notable"] if " -> pass " in n]


class _PassesAViolation(Engine):
    """An engine with the bug replay must not hide: the first write it passes also says
    foreign-tag."""

    done = False

    def handle(self, access: Access) -> Decision:
        d = super().handle(access)
        if not self.done and d.verdict is Verdict.PASS and access.is_write:
            type(self).done = True
            return replace(d, reasons=(*d.reasons, "foreign-tag"))
        return d


def test_a_pass_with_a_violation_reason_fails_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_mod, "Engine", _PassesAViolation)
    monkeypatch.setattr(_PassesAViolation, "done", False)
    assert main(["replay", str(DEMO), "--policy", POLICY, "--expect"]) == 3
    cap = capsys.readouterr()
    assert "internal error: 1 decision(s) pass an access with a violation reason" in cap.err
    assert "ENGINE CONTRADICTION: 1 decision(s) pass an access with a violation reason" in cap.out
    assert (
        f"  {DEMO}:4: tenant-a 0000:3b:00.0 write @0x150/4=0x1 -> pass tph-disabled "
        "[config@0x150/4=0x1] (reasons: tph-disabled, foreign-tag)\n"
    ) in cap.out


# --- mask/unmask writes of a guest that never wrote tag bits ---------------------------------
def test_mask_writes_of_a_guest_without_tags_pass_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The real NIC given a TPH capability whose ST table is in the MSI-X table: the guest
    (a Linux that knows nothing of TPH) masks and unmasks its vectors while it programs and
    moves them. Each write reaches the device exactly as written: no tag is put in."""
    rc, s, rows, _ = replay(
        capsys, tmp_path, BOOT, "--vm", "tenant-a", "--overlay", f"{NIC1}={ST_IN_MSIX}"
    )
    assert rc == 0 and s["not_judged"] == 0
    msix = [r for r in rows if r["bdf"] == NIC1 and r["region"] == "msix"]
    assert len(msix) == 73
    vector_control = [r for r in msix if r["offset"] % 16 == 12]
    assert Counter(r["guest_value"] for r in vector_control) == {1: 10, 0: 9}
    for r in msix:
        d = r["decision"]
        assert (d["verdict"], d["reasons"]) == ("pass", ["not-tph"]), r
        own = {k: r[k] for k in ("bar", "offset", "width")}
        assert d["writes"] == [{"space": "bar", **own, "value": r["guest_value"]}]
    tph = s["devices"][NIC1]["tph"]
    assert tph["guest_msix_tag_writes"] == 0 and tph["tph_enabled"] is False
    assert s["tph_ever_enabled"] is False and s["notable"] == []


# --- a guest FLR resets replay's view of the device -------------------------------------------
def test_guest_flr_is_a_reset_and_the_view_follows_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, s, rows, _ = replay(
        capsys, tmp_path, FLR, "--vm", "tenant-a", "--overlay", f"{NIC1}={ST_IN_CAP}"
    )
    assert rc == 0 and s["not_judged"] == 0
    resets = [r for r in rows if "reset" in r["decision"]["reasons"]]
    assert [(r["line"], r["bdf"], r["offset"], r["guest_value"]) for r in resets] == [
        (40107, NIC1, 0x48, 0x8000)  # PCI Express Device Control: Initiate FLR
    ]
    # TPH off before the FLR reaches the device; after it, control at its power-on value
    assert resets[0]["decision"]["writes"] == [
        {"space": "config", "offset": 0x108, "width": 4, "value": 0x001},
        {"space": "config", "offset": 0x48, "width": 2, "value": 0x8000},
        {"space": "config", "offset": 0x108, "width": 4, "value": 0x000},
    ]
    enables = [r for r in rows if r["bdf"] == NIC1 and r.get("offset") == 0x108]
    assert [(r["line"], r["decision"]["reason"]) for r in enables] == [
        (40016, "tag-fallback"),
        (40305, "tag-fallback"),  # entry 0 is unwritten again after the reset: fallback
    ]
    assert 0x10C in [w["offset"] for w in enables[1]["decision"]["writes"]]
    tph = s["devices"][NIC1]["tph"]
    assert (tph["resets"], tph["first_reset_at"]) == (1, f"{FLR}:40107")
    assert tph["enabled_at"] == f"{FLR}:40016" and tph["times_enabled"] == 2
    assert tph["usable_tags"] == [0x01]
    main(["replay", str(FLR), "--policy", POLICY, "--vm", "tenant-a", "--device", NIC1,
          "--overlay", f"{NIC1}={ST_IN_CAP}"])  # fmt: skip
    out = capsys.readouterr().out
    assert (
        f"TPH Requester Enable set at {FLR}:40016 (Interrupt Vector, 8-bit tags (TPH), 2 times "
        f"in all); tags usable: 0x1; reset 1 time(s), first at {FLR}:40107"
    ) in out


# --- a snapshot the engine refuses ------------------------------------------------------------
def learned_config(trace: Path, bdf: str) -> bytes:
    """The config space the guest read of ``bdf`` (the reader's learned device)."""
    reader = QemuTraceReader(open_trace(trace), name=str(trace), devices={}, vm_of=lambda n: "x")
    for _ in reader:
        pass
    cfg = reader.device_config(bdf)
    assert cfg is not None
    return cfg.data


def test_refused_snapshot_makes_the_device_unjudged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A 256-byte config file of the NIC (what reading sysfs config without root gives): a
    PCI Express function's extended capabilities are not in it, so the engine refuses it."""
    data = learned_config(BOOT, NIC1)
    assert len(data) == 4096
    short = tmp_path / "nic1-config-256"
    short.write_bytes(data[:256])
    rc, s, rows, err = replay(capsys, tmp_path, BOOT, "--vm", "tenant-a", "--device",
                              f"{NIC1}={short}")  # fmt: skip
    assert rc == 5 and "423 unjudged" in err
    unjudged = s["unjudged"]
    assert unjudged["count"] == 423 and unjudged["devices"] == {NIC1: 423}
    (reason,) = unjudged["reasons"]
    assert reason == (
        f"attach refused: bad-config: {short}: a PCI Express function with a 256-byte "
        "snapshot: its extended capabilities (TPH) are not visible; give all 4096 bytes "
        "(sysfs config read as root, lspci -xxxx)"
    )
    assert not [r for r in rows if r["bdf"] == NIC1]
    assert s["records"]["count"] == 3161 - 423
    # the whole 4096 bytes of the same device attach, and every access is judged
    full = tmp_path / "nic1-config"
    full.write_bytes(data)
    rc, s, _, _ = replay(capsys, tmp_path, BOOT, "--vm", "tenant-a", "--device", f"{NIC1}={full}")
    assert rc == 0 and s["records"]["count"] == 3161
