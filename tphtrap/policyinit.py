"""``tphtrap policy init``: a commented policy skeleton built from the host and its domains.

What goes in, and from where:

- ``host.steering_tags``: one entry per entry of the ``--tags`` file (the output of ``tphtrap
  acpi host``), restricted to this host's CPUs; every online CPU the file leaves out, or every
  online CPU when there is no file, gets ``TODO`` tags, one entry per level-3 cache.
  ``policy check`` refuses ``TODO`` (``tag-placeholder``): a policy never runs on made-up tags;
- comments: packages, L3 caches, NUMA nodes and SMT siblings, and every PCI function with a
  TPH Requester capability with its ``inspect --host`` verdict and its root port's TPH
  Completer support (:func:`device_lines`);
- ``vms``: one VM per domain, named as the domain: ``cpus`` is every CPU its vCPUs may run on,
  ``vcpus`` the one-CPU pinning when every vCPU has one (translation), ``devices`` its PCI
  hostdevs. Emulator and IOThread pinning are comments: they are not the guest's CPUs.

The text is built here and checked by the caller with the same units as ``policy check``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import TphtrapError
from .hostscan import HostFacts, PciFunction
from .libvirt import Domain
from .policy import format_cpulist, format_tag
from .policyread import MAX_NAME, MAX_VCPUS, TAG_PLACEHOLDER, SteeringEntry
from .report import CLASS_NAMES
from .spec import TagWidth

__all__ = ["InitError", "TagsSource", "device_lines", "render_policy"]

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class InitError(TphtrapError):
    """The inputs cannot make a policy (two domains of one name, a name no VM can have)."""


@dataclass(frozen=True)
class TagsSource:
    """The steering tags read from ``--tags FILE``."""

    path: str
    entries: tuple[SteeringEntry, ...]


# --- small renderings ---------------------------------------------------------------------------
def _comment(text: str, indent: str) -> list[str]:
    """``text`` as comment lines of at most 96 characters."""
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 94 - len(indent))]


def _tag(tag: int | None, width: TagWidth) -> str:
    return "null" if tag is None else format_tag(tag, width)


def _aligned(rows: Sequence[tuple[str, str]], indent: str) -> list[str]:
    """``key: value  # comment`` rows with the comments aligned."""
    width = max((len(a) for a, _ in rows), default=0)
    return [f"{indent}{a:<{width}}  # {b}" if b else f"{indent}{a}" for a, b in rows]


def _function_title(fn: PciFunction) -> str:
    cfg = fn.config
    if cfg is None:
        return fn.bdf
    cls = CLASS_NAMES.get(cfg.class_code >> 8, "PCI device")
    return f"{fn.bdf}  {cfg.vendor_id:04x}:{cfg.device_id:04x}  {cls}"


def _verdict_words(fn: PciFunction) -> str:
    if fn.status == "trappable":
        return f"trappable: {fn.reason}"
    if fn.status == "force-off":
        return f"TPH forced off in a VM: {fn.reason}"
    if fn.status == "no-tph":
        return f"no TPH: {fn.reason}"
    return f"not examined: {fn.reason}"


def device_lines(fn: PciFunction) -> list[str]:
    """The comment block for one PCI function with TPH: what it is, its verdict (with what the
    TPH Completer of its root port allows), and its root port."""
    lines = [_function_title(fn), f"  {_verdict_words(fn)}"]
    lines.extend(f"  note: {n}" for n in fn.notes)
    if fn.root is not None and not any(fn.root.summary in n for n in (fn.reason, *fn.notes)):
        lines.append(f"  {fn.root.summary}")
    return lines


def _device_short(fn: PciFunction | None) -> str:
    if fn is None:
        return "not a PCI function of this host"
    if fn.status == "trappable":
        return "TPH: trappable"
    if fn.status == "force-off":
        return f"TPH always forced off: {fn.reason}"
    if fn.status == "no-tph":
        return "no TPH Requester capability: nothing to filter"
    return f"not examined: {fn.reason}"


# --- host -----------------------------------------------------------------------------------------
def _topology_lines(host: HostFacts) -> list[str]:
    offline = host.present - host.online
    head = f"This host: {len(host.online)} online CPUs ({format_cpulist(host.online)})"
    if offline:
        head += f", {len(offline)} offline ({format_cpulist(offline)})"
    out = [head + "."]
    for pkg, cpus in sorted(host.groups("package").items(), key=lambda kv: min(kv[1])):
        label = f"package {pkg}" if pkg is not None else "package unknown"
        out.append(f"  {label}: CPUs {format_cpulist(cpus)}")
    for node, cpus in sorted(host.nodes.items()):
        out.append(f"  NUMA node {node}: CPUs {format_cpulist(cpus & host.online)}")
    for dom in host.l3_domains():
        out.append(f"  L3 cache shared by CPUs {format_cpulist(dom)}{_l3_label(host, dom)}")
    out.append(f"  SMT: {host.smt_pairs()}")
    return out


