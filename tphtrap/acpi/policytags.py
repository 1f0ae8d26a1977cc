"""Comparing a policy's ``host.steering_tags`` with what the host's firmware reports.

``tphtrap policy check --tables DIR`` adds these warnings, each at the ``steering_tags`` key
(the cpulist) it is about:

* ``tags-not-from-firmware``: the policy gives CPUs tags the firmware never answered for them,
* ``cpu-unknown-to-firmware``: the policy names CPUs the firmware has no answer for,
* ``firmware-reports-no-tags``: the firmware reports no usable tag at all, so every tag in the
  policy is made up (at ``host.steering_tags``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from ..errors import Problem
from ..policy import Policy, format_cpulist, parse_cpulist
from .host import HostReport

__all__ = ["RULES", "firmware_problems"]

RULES = {
    "tags-not-from-firmware": "CPUs whose tags differ from the firmware's _DSM answers",
    "cpu-unknown-to-firmware": "CPUs the firmware's tables do not answer for",
    "firmware-reports-no-tags": "the firmware reports no steering tags at all",
}


def _child(node: Node | None, key: str) -> tuple[ScalarNode, Node] | None:
    if not isinstance(node, MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return k, v
    return None


def _entries(text: str) -> tuple[tuple[int, int], list[tuple[ScalarNode, frozenset[int]]]]:
    """The position of host.steering_tags and each of its keys with the CPUs it names."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)  # the policy loaded: it composes
    host = _child(root, "host")
    tags = _child(host[1] if host else None, "steering_tags")
    if tags is None:
        return (1, 1), []
    key, value = tags
    out = []
    if isinstance(value, MappingNode):
        for k, _ in value.value:
            if isinstance(k, ScalarNode):
                out.append((k, parse_cpulist(k.value)))
    return (key.start_mark.line + 1, key.start_mark.column + 1), out


def _pair(st8: int | None, st16: int | None) -> str:
    a = "null" if st8 is None else f"{st8:#04x}"
    b = "null" if st16 is None else f"{st16:#06x}"
    return f"{{st8: {a}, st16: {b}}}"


def firmware_problems(path: str, policy: Policy, report: HostReport) -> list[Problem]:
    """Warnings where ``policy`` (read from ``path``) disagrees with the firmware."""
    text = Path(path).read_text(encoding="utf-8")
    (line, col), entries = _entries(text)
    failure = report.failure()
    firmware = report.tags()
    if failure is not None and not any(p != (None, None) for p in firmware.values()):
        return [
            Problem(
                line,
                col,
                "firmware-reports-no-tags",
                f"{failure}; every tag in this policy is made up ({report.source})",
                path="host.steering_tags",
                file=path,
                level="warning",
            )
        ]
    out: list[Problem] = []
    for key, cpus in entries:
        differ: dict[tuple[tuple[int | None, int | None], ...], list[int]] = {}
        unknown = []
        for cpu in sorted(cpus):
            mine = policy.host.steering_tags.get(cpu)
            if mine is None:
                continue
            if cpu not in firmware:
                unknown.append(cpu)
                continue
            if (mine.st8, mine.st16) != firmware[cpu]:
                differ.setdefault(((mine.st8, mine.st16), firmware[cpu]), []).append(cpu)
        where = {"path": f"host.steering_tags.{key.value}", "file": path, "level": "warning"}
        kline, kcol = key.start_mark.line + 1, key.start_mark.column + 1
        for (mine_pair, fw_pair), which in differ.items():
            out.append(
                Problem(
                    kline,
                    kcol,
                    "tags-not-from-firmware",
                    f"CPUs {format_cpulist(which)}: the policy gives {_pair(*mine_pair)}, the "
                    f"firmware reports {_pair(*fw_pair)} (tphtrap acpi host)",
                    **where,
                )
            )
        if unknown:
            out.append(
                Problem(
                    kline,
                    kcol,
                    "cpu-unknown-to-firmware",
                    f"CPUs {format_cpulist(unknown)}: the firmware's tables give no trusted "
                    f"answer for them ({report.source})",
                    **where,
                )
            )
    return out
