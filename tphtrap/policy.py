"""The policy model and its tag semantics. Pure data and pure functions; no YAML here.

Semantics (also stated in docs/policy.md, and enforced here only):

* ``host.steering_tags`` gives, per host CPU, the 8-bit and 16-bit steering tags the platform
  firmware reports for volatile memory (the ACPI ``_DSM`` values Linux reads in
  ``pcie_tph_get_cpu_st``). Several CPUs may share a tag (a shared cache).
* A host tag is *allowed* for a VM at a width if every host CPU that owns that tag at that width
  is in the VM's ``cpus`` (strict: a tag shared with any CPU outside the VM is foreign), or if it
  is listed in ``host.neutral_tags``. A tag no CPU owns and that is not neutral is never allowed.
* 8-bit tags apply while TPH Requester Enable is "TPH only"; 16-bit tags while it is
  "Extended TPH". In No ST mode the device emits tag 0, so No ST mode is only granted where 0 is
  allowed (put 0 in ``neutral_tags`` if the platform treats it as "no particular CPU").
* With ``vcpus`` (vCPU -> host CPU pinning), the guest is given *virtual* tags: the virtual tag
  of vCPU ``i`` is ``i`` at both widths. A guest write of virtual tag ``i`` becomes the host tag
  (of the width in force) of the CPU vCPU ``i`` is pinned to. Values ``>= len(vcpus)`` are
  violations. Translation makes host tags unnecessary (and unusable) inside the guest.
* On a violation: ``drop`` keeps the device as it was (the write never reaches it), ``rewrite``
  puts the VM's fallback tag instead (default: the tag of its first CPU whose tag is allowed,
  else the lowest neutral tag),
  ``disable`` forces TPH Requester Enable off for the device until the next reset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from .spec import TagWidth

__all__ = [
    "MAX_CPUS",
    "CpuTags",
    "DeviceSettings",
    "HostPolicy",
    "OnViolation",
    "Policy",
    "TagRules",
    "VmPolicy",
    "cpus_word",
    "format_cpulist",
    "format_tag",
    "parse_cpulist",
]


class OnViolation(StrEnum):
    DROP = "drop"
    REWRITE = "rewrite"
    DISABLE = "disable"


MAX_CPUS = 8192  # Linux NR_CPUS upper bound (CONFIG_MAXSMP)
_CPULIST_REGION = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+)/([0-9]+))?)?\Z")


def parse_cpulist(text: str, limit: int = MAX_CPUS) -> frozenset[int]:
    """A Linux cpulist -> its CPUs; raises ValueError with a short reason.

    The syntax of ``bitmap_parselist`` (Linux ``lib/bitmap-str.c``): comma-separated ``N``,
    ``N-M`` and ``N-M:used/group`` (of each group of ``group`` CPUs from N, the first ``used``:
    ``0-7:1/2`` is 0,2,4,6). Numbers are decimal. ``all`` and ``N`` (relative to the CPU count)
    and empty elements are refused; anything accepted means what Linux would read.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty cpulist")
    cpus: set[int] = set()
    for part in s.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"empty element in {s!r} (a doubled or trailing comma)")
        m = _CPULIST_REGION.match(item)
        if m is None:
            if item.lower().startswith("all") or "N" in item:
                raise ValueError(f"{item!r} depends on the CPU count: list the CPUs instead")
            if re.fullmatch(r"[0-9]+-[0-9]+:[0-9]+", item):
                raise ValueError(
                    f"{item!r}: a cpulist pattern is range:used/group (0-7:1/2 is 0,2,4,6)"
                )
            raise ValueError(f"{item!r} is not N, N-M or N-M:used/group")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        if hi < lo:
            raise ValueError(f"range {item!r} runs backwards")
        if hi >= limit:
            raise ValueError(f"CPU {hi} is beyond the {limit} CPUs Linux supports")
        used, group = (int(m[3]), int(m[4])) if m[3] is not None else (hi - lo + 1, hi - lo + 1)
        if used == 0 or group == 0 or used > group:
            raise ValueError(f"{item!r}: need 0 < used <= group in range:used/group")
        for first in range(lo, hi + 1, group):
            cpus.update(range(first, min(first + used, hi + 1)))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Sorted CPUs -> compact cpulist (``0-3,8``)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def cpus_word(cpus: Iterable[int]) -> str:
    """``CPU 3`` or ``CPUs 0-3,8``: a cpulist with its noun, for messages."""
    cpus = sorted(cpus)
    return f"{'CPU' if len(cpus) == 1 else 'CPUs'} {format_cpulist(cpus)}"


