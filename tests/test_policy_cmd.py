"""``tphtrap policy check|schema|explain``: exit codes, output lines, JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tphtrap.cli import main
from tphtrap.policyfile import load_policy
from tphtrap.policyschema import policy_schema

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(str(p.relative_to(REPO)) for p in (REPO / "policies").glob("*.yaml"))
BAD = REPO / "fixtures" / "policies" / "bad"
PARSABLE = re.compile(
    r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<level>error|warning): "
    r".+ \((?P<rule>[a-z0-9-]+)\)$"
)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- check -----------------------------------------------------------------------------------
def test_check_examples_prints_one_ok_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "check", *EXAMPLES)
    assert rc == 0
    assert out.splitlines() == [f"{name}: ok" for name in EXAMPLES]
    assert err == ""


def test_check_bad_policy_prints_parsable_problems(capsys: pytest.CaptureFixture[str]) -> None:
    path = "fixtures/policies/bad/duplicate-key.yaml"
    rc, out, err = run(capsys, "policy", "check", path)
    assert rc == 1
    assert out.splitlines() == [
        f"{path}:11:5: error: duplicate key 'on_violation' in VM 'a' (first at line 10); YAML "
        "loaders silently keep only the last one (duplicate-key)"
    ]
    assert err == f"{path}: 1 error\n"


def test_check_every_bad_fixture_line_is_parsable(capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted(str(p.relative_to(REPO)) for p in BAD.glob("*.yaml"))
    rc, out, _ = run(capsys, "policy", "check", *paths)
    assert rc == 1
    errors = []
    for line in out.splitlines():
        m = PARSABLE.match(line)
        assert m, line
        if m["level"] == "error":
            errors.append((m["file"], int(m["line"]), int(m["col"]), m["rule"]))
    assert sorted({e[0] for e in errors}) == paths  # every file has its error, none is ok


def test_check_mixed_files_keeps_going(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        capsys,
        "policy",
        "check",
        "fixtures/policies/bad/truthy.yaml",
        "policies/two-tenants.yaml",
        "no/such.yaml",
    )
    assert rc == 1
    assert out.splitlines() == [
        "fixtures/policies/bad/truthy.yaml:10:10: error: 'yes' is a boolean in YAML 1.1 but text "
        "in YAML 1.2: write true or false (truthy)",
        "policies/two-tenants.yaml: ok",
        "no/such.yaml:1:1: error: cannot read: No such file or directory (unreadable)",
    ]


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


WARNED = """\
version: 1
host:
  steering_tags:
    0-3: {st8: 1, st16: 0x101}
vms:
  a:
    cpus: 0-3
