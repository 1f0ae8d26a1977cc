"""``tphtrap policy check --tables DIR``: warnings where a policy's tags are not the firmware's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from acpi_fixtures import Bridge, Firmware, MadtCpu, require_acpica, st_info
from helpers import TPHTRAP


@pytest.fixture(autouse=True)
def acpica() -> None:
    require_acpica()


CPUS = [MadtCpu(n, n) for n in range(4)]
TAGS = {0: st_info(1, 0x101), 1: st_info(1, 0x101), 2: st_info(2, 0x202), 3: st_info(2, 0x202)}


def check(tmp_path: Path, policy: str, bridge: Bridge | None = None, *extra: str):
    tables = Firmware([bridge or Bridge.with_tags("PC00", TAGS)], CPUS).write(tmp_path / "t")
    path = tmp_path / "p.yaml"
    path.write_text(policy)
    r = subprocess.run(
        [str(TPHTRAP), "policy", "check", str(path), "--tables", str(tables), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r, path


GOOD = """\
version: 1
host:
  steering_tags:
    0-1: {st8: 0x01, st16: 0x0101}
    2-3: {st8: 0x02, st16: 0x0202}
vms:
  a: {cpus: 0-1, devices: {3b:00.0: {}}}
"""


def test_policy_with_the_firmwares_tags_is_clean(tmp_path: Path) -> None:
    r, path = check(tmp_path, GOOD)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == f"{path}: ok\n"


def test_made_up_tags_and_unknown_cpus_are_warned_at_their_key(tmp_path: Path) -> None:
    policy = GOOD.replace("2-3: {st8: 0x02, st16: 0x0202}", "2-5: {st8: 0x02, st16: 0x0303}")
    r, path = check(tmp_path, policy)
    assert r.returncode == 0  # warnings only
    assert r.stdout.splitlines() == [
        f"{path}:5:5: warning: CPUs 4-5: the firmware's tables give no trusted answer for them "
        f"({tmp_path / 't'}) (cpu-unknown-to-firmware)",
        f"{path}:5:5: warning: CPUs 2-3: the policy gives {{st8: 0x02, st16: 0x0303}}, the "
        "firmware reports {st8: 0x02, st16: 0x0202} (tphtrap acpi host) (tags-not-from-firmware)",
        f"{path}: ok (2 warnings)",
    ]
    r, _ = check(tmp_path, policy, None, "--strict", "--json")
    assert r.returncode == 1
    rules = [p["rule"] for p in json.loads(r.stdout)["files"][0]["problems"]]
    assert rules == ["cpu-unknown-to-firmware", "tags-not-from-firmware"]  # position, rule


def test_firmware_without_tags_makes_every_tag_made_up(tmp_path: Path) -> None:
    bridge = Bridge("PC00", {}, function0="Buffer (One) { 0x21 }")
    r, path = check(tmp_path, GOOD, bridge)
    assert r.returncode == 0
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"{path}:3:3: warning: this firmware reports no steering tags")
    assert first.endswith(
        "every tag in this policy is made up ("
        + str(tmp_path / "t")
        + ") (firmware-reports-no-tags)"
    )


def test_broken_tables_are_an_error_not_a_clean_report(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    r = subprocess.run(
        [str(TPHTRAP), "policy", "check", str(path), "--tables", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "ok" not in r.stdout
    assert "not a directory of ACPI tables" in r.stderr
