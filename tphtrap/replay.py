"""``tphtrap replay``: run recorded guest accesses through the engine, offline.

Two trace formats, detected per file (or forced with ``--format``):

* **native**: JSON lines of plugin-protocol requests (``attach``, ``cfg_write``, ``msix_write``,
  ``reset``, ...), each optionally with the ``expect``-ed decision. ``tphtrap serve --record``
  writes exactly this, so a recorded session is a trace.
* **qemu**: QEMU ``log`` trace-backend output (see docs/qemu-traces.md and
  :mod:`tphtrap.qemu_trace`).

The replay core (:class:`Replayer`) yields one :class:`Record` per access and keeps counters;
the command prints a summary table or JSON, writes ``--decisions``, compares ``--expect`` and
shows progress on a terminal. Everything streams: memory does not grow with the trace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import IO, Any

from .cli import EXIT_INTERNAL, EXIT_MISMATCH, EXIT_OK, EXIT_UNJUDGED, EXIT_USER
from .device import ConfigSpace, load_device, normalize_bdf, parse_hex_config
from .engine import AttachRefused, Engine
from .engine.reasons import VIOLATIONS
from .errors import DeviceError, TphtrapError, TraceError, WireError
from .events import (
    VERDICT_NAMES,
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from .policy import DeviceSettings, Policy
from .qemu_trace import (
    REASON_OTHER_REGION,
    REASON_UNRELATED,
    WIDTH_INFERRED,
    QemuTraceReader,
    open_trace,
)
from .replay_memo import DecisionMemo, Effect
from .replay_summary import (
    MAX_FIRST,
    MAX_LISTED,
    MAX_NOTABLE,
    NOT_JUDGED,
    ReplaySummary,
    TphView,
    format_summary,
)
from .wire import ACCESS_OPS, Request, decision_json, parse_request, to_access

__all__ = [
    "NotJudged",
    "Record",
    "ReplaySummary",
    "Replayer",
    "add_parser",
    "detect_format",
    "sniff_format",
]

# Decisions that need no reviewer's attention: the guest got what it asked for.
_PASS = Verdict.PASS
_EXT_START = 0x100  # config offsets from here on are extended config space

# A native line the memo may know: its id (a 64-bit integer or a short plain string: any such
# id decodes alike) first, then the rest of the line, which is the key.
_ID_START = '{"id":'
_ID_TOKEN = re.compile(r'0|-?[1-9][0-9]{0,17}|"[A-Za-z0-9_.-]{1,32}"')
# A QEMU access the memo may know: its type, whether its width was inferred, and its fields
_QEMU_KEY: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    ConfigWrite: attrgetter("vm", "bdf", "offset", "width", "value"),
    ConfigRead: attrgetter("vm", "bdf", "offset", "width"),
    MsixWrite: attrgetter("vm", "bdf", "bar", "offset", "width", "value"),
    MsixRead: attrgetter("vm", "bdf", "bar", "offset", "width"),
    Reset: attrgetter("vm", "bdf"),
}


def _native_key(text: str) -> str | None:
    """The memo's key of a native trace line: the line after its id, or None."""
    if not text.startswith(_ID_START):
        return None
    cut = text.find(",", 6)
    if cut < 0 or _ID_TOKEN.fullmatch(text, 6, cut) is None:
        return None
    return text[cut + 1 :]


class NotJudged(TphtrapError):
    """``--strict``: an access that could not be judged (raised at its line)."""


@dataclass(slots=True)
class Record:
    trace: str
    line: int
    access: Access
    decision: Decision
    expected: dict[str, Any] | None = None
    mismatch: str | None = None
    inferred: bool = False  # the access width was inferred (QEMU traces without size events)


def sniff_format(lines: Iterable[str]) -> tuple[str, Iterator[str]]:
    """(``native`` if the first non-blank line is a JSON object, else ``qemu``; the lines).

    A byte order mark before the object does not make it a QEMU log (the native reader then
    reports that line as malformed). Reads only up to that first non-blank line and gives it
    back: nothing is lost, so it works on standard input, and line numbers stay those of the
    trace.
    """
    it = iter(lines)
    head: list[str] = []
    fmt = "native"
    for line in it:
        head.append(line)
        text = line.strip().removeprefix("\ufeff")
        if text:
            fmt = "native" if text.startswith("{") else "qemu"
            break
    return fmt, itertools.chain(head, it)


def detect_format(path: str) -> str:
    """The format of the trace at ``path`` (see :func:`sniff_format`)."""
    lines = open_trace(path)
    try:
        return sniff_format(lines)[0]
    finally:
        close = getattr(lines, "close", None)
        if close is not None:
            close()


