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
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from .cli import EXIT_MISMATCH
from .device import ConfigSpace, load_device, normalize_bdf, parse_hex_config
from .engine import AttachRefused, Engine
from .errors import DeviceError, TphtrapError, TraceError, WireError
from .events import (
    VERDICT_NAMES,
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    MsixRead,
    MsixWrite,
)
from .policy import DeviceSettings, Policy
from .qemu_trace import QemuTraceReader, open_trace
from .wire import ACCESS_OPS, Request, decision_json, parse_request, to_access

__all__ = ["Record", "ReplaySummary", "Replayer", "add_parser", "detect_format"]

MAX_LISTED = 50  # malformed lines and mismatches listed in the summary (all are counted)
MAX_NOTABLE = 20  # refused or changed accesses listed in the summary
# Decisions that need no reviewer's attention: the guest got what it asked for.
_ROUTINE = frozenset(
    {"not-tph", "control-granted", "tag-allowed", "tph-disabled", "tph-virtualized", "reset"}
)


@dataclass(slots=True)
class Record:
    trace: str
    line: int
    access: Access
    decision: Decision
    expected: dict[str, Any] | None = None
    mismatch: str | None = None


@dataclass
class ReplaySummary:
    records: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    vms: Counter[str] = field(default_factory=Counter)
    devices: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # unrelated lines (QEMU) and non-access requests (native)
    malformed: int = 0
    malformed_lines: list[str] = field(default_factory=list)
    mismatches: int = 0
    mismatch_lines: list[str] = field(default_factory=list)
    unbound: int = 0  # accesses of devices with no VM
    implicit_devices: list[str] = field(default_factory=list)
    notable: list[str] = field(default_factory=list)  # first refused or changed accesses
    attach_errors: list[str] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "traces": self.traces,
            "records": self.records,
            "verdicts": dict(self.verdicts),
            "reasons": dict(self.reasons),
            "vms": dict(self.vms),
            "devices": dict(self.devices),
            "skipped": self.skipped,
            "unbound": self.unbound,
            "malformed": self.malformed,
            "malformed_lines": self.malformed_lines,
            "mismatches": self.mismatches,
            "mismatch_lines": self.mismatch_lines,
            "implicit_devices": self.implicit_devices,
            "notable": self.notable,
            "attach_errors": self.attach_errors,
            "seconds": round(self.seconds, 3),
            "records_per_second": round(self.records / self.seconds) if self.seconds else None,
        }


def detect_format(path: str) -> str:
    """``native`` if the first non-blank line is a JSON object, else ``qemu``."""
    for line in open_trace(path):
        s = line.strip()
        if s:
            return "native" if s.startswith("{") else "qemu"
    return "native"


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


