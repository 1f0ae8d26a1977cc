"""A stateful attacker drives ``tphtrap serve`` while its audit stream fails (ENOSPC) on any
subset of its lines.

Proves, in both backends and on both of serve's paths (Python, and the native C path): no
sequence of guest accesses, attaches, resets, reloads and host reports (``vectors``,
``host_result``), with any lines of the audit stream failing, leaves the device holding a
usable steering tag outside the VM's set, or TPH Requester enabled where the policy or the
device forbids it, after any reply and after every single device write (or kernel step) of
one. Also: a device frozen because the line of one of its decisions was lost does not get
TPH enabled again until it is attached anew, and nothing but a freeze reaches the device
without its audit line (write-ahead).

How: the attackers of tests/test_engine_stateful.py (``TphMachine``: random devices,
policies, accesses, resets, reloads, re-attaches) and tests/test_host_stateful.py
(``HostMachine``), every engine call of theirs made a request line to an in-process
:class:`~tphtrap.serve.Server` (``handle_line``; a reload in turn as the ``reload`` request
and as SIGHUP's ``reload_event``). What the machines perform is the reply's decision and
nothing else. Writes backend: its ``writes`` (runs expanded here, from docs/protocol.md) are
applied to the byte-level ``SimDevice`` one at a time, and tests/oracle.py judges the
device's bytes against the policy after each. Host backend: its ``ops`` are carried out by
``HostMachine``'s model of Linux's ``drivers/pci/tph.c``, which is judged after every kernel
step. Which lines fail is the machines' own rules: the lines of one event or access kind (or
any line) as a drawn plan says (some written, then some failing, then a pattern), or all of
them until the disk has room again, or the line of one write of a running driver (what the
native path decides). So is what a failure implies, never the engine's state nor a reply's
reason: a lost line of a decision of the device (an access, attach, reset, reload correction
or host report) freezes it, and from then on the oracle takes it as revoked (TPH must be off)
and expects none of the guest's accesses to reach it; a lost read line drops that read. An
``internal-error`` reply is accepted only where a lost line explains it. While the device is
neither frozen nor revoked, the machines' own checks go on too: the guest reads back its own
view, and (writes backend, ``Rig``) the non-TPH bytes it writes reach the device.

Then stories for each kind of decision whose line is lost, a story where a planted bug (a
freeze that does nothing) leaves a foreign tag usable and the oracle sees it, and a canary:
the same planted bug found by a short derandomized run of the machine.

Left out: a line cut in the middle of its write (the stream here fails whole lines;
tests/test_audit_failed.py fills a real disk under a real ``serve``), and the native path's
C loop (``pump``), which needs a file descriptor for the audit stream.

By default the four machine runs (two backends, two paths) take 60 or 30 examples of 20 steps:
the whole module runs in about 15 s on one core. ``TPHTRAP_FUZZ=long`` runs ten times as many
examples of 40 steps (``TPHTRAP_EXAMPLES`` scales them, as in test_engine_stateful.py).
"""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from devsim import LOC_CAP, LOC_MSIX, ResetKind, Shape
from helpers import AuditSink, named_policies, policy_name, rciep_config
from host_worlds import CTRL_WRITABLE
from host_worlds import VM as HOST_VM
from hypothesis import HealthCheck, Phase, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule, run_state_machine_as_test
from oracle import Grant, InvariantBroken, Outcome, broken, check, describe, raise_broken
from test_engine_stateful import (
    BDF,
    CHANGES,
    FULL,
    TAG_CHOICES,
    VM,
    Change,
    TagChoice,
    TphMachine,
    guest_vms,
    hosts,
    shapes,
)
from test_host_stateful import HostMachine
from wireclient import expand_runs

from tphtrap import native
from tphtrap.audit import Auditor
from tphtrap.device import ConfigSpace
from tphtrap.engine import Engine
from tphtrap.engine.render import HostFacts
from tphtrap.errors import TphtrapError
from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    HostOp,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, OnViolation, Policy, VmPolicy
from tphtrap.serve import Server
from tphtrap.spec import StLocation
from tphtrap.synth import TphSpec

