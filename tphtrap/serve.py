"""``tphtrap serve``: the hypervisor plugin, JSON lines on stdin/stdout (docs/protocol.md).

:class:`Server` is the request handler (one line in, one reply line out, plus audit events); it
does no I/O of its own and is what the tests drive directly. :func:`serve_forever` is the loop
around it: it reads standard input in chunks with a bounded line buffer, answers every request
in order, flushes each reply before it waits for more input, and handles SIGHUP (reload the
policy), SIGTERM/SIGINT (stop) and EOF (exit 0) through ``signal.set_wakeup_fd`` so that a
signal is never handled in the middle of a decision.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import select
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any, cast

from . import __version__, bulk
from .audit import Auditor
from .device import ConfigSpace, load_device, parse_hex_config
from .engine import AttachRefused, Engine, describe_reason
from .engine.core import WrongBackend
from .engine.render import HostFacts
from .engine.trapmap import trap_map
from .errors import DeviceError, PolicyError, Problem, TphtrapError, WireError
from .events import VERDICT_NAMES, Decision
from .native import AVAILABLE, NativePath
from .policy import Policy
from .spec import PcieType
from .wire import (
    ACCESS_OPS,
    MAX_LINE,
    MAX_REPLY,
    PROTOCOL_VERSIONS,
    Request,
    access_reply,
    decision_json,
    decision_wire,
    encode,
    error_reply,
    hex_reply,
    parse_request,
    reply,
    to_access,
)

__all__ = ["HexServer", "Server", "add_parser", "serve_forever"]


def _load_policy(path: str) -> Policy:
    from .policyfile import load_policy

    return load_policy(path)


def _drop(code: str, detail: str | None = None) -> dict[str, Any]:
    """The decision carried by an error reply: fail closed, nothing reaches the device."""
    return {
        "verdict": "drop",
        "reason": code,
        "reasons": [code],
        "detail": detail or describe_reason(code),
        "writes": [],
    }


class Server:
    """Answers protocol lines. Keeps serving whatever it is sent."""

    def __init__(
        self,
        policy: Policy,
        policy_path: str | None,
        auditor: Auditor,
        *,
        recorder: IO[str] | None = None,
        debug: bool = False,
        native: bool = True,
    ) -> None:
        self.engine = Engine(policy)
        self.policy_path = policy_path
        self.audit = auditor
        self.recorder = recorder
        self.debug = debug
        self.version: int | None = None
        self.stopping = False
        self.started = time.monotonic()
        self.requests = 0
        self.ops: Counter[str] = Counter()  # valid requests by op
        self.errors: Counter[str] = Counter()
        self.verdicts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.policy_loads = 1
        self.policy_rejects = 0
        #: The native steady path (tphtrap.native), unless it is not built, turned off, or
        #: the server must see every request (a debug log of each, a recorded trace).
        self.native: NativePath | None = None
        self._last: Request | None = None  # the request the Python path handled last
        self.native_answers = 0  # requests the native path answered
        if native and AVAILABLE and not debug and recorder is None:
            self.native = NativePath(self.engine, auditor)

    # --- one line ------------------------------------------------------------------------
    def handle_line(self, line: bytes) -> bytes:
        """One request line in, exactly one reply line out. Never raises."""
        native = self.native
        if native is not None:
            try:
                got = native.handle(line)
            except Exception as exc:  # pragma: no cover - a fault of the native path
                self._native_failed(exc)
                got = None
            if got is not None:
                reply, audit, op, verdict, reason = got
                self.requests += 1
                self.native_answers += 1
                self.ops[op] += 1
                self.verdicts[verdict] += 1
                self.reasons[reason] += 1
                if audit is not None:
                    try:
                        self.audit.decided_line(audit)
                    except Exception as exc:
                        return self._native_undelivered(exc, line)
                return reply
        try:
            return self._handle_line(line)
        finally:
            if native is not None:
                self._rearm(native)

    def _rearm(self, native: NativePath) -> None:
        """After the Python path: arm what it may have changed from the engine's state."""
        req = self._last
        if req is None:
            return  # the line was not a request: the engine never saw it
        try:
            if req.op in ACCESS_OPS:
                native.refresh(req.args.get("vm"), req.args.get("bdf"))
            else:
                native.refresh()
        except Exception as exc:  # pragma: no cover - a fault of the native path
            self._native_failed(exc)

    def pump(self, in_fd: int, out_fd: int, wake_fd: int) -> tuple[bytes, bytes, bool, bool] | None:
        """The serve loop's common case, in C (:meth:`NativePath.pump`): it reads and answers
        lines while the native path answers them. Returns (unread input, replies the pipe did
        not take, woken by a signal, EOF), or None when there is no native path or the audit
        stream is not a file tphtrap writes to directly."""
        native, fd = self.native, self.audit.fd
        if native is None or fd is None or self.audit.doubtful:
            return None  # (a failed write may have cut a line: the Python path ends it)
        counters = (self.ops, self.verdicts, self.reasons)
        unread, pending, woke, eof, failed, why, answered, audited = native.pump(
            in_fd, out_fd, wake_fd, fd, counters
        )
        self.requests += answered
        self.native_answers += answered
        self.audit.events += audited
        if why == "native":  # pragma: no cover - a fault of the native path
            self._native_failed(cast(Exception, failed))
        elif why == "audit":  # a decided line whose audit line could not be written
            exc, line = cast(tuple[Exception, bytes], failed)
            self.audit.write_failed()
            self.native_answers -= 1  # (answered by the Python path's failure reply)
            pending += self._native_undelivered(exc, line)
        return unread, pending, woke, eof

    def _native_failed(self, exc: Exception) -> None:
        """Turn the native path off for good, and say why (the Python path serves on)."""
        self.native = None
        self.errors["internal-error"] += 1
        self._note("native.failed", "error", error=f"{type(exc).__name__}: {exc}")

    def _handle_line(self, line: bytes) -> bytes:
        self.requests += 1
        self._last = req = None
        try:
            try:
                self._last = req = parse_request(line)
                if self.debug:
                    self.audit.emit("wire.received", "debug", id=req.id, op=req.op)
                return self._dispatch(req)
            except WireError as exc:
                return self._wire_error(exc, line)
        except Exception as exc:
            return self._internal_error(exc, req)

    def _internal_error(self, exc: Exception, req: Request | None) -> bytes:
        """Fail closed: an unexpected fault (in the engine, the audit stream, anywhere)
        answers drop for this request, and the server keeps serving."""
        self.errors["internal-error"] += 1
        rid = req.id if req is not None else None
        self._note(
            "engine.failed",
            "error",
            id=rid,
            op=req.op if req is not None else None,
            error=f"{type(exc).__name__}: {exc}",
            vm=req.args.get("vm") if req is not None else None,
            bdf=req.args.get("bdf") if req is not None else None,
        )
        return error_reply(
            rid,
            "internal-error",
            f"internal error: {type(exc).__name__}: {exc}",
            decision=_drop("internal-error", "internal error: access dropped"),
        )

    def _native_undelivered(self, exc: Exception, line: bytes) -> bytes:
        """The native path decided ``line`` but its audit line could not be written: the
        answer the Python path gives then (its counts were made)."""
        try:
            req = parse_request(line)
        except Exception:  # pragma: no cover - the native path only answers valid lines
            return self._internal_error(exc, None)
        try:
            return self._undelivered_access(exc, req)
        finally:
            self._last = req
            if self.native is not None:
                self._rearm(self.native)

    def _undelivered(
        self, exc: Exception, rid: int | str | None, op: str, vm: Any, bdf: Any
    ) -> Decision | None:
        """The engine has made a decision for device (vm, bdf) whose audit line could not be
        written (a full disk, a closed pipe). Write-ahead: no decision goes out before its
        line, so the device does not get what the engine's state now says it has. The device
        is frozen instead (TPH off, every later access dropped until it is attached again):
        that decision, the only one the audit trail may miss, takes TPH away and nothing
        else. None: ``vm`` and ``bdf`` name no attached device (nothing to freeze)."""
        error = f"{type(exc).__name__}: {exc}"
        frozen = None
        if isinstance(vm, str) and isinstance(bdf, str):
            frozen = self.engine.freeze(vm, bdf, f"its audit line could not be written: {error}")
        if frozen is None:
            return None
        self.errors["internal-error"] += 1
        self._note(
            "audit.failed",
            "error",
            id=rid,
            op=op,
            vm=vm,
            bdf=bdf,
            error=error,
            **decision_json(frozen),
        )
        return frozen

    def _note(self, event: str, level: str = "info", **fields: Any) -> None:
        """An event that goes with no decision (the hypervisor performs nothing on it): one
        that cannot be written is lost, never a reason to stop serving."""
        with contextlib.suppress(Exception):
            self.audit.emit(event, level, **fields)

    def _undelivered_access(self, exc: Exception, req: Request) -> bytes:
        """An access decided but not audited (:meth:`_undelivered`): its reply. A read changes
        nothing the engine knows of the device: it is dropped, as an internal error."""
        if req.op in ("cfg_read", "msix_read"):
            return self._internal_error(exc, req)
        frozen = self._undelivered(exc, req.id, req.op, req.args.get("vm"), req.args.get("bdf"))
        if frozen is None:
            return self._internal_error(exc, req)
        return access_reply(req.id, frozen)

    def _wire_error(self, exc: WireError, line: bytes) -> bytes:
        self.errors[exc.code] += 1
        self._note(
            "wire.rejected",
            "warning",
            id=exc.request_id,
            code=exc.code,
            field=exc.field,
            message=exc.message,
            line=line[:200].decode("utf-8", "replace"),
        )
        return error_reply(
            exc.request_id,
            exc.code,
            exc.message,
            exc.field,
            decision=_drop(exc.code, exc.message),
        )

    def _dispatch(self, req: Request) -> bytes:
        self.ops[req.op] += 1
        if req.op == "hello":
            return self._hello(req)
        if self.version is None:
            raise WireError(
                "handshake-required",
                'send {"op":"hello","versions":[2]} first',
                request_id=req.id,
                field="op",
            )
        if req.op in ACCESS_OPS:
            return self._access(req)
        handler = getattr(self, f"_op_{req.op}")
        out: bytes = handler(req)
        return out

    def _hello(self, req: Request) -> bytes:
        common = set(req.args["versions"]) & set(PROTOCOL_VERSIONS)
        if not common:
            raise WireError(
                "unsupported-version",
                f"no common protocol version; this server speaks {list(PROTOCOL_VERSIONS)} "
                "(version 2 adds unsolicited event lines a client must handle, such as the "
                "corrections of a SIGHUP reload: see docs/protocol.md)",
                request_id=req.id,
                field="versions",
            )
        self.version = max(common)
        self.audit.emit(
            "session.started",
            version=self.version,
            client=req.args.get("client"),
            server=f"tphtrap {__version__}",
        )
        return reply(
            req.id,
            op="hello",
            version=self.version,
            server=f"tphtrap {__version__}",
            max_line=MAX_LINE,
            max_reply=MAX_REPLY,
            backends=["writes", "host"],
        )

    def _access(self, req: Request) -> bytes:
        access = to_access(req)
        decision = self.engine.handle(access)
        self._count(decision)
        try:
            self.audit.decided(access, decision, {"id": req.id})
        except Exception as exc:
            return self._undelivered_access(exc, req)
        if self.recorder is not None:
            self._record(req, decision_json(decision))
        if decision.reason in ("unknown-vm", "unknown-device"):
            field = "vm" if decision.reason == "unknown-vm" else "bdf"
            return error_reply(
                req.id, decision.reason, decision.detail, field, decision=decision_wire(decision)
            )
        return access_reply(req.id, decision)

    def _host_feedback(self, req: Request) -> bytes:
        """``vectors`` and ``host_result``: the host's facts, and the follow-up decision."""
        a = req.args
        try:
            if req.op == "vectors":
                decision = self.engine.host_vectors(
                    a["vm"], a["bdf"], a["allocated"], a.get("tags_cleared", False)
                )
            else:
                decision = self.engine.host_result(a["vm"], a["bdf"], a["failed"], a["errno"])
        except WrongBackend as exc:
            raise WireError("wrong-backend", str(exc), request_id=req.id, field="bdf") from None
        except ValueError as exc:
            raise WireError(
                "out-of-range", str(exc), request_id=req.id, field="allocated"
            ) from None
        self._count(decision)
        fields: dict[str, Any] = {k: v for k, v in a.items() if k not in ("vm", "bdf", "failed")}
        if req.op == "host_result":
            fields["failed"] = a["failed"].to_json()
        else:
            fields["allocated"] = sorted(a["allocated"])
            fields["tags_cleared"] = a.get("tags_cleared", False)
        try:
            self.audit.emit(
                f"host.{req.op}", vm=a["vm"], bdf=a["bdf"], **fields, **decision_json(decision)
            )
        except Exception as exc:
            return self._undelivered_access(exc, req)
        if decision.reason in ("unknown-vm", "unknown-device"):
            field = "vm" if decision.reason == "unknown-vm" else "bdf"
            return error_reply(
                req.id, decision.reason, decision.detail, field, decision=decision_wire(decision)
            )
        return access_reply(req.id, decision)

    _op_vectors = _op_host_result = _host_feedback

    def _count(self, decision: Decision) -> None:
        self.verdicts[VERDICT_NAMES[decision.verdict]] += 1
        self.reasons[decision.reason] += 1

    def _record(self, req: Request, expect: dict[str, Any]) -> None:
        """One line of the ``--record`` trace. A trace that cannot be written (a full disk)
        ends there, with a ``record.failed`` event: the decision still goes out, and a
        replay of the trace judges only what it holds."""
        if self.recorder is None:
            return
        rec: dict[str, Any] = {"id": req.id, "op": req.op}
        rec.update({k: v for k, v in req.args.items() if k != "expect"})
        rec["expect"] = expect
        try:
            self.recorder.write(encode(rec).decode())
            self.recorder.flush()
        except Exception as exc:
            self.recorder = None
            error = f"{type(exc).__name__}: {exc}"
            self._note("record.failed", "error", id=req.id, op=req.op, error=error)

    def _op_attach(self, req: Request) -> bytes:
        a = req.args
        try:
            if "config" in a:
                cfg = parse_hex_config(a["config"], f"request {req.id!r} config", a["bdf"])
            else:
                cfg = load_device(a["path"], a.get("source_bdf"))
                cfg = ConfigSpace.from_bytes(cfg.data, cfg.source, a["bdf"], cfg.line_map)
        except DeviceError as exc:
            raise WireError(
                "bad-config",
                str(exc),
                request_id=req.id,
                field="config" if "config" in a else "path",
            ) from None
        replacing = self.engine.session(a["vm"], a["bdf"]) is not None
        if replacing and not a.get("replace"):
            # A second attach would silently reset the device's state (the guest's enable,
            # its tags): the hypervisor must say it means it.
            message = (
                f"device {a['bdf']} is already attached to VM {a['vm']!r}: detach it first, "
                'or send "replace": true to start it over from the new config space'
            )
            self.audit.emit(
                "device.refused",
                "warning",
                vm=a["vm"],
                bdf=a["bdf"],
                code="already-attached",
                message=message,
            )
            raise WireError("already-attached", message, request_id=req.id, field="bdf")
        host = self._host_facts(req, cfg)
        try:
            decision = self.engine.attach(a["vm"], a["bdf"], cfg, host, a.get("vector_ctrl"))
        except AttachRefused as exc:
            self.audit.emit(
                "device.refused",
                "warning",
                vm=a["vm"],
                bdf=a["bdf"],
                code=exc.code,
                message=exc.message,
            )
            field = "vm" if exc.code == "unknown-vm" else "bdf"
            raise WireError(exc.code, exc.message, request_id=req.id, field=field) from None
        sess = self.engine.session(a["vm"], a["bdf"])
        assert sess is not None
        device = _device_summary(cfg, sess.untrappable)
        backend: dict[str, Any] = {"name": sess.backend.name}
        if host is not None:
            width = getattr(sess.backend, "width", None)
            backend["width"] = int(width) if width is not None else None
        extra: dict[str, Any] = {
            "device": device,
            "backend": backend,
            **({"replaced": True} if replacing else {}),
        }
        try:
            self.audit.emit(
                "device.attached",
                vm=a["vm"],
                bdf=a["bdf"],
                source=cfg.source,
                **decision_json(decision) | extra,
            )
        except Exception as exc:
            frozen = self._undelivered(exc, req.id, req.op, a["vm"], a["bdf"])
            decision = frozen or decision  # (it is attached, so it is frozen)
        self._record(req, decision_json(decision))
        return reply(
            req.id,
            decision=decision_wire(decision),
            device=device,
            backend=backend,
            trap=trap_map(sess.geo),
        )

    @staticmethod
    def _host_facts(req: Request, cfg: ConfigSpace) -> HostFacts | None:
        """The root port's facts for ``backend: host``, checked against the snapshot: Linux
        skips the completer check for exactly the functions whose PCI Express capability
        says root-complex integrated endpoint."""
        a = req.args
        if a.get("backend", "writes") != "host":
            return None
        rciep = bool(a.get("rciep", False))
        if cfg.pcie_type is not None and rciep != (cfg.pcie_type == PcieType.RC_END):
            said = "a root-complex integrated endpoint" if rciep else "behind a root port"
            raise WireError(
                "out-of-range",
                f"the request says the device is {said}, its PCI Express capability says "
                f"Device/Port Type {cfg.pcie_type:#x}",
                request_id=req.id,
                field="rciep" if rciep else "completer",
            )
        return HostFacts(a.get("completer"), rciep)

    def _op_detach(self, req: Request) -> bytes:
        decision = self.engine.detach(req.args["vm"], req.args["bdf"])
        if decision.verdict.value == "drop":
            raise WireError(decision.reason, decision.detail, request_id=req.id, field="bdf")
        self.audit.emit("device.detached", vm=req.args["vm"], bdf=req.args["bdf"])
        self._record(req, decision_json(decision))
        return reply(req.id, decision=decision_wire(decision))

    def _op_reload(self, req: Request) -> bytes:
        path = req.args.get("policy", self.policy_path)
        if path is None:
            raise WireError(
                "missing-field", "no policy path to reload", request_id=req.id, field="policy"
            )
        result = self.reload(path)
        if isinstance(result, PolicyError):
            problems = [p.format() for p in result.problems[:20]]
            raise WireError(
                "policy-invalid",
                f"{path}: {len(result.problems)} problem(s); the old policy stays in force: "
                + (problems[0] if problems else ""),
                request_id=req.id,
                field="policy",
            )
        if isinstance(result, TphtrapError):
            raise WireError("policy-invalid", str(result), request_id=req.id, field="policy")
        # One event line per device (each within max_reply), then the reply.
        return _correction_events(path, result) + reply(
            req.id, op="reload", policy=path, devices=len(result)
        )

    def reload(self, path: str) -> list[dict[str, Any]] | TphtrapError:
        """Load ``path`` and swap it in; on any problem keep the old policy (audited)."""
        try:
            policy = _load_policy(path)
        except PolicyError as exc:
            self.policy_rejects += 1
            self._note(
                "policy.rejected", "error", path=path, problems=[p.format() for p in exc.problems]
            )
            return exc
        except TphtrapError as exc:
            self.policy_rejects += 1
            self._note("policy.rejected", "error", path=path, problems=[str(exc)])
            return exc
        except OSError as exc:
            self.policy_rejects += 1
            err = DeviceError(path, exc.strerror or str(exc))
            self._note("policy.rejected", "error", path=path, problems=[str(err)])
            return err
        except Exception as exc:  # fail closed: the old policy stays
            return self._reload_failed(path, exc)
        try:
            applied = self.engine.reload(policy)  # builds all rules before changing anything
        except Exception as exc:
            return self._reload_failed(path, exc)
        finally:
            if self.native is not None:
                self.native.refresh()  # (whatever the engine changed, rules above all)
        self.policy_path = path
        self.policy_loads += 1
        corrections = []
        for sess, decision in applied:
            try:
                self.audit.emit(
                    "policy.applied", vm=sess.vm, bdf=sess.bdf, **decision_json(decision)
                )
            except Exception as exc:  # its correction cannot go out: the device is frozen
                frozen = self._undelivered(exc, None, "reload", sess.vm, sess.bdf)
                decision = frozen or decision
            entry = {"vm": sess.vm, "bdf": sess.bdf, "decision": decision_wire(decision)}
            corrections.append(entry)
        # (every correction above is in the trail: this line is only the reload's summary)
        self._note("policy.loaded", path=path, vms=sorted(policy.vms), devices=len(corrections))
        return corrections

    def reload_event(self, path: str) -> bytes:
        """Reload ``path`` for a signal: the unsolicited ``corrections`` event lines, one per
        attached device (b"" when the policy was refused: nothing changed)."""
        result = self.reload(path)
        if isinstance(result, TphtrapError):
            return b""
        return _correction_events(path, result)

    def _reload_failed(self, path: str, exc: Exception) -> TphtrapError:
        self.policy_rejects += 1
        message = f"internal error: {type(exc).__name__}: {exc}; the old policy stays"
        err = PolicyError([Problem(1, 1, "internal-error", message, "", path)])
        self._note("policy.rejected", "error", path=path, problems=[str(err)])
        return err

    def _op_stats(self, req: Request) -> bytes:
        devices = []
        for s in self.engine.sessions():
            devices.append(
                {
                    "vm": s.vm,
                    "bdf": s.bdf,
                    "tph_enabled": s.dev_enabled(),
                    "latched_off": s.latched,
                    "frozen": s.poisoned is not None,
                    "revoked": s.revoked,
                    "decisions": dict(s.counts),
                }
            )
        return reply(
            req.id,
            requests=self.requests,
            errors=dict(self.errors),
            verdicts=dict(self.verdicts),
            reasons=dict(self.reasons),
            devices=devices,
            policy=self.policy_path,
            policy_loads=self.policy_loads,
            policy_rejects=self.policy_rejects,
            native=self.native_answers,
            uptime_s=round(time.monotonic() - self.started, 3),
        )

    def done(self) -> bool:
        return self.stopping

    def session_ended(self, reason: str, level: str = "info") -> None:
        """The ``session.ended`` event: why, and what the session asked and got."""
        self._note(
            "session.ended",
            level,
            reason=reason,
            requests=self.requests,
            ops=dict(self.ops),
            errors=sum(self.errors.values()),
            verdicts=dict(self.verdicts),
        )

    def _op_shutdown(self, req: Request) -> bytes:
        self.stopping = True
        return reply(req.id, op="shutdown")


