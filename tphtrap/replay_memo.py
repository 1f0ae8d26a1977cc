"""Replay's decision memo: a repeated access in a repeated device state is decided once.

The engine is deterministic: what it decides for an access, and the state it leaves the
device's session in, depend only on that session's state, the access and the policy. A trace
repeats itself (a driver programs the same entries after every reset), so replay keeps, per
device, the states it has seen and, for each, the trace lines that left it and where they led
(:class:`Node`). When a line comes again in a state it left before, replay moves to the
remembered state and adds the remembered effect to the summary, without decoding the line or
asking the engine. Any other line is decided as without the memo, after the device's session
has been given back the state the memo had moved it to.

A state is the pickle of the session and of the summary's
:class:`~tphtrap.replay_summary.TphView` of the device (the control register and tags it
holds). The session's shared, never-changed parts (the config snapshot, its geometry, the
policy's rules, wherever they are referred to) are kept by reference, and so are its decision
counters, which the memo adds to. Equal bytes are equal states; equal states with different
bytes only cost a duplicate.

What is remembered is what replays to the same summary: the replayer learns a line only when
its record left nothing that names the line (the first records, notable writes, mismatches,
contradictions; see :meth:`Replayer._memo_learnable`), and every structural change (attach,
detach, reload, a QEMU device re-attached) first settles the memo: the stale sessions get
their state back, the remembered effects are added, and everything is forgotten.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from .device import ConfigSpace
from .engine.geometry import Geometry
from .engine.render import RawWrites
from .policy import TagRules

if TYPE_CHECKING:
    from .engine import Engine
    from .replay_summary import ReplaySummary

MAX_NODES: Final = 1024  # states remembered per device
MAX_EDGES: Final = 64  # lines remembered per state
MAX_DEVICE_BYTES: Final = 16 << 20  # pickled states per device
MAX_TOTAL_BYTES: Final = 64 << 20  # pickled states in all
# Keeping states costs a decided access more than it did: past this many decided accesses of a
# device, the memo gives up on it unless as many more were counted from memory.
TRIAL: Final = 256

# TphView's counters a record may add to (everything else it keeps is state or set once)
_VIEW_COUNTERS: Final = ("enables", "guest_writes", "guest_tag_writes", "resets", "overlay_hits")
# The session's attributes a state leaves out (restored from the session itself), and the
# immutable types a state refers to by reference wherever it meets them
_KEPT: Final = frozenset({"config", "geo", "rules", "counts"})
_BY_REFERENCE: Final = (ConfigSpace, Geometry, TagRules)


class Effect:
    """What one repetition of a remembered line adds to the summary."""

    __slots__ = ("counts", "expected", "hits", "inferred", "shown", "tally", "view")

    def __init__(
        self,
        tally: tuple[Any, ...],
        inferred: bool,
        expected: bool,
        shown: tuple[str, str] | None,
        view: tuple[int, ...],
        counts: tuple[tuple[Any, int], ...],
    ) -> None:
        self.tally = tally  # the summary's tally key (verdict, reason, VM, device, kind)
        self.inferred = inferred
        self.expected = expected  # compared with an expectation (that matched)
        self.shown = shown  # (verdict name, reason) when the filter shows the record
        self.view = view  # the increments of _VIEW_COUNTERS
        self.counts = counts  # the session's decision counters it adds to
        self.hits = 0  # repetitions not yet added to the summary


class Node:
    """One remembered state of a device: line -> (the state it leads to, its effect)."""

    __slots__ = ("edges", "state")

    def __init__(self, state: bytes) -> None:
        self.state = state
        self.edges: dict[Any, tuple[Node, Effect]] = {}


class DeviceMemo:
    """The memo of one (VM, device). ``node`` is the state the device is in; ``ahead``: how
    many records the memo counted since the engine's session last decided (which is behind
    the node when it is not 0)."""

    __slots__ = ("ahead", "bdf", "decided", "node", "nodes", "remembered", "size", "vm")

    def __init__(self, vm: str, bdf: str) -> None:
        self.vm = vm
        self.bdf = bdf
        self.nodes: dict[bytes, Node] = {}
        self.node: Node | None = None
        self.size = 0
        self.ahead = 0
        self.decided = 0  # accesses the engine decided
        self.remembered = 0  # records the memo counted (before ``ahead``)


def _shared(index: int) -> Any:
    """Stands in a state for an object kept by reference (see :class:`_Unpickler`)."""
    raise pickle.UnpicklingError("a memo state is read by the memo that wrote it")


class _Shared:
    """The objects the memo's states refer to by reference: each is pickled as its index
    here (through the pickler's dispatch table: no Python call for any other object)."""

    def __init__(self) -> None:
        self.objects: list[Any] = []
        self.index: dict[int, int] = {}
        self.table = dict.fromkeys(_BY_REFERENCE, self.reduce)

    def reduce(self, obj: Any) -> tuple[Any, tuple[int]]:
        i = self.index.get(id(obj))
        if i is None:
            i = self.index[id(obj)] = len(self.objects)
            self.objects.append(obj)  # (kept alive: its id stays its own)
        return _shared, (i,)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, objects: list[Any]) -> None:
        super().__init__(file)
        self.objects = objects

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_shared":
            return self.objects.__getitem__
        return super().find_class(module, name)