LONG = os.environ.get("TPHTRAP_FUZZ") == "long"
EXAMPLES = int(os.environ.get("TPHTRAP_EXAMPLES", 20_000 if LONG else 2_000)) * 3 // 100
HOST_EXAMPLES = EXAMPLES // 2  # (half: the default run keeps well under 30 s)
STEPS = 40 if LONG else 20
CTRL_REQ = 0x300  # TPH Requester Enable (control bits 9:8)
#: Events whose line carries a decision of a device: losing one freezes it (a read's aside).
FREEZING = frozenset(
    {"access.decided", "device.attached", "policy.applied", "host.vectors", "host.host_result"}
)
#: Which lines a failure plan hits ("" every line): substrings of the rendered line.
KINDS = st.sampled_from(
    [
        "",
        "",
        '"event":"access.decided"',
        '"op":"write"',
        '"op":"read"',
        '"op":"reset"',
        '"event":"device.attached"',
        '"event":"policy.applied"',
        '"event":"host.',
        '"event":"engine.failed"',
        '"event":"audit.failed"',
    ]
)


# --- an audit stream on a disk that fills up --------------------------------------------------
class FullDisk(AuditSink):
    """An audit stream whose writes fail with ENOSPC as its plan says: of the lines that
    contain ``kind``, the next ones fail where ``plan`` is True; after the plan, all of them
    fail while ``full``. ``lost`` and ``lines`` hold the current request's lines."""

    def __init__(self) -> None:
        super().__init__()
        self.kind = ""
        self.plan: list[bool] = []
        self.full = False
        self.lost: list[str] = []

    def fill(self, kind: str, plan: list[bool], full: bool = False) -> None:
        self.kind, self.plan, self.full = kind, plan, full

    def write(self, s: str) -> int:
        if self.kind in s:
            fails = self.plan.pop(0) if self.plan else self.full
            if fails:
                self.lost.append(s)
                raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(s)


# --- the engine calls of the attackers, spoken as lines ---------------------------------------
class Refused(TphtrapError):
    """An error reply (what the engine would have raised)."""


def expanded(writes: list[dict[str, Any]]) -> tuple[DeviceWrite, ...]:
    """A reply's ``writes``, each run (``count``, ``stride``) listed one by one, in order."""
    return tuple(
        DeviceWrite(w["space"], w["offset"], w["width"], w["value"], w.get("bar"))
        for w in expand_runs({"writes": writes})["writes"]
    )


def host_ops(ops: list[dict[str, Any]]) -> tuple[HostOp, ...]:
    """A reply's ``ops``, each ``st_set`` run (``first``, ``count``) listed one by one."""
    out = []
    for o in ops:
        if o["op"] != "st_set":
            out.append(HostOp(o["op"], o.get("mode"), o.get("width")))
            continue
        first, count = (o["first"], o["count"]) if "first" in o else (o["index"], 1)
        out.extend(
            HostOp("st_set", index=first + k, cpu=o["cpu"], tag=o["tag"]) for k in range(count)
        )
    return tuple(out)


def decision(d: dict[str, Any]) -> Decision:
    """A reply's decision as the machines perform it."""
    return Decision(
        Verdict(d["verdict"]),
        d["reason"],
        d.get("detail", ""),
        writes=expanded(d.get("writes", [])),
        guest_value=d.get("guest_value"),
        read_mask=d.get("read_mask", 0),
        reasons=tuple(d.get("reasons", ())),
        rule=d.get("rule"),
        ops=host_ops(d["ops"]) if "ops" in d else None,
    )


