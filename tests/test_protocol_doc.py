"""docs/protocol.md against the code: the generated tables are current, every reason and error
code the code can emit is in them, the trap map's names and the limits are the code's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fuzzlib import ERROR_CODES

from tphtrap import protodoc
from tphtrap.engine.reasons import REASONS
from tphtrap.engine.trapmap import _RESET_REGS
from tphtrap.wire import ERRORS, MAX_LINE, MAX_REPLY

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
PACKAGE = ROOT / "tphtrap"
KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)+$")


def test_the_generated_tables_are_current() -> None:
    text = DOC.read_text()
    assert protodoc.update(text) == text, "run: python -m tphtrap.protodoc --write"


def _calls(tree: ast.AST, names: set[str]) -> list[tuple[str, int]]:
    """(first constant argument, line) of every call to one of ``names``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in names and node.args and isinstance(node.args[0], ast.Constant):
                out.append((node.args[0].value, node.lineno))
    return out


def test_every_error_code_raised_is_in_the_table() -> None:
    raised = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for code, line in _calls(tree, {"WireError", "AttachRefused", "_drop"}):
            assert code in ERRORS, f"{path}:{line}: {code!r} is not in wire.ERRORS"
            raised.add(code)
        for node in ast.walk(tree):  # error_reply(rid, "code", ...)
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "error_reply"
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                assert node.args[1].value in ERRORS, f"{path}:{node.lineno}"
    assert raised <= ERRORS.keys() and len(raised) > 10
    assert ERRORS.keys() == ERROR_CODES  # the fuzzers' list of codes


def test_every_reason_code_the_engine_can_emit_is_in_the_table() -> None:
    """Every kebab-case string of the engine is a reason or an error code (or a trap-map
    name), so that a code cannot be added without its row."""
    names = set(_RESET_REGS.values()) | {"msix-vector-control"}
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                s = node.value
                if KEBAB.match(s):
                    assert s in REASONS or s in ERRORS or s in names, f"{path}:{node.lineno}: {s}"
    text = DOC.read_text()
    for name in names:
        assert f"`{name}`" in text, name


def test_the_limits_are_the_documented_ones() -> None:
    text = DOC.read_text()
    assert f"**{MAX_LINE} bytes** (`max_line`" in text
    assert f"**{MAX_REPLY} bytes**" in text and f"`max_reply` ({MAX_REPLY})" in text