"""


def test_check_warnings_pass_unless_strict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _write(tmp_path, WARNED)
    rc, out, _ = run(capsys, "policy", "check", path)
    assert rc == 0
    assert out.splitlines() == [
        f"{path}:6:3: warning: VM 'a' has no devices: nothing can be attached to it (no-devices)",
        f"{path}: ok (1 warning)",
    ]
    rc, out, _ = run(capsys, "policy", "check", "--strict", path)
    assert rc == 1


def test_check_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(tmp_path, WARNED)
    rc, out, _ = run(
        capsys, "policy", "check", "--json", path, "fixtures/policies/bad/bad-bdf.yaml"
    )
    assert rc == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    first, second = doc["files"]
    assert first == {
        "file": path,
        "ok": True,
        "errors": 0,
        "warnings": 1,
        "problems": [
            {
                "line": 6,
                "column": 3,
                "level": "warning",
                "rule": "no-devices",
                "message": "VM 'a' has no devices: nothing can be attached to it",
                "path": "vms.a",
            }
        ],
    }
    assert second["ok"] is False
    assert [(p["line"], p["column"], p["rule"]) for p in second["problems"]] == [(11, 7, "bad-bdf")]


def test_check_json_ok(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "check", "--json", *EXAMPLES)
    assert rc == 0
    doc = json.loads(out)
    assert doc["ok"] is True
    assert [f["file"] for f in doc["files"]] == EXAMPLES
    assert all(f["problems"] == [] for f in doc["files"])


def test_check_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check"]) == 2  # a usage error
    assert "FILE" in capsys.readouterr().err


# --- schema ----------------------------------------------------------------------------------
def test_schema_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "schema")
    assert rc == 0
    assert json.loads(out) == policy_schema()


def test_schema_to_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "policy.schema.json"
    rc, out, _ = run(capsys, "policy", "schema", "-o", str(target))
    assert (rc, out) == (0, "")
    assert json.loads(target.read_text()) == policy_schema()


def test_schema_unwritable_is_a_user_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, _, err = run(capsys, "policy", "schema", "-o", str(tmp_path / "no" / "x.json"))
    assert rc == 1
    assert err.startswith("tphtrap: error: cannot write ")


# --- explain ---------------------------------------------------------------------------------
def explain(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out, err = run(capsys, "policy", "explain", *argv, "--json")
    assert (rc, err) == (0, "")
    data: dict[str, Any] = json.loads(out)
    return data


def test_explain_text_for_a_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "explain", "policies/two-tenants.yaml", "--vm", "tenant-a")
    assert rc == 0
    assert out.splitlines() == [
        "VM 'tenant-a' in policies/two-tenants.yaml",
        "  host CPUs it may steer to: 0-15,32-47",
        "  8-bit tags the guest may write (Requester Enable 'TPH only'):",
        "    allowed: 0x00 (neutral), 0x01 (CPUs 0-15,32-47)",
        "    every other tag is refused",
        "  16-bit tags the guest may write (Requester Enable 'Extended TPH'):",
        "    allowed: 0x0000 (neutral), 0x0101 (CPUs 0-15,32-47)",
        "    every other tag is refused",
        "  virtual tags: none; the guest writes host tags",
        "  on a violation: rewrite: the refused tag is replaced by the fallback tag",
        "    fallback: 0x01 at 8 bits (CPU 0), 0x0101 at 16 bits (CPU 0)",
        "  devices:",
        "    0000:3b:00.0:",
        "      TPH allowed (if the device has a standard ST table)",
        "      Extended TPH allowed (if the device and its root port support it)",
        "      No ST mode (the device sends tag 0): allowed with 8-bit and 16-bit tags",
        "      on a violation: rewrite: the refused tag is replaced by the fallback tag",
        "        fallback: 0x01 at 8 bits (CPU 0), 0x0101 at 16 bits (CPU 0)",
    ]


def test_explain_json_for_a_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    data = explain(capsys, "policies/two-tenants.yaml", "--vm", "tenant-b")
    assert data["vm"] == "tenant-b"
    assert data["cpus"] == "16-31,48-63"
    assert data["on_violation"] == "drop"
    assert data["virtual_tags"] is None
    assert data["tags"]["8"]["allowed"] == [
        {"tag": 0, "cpus": "", "neutral": True},
        {"tag": 2, "cpus": "16-31,48-63", "neutral": False},
    ]
    (dev,) = data["devices"]
    assert dev["bdf"] == "0000:3b:00.1"
    assert dev["tph"] == {"forced_off": False, "why": []}
    assert dev["on_violation"] == "drop"
    assert dev["rule"] == "vms.tenant-b.devices.0000:3b:00.1"


def test_explain_translation(capsys: pytest.CaptureFixture[str]) -> None:
    data = explain(capsys, "policies/translation.yaml", "--vm", "db")
    virtual = data["virtual_tags"]
    assert len(virtual) == 16
    assert virtual[0] == {"virtual_tag": 0, "cpu": 8, "8": 0x11, "16": 0x0411}
    assert virtual[15] == {"virtual_tag": 15, "cpu": 23, "8": 0x12, "16": 0x0412}
    assert data["fallback"] == {"8": {"tag": 0x12, "cpu": 16}, "16": {"tag": 0x0412, "cpu": 16}}
    devices = {d["bdf"]: d for d in data["devices"]}
    assert devices["0000:5e:00.0"]["extended_tph"] == {"allowed": True, "why_not": []}
    assert devices["0000:5e:00.1"]["extended_tph"] == {
        "allowed": False,
        "why_not": ["the device sets extended_tph: false"],
    }


def test_explain_translation_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "explain", "policies/translation.yaml", "--vm", "web")
    assert rc == 0
    lines = out.splitlines()
    assert "  8-bit host tags the device may hold (Requester Enable 'TPH only'):" in lines
    assert "    1 (vCPU 1, on CPU 26) -> 0x13 at 8 bits, 0x0413 at 16 bits" in lines
    assert (
        "  on a violation: disable: TPH Requester Enable is forced off for the device until its "
        "next reset"
    ) in lines


def test_explain_devices_with_tph_forced_off(capsys: pytest.CaptureFixture[str]) -> None:
    data = explain(capsys, "policies/strict-baseline.yaml", "--vm", "quarantine")
    (dev,) = data["devices"]
    assert dev["tph"] == {"forced_off": True, "why": ["VM 'quarantine' sets tph: false"]}
    assert data["tags"]["8"]["not_in_force_because"] == "tph: false"
    rc, out, _ = run(
        capsys, "policy", "explain", "policies/strict-baseline.yaml", "--vm", "quarantine"
    )
    assert rc == 0
    assert "      TPH forced off: VM 'quarantine' sets tph: false" in out.splitlines()


def test_explain_strict_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    data = explain(capsys, "policies/strict-baseline.yaml", "--vm", "tenant")
    (dev,) = data["devices"]
    assert dev["no_st_mode"] == {"8": False, "16": False}
    assert dev["extended_tph"]["allowed"] is False
    assert data["tags"]["16"] == {
        "requester_enable": "Extended TPH",
        "in_force": False,
        "not_in_force_because": "extended_tph: false",
        "allowed": [],
        "refused": [],
        "cpus_without_tag": "0-15",
    }


def test_explain_refused_shared_tags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
version: 1
host:
  steering_tags:
    0-3: {st8: 1, st16: null}
    4-7: {st8: 2, st16: null}
vms:
  a:
    cpus: 0-5
    extended_tph: false
    devices:
      3b:00.0: {tph: false}
      3b:00.1: {on_violation: disable}
""",
    )
    data = explain(capsys, path, "--vm", "a")
    assert data["tags"]["8"]["refused"] == [{"tag": 2, "cpus_in_vm": "4-5", "cpus_outside": "6-7"}]
    devices = {d["bdf"]: d for d in data["devices"]}
    assert devices["0000:3b:00.0"]["tph"]["why"] == ["the device sets tph: false"]
    assert devices["0000:3b:00.1"]["on_violation"] == "disable"
    assert devices["0000:3b:00.1"]["on_violation_from"] == "device"
    rc, out, _ = run(capsys, "policy", "explain", path, "--vm", "a")
    assert rc == 0
    assert "    refused: 0x02, the tag of CPUs 4-5, is shared with CPUs 6-7 outside the VM" in (
        out.splitlines()
    )


