"""What a host has, read from sysfs: its CPUs and how they share caches, and its TPH devices.

``ROOT`` is a copy of sysfs: the directory that would be ``/sys`` (as ``tphtrap inspect
--sysfs`` takes it), or a directory holding ``sys/``; the default is the live ``/sys``.

CPUs (``devices/system/cpu``, Documentation/ABI/stable/sysfs-devices-system-cpu and
Documentation/ABI/testing/sysfs-devices-system-cpu in Linux): ``present`` and ``online``; per
online CPU ``topology/physical_package_id``, ``core_id``, ``thread_siblings_list`` (SMT
siblings), the level-3 unified cache ``cache/indexN/{level,type,shared_cpu_list,id}``, and the
NUMA nodes' ``devices/system/node/nodeN/cpulist``. A CPU without topology or cache files
(some virtual machines have none) keeps ``None`` there.

PCI functions (``bus/pci/devices/*``): each ``config`` is decoded with
:func:`tphtrap.device.load_device`, its root port found with
:func:`tphtrap.device.check_root_port`, and judged as ``tphtrap inspect --host`` judges it
(:func:`tphtrap.report.verdict`, which forces TPH off below a root port without TPH Completer
support). The live ``config`` file is as long as the config space the
kernel found: 256 bytes means the kernel sees no extended config space, so Linux can never find
a TPH capability there (``pci_find_next_ext_capability`` returns 0 when ``cfg_size`` is 256). A
read shorter than the file (sysfs gives unprivileged readers 64 bytes) leaves the function
*unexamined*, and every summary says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .device import (
    ConfigSpace,
    RootPortCheck,
    check_root_port,
    load_device,
    normalize_bdf,
    sysfs_functions,
)
from .errors import DeviceError, TphtrapError
from .policy import MAX_CPUS, format_cpulist, parse_cpulist
from .report import verdict
from .spec import PCI_CFG_SPACE_EXP_SIZE, PCI_CFG_SPACE_SIZE

__all__ = [
    "CpuInfo",
    "HostFacts",
    "PciFunction",
    "SysfsError",
    "read_host",
]

_MAX_SYSFS_TEXT: Final = 1 << 16  # no sysfs attribute read here is near this


class SysfsError(TphtrapError):
    """A sysfs attribute the scan needs is missing or malformed; names the file."""


@dataclass(frozen=True)
class CpuInfo:
    cpu: int
    package: int | None = None
    core: int | None = None
    siblings: frozenset[int] = frozenset()  # SMT siblings, itself included
    l3: frozenset[int] | None = None  # the CPUs sharing its level-3 cache
    l3_id: int | None = None
    node: int | None = None


@dataclass(frozen=True)
class PciFunction:
    """One PCI function and what its config space says about TPH."""

    bdf: str
    path: Path
    status: str  # trappable, force-off, no-tph, unexamined
    reason: str
    notes: tuple[str, ...] = ()
    config: ConfigSpace | None = None
    root: RootPortCheck | None = None  # its root port (None without a PCIe capability)

    @property
    def root_port(self) -> str | None:
        """The BDF of the root port above it, when one was found."""
        port = self.root.port if self.root is not None else None
        return port.bdf if port is not None else None

    @property
    def has_tph(self) -> bool:
        return self.status in ("trappable", "force-off")


@dataclass(frozen=True)
class HostFacts:
    sysfs: Path  # the directory that is /sys on the live host
    present: frozenset[int]
    online: frozenset[int]
    cpus: Mapping[int, CpuInfo]  # online CPUs
    functions: tuple[PciFunction, ...]
    nodes: Mapping[int, frozenset[int]] = field(default_factory=dict)

    @property
    def tph_functions(self) -> tuple[PciFunction, ...]:
        return tuple(f for f in self.functions if f.has_tph)

    @property
    def unexamined(self) -> tuple[PciFunction, ...]:
        return tuple(f for f in self.functions if f.status == "unexamined")

    def function(self, bdf: str) -> PciFunction | None:
        return next((f for f in self.functions if f.bdf == bdf), None)

    def groups(self, key: str) -> dict[int | None, frozenset[int]]:
        """Online CPUs grouped by ``package``, ``node`` or ``l3_id``."""
        acc: dict[int | None, set[int]] = {}
        for info in self.cpus.values():
            acc.setdefault(getattr(info, key), set()).add(info.cpu)
        return {k: frozenset(v) for k, v in acc.items()}

    def l3_domains(self) -> list[frozenset[int]]:
        """The online CPUs of each level-3 cache, in CPU order; CPUs without cache information
        form one group per package."""
        seen: dict[frozenset[int], None] = {}
        loose: dict[int | None, set[int]] = {}
        for info in sorted(self.cpus.values(), key=lambda i: i.cpu):
            if info.l3 is not None:
                seen.setdefault(frozenset(info.l3 & self.online), None)
            else:
                loose.setdefault(info.package, set()).add(info.cpu)
        out = [d for d in seen if d]
        out.extend(frozenset(v) for v in loose.values())
        return sorted(out, key=min)

    def smt_pairs(self) -> str:
        """'0,48 1,49 ...' abbreviated: how the SMT siblings are numbered."""
        groups = sorted({info.siblings for info in self.cpus.values() if len(info.siblings) > 1})
        if not groups:
            return "none"
        first = sorted(groups, key=min)[:2]
        shown = "; ".join(format_cpulist(g) for g in first)
        return f"{len(groups)} cores with SMT siblings ({shown}; ...)"


# --- sysfs attributes -------------------------------------------------------------------------
def _text(path: Path, *, required: bool = True) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_SYSFS_TEXT + 1)
    except FileNotFoundError:
        if required:
            raise SysfsError(f"{path}: missing (is this a sysfs tree?)") from None
        return None
    except OSError as exc:
        raise SysfsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_SYSFS_TEXT:
        raise SysfsError(f"{path}: longer than {_MAX_SYSFS_TEXT} bytes: not a sysfs attribute")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SysfsError(f"{path}: not ASCII text") from None


def _cpulist(path: Path, *, required: bool = True) -> frozenset[int] | None:
    text = _text(path, required=required)
    if text is None:
        return None
    if not text:
        return frozenset()
    try:
        return parse_cpulist(text)
    except ValueError as exc:
        raise SysfsError(f"{path}: not a cpulist: {exc}") from None


def _number(path: Path) -> int | None:
    text = _text(path, required=False)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise SysfsError(f"{path}: not a number: {text[:40]!r}") from None
    return value if value >= 0 else None  # -1: unknown (physical_package_id on some VMs)


def _l3(cpu_dir: Path) -> tuple[frozenset[int] | None, int | None]:
    cache = cpu_dir / "cache"
    if not cache.is_dir():
        return None, None
    for index in sorted(cache.glob("index[0-9]*")):
        if _text(index / "level", required=False) != "3":
            continue
        if _text(index / "type", required=False) not in ("Unified", "Data"):
            continue
        return _cpulist(index / "shared_cpu_list"), _number(index / "id")
    return None, None


def _read_cpus(
    root: Path,
) -> tuple[frozenset[int], frozenset[int], dict[int, CpuInfo], dict[int, frozenset[int]]]:
    base = root / "devices" / "system" / "cpu"
    online = _cpulist(base / "online")
    assert online is not None
    present = _cpulist(base / "present", required=False) or online
    nodes: dict[int, frozenset[int]] = {}
    node_base = root / "devices" / "system" / "node"
    for node_dir in sorted(node_base.glob("node[0-9]*")):
        cpus = _cpulist(node_dir / "cpulist", required=False)
        if cpus:
            nodes[int(node_dir.name[4:])] = cpus
    node_of = {c: n for n, cpus in nodes.items() for c in cpus}
    infos: dict[int, CpuInfo] = {}
    for cpu in sorted(online):
        cpu_dir = base / f"cpu{cpu}"
        topo = cpu_dir / "topology"
        siblings = _cpulist(topo / "thread_siblings_list", required=False)
        l3, l3_id = _l3(cpu_dir)
        infos[cpu] = CpuInfo(
            cpu=cpu,
            package=_number(topo / "physical_package_id"),
            core=_number(topo / "core_id"),
            siblings=siblings or frozenset({cpu}),
            l3=l3,
            l3_id=l3_id,
            node=node_of.get(cpu),
        )
    return present, online, infos, nodes


# --- PCI functions ----------------------------------------------------------------------------
def _config_size(path: Path) -> int | None:
    try:
        return os.stat(path / "config").st_size
    except OSError:
        return None


def _read_function(path: Path, bdf: str) -> PciFunction:
    """What one sysfs function directory says about TPH."""
    size = _config_size(path)
    try:
        cfg = load_device(path)
    except DeviceError as exc:
        return PciFunction(bdf, path, "unexamined", f"config space unreadable: {exc.reason}")
    if size is not None and cfg.size < size:
        reason = f"only {cfg.size} of its {size} bytes of config space could be read (run as root)"
        return PciFunction(bdf, path, "unexamined", reason, config=cfg)
    if cfg.size == PCI_CFG_SPACE_SIZE:
        reason = "no extended config space (the kernel sees 256 bytes): no TPH"
        return PciFunction(bdf, path, "no-tph", reason, config=cfg)
    root = check_root_port(path, cfg) if cfg.pcie is not None else None
    judged: dict[str, Any] = verdict(cfg, root)
    status, reason = str(judged["status"]), str(judged["reason"])
    no_ext = cfg.size == PCI_CFG_SPACE_EXP_SIZE and cfg.u32(PCI_CFG_SPACE_SIZE) in (0, 0xFFFFFFFF)
    if status == "unknown" and no_ext:
        status, reason = "no-tph", "no extended capabilities: no TPH"
    if status == "unknown":
        status = "unexamined"
    return PciFunction(bdf, path, status, reason, tuple(judged["notes"]), cfg, root)


def _read_functions(sysfs: Path) -> tuple[PciFunction, ...]:
    try:
        paths = sysfs_functions(sysfs)
    except DeviceError as exc:
        raise SysfsError(f"{exc.where}: {exc.reason} (is this a sysfs tree?)") from None
    return tuple(_read_function(p, normalize_bdf(p.name)) for p in paths)


def _sysfs_dir(root: str | Path | None) -> Path:
    """The directory that is /sys: ``root`` itself, or ``root/sys`` when it holds one."""
    if root is None:
        return Path("/sys")
    base = Path(root)
    return base / "sys" if (base / "sys" / "devices").is_dir() else base


def read_host(root: str | Path | None = None) -> HostFacts:
    """The CPUs and PCI functions of the host whose sysfs is ``root`` (see the module
    docstring; the live ``/sys`` by default)."""
    sysfs = _sysfs_dir(root)
    present, online, cpus, nodes = _read_cpus(sysfs)
    bad = sorted(c for c in online if c >= MAX_CPUS)
    if bad:
        raise SysfsError(f"CPU {bad[0]} is beyond the {MAX_CPUS} CPUs a policy can name")
    return HostFacts(sysfs, present, online, cpus, _read_functions(sysfs), nodes)
