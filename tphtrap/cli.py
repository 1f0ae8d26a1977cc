"""Command line front door: ``tphtrap inspect|policy|serve|replay``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; this module only
wires them together and maps errors to exit codes:

====  =============================================================
0     success
1     user error: bad input, bad policy, malformed dump (one-line message)
2     usage error (unknown option, missing argument)
3     internal error (a bug: please report it with the message)
4     replay found decisions that differ from the expected ones (``--expect``)
5     replay left accesses or lines not judged (without ``--allow-unjudged``)
130   interrupted
====  =============================================================
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import TphtrapError

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_MISMATCH",
    "EXIT_OK",
    "EXIT_UNJUDGED",
    "EXIT_USAGE",
    "EXIT_USER",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_MISMATCH = 4
EXIT_UNJUDGED = 5
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with the documented usage-error status."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import policy_cmd, replay, report, serve

    parser = _Parser(
        prog="tphtrap",
        description=(
            "Trap-and-filter proxy for PCIe TPH steering tags: decides, for every guest write "
            "to the TPH capability or MSI-X Vector Control, whether it may reach the device."
        ),
        epilog="Run 'tphtrap COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"tphtrap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    report.add_parser(sub)
    policy_cmd.add_parser(sub)
    serve.add_parser(sub)
    replay.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except TphtrapError as exc:
        print(f"tphtrap: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `tphtrap inspect ... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        print(
            f"tphtrap: internal error: {type(exc).__name__}: {exc} (this is a bug)",
            file=sys.stderr,
        )
        if os.environ.get("TPHTRAP_DEBUG"):
            raise
        return EXIT_INTERNAL
    return rc
