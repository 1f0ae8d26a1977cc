"""What every check unit works on: the positioned draft, the problem list and shared views.

The views are computed once per check run (the units ask for them per VM, per tag and per CPU;
computing them each time made checking host-sized policies quadratic, see
``fixtures/hostile/README.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from yaml.nodes import Node

from ..policy import (
    DeviceSettings,
    HostPolicy,
    TagRules,
    VmPolicy,
    cpus_word,
    format_cpulist,
    format_tag,
)
from ..policyread import WIDTH_WORDS, PolicyDraft, Reporter, VmDraft
from ..spec import TagWidth

if TYPE_CHECKING:
    from ..hostscan import HostFacts
    from ..libvirt import Domain

__all__ = ["Context", "HostView", "VmTags"]


class HostView(HostPolicy):
    """A host model whose ``owners`` and ``neutral`` are computed once per width.

    The checks ask for them once per neutral tag, per VM and per tag of a VM (directly and
    through ``TagRules.build``); recomputing them over every CPU or neutral tag each time made
    checking a policy quadratic: a few kilobytes of ``neutral_tags`` on an 8192-CPU host took
    minutes.
    """

    def owners(self, width: TagWidth) -> dict[int, frozenset[int]]:
        memo: dict[TagWidth, dict[int, frozenset[int]]]
        memo = self.__dict__.setdefault("_owners_memo", {})  # frozen: no attribute assignment
        found = memo.get(width)
        if found is None:
            found = memo[width] = super().owners(width)
        return found

    def neutral(self, width: TagWidth) -> frozenset[int]:
        memo: dict[TagWidth, frozenset[int]] = self.__dict__.setdefault("_neutral_memo", {})
        found = memo.get(width)
        if found is None:
            found = memo[width] = super().neutral(width)
        return found


@dataclass(frozen=True)
class VmTags:
    """The tags one VM may use, at the widths that can be in force for it."""

    vm: VmDraft
    model: VmPolicy
    cpus: frozenset[int]
    host: HostPolicy
    rules: TagRules
    widths: tuple[TagWidth, ...]  # 8 bits, and 16 when Extended TPH can be granted
    others: tuple[str, ...] = ()  # the other VMs with CPUs in its cache domains

    @cached_property
    def live(self) -> tuple[TagWidth, ...]:
        """The widths at which some tag (its own or neutral) is allowed."""
        return tuple(w for w in self.widths if self.rules.allowed[w])

    def owned(self, width: TagWidth) -> frozenset[int]:
        """The VM's own tags at ``width``: allowed and not neutral."""
        return self.rules.allowed[width] - self.host.neutral(width)

    def tags(self, width: TagWidth) -> frozenset[int]:
        """The tags the firmware reports for the VM's CPUs at ``width``."""
        found = (self.host.steering_tags[c].tag(width) for c in self.cpus)
        return frozenset(t for t in found if t is not None)

    def foreign(self, width: TagWidth) -> bool:
        """Its CPUs have tags at ``width``, but none of them is the VM's own."""
        return bool(self.tags(width)) and not self.owned(width)

    @cached_property
    def owns_nothing(self) -> bool:
        return not any(self.owned(w) for w in self.widths)

    @cached_property
    def domain(self) -> frozenset[int]:
        """Its CPUs and every CPU sharing one of their tags: the whole cache domains."""
        out = set(self.cpus)
        for w in self.widths:
            owners = self.host.owners(w)
            for tag in self.tags(w):
                out |= owners[tag]
        return frozenset(out)

    @property
    def translates(self) -> bool:
        return self.model.vcpus is not None

    @property
    def verdict(self) -> str:
        """``owns-no-tag``, ``no-allowed-tag``, ``neutral-only`` or ``ok`` (see tags.py)."""
        tagged = any(self.tags(w) for w in self.widths)
        if self.owns_nothing and tagged and (self.translates or self.unlisted):
            return "owns-no-tag"
        if not self.live:
            return "no-allowed-tag"
        if self.owns_nothing:
            return "neutral-only"
        return "ok"

    @property
    def unlisted(self) -> tuple[str, ...]:
        """The other VMs in its cache domains that it does not list in share_cpus_with."""
        listed = {n for n, _ in self.vm.share}
        return tuple(n for n in self.others if n not in listed)