class Wire:
    """What the attackers call an engine: each call one request line to a :class:`Server`
    whose audit stream is a :class:`FullDisk`; each answer the decision of the reply."""

    def __init__(self, policy: Policy, native_path: bool) -> None:
        self.disk = FullDisk()
        self.server = Server(policy, policy_name(policy), Auditor(self.disk), native=native_path)  # type: ignore[arg-type]
        assert (self.server.native is not None) == native_path
        self.n = 0
        self.by_native = False  # the native path decided the last line
        self.lost: list[dict[str, Any]] = []  # the last request's lost lines, as events
        self.written: list[dict[str, Any]] = []  # and those written
        [hello] = self.send("hello", versions=[2])
        assert hello["ok"], hello

    def send(self, op: str, **fields: Any) -> list[dict[str, Any]]:
        """One request; its reply line last, after any event lines."""
        self.n += 1
        self.disk.lost.clear()
        self.disk.lines.clear()
        answered = self.server.native_answers
        if op == "reload" and self.n % 2:  # SIGHUP's path: the corrections and no reply
            out = self.server.reload_event(fields["policy"])
            out += json.dumps({"id": self.n, "ok": True}).encode() + b"\n"  # (in its place)
        else:
            line = json.dumps({"id": self.n, "op": op, **fields}, separators=(",", ":"))
            out = self.server.handle_line(line.encode())
        self.by_native = self.server.native_answers > answered
        self.lost = [json.loads(x) for x in self.disk.lost]
        self.written = [json.loads(x) for x in self.disk.lines]
        got = [json.loads(x) for x in out.splitlines()]
        assert got and got[-1]["id"] == self.n, (op, fields, out)
        assert all(e["id"] is None and e["event"] == "corrections" for e in got[:-1]), out
        return got

    def decided(self, op: str, **fields: Any) -> Decision:
        """The decision of a request that always has one (error replies included)."""
        [reply] = self.send(op, **fields)
        if not reply["ok"] and reply["error"]["code"] not in ("internal-error", "unknown-device"):
            raise Refused(f"{op}: {reply['error']['code']}: {reply['error']['message']}")
        return decision(reply["decision"])

    # --- the calls the machines make ---
    def handle(self, a: ConfigWrite | ConfigRead | MsixWrite | MsixRead | Reset) -> Decision:
        dev = {"vm": a.vm, "bdf": a.bdf}
        if isinstance(a, ConfigWrite):
            return self.decided("cfg_write", **dev, offset=a.offset, width=a.width, value=a.value)
        if isinstance(a, MsixWrite):
            at = {"bar": a.bar, "offset": a.offset, "width": a.width}
            return self.decided("msix_write", **dev, **at, value=a.value)
        if isinstance(a, ConfigRead):
            return self.decided("cfg_read", **dev, offset=a.offset, width=a.width)
        if isinstance(a, MsixRead):
            return self.decided("msix_read", **dev, bar=a.bar, offset=a.offset, width=a.width)
        return self.decided("reset", **dev)

    def attach(
        self, vm: str, bdf: str, cfg: ConfigSpace, host: HostFacts | None = None
    ) -> Decision:
        """Always with ``replace``: the device may or may not be attached (a refused attach,
        a detach whose line was lost: serve's own business)."""
        fields: dict[str, Any] = {"vm": vm, "bdf": bdf, "replace": True}
        data = cfg.data
        if host is not None:
            fields["backend"] = "host"
            if host.rciep:
                fields["rciep"], data = True, rciep_config(cfg)
            else:
                fields["completer"] = host.completer
        return self.decided("attach", **fields, config=data.hex())

    def detach(self, vm: str, bdf: str) -> Decision:
        [reply] = self.send("detach", vm=vm, bdf=bdf)
        if not reply["ok"]:
            raise Refused(reply["error"]["code"])
        return decision(reply["decision"])

    def reload(self, policy: Policy) -> list[tuple[None, Decision]]:
        *events, reply = self.send("reload", policy=policy_name(policy))
        assert reply["ok"], reply
        return [(None, decision(c["decision"])) for e in events for c in e["corrections"]]

    def host_vectors(self, vm: str, bdf: str, allocated: frozenset[int], cleared: bool) -> Decision:
        return self.decided(
            "vectors", vm=vm, bdf=bdf, allocated=sorted(allocated), tags_cleared=cleared
        )

    def host_result(self, vm: str, bdf: str, op: HostOp, err: int) -> Decision:
        return self.decided("host_result", vm=vm, bdf=bdf, failed=op.to_json(), errno=err)


# --- what the audit stream does, and what that implies ---------------------------------------
#: What the audit failures hit, over a run: the kinds of decision whose line was lost.
HITS: Counter[str] = Counter()


