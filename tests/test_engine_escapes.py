"""One regression test per escape of the engine's security invariant (issue 11, escapes 1-9).

Each is a sequence of protocol lines sent to the real server (``Server.handle_line``, or a
``tphtrap serve`` child process for SIGHUP), with every decision performed on a byte-level
simulated device (tests/devsim.py) and judged by the independent oracle (tests/oracle.py): the
invariant after every single device write, the guest's read-back, the bytes the guest owns.
Exact write lists are never compared: any correct rendering of a decision passes.

The device, unless a test says otherwise: TPH Requester at 0x148 (control 0x150, ST entry i at
0x154 + 2i), 8 entries in the capability, No ST and Interrupt Vector supported; MSI-X 4 vectors
in BAR 2 at 0x1000. Host: CPUs 0-3 own tags 0x01/0x0101, CPUs 4-7 own 0x02/0x0202; the VM
``tenant`` has CPUs 0-3, ``neighbour`` 4-7.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from devsim import (
    AF_CTRL,
    DEVCTL,
    LOC_MSIX,
    PMCSR,
    ResetKind,
    Shape,
    TphShape,
    build_device,
)
from wireclient import Hypervisor, InProcess, ServeProcess

VM, BDF = "tenant", "0000:3b:00.0"
CTRL, E0 = 0x150, 0x154  # control and ST entry 0 of the TPH capability at 0x148
OWN, FOREIGN = 0x01, 0x02  # tenant's and neighbour's 8-bit tags
EN_IV = 0x101  # Interrupt Vector mode, TPH (8-bit) Requester Enable
DEFAULT = Shape(tph=TphShape(no_st=True, iv=True, size=8), tph_at=0x148, msix_size=4, bir=2)


def policy_text(
    *,
    neutral: str = "[]",
    on_violation: str = "rewrite",
    tenant_cpus: str = "0-3",
    device_in: str = "tenant",
    vm_extra: str = "",
    dev: str = "{}",
) -> str:
    devices = {"tenant": "", "neighbour": ""}
    devices[device_in] = f"\n    devices:\n      {BDF}: {dev}"
    return f"""version: 1
host:
  steering_tags:
    0-3: {{st8: 0x01, st16: 0x0101}}
    4-7: {{st8: 0x02, st16: 0x0202}}
  neutral_tags: {neutral}
vms:
  tenant:
    cpus: {tenant_cpus}
    on_violation: {on_violation}{vm_extra}{devices["tenant"]}
  neighbour:
    cpus: 4-7{devices["neighbour"]}
