"""The registry of check units: each is a small function with the rule ids it reports.

A unit is registered with :func:`check`::

    @check("shared-cpu", "two VMs may steer to one CPU without listing each other")
    def shared_cpus(ctx: Context) -> None:
        ...
        ctx.report(node, "shared-cpu", "...", path)

The first argument is the unit's own rule (its summary is the one-line description that
``docs/policy.md`` expands); ``also`` names the other rules a unit reports: a mapping declares
their summaries too, a tuple names rules that another unit declares.
``scope`` says what a unit needs: ``policy`` units run on every check, ``host`` units only with
``policy check --host`` (they read :attr:`Context.machine`), ``libvirt`` units only with
``--libvirt`` (:attr:`Context.domains`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from .context import Context

__all__ = ["SCOPES", "Check", "Scope", "check", "get", "registered", "summaries"]

Scope = Literal["policy", "host", "libvirt"]
SCOPES: Final[tuple[Scope, ...]] = ("policy", "host", "libvirt")


@dataclass(frozen=True)
class Check:
    name: str
    rule: str
    summary: str
    also: Mapping[str, str]  # other rules it reports -> summary ("" if declared elsewhere)
    scope: Scope
    run: Callable[[Context], None]

    @property
    def rules(self) -> tuple[str, ...]:
        return (self.rule, *self.also)

    def declared(self) -> dict[str, str]:
        """The rule summaries this unit declares."""
        out = {r: s for r, s in self.also.items() if s}
        if self.summary:
            out[self.rule] = self.summary
        return out


_CHECKS: list[Check] = []


def check(
    rule: str,
    summary: str = "",
    *,
    also: Mapping[str, str] | tuple[str, ...] = (),
    scope: Scope = "policy",
) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    """Register the decorated function as the check unit of ``rule``."""
    others = dict(also) if isinstance(also, Mapping) else dict.fromkeys(also, "")

    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        _CHECKS.append(Check(fn.__name__, rule, summary, others, scope, fn))
        return fn

    return register


def registered(scope: Scope | None = None) -> tuple[Check, ...]:
    """Every unit (of one scope), in registration order."""
    return tuple(c for c in _CHECKS if scope is None or c.scope == scope)


def summaries(scopes: tuple[Scope, ...] = SCOPES) -> Mapping[str, str]:
    """Rule id -> summary for the units of ``scopes`` (a rule declared twice must agree)."""
    out: dict[str, str] = {}
    for c in _CHECKS:
        if c.scope not in scopes:
            continue
        for rule, summary in c.declared().items():
            if out.get(rule, summary) != summary:
                raise ValueError(f"rule {rule!r} is declared with two summaries")
            out[rule] = summary
    return out


def get(rule: str) -> tuple[Check, ...]:
    """The units that report ``rule``; ValueError if none does (yamllint's ``rules.get``)."""
    found = tuple(c for c in _CHECKS if rule in c.rules)
    if not found:
        raise ValueError(f"no such rule: {rule!r}")
    return found
