"""The largest reply fits in ``max_reply``: a 2048-vector MSI-X device, every entry different
from its neighbours, re-written for a width change (the writes backend) or set one by one (the
host backend). Identical entries travel as one run."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tphtrap.audit import Auditor
from tphtrap.policyfile import load_policy
from tphtrap.serve import Server
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config
from tphtrap.wire import MAX_REPLY, expand_runs

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "two-tenants.yaml"
A = {"vm": "tenant-a", "bdf": "0000:3b:00.0"}
N = 2048
BAR, TABLE = 4, 0xFFFF0000  # a table high in a 64-bit BAR: the longest offsets
CTRL = 0x148 + 8


def big_device(tmp_path: Path) -> Path:
    dev = tmp_path / "msix-2048.bin"
    tph = TphSpec(extended=True, location=StLocation.MSIX, table_size=N)
    dev.write_bytes(build_config(tph=tph, msix=MsixSpec(N, bir=BAR, table_offset=TABLE)))
    return dev


#: Two CPUs of tenant-a with tags of their own: entries can differ with every tag allowed.
TWO_TAGS = """version: 1
host:
  steering_tags:
    0: {st8: 0x01, st16: 0x0101}
    1: {st8: 0x02, st16: 0x0202}
  neutral_tags: [0x00]  # what the host leaves in a fresh MSI-X table: TPH can be enabled
vms:
  tenant-a: {cpus: 0-1, on_violation: rewrite, devices: {0000:3b:00.0: {}}}
"""


class Lines:
    def __init__(self, policy: Path = POLICY) -> None:
        self.server = Server(load_policy(policy), str(policy), Auditor(io.StringIO()))
        self.largest = 0
        self.n = 0
        self.send("hello", versions=[2])

    def send(self, op: str, **fields: Any) -> dict[str, Any]:
        self.n += 1
        out = self.server.handle_line(json.dumps({"id": self.n, "op": op, **fields}).encode())
        for line in out.splitlines():
            self.largest = max(self.largest, len(line))
        reply: dict[str, Any] = json.loads(out.splitlines()[-1])
        assert reply["ok"], reply
        return reply


def program_alternating(s: Lines) -> None:
    """Every Vector Control: tag 0x0001 (tenant-a's at 8 bits, foreign at 16), the mask bit
    alternating, so that no two neighbours are equal."""
    for i in range(N):
        value = 0x1_0000 | i % 2
        s.send("msix_write", **A, bar=BAR, offset=TABLE + 16 * i + 12, width=4, value=value)


def test_a_width_change_on_2048_vectors_fits(tmp_path: Path) -> None:
    s = Lines()
    s.send("attach", **A, path=str(big_device(tmp_path)))
    program_alternating(s)
    s.send("cfg_write", **A, offset=CTRL, width=4, value=0x101)  # TPH only: entries allowed
    s.largest = 0
    reply = s.send("cfg_write", **A, offset=CTRL, width=4, value=0x301)  # now 16 bits
    writes = expand_runs(reply["decision"])["writes"]
    assert len(writes) == N + 2  # Requester Enable off, every entry, the new control
    assert {w["value"] >> 16 for w in writes[1:-1]} == {0x0101}  # the fallback at 16 bits
    print(f"largest reply, writes backend: {s.largest} bytes (max_reply {MAX_REPLY})")
    assert 100_000 < s.largest <= MAX_REPLY


def test_identical_entries_travel_as_one_run(tmp_path: Path) -> None:
    s = Lines()
    # the hypervisor's table at power-on: every vector masked
    s.send("attach", **A, path=str(big_device(tmp_path)), vector_ctrl=[1] * N)
    s.largest = 0
    reply = s.send("cfg_write", **A, offset=CTRL, width=4, value=0x301)
    writes = reply["decision"]["writes"]
    assert writes[0] == {
        "space": "bar",
        "bar": BAR,
        "offset": TABLE + 12,
        "width": 4,
        "value": 0x0101_0001,
        "count": N,
        "stride": 16,
    }
    assert s.largest < 1024


@pytest.mark.parametrize("alternate", [False, True])
def test_setting_2048_entries_with_the_host_backend_fits(tmp_path: Path, alternate: bool) -> None:
    policy = tmp_path / "two-tags.yaml"
    policy.write_text(TWO_TAGS)
    s = Lines(policy)
    s.send("attach", **A, path=str(big_device(tmp_path)), backend="host", completer=3)
    if alternate:  # CPU 0's and CPU 1's tags, alternating: no runs
        for i in range(N):
            value = 0x0202_0000 if i % 2 else 0x0101_0000
            s.send("msix_write", **A, bar=BAR, offset=TABLE + 16 * i + 12, width=4, value=value)
    s.send("vectors", **A, allocated=list(range(N)), tags_cleared=True)
    s.largest = 0
    reply = s.send("cfg_write", **A, offset=CTRL, width=4, value=0x301)
    ops = expand_runs(reply["decision"])["ops"]
    assert ops[0] == {"op": "tph_enable", "mode": "iv", "width": 16}
    if alternate:
        assert [(o["cpu"], o["tag"]) for o in ops[1:3]] == [(0, 0x0101), (1, 0x0202)]
        assert [o["index"] for o in ops[1:]] == list(range(N))
    else:
        assert reply["decision"]["ops"][1] == {
            "op": "st_set",
            "first": 0,
            "count": N,
            "cpu": 0,
            "tag": 0x0101,
        }
    print(f"largest reply, host backend: {s.largest} bytes (max_reply {MAX_REPLY})")
    assert s.largest <= MAX_REPLY