class Context:
    """One check run: the draft, where problems go, and the machine and domains if given."""

    def __init__(
        self,
        draft: PolicyDraft,
        out: Reporter,
        machine: HostFacts | None = None,
        domains: Sequence[Domain] = (),
    ) -> None:
        self.draft = draft
        self.out = out
        self.machine = machine
        self.domains = tuple(domains)
        self._vms_of_cpu: dict[int, list[str]] | None = None
        self._vm_tags: dict[int, VmTags | None] = {}

    # problems
    def report(self, at: Node | None, rule: str, message: str, path: str = "") -> None:
        self.out.report(at, rule, message, path)

    def warn(self, at: Node | None, rule: str, message: str, path: str = "") -> None:
        self.out.warn(at, rule, message, path)

    def at_cpus(self, vm: VmDraft, rule: str, message: str, level: str = "error") -> None:
        """A problem of a VM's ``cpus``, the place most tag and pinning problems are fixed."""
        self.out.report(vm.nodes["cpus"], rule, message, f"{vm.path}.cpus", level)

    # views
    @cached_property
    def host(self) -> HostPolicy:
        """The host model for the checks, built once (they run after reading)."""
        return self.draft.host_model(HostView)

    @property
    def vms(self) -> list[VmDraft]:
        return self.draft.vms

    def vms_of_cpu(self, cpu: int) -> list[str]:
        if self._vms_of_cpu is None:  # built once: the checks call this per tag and per VM
            self._vms_of_cpu = {}
            for vm in self.vms:
                for c in vm.cpus or ():
                    self._vms_of_cpu.setdefault(c, []).append(vm.name)
        return self._vms_of_cpu.get(cpu, [])

    def owner_words(self, cpus: Iterable[int]) -> str:
        """'CPUs 4-5 (tenant-b), 6 (no VM)': who the CPUs belong to."""
        groups: dict[str, list[int]] = {}
        for cpu in cpus:
            groups.setdefault(", ".join(self.vms_of_cpu(cpu)) or "no VM", []).append(cpu)
        parts = [f"{format_cpulist(c)} ({who})" for who, c in groups.items()]
        n = sum(len(c) for c in groups.values())
        return ("CPUs " if n > 1 else "CPU ") + ", ".join(parts)

    def tags_complete(self, vm: VmDraft) -> bool:
        """The host was read without error and every CPU of the VM has steering tags."""
        return (
            vm.cpus is not None
            and self.draft.host_ok
            and all(c in self.draft.steering for c in vm.cpus)
        )

    def vm_tags(self, vm: VmDraft) -> VmTags | None:
        """The VM's tag view; None when its tags cannot be judged or TPH is never in force."""
        key = id(vm)
        if key not in self._vm_tags:
            self._vm_tags[key] = self._build_vm_tags(vm)
        return self._vm_tags[key]

    def _build_vm_tags(self, vm: VmDraft) -> VmTags | None:
        if vm.cpus is None or not self.tags_complete(vm):
            return None
        model = vm.model()
        devs = list(model.devices.values())
        if not model.tph or (devs and not any(d.tph for d in devs)):
            return None
        ext = model.extended_tph and (not devs or any(d.tph and d.extended_tph for d in devs))
        widths = (TagWidth.ST8, TagWidth.ST16) if ext else (TagWidth.ST8,)
        rules = TagRules.build(self.host, model, DeviceSettings(bdf="-"))
        view = VmTags(vm, model, vm.cpus, self.host, rules, widths)
        others = {n for c in view.domain - vm.cpus for n in self.vms_of_cpu(c) if n != vm.name}
        return replace(view, others=tuple(sorted(others))) if others else view

    # words
    def foreign_words(self, view: VmTags, width: TagWidth, *, untagged: bool = True) -> str:
        """Why the VM's CPUs' tags at ``width`` are not its own."""
        host, cpus = view.host, view.cpus
        owners = host.owners(width)
        reasons: list[str] = []
        for tag in sorted(view.tags(width)):
            outside = sorted(owners[tag] - cpus)
            if outside and tag not in host.neutral(width):
                reasons.append(
                    f"{WIDTH_WORDS[width]} tag {format_tag(tag, width)} is shared with "
                    f"{self.owner_words(outside)}"
                )
        nameless = sorted(c for c in cpus if host.steering_tags[c].tag(width) is None)
        if nameless and untagged:
            reasons.append(
                f"the firmware reports no {WIDTH_WORDS[width]} tag for {cpus_word(nameless)}"
            )
        return "; ".join(reasons) or "no tag applies"

    def shared_words(self, view: VmTags, widths: Iterable[TagWidth]) -> str:
        """'the 8-bit tag 0x02 and 16-bit tag 0x0202 of its CPUs 32-39 are shared with CPUs
        40-47 (web2)': the VM's tags at ``widths``, grouped by the CPUs they are shared with."""
        groups: dict[frozenset[int], tuple[list[str], set[int]]] = {}
        untagged: list[str] = []
        for width in widths:
            owners = view.host.owners(width)
            tags = view.tags(width)
            if not tags:
                untagged.append(WIDTH_WORDS[width])
            for tag in sorted(tags):
                names, mine = groups.setdefault(owners[tag] - view.cpus, ([], set()))
                names.append(f"{WIDTH_WORDS[width]} tag {format_tag(tag, width)}")
                mine |= owners[tag] & view.cpus
        parts: list[str] = []
        for outside, (names, mine) in groups.items():
            verb = "is" if len(names) == 1 else "are"
            whom = self.owner_words(sorted(outside)) if outside else "no CPU outside it"
            parts.append(
                f"the {' and '.join(names)} of its {cpus_word(mine)} {verb} shared with {whom}"
            )
        if untagged:
            parts.append(
                f"the firmware reports no {' or '.join(untagged)} tag for its "
                f"{cpus_word(view.cpus)}"
            )
        return "; ".join(parts)

    def recipe(self, view: VmTags) -> str:
        """How to let a VM own the tags of its cache domains (docs/policy.md has the recipe)."""
        vm = view.vm
        words = f"give it the whole cache domain (cpus: {format_cpulist(view.domain)})"
        others = view.unlisted
        if others:
            names = ", ".join(others)
            theirs = "theirs" if len(others) > 1 else f"{others[0]}'s"
            words += f" and list {names} in its share_cpus_with (and {vm.name} in {theirs})"
        return words
