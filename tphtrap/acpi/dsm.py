"""The PCI firmware ``_DSM`` that reports steering tags, as Linux ``drivers/pci/tph.c`` calls it.

GUID E5C937D0-3553-4D7A-9117-EA4D19C3434D, revision 7, function 0xF ("Query Cache Locality
TPH Features") with the package {0 (feature: processor cache), ACPI processor UID, 0}, on the
ACPI device of the host bridge. Linux first asks function 0 (``acpi_check_dsm``) and calls
0xF only when the returned bit mask has bit 0 and bit 0xF set. Function 0xF must return a
buffer; Linux reads its first 8 bytes as the u64 declared as ``TPH_ST_INFO`` in layouts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..layouts import TPH_ST_INFO
from .acpiexec import AmlValue

__all__ = [
    "PCI_DSM_GUID",
    "TPH_DSM_REVISION",
    "TPH_ST_FUNCTION",
    "StInfo",
    "decode_st_info",
    "dsm_command",
    "function_mask",
    "offers_tph",
]

PCI_DSM_GUID = "E5C937D0-3553-4D7A-9117-EA4D19C3434D"
TPH_DSM_REVISION = 7
TPH_ST_FUNCTION = 0xF
TPH_FEATURE_PROCESSOR_CACHE = 0


def _guid_arg() -> str:
    """The GUID as acpiexec's buffer argument, in the byte order ToUUID() stores it."""
    return f"({uuid.UUID(PCI_DSM_GUID).bytes_le.hex()})"


def dsm_command(bridge: str, function: int, uid: int | None = None) -> str:
    """The acpiexec command evaluating ``bridge._DSM`` as Linux does."""
    # acpiexec reads bare numbers as hex (prefixed here to be plain); "[ ]" is the empty
    # package Linux passes with function 0 ("[]" would pass no Arg3 at all).
    pkg = f"[{TPH_FEATURE_PROCESSOR_CACHE} {uid:#x} 0]" if uid is not None else "[ ]"
    return f"evaluate {bridge}._DSM {_guid_arg()} {TPH_DSM_REVISION} {function:#x} {pkg}"


def function_mask(value: AmlValue | None) -> int | None:
    """Function 0's answer as Linux's ``acpi_check_dsm`` reads it; None if not a mask."""
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        return int.from_bytes(value[:8], "little")
    return None


def offers_tph(mask: int | None) -> bool:
    bits = 1 | (1 << TPH_ST_FUNCTION)
    return mask is not None and mask & bits == bits


def describe_mask(mask: int | None) -> str:
    if mask is None:
        return "no function mask"
    funcs = [str(i) if i < 10 else hex(i) for i in range(64) if mask >> i & 1]
    return f"{mask:#x} (functions {', '.join(funcs) or 'none'})"


@dataclass(frozen=True)
class StInfo:
    """One CPU's answer: the tags for volatile (vm_*) and persistent (pm_*) memory."""

    raw: int
    st8: int | None  # vm_st when vm_st_valid
    st16: int | None  # vm_xst when vm_xst_valid
    ph_ignore: bool
    pm_st8: int | None
    pm_st16: int | None


def decode_st_info(raw: int) -> StInfo:
    f = TPH_ST_INFO.decode(raw)
    return StInfo(
        raw=raw,
        st8=f["vm_st"] if f["vm_st_valid"] else None,
        st16=f["vm_xst"] if f["vm_xst_valid"] else None,
        ph_ignore=bool(f["vm_ph_ignore"]),
        pm_st8=f["pm_st"] if f["pm_st_valid"] else None,
        pm_st16=f["pm_xst"] if f["pm_xst_valid"] else None,
    )


def st_info_answer(value: AmlValue | None) -> tuple[StInfo | None, str | None]:
    """Function 0xF's answer as Linux reads it: (tags, None) or (None, why it is unusable)."""
    if isinstance(value, bytes):
        if len(value) < 8:
            return None, (
                f"returned a {len(value)}-byte buffer; Linux reads 8 bytes, so the tags are "
                "whatever memory follows it"
            )
        return decode_st_info(int.from_bytes(value[:8], "little")), None
    if value is None:
        return None, "returned nothing; Linux uses tag 0"
    kind = type(value).__name__ if not isinstance(value, int) else "an integer"
    return None, f"returned {kind}, not a buffer; Linux ignores it and uses tag 0"
