"""``policy check --host``: the policy against this host's CPUs and PCI functions (sysfs)."""

from __future__ import annotations

from ..hostscan import HostFacts
from ..policy import cpus_word, format_cpulist
from .context import Context
from .registry import check


def _machine(ctx: Context) -> HostFacts:
    assert ctx.machine is not None  # host units run only with a machine
    return ctx.machine


def _they(cpus: frozenset[int] | list[int]) -> str:
    return "is" if len(cpus) == 1 else "are"


@check("host-cpu-missing", "a CPU the policy names that this host does not have", scope="host")
def cpus_exist(ctx: Context) -> None:
    host = _machine(ctx)
    have = f"this host has CPUs {format_cpulist(host.present) or 'none'}"
    for entry in ctx.draft.entries:
        gone = sorted(entry.cpus - host.present)
        if gone:
            ctx.report(
                entry.key,
                "host-cpu-missing",
                f"{cpus_word(gone)} {_they(gone)} not on this host ({have}): the policy was "
                "written for another machine, or CPUs were removed",
                f"host.steering_tags.{entry.key.value}",
            )
    for vm in ctx.vms:
        if vm.cpus is None:
            continue
        gone = sorted(vm.cpus - host.present)
        if gone:
            ctx.at_cpus(
                vm,
                "host-cpu-missing",
                f"{cpus_word(gone)} of VM {vm.name!r} {_they(gone)} not on this host ({have})",
            )


@check("host-cpu-offline", "a VM CPU that is present but offline (warning)", scope="host")
def cpus_online(ctx: Context) -> None:
    host = _machine(ctx)
    for vm in ctx.vms:
        if vm.cpus is None:
            continue
        off = sorted((vm.cpus & host.present) - host.online)
        if off:
            ctx.at_cpus(
                vm,
                "host-cpu-offline",
                f"{cpus_word(off)} of VM {vm.name!r} {_they(off)} offline on this host",
                "warning",
            )


@check(
    "host-cpu-untagged",
    "an online CPU of this host with no entry in host.steering_tags (warning)",
    scope="host",
)
def cpus_tagged(ctx: Context) -> None:
    host = _machine(ctx)
    if not ctx.draft.host_ok:
        return
    loose = sorted(host.online - ctx.draft.steering_lines.keys())
    if loose:
        ctx.warn(
            ctx.draft.steering_key,
            "host-cpu-untagged",
            f"{cpus_word(loose)} of this host {_they(loose)} not in host.steering_tags: no VM can "
            "be given them (write the tags 'tphtrap acpi host' reports, null where it reports "
            "none)",
            "host.steering_tags",
        )


@check(
    "device-missing",
    "a device of a VM that is not a PCI function of this host",
    also={
        "device-without-tph": "a device of a VM with no TPH Requester capability (warning)",
        "device-tph-forced-off": "a device whose TPH tphtrap always forces off (warning)",
        "device-unexamined": "a device of a VM whose config space could not be read (warning)",
    },
    scope="host",
)
def devices_present(ctx: Context) -> None:
    host = _machine(ctx)
    for vm in ctx.vms:
        for dev in vm.devices:
            fn = host.function(dev.bdf)
            if fn is None:
                ctx.report(
                    dev.key,
                    "device-missing",
                    f"device {dev.bdf} of VM {vm.name!r} is not a PCI function of this host "
                    f"(none under {host.sysfs / 'bus/pci/devices'})",
                    dev.path,
                )
            elif fn.status == "no-tph":
                ctx.warn(
                    dev.key,
                    "device-without-tph",
                    f"device {dev.bdf}: {fn.reason}; tphtrap has nothing to filter on it",
                    dev.path,
                )
            elif fn.status == "force-off":
                ctx.warn(
                    dev.key,
                    "device-tph-forced-off",
                    f"TPH is always forced off for device {dev.bdf} in a VM: {fn.reason}",
                    dev.path,
                )
            elif fn.status == "unexamined":
                ctx.warn(
                    dev.key,
                    "device-unexamined",
                    f"device {dev.bdf} could not be examined: {fn.reason}",
                    dev.path,
                )
