"""The fast-path measurements of ``make bench``: what a VMM's guest pays per TPH decision.

* :func:`trap_share`: how many of a real guest's accesses the trap map keeps away from the
  plugin (they cost the guest nothing: the VMM handles them itself);
* :func:`worst_decision`: the largest single decision (enable on a 2048-vector MSI-X device
  after a width change, every Vector Control re-written) through ``serve``'s pipes;
* :func:`linux_update`: each request of Linux's ST entry update (read, disable, entry, read,
  enable), one in flight, ``serve`` against the C echo child;
* :func:`kind_pipelined`: requests per second of each latency kind with a window of requests
  in flight, ``serve`` against the C echo child on the same pipes.

Each returns plain data; ``bench/run.py`` renders it with the goals.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workload

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "fixtures" / "traces" / "qemu-guest-boot.log.gz"
OVERLAY_BDF = "0000:01:00.0"  # the trace's first virtio NIC
OVERLAY = ROOT / "fixtures" / "devices" / "nic-st-in-msix.lspci"
WORST_VECTORS = 2048
WORST_BAR, WORST_TABLE = 4, 0xFFFF0000  # a table high in a 64-bit BAR: the longest offsets
WORST_CTRL = 0x148 + 8  # synth.build_config's TPH capability at 0x148


# --- the trap map on a real guest ---------------------------------------------------------------
@dataclass
class TrapShare:
    trace: str
    accesses: int = 0  # config and MSI-X accesses of the trace's devices
    trapped: int = 0  # ... that the trap map sends to tphtrap
    by_device: dict[str, tuple[int, int]] = field(default_factory=dict)  # bdf -> (all, trapped)
    tph_devices: list[str] = field(default_factory=list)


def trap_share() -> TrapShare:
    """Replay the recorded guest boot (``make traces``: Debian's QEMU, a Linux guest loading
    three virtio drivers and moving MSI-X affinities), with the TPH capability of
    ``nic-st-in-msix.lspci`` grafted onto its first NIC (ST table in MSI-X, so its Vector
    Control words are trapped too), and count the accesses each device's trap map names."""
    from tphtrap.device import load_device
    from tphtrap.engine.trapmap import trap_map, trapped
    from tphtrap.events import ConfigRead, ConfigWrite, MsixRead, MsixWrite
    from tphtrap.policyfile import load_policy
    from tphtrap.qemu_trace import open_trace
    from tphtrap.replay import Replayer

    policy = load_policy(str(workload.POLICY))
    rp = Replayer(
        policy, overlays={OVERLAY_BDF: load_device(OVERLAY)}, vm_of=lambda _bdf: "tenant-a"
    )
    out = TrapShare(str(TRACE.relative_to(ROOT)))
    maps: dict[Any, Any] = {}  # session -> its trap map (a device learned from the trace is
    # attached again when the guest reads more of it: the overlay appears once its PCI Express
    # capability is known)
    counts: Counter[tuple[str, bool]] = Counter()
    tph: set[str] = set()
    for rec in rp.qemu(str(TRACE), open_trace(str(TRACE))):
        a = rec.access
        sess = rp.engine.session(a.vm, a.bdf)
        assert sess is not None, a.bdf
        tm = maps.get(sess)
        if tm is None:
            tm = maps[sess] = trap_map(sess.geo)
            if tm["config"] or tm["bar"]:
                tph.add(a.bdf)
        if isinstance(a, ConfigWrite | ConfigRead):
            hit = trapped(tm, "config", a.offset, a.width, write=isinstance(a, ConfigWrite))
        elif isinstance(a, MsixWrite | MsixRead):
            hit = trapped(tm, "bar", a.offset, a.width, write=isinstance(a, MsixWrite), bar=a.bar)
        else:
            hit = True  # a reset: the VMM tells tphtrap
        counts[(a.bdf, hit)] += 1
    for bdf in sorted({b for b, _ in counts}):
        total, hits = counts[(bdf, True)] + counts[(bdf, False)], counts[(bdf, True)]
        out.by_device[bdf] = (total, hits)
        out.accesses += total
        out.trapped += hits
    out.tph_devices = sorted(tph)
    return out


# --- the worst single decision ------------------------------------------------------------------
@dataclass
class Worst:
    vectors: int
    rounds: list[float] = field(default_factory=list)  # round trip of the decision, ms
    reply_bytes: int = 0
    max_reply: int = 0
    writes: int = 0


