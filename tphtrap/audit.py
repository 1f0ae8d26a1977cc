"""Audit events: one structured JSON line per decision, through ``structlog``.

The engine returns decisions; this module turns them into canonical log lines. The adapters
choose where they go (standard error or ``--audit FILE``), never standard output, which is the
protocol channel of ``tphtrap serve``. Files are opened line-buffered and every event is one
``write`` of one whole line, so a killed process leaves only whole, parseable lines behind,
but for SIGKILL cutting the last one (which the next ``serve`` on that file seals and names).

Event names are dotted (``access.decided``, ``device.attached``, ``policy.loaded``,
``policy.rejected``, ``wire.rejected``, ``engine.failed``, ``session.started``,
``session.ended``); every access event carries ``vm`` and ``bdf``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict

from .events import (
    REGION_NAMES,
    VERDICT_NAMES,
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from .wire import (
    cache_put,
    compact_encoder,
    id_text,
    json_string,
    one_write_text,
    op_text,
    writes_text,
)

__all__ = ["Auditor", "access_fields", "decision_fields"]


def access_fields(access: Access) -> dict[str, Any]:
    """The audit fields describing one access."""
    kind = type(access)
    d: dict[str, Any] = {"vm": access.vm, "bdf": access.bdf, "region": REGION_NAMES[access.region]}
    if kind is ConfigWrite or kind is ConfigRead:
        assert isinstance(access, (ConfigWrite, ConfigRead))
        d["op"] = "write" if kind is ConfigWrite else "read"
        d["offset"] = access.offset
        d["width"] = access.width
        if isinstance(access, ConfigWrite):
            d["guest_value"] = access.value
    elif kind is MsixWrite or kind is MsixRead:
        assert isinstance(access, (MsixWrite, MsixRead))
        d["op"] = "write" if kind is MsixWrite else "read"
        d["bar"] = access.bar
        d["offset"] = access.offset
        d["width"] = access.width
        if isinstance(access, MsixWrite):
            d["guest_value"] = access.value
    elif kind is Reset:
        d["op"] = "reset"
    return d


_ESC = json_string


def decision_fields(decision: Decision) -> dict[str, Any]:
    d: dict[str, Any] = {
        "verdict": VERDICT_NAMES[decision.verdict],
        "reason": decision.reason,
        "reasons": list(decision.reasons),
        "rule": decision.rule,
    }
    writes = decision.writes
    if writes:
        d["device_writes"] = [w.to_json() for w in writes]
        # The value the device got for the guest's own access, when it is one write.
        if len(writes) == 1:
            d["device_value"] = writes[0].value
    if decision.ops:
        d["host_ops"] = [o.to_json() for o in decision.ops]
    if decision.read_mask:
        d["guest_view"] = decision.guest_value
        d["read_mask"] = decision.read_mask
    return d


class _LineWriter:
    """A structlog logger writing each rendered event as one line, in one write call.

    With ``fd`` (an audit file tphtrap opened itself, in append mode), the line goes straight
    to the descriptor with one ``os.write``: the same single write as the line-buffered
    stream's flush, without its two layers of buffering (about a microsecond per event).
    """

    def __init__(self, stream: IO[str], fd: int | None = None) -> None:
        self._stream = stream
        self._fd = fd
        #: A write to ``fd`` failed (a full disk): it may have left part of its line. The next
        #: line ends that one first, so that every line after it is whole.
        self.doubtful = False

    @property
    def fd(self) -> int | None:
        return self._fd

    def switch(self, stream: IO[str], fd: int | None) -> IO[str]:
        """Write to ``stream`` (and ``fd``) from now on; returns the previous stream."""
        old = self._stream
        self._stream, self._fd = stream, fd
        self.doubtful = False
        return old

    def msg(self, message: str) -> None:
        if self._fd is None:
            self._stream.write(message + "\n")
            self._stream.flush()
            return
        self.raw((message + "\n").encode("utf-8"))

    def raw(self, data: bytes) -> None:
        """One whole line already encoded (its newline included)."""
        if self._fd is None:
            self._stream.write(data.decode("utf-8"))
            self._stream.flush()
            return
        fd = self._fd
        try:
            if self.doubtful:
                _end_cut_line(fd)
                self.doubtful = False
            n = os.write(fd, data)
            while n < len(data):  # a regular file takes it whole unless the disk is full
                data = data[n:]
                n = os.write(fd, data)
        except BaseException:
            self.doubtful = True
            raise

    debug = info = warning = error = msg


class _UtcClock:
    """ISO 8601 UTC timestamps with microseconds, as ``structlog.processors.TimeStamper(
    fmt="iso", utc=True)`` writes them, formatting the date and time once per second (the
    decision path emits an event per access: ``datetime.isoformat`` was a visible share)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        second, micro = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{micro:06d}Z"


