"""The native steady path of ``tphtrap serve``: the requests a running guest sends most, decided
in C (``_steady.c``) in the states the engine describes here.

``serve`` asks :meth:`NativePath.handle` first with every line (and runs its loop in C,
:meth:`NativePath.pump`, while every line is one it answers). It answers a plain ``cfg_write``
or ``msix_write`` of an armed session that is
- outside everything the engine filters, or in the MSI-X table with no byte in a Vector
  Control word (passed untouched, either backend);
- a write of one whole ST entry or Vector Control word in the engine's usual state: in the
  ``writes`` backend always, in the ``host`` backend when the decision has no host operation
  to do (the device holds that tag already, or its vector is not allocated, or the entries
  are not in use); one that sets a tag is the Python path's;
- a write of the whole control register whose decision the engine made in the same state
  before (either backend);
- a valid read (either backend), its bytes in a TPH capability or in the ST half of a Vector
  Control word served from the session's own guest view, any other passed.
Anything else is None and the Python path decides. After the Python path has handled an
access, its session waits to be armed again from the engine's state (:meth:`NativePath.refresh`),
which its next native-eligible request does; any other request, and a reload, drops every
session's arming.

What is armed is the engine's own knowledge, taken from it, never restated:
- the usual state, as :meth:`Session.steady_entry` defines it (one capability, no latch, the
  device's control register what the guest's request grants, entries settled at that width
  and none dirty; or entries not in use), and the self-check's copy of the control register
  one known value;
- the tag a guest writes resolved by :func:`resolve_entry` (asked once per tag and kept per
  rules, width and use), the checker's own rule for that control value (the tags allowed at its
  width) for the check of each entry in use;
- what a host decision with no operation leaves (:meth:`HostOps.idle`);
- a read's decision, :func:`served` (the engine's), its reply and audit line rendered once
  with marker numbers where the read's own go (:func:`_template`);
- a control write's decision made by the engine on a copy of the session and its backend,
  kept under :func:`control_key` with what it changed and what it read of the entries
  (:meth:`NativePath._learn`);
- the texts of the reply and the audit line from :mod:`tphtrap.wire` and :mod:`tphtrap.audit`.
tests/test_native.py drives servers with and without this path side by side, in both
backends, and compares every reply, audit line and all state after every request.
"""

from __future__ import annotations

import copy
from array import array
from typing import TYPE_CHECKING, Any, Final

from ..engine.core import decided, passed, served
from ..engine.geometry import CTRL_WRITABLE
from ..engine.render import HostOps, RawWrites
from ..engine.target import resolve_entry
from ..events import VERDICT_NAMES, ConfigRead, ConfigWrite, DeviceWrite, MsixRead, Verdict
from ..policy import TagRules
from ..spec import TagWidth
from ..wire import access_reply, decision_head, decision_text, rule_text, write_text

if TYPE_CHECKING:
    from ..audit import Auditor
    from ..engine import Engine
    from ..engine.session import Session

try:
    from . import _steady
except ImportError:  # not built: serve decides every request in Python
    _steady = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "CODES", "NativePath", "control_key"]