def _describe(d: dict[str, Any], limit: int | None = None) -> str:
    writes = [
        f"{w.get('space')}{'[' + str(w['bar']) + ']' if 'bar' in w else ''}"
        f"@{w.get('offset', 0):#x}/{w.get('width')}={w.get('value', 0):#x}"
        for w in d.get("writes", [])
        if isinstance(w, dict)
    ]
    if limit is not None and len(writes) > limit:
        writes = [*writes[: limit - 1], f"... {len(writes) - limit} more ...", writes[-1]]
    return f"{d.get('verdict')} {d.get('reason')} [{','.join(writes)}]"


def _notable(rec: Record) -> str:
    a = rec.access
    what = type(a).__name__
    if isinstance(a, (ConfigWrite, MsixWrite)):
        where = f"BAR{a.bar} " if isinstance(a, MsixWrite) else ""
        what = f"write {where}@{a.offset:#x}/{a.width}={a.value:#x}"
    elif isinstance(a, (ConfigRead, MsixRead)):
        what = f"read @{a.offset:#x}/{a.width}"
    got = _describe(decision_json(rec.decision), limit=4)
    return f"{rec.trace}:{rec.line}: {a.vm} {a.bdf} {what} -> {got}"


def _not_a_decision(expected: Any) -> str | None:
    """Why ``expected`` cannot be a recorded decision, or None if it is shaped like one.

    A trace is input like any other: an ``expect`` with ``"writes": null`` or a write whose
    offset is a string is a mismatch to report, not something to format blindly.
    """
    if not isinstance(expected, dict):
        return f"expect is not an object: {json.dumps(expected)[:80]}"
    writes = expected.get("writes", [])
    if not isinstance(writes, list):
        return f"expect.writes is not a list: {json.dumps(writes)[:80]}"
    for i, w in enumerate(writes):
        if not isinstance(w, dict):
            return f"expect.writes[{i}] is not an object: {json.dumps(w)[:80]}"
        for key in ("offset", "width", "value", "bar"):
            v = w.get(key, 0)
            if type(v) is not int:
                return f"expect.writes[{i}].{key} is not an integer: {json.dumps(v)[:80]}"
    return None


def compare(expected: Any, actual: dict[str, Any]) -> str | None:
    """None when the decision matches the expectation (verdict, reason and writes)."""
    problem = _not_a_decision(expected)
    if problem is not None:
        return f"{problem}; got {_describe(actual)}"
    for key in ("verdict", "reason", "writes"):
        if key in expected and expected[key] != actual.get(key):
            return f"expected {_describe(expected)}, got {_describe(actual)}"
    return None


def compare_decision(expected: Any, decision: Decision) -> str | None:
    """:func:`compare` of ``expected`` with ``decision_json(decision)``, without building it
    unless there is a difference to describe.

    The same test: the verdict and reason are the strings the JSON form holds; once
    :func:`_not_a_decision` has passed, ``expected["writes"]`` is a list of objects, and such
    an object equals a write's JSON form exactly when it has that form's keys and no others,
    with equal values (:func:`_same_write`).
    """
    problem = _not_a_decision(expected)
    if problem is not None:
        return f"{problem}; got {_describe(decision_json(decision))}"
    if (
        ("verdict" in expected and expected["verdict"] != VERDICT_NAMES[decision.verdict])
        or ("reason" in expected and expected["reason"] != decision.reason)
        or ("writes" in expected and not _same_writes(expected["writes"], decision.writes))
    ):
        return f"expected {_describe(expected)}, got {_describe(decision_json(decision))}"
    return None


_ABSENT: Any = object()  # a key missing from an expected write (equal to nothing)


def _same_writes(expected: list[dict[str, Any]], writes: tuple[DeviceWrite, ...]) -> bool:
    """``expected == [w.to_json() for w in writes]``."""
    return len(expected) == len(writes) and all(map(_same_write, expected, writes))


def _same_write(e: dict[str, Any], w: DeviceWrite) -> bool:
    """``e == w.to_json()``: the keys ``space``, ``offset``, ``width``, ``value`` and, for a
    BAR write, ``bar``; no other key, each value equal."""
    bar = w.bar
    get = e.get
    return (
        len(e) == (4 if bar is None else 5)
        and get("space", _ABSENT) == w.space
        and get("offset", _ABSENT) == w.offset
        and get("width", _ABSENT) == w.width
        and get("value", _ABSENT) == w.value
        and (bar is None or get("bar", _ABSENT) == bar)
    )


class _QemuDevice:
    """What replay keeps per QEMU trace device between its accesses (rebuilt when the
    reader's view of the device changes)."""

    __slots__ = ("block_all", "block_ext", "gen", "headers", "sig", "vm")

    def __init__(self, vm: str, gen: int) -> None:
        self.vm = vm
        self.gen = gen
        self.sig: tuple[Any, ...] | None = None
        self.block_all: str | None = None  # no access of the device can be judged
        self.block_ext: str | None = None  # nor those in extended config space and MSI-X
        self.headers: frozenset[int] = frozenset()  # ext header reads judged all the same


