"""Each API × {JSON, SSE} × {whole, split at random offsets, gzip}: the access-log line carries
exactly the usage the fake upstream's ledger recorded."""
import json
import uuid

import pytest

from conftest import KEYS
from harness import http

# Some tests have the upstream report more input tokens than a short body holds; Tollgate
# bounds reported input by the body's bytes (README, Limits and guarantees): prompts are padded.
PAD = " lorem ipsum dolor sit amet" * 24
APIS = {
    "chat_completions": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there" + PAD}]}),
    "responses": ("/v1/responses", {"input": "Tell me a story" + PAD}),
    "embeddings": ("/v1/embeddings", {"input": ["alpha" + PAD, "beta"]}),
    "messages": ("/v1/messages", {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi" + PAD}]}),
}
TOKEN_FIELDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cached_input": "cached_input_tokens",
    "cache_write_input": "cache_write_input_tokens",
    "reasoning": "reasoning_tokens",
}


def send(envoy, api, stream, knobs=None, body_extra=None, key=KEYS["team-a"]):
    path, body = APIS[api]
    body = dict(body, model="gpt-4o-mini" if api != "messages" else "claude-3-5-haiku", **(body_extra or {}))
    if stream:
        body["stream"] = True
        if api == "chat_completions":
            body["stream_options"] = {"include_usage": True}
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-request-id": rid, "x-fake-request-id": rid}
    headers["x-api-key" if api == "messages" else "authorization"] = (
        key if api == "messages" else f"Bearer {key}"
    )
    headers.update(knobs or {})
    status, resp_headers, data = http("POST", envoy.url + path, body, headers)
    return rid, status, resp_headers, data


def assert_logged_usage(envoy, upstream, rid, source="reported"):
    entry = upstream.entry(rid)
    line = envoy.access_line(rid)
    for ledger_field, log_field in TOKEN_FIELDS.items():
        assert line[log_field] == entry["usage"][ledger_field], (ledger_field, line, entry)
    assert line["usage_source"] == source
    assert line["tenant"] == "team-a"
    assert line["api"] == entry["api"]
    assert line["model"] == entry["model"]
    return entry, line


CASES = [(api, stream) for api in APIS for stream in (False, True) if not (api == "embeddings" and stream)]


@pytest.mark.parametrize("api,stream", CASES)
def test_usage_matches_ledger(envoy, upstream, api, stream):
    knobs = {"x-fake-input-tokens": "321", "x-fake-cached-tokens": "20", "x-fake-output-tokens": "17"}
    if api == "messages":
        knobs["x-fake-cache-write-tokens"] = "7"
    if api in ("chat_completions", "responses"):
        knobs["x-fake-reasoning-tokens"] = "5"
    if api == "embeddings":
        knobs = {"x-fake-input-tokens": "42"}
    rid, status, headers, _ = send(envoy, api, stream, knobs)
    assert status == 200
    entry, line = assert_logged_usage(envoy, upstream, rid)
    assert line["stream"] is bool(stream)
    assert line["decision"] == "admitted"
    assert entry["usage"]["input"] == (42 if api == "embeddings" else 321)


@pytest.mark.parametrize("api,stream", CASES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_usage_survives_random_splits(envoy, upstream, api, stream, seed):
    rid, status, _, _ = send(envoy, api, stream, {"x-fake-split": str(seed), "x-fake-chunks": "6"})
    assert status == 200
    assert_logged_usage(envoy, upstream, rid)


@pytest.mark.parametrize("api,stream", CASES)
def test_usage_of_gzip_encoded_responses(envoy, upstream, api, stream):
    rid, status, headers, data = send(envoy, api, stream, {"x-fake-gzip": "1"})
    assert status == 200
    assert headers.get("content-encoding") == "gzip"
    entry, _ = assert_logged_usage(envoy, upstream, rid)
    # Tollgate asked the upstream for identity encoding; this one ignored it on purpose.
    assert entry["headers"].get("accept-encoding") == "identity"


def test_upstream_is_asked_for_identity_encoding(envoy, upstream):
    rid, status, headers, _ = send(envoy, "chat_completions", False, {"accept-encoding": "gzip, br"})
    assert status == 200
    assert upstream.entry(rid)["headers"]["accept-encoding"] == "identity"
    assert "content-encoding" not in headers


def test_stream_without_usage_falls_back_to_observed_output(envoy, upstream):
    rid, status, _, data = send(envoy, "chat_completions", True, {"x-fake-no-usage": "1", "x-fake-chunks": "4"})
    assert status == 200
    line = envoy.access_line(rid)
    assert line["usage_source"] == "observed"
    assert int(line["output_tokens"]) == 4


def test_upstream_error_records_no_usage(envoy, upstream):
    rid, status, _, data = send(envoy, "messages", False, {"x-fake-status": "500"})
    assert status == 500
    line = envoy.access_line(rid)
    assert line["usage_source"] == "refunded"
    assert line["output_tokens"] == 0