class Stream:
    """The audit stream's rules, and the judgement of each reply by what the stream did
    (never by the engine's state or by the reply's own reason): a lost line of a decision
    of the device freezes it (``frozen``, until it is attached again); an internal error is
    that freeze, a frozen device's answer, or a read whose line was lost (dropped)."""

    NATIVE = False
    engine: Wire
    frozen = False
    lost_enabled = 0  # decisions lost while the device had TPH enabled
    lost_native = 0  # decisions of the native path lost

    def ENGINE(self, policy: Policy) -> Wire:
        return Wire(policy, self.NATIVE)

    @rule(
        kind=KINDS,
        skip=st.integers(0, 6),
        fail=st.integers(1, 3),
        plan=st.lists(st.booleans(), max_size=6),
    )
    def disk_fills(self, kind: str, skip: int, fail: int, plan: list[bool]) -> None:
        """Of the lines that contain ``kind`` from now on, ``skip`` are written, then ``fail``
        fail, then the next ones fail where ``plan`` says."""
        self.engine.disk.fill(kind, [False] * skip + [True] * fail + plan)

    @rule(kind=KINDS)
    def disk_full(self, kind: str) -> None:
        """Every line that contains ``kind`` fails until the disk has room again."""
        self.engine.disk.fill(kind, [], full=True)

    @rule()
    def disk_room(self) -> None:
        """The disk has room again: every line is written."""
        self.engine.disk.fill("", [])

    def losing(self, lose: bool, write: Callable[..., None], *args: int) -> None:
        """``write(*args)``; with ``lose``, its audit line (if it has one) is lost."""
        disk = self.engine.disk
        saved = disk.kind, disk.plan, disk.full
        if lose:
            disk.fill("", [True])
        try:
            write(*args)
        finally:
            if lose:
                disk.kind, disk.plan, disk.full = saved

    def read_lost(self) -> bool:
        return any(e.get("op") == "read" for e in self.engine.lost)

    def tph_enabled(self) -> bool:
        raise NotImplementedError

    def froze(self) -> None:
        """The device is frozen from now on (the machine's part)."""

    def judge(self, d: Decision, label: str) -> None:
        wire = self.engine
        lost = [e for e in wire.lost if e["event"] in FREEZING and e.get("op") != "read"]
        was = self.frozen
        if lost:
            self.lost_enabled += self.tph_enabled()
            self.lost_native += wire.by_native
            self.frozen = True
            self.froze()
            for e in lost:
                where = " (native path)" if wire.by_native else ""
                HITS[f"{e['event']} {e.get('op', '')}".strip() + where] += 1
        if self.read_lost():
            HITS["access.decided read"] += 1
        check(d.reason != "unsafe-plan", "engine-fault", f"{label}: {d.reason}: {d.detail}")
        check(
            d.reason != "internal-error" or was or bool(lost) or self.read_lost(),
            "engine-fault",
            f"{label}: {d.reason} with no lost line to explain it: {d.detail}",
        )
        # Write-ahead: what changes the device went out with its audit line, but a freeze
        # (TPH off: what it writes is judged on the device like anything else).
        changes = (d.writes or d.ops) and d.reason not in ("internal-error", "not-tph")
        if changes and not {e["event"] for e in wire.written} & FREEZING:
            raise_broken("unaudited", f"{label}: {Outcome.of(d)} went out with no audit line")

    def teardown(self) -> None:
        """Steer the search towards lost lines of decisions that matter: with TPH enabled,
        and decided by the native path (guidance only)."""
        target(float(self.lost_enabled), label="decisions lost with TPH enabled")
        target(float(self.lost_native), label="native decisions lost")


