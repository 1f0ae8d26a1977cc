"""The JSON Schema of policy files, for editors (YAML language server) and CI validators.

The schema describes the shape of a policy: keys, types, ranges, the spellings of cpulists, VM
names and PCI addresses. It cannot express the cross-checks (tag ownership, CPUs without tags,
shared CPUs, devices in two VMs); ``tphtrap policy check`` is the authority and a policy that
passes it always validates against this schema.

Editors read YAML 1.2, where mapping keys are strings and ``0x1f`` is an integer, so the schema
is written for that view: CPU-list and device keys are string patterns. A YAML 1.1 loader
(PyYAML) reads ``tph: off`` as false and ``0000:00:10.0`` as a base-60 float; no schema can see
the first, and device keys must be strings so that the second is refused rather than skipped
(docs/policy.md, "Which validators are safe").
"""

from __future__ import annotations

from typing import Any, Final

from .policy import OnViolation

__all__ = [
    "BDF_PATTERN",
    "CPULIST_PATTERN",
    "NAME_PATTERN",
    "SCHEMA_DRAFT",
    "policy_schema",
]

SCHEMA_DRAFT: Final = "http://json-schema.org/draft-07/schema#"

_REGION = r"[0-9]+(-[0-9]+(:[0-9]+/[0-9]+)?)?"
#: A Linux cpulist as the loader accepts it (see ``parse_policy_cpulist``).
CPULIST_PATTERN: Final = rf"^\s*{_REGION}(\s*,\s*{_REGION})*\s*$"
#: ``[DDDD:]BB:DD.F`` with a device number 0-1f.
BDF_PATTERN: Final = r"^([0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{1,2}:[01]?[0-9a-fA-F]\.[0-7]$"
#: VM names.
NAME_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"

_MAX_CPU: Final = 8191


def _tag(bits: int) -> dict[str, Any]:
    return {
        "type": ["integer", "null"],
        "minimum": 0,
        "maximum": (1 << bits) - 1,
        "description": (
            f"The {bits}-bit steering tag the platform firmware reports for these CPUs (volatile "
            "memory; ACPI _DSM, as Linux pcie_tph_get_cpu_st reads it), or null when it reports "
            "no valid tag."
        ),
    }


def _on_violation() -> dict[str, Any]:
    return {
        "enum": [v.value for v in OnViolation],
        "description": (
            "What happens to a write of a steering tag the VM may not use: drop (the write never "
            "reaches the device), rewrite (the fallback tag is written instead), disable (TPH "
            "Requester Enable is forced off for the device until its next reset)."
        ),
    }


def _fallback_cpu(scope: str) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 0,
        "maximum": _MAX_CPU,
        "description": (
            f"With on_violation: rewrite, the host CPU whose tag replaces a refused tag ({scope}). "
            "Must be one of the VM's cpus and its tag must be allowed for the VM. Default: the "
            "first of the VM's CPUs whose tag is allowed."
        ),
    }


def policy_schema() -> dict[str, Any]:
    """The JSON Schema (draft-07) of a version 1 policy file."""
    cpulist: dict[str, Any] = {
        "anyOf": [
            {"type": "string", "pattern": CPULIST_PATTERN},
            {"type": "integer", "minimum": 0, "maximum": _MAX_CPU},
        ],
        "description": "Host CPUs in Linux cpulist syntax: 0-3,8 or 0-7:1/2 (0,2,4,6).",
        "examples": ["0-3", "0-3,8-11"],
    }
    flags: dict[str, Any] = {
        "tph": {
            "type": "boolean",
            "default": True,
            "description": "false: TPH Requester Enable is always kept off.",
        },
        "extended_tph": {
            "type": "boolean",
            "default": True,
            "description": "false: Extended TPH (16-bit tags) is always downgraded to TPH only.",
        },
    }
    device: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "description": "Settings for one device; each can only restrict the VM's own.",
        "properties": {
            **flags,
            "on_violation": _on_violation(),
            "fallback_cpu": _fallback_cpu("for this device"),
        },
    }
    vm: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["cpus"],
        "properties": {
            "cpus": {
                **cpulist,
                "description": (
                    "The host CPUs this VM may steer to. A tag is allowed for the VM only if every "
                    "CPU that owns it is in this list (or the tag is neutral)."
                ),
            },
            "vcpus": {
                "type": "array",
                "minItems": 1,
                "maxItems": 256,
                "items": {"type": "integer", "minimum": 0, "maximum": _MAX_CPU},
                "description": (
                    "Optional vCPU pinning: vcpus[i] is the host CPU vCPU i runs on. With it, the "
                    "guest writes virtual tag i, which becomes the host tag of CPU vcpus[i]."
                ),
            },
            "on_violation": {**_on_violation(), "default": OnViolation.DROP.value},
            "fallback_cpu": _fallback_cpu("for every device of the VM"),
            "share_cpus_with": {
                "type": "array",
                "items": {"type": "string", "pattern": NAME_PATTERN},
                "description": (
                    "VMs allowed to share CPUs with this one; both VMs must list each other."
                ),
            },
            **flags,
            "devices": {
                "type": "object",
                "description": "PCI devices assigned to this VM, by address ([DDDD:]BB:DD.F).",
                # "type": a YAML 1.1 loader reads 0000:00:10.0 as a number: refuse, not skip it
                "propertyNames": {"type": "string", "pattern": BDF_PATTERN},
                "additionalProperties": {
                    "anyOf": [{"type": "null"}, {"$ref": "#/definitions/device"}]
                },
            },
        },
    }
    return {
        "$schema": SCHEMA_DRAFT,
        "title": "tphtrap policy",
        "description": (
            "One host's TPH steering-tag policy: the tags its firmware reports per CPU, and what "
            "each VM may use. See docs/policy.md; check with 'tphtrap policy check'."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "host", "vms"],
        "definitions": {"device": device, "vm": vm},
        "properties": {
            "version": {"const": 1, "description": "Policy format version (1)."},
            "host": {
                "type": "object",
                "additionalProperties": False,
                "required": ["steering_tags"],
                "properties": {
                    "steering_tags": {
                        "type": "object",
                        "description": (
                            "Host CPUs (a cpulist key) -> the steering tags the platform reports "
                            "for them. CPUs sharing a cache may share a tag."
                        ),
                        "propertyNames": {"pattern": CPULIST_PATTERN},
                        "additionalProperties": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["st8", "st16"],
                            "properties": {"st8": _tag(8), "st16": _tag(16)},
                        },
                    },
                    "neutral_tags": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 0xFFFF},
                        "description": (
                            "Tags the platform treats as 'no particular CPU': allowed to every "
                            "VM. A tag above 0xff is neutral only with Extended TPH."
                        ),
                    },
                },
            },
            "vms": {
                "type": "object",
                "description": "The VMs, by name.",
                "propertyNames": {"pattern": NAME_PATTERN},
                "additionalProperties": {"$ref": "#/definitions/vm"},
            },
        },
    }