AVAILABLE: Final = _steady is not None
#: The reasons of a steady entry decision, in the order the C side indexes them.
CODES: Final = ("tag-allowed", "tag-translated", "unknown-virtual-tag", "foreign-tag")
_CODE_INDEX = {c: k for k, c in enumerate(CODES)}
_TAGS = 1 << 16  # a guest tag: the 16 bits of an ST entry, or of a Vector Control word
_DECLINE = -1
#: The two verdicts of a steady entry decision, as the C side indexes them: the writes
#: backend passes the guest's own write or rewrites it; the host backend has nothing to do
#: (the config ST table: no host operation, no write) or lets the guest's mask bits through.
_VERDICTS = {"writes": (Verdict.PASS, Verdict.REWRITE), "host": (Verdict.DROP, Verdict.REWRITE)}
_BACKENDS = (RawWrites, HostOps)
Reply = tuple[bytes, bytes | None, str, str, str]
#: What a control write's decision depends on besides the registers control_key reads: the
#: session's attributes, and the host backend's.
_KEY_ATTRS: Final = ("ctrl_written", "latched", "revoked", "settled", "prospective", "pm_state")
_HOST_KEY_ATTRS: Final = ("refusal", "allocated")
#: What every host decision sets, whether or not it differs from before (HostOps.commit, the
#: self-check's verify_host): the undo records of its operations.
_OVERWRITTEN: Final = frozenset({"backend.last", "checker._host_marks", "checker._host_undo"})
_CONTROLS_KEPT = 64  # control decisions kept per session (each one learnt on a copy)
_DIRTY_KEYED: Final = 8  # dirty entries a kept control decision may settle
#: Caches of pure functions (and the copy's watch on _resolve), left out of the state a
#: learnt decision may change.
_NOT_STATE: Final = frozenset(
    {"_grants", "_grants_rules", "_resolved", "_control_rules", "_rules_seen", "_undo", "_resolve"}
)
_NO_ENTRIES: Final = (0, 0, None, None, None)  # _entries_of for passes only
_ID_MARK = "\x00"  # an id no request has: its JSON text marks where the id goes
_TS_MARK = "\x00"  # (a timestamp no clock writes)
#: Numbers no read has, each marking where one of its own goes in a read's texts (_template):
#: offset, width, BAR, the guest's view and the read mask.
_READ_MARKS: Final = {
    f"{9_000_000_000_000_000_000 + k}": slot for k, slot in enumerate("owbvm", 101)
}


