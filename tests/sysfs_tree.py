"""Small fake sysfs trees (``ROOT/sys/...``) for ``--sysfs ROOT``, built from facts.

The CPU files follow Linux's sysfs ABI (``Documentation/ABI/stable/sysfs-devices-system-cpu``):
``online``/``present`` cpulists, ``cpuN/topology/{physical_package_id,core_id,
thread_siblings_list}``, ``cpuN/cache/indexN/{level,type,shared_cpu_list,id}`` and
``node/nodeN/cpulist``. Numbering is Intel's usual one: core ``c`` of socket ``s`` is CPU
``s * cores + c``, its SMT sibling that plus ``sockets * cores``.

PCI functions live where the kernel puts them, ``devices/pciDDDD:BB/<root port>/<function>``,
with the ``bus/pci/devices/<bdf>`` symlinks; each ``config`` is built by
:func:`tphtrap.synth.build_config` from the facts of the project's register reference (never
copied from a dump): a Broadcom BCM57508-like NIC with Interrupt Vector and Device Specific
modes and its ST table in the MSI-X table, an E810-like function with Device Specific mode only
(no table), an NVMe drive without TPH, a conventional PCI function (256 bytes), and root ports
that complete TPH and Extended TPH, TPH only, or no TPH.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tphtrap.policy import format_cpulist
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, _patch, build_config

__all__ = ["Function", "bcm_nic", "build_tree", "ds_only", "no_tph", "root_port", "two_socket"]

PCI_EXP_TYPE_ROOT_PORT = 0x4


@dataclass(frozen=True)
class Function:
    bdf: str
    config: bytes
    port: str | None  # BDF of the root port above it (under host bridge pciDDDD:BB of it)
    completer: int = 3  # the root port's TPH Completer (Device Capabilities 2 bits 13:12)


def bcm_nic() -> bytes:
    """IV + DS (+ No ST), ST table in MSI-X, 16-bit tags: Broadcom BCM574xx per the facts."""
    return build_config(
        vendor_id=0x14E4,
        device_id=0x1750,
        revision=0x11,
        tph=TphSpec(
            no_st=True,
            interrupt_vector=True,
            device_specific=True,
            extended=True,
            location=StLocation.MSIX,
            table_size=74,
        ),
        msix=MsixSpec(table_size=74, bir=4, table_offset=0x0, pba_bir=4, pba_offset=0x2000),
    )


def ds_only() -> bytes:
    """Device Specific mode only, no ST table: Intel E810/X710 per the facts."""
    return build_config(
        tph=TphSpec(
            no_st=False,
            interrupt_vector=False,
            device_specific=True,
            location=StLocation.NONE,
            table_size=1,
        ),
        msix=MsixSpec(table_size=16),
    )


def no_tph() -> bytes:
    return build_config(
        vendor_id=0x144D,
        device_id=0xA808,
        class_code=0x010802,
        tph=None,
        msix=MsixSpec(table_size=32),
    )


def conventional() -> bytes:
    return build_config(vendor_id=0x8086, device_id=0x7000, class_code=0x060100, tph=None, size=256)


def root_port(completer: int = 3, device_id: int = 0x2030) -> bytes:
    """A PCIe root port (type 1 header); ``completer`` is its DevCap2 TPH Completer field:
    3 TPH and Extended TPH, 1 TPH only (Skylake-E 8086:2032), 0 none (8086:1901)."""
    cfg = build_config(
        vendor_id=0x8086, device_id=device_id, class_code=0x060400, tph=None, msix=None
    )
    cfg = _patch(cfg, 0x0E, 1, 0x01)  # header type 1 (bridge)
    cfg = _patch(cfg, 0xA0 + 0x24, 4, completer << 12)  # DevCap2 (build_config puts 3 there)
    return _patch(cfg, 0xA0 + 2, 2, 0x0002 | (PCI_EXP_TYPE_ROOT_PORT << 4))


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text + "\n")


def _cpus(root: Path, sockets: int, cores: int, smt: int, offline: frozenset[int]) -> None:
    base = root / "sys" / "devices" / "system" / "cpu"
    per_socket = sockets * cores
    n = per_socket * smt
    online = frozenset(range(n)) - offline
    _write(base / "present", format_cpulist(range(n)))
    _write(base / "possible", format_cpulist(range(n)))
    _write(base / "online", format_cpulist(online))
    _write(base / "offline", format_cpulist(offline))
    for s in range(sockets):
        socket_cpus = [t * per_socket + s * cores + c for t in range(smt) for c in range(cores)]
        _write(
            root / "sys/devices/system/node" / f"node{s}" / "cpulist", format_cpulist(socket_cpus)
        )
        for t in range(smt):
            for c in range(cores):
                cpu = t * per_socket + s * cores + c
                d = base / f"cpu{cpu}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"node{s}").mkdir(exist_ok=True)
                if cpu in offline:
                    continue  # Linux removes topology and cache of an offline CPU
                siblings = [u * per_socket + s * cores + c for u in range(smt)]
                _write(d / "topology/physical_package_id", str(s))
                _write(d / "topology/core_id", str(c))
                _write(d / "topology/thread_siblings_list", format_cpulist(siblings))
                for i, (level, kind, shared) in enumerate(
                    [
                        (1, "Data", siblings),
                        (1, "Instruction", siblings),
                        (2, "Unified", siblings),
                        (3, "Unified", socket_cpus),
                    ]
                ):
                    idx = d / "cache" / f"index{i}"
                    _write(idx / "level", str(level))
                    _write(idx / "type", kind)
                    _write(idx / "shared_cpu_list", format_cpulist(shared))
                    _write(idx / "id", str(s if level == 3 else c))


def _functions(root: Path, functions: list[Function]) -> None:
    devices = root / "sys" / "devices"
    links = root / "sys" / "bus" / "pci" / "devices"
    links.mkdir(parents=True, exist_ok=True)
    ports = {f.port: f.completer for f in functions if f.port}
    for fn in functions:
        if fn.bdf in ports:
            continue
        dom, bus = fn.bdf.split(":")[:2]
        if fn.port is None:
            where = devices / f"pci{dom}:{bus}" / fn.bdf
        else:
            pdom, pbus = fn.port.split(":")[:2]
            where = devices / f"pci{pdom}:{pbus}" / fn.port / fn.bdf
        _write(where / "config", fn.config)
        os.symlink(os.path.relpath(where, links), links / fn.bdf)
    for port, completer in sorted(ports.items()):
        pdom, pbus = port.split(":")[:2]
        where = devices / f"pci{pdom}:{pbus}" / port
        _write(
            where / "config", root_port(completer, {0: 0x1901, 1: 0x2032}.get(completer, 0x2030))
        )
        os.symlink(os.path.relpath(where, links), links / port)


def build_tree(
    root: Path,
    *,
    sockets: int,
    cores: int,
    smt: int,
    functions: list[Function],
    offline: frozenset[int] = frozenset(),
) -> Path:
    _cpus(root, sockets, cores, smt, offline)
    _functions(root, functions)
    return root


def two_socket(root: Path, **kw: object) -> Path:
    """The host of the realistic example: 2 sockets x 24 cores with SMT (96 CPUs), one L3 per
    socket; a 4-function TPH NIC (5e:00.0-3), a Device-Specific-only NIC (af:00.0), the same
    NIC below a root port that completes TPH only (d8:00.0) and below one that completes no
    TPH (17:00.0), an NVMe drive without TPH (3b:00.0) and a conventional PCI function
    (00:1f.0)."""
    nic = bcm_nic()
    functions = [
        *(Function(f"0000:5e:00.{i}", nic, "0000:5d:00.0") for i in range(4)),
        Function("0000:af:00.0", ds_only(), "0000:ae:00.0"),
        Function("0000:d8:00.0", nic, "0000:d7:00.0", completer=1),
        Function("0000:17:00.0", nic, "0000:16:00.0", completer=0),
        Function("0000:3b:00.0", no_tph(), "0000:3a:00.0"),
        Function("0000:00:1f.0", conventional(), None),
    ]
    return build_tree(root, sockets=2, cores=24, smt=2, functions=functions, **kw)  # type: ignore[arg-type]


if __name__ == "__main__":  # .venv/bin/python tests/sysfs_tree.py DIR (docs/policy.md)
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/sysfs_tree.py DIR  (builds the 2-socket example host there)")
    print(two_socket(Path(sys.argv[1])))