class Replayer:
    """The replay core: feeds accesses to one engine and keeps the summary. No printing."""

    def __init__(
        self,
        policy: Policy,
        *,
        devices: dict[str, ConfigSpace] | None = None,
        overlays: dict[str, ConfigSpace] | None = None,
        vm_of: Callable[[str], str | None] | None = None,
        strict: bool = False,
        check_expect: bool = False,
    ) -> None:
        self.policy = policy
        self.engine = Engine(policy)
        self.devices = {normalize_bdf(k): v for k, v in (devices or {}).items()}
        self.overlays = {normalize_bdf(k): v for k, v in (overlays or {}).items()}
        self.vm_of = vm_of or (lambda bdf: None)
        self.strict = strict
        self.check_expect = check_expect
        self.summary = ReplaySummary()
        self._attached: dict[str, tuple[str, tuple[Any, ...], int]] = {}  # bdf -> (vm, sig, gen)
        self._refused: set[str] = set()

    # --- shared ----------------------------------------------------------------------------
    def _malformed(self, where: str, message: str) -> None:
        self.summary.malformed += 1
        text = f"{where}: {message}"
        if self.strict:
            raise TraceError(where, message)
        if len(self.summary.malformed_lines) < MAX_LISTED:
            self.summary.malformed_lines.append(text)

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

    def _attach(self, vm: str, bdf: str, cfg: ConfigSpace, where: str) -> None:
        overlay = self.overlays.get(bdf)
        if overlay is not None:
            cfg = cfg.with_tph_overlay(overlay)
        if not self._assign(vm, bdf):
            self._refuse(bdf, where, f"device {bdf} belongs to another VM in the policy")
            return
        if self.engine.session(vm, bdf) is not None:
            self.engine.detach(vm, bdf)
        try:
            self.engine.attach(vm, bdf, cfg)
        except AttachRefused as exc:
            self._refuse(bdf, where, exc.message)
            return
        self._refused.discard(bdf)

    def _refuse(self, bdf: str, where: str, message: str) -> None:
        if bdf not in self._refused and len(self.summary.attach_errors) < MAX_LISTED:
            self.summary.attach_errors.append(f"{where}: {message}")
        self._refused.add(bdf)

    def _decide(self, trace: str, line: int, access: Access, expect: Any = None) -> Record:
        decision = self.engine.handle(access)
        s = self.summary
        s.records += 1
        s.verdicts[VERDICT_NAMES[decision.verdict]] += 1
        s.reasons[decision.reason] += 1
        s.vms[access.vm] += 1
        s.devices[access.bdf] += 1
        rec = Record(trace, line, access, decision)
        if decision.reason not in _ROUTINE and len(s.notable) < MAX_NOTABLE:
            s.notable.append(_notable(rec))
        if expect is not None:
            rec.expected = expect
            if self.check_expect:
                rec.mismatch = compare(expect, decision_json(decision))
                if rec.mismatch:
                    s.mismatches += 1
                    if len(s.mismatch_lines) < MAX_LISTED:
                        s.mismatch_lines.append(f"{trace}:{line}: {rec.mismatch}")
        return rec

    # --- native traces ---------------------------------------------------------------------
    def native(self, path: str, lines: Iterable[str] | None = None) -> Iterator[Record]:
        source = open_trace(path) if lines is None else lines
        engine = self.engine
        for lineno, text in enumerate(source, 1):
            if not text.strip():
                continue
            try:
                req = parse_request(text.rstrip("\r\n"))
            except WireError as exc:
                self._malformed(f"{path}:{lineno}", f"{exc.code}: {exc.message}")
                continue
            if req.op in ACCESS_OPS:
                access = to_access(req)
                if engine.session(access.vm, access.bdf) is None:
                    self._auto_attach(access.vm, access.bdf, f"{path}:{lineno}")
                yield self._decide(path, lineno, access, req.args.get("expect"))
                continue
            where = f"{path}:{lineno}"
            if req.op == "attach":
                self._native_attach(req, where)
            elif req.op == "detach":
                self.engine.detach(req.args["vm"], req.args["bdf"])
                self._attached.pop(req.args["bdf"], None)
            elif req.op == "reload":
                self._reload(req, where)
            else:
                self.summary.skipped += 1  # hello, stats, shutdown

    def _native_attach(self, req: Request, where: str) -> None:
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
            self._malformed(where, f"attach: {exc}")
            return
        cfg = ConfigSpace.from_bytes(cfg.data, cfg.source, bdf, cfg.line_map)
        self._attach(a["vm"], bdf, cfg, where)
        self._attached[bdf] = (a["vm"], (), 0)

    def _auto_attach(self, vm: str, bdf: str, where: str) -> None:
        """Attach a ``--device``-bound device on its first access when the trace did not
        (the caller has found no session for it)."""
        if bdf in self._refused:
            return
        cfg = self.devices.get(bdf)
        if cfg is not None:
            self._attach(vm, bdf, ConfigSpace.from_bytes(cfg.data, cfg.source, bdf), where)

    def _reload(self, req: Request, where: str) -> None:
        from .policyfile import load_policy

        path = req.args.get("policy")
        if path is None:
            return
        try:
            policy = load_policy(path)
        except (TphtrapError, OSError) as exc:
            self._malformed(where, f"reload: {exc}")
            return
        self.policy = policy
        self.engine.reload(policy)

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
        for rec in reader:
            access = rec.access
            if access is None:
                if rec.note and rec.note.startswith(f"{path}:"):
                    self.summary.malformed += 1
                    if len(self.summary.malformed_lines) < MAX_LISTED:
                        self.summary.malformed_lines.append(rec.note)
                continue
            if not access.vm:
                self.summary.unbound += 1
                continue
            self._sync_qemu_device(reader, access.vm, access.bdf, f"{path}:{rec.lineno}")
            yield self._decide(path, rec.lineno, access)
        self.summary.skipped += reader.stats.skipped + reader.stats.other_regions

    def _sync_qemu_device(self, reader: QemuTraceReader, vm: str, bdf: str, where: str) -> None:
        """(Re-)attach a trace device when its bound or learned config space changes shape."""
        gen = reader.config_generation(bdf)
        known = self._attached.get(bdf)
        if known is not None and known[0] == vm and known[2] == gen:
            return
        cfg = reader.device_config(bdf)
        if cfg is None:
            cfg = ConfigSpace.from_bytes(bytes(4096), f"{bdf} (nothing learned yet)", bdf)
        sig = _geometry(cfg)
        if known is not None and known[0] == vm and known[1] == sig:
            self._attached[bdf] = (vm, sig, gen)
            return
        cfg = ConfigSpace.from_bytes(cfg.data, cfg.source, bdf)
        overlays, self.overlays = self.overlays, {}  # the reader applied overlays already
        try:
            self._attach(vm, bdf, cfg, where)
        finally:
            self.overlays = overlays
        self._attached[bdf] = (vm, sig, gen)


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


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay recorded guest accesses (native or QEMU traces) against a policy",
        description=(
            "Run every access of one or more traces through the engine and report what the "
            "policy would have done. Traces are native JSON lines (what 'tphtrap serve "
            "--record' writes) or QEMU 'log' trace-backend output; gzip is read transparently."
        ),
        epilog=(
            "examples:\n"
            "  tphtrap replay fixtures/traces/demo-session.jsonl \\\n"
            "      --policy policies/two-tenants.yaml\n"
            "  tphtrap replay session.jsonl --policy p.yaml --expect\n"
            "  tphtrap replay qemu.log.gz --policy p.yaml --vm tenant-a \\\n"
            "      --device 0000:00:03.0=fixtures/devices/nic-st-in-msix.lspci --json\n"
            "exit status: 0 ok, 1 bad input (or malformed lines with --strict), 2 usage "
            "error, 4 decisions differ from --expect"
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
        metavar="BDF=FILE",
        help="config space of a device (sysfs dir/config, lspci dump, hex)",
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
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--decisions", metavar="FILE", help="write one JSON decision per record")
    p.add_argument(
        "--expect",
        action="store_true",
        help="compare with the decisions recorded in the trace; exit 4 on a difference",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
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


def run(args: argparse.Namespace) -> int:
    from .errors import PolicyError
    from .policyfile import load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        for prob in exc.problems:
            print(prob.format(), file=sys.stderr)
        return 1
    devices = _load_bound(args.device, "device")
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

    rp = Replayer(
        policy,
        devices=devices,
        overlays=overlays,
        vm_of=vm_of,
        strict=args.strict,
        check_expect=args.expect,
    )
    progress = _Progress(
        sys.stderr,
        args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty()),
    )
    out = open(args.decisions, "w", encoding="utf-8") if args.decisions else None  # noqa: SIM115
    started = time.monotonic()
    try:
        for trace in args.traces:
            rp.summary.traces.append(trace)
            fmt = args.format if args.format != "auto" else detect_format(trace)
            records = rp.native(trace) if fmt == "native" else rp.qemu(trace)
            for rec in records:
                if out is not None:
                    out.write(_decision_line(rec))
                if not rec.line % 1024:
                    progress.update(trace, rp.summary.records)
    finally:
        progress.done()
        if out is not None:
            out.close()
    rp.summary.seconds = time.monotonic() - started
    s = rp.summary
    if args.json:
        print(json.dumps(s.to_json(), indent=2))
    else:
        _print_summary(s)
    if args.expect and s.mismatches:
        return EXIT_MISMATCH
    return 0


def _decision_line(rec: Record) -> str:
    from .audit import access_fields

    obj: dict[str, Any] = {"trace": rec.trace, "line": rec.line}
    obj.update(access_fields(rec.access))
    obj["decision"] = decision_json(rec.decision)
    if rec.mismatch:
        obj["mismatch"] = rec.mismatch
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _table(title: str, counts: Counter[str], total: int) -> list[str]:
    if not counts:
        return []
    lines = [f"{title}:"]
    width = max(len(k) for k in counts)
    for key, n in counts.most_common():
        pct = 100.0 * n / total if total else 0.0
        lines.append(f"  {key:<{width}}  {n:>10,}  {pct:5.1f}%")
    return lines


def _print_summary(s: ReplaySummary) -> None:
    out: list[str] = []
    out.append(f"replayed {s.records:,} records from {len(s.traces)} trace(s) in {s.seconds:.2f}s")
    out += _table("verdicts", s.verdicts, s.records)
    out += _table("reasons", s.reasons, s.records)
    out += _table("VMs", s.vms, s.records)
    out += _table("devices", s.devices, s.records)
    out.append(
        f"skipped lines: {s.skipped:,}   unbound device accesses: {s.unbound:,}   "
        f"malformed lines: {s.malformed:,}"
    )
    for line in s.malformed_lines:
        out.append(f"  malformed: {line}")
    if s.notable:
        out.append(f"refused or changed (first {MAX_NOTABLE}):")
        out += [f"  {line}" for line in s.notable]
    for line in s.implicit_devices:
        out.append(f"  not in the policy, replayed as assigned: {line}")
    for line in s.attach_errors:
        out.append(f"  attach refused: {line}")
    if s.mismatches:
        out.append(f"decisions differing from the trace's expectations: {s.mismatches:,}")
        out += [f"  {m}" for m in s.mismatch_lines]
    print("\n".join(out))
