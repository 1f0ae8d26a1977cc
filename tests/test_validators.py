"""Which validators are safe (docs/policy.md): a YAML 1.2 loader with the JSON Schema reads a
policy as tphtrap does; PyYAML (YAML 1.1) with the same schema does not; policy check does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ruamel.yaml import YAML

from tphtrap.policyfile import check_policy_text
from tphtrap.policyschema import policy_schema

REPO = Path(__file__).resolve().parent.parent
POLICY = """\
version: 1
host:
  steering_tags:
    "0-3": {st8: 0x01, st16: 0x0101}
vms:
  a:
    cpus: 0-3
    tph: TPH
    devices:
      0000:00:10.0: {}
"""


def yaml12(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = policy_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [e.message for e in validator.iter_errors(instance)]


def test_pyyaml_with_the_schema_accepts_what_policy_check_refuses(
    validator: jsonschema.protocols.Validator,
) -> None:
    text = POLICY.replace("TPH", "off").replace("0000:00:10.0", "0000:3b:00.0")
    assert yaml.safe_load(text)["vms"]["a"]["tph"] is False  # YAML 1.1: off is false
    assert errors(validator, yaml.safe_load(text)) == []  # so the schema is satisfied
    assert [p.rule for p in check_policy_text(text)] == ["truthy"]


def test_yaml12_with_the_schema_refuses_it(validator: jsonschema.protocols.Validator) -> None:
    text = POLICY.replace("TPH", "off").replace("0000:00:10.0", "0000:3b:00.0")
    assert yaml12(text)["vms"]["a"]["tph"] == "off"
    assert errors(validator, yaml12(text)) == ["'off' is not of type 'boolean'"]


def test_a_device_key_yaml11_reads_as_a_number_is_refused_not_skipped(
    validator: jsonschema.protocols.Validator,
) -> None:
    text = POLICY.replace("TPH", "true")
    devices = yaml.safe_load(text)["vms"]["a"]["devices"]
    assert list(devices) == [10.0]  # 0000:00:10.0 is a base-60 float to YAML 1.1
    assert errors(validator, yaml.safe_load(text)) == ["10.0 is not of type 'string'"]
    assert errors(validator, yaml12(text)) == []  # YAML 1.2: the address it spells
    assert check_policy_text(text) == []


@pytest.mark.parametrize("path", sorted((REPO / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_with_a_yaml12_loader(
    path: Path, validator: jsonschema.protocols.Validator
) -> None:
    assert errors(validator, yaml12(path.read_text())) == []
