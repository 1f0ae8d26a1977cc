"""What the strict ownership rule leaves each VM, at the tag widths that can be in force for it.

A tag is a VM's own when every CPU that has it is in the VM's ``cpus``. Each VM falls in one
case (:attr:`VmTags.verdict`), reported once, in one place:

- ``owns-no-tag`` (error): it owns no tag, and the tags of its CPUs are shared with another VM
  it does not list in ``share_cpus_with`` (or it translates, so no virtual tag could ever be
  honoured): the recipe of docs/policy.md, "Several tenants on one L3";
- ``empty-allowed-set`` (error): nothing at all is allowed (no own tag, no neutral tag);
- ``neutral-only`` (warning): only neutral tags are left, so its devices cannot steer;
- otherwise the per-CPU, per-vCPU and per-fallback checks below, at the widths where it owns a
  tag; a width where it owns none is one warning (or, translating, one error).
"""

from __future__ import annotations

from ..policy import format_cpulist, format_tag
from ..policyread import WIDTH_WORDS
from ..spec import TagWidth
from .context import Context, VmTags
from .registry import check

_MODE = {TagWidth.ST8: "TPH only (8-bit tags)", TagWidth.ST16: "Extended TPH (16-bit tags)"}
_RECIPE_DOC = "docs/policy.md, 'Several tenants on one L3'"


def _views(ctx: Context, *verdicts: str) -> list[VmTags]:
    out = []
    for vm in ctx.vms:
        view = ctx.vm_tags(vm)
        if view is not None and view.verdict in verdicts:
            out.append(view)
    return out


def _neutral_words(view: VmTags, widths: tuple[TagWidth, ...]) -> str:
    tags = sorted({t for w in widths for t in view.host.neutral(w)})
    shown = ", ".join(format_tag(t, TagWidth.ST8 if t <= 0xFF else TagWidth.ST16) for t in tags)
    return f"the neutral tag{'s' if len(tags) > 1 else ''} {shown}"


@check("owns-no-tag", "a VM that may use TPH owns no steering tag (they are shared with others)")
def vm_owns_a_tag(ctx: Context) -> None:
    for view in _views(ctx, "owns-no-tag"):
        vm = view.vm
        why = ctx.shared_words(view, view.widths)
        tail = "; until then none of its virtual tags can be honoured" if view.translates else ""
        ctx.at_cpus(
            vm,
            "owns-no-tag",
            f"VM {vm.name!r} owns no steering tag: {why}. A tag is a VM's only if every CPU "
            f"that has it is in the VM's cpus: {ctx.recipe(view)} ({_RECIPE_DOC}), or set "
            f"tph: false{tail}",
        )


@check("empty-allowed-set", "a VM that may use TPH but has no allowed steering tag")
def vm_has_allowed_tags(ctx: Context) -> None:
    for view in _views(ctx, "no-allowed-tag", "ok"):
        vm = view.vm
        if view.verdict == "no-allowed-tag":
            ctx.at_cpus(
                vm,
                "empty-allowed-set",
                f"VM {vm.name!r} may use TPH but no steering tag is allowed for it: "
                f"{ctx.foreign_words(view, view.widths[0])}. Give it whole cache domains "
                f"(cpus: {format_cpulist(view.domain)}), add a neutral tag, or set tph: false",
            )
            continue
        for width in view.widths:
            if width in view.live:
                continue
            effect = (
                "Extended TPH will be downgraded to TPH only"
                if width is TagWidth.ST16
                else "TPH only (8-bit) requests will never get a tag"
            )
            ctx.at_cpus(
                vm,
                "empty-allowed-set",
                f"no {WIDTH_WORDS[width]} tag is allowed for VM {vm.name!r}: {effect}",
                "warning",
            )


@check("neutral-only", "a VM (or one tag width of it) left with neutral tags only (warning)")
def vm_can_steer(ctx: Context) -> None:
    for view in _views(ctx, "neutral-only", "ok"):
        vm = view.vm
        if view.verdict == "neutral-only":
            ctx.at_cpus(
                vm,
                "neutral-only",
                f"VM {vm.name!r} owns no steering tag, so its devices can use only "
                f"{_neutral_words(view, view.live)} and cannot steer: "
                f"{ctx.shared_words(view, view.widths)}. To let it steer, "
                f"{ctx.recipe(view)}",
                "warning",
            )
            continue
        if view.translates:
            continue  # a translating VM gets vcpu-tag-foreign for such a width
        for width in view.live:
            if not view.foreign(width):
                continue
            other = next(w for w in view.widths if view.owned(w))
            ctx.at_cpus(
                vm,
                "neutral-only",
                f"with {_MODE[width]}, VM {vm.name!r} can use only "
                f"{_neutral_words(view, (width,))} and cannot steer: "
                f"{ctx.shared_words(view, (width,))}; it steers only with {_MODE[other]}",
                "warning",
            )


