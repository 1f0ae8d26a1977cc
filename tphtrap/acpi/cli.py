"""``tphtrap acpi host|guest``: steering tags from the host's firmware, and for the guest's.

Exit status: 0 success; 1 the firmware reports no usable steering tags, or a user error (bad
table, policy, VM); 2 usage error; 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..policyfile import load_policy
from .errors import AcpiError
from .guest import QEMU_HOST_BRIDGE, compile_asl, guest_asl, guest_tags
from .guestcheck import check_guest_tables
from .host import probe_tables
from .hostreport import render_json, render_text
from .tables import LIVE_TABLES
from .tools import DEFAULT_TIMEOUT

__all__ = ["add_parser"]

_FMT = argparse.RawDescriptionHelpFormatter


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("give 0 < SECONDS <= 3600")
    return value


def _bridge_and_timeout(parser: argparse.ArgumentParser, bridge_help: str, tools: str) -> None:
    parser.add_argument("--bridge", action="append", default=[], metavar="PATH", help=bridge_help)
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit for each run of {tools} (default {DEFAULT_TIMEOUT:g})",
    )


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``acpi`` and its subcommands."""
    acpi = sub.add_parser(
        "acpi",
        help="steering tags from the host's ACPI _DSM; an SSDT with the guest's own",
        description=(
            "Both ends of the PCI firmware _DSM that Linux's pcie_tph_get_cpu_st evaluates\n"
            "(docs/acpi.md): read the host's steering tags from its firmware, and build the\n"
            "table that gives a guest its virtual tags."
        ),
        formatter_class=_FMT,
    )
    cmds = acpi.add_subparsers(dest="acpi_command", metavar="SUBCOMMAND")
    cmds.required = True

    host = cmds.add_parser(
        "host",
        help="print this host's steering tags as a policy's host.steering_tags block",
        description=(
            "Evaluate the TPH _DSM (function 0xF) of every PCI host bridge for every CPU's ACPI\n"
            "processor UID with acpiexec, offline, and print a host.steering_tags block to\n"
            "paste into a policy. Exit status 1 when the firmware reports no steering tags,\n"
            "when host bridges disagree, or when answers depend on hardware acpiexec cannot\n"
            "read offline (the message says which)."
        ),
        epilog=(
            "examples:\n"
            "  tphtrap acpi host                       # this host (root: reads "
            f"{LIVE_TABLES})\n"
            "  acpidump -b && tphtrap acpi host --tables .   # another host's dump"
        ),
        formatter_class=_FMT,
    )
    host.add_argument(
        "--tables",
        metavar="DIR",
        type=Path,
        help=f"a directory of tables from 'acpidump -b' (default: {LIVE_TABLES} and sysfs)",
    )
    _bridge_and_timeout(
        host, "ask only this host bridge (e.g. '\\_SB.PC00'); repeat for several", "acpiexec"
    )
    host.add_argument("--json", action="store_true", help="print the full report as JSON")
    host.set_defaults(func=run_host)

    guest = cmds.add_parser(
        "guest",
        help="build the SSDT that gives a VM's guest its virtual steering tags",
        description=(
            "Write an SSDT (compiled with iasl) whose _DSM on the guest's host bridge answers\n"
            "each vCPU's virtual tag (vCPU i: tag i, at 8 and 16 bits) to the guest's\n"
            "pcie_tph_get_cpu_st, for a VM with vcpus. Pass it to QEMU with\n"
            "-acpitable file=FILE.aml (docs/acpi.md has the libvirt XML)."
        ),
        epilog=(
            "examples:\n"
            "  tphtrap acpi guest --policy policies/translation.yaml --vm web -o web.aml\n"
            "  tphtrap acpi guest --policy policies/translation.yaml --vm web --asl\n"
            "  tphtrap acpi guest --policy P --vm web -o web.aml --guest-dsdt DSDT"
        ),
        formatter_class=_FMT,
    )
    guest.add_argument("--policy", required=True, metavar="P", help="the policy file")
    guest.add_argument("--vm", required=True, metavar="V", help="the VM (it needs vcpus)")
    guest.add_argument(
        "-o", "--output", metavar="FILE", type=Path, help="write the table (or ASL) to FILE"
    )
    guest.add_argument("--asl", action="store_true", help="write the ASL source, not AML")
    _bridge_and_timeout(
        guest,
        f"the guest's host bridge (default {QEMU_HOST_BRIDGE}); repeat for expander bridges "
        "(QEMU pxb-pcie: \\_SB.PCxx, xx the bus number in hex)",
        "iasl and acpiexec",
    )
    guest.add_argument(
        "--guest-dsdt",
        metavar="FILE",
        type=Path,
        help="check the table against this guest DSDT (e.g. the guest's "
        "/sys/firmware/acpi/tables/DSDT) with acpiexec before writing it",
    )
    guest.set_defaults(func=run_guest)


def run_host(args: argparse.Namespace) -> int:
    report = probe_tables(args.tables, only_bridges=args.bridge, timeout=args.timeout)
    failure = report.failure()
    if args.json:
        print(json.dumps(render_json(report), indent=2))
    else:
        print(render_text(report))
    if failure is not None:
        print(f"tphtrap: {failure}", file=sys.stderr)
        return 1
    return 0


def _write(path: Path | None, data: bytes) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise AcpiError(f"cannot write {path}: {exc.strerror or exc}") from exc


def run_guest(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    bridges = args.bridge or [QEMU_HOST_BRIDGE]
    asl = guest_asl(policy, args.vm, bridges)
    tags = guest_tags(policy, args.vm)
    if not args.asl and args.output is None and sys.stdout.isatty():
        raise AcpiError("the table is binary AML: give -o FILE.aml, or --asl for the source")
    aml = compile_asl(asl, timeout=args.timeout)
    if args.guest_dsdt is not None:
        with tempfile.TemporaryDirectory(prefix="tphtrap-ssdt-") as tmp:
            ssdt = Path(tmp) / "ssdt.aml"
            ssdt.write_bytes(aml)
            check = check_guest_tables(args.guest_dsdt, ssdt, tags, bridges, timeout=args.timeout)
        print(
            f"checked against {args.guest_dsdt}: loads cleanly; {', '.join(check.bridges)} "
            f"answer the expected tags for {check.uids_checked} UIDs",
            file=sys.stderr,
        )
    _write(args.output, asl.encode() if args.asl else aml)
    if args.output is not None:
        valid = sum(1 for t in tags if t.st8 is not None or t.st16 is not None)
        print(
            f"wrote {args.output}: _DSM on {', '.join(bridges)} with the virtual tags of "
            f"{valid} of {len(tags)} vCPUs of VM {args.vm!r}"
            + ("" if args.asl else f"; QEMU: -acpitable file={args.output}"),
            file=sys.stderr,
        )
    return 0