class DecisionMemo:
    """The memo of one replay (see the module's text)."""

    def __init__(self, engine: Engine, summary: ReplaySummary) -> None:
        self.engine = engine
        self.summary = summary
        self.devices: dict[tuple[str, str], DeviceMemo] = {}
        self.routes: dict[Any, DeviceMemo] = {}  # a remembered line -> the device it is for
        self.untracked: set[tuple[str, str]] = set()  # devices the memo gave up on
        self.total = 0  # bytes of pickled states
        self.learned = 0  # lines learned (edges)
        self.replayed = 0  # records replayed from memory, in all
        self._effects: list[Effect] = []
        self._shared = _Shared()

    # --- the slow path: before and after the engine decides ------------------------------
    def before(self, vm: str, bdf: str) -> DeviceMemo | None:
        """The device's memo, its session brought up to date, or None (not remembered)."""
        key = (vm, bdf)
        dev = self.devices.get(key)
        if dev is not None:
            if dev.ahead:
                self._restore(dev)
            return dev
        for other in [d for d in self.devices.values() if d.bdf == bdf]:
            # The access names the device under another VM: whatever it does to the
            # summary's view of the device (kept by device) is not in that memo's states.
            if other.ahead:
                self._restore(other)
            self._give_up(other)
        if key in self.untracked:
            return None
        sess = self.engine.session(vm, bdf)
        if sess is None or type(sess.backend) is not RawWrites:
            return None  # (no session yet: the next access, after its attach, starts one)
        if not sess.geo.caps:  # no TPH: every decision is quicker than keeping a state
            self.untracked.add(key)
            return None
        dev = DeviceMemo(vm, bdf)
        node = self._intern(dev)
        if node is None:
            return None
        dev.node = node
        self.devices[key] = dev
        return dev

    def view_counters(self, bdf: str) -> tuple[int, ...]:
        view = self.summary.tph.get(bdf)
        return tuple(getattr(view, k) for k in _VIEW_COUNTERS) if view is not None else ()

    def counts(self, dev: DeviceMemo) -> dict[Any, int]:
        sess = self.engine.session(dev.vm, dev.bdf)
        return dict(sess.counts) if sess is not None else {}

    def after(self, dev: DeviceMemo, line: Any, effect: Effect | None) -> None:
        """The engine decided ``line`` (None: a line that cannot be remembered) on the
        device, adding ``effect`` to the summary (None: an effect not to repeat)."""
        old = dev.node
        dev.decided += 1
        if dev.decided >= TRIAL and dev.remembered < dev.decided:
            self._give_up(dev)  # the states cost more than they save
            return
        node = self._intern(dev)
        if node is None or old is None:
            return
        dev.node = node
        if line is None or effect is None or len(old.edges) >= MAX_EDGES:
            return
        if line in old.edges or self.routes.get(line, dev) is not dev:
            return
        old.edges[line] = (node, effect)
        self.routes[line] = dev
        self._effects.append(effect)
        self.learned += 1

    def effect_counts(self, dev: DeviceMemo, before: dict[Any, int]) -> tuple[tuple[Any, int], ...]:
        sess = self.engine.session(dev.vm, dev.bdf)
        if sess is None:
            return ()
        return tuple(
            (k, n - before.get(k, 0)) for k, n in sess.counts.items() if n != before.get(k, 0)
        )

    # --- states --------------------------------------------------------------------------
    def _state(self, dev: DeviceMemo) -> bytes | None:
        sess = self.engine.session(dev.vm, dev.bdf)
        if sess is None or type(sess.backend) is not RawWrites:
            return None
        view = self.summary.tph.get(dev.bdf)
        attrs = {k: v for k, v in sess.__dict__.items() if k not in _KEPT}
        out = io.BytesIO()
        pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = self._shared.table
        try:
            pickler.dump((attrs, None if view is None else (view.dev_ctrl, view.entry_values)))
        except Exception:  # a state that cannot be kept: the device is decided access by access
            return None
        return out.getvalue()

    def _intern(self, dev: DeviceMemo) -> Node | None:
        """The node of the device's current state (a new one if unseen), or None when the
        memo gives up on the device (its state cannot be kept, or it keeps too many)."""
        state = self._state(dev)
        if state is None:
            self._give_up(dev)
            return None
        node = dev.nodes.get(state)
        if node is not None:
            return node
        if (
            len(dev.nodes) >= MAX_NODES
            or dev.size + len(state) > MAX_DEVICE_BYTES
            or self.total + len(state) > MAX_TOTAL_BYTES
        ):
            self._give_up(dev)
            return None
        node = dev.nodes[state] = Node(state)
        dev.size += len(state)
        self.total += len(state)
        return node

    def _give_up(self, dev: DeviceMemo) -> None:
        """Stop remembering the device (its session is up to date: the caller just decided)."""
        key = (dev.vm, dev.bdf)
        self.untracked.add(key)
        if self.devices.pop(key, None) is None:
            return
        self.flush()
        for node in dev.nodes.values():
            for line, (_, effect) in node.edges.items():
                self.routes.pop(line, None)
                self._effects.remove(effect)
        self.total -= dev.size
        dev.nodes.clear()
        dev.node = None

    def _restore(self, dev: DeviceMemo) -> None:
        """Give the device's session (and view) the state the memo moved it to."""
        sess = self.engine.session(dev.vm, dev.bdf)
        assert sess is not None and dev.node is not None
        reader = _Unpickler(io.BytesIO(dev.node.state), self._shared.objects)
        attrs, view_state = reader.load()
        for k in [k for k in sess.__dict__ if k not in _KEPT and k not in attrs]:
            del sess.__dict__[k]  # (an attribute set since that state)
        sess.__dict__.update(attrs)
        view = self.summary.tph.get(dev.bdf)
        if view is not None and view_state is not None:
            view.dev_ctrl, view.entry_values = view_state
        dev.remembered += dev.ahead
        dev.ahead = 0

    # --- settling ------------------------------------------------------------------------
    def flush(self) -> None:
        """Add every repetition not yet added to the summary (and the sessions' counters)."""
        s = self.summary
        for effect in self._effects:
            n = effect.hits
            if not n:
                continue
            effect.hits = 0
            self.replayed += n
            s.records += n
            s.from_memory += n
            s.tally[effect.tally] += n
            bdf = effect.tally[3]
            if effect.inferred:
                s.inferred[bdf] += n
            if effect.expected:
                s.expected += n
            if effect.shown is not None:
                verdict, reason = effect.shown
                s.shown += n
                s.shown_verdicts[verdict] += n
                s.shown_reasons[reason] += n
            view = s.tph.get(bdf)
            if view is not None:
                for name, d in zip(_VIEW_COUNTERS, effect.view, strict=False):
                    if d:
                        setattr(view, name, getattr(view, name) + d * n)
            if effect.counts:
                sess = self.engine.session(effect.tally[2], bdf)
                if sess is not None:
                    for k, d in effect.counts:
                        sess.counts[k] = sess.counts.get(k, 0) + d * n

    def pending(self) -> int:
        """Records replayed from memory and not yet in the summary's count."""
        return sum(e.hits for e in self._effects)

    def settle(self) -> None:
        """Bring every session and the summary up to date, and forget everything (before a
        structural change, and at the end of a trace)."""
        self.flush()
        for dev in self.devices.values():
            if dev.ahead:
                self._restore(dev)
        self.devices.clear()
        self.routes.clear()
        self.untracked.clear()
        self._effects.clear()
        self._shared = _Shared()
        self.total = 0

    def stats(self) -> Iterator[tuple[str, int]]:
        yield "learned", self.learned
        yield "replayed", self.replayed + self.pending()