@check("tag-shared-outside", "a VM CPU whose tag is shared with CPUs outside the VM (warning)")
def vm_cpus_tags_own(ctx: Context) -> None:
    for view in _views(ctx, "ok"):
        shut: set[int] = set()
        why: list[str] = []
        for width in view.live:
            if not view.owned(width):
                continue  # the whole width is reported as neutral-only or vcpu-tag-foreign
            lost = {
                c
                for c in view.cpus
                if (t := view.host.steering_tags[c].tag(width)) is not None
                and t not in view.rules.allowed[width]
            }
            if lost:
                shut |= lost
                why.append(ctx.foreign_words(view, width, untagged=False))
        if shut:
            vm = view.vm
            cpus = "CPU" if len(shut) == 1 else "CPUs"
            ctx.at_cpus(
                vm,
                "tag-shared-outside",
                f"devices of VM {vm.name!r} cannot steer to {cpus} {format_cpulist(shut)}: "
                f"{'; '.join(why)}",
                "warning",
            )


@check(
    "vcpu-tag-foreign",
    "a vCPU pinned to a CPU whose tag the VM may not use",
    also={"vcpu-without-tag": "a vCPU pinned to a CPU the firmware reports no tag for (warning)"},
)
def vcpu_tags(ctx: Context) -> None:
    for view in _views(ctx, "ok"):
        if view.vm.vcpus is None:
            continue
        whole = [w for w in view.live if view.foreign(w)]
        for width in whole:
            _no_vcpu_translates(ctx, view, width)
        _each_vcpu(ctx, view, [w for w in view.live if w not in whole])


def _no_vcpu_translates(ctx: Context, view: VmTags, width: TagWidth) -> None:
    vm = view.vm
    fix = "set extended_tph: false, or " if width is TagWidth.ST16 else ""
    ctx.report(
        vm.vcpus_node,
        "vcpu-tag-foreign",
        f"no vCPU of VM {vm.name!r} can be translated at {int(width)} bits: it owns no "
        f"{WIDTH_WORDS[width]} tag ({ctx.shared_words(view, (width,))}), so with "
        f"{_MODE[width]} every virtual tag is a violation; {fix}{ctx.recipe(view)}",
        f"{vm.path}.vcpus",
    )


_VCPU_ADVICE = "virtual tag {i} could never be honoured; pin it to a CPU whose tag the VM owns"


def _each_vcpu(ctx: Context, view: VmTags, widths: list[TagWidth]) -> None:
    vm, host = view.vm, view.host
    for i, (cpu, node) in enumerate(vm.vcpus or ()):
        if cpu not in view.cpus:
            continue  # reported as vcpu-outside-cpus
        where = f"{vm.path}.vcpus[{i}]"
        foreign: list[str] = []
        missing: list[str] = []
        for width in widths:
            tag = host.steering_tags[cpu].tag(width)
            if tag is None:
                missing.append(WIDTH_WORDS[width])
            elif tag not in view.rules.allowed[width]:
                outside = sorted(host.owners(width)[tag] - view.cpus)
                foreign.append(
                    f"its {WIDTH_WORDS[width]} tag {format_tag(tag, width)} is shared with "
                    f"{ctx.owner_words(outside)}"
                )
        if foreign:
            ctx.report(
                node,
                "vcpu-tag-foreign",
                f"vCPU {i} is pinned to CPU {cpu}, but {' and '.join(foreign)}: "
                + _VCPU_ADVICE.format(i=i),
                where,
            )
        elif missing:
            ctx.warn(
                node,
                "vcpu-without-tag",
                f"vCPU {i} is pinned to CPU {cpu}, for which the firmware reports no "
                f"{' or '.join(missing)} tag: virtual tag {i} will be treated as a violation",
                where,
            )


@check("fallback-not-allowed")
def fallback_tags(ctx: Context) -> None:
    """A fallback CPU of the VM whose tag the VM may not use."""
    for view in _views(ctx, "ok", "neutral-only"):
        vm, host = view.vm, view.host
        for where, cpu, node in vm.fallbacks():
            if cpu not in view.cpus:
                continue  # reported by fallbacks_in_cpus
            bad: list[str] = []
            for width in view.live:
                tag = host.steering_tags[cpu].tag(width)
                if tag is None:
                    bad.append(f"the firmware reports no {WIDTH_WORDS[width]} tag for it")
                elif tag not in view.rules.allowed[width]:
                    outside = sorted(host.owners(width)[tag] - view.cpus)
                    bad.append(
                        f"its {WIDTH_WORDS[width]} tag {format_tag(tag, width)} is shared with "
                        f"{ctx.owner_words(outside)}"
                    )
            if bad:
                ctx.report(
                    node,
                    "fallback-not-allowed",
                    f"fallback CPU {cpu} cannot be the fallback of VM {vm.name!r}: "
                    f"{'; '.join(bad)}",
                    where,
                )
        # Without fallback_cpu the fallback is the first CPU's allowed tag, else a neutral
        # tag: it exists whenever the allowed set is not empty (checked above).