def format_tag(tag: int, width: TagWidth) -> str:
    """A tag in hex with the digits of its width: ``0x01`` at 8 bits, ``0x0101`` at 16."""
    return f"{tag:#0{2 + int(width) // 4}x}"


@dataclass(frozen=True, slots=True)
class CpuTags:
    """The steering tags the platform reports for one host CPU (None: no valid tag)."""

    cpu: int
    st8: int | None
    st16: int | None

    def tag(self, width: TagWidth) -> int | None:
        return self.st8 if width is TagWidth.ST8 else self.st16


@dataclass(frozen=True)
class HostPolicy:
    steering_tags: Mapping[int, CpuTags]
    neutral_tags: frozenset[int] = frozenset()

    def owners(self, width: TagWidth) -> dict[int, frozenset[int]]:
        """tag -> the host CPUs that own it at ``width``."""
        acc: dict[int, set[int]] = {}
        for cpu, tags in self.steering_tags.items():
            t = tags.tag(width)
            if t is not None:
                acc.setdefault(t, set()).add(cpu)
        return {t: frozenset(c) for t, c in acc.items()}

    def neutral(self, width: TagWidth) -> frozenset[int]:
        return frozenset(t for t in self.neutral_tags if t <= width.mask)


@dataclass(frozen=True)
class DeviceSettings:
    """Per-device overrides inside a VM (None: inherit the VM's setting)."""

    bdf: str
    tph: bool = True  # False: TPH Requester Enable is always forced off
    extended_tph: bool = True  # False: Extended TPH is always downgraded to TPH only
    on_violation: OnViolation | None = None
    fallback_cpu: int | None = None


@dataclass(frozen=True)
class VmPolicy:
    name: str
    cpus: frozenset[int]
    on_violation: OnViolation = OnViolation.DROP
    vcpus: tuple[int, ...] | None = None  # vCPU index -> host CPU
    fallback_cpu: int | None = None
    devices: Mapping[str, DeviceSettings] = field(default_factory=dict)
    share_cpus_with: frozenset[str] = frozenset()
    tph: bool = True
    extended_tph: bool = True


@dataclass(frozen=True)
class Policy:
    host: HostPolicy
    vms: Mapping[str, VmPolicy]
    source: str = "<policy>"

    def vm_of_device(self, bdf: str) -> VmPolicy | None:
        for vm in self.vms.values():
            if bdf in vm.devices:
                return vm
        return None

    def rules(self, vm_name: str, bdf: str) -> TagRules:
        """The compiled rules for one device of one VM (KeyError if either is unknown)."""
        vm = self.vms[vm_name]
        dev = vm.devices[bdf]
        return TagRules.build(self.host, vm, dev)