class NativePath:
    """The sessions of ``engine`` armed for the C path, and what their decisions need."""

    def __init__(self, engine: Engine, audit: Auditor) -> None:
        self.engine = engine
        self.audit = audit
        assert _steady is not None
        self._handle = _steady.handle
        self._passes = not audit.include_passes  # passes are not audited: C answers them
        self.armed: dict[bytes, _steady.Armed] = {}
        self._geometry: dict[int, tuple[Any, tuple[Any, ...]]] = {}  # by id(Geometry)
        #: per session: its control decisions learnt so far, by control_key
        self._controls: dict[bytes, tuple[Session, TagRules, dict[tuple[Any, ...], Any]]] = {}
        #: (rules, width, in use) -> the resolved tags (int32 each: reason << 16 | value,
        #: -1 for none, unknown until asked) and the resolver that fills them
        self._tags: dict[tuple[int, TagWidth, bool], tuple[TagRules, bytearray, Any]] = {}
        #: per (rules, VM, device, backend): the texts of its writes' and its reads' decisions
        self._texts: dict[tuple[int, str, str, str], tuple[TagRules, Any, Any]] = {}

    def handle(self, line: bytes) -> Reply | None:
        """The reply of ``line`` decided natively, or None (the Python path decides)."""
        got = self._handle(self.armed, self._passes, line)
        if not isinstance(got, bytes):
            return got
        # the key of a session not armed since the Python path last changed it
        sess = self._session(got)
        if sess is None or not self._arm(sess):
            return None
        again = self._handle(self.armed, self._passes, line)
        return None if isinstance(again, bytes) else again

    def pump(
        self, in_fd: int, out_fd: int, wake_fd: int, audit_fd: int, counters: tuple[Any, ...]
    ) -> tuple[bytes, bytes, bool, bool, Any, str, int, int]:
        """The serve loop in C while every line is one :meth:`handle` answers (_steady.c)."""
        assert _steady is not None
        return _steady.pump(in_fd, out_fd, wake_fd, audit_fd, self.armed, self._passes, *counters)

    def _session(self, key: bytes) -> Session | None:
        """The session of ``key`` (vm NUL bdf), if any."""
        vm, _, bdf = key.partition(b"\0")
        return self.engine.session(vm.decode(), bdf.decode())

    def refresh(self, vm: str | None = None, bdf: str | None = None) -> None:
        """The Python path handled a request of the session (vm, bdf), of every one without
        them: it is armed again from the engine's state when it next takes the native path."""
        if vm is None or bdf is None:
            self.armed.clear()
            return
        key = _key(vm, bdf)
        sess = self.engine.session(vm, bdf)
        armed = self.armed.get(key)
        if sess is None or sess.poisoned is not None or sess.revoked:
            self.armed.pop(key, None)
        elif armed is not None:
            # Its passes go on (they read nothing an access changes); anything else waits
            # for it to be armed again.
            armed.stale()

    def _arm(self, sess: Session) -> bool:
        """Arm ``sess`` (True), or leave every request of it to the Python path."""
        if sess.poisoned is not None or sess.revoked:
            return False
        key = _key(sess.vm, sess.bdf)
        regular, geometry = self._geometry_of(sess)
        # Writes of the control register and of the entries: one TPH capability, the entries
        # where the C side finds them, a backend it knows (the entries in the usual state).
        armable = regular and type(sess.backend) in _BACKENDS and len(sess.geo.caps) == 1
        entries = self._entries_of(sess) if armable else None
        armed = self.armed.get(key)
        if not armable and armed is not None:
            armed.passes_only()  # (what it needs for passes does not change)
            return True
        texts, read_texts = self._texts_of(sess)
        if not armable:
            geometry = (*geometry[:3], -1, -1, *geometry[5:])  # passes only
        mode, mask, allowed, table, resolver = entries or _NO_ENTRIES
        msix = sess.geo.in_msix
        kept = self._controls.get(key)
        if kept is None or kept[0] is not sess or kept[1] is not sess.rules:
            # (a decision is kept under its rules' address: new rules, a new table)
            kept = self._controls[key] = (sess, sess.rules, {})
        controls = kept[2]
        ctrl_off = sess.geo.caps[0].ctrl if armable else -1

        def learn(ckey: tuple[Any, ...]) -> Any:
            return self._learn(sess, controls, ckey)

        host = _host_of(sess) if armable else None
        reads = None  # (what the C side serves reads from: the capabilities, then the texts)
        if armable and read_texts is not None:
            reads = (tuple((cap.start, cap.end) for cap in sess.geo.caps), *read_texts)
        self.armed[key] = _steady.Armed(
            sess.counts,
            sess.written,
            sess.guest_tag if msix else None,
            sess.guest_low if msix else None,
            sess.dev_ent,
            sess.dev_low if msix else None,
            sess.checker.ent,
            sess.image,
            sess.dirty,
            geometry,
            mode,
            table,
            resolver,
            allowed,
            mask,
            *texts,
            sess,
            ctrl_off,
            controls,
            learn,
            _KEY_ATTRS,
            _backend_key_attrs(sess),
            host,
            reads,
        )
        return True

    def _learn(self, sess: Session, controls: dict[Any, Any], key: tuple[Any, ...]) -> Any:
        """The decision of the control write ``key`` names, made by the engine on a copy of
        ``sess``, with what it changed, for the C side to replay (None: the Python path's)."""
        if len(controls) >= _CONTROLS_KEPT:
            return None
        try:
            memo = self._control_memo(sess, key)
        except Exception:  # the engine refused or failed on the copy: the Python path decides
            memo = None
        controls[key] = memo
        return memo

    def _control_memo(self, sess: Session, key: tuple[Any, ...]) -> Any:
        value = key[0]
        if key != control_key(sess, value) or type(key[4]) is not tuple:
            return None  # (or more dirty entries than _DIRTY_KEYED)
        dirty = frozenset(sess.dirty)
        if dirty and type(sess.backend) is not RawWrites:
            return None  # (the host backend: an entry settled is an st_set, not kept)
        # An enable at a width the entries are not settled at re-resolves them (a decision
        # that depends on every entry): not kept, and not worth deciding on a copy first.
        guest = (key[1] & ~CTRL_WRITABLE) | (value & CTRL_WRITABLE)
        grant = sess._kept_grant(guest, sess.backend.limit(sess))
        if grant.uses_entries and grant.width is not sess.settled:
            return None
        off = sess.geo.caps[0].ctrl
        clone = _copy(sess)
        resolved: list[Any] = []
        real = clone._resolve

        def resolve(*args: Any) -> Any:
            resolved.append(args)  # the plan read entries: a function of key for dirty ones
            return real(*args)

        clone._resolve = resolve  # type: ignore[method-assign,assignment]
        guard = _guard(clone)
        before = _state(clone)
        access = ConfigWrite(sess.vm, sess.bdf, off, 4, value)
        decision = self.engine._config_write(clone, access)
        if decision.reason in ("not-tph", "internal-error"):
            return None
        if any(not dirty.issuperset(entries) for entries, *_ in resolved):
            return None
        lists = {id(v): k for k, v in vars(clone.checker).items() if type(v) is list}
        effects = _effects(before, _state(clone), off, decision.verdict, lists)
        if effects is None:
            return None
        if any(attr in ("dev_ent", "ent") and i not in dirty for _, attr, i, _ in effects):
            return None  # (an entry outside the key: as before, not kept)
        nxt = self._entries_of(clone) or _NO_ENTRIES
        dev = clone.dev_ctrl[0]
        if dev is None:
            return None
        rule = clone.checker._control_rule(0, dev, clone.rules, clone.revoked)
        if isinstance(rule, str):
            return None
        shift = 16 if clone.geo.in_msix else 0
        check = None if rule is None else (rule[0], rule[1].mask, shift)
        reply = access_reply(_ID_MARK, decision)
        head, rest = reply.split(b'{"id":"\\u0000"', 1)
        audit = self.audit._line.render(access, decision, _ID_MARK, _TS_MARK) + "\n"
        audit_head, audit_rest = audit.split('"\\u0000"', 1)
        audit_mid, audit_tail = audit_rest.split(_TS_MARK, 1)
        if head or _TS_MARK in audit_tail or b"\\u0000" in rest:
            return None
        # the entries it settles: checked by the engine's self-check as it decided, their
        # values a function of key (the C side checks the others, unchanged, against the rule)
        settled = frozenset(i for owner, attr, i, _ in effects if (owner, attr) == (1, "ent"))
        return (
            rest,
            audit_head.encode(),
            audit_mid.encode(),
            audit_tail.encode(),
            VERDICT_NAMES[decision.verdict],
            decision.reason,
            decision.verdict,
            effects,
            nxt,
            check,
            sess.rules,
            guard,
            settled,
        )

    def _geometry_of(self, sess: Session) -> tuple[bool, tuple[Any, ...]]:
        """Whether the entries are where the C side finds them (:func:`_regular`), and the
        geometry it reads: (in MSI-X, watched config bytes lo and hi, first entry's offset,
        entries, MSI-X BIR, table start and end)."""
        geo = sess.geo
        got = self._geometry.get(id(geo))
        if got is not None and got[0] is geo:
            return got[1]
        if len(self._geometry) >= 256:
            self._geometry.clear()
        first = -1 if geo.in_msix or not geo.n_entries else geo.entry_offsets[0]
        geometry = (
            geo.in_msix,
            geo.watch_lo,
            geo.watch_hi,
            first,
            geo.n_entries,
            geo.msix_bir,
            geo.msix_start,
            geo.msix_end,
        )
        value = (_regular(sess), geometry)
        self._geometry[id(geo)] = (geo, value)
        return value

    def _entries_of(self, sess: Session) -> tuple[int, int, frozenset[int] | None, Any, Any] | None:
        """What the C side decides ``sess``'s whole-entry writes from: (mode, tag mask, the
        tags the checker allows, the resolved tags, their resolver); None when they are the
        Python path's (:func:`_steady_state`)."""
        steady = _steady_state(sess)
        if steady is None or not _host_pieces(sess):
            return None
        mode, width, allowed = steady
        table, resolver = self._resolver(sess.rules, width, mode == _steady.IN_USE)
        return mode, width.mask, allowed, table, resolver

    def _resolver(self, rules: TagRules, width: TagWidth, in_use: bool) -> tuple[bytearray, Any]:
        """The resolved tags of (rules, width, in use), and the resolver that fills them."""
        key = (id(rules), width, in_use)
        got = self._tags.get(key)
        if got is not None and got[0] is rules:
            return got[1:]
        if len(self._tags) >= 64:
            self._tags.clear()
        table = bytearray(array("i", [_steady.UNKNOWN]) * _TAGS)

        def resolver(tag: int) -> int:
            """What the steady path does with ``tag`` (Session.steady_entry)."""
            value, code = resolve_entry(tag, True, None, width, in_use, rules)
            if value < 0 or value >> 16 or code not in _CODE_INDEX:
                return _DECLINE
            if in_use and not rules.host_ok(value, width):
                return _DECLINE
            return _CODE_INDEX[code] << 16 | value

        self._tags[key] = (rules, table, resolver)
        return table, resolver

    def _texts_of(self, sess: Session) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
        """The C side's texts: of the writes (:meth:`_write_texts`) and of the reads
        (:meth:`_read_texts`), made once per rules, VM, device and backend."""
        key = (id(sess.rules), sess.vm, sess.bdf, sess.backend.name)
        got = self._texts.get(key)
        if got is not None and got[0] is sess.rules:
            return got[1], got[2]
        if len(self._texts) >= 256:
            self._texts.clear()
        texts, reads = self._write_texts(sess), self._read_texts(sess)
        self._texts[key] = (sess.rules, texts, reads)
        return texts, reads

    def _write_texts(self, sess: Session) -> tuple[Any, ...]:
        """(heads, whys, rules, reasons, verdicts and their names, who, pass head and tail,
        the decision's ops)."""
        heads: list[bytes] = []
        whys: list[bytes] = []
        rules: list[bytes] = []
        reasons: list[str] = []
        verdicts = _VERDICTS[sess.backend.name]
        for code in CODES:
            for verdict in verdicts:
                d = decided(sess, verdict, (code,))
                heads.append(decision_head(d).encode())
                whys.append(self.audit.why(d).encode())
            rules.append(rule_text(d.rule).encode())
            reasons.append(d.reason)
        # A pass's decision around its write, as decision_text writes it for this backend.
        own = DeviceWrite("config", 0, 4, 0)
        whole = decision_text(passed(sess, own))
        head, tail = whole.split(f',"writes":[{write_text(own)}', 1)
        # What an entry decision says between its writes and its rule: its ops (host: none).
        d = decided(sess, verdicts[0], (CODES[0],))
        bare = decision_text(d)
        before, after = f'{decision_head(d)},"writes":[]', f"{rule_text(d.rule)}}}"
        ops = bare[len(before) : len(bare) - len(after)]
        assert bare == before + ops + after
        return (
            tuple(heads),
            tuple(whys),
            tuple(rules),
            tuple(reasons),
            (*verdicts, *(VERDICT_NAMES[v] for v in verdicts)),
            self.audit.who(sess.vm, sess.bdf).encode(),
            head.encode(),
            tail[:-1].encode(),  # (the decision's closing brace is the C side's)
            ops.encode(),
        )

    def _read_texts(self, sess: Session) -> tuple[Any, ...] | None:
        """(the verdicts, names and reasons of a read passed and of one served from the
        guest's view, the texts of their replies and of a served config and MSI-X read's audit
        line), or None when a text does not take its slots as :func:`_template` needs."""
        o, w, b, v, m = (int(n) for n in _READ_MARKS)
        passed_, viewed = served(sess, 0, 0), served(sess, m, v)
        cfg = ConfigRead(sess.vm, sess.bdf, o, w)
        msix = MsixRead(sess.vm, sess.bdf, b, o, w)
        line = self.audit._line.render
        templates = (
            _template(access_reply(_ID_MARK, passed_).decode()),
            _template(access_reply(_ID_MARK, viewed).decode()),
            _template(line(cfg, viewed, _ID_MARK, _TS_MARK) + "\n"),
            _template(line(msix, viewed, _ID_MARK, _TS_MARK) + "\n"),
        )
        if any(t is None for t in templates):
            return None
        return (
            (passed_.verdict, viewed.verdict),
            (VERDICT_NAMES[passed_.verdict], VERDICT_NAMES[viewed.verdict]),
            (passed_.reason, viewed.reason),
            templates,
        )


