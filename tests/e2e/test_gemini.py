"""Gemini (AI Studio, Vertex, express mode) and Claude on Vertex through the real Envoy + Tollgate
(issue 20): the official google-genai and AnthropicVertex SDKs, unchanged, against the fake
upstream's Google dialects (tests/fake_google.py, checked on its own by test_fake_google.py).
Tollgate's charge (access-log line, metrics) must equal what the fake's ledger says it reported.
"""
import json
import os
import re
import time
import uuid

import anthropic
import pytest
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials

from conftest import KEYS, api_key_config, sha256
from harness import ROOT, Envoy, FakeUpstream, http

# (was skipped until the dialect wiring landed)

MODEL = "gemini-2.5-flash"
CLAUDE = "claude-sonnet-4-5@20250929"
BROKE_KEY = "sk-test-broke"
# Tollgate bounds reported input by the body's bytes: prompts are padded past the knobs below.
PAD = " lorem ipsum dolor sit amet" * 24
PROMPT = "Say hi" + PAD
KNOBS = {"x-fake-input-tokens": "40", "x-fake-tool-prompt-tokens": "3", "x-fake-cached-tokens": "16",
         "x-fake-output-tokens": "9", "x-fake-reasoning-tokens": "4"}
TOKEN_FIELDS = {"input": "input_tokens", "output": "output_tokens", "cached_input": "cached_input_tokens",
                "cache_write_input": "cache_write_input_tokens", "reasoning": "reasoning_tokens"}
# The Google and Claude-on-Vertex path shapes of issue 20, as a route regex sees them (after
# Envoy's path normalisation, without the query string).
GOOGLE_PATHS = [
    f"/v1/models/{MODEL}:generateContent",
    f"/v1beta/models/{MODEL}:streamGenerateContent",
    f"/v1beta/models/{MODEL}:countTokens/",
    "/v1/models/gemini-embedding-001:batchEmbedContents",
    "/v1beta/models/gemini-embedding-001:embedContent",
    f"/v1beta1/projects/p/locations/us-central1/publishers/google/models/{MODEL}:generateContent",
    f"/v1/projects/p/locations/global/publishers/google/models/{MODEL}:streamGenerateContent",
    f"/v1beta1/publishers/google/models/{MODEL}:generateContent",
    f"/gw/v1/projects/p/locations/us-east5/publishers/anthropic/models/{CLAUDE}:rawPredict",
    f"/v1/projects/p/locations/us-east5/publishers/anthropic/models/{CLAUDE}:streamRawPredict",
]
NOT_LLM_PATHS = ["/v1/models", f"/v1/models/{MODEL}", f"/v1/models/{MODEL}:generateContentX",
                 "/v1/models/a/b:generateContent", "/v1/#/models/x:generateContent"]


@pytest.fixture(scope="module")
def gup():
    up = FakeUpstream("google-up")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def genv(gup):
    config = api_key_config(prices={"*": {"input": "1.00", "output": "2.00"},
                                    "gemini-metrics-probe": {"input": "1.00", "output": "2.00"}})
    config["identity"]["api_keys"].append({"sha256": sha256(BROKE_KEY), "tenant": "broke"})
    config["tenants"]["broke"] = {"limits": [{"name": "daily", "usd": "0.000001", "window": "day"}]}
    proc = Envoy(config, gup.port)
    yield proc
    proc.stop()
    assert "panicked" not in proc.log(), proc.log()[-4000:]


def rid():
    return "gem-" + uuid.uuid4().hex


def hdrs(request_id, **knobs):
    return {"x-request-id": request_id, "x-fake-request-id": request_id, **knobs}


def studio(env, key=KEYS["team-a"], **headers):
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=env.url, headers=headers))


def vertex(env, key=KEYS["team-a"], **headers):
    return genai.Client(vertexai=True, project="proj-1", location="us-central1", credentials=Credentials(token=key),
                        http_options=types.HttpOptions(base_url=env.url, headers=headers))


def express(env, key=KEYS["team-a"], **headers):
    return genai.Client(vertexai=True, api_key=key, http_options=types.HttpOptions(base_url=env.url, headers=headers))


def claude(env, key=KEYS["team-a"], max_retries=0, **headers):
    return anthropic.AnthropicVertex(region="us-east5", project_id="proj-1", access_token=key,
                                     base_url=env.url + "/v1", max_retries=max_retries, default_headers=headers)


