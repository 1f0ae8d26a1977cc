"""``policy init`` and ``policy check --host/--libvirt`` on a fake 2-socket host and libvirt
domains; ``policy explain`` for every VM; ``check --json`` for CI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sysfs_tree import two_socket

from tphtrap.cli import main
from tphtrap.hostscan import read_host
from tphtrap.policyfile import check_against, check_policy_text, load_policy

REPO = Path(__file__).resolve().parent.parent
LIBVIRT = REPO / "fixtures" / "libvirt"
EXAMPLE = REPO / "policies" / "two-sockets-three-vms.yaml"
TAGS_FILE = REPO / "fixtures" / "host" / "two-socket-tags.yaml"


@pytest.fixture(scope="module")
def sysfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_socket(tmp_path_factory.mktemp("host"))


@pytest.fixture
def tags() -> Path:
    return TAGS_FILE


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def problems(out: str) -> list[tuple[str, str]]:
    """(rule, path) of each problem line of 'policy check' output."""
    found = re.findall(r"^\S+:\d+:\d+: (?:error|warning): .* \(([a-z0-9-]+)\)$", out, re.M)
    return found


def init(
    capsys: pytest.CaptureFixture[str], sysfs: Path, out: Path, *extra: str | Path
) -> tuple[int, str]:
    rc, stdout, err = run(
        capsys,
        "policy",
        "init",
        "--sysfs",
        sysfs,
        "--libvirt",
        LIBVIRT / "big.xml",
        LIBVIRT / "batch.xml",
        "-o",
        out,
        *extra,
    )
    assert stdout == ""
    return rc, err


# --- acceptance: init, then check against the host and the domains ------------------------------
def test_init_without_tags_is_refused_only_for_its_placeholders(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.yaml"
    rc, err = init(capsys, sysfs, out)
    assert rc == 0
    assert "tphtrap: 7 TPH devices under" in err
    assert "2 errors (2 steering_tags entries to fill in)" in err
    found = check_policy_text(out.read_text(), str(out))
    assert [p.rule for p in found] == ["tag-placeholder"] * 2
    assert found[0].message.startswith("st8 and st16 of CPUs 0-23,48-71 are still TODO")
    rc, stdout, _ = run(capsys, "policy", "check", out)
    assert rc == 1 and problems(stdout) == ["tag-placeholder"] * 2


def test_init_with_tags_passes_check_against_host_and_domains(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tags: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.yaml"
    rc, err = init(capsys, sysfs, out, "--tags", tags)
    assert rc == 0 and err.endswith(f"tphtrap: {out}: passes 'tphtrap policy check'\n")
    policy = load_policy(out)
    big, batch = policy.vms["big"], policy.vms["batch"]
    assert big.cpus == frozenset([*range(24), *range(48, 72)]) and big.vcpus is None
    assert set(big.devices) == {"0000:5e:00.0", "0000:5e:00.1"}
    assert batch.vcpus == (*range(24, 48), *range(72, 96))
    assert set(batch.devices) == {"0000:5e:00.3"}
    assert policy.host.steering_tags[95].st16 == 0x0202
    text = out.read_text()
    assert "# emulator threads on CPUs 0,48 (emulatorpin)" in text
    assert "not given to any VM below: 0000:17:00.0, 0000:5e:00.2, 0000:af:00.0," in text
    assert "#     root port 0000:5d:00.0: TPH Completer TPH and Extended TPH\n" in text
    assert "TPH forced off in a VM: root port 0000:16:00.0: TPH Completer none" in text
    rc, stdout, _ = run(
        capsys,
        "policy",
        "check",
        out,
        "--host",
        "--sysfs",
        sysfs,
        "--libvirt",
        LIBVIRT / "big.xml",
        LIBVIRT / "batch.xml",
    )
    assert (rc, stdout) == (0, f"{out}: ok\n")


def _edited(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (LIBVIRT / name).read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


def test_check_reports_the_drift_the_domains_introduce(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tags: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    init(capsys, sysfs, policy, "--tags", tags)
    batch = _edited(tmp_path, "batch.xml", "vcpu='3' cpuset='27'", "vcpu='3' cpuset='0'")
    big = _edited(
        tmp_path,
        "big.xml",
        "  </devices>",
        "    <hostdev mode='subsystem' type='pci'><source><address bus='0xaf' slot='0'/>"
        "</source></hostdev>\n  </devices>",
    )
    rc, stdout, _ = run(
        capsys, "policy", "check", policy, "--sysfs", sysfs, "--libvirt", big, batch
    )
    assert rc == 1
    lines = stdout.splitlines()
    assert problems(stdout) == ["hostdev-not-in-policy", "pinning-drift", "pinning-drift"]
    assert any(
        "vCPU 3 of domain 'batch' runs on CPU 0 (" in line
        and "but 0 is not in the cpus of VM 'batch' (24-47,72-95)" in line
        for line in lines
    )
    assert any("but vcpus[3] is 27: its virtual tag would steer to CPU 27" in x for x in lines)
    assert any(
        "domain 'big' is given PCI device 0000:af:00.0" in x and "refuses to attach it" in x
        for x in lines
    )


def test_check_against_the_host(sysfs: Path, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\n"
        "host:\n"
        "  steering_tags:\n"
        "    0-23,48-71: {st8: 0x01, st16: 0x0101}\n"
        "    24-47,72-99: {st8: 0x02, st16: 0x0202}\n"
        "vms:\n"
        "  a:\n"
        "    cpus: 24-47,72-99\n"
        "    devices:\n"
        "      0000:99:00.0: {}\n"
        "      0000:3b:00.0: {}\n"
        "      0000:af:00.0: {}\n"
        "      0000:5e:00.0: {}\n"
    )
    found = check_against(policy, read_host(sysfs))
    assert [(p.line, p.rule, p.level) for p in found] == [
        (5, "host-cpu-missing", "error"),
        (8, "host-cpu-missing", "error"),
        (10, "device-missing", "error"),
        (11, "device-without-tph", "warning"),
        (12, "device-tph-forced-off", "warning"),
    ]
    assert found[0].message.startswith("CPUs 96-99 are not on this host (this host has CPUs 0-95)")


def test_untagged_offline_and_foreign_domains(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sysfs = two_socket(tmp_path / "host", offline=frozenset({95}))
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nhost:\n  steering_tags:\n    24-47,72-95: {st8: 0x02, st16: 0x0202}\n"
        "vms:\n  batch:\n    cpus: 24-47,72-95\n    devices: {0000:5e:00.3: {}}\n"
    )
    rc, stdout, _ = run(
        capsys,
        "policy",
        "check",
        policy,
        "--sysfs",
        sysfs,
        "--libvirt",
        LIBVIRT / "big.xml",
        LIBVIRT / "batch.xml",
    )
    assert rc == 1
    assert problems(stdout) == ["host-cpu-untagged", "domain-not-in-policy", "host-cpu-offline"]
    assert "CPUs 0-23,48-71 of this host are not in host.steering_tags" in stdout
    assert "domain 'big' (" in stdout and "is not a VM of this policy" in stdout


def test_cpus_wider_than_the_pinning_and_its_caches_warn(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    text = EXAMPLE.read_text().replace(
        "    cpus: 24-47,72-95           # the whole of socket 1 (it runs on 24-31,72-79)\n"
        "    share_cpus_with: [web2]",
        "    cpus: 0-95\n    share_cpus_with: [web2, big]",
    )
    policy.write_text(text.replace("    on_violation: rewrite", "    share_cpus_with: [web1]"))
    rc, stdout, _ = run(capsys, "policy", "check", policy, "--libvirt", LIBVIRT / "web1.xml")
    assert rc == 0  # a warning
    assert "cpus-beyond-pinning" in problems(stdout)
    assert "CPUs 0-23,48-71 are in the cpus of VM 'web1', but no vCPU of domain 'web1'" in stdout


def test_the_realistic_example_matches_its_host_and_domains(
    capsys: pytest.CaptureFixture[str], sysfs: Path
) -> None:
    domains = [LIBVIRT / f"{n}.xml" for n in ("big", "web1", "web2")]
    rc, stdout, err = run(
        capsys, "policy", "check", EXAMPLE, "--sysfs", sysfs, "--libvirt", *domains
    )
    assert (rc, stdout, err) == (0, f"{EXAMPLE}: ok\n", "")


# --- init: inputs and output ------------------------------------------------------------------
def test_init_refuses_to_overwrite_without_force(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.yaml"
    out.write_text("mine\n")
    rc, _, err = run(capsys, "policy", "init", "--sysfs", sysfs, "-o", out)
    assert rc == 1 and err.endswith(f"tphtrap: error: {out} exists; use --force to overwrite it\n")
    assert out.read_text() == "mine\n"
    rc, _, _ = run(capsys, "policy", "init", "--sysfs", sysfs, "-o", out, "--force")
    assert rc == 0 and out.read_text().startswith("# A tphtrap policy")


def test_init_with_unpinned_vcpus_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], sysfs: Path
) -> None:
    rc, out, err = run(
        capsys, "policy", "init", "--sysfs", sysfs, "--libvirt", LIBVIRT / "unpinned.xml"
    )
    assert (rc, out) == (1, "")
    assert err.startswith(f"tphtrap: error: {LIBVIRT / 'unpinned.xml'}:6:3: domain 'unpinned'")
    assert "they may run on any host CPU, so no cpus can be derived" in err


def test_init_tags_file_problems_are_positioned(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "tags.yaml"
    bad.write_text("steering_tags:\n  0-95: {st8: 0x100, st16: 1}\n")
    rc, out, err = run(capsys, "policy", "init", "--sysfs", sysfs, "--tags", bad)
    assert (rc, out) == (1, "")
    assert err.splitlines()[0].startswith(f"{bad}:2:15: error: st8 0x100 does not fit in 8 bits")
    empty = tmp_path / "empty.yaml"
    empty.write_text("something: else\n")
    rc, _, err = run(capsys, "policy", "init", "--sysfs", sysfs, "--tags", empty)
    assert rc == 1 and "no steering_tags (or host.steering_tags) mapping" in err


def test_init_keeps_the_tags_files_grouping_and_fills_the_rest(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tmp_path: Path
) -> None:
    per_core = tmp_path / "tags.yaml"
    per_core.write_text(
        "steering_tags:\n"
        + "".join(f"  {c},{c + 48}: {{st8: {c}, st16: {0x100 + c}}}\n" for c in range(24))
        + "  200: {st8: 7, st16: 7}\n"
    )
    rc, out, _ = run(capsys, "policy", "init", "--sysfs", sysfs, "--tags", per_core)
    assert rc == 0
    assert "    5,53: {st8: 0x05, st16: 0x0105}" in out
    assert "200" not in out.split("steering_tags:")[1]  # not a CPU of this host
    assert re.search(r"24-47,72-95: \{st8: TODO, st16: TODO\}\s+# L3 .*; not in ", out)


def test_init_on_the_live_host_says_what_it_found() -> None:
    if not Path("/sys/devices/system/cpu/online").exists():
        pytest.skip("no /sys on this machine")
    exe = shutil.which("tphtrap", path=str(Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run([exe, "policy", "init"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# A tphtrap policy written by 'tphtrap policy init'")
    host = read_host()
    if host.tph_functions:
        assert f"{len(host.tph_functions)} TPH device" in proc.stderr
    else:
        n = len(host.functions)
        assert f"tphtrap: no TPH device: none of the {n} PCI functions under /sys" in proc.stderr
        assert f"TPH devices: none of the {n} PCI functions of this host" in proc.stdout


# --- explain ------------------------------------------------------------------------------------
def test_explain_without_vm_explains_every_vm(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "explain", EXAMPLE)
    assert rc == 0
    heads = [line for line in out.splitlines() if line.startswith("VM ")]
    assert heads == [f"VM '{n}' in {EXAMPLE}" for n in ("big", "web1", "web2")]
    rc, out, _ = run(capsys, "policy", "explain", EXAMPLE, "--json")
    doc: dict[str, Any] = json.loads(out)
    assert [v["vm"] for v in doc["vms"]] == ["big", "web1", "web2"]


def test_explain_by_device_finds_its_vm(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "explain", EXAMPLE, "--dev", "5e:00.3", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["vm"] == "web2" and [d["bdf"] for d in data["devices"]] == ["0000:5e:00.3"]
    rc, _, err = run(capsys, "policy", "explain", EXAMPLE, "--dev", "5e:00.7")
    assert rc == 1 and "device 0000:5e:00.7 is not assigned to any VM" in err


NEUTRAL_FALLBACK = """\
version: 1
host:
  steering_tags:
    0-7: {st8: 0x01, st16: 0x0101}
  neutral_tags: [0x00]
