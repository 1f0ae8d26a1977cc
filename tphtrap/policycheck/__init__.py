"""The meaning of a policy, checked by small units, one module per family of rules.

:mod:`tphtrap.policyread` reads the shape of a policy into a positioned draft; the units here
judge what it means and report problems at the nodes the draft keeps. Each unit is a function
registered with :func:`~tphtrap.policycheck.registry.check` under its rule id, so a new check is
one small function in the module of its family:

==============  =============================================================================
``host``        the host's steering and neutral tags
``vms``         VMs and devices across the policy: presence, CPUs' tags, sharing
``pins``        vCPU pins and fallback CPUs inside the VM's cpus
``tags``        what the ownership rule leaves each VM (owns-no-tag, neutral-only, ...)
``effect``      settings that cannot take effect
``machine``     ``policy check --host``: the policy against this host's CPUs and devices
``domains``     ``policy check --libvirt``: the policy against the VMs' libvirt domains
==============  =============================================================================
"""

from __future__ import annotations

from typing import Final

from . import domains, effect, host, machine, pins, tags, vms  # noqa: F401  (registers units)
from .context import Context
from .registry import SCOPES, Check, Scope, check, get, registered, summaries

__all__ = [
    "MACHINE_RULES",
    "RULES",
    "SCOPES",
    "Check",
    "Context",
    "Scope",
    "check",
    "get",
    "registered",
    "run_checks",
]

#: The rules of ``policy check FILE`` (the policy on its own), id -> summary.
RULES: Final = summaries(("policy",))
#: The rules of ``--host`` and ``--libvirt``, id -> summary.
MACHINE_RULES: Final = summaries(("host", "libvirt"))


def run_checks(ctx: Context, scopes: tuple[Scope, ...] = ("policy",)) -> None:
    """Run every unit of ``scopes`` on ``ctx`` (problems go to ``ctx.out``)."""
    for unit in registered():
        if unit.scope in scopes:
            unit.run(ctx)