"""


def write_policy(tmp_path: Path, name: str, **kw: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(policy_text(**kw))
    return path


def hypervisor(tmp_path: Path, shape: Shape = DEFAULT, **policy: str) -> Hypervisor:
    """A served session with the device attached (4096-byte snapshot)."""
    path = write_policy(tmp_path, "policy", **policy)
    hv = Hypervisor(InProcess(path), build_device(shape), path, VM, BDF)
    reply = hv.attach()
    assert reply["ok"], reply
    return hv


def program(hv: Hypervisor, tags: dict[int, int], ctrl: int = EN_IV) -> None:
    """The guest writes ST entries, then the control register."""
    for i, tag in tags.items():
        hv.cfg_write(E0 + 2 * i, 2, tag)
    hv.cfg_write(CTRL, 4, ctrl)


def linux_set_st_entry(hv: Hypervisor, index: int, tag: int, enable: int = EN_IV) -> None:
    """``pcie_tph_set_st_entry``: clear Requester Enable only, write the entry, restore."""
    hv.cfg_write(CTRL, 4, enable & ~0x300)
    hv.cfg_write(E0 + 2 * index, 2, tag)
    hv.cfg_write(CTRL, 4, enable)


# --- escape 1 ---------------------------------------------------------------------------------
BYPASS = [(CTRL, 1, 0x01), (0x151, 4, 0x02000001)]  # enable byte + foreign tag in entry 0
PROGRAM_OWN = [(E0 + 2 * i, 2, OWN) for i in range(8)]
ESCAPE1 = {
    # the bypass, then Device Specific mode passes the latch
    "unaligned-enable-then-ds": ("[0x00]", {}, [*BYPASS, (CTRL, 1, 0x02)]),
    # all entries own, the bypass, then No ST mode, whose tag 0 this VM may not use
    "no-st-tag-0-foreign": ("[]", {}, [*PROGRAM_OWN, *BYPASS, (CTRL, 1, 0x00)]),
    # the bypass at 16 bits: the entries (0x0200: 0x00 at 8 bits, nobody's at 16) go unchecked
    "iv-16-bit-entries": (
        "[0x00]",
        {"ext": True, "entries": (0x0200,) * 8},
        [(CTRL, 1, 0x01), (0x151, 4, 0x02000003)],
    ),
    # while enabled, a reserved control bit and a foreign tag in one straddling write
    "reserved-bit-0x152": ("[0x00]", {}, [(E0, 2, OWN), (CTRL, 4, EN_IV), (0x152, 4, 0x20001)]),
    "reserved-bit-0x153": ("[0x00]", {}, [(E0, 2, OWN), (CTRL, 4, EN_IV), (0x153, 2, 0x0201)]),
}


@pytest.mark.parametrize("case", sorted(ESCAPE1))
def test_escape1_disable_latch_holds_against_straddling_writes(tmp_path: Path, case: str) -> None:
    """``on_violation: disable``: one unaligned write must not leave TPH enabled, and the
    latch must then refuse Device Specific mode."""
    neutral, tph_kw, writes = ESCAPE1[case]
    shape = replace(DEFAULT, tph=replace(DEFAULT.tph, **tph_kw))
    hv = hypervisor(tmp_path, shape, neutral=neutral, on_violation="disable")
    for off, width, value in writes:
        hv.cfg_write(off, width, value)
    hv.cfg_write(CTRL, 1, 0x02)  # Device Specific mode (the latch must refuse it)
    hv.cfg_write(CTRL, 4, 0x102)


@pytest.mark.parametrize("reload_to", ["tph-false", "fewer-cpus"])
def test_escape1_reload_after_the_bypass_corrects_the_device(
    tmp_path: Path, reload_to: str
) -> None:
    """After the unaligned write, a reload that forbids what the device uses corrects it."""
    hv = hypervisor(tmp_path, neutral="[0x00]", on_violation="disable")
    hv.cfg_write(E0 + 2, 2, OWN)
    for off, width, value in BYPASS:
        hv.cfg_write(off, width, value)
    if reload_to == "tph-false":
        stricter = write_policy(tmp_path, "stricter", on_violation="disable", dev="{tph: false}")
    else:  # CPUs 0-1 only: tag 0x01 is shared with CPUs 2-3, foreign now
        stricter = write_policy(
            tmp_path, "stricter", neutral="[0x00]", on_violation="disable", tenant_cpus="0-1"
        )
    hv.reload(stricter)


# --- escape 2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [ResetKind.ZEROED, ResetKind.KEPT, ResetKind.TAGS_EITHER])
def test_escape2_reset_of_a_revoked_device_and_regrant(tmp_path: Path, kind: ResetKind) -> None:
    """Revoke, reset, give back: the device stays disabled until detached and attached again."""
    hv = hypervisor(tmp_path)
    program(hv, dict.fromkeys(range(8), OWN))
    assert hv.control() == EN_IV
    moved = write_policy(tmp_path, "moved", device_in="neighbour")
    hv.reload(moved, revokes=True)
    hv.reset(kind)
    back = write_policy(tmp_path, "back")
    hv.reload(back)
    assert hv.control() & 0x300 == 0, "a revoked device was re-enabled by a reload"
    # Detach and attach again: the device is the guest's again, from power-on state.
    hv.detach()
    assert hv.attach()["ok"]
    hv.cfg_write(CTRL, 4, EN_IV)
    hv.cfg_read(E0, 4)


# --- escape 3 ---------------------------------------------------------------------------------
def test_escape3_sighup_corrections_reach_the_hypervisor(tmp_path: Path) -> None:
    """``tphtrap serve`` + SIGHUP to a policy with ``tph: false``: the corrections arrive as an
    unsolicited event line, and once performed the device is off."""
    path = write_policy(tmp_path, "policy")
    proc = ServeProcess(path, tmp_path / "audit.jsonl")
    try:
        hv = Hypervisor(proc, build_device(DEFAULT), path, VM, BDF)
        assert hv.attach()["ok"]
        program(hv, dict.fromkeys(range(8), OWN))
        assert hv.control() == EN_IV
        path.write_text(policy_text(dev="{tph: false}"))
        hv.switch_policy(path)
        proc.proc.send_signal(signal.SIGHUP)
        events = wait_for_reload(hv, proc)
        for e in events:
            assert e == {**e, "id": None, "event": "corrections", "policy": str(path)}, e
        hv.apply_events(events)
        hv.rig.assert_safe("after the SIGHUP corrections")
        assert events, "SIGHUP reload produced no corrections line"
    finally:
        proc.close()


def wait_for_reload(hv: Hypervisor, proc: ServeProcess) -> list[dict[str, object]]:
    """Ask ``stats`` until the server has loaded the policy twice; the event lines seen."""
    events: list[dict[str, object]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        hv.next_id += 1
        reply, seen = proc.exchange({"id": hv.next_id, "op": "stats"})
        events += seen
        if reply.get("policy_loads", 0) >= 2:
            return events
        time.sleep(0.05)
    raise AssertionError("the server did not reload its policy within 20 s of SIGHUP")


# --- escape 4 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [256, 64])
def test_escape4_short_snapshot_of_a_pcie_function_is_refused(tmp_path: Path, size: int) -> None:
    """A snapshot that cannot show extended config space is refused, never trusted."""
    path = write_policy(tmp_path, "policy", neutral="[0x00]")
    hv = Hypervisor(InProcess(path), build_device(DEFAULT), path, VM, BDF)
    reply = hv.attach(size)
    # Whatever the server said, the guest now tries the real TPH capability at 0x148.
    hv.cfg_write(CTRL, 4, 0x102)
    hv.cfg_write(CTRL, 4, EN_IV)
    assert not reply["ok"] and reply["error"]["code"] == "bad-config", reply


# --- escape 5 ---------------------------------------------------------------------------------
def test_escape5_guest_never_reads_host_tags(tmp_path: Path) -> None:
    """The guest view starts at power-on: neither a previous tenant's tags nor the host tags a
    translating VM's virtual tags became are visible."""
    previous = replace(DEFAULT, tph=replace(DEFAULT.tph, entries=(FOREIGN,) * 8))
    hv = hypervisor(tmp_path, previous, vm_extra="\n    vcpus: [0, 1]")
    for i in range(8):
        hv.cfg_read(E0 + 2 * i, 2)  # the previous tenant's tags were in the snapshot
    hv.cfg_write(E0, 2, 1)  # virtual tag 1 -> host tag 0x01
    hv.cfg_write(CTRL, 4, EN_IV)
    hv.cfg_read(E0, 4)
    hv.detach()
    assert hv.attach()["ok"]  # re-attach: the snapshot now holds host tag 0x01
    hv.cfg_read(E0, 4)
    hv.cfg_read(CTRL, 4)