@dataclass(frozen=True)
class TagRules:
    """Everything the engine needs about tags for one (VM, device), precomputed.

    ``allowed[w]`` are the *host* tags the device may hold at width ``w``; ``translate[w]`` maps
    a virtual tag (vCPU index) to a host tag, or is None when the VM has no translation.
    """

    vm: str
    bdf: str
    allowed: Mapping[TagWidth, frozenset[int]]
    translate: Mapping[TagWidth, tuple[int | None, ...]] | None
    fallback: Mapping[TagWidth, int | None]
    on_violation: OnViolation
    tph_allowed: bool
    ext_allowed: bool  # policy lets Extended TPH be granted (the device must support it too)
    rule: str  # breadcrumb of the policy entry these rules come from
    #: the VM's host CPUs with their tag at each width (what a host interface taking a CPU
    #: per ST entry is given: the host backend names one of these, never another CPU)
    cpu_tags: Mapping[TagWidth, Mapping[int, int]] = field(default_factory=dict)

    @cached_property
    def cpu_of_tag(self) -> Mapping[TagWidth, Mapping[int, int]]:
        """tag -> the lowest CPU of the VM whose tag it is, per width (allowed tags only)."""
        out: dict[TagWidth, dict[int, int]] = {}
        for w, cpus in self.cpu_tags.items():
            row: dict[int, int] = {}
            for cpu in sorted(cpus):
                tag = cpus[cpu]
                if tag in self.allowed[w]:
                    row.setdefault(tag, cpu)
            out[w] = row
        return out

    @cached_property
    def rule_violation(self) -> str:
        return f"{self.rule}.on_violation"

    @classmethod
    def build(cls, host: HostPolicy, vm: VmPolicy, dev: DeviceSettings) -> TagRules:
        allowed: dict[TagWidth, frozenset[int]] = {}
        fallback: dict[TagWidth, int | None] = {}
        fb_cpu = dev.fallback_cpu if dev.fallback_cpu is not None else vm.fallback_cpu
        for w in TagWidth:
            owners = host.owners(w)
            ok = {t for t, cpus in owners.items() if cpus <= vm.cpus} | host.neutral(w)
            allowed[w] = frozenset(ok)
            fallback[w] = _fallback(host, vm, w, allowed[w], fb_cpu)
        translate: dict[TagWidth, tuple[int | None, ...]] | None = None
        if vm.vcpus is not None:
            translate = {}
            for w in TagWidth:
                row: list[int | None] = []
                for cpu in vm.vcpus:
                    tags = host.steering_tags.get(cpu)
                    t = tags.tag(w) if tags is not None else None
                    row.append(t if t is not None and t in allowed[w] else None)
                translate[w] = tuple(row)
        ext_allowed = vm.extended_tph and dev.extended_tph and bool(allowed[TagWidth.ST16])
        cpu_tags: dict[TagWidth, dict[int, int]] = {}
        for w in TagWidth:
            row2: dict[int, int] = {}
            for cpu in sorted(vm.cpus):
                tags = host.steering_tags.get(cpu)
                t = tags.tag(w) if tags is not None else None
                if t is not None:
                    row2[cpu] = t
            cpu_tags[w] = row2
        return cls(
            vm=vm.name,
            bdf=dev.bdf,
            allowed=allowed,
            translate=translate,
            fallback=fallback,
            on_violation=dev.on_violation or vm.on_violation,
            tph_allowed=vm.tph and dev.tph,
            ext_allowed=ext_allowed,
            rule=f"vms.{vm.name}.devices.{dev.bdf}",
            cpu_tags=cpu_tags,
        )

    def resolve(self, guest_tag: int, width: TagWidth) -> int | None:
        """The host tag the device should hold for ``guest_tag`` at ``width``; None: violation.

        At 8 bits only the low byte of an entry is a tag; without translation the rest of the
        entry is passed through (it only matters once Extended TPH is enabled, and every entry
        is re-resolved at 16 bits before that happens).
        """
        tag = guest_tag & width.mask
        if self.translate is not None:
            row = self.translate[width]
            host = row[tag] if tag < len(row) else None
            return host
        if tag in self.allowed[width]:
            return guest_tag
        return None

    def host_ok(self, host_tag: int, width: TagWidth) -> bool:
        """Is a value already on the device safe at ``width``?"""
        return (host_tag & width.mask) in self.allowed[width]


def _fallback(
    host: HostPolicy,
    vm: VmPolicy,
    width: TagWidth,
    allowed: frozenset[int],
    fb_cpu: int | None,
) -> int | None:
    order = [fb_cpu] if fb_cpu is not None else sorted(vm.cpus)
    for cpu in order:
        tags = host.steering_tags.get(cpu)
        t = tags.tag(width) if tags is not None else None
        if t is not None and t in allowed:
            return t
    if fb_cpu is None:
        # No CPU of the VM has an allowed tag at this width: a neutral tag is still safe.
        neutral = sorted(host.neutral(width))
        if neutral:
            return neutral[0]
    return None
