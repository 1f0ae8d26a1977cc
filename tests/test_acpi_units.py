"""The ACPI side's small units: EISA ids, the MADT, CPU -> UID on a live host, acpiexec's dump
of returned objects, and the _DSM answer's bit layout against the documented positions."""

from __future__ import annotations

from pathlib import Path

import pytest
from acpi_fixtures import Firmware, MadtCpu, require_acpica, st_info

from tphtrap.acpi.acpiexec import AmlOther, CommandOutput, evaluation
from tphtrap.acpi.cpus import cpus_from_madt, cpus_from_sysfs
from tphtrap.acpi.dsm import decode_st_info, function_mask, offers_tph, st_info_answer
from tphtrap.acpi.errors import AcpiError
from tphtrap.acpi.madt import ProcessorKind, madt_processors
from tphtrap.acpi.namespace import decode_eisa_id
from tphtrap.acpi.tables import load_tables


def test_eisa_ids() -> None:
    assert decode_eisa_id(0x080AD041) == "PNP0A08"
    assert decode_eisa_id(0x030AD041) == "PNP0A03"
    assert decode_eisa_id(0x0501D041) == "PNP0105"


@pytest.mark.parametrize(
    ("st8", "st16", "ph"), [(0x12, 0x3456, False), (None, 0xFFFF, True), (0xFF, None, False)]
)
def test_st_info_layout_matches_linux_bit_positions(st8, st16, ph) -> None:
    info = decode_st_info(st_info(st8, st16, ph_ignore=ph) | 0x0101_0203 << 32)
    assert (info.st8, info.st16, info.ph_ignore) == (st8, st16, ph)
    assert (info.pm_st8, info.pm_st16) == (0x02, 0x0101)  # bits 47:40 and 63:48, valid bits 32/33


def test_function_0_masks_as_acpi_check_dsm_reads_them() -> None:
    assert offers_tph(function_mask(bytes([0x01, 0x80])))
    assert offers_tph(function_mask(0x8001))  # old firmware returns an integer
    assert not offers_tph(function_mask(bytes([0x00, 0x80])))  # bit 0 clear: nothing
    assert not offers_tph(function_mask(bytes([0x21])))
    assert not offers_tph(function_mask("8001"))
    assert st_info_answer(bytes(7))[1] == (
        "returned a 7-byte buffer; Linux reads 8 bytes, so the tags are whatever memory follows it"
    )


def test_acpiexec_object_dump_is_read_back() -> None:
    lines = """\
Evaluating \\X
Evaluation of \\X returned object 0x55d5029ced60, external buffer length D0
  [Package] Contains 4 Elements:
    [Buffer] Length 14 =
    0000: 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F 10  // ................
    0010: 11 12 13 14                                      // ....
    [String] Length 0B = "a\\nb\\"c\\x01d"
    [Package] Contains 1 Elements:
      [Integer] = 00000000080AD041
    [Object Reference] = 0x1234 <Node>
""".splitlines()
    ev = evaluation(CommandOutput("evaluate \\X", tuple(lines)))
    assert ev.ok and ev.returned
    assert ev.value == (
        bytes(range(1, 21)),
        'a\nb"c\x01d',
        (0x080AD041,),
        AmlOther("[Object Reference] = 0x1234 <Node>"),
    )
    failed = evaluation(CommandOutput("e", ("Evaluation of \\Y failed with status AE_NOT_FOUND",)))
    assert failed.status == "AE_NOT_FOUND" and not failed.ok
    with pytest.raises(AcpiError, match="8-byte buffer printed as 2 bytes"):
        evaluation(
            CommandOutput(
                "e",
                (
                    "Evaluation of \\Z returned object 0x1, external",
                    "  [Buffer] Length 08 =     0000: 01 02",
                ),
            )
        )


@pytest.fixture
def madt(tmp_path: Path):
    require_acpica()
    cpus = [
        MadtCpu(0x20, 0x00),
        MadtCpu(0x21, 0x02),
        MadtCpu(0x22, 0x04, enabled=False),
        MadtCpu(0x23, 0xFF),  # APIC ID 0xFF: Linux skips it
        MadtCpu(0x24, 0x06),
        MadtCpu(0x25, 0x05, x2apic=True),  # x2APIC below 255 next to Local APIC: skipped
    ]
    return load_tables(Firmware([], cpus).write(tmp_path / "t")).madt


def test_madt_processors_and_the_ones_linux_brings_up(madt) -> None:
    entries = madt_processors(madt)
    assert [(e.kind, e.uid, e.hw_id, e.enabled) for e in entries] == [
        (ProcessorKind.LOCAL_APIC, 0x20, 0, True),
        (ProcessorKind.LOCAL_APIC, 0x21, 2, True),
        (ProcessorKind.LOCAL_APIC, 0x22, 4, False),
        (ProcessorKind.LOCAL_APIC, 0x23, 0xFF, True),
        (ProcessorKind.LOCAL_APIC, 0x24, 6, True),
        (ProcessorKind.LOCAL_X2APIC, 0x25, 5, True),
    ]
    assert [(c.cpu, c.uid) for c in cpus_from_madt(madt)] == [(0, 0x20), (1, 0x21), (2, 0x24)]


def fake_sysfs(tmp_path: Path, present: str, cpuinfo: dict[int, int], uids: dict[int, str]):
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "present").write_text(present + "\n")
    for n, uid in uids.items():
        node = cpu / f"cpu{n}" / "firmware_node"
        node.mkdir(parents=True)
        (node / "uid").write_text(uid + "\n")
    info = tmp_path / "cpuinfo"
    info.write_text(
        "".join(
            f"processor\t: {n}\nmodel name\t: x\napicid\t\t: {a}\n\n" for n, a in cpuinfo.items()
        )
    )
    return cpu, info


def test_live_cpus_by_apic_id_then_firmware_node(madt, tmp_path: Path) -> None:
    sys_cpu, info = fake_sysfs(tmp_path, "0-2", {0: 6, 1: 0}, {2: "0x2a"})
    got = cpus_from_sysfs(madt, sys_cpu, info)
    assert [(c.cpu, c.uid) for c in got] == [(0, 0x24), (1, 0x20), (2, 0x2A)]


def test_live_cpu_without_any_uid_is_an_error(madt, tmp_path: Path) -> None:
    sys_cpu, info = fake_sysfs(tmp_path, "0-3", {0: 0, 1: 2}, {})
    with pytest.raises(AcpiError, match="cannot find the ACPI processor UID of CPUs 2-3"):
        cpus_from_sysfs(madt, sys_cpu, info)
