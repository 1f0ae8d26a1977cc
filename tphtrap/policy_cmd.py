"""``tphtrap policy init|check|schema|explain``: writing and checking policy files.

``init`` writes a commented policy skeleton from the host (sysfs) and libvirt domains;
``check`` lints files and prints problems as ``path:line:col: level: message (rule)``, also
against the host (``--host``) and the domains (``--libvirt``); ``schema`` prints the JSON Schema
for editors; ``explain`` states in plain words (or JSON) what a policy lets each VM do.
:func:`explain_vm` builds the explanation as data; the text is a rendering of the same data, so
both views always agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .device import normalize_bdf
from .errors import Problem, TphtrapError
from .hostscan import HostFacts, read_host
from .libvirt import Domain, load_domain
from .policy import (
    DeviceSettings,
    HostPolicy,
    OnViolation,
    Policy,
    TagRules,
    VmPolicy,
    format_cpulist,
)
from .policyfile import check_against, check_policy_text, read_policy, read_tags
from .policyinit import TagsSource, render_policy
from .policyschema import policy_schema
from .spec import TagWidth

__all__ = [
    "CHECK_SCHEMA",
    "PolicyQueryError",
    "add_parser",
    "explain_policy",
    "explain_vm",
    "render_explanation",
]

_MODE = {TagWidth.ST8: "TPH only", TagWidth.ST16: "Extended TPH"}
#: The version of the ``policy check --json`` document (docs/policy.md describes it).
CHECK_SCHEMA = "tphtrap.policy-check/1"


class PolicyQueryError(TphtrapError):
    """``explain`` was asked about a VM or device the policy does not define."""


# --- argparse --------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``policy`` and its subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    policy = sub.add_parser(
        "policy",
        help="write, check and explain policy files, and print their JSON Schema",
        description=(
            "Work with policy files: one YAML file per host saying which steering tags each VM "
            "may use (format: docs/policy.md)."
        ),
        formatter_class=fmt,
    )
    cmds = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    cmds.required = True

    init = cmds.add_parser(
        "init",
        help="write a commented policy skeleton from this host and libvirt domains",
        description=(
            "Write a policy from the host: its CPUs, caches and TPH devices (sysfs), the\n"
            "steering tags the firmware reports (--tags, the output of 'tphtrap acpi host'),\n"
            "and one VM per libvirt domain (vCPU pinning -> cpus and vcpus, PCI hostdevs ->\n"
            "devices). Without --tags every tag is TODO, which 'policy check' refuses until it\n"
            "is filled in. The policy goes to stdout (or -o FILE); what the checks say about it,\n"
            "and what the scan found, goes to stderr.\n"
            "Exit status: 0 when written, 1 when the host, a domain or the tags cannot be read,\n"
            "2 on a usage error."
        ),
        epilog=(
            "examples:\n"
            "  tphtrap policy init\n"
            "  tphtrap acpi host > tags.yaml\n"
            "  virsh dumpxml web > web.xml; virsh dumpxml db > db.xml\n"
            "  tphtrap policy init --tags tags.yaml --libvirt web.xml db.xml -o /etc/tphtrap.yaml"
        ),
        formatter_class=fmt,
    )
    _machine_arguments(init, "read a copy of sysfs at ROOT (or ROOT/sys) instead of /sys")
    init.set_defaults(host=True)
    init.add_argument(
        "--tags", metavar="FILE", help="steering tags: the output of 'tphtrap acpi host'"
    )
    init.add_argument("-o", "--output", metavar="FILE", help="write the policy to FILE")
    init.add_argument("--force", action="store_true", help="overwrite an existing -o FILE")
    init.set_defaults(func=run_init)

    check = cmds.add_parser(
        "check",
        help="report every problem in policy files (exit 1 if any error)",
        description=(
            "Read each policy and report every problem at once, one per line, as\n"
            "  FILE:LINE:COL: error|warning: MESSAGE (RULE)\n"
            "A file without errors prints 'FILE: ok' (with its warning count, if any).\n"
            "--host also checks the policy against this host: CPUs that do not exist, devices\n"
            "that are absent or without TPH. --libvirt compares it with the domains: vCPUs\n"
            "that run outside a VM's cpus, vcpus that no longer match the pinning, hostdevs.\n"
            "Exit status: 0 when no file has an error, 1 otherwise (also when the host or a\n"
            "domain cannot be read), 2 on a usage error."
        ),
        epilog=(
            "examples:\n  tphtrap policy check policies/*.yaml\n"
            "  tphtrap policy check /etc/tphtrap.yaml --host --libvirt web.xml db.xml\n"
            "  tphtrap policy check --json --strict policies/*.yaml   (in CI)"
        ),
        formatter_class=fmt,
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="policy files to check")
    check.add_argument(
        "--host", action="store_true", help="also check against this host's CPUs and devices"
    )
    _machine_arguments(check, "with --host: read a copy of sysfs at ROOT (implies --host)")
    check.add_argument(
        "--json", action="store_true", help="print one JSON document with every file's problems"
    )
    check.add_argument(
        "--strict", action="store_true", help="treat warnings as errors (exit 1 on any warning)"
    )
    check.add_argument(
        "--tables",
        metavar="DIR",
        type=Path,
        help="also warn where host.steering_tags differ from what the firmware reports: ACPI "
        "tables from 'acpidump -b', or /sys/firmware/acpi/tables (docs/acpi.md)",
    )
    check.set_defaults(func=run_check)

    schema = cmds.add_parser(
        "schema",
        help="print the JSON Schema of policy files (for editors and CI)",
        description=(
            "Print the JSON Schema (draft-07) of policy files. Point an editor's YAML language\n"
            "server at it for completion and inline errors; docs/policy.md shows how. The\n"
            "schema checks shape only: 'tphtrap policy check' also checks tag ownership."
        ),
        epilog=(
            "example:\n  tphtrap policy schema -o tphtrap-policy.schema.json\n"
            "  then start a policy with:\n"
            "  # yaml-language-server: $schema=./tphtrap-policy.schema.json"
        ),
        formatter_class=fmt,
    )
    schema.add_argument(
        "-o", "--output", metavar="FILE", help="write the schema to FILE instead of stdout"
    )
    schema.set_defaults(func=run_schema)

    explain = cmds.add_parser(
        "explain",
        help="say in plain words what a policy lets each VM do",
        description=(
            "Explain what FILE lets each VM do (or only --vm VM): the host CPUs and steering\n"
            "tags it may use at each width, its virtual tags and what each becomes, what\n"
            "happens on a violation, and which of its devices will have TPH forced off, and why."
        ),
        epilog=(
            "examples:\n  tphtrap policy explain policies/two-tenants.yaml\n"
            "  tphtrap policy explain policies/two-tenants.yaml --vm tenant-a\n"
            "  tphtrap policy explain policies/two-tenants.yaml --dev 3b:00.1"
        ),
        formatter_class=fmt,
    )
    explain.add_argument("file", metavar="FILE", help="the policy file")
    explain.add_argument("--vm", metavar="VM", help="only this VM (default: every VM)")
    explain.add_argument(
        "--dev",
        metavar="BDF",
        help="only this device (e.g. 0000:3b:00.0 or 3b:00.0); without --vm, of its VM",
    )
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(func=run_explain)


def _machine_arguments(parser: argparse.ArgumentParser, sysfs_help: str) -> None:
    """``--sysfs ROOT`` and ``--libvirt DOMAIN.xml...``, for init and check."""
    parser.add_argument("--sysfs", metavar="ROOT", help=sysfs_help)
    parser.add_argument(
        "--libvirt",
        nargs="+",
        action="extend",
        default=[],
        metavar="DOMAIN.xml",
        help="libvirt domain XML files (virsh dumpxml NAME), one VM each; after the other "
        "arguments",
    )


# --- check -----------------------------------------------------------------------------------
def _problem_json(p: Problem) -> dict[str, Any]:
    return {
        "line": p.line,
        "column": p.column,
        "level": p.level,
        "rule": p.rule,
        "message": p.message,
        "path": p.path,
    }


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _machine_and_domains(args: argparse.Namespace) -> tuple[HostFacts | None, list[Domain]]:
    machine = read_host(args.sysfs) if args.host or args.sysfs else None
    return machine, [load_domain(path) for path in args.libvirt]


def _firmware_check(tables: Path | None) -> Callable[[str, Policy], list[Problem]] | None:
    """``--tables``: a function adding the firmware comparison's warnings (docs/acpi.md)."""
    if tables is None:
        return None
    from .acpi.host import probe_tables
    from .acpi.policytags import firmware_problems

    report = probe_tables(tables, timeout=30.0)
    return lambda name, policy: firmware_problems(name, policy, report)


