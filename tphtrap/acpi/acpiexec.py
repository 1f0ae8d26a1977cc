"""``acpiexec`` as an offline AML interpreter: load tables, run commands, read the answers.

Commands go to acpiexec's debugger on standard input, one per line, each followed by the
evaluation of a random path no table defines, whose "not found" line ends the command's
output. The output is trusted only with exactly one such line per command: AML can print
(through the Debug object, silenced here with debug level ``0x2000`` that still shows returned
buffers), but it cannot know the path, and returned strings are printed escaped, so a table
cannot pass text off as an answer. ``-vr`` makes acpiexec report every operation region
access: an answer that read a region was computed from acpiexec's simulated hardware, not
the machine's.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AcpiError
from .tools import DEFAULT_TIMEOUT, find_tool, run_tool

__all__ = [
    "AmlOther",
    "AmlValue",
    "CommandOutput",
    "Evaluation",
    "Session",
    "evaluate_commands",
    "run_acpiexec",
]

DEBUG_LEVEL = "0x2000"  # ACPI_LV_TABLES: buffers are dumped, Debug object output is not
LOOP_TIMEOUT = 2  # seconds before acpiexec aborts a While loop (AE_AML_LOOP_TIMEOUT)


@dataclass(frozen=True)
class AmlOther:
    """A returned object of a kind tphtrap does not use (reference, processor, ...)."""

    text: str


AmlValue = int | str | bytes | tuple["AmlValue", ...] | AmlOther


@dataclass(frozen=True)
class CommandOutput:
    command: str
    lines: tuple[str, ...]

    @property
    def region_accesses(self) -> tuple[str, ...]:
        """acpiexec's ``-vr`` lines: an operation region (hardware) was read or written."""
        return tuple(ln.strip() for ln in self.lines if ln.startswith("AcpiExec: "))

    @property
    def acpi_errors(self) -> tuple[str, ...]:
        return tuple(
            ln.strip()
            for ln in self.lines
            if ln.startswith(("ACPI Error", "ACPI Exception", "ACPI BIOS Error", "ACPI Warning"))
            and "Outstanding" not in ln  # acpiexec's own allocation bookkeeping at exit
        )


@dataclass(frozen=True)
class Session:
    tables: tuple[Path, ...]
    init: CommandOutput  # what acpiexec printed while loading the tables
    outputs: tuple[CommandOutput, ...]


@dataclass(frozen=True)
class Evaluation:
    path: str
    status: str | None = None  # the AE_ code when the evaluation failed
    value: AmlValue | None = None  # None: failed, or no object returned
    returned: bool = False
    regions: tuple[str, ...] = field(default=())
    errors: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.status is None


def _marker() -> str:
    """A path no table defines: its "not found" line separates the answers of two commands.

    acpiexec reads commands in one thread and runs them in another, so its prompt and echo
    lines land unpredictably among the answers; the markers' lines come from the thread that
    runs the commands, in order. A table cannot imitate one: the path is drawn afresh for
    every run.
    """
    letters = string.ascii_uppercase
    return "\\" + ".".join(
        secrets.choice(letters) + "".join(secrets.choice(letters + string.digits) for _ in "abc")
        for _ in range(4)
    )


def _split(
    output: str, commands: Sequence[str], marker: str, what: str
) -> tuple[CommandOutput, ...]:
    done = f"Evaluation of {marker} failed with status AE_NOT_FOUND"
    noise = {"", "-", *commands, *(f"- {c}" for c in commands), f"evaluate {marker}"}
    noise |= {f"- evaluate {marker}", f"Evaluating {marker}", "- quit", "quit"}
    blocks: list[list[str]] = [[]]
    for line in output.splitlines():
        if line.strip() == done:
            blocks.append([])
        elif line.strip() not in noise:
            blocks[-1].append(line)
    # init, then one block per command between markers, then what follows the last marker
    if len(blocks) != len(commands) + 2:
        raise AcpiError(
            f"{what}: acpiexec answered {len(blocks) - 2} of the {len(commands)} commands sent "
            "(it stopped early or crashed)"
        )
    return tuple(
        CommandOutput(cmd, tuple(lines))
        for cmd, lines in zip(["", *commands], blocks[:-1], strict=True)
    )