class HexServer(Server):
    """A :class:`Server` whose replies carry offsets and values as ``"0x..."`` strings
    (``serve --hex``): for people typing a session by hand, never for programs."""

    def handle_line(self, line: bytes) -> bytes:
        return hex_reply(super().handle_line(line))

    def pump(self, in_fd: int, out_fd: int, wake_fd: int) -> None:
        return None  # every reply through handle_line, to be written in hex

    def reload_event(self, path: str) -> bytes:
        line = super().reload_event(path)
        return hex_reply(line) if line else line


def _correction_events(path: str, corrections: list[dict[str, Any]]) -> bytes:
    """The ``corrections`` event lines of a reload: one per device (one with an empty list
    when no device is attached, so that a client sees the reload happen)."""
    if not corrections:
        return encode({"id": None, "event": "corrections", "policy": path, "corrections": []})
    return b"".join(
        encode({"id": None, "event": "corrections", "policy": path, "corrections": [c]})
        for c in corrections
    )


def _device_summary(cfg: ConfigSpace, untrappable: str | None) -> dict[str, Any]:
    tph = cfg.tph
    msix = cfg.msix
    out: dict[str, Any] = {"tph": None, "msix": None, "trappable": untrappable is None}
    if untrappable:
        out["forced_off_reason"] = untrappable
    if tph is not None:
        out["tph"] = {
            "offset": tph.offset,
            "location": tph.location.name.lower(),
            "table_size": tph.table_size,
            "extended": tph.extended_tph,
            "modes": [
                m
                for m, ok in (
                    ("no_st", tph.no_st_mode),
                    ("interrupt_vector", tph.interrupt_vector_mode),
                    ("device_specific", tph.device_specific_mode),
                )
                if ok
            ],
        }
    if msix is not None:
        out["msix"] = {
            "table_size": msix.table_size,
            "bir": msix.table_bir,
            "offset": msix.table_offset,
        }
    return out


