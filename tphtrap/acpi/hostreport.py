"""``acpi host``'s output: a ``host.steering_tags`` block ready for a policy, or JSON.

CPUs with the same pair of tags are grouped into one cpulist; a width the firmware marks
invalid is ``null`` (the policy's "no valid tag"); CPUs with no valid tag at either width
are left out, and the comment says so.
"""

from __future__ import annotations

from typing import Any

from ..policy import format_cpulist
from .dsm import TPH_DSM_REVISION, TPH_ST_FUNCTION
from .host import HostReport

__all__ = ["render_json", "render_text", "tag_groups"]


def _hex(tag: int | None, digits: int) -> str:
    return "null" if tag is None else f"{tag:#0{digits + 2}x}"


def tag_groups(report: HostReport) -> list[tuple[str, int | None, int | None]]:
    """(cpulist, st8, st16) per distinct pair with at least one valid tag, by lowest CPU."""
    groups: dict[tuple[int | None, int | None], list[int]] = {}
    for cpu, pair in sorted(report.tags().items()):
        if pair != (None, None):
            groups.setdefault(pair, []).append(cpu)
    ordered = sorted(groups.items(), key=lambda kv: kv[1][0])
    return [(format_cpulist(cpus), s8, s16) for (s8, s16), cpus in ordered]


def _left_out(report: HostReport) -> dict[str, list[int]]:
    tags = report.tags()
    out: dict[str, list[int]] = {"no valid tag": [], "not trusted": []}
    for cpu in sorted(report.per_cpu()):
        if cpu not in tags:
            out["not trusted"].append(cpu)
        elif tags[cpu] == (None, None):
            out["no valid tag"].append(cpu)
    return out


def _problems(report: HostReport) -> list[str]:
    seen: dict[str, list[int]] = {}
    for a in report.answers:
        if a.problem is not None:
            seen.setdefault(f"{a.bridge}: {a.problem}", []).append(a.cpu)
    return [f"CPUs {format_cpulist(cpus)}: {why}" for why, cpus in seen.items()]


def render_text(report: HostReport) -> str:
    lines = [
        "# Steering tags reported by this host's firmware: PCI firmware _DSM function "
        f"{TPH_ST_FUNCTION:#x} (revision {TPH_DSM_REVISION}), volatile memory, as Linux's "
        "pcie_tph_get_cpu_st reads them.",
        f"# tables: {report.source}: {', '.join(report.tables)}",
        f"# CPUs: {format_cpulist(c.cpu for c in report.cpus)}; ACPI processor UIDs "
        f"{report.cpu_source}",
    ]
    for b in report.bridges:
        state = f"answers function {TPH_ST_FUNCTION:#x}" if b.offers_tph else f"no ({b.problem})"
        lines.append(f"# host bridge {b.bridge.describe()}: {state}")
    left = _left_out(report)
    if left["no valid tag"]:
        lines.append(
            f"# left out: CPUs {format_cpulist(left['no valid tag'])} have no valid tag at "
            "either width"
        )
    if left["not trusted"]:
        lines.append(
            f"# left out: CPUs {format_cpulist(left['not trusted'])}, whose answers are not "
            "trustworthy (see the error)"
        )
    lines += [f"# {p}" for p in _problems(report)]
    ph = sorted({a.cpu for a in report.answers if a.info is not None and a.info.ph_ignore})
    if ph:
        lines.append(
            f"# CPUs {format_cpulist(ph)}: the firmware sets 'PH ignore' (the platform ignores "
            "Processing Hints; the tag still steers)"
        )
    lines += [f"# note: {n}" for n in report.notes]
    groups = tag_groups(report)
    if groups:
        lines += ["host:", "  steering_tags:"]
        lines += [
            f"    {cpus}: {{st8: {_hex(s8, 2)}, st16: {_hex(s16, 4)}}}" for cpus, s8, s16 in groups
        ]
    return "\n".join(lines)


def render_json(report: HostReport) -> dict[str, Any]:
    failure = report.failure()
    return {
        "ok": failure is None,
        "error": failure,
        "tables": {"source": report.source, "evaluated": list(report.tables)},
        "cpu_uids_from": report.cpu_source,
        "steering_tags": {cpus: {"st8": s8, "st16": s16} for cpus, s8, s16 in tag_groups(report)},
        "left_out": {k: format_cpulist(v) for k, v in _left_out(report).items()},
        "host_bridges": [
            {
                "path": b.bridge.path,
                "ids": list(b.bridge.ids),
                "uid": b.bridge.uid,
                "segment": b.bridge.segment,
                "bus": b.bridge.bus,
                "function_mask": b.mask,
                "offers_tph": b.offers_tph,
                "problem": b.problem,
            }
            for b in report.bridges
        ],
        "cpus": [
            {
                "cpu": a.cpu,
                "uid": a.uid,
                "bridge": a.bridge,
                "raw": None if a.info is None else f"{a.info.raw:#018x}",
                "st8": None if a.info is None else a.info.st8,
                "st16": None if a.info is None else a.info.st16,
                "ph_ignore": None if a.info is None else a.info.ph_ignore,
                "pm_st8": None if a.info is None else a.info.pm_st8,
                "pm_st16": None if a.info is None else a.info.pm_st16,
                "problem": a.problem,
                "operation_regions": list(a.regions),
            }
            for a in report.answers
        ],
        "notes": list(report.notes),
    }
