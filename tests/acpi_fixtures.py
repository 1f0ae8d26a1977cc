"""Firmware tables for the ACPI tests, written as ASL and compiled with the real ``iasl``.

A generated DSDT holds processor devices (``ACPI0007`` with ``_UID``) and PCI host bridges
whose PCI firmware ``_DSM`` answers function 0 and, per ACPI processor UID, an 8-byte function
0xF buffer chosen by the test; the MADT is an iasl data table. Nothing here decodes AML: the
tests read answers through ``tphtrap`` or ``acpiexec``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "Bridge",
    "Firmware",
    "MadtCpu",
    "acpiexec_buffer",
    "compile_asl",
    "guest_like_dsdt",
    "require_acpica",
    "st_info",
]

GUID = "e5c937d0-3553-4d7a-9117-ea4d19c3434d"


def require_acpica() -> None:
    for tool in ("iasl", "acpiexec"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is missing: apt-get install acpica-tools (deps/debian-packages.txt)"
            )


def st_info(st8: int | None, st16: int | None, *, ph_ignore: bool = False) -> int:
    """The u64 of Linux's union st_info, from its documented bit positions."""
    raw = 0
    if st8 is not None:
        raw |= 1 | st8 << 8
    if st16 is not None:
        raw |= 2 | st16 << 16
    if ph_ignore:
        raw |= 4
    return raw


def _buf(raw: int) -> str:
    return "Buffer (0x08) { " + ", ".join(f"0x{b:02X}" for b in raw.to_bytes(8, "little")) + " }"


@dataclass
class Bridge:
    name: str  # under \_SB
    answers: Mapping[int, str]  # UID -> ASL expression returned for function 0xF
    function0: str = "Buffer (0x02) { 0x01, 0x80 }"
    hid: str = 'EisaId ("PNP0A08")'
    cid: str | None = 'EisaId ("PNP0A03")'
    uid: int = 0
    bus: int = 0
    extra: str = ""  # more ASL inside the device
    uid_decl: str | None = None  # None: Name (_UID, uid); "" for none (extra declares it)

    @classmethod
    def with_tags(cls, name: str, tags: Mapping[int, int], **kw: object) -> Bridge:
        return cls(name, {uid: _buf(raw) for uid, raw in tags.items()}, **kw)  # type: ignore[arg-type]

    def asl(self) -> str:
        cid = f"        Name (_CID, {self.cid})\n" if self.cid else ""
        uid = f"        Name (_UID, {self.uid:#x})\n" if self.uid_decl is None else self.uid_decl
        answers = "\n".join(
            f"                    If ((Local0 == {uid:#x})) {{ Return ({expr}) }}"
            for uid, expr in self.answers.items()
        )
        return f"""\
    Device (\\_SB.{self.name})
    {{
        Name (_HID, {self.hid})
{cid}{uid}        Name (_SEG, Zero)
        Name (_BBN, {self.bus:#x})
{self.extra}
        Method (_DSM, 4, Serialized)
        {{
            If ((Arg0 == ToUUID ("{GUID}")))
            {{
                If ((Arg2 == Zero))
                {{
                    Return ({self.function0})
                }}
                If ((Arg2 == 0x0F))
                {{
                    Local0 = DerefOf (Arg3 [One])
{answers}
                    Return (Buffer (0x08) {{}})
                }}
            }}
            Return (Buffer (One) {{ 0x00 }})
        }}
    }}
"""


@dataclass(frozen=True)
class MadtCpu:
    uid: int
    apic_id: int
    enabled: bool = True
    x2apic: bool = False


