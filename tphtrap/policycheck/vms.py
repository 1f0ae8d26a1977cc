"""Checks across VMs: that there are any, their devices, their CPUs' tags, what they share."""

from __future__ import annotations

from yaml.nodes import MappingNode

from ..policy import cpus_word
from ..policyread import DeviceDraft, VmDraft
from .context import Context
from .registry import check


@check("no-vms", "a policy with no VMs (warning)")
def vms_present(ctx: Context) -> None:
    if ctx.draft.vms_empty:
        ctx.warn(ctx.draft.vms_node, "no-vms", "the policy defines no VMs: every device is refused")


@check("no-devices", "a VM with no devices (warning)")
def vm_devices_present(ctx: Context) -> None:
    for vm in ctx.vms:
        devices = vm.nodes.get("devices")
        if vm.read_ok and (
            devices is None or (isinstance(devices, MappingNode) and not devices.value)
        ):
            ctx.warn(
                vm.key,
                "no-devices",
                f"VM {vm.name!r} has no devices: nothing can be attached to it",
                vm.path,
            )


@check("cpu-without-tags", "a VM CPU with no entry in host.steering_tags")
def cpus_have_tags(ctx: Context) -> None:
    if not ctx.draft.host_ok:
        return
    for vm in ctx.vms:
        if vm.cpus is None:
            continue
        missing = sorted(vm.cpus - ctx.draft.steering.keys())
        if missing:
            ctx.at_cpus(
                vm,
                "cpu-without-tags",
                f"{cpus_word(missing)} of VM {vm.name!r} "
                f"{'has' if len(missing) == 1 else 'have'} no entry in host.steering_tags (write "
                "null for a tag the firmware does not report)",
            )


@check("unknown-vm", "share_cpus_with names a VM the policy does not define", also=("no-effect",))
def shared_names_exist(ctx: Context) -> None:
    names = {vm.name for vm in ctx.vms}
    for vm in ctx.vms:
        for other, node in vm.share:
            if other == vm.name:
                ctx.warn(node, "no-effect", "a VM need not share CPUs with itself", vm.path)
            elif other not in names:
                ctx.report(
                    node,
                    "unknown-vm",
                    f"share_cpus_with names {other!r}, which is not a VM of this policy",
                    f"{vm.path}.share_cpus_with",
                )


def _consent(earlier: VmDraft, later: VmDraft) -> str | None:
    """None when both VMs list each other, else what is missing."""
    a = any(n == later.name for n, _ in earlier.share)
    b = any(n == earlier.name for n, _ in later.share)
    if a and b:
        return None
    if a or b:
        who, whom = (earlier, later) if a else (later, earlier)
        return (
            f"{who.name!r} allows it, but {whom.name!r} does not list {who.name!r} in "
            "share_cpus_with"
        )
    return "if they share those caches on purpose, list each VM in the other's share_cpus_with"


@check(
    "shared-cpu",
    "two VMs may steer to one CPU without both listing each other in share_cpus_with",
)
def shared_cpus(ctx: Context) -> None:
    for i, later in enumerate(ctx.vms):
        if later.cpus is None:
            continue
        for earlier in ctx.vms[:i]:
            common = (earlier.cpus or frozenset()) & later.cpus
            if not common:
                continue
            how = _consent(earlier, later)
            if how is None:
                continue
            they = "it is" if len(common) == 1 else "they are"
            ctx.at_cpus(
                later,
                "shared-cpu",
                f"VMs {earlier.name!r} and {later.name!r} may both steer to {cpus_word(common)} "
                f"({they} in the cpus of both), so each could steer DMA into caches the other "
                f"uses; {how}",
            )


@check("device-in-two-vms", "one device assigned to two VMs")
def devices_unique(ctx: Context) -> None:
    owner: dict[str, tuple[VmDraft, DeviceDraft]] = {}
    for vm in ctx.vms:
        for dev in vm.devices:
            if dev.bdf in owner:
                first_vm, first = owner[dev.bdf]
                ctx.report(
                    dev.key,
                    "device-in-two-vms",
                    f"device {dev.bdf} is already assigned to VM {first_vm.name!r} (line "
                    f"{ctx.out.line_of(first.key)}); a device belongs to one VM",
                    dev.path,
                )
            else:
                owner[dev.bdf] = (vm, dev)
