#!/usr/bin/env python3
"""A reference client for ``tphtrap serve``: plays a short guest session and prints decisions.

It does what a hypervisor integration does: start ``tphtrap serve`` as a child, say hello,
attach a device, forward a guest's TPH programming (enable, steering-tag writes, an MSI-X
Vector Control write) and perform, in order, the device writes each decision lists (here they
are only printed). It stops at the first reply it does not understand: a real integration must
treat any error reply as "drop the access".

Usage (from the repository root):

    .venv/bin/python examples/client.py
    .venv/bin/python examples/client.py --policy policies/two-tenants.yaml \\
        --device fixtures/devices/nic-st-in-cap.lspci --vm tenant-a --bdf 0000:3b:00.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Plugin:
    """One ``tphtrap serve`` child speaking JSON lines over its stdin/stdout."""

    def __init__(self, policy: str, tphtrap: list[str]) -> None:
        self.proc = subprocess.Popen(
            [*tphtrap, "serve", "--policy", policy],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # audit events; a real integration logs them
            text=True,
            bufsize=1,
        )
        self.next_id = 0

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.next_id += 1
        request = {"id": self.next_id, "op": op, **fields}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("tphtrap serve exited")
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") is not None or "event" not in reply:
                break
            self.on_event(reply)
        if reply.get("id") != self.next_id:
            raise SystemExit(f"reply out of order: {line!r}")
        return reply

    @staticmethod
    def on_event(event: dict[str, Any]) -> None:
        """An unsolicited line (protocol 2): a reload's corrections must be performed now."""
        for c in event.get("corrections", []):
            show(f"{event['event']} {c['vm']} {c['bdf']}", {"ok": True, **c})

    def close(self) -> int:
        self.call("shutdown")
        return self.proc.wait(timeout=10)


def show(what: str, reply: dict[str, Any]) -> None:
    if not reply["ok"]:
        err = reply["error"]
        print(f"{what:<44} ERROR {err['code']}: {err['message']}")
        return
    d = reply["decision"]
    writes = ", ".join(
        f"{w['space']}{'[' + str(w['bar']) + ']' if 'bar' in w else ''}"
        f"@{w['offset']:#x}/{w['width']}={w['value']:#x}"
        for w in d["writes"]
    )
    print(f"{what:<44} {d['verdict']:<8} {d['reason']:<20} {writes or '-'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=str(ROOT / "policies" / "two-tenants.yaml"))
    ap.add_argument("--device", default=str(ROOT / "fixtures" / "devices" / "nic-st-in-cap.lspci"))
    ap.add_argument("--vm", default="tenant-a")
    ap.add_argument("--bdf", default="0000:3b:00.0")
    ap.add_argument(
        "--own-tag",
        type=lambda s: int(s, 0),
        default=0x01,
        help="an 8-bit tag of one of the VM's CPUs",
    )
    ap.add_argument(
        "--foreign-tag",
        type=lambda s: int(s, 0),
        default=0x02,
        help="an 8-bit tag of another tenant's CPU",
    )
    ap.add_argument("--tphtrap", default=str(ROOT / ".venv" / "bin" / "tphtrap"))
    args = ap.parse_args()

    plugin = Plugin(args.policy, [args.tphtrap])
    hello = plugin.call("hello", versions=[2], client="examples/client.py")
    print(f"connected to {hello['server']}, protocol {hello['version']}")
    attached = plugin.call("attach", vm=args.vm, bdf=args.bdf, path=args.device)
    show("attach", attached)
    if not attached["ok"] or attached["device"]["tph"] is None:
        plugin.close()
        return 1
    dev = attached["device"]
    tph = dev["tph"]["offset"]
    vm, bdf = args.vm, args.bdf

    def cfg_write(what: str, offset: int, width: int, value: int) -> None:
        show(
            what, plugin.call("cfg_write", vm=vm, bdf=bdf, offset=offset, width=width, value=value)
        )

    if dev["tph"]["location"] == "cap":
        cfg_write("ST entry 0 <- own CPU's tag", tph + 0xC, 2, args.own_tag)
        cfg_write("ST entry 1 <- another tenant's tag", tph + 0xE, 2, args.foreign_tag)
    cfg_write("control <- Interrupt Vector + TPH", tph + 0x8, 4, 0x101)
    cfg_write("control <- Device Specific mode", tph + 0x8, 4, 0x102)
    cfg_write("control <- Extended TPH", tph + 0x8, 4, 0x301)
    if dev["msix"] is not None:
        bar, table = dev["msix"]["bir"], dev["msix"]["offset"]
        show(
            "MSI-X entry 0 Vector Control (unmask)",
            plugin.call("msix_write", vm=vm, bdf=bdf, bar=bar, offset=table + 12, width=4, value=0),
        )
    read = plugin.call("cfg_read", vm=vm, bdf=bdf, offset=tph + 0xE, width=2)
    print(f"{'guest reads ST entry 1 back':<44} {read['decision']['guest_value']:#06x}")
    show("reset (FLR)", plugin.call("reset", vm=vm, bdf=bdf))
    stats = plugin.call("stats")
    print(f"verdicts: {stats['verdicts']}")
    return plugin.close()


if __name__ == "__main__":
    sys.exit(main())
