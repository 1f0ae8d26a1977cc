"""The engine: one access in, one decision out, for every attached (VM, device).

Sans-IO: no I/O and no logging happen here. A decision is data: the verdict, the reasons,
the exact device writes in order, and what the guest reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..device import ConfigSpace
from ..events import (
    Access,
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
from ..layouts import MSIX_VECTOR_CTRL
from ..policy import Policy, TagRules
from ..spec import PCI_CFG_SPACE_EXP_SIZE, ReqEnable
from .check import UnsafePlan
from .geometry import K_ENTRY, AttachRefused
from .reasons import BENIGN, summarize
from .render import HostFacts, HostOps, HostResultRefused, RawWrites, Rendering
from .session import _ENTRY_STEP, Session, Step
from .target import MODE, REQ, control_value

__all__ = ["Engine", "WrongBackend", "decided", "passed", "served"]

_PASS, _REWRITE, _DROP = Verdict.PASS, Verdict.REWRITE, Verdict.DROP
_CONFIG_WIDTHS = (1, 2, 4)
_BAR_WIDTHS = (1, 2, 4, 8)
_BAR_LIMIT = 1 << 64
_VC_TAG_SHIFT = MSIX_VECTOR_CTRL["st"].shift


class WrongBackend(ValueError):
    """Host feedback for a device attached with the writes backend."""


def _valid(off: int, width: int, widths: tuple[int, ...], limit: int, value: int) -> bool:
    return width in widths and off >= 0 and off + width <= limit and 0 <= value < 1 << (8 * width)


class Engine:
    """The trap-and-filter engine.

    ``attach`` builds a :class:`Session` from a config snapshot, ``handle`` decides one access,
    ``reload`` swaps the policy and re-checks every device. Unknown VMs or devices and
    malformed accesses get ``drop``. An unexpected exception, or a plan the self-check
    refuses, disables TPH on the device and freezes it until it is detached and re-attached.
    """

    #: Whole-register writes in the usual state take a shorter path to the same decision
    #: (tests/test_engine_fastpath.py runs engines with and without it side by side).
    fast_paths = True

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._sessions: dict[tuple[str, str], Session] = {}

    @property
    def policy(self) -> Policy:
        return self._policy

    def session(self, vm: str, bdf: str) -> Session | None:
        return self._sessions.get((vm, bdf))

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # --- lifecycle -------------------------------------------------------------------------
    def attach(
        self,
        vm: str,
        bdf: str,
        config: ConfigSpace,
        host: HostFacts | None = None,
        vector_ctrl: Sequence[int] | None = None,
    ) -> Decision:
        """Attach a device from its config snapshot. ``host``: its decisions are host kernel
        operations (the root port's facts), else raw device writes. ``vector_ctrl``: the MSI-X
        Vector Control words the guest's table holds now (a hypervisor emulating the table
        knows them; power-on is all 1), without which an MSI-X steering tag cannot be written
        before the guest has written that entry's word itself (its mask bits are the
        guest's)."""
        if vm not in self._policy.vms:
            raise AttachRefused("unknown-vm", f"VM {vm!r} is not in the policy")
        vm_policy = self._policy.vms[vm]
        if bdf not in vm_policy.devices:
            owner = self._policy.vm_of_device(bdf)
            where = f" (it belongs to VM {owner.name!r})" if owner else ""
            raise AttachRefused(
                "unknown-device", f"device {bdf} is not assigned to VM {vm!r} in the policy{where}"
            )
        for other_vm, other_bdf in self._sessions:
            if other_bdf == bdf and other_vm != vm:
                raise AttachRefused(
                    "unknown-device", f"device {bdf} is already attached to VM {other_vm!r}"
                )
        sess = Session(vm, bdf, config, self._policy.rules(vm, bdf), host, vector_ctrl)
        self._sessions[(vm, bdf)] = sess
        reasons = ["attached"]
        enabled = sess.dev_enabled()
        return self._settle(
            sess, reasons, full=True, extra="attach-disabled-tph" if enabled else ""
        )

    def detach(self, vm: str, bdf: str) -> Decision:
        sess = self._sessions.pop((vm, bdf), None)
        if sess is None:
            return self._unknown(vm, bdf)
        return Decision(_PASS, "detached", "device detached", reasons=("detached",))

    def add_device(self, policy: Policy, vm: str, bdf: str) -> None:
        """Swap in ``policy``, which differs from the current one only by assigning the free
        device ``bdf`` to ``vm`` (replay's implicit devices). Attached sessions keep their
        rules; anything more than that added device is a ValueError: use :meth:`reload`."""
        old = self._policy
        new_vm, old_vm = policy.vms.get(vm), old.vms.get(vm)
        if (
            new_vm is None
            or old_vm is None
            or policy.host is not old.host
            or policy.vms.keys() != old.vms.keys()
            or any(policy.vms[n] is not old.vms[n] for n in old.vms if n != vm)
            or old.vm_of_device(bdf) is not None
            or new_vm.devices.keys() != old_vm.devices.keys() | {bdf}
            or replace(new_vm, devices=old_vm.devices) != old_vm
        ):
            raise ValueError(f"not just device {bdf} added to VM {vm!r}: reload the policy")
        self._policy = policy

    def reload(self, policy: Policy) -> list[tuple[Session, Decision]]:
        """Swap in ``policy`` (already validated) and re-check every device against it.

        A device the new policy no longer gives to its VM is revoked: TPH off, every later
        access dropped, until it is detached and attached again (a reload never gives it
        back). Every device's new rules are built before anything changes. Returns one
        decision per device with the corrections the hypervisor must perform.
        """
        rules: dict[tuple[str, str], TagRules] = {}
        for key, sess in self._sessions.items():
            vm = policy.vms.get(sess.vm)
            if vm is not None and sess.bdf in vm.devices:
                rules[key] = policy.rules(sess.vm, sess.bdf)
        self._policy = policy
        out: list[tuple[Session, Decision]] = []
        for key, sess in list(self._sessions.items()):
            if sess.poisoned is not None:
                out.append((sess, self._decision(sess, _DROP, ["internal-error"])))
                continue
            new = rules.get(key)
            if new is None:
                sess.revoked = True
            else:
                sess.rules = new
                sess.settled = None
            try:
                reasons = ["device-revoked" if sess.revoked else "policy-reloaded"]
                out.append((sess, self._settle(sess, reasons, full=True)))
            except Exception as exc:
                out.append((sess, self._poison(sess, f"{type(exc).__name__}: {exc}")))
        return out

    # --- feedback from the host (the host backend) ----------------------------------------------
    def host_vectors(self, vm: str, bdf: str, allocated: frozenset[int], cleared: bool) -> Decision:
        """The MSI-X vectors the host has allocated now (``cleared``: it (re)enabled MSI-X,
        which cleared every steering tag). The decision (re)applies the tags it can."""
        sess = self._host_session(vm, bdf)
        if isinstance(sess, Decision):
            return sess
        assert isinstance(sess.backend, HostOps)
        n = sess.geo.n_entries if sess.geo.in_msix else 0
        beyond = sorted(i for i in allocated if i >= n)
        if beyond and sess.geo.in_msix:
            raise ValueError(f"vector {beyond[0]} is past the device's {n} MSI-X vectors")
        try:
            sess.backend.set_allocated(sess, allocated, cleared)
            return self._settle(sess, ["host-vectors"], full=True)
        except UnsafePlan as exc:
            return self._poison(sess, f"unsafe plan: {exc}", "unsafe-plan")
        except Exception as exc:
            return self._poison(sess, f"internal error: {type(exc).__name__}: {exc}")

    def host_result(self, vm: str, bdf: str, op: HostOp, errno: int) -> Decision:
        """The host reports that ``op`` of the device's last decision failed with ``errno``
        (the ops before it were performed, the ones after it were not). tphtrap takes its
        state back to what the host has and answers with the follow-up. A report that names
        no op of that decision, or a failed ``tph_disable``, freezes the device."""
        sess = self._host_session(vm, bdf)
        if isinstance(sess, Decision):
            return sess
        assert isinstance(sess.backend, HostOps)
        try:
            sess.backend.failed(sess, op, errno)
        except HostResultRefused as exc:
            return self._poison(sess, f"host result refused: {exc}", "host-state-unknown")
        if op.op == "tph_disable":
            return self._poison(
                sess, "the host could not disable TPH: stop the device", "host-op-failed"
            )
        try:
            return self._settle(sess, ["host-op-failed"], full=True)
        except UnsafePlan as exc:
            return self._poison(sess, f"unsafe plan: {exc}", "unsafe-plan")
        except Exception as exc:
            return self._poison(sess, f"internal error: {type(exc).__name__}: {exc}")

    def _host_session(self, vm: str, bdf: str) -> Session | Decision:
        """The attached host-backend session, or the decision that refuses the request."""
        sess = self._sessions.get((vm, bdf))
        if sess is None:
            return self._unknown(vm, bdf)
        if not isinstance(sess.backend, HostOps):
            raise WrongBackend(f"device {bdf} of VM {vm!r} is attached with backend writes")
        if sess.poisoned is not None:
            return self._decision(sess, _DROP, ["internal-error"], detail=sess.poisoned)
        if sess.revoked:
            return self._decision(sess, _DROP, ["device-revoked"])
        return sess

    # --- accesses ------------------------------------------------------------------------------
    def handle(self, access: Access) -> Decision:
        sess = self._sessions.get((access.vm, access.bdf))
        if sess is None:
            return self._unknown(access.vm, access.bdf)
        if sess.poisoned is not None:
            if isinstance(access, Reset):
                # The device's TPH registers are back at power-on, or kept: TPH off again,
                # at the power-on value, so that the engine knows what they hold (a later
                # freeze writes that value again, and changes nothing).
                sess.checker.power_on_controls()
                return self._poison(sess, sess.poisoned)
            return self._decision(sess, _DROP, ["internal-error"], detail=sess.poisoned)
        if sess.revoked and not isinstance(access, Reset):
            return self._decision(sess, _DROP, ["device-revoked"])
        try:
            return self._dispatch(sess, access)
        except UnsafePlan as exc:
            return self._poison(sess, f"unsafe plan: {exc}", "unsafe-plan")
        except Exception as exc:
            return self._poison(sess, f"internal error: {type(exc).__name__}: {exc}")

    def _dispatch(self, sess: Session, access: Access) -> Decision:
        if isinstance(access, ConfigWrite):
            return self._config_write(sess, access)
        if isinstance(access, MsixWrite):
            return self._msix_write(sess, access)
        if isinstance(access, ConfigRead):
            return self._config_read(sess, access)
        if isinstance(access, MsixRead):
            return self._msix_read(sess, access)
        if isinstance(access, Reset):
            # A reset is a fact about the device, whoever asked for it and whatever its state.
            sess.checker.reset()
            sess.reset_state()
            return self._settle(sess, ["reset"], full=True)
        raise TypeError(f"not an access: {access!r}")

    def _config_write(self, sess: Session, a: ConfigWrite) -> Decision:
        off, width, value = a.offset, a.width, a.value
        if not _valid(off, width, _CONFIG_WIDTHS, PCI_CFG_SPACE_EXP_SIZE, value):
            return self._decision(sess, _DROP, ["bad-access"])
        geo = sess.geo
        own = DeviceWrite("config", off, width, value)
        if off + width <= geo.watch_lo or off >= geo.watch_hi:
            return self._pass(sess, own)
        reg = geo.exact.get(off)
        if reg is not None and reg.size == width:
            tph = True  # exactly the control register or an ST entry
            if reg.kind == K_ENTRY and self.fast_paths:
                fast = self._steady_entry(sess, reg.index, value, True, own)
                if fast is not None:
                    return fast
        else:
            tph = any(
                (r := geo.regs[p]) is not None and r.kind <= K_ENTRY
                for p in range(off, off + width)
            )
        through, reasons, reset, touched, ctrl = sess.config_write(off, width, value)
        if reset:
            return self._reset_write(sess, through, reasons)
        if not tph:
            return self._pass(sess, own)
        steps = sess.plan(touched, False, reasons, ctrl)
        done = sess.backend.access(sess, steps, through, own)
        return self._finish(sess, done, own, reasons)

    def _reset_write(
        self, sess: Session, through: list[DeviceWrite], reasons: list[str]
    ) -> Decision:
        """A guest write that resets the function: disable TPH first, then let it through."""
        r = sess.backend.reset_write(sess, self._disable_steps(sess), through, reasons)
        sess.backend.check(sess, r, full=False)
        sess.backend.commit(sess, r)
        verdict = _REWRITE if r.writes or r.ops else _DROP
        return self._decision(sess, verdict, ["reset", *reasons], tuple(r.writes), ops=r.ops)

    @staticmethod
    def _disable_steps(sess: Session) -> list[Step]:
        steps: list[Step] = []
        for k, cap in enumerate(sess.geo.caps):
            dev = sess.dev_ctrl[k]
            if dev is None or REQ.get(dev) != ReqEnable.DISABLED:
                mode = MODE.get(dev) if dev is not None else 0
                steps.append((0, k, control_value(cap.reserved, MODE.put(0, mode))))
        return steps

    def _msix_write(self, sess: Session, a: MsixWrite) -> Decision:
        off, width, value, bar = a.offset, a.width, a.value, a.bar
        if not _valid(off, width, _BAR_WIDTHS, _BAR_LIMIT, value) or not 0 <= bar <= 5:
            return self._decision(sess, _DROP, ["bad-access"])
        geo = sess.geo
        own = DeviceWrite("bar", off, width, value, bar)
        if not geo.in_msix or bar != geo.msix_bir or off + width <= geo.msix_start:
            return self._pass(sess, own)
        if off >= geo.msix_end:
            return self._pass(sess, own)
        i = geo.vc_index.get(off, -1)
        if width == 4 and i >= 0 and self.fast_paths:
            tag = value >> _VC_TAG_SHIFT
            written = sess.written[i] or tag != sess.guest_tag[i]
            fast = self._steady_entry(sess, i, tag, written, own)
            if fast is not None:
                return fast
        through, touched = sess.msix_write(off, width, value, bar)
        if not touched:
            return self._pass(sess, own)
        reasons: list[str] = []
        steps = sess.plan(touched, False, reasons)
        r = sess.backend.access(sess, steps, through, own)
        partial = {
            geo.vc_offsets[i]
            for i in touched
            if not (off <= geo.vc_offsets[i] and geo.vc_offsets[i] + 4 <= off + width)
        }
        if r.ops is None and any(w.offset in partial and w.width == 4 for w in r.writes):
            reasons.append("msix-sub-dword")  # the guest's partial write went out whole
        return self._finish(sess, r, own, reasons)

    def _steady_entry(
        self, sess: Session, i: int, tag: int, written: bool, own: DeviceWrite
    ) -> Decision | None:
        """A write of one whole ST entry or Vector Control word in the usual state
        (:meth:`Session.steady_entry`): the general path's decision, in fewer steps, in either
        backend. None: not the usual state, nothing changed."""
        raw = sess.backend
        if type(raw) is not RawWrites and type(raw) is not HostOps:
            return None
        got = sess.steady_entry(i, tag, written)
        if got is None:
            return None
        value, code, grant = got
        sess.put_entry(i, own)
        steps: list[Step] = [(_ENTRY_STEP, i, value)]
        sess.settle_entry(i, grant)
        if not isinstance(raw, RawWrites):  # the host's operations, checked as ever
            r = raw.access(sess, steps, [], own)
            return self._finish(sess, r, own, [code])
        mask, patch = sess.view_of(own)
        writes = raw.writes(sess, steps)
        if writes[0].value == own.value:  # the same register: the guest's own write passes
            writes[0] = own
        r = Rendering(writes, None, steps)
        raw.check(sess, r, full=False)
        raw.commit(sess, r)
        verdict = _PASS if writes[0] is own else _REWRITE
        return self._decision(
            sess, verdict, (code,), tuple(writes), guest_value=patch, read_mask=mask
        )

    def _finish(
        self, sess: Session, r: Rendering, own: DeviceWrite, reasons: list[str]
    ) -> Decision:
        sess.backend.check(sess, r, full=False)
        sess.backend.commit(sess, r)
        writes = r.writes
        if not r.ops and len(writes) == 1 and (writes[0] is own or writes[0] == own):
            verdict = _PASS
        else:
            verdict = _REWRITE if writes or r.ops else _DROP
        mask, patch = sess.view_of(own)
        if verdict is _PASS and not (len(reasons) == 1 and reasons[0] in BENIGN):
            reasons = [r for r in reasons if r in BENIGN] or reasons
        elif not reasons and r.ops is not None:
            reasons = ["tph-unchanged"]  # the guest's TPH bytes are not written raw
        return self._decision(
            sess,
            verdict,
            reasons or ["not-tph"],
            tuple(writes),
            guest_value=patch if mask else None,
            read_mask=mask,
            ops=r.ops,
        )

    def _config_read(self, sess: Session, a: ConfigRead) -> Decision:
        if not _valid(a.offset, a.width, _CONFIG_WIDTHS, PCI_CFG_SPACE_EXP_SIZE, 0):
            width_ok = a.width in _CONFIG_WIDTHS
            return self._decision(
                sess,
                _DROP,
                ["bad-access"],
                guest_value=(1 << (8 * a.width)) - 1 if width_ok else None,
            )
        return self._served(sess, *sess.config_view(a.offset, a.width))

    def _msix_read(self, sess: Session, a: MsixRead) -> Decision:
        if not _valid(a.offset, a.width, _BAR_WIDTHS, _BAR_LIMIT, 0) or not 0 <= a.bar <= 5:
            return self._decision(sess, _DROP, ["bad-access"])
        if a.bar != sess.geo.msix_bir:
            return self._decision(sess, _PASS, ["not-tph"])
        return self._served(sess, *sess.msix_view(a.offset, a.width))

    def _served(self, sess: Session, mask: int, patch: int) -> Decision:
        d = served(sess, mask, patch)
        sess.counts[d.verdict] = sess.counts.get(d.verdict, 0) + 1
        return d

    # --- decisions -------------------------------------------------------------------------------
    def _settle(
        self, sess: Session, reasons: list[str], *, full: bool, extra: str = ""
    ) -> Decision:
        """Bring the device to the target after a change outside any access (attach, reset,
        reload): every entry re-resolved, the whole device re-checked."""
        plan_reasons: list[str] = []
        steps = sess.plan(set(), full, plan_reasons)
        r = sess.backend.settle(sess, steps)
        sess.backend.check(sess, r, full=True)
        sess.backend.commit(sess, r)
        busy = bool(r.writes or r.ops)
        if busy:  # a decision with nothing to do says only what happened
            if extra:
                reasons.append(extra)
            reasons.extend(r for r in plan_reasons if r not in BENIGN and r not in reasons)
        verdict = _REWRITE if busy else _PASS
        return self._decision(sess, verdict, reasons, tuple(r.writes), ops=r.ops)

    def freeze(self, vm: str, bdf: str, message: str) -> Decision | None:
        """Freeze the device of (vm, bdf) from outside the engine: a decision it made cannot
        be delivered as made (its audit line could not be written), so what it changed of
        the session is not what the device has. The decision turns TPH off on the device
        (the one thing that is safe whatever it holds) and every later access is dropped
        until it is attached again; a frozen device gets TPH off again (the decision that
        froze it may be the one that was lost). None: no such session (nothing to freeze)."""
        sess = self._sessions.get((vm, bdf))
        if sess is None:
            return None
        return self._poison(sess, sess.poisoned or message)

    def _poison(self, sess: Session, message: str, code: str = "internal-error") -> Decision:
        """Freeze ``sess``: TPH off on every capability, every later access dropped."""
        sess.poisoned = message
        try:
            r = sess.backend.poison(sess)
            for _, k, v in r.effects:
                sess.dev_ctrl[k] = v
            writes, ops = tuple(r.writes), r.ops
        except Exception:
            writes = tuple(
                DeviceWrite("config", cap.ctrl, 4, control_value(cap.reserved, 0))
                for cap in sess.geo.caps
            )
            ops = None
            if isinstance(sess.backend, HostOps):
                writes, ops = (), [HostOp("tph_disable")] if sess.geo.caps else []
            sess.dev_ctrl = [None] * len(sess.geo.caps)
        verdict = _REWRITE if writes or ops else _DROP
        return self._decision(sess, verdict, [code], writes, detail=message, ops=ops)

    def _pass(self, sess: Session, write: DeviceWrite) -> Decision:
        sess.counts["pass"] = sess.counts.get("pass", 0) + 1
        return passed(sess, write)

    def _unknown(self, vm: str, bdf: str) -> Decision:
        code = "unknown-vm" if vm not in self._policy.vms else "unknown-device"
        text = "no such VM in the policy" if code == "unknown-vm" else "device not attached"
        return Decision(_DROP, code, f"{text}: vm={vm} bdf={bdf}", reasons=(code,))

    def _decision(
        self,
        sess: Session,
        verdict: Verdict,
        reasons: list[str] | tuple[str, ...],
        writes: tuple[DeviceWrite, ...] = (),
        *,
        guest_value: int | None = None,
        read_mask: int = 0,
        detail: str | None = None,
        ops: list[HostOp] | None = None,
    ) -> Decision:
        sess.counts[verdict] = sess.counts.get(verdict, 0) + 1
        return decided(sess, verdict, reasons, writes, guest_value, read_mask, detail, ops)