# --- the I/O loop -----------------------------------------------------------------------
#: Replies waiting for a hypervisor that has stopped reading: beyond this, stdin is not read
#: until stdout drains (back-pressure instead of unbounded memory).
MAX_PENDING_OUT = 1 << 20


#: On SIGTERM/SIGINT, how long pending replies may take to drain before exiting anyway.
SIGNAL_DRAIN_S = 0.5


def _drain(fd: int, out: bytearray, deadline: float) -> None:
    """Write ``out`` to the non-blocking ``fd`` until it is empty or ``deadline`` passes."""
    with contextlib.suppress(OSError):  # BrokenPipeError included: nobody left to read
        while out:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _, ready, _ = select.select([], [fd], [], left)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    del out[: os.write(fd, out)]


_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class _Waiter:
    """The serve loop's wait: one ``poll`` object kept registered (half the cost of building
    ``select``'s sets per line) on standard input (while ``reading``), the signal pipe, and
    standard output (while replies wait); returns the descriptors ready to be read."""

    def __init__(self, in_fd: int, out_fd: int, rpipe: int) -> None:
        self._fds = (in_fd, out_fd, rpipe)
        self._poll = select.poll()
        self._mode: tuple[bool, bool] | None = None

    def wait(self, reading: bool, writing: bool) -> set[int]:
        in_fd, out_fd, rpipe = self._fds
        if self._mode != (reading, writing):
            self._mode = (reading, writing)
            masks = {rpipe: select.POLLIN}
            if reading:
                masks[in_fd] = masks.get(in_fd, 0) | select.POLLIN
            if writing:
                masks[out_fd] = masks.get(out_fd, 0) | select.POLLOUT
            for fd in {in_fd, out_fd, rpipe}:
                with contextlib.suppress(KeyError):
                    self._poll.unregister(fd)
            for fd, mask in masks.items():
                self._poll.register(fd, mask)
        # Like select's readable set: a hung-up or failed descriptor counts as ready, and its
        # read then says what happened; standard output ready only ends the wait.
        return {
            fd
            for fd, events in self._poll.poll()
            if events & _READABLE and (fd == rpipe or (reading and fd == in_fd))
        }


