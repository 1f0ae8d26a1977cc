"""``acpi guest``: an SSDT giving a VM's guest the TPH ``_DSM`` with its *virtual* tags.

QEMU declares the guest's host bridge as ``\\_SB.PCI0`` on q35 and i440fx
(hw/i386/acpi-build.c) with no ``_DSM`` of its own (it has ``_OSC`` and the helper ``EDSM``),
so an SSDT may add one through ``Scope (\\_SB.PCI0)``; the gpex host bridge of arm ``virt``
and ``microvm`` has a ``_DSM`` already, and a second one fails to load (``--guest-dsdt``
checks that before a guest ever boots). QEMU gives vCPU ``i`` ACPI processor UID ``i``
(``_UID`` in hw/acpi/cpu.c, "ACPI Processor ID" in the MADT of hw/i386/acpi-common.c), so
the answer for UID ``i`` is vCPU ``i``'s virtual tag, which is ``i`` at both widths
(docs/policy.md), valid where ``policy explain`` gives vCPU ``i`` a host tag. Any other UID
gets 0 valid bits.

QEMU's DSDT has revision 1, which makes every AML integer 32 bits wide in the guest, so the
8-byte answers are written as buffers, never built from integers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..layouts import TPH_ST_INFO
from ..policy import DeviceSettings, Policy, TagRules
from ..spec import TagWidth
from .dsm import PCI_DSM_GUID, TPH_DSM_REVISION, TPH_ST_FUNCTION
from .errors import AcpiError
from .tools import DEFAULT_TIMEOUT, find_tool, run_tool

__all__ = ["QEMU_HOST_BRIDGE", "GuestTag", "compile_asl", "guest_asl", "guest_tags"]

QEMU_HOST_BRIDGE = "\\_SB.PCI0"
OEM_ID = "TPHTRP"
OEM_TABLE_ID = "TPHTAGS"


@dataclass(frozen=True)
class GuestTag:
    """What the guest's _DSM answers for ACPI processor UID ``uid`` (= vCPU index)."""

    uid: int
    host_cpu: int
    st8: int | None  # the virtual tag at 8 bits, None: not valid
    st16: int | None

    @property
    def raw(self) -> int:
        return TPH_ST_INFO.encode(
            vm_st_valid=int(self.st8 is not None),
            vm_st=self.st8 or 0,
            vm_xst_valid=int(self.st16 is not None),
            vm_xst=self.st16 or 0,
        )


def guest_tags(policy: Policy, vm_name: str) -> list[GuestTag]:
    """Per vCPU, its virtual tags: valid exactly where the policy translates them."""
    vm = policy.vms.get(vm_name)
    if vm is None:
        known = ", ".join(policy.vms) or "none"
        raise AcpiError(f"VM {vm_name!r} is not in {policy.source} (its VMs: {known})")
    if vm.vcpus is None:
        raise AcpiError(
            f"VM {vm_name!r} in {policy.source} has no vcpus: its guest writes host tags, which "
            "a guest must not learn; give it vcpus (translation, docs/policy.md) to have "
            "virtual tags to report"
        )
    rules = TagRules.build(policy.host, vm, DeviceSettings(bdf="-"))  # as `policy explain`
    assert rules.translate is not None
    out = []
    for i, cpu in enumerate(vm.vcpus):
        ok8 = rules.translate[TagWidth.ST8][i] is not None
        ok16 = rules.translate[TagWidth.ST16][i] is not None
        out.append(GuestTag(i, cpu, i if ok8 else None, i if ok16 else None))
    return out


