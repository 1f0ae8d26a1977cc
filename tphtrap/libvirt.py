"""libvirt domain XML -> where a VM's vCPUs run and which PCI devices it is given.

The elements read, as libvirt documents them (``docs/formatdomain.rst``, "CPU Allocation",
"CPU Tuning", "Host device assignment"; https://libvirt.org/formatdomain.html):

- ``<vcpu cpuset=... placement=...>N</vcpu>``: N vCPUs; ``cpuset`` is where vCPUs without their
  own ``vcpupin`` run. ``placement='auto'`` leaves it to numad when the domain starts, and
  ``cpuset`` is then ignored;
- ``<cputune><vcpupin vcpu='I' cpuset=.../>``: where vCPU I runs. A vCPU with neither a
  ``vcpupin`` nor a ``cpuset`` "is pinned to all the physical CPUs": nothing can be derived for
  it, which is an error here;
- ``<emulatorpin cpuset=...>`` and ``<iothreadpin iothread='N' cpuset=...>``: the emulator's and
  the IOThreads' CPUs. They are the host's work for the VM, not the guest's: reported, never
  added to the VM's ``cpus``;
- ``<hostdev mode='subsystem' type='pci'><source><address domain bus slot function/>``, with or
  without ``<driver name='vfio'/>``, and ``<interface type='hostdev'>`` with a ``type='pci'``
  source address (SR-IOV VFs): the PCI functions given to the guest. A hostdev whose guest
  ``<address type='unassigned'/>`` is managed by libvirt but not visible to the guest.

A cpuset is libvirt's bitmap syntax (``virBitmapParse``): comma-separated decimal ``N``,
``N-M`` and ``^N`` (remove N from what came before), spaces allowed around the parts. Address
numbers are read as libvirt reads them (``strtoul`` base 0: ``0x`` hex, a leading ``0`` octal,
else decimal). The XML is parsed with the standard library's expat, with document type
declarations and entities refused; errors name ``file:line:col``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from xml.parsers import expat

from .errors import TphtrapError
from .policy import MAX_CPUS, format_cpulist

__all__ = [
    "Domain",
    "DomainError",
    "Hostdev",
    "VcpuPin",
    "load_domain",
    "parse_domain",
    "parse_libvirt_cpuset",
]

MAX_DOMAIN_BYTES: Final = 16 << 20
_NUMBER = re.compile(
    r"\s*(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<oct>0[0-7]*)|(?P<dec>[1-9][0-9]*))\s*\Z"
)


class DomainError(TphtrapError):
    """A domain XML file that cannot be read or tells nothing usable; names file:line:col."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message


@dataclass(frozen=True)
class VcpuPin:
    vcpu: int
    cpus: frozenset[int]
    line: int
    source: str  # "vcpupin" or "cpuset" (the <vcpu> default)


@dataclass(frozen=True)
class Hostdev:
    bdf: str
    line: int
    element: str  # "hostdev" or "interface"
    driver: str | None = None  # <driver name=...>, when given


@dataclass(frozen=True)
class Domain:
    name: str
    source: str
    vcpus: int
    pins: tuple[VcpuPin, ...]  # one per vCPU, in vCPU order
    hostdevs: tuple[Hostdev, ...]
    unassigned: tuple[Hostdev, ...] = ()  # <address type='unassigned'/>: not the guest's
    emulator: frozenset[int] | None = None
    iothreads: Mapping[int, frozenset[int]] = field(default_factory=dict)
    name_line: int = 1

    @property
    def cpus(self) -> frozenset[int]:
        """Every host CPU a vCPU of the domain may run on."""
        out: set[int] = set()
        for pin in self.pins:
            out |= pin.cpus
        return frozenset(out)

    @property
    def one_to_one(self) -> tuple[int, ...] | None:
        """vCPU i -> its one host CPU, when every vCPU is pinned to exactly one CPU."""
        if all(len(p.cpus) == 1 for p in self.pins):
            return tuple(min(p.cpus) for p in self.pins)
        return None

    def where(self, line: int) -> str:
        return f"{self.source}:{line}"