def _template(text: str) -> tuple[tuple[bytes, ...], bytes] | None:
    """``text`` as (pieces, slots) for the C side, which writes a read's own id, timestamp and
    numbers between the pieces; None unless each mark that is in ``text`` is in it once, and
    a number mark is not part of a longer number."""
    marks = {'"\\u0000"': "i", _TS_MARK: "t", **_READ_MARKS}
    found: list[tuple[int, str, str]] = []
    for mark, slot in marks.items():
        at = text.find(mark)
        if at < 0:
            continue
        if text.find(mark, at + 1) >= 0:
            return None
        if slot in "owbvm" and (
            text[at - 1 : at].isdigit() or text[at + len(mark) :][:1].isdigit()
        ):
            return None
        found.append((at, mark, slot))
    found.sort()
    pieces, slots, start = [], "", 0
    for at, mark, slot in found:
        pieces.append(text[start:at].encode())
        slots += slot
        start = at + len(mark)
    pieces.append(text[start:].encode())
    if sum(map(len, pieces)) > _steady.MAX_TEXT:
        return None
    return tuple(pieces), slots.encode()


def _key(vm: str, bdf: str) -> bytes:
    return vm.encode() + b"\0" + bdf.encode()


def _steady_state(sess: Session) -> tuple[int, TagWidth, frozenset[int] | None] | None:
    """(mode, width, tags the checker allows) when a whole-entry write of ``sess`` is decided
    by :meth:`Session.steady_entry` with nothing but that entry changing; None otherwise."""
    assert _steady is not None
    geo = sess.geo
    if sess.latched or not geo.trappable or len(geo.caps) != 1 or not geo.n_entries:
        return None
    dev = sess.dev_ctrl[0]
    if dev is None:
        return None
    grant = sess._grant(False)
    if dev != sess._control_target(grant, dev):
        return None
    if (grant.requested_width or sess.prospective) != sess.prospective:
        return None  # settle_entry would change it
    checker = sess.checker
    if len(checker.ctrl) != 1 or checker.ctrl[0] != dev or type(checker.ctrl[0]) is not int:
        return None
    rule = checker._control_rule(0, dev, sess.rules, sess.revoked)
    if isinstance(rule, str):
        return None
    if grant.uses_entries:
        width = grant.width
        if width is None or width is not sess.settled or sess.dirty:
            return None
        if rule is None or rule[1] is not width:
            return None
        return _steady.IN_USE, width, rule[0]
    if grant.width is not None or rule is not None:
        return None
    return _steady.UNUSED, grant.requested_width or sess.prospective, None