def run_check(args: argparse.Namespace) -> int:
    firmware = _firmware_check(args.tables)
    machine, domains = _machine_and_domains(args)
    results: list[tuple[str, list[Problem]]] = []
    for name in args.files:
        problems = check_against(name, machine, domains)
        if firmware is not None:
            policy, _ = read_policy(name)
            if policy is not None:
                problems = sorted([*problems, *firmware(name, policy)])
        results.append((name, problems))
    failed = False
    report: list[dict[str, Any]] = []
    for name, problems in results:
        errors = sum(1 for p in problems if p.level == "error")
        warnings = len(problems) - errors
        bad = errors > 0 or (args.strict and warnings > 0)
        failed = failed or bad
        if args.json:
            report.append(
                {
                    "file": name,
                    "ok": not bad,
                    "errors": errors,
                    "warnings": warnings,
                    "problems": [_problem_json(p) for p in problems],
                }
            )
            continue
        for p in problems:
            print(p.format())
        if errors:
            print(f"{name}: {_count(errors, 'error')}", file=sys.stderr)
        elif warnings:
            print(f"{name}: ok ({_count(warnings, 'warning')})")
        else:
            print(f"{name}: ok")
    if args.json:
        checked = {
            "host": str(machine.sysfs) if machine is not None else None,
            "libvirt": [d.source for d in domains],
        }
        doc = {"schema": CHECK_SCHEMA, "ok": not failed, "strict": args.strict}
        print(json.dumps({**doc, "checked": checked, "files": report}, indent=2))
    return 1 if failed else 0


