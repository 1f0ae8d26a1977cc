"""A hypervisor for the engine tests: speaks the plugin protocol and drives a simulated device.

:class:`Hypervisor` sends protocol lines to a real server (in-process
:class:`tphtrap.serve.Server`, or a ``tphtrap serve`` child process), performs every decision
it gets back on a :class:`devsim.SimDevice` through an :class:`oracle.Rig` (which checks the
invariant after every single device write), including the corrections of unsolicited
``{"id": null, "event": "corrections"}`` lines. It judges outcomes by the device state, never
by the exact writes, so any correct rendering of a decision passes.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from devsim import Device, ResetKind, SimDevice
from helpers import AuditSink
from oracle import Grant, Outcome, Rig

from tphtrap.audit import Auditor
from tphtrap.events import ConfigRead, ConfigWrite, MsixRead, MsixWrite
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server

__all__ = ["Hypervisor", "InProcess", "ServeProcess", "Transport"]

ROOT = Path(__file__).resolve().parent.parent
Line = dict[str, Any]


class Transport(Protocol):
    def exchange(self, request: Line) -> tuple[Line, list[Line]]:
        """Send one request; its reply and any event lines that came before it."""
        ...


class InProcess:
    """The real :class:`Server`, driven through ``handle_line``."""

    def __init__(self, policy_path: Path) -> None:
        self.audit = AuditSink()
        self.server = Server(
            load_policy(policy_path),
            str(policy_path),
            Auditor(self.audit),  # type: ignore[arg-type]
        )

    def exchange(self, request: Line) -> tuple[Line, list[Line]]:
        out = self.server.handle_line(json.dumps(request).encode())
        lines = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
        return _split(request, lines)


def _split(request: Line, lines: list[Line]) -> tuple[Line, list[Line]]:
    replies = [x for x in lines if x.get("id") == request["id"] and "event" not in x]
    assert len(replies) == 1, f"expected one reply to {request}, got {lines}"
    return replies[0], [x for x in lines if "event" in x]


class ServeProcess:
    """``tphtrap serve`` as a child process on pipes (SIGHUP goes to it for real)."""

    def __init__(self, policy_path: Path, audit_path: Path) -> None:
        argv = [sys.executable, "-m", "tphtrap", "serve", "--policy", str(policy_path)]
        self.proc = subprocess.Popen(
            [*argv, "--audit", str(audit_path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.pending: list[Line] = []  # lines read but not handed out yet

    def send(self, request: Line) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def lines(self, timeout: float) -> Iterator[Line]:
        """Lines from standard output as they come, until ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                if raw.strip():
                    yield json.loads(raw)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.selector.select(left):
                assert self.proc.stdout is not None
                chunk = self.proc.stdout.read()
                if not chunk:
                    return
                self.buffer += chunk

    def exchange(self, request: Line) -> tuple[Line, list[Line]]:
        self.send(request)
        events: list[Line] = []
        for line in self.lines(timeout=30):
            if line.get("id") == request["id"] and "event" not in line:
                return line, events
            events.append(line)
        raise AssertionError(f"no reply to {request} within 30 s (got {events})")

    def close(self) -> str:
        """Shut down; the standard error output."""
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode()


