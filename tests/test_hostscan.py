"""The sysfs host scan: CPUs and caches, TPH functions and their root ports."""

from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_tree import Function, build_tree, conventional, no_tph, two_socket

from tphtrap.hostscan import SysfsError, read_host

SOCKET0 = frozenset([*range(0, 24), *range(48, 72)])
SOCKET1 = frozenset([*range(24, 48), *range(72, 96)])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_socket(tmp_path_factory.mktemp("sysfs"))


def test_cpus_caches_nodes_and_smt(tree: Path) -> None:
    host = read_host(tree)
    assert host.online == host.present == frozenset(range(96))
    assert host.l3_domains() == [SOCKET0, SOCKET1]
    assert host.nodes == {0: SOCKET0, 1: SOCKET1}
    assert host.groups("package") == {0: SOCKET0, 1: SOCKET1}
    assert host.cpus[50].siblings == frozenset({2, 50})
    assert (host.cpus[50].core, host.cpus[50].package, host.cpus[50].l3_id) == (2, 0, 0)
    assert host.smt_pairs().startswith("48 cores with SMT siblings (0,48; 1,49")


def test_functions_are_judged_as_inspect_judges_them(tree: Path) -> None:
    host = read_host(tree)
    status = {f.bdf: f.status for f in host.functions}
    assert status == {
        "0000:00:1f.0": "no-tph",
        "0000:16:00.0": "no-tph",
        "0000:17:00.0": "force-off",
        "0000:3a:00.0": "no-tph",
        "0000:3b:00.0": "no-tph",
        "0000:5d:00.0": "no-tph",
        "0000:5e:00.0": "trappable",
        "0000:5e:00.1": "trappable",
        "0000:5e:00.2": "trappable",
        "0000:5e:00.3": "trappable",
        "0000:ae:00.0": "no-tph",
        "0000:af:00.0": "force-off",
        "0000:d7:00.0": "no-tph",
        "0000:d8:00.0": "trappable",
    }
    nic = host.function("0000:5e:00.2")
    assert nic is not None and nic.root_port == "0000:5d:00.0"
    assert nic.root is not None and nic.root.summary == (
        "root port 0000:5d:00.0: TPH Completer TPH and Extended TPH"
    )
    blocked = host.function("0000:17:00.0")  # the root port completes no TPH
    assert blocked is not None and blocked.reason.startswith(
        "root port 0000:16:00.0: TPH Completer none: Linux refuses to enable TPH below it"
    )
    capped = host.function("0000:d8:00.0")  # the root port completes TPH only
    assert capped is not None and any(
        "Linux caps the device at TPH only" in n for n in capped.notes
    )
    assert nic.reason.startswith("standard ST table in the MSI-X table")
    assert any("Device Specific mode" in n for n in nic.notes)
    ds = host.function("0000:af:00.0")
    assert ds is not None and "Device Specific mode only" in ds.reason
    legacy = host.function("0000:00:1f.0")
    assert legacy is not None and legacy.root_port is None
    assert "256 bytes" in legacy.reason
    assert [f.bdf for f in host.tph_functions] == [
        "0000:17:00.0",
        "0000:5e:00.0",
        "0000:5e:00.1",
        "0000:5e:00.2",
        "0000:5e:00.3",
        "0000:af:00.0",
        "0000:d8:00.0",
    ]
    assert host.unexamined == ()


def test_root_is_the_sysfs_directory_or_holds_one(tree: Path) -> None:
    assert read_host(tree / "sys").online == read_host(tree).online
    assert read_host(tree).sysfs == tree / "sys"


def test_a_short_read_is_unexamined_not_clean(tmp_path: Path) -> None:
    root = build_tree(
        tmp_path,
        sockets=1,
        cores=2,
        smt=1,
        functions=[Function("0000:01:00.0", no_tph()[:64], "0000:00:01.0")],
    )
    (fn,) = [f for f in read_host(root).functions if f.bdf == "0000:01:00.0"]
    assert fn.status == "unexamined"
    assert "64-byte config space" in fn.reason


def test_offline_cpus_and_missing_topology(tmp_path: Path) -> None:
    root = build_tree(
        tmp_path,
        sockets=1,
        cores=4,
        smt=1,
        functions=[Function("0000:00:1f.0", conventional(), None)],
        offline=frozenset({3}),
    )
    host = read_host(root)
    assert host.present == frozenset(range(4)) and host.online == frozenset(range(3))
    assert host.l3_domains() == [frozenset(range(3))]


def test_not_a_sysfs_tree(tmp_path: Path) -> None:
    with pytest.raises(SysfsError, match=r"devices/system/cpu/online: missing"):
        read_host(tmp_path)


def test_bad_cpulist_names_the_file(tmp_path: Path) -> None:
    online = tmp_path / "sys/devices/system/cpu/online"
    (tmp_path / "sys/devices/system").mkdir(parents=True)
    online.parent.mkdir(parents=True, exist_ok=True)
    online.write_text("0-x\n")
    with pytest.raises(SysfsError, match=r"cpu/online: not a cpulist"):
        read_host(tmp_path)


def test_the_live_host_can_be_scanned() -> None:
    if not Path("/sys/devices/system/cpu/online").exists():
        pytest.skip("no /sys on this machine")
    host = read_host()
    assert host.online
    assert all(
        f.status in ("trappable", "force-off", "no-tph", "unexamined") for f in host.functions
    )
