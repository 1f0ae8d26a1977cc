"""A real guest boots in Debian's QEMU (TCG) with the SSDT of ``tphtrap acpi guest``.

Run by ``make integration`` (about a minute; it fetches a Debian kernel package once into
.cache/guest/). Inside the guest, /init (acpi_guest_init.sh) prints dmesg and dumps the
guest's ACPI tables to the console; on the host, the check requires that the tables loaded
without any ACPI error, that the table the guest saw is the one passed with -acpitable, and
then evaluates the _DSM with acpiexec over QEMU's real DSDT: the method resolves on QEMU's
host bridge object, conflicts with nothing QEMU defines, and answers every vCPU's virtual
tag, also through ``tphtrap acpi host`` run on the guest's own tables.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, TPHTRAP

pytestmark = pytest.mark.skipif(
    os.environ.get("TPHTRAP_INTEGRATION") != "1",
    reason="boots a QEMU guest (about a minute): run 'make integration'",
)

GUEST = REPO / "tools" / "guest"
POLICY = REPO / "policies" / "translation.yaml"
VM = "web"  # 4 vCPUs
BOOT_LIMIT = 300  # seconds; a TCG boot takes about 20 on 2 cores
ACPI_TROUBLE = re.compile(r"ACPI (BIOS )?(Error|Exception|Warning)|AE_ALREADY_EXISTS|AE_NOT_FOUND")


def sh(*argv: str | Path, timeout: float = 600) -> str:
    r = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sh(GUEST / "kernel.sh")  # fetch once, before any boot is timed
    out = tmp_path_factory.mktemp("initrd") / "initrd.cpio.gz"
    sh(GUEST / "initramfs.sh", Path(__file__).with_name("acpi_guest_init.sh"), out)
    return out


def boot(initrd: Path, machine: str, ssdt: Path, cpus: int) -> tuple[str, float]:
    start = time.monotonic()
    console = sh(
        GUEST / "boot.sh",
        "-m",
        machine,
        "-c",
        str(cpus),
        "-t",
        str(BOOT_LIMIT),
        initrd,
        "--",
        "-acpitable",
        f"file={ssdt}",
        timeout=BOOT_LIMIT + 30,
    )
    return console, time.monotonic() - start


def between(console: str, begin: str, end: str) -> str:
    m = re.search(f"{re.escape(begin)}\\r?\\n(.*?){re.escape(end)}", console, re.S)
    assert m is not None, f"no {begin} ... {end} on the console:\n{console[-3000:]}"
    return m[1]


def dumped_tables(console: str, into: Path) -> dict[str, Path]:
    into.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, body in re.findall(
        r"TPHTRAP-TABLE-BEGIN (\S+)\r?\n(.*?)TPHTRAP-TABLE-END", console, re.S
    ):
        path = into / name
        path.write_bytes(base64.b64decode("".join(body.split())))
        out[name] = path
    return out


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_guest_loads_the_ssdt_and_answers_virtual_tags(
    initrd: Path, machine: str, tmp_path: Path
) -> None:
    ssdt = tmp_path / f"{VM}.aml"
    sh(TPHTRAP, "acpi", "guest", "--policy", POLICY, "--vm", VM, "-o", ssdt)
    console, took = boot(initrd, machine, ssdt, cpus=4)
    print(f"\n{machine}: guest booted, dumped its tables and powered off in {took:.1f} s")
    assert "TPHTRAP-DONE" in console

    dmesg = between(console, "TPHTRAP-DMESG-BEGIN", "TPHTRAP-DMESG-END")
    assert re.search(r"ACPI: SSDT 0x[0-9A-F]+ [0-9A-F]+ \(v02 TPHTRP TPHTAGS", dmesg), dmesg
    assert "ACPI: 2 ACPI AML tables successfully acquired and loaded" in dmesg
    trouble = [ln for ln in dmesg.splitlines() if ACPI_TROUBLE.search(ln)]
    assert not trouble, trouble
    hostbridge = re.search(r"TPHTRAP-HOSTBRIDGE (\S+)", console)
    assert hostbridge is not None and hostbridge[1] == "\\_SB_.PCI0"

    tables = dumped_tables(console, tmp_path / "guest-tables")
    assert {"DSDT", "APIC"} <= set(tables) and "SSDT" in "".join(tables)
    ours = [
        p for n, p in tables.items() if n.startswith("SSDT") and p.read_bytes() == ssdt.read_bytes()
    ]
    assert ours, "the guest's SSDT is the table passed with -acpitable"

    # acpiexec over QEMU's real DSDT and the SSDT: loads cleanly, answers every UID.
    r = subprocess.run(
        [
            str(TPHTRAP),
            "acpi",
            "guest",
            "--policy",
            str(POLICY),
            "--vm",
            VM,
            "-o",
            str(tmp_path / "again.aml"),
            "--guest-dsdt",
            str(tables["DSDT"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "loads cleanly; \\_SB.PCI0 answer the expected tags for 7 UIDs" in r.stderr

    # The guest's own tables seen as a host: its MADT's UIDs meet the SSDT's answers.
    only = tmp_path / "guest-view"
    only.mkdir()
    for name in ("DSDT", "APIC", ours[0].name):
        (only / name).write_bytes(tables[name].read_bytes())
    r = subprocess.run(
        [str(TPHTRAP), "acpi", "host", "--tables", str(only), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["steering_tags"] == {str(i): {"st8": i, "st16": i} for i in range(4)}
    assert [b["path"] for b in view["host_bridges"]] == ["\\_SB.PCI0"]