# --- escape 6 ---------------------------------------------------------------------------------
GUEST_RESETS = ["flr", "af-flr", "pm-d3hot-d0"]


@pytest.mark.parametrize("kind", [ResetKind.ZEROED, ResetKind.TAGS_KEPT, ResetKind.KEPT])
@pytest.mark.parametrize("how", GUEST_RESETS)
def test_escape6_guest_initiated_reset_is_a_reset(
    tmp_path: Path, how: str, kind: ResetKind
) -> None:
    """FLR through Device Control or Advanced Features, and D3hot -> D0 without No_Soft_Reset,
    reset the device: the guest sees power-on state, and what follows is safe whatever the
    device kept."""
    hv = hypervisor(tmp_path, replace(DEFAULT, af=True))
    program(hv, dict.fromkeys(range(8), OWN))
    hv.reset_kind = kind
    guest_reset(hv, how)
    hv.cfg_read(CTRL, 4)  # power-on: 0
    hv.cfg_read(E0, 4)
    hv.reload(write_policy(tmp_path, "no-tph", dev="{tph: false}"))  # the device may be on
    hv.reload(tmp_path / "policy.yaml")
    hv.cfg_write(CTRL, 4, EN_IV)  # entries were not written since the reset


@pytest.mark.parametrize("how", GUEST_RESETS)
def test_escape6_enable_byte_after_a_guest_reset(tmp_path: Path, how: str) -> None:
    """After the guest's reset the mode is No ST again (0), which this device (IV only) does
    not support: the Requester Enable byte alone must not enable it."""
    hv = hypervisor(tmp_path, replace(DEFAULT, af=True, tph=replace(DEFAULT.tph, no_st=False)))
    program(hv, dict.fromkeys(range(8), OWN))
    guest_reset(hv, how)
    hv.cfg_write(0x151, 4, 0x00000001)


