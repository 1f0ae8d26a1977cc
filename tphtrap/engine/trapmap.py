"""The trap map: exactly which accesses a VMM must forward to tphtrap for one device.

Derived from the device's :class:`~tphtrap.engine.geometry.Geometry`, so it names the very
bytes the engine owns or watches and nothing else: an access that overlaps none of them is
decided ``pass`` with the guest's own bytes, never virtualized, and changes no later decision
(``tests/test_trapmap.py`` checks that on random sessions). A VMM handles everything outside
the map itself.

- ``config``: every TPH Requester capability (dword-rounded: writes and reads, the guest
  reads these bytes from tphtrap's view), and, on a device with a TPH capability, the
  registers whose write can reset the function (PCI Express Device Control, Advanced Features
  control, PMCSR): writes only, their reads are the device's.
- ``bar``: when the ST table is located in MSI-X, the Vector Control dword of every table
  entry, as one run per BAR (``offset``, ``offset + stride``, ... ``count`` of them): writes
  and reads (bits 31:16 are read from tphtrap's view, bits 15:0 are the VMM's emulation).
"""

from __future__ import annotations

from typing import Any

from ..spec import PCI_MSIX_ENTRY_SIZE
from .geometry import K_FLR_AF, K_FLR_EXP, K_PMCSR, Geometry

__all__ = ["trap_map", "trapped"]

_RESET_REGS = {K_FLR_EXP: "pcie-devctl", K_FLR_AF: "af-ctrl", K_PMCSR: "pmcsr"}


def trap_map(geo: Geometry) -> dict[str, list[dict[str, Any]]]:
    config: list[dict[str, Any]] = [
        {"offset": cap.start, "length": cap.end - cap.start, "what": "tph", "reads": True}
        for cap in geo.caps
    ]
    if geo.caps:
        seen: set[int] = set()
        for reg in geo.regs:
            if reg is not None and reg.kind in _RESET_REGS and reg.start not in seen:
                seen.add(reg.start)
                config.append(
                    {
                        "offset": reg.start,
                        "length": reg.size,
                        "what": _RESET_REGS[reg.kind],
                        "reads": False,
                    }
                )
    config.sort(key=lambda r: int(r["offset"]))
    bar: list[dict[str, Any]] = []
    if geo.in_msix and geo.n_entries:
        bar.append(
            {
                "bar": geo.msix_bir,
                "offset": geo.vc_offsets[0],
                "length": 4,
                "stride": PCI_MSIX_ENTRY_SIZE,
                "count": geo.n_entries,
                "what": "msix-vector-control",
                "reads": True,
            }
        )
    return {"config": config, "bar": bar}


def trapped(
    tmap: dict[str, list[dict[str, Any]]],
    space: str,
    offset: int,
    width: int,
    *,
    write: bool,
    bar: int | None = None,
) -> bool:
    """Must a VMM forward this guest access (``space`` ``"config"`` or ``"bar"``) to tphtrap,
    by the trap map ``tmap`` of its device? True when it overlaps a range of the map that
    covers it (``reads`` false: writes only)."""
    end = offset + width
    if space == "config":
        return any(
            offset < r["offset"] + r["length"] and r["offset"] < end
            for r in tmap["config"]
            if write or r["reads"]
        )
    for r in tmap["bar"]:
        if r["bar"] != bar or not (write or r["reads"]):
            continue
        first, stride, length = r["offset"], r["stride"], r["length"]
        # the copies of the range that can overlap [offset, end): k from lo to hi
        lo = max(0, (offset - first - length) // stride + 1)
        hi = min(r["count"] - 1, (end - 1 - first) // stride)
        if any(
            offset < first + k * stride + length and first + k * stride < end
            for k in range(lo, hi + 1)
        ):
            return True
    return False
