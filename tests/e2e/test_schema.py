"""The JSON Schema, the shipped plugin configs, and the filter's own validation agree
(the configuration reference: make docs-check)."""
import glob
import json
import os

import jsonschema
import pytest

from harness import ROOT
from test_config import BAD

with open(os.path.join(ROOT, "envoy/tollgate.schema.json"), encoding="utf-8") as f:
    SCHEMA = json.load(f)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SEMANTIC_ONLY = {"undeclared tenant"}  # cross-field rules only the filter checks


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


# That the configuration reference (docs/configuration.md) lists every field of the schema, and
# no other, with the schema's defaults, is checked by `make docs-check` (tests/docs_check.py).
