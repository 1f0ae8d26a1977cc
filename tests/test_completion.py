"""``tphtrap completion bash|zsh``: the scripts complete what the parser accepts, in a real
bash (``COMP_WORDS``/``COMP_CWORD``, as readline calls the function) and a real zsh (typed
into an interactive shell through ``zpty``, Tab and all)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import TPHTRAP, require_tool

from tphtrap.cli import build_parser, main
from tphtrap.completion import command_tree


def script(shell: str) -> str:
    res = subprocess.run(
        [str(TPHTRAP), "completion", shell], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout


def bash_complete(tmp_path: Path, *lines: str) -> list[list[str]]:
    """What the bash function offers for each command line; the word being completed is the
    last one (an empty one after a trailing space)."""
    path = tmp_path / "tphtrap.bash"
    path.write_text(script("bash"))
    driver = [f"source {shlex.quote(str(path))}"]
    for line in lines:
        words = shlex.split(line) + ([""] if line.endswith(" ") else [])
        quoted = " ".join(shlex.quote(w) for w in words)
        driver += [
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=()",
            '_tphtrap; printf "%s\\n" "${COMPREPLY[*]}"',
        ]
    res = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", "\n".join(driver)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return [sorted(out.split()) for out in res.stdout.splitlines()]


def parser_options(*path: str) -> list[str]:
    """Every option string the parser accepts at ``path`` (the oracle)."""
    parser: argparse.ArgumentParser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return sorted(o for a in parser._actions for o in a.option_strings)


def test_bash_completes_commands_options_and_values(tmp_path: Path) -> None:
    (tmp_path / "pol.yaml").write_text("")
    (tmp_path / "nic.lspci").write_text("")
    got = bash_complete(
        tmp_path,
        "tphtrap ",
        "tphtrap po",
        "tphtrap policy ",
        "tphtrap policy ch",
        "tphtrap replay --format ",
        "tphtrap replay t.log --progress a",
        "tphtrap serve --log-level ",
        "tphtrap serve --policy p",
        "tphtrap inspect n",
        "tphtrap completion ",
        "tphtrap serve --audit a.jsonl --h",
        "tphtrap inspect --bdf ",
    )
    assert got == [
        ["acpi", "completion", "inspect", "policy", "replay", "serve"],
        ["policy"],
        ["check", "explain", "init", "schema"],
        ["check"],
        ["auto", "native", "qemu"],
        ["always", "auto"],
        ["debug", "info"],
        ["pol.yaml"],
        ["nic.lspci"],
        ["bash", "zsh"],
        ["--help", "--hex"],
        [],  # a PCI address: nothing to offer
    ]


COMMANDS = [
    (),
    ("inspect",),
    ("policy",),
    ("policy", "check"),
    ("policy", "schema"),
    ("policy", "explain"),
    ("serve",),
    ("replay",),
    ("completion",),
]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "tphtrap")
def test_bash_offers_every_option_of_the_parser(tmp_path: Path, path: tuple[str, ...]) -> None:
    line = " ".join(["tphtrap", *path, "-"])
    assert bash_complete(tmp_path, line) == [parser_options(*path)]


def test_every_command_of_the_parser_is_in_the_tree() -> None:
    tree = command_tree(build_parser())
    assert [c.path[-1] for c in tree.subcommands] == [
        "inspect",
        "policy",
        "serve",
        "replay",
        "acpi",
        "completion",
    ]
    policy = next(c for c in tree.subcommands if c.path[-1] == "policy")
    assert [c.path for c in policy.subcommands] == [
        ["tphtrap", "policy", name] for name in ("init", "check", "schema", "explain")
    ]


ZSH_DRIVER = r"""
zmodload zsh/zpty
fdir=$1; shift
zpty z zsh -f -i
zpty -w z "PS1='> '; bindkey -e; fpath=($fdir \$fpath); \
autoload -Uz compinit; compinit -u -D; tphtrap() { :; }; print \\\\x52EADY"
zpty -r z out '*READY*'
for line in "$@"; do
  zpty -w -n z "$line"$'\t'
  # Then print the edited line between markers that only the output spells out.
  zpty -w -n z $'\x01print -- "\\\\x3c\\\\x3c\x05\\\\x3e\\\\x3e"\n'
  zpty -r z out '*<<*>>*'
  print -r -- "${${out##*<<}%%>>*}"
done
zpty -d z
"""


def test_zsh_completes_in_a_real_interactive_zsh(tmp_path: Path) -> None:
    zsh = require_tool("zsh", "zsh")
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "_tphtrap").write_text(script("zsh"))
    syntax = subprocess.run([zsh, "-n", str(functions / "_tphtrap")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZSH_DRIVER)
    typed = {
        "tphtrap insp": "tphtrap inspect",
        "tphtrap --vers": "tphtrap --version",
        "tphtrap policy ex": "tphtrap policy explain",
        "tphtrap completion z": "tphtrap completion zsh",
        "tphtrap replay --form": "tphtrap replay --format",
        "tphtrap replay x.log --format qe": "tphtrap replay x.log --format qemu",
        "tphtrap serve --log-level d": "tphtrap serve --log-level debug",
        "tphtrap inspect --sy": "tphtrap inspect --sysfs",
    }
    res = subprocess.run(
        [zsh, "-f", str(driver), str(functions), *typed],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == list(typed.values())


def test_completion_needs_a_known_shell(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "fish"]) == 2
    assert "invalid choice: 'fish'" in capsys.readouterr().err
