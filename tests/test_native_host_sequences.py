"""The native path against the Python path in the host backend, request by request: a VMM's
whole vocabulary for one device (control and entry writes whole and in parts, host vectors
and host results naming the ops of the last decision, resets, reloads, SIGHUP, detach and
attach again with another device, backend or root port) on devices with their ST table in
the capability or in MSI-X, tables of zeros or of any tags. The twins of tests/test_native.py
compare every reply, audit line, counter and the whole engine state after every line."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from helpers import named_policies, policy_name, rciep_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from test_native import Twins, members, render

from tphtrap.device import ConfigSpace
from tphtrap.policy import CpuTags, DeviceSettings, HostPolicy, OnViolation, Policy, VmPolicy
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

EXAMPLES = int(os.environ.get("TPHTRAP_EXAMPLES", 2_000)) // 20
VM, BDF = "guest", "0000:3b:00.0"
TPH_AT, TABLE, BIR = 0x148, 0x1000, 2
CTRL = TPH_AT + 8
E0 = TPH_AT + 0xC
CONTROLS = [0x0, 0x1, 0x100, 0x101, 0x301, 0x300, 0x201, 0x102, 0x103, 0x2, 0x80000101]
NATIVE: Counter[str] = Counter()  # what the native path answered, by op and reason
TAGS = [0, 1, 2, 3, 0x101, 0x102, 0x103, 0x105, 0xFF, 0xFFFF]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    tags = {}
    for cpu in range(8):
        st8 = draw(st.sampled_from([cpu // 2, cpu // 2 + 1, None, 0]))
        st16 = draw(st.sampled_from([0x100 | (cpu // 2), None, 0x105, 0]))
        tags[cpu] = CpuTags(cpu, st8, st16)
    neutral = draw(st.frozensets(st.sampled_from([0, 1, 0x100]), max_size=2))
    cpus = draw(st.frozensets(st.integers(0, 7), min_size=1, max_size=8))
    vcpus = None
    if draw(st.integers(0, 3)) == 0:
        vcpus = tuple(draw(st.lists(st.sampled_from(sorted(cpus)), min_size=1, max_size=3)))
    dev = DeviceSettings(
        BDF,
        tph=draw(st.integers(0, 9)) > 0,
        extended_tph=draw(st.booleans()) or draw(st.booleans()),
        on_violation=draw(st.one_of(st.none(), st.sampled_from(list(OnViolation)))),
    )
    vm = VmPolicy(
        VM,
        cpus,
        on_violation=draw(st.sampled_from(list(OnViolation))),
        vcpus=vcpus,
        devices={BDF: dev},
        tph=draw(st.integers(0, 9)) > 0,
        extended_tph=draw(st.booleans()) or draw(st.booleans()),
    )
    return Policy(HostPolicy(tags, neutral), {VM: vm})


@st.composite
def devices(draw: st.DrawFn) -> dict[str, Any]:
    where = draw(st.sampled_from(["cap", "msix"]))
    size = draw(st.sampled_from([1, 2, 3, 5, 8]))
    zeros = draw(st.integers(0, 3)) > 0
    entries = (
        (0,) * size
        if zeros
        else tuple(draw(st.lists(st.sampled_from(TAGS), min_size=size, max_size=size)))
    )
    tph = TphSpec(
        no_st=draw(st.booleans()) or True,
        interrupt_vector=True,
        extended=draw(st.booleans()),
        location=StLocation.CAP if where == "cap" else StLocation.MSIX,
        table_size=size,
        entries=entries,
        st_mode=draw(st.sampled_from([0, 1])),
        req_enable=draw(st.sampled_from([0, 0, 1, 3])),
        ctrl_reserved=draw(st.sampled_from([0, 0, 0x80000000])),
    )
    msix = MsixSpec(size if where == "msix" else 4, bir=BIR, table_offset=TABLE)
    data = build_config(tph=tph, msix=msix, tph_at=TPH_AT)
    # (TPHTRAP_SEQ_BACKENDS=writes: the writes backend only)
    backends = os.environ.get("TPHTRAP_SEQ_BACKENDS", "host,host,host,writes").split(",")
    backend = draw(st.sampled_from(backends))
    root = draw(st.sampled_from([(3, False), (3, False), (1, False), (0, False), (0, True)]))
    fields: dict[str, Any] = {}
    if backend == "host":
        fields["backend"] = "host"
        if root[1]:
            fields["rciep"] = True
            data = rciep_config(ConfigSpace.from_bytes(data, "<sim>", BDF))
        else:
            fields["completer"] = root[0]
    if where == "msix" and draw(st.booleans()):
        fields["vector_ctrl"] = [1] * size
    fields["config"] = data.hex()
    return {"where": where, "size": size, "fields": fields}


class HostSequences(RuleBasedStateMachine):
    @initialize(policy=policies(), dev=devices())
    def setup(self, policy: Policy, dev: dict[str, Any]) -> None:
        self.twins = Twins(policy)
        self.n = 1000
        self.dev = dev
        self.last_ops: list[dict[str, Any]] = []
        self.attached = False
        self.attach(dev, False)

    def send(self, op: str, **fields: Any) -> dict[str, Any]:
        self.n += 1
        line = render(members(self.n, op, {"vm": VM, "bdf": BDF, **fields}))
        out = self.twins.send(line)
        for _, _, what, _, reason in self.twins.answered:
            NATIVE[f"{what} {reason}"] += 1
        reply: dict[str, Any] = json.loads(out.splitlines()[-1])
        d = reply.get("decision")
        if isinstance(d, dict) and d.get("ops") is not None:
            self.last_ops = d["ops"]
        return reply

    def attach(self, dev: dict[str, Any], replace: bool) -> None:
        self.dev = dev
        extra = {"replace": True} if replace else {}
        r = self.send("attach", **dev["fields"], **extra)
        self.attached = bool(r.get("ok"))

    # --- the guest ---
    @rule(value=st.sampled_from(CONTROLS))
    def control(self, value: int) -> None:
        self.send("cfg_write", offset=CTRL, width=4, value=value)

    @rule(value=st.sampled_from(CONTROLS), twice=st.integers(1, 3))
    def control_again(self, value: int, twice: int) -> None:
        for _ in range(twice):
            self.send("cfg_write", offset=CTRL, width=4, value=value)

    @rule(i=st.integers(0, 7), tag=st.sampled_from(TAGS), masked=st.integers(0, 1))
    def entry(self, i: int, tag: int, masked: int) -> None:
        i %= self.dev["size"]
        if self.dev["where"] == "cap":
            self.send("cfg_write", offset=E0 + 2 * i, width=2, value=tag)
        else:
            off = TABLE + 16 * i + 12
            self.send("msix_write", bar=BIR, offset=off, width=4, value=tag << 16 | masked)

    @rule(
        req=st.sampled_from([1, 3]),
        mode=st.sampled_from([1, 1, 0]),
        i=st.integers(0, 7),
        tag=st.sampled_from(TAGS),
    )
    def driver(self, req: int, mode: int, i: int, tag: int) -> None:
        """A Linux driver: enable, then set an entry (disable, entry, enable)."""
        on = mode | req << 8
        self.send("cfg_write", offset=CTRL, width=4, value=on)
        self.send("cfg_write", offset=CTRL, width=4, value=mode)
        self.entry(i, tag, 0)
        self.send("cfg_write", offset=CTRL, width=4, value=on)

    @rule(
        off=st.sampled_from([CTRL, CTRL + 1, E0, E0 + 1, TABLE + 12, TABLE + 14, TABLE + 8]),
        width=st.sampled_from([1, 2, 8]),
        value=st.integers(0, 0xFFFF),
    )
    def partial(self, off: int, width: int, value: int) -> None:
        if off >= TABLE:
            off -= off % width
            self.send("msix_write", bar=BIR, offset=off, width=width, value=value)
        elif width <= 2:
            self.send("cfg_write", offset=off, width=width, value=value & ((1 << 8 * width) - 1))

    @rule(how=st.sampled_from(["request", "flr", "d3"]))
    def reset(self, how: str) -> None:
        if how == "request":
            self.send("reset")
        elif how == "flr":
            self.send("cfg_write", offset=0xA8, width=2, value=0x8000)
        else:
            self.send("cfg_write", offset=0x44, width=2, value=3)
            self.send("cfg_write", offset=0x44, width=2, value=0)

    # --- the host ---
    @rule(data=st.data(), cleared=st.booleans())
    def vectors(self, data: st.DataObject, cleared: bool) -> None:
        n = self.dev["size"] if self.dev["where"] == "msix" else 4
        allocated = data.draw(st.frozensets(st.integers(0, n - 1)))
        self.send("vectors", allocated=sorted(allocated), tags_cleared=cleared)

    @rule(k=st.integers(0, 3), errno=st.sampled_from([-22, -6, -16]))
    def host_result(self, k: int, errno: int) -> None:
        if self.last_ops:
            op = self.last_ops[k % len(self.last_ops)]
            if op.get("op") == "st_set" and "first" in op:
                index = op["first"] + k % op["count"]
                op = {"op": "st_set", "index": index, "cpu": op.get("cpu"), "tag": op["tag"]}
        else:
            op = {"op": "tph_enable", "mode": "iv", "width": 8}
        self.send("host_result", failed=op, errno=errno)

    @rule(policy=policies(), sighup=st.booleans())
    def reload(self, policy: Policy, sighup: bool) -> None:
        name = policy_name(policy)
        if sighup:
            self.twins.send(name.encode(), "sighup", event=True)
        else:
            self.send("reload", policy=name)

    @rule(dev=devices())
    def attach_again(self, dev: dict[str, Any]) -> None:
        self.attach(dev, self.attached)

    @rule()
    def detach(self) -> None:
        self.send("detach")
        self.attached = False

    def teardown(self) -> None:
        if hasattr(self, "twins"):
            self.twins.close()


def test_host_sequences() -> None:
    with named_policies():
        run_state_machine_as_test(
            HostSequences,
            settings=settings(
                max_examples=max(1, EXAMPLES),
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    print(f"native answers: {dict(NATIVE)}")