@pytest.mark.parametrize("how", ["hypervisor", *GUEST_RESETS])
def test_escape6_mode_byte_after_a_reset_that_kept_control(tmp_path: Path, how: str) -> None:
    """A device that keeps its control register over a reset is still enabled: writing the
    mode byte alone must not select Device Specific mode."""
    hv = hypervisor(tmp_path, replace(DEFAULT, af=True))
    program(hv, dict.fromkeys(range(8), OWN))
    hv.reset_kind = ResetKind.KEPT
    if how == "hypervisor":
        hv.reset(ResetKind.KEPT)
    else:
        guest_reset(hv, how)
    hv.cfg_write(CTRL, 1, 0x02)
    hv.cfg_write(CTRL, 2, 0x0002)


def guest_reset(hv: Hypervisor, how: str) -> None:
    """The guest resets its function through config space."""
    if how == "flr":
        hv.cfg_write(DEVCTL, 2, 0x8000)
    elif how == "af-flr":
        hv.cfg_write(AF_CTRL, 1, 0x01)
    else:
        hv.cfg_write(PMCSR, 2, 0x0003)
        hv.cfg_write(PMCSR, 2, 0x0000)
    assert hv.rig.sim.resets == 1, "the guest's reset never reached the device"


def test_escape6_d3hot_d0_with_no_soft_reset_keeps_state(tmp_path: Path) -> None:
    """With No_Soft_Reset set, D3hot -> D0 resets nothing: the guest's view stays."""
    hv = hypervisor(tmp_path, replace(DEFAULT, no_soft_reset=True))
    program(hv, {0: OWN})
    hv.cfg_write(PMCSR, 2, 0x0003)
    hv.cfg_write(PMCSR, 2, 0x0000)
    assert hv.rig.sim.resets == 0
    hv.cfg_read(CTRL, 4)
    hv.cfg_read(E0, 4)


# --- escape 7 ---------------------------------------------------------------------------------
SECOND = TphShape(no_st=True, iv=True, ds=True, size=4)


@pytest.mark.parametrize("enabled_at_snapshot", [False, True])
def test_escape7_every_tph_capability_is_filtered(
    tmp_path: Path, enabled_at_snapshot: bool
) -> None:
    """A device with two TPH capabilities is untrappable: kept disabled on both."""
    second = replace(SECOND, ctrl=0x102 if enabled_at_snapshot else 0)
    hv = hypervisor(tmp_path, replace(DEFAULT, second_tph=second, second_at=0x200))
    hv.cfg_write(0x208, 4, 0x102)  # Device Specific mode on the second capability
    hv.cfg_write(0x208, 4, EN_IV)
    program(hv, dict.fromkeys(range(8), OWN))  # and the first one


# --- escape 8 ---------------------------------------------------------------------------------
MSIX_DEVICE = replace(DEFAULT, tph=TphShape(no_st=True, iv=True, location=LOC_MSIX, size=4))
TABLE = MSIX_DEVICE.table_off


def _reattach_keeps_vector_masks(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path, MSIX_DEVICE)
    for i in range(4):  # unmasked vectors with the tenant's tag
        hv.msix_write(TABLE + 16 * i + 8, 8, (OWN << 48) | 0x4000 + i)
    hv.cfg_write(CTRL, 4, EN_IV)
    hv.detach()
    assert hv.attach()["ok"]
    hv.cfg_write(CTRL, 4, EN_IV)
    for i in range(4):
        hv.msix_read(TABLE + 16 * i + 8, 8)


def _unchanged_reload_is_a_noop(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path, neutral="[0x00]", on_violation="drop")
    program(hv, dict.fromkeys(range(8), OWN))
    _assert_reload_changes_nothing(hv, tmp_path / "policy.yaml")
    assert hv.control() == EN_IV
    hv.reset(ResetKind.ZEROED)
    hv.cfg_write(E0, 2, FOREIGN)  # dropped: the entry keeps 0 (neutral)
    hv.cfg_write(CTRL, 4, EN_IV)
    _assert_reload_changes_nothing(hv, tmp_path / "policy.yaml")