def _host_of(sess: Session) -> tuple[frozenset[int] | None, tuple[Any, ...]] | None:
    """The host backend's part of an arming (None: the writes backend): the MSI-X vectors the
    host has allocated (None: the ST table is in the capability, every entry can be set), and
    what a decision with no host operation leaves (:meth:`HostOps.idle`)."""
    backend = sess.backend
    if type(backend) is not HostOps:
        return None
    return (backend.allocated if sess.geo.in_msix else None, backend.idle(sess))


def _host_pieces(sess: Session) -> bool:
    """In the host backend, does a whole Vector Control write let exactly its low half (the
    mask bits) through, as the one 2-byte write the C side renders? (Always, in a table
    at a QWORD-aligned offset, as the spec puts it.)"""
    backend, geo = sess.backend, sess.geo
    if type(backend) is not HostOps or not geo.in_msix:
        return True
    at, bar = geo.vc_offsets[0], geo.msix_bir
    own = DeviceWrite("bar", at, 4, 0x1234_5678, bar)
    return backend._guest_bytes(sess, own) == [DeviceWrite("bar", at, 2, 0x5678, bar)]


def _guard(sess: Session) -> tuple[tuple[frozenset[int], int, int, bool], ...]:
    """What a control write's decision reads of the entries besides control_key: in the host
    backend, whether the self-check's copy holds tags allowed at each width
    (:meth:`HostOps.window_safe`), as (allowed, mask, shift, answer) for the C side to ask
    again before it replays the decision."""
    if type(sess.backend) is not HostOps:
        return ()
    checker, rules = sess.checker, sess.rules
    shift = 0 if checker.in_cap else 16
    return tuple(
        (rules.allowed[w], w.mask, shift, checker.entries_allowed(w, rules)) for w in TagWidth
    )


