"""``tphtrap acpi guest``: the SSDT compiled by iasl, evaluated by acpiexec, for every vCPU
of every example policy with ``vcpus``, must answer exactly ``policy explain``'s virtual tags.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from acpi_fixtures import acpiexec_buffer, acpiexec_buffers, guest_like_dsdt, require_acpica
from helpers import REPO, TPHTRAP

from tphtrap.policyfile import load_policy

GUID_ARG = "(d037c9e553357a4d9117ea4d19c3434d)"  # ToUUID's bytes of the PCI firmware GUID
POLICIES = sorted((REPO / "policies").glob("*.yaml"))


@pytest.fixture(autouse=True)
def acpica() -> None:
    require_acpica()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TPHTRAP), *args], capture_output=True, text=True, timeout=120)


TRANSLATION = REPO / "policies" / "translation.yaml"


def guest(
    vm: str, *args: str | Path, policy: Path = TRANSLATION
) -> subprocess.CompletedProcess[str]:
    return run("acpi", "guest", "--policy", str(policy), "--vm", vm, *map(str, args))


def translating_vms() -> list[tuple[Path, str]]:
    out = [(p, name) for p in POLICIES for name, vm in load_policy(p).vms.items() if vm.vcpus]
    assert out, "the example policies have VMs with vcpus"
    return out


def explain(policy: Path, vm: str) -> list[dict[str, object]]:
    r = run("policy", "explain", str(policy), "--vm", vm, "--json")
    assert r.returncode == 0, r.stderr
    virtual = json.loads(r.stdout)["virtual_tags"]
    assert virtual
    return virtual  # type: ignore[no-any-return]


def expected_answer(entry: dict[str, object] | None) -> bytes:
    """The 8 bytes Linux's union st_info holds for a virtual tag (bits per the reference)."""
    if entry is None:
        return bytes(8)
    tag = int(entry["virtual_tag"])  # type: ignore[call-overload]
    raw = 0
    if entry["8"] is not None:
        raw |= 1 | tag << 8
    if entry["16"] is not None:
        raw |= 2 | tag << 16
    return raw.to_bytes(8, "little")


@pytest.fixture(scope="module")
def q35_dsdt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guest_like_dsdt(tmp_path_factory.mktemp("guest") / "dsdt.aml")


@pytest.mark.parametrize(("policy", "vm"), translating_vms(), ids=lambda v: getattr(v, "name", v))
def test_every_vcpu_gets_policy_explains_virtual_tags(
    policy: Path, vm: str, q35_dsdt: Path, tmp_path: Path
) -> None:
    ssdt = tmp_path / "ssdt.aml"
    r = guest(vm, "-o", ssdt, policy=policy)
    assert r.returncode == 0, r.stderr
    assert f"QEMU: -acpitable file={ssdt}" in r.stderr
    tables = [q35_dsdt, ssdt]
    mask = acpiexec_buffer(tables, f"evaluate \\_SB.PCI0._DSM {GUID_ARG} 7 0 [ ]")
    assert mask == bytes([0x01, 0x80])  # functions 0 and 0xF
    virtual = explain(policy, vm)
    outside = [len(virtual), len(virtual) + 1, 0xFF, 0x1000]  # UIDs that are not the VM's
    uids = [int(e["virtual_tag"]) for e in virtual] + outside  # type: ignore[call-overload]
    dsm = f"evaluate \\_SB.PCI0._DSM {GUID_ARG} 7 0xF"
    got = acpiexec_buffers(tables, [f"{dsm} [0 0x{uid:x} 0]" for uid in uids])
    want = [expected_answer(e) for e in virtual] + [bytes(8)] * len(outside)
    assert dict(zip(uids, got, strict=True)) == dict(zip(uids, want, strict=True))
    assert any(w != bytes(8) for w in want)