# --- init ------------------------------------------------------------------------------------
def _tags_source(path: str | None) -> TagsSource | None:
    if path is None:
        return None
    entries, problems = read_tags(path)
    for p in problems:
        print(p.format(), file=sys.stderr)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise PolicyQueryError(f"{path}: {_count(len(errors), 'error')} in the steering tags")
    if not entries:
        raise PolicyQueryError(f"{path}: no steering tags in it")
    return TagsSource(path, tuple(entries))


def _scan_summary(machine: HostFacts) -> str:
    base = machine.sysfs / "bus" / "pci" / "devices"
    found, n = machine.tph_functions, len(machine.functions)
    if found:
        words = ", ".join(f"{f.bdf} ({f.status})" for f in found)
        summary = f"{_count(len(found), 'TPH device')} under {base}: {words}"
    else:
        summary = f"no TPH device: none of the {n} PCI functions under {base} has a TPH Requester"
    if machine.unexamined:
        summary += f"; {len(machine.unexamined)} not examined (see the comments)"
    return summary


def _write_output(path: str, text: str, force: bool) -> None:
    target = Path(path)
    if target.exists() and not force:
        raise PolicyQueryError(f"{path} exists; use --force to overwrite it")
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PolicyQueryError(f"cannot write {path}: {exc.strerror or exc}") from exc


def run_init(args: argparse.Namespace) -> int:
    machine, domains = _machine_and_domains(args)
    assert machine is not None  # init always reads the host
    tags = _tags_source(args.tags)
    sources = [str(machine.sysfs), *(d.source for d in domains)]
    if tags is not None:
        sources.append(tags.path)
    text = render_policy(machine, domains, tags, sources)
    name = args.output or "<stdout>"
    print(f"tphtrap: {_scan_summary(machine)}", file=sys.stderr)
    problems = check_policy_text(text, name, machine, domains)
    if args.output:
        _write_output(args.output, text, args.force)
    else:
        sys.stdout.write(text)
    for p in problems:
        print(p.format(), file=sys.stderr)
    errors = sum(1 for p in problems if p.level == "error")
    placeholders = sum(1 for p in problems if p.rule == "tag-placeholder")
    if errors:
        todo = (
            f" ({_count(placeholders, 'steering_tags entry', 'steering_tags entries')} to fill in)"
            if placeholders
            else ""
        )
        print(
            f"tphtrap: {name}: {_count(errors, 'error')}{todo}: 'tphtrap policy check' refuses "
            "it until they are fixed",
            file=sys.stderr,
        )
    else:
        print(f"tphtrap: {name}: passes 'tphtrap policy check'", file=sys.stderr)
    return 0


