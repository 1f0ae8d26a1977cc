"""Loading a host's ACPI tables: a directory of binary tables, each named by its own header.

The directory is ``/sys/firmware/acpi/tables`` on a live host (root only) or one written by
``acpidump -b`` (``dsdt.dat``, ``ssdt1.dat``, ``apic.dat``, ...). A file's signature is read
from its header, never guessed from its name. AML tables (the DSDT and every SSDT) go to
``acpiexec``; the MADT ("APIC") lists the processors and their ACPI processor UIDs.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from ..errors import LayoutError
from ..layouts import ACPI_TABLE_HEADER, parse_struct
from .errors import AcpiError

__all__ = ["HEADER_SIZE", "LIVE_TABLES", "AcpiTable", "TableSet", "load_tables"]

LIVE_TABLES = Path("/sys/firmware/acpi/tables")
HEADER_SIZE = ACPI_TABLE_HEADER.sizeof()
MAX_TABLE = 64 << 20  # the largest real DSDTs are a few MiB
_AML_SIGNATURES = ("DSDT", "SSDT")


def _offset_of(name: str) -> int:
    names = [sc.name for sc in ACPI_TABLE_HEADER.subcons]
    return sum(sc.sizeof() for sc in ACPI_TABLE_HEADER.subcons[: names.index(name)])


_CHECKSUM_OFFSET = _offset_of("checksum")


@dataclass(frozen=True)
class AcpiTable:
    path: Path
    signature: str
    oem_id: str
    oem_table_id: str
    revision: int
    data: bytes
    checksum_ok: bool

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class TableSet:
    source: Path
    tables: tuple[AcpiTable, ...]

    @property
    def dsdt(self) -> AcpiTable:
        return next(t for t in self.tables if t.signature == "DSDT")

    @property
    def aml(self) -> tuple[AcpiTable, ...]:
        """The DSDT, then the SSDTs, in file-name order: what the firmware hands the OS."""
        ssdts = sorted((t for t in self.tables if t.signature == "SSDT"), key=_name_order)
        return (self.dsdt, *ssdts)

    @property
    def madt(self) -> AcpiTable | None:
        return next((t for t in self.tables if t.signature == "APIC"), None)

    @property
    def bad_checksums(self) -> tuple[AcpiTable, ...]:
        return tuple(t for t in self.tables if not t.checksum_ok)

    def aml_files(self, scratch: Path) -> list[Path]:
        """The AML tables as files acpiexec loads: a table with a bad checksum is copied
        into ``scratch`` with its checksum corrected, since acpiexec refuses it where Linux
        only warns and uses it."""
        out = []
        for t in self.aml:
            if t.checksum_ok:
                out.append(t.path)
                continue
            data = bytearray(t.data)
            data[_CHECKSUM_OFFSET] = (data[_CHECKSUM_OFFSET] - sum(data)) % 256
            copy = scratch / t.name
            copy.write_bytes(bytes(data))
            out.append(copy)
        return out


def _name_order(table: AcpiTable) -> tuple[int, str]:
    digits = "".join(c for c in table.name if c.isdigit())
    return (int(digits) if digits else 0, table.name)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", errors="replace")


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TABLE + 1)
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.EACCES, errno.EPERM):
            hint = (
                ": the firmware's tables are readable by root only; run as root, or dump them "
                "as root with 'acpidump -b' and pass that directory with --tables"
            )
        raise AcpiError(f"cannot read {path}: {exc.strerror or exc}{hint}") from exc
    if len(data) > MAX_TABLE:
        raise AcpiError(f"{path}: larger than {MAX_TABLE >> 20} MiB, not an ACPI table")
    return data


def parse_table(path: Path, data: bytes) -> AcpiTable:
    """One table from its bytes; :class:`AcpiError` naming the file when the header is wrong."""
    if len(data) < HEADER_SIZE:
        raise AcpiError(
            f"{path}: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte ACPI table header"
        )
    try:
        header = parse_struct(ACPI_TABLE_HEADER, data[:HEADER_SIZE], str(path))
    except LayoutError as exc:
        raise AcpiError(str(exc)) from exc
    signature = bytes(header.signature)
    if not all(0x20 < b < 0x7F for b in signature):
        raise AcpiError(f"{path}: not an ACPI table (signature bytes {signature.hex()})")
    if header.length != len(data):
        raise AcpiError(
            f"{path}: the {signature.decode()} header says {header.length} bytes, the file has "
            f"{len(data)} (truncated or not a table dump)"
        )
    return AcpiTable(
        path=path,
        signature=signature.decode(),
        oem_id=_text(bytes(header.oem_id)),
        oem_table_id=_text(bytes(header.oem_table_id)),
        revision=header.revision,
        data=data,
        checksum_ok=sum(data) % 256 == 0,
    )


def load_tables(directory: Path) -> TableSet:
    """Every table file directly in ``directory`` (subdirectories are not tables)."""
    if not directory.is_dir():
        raise AcpiError(f"{directory}: not a directory of ACPI tables")
    try:
        files = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        raise AcpiError(f"cannot list {directory}: {exc.strerror or exc}") from exc
    tables = tuple(parse_table(p, _read(p)) for p in files)
    dsdts = [t for t in tables if t.signature == "DSDT"]
    if not dsdts:
        raise AcpiError(f"{directory}: no DSDT among its {len(tables)} files")
    if len(dsdts) > 1:
        names = ", ".join(t.name for t in dsdts)
        raise AcpiError(f"{directory}: more than one DSDT ({names})")
    return TableSet(directory, tables)


def is_aml(table: AcpiTable) -> bool:
    return table.signature in _AML_SIGNATURES
