"""YAML policy files -> :class:`~tphtrap.policy.Policy`, with every problem positioned and named.

The loader works on the composed YAML node tree (``yaml.SafeLoader`` composing only, never
constructing), so each problem carries the ``line:column`` of the node at fault, a kebab-case
rule id and a breadcrumb path, and every problem in a file is reported in one pass.

Every scalar is read as the text the author wrote and interpreted by its place in the policy,
never by YAML 1.1's implicit typing. Where a plain scalar would read differently in a YAML 1.1
loader than it looks (``on`` -> true, ``010`` -> 8, ``1:30`` -> 90), the policy is rejected, so
the file means the same thing to every tool that reads it. PCI addresses are exempt: a device key
like ``0000:00:10.0`` (a base-60 float to YAML 1.1) is read as the address it spells.

The format and the meaning of every rule id are documented in ``docs/policy.md``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import yaml
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .device import normalize_bdf
from .errors import PolicyError, Problem
from .policy import (
    MAX_CPUS,
    CpuTags,
    DeviceSettings,
    HostPolicy,
    OnViolation,
    Policy,
    TagRules,
    VmPolicy,
    format_cpulist,
)
from .policy import parse_cpulist as parse_policy_cpulist
from .spec import TagWidth

__all__ = [
    "MAX_CPUS",
    "MAX_VCPUS",
    "POLICY_VERSION",
    "RULES",
    "check_policy_text",
    "load_policy",
    "load_policy_text",
    "parse_policy_cpulist",
    "read_policy",
    "read_policy_text",
]

POLICY_VERSION: Final = 1
MAX_VCPUS: Final = 256  # virtual tag i must fit in an 8-bit steering tag
MAX_NAME: Final = 64
MAX_DIGITS: Final = 32  # no number in a policy needs more characters (tags: 0xffff, CPUs: 8191)
MAX_POLICY_BYTES: Final = 16 << 20  # policy files are read whole; no policy comes near this

#: Every rule id the loader reports, with a one-line summary (docs/policy.md has the details).
RULES: Final[Mapping[str, str]] = {
    # reading the file
    "unreadable": "the file cannot be read or is not UTF-8 text",
    "syntax": "the file is not well-formed YAML",
    "empty-document": "the file holds no policy",
    "alias": "YAML anchors and aliases (&a / *a / <<) are not used in policies",
    "explicit-tag": "explicit YAML tags (!!int, !!str, ...) are not used in policies",
    # shape
    "duplicate-key": "a key appears twice in one mapping (YAML keeps the last one silently)",
    "unknown-key": "a key the policy format does not define (often a typo)",
    "missing-key": "a required key is absent",
    "wrong-type": "a value of the wrong kind (text for a number, a list for a mapping, ...)",
    "bad-value": "a value outside its allowed set (on_violation, CPU numbers)",
    "bad-version": "a policy version this tphtrap does not read",
    "bad-name": "a VM name that is not a simple identifier",
    # YAML 1.1 surprises
    "truthy": "yes/no/on/off/y/n (YAML 1.1 booleans): write true or false",
    "octal-values": "a number with a leading zero (YAML 1.1 reads 010 as octal 8)",
    "sexagesimal": "a number like 1:30 (YAML 1.1 reads it in base 60, as 90)",
    # host
    "bad-cpulist": "not a Linux cpulist (0-3,8 or 0-7:1/2)",
    "duplicate-cpu": "a CPU given steering tags twice in host.steering_tags",
    "tag-out-of-range": "a steering tag that does not fit its width (8 or 16 bits)",
    "neutral-tag-owned": "a neutral tag that the firmware also reports for a CPU",
    # VMs and devices
    "cpu-without-tags": "a VM CPU with no entry in host.steering_tags",
    "shared-cpu": "two VMs share a CPU without both listing each other in share_cpus_with",
    "unknown-vm": "share_cpus_with names a VM the policy does not define",
    "empty-allowed-set": "a VM that may use TPH but has no allowed steering tag",
    "vcpu-outside-cpus": "a vCPU pinned to a host CPU outside the VM's cpus",
    "vcpu-tag-foreign": "a vCPU pinned to a CPU whose tag the VM may not use",
    "vcpu-without-tag": "a vCPU pinned to a CPU the firmware reports no tag for (warning)",
    "too-many-vcpus": "more vCPUs than 8-bit virtual tags (256)",
    "fallback-not-allowed": "a fallback CPU outside cpus or whose tag the VM may not use",
    "bad-bdf": "a device key that is not a PCI address",
    "device-in-two-vms": "one device assigned to two VMs",
    # warnings
    "no-devices": "a VM with no devices (warning)",
    "no-vms": "a policy with no VMs (warning)",
    "no-effect": "a setting that cannot take effect (warning)",
    "tag-shared-outside": "a VM CPU whose tag is shared with CPUs outside the VM (warning)",
    "duplicate-item": "a list item given twice (warning)",
}

_TOP_KEYS: Final = {"version": True, "host": True, "vms": True}
_HOST_KEYS: Final = {"steering_tags": True, "neutral_tags": False}
_TAG_KEYS: Final = {"st8": True, "st16": True}
_VM_KEYS: Final = {
    "cpus": True,
    "vcpus": False,
    "on_violation": False,
    "fallback_cpu": False,
    "share_cpus_with": False,
    "tph": False,
    "extended_tph": False,
    "devices": False,
}
_DEVICE_KEYS: Final = {
    "tph": False,
    "extended_tph": False,
    "on_violation": False,
    "fallback_cpu": False,
}

# Scalar spellings. Only plain (unquoted) scalars are subject to YAML's implicit typing.
_NULLS: Final = frozenset({"", "~", "null", "Null", "NULL"})
_BOOLS: Final = {"true": True, "false": False}
# YAML 1.1 booleans other than lowercase true/false (y/n: YAML 1.1 spec, not PyYAML).
_TRUTHY: Final = frozenset(
    {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO"}
    | {"on", "On", "ON", "off", "Off", "OFF", "True", "TRUE", "False", "FALSE"}
)
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_HEX = re.compile(r"0x[0-9a-fA-F]+\Z")  # lowercase x: YAML 1.1 and 1.2 agree on it
_LEADING_ZERO = re.compile(r"[-+]?0(?:[0-9_]+|[oO][0-7_]+)\Z")
# PyYAML's resolver: int ``[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+``, float adds ``\.[0-9_]*``.
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?\Z")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
# Line breaks to YAML 1.1 (PyYAML) only: YAML 1.2 readers and editors keep them inside the line,
# so the same file would have a different structure for them (and different line numbers).
_YAML11_BREAKS = re.compile("[\x85\u2028\u2029]")
# Linux cpulist region: N, N-M, or N-M:used/group (lib/bitmap-str.c, bitmap_parse_region).
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"

_WIDTH_WORDS: Final = {TagWidth.ST8: "8-bit", TagWidth.ST16: "16-bit"}
_WIDTH_KEYS: Final = {TagWidth.ST8: "st8", TagWidth.ST16: "st16"}


class _Mark(Protocol):
    """A position in the text (PyYAML's pure-Python or libyaml mark)."""

    @property
    def line(self) -> int: ...
    @property
    def column(self) -> int: ...


# --- cpulists ------------------------------------------------------------------------------
# --- composing --------------------------------------------------------------------------------
# A policy nests five levels deep (vms > VM > devices > device > setting). PyYAML composes
# recursively, a few Python frames per level: without a limit, "[[[[..." a few hundred levels
# deep raised RecursionError out of the loader instead of a problem.
MAX_DEPTH: Final = 64


class _Composer(yaml.SafeLoader):
    """Composes nodes only, noting aliases and explicit tags with their positions."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases: list[_Mark | None] = []
        self.explicit_tags: list[tuple[str, _Mark | None]] = []
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            self.aliases.append(event.start_mark)
        elif isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            tag = event.tag
            if tag is not None and tag != "!":
                self.explicit_tags.append((str(tag), event.start_mark))
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested more than {MAX_DEPTH} levels deep (a policy needs five)",
                event.start_mark,  # type: ignore[arg-type]  # libyaml's Mark is one too
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _pos(mark: _Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    if isinstance(node, ScalarNode) and node.style is None and text in _NULLS:
        return "an empty value"
    return f"{text!r}"


def _hex(tag: int, width: TagWidth) -> str:
    return f"{tag:#0{2 + int(width) // 4}x}"


# --- drafts: what was read, with the nodes to point at -----------------------------------------
@dataclass
class _Device:
    bdf: str
    key: ScalarNode
    path: str
    tph: bool | None = None
    extended_tph: bool | None = None
    on_violation: OnViolation | None = None
    fallback_cpu: int | None = None
    nodes: dict[str, Node] = field(default_factory=dict)

    def settings(self) -> DeviceSettings:
        return DeviceSettings(
            bdf=self.bdf,
            tph=True if self.tph is None else self.tph,
            extended_tph=True if self.extended_tph is None else self.extended_tph,
            on_violation=self.on_violation,
            fallback_cpu=self.fallback_cpu,
        )


@dataclass
class _Vm:
    name: str
    key: ScalarNode
    path: str
    cpus: frozenset[int] | None = None
    vcpus: list[tuple[int, Node]] | None = None
    vcpus_node: Node | None = None
    on_violation: OnViolation = OnViolation.DROP
    fallback_cpu: int | None = None
    share: list[tuple[str, Node]] = field(default_factory=list)
    tph: bool = True
    extended_tph: bool = True
    devices: list[_Device] = field(default_factory=list)
    read_ok: bool = False  # its value was a mapping
    nodes: dict[str, Node] = field(default_factory=dict)
    tags_complete: bool = True  # every CPU of the VM has an entry in steering_tags

    def model(self) -> VmPolicy:
        return VmPolicy(
            name=self.name,
            cpus=self.cpus or frozenset(),
            on_violation=self.on_violation,
            vcpus=tuple(c for c, _ in self.vcpus) if self.vcpus is not None else None,
            fallback_cpu=self.fallback_cpu,
            devices={d.bdf: d.settings() for d in self.devices},
            share_cpus_with=frozenset(n for n, _ in self.share),
            tph=self.tph,
            extended_tph=self.extended_tph,
        )


class _HostView(HostPolicy):
    """A host model whose ``owners`` and ``neutral`` are computed once per width.

    The checks ask for them once per neutral tag, per VM and per tag of a VM (directly and
    through ``TagRules.build``); recomputing them over every CPU or neutral tag each time made
    checking a policy quadratic: a few kilobytes of ``neutral_tags`` on an 8192-CPU host took
    minutes.
    """

    def owners(self, width: TagWidth) -> dict[int, frozenset[int]]:
        memo: dict[TagWidth, dict[int, frozenset[int]]]
        memo = self.__dict__.setdefault("_owners_memo", {})  # frozen: no attribute assignment
        found = memo.get(width)
        if found is None:
            found = memo[width] = super().owners(width)
        return found

    def neutral(self, width: TagWidth) -> frozenset[int]:
        memo: dict[TagWidth, frozenset[int]] = self.__dict__.setdefault("_neutral_memo", {})
        found = memo.get(width)
        if found is None:
            found = memo[width] = super().neutral(width)
        return found


# --- the reader -------------------------------------------------------------------------------
class _Reader:
    def __init__(self, name: str) -> None:
        self.name = name
        self.problems: list[Problem] = []
        self._visited: set[int] = set()
        self.version_ok = False
        self.host_ok = False
        self.steering: dict[int, CpuTags] = {}
        self.steering_lines: dict[int, int] = {}
        self.neutral: list[tuple[int, Node]] = []
        self.vms: list[_Vm] = []
        self.vms_node: Node | None = None
        self.vms_empty = False
        self._host_view: HostPolicy | None = None
        self._vms_of_cpu: dict[int, list[str]] | None = None

    # problems
    def report(
        self,
        at: Node | _Mark | None,
        rule: str,
        message: str,
        path: str = "",
        level: str = "error",
    ) -> None:
        mark = at.start_mark if isinstance(at, Node) else at
        line, column = _pos(mark)
        self.problems.append(Problem(line, column, rule, message, path, self.name, level))

    def warn(self, at: Node | None, rule: str, message: str, path: str = "") -> None:
        self.report(at, rule, message, path, "warning")

    @property
    def n_errors(self) -> int:
        return sum(1 for p in self.problems if p.level == "error")

    # structure
    def mapping(self, node: Node, path: str, what: str) -> list[tuple[ScalarNode, Node]] | None:
        """Entries of a mapping with text keys; repeated keys are reported and skipped."""
        if not isinstance(node, MappingNode):
            self.report(
                node, "wrong-type", f"{what} must be a mapping, not {_describe(node)}", path
            )
            return None
        if id(node) in self._visited:  # reached again through an alias (already reported)
            return None
        self._visited.add(id(node))
        seen: dict[str, ScalarNode] = {}
        out: list[tuple[ScalarNode, Node]] = []
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                self.report(key, "wrong-type", f"keys of {what} must be text, not {_describe(key)}")
                continue
            if key.tag == _MERGE_TAG:
                self.report(key, "alias", "merge keys (<<) are not used in policies: write it out")
                continue
            text = str(key.value)
            if text in seen:
                first = _pos(seen[text].start_mark)[0]
                self.report(
                    key,
                    "duplicate-key",
                    f"duplicate key {text!r} in {what} (first at line {first}); YAML loaders "
                    "silently keep only the last one",
                    _join(path, text),
                )
                continue
            seen[text] = key
            out.append((key, value))
        return out

    def fields(
        self,
        node: Node,
        path: str,
        what: str,
        known: Mapping[str, bool],
        owner: Node | None = None,
    ) -> dict[str, tuple[ScalarNode, Node]] | None:
        """A mapping with a fixed set of keys (``known``: key -> required)."""
        entries = self.mapping(node, path, what)
        if entries is None:
            return None
        out: dict[str, tuple[ScalarNode, Node]] = {}
        suggested: set[str] = set()
        for key, value in entries:
            name = str(key.value)
            if name not in known:
                hint = difflib.get_close_matches(name, list(known), n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else f" (known: {', '.join(known)})"
                self.report(key, "unknown-key", f"unknown key {name!r} in {what}{also}", path)
                suggested.update(hint)
                continue
            out[name] = (key, value)
        for name, required in known.items():
            # a misspelt required key is reported once, as the unknown key
            if required and name not in out and name not in suggested:
                at = owner if owner is not None else node
                self.report(at, "missing-key", f"missing key {name!r} in {what}", path)
        return out

    def sequence(self, node: Node, path: str, what: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.report(node, "wrong-type", f"{what} must be a list, not {_describe(node)}", path)
            return None
        if id(node) in self._visited:
            return None
        self._visited.add(id(node))
        return list(node.value)

    # scalars
    def surprise(self, node: ScalarNode, path: str, what: str, *, numbers: bool) -> bool:
        """Report a plain scalar YAML 1.1 reads unlike its text; True when reported."""
        if node.style is not None:
            return False
        text = str(node.value)
        if text in _TRUTHY:
            self.report(
                node,
                "truthy",
                f"{text!r} is a boolean in YAML 1.1, not {what}; quote it if you mean the text",
                path,
            )
            return True
        if _SEXAGESIMAL.match(text):
            self.report(
                node,
                "sexagesimal",
                f"{text!r} is a base-60 number ({_base60(text)}) in YAML 1.1 but text in YAML "
                f"1.2; {'write a plain number' if numbers else 'quote it if you mean the text'}",
                path,
            )
            return True
        if numbers and _LEADING_ZERO.match(text):
            self.report(
                node,
                "octal-values",
                f"{text!r} has a leading zero: YAML 1.1 reads {_octal_reading(text)}; write it "
                "without the zero (decimal) or as 0x hex",
                path,
            )
            return True
        return False

    def scalar(self, node: Node, path: str, what: str) -> ScalarNode | None:
        if isinstance(node, ScalarNode):
            return node
        self.report(
            node, "wrong-type", f"{what} must be a single value, not {_describe(node)}", path
        )
        return None

    def integer(self, node: Node, path: str, what: str) -> int | None:
        s = self.scalar(node, path, what)
        if s is None:
            return None
        text = str(s.value)
        if s.style is not None:
            self.report(
                s,
                "wrong-type",
                f"{what} is quoted text {text!r}: write the number without quotes "
                "(decimal, or hex like 0x1f)",
                path,
            )
            return None
        if text in _NULLS:
            self.report(s, "wrong-type", f"{what} is empty: a number is needed here", path)
            return None
        if self.surprise(s, path, what, numbers=True):
            return None
        if len(text) > MAX_DIGITS and (_DECIMAL.match(text) or _HEX.match(text)):
            # Far past every range below; and int() refuses more than 4300 decimal digits
            # with a ValueError, which used to escape the loader.
            self.report(
                s,
                "bad-value",
                f"{what} is a number of {len(text)} characters: far outside any value here",
                path,
            )
            return None
        if _DECIMAL.match(text):
            return int(text)
        if _HEX.match(text):
            return int(text, 16)
        self.report(
            s,
            "wrong-type",
            f"{what} must be a whole number in decimal or 0x hex, not {text!r}",
            path,
        )
        return None

    def boolean(self, node: Node, path: str, what: str) -> bool | None:
        s = self.scalar(node, path, what)
        if s is None:
            return None
        text = str(s.value)
        if s.style is None and text in _BOOLS:
            return _BOOLS[text]
        if s.style is None and text in _TRUTHY:
            self.report(
                s,
                "truthy",
                f"{text!r} is a boolean in YAML 1.1 but text in YAML 1.2: write true or false",
                path,
            )
            return None
        self.report(s, "wrong-type", f"{what} must be true or false, not {_describe(s)}", path)
        return None

    def text(self, node: Node, path: str, what: str) -> str | None:
        s = self.scalar(node, path, what)
        if s is None:
            return None
        text = str(s.value)
        if s.style is None and text in _NULLS:
            self.report(s, "wrong-type", f"{what} is empty", path)
            return None
        if s.style is None and text in _BOOLS:
            self.report(s, "wrong-type", f"{what} must be text, not the boolean {text}", path)
            return None
        if self.surprise(s, path, what, numbers=False):
            return None
        return text

    def choice(self, node: Node, path: str, what: str) -> OnViolation | None:
        text = self.text(node, path, what)
        if text is None:
            return None
        try:
            return OnViolation(text)
        except ValueError:
            options = ", ".join(v.value for v in OnViolation)
            self.report(node, "bad-value", f"{what} must be one of {options}, not {text!r}", path)
            return None

    def cpu(self, node: Node, path: str, what: str) -> int | None:
        value = self.integer(node, path, what)
        if value is None:
            return None
        if not 0 <= value < MAX_CPUS:
            self.report(node, "bad-value", f"{what} {value} is not a CPU number (0-8191)", path)
            return None
        return value

    def cpulist(
        self, node: Node, path: str, what: str, *, empty_rule: str
    ) -> frozenset[int] | None:
        s = self.scalar(node, path, what)
        if s is None:
            return None
        text = str(s.value)
        if (s.style is None and text in _NULLS) or not text.strip():
            self.report(s, empty_rule, f"{what} is empty: list at least one CPU", path)
            return None
        if s.style is None and text in _BOOLS:
            self.report(s, "bad-cpulist", f"{what} must be a cpulist like 0-3,8, not {text}", path)
            return None
        if self.surprise(s, path, what, numbers=True):
            return None
        try:
            return parse_policy_cpulist(text)
        except ValueError as exc:
            self.report(s, "bad-cpulist", f"{what} is not a Linux cpulist: {exc}", path)
            return None

    def tag(self, node: Node, path: str, what: str, width: TagWidth) -> int | None:
        value = self.integer(node, path, what)
        if value is None:
            return None
        if not 0 <= value <= width.mask:
            self.report(
                node,
                "tag-out-of-range",
                f"{what} {value:#x} does not fit in {int(width)} bits "
                f"({_hex(0, width)}-{_hex(width.mask, width)})",
                path,
            )
            return None
        return value

    # --- the sections ------------------------------------------------------------------------
    def read(self, root: Node) -> None:
        top = self.fields(root, "", "the policy", _TOP_KEYS)
        if top is None:
            return
        if "version" in top:
            node = top["version"][1]
            version = self.integer(node, "version", "version")
            if version is not None and version != POLICY_VERSION:
                self.report(
                    node,
                    "bad-version",
                    f"policy version {version} is not supported (this tphtrap reads version "
                    f"{POLICY_VERSION})",
                    "version",
                )
            self.version_ok = version == POLICY_VERSION
        if "host" in top:
            before = self.n_errors
            self.read_host(*top["host"])
            self.host_ok = self.n_errors == before
        if "vms" in top:
            self.read_vms(*top["vms"])

    def read_host(self, key: ScalarNode, node: Node) -> None:
        host = self.fields(node, "host", "host", _HOST_KEYS, owner=key)
        if host is None:
            return
        if "steering_tags" in host:
            self.read_steering(*host["steering_tags"])
        if "neutral_tags" in host:
            path = "host.neutral_tags"
            items = self.sequence(host["neutral_tags"][1], path, "neutral_tags")
            seen: set[int] = set()
            for i, item in enumerate(items or ()):
                tag = self.tag(item, f"{path}[{i}]", "a neutral tag", TagWidth.ST16)
                if tag is None:
                    continue
                if tag in seen:
                    self.warn(item, "duplicate-item", f"neutral tag {tag:#x} is listed twice", path)
                    continue
                seen.add(tag)
                self.neutral.append((tag, item))

    def read_steering(self, key: ScalarNode, node: Node) -> None:
        path = "host.steering_tags"
        entries = self.mapping(node, path, "steering_tags")
        if entries is None:
            return
        for cpus_key, value in entries:
            where = _join(path, str(cpus_key.value))
            cpus = self.cpulist(cpus_key, where, "CPU list", empty_rule="bad-cpulist")
            tags = self.fields(
                value, where, f"steering_tags entry {cpus_key.value!r}", _TAG_KEYS, owner=cpus_key
            )
            st: dict[str, int | None] = {"st8": None, "st16": None}
            tags_ok = tags is not None and len(tags) == len(_TAG_KEYS)
            for width, name in _WIDTH_KEYS.items():
                if tags is None or name not in tags:
                    continue
                tnode = tags[name][1]
                if isinstance(tnode, ScalarNode) and tnode.style is None and tnode.value in _NULLS:
                    continue  # the firmware reports no valid tag at this width
                st[name] = self.tag(tnode, f"{where}.{name}", name, width)
                tags_ok = tags_ok and st[name] is not None
            if cpus is None:
                continue
            again = sorted(c for c in cpus if c in self.steering_lines)
            if again:
                lines = sorted({self.steering_lines[c] for c in again})
                self.report(
                    cpus_key,
                    "duplicate-cpu",
                    f"{_cpus_word(again)} already {'has' if len(again) == 1 else 'have'} tags "
                    f"(line {', '.join(map(str, lines))}); give each CPU its tags once",
                    where,
                )
            line = _pos(cpus_key.start_mark)[0]
            for cpu in cpus:
                if cpu in self.steering_lines:
                    continue
                self.steering_lines[cpu] = line
                if tags_ok:
                    self.steering[cpu] = CpuTags(cpu, st["st8"], st["st16"])

    def read_vms(self, key: ScalarNode, node: Node) -> None:
        self.vms_node = key
        entries = self.mapping(node, "vms", "vms")
        if entries is None:
            return
        self.vms_empty = not entries
        for name_key, value in entries:
            name = str(name_key.value)
            path = _join("vms", name)
            if name_key.style is None and (name in _NULLS or name in _BOOLS):
                self.report(name_key, "bad-name", f"{_describe(name_key)} is not a VM name", path)
                continue
            if self.surprise(name_key, path, "a VM name", numbers=False):
                continue
            if not _NAME.match(name) or len(name) > MAX_NAME:
                self.report(
                    name_key,
                    "bad-name",
                    f"VM name {name!r} must start with a letter and hold only letters, digits, "
                    f"'-', '_' and '.' (at most {MAX_NAME})",
                    path,
                )
                continue
            self.read_vm(_Vm(name, name_key, path), value)

    def read_vm(self, vm: _Vm, node: Node) -> None:
        self.vms.append(vm)
        what = f"VM {vm.name!r}"
        f = self.fields(node, vm.path, what, _VM_KEYS, owner=vm.key)
        if f is None:
            return
        vm.read_ok = True
        vm.nodes = {k: v for k, (_, v) in f.items()}
        p = vm.path
        if "cpus" in f:
            vm.cpus = self.cpulist(
                f["cpus"][1], f"{p}.cpus", "cpus", empty_rule="empty-allowed-set"
            )
        if "vcpus" in f:
            vm.vcpus_node = f["vcpus"][1]
            items = self.sequence(vm.vcpus_node, f"{p}.vcpus", "vcpus")
            if items is not None:
                pins: list[tuple[int, Node]] = []
                for i, item in enumerate(items):
                    cpu = self.cpu(item, f"{p}.vcpus[{i}]", f"the host CPU of vCPU {i}")
                    if cpu is not None:
                        pins.append((cpu, item))
                if not items:
                    self.report(vm.vcpus_node, "wrong-type", "vcpus is an empty list", f"{p}.vcpus")
                elif len(items) > MAX_VCPUS:
                    self.report(
                        vm.vcpus_node,
                        "too-many-vcpus",
                        f"{len(items)} vCPUs: virtual tags are 8-bit, so at most {MAX_VCPUS}",
                        f"{p}.vcpus",
                    )
                elif len(pins) == len(items):
                    vm.vcpus = pins
        if "on_violation" in f:
            vm.on_violation = (
                self.choice(f["on_violation"][1], f"{p}.on_violation", "on_violation")
                or vm.on_violation
            )
        if "fallback_cpu" in f:
            vm.fallback_cpu = self.cpu(f["fallback_cpu"][1], f"{p}.fallback_cpu", "fallback_cpu")
        if "share_cpus_with" in f:
            items = self.sequence(
                f["share_cpus_with"][1], f"{p}.share_cpus_with", "share_cpus_with"
            )
            names: set[str] = set()
            for i, item in enumerate(items or ()):
                other = self.text(item, f"{p}.share_cpus_with[{i}]", "a VM name")
                if other is None:
                    continue
                if other in names:
                    self.warn(item, "duplicate-item", f"{other!r} is listed twice", p)
                    continue
                names.add(other)
                vm.share.append((other, item))
        for flag in ("tph", "extended_tph"):
            if flag in f:
                value = self.boolean(f[flag][1], f"{p}.{flag}", flag)
                if value is not None:
                    setattr(vm, flag, value)
        if "devices" in f:
            self.read_devices(vm, f["devices"][1])

    def read_devices(self, vm: _Vm, node: Node) -> None:
        path = f"{vm.path}.devices"
        entries = self.mapping(node, path, f"the devices of VM {vm.name!r}")
        if entries is None:
            return
        seen: dict[str, ScalarNode] = {}
        for key, value in entries:
            raw = str(key.value)
            try:
                bdf = normalize_bdf(raw)
            except ValueError as exc:
                self.report(key, "bad-bdf", f"{exc}", _join(path, raw))
                continue
            dpath = _join(path, bdf)
            if bdf in seen:
                first = seen[bdf]
                self.report(
                    key,
                    "duplicate-key",
                    f"device {raw!r} is {bdf}, already listed as {first.value!r} at line "
                    f"{_pos(first.start_mark)[0]}",
                    dpath,
                )
                continue
            seen[bdf] = key
            dev = _Device(bdf, key, dpath)
            vm.devices.append(dev)
            if isinstance(value, ScalarNode) and value.style is None and value.value in _NULLS:
                continue  # "0000:3b:00.0:" with no value: the VM's settings
            f = self.fields(value, dpath, f"device {bdf}", _DEVICE_KEYS)
            if f is None:
                continue
            dev.nodes = {k: v for k, (_, v) in f.items()}
            for flag in ("tph", "extended_tph"):
                if flag in f:
                    setattr(dev, flag, self.boolean(f[flag][1], f"{dpath}.{flag}", flag))
            if "on_violation" in f:
                dev.on_violation = self.choice(
                    f["on_violation"][1], f"{dpath}.on_violation", "on_violation"
                )
            if "fallback_cpu" in f:
                dev.fallback_cpu = self.cpu(
                    f["fallback_cpu"][1], f"{dpath}.fallback_cpu", "fallback_cpu"
                )

    # --- meaning: checks across sections -----------------------------------------------------
    def check(self) -> None:
        self.check_neutral()
        self.check_vms_present()
        for vm in self.vms:
            self.check_cpus_have_tags(vm)
        self.check_sharing()
        self.check_devices_unique()
        for vm in self.vms:
            self.check_pins(vm)
            self.check_tags(vm)
            self.check_no_effect(vm)

    def host_model(self, kind: type[HostPolicy] = HostPolicy) -> HostPolicy:
        return kind(dict(self.steering), frozenset(t for t, _ in self.neutral))

    def host_view(self) -> HostPolicy:
        """The host model for the checks, built once (they run after reading)."""
        if self._host_view is None:
            self._host_view = self.host_model(_HostView)
        return self._host_view

    def owner_words(self, cpus: Iterable[int]) -> str:
        """'CPUs 4-5 (tenant-b), 6 (no VM)': who the CPUs belong to."""
        if self._vms_of_cpu is None:  # built once: the checks call this per tag and per VM
            self._vms_of_cpu = {}
            for vm in self.vms:
                for c in vm.cpus or ():
                    self._vms_of_cpu.setdefault(c, []).append(vm.name)
        groups: dict[str, list[int]] = {}
        for cpu in cpus:
            owners = self._vms_of_cpu.get(cpu, [])
            groups.setdefault(", ".join(owners) or "no VM", []).append(cpu)
        parts = [f"{format_cpulist(c)} ({who})" for who, c in groups.items()]
        n = sum(len(c) for c in groups.values())
        return ("CPUs " if n > 1 else "CPU ") + ", ".join(parts)

    def check_neutral(self) -> None:
        if not self.host_ok:
            return
        host = self.host_view()
        for tag, node in self.neutral:
            for width in TagWidth:
                owners = host.owners(width).get(tag)
                if tag <= width.mask and owners:
                    self.report(
                        node,
                        "neutral-tag-owned",
                        f"tag {_hex(tag, width)} is listed as neutral but is the "
                        f"{_WIDTH_WORDS[width]} tag "
                        f"of {self.owner_words(sorted(owners))}: a neutral tag is allowed to "
                        "every VM, so it must not steer to any CPU",
                        "host.neutral_tags",
                    )
                    break

    def check_vms_present(self) -> None:
        if self.vms_empty:
            self.warn(self.vms_node, "no-vms", "the policy defines no VMs: every device is refused")
        for vm in self.vms:
            devices = vm.nodes.get("devices")
            if vm.read_ok and (
                devices is None or (isinstance(devices, MappingNode) and not devices.value)
            ):
                self.warn(
                    vm.key,
                    "no-devices",
                    f"VM {vm.name!r} has no devices: nothing can be attached to it",
                    vm.path,
                )

    def check_cpus_have_tags(self, vm: _Vm) -> None:
        if vm.cpus is None or not self.host_ok:
            vm.tags_complete = False
            return
        missing = sorted(vm.cpus - self.steering.keys())
        if missing:
            vm.tags_complete = False
            self.report(
                vm.nodes["cpus"],
                "cpu-without-tags",
                f"{_cpus_word(missing)} of VM {vm.name!r} {'has' if len(missing) == 1 else 'have'} "
                "no entry in host.steering_tags (write null for a tag the firmware does not "
                "report)",
                f"{vm.path}.cpus",
            )

    def check_sharing(self) -> None:
        names = {vm.name for vm in self.vms}
        for vm in self.vms:
            for other, node in vm.share:
                if other == vm.name:
                    self.warn(node, "no-effect", "a VM need not share CPUs with itself", vm.path)
                elif other not in names:
                    self.report(
                        node,
                        "unknown-vm",
                        f"share_cpus_with names {other!r}, which is not a VM of this policy",
                        f"{vm.path}.share_cpus_with",
                    )
        for i, later in enumerate(self.vms):
            if later.cpus is None:
                continue
            for earlier in self.vms[:i]:
                common = (earlier.cpus or frozenset()) & later.cpus
                if not common:
                    continue
                a = any(n == later.name for n, _ in earlier.share)
                b = any(n == earlier.name for n, _ in later.share)
                if a and b:
                    continue
                if a or b:
                    who, whom = (earlier, later) if a else (later, earlier)
                    how = (
                        f"{who.name!r} allows it, but {whom.name!r} does not list {who.name!r} in "
                        "share_cpus_with"
                    )
                else:
                    how = "list each VM in the other's share_cpus_with if this is intended"
                self.report(
                    later.nodes["cpus"],
                    "shared-cpu",
                    f"VMs {earlier.name!r} and {later.name!r} share {_cpus_word(common)}: each "
                    f"could steer into the other's caches; {how}",
                    f"{later.path}.cpus",
                )

    def check_devices_unique(self) -> None:
        owner: dict[str, tuple[_Vm, _Device]] = {}
        for vm in self.vms:
            for dev in vm.devices:
                if dev.bdf in owner:
                    first_vm, first = owner[dev.bdf]
                    self.report(
                        dev.key,
                        "device-in-two-vms",
                        f"device {dev.bdf} is already assigned to VM {first_vm.name!r} (line "
                        f"{_pos(first.key.start_mark)[0]}); a device belongs to one VM",
                        dev.path,
                    )
                else:
                    owner[dev.bdf] = (vm, dev)

    def check_pins(self, vm: _Vm) -> None:
        """vCPU pins and fallback CPUs must be CPUs of the VM."""
        if vm.cpus is None:
            return
        for i, (cpu, node) in enumerate(vm.vcpus or ()):
            if cpu not in vm.cpus:
                self.report(
                    node,
                    "vcpu-outside-cpus",
                    f"vCPU {i} is pinned to CPU {cpu}, which is not in the cpus of VM "
                    f"{vm.name!r} ({format_cpulist(vm.cpus)})",
                    f"{vm.path}.vcpus[{i}]",
                )
        for where, cpu, node in self.fallbacks(vm):
            if cpu not in vm.cpus:
                self.report(
                    node,
                    "fallback-not-allowed",
                    f"fallback CPU {cpu} is not in the cpus of VM {vm.name!r} "
                    f"({format_cpulist(vm.cpus)})",
                    where,
                )

    def fallbacks(self, vm: _Vm) -> list[tuple[str, int, Node]]:
        out: list[tuple[str, int, Node]] = []
        if vm.fallback_cpu is not None:
            out.append((f"{vm.path}.fallback_cpu", vm.fallback_cpu, vm.nodes["fallback_cpu"]))
        for dev in vm.devices:
            if dev.fallback_cpu is not None:
                out.append(
                    (f"{dev.path}.fallback_cpu", dev.fallback_cpu, dev.nodes["fallback_cpu"])
                )
        return out

    def check_tags(self, vm: _Vm) -> None:
        """What the strict ownership rule leaves the VM, at the widths that can be in force."""
        if vm.cpus is None or not vm.tags_complete:
            return
        model = vm.model()
        devs = list(model.devices.values())
        tph = model.tph and (not devs or any(d.tph for d in devs))
        if not tph:
            return
        ext = model.extended_tph and (not devs or any(d.tph and d.extended_tph for d in devs))
        widths = [TagWidth.ST8, TagWidth.ST16] if ext else [TagWidth.ST8]
        host = self.host_view()
        rules = TagRules.build(host, model, DeviceSettings(bdf="-"))
        live = [w for w in widths if rules.allowed[w]]
        cpus_node = vm.nodes["cpus"]
        if not live:
            self.report(
                cpus_node,
                "empty-allowed-set",
                f"VM {vm.name!r} may use TPH but no steering tag is allowed for it: "
                f"{self.foreign_words(host, vm, widths[0])}. Give it whole cache domains, add a "
                "neutral tag, or set tph: false",
                f"{vm.path}.cpus",
            )
            return
        for width in widths:
            if width not in live:
                effect = (
                    "Extended TPH will be downgraded to TPH only"
                    if width is TagWidth.ST16
                    else "TPH only (8-bit) requests will never get a tag"
                )
                self.warn(
                    cpus_node,
                    "empty-allowed-set",
                    f"no {_WIDTH_WORDS[width]} tag is allowed for VM {vm.name!r}: {effect}",
                    f"{vm.path}.cpus",
                )
        shut: set[int] = set()
        why: list[str] = []
        for width in live:
            lost = {
                c
                for c in vm.cpus
                if (t := host.steering_tags[c].tag(width)) is not None
                and t not in rules.allowed[width]
            }
            if lost:
                shut |= lost
                why.append(self.foreign_words(host, vm, width, untagged=False))
        if shut:
            self.warn(
                cpus_node,
                "tag-shared-outside",
                f"devices of VM {vm.name!r} cannot steer to {_cpus_word(shut)}: {'; '.join(why)}",
                f"{vm.path}.cpus",
            )
        self.check_vcpu_tags(vm, host, rules, live)
        self.check_fallback_tags(vm, host, rules, live)

    def foreign_words(
        self, host: HostPolicy, vm: _Vm, width: TagWidth, *, untagged: bool = True
    ) -> str:
        """Why the VM's CPUs' tags at ``width`` are not its own."""
        cpus = vm.cpus or frozenset()
        owners = host.owners(width)
        reasons: list[str] = []
        for tag in sorted({t for c in cpus if (t := host.steering_tags[c].tag(width)) is not None}):
            outside = sorted(owners[tag] - cpus)
            if outside and tag not in host.neutral(width):
                reasons.append(
                    f"{_WIDTH_WORDS[width]} tag {_hex(tag, width)} is shared with "
                    f"{self.owner_words(outside)}"
                )
        nameless = sorted(c for c in cpus if host.steering_tags[c].tag(width) is None)
        if nameless and untagged:
            reasons.append(
                f"the firmware reports no {_WIDTH_WORDS[width]} tag for {_cpus_word(nameless)}"
            )
        return "; ".join(reasons) or "no tag applies"

    def check_vcpu_tags(
        self, vm: _Vm, host: HostPolicy, rules: TagRules, widths: list[TagWidth]
    ) -> None:
        assert vm.cpus is not None
        for i, (cpu, node) in enumerate(vm.vcpus or ()):
            if cpu not in vm.cpus:
                continue  # reported as vcpu-outside-cpus
            where = f"{vm.path}.vcpus[{i}]"
            foreign: list[str] = []
            missing: list[str] = []
            for width in widths:
                tag = host.steering_tags[cpu].tag(width)
                if tag is None:
                    missing.append(_WIDTH_WORDS[width])
                elif tag not in rules.allowed[width]:
                    outside = sorted(host.owners(width)[tag] - vm.cpus)
                    foreign.append(
                        f"its {_WIDTH_WORDS[width]} tag {_hex(tag, width)} is shared with "
                        f"{self.owner_words(outside)}"
                    )
            if foreign:
                self.report(
                    node,
                    "vcpu-tag-foreign",
                    f"vCPU {i} is pinned to CPU {cpu}, but {' and '.join(foreign)}: virtual tag "
                    f"{i} could never be honoured; pin it to a CPU whose tag the VM owns",
                    where,
                )
            elif missing:
                self.warn(
                    node,
                    "vcpu-without-tag",
                    f"vCPU {i} is pinned to CPU {cpu}, for which the firmware reports no "
                    f"{' or '.join(missing)} tag: virtual tag {i} will be treated as a violation",
                    where,
                )

    def check_fallback_tags(
        self, vm: _Vm, host: HostPolicy, rules: TagRules, widths: list[TagWidth]
    ) -> None:
        assert vm.cpus is not None
        for where, cpu, node in self.fallbacks(vm):
            if cpu not in vm.cpus:
                continue  # reported by check_pins
            bad: list[str] = []
            for width in widths:
                tag = host.steering_tags[cpu].tag(width)
                if tag is None:
                    bad.append(f"the firmware reports no {_WIDTH_WORDS[width]} tag for it")
                elif tag not in rules.allowed[width]:
                    outside = sorted(host.owners(width)[tag] - vm.cpus)
                    bad.append(
                        f"its {_WIDTH_WORDS[width]} tag {_hex(tag, width)} is shared with "
                        f"{self.owner_words(outside)}"
                    )
            if bad:
                self.report(
                    node,
                    "fallback-not-allowed",
                    f"fallback CPU {cpu} cannot be the fallback of VM {vm.name!r}: "
                    f"{'; '.join(bad)}",
                    where,
                )
        # Without fallback_cpu the fallback is the first CPU's allowed tag, else a neutral
        # tag: it exists whenever the allowed set is not empty (checked elsewhere).

    def check_no_effect(self, vm: _Vm) -> None:
        if vm.fallback_cpu is not None:
            uses = vm.on_violation is OnViolation.REWRITE or any(
                d.on_violation is OnViolation.REWRITE and d.fallback_cpu is None for d in vm.devices
            )
            if not uses:
                self.warn(
                    vm.nodes["fallback_cpu"],
                    "no-effect",
                    "fallback_cpu only matters with on_violation: rewrite",
                    f"{vm.path}.fallback_cpu",
                )
        for dev in vm.devices:
            onv = dev.on_violation or vm.on_violation
            if dev.fallback_cpu is not None and onv is not OnViolation.REWRITE:
                self.warn(
                    dev.nodes["fallback_cpu"],
                    "no-effect",
                    "fallback_cpu only matters with on_violation: rewrite",
                    f"{dev.path}.fallback_cpu",
                )
            if dev.tph is True and not vm.tph:
                self.warn(
                    dev.nodes["tph"],
                    "no-effect",
                    f"VM {vm.name!r} sets tph: false, which a device cannot override",
                    f"{dev.path}.tph",
                )
            if dev.extended_tph is True and not vm.extended_tph:
                self.warn(
                    dev.nodes["extended_tph"],
                    "no-effect",
                    f"VM {vm.name!r} sets extended_tph: false, which a device cannot override",
                    f"{dev.path}.extended_tph",
                )

    def policy(self) -> Policy:
        vms = {vm.name: vm.model() for vm in self.vms}
        return Policy(self.host_model(), vms, self.name)


# --- helpers ----------------------------------------------------------------------------------
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _cpus_word(cpus: Iterable[int]) -> str:
    cpus = sorted(cpus)
    return f"{'CPU' if len(cpus) == 1 else 'CPUs'} {format_cpulist(cpus)}"


def _base60(text: str) -> str:
    if len(text) > MAX_DIGITS:  # int() and str() refuse more than 4300 decimal digits
        return f"a number of {len(text)} characters"
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").replace("_", "").partition(".")
    value = 0
    for digits in whole.split(":"):
        value = value * 60 + int(digits)
    return str(sign * value) + (f".{frac}" if frac else "")


def _octal_reading(text: str) -> str:
    digits = text.lstrip("+-").replace("_", "")
    digits = digits[2:] if digits[:2].lower() == "0o" else digits[1:]
    if digits and all(c in "01234567" for c in digits):
        if len(digits) > MAX_DIGITS:  # str() refuses to write more than 4300 digits
            return "it as a (very large) octal number"
        return f"it as octal {int(digits, 8)}"
    return "it as text, other readers as a number"


def _syntax_problem(exc: yaml.YAMLError, text: str, name: str) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, column = _pos(mark)
        message = exc.problem or exc.context or "malformed YAML"
        if exc.context and exc.problem:
            message = f"{exc.problem} ({exc.context})"
        return Problem(line, column, "syntax", message, "", name)
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        return Problem(
            line, column, "syntax", f"character {exc.character!r} is not allowed", "", name
        )
    return Problem(1, 1, "syntax", str(exc), "", name)


# --- the public API ---------------------------------------------------------------------------
def read_policy_text(text: str, name: str = "<policy>") -> tuple[Policy | None, list[Problem]]:
    """Read a policy: the Policy (None if any error) and every problem, in position order."""
    if text.startswith("\ufeff"):
        text = text[1:]
    odd = _YAML11_BREAKS.search(text)
    if odd is not None:
        at = odd.start()
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        message = (
            f"character U+{ord(odd.group()):04X} is a line break to YAML 1.1 readers but not to "
            "YAML 1.2 readers or editors, which would see another structure: use a newline"
        )
        return None, [Problem(line, column, "syntax", message, "", name)]
    try:
        composer = _Composer(text)  # the reader checks for unprintable characters right away
        try:
            root = composer.get_single_node()
        finally:
            composer.dispose()
    except yaml.YAMLError as exc:
        return None, [_syntax_problem(exc, text, name)]
    except RecursionError:  # MAX_DEPTH keeps clear of it, unless called with a deep stack
        return None, [Problem(1, 1, "syntax", "the YAML is nested too deeply", "", name)]
    reader = _Reader(name)
    for mark in composer.aliases:
        reader.report(mark, "alias", "aliases (*name) are not used in policies: write it out")
    for tag, mark in composer.explicit_tags:
        short = tag.replace("tag:yaml.org,2002:", "!!")
        reader.report(mark, "explicit-tag", f"explicit tag {short}: policies use plain values")
    if root is None or (
        isinstance(root, ScalarNode) and root.style is None and root.value in _NULLS
    ):
        reader.report(
            None, "empty-document", "the file holds no policy (expected version, host and vms)"
        )
        return None, sorted(reader.problems)
    reader.read(root)
    reader.check()
    problems = sorted(reader.problems)
    if any(p.level == "error" for p in problems) or not reader.version_ok:
        return None, problems
    return reader.policy(), problems


def read_policy(path: str | Path) -> tuple[Policy | None, list[Problem]]:
    """:func:`read_policy_text` for a file; an unreadable file is an ``unreadable`` problem."""
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)  # bounded: a path like /dev/zero never ends
    except OSError as exc:
        return None, [Problem(1, 1, "unreadable", f"cannot read: {exc.strerror or exc}", "", name)]
    except ValueError as exc:  # a NUL byte or a lone surrogate in the path
        return None, [Problem(1, 1, "unreadable", f"cannot read: {exc}", "", name)]
    if len(data) > MAX_POLICY_BYTES:
        message = f"larger than {MAX_POLICY_BYTES >> 20} MiB: not a policy"
        return None, [Problem(1, 1, "unreadable", message, "", name)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        return None, [Problem(line, column, "unreadable", "not UTF-8 text", "", name)]
    return read_policy_text(text, name)


def check_policy_text(text: str, name: str = "<policy>") -> list[Problem]:
    """Every problem in a policy, errors and warnings, in position order."""
    return read_policy_text(text, name)[1]


def load_policy_text(text: str, name: str = "<policy>") -> Policy:
    """The Policy a text describes; raises PolicyError listing every error."""
    policy, problems = read_policy_text(text, name)
    return _or_raise(policy, problems)


def load_policy(path: str | Path) -> Policy:
    """The Policy in a file; raises PolicyError listing every error."""
    policy, problems = read_policy(path)
    return _or_raise(policy, problems)


def _or_raise(policy: Policy | None, problems: list[Problem]) -> Policy:
    if policy is None:
        raise PolicyError([p for p in problems if p.level == "error"] or problems)
    return policy
