#!/usr/bin/env python3
"""A reference client for ``tphtrap serve``: plays a short guest session and prints decisions.

It does what a hypervisor integration does: start ``tphtrap serve`` as a child, say hello,
attach a device, forward a guest's TPH programming (enable, steering-tag writes, an MSI-X
Vector Control write) and carry out, in order, the host operations and device writes each
decision lists (here they are only printed). With ``--backend host`` it also reports the
host's MSI-X vectors, as a VMM on a Linux host does. An error reply means "drop the access":
the client prints it and goes on; a refused attach ends the session (exit status 1).

Usage (from the repository root):

    .venv/bin/python examples/client.py
    .venv/bin/python examples/client.py --policy policies/two-tenants.yaml \\
        --device fixtures/devices/nic-st-in-cap.lspci --vm tenant-a --bdf 0000:3b:00.0
    .venv/bin/python examples/client.py --device fixtures/devices/nic-st-in-msix.lspci \\
        --vm tenant-b --bdf 0000:3b:00.1 --backend host --completer 3
    .venv/bin/python examples/client.py --device fixtures/devices/multi.lspci \\
        --source-bdf 0000:3b:00.0
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
    done = [_op_text(o) for o in d.get("ops", [])] + [_write_text(w) for w in d["writes"]]
    print(f"{what:<44} {d['verdict']:<8} {d['reason']:<20} {', '.join(done) or '-'}")


def _write_text(w: dict[str, Any]) -> str:
    where = f"{w['space']}{'[' + str(w['bar']) + ']' if 'bar' in w else ''}"
    run = f" x{w['count']} every {w['stride']}" if "count" in w else ""
    return f"{where}@{w['offset']:#x}/{w['width']}={w['value']:#x}{run}"


def _op_text(o: dict[str, Any]) -> str:
    if o["op"] == "tph_enable":
        return f"tph_enable({o['mode']}, {o['width']}-bit)"
    if o["op"] == "st_set":
        entries = f"{o['first']}..{o['first'] + o['count'] - 1}" if "first" in o else o["index"]
        return f"st_set({entries}, cpu {o['cpu']}, tag {o['tag']:#x})"
    return str(o["op"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=str(ROOT / "policies" / "two-tenants.yaml"))
    ap.add_argument("--device", default=str(ROOT / "fixtures" / "devices" / "nic-st-in-cap.lspci"))
    ap.add_argument("--source-bdf", help="the device to take from a dump of several")
    ap.add_argument("--vm", default="tenant-a")
    ap.add_argument("--bdf", default="0000:3b:00.0")
    ap.add_argument("--backend", choices=("writes", "host"), default="writes")
    ap.add_argument(
        "--completer",
        type=int,
        choices=(0, 1, 3),
        default=3,
        help="with --backend host: the root port's TPH Completer field",
    )
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
    where: dict[str, Any] = {"path": args.device}
    if args.source_bdf:
        where["source_bdf"] = args.source_bdf
    if args.backend == "host":
        where.update(backend="host", completer=args.completer)
    attached = plugin.call("attach", vm=args.vm, bdf=args.bdf, **where)
    show("attach", attached)
    if not attached["ok"]:
        plugin.close()
        return 1
    dev = attached["device"]
    vm, bdf = args.vm, args.bdf
    if dev["tph"] is None:
        print("no TPH capability: every access passes, nothing to forward")
        print(f"verdicts: {plugin.call('stats')['verdicts']}")
        return plugin.close()
    tph = dev["tph"]
    ctrl = tph["offset"] + 0x8

    def cfg_write(what: str, offset: int, width: int, value: int) -> None:
        show(
            what, plugin.call("cfg_write", vm=vm, bdf=bdf, offset=offset, width=width, value=value)
        )

    msix = dev["msix"]
    in_msix = tph["location"] == "msix" and msix is not None
    if in_msix and args.backend == "host":
        # The host enables MSI-X with its first vectors: every tag it had is cleared.
        show(
            "host: MSI-X vectors 0-3 allocated",
            plugin.call("vectors", vm=vm, bdf=bdf, allocated=[0, 1, 2, 3], tags_cleared=True),
        )
    if tph["location"] == "cap":
        cfg_write("ST entry 0 <- own CPU's tag", tph["offset"] + 0xC, 2, args.own_tag)
        if tph["table_size"] > 1:
            cfg_write(
                "ST entry 1 <- another tenant's tag", tph["offset"] + 0xE, 2, args.foreign_tag
            )
    cfg_write("control <- Interrupt Vector + TPH", ctrl, 4, 0x101)
    cfg_write("control <- Device Specific mode", ctrl, 4, 0x102)
    cfg_write("control <- Extended TPH", ctrl, 4, 0x301)
    if msix is not None:
        bar, vc = msix["bir"], msix["offset"] + 12
        tag = args.foreign_tag << 16 if in_msix else 0
        show(
            "MSI-X entry 0 Vector Control (unmask)",
            plugin.call("msix_write", vm=vm, bdf=bdf, bar=bar, offset=vc, width=4, value=tag),
        )
    # Read back what the guest wrote last: a tag where the ST table lives, else control.
    if tph["location"] == "cap" and tph["table_size"] > 1:
        what, read = "ST entry 1", plugin.call("cfg_read", vm=vm, bdf=bdf, offset=ctrl + 6, width=2)
    elif in_msix:
        read = plugin.call("msix_read", vm=vm, bdf=bdf, bar=bar, offset=vc, width=4)
        what = "MSI-X entry 0 Vector Control"
    else:
        what, read = "control", plugin.call("cfg_read", vm=vm, bdf=bdf, offset=ctrl, width=4)
    d = read["decision"]
    seen = d["guest_value"] & d["read_mask"] if d.get("read_mask") else None
    print(f"{'guest reads ' + what + ' back':<44} {'device value' if seen is None else hex(seen)}")
    show("reset (FLR)", plugin.call("reset", vm=vm, bdf=bdf))
    stats = plugin.call("stats")
    print(f"verdicts: {stats['verdicts']}")
    return plugin.close()


if __name__ == "__main__":
    sys.exit(main())
