"""Table-driven engine tests: one row per rule, on the fixture devices.

Each row attaches a fixture device to a VM of the policy below, plays some guest accesses, and
checks the decision for the last one: verdict, main reason and the exact device writes.

Host used by every row (8 CPUs, pairs share a cache; CPU 3 shares its 8-bit tag with 4 and 5):

====  =====  ======
CPU   st8    st16
====  =====  ======
0,1   0x10   0x1000
2     0x11   0x1001
3     0x12   0x1001
4,5   0x12   0x1002
6,7   0x13   None
====  =====  ======

neutral tag 0. VM ``a`` (CPUs 0-3, rewrite) owns 0000:3b:00.0; VM ``b`` (CPUs 4-7, drop,
vCPUs pinned to 4-7) owns 0000:3b:00.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tphtrap.device import ConfigSpace, load_device
from tphtrap.engine import AttachRefused, Engine
from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    Decision,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, OnViolation, Policy, VmPolicy
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "devices"
A = "0000:3b:00.0"
B = "0000:3b:00.1"

HOST = HostPolicy(
    {
        0: CpuTags(0, 0x10, 0x1000),
        1: CpuTags(1, 0x10, 0x1000),
        2: CpuTags(2, 0x11, 0x1001),
        3: CpuTags(3, 0x12, 0x1001),
        4: CpuTags(4, 0x12, 0x1002),
        5: CpuTags(5, 0x12, 0x1002),
        6: CpuTags(6, 0x13, None),
        7: CpuTags(7, 0x13, None),
    },
    frozenset({0}),
)


def policy(
    a: dict[str, object] | None = None,
    b: dict[str, object] | None = None,
    dev_a: dict[str, object] | None = None,
) -> Policy:
    vm_a = VmPolicy(
        "a",
        frozenset({0, 1, 2, 3}),
        OnViolation.REWRITE,
        devices={A: DeviceSettings(A, **(dev_a or {}))},  # type: ignore[arg-type]
    )
    vm_b = VmPolicy(
        "b",
        frozenset({4, 5, 6, 7}),
        OnViolation.DROP,
        vcpus=(4, 5, 6, 7),
        devices={B: DeviceSettings(B)},
    )
    return Policy(
        HOST,
        {"a": replace(vm_a, **(a or {})), "b": replace(vm_b, **(b or {}))},  # type: ignore[arg-type]
    )


def fixture(name: str, bdf: str | None = None) -> ConfigSpace:
    return load_device(FIXTURES / name, bdf)


CAP = "nic-st-in-cap.lspci"  # 0000:3b:00.0: 8 entries in the cap, IV+NS, no ext; MSI-X BAR0
MSIX = "nic-st-in-msix.lspci"  # 0000:3b:00.1: table in MSI-X (32 vectors, BAR2 0x4000), ext


def tph_base(cfg: ConfigSpace) -> int:
    assert cfg.tph is not None
    return cfg.tph.offset


@dataclass
class Case:
    name: str
    device: str
    vm: str
    steps: list[tuple[str, int, int, int]]  # (kind, offset (rel. to TPH for "tph"), width, value)
    verdict: Verdict
    reason: str
    writes: list[tuple[str, int, int, int]] | None = None  # (space, offset, width, value)
    pol: dict[str, dict[str, object]] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()


# kinds: "tph" config write at TPH base + offset, "cfg" absolute config write, "bar" MSI-X BAR
# write (BAR of the device's table), "reset".
EN_IV_TPH = 0x101  # mode IV, Requester Enable 1 (TPH only)
EN_IV_EXT = 0x301
EN_NS_TPH = 0x100

CASES = [
    Case(
        "non-TPH config write passes",
        CAP,
        "a",
        [("cfg", 0x04, 2, 0x0406)],
        Verdict.PASS,
        "not-tph",
        [("config", 0x04, 2, 0x0406)],
    ),
    Case(
        "MSI-X mask bit passes (table in cap)",
        CAP,
        "a",
        [("bar", 0x2000 + 12, 4, 1)],
        Verdict.PASS,
        "not-tph",
        [("bar", 0x200C, 4, 1)],
    ),
    Case(
        "MSI-X address/data pass (table in MSI-X)",
        MSIX,
        "b",
        [("bar", 0x4000, 8, 0xFEE00000_00000000)],
        Verdict.PASS,
        "not-tph",
        [("bar", 0x4000, 8, 0xFEE00000_00000000)],
    ),
    Case("TPH header is read-only", CAP, "a", [("tph", 0x0, 4, 0)], Verdict.DROP, "read-only", []),
    Case(
        "TPH capability register is read-only",
        CAP,
        "a",
        [("tph", 0x4, 4, 0x7FF0707)],
        Verdict.DROP,
        "read-only",
        [],
    ),
    Case(
        "bytes past the ST table are dropped",
        "table-1-entry.lspci",
        "a",
        [("tph", 0xE, 2, 0x1234)],
        Verdict.DROP,
        "beyond-st-table",
        [],
    ),
    Case(
        "allowed tag passes",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x10)],
        Verdict.PASS,
        "tag-allowed",
        [("tph", 0xC, 2, 0x10)],
    ),
    Case(
        "neutral tag passes",
        CAP,
        "a",
        [("tph", 0xE, 2, 0x00)],
        Verdict.PASS,
        "tag-allowed",
        [("tph", 0xE, 2, 0x00)],
    ),
    Case(
        "foreign tag rewritten to the fallback",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x13)],
        Verdict.REWRITE,
        "foreign-tag",
        [("tph", 0xC, 2, 0x10)],
    ),
    Case(
        "tag shared with another tenant's CPU is foreign",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x12)],
        Verdict.REWRITE,
        "foreign-tag",
        [("tph", 0xC, 2, 0x10)],
    ),
    Case(
        "foreign tag dropped",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x13)],
        Verdict.DROP,
        "foreign-tag",
        [],
        pol={"a": {"on_violation": OnViolation.DROP}},
    ),
    Case(
        "foreign tag while enabled forces TPH off (disable)",
        CAP,
        "a",
        [("tph", 0x8, 4, EN_IV_TPH), ("tph", 0xC, 2, 0x13)],
        Verdict.REWRITE,
        "foreign-tag",
        [("tph", 0x8, 4, 0x001)],
        pol={"a": {"on_violation": OnViolation.DISABLE}},
        reasons=("foreign-tag", "tph-forced-off"),
    ),
    Case(
        "latched off until reset after a disable violation",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x13), ("tph", 0xC, 2, 0x10), ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.DROP,
        "tph-latched-off",
        [],
        pol={"a": {"on_violation": OnViolation.DISABLE}},
    ),
    Case(
        "reset clears the latch",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x13), ("reset", 0, 0, 0), ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.REWRITE,
        "tag-fallback",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(8)], ("tph", 0x8, 4, EN_IV_TPH)],
        pol={"a": {"on_violation": OnViolation.DISABLE}},
    ),
    Case(
        "virtual tag translated to the pinned CPU's host tag",
        MSIX,
        "b",
        [("bar", 0x4000 + 12, 4, 0x0002_0000)],
        Verdict.REWRITE,
        "tag-translated",
        [("bar", 0x400C, 4, 0x0013_0000)],
    ),
    Case(
        "unknown virtual tag dropped; the guest's mask bit goes with the fallback tag",
        MSIX,
        "b",
        [("bar", 0x4000 + 12, 4, 0x0009_0001)],
        Verdict.REWRITE,
        "unknown-virtual-tag",
        [("bar", 0x400C, 4, 0x0013_0001)],
    ),
    Case(
        "unknown virtual tag dropped, the guest's mask bit still delivered",
        MSIX,
        "b",
        [("bar", 0x4000 + 12, 4, 0x0009_0000)],
        Verdict.REWRITE,
        "unknown-virtual-tag",
        [("bar", 0x400C, 4, 0x0013_0000)],
    ),
    Case(
        "enable IV + TPH on a device with a table in the cap",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x10), ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.REWRITE,
        "tag-fallback",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(1, 8)], ("tph", 0x8, 4, EN_IV_TPH)],
    ),
    Case(
        "after a reset every entry is written before enabling",
        CAP,
        "a",
        [("reset", 0, 0, 0), ("tph", 0xC, 2, 0x11), ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.REWRITE,
        "tag-fallback",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(1, 8)], ("tph", 0x8, 4, EN_IV_TPH)],
    ),
    Case(
        "enable when every entry is already allowed passes",
        CAP,
        "a",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(8)], ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.PASS,
        "control-granted",
        [("tph", 0x8, 4, EN_IV_TPH)],
    ),
    Case(
        "no standard ST table: Requester Enable forced off",
        "ds-only.lspci",
        "a",
        [("tph", 0x8, 4, 0x102)],
        Verdict.DROP,
        "no-st-table",
        [],
    ),
    Case(
        "No ST mode on a device without a table is refused too",
        "ds-only.lspci",
        "a",
        [("tph", 0x8, 4, EN_NS_TPH)],
        Verdict.DROP,
        "no-st-table",
        [],
    ),
    Case(
        "reserved ST table location: forced off",
        "location-reserved.lspci",
        "a",
        [("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.DROP,
        "no-st-table",
        [],
    ),
    Case(
        "Device Specific mode: forced off",
        "ext-tph.lspci",
        "a",
        [("tph", 0x8, 4, 0x102)],
        Verdict.DROP,
        "device-specific-mode",
        [],
    ),
    Case(
        "reserved mode never reaches the device",
        CAP,
        "a",
        [("tph", 0x8, 4, 0x103)],
        Verdict.DROP,
        "mode-reserved",
        [],
    ),
    Case(
        "reserved Requester Enable never reaches the device",
        CAP,
        "a",
        [("tph", 0x8, 4, 0x201)],
        Verdict.DROP,
        "req-enable-reserved",
        [],
    ),
    Case(
        "Extended TPH downgraded on a device without it",
        CAP,
        "a",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(8)], ("tph", 0x8, 4, EN_IV_EXT)],
        Verdict.REWRITE,
        "ext-downgraded",
        [("tph", 0x8, 4, EN_IV_TPH)],
    ),
    Case(
        "Extended TPH downgraded when policy says so",
        "ext-tph.lspci",
        "a",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(16)], ("tph", 0x8, 4, EN_IV_EXT)],
        Verdict.REWRITE,
        "ext-downgraded",
        [("tph", 0x8, 4, EN_IV_TPH)],
        pol={"dev_a": {"extended_tph": False}},
    ),
    Case(
        "No ST mode needs tag 0 allowed",
        CAP,
        "a",
        [("tph", 0x8, 4, EN_NS_TPH)],
        Verdict.PASS,
        "control-granted",
        [("tph", 0x8, 4, EN_NS_TPH)],
    ),
    Case(
        "policy tph: false keeps it off",
        CAP,
        "a",
        [("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.DROP,
        "tph-forbidden",
        [],
        pol={"dev_a": {"tph": False}},
    ),
    Case(
        "drop policy: enable keeps an allowed device entry when the guest's is foreign",
        CAP,
        "a",
        [("tph", 0xC, 2, 0x13), ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.REWRITE,
        "foreign-tag",
        [*[("tph", 0xC + 2 * i, 2, 0x10) for i in range(1, 8)], ("tph", 0x8, 4, EN_IV_TPH)],
        pol={"a": {"on_violation": OnViolation.DROP}},
    ),
    Case(
        "drop policy: enable refused when no safe value is known for a foreign entry",
        CAP,
        "a",
        [("reset", 0, 0, 0), ("tph", 0xC, 2, 0x13), ("tph", 0x8, 4, EN_IV_TPH)],
        Verdict.DROP,
        "foreign-tag",
        [],
        pol={"a": {"on_violation": OnViolation.DROP}},
        reasons=("control-granted", "foreign-tag", "enable-refused"),
    ),
    Case(
        "straddling write: non-TPH bytes pass, header bytes dropped",
        CAP,
        "a",
        [("tph", -2, 4, 0xAAAA_BBBB)],
        Verdict.REWRITE,
        "read-only",
        [("tph", -2, 2, 0xBBBB)],
    ),
    Case(
        "byte write to the ST entry upper half",
        "ext-tph.lspci",
        "a",
        [("tph", 0xD, 1, 0x10)],
        Verdict.PASS,
        "tag-allowed",
        [("tph", 0xD, 1, 0x10)],
    ),
    Case(
        "MSI-X sub-dword ST write: the word's mask bits are unknown, nothing is written",
        MSIX,
        "b",
        [("bar", 0x4000 + 14, 2, 0x0002)],
        Verdict.DROP,
        "tag-translated",
        [],
        reasons=("tag-translated", "msix-state-unknown"),
    ),
    Case(
        "MSI-X sub-dword ST write widened to the dword with the guest's mask bits",
        MSIX,
        "b",
        [("bar", 0x4000 + 12, 2, 0x0001), ("bar", 0x4000 + 14, 2, 0x0002)],
        Verdict.REWRITE,
        "tag-translated",
        [("bar", 0x400C, 4, 0x0013_0001)],
        reasons=("tag-translated", "msix-sub-dword"),
    ),
    Case(
        "vCPU pinned to a CPU whose tag is shared is a violation",
        MSIX,
        "b",
        [("bar", 0x4000 + 12, 4, 0x0001_0000)],
        Verdict.REWRITE,
        "unknown-virtual-tag",
        [("bar", 0x400C, 4, 0x0013_0000)],
    ),
]


def run(case: Case) -> tuple[Engine, ConfigSpace, Decision]:
    bdf = A if case.vm == "a" else B
    cfg = fixture(case.device, None)
    cfg = ConfigSpace.from_bytes(cfg.data, cfg.source, bdf)
    pol = policy(case.pol.get("a"), case.pol.get("b"), case.pol.get("dev_a"))
    engine = Engine(pol)
    engine.attach(case.vm, bdf, cfg)
    base = tph_base(cfg)
    bar = cfg.msix.table_bir if cfg.msix else 0
    decision: Decision | None = None
    for kind, off, width, value in case.steps:
        if kind == "tph":
            decision = engine.handle(ConfigWrite(case.vm, bdf, base + off, width, value))
        elif kind == "cfg":
            decision = engine.handle(ConfigWrite(case.vm, bdf, off, width, value))
        elif kind == "bar":
            decision = engine.handle(MsixWrite(case.vm, bdf, bar, off, width, value))
        else:
            decision = engine.handle(Reset(case.vm, bdf))
    assert decision is not None
    return engine, cfg, decision


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case: Case) -> None:
    _, cfg, d = run(case)
    assert (d.verdict, d.reason) == (case.verdict, case.reason), d
    if case.reasons:
        assert d.reasons == case.reasons
    if case.writes is not None:
        base = tph_base(cfg)
        want = []
        for space, off, width, value in case.writes:
            if space == "tph":
                want.append(("config", base + off, width, value))
            else:
                want.append((space, off, width, value))
        got = [(w.space, w.offset, w.width, w.value) for w in d.writes]
        assert got == want


def test_enable_after_tags_written_for_8_bit_rewrites_foreign_upper_bytes() -> None:
    """Order attack: 8-bit-safe tags whose upper byte is foreign, then Extended TPH."""
    cfg = ConfigSpace.from_bytes(fixture("ext-tph.lspci").data, "ext", A)
    engine = Engine(policy())
    engine.attach("a", A, cfg)
    base = tph_base(cfg)
    for i in range(16):
        d = engine.handle(ConfigWrite("a", A, base + 0xC + 2 * i, 2, 0x1310))  # low byte 0x10 ok
        assert d.verdict is Verdict.PASS  # prospective width is 8 bits: 0x10 is CPU 0-1's tag
    d = engine.handle(ConfigWrite("a", A, base + 8, 4, EN_IV_EXT))
    assert d.reason == "foreign-tag"
    assert "entries-corrected" in d.reasons
    writes = [(w.offset - base, w.width, w.value) for w in d.writes]
    # every entry re-resolved at 16 bits to the fallback before the control write lands
    assert writes[:16] == [(0xC + 2 * i, 2, 0x1000) for i in range(16)]
    assert writes[16:] == [(0x8, 4, EN_IV_EXT)]


def test_width_change_while_enabled_clears_enable_first() -> None:
    cfg = ConfigSpace.from_bytes(fixture("ext-tph.lspci").data, "ext", A)
    engine = Engine(policy())
    engine.attach("a", A, cfg)
    base = tph_base(cfg)
    for i in range(16):
        engine.handle(ConfigWrite("a", A, base + 0xC + 2 * i, 2, 0x10))
    assert engine.handle(ConfigWrite("a", A, base + 8, 4, EN_IV_TPH)).verdict is Verdict.PASS
    d = engine.handle(ConfigWrite("a", A, base + 8, 4, EN_IV_EXT))
    writes = [(w.offset - base, w.width, w.value) for w in d.writes]
    assert writes[0] == (0x8, 4, 0x001)  # IV mode, Requester Enable cleared
    assert writes[1:17] == [(0xC + 2 * i, 2, 0x1000) for i in range(16)]
    assert writes[17] == (0x8, 4, EN_IV_EXT)


def test_control_register_one_byte_at_a_time() -> None:
    cfg = ConfigSpace.from_bytes(fixture(CAP).data, "cap", A)
    engine = Engine(policy())
    engine.attach("a", A, cfg)
    base = tph_base(cfg)
    engine.handle(ConfigWrite("a", A, base + 0xC, 2, 0x13))  # foreign: device gets 0x10
    d1 = engine.handle(ConfigWrite("a", A, base + 8, 1, 0x01))  # mode IV, still disabled
    assert d1.verdict is Verdict.PASS
    d2 = engine.handle(ConfigWrite("a", A, base + 9, 1, 0x01))  # Requester Enable 1
    # Entry 0 holds a foreign tag in the guest's view (the device has the fallback); the 7
    # entries the guest never wrote get the fallback before the enable lands.
    assert d2.reason == "foreign-tag"
    assert [(w.offset - base, w.width, w.value) for w in d2.writes] == [
        *[(0xC + 2 * i, 2, 0x10) for i in range(1, 8)],
        (8, 4, EN_IV_TPH),
    ]
    read = engine.handle(ConfigRead("a", A, base + 8, 4))
    assert read.guest_value == EN_IV_TPH and read.read_mask == 0xFFFF_FFFF
    st = engine.handle(ConfigRead("a", A, base + 0xC, 2))
    assert st.guest_value == 0x13  # the guest sees what it wrote, the device holds 0x10
    sess = engine.session("a", A)
    assert sess is not None and sess.dev_ent[0] == 0x10


def test_msix_qword_data_and_vector_control() -> None:
    cfg = ConfigSpace.from_bytes(fixture(MSIX).data, "msix", B)
    engine = Engine(policy())
    engine.attach("b", B, cfg)
    d = engine.handle(MsixWrite("b", B, 2, 0x4000 + 16 + 8, 8, (0x0003_0000 << 32) | 0x41))
    assert d.verdict is Verdict.REWRITE and d.reason == "tag-translated"
    assert [(w.offset, w.width, w.value) for w in d.writes] == [
        (0x4018, 8, (0x0013_0000 << 32) | 0x41)  # data untouched, vCPU 3 -> CPU 7 -> 0x13
    ]
    r = engine.handle(MsixRead("b", B, 2, 0x4000 + 16 + 12, 4))
    assert r.read_mask == 0xFFFF_0000 and r.guest_value == 0x0003_0000


def test_enabled_snapshot_is_disabled_at_attach() -> None:
    cfg = ConfigSpace.from_bytes(fixture("enabled-at-snapshot.lspci").data, "snap", A)
    engine = Engine(policy())
    d = engine.attach("a", A, cfg)
    assert d.verdict is Verdict.REWRITE and "attach-disabled-tph" in d.reasons
    (w,) = d.writes
    assert w.offset == tph_base(cfg) + 8 and w.value & 0x300 == 0


def test_unknown_vm_device_and_bad_access_are_dropped() -> None:
    engine = Engine(policy())
    cfg = ConfigSpace.from_bytes(fixture(CAP).data, "cap", A)
    engine.attach("a", A, cfg)
    assert engine.handle(ConfigWrite("zz", A, 0, 4, 0)).reason == "unknown-vm"
    assert engine.handle(ConfigWrite("a", B, 0, 4, 0)).reason == "unknown-device"
    assert engine.handle(ConfigWrite("a", A, 0, 3, 0)).reason == "bad-access"
    assert engine.handle(ConfigWrite("a", A, 4094, 4, 0)).reason == "bad-access"
    assert engine.handle(ConfigWrite("a", A, 0, 1, 0x100)).reason == "bad-access"
    assert engine.handle(MsixWrite("a", A, 6, 0, 4, 0)).reason == "bad-access"
    for d in (engine.handle(ConfigWrite("zz", A, 0, 4, 0)),):
        assert d.verdict is Verdict.DROP and d.writes == ()


def test_attach_refusals() -> None:
    engine = Engine(policy())
    cfg = ConfigSpace.from_bytes(fixture(CAP).data, "cap", A)
    with pytest.raises(AttachRefused, match="not in the policy"):
        engine.attach("nope", A, cfg)
    with pytest.raises(AttachRefused, match="belongs to VM 'a'"):
        engine.attach("b", A, cfg)


def test_overlapping_tph_capabilities_are_refused() -> None:
    """Two TPH capabilities whose registers overlap (the first one's next pointer inside its
    own ST table, where a second header sits) cannot both be kept disabled: one's control or
    entry bytes are the other's read-only header. Refused at attach (``bad-config``), with
    both spans named; the same device with the second capability apart attaches."""

    def second_tph_at(at: int) -> ConfigSpace:
        data = bytearray(build_config(tph=TphSpec()))  # TPH at 0x148, 8 entries: 0x148-0x163
        header = int.from_bytes(data[0x148:0x14C], "little")
        data[0x148:0x14C] = (header & 0xFFFFF | at << 20).to_bytes(4, "little")
        data[at : at + 4] = (0x17 | 1 << 16 | (header >> 20) << 20).to_bytes(4, "little")
        data[at + 4 : at + 8] = (0x1).to_bytes(4, "little")  # No ST Mode only, no ST table
        cfg = ConfigSpace.from_bytes(bytes(data), f"second TPH at {at:#x}", A)
        assert [t.offset for t in cfg.tph_all] == [0x148, at]
        return cfg

    with pytest.raises(AttachRefused) as refused:
        Engine(policy()).attach("a", A, second_tph_at(0x158))
    assert refused.value.code == "bad-config"
    assert "0x148 (0x148-0x163) and 0x158 (0x158-0x163) overlap" in refused.value.message
    engine = Engine(policy())
    engine.attach("a", A, second_tph_at(0x200))
    assert engine.session("a", A).geo.refusal == "multiple-tph-caps"  # kept disabled, both


def test_internal_error_drops_and_freezes_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(policy())
    cfg = ConfigSpace.from_bytes(fixture(CAP).data, "cap", A)
    engine.attach("a", A, cfg)
    sess = engine.session("a", A)
    assert sess is not None

    def boom(*_: object) -> None:
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(sess, "plan", boom)
    monkeypatch.setattr(sess, "steady_entry", boom)  # the whole-entry path plans there
    base = tph_base(cfg)
    d = engine.handle(ConfigWrite("a", A, base + 0xC, 2, 0x10))
    # Fail closed: the guest's write is dropped and TPH is disabled on the device.
    assert (d.verdict, d.reason) == (Verdict.REWRITE, "internal-error")
    assert [(w.offset - base, w.width, w.value & 0x300) for w in d.writes] == [(8, 4, 0)]
    assert "simulated fault" in d.detail
    # frozen: even a harmless access is dropped now
    later = engine.handle(ConfigWrite("a", A, 0x04, 2, 0x406))
    assert (later.verdict, later.reason) == (Verdict.DROP, "internal-error")


def test_reload_revokes_and_tightens() -> None:
    engine = Engine(policy())
    cfg = ConfigSpace.from_bytes(fixture(CAP).data, "cap", A)
    engine.attach("a", A, cfg)
    base = tph_base(cfg)
    engine.handle(ConfigWrite("a", A, base + 0xC, 2, 0x11))  # CPU 2's tag
    engine.handle(ConfigWrite("a", A, base + 8, 4, EN_IV_TPH))
    # CPU 2 leaves VM a: 0x11 becomes foreign, rewrite policy -> fallback 0x10 before anything
    tighter = policy({"cpus": frozenset({0, 1, 3})})
    ((_, d),) = engine.reload(tighter)
    got = [(w.offset - base, w.width, w.value) for w in d.writes]
    assert got[0] == (0x8, 4, 0x001)  # entries in use: disable first
    assert (0xC, 2, 0x10) in got and got[-1] == (0x8, 4, EN_IV_TPH)
    # the device leaves VM a entirely
    gone = Policy(HOST, {"b": policy().vms["b"]})
    ((_, d2),) = engine.reload(gone)
    assert d2.reason == "device-revoked"
    assert [(w.offset - base, w.value) for w in d2.writes] == [(0x8, 0x001)]
    assert engine.handle(ConfigRead("a", A, 0, 4)).reason == "device-revoked"


def test_add_device_only_adds_a_free_device() -> None:
    """Engine.add_device (replay's implicit devices) takes a policy that only assigns one more
    free device; any other change must go through reload, which re-checks the sessions."""
    base = policy()
    engine = Engine(base)
    engine.attach("a", A, fixture(CAP))
    c = "0000:3b:00.2"
    vm_a = base.vms["a"]
    added = replace(vm_a, devices={**vm_a.devices, c: DeviceSettings(c)})
    grown = replace(base, vms={**base.vms, "a": added})
    engine.add_device(grown, "a", c)
    assert engine.policy is grown
    assert engine.attach("a", c, fixture(CAP)).verdict is Verdict.PASS
    # a tighter CPU set smuggled in with a device is refused, and the policy stays
    sneaky = replace(
        added,
        cpus=frozenset({0}),
        devices={**added.devices, "0000:3b:00.3": DeviceSettings("0000:3b:00.3")},
    )
    with pytest.raises(ValueError, match="reload"):
        engine.add_device(replace(grown, vms={**grown.vms, "a": sneaky}), "a", "0000:3b:00.3")
    # another VM's device, or a device already assigned
    with pytest.raises(ValueError):
        engine.add_device(grown, "a", B)
    with pytest.raises(ValueError):
        engine.add_device(grown, "a", c)
    assert engine.policy is grown


def test_iv_mode_needs_iv_support() -> None:
    data = build_config(
        tph=TphSpec(interrupt_vector=False, location=StLocation.CAP, table_size=4),
        msix=MsixSpec(table_size=4),
    )
    cfg = ConfigSpace.from_bytes(data, "no-iv", A)
    engine = Engine(policy())
    engine.attach("a", A, cfg)
    d = engine.handle(ConfigWrite("a", A, tph_base(cfg) + 8, 4, EN_IV_TPH))
    assert (d.verdict, d.reason, d.writes) == (Verdict.DROP, "mode-unsupported", ())


def test_no_st_mode_with_tag_0_not_allowed() -> None:
    pol = policy()
    pol = Policy(replace(pol.host, neutral_tags=frozenset()), pol.vms)
    cfg = ConfigSpace.from_bytes(fixture(CAP).data, "cap", A)
    engine = Engine(pol)
    engine.attach("a", A, cfg)
    d = engine.handle(ConfigWrite("a", A, tph_base(cfg) + 8, 4, EN_NS_TPH))
    assert (d.verdict, d.reason, d.writes) == (Verdict.DROP, "no-st-tag-foreign", ())
