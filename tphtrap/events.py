"""Value objects: what goes into the engine (accesses) and what comes out (decisions).

They are slotted dataclasses, treated as immutable everywhere (nothing assigns to them after
construction) but not ``frozen=True``: a frozen dataclass takes about four times longer to
construct, and three of these are built for every access on the VM-exit path.

Inputs are noun phrases (``ConfigWrite``, ``MsixWrite``), outputs carry a :class:`Verdict`
(``pass``, ``rewrite``, ``drop``), a kebab-case reason code, the exact writes the hypervisor must
perform on the real device, in order, and what the guest sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "REGION_NAMES",
    "VERDICT_NAMES",
    "Access",
    "ConfigRead",
    "ConfigWrite",
    "Decision",
    "DeviceWrite",
    "HostOp",
    "MsixRead",
    "MsixWrite",
    "Region",
    "Reset",
    "Verdict",
]


class Verdict(StrEnum):
    PASS = "pass"  # perform the guest's access unchanged
    REWRITE = "rewrite"  # perform ``writes`` instead (or patch the read with mask/patch)
    DROP = "drop"  # perform nothing on the device


class Region(StrEnum):
    CONFIG = "config"
    MSIX = "msix"  # a BAR access (the MSI-X table lives in a memory BAR)
    DEVICE = "device"  # reset, attach, detach: the whole function


# Member -> its string, for the per-access paths: an enum's ``.value`` is a descriptor call,
# a dict lookup is not.
VERDICT_NAMES: dict[Verdict, str] = {v: v.value for v in Verdict}
REGION_NAMES: dict[Region, str] = {r: r.value for r in Region}


@dataclass(slots=True)
class ConfigWrite:
    vm: str
    bdf: str
    offset: int
    width: int
    value: int

    region = Region.CONFIG
    is_write = True


@dataclass(slots=True)
class ConfigRead:
    vm: str
    bdf: str
    offset: int
    width: int

    region = Region.CONFIG
    is_write = False


@dataclass(slots=True)
class MsixWrite:
    """A guest write into a memory BAR (``bar`` index, ``offset`` inside the BAR)."""

    vm: str
    bdf: str
    bar: int
    offset: int
    width: int
    value: int

    region = Region.MSIX
    is_write = True


@dataclass(slots=True)
class MsixRead:
    vm: str
    bdf: str
    bar: int
    offset: int
    width: int

    region = Region.MSIX
    is_write = False


@dataclass(slots=True)
class Reset:
    """Function Level Reset or bus reset: TPH control and tags return to power-on state."""

    vm: str
    bdf: str

    region = Region.DEVICE
    is_write = False


Access = ConfigWrite | ConfigRead | MsixWrite | MsixRead | Reset


@dataclass(slots=True)
class DeviceWrite:
    """One write the hypervisor must perform on the real device, in decision order."""

    space: Literal["config", "bar"]
    offset: int
    width: int
    value: int
    bar: int | None = None

    def to_json(self) -> dict[str, int | str]:
        d: dict[str, int | str] = {"space": self.space}
        if self.bar is not None:
            d["bar"] = self.bar
        d["offset"] = self.offset
        d["width"] = self.width
        d["value"] = self.value
        return d


@dataclass(slots=True)
class HostOp:
    """One host kernel operation (the ``host`` backend), in decision order.

    ``tph_enable``: what Linux ``pcie_enable_tph(pdev, mode)`` does, ``mode`` "iv" or "ns",
    ``width`` the request type the host will choose (8: TPH only, 16: Extended TPH);
    ``tph_disable``: ``pcie_disable_tph``; ``st_set``: ``pcie_tph_set_st_entry(pdev, index,
    tag)``, ``cpu`` the host CPU of the VM whose tag it is (None: a neutral tag no CPU of the
    VM owns), ``tag`` at the width in force.
    """

    op: Literal["tph_enable", "tph_disable", "st_set"]
    mode: Literal["iv", "ns"] | None = None
    width: int | None = None
    index: int = 0
    cpu: int | None = None
    tag: int = 0

    def to_json(self) -> dict[str, int | str | None]:
        if self.op == "tph_enable":
            return {"op": self.op, "mode": self.mode, "width": self.width}
        if self.op == "st_set":
            return {"op": self.op, "index": self.index, "cpu": self.cpu, "tag": self.tag}
        return {"op": self.op}


@dataclass(slots=True)
class Decision:
    """The engine's answer for one access.

    For writes: ``writes`` are performed in order (empty for ``drop``; exactly the guest's
    access for ``pass``) and ``guest_value`` is what the guest reads back from the bytes it
    wrote. For reads: the guest sees ``(device_value & ~read_mask) | (guest_value & read_mask)``
    where ``device_value`` is what the hypervisor reads from the device (needless when
    ``read_mask`` covers the whole width). ``reason`` is the most significant reason code;
    ``reasons`` lists every distinct one in order. ``ops`` is None for a device attached with
    the ``writes`` backend; with the ``host`` backend it holds the host kernel operations, which
    come before ``writes`` (then never a raw write to a TPH register or a steering tag).
    """

    verdict: Verdict
    reason: str
    detail: str
    writes: tuple[DeviceWrite, ...] = ()
    guest_value: int | None = None
    read_mask: int = 0
    reasons: tuple[str, ...] = ()
    rule: str | None = None
    ops: tuple[HostOp, ...] | None = None
