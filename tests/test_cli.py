"""Exit codes, the same for every command (``tphtrap.cli``), and the README's table of them."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers import REPO, TPHTRAP

from tphtrap import cli, report
from tphtrap.cli import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_UNJUDGED,
    EXIT_USAGE,
    EXIT_USER,
    main,
)

USAGE_ERRORS = [
    [],
    ["--bogus"],
    ["frobnicate"],
    ["inspect"],
    ["inspect", "--bogus", "x"],
    ["inspect", "--host", "x.lspci"],
    ["policy"],
    ["policy", "check"],
    ["policy", "explain"],
    ["policy", "init", "--sysfs"],
    ["serve"],
    ["serve", "--policy", "p.yaml", "--log-level", "loud"],
    ["replay", "--policy", "p.yaml"],
    ["replay", "t.jsonl", "--policy", "p.yaml", "--format", "xml"],
    ["completion"],
    ["completion", "fish"],
]
USER_ERRORS = [
    ["inspect", "no-such-file.lspci"],
    ["policy", "check", "fixtures/policies/bad/alias.yaml"],
    ["policy", "explain", "policies/two-tenants.yaml", "--vm", "nobody"],
    ["replay", "no-such-trace.jsonl", "--policy", "policies/two-tenants.yaml"],
]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TPHTRAP), *argv], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_the_codes() -> None:
    assert (EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_INTERNAL) == (0, 1, 2, 3)
    assert (EXIT_MISMATCH, EXIT_UNJUDGED, EXIT_INTERRUPTED) == (4, 5, 130)


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(none)")
def test_usage_errors_exit_2_with_the_usage(argv: list[str]) -> None:
    res = run(*argv)
    assert res.returncode == EXIT_USAGE, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert "error: " in res.stderr


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(none)")
def test_usage_errors_in_process_return_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_USAGE
    assert "error: " in capsys.readouterr().err


@pytest.mark.parametrize("argv", USER_ERRORS, ids=lambda a: " ".join(a))
def test_user_errors_exit_1_without_a_traceback(argv: list[str]) -> None:
    res = run(*argv)
    assert res.returncode == EXIT_USER, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip()


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["inspect", "--help"]])
def test_help_and_version_exit_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_OK
    assert capsys.readouterr().out


@pytest.mark.parametrize(
    ("fault", "code", "message"),
    [
        (RuntimeError("boom"), EXIT_INTERNAL, "tphtrap: internal error: RuntimeError: boom"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, ""),
    ],
)
def test_internal_errors_and_interrupts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: BaseException,
    code: int,
    message: str,
) -> None:
    def fail(_args: object) -> int:
        raise fault

    monkeypatch.delenv("TPHTRAP_DEBUG", raising=False)
    monkeypatch.setattr(report, "run", fail)
    assert main(["inspect", "fixtures/devices/no-tph.lspci"]) == code
    assert capsys.readouterr().err.startswith(message)


def test_readme_and_cli_docstring_list_every_code() -> None:
    """The README's table and cli.py's docstring give every EXIT_ constant its value."""
    codes = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| `(EXIT_[A-Z]+)` \|", readme, re.M))
    assert {name: int(value) for value, name in table.items()} == codes
    doc = cli.__doc__ or ""
    for value in codes.values():
        assert re.search(rf"^{value} +\S", doc, re.M), value