def charged(env, up, request_id, source="reported", tenant="team-a"):
    """The access-log line equals the fake's ledger entry, field by field."""
    entry, line = up.entry(request_id), env.access_line(request_id)
    for ledger_field, log_field in TOKEN_FIELDS.items():
        assert line[log_field] == entry["usage"][ledger_field], (ledger_field, line, entry)
    assert (line["usage_source"], line["tenant"], line["api"], line["model"]) == (
        source, tenant, entry["api"], entry["model"]), line
    return entry, line


def test_shipped_route_tables_read_google_paths():
    """Every shipped template's `llm_path` regex takes the new shapes and nothing more."""
    found = 0
    for name in sorted(os.listdir(os.path.join(ROOT, "envoy"))):
        if not name.endswith(".yaml"):
            continue
        text = open(os.path.join(ROOT, "envoy", name), encoding="utf-8").read()
        m = re.search(r"&llm_path \{ regex: \"(.*?)\" \}", text)
        if not m:
            continue
        found += 1
        regex = re.compile(m.group(1).replace("$$", "$"))
        for path in GOOGLE_PATHS:
            assert regex.search(path), (name, path)
        for path in NOT_LLM_PATHS:
            assert not regex.search(path), (name, path)
    assert found >= 3


@pytest.mark.parametrize("client, path", [
    (studio, f"/v1/models/{MODEL}:generateContent"),
    (vertex, f"/v1beta1/projects/proj-1/locations/us-central1/publishers/google/models/{MODEL}:generateContent"),
    (express, f"/v1beta1/publishers/google/models/{MODEL}:generateContent"),
])
def test_generate_content(genv, gup, client, path):
    request_id = rid()
    c = client(genv, **hdrs(request_id, **KNOBS))
    resp = c.models.generate_content(model=MODEL, contents=PROMPT)
    assert resp.text and resp.usage_metadata.thoughts_token_count == 4
    entry, line = charged(genv, gup, request_id)
    assert entry["path"] == path
    assert entry["usage"] == {"input": 43, "output": 9, "cached_input": 16, "cache_write_input": 0, "reasoning": 4}


@pytest.mark.parametrize("eol", ["crlf", "lf", "cr"])
@pytest.mark.parametrize("placement", ["every", "last", "separate"])
def test_generate_content_stream(genv, gup, eol, placement):
    request_id = rid()
    knobs = {**KNOBS, "x-fake-sse-eol": eol, "x-fake-usage-placement": placement, "x-fake-split": "11",
             "x-fake-chunks": "6", "x-fake-record-body": "1"}
    c = studio(genv, **hdrs(request_id, **knobs))
    chunks = list(c.models.generate_content_stream(model=MODEL, contents=PROMPT))
    assert chunks
    entry, _ = charged(genv, gup, request_id)
    # Running totals on every chunk are kept, not added.
    assert entry["usage"]["output"] == 9 and entry["stream_format"] == "sse"


@pytest.mark.parametrize("split", [None, "3", "29"])
def test_json_array_stream(genv, gup, split):
    request_id = rid()
    knobs = {**KNOBS, **({"x-fake-split": split} if split else {})}
    status, _, data = http("POST", f"{genv.url}/v1beta/models/{MODEL}:streamGenerateContent",
                           {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]},
                           {"content-type": "application/json", "x-goog-api-key": KEYS["team-a"],
                            **hdrs(request_id, **knobs)})
    assert status == 200 and json.loads(data)[-1]["usageMetadata"]["thoughtsTokenCount"] == 4
    entry, _ = charged(genv, gup, request_id)
    assert entry["stream_format"] == "json_array"


def test_blocked_prompt_is_charged_what_it_reports(genv, gup):
    request_id = rid()
    c = studio(genv, **hdrs(request_id, **{"x-fake-block": "SAFETY", "x-fake-input-tokens": "12"}))
    resp = c.models.generate_content(model=MODEL, contents=PROMPT)
    assert resp.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    entry, line = charged(genv, gup, request_id)
    assert (line["input_tokens"], line["output_tokens"]) == (12, 0)


def test_count_tokens_is_admitted_not_charged(genv, gup):
    for client in (studio, vertex):
        request_id = rid()
        c = client(genv, **hdrs(request_id, **{"x-fake-input-tokens": "17"}))
        assert c.models.count_tokens(model=MODEL, contents=PROMPT).total_tokens == 17
        line = genv.access_line(request_id)
        assert line["api"] == "count_tokens" and line["input_tokens"] == 0 and line["output_tokens"] == 0


