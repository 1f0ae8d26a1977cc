"""Settings that cannot take effect."""

from __future__ import annotations

from ..policy import OnViolation
from .context import Context
from .registry import check

_FALLBACK = "fallback_cpu only matters with on_violation: rewrite"


@check("no-effect", "a setting that cannot take effect (warning)")
def settings_take_effect(ctx: Context) -> None:
    for vm in ctx.vms:
        if vm.fallback_cpu is not None:
            uses = vm.on_violation is OnViolation.REWRITE or any(
                d.on_violation is OnViolation.REWRITE and d.fallback_cpu is None for d in vm.devices
            )
            if not uses:
                ctx.warn(
                    vm.nodes["fallback_cpu"], "no-effect", _FALLBACK, f"{vm.path}.fallback_cpu"
                )
        for dev in vm.devices:
            onv = dev.on_violation or vm.on_violation
            if dev.fallback_cpu is not None and onv is not OnViolation.REWRITE:
                ctx.warn(
                    dev.nodes["fallback_cpu"], "no-effect", _FALLBACK, f"{dev.path}.fallback_cpu"
                )
            for flag in ("tph", "extended_tph"):
                if getattr(dev, flag) is True and not getattr(vm, flag):
                    ctx.warn(
                        dev.nodes[flag],
                        "no-effect",
                        f"VM {vm.name!r} sets {flag}: false, which a device cannot override",
                        f"{dev.path}.{flag}",
                    )
