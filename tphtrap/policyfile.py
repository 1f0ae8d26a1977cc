"""YAML policy files -> :class:`~tphtrap.policy.Policy`, with every problem positioned and named.

Two steps, the way yamllint splits its linter and its rules:

1. :mod:`tphtrap.policyread`, the positioned reader, composes the YAML (never constructing it),
   checks the shape and builds a draft that keeps the node of every value;
2. :mod:`tphtrap.policycheck`, the check units, judge what the draft means and report at its
   nodes: one small function per rule id.

Each problem carries the ``line:column`` of the node at fault, a kebab-case rule id and a
breadcrumb path, and every problem in a file is reported in one pass. ``policy check --host``
and ``--libvirt`` add the units that compare the policy with the machine and its domains
(:func:`check_against`). The format and every rule id are documented in ``docs/policy.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .errors import PolicyError, Problem
from .policy import MAX_CPUS, Policy
from .policy import parse_cpulist as parse_policy_cpulist
from .policycheck import MACHINE_RULES, Context, Scope, run_checks
from .policycheck import RULES as CHECK_RULES
from .policyread import (
    MAX_VCPUS,
    POLICY_VERSION,
    READ_RULES,
    PolicyDraft,
    SteeringEntry,
    read_draft,
    read_steering_tags,
)

if TYPE_CHECKING:
    from .hostscan import HostFacts
    from .libvirt import Domain

__all__ = [
    "MACHINE_RULES",
    "MAX_CPUS",
    "MAX_VCPUS",
    "POLICY_VERSION",
    "RULES",
    "check_against",
    "check_policy_text",
    "load_policy",
    "load_policy_text",
    "parse_policy_cpulist",
    "read_policy",
    "read_policy_text",
    "read_tags",
]

MAX_POLICY_BYTES: Final = 16 << 20  # policy files are read whole; no policy comes near this

#: Every rule id ``policy check FILE`` reports, with a one-line summary (docs/policy.md has the
#: details); ``--host`` and ``--libvirt`` add :data:`MACHINE_RULES`.
RULES: Final[Mapping[str, str]] = {**READ_RULES, **CHECK_RULES}


def _read(
    text: str,
    name: str,
    machine: HostFacts | None = None,
    domains: Sequence[Domain] = (),
) -> tuple[PolicyDraft | None, list[Problem]]:
    draft, out = read_draft(text, name)
    if draft is None:
        return None, sorted(out.problems)
    scopes: tuple[Scope, ...] = ("policy",)
    if machine is not None:
        scopes += ("host",)
    if domains:
        scopes += ("libvirt",)
    run_checks(Context(draft, out, machine, domains), scopes)
    return draft, sorted(out.problems)


def read_policy_text(text: str, name: str = "<policy>") -> tuple[Policy | None, list[Problem]]:
    """Read a policy: the Policy (None if any error) and every problem, in position order."""
    draft, problems = _read(text, name)
    if draft is None or any(p.level == "error" for p in problems) or not draft.version_ok:
        return None, problems
    vms = {vm.name: vm.model() for vm in draft.vms}
    return Policy(draft.host_model(), vms, name), problems


def _read_file(path: str | Path) -> tuple[str | None, list[Problem]]:
    """The text of a policy file, or the ``unreadable`` problem."""
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)  # bounded: a path like /dev/zero never ends
    except OSError as exc:
        return None, [Problem(1, 1, "unreadable", f"cannot read: {exc.strerror or exc}", "", name)]
    except ValueError as exc:  # a NUL byte or a lone surrogate in the path
        return None, [Problem(1, 1, "unreadable", f"cannot read: {exc}", "", name)]
    if len(data) > MAX_POLICY_BYTES:
        message = f"larger than {MAX_POLICY_BYTES >> 20} MiB: not a policy"
        return None, [Problem(1, 1, "unreadable", message, "", name)]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        return None, [Problem(line, column, "unreadable", "not UTF-8 text", "", name)]


def read_policy(path: str | Path) -> tuple[Policy | None, list[Problem]]:
    """:func:`read_policy_text` for a file; an unreadable file is an ``unreadable`` problem."""
    text, problems = _read_file(path)
    if text is None:
        return None, problems
    return read_policy_text(text, str(path))


def check_against(
    path: str | Path,
    machine: HostFacts | None = None,
    domains: Sequence[Domain] = (),
) -> list[Problem]:
    """Every problem of a policy file, and of the policy against a host and libvirt domains."""
    text, problems = _read_file(path)
    if text is None:
        return problems
    return _read(text, str(path), machine, domains)[1]


def read_tags(path: str | Path) -> tuple[list[SteeringEntry], list[Problem]]:
    """The steering tags in a ``tphtrap acpi host`` output file, and its problems."""
    text, problems = _read_file(path)
    if text is None:
        return [], problems
    entries, out = read_steering_tags(text, str(path))
    return entries, sorted(out.problems)


def check_policy_text(
    text: str,
    name: str = "<policy>",
    machine: HostFacts | None = None,
    domains: Sequence[Domain] = (),
) -> list[Problem]:
    """Every problem in a policy, errors and warnings, in position order; with ``machine``
    and ``domains``, also the problems of the policy against them."""
    if machine is None and not domains:
        return read_policy_text(text, name)[1]
    return _read(text, name, machine, domains)[1]


def load_policy_text(text: str, name: str = "<policy>") -> Policy:
    """The Policy a text describes; raises PolicyError listing every error."""
    policy, problems = read_policy_text(text, name)
    return _or_raise(policy, problems)


def load_policy(path: str | Path) -> Policy:
    """The Policy in a file; raises PolicyError listing every error."""
    policy, problems = read_policy(path)
    return _or_raise(policy, problems)


def _or_raise(policy: Policy | None, problems: list[Problem]) -> Policy:
    if policy is None:
        raise PolicyError([p for p in problems if p.level == "error"] or problems)
    return policy