def _backend_key_attrs(sess: Session) -> tuple[str, ...]:
    return _HOST_KEY_ATTRS if type(sess.backend) is HostOps else ()


def _regular(sess: Session) -> bool:
    """Are the entries where the C side computes them (the ST table in the capability two
    bytes apart, or the Vector Control words of the MSI-X table)?"""
    geo = sess.geo
    n = geo.n_entries
    if not n:
        return False
    if geo.in_msix:
        return geo.vc_offsets == tuple(geo.msix_start + 16 * i + 12 for i in range(n))
    first = geo.entry_offsets[0]
    return geo.entry_offsets == tuple(range(first, first + 2 * n, 2))


def control_key(sess: Session, value: int) -> tuple[Any, ...]:
    """What the decision on a write of ``value`` to the control register depends on, when it
    resolves no entry but dirty ones (the C side's control_key builds the same tuple)."""
    off = sess.geo.caps[0].ctrl
    return (
        value,
        int.from_bytes(sess.image[off : off + 4], "little"),
        sess.dev_ctrl[0],
        sess.checker.ctrl[0],
        _dirty_key(sess),
        id(sess.rules),
        *(getattr(sess, name) for name in _KEY_ATTRS),
        *(getattr(sess.backend, name) for name in _backend_key_attrs(sess)),
    )


