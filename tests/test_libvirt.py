"""libvirt domain XML: pinning, cpusets with ^ exclusions, hostdevs, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tphtrap.libvirt import DomainError, load_domain, parse_domain, parse_libvirt_cpuset

LIBVIRT = Path(__file__).resolve().parent.parent / "fixtures" / "libvirt"


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", {0}),
        ("1-4,^3,6", {1, 2, 4, 6}),  # libvirt's own example (formatdomain.rst)
        ("1-4,^2", {1, 3, 4}),
        ("0-3, ^1 , 5", {0, 2, 3, 5}),
        ("^2,1-3", {1, 2, 3}),  # left to right: ^2 removes nothing yet
        ("1-3,^2,2", {1, 2, 3}),
        ("1,", {1}),  # virBitmapParse ends at the string's end after a comma
        ("007", {7}),  # decimal, as strtol base 10
    ],
)
def test_cpusets_as_libvirt_reads_them(text: str, cpus: set[int]) -> None:
    assert parse_libvirt_cpuset(text) == frozenset(cpus)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (",1", "not N"),
        ("1,,2", "not N"),
        ("^1-3", "takes one CPU"),
        ("3-1", "backwards"),
        ("1,^1", "leaves no CPU"),
        ("0x3", "not N"),
        ("a", "not N"),
        ("8192", "beyond"),
    ],
)
def test_bad_cpusets(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_libvirt_cpuset(text)


def test_vcpupin_one_to_one_is_translation() -> None:
    dom = load_domain(LIBVIRT / "web1.xml")
    assert dom.name == "web1" and dom.vcpus == 16
    assert dom.one_to_one == (*range(24, 32), *range(72, 80))
    assert dom.cpus == frozenset([*range(24, 32), *range(72, 80)])
    assert dom.emulator == frozenset({0, 1})  # reported, not in cpus
    assert {p.source for p in dom.pins} == {"vcpupin"}
    (dev,) = dom.hostdevs
    assert (dev.bdf, dev.driver, dev.element) == ("0000:5e:00.2", "vfio", "hostdev")


def test_vcpu_cpuset_with_exclusions_and_an_interface_hostdev() -> None:
    dom = load_domain(LIBVIRT / "web2.xml")
    assert dom.one_to_one is None
    assert dom.cpus == frozenset([*range(32, 48), *range(80, 96)]) - {40, 88}
    assert all(p.source == "cpuset" for p in dom.pins) and len(dom.pins) == 16
    (dev,) = dom.hostdevs
    assert (dev.bdf, dev.element) == ("0000:5e:00.3", "interface")


def test_libvirt_documentation_example() -> None:
    dom = load_domain(LIBVIRT / "doc-example.xml")
    assert [sorted(p.cpus) for p in dom.pins] == [
        [1, 3, 4],  # vcpupin 1-4,^2
        [0, 1],
        [2, 3],
        [0, 4],
        [1, 2, 4, 6],  # vCPUs 4 and 5: <vcpu cpuset='1-4,^3,6'>
        [1, 2, 4, 6],
    ]
    assert [p.source for p in dom.pins] == ["vcpupin"] * 4 + ["cpuset"] * 2
    assert dom.emulator == frozenset({1, 2, 3})
    assert dom.iothreads == {1: frozenset({5, 6}), 2: frozenset({7, 8})}
    assert [d.bdf for d in dom.hostdevs] == ["0000:06:02.0"]  # the USB hostdev is not PCI
    assert dom.hostdevs[0].driver is None
    assert [d.bdf for d in dom.unassigned] == ["0000:06:02.1"]


def test_hostdev_with_and_without_driver() -> None:
    dom = load_domain(LIBVIRT / "big.xml")
    assert [(d.bdf, d.driver) for d in dom.hostdevs] == [
        ("0000:5e:00.0", None),
        ("0000:5e:00.1", "vfio"),
    ]
    assert dom.iothreads == {1: frozenset({1, 49})}
    assert not dom.cpus & {1, 49} - set(range(0, 24)) - set(range(48, 72))


def test_unpinned_vcpus_without_cpuset_are_an_error() -> None:
    with pytest.raises(DomainError) as exc:
        load_domain(LIBVIRT / "unpinned.xml")
    assert str(exc.value) == (
        f"{LIBVIRT / 'unpinned.xml'}:6:3: domain 'unpinned': vCPUs 2-3 have no vcpupin and no "
        "<vcpu cpuset=...>: they may run on any host CPU, so no cpus can be derived; pin them "
        "(virsh vcpupin, or <cputune><vcpupin>) or give <vcpu> a cpuset"
    )


def test_placement_auto_is_an_error() -> None:
    with pytest.raises(DomainError, match="placement='auto' lets numad choose"):
        load_domain(LIBVIRT / "placement-auto.xml")


def _domain(body: str) -> bytes:
    return f"<domain type='kvm'>\n  <name>x</name>\n{body}</domain>\n".encode()


@pytest.mark.parametrize(
    ("body", "where", "reason"),
    [
        (
            "  <vcpu>2</vcpu>\n  <cputune><vcpupin vcpu='2' cpuset='1'/></cputune>\n",
            "4:12",
            "vcpupin for vCPU 2, but the domain has 2 vCPUs",
        ),
        ("  <vcpu cpuset='0-'>2</vcpu>\n", "3:3", "<vcpu cpuset='0-'>: '0-' is not N"),
        ("  <vcpu cpuset='0'>two</vcpu>\n", "3:3", "<vcpu> must hold the vCPU count"),
        (
            "  <vcpu cpuset='0'>1</vcpu>\n  <devices><hostdev type='pci'><source><address "
            "bus='0x100'/></source></hostdev></devices>\n",
            "4:40",
            "bus='0x100' is not a number",
        ),
        ("  <cputune/>\n", "1:1", "no <vcpu> element"),
    ],
)
def test_errors_name_file_line_and_column(body: str, where: str, reason: str) -> None:
    with pytest.raises(DomainError) as exc:
        parse_domain(_domain(body), "d.xml")
    assert exc.value.where == f"d.xml:{where}"
    assert reason in exc.value.reason


def test_addresses_are_read_as_strtoul_base_0() -> None:
    body = (
        "  <vcpu cpuset='0'>1</vcpu>\n  <devices><hostdev type='pci'><source><address "
        "domain='0' bus='010' slot='31' function='0x7'/></source></hostdev></devices>\n"
    )
    (dev,) = parse_domain(_domain(body)).hostdevs
    assert dev.bdf == "0000:08:1f.7"  # 010 is octal to libvirt


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>",
        b"<domain><name>x</name>",
        b"not xml",
        b"<vm><name>x</name></vm>",
        b"<domain><vcpu>1</vcpu></domain>",
    ],
)
def test_hostile_or_wrong_xml_is_a_domain_error(data: bytes) -> None:
    with pytest.raises(DomainError, match=r"^d\.xml:\d+:\d+: "):
        parse_domain(data, "d.xml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DomainError, match="cannot read"):
        load_domain(tmp_path / "none.xml")
