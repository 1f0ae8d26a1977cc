"""What ``tphtrap replay`` reports: the accounting buckets, the per-device reviewer's view and
the summary text.

Every line of a trace ends in exactly one bucket (:data:`BUCKETS`): ``records`` (judged by the
engine), ``unbound`` (a device with no VM), ``unattributed`` (an access no device can be named
for), ``unjudged`` (a device whose accesses cannot be judged: identity mismatch, capabilities
never seen, attach refused), ``skipped`` (a line that carries no access) or ``malformed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final, TypeVar

from .device import ConfigSpace
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
from .spec import StLocation

__all__ = ["BUCKETS", "NOT_JUDGED", "Bucket", "ReplaySummary", "TphView", "format_summary"]

BUCKETS: Final = ("records", "unbound", "unattributed", "unjudged", "skipped", "malformed")
NOT_JUDGED: Final = ("unbound", "unattributed", "unjudged", "malformed")
MAX_FIRST: Final = 5  # first lines listed per bucket (all are counted)
MAX_LISTED: Final = 50  # malformed lines and mismatches listed in the summary
MAX_NOTABLE: Final = 20  # refused or changed accesses listed in the summary
MAX_TAGS: Final = 16  # usable tags listed per device
_K = TypeVar("_K")

_KIND_NAMES: Final[dict[type, str]] = {
    ConfigRead: "config read",
    ConfigWrite: "config write",
    MsixRead: "MSI-X read",
    MsixWrite: "MSI-X write",
    Reset: "reset",
}
_MODES: Final = {0: "No ST", 1: "Interrupt Vector", 2: "Device Specific"}
_WIDTHS: Final = {1: "8-bit tags (TPH)", 3: "16-bit tags (Extended TPH)"}
_HINTS: Final = {
    "unbound": "give --vm NAME (every device), --vm BDF=NAME, or assign the devices in the policy",
    "unattributed": "trace pci_update_mappings_* from the start, before the guest maps its BARs",
    "unjudged": "see the reasons; --allow-unjudged accepts them",
    "malformed": "see the lines listed; --strict stops at the first",
}


@dataclass
class Bucket:
    """Lines of one kind: how many, of which devices, why, and the first few."""

    count: int = 0
    devices: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)

    def add(self, trace: str, line: int, device: str | None, reason: str, note: str = "") -> None:
        self.count += 1
        if device:
            self.devices[device] += 1
        self.reasons[reason] += 1
        if len(self.first) < MAX_FIRST:
            who = f" {device}" if device else ""
            self.first.append(f"{trace}:{line}:{who} {note or reason}")

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "devices": dict(self.devices.most_common()),
            "reasons": dict(self.reasons.most_common()),
            "first_lines": self.first,
        }


@dataclass
class TphView:
    """A reviewer's view of one TPH-capable device: what the device itself was given.

    Follows the writes the engine's decisions perform on the device (not what the guest
    asked): when TPH Requester Enable was set, in which mode and width, which tags the device
    held while it was, and, for an overlay, how many accesses hit the grafted capability.
    """

    ctrl: int  # offset of the TPH control register
    cap_start: int
    cap_end: int
    location: StLocation
    table_start: int  # config offset (capability table) or offset in the BAR (MSI-X table)
    table_entries: int
    table_bar: int | None
    entry_values: dict[int, int]  # entry index -> 16-bit tag on the device
    dev_ctrl: int = 0
    enabled_at: str | None = None
    enable_mode: str = ""
    enable_width: str = ""
    enables: int = 0
    usable: set[int] = field(default_factory=set)
    guest_writes: int = 0  # guest writes to the TPH capability
    guest_enable_at: str | None = None  # the first guest write asking for Requester Enable
    guest_tag_writes: int = 0  # guest MSI-X Vector Control writes with steering-tag bits
    resets: int = 0  # resets of the function (a guest FLR or PM write, or the hypervisor's)
    first_reset_at: str | None = None
    overlay: str | None = None
    overlay_hits: int = 0
    overlay_first: str | None = None

    @classmethod
    def of(cls, cfg: ConfigSpace, overlay: str | None) -> TphView | None:
        tph = cfg.tph
        if tph is None:
            return None
        start, bar, entries = 0, None, 0
        if tph.location is StLocation.CAP:
            start, entries = tph.offset + 0xC, tph.table_size
        elif tph.location is StLocation.MSIX and cfg.msix is not None:
            start, bar, entries = cfg.msix.table_offset, cfg.msix.table_bir, cfg.msix.table_size
        values = {}
        if tph.location is StLocation.CAP:
            values = {i: cfg.u16(start + 2 * i) for i in range(entries)}
        return cls(
            ctrl=tph.offset + 8,
            cap_start=tph.offset,
            cap_end=tph.offset + tph.region_length,
            location=tph.location,
            table_start=start,
            table_entries=entries,
            table_bar=bar,
            entry_values=values,
            dev_ctrl=cfg.u32(tph.offset + 8),
            overlay=overlay,
        )

    # --- following the decisions --------------------------------------------------------------
    def observe(self, trace: str, line: int, access: Access, decision: Decision) -> None:
        """Follow one judged access of the device. Called for writes and resets (reads change
        nothing on the device) and, with an overlay, for the reads that may hit it."""
        cap_start, cap_end, table_bar = self.cap_start, self.cap_end, self.table_bar
        if isinstance(access, (ConfigWrite, ConfigRead)):
            if access.offset < cap_end and access.offset + access.width > cap_start:
                if self.overlay is not None:
                    self.overlay_hits += 1
                    self.overlay_first = self.overlay_first or f"{trace}:{line}"
                if isinstance(access, ConfigWrite):
                    self._guest_config_write(trace, line, access)
        elif isinstance(access, MsixWrite) and access.value >> 16 and self._is_vc(access):
            self.guest_tag_writes += 1
        if isinstance(access, Reset) or "reset" in decision.reasons:
            self._reset(f"{trace}:{line}")
        for w in decision.writes:
            if w.space == "config":
                if w.offset < cap_end and w.offset + w.width > cap_start:
                    self._config_write(trace, line, w)
            elif w.bar == table_bar and table_bar is not None:
                self._vector_control_write(w)

    def _reset(self, where: str) -> None:
        """The function was reset: TPH control and the ST entries back to power-on (the
        decision's writes, which follow, say what the device gets next)."""
        self.resets += 1
        self.first_reset_at = self.first_reset_at or where
        self.dev_ctrl = 0
        self.entry_values = dict.fromkeys(self.entry_values, 0)

    def _is_vc(self, a: MsixWrite) -> bool:
        rel = a.offset - self.table_start
        return a.bar == self.table_bar and 0 <= rel < 16 * self.table_entries and rel % 16 == 12

    def _guest_config_write(self, trace: str, line: int, a: ConfigWrite) -> None:
        self.guest_writes += 1
        shift = 8 * (self.ctrl + 1 - a.offset)  # bits 9:8 are in the control register's byte 1
        if 0 <= shift < 8 * a.width and (a.value >> shift) & 3 and self.guest_enable_at is None:
            self.guest_enable_at = f"{trace}:{line}"

    def _config_write(self, trace: str, line: int, w: DeviceWrite) -> None:
        """A write the device gets in its TPH capability: the control register, ST entries."""
        was_enabled = self.dev_ctrl >> 8 & 3
        off, width, value = w.offset, w.width, w.value
        rel = off - self.table_start
        if off == self.ctrl and width == 4:  # the usual cases: the whole control register,
            self.dev_ctrl = value
        elif (
            width == 2
            and self.location is StLocation.CAP
            and 0 <= rel < 2 * self.table_entries
            and not rel & 1
        ):  # or one ST entry of the capability's table
            self._set_entry(rel >> 1, value)
        else:
            self._config_parts(off, off + width, value)
        enabled = self.dev_ctrl >> 8 & 3
        if enabled and not was_enabled:
            self._enabled(f"{trace}:{line}", enabled)

    def _config_parts(self, off: int, end: int, value: int) -> None:
        """Any other write to [off, end) of the capability."""
        ctrl = self.ctrl
        if off <= ctrl and ctrl + 4 <= end:
            self.dev_ctrl = (value >> (8 * (ctrl - off))) & 0xFFFF_FFFF
        else:
            for pos in range(max(off, ctrl), min(end, ctrl + 4)):
                shift = 8 * (pos - ctrl)
                byte = (value >> (8 * (pos - off))) & 0xFF
                self.dev_ctrl = (self.dev_ctrl & ~(0xFF << shift)) | (byte << shift)
        if self.location is StLocation.CAP:  # entry i: 16 bits at table_start + 2 * i
            ts = self.table_start
            for i in range(max(0, (off - ts) // 2), min(self.table_entries, (end - ts + 1) // 2)):
                self._entry_write(i, ts + 2 * i, off, value, end)

    def _vector_control_write(self, w: DeviceWrite) -> None:
        """A write the device gets in its MSI-X table: entry i's tag is the upper half of its
        Vector Control, bytes 14-15 of the table's entry i."""
        ts, off, end = self.table_start, w.offset, w.offset + w.width
        rel = off - ts
        if end - off == 4 and rel & 15 == 12:  # the usual case: one whole Vector Control
            if 0 <= rel < 16 * self.table_entries:
                self._set_entry(rel >> 4, w.value >> 16)
            return
        for i in range(max(0, (off - ts) // 16), min(self.table_entries, (end - ts + 1) // 16)):
            self._entry_write(i, ts + 16 * i + 14, off, w.value, end)

    def _entry_write(self, i: int, at: int, off: int, value: int, end: int) -> None:
        """Entry ``i`` (16 bits at ``at``) from a write of ``value`` to [off, end), which
        covers at least one byte of it."""
        if off <= at and at + 2 <= end:
            self._set_entry(i, (value >> (8 * (at - off))) & 0xFFFF)
            return
        old = self.entry_values.get(i, 0)
        if off <= at:  # the low byte only
            self._set_entry(i, (old & 0xFF00) | ((value >> (8 * (at - off))) & 0xFF))
        else:  # the high byte only
            self._set_entry(i, (old & 0xFF) | ((value >> (8 * (at + 1 - off))) & 0xFF) << 8)

    def _set_entry(self, i: int, tag: int) -> None:
        self.entry_values[i] = tag
        enabled = self.dev_ctrl >> 8 & 3
        if enabled and self.dev_ctrl & 7 and len(self.usable) <= 4 * MAX_TAGS:
            self.usable.add(tag & (0xFFFF if enabled == 3 else 0xFF))

    def _enabled(self, where: str, enable: int) -> None:
        """Requester Enable went from 0 to ``enable`` on the device."""
        self.enables += 1
        if self.enabled_at is None:
            self.enabled_at = where
            self.enable_mode = _MODES.get(self.dev_ctrl & 7, f"mode {self.dev_ctrl & 7}")
            self.enable_width = _WIDTHS.get(enable, f"enable {enable}")
        if self.dev_ctrl & 7 == 0:
            self.usable.add(0)  # No ST mode: every request carries tag 0
            return
        values = self.entry_values.values() if self.entry_values else (0,)
        if enable == 3:  # 16-bit tags: the entries as they are
            self.usable.update(values)
        else:
            self.usable.update(v & 0xFF for v in values)

    def describe(self) -> str:
        resets = ""
        if self.resets:
            resets = f"; reset {self.resets:,} time(s), first at {self.first_reset_at}"
        if self.enabled_at is None:
            asked = f"; the guest asked at {self.guest_enable_at}" if self.guest_enable_at else ""
            return f"TPH Requester Enable never set on the device{asked}{resets}"
        tags = sorted(self.usable)
        shown = ", ".join(f"{t:#x}" for t in tags[:MAX_TAGS])
        more = f" (+{len(tags) - MAX_TAGS} more)" if len(tags) > MAX_TAGS else ""
        again = f", {self.enables:,} times in all" if self.enables > 1 else ""
        return (
            f"TPH Requester Enable set at {self.enabled_at} ({self.enable_mode}, "
            f"{self.enable_width}{again}); tags usable: {shown or 'none'}{more}{resets}"
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tph_enabled": self.enabled_at is not None,
            "enabled_at": self.enabled_at,
            "mode": self.enable_mode or None,
            "width": self.enable_width or None,
            "times_enabled": self.enables,
            "usable_tags": sorted(self.usable),
            "guest_tph_writes": self.guest_writes,
            "guest_enable_request_at": self.guest_enable_at,
            "guest_msix_tag_writes": self.guest_tag_writes,
            "resets": self.resets,
            "first_reset_at": self.first_reset_at,
        }
        if self.overlay is not None:
            out["overlay"] = {
                "source": self.overlay,
                "at": f"{self.cap_start:#x}-{self.cap_end - 1:#x}",
                "accesses": self.overlay_hits,
                "first": self.overlay_first,
            }
        return out


@dataclass
class ReplaySummary:
    # judged records, all of them (filters narrow what is shown, never what is counted)
    records: int = 0
    # of them, counted from replay's memo (the same line again in the same device state)
    from_memory: int = 0
    # (verdict, reason, VM, device, access type) -> records: one count per record, from which
    # the verdict, reason, VM and device tables are derived (see :attr:`verdicts`)
    tally: Counter[tuple[Verdict, str, str, str, type]] = field(default_factory=Counter)
    inferred: Counter[str] = field(default_factory=Counter)  # device -> inferred widths
    first_records: list[str] = field(default_factory=list)
    buckets: dict[str, Bucket] = field(
        default_factory=lambda: {b: Bucket() for b in BUCKETS if b != "records"}
    )
    absent: list[str] = field(default_factory=list)  # bindings naming no device of the trace
    # what is shown (a filter gives its own counters; None: everything is shown)
    filter_text: str | None = None
    shown_verdicts: Counter[str] = field(default_factory=Counter)
    shown_reasons: Counter[str] = field(default_factory=Counter)
    shown: int = 0
    tph: dict[str, TphView] = field(default_factory=dict)
    malformed_lines: list[str] = field(default_factory=list)
    expected: int = 0
    mismatches: int = 0
    mismatch_lines: list[str] = field(default_factory=list)
    implicit_devices: list[str] = field(default_factory=list)
    notable: list[str] = field(default_factory=list)  # first refused or changed writes
    attach_errors: list[str] = field(default_factory=list)
    # decisions that break the engine's contract: a pass with a violation reason
    contradictions: int = 0
    contradiction_lines: list[str] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)
    lines: int = 0
    seconds: float = 0.0

    def contradiction(self, text: str) -> None:
        self.contradictions += 1
        if len(self.contradiction_lines) < MAX_LISTED:
            self.contradiction_lines.append(text)

    # --- derived ------------------------------------------------------------------------------
    # Each table lists its keys in the order of the records that first had them, as counting
    # them one record at a time would: the tally's keys are in that order, and a key of a
    # table first appears with the tally key of the record that first had it.
    @property
    def verdicts(self) -> Counter[str]:
        return self._tally_by(lambda key: VERDICT_NAMES[key[0]])

    @property
    def reasons(self) -> Counter[str]:
        return self._tally_by(itemgetter(1))

    @property
    def vms(self) -> Counter[str]:
        return self._tally_by(itemgetter(2))

    @property
    def kinds(self) -> Counter[tuple[str, type]]:
        """(device, access type) -> records."""
        return self._tally_by(itemgetter(3, 4))

    def _tally_by(self, part: Callable[[tuple[Verdict, str, str, str, type]], _K]) -> Counter[_K]:
        out: Counter[_K] = Counter()
        for key, n in self.tally.items():
            out[part(key)] += n
        return out

    @property
    def not_judged(self) -> int:
        return sum(self.buckets[b].count for b in NOT_JUDGED)

    @property
    def accounted(self) -> int:
        """Lines in some bucket: equals :attr:`lines` (the check that nothing was lost)."""
        return self.records + sum(b.count for b in self.buckets.values())

    def device_counts(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for (bdf, kind), n in self.kinds.items():
            out.setdefault(bdf, Counter())[_KIND_NAMES[kind]] += n
        return out

    def records_bucket(self) -> dict[str, Any]:
        devices: Counter[str] = Counter()
        for (bdf, _), n in self.kinds.items():
            devices[bdf] += n
        return {
            "count": self.records,
            "from_memory": self.from_memory,
            "devices": dict(devices.most_common()),
            "reasons": dict(self.reasons.most_common()),
            "first_lines": self.first_records,
        }

    def to_json(self) -> dict[str, Any]:
        counts = self.device_counts()
        devices = {}
        for bdf in sorted(set(counts) | set(self.tph)):
            entry: dict[str, Any] = {"accesses": dict(counts.get(bdf, {}))}
            entry["inferred_widths"] = self.inferred.get(bdf, 0)
            view = self.tph.get(bdf)
            entry["tph"] = view.to_json() if view is not None else None
            devices[bdf] = entry
        out: dict[str, Any] = {"traces": self.traces, "records": self.records_bucket()}
        out.update({name: b.to_json() for name, b in self.buckets.items()})
        out["unjudged"]["absent"] = self.absent
        out.update(
            {
                "lines": self.lines,
                "not_judged": self.not_judged,
                "tph_ever_enabled": any(v.enabled_at for v in self.tph.values()),
                "verdicts": dict(self.verdicts),
                "reasons": dict(self.reasons),
                "vms": dict(self.vms),
                "devices": devices,
                "filter": self.filter_text,
                "shown": self._shown_json(),
                "malformed_lines": self.malformed_lines,
                "expected": self.expected,
                "mismatches": self.mismatches,
                "mismatch_lines": self.mismatch_lines,
                "implicit_devices": self.implicit_devices,
                "notable": self.notable,
                "attach_errors": self.attach_errors,
                "contradictions": {
                    "count": self.contradictions,
                    "lines": self.contradiction_lines,
                },
                "seconds": round(self.seconds, 3),
                "records_per_second": round(self.records / self.seconds) if self.seconds else None,
            }
        )
        return out

    def _shown_json(self) -> dict[str, Any] | None:
        if self.filter_text is None:
            return None
        return {
            "records": self.shown,
            "verdicts": dict(self.shown_verdicts),
            "reasons": dict(self.shown_reasons),
        }


# --- text ---------------------------------------------------------------------------------------
def _table(title: str, counts: Counter[str], total: int) -> list[str]:
    if not counts:
        return []
    lines = [f"{title}:"]
    width = max(len(k) for k in counts)
    for key, n in counts.most_common():
        pct = 100.0 * n / total if total else 0.0
        lines.append(f"  {key:<{width}}  {n:>10,}  {pct:5.1f}%")
    return lines


def _devices_text(devices: Counter[str], limit: int = 6) -> str:
    items = [f"{d} ({n:,})" for d, n in devices.most_common(limit)]
    if len(devices) > limit:
        items.append(f"{len(devices) - limit} more")
    return ", ".join(items)


def _bucket_lines(name: str, b: Bucket) -> list[str]:
    out = [f"  {name:<13}{b.count:>10,}"]
    if not b.count:
        return out
    for reason, n in b.reasons.most_common():
        out.append(f"      {n:>10,}  {reason}")
    if b.devices:
        out.append(f"      devices: {_devices_text(b.devices)}")
    if name in NOT_JUDGED:
        out += [f"      first: {line}" for line in b.first]
    return out


def _accounting(s: ReplaySummary) -> list[str]:
    out = [f"accounting ({s.lines:,} lines, each in one bucket):"]
    memo = ""
    if s.from_memory:
        memo = f"; {s.from_memory:,} of them again (the same line in the same device state)"
    out.append(f"  {'records':<13}{s.records:>10,}  judged by the engine{memo}")
    for name in BUCKETS[1:]:
        out += _bucket_lines(name, s.buckets[name])
    out += [f"      {line}" for line in s.absent]
    return out


def _device_lines(s: ReplaySummary, show: set[str] | None) -> list[str]:
    counts = s.device_counts()
    names = sorted(set(counts) | set(s.tph))
    if show is not None:
        names = [n for n in names if n in show]
    if not names:
        return []
    out = ["devices (judged accesses):"]
    for bdf in names:
        c = counts.get(bdf, Counter())
        split = ", ".join(f"{k} {c[k]:,}" for k in _KIND_NAMES.values() if c[k])
        inferred = s.inferred.get(bdf, 0)
        if inferred:
            split += f"; {inferred:,} widths inferred"
        out.append(f"  {bdf}  {split or 'none'}")
        view = s.tph.get(bdf)
        out.append(f"      {view.describe() if view is not None else 'no TPH capability'}")
        if view is not None and view.overlay is not None:
            out.append(
                f"      overlay {view.overlay}: TPH capability grafted at "
                f"{view.cap_start:#x}-{view.cap_end - 1:#x}; {view.overlay_hits:,} accesses hit "
                f"it{', first ' + view.overlay_first if view.overlay_first else ''}"
            )
    return out


def format_summary(s: ReplaySummary, show_devices: set[str] | None = None) -> str:
    out: list[str] = []
    total = s.records + s.not_judged
    out.append(
        f"replayed {s.records:,} records from {len(s.traces)} trace(s) in {s.seconds:.2f}s; "
        f"{s.not_judged:,} of {total:,} accesses and lines were not judged"
    )
    if s.not_judged:
        why = "; ".join(
            f"{s.buckets[b].count:,} {b} ({_HINTS[b]})" for b in NOT_JUDGED if s.buckets[b].count
        )
        out.append(f"NOT JUDGED: {why}")
    if not s.records:
        out.append("NOTHING JUDGED: no access of this trace went through the engine")
    if s.contradictions:
        out.append(
            f"ENGINE CONTRADICTION: {s.contradictions:,} decision(s) pass an access with a "
            "violation reason (a bug):"
        )
        out += [f"  {line}" for line in s.contradiction_lines]
    out += _accounting(s)
    if s.filter_text is not None:
        out.append(f"shown: {s.shown:,} of {s.records:,} records ({s.filter_text})")
        verdicts, reasons, shown = s.shown_verdicts, s.shown_reasons, s.shown
    else:
        verdicts, reasons, shown = s.verdicts, s.reasons, s.records
    out += _table("verdicts", verdicts, shown)
    out += _table("reasons", reasons, shown)
    out += _table("VMs", s.vms, s.records)
    out += _device_lines(s, show_devices)
    if s.records and not any(v.enabled_at for v in s.tph.values()):
        out.append("TPH Requester Enable was never set on any device in this trace")
    for line in s.malformed_lines:
        out.append(f"  malformed: {line}")
    if s.notable:
        out.append(f"refused or changed writes (first {MAX_NOTABLE}):")
        out += [f"  {line}" for line in s.notable]
    for line in s.implicit_devices:
        out.append(f"  not in the policy, replayed as assigned: {line}")
    for line in s.attach_errors:
        out.append(f"  attach refused: {line}")
    if s.expected or s.mismatches:
        out.append(f"expectations: {s.expected - s.mismatches:,}/{s.expected:,} matched")
        out += [f"  {m}" for m in s.mismatch_lines]
    return _terminal_safe("\n".join(out))


def _terminal_safe(text: str) -> str:
    """``text`` with what a trace put in it made visible: unprintable characters (control
    characters but the line breaks, lone surrogates, format characters) as escapes, so a
    hostile path can neither move the terminal's cursor nor stop the summary (standard output
    cannot encode a surrogate)."""
    lines = text.split("\n")
    if all(line.isprintable() for line in lines):
        return text
    return "\n".join("".join(c if c.isprintable() else _escape(c) for c in ln) for ln in lines)


def _escape(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
