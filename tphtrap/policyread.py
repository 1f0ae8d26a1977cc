"""The positioned reader: policy YAML -> a :class:`PolicyDraft` that keeps every node's position.

The reader works on the composed YAML node tree (``yaml.SafeLoader`` composing only, never
constructing), so each problem carries the ``line:column`` of the node at fault, a kebab-case
rule id and a breadcrumb path, and every problem in a file is reported in one pass. It checks
the *shape* of a policy (keys, types, spellings, each key and CPU given once); what a policy
*means* is checked afterwards by the units in :mod:`tphtrap.policycheck`, which point at the
nodes the draft keeps.

Every scalar is read as the text the author wrote and interpreted by its place in the policy,
never by YAML 1.1's implicit typing. Where a plain scalar would read differently in a YAML 1.1
loader than it looks (``on`` -> true, ``010`` -> 8, ``1:30`` -> 90), the policy is rejected, so
the file means the same thing to every tool that reads it. PCI addresses are exempt: a device key
like ``0000:00:10.0`` (a base-60 float to YAML 1.1) is read as the address it spells.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import yaml
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .device import normalize_bdf
from .errors import Problem
from .policy import (
    MAX_CPUS,
    CpuTags,
    DeviceSettings,
    HostPolicy,
    OnViolation,
    VmPolicy,
    cpus_word,
    format_tag,
)
from .policy import parse_cpulist as parse_policy_cpulist
from .spec import TagWidth

__all__ = [
    "MAX_DEPTH",
    "MAX_DIGITS",
    "MAX_NAME",
    "MAX_VCPUS",
    "POLICY_VERSION",
    "READ_RULES",
    "TAG_PLACEHOLDER",
    "WIDTH_KEYS",
    "WIDTH_WORDS",
    "DeviceDraft",
    "PolicyDraft",
    "Reporter",
    "SteeringEntry",
    "VmDraft",
    "compose",
    "read_draft",
    "read_steering_tags",
]

POLICY_VERSION: Final = 1
MAX_VCPUS: Final = 256  # virtual tag i must fit in an 8-bit steering tag
MAX_NAME: Final = 64
MAX_DIGITS: Final = 32  # no number in a policy needs more characters (tags: 0xffff, CPUs: 8191)
#: What ``tphtrap policy init`` writes where it does not know a tag (rule ``tag-placeholder``).
TAG_PLACEHOLDER: Final = "TODO"

#: The rule ids the reader reports, with a one-line summary (docs/policy.md has the details).
READ_RULES: Final[Mapping[str, str]] = {
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
    "truthy": "yes/no/on/off/y/n and True/False: write true or false",
    "octal-values": "a number with a leading zero (YAML 1.1 reads 010 as octal 8)",
    "sexagesimal": "a number like 1:30 (YAML 1.1 reads it in base 60, as 90)",
    # host
    "bad-cpulist": "not a Linux cpulist (0-3,8 or 0-7:1/2)",
    "duplicate-cpu": "a CPU given steering tags twice in host.steering_tags",
    "tag-out-of-range": "a steering tag that does not fit its width (8 or 16 bits)",
    "tag-placeholder": "a steering tag still to be filled in (TODO, as policy init writes it)",
    # VMs and devices
    "too-many-vcpus": "more vCPUs than 8-bit virtual tags (256)",
    "bad-bdf": "a device key that is not a PCI address",
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
# Booleans to YAML 1.1 but text to YAML 1.2 (y/n: the YAML 1.1 spec, not PyYAML).
_TRUTHY_11: Final = frozenset(
    {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO"}
    | {"on", "On", "ON", "off", "Off", "OFF"}
)
# Booleans to YAML 1.1 and to the YAML 1.2 core schema, text to its JSON schema.
_TRUTHY_CORE: Final = frozenset({"True", "TRUE", "False", "FALSE"})
_TRUTHY: Final = _TRUTHY_11 | _TRUTHY_CORE
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_HEX = re.compile(r"0x[0-9a-fA-F]+\Z")  # lowercase x: YAML 1.1 and 1.2 agree on it
_LEADING_ZERO = re.compile(r"[-+]?0(?:[0-9_]+|[oO][0-7_]+)\Z")
# PyYAML's resolver: int ``[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+``, float adds ``\.[0-9_]*``.
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?\Z")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
# Line breaks to YAML 1.1 (PyYAML) only: YAML 1.2 readers and editors keep them inside the line,
# so the same file would have a different structure for them (and different line numbers).
_YAML11_BREAKS = re.compile("[\x85\u2028\u2029]")
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"

WIDTH_WORDS: Final = {TagWidth.ST8: "8-bit", TagWidth.ST16: "16-bit"}
WIDTH_KEYS: Final = {TagWidth.ST8: "st8", TagWidth.ST16: "st16"}


class _Mark(Protocol):
    """A position in the text (PyYAML's pure-Python or libyaml mark)."""

    @property
    def line(self) -> int: ...
    @property
    def column(self) -> int: ...


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


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.style is None and node.value in _NULLS


def _is_placeholder(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.style is None and node.value == TAG_PLACEHOLDER


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- problems ---------------------------------------------------------------------------------
class Reporter:
    """Collects the problems of one file, each positioned at a node or mark."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.problems: list[Problem] = []

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

    def warn(self, at: Node | _Mark | None, rule: str, message: str, path: str = "") -> None:
        self.report(at, rule, message, path, "warning")

    @property
    def n_errors(self) -> int:
        return sum(1 for p in self.problems if p.level == "error")

    def line_of(self, node: Node) -> int:
        return _pos(node.start_mark)[0]


# --- the draft: what was read, with the nodes to point at ---------------------------------------
@dataclass
class DeviceDraft:
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
class VmDraft:
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
    devices: list[DeviceDraft] = field(default_factory=list)
    read_ok: bool = False  # its value was a mapping
    nodes: dict[str, Node] = field(default_factory=dict)

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

    def fallbacks(self) -> list[tuple[str, int, Node]]:
        """Every ``fallback_cpu`` given (the VM's and its devices'), with path and node."""
        out: list[tuple[str, int, Node]] = []
        if self.fallback_cpu is not None:
            out.append((f"{self.path}.fallback_cpu", self.fallback_cpu, self.nodes["fallback_cpu"]))
        for dev in self.devices:
            if dev.fallback_cpu is not None:
                out.append(
                    (f"{dev.path}.fallback_cpu", dev.fallback_cpu, dev.nodes["fallback_cpu"])
                )
        return out


@dataclass(frozen=True)
class SteeringEntry:
    """One ``host.steering_tags`` entry as written: its CPUs, tags (None: null) and key node."""

    cpus: frozenset[int]
    st8: int | None
    st16: int | None
    key: ScalarNode
    placeholder: bool  # a tag is still TAG_PLACEHOLDER


@dataclass
class PolicyDraft:
    """A policy as read, every part with the node it came from; the checks work on this."""

    name: str
    version_ok: bool = False
    host_ok: bool = False  # host was read without an error
    steering: dict[int, CpuTags] = field(default_factory=dict)
    steering_lines: dict[int, int] = field(default_factory=dict)
    entries: list[SteeringEntry] = field(default_factory=list)
    steering_key: Node | None = None  # the "steering_tags" key, where host-wide problems point
    neutral: list[tuple[int, Node]] = field(default_factory=list)
    vms: list[VmDraft] = field(default_factory=list)
    vms_node: Node | None = None
    vms_empty: bool = False

    def host_model(self, kind: type[HostPolicy] = HostPolicy) -> HostPolicy:
        return kind(dict(self.steering), frozenset(t for t, _ in self.neutral))


# --- the reader -------------------------------------------------------------------------------
class _Reader:
    """Walks the node tree, fills a :class:`PolicyDraft` and reports shape problems."""

    def __init__(self, out: Reporter) -> None:
        self.out = out
        self.draft = PolicyDraft(out.name)
        self._visited: set[int] = set()

    def report(self, at: Node | None, rule: str, message: str, path: str = "") -> None:
        self.out.report(at, rule, message, path)

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
                first = self.out.line_of(seen[text])
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
            where = "YAML 1.1" if text in _TRUTHY_11 else "YAML 1.1 and the YAML 1.2 core schema"
            self.report(
                node,
                "truthy",
                f"{text!r} is a boolean in {where}, not {what}; quote it if you mean the text",
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
        if s.style is None and text in _TRUTHY_11:
            self.report(
                s,
                "truthy",
                f"{text!r} is a boolean in YAML 1.1 but text in YAML 1.2: write true or false",
                path,
            )
            return None
        if s.style is None and text in _TRUTHY_CORE:
            self.report(
                s,
                "truthy",
                f"{text!r} is a boolean in YAML 1.1 and the YAML 1.2 core schema but text in "
                f"its JSON schema: write {text.lower()}",
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
                f"({format_tag(0, width)}-{format_tag(width.mask, width)})",
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
            self.draft.version_ok = version == POLICY_VERSION
        if "host" in top:
            before = self.out.n_errors
            self.read_host(*top["host"])
            self.draft.host_ok = self.out.n_errors == before
        if "vms" in top:
            self.read_vms(*top["vms"])

    def read_host(self, key: ScalarNode, node: Node) -> None:
        host = self.fields(node, "host", "host", _HOST_KEYS, owner=key)
        if host is None:
            return
        if "steering_tags" in host:
            self.draft.steering_key = host["steering_tags"][0]
            self.read_steering(host["steering_tags"][1], "host.steering_tags")
        if "neutral_tags" in host:
            path = "host.neutral_tags"
            items = self.sequence(host["neutral_tags"][1], path, "neutral_tags")
            seen: set[int] = set()
            for i, item in enumerate(items or ()):
                tag = self.tag(item, f"{path}[{i}]", "a neutral tag", TagWidth.ST16)
                if tag is None:
                    continue
                if tag in seen:
                    self.out.warn(
                        item, "duplicate-item", f"neutral tag {tag:#x} is listed twice", path
                    )
                    continue
                seen.add(tag)
                self.draft.neutral.append((tag, item))

    def steering_tag(self, tnode: Node, where: str, width: TagWidth) -> tuple[int | None, bool]:
        """One st8/st16 value: (tag or None for null, whether it is read). A placeholder is
        not read and not reported here (see :meth:`placeholders`)."""
        name = WIDTH_KEYS[width]
        if _is_null(tnode):
            return None, True  # the firmware reports no valid tag at this width
        if _is_placeholder(tnode):
            return None, False
        tag = self.tag(tnode, f"{where}.{name}", name, width)
        return tag, tag is not None

    def placeholders(
        self, nodes: list[tuple[TagWidth, Node]], cpus: ScalarNode, where: str
    ) -> None:
        """One problem for the TODO tags of one steering_tags entry."""
        names = " and ".join(WIDTH_KEYS[w] for w, _ in nodes)
        verb = "is" if len(nodes) == 1 else "are"
        self.report(
            nodes[0][1],
            "tag-placeholder",
            f"{names} of CPUs {cpus.value} {verb} still {TAG_PLACEHOLDER}: write the tags the "
            "firmware reports ('tphtrap acpi host' prints them, 'tphtrap policy init --tags "
            "FILE' writes them), null where it reports none",
            f"{where}.{WIDTH_KEYS[nodes[0][0]]}",
        )

    def read_steering(self, node: Node, path: str) -> None:
        draft = self.draft
        entries = self.mapping(node, path, "steering_tags")
        if entries is None:
            return
        for cpus_key, value in entries:
            where = _join(path, str(cpus_key.value))
            cpus = self.cpulist(cpus_key, where, "CPU list", empty_rule="bad-cpulist")
            tags = self.fields(
                value, where, f"steering_tags entry {cpus_key.value!r}", _TAG_KEYS, owner=cpus_key
            )
            st: dict[TagWidth, int | None] = {TagWidth.ST8: None, TagWidth.ST16: None}
            tags_ok = tags is not None and len(tags) == len(_TAG_KEYS)
            todo: list[tuple[TagWidth, Node]] = []
            for width, name in WIDTH_KEYS.items():
                if tags is None or name not in tags:
                    continue
                tnode = tags[name][1]
                st[width], read_ok = self.steering_tag(tnode, where, width)
                if _is_placeholder(tnode):
                    todo.append((width, tnode))
                tags_ok = tags_ok and read_ok
            if todo:
                self.placeholders(todo, cpus_key, where)
            placeholder = bool(todo)
            if cpus is None:
                continue
            again = sorted(c for c in cpus if c in draft.steering_lines)
            if again:
                lines = sorted({draft.steering_lines[c] for c in again})
                self.report(
                    cpus_key,
                    "duplicate-cpu",
                    f"{cpus_word(again)} already {'has' if len(again) == 1 else 'have'} tags "
                    f"(line {', '.join(map(str, lines))}); give each CPU its tags once",
                    where,
                )
            line = self.out.line_of(cpus_key)
            fresh = frozenset(c for c in cpus if c not in draft.steering_lines)
            for cpu in fresh:
                draft.steering_lines[cpu] = line
                if tags_ok:
                    draft.steering[cpu] = CpuTags(cpu, st[TagWidth.ST8], st[TagWidth.ST16])
            if tags_ok or placeholder:
                draft.entries.append(
                    SteeringEntry(fresh, st[TagWidth.ST8], st[TagWidth.ST16], cpus_key, placeholder)
                )

    def read_vms(self, key: ScalarNode, node: Node) -> None:
        self.draft.vms_node = key
        entries = self.mapping(node, "vms", "vms")
        if entries is None:
            return
        self.draft.vms_empty = not entries
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
            self.read_vm(VmDraft(name, name_key, path), value)

    def read_vm(self, vm: VmDraft, node: Node) -> None:
        self.draft.vms.append(vm)
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
            self.read_vcpus(vm, f["vcpus"][1])
        if "on_violation" in f:
            vm.on_violation = (
                self.choice(f["on_violation"][1], f"{p}.on_violation", "on_violation")
                or vm.on_violation
            )
        if "fallback_cpu" in f:
            vm.fallback_cpu = self.cpu(f["fallback_cpu"][1], f"{p}.fallback_cpu", "fallback_cpu")
        if "share_cpus_with" in f:
            self.read_share(vm, f["share_cpus_with"][1])
        for flag in ("tph", "extended_tph"):
            if flag in f:
                value = self.boolean(f[flag][1], f"{p}.{flag}", flag)
                if value is not None:
                    setattr(vm, flag, value)
        if "devices" in f:
            self.read_devices(vm, f["devices"][1])

    def read_vcpus(self, vm: VmDraft, node: Node) -> None:
        p = f"{vm.path}.vcpus"
        vm.vcpus_node = node
        items = self.sequence(node, p, "vcpus")
        if items is None:
            return
        pins: list[tuple[int, Node]] = []
        for i, item in enumerate(items):
            cpu = self.cpu(item, f"{p}[{i}]", f"the host CPU of vCPU {i}")
            if cpu is not None:
                pins.append((cpu, item))
        if not items:
            self.report(node, "wrong-type", "vcpus is an empty list", p)
        elif len(items) > MAX_VCPUS:
            self.report(
                node,
                "too-many-vcpus",
                f"{len(items)} vCPUs: virtual tags are 8-bit, so at most {MAX_VCPUS}",
                p,
            )
        elif len(pins) == len(items):
            vm.vcpus = pins

    def read_share(self, vm: VmDraft, node: Node) -> None:
        p = vm.path
        items = self.sequence(node, f"{p}.share_cpus_with", "share_cpus_with")
        names: set[str] = set()
        for i, item in enumerate(items or ()):
            other = self.text(item, f"{p}.share_cpus_with[{i}]", "a VM name")
            if other is None:
                continue
            if other in names:
                self.out.warn(item, "duplicate-item", f"{other!r} is listed twice", p)
                continue
            names.add(other)
            vm.share.append((other, item))

    def read_devices(self, vm: VmDraft, node: Node) -> None:
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
                    f"{self.out.line_of(first)}",
                    dpath,
                )
                continue
            seen[bdf] = key
            dev = DeviceDraft(bdf, key, dpath)
            vm.devices.append(dev)
            if _is_null(value):
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


# --- helpers ----------------------------------------------------------------------------------
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


def compose(text: str, out: Reporter) -> Node | None:
    """The node tree of ``text``, or None with the problem reported (syntax, empty file)."""
    name = out.name
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
        out.problems.append(Problem(line, column, "syntax", message, "", name))
        return None
    try:
        composer = _Composer(text)  # the reader checks for unprintable characters right away
        try:
            root = composer.get_single_node()
        finally:
            composer.dispose()
    except yaml.YAMLError as exc:
        out.problems.append(_syntax_problem(exc, text, name))
        return None
    except RecursionError:  # MAX_DEPTH keeps clear of it, unless called with a deep stack
        out.problems.append(Problem(1, 1, "syntax", "the YAML is nested too deeply", "", name))
        return None
    for mark in composer.aliases:
        out.report(mark, "alias", "aliases (*name) are not used in policies: write it out")
    for tag, mark in composer.explicit_tags:
        short = tag.replace("tag:yaml.org,2002:", "!!")
        out.report(mark, "explicit-tag", f"explicit tag {short}: policies use plain values")
    if root is None or _is_null(root):
        out.report(
            None, "empty-document", "the file holds no policy (expected version, host and vms)"
        )
        return None
    return root


def read_draft(text: str, name: str = "<policy>") -> tuple[PolicyDraft | None, Reporter]:
    """Read a policy's shape: the draft (None when the text holds no policy) and its problems."""
    out = Reporter(name)
    root = compose(text, out)
    if root is None:
        return None, out
    reader = _Reader(out)
    reader.read(root)
    return reader.draft, out


def read_steering_tags(text: str, name: str) -> tuple[list[SteeringEntry], Reporter]:
    """The steering tags of a ``tphtrap acpi host`` output (or of a policy): its entries.

    The text holds ``host.steering_tags`` (as a policy does) or a top-level ``steering_tags``
    mapping, in the syntax of a policy's ``host.steering_tags``; anything else is ignored.
    """
    out = Reporter(name)
    root = compose(text, out)
    if root is None:
        return [], out
    reader = _Reader(out)
    top = reader.mapping(root, "", "the tags file")
    found = dict((str(k.value), (k, v)) for k, v in top or ())
    path = "steering_tags"
    node: Node | None = None
    if "steering_tags" in found:
        node = found["steering_tags"][1]
    elif "host" in found:
        host = dict(
            (str(k.value), v) for k, v in reader.mapping(found["host"][1], "host", "host") or ()
        )
        if "steering_tags" in host:
            node, path = host["steering_tags"], "host.steering_tags"
    if node is None:
        if top is not None:
            out.report(
                root,
                "missing-key",
                "no steering_tags (or host.steering_tags) mapping: not the output of "
                "'tphtrap acpi host'",
            )
        return [], out
    reader.read_steering(node, path)
    return reader.draft.entries, out