def _stamp(clock: _UtcClock) -> Callable[[Any, str, EventDict], EventDict]:
    """The processor adding ``level`` (the method name) and ``timestamp``."""
    now = clock.now

    def processor(_logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        event_dict["level"] = method_name
        event_dict["timestamp"] = now()
        return event_dict

    return processor


def _render(encode: Callable[[Any], str]) -> Callable[[Any, str, EventDict], str]:
    """The final processor: the event as compact JSON (anything else as ``str``)."""

    def processor(_logger: Any, _method_name: str, event_dict: EventDict) -> str:
        return encode(event_dict)

    return processor


_NO_ID: Any = object()


class _DecidedLine:
    """Writes the ``access.decided`` line directly, the same bytes as the processor chain.

    That event is written for every TPH access before its reply leaves, so it is on the
    VM-exit path; building the field dictionaries and encoding them was the largest cost of a
    decision in ``serve``. Here the parts that repeat (VM and device, verdict with reasons and
    rule) are encoded once and kept, numbers are written with ``str`` as json writes ints, and
    strings go through json's own escaping: key order and spelling follow
    :func:`access_fields`, :func:`decision_fields`, the extra ``id``, then ``event``,
    ``level`` and ``timestamp``.
    """

    def __init__(self) -> None:
        self._who: dict[tuple[str, str], str] = {}
        self._why: dict[tuple[Verdict, str, tuple[str, ...], str | None], str] = {}

    def who(self, vm: str, bdf: str) -> str:
        """The line's start, up to the region's value: the VM and the device."""
        who = self._who.get((vm, bdf))
        if who is None:
            who = cache_put(self._who, (vm, bdf), f'{{"vm":{_ESC(vm)},"bdf":{_ESC(bdf)},"region":')
        return who

    def why(self, decision: Decision) -> str:
        """The verdict, reasons and rule, after the access's fields."""
        dkey = (decision.verdict, decision.reason, decision.reasons, decision.rule)
        why = self._why.get(dkey)
        if why is None:
            rule = "null" if decision.rule is None else _ESC(decision.rule)
            why = cache_put(
                self._why,
                dkey,
                f',"verdict":{_ESC(VERDICT_NAMES[decision.verdict])},"reason":'
                f'{_ESC(decision.reason)},"reasons":['
                f'{",".join(_ESC(r) for r in decision.reasons)}],"rule":{rule}',
            )
        return why

    def render(self, access: Access, decision: Decision, rid: Any, timestamp: str) -> str:
        who = self.who(access.vm, access.bdf)
        kind = type(access)
        if kind is ConfigWrite:
            assert isinstance(access, ConfigWrite)
            what = (
                f'"config","op":"write","offset":{int(access.offset)},'
                f'"width":{int(access.width)},"guest_value":{int(access.value)}'
            )
        elif kind is MsixWrite:
            assert isinstance(access, MsixWrite)
            what = (
                f'"msix","op":"write","bar":{int(access.bar)},"offset":{int(access.offset)},'
                f'"width":{int(access.width)},"guest_value":{int(access.value)}'
            )
        elif kind is ConfigRead:
            assert isinstance(access, ConfigRead)
            what = f'"config","op":"read","offset":{int(access.offset)},"width":{int(access.width)}'
        elif kind is MsixRead:
            assert isinstance(access, MsixRead)
            what = (
                f'"msix","op":"read","bar":{int(access.bar)},"offset":{int(access.offset)},'
                f'"width":{int(access.width)}'
            )
        else:
            what = f"{_ESC(REGION_NAMES[access.region])}" + (
                ',"op":"reset"' if kind is Reset else ""
            )
        why = self.why(decision)
        writes = decision.writes
        done = ""
        if len(writes) == 1:
            w = writes[0]
            done = f',"device_writes":[{one_write_text(w)}],"device_value":{int(w.value)}'
        elif writes:
            done = f',"device_writes":[{writes_text(writes)}]'
        if decision.ops:
            done += f',"host_ops":[{",".join([op_text(o) for o in decision.ops])}]'
        view = ""
        if decision.read_mask:
            gv = "null" if decision.guest_value is None else str(int(decision.guest_value))
            view = f',"guest_view":{gv},"read_mask":{int(decision.read_mask)}'
        ident = "" if rid is _NO_ID else f',"id":{id_text(rid)}'
        return (
            f'{who}{what}{why}{done}{view}{ident},"event":"access.decided","level":"info",'
            f'"timestamp":"{timestamp}"}}'
        )


def _open_append(path: str) -> tuple[IO[str], tuple[int, int] | None]:
    """``path`` opened for appending, line-buffered, created if missing, with a torn last
    line sealed (see :func:`_seal_torn_line`): the stream and the torn line's offset and
    length, or None."""
    flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    torn = None
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o666)
    except PermissionError:  # writable but not readable: nothing to look at
        fd = os.open(path, os.O_WRONLY | flags, 0o666)
    else:
        try:
            torn = _seal_torn_line(fd)
        except OSError:
            os.close(fd)
            raise
    return open(fd, "a", buffering=1, encoding="utf-8"), torn


