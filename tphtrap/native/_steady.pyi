"""The C side of the native steady path (_steady.c)."""

from typing import Any, Final

TAGS: Final[int]
UNKNOWN: Final[int]
IN_USE: Final[int]
UNUSED: Final[int]
MAX_TEXT: Final[int]

class Armed:
    def __init__(self, *args: Any) -> None: ...
    def stale(self) -> None: ...
    def passes_only(self) -> None: ...

def handle(
    armed: dict[bytes, Armed], passes: bool, line: bytes, /
) -> tuple[bytes, bytes | None, str, str, str] | bytes | None: ...
def pump(
    in_fd: int,
    out_fd: int,
    wake_fd: int,
    audit_fd: int,
    armed: dict[bytes, Armed],
    passes: bool,
    ops: dict[str, int],
    verdicts: dict[str, int],
    reasons: dict[str, int],
    /,
) -> tuple[bytes, bytes, bool, bool, Any, str, int, int]: ...
