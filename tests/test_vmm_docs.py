"""The Python examples of docs/vmm-integration.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "vmm-integration.md"


def test_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/vmm-integration.md has no Python example"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})  # the document's own example