def passed(sess: Session, write: DeviceWrite) -> Decision:
    """The decision on a write outside everything the engine filters: it passes untouched."""
    ops = None if sess.backend.name == "writes" else ()
    return Decision(_PASS, "not-tph", _NOT_TPH, (write,), reasons=("not-tph",), ops=ops)


def served(sess: Session, mask: int, patch: int) -> Decision:
    """The decision on a valid read whose bytes under ``mask`` are served from the guest's
    view (their values: ``patch``): passed to the device when none are."""
    if not mask:
        return decided(sess, _PASS, ("not-tph",))
    return decided(sess, _REWRITE, ("tph-virtualized",), guest_value=patch, read_mask=mask)


def decided(
    sess: Session,
    verdict: Verdict,
    reasons: list[str] | tuple[str, ...],
    writes: tuple[DeviceWrite, ...] = (),
    guest_value: int | None = None,
    read_mask: int = 0,
    detail: str | None = None,
    ops: list[HostOp] | None = None,
) -> Decision:
    """The decision of ``verdict`` for ``reasons`` on ``sess``: the main reason, its text and
    the policy rule it falls under."""
    uniq, main, text, violation = summarize(reasons if type(reasons) is tuple else tuple(reasons))
    rule = sess.rules.rule_violation if violation else sess.rules.rule
    if ops is None and isinstance(sess.backend, HostOps):
        ops = []  # a host-backend decision always says which operations (none here)
    host = tuple(ops) if ops is not None else None
    return Decision(verdict, main, detail or text, writes, guest_value, read_mask, uniq, rule, host)


_NOT_TPH = summarize(("not-tph",))[2]