# --- the writes backend: TphMachine and the byte-level device ---------------------------------
class AuditAttack(Stream, TphMachine):
    """``TphMachine`` through serve. A frozen device must have TPH off (the oracle's grant is
    that of a revoked device) and the guest's later accesses are not expected to reach it."""

    STEADY = 2  # quarters of the worlds made steady (see setup)
    FROZEN_OFF = True  # a frozen device must have TPH off (False: only the policy's grant)
    engine: Wire  # type: ignore[assignment]

    def grant(self) -> Grant:
        return Grant(self.host, self.vm, BDF, self.revoked or (self.frozen and self.FROZEN_OFF))

    def tph_enabled(self) -> bool:
        return any(self.rig.sim.u32(c.ctrl_at) & CTRL_REQ for c in self.device.tph_caps)

    def froze(self) -> None:
        self.rig.owned = False
        self.rig.grant = self.grant()

    @initialize(
        shape=shapes(),
        host=hosts(),
        vm=guest_vms(),
        size=st.sampled_from([FULL] * 6 + [256, 64]),
        steady=st.integers(0, 3),
    )
    def setup(self, shape: Shape, host: HostPolicy, vm: VmPolicy, size: int, steady: int) -> None:
        """TphMachine's worlds; ``STEADY`` quarters of them with TPH granted and one capability
        with Interrupt Vector mode, where TPH gets enabled and the native path decides."""
        if steady < self.STEADY:
            where = shape.tph.location if shape.tph.location in (LOC_CAP, LOC_MSIX) else LOC_CAP
            shape = replace(shape, tph=replace(shape.tph, iv=True, location=where), second_tph=None)
            dev = replace(vm.devices[BDF], tph=True)
            vm, size = replace(vm, tph=True, devices={BDF: dev}), FULL
        TphMachine.setup(self, shape, host, vm, size)

    @rule(
        enable=st.sampled_from([None, 1, 1, 3]),
        writes=st.lists(
            st.tuples(st.integers(0, 7), TAG_CHOICES, st.booleans()), min_size=1, max_size=8
        ),
        lose=st.none() | st.integers(0, 8),
    )
    def steady_entries(
        self, enable: int | None, writes: list[tuple[int, TagChoice, bool]], lose: int | None
    ) -> None:
        """A running driver: Interrupt Vector mode enabled (or as it is), then whole ST entries
        or Vector Control words (mask bit set or not) of tags at the width in force: what the
        native path decides. ``lose``: the audit line of that write (the enable's is write 0)
        is lost, whatever the disk does otherwise."""
        cap = self.device.tph_caps[0]
        if enable is not None:
            self.losing(lose == 0, self.write_config, cap.ctrl_at, 4, 1 | enable << 8)
        bits = 16 if (self.rig.sim.u32(cap.ctrl_at) >> 8) & 3 == 3 else 8
        for n, (index, choice, masked) in enumerate(writes, 1):
            tag = self.tag(choice, bits)
            if cap.location == LOC_MSIX:
                vc = self.bar_offset(index % self.device.shape.msix_size, 12, 4, True)
                bar = self.device.shape.bir
                self.losing(n == lose, self.write_bar, bar, vc, 4, tag << 16 | masked)
            elif cap.entry_count:
                at = cap.entries_at + 2 * (index % cap.entry_count)
                self.losing(n == lose, self.write_config, at, 2, tag)

    @precondition(lambda self: self.frozen and self.owns())
    @rule()
    def thaw(self) -> None:
        """The hypervisor attaches a frozen device again, from a fresh snapshot."""
        self.reattach(FULL)

    def decided(self, d: Decision, label: str) -> Outcome:
        self.judge(d, label)
        self.reasons.add(d.reason)
        return Outcome.of(d)

    def attach(self, size: int) -> None:
        self.frozen = False
        self.rig.grant = self.grant()
        super().attach(size)

    def guest_read(self, access: ConfigRead | MsixRead) -> None:
        outcome = self.decide(access)
        label = describe(access)
        if outcome.writes:  # (a read has none; were there any, they would be performed)
            self.rig.apply(outcome, access, label=label)
        if self.read_lost():  # dropped: the guest sees nothing it could be misled by
            check(outcome.verdict == "drop", "read-lost", f"{label}: {outcome} (line lost)")
            self.rig.log.append(f"{label} -> {outcome} (its line lost)")
            return
        self.rig.check_read(access, outcome, label)

    @rule(change=CHANGES)
    def reload(self, change: Change) -> None:
        """TphMachine's reload; a reload of the unchanged policy changes nothing, unless the
        line of its correction was lost (then it is the freeze)."""
        if change.kind == "revoke" and not self.owns():
            return
        if change.kind != "unchanged":
            self.apply_change(change)
        before, was = self.rig.sim.state(), self.frozen
        decisions = self.reload_policy(change.kind)
        check(
            change.kind != "unchanged"
            or self.rig.sim.state() == before
            or (self.frozen and not was),
            "reload-not-noop",
            "a reload of the unchanged policy changed the device:\n  " + "\n  ".join(decisions),
        )