class Replayer:
    """The replay core: feeds accesses to one engine and keeps the summary. No printing.

    Every line of every trace ends in one bucket of :attr:`summary` (see
    :mod:`tphtrap.replay_summary`). ``select`` narrows what the summary *shows* (tables,
    per-device lines, notable writes), never what it counts. With ``strict``, the first
    malformed line raises :class:`TraceError` and, unless ``allow_unjudged``, the first access
    that cannot be judged raises :class:`NotJudged`.

    With ``memo`` (see :mod:`tphtrap.replay_memo`), a line the memo knows in the device's
    state is counted from memory, and yields no record: the summary is the same; only the
    records decided afresh are yielded. ``tick`` is then called every 1024 lines.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        devices: dict[str, ConfigSpace] | None = None,
        overlays: dict[str, ConfigSpace] | None = None,
        vm_of: Callable[[str], str | None] | None = None,
        strict: bool = False,
        allow_unjudged: bool = False,
        check_expect: bool = False,
        select: Callable[[Record], bool] | None = None,
        filter_text: str | None = None,
        memo: bool = False,
        tick: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.engine = Engine(policy)
        self.devices = {normalize_bdf(k): v for k, v in (devices or {}).items()}
        self.overlays = {normalize_bdf(k): v for k, v in (overlays or {}).items()}
        self.vm_of = vm_of or (lambda bdf: None)
        self.strict = strict
        self.allow_unjudged = allow_unjudged
        self.check_expect = check_expect
        self.select = select
        self.summary = ReplaySummary(filter_text=filter_text)
        self._attached: dict[str, tuple[str, tuple[Any, ...], int]] = {}  # bdf -> (vm, sig, gen)
        self._qemu: dict[str, _QemuDevice] = {}
        self._refused: dict[str, str] = {}  # bdf -> why the engine refused it
        self._seen: set[str] = set()  # device names the traces named (for absent bindings)
        self._readers: list[QemuTraceReader] = []
        self.memo = DecisionMemo(self.engine, self.summary) if memo else None
        self.tick = tick

    def records_so_far(self) -> int:
        """The records judged so far (with those counted from memory not yet added)."""
        memo = self.memo
        return self.summary.records + (memo.pending() if memo is not None else 0)

    def _settle(self) -> None:
        """Bring the engine and the summary up to date with the memo, which forgets
        everything (before the engine's devices or policy change, and after a trace)."""
        if self.memo is not None:
            self.memo.settle()

    # --- shared ----------------------------------------------------------------------------
    def _malformed(self, trace: str, line: int, message: str) -> None:
        reason = message.split(":", 1)[0]
        self.summary.buckets["malformed"].add(trace, line, None, reason, message)
        where = f"{trace}:{line}"
        text = f"{where}: {message}"
        if self.strict:
            raise TraceError(where, message)
        if len(self.summary.malformed_lines) < MAX_LISTED:
            self.summary.malformed_lines.append(text)

    def _not_judged(
        self, bucket: str, trace: str, line: int, device: str | None, reason: str, note: str
    ) -> None:
        self.summary.buckets[bucket].add(trace, line, device, reason, note)
        if self.strict and not self.allow_unjudged:
            who = f" {device}" if device else ""
            raise NotJudged(f"{trace}:{line}: not judged ({bucket}):{who} {note or reason}")

    def _assign(self, vm: str, bdf: str) -> bool:
        """Make sure the policy assigns ``bdf`` to ``vm`` (adding it for replay if free)."""
        vm_policy = self.policy.vms.get(vm)
        if vm_policy is None or bdf in vm_policy.devices:
            return True
        if self.policy.vm_of_device(bdf) is not None:
            return False
        devices = dict(vm_policy.devices)
        devices[bdf] = DeviceSettings(bdf)
        vms = dict(self.policy.vms)
        vms[vm] = replace(vm_policy, devices=devices)
        self.policy = replace(self.policy, vms=vms)
        # Only a device is added: the attached sessions keep their rules (a full reload would
        # rebuild them all, making a trace with thousands of devices quadratic).
        self.engine.add_device(self.policy, vm, bdf)
        self.summary.implicit_devices.append(f"{bdf} -> {vm}")
        return True

    def _attach(
        self, vm: str, bdf: str, cfg: ConfigSpace, where: str, overlay: str | None = None
    ) -> str | None:
        """Attach ``bdf`` to ``vm``; why the engine refused it, or None."""
        self._settle()
        ov = self.overlays.get(bdf)
        if ov is not None:
            cfg = cfg.with_tph_overlay(ov)
            overlay = overlay or ov.source
        if not self._assign(vm, bdf):
            return self._refuse(bdf, where, f"device {bdf} belongs to another VM in the policy")
        if self.engine.session(vm, bdf) is not None:
            self.engine.detach(vm, bdf)
        try:
            self.engine.attach(vm, bdf, cfg)
        except AttachRefused as exc:  # e.g. bad-config: a snapshot too short to show TPH
            return self._refuse(bdf, where, f"{exc.code}: {exc.message}")
        self._refused.pop(bdf, None)
        view = TphView.of(cfg, overlay)
        old = self.summary.tph.get(bdf)
        if view is not None and old is not None:  # re-attached: keep what was seen so far
            view.enabled_at, view.enable_mode, view.enable_width = (
                old.enabled_at,
                old.enable_mode,
                old.enable_width,
            )
            view.enables, view.usable, view.guest_writes = old.enables, old.usable, old.guest_writes
            view.guest_enable_at, view.guest_tag_writes = old.guest_enable_at, old.guest_tag_writes
            view.resets, view.first_reset_at = old.resets, old.first_reset_at
            view.overlay_hits, view.overlay_first = old.overlay_hits, old.overlay_first
        if view is not None:
            self.summary.tph[bdf] = view
        return None

    def _refuse(self, bdf: str, where: str, message: str) -> str:
        if bdf not in self._refused and len(self.summary.attach_errors) < MAX_LISTED:
            self.summary.attach_errors.append(f"{where}: {message}")
        self._refused[bdf] = message
        return message

    def _decide(
        self, trace: str, line: int, access: Access, expect: Any = None, inferred: bool = False
    ) -> Record:
        decision = self.engine.handle(access)
        s = self.summary
        s.records += 1
        verdict = decision.verdict
        passed = verdict is _PASS
        reason = decision.reason
        bdf = access.bdf
        kind = type(access)
        s.tally[(verdict, reason, access.vm, bdf, kind)] += 1
        rec = Record(trace, line, access, decision, expect, None, inferred)
        if inferred:
            s.inferred[bdf] += 1
        if s.records <= MAX_FIRST:
            s.first_records.append(f"{trace}:{line}: {bdf} {VERDICT_NAMES[verdict]} {reason}")
        if passed and not VIOLATIONS.isdisjoint(decision.reasons):
            s.contradiction(f"{_notable(rec)} (reasons: {', '.join(decision.reasons)})")
        view = s.tph.get(bdf)
        # reads change nothing on the device: only an overlay counts the ones that hit it
        if view is not None and (access.is_write or kind is Reset or view.overlay):
            view.observe(trace, line, access, decision)
        if expect is not None and self.check_expect:
            self._check_expect(rec, expect)
        select = self.select
        if select is not None:
            if not select(rec):
                return rec
            s.shown += 1
            s.shown_verdicts[VERDICT_NAMES[verdict]] += 1
            s.shown_reasons[reason] += 1
        if not passed and access.is_write and len(s.notable) < MAX_NOTABLE:
            s.notable.append(_notable(rec))
        return rec

    def _memo_decide(
        self,
        key: Any,
        trace: str,
        line: int,
        access: Access,
        expect: Any = None,
        inferred: bool = False,
    ) -> Record:
        """:meth:`_decide`, the device's session first brought up to date with the memo, which
        then learns the line (``key``; None: not to be learned) if its record may repeat."""
        memo = self.memo
        assert memo is not None
        dev = memo.before(access.vm, access.bdf)
        if dev is None:
            return self._decide(trace, line, access, expect, inferred)
        s = self.summary
        before = (s.records, len(s.notable), s.contradictions, s.mismatches, s.expected, s.shown)
        view = memo.view_counters(access.bdf)
        counts = memo.counts(dev)
        rec = self._decide(trace, line, access, expect, inferred)
        effect = None
        if key is not None and self._memo_learnable(before, rec):
            d = rec.decision
            effect = Effect(
                (d.verdict, d.reason, access.vm, access.bdf, type(access)),
                inferred,
                s.expected != before[4],
                (VERDICT_NAMES[d.verdict], d.reason) if s.shown != before[5] else None,
                tuple(b - a for a, b in zip(view, memo.view_counters(access.bdf), strict=True)),
                memo.effect_counts(dev, counts),
            )
        memo.after(dev, key if effect is not None else None, effect)
        return rec

    def _memo_learnable(self, before: tuple[int, ...], rec: Record) -> bool:
        """Whether a repetition of ``rec`` would change the summary only by its counts:
        nothing of it names its line (a first record, a notable write, a contradiction, a
        mismatch)."""
        s = self.summary
        records, notable, contradictions, mismatches = before[:4]
        if records < MAX_FIRST or s.contradictions != contradictions:
            return False
        if s.mismatches != mismatches or len(s.notable) != notable:
            return False
        # a refused or changed write is listed while there is room (if the filter shows it)
        return not (
            notable < MAX_NOTABLE and rec.decision.verdict is not _PASS and rec.access.is_write
        )

    def _check_expect(self, rec: Record, expect: Any) -> None:
        s = self.summary
        s.expected += 1
        rec.mismatch = compare_decision(expect, rec.decision)
        if rec.mismatch:
            s.mismatches += 1
            if len(s.mismatch_lines) < MAX_LISTED:
                s.mismatch_lines.append(f"{rec.trace}:{rec.line}: {rec.mismatch}")

    def finish(self, bindings: dict[str, str]) -> None:
        """Report every binding (name -> the option that gave it) that named no device of
        the traces: what it asked was never answered."""
        for name, option in bindings.items():
            if name in self._seen or any(r.knows(name) for r in self._readers):
                continue
            self.summary.absent.append(
                f"{option} {name}: target absent: no line of the trace(s) names this device"
            )

    # --- native traces ---------------------------------------------------------------------
    def native(self, path: str, lines: Iterable[str] | None = None) -> Iterator[Record]:
        source = open_trace(path) if lines is None else lines
        engine = self.engine
        seen = self._seen
        skipped = self.summary.buckets["skipped"]
        memo, tick = self.memo, self.tick
        routes = memo.routes if memo is not None else None
        id_token = _ID_TOKEN.fullmatch
        lineno = 0
        try:
            for lineno, text in enumerate(source, 1):
                if routes is not None and text.startswith(_ID_START):  # the memo's fast path
                    cut = text.find(",", 6)
                    tail = text[cut + 1 :]
                    dev = routes.get(tail)
                    if dev is not None and cut > 0 and id_token(text, 6, cut) is not None:
                        edge = dev.node.edges.get(tail)  # type: ignore[union-attr]
                        if edge is not None:
                            dev.node, effect = edge
                            effect.hits += 1
                            dev.ahead += 1
                            if tick is not None and not lineno & 1023:
                                tick(path)
                            continue
                body = text.rstrip("\r\n")
                if not body or body.isspace():  # (both strip() would leave empty)
                    skipped.add(path, lineno, None, "blank line")
                    continue
                try:
                    req = parse_request(body)
                except WireError as exc:
                    self._malformed(path, lineno, f"{exc.code}: {exc.message}")
                    continue
                if req.op in ACCESS_OPS:
                    access = to_access(req)
                    if engine.session(access.vm, access.bdf) is None:
                        seen.add(access.bdf)
                        self._auto_attach(access.vm, access.bdf, f"{path}:{lineno}")
                    if memo is not None:
                        yield self._memo_decide(
                            _native_key(text), path, lineno, access, req.args.get("expect")
                        )
                    else:
                        yield self._decide(path, lineno, access, req.args.get("expect"))
                    continue
                usable = True  # False: the request went to the malformed bucket instead
                if req.op == "attach":
                    seen.add(req.args["bdf"])
                    usable = self._native_attach(req, path, lineno)
                elif req.op == "detach":
                    self._settle()
                    self.engine.detach(req.args["vm"], req.args["bdf"])
                    self._attached.pop(req.args["bdf"], None)
                elif req.op == "reload":
                    usable = self._reload(req, path, lineno)
                if usable:
                    skipped.add(path, lineno, None, f"{req.op} request (no access)")
        finally:
            self._settle()
            self.summary.lines += lineno

    def _native_attach(self, req: Request, path: str, lineno: int) -> bool:
        """Attach as the trace says; False when its device cannot be read (malformed)."""
        where = f"{path}:{lineno}"
        a = req.args
        bdf = a["bdf"]
        try:
            if bdf in self.devices:
                cfg = self.devices[bdf]
            elif "config" in a:
                cfg = parse_hex_config(a["config"], where, bdf)
            else:
                cfg = load_device(a["path"], a.get("source_bdf"))
        except DeviceError as exc:
            self._malformed(path, lineno, f"attach: {exc}")
            return False
        cfg = ConfigSpace.from_bytes(cfg.data, cfg.source, bdf, cfg.line_map)
        self._attach(a["vm"], bdf, cfg, where)
        self._attached[bdf] = (a["vm"], (), 0)
        return True

    def _auto_attach(self, vm: str, bdf: str, where: str) -> None:
        """Attach a ``--device``-bound device on its first access when the trace did not
        (the caller has found no session for it)."""
        if bdf in self._refused:
            return
        cfg = self.devices.get(bdf)
        if cfg is not None:
            self._attach(vm, bdf, ConfigSpace.from_bytes(cfg.data, cfg.source, bdf), where)

    def _reload(self, req: Request, path: str, lineno: int) -> bool:
        """Reload as the trace says; False when its policy cannot be read (malformed)."""
        from .policyfile import load_policy

        policy_path = req.args.get("policy")
        if policy_path is None:
            return True
        try:
            policy = load_policy(policy_path)
        except (TphtrapError, OSError) as exc:
            self._malformed(path, lineno, f"reload: {exc}")
            return False
        self._settle()
        self.policy = policy
        self.engine.reload(policy)
        return True

    # --- QEMU traces -----------------------------------------------------------------------
    def qemu(self, path: str, lines: Iterable[str] | None = None) -> Iterator[Record]:
        source = open_trace(path) if lines is None else lines
        reader = QemuTraceReader(
            source,
            name=path,
            devices=self.devices,
            vm_of=self.vm_of,
            overlays=self.overlays,
            strict=self.strict,
        )
        self._readers.append(reader)
        s = self.summary
        known = self._qemu
        skipped = s.buckets["skipped"]
        memo, tick = self.memo, self.tick
        remembered = memo.devices if memo is not None else None
        qemu_key = _QEMU_KEY
        hits = 0
        try:
            for lineno, access, note, bucket, reason in reader:
                if bucket:
                    if bucket == "skipped":
                        skipped.add(path, lineno, None, reason)
                    elif bucket == "malformed":
                        cut = len(f"{path}:{lineno}: ")
                        s.buckets["malformed"].add(path, lineno, None, reason, note[cut:])
                        if len(s.malformed_lines) < MAX_LISTED:
                            s.malformed_lines.append(note)
                    else:
                        bdf = access.bdf if access is not None else None
                        detail = "" if bucket == "unbound" else note
                        self._not_judged(bucket, path, lineno, bdf, reason, detail)
                    continue
                assert access is not None
                bdf = access.bdf
                dev = known.get(bdf)
                if dev is None or dev.gen != reader.config_generation(bdf) or dev.vm != access.vm:
                    dev = self._sync_qemu_device(reader, access.vm, bdf, f"{path}:{lineno}")
                if dev.block_all is not None or (
                    dev.block_ext is not None and _in_ext_or_msix(access, dev.headers)
                ):
                    why = dev.block_all or dev.block_ext
                    assert why is not None
                    self._not_judged("unjudged", path, lineno, bdf, why, "")
                    continue
                inferred = note.startswith(WIDTH_INFERRED)
                if remembered is None:
                    yield self._decide(path, lineno, access, inferred=inferred)
                    continue
                kind = type(access)
                key = (kind, inferred, qemu_key[kind](access))
                mdev = remembered.get((access.vm, bdf))
                if mdev is not None:
                    edge = mdev.node.edges.get(key)  # type: ignore[union-attr]
                    if edge is not None:  # the memo's fast path
                        mdev.node, effect = edge
                        effect.hits += 1
                        mdev.ahead += 1
                        hits += 1
                        if tick is not None and not hits & 1023:
                            tick(path)
                        continue
                yield self._memo_decide(key, path, lineno, access, inferred=inferred)
        finally:
            self._settle()
            st = reader.stats
            for reason, n in (
                (REASON_UNRELATED, st.skipped),
                (REASON_OTHER_REGION, st.other_regions),
            ):
                if n:
                    skipped.count += n
                    skipped.reasons[reason] += n
            s.lines += st.lines

    def _sync_qemu_device(
        self, reader: QemuTraceReader, vm: str, bdf: str, where: str
    ) -> _QemuDevice:
        """(Re-)attach a trace device when its bound or learned config space changes shape,
        and work out which of its accesses cannot be judged."""
        gen = reader.config_generation(bdf)
        old = self._qemu.get(bdf)
        dev = self._qemu[bdf] = _QemuDevice(vm, gen)
        mismatch, unseen = reader.not_judgeable(bdf)
        dev.block_ext = unseen
        if unseen is not None:
            dev.headers = reader.ext_headers(bdf)
        cfg = reader.device_config(bdf)
        if cfg is None:
            why = reader.config_error(bdf)
            cfg = ConfigSpace.from_bytes(bytes(4096), f"{bdf} (nothing learned yet)", bdf)
            if why is not None:  # e.g. an overlay before the PCIe capability was read
                dev.block_ext = f"learned config space not usable yet: {why}"
        sig = _geometry(cfg)
        dev.sig = sig
        if mismatch is not None:
            dev.block_all = mismatch
        if old is not None and old.vm == vm and old.sig == sig and bdf not in self._refused:
            dev.block_all = dev.block_all or (
                old.block_all if old.block_all and old.block_all.startswith("attach") else None
            )
            return dev
        cfg = ConfigSpace.from_bytes(cfg.data, cfg.source, bdf)
        overlays, self.overlays = self.overlays, {}  # the reader applied overlays already
        try:
            refused = self._attach(vm, bdf, cfg, where, overlay=reader.overlaid(bdf))
        except DeviceError as exc:
            refused = str(exc)
        finally:
            self.overlays = overlays
        if refused is not None:
            dev.block_all = dev.block_all or f"attach refused: {refused}"
        return dev


def _in_ext_or_msix(access: Access, headers: frozenset[int]) -> bool:
    """Whether a learned device's access needs its extended capabilities to be judged (the
    reads of the capability headers the guest walked do not)."""
    if isinstance(access, ConfigRead):
        return access.offset + access.width > _EXT_START and access.offset not in headers
    if isinstance(access, ConfigWrite):
        return access.offset + access.width > _EXT_START
    return not isinstance(access, Reset)


def _geometry(cfg: ConfigSpace) -> tuple[Any, ...]:
    tph, msix = cfg.tph, cfg.msix
    return (
        None if tph is None else (tph.offset, tph.cap_raw, tph.table_ok),
        None if msix is None else (msix.offset, msix.flags_raw, msix.table_raw),
    )


# --- the command ---------------------------------------------------------------------------
class _Progress:
    """A one-line progress indicator on a terminal (quiet otherwise)."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.last = 0.0
        self.start = time.monotonic()

    def update(self, trace: str, records: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.25:
            return
        self.last = now
        rate = records / max(now - self.start, 1e-9)
        self.stream.write(f"\r{Path(trace).name}: {records:,} records, {rate:,.0f}/s ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.last:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _bindings(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise DeviceError(f"--{what}", f"expected BDF=VALUE, got {item!r}")
        try:
            out[normalize_bdf(key)] = value
        except ValueError as exc:
            raise DeviceError(f"--{what} {item}", str(exc)) from None
    return out


_EXIT_HELP = (
    "exit status: 0 every access judged (and --expect matched); 1 bad input (or a malformed\n"
    "  line with --strict); 2 usage error; 3 internal error; 4 decisions differ from --expect;\n"
    "  5 accesses or lines not judged (unbound, unattributed, unjudged, malformed, a binding\n"
    "  naming no device of the trace, or nothing judged at all) unless --allow-unjudged"
)


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay recorded guest accesses (native or QEMU traces) against a policy",
        description=(
            "Run every access of one or more traces through the engine and report what the "
            "policy would have done, and every line that was not judged and why. Traces are "
            "native JSON lines (what 'tphtrap serve --record' writes) or QEMU 'log' "
            "trace-backend output; gzip is read transparently, also on standard input."
        ),
        epilog=(
            "examples:\n"
            "  tphtrap replay fixtures/traces/demo-session.jsonl \\\n"
            "      --policy policies/two-tenants.yaml --expect\n"
            "  tphtrap replay fixtures/traces/qemu-guest-boot.log.gz \\\n"
            "      --policy policies/two-tenants.yaml --vm tenant-a\n"
            "  tphtrap replay qemu.log.gz --policy p.yaml --vm tenant-a \\\n"
            "      --device 0000:00:03.0=fixtures/devices/nic-st-in-msix.lspci --json\n"
            "  zcat qemu.log.gz | tphtrap replay - --policy p.yaml --vm tenant-a --only-tph\n"
            f"{_EXIT_HELP}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace file(s); - for stdin")
    p.add_argument("--policy", required=True, metavar="FILE", help="YAML policy")
    p.add_argument("--format", choices=("auto", "native", "qemu"), default="auto")
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="BDF[=FILE]",
        help="BDF=FILE: config space of a device (sysfs dir/config, lspci dump, hex); "
        "BDF alone: show only this device (repeatable; everything is still counted)",
    )
    p.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="BDF=FILE",
        help="graft FILE's TPH capability onto the device: 'what if it had TPH'",
    )
    p.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="NAME|BDF=NAME",
        help="VM of the trace's devices (QEMU traces): one name for all, or per BDF",
    )
    p.add_argument(
        "--only-tph",
        action="store_true",
        help="show only the accesses the TPH rules decided on (reason other than not-tph)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--decisions", metavar="FILE", help="write one JSON decision per record")
    p.add_argument(
        "--expect",
        action="store_true",
        help="compare with the decisions recorded in the trace; exit 4 on a difference",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first malformed line (exit 1) or access not judged (exit 5)",
    )
    p.add_argument(
        "--allow-unjudged",
        action="store_true",
        help="accesses that cannot be judged are expected: report them but exit 0",
    )
    p.add_argument(
        "--no-memo",
        action="store_true",
        help="decide every access afresh, also one the trace repeated in the same device "
        "state (same summary, slower; --decisions implies it)",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress on standard error (auto: only on a terminal)",
    )
    p.set_defaults(func=run)


def _load_bound(items: list[str], what: str) -> dict[str, ConfigSpace]:
    out = {}
    for bdf, path in _bindings(items, what).items():
        dev = load_device(path, None if not _is_multi(path) else bdf)
        out[bdf] = ConfigSpace.from_bytes(dev.data, dev.source, bdf, dev.line_map)
    return out


def _is_multi(path: str) -> bool:
    try:
        from .device import load_devices

        return len(load_devices(path)) > 1
    except DeviceError:
        return False


def _shown_devices(items: list[str]) -> set[str]:
    out = set()
    for item in items:
        try:
            out.add(normalize_bdf(item))
        except ValueError as exc:
            raise DeviceError(f"--device {item}", str(exc)) from None
    return out


def _selector(
    shown: set[str], only_tph: bool
) -> tuple[Callable[[Record], bool] | None, str | None]:
    if not shown and not only_tph:
        return None, None
    parts = [f"--device {d}" for d in sorted(shown)] + (["--only-tph"] if only_tph else [])

    def select(rec: Record) -> bool:
        if shown and rec.access.bdf not in shown:
            return False
        return not only_tph or rec.decision.reason != "not-tph"

    return select, " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from .errors import PolicyError
    from .policyfile import load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        for prob in exc.problems:
            print(prob.format(), file=sys.stderr)
        return EXIT_USER
    shown = _shown_devices([d for d in args.device if "=" not in d])
    device_items = [d for d in args.device if "=" in d]
    devices = _load_bound(device_items, "device")
    overlays = _load_bound(args.overlay, "overlay")
    default_vm: str | None = None
    per_bdf: dict[str, str] = {}
    for item in args.vm:
        if "=" in item:
            per_bdf.update(_bindings([item], "vm"))
        else:
            default_vm = item
    for name in [*per_bdf.values(), *([default_vm] if default_vm else [])]:
        if name not in policy.vms:
            known = ", ".join(sorted(policy.vms))
            raise DeviceError("--vm", f"no VM {name!r} in {args.policy} (have: {known})")
    bindings = {
        **{bdf: "--vm" for bdf in per_bdf},
        **{bdf: "--device" for bdf in devices},
        **{bdf: "--overlay" for bdf in overlays},
        **{bdf: "--device (filter)" for bdf in shown},
    }

    def vm_of(bdf: str) -> str | None:
        try:
            key = normalize_bdf(bdf)
        except ValueError:
            key = bdf
        if key in per_bdf:
            return per_bdf[key]
        if default_vm is not None:
            return default_vm
        owner = policy.vm_of_device(key)
        return owner.name if owner else None

    select, filter_text = _selector(shown, args.only_tph)
    progress = _Progress(
        sys.stderr,
        args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty()),
    )
    rp = Replayer(
        policy,
        devices=devices,
        overlays=overlays,
        vm_of=vm_of,
        strict=args.strict,
        allow_unjudged=args.allow_unjudged,
        check_expect=args.expect,
        select=select,
        filter_text=filter_text,
        memo=not (args.no_memo or args.decisions),
        tick=lambda trace: progress.update(trace, rp.records_so_far()),
    )
    out = open(args.decisions, "w", encoding="utf-8") if args.decisions else None  # noqa: SIM115
    started = time.monotonic()
    try:
        for trace in args.traces:
            rp.summary.traces.append(trace)
            lines: Iterable[str] = open_trace(trace)
            fmt, lines = sniff_format(lines)
            if args.format != "auto":
                fmt = args.format
            records = rp.native(trace, lines) if fmt == "native" else rp.qemu(trace, lines)
            for rec in records:
                if out is not None and (select is None or select(rec)):
                    out.write(_decision_line(rec))
                if not rec.line % 1024:
                    progress.update(trace, rp.records_so_far())
    except NotJudged as exc:
        progress.done()
        print(f"tphtrap: error: {exc}", file=sys.stderr)
        return EXIT_UNJUDGED
    finally:
        progress.done()
        if out is not None:
            out.close()
    rp.finish(bindings)
    rp.summary.seconds = time.monotonic() - started
    s = rp.summary
    if args.json:
        print(json.dumps(s.to_json(), indent=2))
    else:
        print(format_summary(s, shown or None))
    return _exit_status(s, args)


def _exit_status(s: ReplaySummary, args: argparse.Namespace) -> int:
    """The exit status, with a line on standard error whenever it is not a clean 0."""
    if s.contradictions:
        print(
            f"tphtrap: internal error: {s.contradictions:,} decision(s) pass an access with a "
            "violation reason (a bug: please report it with the summary)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    if args.expect and s.mismatches:
        print(
            f"tphtrap: {s.mismatches:,} decision(s) differ from the trace's expectations",
            file=sys.stderr,
        )
        return EXIT_MISMATCH
    problems = [f"{s.buckets[b].count:,} {b}" for b in NOT_JUDGED if s.buckets[b].count]
    if s.absent:
        problems.append(f"{len(s.absent)} binding(s) naming no device of the trace")
    if not s.records:
        problems.append("no access judged at all")
    if not problems:
        return EXIT_OK
    text = ", ".join(problems)
    if args.allow_unjudged:
        print(f"tphtrap: warning: not judged: {text} (accepted: --allow-unjudged)", file=sys.stderr)
        return EXIT_OK
    print(
        f"tphtrap: not judged: {text}; the summary says why (--allow-unjudged accepts them)",
        file=sys.stderr,
    )
    return EXIT_UNJUDGED


def _decision_line(rec: Record) -> str:
    from .audit import access_fields

    obj: dict[str, Any] = {"trace": rec.trace, "line": rec.line}
    obj.update(access_fields(rec.access))
    if rec.inferred:
        obj["width_inferred"] = True
    obj["decision"] = decision_json(rec.decision)
    if rec.mismatch:
        obj["mismatch"] = rec.mismatch
    return json.dumps(obj, separators=(",", ":")) + "\n"
