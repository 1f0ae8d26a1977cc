"""The check units: the registry, and the tag model an operator can follow (owns-no-tag,
neutral-only, one problem per VM instead of one per vCPU, what cpus and sharing mean)."""

from __future__ import annotations

import importlib
import textwrap

import pytest

from tphtrap import policycheck
from tphtrap.errors import Problem
from tphtrap.policycheck import MACHINE_RULES, RULES, get, registered
from tphtrap.policyfile import RULES as ALL_RULES
from tphtrap.policyfile import check_policy_text, load_policy_text
from tphtrap.policyread import READ_RULES
from tphtrap.spec import TagWidth

# The host of the issue: 2 sockets x 24 cores with SMT, one shared-L3 tag per socket.
HOST = """\
version: 1
host:
  steering_tags:
    0-23,48-71: {st8: 0x01, st16: 0x0101}
    24-47,72-95: {st8: 0x02, st16: 0x0202}
  neutral_tags: [0x00]
vms:
  big:
    cpus: 0-23,48-71
    on_violation: rewrite
    devices: {0000:5e:00.0: {}, 0000:5e:00.1: {}}
"""
WEB1_VCPUS = "[24, 25, 26, 27, 28, 29, 30, 31, 72, 73, 74, 75, 76, 77, 78, 79]"


def check(text: str) -> list[Problem]:
    return check_policy_text(textwrap.dedent(text), "t.yaml")


def rules(found: list[Problem], level: str | None = None) -> list[str]:
    return [p.rule for p in found if level is None or p.level == level]


# --- the registry ------------------------------------------------------------------------------
def test_every_rule_has_a_unit_or_is_a_reading_rule() -> None:
    for rule in RULES:
        assert get(rule), rule
    assert set(ALL_RULES) == set(READ_RULES) | set(RULES)
    assert not set(MACHINE_RULES) & set(ALL_RULES)
    with pytest.raises(ValueError, match="no such rule"):
        get("no-such-rule")


def test_units_are_small_functions_in_their_family_module() -> None:
    units = registered()
    assert len(units) >= 20
    for unit in units:
        module = importlib.import_module(unit.run.__module__)
        assert module.__name__.startswith("tphtrap.policycheck."), unit
        assert getattr(module, unit.name) is unit.run
        assert unit.scope in policycheck.SCOPES
        assert unit.rule in {**RULES, **MACHINE_RULES}, unit


# --- the host: two VMs split socket 1 --------------------------------------------------
SPLIT = HOST + textwrap.indent(
    textwrap.dedent(
        f"""\
        web1:
          cpus: 24-35,72-83
          vcpus: {WEB1_VCPUS}
          devices: {{0000:5e:00.2: {{}}}}
        web2:
          cpus: 36-47,84-95
          devices: {{0000:5e:00.3: {{}}}}
        """
    ),
    "  ",
)


def test_a_vm_owning_no_tag_is_one_error_with_the_recipe() -> None:
    found = check(SPLIT)
    errors = [p for p in found if p.level == "error"]
    assert rules(errors) == ["owns-no-tag", "owns-no-tag"]  # not 16 vcpu-tag-foreign
    web1, web2 = errors
    assert web1.message.startswith(
        "VM 'web1' owns no steering tag: the 8-bit tag 0x02 and 16-bit tag 0x0202 of its CPUs "
        "24-35,72-83 are shared with CPUs 36-47,84-95 (web2)."
    )
    assert "give it the whole cache domain (cpus: 24-47,72-95)" in web1.message
    assert "list web2 in its share_cpus_with (and web1 in web2's)" in web1.message
    assert "none of its virtual tags can be honoured" in web1.message
    assert "Several tenants on one L3" in web1.message
    assert "shared with CPUs 24-35,72-83 (web1)" in web2.message
    assert (web2.line, web2.column, web2.path) == (17, 11, "vms.web2.cpus")


def test_the_recipe_passes_without_a_problem() -> None:
    fixed = SPLIT.replace("cpus: 24-35,72-83", "cpus: 24-47,72-95\n    share_cpus_with: [web2]")
    fixed = fixed.replace("cpus: 36-47,84-95", "cpus: 24-47,72-95\n    share_cpus_with: [web1]")
    assert check(fixed) == []
    policy = load_policy_text(fixed)
    translate = policy.rules("web1", "0000:5e:00.2").translate
    assert translate is not None
    assert set(translate[TagWidth.ST8]) == {0x02} and set(translate[TagWidth.ST16]) == {0x0202}


def test_sharing_cpus_reads_as_steering_not_pinning() -> None:
    text = SPLIT.replace("cpus: 36-47,84-95", "cpus: 24-47,72-95")
    shared = [p for p in check(text) if p.rule == "shared-cpu"]
    assert [p.message for p in shared] == [
        "VMs 'web1' and 'web2' may both steer to CPUs 24-35,72-83 (they are in the cpus of "
        "both), so each could steer DMA into caches the other uses; if they share those caches "
        "on purpose, list each VM in the other's share_cpus_with"
    ]


