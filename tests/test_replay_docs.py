"""The console examples of docs/replay.md are what the code prints today.

Each ```console block is a session: a ``$ tphtrap replay ...`` line is run (in-process, from the
repository root) and must print exactly the lines that follow it, standard output then
standard error, but for the elapsed time; ``$ echo $?`` must show its exit status.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tphtrap.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "replay.md"
_BLOCK = re.compile(r"```console\n(.*?)```", re.S)
_SECONDS = re.compile(r" in \d+\.\d\ds;")


def sessions() -> list[list[tuple[str, list[str]]]]:
    """Per console block: (command, expected output lines) in order."""
    out = []
    for block in _BLOCK.findall(DOC.read_text()):
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        out.append(steps)
    return out


def test_the_doc_has_console_examples() -> None:
    assert len(sessions()) >= 2


@pytest.mark.parametrize("steps", sessions(), ids=lambda s: s[0][0][:60])
def test_console_example_is_current(
    steps: list[tuple[str, list[str]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    rc = None
    for command, expected in steps:
        if command == "echo $?":
            assert expected == [str(rc)]
            continue
        argv = shlex.split(command)
        assert argv[:2] == ["tphtrap", "replay"], command
        rc = main(argv[1:])
        cap = capsys.readouterr()
        got = (cap.out + cap.err).splitlines()
        assert [_SECONDS.sub(" in T;", x) for x in got] == [
            _SECONDS.sub(" in T;", x) for x in expected
        ], command
