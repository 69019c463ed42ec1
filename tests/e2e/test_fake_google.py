"""Self-check of the fake upstream's Google dialects (tests/fake_google.py), without Envoy.

The official google-genai SDK (AI Studio, Vertex with project/location, Vertex express mode) and
anthropic's AnthropicVertex talk straight to the fake: if they parse its answers and raise their
own error classes, the e2e tests through Envoy test Tollgate against what the real services send.
"""
import http.client
import json
import uuid

import anthropic
import pytest
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials

from harness import FakeUpstream

MODEL = "gemini-2.5-flash"
WORDS = "Hello from google-fake"  # fake_upstream.WORDS for 3 chunks on a server of this name


@pytest.fixture(scope="module")
def fake():
    up = FakeUpstream("google-fake")
    yield up
    up.stop()


def rid():
    return "g-" + uuid.uuid4().hex


def studio(fake, api_version=None, **headers):
    opts = types.HttpOptions(base_url=fake.url, headers=headers, api_version=api_version)
    return genai.Client(api_key="tenant-key-studio", http_options=opts)


def vertex(fake, **headers):
    return genai.Client(vertexai=True, project="proj-1", location="us-central1",
                        credentials=Credentials(token="tenant-key-vertex"),
                        http_options=types.HttpOptions(base_url=fake.url, headers=headers))


def express(fake, **headers):
    return genai.Client(vertexai=True, api_key="tenant-key-express",
                        http_options=types.HttpOptions(base_url=fake.url, headers=headers))


def usage_of(um):
    """The normalised usage of a google-genai UsageMetadata (issue 20's rule)."""
    return {"input": (um.prompt_token_count or 0) + (um.tool_use_prompt_token_count or 0),
            "output": (um.candidates_token_count or 0) + (um.thoughts_token_count or 0),
            "cached_input": um.cached_content_token_count or 0, "cache_write_input": 0,
            "reasoning": um.thoughts_token_count or 0}