def test_explain_one_device(capsys: pytest.CaptureFixture[str]) -> None:
    data = explain(capsys, "policies/translation.yaml", "--vm", "db", "--dev", "5e:00.1")
    assert [d["bdf"] for d in data["devices"]] == ["0000:5e:00.1"]


def test_explain_unknown_vm_or_device(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "explain", "policies/two-tenants.yaml", "--vm", "nope")
    assert (rc, out) == (1, "")
    assert err == (
        "tphtrap: error: VM 'nope' is not in policies/two-tenants.yaml (its VMs: tenant-a, "
        "tenant-b)\n"
    )
    argv = ("policy", "explain", "policies/two-tenants.yaml", "--vm", "tenant-a")
    rc, _, err = run(capsys, *argv, "--dev", "3b:00.1")
    assert rc == 1
    assert err == (
        "tphtrap: error: device 0000:3b:00.1 is not assigned to VM 'tenant-a' (it belongs to VM "
        "'tenant-b')\n"
    )
    rc, _, err = run(capsys, *argv, "--dev", "zz")
    assert rc == 1
    assert err.startswith("tphtrap: error: not a PCI address")


def test_explain_bad_policy(capsys: pytest.CaptureFixture[str]) -> None:
    path = "fixtures/policies/bad/truthy.yaml"
    rc, out, err = run(capsys, "policy", "explain", path, "--vm", "a")
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"{path}:10:10: error: 'yes' is a boolean in YAML 1.1 but text in YAML 1.2: write true or "
        "false (truthy)",
        f"tphtrap: error: {path} has errors; run 'tphtrap policy check'",
    ]


def test_explain_agrees_with_the_engine_rules(capsys: pytest.CaptureFixture[str]) -> None:
    policy = load_policy("policies/translation.yaml")
    data = explain(capsys, "policies/translation.yaml", "--vm", "db")
    rules = policy.rules("db", "0000:5e:00.0")
    for width in rules.allowed:
        view = data["tags"][str(int(width))]
        assert [a["tag"] for a in view["allowed"]] == sorted(rules.allowed[width])


# --- help and the real command line -------------------------------------------------------------
@pytest.mark.parametrize("sub", [[], ["check"], ["schema"], ["explain"]])
def test_help(capsys: pytest.CaptureFixture[str], sub: list[str]) -> None:
    assert main(["policy", *sub, "--help"]) == 0
    assert "usage: tphtrap policy" in capsys.readouterr().out


def test_command_line_end_to_end() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tphtrap", "policy", "check", *EXAMPLES],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [f"{name}: ok" for name in EXAMPLES]


def test_committed_schema_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    """policies/tphtrap-policy.schema.json (which the example policies point editors at) is
    what `tphtrap policy schema` prints; regenerate it with
    `tphtrap policy schema -o policies/tphtrap-policy.schema.json`."""
    assert main(["policy", "schema"]) == 0
    generated = json.loads(capsys.readouterr().out)
    root = Path(__file__).resolve().parent.parent
    committed = json.loads((root / "policies" / "tphtrap-policy.schema.json").read_text())
    assert committed == generated
    for policy in sorted((root / "policies").glob("*.yaml")):
        first = policy.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=./tphtrap-policy.schema.json", policy
