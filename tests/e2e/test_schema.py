"""The JSON Schema, the shipped plugin configs, the filter's own validation and the README's
configuration reference agree."""
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


def schema_paths(node, prefix=""):
    """Documented field paths: `a.b`, `a[].b` for array items, `a.*` for map values. A tenant's
    own fields are those of `tenant_defaults`, so `tenants.*` is one row."""
    node = resolve(node)
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path
        sub_r = resolve(sub)
        if sub_r.get("type") == "array":
            yield from schema_paths(resolve(sub_r.get("items", {})), path + "[].")
        else:
            yield from schema_paths(sub_r, path + ".")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        yield f"{prefix}*"
        if extra.get("$ref") != "#/$defs/policy":
            yield from schema_paths(extra, f"{prefix}*.")


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
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)`", section, re.M))
    expected = set(schema_paths(SCHEMA))
    assert expected - documented == set(), "undocumented fields"
    assert documented - expected == set(), "documented fields the schema does not have"
