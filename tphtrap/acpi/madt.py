"""The processors of the MADT ("APIC" table) and their ACPI processor UIDs.

Linux numbers CPUs in the order it meets usable processor entries in the MADT (x86
``acpi_parse_madt_lapic_entries`` walks Local APIC and x2APIC entries in table order; arm64
walks GICC entries), and evaluates the TPH ``_DSM`` with the entry's ACPI processor UID.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import LayoutError
from ..layouts import (
    MADT_GICC,
    MADT_HEADER,
    MADT_LOCAL_APIC,
    MADT_LOCAL_X2APIC,
    MADT_SUBTABLE_HEADER,
    parse_struct,
)
from .errors import AcpiError
from .tables import HEADER_SIZE, AcpiTable

__all__ = ["MadtProcessor", "ProcessorKind", "madt_processors", "usable_processors"]

_ENABLED = 0x1
_APIC_ONLINE_CAPABLE = 0x2  # Local APIC / x2APIC flags bit 1 (ACPI 6.3)
_GICC_ONLINE_CAPABLE = 0x8  # GICC flags bit 3 (ACPI 6.5)


class ProcessorKind(Enum):
    LOCAL_APIC = 0
    LOCAL_X2APIC = 9
    GICC = 0xB


_LAYOUTS = {
    ProcessorKind.LOCAL_APIC: MADT_LOCAL_APIC,
    ProcessorKind.LOCAL_X2APIC: MADT_LOCAL_X2APIC,
    ProcessorKind.GICC: MADT_GICC,
}


@dataclass(frozen=True)
class MadtProcessor:
    kind: ProcessorKind
    uid: int  # ACPI processor UID: what the _DSM is asked about
    hw_id: int  # APIC ID, x2APIC ID or MPIDR
    enabled: bool
    online_capable: bool
    offset: int  # of the entry in the table, for messages


def _entry(table: AcpiTable, kind: ProcessorKind, offset: int, data: bytes) -> MadtProcessor:
    layout = _LAYOUTS[kind]
    if len(data) < layout.sizeof():
        raise AcpiError(
            f"{table.path}: MADT {kind.name} entry at offset {offset:#x} is {len(data)} bytes, "
            f"shorter than {layout.sizeof()}"
        )
    try:
        e = parse_struct(layout, data[: layout.sizeof()], f"{table.path}@{offset:#x}")
    except LayoutError as exc:
        raise AcpiError(str(exc)) from exc
    if kind is ProcessorKind.LOCAL_APIC:
        hw_id, online = e.apic_id, bool(e.flags & _APIC_ONLINE_CAPABLE)
    elif kind is ProcessorKind.LOCAL_X2APIC:
        hw_id, online = e.x2apic_id, bool(e.flags & _APIC_ONLINE_CAPABLE)
    else:
        hw_id, online = e.mpidr, bool(e.flags & _GICC_ONLINE_CAPABLE)
    return MadtProcessor(kind, e.processor_uid, hw_id, bool(e.flags & _ENABLED), online, offset)


def madt_processors(table: AcpiTable) -> list[MadtProcessor]:
    """Every processor entry of the MADT, in table order (enabled or not)."""
    if table.signature != "APIC":
        raise AcpiError(f"{table.path}: a {table.signature} table, not the MADT (APIC)")
    data = table.data
    pos = HEADER_SIZE + MADT_HEADER.sizeof()
    if len(data) < pos:
        raise AcpiError(f"{table.path}: MADT shorter than its {pos}-byte header")
    out: list[MadtProcessor] = []
    kinds = {k.value: k for k in ProcessorKind}
    while pos < len(data):
        if len(data) - pos < MADT_SUBTABLE_HEADER.sizeof():
            raise AcpiError(f"{table.path}: MADT ends inside an entry header at {pos:#x}")
        sub = parse_struct(MADT_SUBTABLE_HEADER, data[pos : pos + 2], str(table.path))
        if sub.length < 2 or pos + sub.length > len(data):
            raise AcpiError(
                f"{table.path}: MADT entry at offset {pos:#x} has length {sub.length}, which "
                f"does not fit the {len(data)}-byte table"
            )
        kind = kinds.get(sub.type)
        if kind is not None:
            out.append(_entry(table, kind, pos, data[pos : pos + sub.length]))
        pos += sub.length
    return out


def usable_processors(table: AcpiTable) -> list[MadtProcessor]:
    """The enabled processors Linux brings up, in the order it numbers them.

    Like Linux on x86: Local APIC entries with APIC ID 0xFF and x2APIC entries with ID
    0xFFFFFFFF are skipped, and so are x2APIC entries below 255 when Local APIC entries exist
    (ACPI 6.5 5.2.12.12).
    """
    entries = madt_processors(table)
    has_lapic = any(e.kind is ProcessorKind.LOCAL_APIC and e.enabled for e in entries)
    out = []
    for e in entries:
        if not e.enabled:
            continue
        if e.kind is ProcessorKind.LOCAL_APIC and e.hw_id == 0xFF:
            continue
        if e.kind is ProcessorKind.LOCAL_X2APIC and (
            e.hw_id == 0xFFFFFFFF or (e.hw_id < 0xFF and has_lapic)
        ):
            continue
        out.append(e)
    return out