# --- schema ----------------------------------------------------------------------------------
def run_schema(args: argparse.Namespace) -> int:
    text = json.dumps(policy_schema(), indent=2) + "\n"
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise PolicyQueryError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    else:
        sys.stdout.write(text)
    return 0


# --- explain ---------------------------------------------------------------------------------
def _tag_of(host: HostPolicy, cpu: int, width: TagWidth) -> int | None:
    tags = host.steering_tags.get(cpu)
    return tags.tag(width) if tags is not None else None


def _fallback_view(host: HostPolicy, vm: VmPolicy, rules: TagRules) -> dict[str, Any]:
    """Per width, the fallback tag and the CPU it is the tag of, or ``neutral: true`` when it is
    the neutral tag no CPU of the VM provides (mirrors TagRules.build); None: no fallback."""
    dev = vm.devices.get(rules.bdf)
    wanted = dev.fallback_cpu if dev is not None else None
    wanted = wanted if wanted is not None else vm.fallback_cpu
    order = [wanted] if wanted is not None else sorted(vm.cpus)
    out: dict[str, Any] = {}
    for width in TagWidth:
        tag = rules.fallback[width]
        cpu = next((c for c in order if _tag_of(host, c, width) == tag), None)
        if tag is None:
            out[str(int(width))] = None
        elif cpu is None:
            out[str(int(width))] = {"tag": tag, "neutral": True}
        else:
            out[str(int(width))] = {"tag": tag, "cpu": cpu}
    return out


def _width_view(
    host: HostPolicy, vm: VmPolicy, rules: TagRules, width: TagWidth, idle: str | None
) -> dict[str, Any]:
    owners = host.owners(width)
    neutral = host.neutral(width)
    allowed = [
        {"tag": tag, "cpus": format_cpulist(owners.get(tag, ())), "neutral": tag in neutral}
        for tag in sorted(rules.allowed[width])
    ]
    own = {t for c in vm.cpus if (t := _tag_of(host, c, width)) is not None}
    refused = [
        {
            "tag": tag,
            "cpus_in_vm": format_cpulist(owners[tag] & vm.cpus),
            "cpus_outside": format_cpulist(owners[tag] - vm.cpus),
        }
        for tag in sorted(own - rules.allowed[width])
    ]
    untagged = [c for c in sorted(vm.cpus) if _tag_of(host, c, width) is None]
    return {
        "requester_enable": _MODE[width],
        "in_force": idle is None,
        "not_in_force_because": idle,
        "allowed": allowed,
        "refused": refused,
        "cpus_without_tag": format_cpulist(untagged),
    }


def _device_view(policy: Policy, vm: VmPolicy, bdf: str) -> dict[str, Any]:
    dev = vm.devices[bdf]
    rules = policy.rules(vm.name, bdf)
    off: list[str] = []
    if not vm.tph:
        off.append(f"VM {vm.name!r} sets tph: false")
    if not dev.tph:
        off.append("the device sets tph: false")
    if not off and not rules.allowed[TagWidth.ST8] and not rules.ext_allowed:
        off.append(f"no steering tag is allowed for VM {vm.name!r}")
    no_ext: list[str] = []
    if not vm.extended_tph:
        no_ext.append(f"VM {vm.name!r} sets extended_tph: false")
    if not dev.extended_tph:
        no_ext.append("the device sets extended_tph: false")
    if not rules.allowed[TagWidth.ST16]:
        no_ext.append(f"no 16-bit tag is allowed for VM {vm.name!r}")
    return {
        "bdf": bdf,
        "rule": rules.rule,
        "tph": {"forced_off": bool(off), "why": off},
        "extended_tph": {"allowed": rules.ext_allowed and not off, "why_not": no_ext},
        "no_st_mode": {str(int(w)): rules.host_ok(0, w) for w in TagWidth},
        "on_violation": rules.on_violation.value,
        "on_violation_from": "device" if dev.on_violation is not None else "vm",
        "fallback": _fallback_view(policy.host, vm, rules),
    }


