"""Packaging: the wheel carries the license, the example policies with their JSON Schema and
the C header, and ``pip install`` puts them where C compilers and people look."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, require_tool

from tphtrap import __version__

DATA = f"tphtrap-{__version__}.data/data"


def source_files() -> list[str]:
    """The files of the checkout, as a clean clone has them (tracked or about to be)."""
    res = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    if res.returncode != 0:
        pytest.fail(f"git ls-files failed (not a git checkout?): {res.stderr.decode()}")
    return [name for name in res.stdout.decode().split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of the checkout (so no build files land in
    the working tree)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    out = base / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "-q", "-w", out, src],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, f"pip wheel failed (it fetches setuptools):\n{res.stderr[-3000:]}"
    (built,) = out.glob("tphtrap-*.whl")
    return built


def test_the_wheel_carries_license_policies_schema_and_header(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    policies = sorted(p.name for p in (REPO / "policies").iterdir())
    assert "tphtrap-policy.schema.json" in policies and "two-tenants.yaml" in policies
    for name in policies:
        assert f"{DATA}/share/tphtrap/policies/{name}" in names, name
    assert f"{DATA}/include/tphtrap/tphtrap_proto.h" in names
    assert f"tphtrap-{__version__}.dist-info/licenses/LICENSE" in names
    assert "tphtrap/py.typed" in names and "tphtrap/cli.py" in names
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"tphtrap-{__version__}.dist-info/METADATA").decode()
        entry = zf.read(f"tphtrap-{__version__}.dist-info/entry_points.txt").decode()
        assert (
            zf.read(f"{DATA}/include/tphtrap/tphtrap_proto.h")
            == (REPO / "examples" / "tphtrap_proto.h").read_bytes()
        )
    assert "License-Expression: Apache-2.0" in meta
    assert "tphtrap = tphtrap.cli:main" in entry


def test_license_is_the_apache_2_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_installed_files_land_under_the_prefix_and_the_header_compiles(
    wheel: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "prefix"
    # --ignore-installed: never touch the tphtrap installed in the running environment.
    pip = [sys.executable, "-m", "pip", "install", "--ignore-installed", "--no-deps", "--no-index"]
    res = subprocess.run(
        [*pip, "-q", "--prefix", str(prefix), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (Path(sys.executable).parent / "tphtrap").exists(), "the running install was removed"
    assert (prefix / "share" / "tphtrap" / "policies" / "two-tenants.yaml").is_file()
    assert (prefix / "bin" / "tphtrap").is_file()
    # A C integration includes the installed header the way its README says.
    gcc = require_tool("gcc", "gcc")
    program = tmp_path / "client.c"
    program.write_text(
        "#include <stdio.h>\n#include <tphtrap/tphtrap_proto.h>\n"
        "int main(void) {\n"
        "    struct tphtrap_reply r = {.id = 7, .ok = 1};\n"
        "    r.decision.verdict = TPHTRAP_DROP;\n"
        '    printf("%d %s %d %ld\\n", TPHTRAP_PROTO_VERSION, TPHTRAP_OP_HELLO, '
        "TPHTRAP_MAX_LINE, (long)r.id);\n"
        "    return r.decision.verdict == TPHTRAP_DROP ? 0 : 1;\n}\n"
    )
    exe = tmp_path / "client"
    cc = subprocess.run(
        [
            gcc,
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(prefix / "include"),
            "-o",
            str(exe),
            str(program),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stdout) == (0, "2 hello 65536 7\n")
