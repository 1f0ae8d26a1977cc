"""Checking a guest SSDT against the guest's own DSDT, offline, with acpiexec.

Both tables are loaded into one namespace, as the guest kernel loads them: a conflict (a
``_DSM`` the DSDT already defines, a host bridge it lacks) shows as an ACPI error while
loading. Then the ``_DSM`` is evaluated the way Linux evaluates it, function 0 and function
0xF for every vCPU's UID and for UIDs that are not the VM's, and each answer must be exactly
the virtual tags the policy gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .acpiexec import evaluate_commands
from .dsm import TPH_ST_FUNCTION, dsm_command, function_mask, offers_tph
from .errors import AcpiError
from .guest import GuestTag

__all__ = ["GuestCheck", "check_guest_tables"]


@dataclass(frozen=True)
class GuestCheck:
    bridges: tuple[str, ...]
    uids_checked: int
    answers: dict[tuple[str, int], bytes]  # (bridge, UID) -> the 8 bytes returned


def check_guest_tables(
    dsdt: Path,
    ssdt: Path,
    expected: Sequence[GuestTag],
    bridges: Sequence[str],
    *,
    extra_uids: Sequence[int] = (),
    timeout: float,
) -> GuestCheck:
    """Load ``dsdt`` and ``ssdt``; AcpiError unless every answer is the expected one."""
    outside = list(extra_uids) or [len(expected), len(expected) + 1, 0xFF]
    uids = [t.uid for t in expected] + [u for u in outside if u >= len(expected)]
    commands = [dsm_command(b, 0) for b in bridges]
    commands += [dsm_command(b, TPH_ST_FUNCTION, u) for b in bridges for u in uids]
    session, evals = evaluate_commands(
        [dsdt, ssdt], commands, what=f"checking {ssdt.name} against {dsdt.name}", timeout=timeout
    )
    load_errors = session.init.acpi_errors
    if load_errors:
        exists = [e for e in load_errors if "AE_ALREADY_EXISTS" in e]
        if exists:
            raise AcpiError(
                f"{ssdt.name} does not load over {dsdt.name}: {exists[0]} (the guest's host "
                "bridge already has a _DSM, as QEMU's gpex host bridge of arm virt and "
                "microvm does; an SSDT cannot replace it)"
            )
        raise AcpiError(f"{ssdt.name} does not load cleanly over {dsdt.name}: {load_errors[0]}")
    want = {t.uid: t.raw.to_bytes(8, "little") for t in expected}
    answers: dict[tuple[str, int], bytes] = {}
    for b, ev in zip(bridges, evals[: len(bridges)], strict=True):
        if not ev.ok or not offers_tph(function_mask(ev.value)):
            raise AcpiError(
                f"{b}._DSM function 0 over {dsdt.name} returned "
                f"{ev.status or ev.value!r}, which does not offer function {TPH_ST_FUNCTION:#x}"
            )
    rest = evals[len(bridges) :]
    for i, ev in enumerate(rest):
        b, uid = bridges[i // len(uids)], uids[i % len(uids)]
        got = ev.value if ev.ok else None
        expect = want.get(uid, bytes(8))
        if got != expect:
            raise AcpiError(
                f"{b}._DSM function {TPH_ST_FUNCTION:#x} for UID {uid} returned "
                f"{got.hex() if isinstance(got, bytes) else ev.status or got!r}, expected "
                f"{expect.hex()}"
            )
        answers[(b, uid)] = expect
    return GuestCheck(tuple(bridges), len(uids), answers)