def _l3_label(host: HostFacts, cpus: frozenset[int]) -> str:
    pkgs = sorted({p for c in cpus if (p := host.cpus[c].package) is not None})
    nodes = sorted({n for c in cpus if (n := host.cpus[c].node) is not None})
    parts = []
    if pkgs:
        parts.append(f"package {','.join(map(str, pkgs))}")
    if nodes:
        parts.append(f"NUMA node {','.join(map(str, nodes))}")
    return f" ({', '.join(parts)})" if parts else ""


def _what_cpus(host: HostFacts, cpus: frozenset[int]) -> str:
    """What a group of CPUs with one tag is: an L3 cache, a package, a core (or nothing)."""
    if cpus in host.l3_domains():
        return f"L3{_l3_label(host, cpus)}"
    for pkg, group in host.groups("package").items():
        if cpus == group and pkg is not None:
            return f"package {pkg}"
    first = host.cpus.get(min(cpus))
    if first is not None and cpus == first.siblings:
        return f"core {first.core} of package {first.package}"
    return ""


def _steering_rows(host: HostFacts, tags: TagsSource | None) -> tuple[list[tuple[str, str]], str]:
    """The steering_tags rows, and a note on where they come from."""
    rows: list[tuple[str, str]] = []
    covered: set[int] = set()
    if tags is not None:
        for entry in tags.entries:
            cpus = entry.cpus & host.present
            if not cpus:
                continue
            covered |= cpus
            value = (
                f"{{st8: {_tag(entry.st8, TagWidth.ST8)}, st16: {_tag(entry.st16, TagWidth.ST16)}}}"
            )
            rows.append((f"{format_cpulist(cpus)}: {value}", _what_cpus(host, cpus)))
    for dom in host.l3_domains():
        rest = dom - covered
        if rest:
            why = f"not in {tags.path}" if tags is not None else "fill in"
            value = f"{{st8: {TAG_PLACEHOLDER}, st16: {TAG_PLACEHOLDER}}}"
            rows.append((f"{format_cpulist(rest)}: {value}", f"L3{_l3_label(host, dom)}; {why}"))
    if tags is None:
        note = (
            f"No --tags file: every tag is {TAG_PLACEHOLDER}, which 'tphtrap policy check' refuses "
            "until it is the tag the firmware reports ('tphtrap acpi host' prints them; 'policy "
            "init --tags FILE' writes them). One entry per L3 cache here; if the firmware gives "
            "one tag per core or per socket, write its entries instead."
        )
    else:
        note = f"Tags from {tags.path} ('tphtrap acpi host')."
    return rows, note


def _device_inventory(host: HostFacts, assigned: set[str]) -> list[str]:
    out: list[str] = []
    found = host.tph_functions
    n = len(host.functions)
    if not found:
        out.append(f"TPH devices: none of the {n} PCI functions of this host has a TPH Requester.")
    else:
        out.append(f"TPH devices ({len(found)} of the {n} PCI functions of this host):")
        for fn in found:
            out.extend(f"  {line}" for line in device_lines(fn))
        free = [fn.bdf for fn in found if fn.bdf not in assigned]
        if free:
            out.append(f"  not given to any VM below: {', '.join(free)}")
    if host.unexamined:
        out.append(
            f"Not examined ({len(host.unexamined)}): "
            + "; ".join(f"{fn.bdf} ({fn.reason})" for fn in host.unexamined)
        )
    return out


# --- VMs ------------------------------------------------------------------------------------------
def _check_names(domains: Sequence[Domain]) -> None:
    seen: dict[str, Domain] = {}
    for dom in domains:
        name = dom.name
        if not (name[:1].isascii() and name[:1].isalpha()) or set(name) - _NAME_CHARS:
            raise InitError(
                f"{dom.where(dom.name_line)}: domain name {name!r} cannot be a VM name in a "
                f"policy (a letter, then letters, digits, '-', '_', '.'; at most {MAX_NAME})"
            )
        if len(name) > MAX_NAME:
            raise InitError(f"{dom.where(dom.name_line)}: domain name {name!r} is too long")
        if name in seen:
            raise InitError(
                f"{dom.where(dom.name_line)}: domain {name!r} is also {seen[name].source}"
            )
        seen[name] = dom


def _pinning_words(dom: Domain) -> str:
    sources = sorted({p.source for p in dom.pins})
    how = " and ".join("cputune/vcpupin" if s == "vcpupin" else "<vcpu cpuset>" for s in sources)
    return f"{dom.vcpus} vCPUs on CPUs {format_cpulist(dom.cpus)} ({how})"


