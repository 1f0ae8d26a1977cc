"""Workloads shared by the benchmarks: request mixes, the native and the QEMU trace generators.

Everything here is deterministic (a fixed seed) and built from the bundled fixtures: the
two-tenant policy (``policies/two-tenants.yaml``) and its two devices,

* tenant-a, 0000:3b:00.0 (``nic-st-in-cap.lspci``): TPH at 0x148, control at 0x150, an 8-entry
  ST table at 0x154 in the capability, MSI-X table in BAR 0 at 0x2000 (not filtered);
* tenant-b, 0000:3b:00.1 (``nic-st-in-msix.lspci``): ST table in MSI-X Vector Control, Extended
  TPH, 32 vectors in BAR 2 at 0x4000,

as in ``examples/record_demo.py``.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "two-tenants.yaml"
DEV_A = ROOT / "fixtures" / "devices" / "nic-st-in-cap.lspci"
DEV_B = ROOT / "fixtures" / "devices" / "nic-st-in-msix.lspci"
A = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
B = {"vm": "tenant-b", "bdf": "0000:3b:00.1"}

# tenant-a's device: TPH capability and ST table
TPH_A = 0x148
CTRL_A = TPH_A + 0x8
TABLE_A = TPH_A + 0xC
# tenant-b's device: TPH control, MSI-X table (BAR 2)
CTRL_B = 0x148 + 0x8
BAR_B = 2
MSIX_B = 0x4000

__all__ = [
    "LATENCY_KINDS",
    "POLICY",
    "latency_requests",
    "native_cycle",
    "setup_requests",
    "write_native_trace",
    "write_qemu_trace",
]


def setup_requests() -> list[dict[str, Any]]:
    """``hello`` and both attaches: what every session starts with."""
    return [
        {"id": "hello", "op": "hello", "versions": [2], "client": "bench"},
        {"id": "attach-a", "op": "attach", "path": str(DEV_A), **A},
        {"id": "attach-b", "op": "attach", "path": str(DEV_B), **B},
    ]


# --- latency: one kind of request at a time -------------------------------------------------
LATENCY_KINDS = {
    "cfg_write TPH control": "TPH control register of tenant-a (enable / disable, both granted)",
    "cfg_write ST entry": "ST table entry of tenant-a (allowed tag; 1 in 8 foreign: rewritten)",
    "cfg_write non-TPH": "PCI Command register (outside TPH: passed untouched, not audited)",
    "msix_write Vector Control": "Vector Control of tenant-b (16-bit tag, mask bit toggled)",
    "msix_write non-TPH": "Message Address of a tenant-b vector, moved (in the MSI-X table, "
    "no byte of Vector Control: passed untouched, not audited)",
    "cfg_read TPH control": "TPH control register of tenant-a (served from the guest's view)",
    "msix_read Vector Control": "Vector Control of tenant-b (its tag from the guest's view)",
}


def latency_requests(kind: str, n: int = 64) -> list[bytes]:
    """``n`` request lines (with newline, ids 1..n) of one latency kind."""
    out = []
    for i in range(n):
        req: dict[str, Any]
        if kind == "cfg_write TPH control":
            req = {"op": "cfg_write", **A, "offset": CTRL_A, "width": 4}
            req["value"] = 0x101 if i % 2 == 0 else 0x001
        elif kind == "cfg_write ST entry":
            tag = 0x02 if i % 8 == 7 else 0x01
            req = {"op": "cfg_write", **A, "offset": TABLE_A + 2 * (i % 8), "width": 2}
            req["value"] = tag
        elif kind == "cfg_write non-TPH":
            req = {"op": "cfg_write", **A, "offset": 0x04, "width": 2, "value": 0x0406}
        elif kind == "msix_write Vector Control":
            vector = i % 32
            req = {"op": "msix_write", **B, "bar": BAR_B, "width": 4}
            req["offset"] = MSIX_B + 16 * vector + 12
            req["value"] = 0x0202_0000 | (i // 32) % 2
        elif kind == "msix_write non-TPH":
            req = {"op": "msix_write", **B, "bar": BAR_B, "width": 4}
            req["offset"] = MSIX_B + 16 * (i % 32)
            req["value"] = 0xFEE0_0000 | (i // 32) % 2 << 12
        elif kind == "cfg_read TPH control":
            req = {"op": "cfg_read", **A, "offset": CTRL_A, "width": 4}
        elif kind == "msix_read Vector Control":
            req = {"op": "msix_read", **B, "bar": BAR_B, "width": 4}
            req["offset"] = MSIX_B + 16 * (i % 32) + 12
        else:
            raise ValueError(kind)
        out.append(_line({"id": i + 1, **req}))
    return out


def _line(req: dict[str, Any]) -> bytes:
    return json.dumps(req, separators=(",", ":")).encode() + b"\n"


# --- the native trace -------------------------------------------------------------------------
def native_cycle() -> list[dict[str, Any]]:
    """One cycle of a two-tenant guest session (without ids), starting with a reset of each
    device so that every cycle gets the same decisions: a Linux-style driver on tenant-a
    (``pcie_enable_tph``, then per vector: disable, write the entry, re-enable; one foreign
    tag), read-backs, non-TPH config traffic; on tenant-b, MSI-X programming with 8-byte and
    4-byte writes, Extended TPH, one foreign tag, mask toggles, reads."""
    reqs: list[dict[str, Any]] = []

    def a(op: str, **f: Any) -> None:
        reqs.append({"op": op, **A, **f})

    def b(op: str, **f: Any) -> None:
        reqs.append({"op": op, **B, **f})

    a("reset")
    a("cfg_read", offset=TPH_A + 4, width=4)
    a("cfg_write", offset=CTRL_A, width=4, value=0x101)
    for vector, tag in enumerate([0x01, 0x01, 0x00, 0x01, 0x02, 0x01, 0x01, 0x01]):
        a("cfg_write", offset=CTRL_A, width=4, value=0x001)
        a("cfg_write", offset=TABLE_A + 2 * vector, width=2, value=tag)
        a("cfg_write", offset=CTRL_A, width=4, value=0x101)
    for k in range(4):
        a("cfg_read", offset=TABLE_A + 4 * k, width=4)
    a("cfg_read", offset=CTRL_A, width=4)
    a("cfg_write", offset=0x04, width=2, value=0x0406)
    a("cfg_read", offset=0x00, width=4)
    a("cfg_read", offset=0x06, width=2)
    for vector in range(4):  # tenant-a's MSI-X table is not filtered (ST table in the cap)
        a("msix_write", bar=0, offset=0x2000 + 16 * vector + 12, width=4, value=0)

    b("reset")
    for vector in range(8):
        entry = MSIX_B + 16 * vector
        b("msix_write", bar=BAR_B, offset=entry, width=8, value=0xFEE00000)
        b("msix_write", bar=BAR_B, offset=entry + 8, width=8, value=(0x0202_0001 << 32) | vector)
    b("cfg_write", offset=CTRL_B, width=4, value=0x301)
    for vector in range(8):
        tag = 0x0101 if vector == 5 else 0x0202
        b("msix_write", bar=BAR_B, offset=MSIX_B + 16 * vector + 12, width=4, value=tag << 16)
    for vector in range(4):
        b("msix_read", bar=BAR_B, offset=MSIX_B + 16 * vector + 12, width=4)
    b("msix_write", bar=BAR_B, offset=MSIX_B + 12, width=4, value=0x0202_0001)
    b("msix_write", bar=BAR_B, offset=MSIX_B + 12, width=4, value=0x0202_0000)
    b("msix_write", bar=BAR_B, offset=MSIX_B + 0x1000, width=4, value=0)  # PBA: not the table
    b("cfg_read", offset=CTRL_B, width=4)
    b("cfg_write", offset=CTRL_B, width=4, value=0x000)
    return reqs


def attached_engine() -> Any:
    """A fresh ``Engine`` with the benchmark policy and both devices attached, and the accesses
    of one :func:`native_cycle` (what the engine-alone measurements run)."""
    from tphtrap.device import ConfigSpace, load_device
    from tphtrap.engine import Engine
    from tphtrap.policyfile import load_policy

    engine = Engine(load_policy(str(POLICY)))
    for dev_id, path in ((A, DEV_A), (B, DEV_B)):
        dev = load_device(str(path))
        cfg = ConfigSpace.from_bytes(dev.data, dev.source, dev_id["bdf"], dev.line_map)
        engine.attach(dev_id["vm"], dev_id["bdf"], cfg)
    return engine


def cycle_accesses() -> list[Any]:
    """The accesses of one :func:`native_cycle`, as the engine takes them."""
    from tphtrap.wire import parse_request, to_access

    return [
        to_access(parse_request(json.dumps({"id": i, **r}))) for i, r in enumerate(native_cycle())
    ]


def _recorded(reqs: list[dict[str, Any]]) -> list[str]:
    """The requests as ``serve --record`` writes them (each with its ``expect``-ed decision)."""
    from tphtrap.audit import Auditor
    from tphtrap.policyfile import load_policy
    from tphtrap.serve import Server

    rec = io.StringIO()
    with open(os.devnull, "w") as devnull:
        server = Server(load_policy(str(POLICY)), str(POLICY), Auditor(devnull), recorder=rec)
        for n, req in enumerate(reqs):
            line = _line({"id": req.get("id", n), **req}).rstrip(b"\n")
            reply = json.loads(server.handle_line(line))
            if not reply.get("ok"):
                raise RuntimeError(f"bench workload request refused: {req} -> {reply}")
    return rec.getvalue().splitlines()


def write_native_trace(path: Path, records: int) -> int:
    """Write a native trace with ``records`` access records (plus hello and attaches).

    The cycle is decided once through the real server (``--record`` format, ``expect``
    included); the file repeats it with fresh ids. Returns the number of lines.
    """
    setup = setup_requests()
    cycle = native_cycle()
    recorded = _recorded([*setup, *cycle, *cycle])
    head = recorded[: len(setup) - 1]  # hello is not recorded: the two attaches
    first = recorded[len(head) : len(head) + len(cycle)]
    second = recorded[len(head) + len(cycle) :]
    tails = [line.split(",", 1)[1] for line in first]
    if tails != [line.split(",", 1)[1] for line in second]:
        raise RuntimeError("bench native cycle does not repeat: decisions differ")
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in head:
            f.write(line + "\n")
            lines += 1
        rid = 0
        buf: list[str] = []
        while rid < records:
            for tail in tails:
                rid += 1
                buf.append(f'{{"id":{rid},{tail}\n')
                if rid == records:
                    break
            if len(buf) >= 8192:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))
        lines += rid
    return lines


# --- the QEMU trace ---------------------------------------------------------------------------
# Guest addresses (bus 0x3b as in the policy), ECAM window, BAR placement.
_ECAM = 0xB000_0000
_MR_ECAM = "0x55d0c0e00000"
_MR_MMIO = "0x55d0c0a01230"
_MR_MSIX_A = "0x55d0c0b4e8f0"
_MR_MSIX_B = "0x55d0c0c00010"
_BAR0_A = 0xFE00_0000  # tenant-a: BAR 0 (MSI-X table at 0x2000)
_BAR2_B = 0xFD00_0000  # tenant-b: BAR 2 (MSI-X table at 0x4000)
_MMIO = 0xFEBC_0000  # an unrelated device register window


def _cfg_w(fn: int, off: int, value: int, size: int, hint: bool) -> list[str]:
    addr = _ECAM | 0x3B << 20 | fn << 12 | off
    out = []
    if hint:
        out.append(
            f"memory_region_ops_write cpu 1 mr {_MR_ECAM} addr {addr:#x} value {value:#x} "
            f"size {size} name 'pcie-mmcfg-mmio'"
        )
    out.append(f"pci_cfg_write e1000e 3b:00.{fn} @{off:#x} <- {value:#x}")
    return out


def _cfg_r(fn: int, off: int, value: int, size: int) -> list[str]:
    addr = _ECAM | 0x3B << 20 | fn << 12 | off
    return [
        f"pci_cfg_read e1000e 3b:00.{fn} @{off:#x} -> {value:#x}",
        f"memory_region_ops_read cpu 1 mr {_MR_ECAM} addr {addr:#x} value {value:#x} "
        f"size {size} name 'pcie-mmcfg-mmio'",
    ]


def _msix(write: bool, mr: str, addr: int, value: int) -> str:
    op = "write" if write else "read"
    return (
        f"memory_region_ops_{op} cpu 1 mr {mr} addr {addr:#x} value {value:#x} size 4 "
        "name 'msix-table'"
    )


def _noise(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        op = "write" if rng.random() < 0.5 else "read"
        reg = rng.randrange(0, 0x4000, 4)
        return (
            f"memory_region_ops_{op} cpu {rng.randrange(2)} mr {_MR_MMIO} addr "
            f"{_MMIO + reg:#x} value {rng.randrange(1 << 32):#x} size 4 name 'e1000e-mmio'"
        )
    if r < 0.8:
        return (
            f"kvm_set_user_memory Slot#3 flags=0x0 gpa={_BAR2_B:#x} size=0x8000 "
            "ua=0x7f1c2c000000 ret=0"
        )
    if r < 0.9:
        return f"kvm_run_exit cpu_index {rng.randrange(2)}, reason 2"
    return f"virtio_queue_notify vdev 0x55d0c0d01230 n {rng.randrange(3)} vq 0x7f1c20001000"


def _qemu_cycle(rng: random.Random) -> list[str]:
    """One guest driver pass over both devices, with unrelated lines interleaved."""
    lines: list[str] = []
    # tenant-a: TPH in the capability, widths from the ECAM region (exact) or inferred
    lines += _cfg_r(0, TPH_A + 4, 0x00070203, 4)
    lines += _cfg_w(0, CTRL_A, 0x101, 4, hint=True)
    for vector in range(8):
        tag = 0x02 if vector == 4 else 0x01
        lines += _cfg_w(0, CTRL_A, 0x001, 4, hint=True)
        lines += _cfg_w(0, TABLE_A + 2 * vector, tag, 2, hint=vector % 2 == 0)
        lines += _cfg_w(0, CTRL_A, 0x101, 4, hint=True)
    lines += _cfg_w(0, 0x04, 0x406, 2, hint=True)
    lines += _cfg_r(0, 0x00, 0x15938086, 4)
    for vector in range(4):  # tenant-a's own MSI-X table: passes (ST table in the cap)
        lines.append(_msix(True, _MR_MSIX_A, _BAR0_A + 0x2000 + 16 * vector + 12, 0))
    # tenant-b: ST table in MSI-X Vector Control, Extended TPH
    lines += _cfg_w(1, CTRL_B, 0x301, 4, hint=True)
    for vector in range(8):
        tag = 0x0101 if vector == 5 else 0x0202
        entry = _BAR2_B + MSIX_B + 16 * vector
        lines.append(_msix(True, _MR_MSIX_B, entry, 0xFEE00000))
        lines.append(_msix(True, _MR_MSIX_B, entry + 8, 0x40 + vector))
        lines.append(_msix(True, _MR_MSIX_B, entry + 12, tag << 16 | 1))
        lines.append(_msix(True, _MR_MSIX_B, entry + 12, tag << 16))
        lines.append(_msix(False, _MR_MSIX_B, entry + 12, tag << 16))
    lines += _cfg_r(1, CTRL_B, 0x301, 4)
    lines += _cfg_w(1, CTRL_B, 0x000, 4, hint=True)
    out: list[str] = []
    for line in lines:  # about 2 unrelated lines for every 3 relevant ones
        out.append(line)
        while rng.random() < 0.4:
            out.append(_noise(rng))
    return out


def _qemu_header() -> list[str]:
    return [
        "qemu-system-x86_64: -device e1000e,netdev=n0: warning: host doesn't support requested "
        "feature",
        f"pci_update_mappings_add e1000e 3b:00.0 0,{_BAR0_A:#x}+0x8000",
        f"pci_update_mappings_add e1000e 3b:00.1 2,{_BAR2_B:#x}+0x8000",
        f"pci_update_mappings_add e1000e 00:03.0 0,{_MMIO:#x}+0x20000",
    ]


def qemu_lines(total: int, seed: int = 1) -> Iterator[str]:
    """``total`` QEMU trace lines (without newlines)."""
    rng = random.Random(seed)
    cycles = [_qemu_cycle(rng) for _ in range(16)]
    n = 0
    for line in _qemu_header():
        yield line
        n += 1
    k = 0
    while n < total:
        for line in cycles[k % len(cycles)]:
            if n == total:
                return
            yield line
            n += 1
        k += 1


def write_qemu_trace(path: Path, total: int) -> int:
    with open(path, "w", encoding="utf-8") as f:
        buf: list[str] = []
        for line in qemu_lines(total):
            buf.append(line)
            if len(buf) >= 8192:
                f.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            f.write("\n".join(buf) + "\n")
    return total


QEMU_DEVICES = [f"0000:3b:00.0={DEV_A}", f"0000:3b:00.1={DEV_B}"]