def explain_vm(policy: Policy, vm_name: str, bdf: str | None = None) -> dict[str, Any]:
    """What ``policy`` lets VM ``vm_name`` do (and its devices, or only ``bdf``), as data."""
    vm = policy.vms.get(vm_name)
    if vm is None:
        known = ", ".join(policy.vms) or "none"
        raise PolicyQueryError(f"VM {vm_name!r} is not in {policy.source} (its VMs: {known})")
    if bdf is not None:
        try:
            bdf = normalize_bdf(bdf)
        except ValueError as exc:
            raise PolicyQueryError(str(exc)) from exc
        if bdf not in vm.devices:
            owner = policy.vm_of_device(bdf)
            where = f" (it belongs to VM {owner.name!r})" if owner is not None else ""
            raise PolicyQueryError(f"device {bdf} is not assigned to VM {vm_name!r}{where}")
    host = policy.host
    base = TagRules.build(host, vm, DeviceSettings(bdf="-"))  # the VM-wide view
    idle: dict[TagWidth, str | None] = {TagWidth.ST8: None, TagWidth.ST16: None}
    if not vm.tph:
        idle = dict.fromkeys(TagWidth, "tph: false")
    elif not vm.extended_tph:
        idle[TagWidth.ST16] = "extended_tph: false"
    elif not base.allowed[TagWidth.ST16]:
        idle[TagWidth.ST16] = "no 16-bit tag is allowed, so Extended TPH is never granted"
    virtual = None
    if vm.vcpus is not None and base.translate is not None:
        virtual = [
            {
                "virtual_tag": i,
                "cpu": cpu,
                "8": base.translate[TagWidth.ST8][i],
                "16": base.translate[TagWidth.ST16][i],
            }
            for i, cpu in enumerate(vm.vcpus)
        ]
    devices = [bdf] if bdf is not None else sorted(vm.devices)
    return {
        "policy": policy.source,
        "vm": vm.name,
        "cpus": format_cpulist(vm.cpus),
        "tph": vm.tph,
        "extended_tph": vm.extended_tph,
        "share_cpus_with": sorted(vm.share_cpus_with),
        "tags": {str(int(w)): _width_view(host, vm, base, w, idle[w]) for w in TagWidth},
        "virtual_tags": virtual,
        "on_violation": vm.on_violation.value,
        "fallback": _fallback_view(host, vm, base),
        "devices": [_device_view(policy, vm, b) for b in devices],
    }


def explain_policy(policy: Policy) -> dict[str, Any]:
    """:func:`explain_vm` for every VM of ``policy``, in the order of the file."""
    return {"policy": policy.source, "vms": [explain_vm(policy, name) for name in policy.vms]}


# --- explain: plain words --------------------------------------------------------------------
def _hex(tag: int | None, width: int) -> str:
    return "-" if tag is None else f"{tag:#0{2 + width // 4}x}"


_VIOLATION_WORDS = {
    OnViolation.DROP.value: "drop: the write never reaches the device, which keeps its tag",
    OnViolation.REWRITE.value: "rewrite: the refused tag is replaced by the fallback tag",
    OnViolation.DISABLE.value: (
        "disable: TPH Requester Enable is forced off for the device until its next reset"
    ),
}


def _fallback_words(fallback: dict[str, Any]) -> str:
    parts = []
    for width in ("8", "16"):
        fb = fallback[width]
        if fb is None:
            parts.append(f"none at {width} bits (such writes are dropped instead)")
        elif fb.get("neutral"):
            parts.append(f"{_hex(fb['tag'], int(width))} at {width} bits (neutral)")
        else:
            parts.append(f"{_hex(fb['tag'], int(width))} at {width} bits (CPU {fb['cpu']})")
    return ", ".join(parts)


def _violation_lines(data: dict[str, Any], indent: str, origin: str = "") -> list[str]:
    lines = [f"{indent}on a violation{origin}: {_VIOLATION_WORDS[data['on_violation']]}"]
    if data["on_violation"] == OnViolation.REWRITE.value:
        lines.append(f"{indent}  fallback: {_fallback_words(data['fallback'])}")
    return lines