def _aml_path(path: str) -> str:
    if not path.startswith("\\") or any(not seg for seg in path[1:].split(".")):
        raise AcpiError(f"{path!r}: not an absolute ACPI path like \\_SB.PCI0")
    for seg in path[1:].split("."):
        if not (1 <= len(seg) <= 4 and seg[0] in "_ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
            raise AcpiError(f"{path!r}: {seg!r} is not an ACPI name segment")
        if any(c not in "_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" for c in seg):
            raise AcpiError(f"{path!r}: {seg!r} is not an ACPI name segment")
    return path


def _buffer(raw: int) -> str:
    return "Buffer (0x08) { " + ", ".join(f"0x{b:02X}" for b in raw.to_bytes(8, "little")) + " }"


def _tag_comment(t: GuestTag) -> str:
    if t.st8 is None and t.st16 is None:
        return f"UID {t.uid}: vCPU {t.uid} (CPU {t.host_cpu}) has no allowed tag"
    widths = [f"{w}-bit" for w, v in (("8", t.st8), ("16", t.st16)) if v is not None]
    return f"UID {t.uid}: vCPU {t.uid} (CPU {t.host_cpu}), tag {t.uid} at {' and '.join(widths)}"


def guest_asl(policy: Policy, vm_name: str, bridges: Sequence[str] = (QEMU_HOST_BRIDGE,)) -> str:
    """The ASL source of the VM's SSDT."""
    tags = guest_tags(policy, vm_name)
    paths = [_aml_path(b) for b in dict.fromkeys(bridges)]
    entries = "\n".join(
        f"        {_buffer(t.raw)}{',' if i < len(tags) - 1 else ' '}  /* {_tag_comment(t)} */"
        for i, t in enumerate(tags)
    )
    mask = (1 | 1 << TPH_ST_FUNCTION).to_bytes(2, "little")
    externals = "\n".join(f"    External ({p}, DeviceObj)" for p in paths)
    scopes = "\n\n".join(
        f"    Scope ({p})\n    {{\n"
        "        Method (_DSM, 4, Serialized)  // PCI firmware _DSM: TPH steering tags only\n"
        "        {\n"
        "            Return (\\TPHD (Arg0, Arg1, Arg2, Arg3))\n"
        "        }\n"
        "    }"
        for p in paths
    )
    return f"""\
/*
 * Steering tags for the guest of VM '{vm_name}' ({policy.source}), made by tphtrap acpi guest.
 *
 * PCI firmware _DSM {PCI_DSM_GUID}, revision {TPH_DSM_REVISION}, function {TPH_ST_FUNCTION:#x}
 * (Query Cache Locality TPH Features), the one Linux's pcie_tph_get_cpu_st evaluates on the
 * host bridge. It answers, for ACPI processor UID i (QEMU's UID of vCPU i), vCPU i's virtual
 * tag i at 8 and 16 bits wherever the policy translates it, and 0 valid bits for any other
 * UID. Load it with QEMU's -acpitable file=FILE.aml.
 */
DefinitionBlock ("", "SSDT", 2, "{OEM_ID}", "{OEM_TABLE_ID}", 0x00000001)
{{
{externals}

    /* The 8-byte answer per ACPI processor UID: bit 0 8-bit tag valid, bit 1 16-bit tag
       valid, bits 15:8 the 8-bit tag, bits 31:16 the 16-bit tag (volatile memory). */
    Name (\\TPHT, Package ({len(tags):#04x})
    {{
{entries}
    }})

    Method (\\TPHD, 4, Serialized)
    {{
        If ((Arg0 == ToUUID ("{PCI_DSM_GUID.lower()}")))
        {{
            If ((Arg1 >= {TPH_DSM_REVISION:#04x}))
            {{
                If ((Arg2 == Zero))
                {{
                    // functions 0 and {TPH_ST_FUNCTION:#x}
                    Return (Buffer (0x02) {{ 0x{mask[0]:02X}, 0x{mask[1]:02X} }})
                }}

                If ((Arg2 == {TPH_ST_FUNCTION:#04x}))
                {{
                    Return (\\TPHQ (Arg3))
                }}
            }}
        }}

        Return (Buffer (One) {{ 0x00 }})
    }}

    /* Function {TPH_ST_FUNCTION:#x}: Arg0 is {{feature, ACPI processor UID, properties}}. */
    Method (\\TPHQ, 1, Serialized)
    {{
        Local0 = Buffer (0x08) {{}}
        If ((ObjectType (Arg0) != 0x04))
        {{
            Return (Local0)
        }}

        If ((SizeOf (Arg0) < 0x02))
        {{
            Return (Local0)
        }}

        If ((DerefOf (Arg0 [Zero]) != Zero))  // only feature 0, processor cache
        {{
            Return (Local0)
        }}

        Local1 = DerefOf (Arg0 [One])
        If ((Local1 < SizeOf (\\TPHT)))
        {{
            Return (DerefOf (\\TPHT [Local1]))
        }}

        Return (Local0)
    }}

{scopes}
}}
"""


def compile_asl(asl: str, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Compile ASL source with ``iasl``; the AML bytes."""
    exe = find_tool("iasl")
    with tempfile.TemporaryDirectory(prefix="tphtrap-asl-") as tmp:
        src = Path(tmp) / "ssdt.asl"
        src.write_text(asl, encoding="ascii")
        run = run_tool(
            [exe, "-p", str(Path(tmp) / "ssdt"), str(src)],
            what="compiling the guest SSDT",
            timeout=timeout,
            cwd=Path(tmp),
        )
        aml = Path(tmp) / "ssdt.aml"
        if run.returncode != 0 or not aml.is_file():
            errors = [ln.strip() for ln in run.output.splitlines() if "Error" in ln]
            raise AcpiError(
                f"iasl could not compile the guest SSDT (this is a bug): "
                f"{'; '.join(errors[:3]) or run.output.strip()[-300:]}"
            )
        return aml.read_bytes()
