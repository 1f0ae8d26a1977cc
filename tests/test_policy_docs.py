"""The ``tphtrap policy`` examples of docs/policy.md run and print what the page shows.

Each ``$ tphtrap ...`` line of a ``console`` block is run from the repository root, with
``/tmp/host`` the fake 2-socket host of ``tests/sysfs_tree.py`` and other ``/tmp/`` paths in a
scratch directory; its stdout and then stderr must be the lines below it (a ``...`` line stands
for any lines). Examples that depend on the machine they run on (``policy init`` of the live
host) or that write into the repository are not run.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sysfs_tree import two_socket

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "policy.md"


def _examples() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(), re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *expected = chunk.rstrip("\n").split("\n")
            out.append((command, expected))
    return out


def _runnable(command: str) -> bool:
    words = shlex.split(command)
    if words[:1] != ["tphtrap"] or any(w.startswith("[") for w in words):
        return False  # a synopsis, not a command
    if words[1:3] == ["policy", "init"] and "--sysfs" not in words:
        return False  # the live host: its output is this machine's
    out = words[words.index("-o") + 1] if "-o" in words else "/tmp/"
    return out.startswith("/tmp/")


RUNNABLE = [e for e in _examples() if _runnable(e[0])]
GLOB = "tphtrap policy check policies/*.yaml"  # the shell expands it: see the last test
EXAMPLES = [e for e in RUNNABLE if e[0] != GLOB]


def _matches(lines: list[str], expected: list[str]) -> bool:
    """``expected`` in order, each run of lines contiguous, ``...`` skipping any lines."""
    runs: list[list[str]] = [[]]
    for line in expected:
        if line == "...":
            runs.append([])
        else:
            runs[-1].append(line)
    at = 0
    for i, run in enumerate(runs):
        if not run:
            continue
        if i == 0 and lines[: len(run)] != run:
            return False
        for start in range(at, len(lines) - len(run) + 1):
            if lines[start : start + len(run)] == run:
                at = start + len(run)
                break
        else:
            return False
    return expected[-1:] == ["..."] or at == len(lines)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    two_socket(root / "host")
    return root


def test_the_page_has_examples_to_run() -> None:
    commands = [c.split()[:3] for c, _ in EXAMPLES]
    assert ["tphtrap", "policy", "init"] in commands
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize(("command", "expected"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_example_prints_what_the_page_shows(
    command: str, expected: list[str], scratch: Path
) -> None:
    exe = shutil.which("tphtrap", path=str(Path(sys.executable).parent))
    assert exe is not None
    local = command.replace("/tmp/", f"{scratch}/")  # /tmp/host is scratch/host
    words = shlex.split(local)
    if "-o" in words and "--force" not in words and words[1] == "policy":
        Path(words[words.index("-o") + 1]).unlink(missing_ok=True)
    proc = subprocess.run(
        [exe, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    got = (proc.stdout + proc.stderr).replace(f"{scratch}/", "/tmp/").splitlines()
    assert _matches(got, expected), "\n".join(got)


def test_glob_example_lists_every_example_policy() -> None:
    (expected,) = [e for c, e in RUNNABLE if c == GLOB]
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "policies").glob("*.yaml"))
    exe = shutil.which("tphtrap", path=str(Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run(
        [exe, "policy", "check", *files], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.stdout.splitlines() == expected


def test_strict_baseline_in_interrupt_vector_mode() -> None:
    """What docs/policy.md says of strict-baseline.yaml, on the engine itself."""
    from tphtrap.device import load_device
    from tphtrap.engine import Engine
    from tphtrap.events import ConfigWrite
    from tphtrap.policyfile import load_policy

    dev = load_device(REPO / "fixtures" / "devices" / "nic-st-in-cap.lspci")
    assert dev.tph is not None
    ctrl, entry0 = dev.tph.offset + 8, dev.tph.offset + 0xC
    iv_tph, no_st_tph = 0x101, 0x100

    def session() -> Engine:
        engine = Engine(load_policy(REPO / "policies" / "strict-baseline.yaml"))
        engine.attach("tenant", "0000:3b:00.0", dev)
        return engine

    def write(engine: Engine, offset: int, width: int, value: int) -> tuple[str, ...]:
        access = ConfigWrite(
            vm="tenant", bdf="0000:3b:00.0", offset=offset, width=width, value=value
        )
        return engine.handle(access).reasons

    engine = session()  # a driver that enables first: unwritten entries get the VM's own tag
    reasons = write(engine, ctrl, 4, iv_tph)
    assert "tag-fallback" in reasons and "enable-refused" not in reasons
    engine = session()  # a 0 the guest writes is foreign: the enable is refused
    assert write(engine, entry0, 2, 0x00) == ("foreign-tag",)
    assert "enable-refused" in write(engine, ctrl, 4, iv_tph)
    assert "no-st-tag-foreign" in write(session(), ctrl, 4, no_st_tph)
