"""Audit events: one structured JSON line per decision, through ``structlog``.

The engine returns decisions; this module turns them into canonical log lines. The adapters
choose where they go (standard error or ``--audit FILE``), never standard output, which is the
protocol channel of ``tphtrap serve``. Files are opened line-buffered and every event is one
``write`` of one whole line, so a killed process leaves only whole, parseable lines behind.

Event names are dotted (``access.decided``, ``device.attached``, ``policy.loaded``,
``policy.rejected``, ``wire.rejected``, ``engine.failed``, ``session.started``,
``session.ended``); every access event carries ``vm`` and ``bdf``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import IO, Any

import structlog

from .events import (
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    MsixRead,
    MsixWrite,
    Reset,
)

__all__ = ["Auditor", "access_fields", "decision_fields"]


def access_fields(access: Access) -> dict[str, Any]:
    """The audit fields describing one access."""
    d: dict[str, Any] = {"vm": access.vm, "bdf": access.bdf, "region": access.region.value}
    if isinstance(access, (ConfigWrite, ConfigRead)):
        d["op"] = "write" if isinstance(access, ConfigWrite) else "read"
        d["offset"] = access.offset
        d["width"] = access.width
        if isinstance(access, ConfigWrite):
            d["guest_value"] = access.value
    elif isinstance(access, (MsixWrite, MsixRead)):
        d["op"] = "write" if isinstance(access, MsixWrite) else "read"
        d["bar"] = access.bar
        d["offset"] = access.offset
        d["width"] = access.width
        if isinstance(access, MsixWrite):
            d["guest_value"] = access.value
    elif isinstance(access, Reset):
        d["op"] = "reset"
    return d


def decision_fields(decision: Decision) -> dict[str, Any]:
    d: dict[str, Any] = {
        "verdict": decision.verdict.value,
        "reason": decision.reason,
        "reasons": list(decision.reasons),
        "rule": decision.rule,
    }
    if decision.writes:
        d["device_writes"] = [w.to_json() for w in decision.writes]
        # The value the device got for the guest's own access, when it is one write.
        if len(decision.writes) == 1:
            d["device_value"] = decision.writes[-1].value
    if decision.read_mask:
        d["guest_view"] = decision.guest_value
        d["read_mask"] = decision.read_mask
    return d


class _LineWriter:
    """A structlog logger writing each rendered event as one line, in one write call."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")
        self._stream.flush()

    debug = info = warning = error = msg


class Auditor:
    """Renders audit events as JSON lines on ``stream`` (stderr or a line-buffered file).

    ``include_passes`` also logs accesses that never touch TPH state (``reason == not-tph``);
    they are left out by default to keep the audit trail about TPH.
    """

    def __init__(self, stream: IO[str] | None = None, *, include_passes: bool = False) -> None:
        if stream is None:
            stream = sys.stderr
        if stream is sys.stdout or stream is sys.__stdout__:
            raise ValueError("audit events never go to stdout (the protocol channel)")
        self.stream = stream
        self.include_passes = include_passes
        self._log = structlog.wrap_logger(
            _LineWriter(stream),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
            cache_logger_on_first_use=False,
        )
        self.events = 0

    @classmethod
    def to_file(cls, path: str, *, include_passes: bool = False) -> Auditor:
        stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - owned here
        return cls(stream, include_passes=include_passes)

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events += 1
        getattr(self._log, level)(event, **fields)

    def decided(
        self,
        access: Access,
        decision: Decision,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if decision.reason == "not-tph" and not self.include_passes:
            return
        fields = access_fields(access)
        fields.update(decision_fields(decision))
        if extra:
            fields.update(extra)
        level = "warning" if decision.reason == "internal-error" else "info"
        self.emit("engine.failed" if level == "warning" else "access.decided", level, **fields)

    def close(self) -> None:
        if self.stream not in (sys.stderr, sys.__stderr__):
            self.stream.close()


def _dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
