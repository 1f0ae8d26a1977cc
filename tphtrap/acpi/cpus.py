"""Which ACPI processor UID each CPU has: the argument Linux passes to the TPH ``_DSM``.

Offline (``--tables DIR``) the CPUs are the usable processors of the MADT, numbered in table
order as Linux numbers them. On the live host the CPUs are those of
``/sys/devices/system/cpu/present``, each matched to its MADT entry by APIC ID (from
``/proc/cpuinfo``, as Linux's own ``cpu_acpi_id()`` does on x86), or else read from the
``uid`` of its ACPI processor device (``/sys/devices/system/cpu/cpuN/firmware_node/uid``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..policy import format_cpulist, parse_cpulist
from .errors import AcpiError
from .madt import MadtProcessor, ProcessorKind, usable_processors
from .tables import AcpiTable

__all__ = ["CpuUid", "cpus_from_madt", "cpus_from_sysfs"]


@dataclass(frozen=True)
class CpuUid:
    cpu: int
    uid: int


def cpus_from_madt(madt: AcpiTable) -> list[CpuUid]:
    procs = usable_processors(madt)
    if not procs:
        raise AcpiError(f"{madt.path}: the MADT lists no enabled processor")
    return [CpuUid(cpu, p.uid) for cpu, p in enumerate(procs)]


_CPUINFO_FIELD = re.compile(r"^(processor|apicid)\s*:\s*(\d+)\s*$")


def _apic_ids(cpuinfo: Path) -> dict[int, int]:
    """CPU -> APIC ID from /proc/cpuinfo (x86 only; empty elsewhere)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return {}
    out: dict[int, int] = {}
    cpu: int | None = None
    for line in text.splitlines():
        m = _CPUINFO_FIELD.match(line)
        if m is None:
            continue
        if m[1] == "processor":
            cpu = int(m[2])
        elif cpu is not None:
            out[cpu] = int(m[2])
    return out


def _firmware_uid(cpu_dir: Path) -> int | None:
    try:
        text = (cpu_dir / "firmware_node" / "uid").read_text().strip()
    except OSError:
        return None
    return int(text, 0) if re.fullmatch(r"(0x[0-9a-fA-F]+|[0-9]+)", text) else None


def cpus_from_sysfs(
    madt: AcpiTable | None,
    sys_cpu: Path = Path("/sys/devices/system/cpu"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> list[CpuUid]:
    try:
        present = parse_cpulist((sys_cpu / "present").read_text())
    except (OSError, ValueError) as exc:
        raise AcpiError(f"cannot read the present CPUs from {sys_cpu}/present: {exc}") from exc
    by_apic: dict[int, MadtProcessor] = {}
    if madt is not None:
        for p in usable_processors(madt):
            if p.kind is not ProcessorKind.GICC:
                by_apic.setdefault(p.hw_id, p)
    apic = _apic_ids(cpuinfo)
    out: list[CpuUid] = []
    missing: list[int] = []
    for cpu in sorted(present):
        entry = by_apic.get(apic[cpu]) if cpu in apic else None
        uid = entry.uid if entry is not None else _firmware_uid(sys_cpu / f"cpu{cpu}")
        if uid is None:
            missing.append(cpu)
        else:
            out.append(CpuUid(cpu, uid))
    if missing:
        raise AcpiError(
            f"cannot find the ACPI processor UID of CPUs {format_cpulist(missing)}: no MADT "
            "entry matches their APIC ID (offline CPUs have none in /proc/cpuinfo) and "
            "their firmware_node has no uid; bring them online, or use --tables DIR"
        )
    return out
