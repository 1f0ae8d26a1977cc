"""``tphtrap inspect``: decode a device's config space for a hypervisor integrator.

It answers: where is the TPH Requester capability, what does it support, where is the ST table
and what is in it, where is the MSI-X table, and can the device be given to a VM with TPH
trapped (a standard ST table exists) or must TPH be forced off.

Registers are decoded with the ``construct`` layouts (:meth:`tphtrap.layouts.Register.decode`);
this is not a hot path. The ``--json`` document is described field by field in
``docs/inspect.md``; :data:`SCHEMA` names its version.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .device import (
    COMPLETER_TEXT,
    PCI_STD_HEADER_SIZEOF,
    ConfigSpace,
    RootPortCheck,
    check_root_port,
    load_device,
    load_devices,
    sysfs_device_dir,
    sysfs_functions,
)
from .errors import DeviceError, UsageError
from .layouts import (
    MSIX_FLAGS,
    MSIX_TABLE_BIR,
    PCI_STATUS_REG,
    PCIE_FLAGS,
    TPH_CAP,
    TPH_CTRL,
    TPH_ST_ENTRY,
)
from .spec import (
    PCI_EXP_FLAGS,
    PCI_STATUS,
    PcieType,
    ReqEnable,
    StLocation,
    StMode,
    TphCompleter,
)

__all__ = ["SCHEMA", "add_parser", "describe", "host_table", "render", "run", "verdict"]

SCHEMA = "tphtrap.inspect/1"

LOCATION_NAMES = {
    StLocation.NONE: "none",
    StLocation.CAP: "cap",
    StLocation.MSIX: "msix",
    StLocation.RESERVED: "reserved",
}
LOCATION_TEXT = {
    StLocation.NONE: "none (no ST table)",
    StLocation.CAP: "in the TPH capability",
    StLocation.MSIX: "in the MSI-X table (Vector Control bits 31:16)",
    StLocation.RESERVED: "reserved encoding 3",
}
ST_MODE_NAMES = {
    StMode.NO_ST: "no-st",
    StMode.INT_VEC: "interrupt-vector",
    StMode.DEV_SPEC: "device-specific",
}
ST_MODE_TEXT = {
    StMode.NO_ST: "No ST",
    StMode.INT_VEC: "Interrupt Vector",
    StMode.DEV_SPEC: "Device Specific",
}
REQ_NAMES = {
    ReqEnable.DISABLED: "disabled",
    ReqEnable.TPH: "tph",
    ReqEnable.RESERVED: "reserved",
    ReqEnable.EXT_TPH: "extended-tph",
}
REQ_TEXT = {
    ReqEnable.DISABLED: "disabled",
    ReqEnable.TPH: "TPH only (8-bit tags)",
    ReqEnable.RESERVED: "reserved encoding 2",
    ReqEnable.EXT_TPH: "TPH and Extended TPH (16-bit tags)",
}
COMPLETER_NAMES = {
    TphCompleter.NONE: "none",
    TphCompleter.TPH: "tph",
    TphCompleter.RESERVED: "reserved",
    TphCompleter.EXT_TPH: "extended-tph",
}
# Device/Port Type: (JSON name, text as lspci prints it).
PCIE_TYPE_NAMES = {
    PcieType.ENDPOINT: ("endpoint", "Endpoint"),
    PcieType.LEG_END: ("legacy-endpoint", "Legacy Endpoint"),
    PcieType.ROOT_PORT: ("root-port", "Root Port"),
    PcieType.UPSTREAM: ("upstream-port", "Upstream Port"),
    PcieType.DOWNSTREAM: ("downstream-port", "Downstream Port"),
    PcieType.PCI_BRIDGE: ("pcie-to-pci-bridge", "PCI-Express to PCI/PCI-X Bridge"),
    PcieType.PCIE_BRIDGE: ("pci-to-pcie-bridge", "PCI/PCI-X to PCI-Express Bridge"),
    PcieType.RC_END: ("rc-integrated-endpoint", "Root Complex Integrated Endpoint"),
    PcieType.RC_EC: ("rc-event-collector", "Root Complex Event Collector"),
}
# Base class and subclass (class code bits 23:8), as lspci names them.
CLASS_NAMES = {
    0x0000: "Non-VGA unclassified device",
    0x0100: "SCSI storage controller",
    0x0106: "SATA controller",
    0x0107: "Serial Attached SCSI controller",
    0x0108: "Non-Volatile memory controller",
    0x0180: "Mass storage controller",
    0x0200: "Ethernet controller",
    0x0207: "Infiniband controller",
    0x0280: "Network controller",
    0x0300: "VGA compatible controller",
    0x0302: "3D controller",
    0x0401: "Multimedia audio controller",
    0x0403: "Audio device",
    0x0500: "RAM memory",
    0x0600: "Host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0680: "Bridge",
    0x0700: "Serial controller",
    0x0780: "Communication controller",
    0x0805: "SD Host controller",
    0x0806: "IOMMU",
    0x0880: "System peripheral",
    0x0B40: "Co-processor",
    0x0C03: "USB controller",
    0x0C05: "SMBus",
    0x1101: "Performance counters",
    0x1180: "Signal processing controller",
    0x1200: "Processing accelerators",
    0xFFFF: "Unassigned class",
}


# --- the document -------------------------------------------------------------------------
def describe(cfg: ConfigSpace, root: RootPortCheck | None = None) -> dict[str, Any]:
    """The ``inspect --json`` document for one device (see docs/inspect.md).

    ``root`` is the root port check of a sysfs device (None: not checked, e.g. a dump file).
    """
    return {
        "schema": SCHEMA,
        "source": cfg.source,
        "bdf": cfg.bdf,
        "vendor_id": cfg.vendor_id,
        "device_id": cfg.device_id,
        "revision": cfg.revision,
        "class_code": cfg.class_code,
        "class_name": CLASS_NAMES.get(cfg.class_code >> 8),
        "config_size": cfg.size,
        "ext_visible": cfg.ext_visible,
        "capabilities": [
            {
                "kind": c.kind,
                "id": c.cap_id,
                "name": c.name,
                "offset": c.offset,
                "length": c.length,
                "end": c.end,
                "version": c.version if c.kind == "ext" else None,
            }
            for c in cfg.caps
        ],
        "pcie": _pcie_doc(cfg),
        "root_port": _root_port_doc(root),
        "tph": _tph_doc(cfg),
        "msix": _msix_doc(cfg),
        "verdict": verdict(cfg, root),
        "warnings": list(cfg.warnings),
    }


def _pcie_type_name(kind: int, text: bool = False) -> str:
    try:
        return PCIE_TYPE_NAMES[PcieType(kind)][text]
    except ValueError:
        return f"reserved type {kind}" if text else "reserved"


def _pcie_doc(cfg: ConfigSpace) -> dict[str, Any] | None:
    cap = cfg.pcie
    kind = cfg.pcie_type
    completer = cfg.tph_completer
    if cap is None or kind is None or completer is None:
        return None
    return {
        "offset": cap.offset,
        "version": PCIE_FLAGS["capability_version"].get(cfg.u16(cap.offset + PCI_EXP_FLAGS)),
        "type": kind,
        "type_name": _pcie_type_name(kind),
        "tph_completer": int(completer),
        "tph_completer_name": COMPLETER_NAMES[completer],
    }


def _root_port_doc(root: RootPortCheck | None) -> dict[str, Any] | None:
    if root is None:
        return None
    completer = root.completer
    return {
        "kind": root.kind,
        "bdf": root.port.bdf if root.port is not None else None,
        "completer": int(completer) if completer is not None else None,
        "completer_name": COMPLETER_NAMES[completer] if completer is not None else None,
        "summary": root.summary,
    }


def _tph_doc(cfg: ConfigSpace) -> dict[str, Any] | None:
    tph = cfg.tph
    if tph is None:
        return None
    cap = TPH_CAP.decode(tph.cap_raw)
    ctrl = TPH_CTRL.decode(tph.ctrl_raw)
    location = StLocation(cap["st_table_location"])
    size = cap["st_table_size"] + 1
    in_cap = location is StLocation.CAP
    mode = ctrl["st_mode_select"]
    req = ReqEnable(ctrl["tph_requester_enable"])
    return {
        "offset": tph.offset,
        "version": tph.version,
        "length": tph.length,
        "region_length": tph.region_length,
        "cap_raw": tph.cap_raw,
        "ctrl_raw": tph.ctrl_raw,
        "modes": {
            "no_st": bool(cap["no_st_mode"]),
            "interrupt_vector": bool(cap["interrupt_vector_mode"]),
            "device_specific": bool(cap["device_specific_mode"]),
        },
        "extended_tph": bool(cap["extended_tph_requester"]),
        "st_table": {
            "location": LOCATION_NAMES[location],
            "size": size,
            "size_field": cap["st_table_size"],
            "offset": tph.table_offset if in_cap else None,
            "end": tph.table_offset + 2 * size if in_cap else None,
            "entries": list(tph.entries) if in_cap and tph.table_ok else None,
            "ok": tph.table_ok,
        },
        "control": {
            "st_mode": mode,
            "st_mode_name": _st_mode_name(mode),
            "requester_enable": int(req),
            "requester_enable_name": REQ_NAMES[req],
            "enabled": req is not ReqEnable.DISABLED,
            "reserved_bits": tph.ctrl_raw & TPH_CTRL.reserved_mask,
        },
        "cap_reserved_bits": tph.cap_raw & TPH_CAP.reserved_mask,
        "problems": list(tph.problems),
    }


def _st_mode_name(mode: int) -> str:
    try:
        return ST_MODE_NAMES[StMode(mode)]
    except ValueError:
        return "reserved"


def _msix_doc(cfg: ConfigSpace) -> dict[str, Any] | None:
    msix = cfg.msix
    if msix is None:
        return None
    flags = MSIX_FLAGS.decode(msix.flags_raw)
    table = MSIX_TABLE_BIR.decode(msix.table_raw)
    pba = MSIX_TABLE_BIR.decode(msix.pba_raw)
    size = flags["table_size"] + 1
    return {
        "offset": msix.offset,
        "flags_raw": msix.flags_raw,
        "table_size": size,
        "table_bir": table["bir"],
        "table_offset": table["offset_qw"] << 3,
        "table_bytes": size * 16,
        "pba_bir": pba["bir"],
        "pba_offset": pba["offset_qw"] << 3,
        "enabled": bool(flags["msix_enable"]),
        "function_mask": bool(flags["function_mask"]),
    }


def verdict(cfg: ConfigSpace, root: RootPortCheck | None = None) -> dict[str, Any]:
    """Can the device be given to a VM with TPH trapped, or must TPH be forced off?

    ``status`` is ``trappable``, ``force-off`` (TPH present but untrappable, or Linux cannot
    enable it under the root port ``root`` names), ``no-tph`` (no TPH Requester capability, or
    no PCI Express capability at all) or ``unknown`` (the snapshot cannot show it).
    """
    notes: list[str] = []
    tph = cfg.tph
    no_pcie = _no_pcie_reason(cfg)
    if no_pcie is not None:
        return _verdict("no-tph", False, no_pcie, notes)
    if not cfg.ext_visible:
        if cfg.vendor_id == 0xFFFF:
            reason = "config space reads all ones, so TPH presence is unknown"
        elif cfg.size == PCI_STD_HEADER_SIZEOF:
            reason = (
                "the 64-byte config space holds no capabilities, so TPH presence is unknown "
                "(take a 4096-byte snapshot: lspci -xxxx as root, or the sysfs config file as "
                "root)"
            )
        else:
            reason = (
                f"the {cfg.size}-byte config space hides the extended capabilities, so TPH "
                "presence is unknown (take a 4096-byte snapshot: lspci -xxxx as root, or the "
                "sysfs config file)"
            )
        return _verdict("unknown", False, reason, notes)
    if tph is None:
        return _verdict("no-tph", False, "no TPH Requester capability: nothing to trap", notes)
    if not tph.table_ok:
        if tph.location is StLocation.NONE:
            only_ds = tph.device_specific_mode and not tph.interrupt_vector_mode
            reason = (
                "no standard ST table (location none)"
                + (": the device supports Device Specific mode only" if only_ds else "")
                + "; its tags would come from device-specific means no hypervisor traps"
            )
        elif tph.location is StLocation.RESERVED:
            reason = "the ST table location is the reserved encoding 3"
        else:
            reason = "; ".join(tph.problems) or "the ST table cannot be trusted"
        return _verdict("force-off", False, reason, notes)
    refused = _completer_refusal(root)
    if refused is not None:
        return _verdict("force-off", False, refused, notes)
    if tph.location is StLocation.CAP:
        end = tph.table_offset + 2 * tph.table_size
        where = (
            f"in the TPH capability, {tph.table_size} entr{'y' if tph.table_size == 1 else 'ies'}"
            f" at {tph.table_offset:#x}-{end - 1:#x}"
        )
    else:
        assert cfg.msix is not None  # table_ok with location MSI-X implies an MSI-X capability
        m = cfg.msix
        where = (
            f"in the MSI-X table, {m.table_size} vectors in BAR {m.table_bir} at "
            f"{m.table_offset:#x}-{m.table_offset + m.table_bytes - 1:#x}"
        )
    if tph.device_specific_mode:
        notes.append(
            "Device Specific mode is supported: it must stay disabled in the VM "
            "(its tags cannot be trapped)"
        )
    if not tph.interrupt_vector_mode:
        notes.append("Interrupt Vector mode is not supported: only No ST mode can be granted")
    if tph.enabled:
        mode = tph.st_mode_known
        mode_text = ST_MODE_TEXT[mode] if mode is not None else f"reserved {tph.st_mode}"
        notes.append(
            f"TPH was already enabled in the snapshot ({mode_text} mode, requester "
            f"{REQ_TEXT[tph.req_enable]}): disable it before the VM gets the device"
        )
    notes.extend(_completer_notes(tph.extended_tph, root))
    notes.extend(tph.problems)
    return _verdict("trappable", True, f"standard ST table {where}", notes)


def _no_pcie_reason(cfg: ConfigSpace) -> str | None:
    """Why the function cannot have TPH at all (no PCI Express capability), or None when it
    has one or the snapshot cannot tell (a 64-byte one with a capabilities list)."""
    if cfg.vendor_id == 0xFFFF or cfg.pcie is not None:
        return None
    if not PCI_STATUS_REG["capabilities_list"].get(cfg.u16(PCI_STATUS)):
        return (
            "no capabilities at all (Status bit 4 clear): no PCI Express capability, so no "
            "TPH possible"
        )
    if cfg.size == PCI_STD_HEADER_SIZEOF:
        return None
    return "no PCI Express capability (a conventional PCI function), so no TPH possible"


def _completer_refusal(root: RootPortCheck | None) -> str | None:
    """Why Linux cannot enable TPH at all under the root port ``root`` found, or None."""
    if root is None or root.kind in ("integrated", "unknown"):
        return None
    if root.kind == "missing":
        return (
            "no root port above the function: Linux takes TPH Completer 0 and refuses to "
            "enable TPH (pcie_enable_tph)"
        )
    if root.completer is TphCompleter.NONE:
        return (
            f"{root.summary}: Linux refuses to enable TPH below it (Device Capabilities 2 "
            "bits 13:12 = 0)"
        )
    if root.completer is TphCompleter.RESERVED:
        return f"{root.summary}: the request type Linux derives from it is reserved"
    return None


def _completer_notes(extended: bool, root: RootPortCheck | None) -> list[str]:
    """What a trappable device should still know about the root port above it."""
    if root is None:
        return [
            "root port TPH Completer not checked: the source is not a sysfs device (inspect "
            "the device on its host, or run inspect --host there)"
        ]
    if root.kind == "integrated":
        return [f"{root.summary}"]
    if root.kind == "unknown":
        return [f"{root.summary}; whether Linux can enable TPH is unknown"]
    if extended and root.completer is TphCompleter.TPH:
        return [
            f"{root.summary}: Linux caps the device at TPH only (8-bit tags); Extended TPH "
            "cannot be enabled"
        ]
    return []


def _verdict(status: str, trappable: bool, reason: str, notes: list[str]) -> dict[str, Any]:
    return {"status": status, "trappable": trappable, "reason": reason, "notes": notes}


# --- human output -------------------------------------------------------------------------
def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _range(start: int, end: int | None) -> str:
    if end is None:
        return f"{start:#05x}-?    "
    return f"{start:#05x}-{end - 1:#05x}"


def render(cfg: ConfigSpace, root: RootPortCheck | None = None) -> str:
    """The human-readable inspect block for one device (``root``: as for :func:`describe`)."""
    doc = describe(cfg, root)
    out: list[str] = []
    cls = doc["class_name"] or "PCI device"
    out.append(
        f"{cfg.bdf or '(address unknown)'}  {cfg.vendor_id:04x}:{cfg.device_id:04x}  {cls} "
        f"(class {cfg.class_code:06x}, rev {cfg.revision:02x})"
    )
    out.append(f"  source    {cfg.source} ({cfg.size} bytes of config space)")
    out.append("")
    out.append("Capabilities (bytes each owns in config space):")
    if not cfg.caps:
        out.append("  none found")
    for c in cfg.caps:
        ident = f"std {c.cap_id:#04x}" if c.kind == "std" else f"ext {c.cap_id:#06x} v{c.version}"
        out.append(f"  {_range(c.offset, c.end)}  {c.name:<30} ({ident})")
    out.append("")
    out.extend(_render_pcie(cfg, doc))
    out.append("")
    out.extend(_render_tph(cfg, doc))
    out.append("")
    out.extend(_render_msix(doc))
    out.append("")
    v = doc["verdict"]
    if v["status"] == "trappable":
        out.append(f"Verdict: trappable: yes ({v['reason']})")
    elif v["status"] == "no-tph":
        out.append(f"Verdict: {v['reason']}")
    else:
        out.append(f"Verdict: TPH must be forced off in a VM: {v['reason']}")
    for note in v["notes"]:
        out.append(f"  note: {note}")
    shown = set(cfg.tph.problems) if cfg.tph is not None else set()
    rest = [w for w in cfg.warnings if w not in shown]
    if rest:
        out.append("")
        out.append("Warnings:")
        out.extend(f"  - {w}" for w in rest)
    return "\n".join(out) + "\n"


def _render_pcie(cfg: ConfigSpace, doc: dict[str, Any]) -> list[str]:
    e = doc["pcie"]
    root = doc["root_port"]
    if e is None:
        if _no_pcie_reason(cfg) is not None:
            return ["PCI Express: not present (conventional PCI: no TPH possible)"]
        return ["PCI Express: unknown (capabilities not in this snapshot)"]
    completer = TphCompleter(e["tph_completer"])
    return [
        "PCI Express:",
        f"  type               {_pcie_type_name(e['type'], text=True)} (capability version "
        f"{e['version']} at {e['offset']:#x})",
        f"  TPH Completer      {COMPLETER_TEXT[completer]} (Device Capabilities 2 bits 13:12 = "
        f"{int(completer)})",
        f"  root port          {root['summary'] if root else _NOT_CHECKED}",
    ]


_NOT_CHECKED = "not checked (the source is not a sysfs device)"


def _render_tph(cfg: ConfigSpace, doc: dict[str, Any]) -> list[str]:
    t = doc["tph"]
    if t is None:
        if cfg.ext_visible:
            return ["TPH Requester: not present"]
        if doc["pcie"] is None and _no_pcie_reason(cfg) is not None:
            return ["TPH Requester: not possible (no PCI Express capability)"]
        return ["TPH Requester: unknown (extended capabilities not in this snapshot)"]
    st = t["st_table"]
    ctl = t["control"]
    modes = [
        name
        for key, name in (
            ("no_st", "No ST"),
            ("interrupt_vector", "Interrupt Vector"),
            ("device_specific", "Device Specific"),
        )
        if t["modes"][key]
    ]
    assert cfg.tph is not None
    loc = cfg.tph.location
    out = [
        "TPH Requester:",
        f"  offset             {t['offset']:#x} (version {t['version']}, {t['length']:#x} bytes; "
        f"a filter claims {t['offset']:#x}-{t['offset'] + t['region_length'] - 1:#x})",
        f"  capability         {t['cap_raw']:#010x}",
        f"  modes supported    {', '.join(modes) or 'none'}",
        f"  extended TPH       {_yes(t['extended_tph'])}",
    ]
    location = LOCATION_TEXT[loc]
    if st["offset"] is not None:
        location += f" at {st['offset']:#x}-{st['end'] - 1:#x}"
    out.append(f"  ST table           {location}")
    size_text = f"{st['size']} entr{'y' if st['size'] == 1 else 'ies'} (field {st['size_field']})"
    if loc is StLocation.MSIX:
        size_text += "; the tags are those of the MSI-X vectors"
    elif loc is not StLocation.CAP:
        size_text += "; unused without a table"
    out.append(f"  ST table size      {size_text}")
    mode = ctl["st_mode"]
    known = cfg.tph.st_mode_known
    mode_text = ST_MODE_TEXT[known] if known is not None else "reserved"
    req_text = REQ_TEXT[ReqEnable(ctl["requester_enable"])]
    out.append(
        f"  control            {t['ctrl_raw']:#010x}: ST mode {mode_text} ({mode}), "
        f"requester enable {req_text} ({ctl['requester_enable']})"
    )
    if t["cap_reserved_bits"] or ctl["reserved_bits"]:
        out.append(
            f"  reserved bits set  capability {t['cap_reserved_bits']:#010x}, "
            f"control {ctl['reserved_bits']:#010x}"
        )
    if st["entries"] is not None:
        width = 4 if t["extended_tph"] else 2
        out.append(
            "  ST table contents" + ("" if t["extended_tph"] else " (lower bytes; upper unused)")
        )
        entries: list[int] = st["entries"]
        for row in range(0, len(entries), 8):
            chunk = entries[row : row + 8]
            words = " ".join(_entry_text(e, width) for e in chunk)
            out.append(f"    [{row:02d}-{row + len(chunk) - 1:02d}]  {words}")
    for p in t["problems"]:
        out.append(f"  problem: {p}")
    return out


def _entry_text(raw: int, width: int) -> str:
    if width == 4:
        return f"{raw:04x}"
    lower = TPH_ST_ENTRY.decode(raw)["st_lower"]
    text = f"{lower:02x}"
    return text if raw == lower else f"{raw:04x}"


def _render_msix(doc: dict[str, Any]) -> list[str]:
    m = doc["msix"]
    if m is None:
        return ["MSI-X: not present"]
    end = m["table_offset"] + m["table_bytes"] - 1
    return [
        "MSI-X:",
        f"  offset             {m['offset']:#x}",
        f"  table              {m['table_size']} vectors in BAR {m['table_bir']} at "
        f"{m['table_offset']:#x}-{end:#x}",
        f"  PBA                BAR {m['pba_bir']} at {m['pba_offset']:#x}",
        f"  enabled            {_yes(m['enabled'])}, function mask {_yes(m['function_mask'])}",
    ]


# --- the host table -------------------------------------------------------------------------
HOST_COLUMNS = ("BDF", "ID", "NAME", "TPH", "ST TABLE", "ROOT PORT", "VERDICT")
STATUS_TEXT = {
    "trappable": "trappable",
    "force-off": "forced off",
    "no-tph": "no TPH",
    "unknown": "unknown",
}


def host_doc(path: Path) -> dict[str, Any]:
    """The document of one sysfs function, root port included; a function that cannot be
    read gives ``{schema, source, bdf, error}`` instead (the listing goes on)."""
    try:
        cfg = load_devices(path)[0]
    except DeviceError as exc:
        return {"schema": SCHEMA, "source": str(path), "bdf": path.name, "error": str(exc)}
    return describe(cfg, check_root_port(path, cfg) if cfg.pcie is not None else None)


def _host_row(doc: dict[str, Any]) -> tuple[str, ...]:
    if "error" in doc:
        return (doc["bdf"], "?", "?", "?", "?", "?", f"error: {doc['error']}")
    v = doc["verdict"]
    t = doc["tph"]
    known = v["status"] != "unknown"
    if t is not None:
        modes = [m for m, key in _MODE_ABBREV if t["modes"][key]]
        tph = " ".join(modes or ["none"]) + (" ext" if t["extended_tph"] else "")
        st = t["st_table"]
        table = st["location"] + (f" {st['size']}" if st["location"] in ("cap", "msix") else "")
    else:
        tph = table = "-" if known else "?"
    r = doc["root_port"]
    if r is None:
        port = "-" if known else "?"
    elif r["kind"] == "root-port":
        port = f"{r['bdf']} {r['completer_name'] or '?'}"
    else:
        port = {"integrated": "integrated", "missing": "none found"}.get(r["kind"], "?")
    name = doc["class_name"] or f"class {doc['class_code']:06x}"
    return (
        doc["bdf"] or "?",
        f"{doc['vendor_id']:04x}:{doc['device_id']:04x}",
        name,
        tph,
        table,
        port,
        f"{STATUS_TEXT[v['status']]}: {v['reason']}",
    )


_MODE_ABBREV = (("NS", "no_st"), ("IV", "interrupt_vector"), ("DS", "device_specific"))


def host_table(docs: list[dict[str, Any]]) -> str:
    """``inspect --host``: one line per function (the documents of :func:`host_doc`), then
    the count of each verdict."""
    rows = [HOST_COLUMNS, *(_host_row(d) for d in docs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HOST_COLUMNS) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]
    counts = {status: 0 for status in STATUS_TEXT}
    errors = 0
    for d in docs:
        if "error" in d:
            errors += 1
        else:
            counts[d["verdict"]["status"]] += 1
    summary = ", ".join(f"{n} {STATUS_TEXT[status]}" for status, n in counts.items())
    lines.append("")
    lines.append(
        f"{len(docs)} function{'s' if len(docs) != 1 else ''}: {summary}"
        + (f", {errors} unreadable" if errors else "")
    )
    short = sum(1 for d in docs if d.get("config_size") == PCI_STD_HEADER_SIZEOF)
    if short:
        lines.append(
            f"note: {short} function{'s' if short != 1 else ''} gave only 64 bytes of config "
            "space: run as root to see the capabilities"
        )
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------
EPILOG = """\
SOURCE is one of:
  an lspci dump      lspci -xxxx -s 3b:00.0 > nic.lspci   (one or many devices; -xxx and -x
                     dumps work but hide the extended capabilities, where TPH lives)
  a sysfs device     /sys/bus/pci/devices/0000:3b:00.0, or just 0000:3b:00.0 on this host
  a config file      /sys/bus/pci/devices/0000:3b:00.0/config, or a copy of it (binary)
  a hex file         the config space as hex digits (whitespace ignored)