_TAIL_CHUNK = 65536


def _seal_torn_line(fd: int) -> tuple[int, int] | None:
    """End a regular file's unterminated last line with a newline; its offset and length.

    One ``write`` per line is whole against everything but SIGKILL: the kernel copies a
    buffered write a page at a time and stops at a page boundary when a fatal signal is
    pending (``generic_perform_write``), so a line crossing one can be cut there. Its reply
    was never written (the line comes first), so no hypervisor acted on it; sealing it keeps
    every line written after it whole, and the bytes of the cut line stay as they are.
    """
    st = os.fstat(fd)
    size = st.st_size
    if not stat.S_ISREG(st.st_mode) or size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    start = size
    while start > 0:
        begin = max(0, start - _TAIL_CHUNK)
        newline = os.pread(fd, start - begin, begin).rfind(b"\n")
        if newline >= 0:
            start = begin + newline + 1
            break
        start = begin
    os.write(fd, b"\n")
    return start, size - start


def _end_cut_line(fd: int) -> None:
    """After a failed write: end the line it may have cut (:func:`_seal_torn_line`; on a file
    opened write-only, which cannot be read, with a newline anyway)."""
    try:
        _seal_torn_line(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        os.write(fd, b"\n")


class Auditor:
    """Renders audit events as JSON lines on ``stream`` (stderr or a line-buffered file).

    ``include_passes`` also logs accesses that never touch TPH state (``reason == not-tph``);
    they are left out by default to keep the audit trail about TPH.

    The structlog bound logger is built once, with no context and three processors (level and
    timestamp, JSON rendering with a C encoder made once): an audit event costs a few
    microseconds on the decision path instead of tens.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        include_passes: bool = False,
        _fd: int | None = None,
    ) -> None:
        if stream is None:
            stream = sys.stderr
        if stream is sys.stdout or stream is sys.__stdout__:
            raise ValueError("audit events never go to stdout (the protocol channel)")
        self.stream = stream
        self.include_passes = include_passes
        self._writer = _LineWriter(stream, _fd)
        self._clock = _UtcClock()
        self._processors = (_stamp(self._clock), _render(compact_encoder(default=str)))
        self._line = _DecidedLine()
        self._log = structlog.wrap_logger(
            self._writer,
            processors=list(self._processors),
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=True,
        )
        self._methods: dict[str, Callable[..., Any]] = {
            level: getattr(self._log, level) for level in ("debug", "info", "warning", "error")
        }
        self.events = 0
        #: The ``--audit`` file's name, which :meth:`reopen` opens again (None: a stream).
        self.path: str | None = None

    @classmethod
    def to_file(cls, path: str, *, include_passes: bool = False) -> Auditor:
        stream, torn = _open_append(path)
        # Events are written to its descriptor directly (append mode: each line lands whole
        # at the end); the text stream is kept for closing.
        auditor = cls(stream, include_passes=include_passes, _fd=stream.fileno())
        auditor.path = path
        auditor._torn(torn)
        return auditor

    def _torn(self, torn: tuple[int, int] | None) -> None:
        """Say so when the file just opened ended in a line cut short (and now sealed)."""
        if torn is not None:
            offset, length = torn
            self.emit("audit.torn", "warning", path=self.path, offset=offset, bytes=length)

    def reopen(self, reason: str) -> OSError | None:
        """Open the audit file again by its name, for log rotation (``logrotate`` with
        ``create`` renames the file, makes a new one and signals ``serve``).

        Every event before this call is in the old file (the renamed one: nothing is lost),
        every event after it in the new one, which starts with ``audit.reopened``. When the
        name cannot be opened, events keep going to the old file, ``audit.reopen-failed``
        says why, and the error is returned. A stream (standard error) is left alone.
        """
        if self.path is None:
            return None
        try:
            stream, torn = _open_append(self.path)
        except OSError as exc:
            self.emit("audit.reopen-failed", "error", path=self.path, reason=reason, error=str(exc))
            return exc
        old = self._writer.switch(stream, stream.fileno())
        self.stream = stream
        old.close()
        self.emit("audit.reopened", path=self.path, reason=reason)
        self._torn(torn)
        return None

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events += 1
        self._methods[level](event, **fields)

    def decided(
        self,
        access: Access,
        decision: Decision,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """One ``access.decided`` event (``engine.failed`` for an internal error)."""
        if decision.reason == "not-tph" and not self.include_passes:
            return
        if decision.reason != "internal-error" and (
            not extra or (len(extra) == 1 and "id" in extra)
        ):
            self.events += 1
            rid = extra["id"] if extra else _NO_ID
            self._writer.msg(self._line.render(access, decision, rid, self._clock.now()))
            return
        self.decided_slow(access, decision, extra)

    @property
    def fd(self) -> int | None:
        """The descriptor events go to when they are written to it directly (``--audit``)."""
        return self._writer.fd

    def write_failed(self) -> None:
        """A line written elsewhere (the native path's loop) failed: the next one here ends
        what it may have cut (:attr:`_LineWriter.doubtful`)."""
        self._writer.doubtful = True

    @property
    def doubtful(self) -> bool:
        """Whether the last write failed and may have cut its line."""
        return self._writer.doubtful

    def decided_line(self, line: bytes) -> None:
        """An ``access.decided`` line rendered elsewhere (the native path, tphtrap.native)."""
        self.events += 1
        self._writer.raw(line)

    def who(self, vm: str, bdf: str) -> str:
        """The start of an ``access.decided`` line of ``vm``'s device ``bdf``."""
        return self._line.who(vm, bdf)

    def why(self, decision: Decision) -> str:
        """The verdict, reasons and rule of an ``access.decided`` line of ``decision``."""
        return self._line.why(decision)

    def decided_slow(
        self,
        access: Access,
        decision: Decision,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """:meth:`decided` through the field dictionaries and the processor chain: the
        reference the fast renderer must match byte for byte (tests/test_audit.py)."""
        if decision.reason == "not-tph" and not self.include_passes:
            return
        fields = access_fields(access)
        fields.update(decision_fields(decision))
        if extra:
            fields.update(extra)
        if decision.reason == "internal-error":
            self.emit("engine.failed", "warning", **fields)
            return
        # The bound logger's own processor chain and logger, run here directly: ``emit``
        # copies the sixteen fields three times as keyword arguments.
        self.events += 1
        fields["event"] = "access.decided"
        event: Any = fields
        for proc in self._processors:
            event = proc(self._writer, "info", event)
        self._writer.msg(event)

    def close(self) -> None:
        if self.stream not in (sys.stderr, sys.__stderr__):
            self.stream.close()
