"""Shared fixtures: one fake upstream and one Envoy (api-key tenants) for the whole session."""
import hashlib
import os

import pytest

from harness import Envoy, FakeUpstream

KEYS = {"team-a": "sk-test-team-a", "team-b": "sk-test-team-b"}


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def api_key_config(**extra):
    config = {
        "identity": {
            "source": "api_key",
            "api_keys": [{"sha256": sha256(key), "tenant": t} for t, key in KEYS.items()],
        },
        "tenants": {t: {} for t in KEYS},
        "limits": {"max_request_body_bytes": 65536},
    }
    config.update(extra)
    return config


@pytest.fixture(scope="session")
def upstream():
    up = FakeUpstream("provider-a")
    yield up
    up.stop()


@pytest.fixture(scope="session")
def envoy(upstream):
    proc = Envoy(api_key_config(), upstream.port)
    yield proc
    proc.stop()
    # The filter must never have trapped: no VM failure in the whole session.
    assert "panicked" not in proc.log(), proc.log()[-4000:]


def pytest_collection_modifyitems(items):
    # Suites that check session-wide counters run last.
    items.sort(key=lambda item: 1 if "zz_" in item.nodeid else 0)


os.environ.setdefault("OPENAI_LOG", "")