# --- cpusets and numbers ------------------------------------------------------------------------
def parse_libvirt_cpuset(text: str, limit: int = MAX_CPUS) -> frozenset[int]:
    """A libvirt cpuset (``1-4,^3,6``) -> its CPUs; ValueError with a short reason.

    As ``virBitmapParse``: parts are applied left to right, ``^N`` removes one CPU (a range
    after ``^`` is refused), numbers are decimal, a trailing comma is allowed. An empty result
    is refused, as libvirt refuses an all-clear ``cpuset``.
    """
    cpus: set[int] = set()
    parts = text.split(",")
    if parts and not parts[-1].strip() and len(parts) > 1:
        parts = parts[:-1]  # libvirt accepts "1," (the loop ends at the string's end)
    if not text.strip():
        raise ValueError("empty cpuset")
    for raw in parts:
        item = raw.strip()
        neg = item.startswith("^")
        body = item[1:] if neg else item
        m = re.fullmatch(r"([0-9]+)\s*(?:-\s*([0-9]+))?", body)
        if m is None:
            raise ValueError(f"{item!r} is not N, N-M or ^N")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        if neg and m[2] is not None:
            raise ValueError(f"{item!r}: '^' takes one CPU, not a range")
        if hi < lo:
            raise ValueError(f"range {item!r} runs backwards")
        if hi >= limit:
            raise ValueError(f"CPU {hi} is beyond the {limit} CPUs a policy can name")
        if neg:
            cpus.discard(lo)
        else:
            cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ValueError(f"{text!r} leaves no CPU")
    return frozenset(cpus)


def _c_number(text: str) -> int | None:
    """``strtoul(text, NULL, 0)`` for a whole attribute, or None."""
    m = _NUMBER.match(text)
    if m is None:
        return None
    if m["hex"] is not None:
        return int(m["hex"], 16)
    if m["oct"] is not None:
        return int(m["oct"], 8)
    return int(m["dec"])


