"""The C client library (clients/c) builds warning-free as C11 and passes its test program
against a real ``tphtrap serve``: a Linux-like bring-up in both backends, fail-closed parsing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
C = ROOT / "clients" / "c"
FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]


def build(tmp: Path, *extra: str) -> Path:
    cc = require_tool("cc", "gcc")
    exe = tmp / "test_tphtrap"
    proc = subprocess.run(
        [cc, *FLAGS, *extra, "-o", str(exe), str(C / "tphtrap.c"), str(C / "test_tphtrap.c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return exe


def run(exe: Path) -> str:
    tphtrap = Path(sys.executable).parent / "tphtrap"
    proc = subprocess.run(
        [str(exe), str(tphtrap), str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_c_client_builds_and_brings_up_tph_in_both_backends(tmp_path: Path) -> None:
    out = run(build(tmp_path, "-O2"))
    assert "writes backend: Linux-like bring-up on both devices checked" in out
    assert "host backend: Linux-like bring-up on both devices checked" in out
    assert "the reader fails closed" in out
    assert out.splitlines()[-1].startswith("ok: ")


@pytest.mark.parametrize("sanitizer", ["address,undefined"])
def test_the_c_client_is_clean_under_the_sanitizers(tmp_path: Path, sanitizer: str) -> None:
    out = run(build(tmp_path, "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-sanitize-recover"))
    assert out.splitlines()[-1].startswith("ok: ")


def test_the_header_alone_is_pedantic_c11(tmp_path: Path) -> None:
    cc = require_tool("cc", "gcc")
    src = tmp_path / "use.c"
    src.write_text('#include "tphtrap.h"\nint main(void) { return TPHTRAP_PROTOCOL - 2; }\n')
    proc = subprocess.run(
        [cc, *FLAGS, "-pedantic", "-I", str(C), "-o", str(tmp_path / "use"), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