def worst_decision(child: Any, workdir: Path, rounds: int) -> Worst:
    """``child`` is a started ``serve`` (bench/run.py's Child) with the benchmark set-up; its
    device of tenant-a is replaced (detached, then left detached) by a 2048-vector MSI-X
    device whose ST table is in MSI-X; each round programs every Vector Control with tag
    0x0001 and the mask bit alternating (no two neighbours alike, so no runs), enables TPH at
    8 bits, then times the write that enables Extended TPH: every entry re-resolved at 16 bits
    and re-written, Requester Enable cleared first."""
    from tphtrap.spec import StLocation
    from tphtrap.synth import MsixSpec, TphSpec, build_config
    from tphtrap.wire import MAX_REPLY

    dev = workdir / "msix-2048.bin"
    tph = TphSpec(extended=True, location=StLocation.MSIX, table_size=WORST_VECTORS)
    msix = MsixSpec(WORST_VECTORS, bir=WORST_BAR, table_offset=WORST_TABLE)
    dev.write_bytes(build_config(tph=tph, msix=msix))
    a = workload.A  # in its place: the policy assigns only that device to tenant-a
    out = Worst(WORST_VECTORS, max_reply=MAX_REPLY)
    n = 0

    def send(op: str, **fields: Any) -> bytes:
        nonlocal n
        n += 1
        return child.call(json.dumps({"id": n, "op": op, **a, **fields}).encode() + b"\n")

    send("detach")
    reply = send("attach", path=str(dev))
    if b'"ok":true' not in reply:
        raise RuntimeError(f"worst decision: attach refused: {reply[:300]!r}")
    program = b"".join(
        json.dumps(
            {"id": f"p{i}", "op": "msix_write", **a, "bar": WORST_BAR,
             "offset": WORST_TABLE + 16 * i + 12, "width": 4, "value": 0x1_0000 | i % 2}
        ).encode() + b"\n"
        for i in range(WORST_VECTORS)
    )  # fmt: skip
    for _ in range(rounds):
        send("cfg_write", offset=WORST_CTRL, width=4, value=0x1)  # disabled
        _pipe(child, program, WORST_VECTORS)
        send("cfg_write", offset=WORST_CTRL, width=4, value=0x101)  # TPH, 8-bit tags
        start = time.perf_counter()
        reply = send("cfg_write", offset=WORST_CTRL, width=4, value=0x301)  # now 16 bits
        out.rounds.append((time.perf_counter() - start) * 1e3)
        got = json.loads(reply)
        if not got["ok"]:
            raise RuntimeError(f"worst decision refused: {reply[:300]!r}")
        out.reply_bytes = max(out.reply_bytes, len(reply.rstrip(b"\n")))
        out.writes = sum(w.get("count", 1) for w in got["decision"]["writes"])
    send("detach")
    return out


def _pipe(child: Any, data: bytes, replies: int) -> None:
    """Send ``data`` (``replies`` request lines) and read every reply."""
    view = memoryview(data)
    got = 0
    while view or got < replies:
        if view:
            view = view[os.write(child.wfd, view[:65536]) :]
        chunk = os.read(child.rfd, 1 << 20)
        if not chunk:
            raise RuntimeError(f"{child.name} exited (see its stderr)")
        got += chunk.count(b"\n")


# --- Linux's ST entry update, request by request ---------------------------------------------
#: What Linux's pcie_tph_set_st_entry sends for one entry of tenant-a's ST table (in the
#: capability): the control register read and written with Requester Enable off, the entry,
#: the control register read and written back with it on (drivers/pci/tph.c).
UPDATE_STEPS = ("read control", "disable", "write the entry", "read control again", "enable")