def test_function_0_only_for_this_guid_and_revision(q35_dsdt: Path, tmp_path: Path) -> None:
    ssdt = tmp_path / "s.aml"
    assert guest("web", "-o", ssdt).returncode == 0
    tables = [q35_dsdt, ssdt]
    assert acpiexec_buffer(tables, f"evaluate \\_SB.PCI0._DSM {GUID_ARG} 6 0 [0]") == b"\0"
    other = "(33db4d5bf71f1c409657 7441c03dd766)"  # the _OSC GUID
    assert acpiexec_buffer(tables, f"evaluate \\_SB.PCI0._DSM {other} 7 0 [ ]") == b"\0"
    # feature 1 (not the processor cache) and a malformed argument: no valid tag
    assert acpiexec_buffer(tables, f"evaluate \\_SB.PCI0._DSM {GUID_ARG} 7 0xF [1 0 0]") == bytes(8)
    assert acpiexec_buffer(tables, f"evaluate \\_SB.PCI0._DSM {GUID_ARG} 7 0xF 5") == bytes(8)


def test_i440fx_host_bridge_and_expander_bridges(tmp_path: Path) -> None:
    dsdt = guest_like_dsdt(tmp_path / "pc.aml", hid="PNP0A03")
    r = guest("web", "-o", tmp_path / "s.aml", "--guest-dsdt", dsdt)
    assert r.returncode == 0, r.stderr
    assert "loads cleanly; \\_SB.PCI0 answer the expected tags for 7 UIDs" in r.stderr


def test_guest_dsdt_that_already_has_a_dsm_is_refused(tmp_path: Path) -> None:
    gpex = guest_like_dsdt(tmp_path / "gpex.aml", with_dsm=True)
    out = tmp_path / "s.aml"
    r = guest("web", "-o", out, "--guest-dsdt", gpex)
    assert r.returncode == 1
    assert "does not load over gpex.aml" in r.stderr and "AE_ALREADY_EXISTS" in r.stderr
    assert "already has a _DSM" in r.stderr
    assert not out.exists()


def test_asl_source_and_errors(tmp_path: Path) -> None:
    r = guest("web", "--asl")
    assert r.returncode == 0, r.stderr
    assert 'DefinitionBlock ("", "SSDT", 2, "TPHTRP", "TPHTAGS", 0x00000001)' in r.stdout
    assert "External (\\_SB.PCI0, DeviceObj)" in r.stdout
    assert "/* UID 3: vCPU 3 (CPU 30), tag 3 at 8-bit and 16-bit */" in r.stdout
    r = guest("tenant-a", "--asl", policy=REPO / "policies" / "two-tenants.yaml")
    assert r.returncode == 1 and "has no vcpus" in r.stderr
    r = guest("nope", "--asl")
    assert r.returncode == 1 and "VM 'nope' is not in" in r.stderr and "db, web" in r.stderr
    r = guest("web", "--asl", "--bridge", "_SB.PCI0")
    assert r.returncode == 1 and "not an absolute ACPI path" in r.stderr


def test_several_bridges(tmp_path: Path) -> None:
    src = (
        'DefinitionBlock ("", "DSDT", 1, "BOCHS ", "BXPCDSDT", 1) { Scope (\\_SB) {\n'
        '  Device (PCI0) { Name (_HID, EisaId ("PNP0A08")) }\n'
        '  Device (PC10) { Name (_HID, EisaId ("PNP0A08")) Name (_BBN, 0x10) } } }\n'
    )
    from acpi_fixtures import compile_asl

    dsdt = compile_asl(src, tmp_path / "pxb.aml")
    r = guest(
        "db",
        "--bridge",
        "\\_SB.PCI0",
        "--bridge",
        "\\_SB.PC10",
        "-o",
        tmp_path / "s.aml",
        "--guest-dsdt",
        dsdt,
    )
    assert r.returncode == 0, r.stderr
    assert "\\_SB.PCI0, \\_SB.PC10 answer the expected tags for 19 UIDs" in r.stderr
