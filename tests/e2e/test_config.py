"""Bad plugin configurations are refused by Envoy itself, with one log line naming the field."""
import hashlib

import pytest

from harness import Envoy

GOOD_DIGEST = hashlib.sha256(b"k").hexdigest()

BAD = [
    ("wrong type", {"identity": {"source": "header", "header": 42}}, "identity.header"),
    ("unknown field", {"identity": {"source": "header", "header": "x-t"}, "budgetz": {}}, "budgetz"),
    ("negative limit", {"identity": {"source": "header", "header": "x-t"},
                        "limits": {"max_request_body_bytes": -1}}, "limits.max_request_body_bytes"),
    ("missing required field", {"tenants": {"a": {}}}, "identity"),
    ("missing field of a source", {"identity": {"source": "header"}}, "identity.header"),
    ("malformed digest", {"identity": {"source": "api_key", "api_keys": [{"sha256": "abc123", "tenant": "a"}]},
                          "tenants": {"a": {}}}, "identity.api_keys[0].sha256"),
    ("undeclared tenant", {"identity": {"source": "api_key", "api_keys": [{"sha256": GOOD_DIGEST, "tenant": "b"}]},
                           "tenants": {"a": {}}}, "identity.api_keys[0].tenant"),
    ("zero limit", {"identity": {"source": "header", "header": "x-t"},
                    "limits": {"max_sse_line_bytes": 0}}, "limits.max_sse_line_bytes"),
    ("not json", "{identity: header", "(root)"),
]


@pytest.mark.parametrize("name,config,field", BAD, ids=[b[0] for b in BAD])
def test_envoy_refuses_bad_configuration(upstream, name, config, field):
    proc = Envoy(config, upstream.port, expect_failure=True)
    try:
        code = proc.wait_exit(timeout=60)
        log = proc.log()
    finally:
        proc.stop()
    assert code != 0, "envoy accepted a bad configuration"
    lines = [line for line in log.splitlines() if "invalid tollgate configuration" in line]
    assert len(lines) >= 1, log[-3000:]
    assert f"field `{field}`" in lines[0], lines[0]