def update_lines(i: int) -> list[bytes]:
    """The requests of one update of entry ``i % 8`` (its tag alternating 0x01 / 0x02)."""
    a, ctrl, table = workload.A, workload.CTRL_A, workload.TABLE_A
    reqs: list[dict[str, Any]] = [
        {"op": "cfg_read", "offset": ctrl, "width": 4},
        {"op": "cfg_write", "offset": ctrl, "width": 4, "value": 0x001},
        {"op": "cfg_write", "offset": table + 2 * (i % 8), "width": 2, "value": 1 + i // 8 % 2},
        {"op": "cfg_read", "offset": ctrl, "width": 4},
        {"op": "cfg_write", "offset": ctrl, "width": 4, "value": 0x101},
    ]
    return [
        json.dumps({"id": f"u{i}.{k}", **r, **a}, separators=(",", ":")).encode() + b"\n"
        for k, r in enumerate(reqs)
    ]


def linux_update(children: dict[str, Any], updates: int) -> dict[str, dict[str, list[float]]]:
    """Round trips (µs) of each request of ``updates`` ST entry updates, one request in flight,
    for each of ``children`` (name -> Child), the children alternating update by update."""
    out: dict[str, dict[str, list[float]]] = {n: {s: [] for s in UPDATE_STEPS} for n in children}
    clock = time.perf_counter_ns
    for i in range(updates + 16):  # (the first 16: a warm-up)
        for name, child in children.items():
            for step, line in zip(UPDATE_STEPS, update_lines(i), strict=True):
                t0 = clock()
                reply = child.call(line)
                if i >= 16:
                    out[name][step].append((clock() - t0) / 1000)
                if b'"ok":true' not in reply:
                    raise RuntimeError(f"{name} refused an update request: {reply[:300]!r}")
    return out


# --- per request kind, pipelined ----------------------------------------------------------------
PIPE_WINDOW = 64
TPH_KINDS = [k for k in workload.LATENCY_KINDS if "non-TPH" not in k]


def kind_pipelined(
    children: dict[str, Any], pipelined: Any, n: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Requests per second of each latency request kind alone, ``PIPE_WINDOW`` in flight, for
    each of ``children`` (name -> Child), the children alternating round by round."""
    out: dict[str, dict[str, list[float]]] = {}
    names = list(children)
    for kind in workload.LATENCY_KINDS:
        lines = workload.latency_requests(kind)
        out[kind] = {name: [] for name in names}
        for name in names:
            pipelined(children[name], lines, min(2000, n), PIPE_WINDOW)  # warm-up
        for rnd in range(rounds):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                out[kind][name].append(pipelined(children[name], lines, n, PIPE_WINDOW))
    return out


# --- the worst single decision, in process ------------------------------------------------------
@dataclass
class WorstSplit:
    """Where the worst decision's time goes inside ``serve``, ms per round: the engine, the
    ``access.decided`` audit line, the reply line (what ``serve`` does for one access)."""

    engine: list[float] = field(default_factory=list)
    audit: list[float] = field(default_factory=list)
    reply: list[float] = field(default_factory=list)
    writes: int = 0
    reply_bytes: int = 0


def worst_state(engine: Any) -> tuple[Any, Callable[[], None], Any]:
    """Attach :func:`worst_decision`'s 2048-vector device to ``engine`` (for tenant-a, in the
    benchmark policy) and return (its session, a function bringing it to the state before the
    timed write: disabled, every Vector Control programmed, TPH enabled at 8 bits, the timed
    access: the write enabling Extended TPH)."""
    from tphtrap.device import ConfigSpace
    from tphtrap.events import ConfigWrite, MsixWrite
    from tphtrap.spec import StLocation
    from tphtrap.synth import MsixSpec, TphSpec, build_config

    tph = TphSpec(extended=True, location=StLocation.MSIX, table_size=WORST_VECTORS)
    msix = MsixSpec(WORST_VECTORS, bir=WORST_BAR, table_offset=WORST_TABLE)
    vm, bdf = workload.A["vm"], workload.A["bdf"]
    cfg = ConfigSpace.from_bytes(build_config(tph=tph, msix=msix), "msix-2048", bdf)
    decision = engine.attach(vm, bdf, cfg)
    if decision.verdict.name == "DROP":
        raise RuntimeError(f"worst decision: attach refused: {decision}")
    program = [
        MsixWrite(vm, bdf, WORST_BAR, WORST_TABLE + 16 * i + 12, 4, 0x1_0000 | i % 2)
        for i in range(WORST_VECTORS)
    ]

    def prepare() -> None:
        engine.handle(ConfigWrite(vm, bdf, WORST_CTRL, 4, 0x1))
        for access in program:
            engine.handle(access)
        engine.handle(ConfigWrite(vm, bdf, WORST_CTRL, 4, 0x101))

    return engine.session(vm, bdf), prepare, ConfigWrite(vm, bdf, WORST_CTRL, 4, 0x301)


def worst_in_process(rounds: int, audit_path: Path) -> WorstSplit:
    """:func:`worst_decision` without the pipes: ``rounds`` times the state set up again, then
    the one decision, its audit line (to ``audit_path``) and its reply, each timed alone."""
    from tphtrap.audit import Auditor
    from tphtrap.engine import Engine
    from tphtrap.policyfile import load_policy
    from tphtrap.wire import access_reply

    engine = Engine(load_policy(str(workload.POLICY)))
    _sess, prepare, access = worst_state(engine)
    auditor = Auditor.to_file(str(audit_path))
    out = WorstSplit()
    try:
        for n in range(rounds):
            prepare()
            gc.collect()  # the set-up's garbage is not the decision's
            t0 = time.perf_counter()
            decision = engine.handle(access)
            t1 = time.perf_counter()
            auditor.decided(access, decision, {"id": n})
            t2 = time.perf_counter()
            line = access_reply(n, decision)
            t3 = time.perf_counter()
            out.engine.append((t1 - t0) * 1e3)
            out.audit.append((t2 - t1) * 1e3)
            out.reply.append((t3 - t2) * 1e3)
            out.writes = len(decision.writes)
            out.reply_bytes = len(line) - 1
    finally:
        auditor.close()
    return out
