"""The policy loader: positions and rule ids of every problem, the model it builds, the schema."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tphtrap.errors import PolicyError
from tphtrap.policy import CpuTags, OnViolation
from tphtrap.policyfile import (
    RULES,
    check_policy_text,
    load_policy,
    load_policy_text,
    parse_policy_cpulist,
    read_policy,
    read_policy_text,
)
from tphtrap.policyschema import policy_schema
from tphtrap.spec import TagWidth

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "policies").glob("*.yaml"))
BAD = sorted((REPO / "fixtures" / "policies" / "bad").glob("*.yaml"))
EXPECT = re.compile(r"# expect: (\d+):(\d+) ([a-z0-9-]+)\Z")

# Rules that only ever warn: a policy with them loads, so they have no bad fixture.
WARNING_RULES = {
    "no-devices",
    "no-vms",
    "no-effect",
    "tag-shared-outside",
    "duplicate-item",
    "vcpu-without-tag",
    "neutral-only",
}

HOST = """\
version: 1
host:
  steering_tags:
    0-3: {st8: 0x01, st16: 0x0101}
    4-7: {st8: 0x02, st16: 0x0202}
  neutral_tags: [0x00]
vms:
"""


def problems(text: str, level: str | None = "error") -> list[tuple[int, int, str]]:
    """(line, column, rule) of each problem in ``text`` (dedented), errors only by default."""
    found = check_policy_text(textwrap.dedent(text), "t.yaml")
    return [(p.line, p.column, p.rule) for p in found if level is None or p.level == level]


def warnings(text: str) -> list[tuple[int, int, str]]:
    return problems(text, "warning")


def lines(*rows: str) -> str:
    return "".join(row + "\n" for row in rows)


def vm_policy(body: str) -> str:
    """HOST plus ``body`` (VM entries, indented by two spaces below ``vms:``)."""
    return HOST + textwrap.indent(textwrap.dedent(body), "  ")


# --- the example policies and the bad fixtures ----------------------------------------------
def test_there_are_examples_and_fixtures() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"two-tenants.yaml", "translation.yaml", "strict-baseline.yaml"} <= names
    assert len(BAD) >= len(set(RULES) - WARNING_RULES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policy_has_no_problem_at_all(path: Path) -> None:
    policy, found = read_policy(path)
    assert [p.format() for p in found] == []
    assert policy is not None
    assert policy.source == str(path)


def _expectation(path: Path) -> tuple[int, int, str]:
    with path.open("rb") as f:
        first = f.readline().decode("ascii").strip()
        second = f.readline().decode("ascii").strip()
    m = EXPECT.match(first)
    assert m, f"{path.name}: first line must be '# expect: LINE:COL RULE', got {first!r}"
    assert second.startswith("# ") and len(second) > 10, f"{path.name}: say what is wrong"
    return int(m[1]), int(m[2]), m[3]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_fixture_yields_exactly_its_expected_error(path: Path) -> None:
    line, column, rule = _expectation(path)
    assert rule in RULES
    assert path.stem == rule or path.stem.startswith(rule + "-"), "name files after their rule"
    policy, found = read_policy(path)
    errors = [(p.line, p.column, p.rule) for p in found if p.level == "error"]
    assert errors == [(line, column, rule)], "\n".join(p.format() for p in found)
    assert policy is None
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert [(p.line, p.column, p.rule) for p in exc.value.problems] == [(line, column, rule)]
    assert str(exc.value).startswith(f"{path}:{line}:{column}: error: ")


def test_every_error_rule_has_a_bad_fixture() -> None:
    covered = {_expectation(p)[2] for p in BAD}
    assert covered == set(RULES) - WARNING_RULES


# --- YAML 1.1 surprises ------------------------------------------------------------------------
@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "n", "Yes", "OFF", "True"])
def test_truthy_words_are_refused_where_a_boolean_is_expected(word: str) -> None:
    text = vm_policy(f"a:\n  cpus: 0-3\n  tph: {word}\n  devices: {{3b:00.0: }}\n")
    assert problems(text) == [(10, 10, "truthy")]


def test_true_and_false_are_the_booleans() -> None:
    text = vm_policy(
        "a:\n  cpus: 0-3\n  tph: false\n  extended_tph: true\n  devices: {3b:00.0: }\n"
    )
    policy = load_policy_text(text)
    assert policy.vms["a"].tph is False
    assert policy.vms["a"].extended_tph is True


def test_truthy_vm_name_and_share_entry() -> None:
    text = vm_policy(
        """\
        on:
          cpus: 0-3
          devices: {3b:00.0: }
        b:
          cpus: 4-7
          share_cpus_with: [yes]
          devices: {3b:00.1: }
        """
    )
    assert problems(text) == [(8, 3, "truthy"), (13, 23, "truthy")]


def test_quoted_truthy_vm_name_is_just_a_name() -> None:
    text = vm_policy('"on":\n  cpus: 0-3\n  devices: {3b:00.0: }\n')
    assert "on" in load_policy_text(text).vms


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("010", "octal-values"),
        ("08", "octal-values"),
        ("0o17", "octal-values"),
        ("1:30", "sexagesimal"),
        ("1:00:00", "sexagesimal"),
        ("'0x01'", "wrong-type"),
        ('"1"', "wrong-type"),
        ("1.0", "wrong-type"),
        ("0b101", "wrong-type"),
        ("0X1F", "wrong-type"),
        ("1_000", "wrong-type"),
        ("true", "wrong-type"),
        ("[1]", "wrong-type"),
        ("0x100", "tag-out-of-range"),
        ("256", "tag-out-of-range"),
        ("-1", "tag-out-of-range"),
    ],
)
def test_an_8bit_tag_spelling(value: str, rule: str) -> None:
    text = lines("version: 1", "host:", "  steering_tags:", "    0-3:", f"      st8: {value}")
    text += lines("      st16: 1", "vms: {}")
    assert problems(text) == [(5, 12, rule)]


@pytest.mark.parametrize(("value", "tag"), [("0", 0), ("255", 255), ("0xff", 255), ("0xAb", 0xAB)])
def test_tags_in_decimal_or_hex(value: str, tag: int) -> None:
    text = (
        f"version: 1\nhost:\n  steering_tags:\n    0: {{st8: {value}, st16: {value}}}\nvms: {{}}\n"
    )
    policy = load_policy_text(text)
    assert policy.host.steering_tags[0] == CpuTags(0, tag, tag)


@pytest.mark.parametrize("null", ["null", "~", ""])
def test_null_tag_means_no_valid_tag(null: str) -> None:
    text = f"version: 1\nhost:\n  steering_tags:\n    0-1: {{st8: 7, st16: {null}}}\nvms: {{}}\n"
    policy = load_policy_text(text)
    assert policy.host.steering_tags[1] == CpuTags(1, 7, None)


def test_pci_addresses_are_read_as_written() -> None:
    # YAML 1.1 reads 0000:00:10.0 as a base-60 float; a device key is read as the address it spells.
    text = vm_policy("a:\n  cpus: 0-3\n  devices:\n    0000:00:10.0:\n    00:1f.7: {}\n")
    assert yaml.safe_load(text)["vms"]["a"]["devices"] != {}  # the surprise exists
    assert set(load_policy_text(text).vms["a"].devices) == {"0000:00:10.0", "0000:00:1f.7"}


def test_version_must_be_the_number_one() -> None:
    assert problems('version: "1"\nhost: {steering_tags: {}}\nvms: {}\n') == [(1, 10, "wrong-type")]
    assert problems("version: 01\nhost: {steering_tags: {}}\nvms: {}\n") == [
        (1, 10, "octal-values")
    ]


# --- reading the file --------------------------------------------------------------------------
def test_every_problem_is_reported_at_once_in_position_order() -> None:
    text = vm_policy(
        """\
        a:
          cpus: 0-3
          tph: on
          on_violation: explode
          fallback_cpu: 010
          devices:
            0000:3b:99.0: {}
        """
    )
    assert problems(text) == [
        (10, 10, "truthy"),
        (11, 19, "bad-value"),
        (12, 19, "octal-values"),
        (14, 7, "bad-bdf"),
    ]


def test_syntax_error_is_one_positioned_problem() -> None:
    found = check_policy_text("version: 1\nhost: [\n", "s.yaml")
    assert [(p.line, p.column, p.rule) for p in found] == [(3, 1, "syntax")]
    assert found[0].format().startswith("s.yaml:3:1: error: ")


def test_two_documents_are_a_syntax_error() -> None:
    assert problems("version: 1\n---\nversion: 1\n") == [(2, 1, "syntax")]


def test_unprintable_character_is_a_syntax_error() -> None:
    assert problems("version: 1\nhost: \x07\n") == [(2, 7, "syntax")]


def test_byte_order_mark_is_accepted() -> None:
    text = "\ufeff" + vm_policy("a:\n  cpus: 0-3\n  devices: {3b:00.0: }\n")
    assert load_policy_text(text).vms["a"].cpus == frozenset(range(4))


def test_top_level_must_be_a_mapping() -> None:
    assert problems("just text\n") == [(1, 1, "wrong-type")]


@pytest.mark.parametrize("text", ["", "# nothing\n", "---\n", "~\n"])
def test_empty_document(text: str) -> None:
    assert problems(text) == [(1, 1, "empty-document")]


def test_missing_top_level_keys_are_each_reported() -> None:
    assert problems("version: 1\n") == [(1, 1, "missing-key"), (1, 1, "missing-key")]
    messages = [p.message for p in check_policy_text("version: 1\n")]
    assert messages == ["missing key 'host' in the policy", "missing key 'vms' in the policy"]


def test_unknown_key_suggests_the_close_one() -> None:
    found = check_policy_text(vm_policy("a:\n  cpu: 0-3\n  devices: {3b:00.0: }\n"))
    rules = [(p.line, p.column, p.rule) for p in found if p.level == "error"]
    assert rules == [(9, 5, "unknown-key")]  # not also "missing key 'cpus'"
    assert found[0].message == "unknown key 'cpu' in VM 'a'; did you mean 'cpus'?"
    found = check_policy_text(vm_policy("a:\n  processors: 0-3\n  devices: {3b:00.0: }\n"))
    assert [(p.line, p.column, p.rule) for p in found] == [
        (8, 3, "missing-key"),
        (9, 5, "unknown-key"),
    ]


def test_merge_keys_and_aliases_are_refused() -> None:
    text = vm_policy(
        """\
        a:
          cpus: 0-3
          devices:
            3b:00.0: &d {tph: true}
            3b:00.1:
              <<: *d
        """
    )
    assert problems(text) == [(13, 9, "alias"), (13, 13, "alias")]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    policy, found = read_policy(missing)
    assert policy is None
    assert [(p.line, p.column, p.rule) for p in found] == [(1, 1, "unreadable")]
    with pytest.raises(PolicyError, match=r"nope\.yaml:1:1: error: cannot read"):
        load_policy(missing)


def test_problems_carry_file_and_breadcrumb() -> None:
    text = vm_policy("a:\n  cpus: 0-3\n  devices:\n    3b:00.0: {on_violation: nope}\n")
    (p,) = check_policy_text(text, "x.yaml")
    assert p.path == "vms.a.devices.0000:3b:00.0.on_violation"
    assert p.file == "x.yaml"
    assert p.format() == (
        "x.yaml:11:31: error: on_violation must be one of drop, rewrite, disable, not 'nope' "
        "(bad-value)"
    )


# --- cpulists ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", {0}),
        ("0-3,8", {0, 1, 2, 3, 8}),
        ("0-3, 8-9", {0, 1, 2, 3, 8, 9}),
        ("08-09", {8, 9}),
        ("0-7:1/2", {0, 2, 4, 6}),
        # the example in Linux lib/bitmap-str.c, bitmap_parselist
        ("0-1023:2/256", {0, 1, 256, 257, 512, 513, 768, 769}),
        ("2-9:3/4", {2, 3, 4, 6, 7, 8}),
        ("8191", {8191}),
    ],
)
def test_linux_cpulists(text: str, cpus: set[int]) -> None:
    assert parse_policy_cpulist(text) == frozenset(cpus)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty cpulist"),
        ("0,,1", "empty element"),
        ("0,", "empty element"),
        ("1-", "not N, N-M"),
        ("a", "not N, N-M"),
        ("all", "CPU count"),
        ("0-N", "CPU count"),
        ("3-0", "backwards"),
        ("8192", "beyond"),
        ("0-7:2", "range:used/group"),
        ("0-7:0/2", "0 < used <= group"),
        ("0-7:3/2", "0 < used <= group"),
        ("0-7:1/0", "0 < used <= group"),
        ("0 1", "not N, N-M"),
    ],
)
def test_bad_cpulists(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_policy_cpulist(text)


def test_cpulist_keys_may_be_quoted_or_plain_numbers() -> None:
    text = lines(
        "version: 1",
        "host:",
        "  steering_tags:",
        '    "0-1": {st8: 1, st16: 1}',
        "    2: {st8: 2, st16: 2}",
        "vms: {}",
    )
    assert sorted(load_policy_text(text).host.steering_tags) == [0, 1, 2]


# --- the model ---------------------------------------------------------------------------------
def test_two_tenants_model() -> None:
    policy = load_policy(REPO / "policies" / "two-tenants.yaml")
    a, b = policy.vms["tenant-a"], policy.vms["tenant-b"]
    assert a.cpus == frozenset(range(16)) | frozenset(range(32, 48))
    assert a.on_violation is OnViolation.REWRITE
    assert b.on_violation is OnViolation.DROP
    assert set(a.devices) == {"0000:3b:00.0"}
    assert set(b.devices) == {"0000:3b:00.1"}
    assert policy.host.neutral_tags == frozenset({0})
    assert policy.host.steering_tags[47] == CpuTags(47, 0x01, 0x0101)
    rules = policy.rules("tenant-a", "0000:3b:00.0")
    assert rules.allowed[TagWidth.ST8] == frozenset({0x00, 0x01})
    assert rules.allowed[TagWidth.ST16] == frozenset({0x0000, 0x0101})
    assert rules.fallback == {TagWidth.ST8: 0x01, TagWidth.ST16: 0x0101}
    assert policy.rules("tenant-b", "0000:3b:00.1").resolve(0x01, TagWidth.ST8) is None


def test_translation_model() -> None:
    policy = load_policy(REPO / "policies" / "translation.yaml")
    db = policy.vms["db"]
    assert db.vcpus == tuple(range(8, 24))
    assert db.fallback_cpu == 16
    assert db.devices["0000:5e:00.1"].extended_tph is False
    rules = policy.rules("db", "0000:5e:00.0")
    assert rules.resolve(0, TagWidth.ST8) == 0x11
    assert rules.resolve(15, TagWidth.ST16) == 0x0412
    assert rules.resolve(16, TagWidth.ST8) is None
    assert rules.fallback[TagWidth.ST8] == 0x12
    assert policy.rules("web", "0000:af:00.0").on_violation is OnViolation.DISABLE


def test_device_overrides_are_kept() -> None:
    text = vm_policy(
        """\
        a:
          cpus: 0-3
          on_violation: rewrite
          devices:
            3b:00.0:
            3b:00.1: {tph: false, on_violation: disable, fallback_cpu: 2}
        """
    )
    devices = load_policy_text(text).vms["a"].devices
    assert devices["0000:3b:00.0"].on_violation is None
    assert devices["0000:3b:00.0"].tph is True
    one = devices["0000:3b:00.1"]
    assert (one.tph, one.on_violation, one.fallback_cpu) == (False, OnViolation.DISABLE, 2)


def test_load_policy_text_raises_with_every_error() -> None:
    text = vm_policy("a:\n  cpus: 0-9\n  tph: yes\n  devices: {3b:00.0: }\n")
    with pytest.raises(PolicyError) as exc:
        load_policy_text(text, "p.yaml")
    assert [(p.line, p.rule) for p in exc.value.problems] == [
        (9, "cpu-without-tags"),
        (10, "truthy"),
    ]
    assert exc.value.problems[0].message == (
        "CPUs 8-9 of VM 'a' have no entry in host.steering_tags (write null for a tag the "
        "firmware does not report)"
    )


# --- semantics ---------------------------------------------------------------------------------
def test_vms_may_share_cpus_when_both_agree() -> None:
    text = vm_policy(
        """\
        a:
          cpus: 0-3
          share_cpus_with: [b]
          devices: {3b:00.0: }
        b:
          cpus: 0-7
          share_cpus_with: [a]
          devices: {3b:00.1: }
        """
    )
    assert problems(text) == []
    # b's own tag 0x02 is allowed; 0x01 belongs to 0-3, all of which b has too
    policy = load_policy_text(text)
    assert policy.rules("b", "0000:3b:00.1").allowed[TagWidth.ST8] == frozenset({0, 1, 2})


def test_tph_false_vm_needs_no_allowed_tag() -> None:
    text = "version: 1\nhost:\n  steering_tags:\n    0-7: {st8: 1, st16: null}\nvms:\n"
    body = "  a:\n    cpus: 0-3\n    tph: false\n    devices: {3b:00.0: }\n"
    assert problems(text + body) == []
    body = "  a:\n    cpus: 0-3\n    devices: {3b:00.0: }\n"
    assert problems(text + body) == [(7, 11, "empty-allowed-set")]


def test_device_fallback_must_be_the_vms() -> None:
    text = vm_policy(
        "a:\n  cpus: 0-3\n  devices:\n    3b:00.0: {on_violation: rewrite, fallback_cpu: 5}\n"
    )
    assert problems(text) == [(11, 54, "fallback-not-allowed")]


def test_neutral_tag_above_8_bits_is_only_checked_at_16() -> None:
    text = (
        HOST.replace("[0x00]", "[0x00, 0x101]") + "  a:\n    cpus: 0-3\n    devices: {3b:00.0: }\n"
    )
    # 0x101 is not an 8-bit tag, but CPU 0-3's 16-bit tag is 0x0101
    assert problems(text) == [(6, 24, "neutral-tag-owned")]


# --- warnings ----------------------------------------------------------------------------------
def test_warning_no_devices_and_no_vms() -> None:
    assert warnings(vm_policy("a:\n  cpus: 0-3\n")) == [(8, 3, "no-devices")]
    assert warnings(vm_policy("a:\n  cpus: 0-3\n  devices: {}\n")) == [(8, 3, "no-devices")]
    assert warnings(HOST.replace("vms:\n", "vms: {}\n")) == [(7, 1, "no-vms")]


def test_warning_settings_without_effect() -> None:
    text = vm_policy(
        """\
        a:
          cpus: 0-3
          tph: false
          extended_tph: false
          fallback_cpu: 1
          devices:
            3b:00.0: {tph: true, extended_tph: true}
        """
    )
    assert problems(text) == []
    assert warnings(text) == [(12, 19, "no-effect"), (14, 22, "no-effect"), (14, 42, "no-effect")]


def test_warning_duplicate_items() -> None:
    text = HOST.replace("[0x00]", "[0x00, 0]") + "  a:\n    cpus: 0-3\n    devices: {3b:00.0: }\n"
    assert warnings(text) == [(6, 24, "duplicate-item")]


def test_warning_vcpu_on_cpu_without_tag() -> None:
    text = lines(
        "version: 1",
        "host:",
        "  steering_tags:",
        "    0-3: {st8: 1, st16: 1}",
        "    4: {st8: null, st16: null}",
        "  neutral_tags: [0]",
        "vms:",
    )
    body = "  a:\n    cpus: 0-4\n    vcpus: [0, 4]\n    devices: {3b:00.0: }\n"
    assert problems(text + body) == []
    assert warnings(text + body) == [(10, 16, "vcpu-without-tag")]


def test_warning_cpus_whose_tag_is_shared_outside() -> None:
    text = vm_policy("a:\n  cpus: 0-5\n  devices: {3b:00.0: }\n")
    found = [p for p in check_policy_text(text) if p.level == "warning"]
    assert [(p.line, p.column, p.rule) for p in found] == [(9, 11, "tag-shared-outside")]
    assert "cannot steer to CPUs 4-5" in found[0].message
    assert "8-bit tag 0x02 is shared with CPUs 6-7 (no VM)" in found[0].message


def test_warning_only_one_width_allowed() -> None:
    text = "version: 1\nhost:\n  steering_tags:\n    0-3: {st8: 1, st16: null}\nvms:\n"
    body = "  a:\n    cpus: 0-3\n    devices: {3b:00.0: }\n"
    found = check_policy_text(text + body)
    assert [(p.line, p.rule, p.level) for p in found] == [(7, "empty-allowed-set", "warning")]
    assert "Extended TPH will be downgraded" in found[0].message
    body = "  a:\n    cpus: 0-3\n    extended_tph: false\n    devices: {3b:00.0: }\n"
    assert check_policy_text(text + body) == []


def test_rewrite_falls_back_to_a_neutral_tag() -> None:
    """No CPU of the VM owns its 8-bit tag outright (tag 1 is shared with CPUs 4-7): the
    fallback of ``rewrite`` is then the neutral tag, and nothing needs a warning."""
    text = lines(
        "version: 1",
        "host:",
        "  steering_tags:",
        "    0-7: {st8: 1, st16: null}",
        "  neutral_tags: [0]",
        "vms:",
        "  a:",
        "    cpus: 0-3",
        "    extended_tph: false",
        "    on_violation: rewrite",
        "    devices: {3b:00.0: }",
    )
    rules = [p.rule for p in check_policy_text(text)]
    assert "fallback-not-allowed" not in rules
    assert problems(text) == []
    policy = load_policy_text(text, "p.yaml")
    assert policy.rules("a", "0000:3b:00.0").fallback[TagWidth.ST8] == 0


def test_read_policy_text_returns_warnings_with_the_policy() -> None:
    policy, found = read_policy_text(vm_policy("a:\n  cpus: 0-3\n"))
    assert policy is not None
    assert [p.rule for p in found] == ["no-devices"]


# --- the JSON Schema ---------------------------------------------------------------------------
class _TextKeyLoader(yaml.SafeLoader):
    """Mapping keys as their text, as YAML 1.2 editors see them (JSON keys are strings)."""


def _text_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[str, Any]:
    return {str(k.value): loader.construct_object(v, deep=True) for k, v in node.value}


_TextKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _text_keys)


def _instance(text: str) -> Any:
    return yaml.load(text, Loader=_TextKeyLoader)  # a SafeLoader subclass


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = policy_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_schema_is_plain_json() -> None:
    schema = policy_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_schema_accepts_every_example(
    path: Path, validator: jsonschema.protocols.Validator
) -> None:
    instance = _instance(path.read_text())
    assert isinstance(next(iter(instance["host"]["steering_tags"])), str)
    errors = [e.message for e in validator.iter_errors(instance)]
    assert errors == []


def test_schema_accepts_every_key_the_loader_knows(
    validator: jsonschema.protocols.Validator,
) -> None:
    text = vm_policy(
        """\
        a:
          cpus: 0-3
          vcpus: [0, 1]
          on_violation: rewrite
          fallback_cpu: 1
          share_cpus_with: [b]
          tph: true
          extended_tph: true
          devices:
            3b:00.0: {tph: true, extended_tph: false, on_violation: drop, fallback_cpu: 2}
            3b:00.2:
        b:
          cpus: 3
          share_cpus_with: [a]
          devices: {0000:3b:00.1: {}}
        """
    )
    assert problems(text) == []
    assert [e.message for e in validator.iter_errors(_instance(text))] == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("version: 1", "version: 2"),
        ("0-3: {st8: 0x01,", "0-3: {st8: 0x100,"),
        ("st16: 0x0202}", "st16: 0x10000}"),
        ("0-3: {st8: 0x01, st16: 0x0101}", "0-3: {st8: 0x01}"),
        ("0-3: {", "0-3x: {"),
        ("cpus: 0-3", "cpus: 0-3x"),
        ("cpus: 0-3", "cpu: 0-3"),
        ("on_violation: rewrite", "on_violation: explode"),
        ("on_violation: rewrite", "on_violation: true"),
        ("3b:00.0", "3b:20.0"),
        ("vcpus: [0, 1]", "vcpus: []"),
        ("tph: true", "tph: 'yes'"),
        ("neutral_tags: [0x00]", "neutral_tags: [0x10000]"),
        ("  a:\n", "  9a:\n"),
    ],
)
def test_schema_rejects_broken_policies(
    old: str, new: str, validator: jsonschema.protocols.Validator
) -> None:
    text = vm_policy(
        "a:\n  cpus: 0-3\n  vcpus: [0, 1]\n  on_violation: rewrite\n  tph: true\n"
        "  devices: {3b:00.0: {}}\n"
    )
    assert [e.message for e in validator.iter_errors(_instance(text))] == []
    assert old in text
    broken = text.replace(old, new, 1)
    assert list(validator.iter_errors(_instance(broken))), broken
    assert problems(broken), "the loader must refuse it too"


def test_schema_enums_match_the_model() -> None:
    vm = policy_schema()["definitions"]["vm"]["properties"]
    assert vm["on_violation"]["enum"] == [v.value for v in OnViolation]