class Hypervisor:
    """A VMM client for one device of one VM, on a simulated device checked by the oracle."""

    def __init__(
        self, transport: Transport, device: Device, policy_path: Path, vm: str, bdf: str
    ) -> None:
        self.wire = transport
        self.device = device
        self.vm, self.bdf = vm, bdf
        self.next_id = 0
        self.reset_kind = ResetKind.ZEROED  # what the device does on a guest-initiated reset
        self.policy = load_policy(policy_path)
        self.revoked = False
        sim = SimDevice(device, lambda: self.reset_kind)
        self.rig = Rig(device, self.grant(), sim)
        self.version = self.hello()

    # --- protocol ---------------------------------------------------------------------------
    def request(self, op: str, **fields: Any) -> Line:
        """One request; every decision in its reply and in event lines is performed."""
        self.next_id += 1
        req: Line = {"id": self.next_id, "op": op, **fields}
        reply, events = self.wire.exchange(req)
        if not reply.get("corrections"):
            self.apply_events(events)
        return reply

    def hello(self) -> int:
        """Protocol 2 if the server speaks it, else whatever it offers (the old server: 1)."""
        reply = self.request("hello", versions=[2], client="engine-tests")
        if not reply["ok"] and reply["error"]["code"] == "unsupported-version":
            reply = self.request("hello", versions=[1], client="engine-tests")
        assert reply["ok"], reply
        version: int = reply["version"]
        return version

    def apply_events(self, events: list[Line]) -> None:
        for event in events:
            assert event.get("id") is None, f"an event line must have id null: {event}"
            if event.get("event") == "corrections":
                self.apply_corrections(event["corrections"], "event corrections")

    def apply_corrections(self, corrections: list[Line], label: str) -> None:
        for c in corrections:
            if (c["vm"], c["bdf"]) == (self.vm, self.bdf):
                outcome = Outcome.from_json(c["decision"])
                self.rig.apply(outcome, label=label, strict=False)

    def grant(self) -> Grant:
        return Grant(self.policy.host, self.policy.vms[self.vm], self.bdf, self.revoked)

    def outcome(self, reply: Line) -> Outcome:
        """The decision of a reply (an error reply's decision is a drop)."""
        return Outcome.from_json(expand_runs(reply["decision"]))

    # --- the hypervisor's own operations ------------------------------------------------------
    def attach(self, size: int = 4096) -> Line:
        """Attach from a fresh snapshot of ``size`` bytes of the device."""
        snapshot = self.rig.sim.snapshot(size)
        reply = self.request("attach", vm=self.vm, bdf=self.bdf, config=snapshot.hex())
        if reply["ok"]:
            self.revoked = False
            self.rig.grant = self.grant()
            self.rig.resync()
        else:
            self.rig.owned = False  # the guest's accesses are not expected to reach it
        self.rig.apply(self.outcome(reply), label=f"attach ({size} bytes)", strict=False)
        return reply

    def detach(self) -> Line:
        reply = self.request("detach", vm=self.vm, bdf=self.bdf)
        if "decision" in reply:
            self.rig.apply(self.outcome(reply), label="detach", strict=False)
        return reply

    def reset(self, kind: ResetKind) -> Line:
        """The hypervisor resets the device (with behaviour ``kind``), then says so."""
        self.rig.hypervisor_reset(kind)
        reply = self.request("reset", vm=self.vm, bdf=self.bdf)
        if "decision" in reply:
            self.rig.apply(self.outcome(reply), label="reset")
        return reply

    def reload(self, policy_path: Path, *, revokes: bool = False) -> Line:
        """Reload ``policy_path``; ``revokes``: it moves the device out of this VM."""
        self.switch_policy(policy_path, revokes=revokes)
        reply = self.request("reload", policy=str(policy_path))
        assert reply["ok"], reply
        self.apply_corrections(reply.get("corrections") or [], "reload corrections")
        return reply

    def switch_policy(self, policy_path: Path, *, revokes: bool = False) -> None:
        """What the oracle holds the device to from now on."""
        self.policy = load_policy(policy_path)
        if revokes:
            self.revoked = True
            self.rig.owned = False
        self.rig.grant = self.grant()

    # --- the guest's accesses -----------------------------------------------------------------
    def cfg_write(self, offset: int, width: int, value: int) -> Line:
        access = ConfigWrite(self.vm, self.bdf, offset, width, value)
        return self.write(access, "cfg_write", offset=offset, width=width, value=value)

    def cfg_read(self, offset: int, width: int) -> Line:
        access = ConfigRead(self.vm, self.bdf, offset, width)
        return self.read(access, "cfg_read", offset=offset, width=width)

    def msix_write(self, offset: int, width: int, value: int, bar: int | None = None) -> Line:
        bar = self.device.shape.bir if bar is None else bar
        access = MsixWrite(self.vm, self.bdf, bar, offset, width, value)
        return self.write(access, "msix_write", bar=bar, offset=offset, width=width, value=value)

    def msix_read(self, offset: int, width: int) -> Line:
        bar = self.device.shape.bir
        access = MsixRead(self.vm, self.bdf, bar, offset, width)
        return self.read(access, "msix_read", bar=bar, offset=offset, width=width)

    def write(self, access: ConfigWrite | MsixWrite, op: str, **fields: Any) -> Line:
        replies: list[Line] = []

        def decide() -> Outcome:
            replies.append(self.request(op, vm=self.vm, bdf=self.bdf, **fields))
            return self.outcome(replies[0])

        self.rig.guest_write(access, decide)
        return replies[0]

    def read(self, access: ConfigRead | MsixRead, op: str, **fields: Any) -> Line:
        reply = self.request(op, vm=self.vm, bdf=self.bdf, **fields)
        self.rig.guest_read(access, lambda: self.outcome(reply))
        return reply

    # --- what the device does -----------------------------------------------------------------
    def control(self, cap: int = 0) -> int:
        """Mode and Requester Enable bits of TPH capability ``cap`` on the device."""
        c = self.device.tph_caps[cap]
        return self.rig.sim.u32(c.ctrl_at) & 0x307


def expand_runs(decision: Line) -> Line:
    """The decision with every run of writes listed one by one (docs/protocol.md: a run is one
    write object with ``count`` and ``stride``, meaning ``count`` writes ``stride`` apart)."""
    writes: list[Line] = []
    for w in decision.get("writes", []):
        base = {k: v for k, v in w.items() if k not in ("count", "stride")}
        for k in range(w.get("count", 1)):
            writes.append({**base, "offset": base["offset"] + k * w.get("stride", 0)})
    return {**decision, "writes": writes}
