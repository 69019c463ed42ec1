"""The JSON Schema, the shipped plugin configs, the filter's own validation and the
configuration reference (docs/configuration.md) agree."""
import glob
import json
import os
import re

import jsonschema
import pytest

from harness import ROOT
from test_config import BAD

with open(os.path.join(ROOT, "envoy/tollgate.schema.json"), encoding="utf-8") as f:
    SCHEMA = json.load(f)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SEMANTIC_ONLY = {"undeclared tenant"}  # cross-field rules only the filter checks


def resolve(node):
    ref = node.get("$ref", "")
    return SCHEMA["$defs"][ref.split("/")[-1]] if ref.startswith("#/$defs/") else node


def schema_paths(node, prefix="", seen=None):
    """Documented field paths: `a.b`, `a[].b` for array items, `a.*` for map values. A shared
    definition is expanded where it first appears (`tenants.*` takes the fields of
    `tenant_defaults`, a tenant's `aliases.*` those of `routing.aliases.*`)."""
    seen = set() if seen is None else seen
    ref = node.get("$ref")
    if ref:
        if ref in seen:
            return
        seen.add(ref)
    node = resolve(node)
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path
        if resolve(sub).get("type") == "array":
            yield from schema_paths(resolve(sub).get("items", {}), path + "[].", seen)
        else:
            yield from schema_paths(sub, path + ".", seen)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        yield f"{prefix}*"
        yield from schema_paths(extra, f"{prefix}*.", seen)


def test_schema_is_valid():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


PLUGIN_CONFIGS = [p for p in sorted(glob.glob(os.path.join(ROOT, "envoy/*.json"))) +
                  sorted(glob.glob(os.path.join(ROOT, "examples/**/tollgate*.json"), recursive=True))
                  if not p.endswith(".schema.json")]


@pytest.mark.parametrize("path", PLUGIN_CONFIGS)
def test_shipped_plugin_configs_follow_the_schema(path):
    with open(path, encoding="utf-8") as f:
        VALIDATOR.validate(json.load(f))


@pytest.mark.parametrize("name,config,field", [b for b in BAD if b[0] not in SEMANTIC_ONLY and isinstance(b[1], dict)])
def test_schema_refuses_what_the_filter_refuses(name, config, field):
    assert list(VALIDATOR.iter_errors(config)), name


def test_readme_documents_every_field():
    # The reference moved from the README to docs/configuration.md (make docs-check also
    # compares it with the schema, defaults included).
    with open(os.path.join(ROOT, "docs/configuration.md"), encoding="utf-8") as f:
        section = f.read()
    documented = set(re.findall(r"^\| `([^`]+)`", section, re.M))
    expected = set(schema_paths(SCHEMA))
    assert expected - documented == set(), "undocumented fields"
    assert documented - expected == set(), "documented fields the schema does not have"
