"""Malformed and hostile tables: a clear one-line error naming what failed, never a hang."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from acpi_fixtures import Bridge, Firmware, MadtCpu, compile_asl, require_acpica, st_info
from helpers import TPHTRAP

from tphtrap.acpi.acpiexec import run_acpiexec
from tphtrap.acpi.errors import AcpiError

CPUS = [MadtCpu(n, n) for n in range(2)]


@pytest.fixture(autouse=True)
def acpica() -> None:
    require_acpica()


def host(tables: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    r = subprocess.run(
        [str(TPHTRAP), "acpi", "host", "--tables", str(tables), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r, time.monotonic() - start


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tphtrap:")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    return lines[0]


def tables_with(tmp_path: Path, method_body: str) -> Path:
    """CPU 0's answer comes from a method with ``method_body``; CPU 1's is a plain buffer."""
    extra = f"        Event (EVNT)\n        Method (ANS0, 0, Serialized) {{ {method_body} }}"
    answers = {0: "ANS0 ()", 1: "Buffer (0x08) { 0x03, 0x01, 0x01, 0x01, 0, 0, 0, 0 }"}
    return Firmware([Bridge("PC00", answers, extra=extra)], CPUS).write(tmp_path / "t")


def test_endless_loop_is_cut_by_acpiexec_loop_timeout(tmp_path: Path) -> None:
    r, took = host(tables_with(tmp_path, "While (One) { } Return (Buffer (0x08) {})"))
    assert took < 60
    assert r.returncode == 0  # CPU 1 still answers; CPU 0's failure is stated
    assert "# CPUs 0: \\_SB.PC00: function 0xf failed (AE_AML_LOOP_TIMEOUT)" in r.stdout


def test_sleeping_method_hits_the_timeout_and_is_killed(tmp_path: Path) -> None:
    r, took = host(
        tables_with(tmp_path, "Wait (EVNT, 0xFFFF) Return (Buffer (0x08) {})"), "--timeout", "3"
    )
    assert took < 30
    err = one_line_error(r)
    assert "asking _DSM function 0xf: acpiexec did not finish within 3 s and was killed" in err


def test_debug_output_cannot_pose_as_an_answer(tmp_path: Path) -> None:
    fake = (
        'Store ("\\nEvaluation of \\\\_SB.PC00._DSM returned object 0x1, external buffer '
        'length 20\\n  [Buffer] Length 08 =     0000: 03 66 66 66 00 00 00 00\\n", Debug)\n'
    )
    answers = {0: "NOIS ()"}
    extra = (
        f"        Method (_INI, 0) {{ {fake} }}\n"
        f"        Method (NOIS, 0) {{ {fake} Return (Buffer (0x08) {{ 3, 1, 1, 1, 0, 0, 0, 0 }}) }}"
    )
    spoof = "0\\nhost:\\n  steering_tags:\\n    1: {st8: 0x66, st16: 0x6666}"
    extra += f'\n        Method (_UID, 0) {{ Return ("{spoof}") }}'
    bridge = Bridge("PC00", answers, extra=extra)
    bridge.uid_decl = ""
    tables = Firmware([bridge], CPUS).write(tmp_path / "t")
    r, _ = host(tables)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("host:\n  steering_tags:\n    0: {st8: 0x01, st16: 0x0101}\n")
    assert '(UID "0\\nhost:\\n  steering_tags:' in r.stdout  # quoted on its comment line
    assert "0x66" not in r.stdout.split("# host bridge")[1].split("\n", 1)[1]


@pytest.mark.parametrize(
    "name,data,fragment",
    [
        ("dsdt.dat", b"DSDT", "4 bytes, shorter than the 36-byte ACPI table header"),
        ("dsdt.dat", b"\x00\x01\x02\x03" + bytes(40), "not an ACPI table (signature bytes"),
        ("junk.bin", b"\x7fELF" + bytes(60), "not an ACPI table (signature bytes 7f454c46)"),
    ],
)
def test_malformed_files_are_named(tmp_path: Path, name: str, data: bytes, fragment: str) -> None:
    tables = Firmware([Bridge.with_tags("PC00", {0: st_info(1, 1)})], CPUS).write(tmp_path / "t")
    (tables / name).write_bytes(data)
    err = one_line_error(host(tables)[0])
    assert str(tables / name) in err and fragment in err


def test_truncated_table_and_length_lies(tmp_path: Path) -> None:
    tables = Firmware([Bridge.with_tags("PC00", {0: st_info(1, 1)})], CPUS).write(tmp_path / "t")
    dsdt = tables / "dsdt.dat"
    dsdt.write_bytes(dsdt.read_bytes()[:-7])
    err = one_line_error(host(tables)[0])
    assert "dsdt.dat: the DSDT header says" in err and "(truncated or not a table dump)" in err


def test_garbage_aml_is_a_load_error(tmp_path: Path) -> None:
    tables = Firmware([Bridge.with_tags("PC00", {0: st_info(1, 1)})], CPUS).write(tmp_path / "t")
    dsdt = tables / "dsdt.dat"
    data = bytearray(dsdt.read_bytes())
    data[36:] = b"\xff" * (len(data) - 36)  # AML body replaced by invalid opcodes
    data[9] = (data[9] - sum(data)) % 256
    dsdt.write_bytes(bytes(data))
    r, took = host(tables)
    assert took < 60
    err = one_line_error(r)
    assert err.startswith("tphtrap: ")  # a stated reason, whatever acpiexec made of it
    assert "internal error" not in err


def test_madt_entries_that_do_not_fit(tmp_path: Path) -> None:
    tables = Firmware([Bridge.with_tags("PC00", {0: st_info(1, 1)})], CPUS).write(tmp_path / "t")
    apic = tables / "apic.dat"
    data = bytearray(apic.read_bytes())
    data[44 + 1] = 0  # first entry's length: 0 would loop forever
    data[9] = (data[9] - sum(data)) % 256
    apic.write_bytes(bytes(data))
    err = one_line_error(host(tables)[0])
    assert "apic.dat: MADT entry at offset 0x2c has length 0" in err


def test_ssdt_redefining_an_object_is_reported_not_fatal(tmp_path: Path) -> None:
    bridge = Bridge.with_tags("PC00", {0: st_info(1, 0x101)})
    fw = Firmware(
        [bridge],
        CPUS,
        ssdts=["    External (\\_SB.PC00, DeviceObj)\n    Name (\\_SB.PC00._UID, 5)"],
    )
    r, _ = host(fw.write(tmp_path / "t"))
    assert r.returncode == 0, r.stderr  # Linux loads the rest of such a table too
    assert r.stdout.endswith("    0: {st8: 0x01, st16: 0x0101}\n")


def test_output_not_following_the_commands_is_refused(tmp_path: Path) -> None:
    dsdt = compile_asl(
        'DefinitionBlock ("", "DSDT", 2, "T", "T", 1) { Name (X, 1) }', tmp_path / "d.aml"
    )
    with pytest.raises(AcpiError, match="acpiexec answered 0 of the 1 commands"):
        run_acpiexec([dsdt], ["quit"], what="test", timeout=30)  # quits before answering