class _IdleCollector:
    """Python's cyclic garbage collector, run while the loop is about to wait instead of in
    the middle of a decision.

    While serving, automatic collection is off; before each wait, the generations the
    interpreter would have collected by then (by its own thresholds and counts) are
    collected. A decision that allocates thousands of objects (a whole table re-written)
    otherwise stopped several times for a collection before its reply left. Garbage without
    cycles is freed by reference counting as ever, and cycles wait at most one request."""

    def __init__(self) -> None:
        self._thresholds = gc.get_threshold()
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __call__(self) -> None:
        t0, t1, t2 = self._thresholds
        c0, c1, c2 = gc.get_count()
        if t0 and c0 >= t0:
            gc.collect(2 if c2 >= t2 else 1 if c1 >= t1 else 0)

    def close(self) -> None:
        if self._was_enabled:
            gc.enable()


def _signalled(server: Server, out_fd: int, rpipe: int, out: bytearray) -> int | None:
    """The signals the wake-up pipe holds, handled; the exit code when one ends serve."""
    signums = os.read(rpipe, 64)
    for signum in signums:
        if signum == signal.SIGHUP:
            if server.policy_path:
                # Corrections answer no request: they go out as an event line, queued before
                # any later reply, so no access is decided on a device state the hypervisor
                # has not been told to establish.
                out += server.reload_event(server.policy_path)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            # Replies already decided still go out if the hypervisor reads them soon; one
            # that stopped reading does not hold the exit up for long.
            _drain(out_fd, out, time.monotonic() + SIGNAL_DRAIN_S)
            server.session_ended(signal.Signals(signum).name)
            return 0
    # Log rotation: after SIGHUP's reload (so its events close the old file), and on SIGUSR1
    # alone, the --audit file is opened again by its name.
    for rotate in (signal.SIGHUP, signal.SIGUSR1):
        if rotate in signums:
            with contextlib.suppress(Exception):  # (a full disk: events stay in the old file)
                server.audit.reopen(signal.Signals(rotate).name)
            break
    return None


