"""``tphtrap acpi host`` against firmware tables the tests generate and compile with iasl.

The firmware's host bridges answer the PCI firmware _DSM function 0xF with tags the test
chooses per ACPI processor UID; the MADT maps CPUs to UIDs that differ from the CPU numbers,
so the output proves the CPU -> UID -> tag chain, not an identity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from acpi_fixtures import Bridge, Firmware, MadtCpu, require_acpica, st_info
from helpers import TPHTRAP

from tphtrap import cli
from tphtrap.policyfile import load_policy_text

pytestmark = pytest.mark.usefixtures("acpica")


@pytest.fixture(scope="module")
def acpica() -> None:
    require_acpica()


# CPU n has APIC ID n and UID 0x10 + n; a disabled entry (UID 0x30) sits between CPUs 3 and 4.
CPUS = [MadtCpu(0x10 + n, n) for n in range(4)] + [MadtCpu(0x30, 0x20, enabled=False)]
CPUS += [MadtCpu(0x10 + n, n) for n in range(4, 8)]
TAGS = {  # UID -> u64 answer
    **{0x10 + n: st_info(0x01, 0x0101) for n in range(4)},
    0x14: st_info(0x02, 0x0202),
    0x15: st_info(0x02, 0x0202, ph_ignore=True),
    0x16: st_info(0x03, None),  # only an 8-bit tag
    # UID 0x17 (CPU 7): no answer, the _DSM returns 8 zero bytes
}

EXPECTED_BLOCK = """\
host:
  steering_tags:
    0-3: {st8: 0x01, st16: 0x0101}
    4-5: {st8: 0x02, st16: 0x0202}
    6: {st8: 0x03, st16: null}"""


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [str(TPHTRAP), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def firmware(tmp_path: Path, *bridges: Bridge, cpus=CPUS, **kw) -> Path:
    return Firmware(bridges or [Bridge.with_tags("PC00", TAGS)], cpus, **kw).write(
        tmp_path / "tables"
    )


def test_prints_exactly_the_tags_put_in(tmp_path: Path) -> None:
    tables = firmware(tmp_path)
    r = run("acpi", "host", "--tables", str(tables))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "# Steering tags reported by this host's firmware: PCI firmware _DSM function 0xf "
        "(revision 7), volatile memory, as Linux's pcie_tph_get_cpu_st reads them.\n"
        f"# tables: {tables}: dsdt.dat\n"
        "# CPUs: 0-7; ACPI processor UIDs from the MADT (apic.dat), CPUs numbered in its order\n"
        "# host bridge \\_SB.PC00 (UID 0, segment 0, bus 0x00): answers function 0xf\n"
        "# left out: CPUs 7 have no valid tag at either width\n"
        "# CPUs 5: the firmware sets 'PH ignore' (the platform ignores Processing Hints; the "
        "tag still steers)\n"
        f"{EXPECTED_BLOCK}\n"
    )
    assert r.stderr == ""


def test_output_pastes_into_a_policy(tmp_path: Path) -> None:
    r = run("acpi", "host", "--tables", str(firmware(tmp_path)))
    text = f"version: 1\n{r.stdout}vms:\n  vm: {{cpus: 0-3, devices: {{3b:00.0: {{}}}}}}\n"
    policy = load_policy_text(text, "pasted.yaml")
    got = {c: (t.st8, t.st16) for c, t in policy.host.steering_tags.items()}
    assert got == {
        **dict.fromkeys(range(4), (0x01, 0x0101)),
        4: (0x02, 0x0202),
        5: (0x02, 0x0202),
        6: (0x03, None),
    }


def test_json_has_every_cpu_with_its_uid(tmp_path: Path) -> None:
    r = run("acpi", "host", "--tables", str(firmware(tmp_path)), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["error"] is None
    assert data["steering_tags"] == {
        "0-3": {"st8": 1, "st16": 0x101},
        "4-5": {"st8": 2, "st16": 0x202},
        "6": {"st8": 3, "st16": None},
    }
    assert [(c["cpu"], c["uid"]) for c in data["cpus"]] == [(n, 0x10 + n) for n in range(8)]
    assert data["cpus"][5]["ph_ignore"] is True
    assert data["cpus"][7]["raw"] == "0x0000000000000000"
    assert data["left_out"] == {"no valid tag": "7", "not trusted": ""}
    assert data["host_bridges"][0]["function_mask"] == 0x8001


def test_x2apic_entries_give_32_bit_uids(tmp_path: Path) -> None:
    cpus = [MadtCpu(0x1000 + n, 0x100 + n, x2apic=True) for n in range(3)]
    tables = firmware(
        tmp_path, Bridge.with_tags("PC00", {0x1001: st_info(0x07, 0x0707)}), cpus=cpus
    )
    r = run("acpi", "host", "--tables", str(tables), "--json")
    data = json.loads(r.stdout)
    assert [c["uid"] for c in data["cpus"]] == [0x1000, 0x1001, 0x1002]
    assert data["steering_tags"] == {"1": {"st8": 7, "st16": 0x707}}


def test_firmware_without_function_0xf_says_so_and_exits_1(tmp_path: Path) -> None:
    # The _DSM of this development machine's own firmware: functions 0 and 5 only.
    bridge = Bridge("PC00", {}, function0="Buffer (One) { 0x21 }")
    r = run("acpi", "host", "--tables", str(firmware(tmp_path, bridge)))
    assert r.returncode == 1
    assert "steering_tags" not in r.stdout
    assert r.stderr.strip() == (
        "tphtrap: this firmware reports no steering tags: TPH cannot be used safely on this "
        "host (no host bridge's _DSM offers function 0xf: \\_SB.PC00: function 0 returned 0x21 "
        "(functions 0, 5))"
    )


def test_no_dsm_and_no_host_bridge(tmp_path: Path) -> None:
    plain = Bridge("PC00", {}, extra="")
    tables = Firmware([plain], CPUS).write(tmp_path / "a")
    dsdt = (tables / "dsdt.dat").read_bytes()
    assert dsdt  # compiled
    nobridge = Firmware([], CPUS).write(tmp_path / "b")
    r = run("acpi", "host", "--tables", str(nobridge))
    assert r.returncode == 1
    assert "declare no PCI host bridge, PNP0A08 or PNP0A03" in r.stderr
    no_dsm = Firmware([], CPUS, extra='    Device (\\_SB.PCI0) { Name (_HID, "PNP0A03") }')
    r = run("acpi", "host", "--tables", str(no_dsm.write(tmp_path / "c")))
    assert r.returncode == 1
    assert "\\_SB.PCI0: no _DSM method" in r.stderr


def test_host_bridge_found_by_string_hid_cid_package_and_not_when_absent(tmp_path: Path) -> None:
    one = {0x10: st_info(0x05, 0x0505)}
    bridges = [
        Bridge.with_tags("PC00", one, hid='"PNP0A08"', cid=None),
        Bridge.with_tags(
            "PC01", one, hid='"ACPI0016"', cid='Package () { "FOO0001", EisaId ("PNP0A08") }', uid=1
        ),
        Bridge.with_tags("PC02", one, uid=2, extra="        Name (_STA, Zero)"),  # not present
        Bridge.with_tags("PC03", one, hid='EisaId ("PNP0A05")', cid=None, uid=3),  # not PCI
    ]
    r = run("acpi", "host", "--tables", str(firmware(tmp_path, *bridges)), "--json")
    data = json.loads(r.stdout)
    assert [b["path"] for b in data["host_bridges"]] == ["\\_SB.PC00", "\\_SB.PC01"]
    assert data["host_bridges"][1]["ids"] == ["ACPI0016", "FOO0001", "PNP0A08"]
    assert r.returncode == 0 and data["steering_tags"] == {"0": {"st8": 5, "st16": 0x505}}


def test_bridges_that_disagree_are_refused_and_bridge_selects(tmp_path: Path) -> None:
    other = dict(TAGS)
    other[0x12] = st_info(0x09, 0x0909)
    tables = firmware(
        tmp_path, Bridge.with_tags("PC00", TAGS), Bridge.with_tags("PC01", other, uid=1, bus=0x80)
    )
    r = run("acpi", "host", "--tables", str(tables))
    assert r.returncode == 1
    assert (
        "the host bridges disagree on the tags of CPUs 2 (CPU 2: \\_SB.PC00 st8 0x01 st16 "
        "0x0101, \\_SB.PC01 st8 0x09 st16 0x0909)" in r.stderr
    )
    assert "--bridge" in r.stderr
    assert "    2:" not in r.stdout and "    0-1,3:" in r.stdout  # CPU 2 left out
    r = run("acpi", "host", "--tables", str(tables), "--bridge", "\\_SB.PC00")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(EXPECTED_BLOCK + "\n")
    r = run("acpi", "host", "--tables", str(tables), "--bridge", "\\_SB.NOPE")
    assert r.returncode == 1 and "not a PCI host bridge of these tables" in r.stderr


def test_bridges_that_agree_are_all_named(tmp_path: Path) -> None:
    tables = firmware(
        tmp_path, Bridge.with_tags("PC00", TAGS), Bridge.with_tags("PC01", TAGS, uid=1, bus=0x80)
    )
    r = run("acpi", "host", "--tables", str(tables))
    assert r.returncode == 0, r.stderr
    assert "# host bridge \\_SB.PC01 (UID 1, segment 0, bus 0x80): answers function 0xf" in r.stdout
    assert r.stdout.endswith(EXPECTED_BLOCK + "\n")


def test_answers_read_from_hardware_are_flagged_not_trusted(tmp_path: Path) -> None:
    region = (
        "        OperationRegion (STRG, SystemMemory, 0xFED40000, 0x10)\n"
        "        Field (STRG, DWordAcc, NoLock, Preserve) { STV0, 32 }"
    )
    answers = {0x10 + n: "Buffer (0x08) { 0x03, 0x01, 0x01, 0x01, 0, 0, 0, 0 }" for n in range(8)}
    answers[0x13] = "ToBuffer (STV0)"  # CPU 3's tags come from a hardware register
    bridge = Bridge("PC00", answers, extra=region)
    r = run("acpi", "host", "--tables", str(firmware(tmp_path, bridge)))
    assert r.returncode == 1
    assert "the answers for CPUs 3 read operation regions" in r.stderr
    assert "SystemMemory" in r.stderr and "FED40000" in r.stderr
    assert "    0-2,4-7: {st8: 0x01, st16: 0x0101}" in r.stdout
    assert "# left out: CPUs 3, whose answers are not trustworthy" in r.stdout


def test_answers_linux_would_not_use(tmp_path: Path) -> None:
    answers = {
        0x10: "0x0101010103",  # an integer: Linux wants a buffer
        0x11: "Buffer (0x04) { 0x03, 0x01, 0x01, 0x01 }",  # Linux reads 8 bytes
        0x12: "Buffer (0x0A) { 0x03, 0x04, 0x04, 0x00, 0, 0, 0, 0, 0xFF, 0xFF }",  # 8 used
    }
    r = run("acpi", "host", "--tables", str(firmware(tmp_path, Bridge("PC00", answers))))
    assert r.returncode == 0, r.stderr
    assert "# CPUs 0: \\_SB.PC00: returned an integer, not a buffer; Linux ignores it" in r.stdout
    assert "# CPUs 1: \\_SB.PC00: returned a 4-byte buffer; Linux reads 8 bytes" in r.stdout
    assert r.stdout.endswith("    2: {st8: 0x04, st16: 0x0004}\n")


def test_bad_checksum_is_noted_and_dsdt_from_directory(tmp_path: Path) -> None:
    tables = firmware(tmp_path)
    dsdt = tables / "dsdt.dat"
    data = bytearray(dsdt.read_bytes())
    data[9] ^= 0x55  # the checksum byte
    dsdt.write_bytes(bytes(data))
    r = run("acpi", "host", "--tables", str(tables))
    assert r.returncode == 0
    assert "# note: dsdt.dat has a bad checksum (Linux warns and uses it all the same)" in r.stdout


def test_ssdts_are_loaded_with_the_dsdt(tmp_path: Path) -> None:
    # The host bridge is in an SSDT (as on many servers).
    bridge = Bridge.with_tags("PC00", {0x11: st_info(0x0C, 0x0C0C)})
    tables = Firmware([], CPUS, ssdts=[bridge.asl()]).write(tmp_path / "t")
    r = run("acpi", "host", "--tables", str(tables))
    assert r.returncode == 0, r.stderr
    assert "# tables: " + str(tables) + ": dsdt.dat, ssdt1.dat" in r.stdout
    assert r.stdout.endswith("    1: {st8: 0x0c, st16: 0x0c0c}\n")


def test_missing_acpiexec_names_the_package(tmp_path: Path) -> None:
    tables = firmware(tmp_path)
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    r = run("acpi", "host", "--tables", str(tables), env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "tphtrap: error: acpiexec is not installed: it comes with Debian's acpica-tools "
        "(apt-get install acpica-tools)"
    )


def test_missing_madt_and_bad_directory(tmp_path: Path) -> None:
    tables = firmware(tmp_path)
    (tables / "apic.dat").unlink()
    r = run("acpi", "host", "--tables", str(tables))
    assert r.returncode == 1 and "no MADT (APIC table)" in r.stderr
    r = run("acpi", "host", "--tables", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "not a directory of ACPI tables" in r.stderr


def test_usage_errors_exit_with_the_cli_usage_status() -> None:
    usage = getattr(cli, "EXIT_USAGE", cli.EXIT_USER)  # 2 once cli.py has EXIT_USAGE
    for args in (["acpi", "host", "--timeout", "-1"], ["acpi"], ["acpi", "guest", "--vm", "x"]):
        r = run(*args)
        assert r.returncode == usage and "usage:" in r.stderr, args


LIVE = Path("/sys/firmware/acpi/tables/DSDT")


def test_this_host() -> None:
    """On the live host: this machine's firmware has no TPH _DSM, so exit 1 and say why."""
    if not os.access(LIVE, os.R_OK):
        pytest.skip(f"{LIVE} is not readable here (not root, or no ACPI)")
    r = run("acpi", "host", "--json")
    data = json.loads(r.stdout)
    if r.returncode == 0:  # a host whose firmware does report tags
        assert data["ok"] and data["steering_tags"], data
        return
    assert r.returncode == 1, r.stderr
    assert data["ok"] is False and data["error"] in r.stderr
    assert "reports no steering tags: TPH cannot be used safely on this host" in data["error"]
    assert data["host_bridges"], "the live DSDT has a PCI host bridge"
    assert sys.platform == "linux"