def _flow_list(key: str, items: Sequence[int], indent: str) -> list[str]:
    """``key: [a, b, ...]`` wrapped at 96 characters, continuation lines under the first item."""
    head = f"{indent}{key}: ["
    body = textwrap.wrap(", ".join(map(str, items)) + "]", 96 - len(head))
    return [head + body[0], *(" " * len(head) + line for line in body[1:])]


def _vm_lines(dom: Domain, host: HostFacts) -> list[str]:
    out = [f"  {dom.name}:"]
    out.extend(_comment(f"from {dom.source}: {_pinning_words(dom)}", "    "))
    if dom.emulator is not None:
        out.extend(
            _comment(
                f"emulator threads on CPUs {format_cpulist(dom.emulator)} (emulatorpin): the "
                "host's work for the VM, not in cpus",
                "    ",
            )
        )
    for thread, cpus in sorted(dom.iothreads.items()):
        out.append(
            f"    # IOThread {thread} on CPUs {format_cpulist(cpus)} (iothreadpin): not in cpus"
        )
    out.append(f"    cpus: {format_cpulist(dom.cpus)}")
    pins = dom.one_to_one
    if pins is not None and len(pins) <= MAX_VCPUS:
        out.append("    # every vCPU has one CPU: the guest writes virtual tags (vCPU numbers)")
        out.extend(_flow_list("vcpus", pins, "    "))
    elif pins is not None:
        out.append(f"    # no vcpus: {len(pins)} vCPUs, more than {MAX_VCPUS} virtual tags")
    else:
        loose = [p.vcpu for p in dom.pins if len(p.cpus) > 1]
        out.extend(
            _comment(
                f"no vcpus (translation): vCPUs {format_cpulist(loose)} may run on several "
                "CPUs each, so the guest writes host tags",
                "    ",
            )
        )
    out.append("    on_violation: drop   # drop | rewrite | disable")
    if not dom.hostdevs:
        out.append("    devices: {}")
    else:
        out.append("    devices:")
        rows = []
        for dev in dom.hostdevs:
            fn = host.function(dev.bdf)
            value = "{tph: false}" if fn is not None and fn.status == "force-off" else "{}"
            rows.append((f"{dev.bdf}: {value}", _device_short(fn)))
        out.extend(_aligned(rows, "      "))
    for dev in dom.unassigned:
        out.extend(
            _comment(
                f"{dev.bdf}: managed by libvirt but <address type='unassigned'/>: not the "
                "guest's, not listed",
                "    ",
            )
        )
    return out


def _example_vm(host: HostFacts) -> list[str]:
    dom = host.l3_domains()[0] if host.l3_domains() else host.online
    usable = [f for f in host.tph_functions if f.status == "trappable"] or host.tph_functions
    dev = usable[0].bdf if usable else "0000:3b:00.0"
    return [
        "# No --libvirt domain given. A VM looks like this (or run policy init --libvirt):",
        "#   tenant:",
        f"#     cpus: {format_cpulist(dom)}         # host CPUs its devices may steer to",
        "#     on_violation: drop",
        "#     devices:",
        f"#       {dev}: {{}}",
    ]


# --- the policy ---------------------------------------------------------------------------------
def render_policy(
    host: HostFacts,
    domains: Sequence[Domain] = (),
    tags: TagsSource | None = None,
    sources: Iterable[str] = (),
) -> str:
    """The policy text for ``host`` and ``domains`` (see the module docstring)."""
    _check_names(domains)
    assigned = {d.bdf for dom in domains for d in dom.hostdevs}
    rows, tags_note = _steering_rows(host, tags)
    out = [
        "# A tphtrap policy written by 'tphtrap policy init' (format: docs/policy.md).",
        f"# Read from: {', '.join(sources) or 'this host'}.",
        "# Check it with 'tphtrap policy check FILE --host' (add --libvirt DOMAIN.xml... to",
        "# compare it with the domains), and again whenever CPUs, pinning or devices change.",
        "#",
    ]
    out.extend(f"# {line}" for line in _topology_lines(host))
    out.append("#")
    for line in _device_inventory(host, assigned):
        lead = len(line) - len(line.lstrip())
        wrapped = textwrap.wrap(line, 94 - lead, subsequent_indent=" " * (lead + 4))
        out.extend(f"# {' ' * lead}{w.lstrip() if i == 0 else w}" for i, w in enumerate(wrapped))
    out.append("version: 1")
    out.append("")
    out.append("host:")
    out.extend(_comment(tags_note, "  "))
    out.append("  steering_tags:")
    out.extend(_aligned(rows, "    "))
    out.append(
        "  # neutral_tags: [0x00]   # only if the platform defines a tag as 'no particular CPU'"
    )
    out.append("")
    if domains:
        out.append("vms:")
        for dom in domains:
            out.extend(_vm_lines(dom, host))
            out.append("")
        while out[-1] == "":
            out.pop()
    else:
        out.append("vms: {}")
        out.extend(_example_vm(host))
    return "\n".join(out) + "\n"