def serve_forever(server: Server, in_fd: int, out_fd: int) -> int:
    """Run until EOF, ``shutdown`` or SIGTERM/SIGINT. Returns the exit code.

    One ``poll`` waits on stdin, stdout (only while replies are pending) and the signal
    wake-up pipe, so a signal is handled even while the hypervisor is not reading replies.
    Standard output is non-blocking for the duration (restored on exit): replies are written
    as soon as they are made and whatever the pipe does not take waits in a buffer. The
    garbage collector runs before each wait, never during a decision (:class:`_IdleCollector`).
    """
    rpipe, wpipe = os.pipe()
    os.set_blocking(wpipe, False)
    os.set_blocking(rpipe, False)
    old_fd = signal.set_wakeup_fd(wpipe, warn_on_full_buffer=False)
    handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    old = {s: signal.signal(s, lambda *_: None) for s in handled}
    out_was_blocking = os.get_blocking(out_fd)
    os.set_blocking(out_fd, False)
    waiter = _Waiter(in_fd, out_fd, rpipe)
    collect = _IdleCollector()
    buf = bytearray()
    discarding = False  # inside an over-long line: drop bytes up to its newline
    out = bytearray()  # replies not yet taken by the pipe
    eof = False
    ended = "shutdown"
    try:
        while True:
            if out:
                with contextlib.suppress(BlockingIOError):
                    del out[: os.write(out_fd, out)]
            if (eof or server.stopping) and not out:
                break
            reading = not eof and not server.stopping and len(out) < MAX_PENDING_OUT
            chunk: bytes | None = None
            if reading and not out and not buf and not discarding:
                # The common case in C while every line is native: what it leaves (an unread
                # line for the Python path, replies the pipe did not take, a signal, EOF) is
                # taken up below as if this loop had read it.
                collect()
                got = server.pump(in_fd, out_fd, rpipe)
                if got is not None:
                    unread, pending, woke, at_eof = got
                    out += pending
                    if at_eof or unread:
                        chunk = unread
                    elif not woke:
                        continue
            if chunk is None:
                collect()
                ready = waiter.wait(reading, bool(out))
                if rpipe in ready:
                    stop = _signalled(server, out_fd, rpipe, out)
                    if stop is not None:
                        return stop
                if in_fd not in ready:
                    continue
                try:
                    chunk = os.read(in_fd, 1 << 16)
                except BlockingIOError:
                    continue
            eof = not chunk
            if eof:
                ended = "eof"
                if buf and not discarding:
                    buf += b"\n"  # a last line without its newline is still a request
            buf += chunk
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line = bytes(buf[start:nl])
                start = nl + 1
                if discarding:
                    discarding = False
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line or line.isspace():  # (what strip() would leave empty)
                    continue
                out += server.handle_line(line)
                if server.done():
                    break
            del buf[:start]
            # An unfinished line may hold MAX_LINE bytes and the \r of its \r\n ending.
            limit = MAX_LINE + 1 if buf.endswith(b"\r") else MAX_LINE
            if len(buf) > limit and not discarding and not server.stopping:
                err = WireError("line-too-long", f"line longer than {MAX_LINE} bytes")
                out += server._wire_error(err, bytes(buf[:200]))
                buf.clear()
                discarding = True
            elif discarding:
                buf.clear()
        server.session_ended(ended)
        return 0
    except BrokenPipeError:
        server.session_ended("stdout-closed", "warning")
        return 0
    finally:
        collect.close()
        with contextlib.suppress(OSError):  # the descriptor may be gone
            os.set_blocking(out_fd, out_was_blocking)
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(rpipe)
        os.close(wpipe)


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "serve",
        help="run as a hypervisor plugin: JSON lines on stdin, decisions on stdout",
        description=(
            "Serve the tphtrap plugin protocol (docs/protocol.md) on stdin/stdout. Standard "
            "output carries protocol replies only; audit events go to standard error or "
            "--audit FILE. SIGHUP reloads the policy (a broken policy is refused and the old "
            "one stays); EOF on stdin exits 0."
        ),
        epilog=(
            "example: tphtrap serve --policy policies/two-tenants.yaml --audit /var/log/tph.jsonl"
        ),
    )
    p.add_argument("--policy", required=True, metavar="FILE", help="YAML policy to enforce")
    p.add_argument(
        "--audit",
        metavar="FILE",
        help="append audit events (JSON lines) to FILE instead of standard error",
    )
    p.add_argument(
        "--pid-file",
        metavar="FILE",
        help="write the process id to FILE while serving (for logrotate's postrotate: "
        "SIGUSR1 reopens the --audit file)",
    )
    p.add_argument(
        "--audit-passes",
        action="store_true",
        help="also audit accesses that never touch TPH state (verbose)",
    )
    p.add_argument(
        "--record",
        metavar="FILE",
        help="write every request with its decision as a native trace for replay",
    )
    p.add_argument(
        "--hex",
        action="store_true",
        help='write offsets and values in replies as "0x..." strings, for typing a session '
        "by hand (programs read numbers: never use this for a hypervisor)",
    )
    p.add_argument(
        "--log-level",
        choices=("info", "debug"),
        default="info",
        help="debug also logs every request received (to the audit stream)",
    )
    p.add_argument(
        "--no-native",
        action="store_true",
        help="decide every request in Python, without the native steady path and the "
        "engine's C loops (the same decisions; for comparison and diagnosis)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    auditor = (
        _audit_file(args.audit, args.audit_passes)
        if args.audit
        else Auditor(sys.stderr, include_passes=args.audit_passes)
    )
    try:
        policy = _load_policy(args.policy)
    except PolicyError as exc:
        for p in exc.problems:
            print(p.format(), file=sys.stderr)
        auditor.emit(
            "policy.rejected",
            "error",
            path=args.policy,
            problems=[p.format() for p in exc.problems],
        )
        return 1
    if args.no_native:
        bulk.in_python()  # the engine's per-entry loops too
    recorder = None
    if args.record:
        recorder = open(args.record, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    server = (HexServer if args.hex else Server)(
        policy,
        args.policy,
        auditor,
        recorder=recorder,
        debug=args.log_level == "debug",
        native=not args.no_native,
    )
    auditor.emit("policy.loaded", path=args.policy, vms=sorted(policy.vms))
    # Everything loaded so far (modules, policy) lives as long as the process: move it out of
    # the collector's generations so a collection on the VM-exit path has less to scan.
    gc.collect()
    gc.freeze()
    try:
        with _pid_file(args.pid_file):
            return serve_forever(server, sys.stdin.fileno(), sys.stdout.fileno())
    finally:
        if recorder is not None:
            with contextlib.suppress(OSError):  # (a full disk: the trace ended, record.failed)
                recorder.close()
        auditor.close()


def _audit_file(path: str, include_passes: bool) -> Auditor:
    """The ``--audit`` file's auditor; one that cannot be opened is the user's error."""
    try:
        return Auditor.to_file(path, include_passes=include_passes)
    except OSError as exc:
        raise DeviceError(path, f"cannot open the audit file: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _pid_file(path: str | None) -> Iterator[None]:
    """``path`` holds this process's id while the block runs (nothing when None)."""
    if path is None:
        yield
        return
    mine = f"{os.getpid()}\n"
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(mine)
    except OSError as exc:
        raise DeviceError(path, f"cannot write the pid file: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        ours = False  # another process may have taken the file over since
        with contextlib.suppress(OSError), open(path, encoding="ascii") as f:
            ours = f.read() == mine
        if ours:
            with contextlib.suppress(OSError):
                os.unlink(path)