def _assert_reload_changes_nothing(hv: Hypervisor, policy: Path) -> None:
    before = hv.rig.sim.state()
    hv.reload(policy)
    unchanged = hv.rig.sim.state() == before
    assert unchanged, f"a reload of the unchanged policy changed the device: {hv.rig.log[-1]}"


def _revoked_never_reenabled(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path)
    program(hv, dict.fromkeys(range(8), OWN))
    hv.reload(write_policy(tmp_path, "moved", device_in="neighbour"), revokes=True)
    hv.reload(write_policy(tmp_path, "back"))
    hv.reload(tmp_path / "back.yaml")
    assert hv.control() & 0x300 == 0


def _bar_access_past_2_64(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path)
    for op, extra in (("msix_write", {"value": 0}), ("msix_read", {})):
        reply = hv.request(op, vm=VM, bdf=BDF, bar=2, offset=2**64 - 4, width=8, **extra)
        assert not reply["ok"] and reply["error"]["code"] == "out-of-range", reply
        assert reply["decision"]["verdict"] == "drop"


ESCAPE8 = {
    "reattach-keeps-vector-masks": _reattach_keeps_vector_masks,
    "unchanged-reload-is-a-noop": _unchanged_reload_is_a_noop,
    "revoked-never-reenabled": _revoked_never_reenabled,
    "bar-access-past-2^64": _bar_access_past_2_64,
}


@pytest.mark.parametrize("case", list(ESCAPE8))
def test_escape8_integration_findings(tmp_path: Path, case: str) -> None:
    ESCAPE8[case](tmp_path)


# --- escape 9 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("on_violation", ["drop", "rewrite", "disable"])
def test_escape9_linux_driver_gets_tph_with_unwritten_entries(
    tmp_path: Path, on_violation: str
) -> None:
    """No neutral tag: a driver that programs only the vectors it uses still gets TPH (the
    entries it never wrote resolve to the VM's fallback tag)."""
    hv = hypervisor(tmp_path, on_violation=on_violation)
    hv.cfg_write(CTRL, 4, EN_IV)  # pcie_enable_tph(IV)
    for vector in (0, 1):
        linux_set_st_entry(hv, vector, OWN)
    assert hv.control() == EN_IV, f"TPH never granted ({hv.rig.log[-1]})"


def test_escape9_tph_after_aer_at_0x140_is_usable(tmp_path: Path) -> None:
    """AER at 0x100 owns 0x2c bytes (vfio, not a root port): TPH at 0x140 does not overlap."""
    hv = hypervisor(tmp_path, replace(DEFAULT, tph_at=0x140), neutral="[0x00]")
    for i in range(8):
        hv.cfg_write(0x14C + 2 * i, 2, OWN)
    hv.cfg_write(0x148, 4, EN_IV)
    assert hv.control() == EN_IV, f"TPH at 0x140 refused ({hv.rig.log[-1]})"


def test_escape9_overlap_has_its_own_reason(tmp_path: Path) -> None:
    """A table overlapped by another capability is refused, and not as 'no-st-table'."""
    overlapped = replace(DEFAULT, tph=replace(DEFAULT.tph, size=16), neighbour="overlap")
    hv = hypervisor(tmp_path, overlapped, neutral="[0x00]")
    assert not hv.device.trappable
    reply = hv.cfg_write(CTRL, 4, EN_IV)
    assert hv.control() & 0x300 == 0
    assert reply["decision"]["reason"] != "no-st-table", reply["decision"]


def test_escape9_no_st_bit_clear_never_gets_no_st_mode(tmp_path: Path) -> None:
    """CAP 0x000f0300 (Intel 8086:0d93): no mode bit, Extended TPH, 16 entries."""
    shape = replace(DEFAULT, tph=TphShape(no_st=False, iv=False, ext=True, size=16))
    hv = hypervisor(tmp_path, shape, neutral="[0x00]")
    assert hv.device.tph_caps[0].cap == 0x000F0300
    for ctrl in (0x100, 0x300, EN_IV):
        hv.cfg_write(CTRL, 4, ctrl)
        assert hv.control() & 0x300 == 0, f"TPH enabled without a supported mode: {ctrl:#x}"