def _dirty_key(sess: Session) -> tuple[tuple[Any, ...], ...] | int:
    """The dirty entries as a control write's decision may read them, in order: (entry, the
    guest's value, written, the device's value, the self-check's copy) each; their number when
    there are more than _DIRTY_KEYED (such a decision is not kept)."""
    dirty = sess.dirty
    if len(dirty) > _DIRTY_KEYED:
        return len(dirty)
    ent = sess.checker.ent
    return tuple(
        (i, sess.guest_entry(i), sess.written[i], sess.dev_ent[i], ent[i]) for i in sorted(dirty)
    )


def _copy(sess: Session) -> Session:
    """A copy of ``sess`` and its backend to decide on, sharing what no decision changes."""
    backend = sess.backend
    shared = backend.facts if isinstance(backend, HostOps) else backend
    keep = (sess.config, sess.geo, sess.rules, shared)
    return copy.deepcopy(sess, {id(x): x for x in keep})


def _state(sess: Session) -> dict[str, Any]:
    """Every attribute of the session, of its checker and of its backend, but caches:
    containers copied, anything else as it is (a change of any other object is a new
    object)."""

    def snap(v: Any) -> Any:
        return copy.deepcopy(v) if isinstance(v, (list, dict, set, bytearray)) else v

    out = {k: snap(v) for k, v in vars(sess).items() if k not in _NOT_STATE and k != "checker"}
    for owner in ("checker", "backend"):
        attrs = vars(getattr(sess, owner)).items()
        out.update({f"{owner}.{k}": snap(v) for k, v in attrs if k not in _NOT_STATE})
    return out


#: The lists a control write may change item by item: (owner, attribute), as _effects names them.
_LISTS: Final = {
    "dev_ctrl": (0, "dev_ctrl"),
    "checker.ctrl": (1, "ctrl"),
    "dev_ent": (0, "dev_ent"),
    "checker.ent": (1, "ent"),
}


def _effects(
    before: dict[str, Any],
    after: dict[str, Any],
    ctrl_off: int,
    verdict: Verdict,
    lists: dict[int, str],
) -> tuple[tuple[int, str, int, Any], ...] | None:
    """What a control write changed, as effects the C side applies (owner: 0 the session, 1
    its checker, 2 its backend; index -1: the attribute, -2: the checker's undo records of
    host operations, naming the checker's lists by attribute (``lists``: by id), -3: the set
    emptied in place, else a list item or bytes from there), or None when it changed anything
    else (then it is not replayed). Every value set is immutable."""
    out: list[tuple[int, str, int, Any]] = []
    if set(after) != set(before):
        return None
    for name, old in before.items():
        new = after[name]
        if name in _OVERWRITTEN:
            pass  # set by every decision, whatever the state held before
        elif new is old or (type(new) is type(old) and new == old):
            continue
        if name == "counts":
            if {**old, verdict: old.get(verdict, 0) + 1} != new:
                return None  # (the C side counts the verdict itself)
        elif name == "image":
            changed = [i for i in range(len(old)) if old[i] != new[i]]
            if len(new) != len(old) or any(not ctrl_off <= i < ctrl_off + 4 for i in changed):
                return None
            out.append((0, "image", ctrl_off, bytes(new[ctrl_off : ctrl_off + 4])))
        elif name in ("ctrl_written", "settled", "prospective"):
            out.append((0, name, -1, new))
        elif name == "backend.last":
            out.append((2, "last", -1, new))
        elif name == "checker._host_marks":
            out.append((1, "_host_marks", -1, new))
        elif name == "checker._host_undo":
            if any(id(regs) not in lists for regs, _, _ in new):
                return None
            out.append((1, "_host_undo", -2, tuple((lists[id(r)], i, v) for r, i, v in new)))
        elif name in _LISTS and len(new) == len(old):
            owner, attr = _LISTS[name]
            items = [(i, v) for i, v in enumerate(new) if v != old[i]]
            if any(v is not None and type(v) is not int for _, v in items):
                return None
            out.extend((owner, attr, i, v) for i, v in items)
        elif name == "dirty" and not new:
            out.append((0, "dirty", -3, None))  # (emptied where it is: the C side holds it)
        else:
            return None
    return tuple(out)
