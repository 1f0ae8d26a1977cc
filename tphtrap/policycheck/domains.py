"""``policy check --libvirt``: the policy against the VMs' libvirt domains (drift).

A domain is matched to the VM of the same name. Its vCPUs must run inside the VM's ``cpus``
(else the policy no longer describes where the VM runs), a translating VM's ``vcpus`` must be
the domain's one-CPU pins, vCPU for vCPU, and its PCI hostdevs must be the VM's ``devices``.
``cpus`` may be wider than the pinning only by CPUs that share a cache tag with it (the whole
cache domain of docs/policy.md, "Several tenants on one L3").
"""

from __future__ import annotations

from ..libvirt import Domain
from ..policy import cpus_word, format_cpulist
from ..policyread import VmDraft
from ..spec import TagWidth
from .context import Context
from .registry import check


def _pairs(ctx: Context) -> list[tuple[Domain, VmDraft]]:
    by_name = {vm.name: vm for vm in ctx.vms}
    return [(d, by_name[d.name]) for d in ctx.domains if d.name in by_name]


@check("domain-not-in-policy", "a libvirt domain with no VM of its name", scope="libvirt")
def domains_known(ctx: Context) -> None:
    names = {vm.name for vm in ctx.vms}
    for dom in ctx.domains:
        if dom.name not in names:
            ctx.report(
                ctx.draft.vms_node,
                "domain-not-in-policy",
                f"domain {dom.name!r} ({dom.where(dom.name_line)}) is not a VM of this policy: "
                "tphtrap refuses every device attached to it",
                "vms",
            )


@check(
    "pinning-drift",
    "a VM's cpus or vcpus no longer match where its domain's vCPUs run",
    scope="libvirt",
)
def pinning_matches(ctx: Context) -> None:
    for dom, vm in _pairs(ctx):
        if vm.cpus is not None:
            _runs_inside(ctx, dom, vm, vm.cpus)
        if vm.vcpus is not None:
            _vcpus_match(ctx, dom, vm)


def _runs_inside(ctx: Context, dom: Domain, vm: VmDraft, cpus: frozenset[int]) -> None:
    for pin in dom.pins:
        outside = sorted(pin.cpus - cpus)
        if outside:
            ctx.at_cpus(
                vm,
                "pinning-drift",
                f"vCPU {pin.vcpu} of domain {dom.name!r} runs on {cpus_word(sorted(pin.cpus))} "
                f"({dom.where(pin.line)}, {pin.source}), but {format_cpulist(outside)} "
                f"{'is' if len(outside) == 1 else 'are'} not in the cpus of VM {vm.name!r} "
                f"({format_cpulist(cpus)}): update cpus (tphtrap policy init --libvirt shows "
                "the pinning)",
            )
            return  # one report per VM: the first vCPU that runs outside


def _vcpus_match(ctx: Context, dom: Domain, vm: VmDraft) -> None:
    assert vm.vcpus is not None
    if len(vm.vcpus) != dom.vcpus:
        ctx.report(
            vm.vcpus_node,
            "pinning-drift",
            f"VM {vm.name!r} translates {len(vm.vcpus)} vCPUs, but domain {dom.name!r} has "
            f"{dom.vcpus} ({dom.source}): vcpus must list the host CPU of every vCPU",
            f"{vm.path}.vcpus",
        )
    for (cpu, node), pin in zip(vm.vcpus, dom.pins, strict=False):
        where = f"{vm.path}.vcpus[{pin.vcpu}]"
        if len(pin.cpus) > 1:
            ctx.report(
                node,
                "pinning-drift",
                f"vCPU {pin.vcpu} of domain {dom.name!r} may run on any of "
                f"{cpus_word(sorted(pin.cpus))} ({dom.where(pin.line)}): translation needs "
                f"each vCPU pinned to one CPU, and vcpus[{pin.vcpu}] says {cpu}",
                where,
            )
        elif cpu not in pin.cpus:
            ctx.report(
                node,
                "pinning-drift",
                f"vCPU {pin.vcpu} of domain {dom.name!r} runs on CPU {min(pin.cpus)} "
                f"({dom.where(pin.line)}), but vcpus[{pin.vcpu}] is {cpu}: its virtual tag would "
                f"steer to CPU {cpu}",
                where,
            )


def _cache_mates(ctx: Context, cpus: frozenset[int]) -> frozenset[int]:
    """``cpus`` and every CPU sharing a steering tag with one of them."""
    out = set(cpus)
    host = ctx.host
    for width in TagWidth:
        owners = host.owners(width)
        for cpu in cpus:
            tags = host.steering_tags.get(cpu)
            tag = tags.tag(width) if tags is not None else None
            if tag is not None:
                out |= owners[tag]
    return frozenset(out)


@check(
    "cpus-beyond-pinning",
    "VM cpus where its domain never runs and that share no cache tag with its vCPUs (warning)",
    scope="libvirt",
)
def cpus_within_pinning(ctx: Context) -> None:
    runs = {d.name: d.cpus for d in ctx.domains}
    for dom, vm in _pairs(ctx):
        if vm.cpus is None or not ctx.tags_complete(vm) or not (dom.cpus <= vm.cpus):
            continue
        extra = sorted(vm.cpus - _cache_mates(ctx, dom.cpus))
        if not extra:
            continue
        others = sorted(n for n, c in runs.items() if n != dom.name and c & set(extra))
        also = f"; domain {', '.join(others)} runs there" if others else ""
        ctx.at_cpus(
            vm,
            "cpus-beyond-pinning",
            f"{cpus_word(extra)} {'is' if len(extra) == 1 else 'are'} in the cpus of VM "
            f"{vm.name!r}, but no vCPU of domain {dom.name!r} runs there or on a CPU sharing "
            f"their cache tags ({dom.source}){also}: its devices may steer to caches it does "
            "not use",
            "warning",
        )


@check(
    "hostdev-not-in-policy",
    "a PCI hostdev of a domain that is not among its VM's devices",
    also={"device-not-in-domain": "a device of a VM that its domain does not have (warning)"},
    scope="libvirt",
)
def devices_match(ctx: Context) -> None:
    owner = {d.bdf: vm.name for vm in ctx.vms for d in vm.devices}
    for dom, vm in _pairs(ctx):
        mine = {d.bdf for d in vm.devices}
        for dev in dom.hostdevs:
            if dev.bdf in mine:
                continue
            other = owner.get(dev.bdf)
            why = (
                f"the policy gives it to VM {other!r}"
                if other is not None
                else "tphtrap refuses to attach it"
            )
            ctx.report(
                vm.nodes.get("devices", vm.key),
                "hostdev-not-in-policy",
                f"domain {dom.name!r} is given PCI device {dev.bdf} ({dom.where(dev.line)}), "
                f"which is not a device of VM {vm.name!r}: {why}",
                f"{vm.path}.devices",
            )
        given = {d.bdf for d in dom.hostdevs}
        for d in vm.devices:
            if d.bdf not in given:
                ctx.warn(
                    d.key,
                    "device-not-in-domain",
                    f"device {d.bdf} of VM {vm.name!r} is not a PCI hostdev of domain "
                    f"{dom.name!r} ({dom.source})",
                    d.path,
                )