examples:
  tphtrap inspect fixtures/devices/nic-st-in-cap.lspci
  tphtrap inspect fleet.lspci --bdf 0001:02:00.0
  tphtrap inspect fleet.lspci --all --json
  sudo tphtrap inspect /sys/bus/pci/devices/0000:3b:00.0 /sys/bus/pci/devices/0000:3b:00.1
  sudo tphtrap inspect --host
  tphtrap inspect --sysfs /srv/host7-sys --json

The verdict says whether the device can be given to a VM with TPH trapped (a standard ST
table exists and Linux can enable TPH under its root port) or whether TPH must be forced off.
For a sysfs device the root port above it is found and its TPH Completer field read.
Exit status: 0 when decoded, 1 on an unreadable or malformed source (one line naming the file
and dump line; with --host, when a function could not be read), 2 on a usage error.
"""


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "inspect",
        help="decode a device's TPH and MSI-X capabilities and say if TPH can be trapped",
        description=(
            "Decode a device's config space: capabilities and the bytes each owns, the PCI "
            "Express type and TPH Completer, the TPH Requester capability (modes, extended "
            "TPH, ST table location, size and contents, control register), the MSI-X table "
            "location, and whether TPH can be trapped safely in a VM or must be forced off. "
            "With --host: every PCI function of this host in one table."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="lspci dump, sysfs device or config, hex (one or more)",
    )
    p.add_argument(
        "--host",
        action="store_true",
        help="list every PCI function of this host (/sys) in one table",
    )
    p.add_argument(
        "--sysfs",
        metavar="ROOT",
        help="with --host: read a copy of sysfs at ROOT (copied with its links, cp -a) "
        "instead of /sys; implies --host",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--bdf", metavar="B", help="device to show when SOURCE holds several ([DDDD:]BB:DD.F)"
    )
    which.add_argument("--all", action="store_true", help="show every device in each SOURCE")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the machine-readable document (docs/inspect.md); a list with several "
        "devices, --all or --host",
    )
    p.set_defaults(func=run)


def _check_usage(args: argparse.Namespace) -> None:
    host = args.host or args.sysfs is not None
    if host and args.sources:
        raise UsageError("inspect: SOURCE and --host/--sysfs exclude each other")
    if host and (args.bdf or args.all):
        raise UsageError("inspect: --bdf and --all pick devices of a SOURCE, not of --host")
    if not host and not args.sources:
        raise UsageError("inspect: give a SOURCE, or --host for every function of this host")
    if args.bdf and len(args.sources) > 1:
        raise UsageError("inspect: --bdf picks a device of one SOURCE; with several use --all")


def run(args: argparse.Namespace) -> int:
    _check_usage(args)
    if args.host or args.sysfs is not None:
        docs = [host_doc(path) for path in sysfs_functions(args.sysfs or "/sys")]
        if args.json:
            sys.stdout.write(json.dumps(docs, indent=2) + "\n")
        else:
            sys.stdout.write(host_table(docs))
        return 1 if any("error" in d for d in docs) else 0
    shown: list[tuple[ConfigSpace, RootPortCheck | None]] = []
    for source in args.sources:
        devices = load_devices(source) if args.all else [load_device(source, args.bdf)]
        where = sysfs_device_dir(source)
        for cfg in devices:
            root = check_root_port(where, cfg) if where and cfg.pcie is not None else None
            shown.append((cfg, root))
    if args.json:
        docs = [describe(cfg, root) for cfg, root in shown]
        one = len(args.sources) == 1 and not args.all
        sys.stdout.write(json.dumps(docs[0] if one else docs, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(render(cfg, root) for cfg, root in shown))
    return 0
