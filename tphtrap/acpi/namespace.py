"""Finding the PCI host bridges of a namespace, as Linux's ``acpi_pci_root`` driver does.

A host bridge is a device whose ``_HID`` or one of whose ``_CID`` is PNP0A08 (PCI Express) or
PNP0A03 (PCI), written as an EISA id (``EisaId ("PNP0A08")``) or a string, and whose ``_STA``
(when it has one) says it is present.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .acpiexec import AmlValue, evaluate_commands, run_acpiexec

__all__ = ["PCI_HOST_BRIDGE_IDS", "HostBridge", "decode_eisa_id", "find_host_bridges"]

PCI_HOST_BRIDGE_IDS = frozenset({"PNP0A08", "PNP0A03"})
_STA_PRESENT = 0x1


def decode_eisa_id(value: int) -> str:
    """A compressed EISA id (``EisaId ("PNP0A08")`` is 0x080AD041) as its 7 characters."""
    be = int.from_bytes((value & 0xFFFFFFFF).to_bytes(4, "little"), "big")
    vendor = "".join(chr(0x40 + (be >> shift & 0x1F)) for shift in (26, 21, 16))
    return f"{vendor}{be & 0xFFFF:04X}"


def _ids(value: AmlValue | None) -> list[str]:
    if isinstance(value, int):
        return [decode_eisa_id(value)]
    if isinstance(value, str):
        return [value.strip().upper()]
    if isinstance(value, tuple):
        return [i for v in value for i in _ids(v)]
    return []


@dataclass(frozen=True)
class HostBridge:
    path: str  # e.g. \_SB.PC00
    ids: tuple[str, ...]  # _HID then _CIDs
    uid: int | str | None
    segment: int | None
    bus: int | None

    def describe(self) -> str:
        parts = []
        if isinstance(self.uid, str):  # firmware text: quoted and escaped, never raw
            parts.append(f"UID {json.dumps(self.uid)}")
        elif self.uid is not None:
            parts.append(f"UID {self.uid}")
        if self.segment is not None:
            parts.append(f"segment {self.segment}")
        if self.bus is not None:
            parts.append(f"bus {self.bus:#04x}")
        return f"{self.path} ({', '.join(parts)})" if parts else self.path


def _device_paths(lines: Sequence[str], name: str) -> list[str]:
    out = []
    for line in lines:
        tokens = line.split()
        if tokens and tokens[0].startswith("\\") and tokens[0].endswith("." + name):
            out.append(tokens[0][: -len(name) - 1])
    return out


def find_host_bridges(tables: Sequence[Path], *, timeout: float) -> list[HostBridge]:
    """Every present PCI host bridge of the namespace ``tables`` build, in namespace order."""
    what = "finding the PCI host bridges"
    found = run_acpiexec(tables, ["find _HID", "find _CID"], what=what, timeout=timeout)
    hids = _device_paths(found.outputs[0].lines, "_HID")
    cids = _device_paths(found.outputs[1].lines, "_CID")
    devices = list(dict.fromkeys(hids + cids))
    asked = [
        f"evaluate {dev}.{name}"
        for dev in devices
        for name, owners in (("_HID", set(hids)), ("_CID", set(cids)))
        if dev in owners
    ]
    if not asked:
        return []
    _, answers = evaluate_commands(tables, asked, what=what, timeout=timeout)
    by_cmd = dict(zip(asked, answers, strict=True))
    candidates = []
    for dev in devices:
        ids: list[str] = []
        for suffix in ("_HID", "_CID"):
            ev = by_cmd.get(f"evaluate {dev}.{suffix}")
            if ev is not None and ev.ok:
                ids += _ids(ev.value)
        if PCI_HOST_BRIDGE_IDS.intersection(ids):
            candidates.append((dev, tuple(ids)))
    return _describe(tables, candidates, timeout=timeout)


def _describe(
    tables: Sequence[Path], candidates: list[tuple[str, tuple[str, ...]]], *, timeout: float
) -> list[HostBridge]:
    names = ("_STA", "_UID", "_SEG", "_BBN")
    commands = [f"evaluate {dev}.{n}" for dev, _ in candidates for n in names]
    if not commands:
        return []
    _, answers = evaluate_commands(
        tables, commands, what="reading the PCI host bridges", timeout=timeout
    )
    out = []
    for i, (dev, ids) in enumerate(candidates):
        sta, uid, seg, bbn = (answers[i * 4 + k] for k in range(4))
        if sta.ok and isinstance(sta.value, int) and not sta.value & _STA_PRESENT:
            continue  # not present: Linux does not bind a host bridge to it
        out.append(
            HostBridge(
                path=dev,
                ids=ids,
                uid=uid.value if uid.ok and isinstance(uid.value, int | str) else None,
                segment=seg.value if seg.ok and isinstance(seg.value, int) else None,
                bus=bbn.value if bbn.ok and isinstance(bbn.value, int) else None,
            )
        )
    return out