# --- the host backend: HostMachine and its model of Linux ---------------------------------------
class HostAuditAttack(Stream, HostMachine):
    """``HostMachine`` through serve: its ops carried out by the model of Linux's TPH code,
    checked after every kernel step; a frozen device must have TPH off in the kernel."""

    engine: Wire  # type: ignore[assignment]

    def tph_enabled(self) -> bool:
        return bool(self.kernel.ctrl & CTRL_REQ)

    def check_device(self, where: str) -> None:
        super().check_device(where)
        if self.frozen and self.kernel.ctrl & CTRL_REQ:
            raise_broken("frozen-enabled", f"{where}: TPH enabled on a frozen device")

    def perform(self, d: Decision, fail: tuple[int, int] = (-1, 0), reset: bool = False) -> None:
        """HostMachine's: the ops in order (``fail``: the host fails one by itself, reported
        with ``host_result`` and its follow-up performed), then the raw writes; an error reply
        has no ops."""
        self.judge(d, f"{d.verdict} {d.reason}")
        ops = d.ops if d.ops is not None else ()
        check(
            d.ops is not None or d.reason == "internal-error",
            "no-ops",
            f"a host-backend decision without ops: {d}",
        )
        if d.verdict is Verdict.PASS:
            assert not ops
        for n, op in enumerate(ops):
            if n == fail[0] and op.op != "tph_disable":  # pcie_disable_tph cannot fail
                errno = self.inject(op, fail[1])
            else:
                self.run(op)
                continue
            follow = self.engine.host_result(HOST_VM, BDF, op, errno)
            self.raw(d, reset)
            self.perform(follow)
            return
        self.raw(d, reset)

    @rule(data=st.data())
    def read_back(self, data: st.DataObject) -> None:
        """HostMachine's: the guest reads back its own view, unless the device is frozen or
        the read's line was lost (dropped)."""
        off = data.draw(st.integers(self.t0, self.t_end - 1))
        d = self.engine.handle(ConfigRead(HOST_VM, BDF, off, 1))
        self.judge(d, f"cfg_read {off:#x}")
        if not self.frozen and not self.read_lost():
            assert d.read_mask == 0xFF and d.guest_value == self.guest_byte(off), (off, d)

    def snapshot_shows_tph(self) -> bool:
        """Does a snapshot of the kernel model's config space still show the TPH capability?
        The model's bytes are all writable, a real device's capability list is not: a guest
        write of the Capabilities Pointer (passed: not a TPH register) can hide it there."""
        return ConfigSpace.from_bytes(bytes(self.kernel.cfg), "<sim>", BDF).tph is not None

    @precondition(lambda self: self.frozen and self.snapshot_shows_tph())
    @rule()
    def thaw(self) -> None:
        """The hypervisor attaches the frozen device again, from a fresh snapshot of its
        config space (the guest's view starts at power-on state, as after any attach)."""
        cfg = ConfigSpace.from_bytes(bytes(self.kernel.cfg), "<sim>", BDF)
        self.frozen = False
        self.guest_cfg = bytearray(cfg.data)
        assert cfg.tph is not None
        self.guest_ctrl = cfg.tph.ctrl_raw & ~CTRL_WRITABLE  # (the snapshot's reserved bits)
        self.guest_reset()
        self.perform(
            self.engine.attach(
                HOST_VM, BDF, cfg, HostFacts(self.kernel.completer, self.kernel.rciep)
            )
        )


def machine(native_path: bool, host: bool = False, **attrs: Any) -> type[Any]:
    """The attacker of one path and backend."""
    base: type[Any] = HostAuditAttack if host else AuditAttack
    name = ("Native" if native_path else "Python") + base.__name__
    extra = {} if host else {"STEADY": 3 if native_path else 2}
    return type(name, (base,), {"NATIVE": native_path, **extra, **attrs})


def run(cls: type[Any], examples: int, steps: int = STEPS, **kw: Any) -> None:
    with named_policies():
        run_state_machine_as_test(
            cls,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                **kw,
            ),
        )


PATHS = [
    pytest.param(False, id="python"),
    pytest.param(
        True,
        id="native",
        marks=pytest.mark.skipif(not native.AVAILABLE, reason="tphtrap.native is not built"),
    ),
]


@pytest.mark.parametrize("native_path", PATHS)
@pytest.mark.parametrize("host", [False, True], ids=["writes", "host"])
def test_no_lost_audit_line_lets_the_device_escape(native_path: bool, host: bool) -> None:
    """The machine's oracles judge every step; the run must have lost decision lines (a
    short run may fill no disk: then up to 4 more runs)."""
    HITS.clear()
    for _ in range(5):
        run(machine(native_path, host), HOST_EXAMPLES if host else EXAMPLES)
        if sum(HITS.values()):
            break
    assert sum(HITS.values()) > 0, "no audit line was lost in the whole run"