def test_consenting_vm_left_with_neutral_tags_is_a_warning_that_it_cannot_steer() -> None:
    text = SPLIT.replace("cpus: 36-47,84-95", "cpus: 36-47,84-95\n    share_cpus_with: [web1]")
    text = text.replace(f"vcpus: {WEB1_VCPUS}", "share_cpus_with: [web2]")
    found = check(text)
    assert rules(found, "error") == []
    warned = [p for p in found if p.rule == "neutral-only"]
    assert [p.path for p in warned] == ["vms.web1.cpus", "vms.web2.cpus"]
    assert "can use only the neutral tag 0x00 and cannot steer" in warned[0].message
    assert "give it the whole cache domain (cpus: 24-47,72-95)" in warned[0].message
    assert "tag-shared-outside" not in rules(found)


def test_vm_sharing_its_l3_with_host_cpus_only_warns() -> None:
    text = HOST.replace("cpus: 0-23,48-71", "cpus: 0-11")
    found = check(text)
    assert rules(found) == ["neutral-only"]
    assert "shared with CPUs 12-23,48-71 (no VM)" in found[0].message
    fallback = load_policy_text(text).rules("big", "0000:5e:00.0").fallback
    assert fallback == {TagWidth.ST8: 0x00, TagWidth.ST16: 0x0000}  # rewrite: the neutral tag


def test_without_neutral_tags_owning_nothing_is_empty_allowed_set() -> None:
    text = HOST.replace("  neutral_tags: [0x00]\n", "").replace("cpus: 0-23,48-71", "cpus: 0-11")
    (p,) = check(text)
    assert p.rule == "empty-allowed-set" and p.level == "error"
    assert "(cpus: 0-23,48-71)" in p.message


def test_width_owned_only_at_16_bits_is_one_problem_for_that_width() -> None:
    # 16-bit tags per core pair, 8-bit tag per socket: the VM owns 16-bit tags only.
    text = textwrap.dedent(
        """\
        version: 1
        host:
          steering_tags:
            0-1: {st8: 0x01, st16: 0x0100}
            2-3: {st8: 0x01, st16: 0x0101}
          neutral_tags: [0x00]
        vms:
          a:
            cpus: 0-1
            devices: {0000:5e:00.0: {}}
          b:
            cpus: 2-3
            vcpus: [2, 3, 2, 3]
            devices: {0000:5e:00.1: {}}
        """
    )
    found = check(text)
    a = [p for p in found if p.path.startswith("vms.a")]
    b = [p for p in found if p.path.startswith("vms.b")]
    assert rules(a) == ["neutral-only"]
    assert a[0].message.startswith(
        "with TPH only (8-bit tags), VM 'a' can use only the neutral tag 0x00 and cannot steer"
    )
    assert "it steers only with Extended TPH (16-bit tags)" in a[0].message
    assert rules(b) == ["vcpu-tag-foreign"]  # one for the width, not one per vCPU
    assert b[0].message.startswith("no vCPU of VM 'b' can be translated at 8 bits")


def test_partly_owned_vcpus_keep_their_own_errors() -> None:
    text = HOST.replace(
        "cpus: 0-23,48-71",
        "cpus: 0-23,48-71,24\n    vcpus: [0, 24]",
    )
    errors = [p for p in check(text) if p.level == "error"]
    assert rules(errors) == ["vcpu-tag-foreign"]
    assert errors[0].path == "vms.big.vcpus[1]"
    assert "pin it to a CPU whose tag the VM owns" in errors[0].message


# --- YAML 1.2 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("word", "lower"), [("True", "true"), ("FALSE", "false")])
def test_core_schema_booleans_are_named_for_what_they_are(word: str, lower: str) -> None:
    text = HOST.replace("on_violation: rewrite", f"tph: {word}")
    (p,) = check(text)
    assert p.rule == "truthy"
    assert p.message == (
        f"{word!r} is a boolean in YAML 1.1 and the YAML 1.2 core schema but text in its JSON "
        f"schema: write {lower}"
    )


def test_yaml11_booleans_keep_their_message() -> None:
    (p,) = check(HOST.replace("on_violation: rewrite", "tph: off"))
    assert p.message == "'off' is a boolean in YAML 1.1 but text in YAML 1.2: write true or false"


def test_truthy_vm_name_in_the_core_schema() -> None:
    (p,) = check(HOST.replace("  big:", "  True:"))
    assert p.message == (
        "'True' is a boolean in YAML 1.1 and the YAML 1.2 core schema, not a VM name; quote it "
        "if you mean the text"
    )
