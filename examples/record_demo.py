#!/usr/bin/env python3
"""Record the bundled demo trace: two tenants' guest drivers programming TPH, one misbehaving.

Runs ``tphtrap serve --record`` under ``policies/two-tenants.yaml`` and plays:

* tenant-a (0000:3b:00.0, ST table in the TPH capability, ``on_violation: rewrite``): a Linux
  style driver (``pcie_enable_tph`` then ``pcie_tph_set_st_entry`` per vector: disable, write
  the entry, re-enable), one vector steered at tenant-b's socket, an Extended TPH request the
  device cannot honour, a Device Specific mode attempt, a byte-by-byte control write, a reset;
* tenant-b (0000:3b:00.1, ST table in MSI-X, Extended TPH, ``on_violation: drop``): 16-bit tags
  in Vector Control with 32- and 64-bit writes, a tag of tenant-a's socket, mask-bit toggles,
  read-backs, and an access for a device it does not own.

Regenerate the fixture with (from the repository root):

    .venv/bin/python examples/record_demo.py fixtures/traces/demo-session.jsonl
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "fixtures/traces/demo-session.jsonl")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tphtrap",
            "serve",
            "--policy",
            "policies/two-tenants.yaml",
            "--record",
            out,
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    next_id = 0

    def call(op: str, **fields: Any) -> dict[str, Any]:
        nonlocal next_id
        next_id += 1
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"id": next_id, "op": op, **fields}) + "\n")
        proc.stdin.flush()
        reply: dict[str, Any] = json.loads(proc.stdout.readline())
        return reply

    call("hello", versions=[2], client="examples/record_demo.py")

    # --- tenant-a: Linux driver style, ST table in the capability --------------------------
    a = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
    dev = call("attach", path="fixtures/devices/nic-st-in-cap.lspci", **a)["device"]
    ctrl = dev["tph"]["offset"] + 0x8
    table = dev["tph"]["offset"] + 0xC
    call("cfg_read", offset=dev["tph"]["offset"] + 4, width=4, **a)  # PCI_TPH_CAP
    call("cfg_write", offset=ctrl, width=4, value=0x101, **a)  # pcie_enable_tph(IV): TPH only
    for vector, tag in enumerate([0x01, 0x01, 0x00, 0x01, 0x02, 0x01, 0x01, 0x01]):
        # pcie_tph_set_st_entry: disable, write the entry, restore Requester Enable
        call("cfg_write", offset=ctrl, width=4, value=0x001, **a)
        call("cfg_write", offset=table + 2 * vector, width=2, value=tag, **a)  # 0x02: foreign
        call("cfg_write", offset=ctrl, width=4, value=0x101, **a)
    call("cfg_read", offset=table + 8, width=4, **a)  # the guest reads its own tags back
    call("cfg_write", offset=ctrl, width=4, value=0x301, **a)  # Extended TPH: not supported
    call("cfg_write", offset=ctrl, width=4, value=0x102, **a)  # Device Specific: forced off
    call("cfg_write", offset=ctrl, width=1, value=0x01, **a)  # byte by byte: mode
    call("cfg_write", offset=ctrl + 1, width=1, value=0x01, **a)  # then Requester Enable
    call("cfg_write", offset=0x04, width=2, value=0x0406, **a)  # PCI_COMMAND: not TPH
    call("cfg_write", offset=table + 14, width=4, value=0xFFFF0002, **a)  # last entry + padding
    call("reset", **a)
    call("cfg_read", offset=ctrl, width=4, **a)

    # --- tenant-b: ST table in MSI-X Vector Control, Extended TPH ---------------------------
    b = {"vm": "tenant-b", "bdf": "0000:3b:00.1"}
    dev = call("attach", path="fixtures/devices/nic-st-in-msix.lspci", **b)["device"]
    ctrl = dev["tph"]["offset"] + 0x8
    bar, msix = dev["msix"]["bir"], dev["msix"]["offset"]
    for vector in range(4):
        entry = msix + 16 * vector
        call("msix_write", bar=bar, offset=entry, width=8, value=0xFEE00000, **b)  # address
        call(
            "msix_write",
            bar=bar,
            offset=entry + 8,
            width=8,  # data + Vector Control
            value=(0x0202_0001 << 32) | (0x40 + vector),
            **b,
        )
    call("msix_write", bar=bar, offset=msix + 16 * 4 + 12, width=4, value=0x0101_0000, **b)
    call("cfg_write", offset=ctrl, width=4, value=0x301, **b)  # IV + Extended TPH
    for vector in range(4):
        call(
            "msix_write", bar=bar, offset=msix + 16 * vector + 12, width=4, value=0x0202_0000, **b
        )  # unmask, keeping the tag
    call("msix_write", bar=bar, offset=msix + 12, width=4, value=0x0101_0000, **b)  # foreign
    call("msix_read", bar=bar, offset=msix + 12, width=4, **b)
    call("msix_write", bar=bar, offset=msix + 0x1000, width=4, value=0, **b)  # not the table
    call("cfg_write", offset=ctrl, width=4, value=0x000, **b)
    call("cfg_write", vm="tenant-b", bdf="0000:3b:00.0", offset=ctrl, width=4, value=0x301)
    call("shutdown")
    return proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