def render_explanation(data: dict[str, Any]) -> str:
    """The plain-words rendering of :func:`explain_vm`'s data."""
    out: list[str] = [f"VM {data['vm']!r} in {data['policy']}"]
    out.append(f"  host CPUs it may steer to: {data['cpus']}")
    if data["share_cpus_with"]:
        out.append(f"  shares CPUs with: {', '.join(data['share_cpus_with'])}")
    if not data["tph"]:
        out.append("  TPH: off for every device of this VM (tph: false)")
    translated = data["virtual_tags"] is not None
    whose = "host tags the device may hold" if translated else "tags the guest may write"
    for key, view in data["tags"].items():
        w = int(key)
        head = f"  {w}-bit {whose} (Requester Enable {view['requester_enable']!r})"
        if not view["in_force"]:
            head += f" (never in force: {view['not_in_force_because']})"
        out.append(head + ":")
        allowed = [
            f"{_hex(a['tag'], w)} ({'neutral' if a['neutral'] else 'CPUs ' + a['cpus']})"
            for a in view["allowed"]
        ]
        out.append(f"    allowed: {', '.join(allowed) if allowed else 'none'}")
        for r in view["refused"]:
            out.append(
                f"    refused: {_hex(r['tag'], w)}, the tag of CPUs {r['cpus_in_vm']}, is shared "
                f"with CPUs {r['cpus_outside']} outside the VM"
            )
        if view["cpus_without_tag"]:
            out.append(f"    the firmware reports no tag for CPUs {view['cpus_without_tag']}")
        out.append("    every other tag is refused")
    if not translated:
        out.append("  virtual tags: none; the guest writes host tags")
    else:
        out.append(
            "  virtual tags: the guest writes vCPU numbers (the same at 8 and 16 bits); each "
            "becomes the host tag of the CPU that vCPU is pinned to:"
        )
        for v in data["virtual_tags"]:
            out.append(
                f"    {v['virtual_tag']} (vCPU {v['virtual_tag']}, on CPU {v['cpu']}) -> "
                f"{_hex(v['8'], 8)} at 8 bits, {_hex(v['16'], 16)} at 16 bits"
            )
        out.append("    any other value, or a '-' above, is a violation")
    out.extend(_violation_lines(data, "  "))
    out.append("  devices:" if data["devices"] else "  devices: none")
    for d in data["devices"]:
        out.append(f"    {d['bdf']}:")
        if d["tph"]["forced_off"]:
            out.append(f"      TPH forced off: {'; '.join(d['tph']['why'])}")
            continue
        out.append("      TPH allowed (if the device has a standard ST table)")
        if d["extended_tph"]["allowed"]:
            out.append("      Extended TPH allowed (if the device and its root port support it)")
        else:
            why = "; ".join(d["extended_tph"]["why_not"])
            out.append(f"      Extended TPH downgraded to TPH only: {why}")
        ns = [f"{k}-bit" for k, ok in d["no_st_mode"].items() if ok]
        out.append(
            "      No ST mode (the device sends tag 0): "
            + (f"allowed with {' and '.join(ns)} tags" if ns else "refused, tag 0 is not allowed")
        )
        origin = " (set for this device)" if d["on_violation_from"] == "device" else ""
        out.extend(_violation_lines(d, "      ", origin))
    return "\n".join(out)


def run_explain(args: argparse.Namespace) -> int:
    policy, problems = read_policy(args.file)
    if policy is None:
        for p in problems:
            if p.level == "error":
                print(p.format(), file=sys.stderr)
        print(
            f"tphtrap: error: {args.file} has errors; run 'tphtrap policy check'", file=sys.stderr
        )
        return 1
    if args.vm is None and args.dev is None:
        doc = explain_policy(policy)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print("\n\n".join(render_explanation(d) for d in doc["vms"]))
        return 0
    vm = args.vm if args.vm is not None else _vm_of(policy, args.dev)
    data = explain_vm(policy, vm, args.dev)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render_explanation(data))
    return 0


def _vm_of(policy: Policy, bdf: str) -> str:
    try:
        want = normalize_bdf(bdf)
    except ValueError as exc:
        raise PolicyQueryError(str(exc)) from exc
    vm = policy.vm_of_device(want)
    if vm is None:
        raise PolicyQueryError(f"device {want} is not assigned to any VM in {policy.source}")
    return vm.name