def raw(fake, path, body, headers=None):
    """POST with http.client; returns (status, headers, [body pieces as read])."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    pieces = []
    while chunk := resp.read1(65536):
        pieces.append(chunk)
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, pieces


KNOBS = {"x-fake-input-tokens": "40", "x-fake-tool-prompt-tokens": "3", "x-fake-cached-tokens": "16",
         "x-fake-output-tokens": "9", "x-fake-reasoning-tokens": "4"}
EXPECTED = {"input": 43, "output": 9, "cached_input": 16, "cache_write_input": 0, "reasoning": 4}


@pytest.mark.parametrize("client, path", [
    (studio, f"/v1/models/{MODEL}:generateContent"),
    (vertex, f"/v1beta1/projects/proj-1/locations/us-central1/publishers/google/models/{MODEL}:generateContent"),
    (express, f"/v1beta1/publishers/google/models/{MODEL}:generateContent"),
])
def test_generate_content(fake, client, path):
    request_id = rid()
    c = client(fake, **KNOBS, **{"x-fake-request-id": request_id})  # keep it: its __del__ closes it
    resp = c.models.generate_content(model=MODEL, contents="Say hi")
    assert resp.text == WORDS
    assert resp.candidates[0].finish_reason == types.FinishReason.STOP
    assert resp.model_version == MODEL and resp.response_id
    um = resp.usage_metadata
    assert (um.prompt_token_count, um.candidates_token_count, um.thoughts_token_count,
            um.tool_use_prompt_token_count, um.cached_content_token_count) == (40, 5, 4, 3, 16)
    assert um.total_token_count == 40 + 5 + 4 + 3
    e = fake.entry(request_id)
    assert (e["api"], e["model"], e["path"], e["status"], e["stream"]) == (
        "generate_content", MODEL, path, 200, False)
    assert e["usage"] == EXPECTED == usage_of(um)
    assert e["usage_sent"] and e["completed"]
    secret = "authorization" if client is vertex else "x-goog-api-key"
    assert e["headers"][secret] is True  # credentials never stored
    assert e["body"]["contents"] == [{"parts": [{"text": "Say hi"}], "role": "user"}]


def test_generate_content_v1beta_and_bounds(fake):
    """maxOutputTokens x candidateCount bound the output; x-fake-generate: max uses all of it."""
    request_id = rid()
    client = studio(fake, api_version="v1beta", **{"x-fake-request-id": request_id, "x-fake-generate": "max",
                                                   "x-fake-reasoning-tokens": "3"})
    resp = client.models.generate_content(model=MODEL, contents="hi", config=types.GenerateContentConfig(
        max_output_tokens=7, candidate_count=2))
    assert len(resp.candidates) == 2
    assert resp.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    e = fake.entry(request_id)
    assert e["path"] == f"/v1beta/models/{MODEL}:generateContent"
    assert e["usage"]["output"] == 14 == usage_of(resp.usage_metadata)["output"]
    assert e["usage"]["reasoning"] == 3
    # Without x-fake-generate the default output (2 * chunks + 1 = 7) is still capped.
    request_id = rid()
    client = studio(fake, **{"x-fake-request-id": request_id})
    client.models.generate_content(model=MODEL, contents="hi",
                                   config=types.GenerateContentConfig(max_output_tokens=2))
    assert fake.entry(request_id)["usage"]["output"] == 2


def test_snake_case_generation_config(fake):
    request_id = rid()
    status, _, pieces = raw(fake, f"/v1beta/models/{MODEL}:generateContent", {
        "contents": [{"parts": [{"text": "x"}]}],
        "generation_config": {"max_output_tokens": 5, "candidate_count": 3}},
        {"x-fake-request-id": request_id, "x-fake-generate": "max"})
    assert status == 200
    body = json.loads(b"".join(pieces))
    assert len(body["candidates"]) == 3 and body["usageMetadata"]["candidatesTokenCount"] == 15
    assert fake.entry(request_id)["usage"]["output"] == 15


@pytest.mark.parametrize("eol", ["crlf", "lf", "cr"])
@pytest.mark.parametrize("placement", ["every", "last", "separate"])
def test_generate_content_stream(fake, eol, placement):
    request_id = rid()
    client = vertex if placement == "last" else studio
    headers = {**KNOBS, "x-fake-request-id": request_id, "x-fake-sse-eol": eol,
               "x-fake-usage-placement": placement, "x-fake-split": "7", "x-fake-record-body": "1"}
    c = client(fake, **headers)
    chunks = list(c.models.generate_content_stream(model=MODEL, contents="hi"))
    assert "".join(c.text or "" for c in chunks) == WORDS
    with_usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage_of(with_usage[-1]) == EXPECTED
    if placement == "every":
        assert len(with_usage) == len(chunks) == 3
        running = [u.candidates_token_count for u in with_usage]
        assert running == sorted(running) and running[-1] == 5  # running totals, never deltas
    else:
        assert len(with_usage) == 1
        assert len(chunks) == (4 if placement == "separate" else 3)
    e = fake.entry(request_id)
    assert e["path"].endswith(f"/models/{MODEL}:streamGenerateContent?alt=sse")
    assert (e["stream"], e["stream_format"], e["usage"]) == (True, "sse", EXPECTED)
    assert e["completed"] and e["usage_sent"] and e["events"] == len(chunks)
    sep = {"crlf": "\r\n\r\n", "lf": "\n\n", "cr": "\r\r"}[eol]
    assert e["sse_body"].count(sep) == len(chunks) and e["sse_body"].startswith("data: {")


def test_json_array_stream(fake):
    """Without alt=sse: one JSON array, one HTTP chunk per element (the SDK cannot ask for it)."""
    request_id = rid()
    status, headers, pieces = raw(fake, f"/v1beta/models/{MODEL}:streamGenerateContent",
                                  {"contents": [{"parts": [{"text": "x"}]}]},
                                  {**KNOBS, "x-fake-request-id": request_id})
    assert status == 200 and headers["content-type"].startswith("application/json")
    body = b"".join(pieces)
    assert body.startswith(b"[{") and b"\n,\r\n{" in body and body.endswith(b"}\n]")
    items = json.loads(body)
    assert len(items) == 3 and items[-1]["usageMetadata"]["thoughtsTokenCount"] == 4
    assert "".join(i["candidates"][0]["content"]["parts"][0]["text"] for i in items) == WORDS
    e = fake.entry(request_id)
    assert (e["stream_format"], e["events"], e["usage"]) == ("json_array", 4, EXPECTED)
    # x-fake-reset-after counts array pieces: the client gets two elements, then a reset.
    request_id = rid()
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        raw(fake, f"/v1beta/models/{MODEL}:streamGenerateContent", {"contents": []},
            {"x-fake-request-id": request_id, "x-fake-reset-after": "2"})
    e = fake.entry(request_id)
    assert e["reset"] and not e["completed"] and not e["usage_sent"] and e["events_sent"] == 2


def test_blocked_prompt(fake):
    request_id = rid()
    client = studio(fake, **{"x-fake-request-id": request_id, "x-fake-block": "SAFETY",
                             "x-fake-input-tokens": "12"})
    resp = client.models.generate_content(model=MODEL, contents="bad")
    assert resp.candidates is None
    assert resp.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert resp.usage_metadata.prompt_token_count == 12
    assert resp.usage_metadata.candidates_token_count is None
    e = fake.entry(request_id)
    assert e["usage"] == {"input": 12, "output": 0, "cached_input": 0, "cache_write_input": 0,
                          "reasoning": 0} and e["block"] == "SAFETY"


def test_count_tokens(fake):
    for client in (studio, vertex):
        request_id = rid()
        c = client(fake, **{"x-fake-request-id": request_id, "x-fake-input-tokens": "17"})
        resp = c.models.count_tokens(model=MODEL, contents="count me")
        assert resp.total_tokens == 17
        e = fake.entry(request_id)
        assert e["api"] == "count_tokens" and e["path"].endswith(f"/models/{MODEL}:countTokens")
        assert e["total_tokens"] == 17 and set(e["usage"].values()) == {0}


def test_embed_content(fake):
    request_id = rid()
    client = studio(fake, **{"x-fake-request-id": request_id})
    resp = client.models.embed_content(
        model="gemini-embedding-001", contents=["a", "b"],
        config=types.EmbedContentConfig(output_dimensionality=4))
    assert [len(e.values) for e in resp.embeddings] == [4, 4]
    e = fake.entry(request_id)
    assert e["api"] == "embed_content" and e["path"] == "/v1/models/gemini-embedding-001:batchEmbedContents"
    assert not e["usage_on_wire"] and not e["usage_sent"]  # AI Studio reports no usage
    request_id = rid()
    client = vertex(fake, **{"x-fake-request-id": request_id, "x-fake-input-tokens": "6"})
    resp = client.models.embed_content(model="gemini-embedding-2", contents="a")
    assert len(resp.embeddings) == 1 and resp.embeddings[0].statistics.token_count == 6
    e = fake.entry(request_id)
    assert e["path"].endswith("/publishers/google/models/gemini-embedding-2:embedContent")
    assert e["usage_on_wire"] and e["usage"]["input"] == 6


@pytest.mark.parametrize("status, name", [(429, "RESOURCE_EXHAUSTED"), (400, "INVALID_ARGUMENT"),
                                          (401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED")])
def test_errors_raise_the_sdk_class(fake, status, name):
    request_id = rid()
    client = studio(fake, **{"x-fake-request-id": request_id, "x-fake-status": str(status)})
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status) == (status, name)
    with pytest.raises(errors.ClientError):
        next(iter(client.models.generate_content_stream(model=MODEL, contents="hi")))
    # google-genai does not retry: one request each.
    assert len([e for e in fake.ledger() if e["id"] == request_id]) == 2


def test_bad_knob_is_a_google_400(fake):
    status, _, pieces = raw(fake, f"/v1/models/{MODEL}:generateContent", {"contents": []},
                            {"x-fake-sse-eol": "crcr"})
    err = json.loads(b"".join(pieces))["error"]
    assert (status, err["code"], err["status"]) == (400, 400, "INVALID_ARGUMENT")


def anthropic_vertex(fake, **headers):
    return anthropic.AnthropicVertex(region="us-east5", project_id="proj-1", access_token="tenant-key-claude",
                                     base_url=fake.url + "/v1", max_retries=0, default_headers=headers)


CLAUDE = "claude-sonnet-4-5@20250929"


def test_anthropic_vertex_raw_predict(fake):
    request_id = rid()
    client = anthropic_vertex(fake, **{"x-fake-request-id": request_id, "x-fake-cached-tokens": "8",
                                       "x-fake-input-tokens": "30", "x-fake-output-tokens": "6"})
    msg = client.messages.create(model=CLAUDE, max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == WORDS
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (22, 8, 6)
    e = fake.entry(request_id)
    assert e["api"] == "raw_predict" and e["model"] == CLAUDE and not e["stream"]
    assert e["path"] == f"/v1/projects/proj-1/locations/us-east5/publishers/anthropic/models/{CLAUDE}:rawPredict"
    assert "model" not in e["body"] and e["body"]["anthropic_version"]  # "2026-10-21" in anthropic 2.12
    assert e["usage"] == {"input": 30, "output": 6, "cached_input": 8, "cache_write_input": 0, "reasoning": 0}
    # Streamed, and max_tokens bounds the output.
    request_id = rid()
    client = anthropic_vertex(fake, **{"x-fake-request-id": request_id, "x-fake-generate": "max"})
    with client.messages.stream(model=CLAUDE, max_tokens=11, messages=[{"role": "user", "content": "hi"}]) as s:
        assert s.get_final_text() == WORDS
        final = s.get_final_message()
    assert final.usage.output_tokens == 11
    e = fake.entry(request_id)
    assert e["path"].endswith(f"/models/{CLAUDE}:streamRawPredict") and e["stream"] and e["usage"]["output"] == 11
    # count_tokens goes to the `count-tokens` pseudo-model.
    request_id = rid()
    n = anthropic_vertex(fake, **{"x-fake-request-id": request_id, "x-fake-input-tokens": "13"}).messages.count_tokens(
        model=CLAUDE, messages=[{"role": "user", "content": "hi"}])
    assert n.input_tokens == 13
    e = fake.entry(request_id)
    assert e["api"] == "count_tokens" and e["path"].endswith("/publishers/anthropic/models/count-tokens:rawPredict")


def test_anthropic_vertex_429(fake):
    request_id = rid()
    client = anthropic_vertex(fake, **{"x-fake-request-id": request_id, "x-fake-status": "429"})
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert fake.entry(request_id)["status"] == 429
