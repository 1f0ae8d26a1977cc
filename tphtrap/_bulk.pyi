"""The per-entry loops of a big decision, in C (_bulk.c); None: the caller's Python loop."""

from collections.abc import Callable, Sequence
from typing import Any

def bind(device_write: type, /) -> None: ...
def writes_text(writes: Sequence[Any], /) -> str | None: ...
def run_starts(writes: Sequence[Any], /) -> list[int] | None: ...
def raw_writes(
    steps: list[tuple[int, int, int]],
    ctrl_at: tuple[int, ...],
    msix: bool,
    guest_low: list[int | None],
    dev_low: list[int | None],
    where: tuple[int, ...],
    bir: int | None,
    shift: int,
    vc_low: int,
    ctrl_size: int,
    entry_size: int,
    /,
) -> list[Any] | None: ...
def entry_indices(
    entry_at: dict[Any, int], writes: Sequence[Any], /
) -> list[int | None] | None: ...
def apply_disabled(
    undo: list[Any], ent: list[Any], writes: Sequence[Any], start: int, run: list[int], mask: int, /
) -> bool | None: ...
def commit(
    steps: list[tuple[int, int, int]],
    dev_ctrl: list[int | None],
    dev_ent: list[int | None],
    msix: bool,
    guest_low: list[int | None],
    dev_low: list[int | None],
    /,
) -> bool | None: ...
def resolve(
    entries: range | list[int],
    guest_of: list[int] | Callable[[int], int],
    written: list[bool],
    dev_ent: list[int | None],
    guest_low: list[int | None],
    dev_low: list[int | None],
    msix: bool,
    width: Any,
    in_use: bool,
    rules: Any,
    resolver: Callable[..., tuple[int, str | None]],
    resolved: dict[Any, Any],
    touched: set[int] | frozenset[int],
    changes: dict[int, int],
    reasons: list[str],
    /,
) -> bool | None: ...
def tags_allowed(
    allowed: frozenset[int], ent: list[Any], shift: int, mask: int, /
) -> bool | None: ...