def run_acpiexec(
    tables: Sequence[Path],
    commands: Sequence[str],
    *,
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> Session:
    """Load ``tables`` into acpiexec, run ``commands``; the output split per command."""
    for cmd in commands:
        if "\n" in cmd or cmd.strip() != cmd or not cmd:
            raise ValueError(f"not a single acpiexec command: {cmd!r}")
    exe = find_tool("acpiexec")
    argv = [exe, "-x", DEBUG_LEVEL, "-vr", "-to", str(LOOP_TIMEOUT), *map(str, tables)]
    marker = _marker()
    sent = [f"evaluate {marker}"]
    for cmd in commands:
        sent += [cmd, f"evaluate {marker}"]
    stdin = "".join(f"{c}\n" for c in [*sent, "quit"])
    run = run_tool(argv, what=what, stdin_text=stdin, timeout=timeout)
    if "tables successfully acquired and loaded" not in run.output:
        detail = _load_failure(run.output)
        raise AcpiError(f"{what}: acpiexec could not load the tables: {detail}")
    blocks = _split(run.output, commands, marker, what)
    return Session(tuple(tables), blocks[0], blocks[1:])


def _load_failure(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    useful = [
        ln
        for ln in lines
        if ln.startswith(("ACPI Error", "ACPI Exception", "ACPI BIOS Error", "Could not"))
        or "Error" in ln
        or "Invalid" in ln
    ]
    return "; ".join((useful or lines[-3:])[:3]) or "no output"


# --- answers -----------------------------------------------------------------------------
_EVAL_OK = re.compile(r"^Evaluation of (\S+) returned object 0x[0-9a-fA-F]+")
_EVAL_FAILED = re.compile(r"^Evaluation of (\S+) failed with status (\w+)")
_NO_OBJECT = re.compile(r"^No object was returned from evaluation of (\S+)")
_VALUE = re.compile(r"^(\s*)\[([A-Za-z ]+)\](.*)$")
_HEXROW = re.compile(r"^\s*[0-9A-Fa-f]{4}: ((?:[0-9A-Fa-f]{2}(?: |$))+)")
_LENGTH = re.compile(r"\s*Length ([0-9A-Fa-f]+) =(.*)$")
_ELEMENTS = re.compile(r"\s*Contains (\d+) Elements:")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unescape(s: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            if n == "x" and i + 3 < len(s):
                out.append(chr(int(s[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append(_ESCAPES.get(n, n))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


class _Values:
    """Reads acpiexec's dump of a returned object (``[Integer] = ...`` lines, nested)."""

    def __init__(self, lines: Sequence[str], where: str) -> None:
        self.lines = list(lines)
        self.pos = 0
        self.where = where

    def fail(self, why: str) -> AcpiError:
        return AcpiError(f"{self.where}: cannot read acpiexec's answer: {why}")

    def value(self) -> AmlValue:
        while self.pos < len(self.lines) and not self.lines[self.pos].strip():
            self.pos += 1
        if self.pos >= len(self.lines):
            raise self.fail("no value printed")
        m = _VALUE.match(self.lines[self.pos])
        if m is None:
            raise self.fail(f"unexpected line {self.lines[self.pos].strip()!r}")
        self.pos += 1
        kind, rest = m[2], m[3]
        if kind == "Integer":
            im = re.fullmatch(r"\s*=\s*([0-9A-Fa-f]+)\s*", rest)
            if im is None:
                raise self.fail(f"integer {rest!r}")
            return int(im[1], 16)
        if kind == "String":
            sm = re.fullmatch(r'\s*Length [0-9A-Fa-f]+ = "(.*)"\s*', rest)
            if sm is None:
                raise self.fail(f"string {rest!r}")
            return _unescape(sm[1])
        if kind == "Buffer":
            return self._buffer(rest)
        if kind == "Package":
            pm = _ELEMENTS.match(rest)
            if pm is None:
                raise self.fail(f"package {rest!r}")
            return tuple(self.value() for _ in range(int(pm[1])))
        return AmlOther(f"[{kind}]{rest}".strip())

    def _buffer(self, rest: str) -> bytes:
        lm = _LENGTH.match(rest)
        if lm is None:
            raise self.fail(f"buffer {rest!r}")
        length = int(lm[1], 16)
        data = bytearray()
        first = _HEXROW.match(lm[2])
        if first is not None:
            data.extend(bytes.fromhex(first[1]))
        while len(data) < length and self.pos < len(self.lines):
            row = _HEXROW.match(self.lines[self.pos])
            if row is None:
                break
            data.extend(bytes.fromhex(row[1]))
            self.pos += 1
        if len(data) != length:
            raise self.fail(f"{length}-byte buffer printed as {len(data)} bytes")
        return bytes(data)


def evaluation(out: CommandOutput) -> Evaluation:
    """The answer of one ``evaluate PATH ...`` command."""
    where = f"acpiexec '{out.command}'"
    for i, line in enumerate(out.lines):
        m = _EVAL_OK.match(line)
        if m is not None:
            value = _Values(out.lines[i + 1 :], where).value()
            return Evaluation(
                m[1],
                value=value,
                returned=True,
                regions=out.region_accesses,
                errors=out.acpi_errors,
            )
        m = _EVAL_FAILED.match(line)
        if m is not None:
            return Evaluation(
                m[1], status=m[2], regions=out.region_accesses, errors=out.acpi_errors
            )
        m = _NO_OBJECT.match(line)
        if m is not None:
            return Evaluation(m[1], regions=out.region_accesses, errors=out.acpi_errors)
    raise AcpiError(
        f"{where}: acpiexec printed no result (errors: {'; '.join(out.acpi_errors[:2]) or 'none'})"
    )


def evaluate_commands(
    tables: Sequence[Path], commands: Sequence[str], *, what: str, timeout: float
) -> tuple[Session, list[Evaluation]]:
    """Run ``evaluate`` commands and read each answer."""
    session = run_acpiexec(tables, commands, what=what, timeout=timeout)
    return session, [evaluation(o) for o in session.outputs]