def test_embed_content(genv, gup):
    request_id = rid()
    c = studio(genv, **hdrs(request_id))
    resp = c.models.embed_content(model="gemini-embedding-001", contents=["alpha" + PAD, "beta"])
    assert len(resp.embeddings) == 2
    line = genv.access_line(request_id)
    # AI Studio reports no usage: charged the prompt estimate.
    assert line["api"] == "embed_content" and int(line["input_tokens"]) > 0 and line["output_tokens"] == 0
    assert line["usage_source"] != "reported"
    request_id = rid()
    c = vertex(genv, **hdrs(request_id, **{"x-fake-input-tokens": "6"}))
    c.models.embed_content(model="gemini-embedding-2", contents="alpha" + PAD)
    charged(genv, gup, request_id)


def test_key_in_query_names_the_tenant_and_never_travels(genv, gup):
    request_id = rid()
    status, _, _ = http("POST", f"{genv.url}/v1beta/models/{MODEL}:generateContent?key={KEYS['team-b']}&x=1",
                        {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]},
                        {"content-type": "application/json", **hdrs(request_id)})
    assert status == 200
    entry, line = charged(genv, gup, request_id, tenant="team-b")
    assert "key=" not in entry["path"] and KEYS["team-b"] not in json.dumps(line)
    assert KEYS["team-b"] not in genv.log() and KEYS["team-b"] not in genv.prometheus()


def test_claude_on_vertex(genv, gup):
    request_id = rid()
    c = claude(genv, **hdrs(request_id, **{"x-fake-cached-tokens": "8", "x-fake-input-tokens": "30"}))
    c.messages.create(model=CLAUDE, max_tokens=50, messages=[{"role": "user", "content": PROMPT}])
    entry, _ = charged(genv, gup, request_id)
    assert entry["api"] == "raw_predict" and entry["usage"]["cached_input"] == 8
    request_id = rid()
    c = claude(genv, **hdrs(request_id, **{"x-fake-split": "5"}))
    with c.messages.stream(model=CLAUDE, max_tokens=50, messages=[{"role": "user", "content": PROMPT}]) as s:
        assert s.get_final_text()
    charged(genv, gup, request_id)


@pytest.mark.parametrize("key, status, name", [(BROKE_KEY, 429, "RESOURCE_EXHAUSTED"),
                                               ("sk-unknown", 401, "UNAUTHENTICATED")])
def test_refusals_raise_the_sdk_error(genv, gup, key, status, name):
    for client in (studio, vertex, express):
        request_id = rid()
        c = client(genv, key=key, **hdrs(request_id))
        started = time.time()
        with pytest.raises(errors.ClientError) as info:
            c.models.generate_content(model=MODEL, contents=PROMPT)
        assert (info.value.code, info.value.status) == (status, name)
        assert time.time() - started < 2
        assert not [e for e in gup.ledger() if e["id"] == request_id], "a refusal reached the upstream"


def test_spent_budget_is_not_retried_by_anthropic_vertex(genv, gup):
    request_id = rid()
    c = claude(genv, key=BROKE_KEY, max_retries=2, **hdrs(request_id))
    started = time.time()
    with pytest.raises(anthropic.RateLimitError):
        c.messages.create(model=CLAUDE, max_tokens=20, messages=[{"role": "user", "content": PROMPT}])
    assert time.time() - started < 2, "the SDK retried a spent budget"


def prom(text, family, **labels):
    total = 0
    for line in text.splitlines():
        m = re.match(rf"^{family}\{{(.*)\}} (\d+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += int(m.group(2))
    return total


def test_metrics_equal_the_fake_ledger(genv, gup):
    model = "gemini-metrics-probe"
    c = studio(genv, **{"x-fake-input-tokens": "21", "x-fake-reasoning-tokens": "5", "x-fake-output-tokens": "8"})
    c.models.generate_content(model=model, contents=PROMPT)
    list(c.models.generate_content_stream(model=model, contents=PROMPT))
    c.models.count_tokens(model=model, contents=PROMPT)
    deadline = time.time() + 5
    while time.time() < deadline:
        entries = [e for e in gup.ledger() if e["model"] == model and e["completed"]]
        text = genv.prometheus()
        if len(entries) == 3 and prom(text, "tollgate_requests", tenant="team-a", model=model) == 3:
            break
        time.sleep(0.1)
    assert prom(text, "tollgate_requests", tenant="team-a", model=model) == 3  # count_tokens counted
    assert prom(text, "tollgate_input_tokens", tenant="team-a", model=model) == sum(e["usage"]["input"] for e in entries)
    assert prom(text, "tollgate_output_tokens", tenant="team-a", model=model) == sum(e["usage"]["output"] for e in entries)
