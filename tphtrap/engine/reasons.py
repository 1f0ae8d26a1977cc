"""Every reason code a decision can carry, with its meaning and the verdicts it goes with.

This table is the single source: docs/protocol.md lists it, and a test checks that every code
the engine, the server and the wire can emit is here.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "BENIGN",
    "REASONS",
    "VIOLATIONS",
    "Reason",
    "describe_reason",
    "summarize",
]


class Reason(NamedTuple):
    text: str
    verdicts: str  # the verdicts a decision whose main reason this is can have
    violation: bool = False  # the guest asked for something the policy forbids


REASONS: dict[str, Reason] = {
    # accesses that went through as the guest asked
    "not-tph": Reason(
        "outside the TPH capability and MSI-X steering tags: passed", "pass rewrite drop"
    ),
    "control-granted": Reason("TPH control write allowed as requested", "pass rewrite drop"),
    "tph-disabled": Reason("TPH Requester Enable cleared as requested", "pass rewrite drop"),
    "tag-allowed": Reason("steering tag allowed for this VM", "pass rewrite drop"),
    "tph-unchanged": Reason(
        "host backend: a write of TPH bytes that changes nothing on the device (the guest's "
        "other bytes go through)",
        "rewrite drop",
    ),
    "tph-virtualized": Reason("TPH register read served from the guest's own view", "rewrite"),
    # the device got something else than the guest asked for
    "tag-translated": Reason(
        "virtual steering tag translated to the host tag of the pinned CPU", "rewrite drop"
    ),
    "tag-fallback": Reason(
        "ST entry the guest never wrote gets the VM's fallback tag", "rewrite drop"
    ),
    "entries-corrected": Reason(
        "ST entries re-resolved for the tag width and mode being enabled", "rewrite"
    ),
    "ext-downgraded": Reason(
        "Extended TPH not granted (device or VM lacks 16-bit tags): TPH only", "rewrite"
    ),
    "reserved-bits": Reason("reserved bits keep the device's value", "rewrite drop"),
    "read-only": Reason("read-only register of the TPH capability", "rewrite drop"),
    "beyond-st-table": Reason(
        "past the end of the ST table inside the TPH capability", "rewrite drop"
    ),
    "msix-sub-dword": Reason(
        "partial Vector Control write completed to the whole dword", "rewrite drop"
    ),
    # violations: the guest asked for a tag or an enable the policy forbids
    "foreign-tag": Reason(
        "steering tag not allowed for this VM (owned by a CPU outside its set)",
        "rewrite drop pass",
        True,
    ),
    "unknown-virtual-tag": Reason(
        "virtual steering tag names no vCPU with an allowed host tag", "rewrite drop pass", True
    ),
    "no-st-tag-foreign": Reason(
        "No ST mode emits tag 0, which is not allowed for this VM", "rewrite drop", True
    ),
    "enable-refused": Reason(
        "enable refused: an ST entry cannot be given an allowed tag at this width",
        "rewrite drop",
        True,
    ),
    "tph-forced-off": Reason(
        "TPH Requester Enable forced off after a steering-tag violation", "rewrite drop", True
    ),
    "tph-latched-off": Reason(
        "TPH stays off for this device until reset (earlier violation)", "rewrite drop", True
    ),
    # refusals that are not the guest's fault: the device or the policy forbids TPH
    "req-enable-reserved": Reason(
        "Requester Enable 2 is a reserved encoding: kept disabled", "rewrite drop"
    ),
    "mode-reserved": Reason("ST Mode Select 3..7 is reserved: kept disabled", "rewrite drop"),
    "mode-unsupported": Reason(
        "ST mode not supported by the device: kept disabled", "rewrite drop"
    ),
    "device-specific-mode": Reason(
        "Device Specific mode uses tags no hypervisor can trap: kept disabled", "rewrite drop"
    ),
    "no-st-table": Reason(
        "device has no standard ST table: TPH must stay disabled in a VM", "rewrite drop"
    ),
    "st-table-invalid": Reason(
        "the ST table is larger than PCIe allows or runs past config space: TPH kept disabled",
        "rewrite drop",
    ),
    "cap-overlap": Reason(
        "the TPH capability overlaps another capability: TPH kept disabled", "rewrite drop"
    ),
    "multiple-tph-caps": Reason(
        "more than one TPH Requester capability: every one kept disabled", "rewrite drop"
    ),
    "msix-state-unknown": Reason(
        "an MSI-X Vector Control word the guest never wrote cannot be rewritten safely: "
        "TPH kept disabled until the guest writes it",
        "rewrite drop",
    ),
    "tph-forbidden": Reason("policy forbids TPH for this device", "rewrite drop"),
    # the host backend: what the host kernel allows
    "host-width": Reason(
        "the host kernel chooses the request type (Extended TPH only with device support and a "
        "root port completing it): enabled at its width, the tags resolved at that width",
        "rewrite drop",
    ),
    "host-no-tph": Reason(
        "the host kernel refuses to enable TPH on this device (the root port completes no "
        "TPH): kept disabled",
        "rewrite drop",
    ),
    "host-width-forbidden": Reason(
        "the host kernel would enable Extended TPH, which this VM may not use (no 16-bit tags, "
        "or extended_tph: false): kept disabled",
        "rewrite drop",
    ),
    "host-entries-unsafe": Reason(
        "the host kernel sets ST entries only while TPH is enabled, and the device holds an "
        "entry that is unknown or not an allowed tag: Interrupt Vector mode kept disabled",
        "rewrite drop",
    ),
    "host-vectors": Reason(
        "the host's MSI-X vectors changed: steering tags (re)applied where the host has a vector",
        "pass rewrite",
    ),
    "host-op-failed": Reason(
        "a host operation failed: tphtrap follows the host's state, TPH stays off until the "
        "device is reset or attached again (an MSI-X vector the host lacks waits for it)",
        "pass rewrite drop",
    ),
    "host-state-unknown": Reason(
        "a host result names no operation of the device's last decision: the host's state is "
        "unknown, TPH disabled and the device frozen until re-attached",
        "rewrite drop",
    ),
    # lifecycle
    "reset": Reason(
        "device reset: TPH control and steering tags back to power-on state", "pass rewrite"
    ),
    "attached": Reason("device attached", "pass rewrite"),
    "attach-disabled-tph": Reason(
        "TPH was enabled in the snapshot: disabled until the guest enables it", "rewrite"
    ),
    "detached": Reason("device detached", "pass"),
    "policy-reloaded": Reason("state re-checked against the reloaded policy", "pass rewrite"),
    "device-revoked": Reason(
        "the policy no longer assigns this device to this VM: TPH off until re-attached",
        "rewrite drop",
    ),
    # failures: fail closed
    "unknown-vm": Reason("no such VM in the policy", "drop"),
    "unknown-device": Reason("device not attached for this VM", "drop"),
    "bad-access": Reason("malformed access (offset, width or value out of range)", "drop"),
    "internal-error": Reason(
        "internal error, or an audit line that could not be written: access dropped; when it "
        "struck a device's decision, TPH disabled and the device frozen until re-attached",
        "rewrite drop",
    ),
    "unsafe-plan": Reason(
        "the engine's self-check refused its own plan (a bug): TPH disabled, device frozen "
        "until re-attached",
        "rewrite drop",
    ),
}

#: reasons that describe an access that went through as the guest asked
BENIGN = frozenset(code for code, r in REASONS.items() if r.verdicts.startswith("pass"))
VIOLATIONS = frozenset(code for code, r in REASONS.items() if r.violation)


def describe_reason(code: str) -> str:
    r = REASONS.get(code)
    return r.text if r is not None else code


# reasons (as collected) -> (distinct reasons, main reason, detail text, is a violation)
_SUMMARY: dict[tuple[str, ...], tuple[tuple[str, ...], str, str, bool]] = {}


def summarize(reasons: tuple[str, ...]) -> tuple[tuple[str, ...], str, str, bool]:
    """Distinct reasons in order, the main one (the first violation, else the first that is
    not benign), its text, and whether any is a violation."""
    got = _SUMMARY.get(reasons)
    if got is None:
        uniq = tuple(dict.fromkeys(reasons)) or ("not-tph",)
        main = next(
            (r for r in uniq if r in VIOLATIONS),
            next((r for r in uniq if r not in BENIGN), uniq[0]),
        )
        text = "; ".join(describe_reason(r) for r in uniq if r not in BENIGN or r == main)
        got = (uniq, main, text, any(r in VIOLATIONS for r in uniq))
        if len(_SUMMARY) < 4096:
            _SUMMARY[reasons] = got
    return got
