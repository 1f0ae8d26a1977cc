"""Shared test helpers: fixture paths, the ``lspci`` oracle, the ``tphtrap`` executable."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tphtrap import serve
from tphtrap.device import ConfigSpace, normalize_bdf
from tphtrap.layouts import PCIE_FLAGS
from tphtrap.policy import Policy
from tphtrap.spec import PCI_EXP_FLAGS, PcieType

__all__ = [
    "DEVICES",
    "REPO",
    "TPHTRAP",
    "AuditSink",
    "BadCase",
    "LspciDevice",
    "bad_cases",
    "debian_packages",
    "good_lspci_fixtures",
    "lspci_vvv",
    "named_policies",
    "parse_lspci_vvv",
    "policy_name",
    "rciep_config",
    "require_lspci",
    "require_tool",
]

REPO = Path(__file__).resolve().parent.parent
DEVICES = REPO / "fixtures" / "devices"
TPHTRAP = REPO / ".venv" / "bin" / "tphtrap"


def good_lspci_fixtures() -> list[Path]:
    return sorted(DEVICES.glob("*.lspci"))


@dataclass(frozen=True)
class BadCase:
    path: Path
    line: int  # 0: a whole-file error, no line
    fragment: str


def bad_cases() -> list[BadCase]:
    """The malformed fixtures and the error each must give (``bad/EXPECTED.tsv``)."""
    out = []
    for raw in (DEVICES / "bad" / "EXPECTED.tsv").read_text().splitlines():
        if not raw or raw.startswith("#"):
            continue
        name, line, fragment = raw.split("\t")
        out.append(BadCase(DEVICES / "bad" / name, int(line), fragment))
    return out


def debian_packages() -> list[str]:
    """The packages of ``deps/debian-packages.txt`` (what ``tools/setup-debian`` installs)."""
    text = (REPO / "deps" / "debian-packages.txt").read_text()
    return [word for line in text.splitlines() for word in line.partition("#")[0].split()]


def require_tool(exe: str, package: str) -> str:
    """Path of ``exe``; a missing one fails the test with the command that installs it.

    ``package`` must be listed in ``deps/debian-packages.txt``, so the set-up step
    (``make deps``, run by ``make test`` and ``.ci/run``) provides it on a fresh machine.
    """
    assert package in debian_packages(), f"add {package} to deps/debian-packages.txt"
    found = shutil.which(exe)
    if found:
        return found
    pytest.fail(
        f"{exe} not found: it comes with the Debian package {package}; run `make deps` as "
        f"root, or: sudo apt-get install -y {package}",
        pytrace=False,
    )


def require_lspci() -> str:
    """Path of ``lspci``; a missing one fails the test unless TPHTRAP_SKIP_LSPCI=1."""
    found = shutil.which("lspci") or next(
        (p for p in ("/usr/bin/lspci", "/sbin/lspci", "/usr/sbin/lspci") if os.access(p, os.X_OK)),
        None,
    )
    if found:
        return found
    if os.environ.get("TPHTRAP_SKIP_LSPCI") == "1":
        pytest.skip("lspci not installed and TPHTRAP_SKIP_LSPCI=1")
    pytest.fail(
        "lspci (pciutils) is required for this test; run `make deps` as root, or: sudo "
        "apt-get install -y pciutils (or set TPHTRAP_SKIP_LSPCI=1)",
        pytrace=False,
    )


def lspci_vvv(path: Path, *extra: str) -> str:
    """``lspci -F PATH -vvv`` (reads a dump file, never the host)."""
    exe = require_lspci()
    res = subprocess.run(
        [exe, "-F", str(path), "-vvv", *extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return res.stdout


@dataclass
class LspciDevice:
    """What ``lspci -vvv`` printed about one device (pciutils ls-caps.c / ls-ecaps.c)."""

    cap_offsets: list[int] = field(default_factory=list)
    tph_offset: int | None = None
    tph_version: int | None = None
    tph_lines: list[str] = field(default_factory=list)
    msix: dict[str, int | bool] | None = None


_DEV = re.compile(r"^((?:[0-9a-f]{4,5}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) ")
_CAP = re.compile(r"^\tCapabilities: \[([0-9a-f]+)(?: v(\d+))?\] (.*)$")
_MSIX = re.compile(r"^MSI-X: Enable([+-]) Count=(\d+) Masked([+-])$")
_VEC = re.compile(r"^Vector table: BAR=(\d+) offset=([0-9a-f]{8})$")
_PBA = re.compile(r"^PBA: BAR=(\d+) offset=([0-9a-f]{8})$")


def parse_lspci_vvv(text: str) -> dict[str, LspciDevice]:
    devices: dict[str, LspciDevice] = {}
    cur: LspciDevice | None = None
    section = ""
    for line in text.splitlines():
        m = _DEV.match(line)
        if m:
            cur = devices.setdefault(normalize_bdf(m.group(1)), LspciDevice())
            section = ""
            continue
        if cur is None:
            continue
        m = _CAP.match(line)
        if m:
            off, ver, what = int(m.group(1), 16), m.group(2), m.group(3)
            cur.cap_offsets.append(off)
            section = ""
            if what.startswith("Transaction Processing Hints"):
                section = "tph"
                cur.tph_offset, cur.tph_version = off, int(ver or 0)
            mx = _MSIX.match(what)
            if mx:
                section = "msix"
                cur.msix = {
                    "enabled": mx.group(1) == "+",
                    "count": int(mx.group(2)),
                    "masked": mx.group(3) == "+",
                }
            continue
        if line.startswith("\t\t") and section:
            body = line.strip()
            if section == "tph":
                cur.tph_lines.append(body)
            elif section == "msix" and cur.msix is not None:
                for rx, key in ((_VEC, "table"), (_PBA, "pba")):
                    mv = rx.match(body)
                    if mv:
                        cur.msix[f"{key}_bar"] = int(mv.group(1))
                        cur.msix[f"{key}_offset"] = int(mv.group(2), 16)
        elif not line.startswith("\t\t"):
            section = ""
    return devices


class AuditSink:
    """A text stream that keeps what is written to it: an Auditor's stream in the tests."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, s: str) -> int:
        self.lines.append(s)
        return len(s)

    def flush(self) -> None:
        pass


# --- serve in process, as the stateful attackers drive it --------------------------------------
#: The machines' policies are Policy objects, many of which ``policy check`` would refuse for
#: reasons beside the point here (a VM owning no tag, say): the reload requests name them, and
#: serve's policy loader finds them here (any other name is read from its file as ever).
_POLICIES: dict[str, Policy] = {}


def policy_name(policy: Policy) -> str:
    name = f"<policy {len(_POLICIES)}>"
    _POLICIES[name] = policy
    return name


@contextmanager
def named_policies() -> Iterator[None]:
    real = serve._load_policy

    def load(path: str) -> Policy:
        return _POLICIES[path] if path in _POLICIES else real(path)

    serve._load_policy = load
    try:
        yield
    finally:
        serve._load_policy = real
        _POLICIES.clear()


def rciep_config(config: ConfigSpace) -> bytes:
    """``config`` as a root-complex integrated endpoint (what serve checks ``rciep`` by)."""
    cap = config.pcie
    assert cap is not None
    data = bytearray(config.data)
    at = cap.offset + PCI_EXP_FLAGS
    flags = PCIE_FLAGS["device_port_type"].put(config.u16(at), PcieType.RC_END)
    data[at : at + 2] = flags.to_bytes(2, "little")
    return bytes(data)