# --- stories the machine tells -----------------------------------------------------------------
# CPUs 0-3 own tag 0x01 (0x0101), CPUs 4-7 tag 0x02 (0x0202); tag 0 is neutral. The guest has
# CPUs 0-3 and rewrites a refused tag; its device has eight ST entries in the capability.
HOST = HostPolicy(
    {c: CpuTags(c, 1 + c // 4, 0x0101 * (1 + c // 4)) for c in range(8)}, frozenset({0})
)
GUEST = VmPolicy(VM, frozenset(range(4)), OnViolation.REWRITE, devices={BDF: DeviceSettings(BDF)})
OWN, FOREIGN = ("own", 1), ("foreign", 0)  # tags 0x01 and 0x02 (own 0 is the neutral 0)


def story(native_path: bool, **overrides: Any) -> AuditAttack:
    """The machine on the stories' world, attached (its steps are called as rules)."""
    m = machine(native_path, **overrides)()
    TphMachine.setup(m, Shape(), HOST, GUEST, FULL)
    return m


def enabled(m: AuditAttack) -> bool:
    """TPH Requester enabled on the simulated device (its bytes)."""
    return any(m.rig.sim.u32(c.ctrl_at) & CTRL_REQ for c in m.device.tph_caps)


@pytest.mark.parametrize("native_path", PATHS)
def test_a_lost_entry_line_freezes_the_device_until_it_is_attached_again(
    native_path: bool,
) -> None:
    """TPH on with the guest's own tags; the line of the next entry write (decided by the
    native path when it is on) is lost: TPH goes off, and stays off through the guest's
    enable, a reset that keeps control and tags, and a reload; attached again, it is served."""
    with named_policies():
        m = story(native_path)
        m.steady_entries(enable=1, writes=[(0, OWN, False), (1, OWN, False)], lose=None)
        assert enabled(m) and not m.frozen
        m.steady_entries(enable=None, writes=[(2, OWN, False), (3, FOREIGN, False)], lose=1)
        assert m.frozen and not enabled(m)
        assert m.lost_native == native_path
        m.tph_control(mode=1, enable=1, width=4, reserved=0, second=False)
        m.hypervisor_reset(ResetKind.KEPT)
        m.reload(Change("unchanged"))
        assert not enabled(m)
        m.thaw()
        assert not m.frozen
        m.steady_entries(enable=1, writes=[(0, OWN, False)], lose=None)
        assert enabled(m) and not m.frozen


@pytest.mark.parametrize("kind", [ResetKind.ZEROED, ResetKind.KEPT], ids=["zeroed", "kept"])
@pytest.mark.parametrize("native_path", PATHS)
def test_a_reset_of_a_frozen_device_leaves_later_freezes_nothing_to_change(
    native_path: bool, kind: ResetKind
) -> None:
    """TPH on in Interrupt Vector mode; a reload's line is lost: frozen, TPH off with the mode
    bits kept. The hypervisor resets the device (which zeroes its TPH registers, or keeps
    them): TPH is written off at the power-on value, so the next reload whose line is lost
    (a freeze, which writes TPH off again) changes nothing on the device (found by the
    machine: it wrote the mode bits the reset had cleared)."""
    with named_policies():
        m = story(native_path)
        m.driver_enables(enable=1, linux=False, mode=1, tags=[])
        assert enabled(m)
        m.disk_full(kind='"event":"policy.applied"')
        m.reload(Change("unchanged"))
        assert m.frozen and not enabled(m)
        m.hypervisor_reset(kind)
        assert not enabled(m) and m.rig.sim.u32(m.device.tph_caps[0].ctrl_at) == 0
        m.reload(Change("unchanged"))  # (the machine's oracle: nothing changes)
        assert m.frozen and not enabled(m)


@pytest.mark.parametrize("native_path", PATHS)
def test_a_lost_read_line_drops_the_read_and_freezes_nothing(native_path: bool) -> None:
    """The read is dropped; the device keeps TPH, and the guest's next write and read are
    served as before (the machine checks the read-back against the guest's own view)."""
    with named_policies():
        m = story(native_path)
        m.steady_entries(enable=1, writes=[(0, OWN, False)], lose=None)
        m.disk_fills(kind='"op":"read"', skip=0, fail=1, plan=[])
        m.read(where="tph", delta=0xC, width=2)
        assert m.read_lost() and not m.frozen and enabled(m)
        m.steady_entries(enable=None, writes=[(1, OWN, False)], lose=None)
        m.read(where="tph", delta=0xC, width=4)
        assert not m.read_lost() and enabled(m)


@pytest.mark.parametrize(
    ("lose", "step"),
    [
        pytest.param('"op":"reset"', "reset", id="reset"),
        pytest.param('"event":"device.attached"', "attach", id="attach"),
        pytest.param('"event":"policy.applied"', "reload", id="reload"),
    ],
)
def test_a_lost_decision_line_of_the_hypervisor_still_turns_tph_off(lose: str, step: str) -> None:
    """TPH on with tag 0x01 in entry 0; then a decision the device needs, whose line is lost:
    a reset by a device that keeps control and tags (the reset's control write), an attach
    of a snapshot with TPH on (its disable), a reload that makes 0x01 foreign (its
    corrections). The freeze that replaces each one turns TPH off by itself."""
    with named_policies():
        m = story(False)
        m.steady_entries(enable=1, writes=[(0, OWN, False)], lose=None)
        assert enabled(m)
        m.disk_fills(kind=lose, skip=0, fail=1, plan=[])
        if step == "reset":
            m.hypervisor_reset(ResetKind.KEPT)
        elif step == "attach":
            m.reattach(FULL)
        else:
            m.reload(Change("fewer-cpus", cpus=frozenset({4, 5, 6, 7})))  # CPU 0 only
            assert 1 not in m.rig.grant.allowed[8]
        assert m.frozen and not enabled(m)


@pytest.mark.parametrize("native_path", PATHS)
@pytest.mark.parametrize("report", ["vectors", "host_result"])
def test_a_lost_host_report_line_keeps_tph_off_in_the_kernel(
    native_path: bool, report: str
) -> None:
    """Host backend, ST table in MSI-X, TPH on: the host re-creates its vectors (every tag 0
    again), or fails an ``st_set`` with -ENXIO; the line of that report is lost. The freeze
    (``tph_disable``) replaces the follow-up that would enable TPH again: it stays off in the
    kernel model, the guest's enable is dropped, and attached again the device is served."""
    with named_policies():
        m = machine(native_path, host=True)()
        tph = TphSpec(location=StLocation.MSIX, table_size=4, entries=(0,) * 4)
        HostMachine.setup(m, (tph, 0x148), 4, HOST, GUEST, bytes(16), (1, False))

        def vectors() -> None:  # every vector allocated, MSI-X enabled afresh
            m.kernel.recreate_vectors({0, 1, 2, 3})
            m.perform(m.engine.host_vectors(VM, BDF, frozenset(range(4)), True))

        def enable() -> None:
            m.linux_driver(action="enable", mode=1, req=1, index=0, tag=1, fail=(-1, 0))

        vectors()
        enable()
        assert m.kernel.ctrl & CTRL_REQ and m.kernel.tags() == [1] * 4
        m.disk_fills(kind=f'"event":"host.{report}"', skip=0, fail=1, plan=[])
        if report == "vectors":
            vectors()
        else:  # st_set of vector 2 fails: its host_result's line is lost
            m.linux_driver(action="set", mode=1, req=1, index=2, tag=1, fail=(0, -6))
        assert m.frozen and not m.kernel.ctrl & CTRL_REQ
        enable()
        assert not m.kernel.ctrl & CTRL_REQ
        m.thaw()
        vectors()
        enable()
        assert m.kernel.ctrl & CTRL_REQ and not m.frozen


def test_the_oracle_sees_a_lost_entry_line_that_freezes_nothing(monkeypatch: Any) -> None:
    """A planted bug: the freeze does nothing (the decision whose line was lost is dropped
    and the device left as it was). Tag 0x01 stays in entry 0 while serve takes it to hold
    0x00; a reload that makes 0x01 foreign has nothing to correct there, and the oracle,
    judging the device's bytes, finds the foreign tag usable (the machine's own rule for a
    frozen device is off here, so that the escape itself is what is seen)."""
    monkeypatch.setattr(Engine, "freeze", lambda self, vm, bdf, message: None)
    with named_policies():
        m = story(False, FROZEN_OFF=False)
        m.steady_entries(enable=1, writes=[(0, OWN, False)], lose=None)
        m.disk_fills(kind='"op":"write"', skip=0, fail=1, plan=[])
        m.tph_entry(index=0, choice=("zero", 0), width=2)  # lost: dropped, 0x01 stays
        with pytest.raises(broken("foreign-tag"), match="ST entry 0 may hold 0x1"):
            m.reload(Change("fewer-cpus", cpus=frozenset({4, 5, 6, 7})))


def test_the_machine_finds_a_freeze_that_does_nothing(monkeypatch: Any) -> None:
    """The canary: with the freeze planted as a no-op, a short derandomized run of the
    machine reports a broken invariant (a device that kept TPH on although a decision of its
    own was never delivered)."""
    monkeypatch.setattr(Engine, "freeze", lambda self, vm, bdf, message: None)
    with pytest.raises(InvariantBroken):
        run(machine(False), 300, 15, phases=[Phase.generate], derandomize=True, database=None)