# --- XML with positions -----------------------------------------------------------------------
class _Tree:
    """An ElementTree built by expat, with the (line, column) of every element's start."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pos: dict[int, tuple[int, int]] = {}
        self.root: ET.Element | None = None
        self._stack: list[ET.Element] = []
        self._parser = expat.ParserCreate()
        p = self._parser
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._data
        p.StartDoctypeDeclHandler = self._refuse("a document type declaration")
        p.EntityDeclHandler = self._refuse("an entity declaration")
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def _refuse(self, what: str) -> Callable[..., None]:
        def handler(*_: object) -> None:
            raise DomainError(self.at_parser(), f"{what}: domain XML has none")

        return handler

    def at_parser(self) -> str:
        p = self._parser
        return f"{self.name}:{p.CurrentLineNumber}:{p.CurrentColumnNumber + 1}"

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        el = ET.Element(tag, attrs)
        self.pos[id(el)] = (self._parser.CurrentLineNumber, self._parser.CurrentColumnNumber + 1)
        if self._stack:
            self._stack[-1].append(el)
        else:
            self.root = el
        self._stack.append(el)

    def _end(self, tag: str) -> None:
        self._stack.pop()

    def _data(self, text: str) -> None:
        if self._stack:  # only an element's own text is read (<name>, <vcpu>), never tails
            el = self._stack[-1]
            el.text = (el.text or "") + text

    def parse(self, data: bytes) -> ET.Element:
        try:
            self._parser.Parse(data, True)
        except expat.ExpatError as exc:
            where = f"{self.name}:{exc.lineno}:{exc.offset + 1}"
            reason = expat.ErrorString(exc.code)
            raise DomainError(where, f"not well-formed XML: {reason}") from None
        assert self.root is not None  # expat refuses a document without an element
        return self.root

    def where(self, el: ET.Element) -> str:
        line, col = self.pos.get(id(el), (1, 1))
        return f"{self.name}:{line}:{col}"

    def line(self, el: ET.Element) -> int:
        return self.pos.get(id(el), (1, 1))[0]


def _text(el: ET.Element) -> str:
    return (el.text or "").strip()


# --- the domain -------------------------------------------------------------------------------
def _cpuset(tree: _Tree, el: ET.Element, attr: str = "cpuset") -> frozenset[int]:
    text = el.get(attr)
    if text is None:
        raise DomainError(tree.where(el), f"<{el.tag}> has no {attr} attribute")
    try:
        return parse_libvirt_cpuset(text)
    except ValueError as exc:
        raise DomainError(tree.where(el), f"<{el.tag} {attr}={text!r}>: {exc}") from None


def _decimal(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None


def _index(tree: _Tree, el: ET.Element, attr: str) -> int:
    raw = el.get(attr)
    value = _decimal(raw)
    if value is None:
        raise DomainError(tree.where(el), f"<{el.tag}> needs a number in {attr}, not {raw!r}")
    return value


def _address(tree: _Tree, el: ET.Element) -> str:
    parts: dict[str, int] = {}
    for attr, limit in (("domain", 0xFFFF), ("bus", 0xFF), ("slot", 0x1F), ("function", 7)):
        raw = el.get(attr, "0")
        value = _c_number(raw)
        if value is None or value > limit:
            raise DomainError(
                tree.where(el), f"PCI address {attr}={raw!r} is not a number from 0 to {limit:#x}"
            )
        parts[attr] = value
    return f"{parts['domain']:04x}:{parts['bus']:02x}:{parts['slot']:02x}.{parts['function']}"


def _vcpu_count(tree: _Tree, root: ET.Element) -> tuple[int, ET.Element]:
    vcpu = root.find("vcpu")
    if vcpu is None:
        raise DomainError(tree.where(root), "no <vcpu> element: the domain's vCPU count is unknown")
    count = _decimal(_text(vcpu))
    if count is None or not 1 <= count <= MAX_CPUS:
        raise DomainError(tree.where(vcpu), f"<vcpu> must hold the vCPU count, not {_text(vcpu)!r}")
    return count, vcpu


def _pins(tree: _Tree, root: ET.Element, name: str) -> tuple[int, tuple[VcpuPin, ...]]:
    count, vcpu = _vcpu_count(tree, root)
    pinned: dict[int, VcpuPin] = {}
    for pin in root.findall("cputune/vcpupin"):
        i = _index(tree, pin, "vcpu")
        if i >= count:
            raise DomainError(
                tree.where(pin), f"vcpupin for vCPU {i}, but the domain has {count} vCPUs"
            )
        if i in pinned:
            raise DomainError(tree.where(pin), f"vCPU {i} is pinned twice")
        pinned[i] = VcpuPin(i, _cpuset(tree, pin), tree.line(pin), "vcpupin")
    loose = [i for i in range(count) if i not in pinned]
    if loose:
        auto = vcpu.get("placement") == "auto"
        if auto or vcpu.get("cpuset") is None:
            why = (
                "placement='auto' lets numad choose their CPUs when the domain starts"
                if auto
                else "no vcpupin and no <vcpu cpuset=...>: they may run on any host CPU"
            )
            raise DomainError(
                tree.where(vcpu),
                f"domain {name!r}: vCPUs {format_cpulist(loose)} have {why}, so no cpus can be "
                "derived; pin them (virsh vcpupin, or <cputune><vcpupin>) or give <vcpu> a "
                "cpuset",
            )
        default = _cpuset(tree, vcpu)
        for i in loose:
            pinned[i] = VcpuPin(i, default, tree.line(vcpu), "cpuset")
    return count, tuple(pinned[i] for i in range(count))


def _hostdevs(tree: _Tree, root: ET.Element) -> tuple[list[Hostdev], list[Hostdev]]:
    given: list[Hostdev] = []
    unassigned: list[Hostdev] = []
    for el in root.findall("devices/hostdev"):
        if el.get("type") != "pci" or el.get("mode", "subsystem") != "subsystem":
            continue
        addr = el.find("source/address")
        if addr is None:
            raise DomainError(tree.where(el), "PCI <hostdev> without <source><address>")
        driver = el.find("driver")
        dev = Hostdev(
            _address(tree, addr),
            tree.line(el),
            "hostdev",
            driver.get("name") if driver is not None else None,
        )
        guest = el.find("address")
        hidden = guest is not None and guest.get("type") == "unassigned"
        (unassigned if hidden else given).append(dev)
    for el in root.findall("devices/interface"):
        if el.get("type") != "hostdev":
            continue
        addr = el.find("source/address")
        if addr is None or addr.get("type", "pci") != "pci":
            continue
        driver = el.find("driver")
        given.append(
            Hostdev(
                _address(tree, addr),
                tree.line(el),
                "interface",
                driver.get("name") if driver is not None else None,
            )
        )
    return given, unassigned


def parse_domain(data: bytes, name: str = "<domain>") -> Domain:
    """A domain from its XML text; raises DomainError naming file:line:col."""
    if len(data) > MAX_DOMAIN_BYTES:
        raise DomainError(name, f"more than {MAX_DOMAIN_BYTES >> 20} MiB: not a domain XML")
    tree = _Tree(name)
    root = tree.parse(data)
    if root.tag != "domain":
        raise DomainError(tree.where(root), f"the root element is <{root.tag}>, not <domain>")
    name_el = root.find("name")
    if name_el is None or not _text(name_el):
        raise DomainError(tree.where(root), "the domain has no <name>")
    dom_name = _text(name_el)
    count, pins = _pins(tree, root, dom_name)
    emulator_el = root.find("cputune/emulatorpin")
    emulator = _cpuset(tree, emulator_el) if emulator_el is not None else None
    iothreads = {
        _index(tree, el, "iothread"): _cpuset(tree, el)
        for el in root.findall("cputune/iothreadpin")
    }
    given, unassigned = _hostdevs(tree, root)
    return Domain(
        name=dom_name,
        source=name,
        vcpus=count,
        pins=pins,
        hostdevs=tuple(given),
        unassigned=tuple(unassigned),
        emulator=emulator,
        iothreads=iothreads,
        name_line=tree.line(name_el),
    )


def load_domain(path: str | Path) -> Domain:
    """A domain from an XML file (``virsh dumpxml NAME > NAME.xml``)."""
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_DOMAIN_BYTES + 1)
    except OSError as exc:
        raise DomainError(name, f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DomainError(name, f"cannot read: not a usable path ({exc})") from None
    return parse_domain(data, name)