@dataclass
class Firmware:
    bridges: Sequence[Bridge]
    cpus: Sequence[MadtCpu]
    extra: str = ""  # more ASL at the DSDT's top level
    ssdts: Sequence[str] = field(default_factory=list)  # bodies of extra SSDTs

    def dsdt_asl(self) -> str:
        procs = "\n".join(
            f'    Device (\\_SB.C{i:03X}) {{ Name (_HID, "ACPI0007") Name (_UID, {c.uid:#x}) }}'
            for i, c in enumerate(self.cpus)
        )
        body = "\n".join(b.asl() for b in self.bridges)
        return (
            'DefinitionBlock ("", "DSDT", 2, "TPHTST", "FWTAGS", 0x00000001)\n{\n'
            f"{procs}\n{body}\n{self.extra}\n}}\n"
        )

    def madt_source(self) -> str:
        head = """\
[0004]                          Signature : "APIC"
[0004]                       Table Length : 00000000
[0001]                           Revision : 05
[0001]                           Checksum : 00
[0006]                             Oem ID : "TPHTST"
[0008]                       Oem Table ID : "FWMADT  "
[0004]                       Oem Revision : 00000001
[0004]                    Asl Compiler ID : "INTL"
[0004]              Asl Compiler Revision : 20200925

[0004]                 Local Apic Address : FEE00000
[0004]              Flags (decoded below) : 00000001
                      PC-AT Compatibility : 1
"""
        entries = []
        for c in self.cpus:
            if c.x2apic:
                entries.append(f"""
[0001]                      Subtable Type : 09 [Processor Local x2APIC]
[0001]                             Length : 10
[0002]                           Reserved : 0000
[0004]                Processor x2Apic ID : {c.apic_id:08X}
[0004]              Flags (decoded below) : {int(c.enabled):08X}
                        Processor Enabled : {int(c.enabled)}
[0004]                      Processor UID : {c.uid:08X}
""")
            else:
                entries.append(f"""
[0001]                      Subtable Type : 00 [Processor Local APIC]
[0001]                             Length : 08
[0001]                       Processor ID : {c.uid:02X}
[0001]                      Local Apic ID : {c.apic_id:02X}
[0004]              Flags (decoded below) : {int(c.enabled):08X}
                        Processor Enabled : {int(c.enabled)}
                   Runtime Online Capable : 0
""")
        entries.append("""
[0001]                      Subtable Type : 01 [I/O APIC]
[0001]                             Length : 0C
[0001]                        I/O Apic ID : 00
[0001]                           Reserved : 00
[0004]                            Address : FEC00000
[0004]                          Interrupt : 00000000
""")
        return head + "".join(entries)

    def write(self, directory: Path) -> Path:
        """Compile the tables into ``directory`` as ``acpidump -b`` names them."""
        directory.mkdir(parents=True, exist_ok=True)
        compile_asl(self.dsdt_asl(), directory / "dsdt.dat")
        compile_asl(self.madt_source(), directory / "apic.dat")
        for i, body in enumerate(self.ssdts, 1):
            src = f'DefinitionBlock ("", "SSDT", 2, "TPHTST", "FWSSDT{i}", 1)\n{{\n{body}\n}}\n'
            compile_asl(src, directory / f"ssdt{i}.dat")
        return directory


def compile_asl(source: str, out: Path) -> Path:
    """Compile ASL (or a data table source) with iasl into ``out``."""
    work = out.parent / f".{out.name}.src"
    work.mkdir(exist_ok=True)
    src = work / "t.asl"
    src.write_text(source)
    run = subprocess.run(
        ["iasl", "-p", str(work / "t"), str(src)], capture_output=True, text=True, timeout=60
    )
    aml = work / "t.aml"
    if run.returncode != 0 or not aml.exists():
        raise AssertionError(f"iasl failed:\n{run.stdout}\n{run.stderr}\n{source}")
    aml.replace(out)
    shutil.rmtree(work)
    return out


def guest_like_dsdt(out: Path, *, hid: str = "PNP0A08", with_dsm: bool = False) -> Path:
    """A DSDT shaped like QEMU's: revision 1 (32-bit integers), \\_SB.PCI0 with _OSC/EDSM
    (q35/i440fx, no _DSM) or with a _DSM of its own (the gpex host bridge)."""
    dsm = (
        f"""
        Method (_DSM, 4, NotSerialized)
        {{
            If ((Arg0 == ToUUID ("{GUID}")))
            {{
                If ((Arg2 == Zero)) {{ Return (Buffer (One) {{ 0x01 }}) }}
            }}
            Return (Buffer (One) {{ 0x00 }})
        }}"""
        if with_dsm
        else """
        Method (EDSM, 5, Serialized) { Return (Buffer (One) { 0x00 }) }"""
    )
    src = f"""DefinitionBlock ("", "DSDT", 1, "BOCHS ", "BXPCDSDT", 0x00000001)
{{
    Scope (\\_SB)
    {{
        Device (PCI0)
        {{
            Name (_HID, EisaId ("{hid}"))
            Name (_CID, EisaId ("PNP0A03"))
            Name (_ADR, Zero)
            Name (_UID, Zero){dsm}
        }}
    }}
}}
"""
    return compile_asl(src, out)


def _buffer_in(lines: Sequence[str]) -> bytes | None:
    for i, line in enumerate(lines):
        m = re.search(r"\[Buffer\] Length ([0-9A-F]+) =(.*)$", line)
        if m is None:
            continue
        data = b""
        for row in [m[2], *lines[i + 1 :]]:
            hexrow = re.match(r"\s*[0-9A-F]{4}: ((?:[0-9A-F]{2} )+)", row)
            if hexrow is None:
                if data or row.strip():
                    break
                continue
            data += bytes.fromhex(hexrow[1])
        return data[: int(m[1], 16)]
    return None


def acpiexec_buffers(tables: Sequence[Path], commands: Sequence[str]) -> list[bytes | None]:
    """Run ``evaluate`` commands in acpiexec's batch mode (in order, a few per run: a batch
    line holds at most 1023 characters); the buffer each returns (None: none)."""
    out: list[bytes | None] = []
    for at in range(0, len(commands), 8):
        chunk = commands[at : at + 8]
        run = subprocess.run(
            ["acpiexec", "-b", ";".join(chunk), *map(str, tables)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        blocks: list[list[str]] = []
        for line in run.stdout.splitlines():
            if line.startswith("Evaluating "):
                blocks.append([])
            elif blocks:
                blocks[-1].append(line)
        assert len(blocks) == len(chunk), run.stdout[-2000:]
        out += [_buffer_in(b) for b in blocks]
    return out


def acpiexec_buffer(tables: Sequence[Path], command: str) -> bytes | None:
    return acpiexec_buffers(tables, [command])[0]
