"""Running Debian's ACPICA tools (``iasl``, ``acpiexec``): found on PATH, always time-bounded.

A table may loop or sleep forever when evaluated; every run has a timeout after which the tool's
whole process group is killed, and its output is read through a file with a size limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AcpiError, AcpiToolMissing

__all__ = ["ACPICA_PACKAGE", "DEFAULT_TIMEOUT", "MAX_OUTPUT", "ToolRun", "find_tool", "run_tool"]

ACPICA_PACKAGE = "acpica-tools"
DEFAULT_TIMEOUT = 30.0  # seconds per tool run
MAX_OUTPUT = 64 << 20  # no honest evaluation prints this much


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    output: str  # stdout and stderr, interleaved as printed


def find_tool(name: str) -> str:
    """The path of an ACPICA tool, or :class:`AcpiToolMissing` naming the package to install."""
    found = shutil.which(name)
    if found is None:
        raise AcpiToolMissing(
            f"{name} is not installed: it comes with Debian's {ACPICA_PACKAGE} "
            f"(apt-get install {ACPICA_PACKAGE})"
        )
    return found


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    stdin_text: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    cwd: Path | None = None,
) -> ToolRun:
    """Run ``argv`` with ``stdin_text`` as input; :class:`AcpiError` on timeout or huge output.

    ``what`` says what the run was for (it starts every error message).
    """
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # its own process group, killed whole on timeout
            )
        except OSError as exc:
            raise AcpiError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from exc
        try:
            proc.communicate(stdin_text.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise AcpiError(
                f"{what}: {Path(argv[0]).name} did not finish within {timeout:g} s and was "
                "killed (a table loops, sleeps or waits; --timeout sets the limit)"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        size = out.tell()
        if size > MAX_OUTPUT:
            raise AcpiError(
                f"{what}: {Path(argv[0]).name} printed {size} bytes, more than the "
                f"{MAX_OUTPUT >> 20} MiB any honest evaluation prints"
            )
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    return ToolRun(proc.returncode, text)
