"""``acpi host``'s probe: every host bridge's TPH ``_DSM``, asked about every CPU's UID.

The probe only gathers answers; :class:`HostReport` says what they mean for a policy (tags
per CPU, bridges that disagree, answers that read simulated hardware) and :mod:`.hostreport`
prints them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..policy import format_cpulist
from .acpiexec import evaluate_commands
from .cpus import CpuUid, cpus_from_madt, cpus_from_sysfs
from .dsm import (
    TPH_ST_FUNCTION,
    StInfo,
    describe_mask,
    dsm_command,
    function_mask,
    offers_tph,
    st_info_answer,
)
from .errors import AcpiError
from .namespace import HostBridge, find_host_bridges
from .tables import LIVE_TABLES, load_tables

__all__ = ["BridgeAnswer", "CpuAnswer", "HostReport", "probe_host", "probe_tables"]


@dataclass(frozen=True)
class BridgeAnswer:
    """A host bridge and what its function 0 said."""

    bridge: HostBridge
    mask: int | None
    problem: str | None  # why function 0xF is not used on it
    regions: tuple[str, ...]

    @property
    def offers_tph(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class CpuAnswer:
    cpu: int
    uid: int
    bridge: str
    info: StInfo | None
    problem: str | None  # why there are no tags
    regions: tuple[str, ...]  # operation region accesses while answering (simulated hardware)


@dataclass(frozen=True)
class HostReport:
    tables: tuple[str, ...]  # DSDT and SSDT file names evaluated
    source: str
    cpus: tuple[CpuUid, ...]
    cpu_source: str
    bridges: tuple[BridgeAnswer, ...]
    answers: tuple[CpuAnswer, ...]
    notes: tuple[str, ...]

    @property
    def answering(self) -> tuple[BridgeAnswer, ...]:
        return tuple(b for b in self.bridges if b.offers_tph)

    def per_cpu(self) -> dict[int, list[CpuAnswer]]:
        out: dict[int, list[CpuAnswer]] = {}
        for a in self.answers:
            out.setdefault(a.cpu, []).append(a)
        return out

    def hardware_dependent(self) -> list[CpuAnswer]:
        return [a for a in self.answers if a.regions]

    def disagreements(self) -> dict[int, list[CpuAnswer]]:
        """CPUs for which the answering bridges give different volatile-memory tags."""
        return {
            cpu: answers
            for cpu, answers in self.per_cpu().items()
            if len({_tag_pair(a) for a in answers}) > 1
        }

    def tags(self) -> dict[int, tuple[int | None, int | None]]:
        """CPU -> (st8, st16), for CPUs whose answer is trusted and the same on every bridge."""
        disagree = self.disagreements()
        out = {}
        for cpu, answers in self.per_cpu().items():
            if cpu in disagree or any(a.regions for a in answers):
                continue
            out[cpu] = _tag_pair(answers[0])
        return out

    def failure(self) -> str | None:
        """Why the answers cannot go into a policy as they are; None when they can."""
        if not self.bridges:
            return (
                "this firmware reports no steering tags: TPH cannot be used safely on this "
                "host (its tables declare no PCI host bridge, PNP0A08 or PNP0A03)"
            )
        if not self.answering:
            why = "; ".join(f"{b.bridge.path}: {b.problem}" for b in self.bridges)
            return (
                "this firmware reports no steering tags: TPH cannot be used safely on this "
                f"host (no host bridge's _DSM offers function {TPH_ST_FUNCTION:#x}: {why})"
            )
        valid = [c for c, (s8, s16) in self.tags().items() if s8 is not None or s16 is not None]
        disagree = self.disagreements()
        probed = [b for b in self.answering if b.regions]
        if probed:
            return (
                f"function 0 of {probed[0].bridge.path}'s _DSM read an operation region "
                "(hardware registers or memory) that acpiexec only simulates offline, so "
                f"whether it offers steering tags is not known: {probed[0].regions[0]}"
            )
        hardware = self.hardware_dependent()
        if hardware:
            cpus = format_cpulist({a.cpu for a in hardware})
            return (
                f"the answers for CPUs {cpus} read operation regions (hardware registers or "
                "memory) that acpiexec only simulates offline, so they are not the firmware's "
                f"real tags: {hardware[0].regions[0]}; they are left out"
            )
        if disagree:
            cpus = format_cpulist(disagree)
            first = disagree[min(disagree)]
            said = ", ".join(f"{a.bridge} {_pair_text(_tag_pair(a))}" for a in first)
            return (
                f"the host bridges disagree on the tags of CPUs {cpus} (CPU {min(disagree)}: "
                f"{said}): a policy has one tag pair per CPU, valid for devices under any "
                "bridge; list only the bridges your devices sit under with --bridge, and if "
                "those disagree too this host cannot be described by a policy"
            )
        if not valid:
            return (
                "this firmware reports no steering tags: TPH cannot be used safely on this "
                "host (function 0xF answers no valid tag for any CPU)"
            )
        return None


def _tag_pair(a: CpuAnswer) -> tuple[int | None, int | None]:
    return (a.info.st8, a.info.st16) if a.info is not None else (None, None)


def _pair_text(pair: tuple[int | None, int | None]) -> str:
    s8, s16 = pair
    return f"st8 {'-' if s8 is None else f'{s8:#04x}'} st16 {'-' if s16 is None else f'{s16:#06x}'}"


def _bridge_answers(
    aml: Sequence[Path], bridges: Sequence[HostBridge], timeout: float
) -> list[BridgeAnswer]:
    commands = [dsm_command(b.path, 0) for b in bridges]
    _, evals = evaluate_commands(
        aml, commands, what="asking the host bridges' _DSM function 0", timeout=timeout
    )
    out = []
    for bridge, ev in zip(bridges, evals, strict=True):
        mask = function_mask(ev.value) if ev.ok else None
        if ev.status == "AE_NOT_FOUND":
            problem = "no _DSM method"
        elif not ev.ok:
            problem = f"_DSM function 0 failed ({ev.status})"
        elif not offers_tph(mask):
            problem = f"function 0 returned {describe_mask(mask)}"
        else:
            problem = None
        out.append(BridgeAnswer(bridge, mask, problem, ev.regions))
    return out


def _cpu_answers(
    aml: Sequence[Path], bridges: Sequence[BridgeAnswer], cpus: Sequence[CpuUid], timeout: float
) -> list[CpuAnswer]:
    asked = [(b.bridge.path, c) for b in bridges if b.offers_tph for c in cpus]
    commands = [dsm_command(path, TPH_ST_FUNCTION, c.uid) for path, c in asked]
    if not commands:
        return []
    _, evals = evaluate_commands(
        aml, commands, what=f"asking _DSM function {TPH_ST_FUNCTION:#x}", timeout=timeout
    )
    out = []
    for (path, c), ev in zip(asked, evals, strict=True):
        if ev.ok:
            info, problem = st_info_answer(ev.value if ev.returned else None)
        else:
            info, problem = None, f"function {TPH_ST_FUNCTION:#x} failed ({ev.status})"
        out.append(CpuAnswer(c.cpu, c.uid, path, info, problem, ev.regions))
    return out


def probe_host(
    aml: Sequence[Path],
    cpus: Sequence[CpuUid],
    *,
    source: str,
    cpu_source: str,
    only_bridges: Sequence[str] = (),
    notes: Sequence[str] = (),
    timeout: float,
) -> HostReport:
    """Ask every host bridge (or only ``only_bridges``) about every CPU, as Linux would."""
    bridges = find_host_bridges(aml, timeout=timeout)
    if only_bridges:
        known = {b.path for b in bridges}
        unknown = [p for p in only_bridges if p not in known]
        if unknown:
            raise AcpiError(
                f"--bridge {unknown[0]}: not a PCI host bridge of these tables (they have "
                f"{', '.join(sorted(known)) or 'none'})"
            )
        bridges = [b for b in bridges if b.path in set(only_bridges)]
    answers = _bridge_answers(aml, bridges, timeout) if bridges else []
    per_cpu = _cpu_answers(aml, answers, cpus, timeout)
    return HostReport(
        tables=tuple(p.name for p in aml),  # copies keep their file names
        source=source,
        cpus=tuple(cpus),
        cpu_source=cpu_source,
        bridges=tuple(answers),
        answers=tuple(per_cpu),
        notes=tuple(notes),
    )


def probe_tables(
    directory: Path | None, *, only_bridges: Sequence[str] = (), timeout: float
) -> HostReport:
    """Probe a directory of tables (``acpidump -b``), or the live host's when None.

    Offline the CPUs are the MADT's; on the live host they are matched through sysfs.
    """
    live = directory is None or directory.resolve() == LIVE_TABLES
    tables = load_tables(LIVE_TABLES if directory is None else directory)
    madt = tables.madt
    if live:
        cpus = cpus_from_sysfs(madt)
        cpu_source = "from the MADT by APIC ID (/proc/cpuinfo), else the CPU's ACPI _UID"
    else:
        if madt is None:
            raise AcpiError(
                f"{tables.source}: no MADT (APIC table) among the tables: it lists the CPUs' "
                "ACPI processor UIDs ('acpidump -b' writes it as apic.dat)"
            )
        cpus = cpus_from_madt(madt)
        cpu_source = f"from the MADT ({madt.name}), CPUs numbered in its order"
    notes = [
        f"{t.name} has a bad checksum (Linux warns and uses it all the same)"
        for t in tables.bad_checksums
    ]
    with tempfile.TemporaryDirectory(prefix="tphtrap-acpi-") as scratch:
        return probe_host(
            tables.aml_files(Path(scratch)),
            cpus,
            source=str(tables.source),
            cpu_source=cpu_source,
            only_bridges=only_bridges,
            notes=notes,
            timeout=timeout,
        )