vms:
  big:
    cpus: 0-3
    on_violation: rewrite
    devices: {0000:5e:00.0: {}}
"""


def test_explain_never_prints_none(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(NEUTRAL_FALLBACK)
    rc, out, _ = run(capsys, "policy", "explain", path, "--vm", "big")
    assert rc == 0
    assert "    fallback: 0x00 at 8 bits (neutral), 0x0000 at 16 bits (neutral)" in out
    assert "None" not in out
    rc, out, _ = run(capsys, "policy", "explain", path, "--vm", "big", "--json")
    assert json.loads(out)["fallback"] == {
        "8": {"tag": 0, "neutral": True},
        "16": {"tag": 0, "neutral": True},
    }
    for policy in sorted((REPO / "policies").glob("*.yaml")):
        rc, out, _ = run(capsys, "policy", "explain", policy)
        assert rc == 0 and "None" not in out, policy


# --- check --json for CI ------------------------------------------------------------------------
def test_check_json_says_what_it_checked(capsys: pytest.CaptureFixture[str], sysfs: Path) -> None:
    rc, out, err = run(
        capsys,
        "policy",
        "check",
        "--json",
        "--strict",
        EXAMPLE,
        "--sysfs",
        sysfs,
        "--libvirt",
        LIBVIRT / "web1.xml",
    )
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["schema"] == "tphtrap.policy-check/1"
    assert doc["ok"] is True and doc["strict"] is True
    assert doc["checked"] == {"host": str(sysfs / "sys"), "libvirt": [str(LIBVIRT / "web1.xml")]}
    assert doc["files"] == [
        {"file": str(EXAMPLE), "ok": True, "errors": 0, "warnings": 0, "problems": []}
    ]


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["my vm"], "domain name 'my vm' cannot be a VM name in a policy"),
        (["web1", "web1"], "domain 'web1' is also"),
    ],
)
def test_init_refuses_domains_no_policy_can_name(
    capsys: pytest.CaptureFixture[str], sysfs: Path, tmp_path: Path, names: list[str], reason: str
) -> None:
    paths = []
    for i, name in enumerate(names):
        path = tmp_path / f"d{i}.xml"
        path.write_text((LIBVIRT / "web1.xml").read_text().replace("<name>web1<", f"<name>{name}<"))
        paths.append(path)
    rc, out, err = run(capsys, "policy", "init", "--sysfs", sysfs, "--libvirt", *paths)
    assert (rc, out) == (1, "")
    assert reason in err and ":4: " in err  # the <name> line of the domain file
