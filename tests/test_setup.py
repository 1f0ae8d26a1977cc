"""``tools/setup-debian``: the set-up step of ``make test``, ``make demo`` and ``.ci/run``.

The real script runs against the real dpkg database. Installing for real is exercised by
``.ci/run`` on a fresh machine; here: the fast path, the one-line stop for a non-root user or a
machine without apt-get, and malformed package lists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, debian_packages

SCRIPT = REPO / "tools" / "setup-debian"
ABSENT = "tphtrap-test-absent-package"  # a name no Debian archive has: never installed


def run_setup(
    *args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "/bin/sh", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        env=env,
    )


def as_nobody() -> tuple[str, ...]:
    """A prefix running the command as the unprivileged user ``nobody`` (empty: not root)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # util-linux is Essential on Debian: only elsewhere
        pytest.skip("setpriv (util-linux) is needed to drop root for this test")
    return (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")


def path_without_apt(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has dpkg-query and id but no apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dpkg-query", "id"):
        found = shutil.which(tool)
        assert found, f"{tool} is part of every Debian system"
        (bin_dir / tool).symlink_to(found)
    return {"PATH": str(bin_dir), "LC_ALL": "C"}


def package_list(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "packages.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the user ``nobody`` can read (pytest's tmp_path is private to its user)."""
    with tempfile.TemporaryDirectory(prefix="tphtrap-setup-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def test_everything_installed_is_silent_and_quick() -> None:
    res = run_setup()
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_everything_installed_needs_neither_root_nor_apt(tmp_path: Path) -> None:
    res = run_setup(prefix=as_nobody())
    assert (res.returncode, res.stderr) == (0, "")
    res = run_setup(env=path_without_apt(tmp_path))
    assert (res.returncode, res.stderr) == (0, "")


def test_non_root_stops_with_the_one_command(public_dir: Path) -> None:
    listed = package_list(public_dir, "# tools", "pciutils", f"{ABSENT}  # not in Debian", "")
    res = run_setup(listed, prefix=as_nobody())
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [
        f"setup-debian: missing Debian packages: {ABSENT}; run: sudo apt-get install -y {ABSENT}"
    ]


def test_no_apt_stops_with_the_one_command(tmp_path: Path) -> None:
    listed = package_list(tmp_path, ABSENT, "pciutils", f"{ABSENT}-2")
    res = run_setup(listed, env=path_without_apt(tmp_path))
    assert res.returncode == 1
    assert res.stderr == (
        "setup-debian: missing Debian packages and no apt-get here; on Debian run: "
        f"sudo apt-get install -y {ABSENT} {ABSENT}-2\n"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("gcc g++", "one package per line, got 'gcc g++'"),
        ("-y", "not a Debian package name: '-y'"),
        ("Pciutils", "not a Debian package name: 'Pciutils'"),
    ],
)
def test_a_bad_line_is_named_with_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    listed = package_list(tmp_path, "pciutils", "", line)
    res = run_setup(listed)
    assert res.returncode == 1
    assert res.stderr == f"setup-debian: {listed}:3: {message}\n"


def test_an_unreadable_list_is_an_error(tmp_path: Path) -> None:
    res = run_setup(str(tmp_path / "nope.txt"))
    assert res.returncode == 1 and "cannot read" in res.stderr


def test_the_list_holds_what_the_project_needs() -> None:
    listed = debian_packages()
    assert len(listed) == len(set(listed)), "a package is listed twice"
    for package in ("python3-venv", "pciutils", "gcc"):
        assert package in listed


@pytest.mark.parametrize("target", ["test", "demo", "setup"])
def test_make_targets_run_the_set_up_first(target: str) -> None:
    res = subprocess.run(
        ["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    commands = [line for line in res.stdout.splitlines() if line.strip()]
    assert commands[0] == "sh tools/setup-debian", commands


def test_ci_runs_the_set_up_then_make_test() -> None:
    lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[-2:] == ["sh tools/setup-debian </dev/null", "exec make test </dev/null"]
