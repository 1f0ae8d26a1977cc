"""vCPU pins and fallback CPUs must be CPUs of their VM."""

from __future__ import annotations

from ..policy import format_cpulist
from .context import Context
from .registry import check


@check("vcpu-outside-cpus", "a vCPU pinned to a host CPU outside the VM's cpus")
def vcpus_in_cpus(ctx: Context) -> None:
    for vm in ctx.vms:
        if vm.cpus is None:
            continue
        for i, (cpu, node) in enumerate(vm.vcpus or ()):
            if cpu not in vm.cpus:
                ctx.report(
                    node,
                    "vcpu-outside-cpus",
                    f"vCPU {i} is pinned to CPU {cpu}, which is not in the cpus of VM "
                    f"{vm.name!r} ({format_cpulist(vm.cpus)})",
                    f"{vm.path}.vcpus[{i}]",
                )


@check("fallback-not-allowed", "a fallback CPU outside cpus or whose tag the VM may not use")
def fallbacks_in_cpus(ctx: Context) -> None:
    for vm in ctx.vms:
        if vm.cpus is None:
            continue
        for where, cpu, node in vm.fallbacks():
            if cpu not in vm.cpus:
                ctx.report(
                    node,
                    "fallback-not-allowed",
                    f"fallback CPU {cpu} is not in the cpus of VM {vm.name!r} "
                    f"({format_cpulist(vm.cpus)})",
                    where,
                )
