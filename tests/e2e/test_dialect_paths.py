"""Path spellings of the Gemini, Vertex and Bedrock APIs (issue 20), as test_paths.py does for the
OpenAI ones: every spelling the shipped route table forwards is read by Tollgate (tenant, api,
model from the path, charged), every other one is refused with 404 and never reaches the upstream.

Bedrock model ids arrive percent-encoded (`%3A`, `%2F`, as botocore sends them) or with a raw `/`
(application inference profiles); the shipped connection manager unescapes `%2F` into `/`
(UNESCAPE_AND_FORWARD), and Tollgate sends the model segment on fully percent-encoded, as
botocore would (Bedrock finds no model behind a raw `/`). A Gemini `?key=` identifies the tenant
and is cut from the path before anything logs or forwards it. Requests go over raw sockets, so
no client library normalises the paths first.
"""
import hashlib
import json
import uuid

import pytest

from harness import Envoy, FakeUpstream, raw_post

KEY = "sk-dialect-paths"
NOT_FOUND = {"error": {"message": "Not found.", "type": "invalid_request_error", "param": None,
                       "code": "not_found"}}
ARN_ENC = "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-5-haiku"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku"
APP = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3"
APP_ENC = "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Fa1b2c3"

GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
               "generationConfig": {"maxOutputTokens": 16}}
CONVERSE_BODY = {"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 16}}
INVOKE_BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16,
               "messages": [{"role": "user", "content": "hi"}]}
VERTEX_CLAUDE_BODY = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]}

# (as sent, body, ledger api, ledger model, the path the upstream receives)
READ = [
    ("/v1beta/models/gemini-2.5-flash:generateContent", GEMINI_BODY, "generate_content", "gemini-2.5-flash",
     "/v1beta/models/gemini-2.5-flash:generateContent"),
    ("/v1/models/gemini-2.5-flash:generateContent/", GEMINI_BODY, "generate_content", "gemini-2.5-flash",
     "/v1/models/gemini-2.5-flash:generateContent/"),
    ("/v1beta/models/gemini-2.5-flash:generateContent?key=" + KEY, GEMINI_BODY, "generate_content",
     "gemini-2.5-flash", "/v1beta/models/gemini-2.5-flash:generateContent"),
    ("/v1beta/models/gemini%2D2.5-flash:countTokens?alt=json&key=" + KEY, {"contents": []}, "count_tokens",
     "gemini-2.5-flash", "/v1beta/models/gemini-2.5-flash:countTokens?alt=json"),
    ("/v1beta1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
     GEMINI_BODY, "generate_content", "gemini-2.5-pro",
     "/v1beta1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"),
    ("/v1beta1/publishers/google/models/gemini-2.5-pro:generateContent", GEMINI_BODY, "generate_content",
     "gemini-2.5-pro", "/v1beta1/publishers/google/models/gemini-2.5-pro:generateContent"),
    ("/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict",
     VERTEX_CLAUDE_BODY, "raw_predict", "claude-sonnet-4@20250514",
     "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict"),
    ("/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse", CONVERSE_BODY, "converse",
     "anthropic.claude-3-5-haiku-20241022-v1:0", "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"),
    ("/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse", CONVERSE_BODY, "converse",
     "anthropic.claude-3-5-haiku-20241022-v1:0", "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"),
    (f"/model/{ARN_ENC}/converse", CONVERSE_BODY, "converse", ARN, f"/model/{ARN_ENC}/converse"),
    (f"/model/{APP}/invoke", INVOKE_BODY, "invoke", APP, f"/model/{APP_ENC}/invoke"),
    (f"/model/{APP_ENC}/invoke/", INVOKE_BODY, "invoke", APP, f"/model/{APP_ENC}/invoke/"),
    ("/model/us.amazon.nova-lite-v1%3A0/converse?trace=1", CONVERSE_BODY, "converse", "us.amazon.nova-lite-v1:0",
     "/model/us.amazon.nova-lite-v1%3A0/converse?trace=1"),
    # Vertex's OpenAI-compatible endpoint is Chat Completions (the model `google/NAME` in the body).
    ("/v1/projects/p1/locations/us-central1/endpoints/openapi/chat/completions",
     {"model": "google/gemini-2.5-flash", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
     "chat_completions", "google/gemini-2.5-flash",
     "/v1/projects/p1/locations/us-central1/endpoints/openapi/chat/completions"),
]
# Not a path Tollgate reads: the route table answers 404, nothing reaches the upstream.
REFUSED = [
    "/v1beta/models/gemini-2.5-flash:generateText",
    "/v1beta/tunedModels/t1:generateContent",
    "/v1beta/models/:generateContent",
    "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:rawPredict",
    "/v1/projects/p/locations/l/publishers/meta/models/llama:rawPredict",
    "/model//converse",
    "/model/m/converse-streaming",
    "/models/m/converse",
    "/model/m/Converse",
]


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream("dialect-paths")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def denv(upstream):
    config = {
        "identity": {"source": "api_key", "api_keys": [{"sha256": sha256(KEY), "tenant": "team-a"}]},
        "tenant_defaults": {"limits": [{"name": "tokens", "tokens": 10_000_000, "window": "day"}]},
        "tenants": {"team-a": {}},
    }
    proc = Envoy(config, upstream.port)
    yield proc
    proc.stop()
    assert "panicked" not in proc.log()


def send(envoy, upstream, path, body, key_header=True):
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-request-id": rid, "x-fake-request-id": rid}
    if key_header and "key=" not in path:
        headers["x-goog-api-key" if ":" in path.split("/")[-1] else "x-api-key"] = KEY
    head, data = raw_post(envoy.port, path, headers, body)
    status = int(head.split("\r\n")[0].split()[1])
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return status, parsed, envoy.access_line(rid), [e for e in upstream.ledger() if e["id"] == rid]


@pytest.mark.parametrize("path,body,api,model,forwarded", READ, ids=[r[0] for r in READ])
def test_spelling_is_read_charged_and_forwarded_encoded(denv, upstream, path, body, api, model, forwarded):
    status, reply, line, served = send(denv, upstream, path, body)
    assert status == 200, (reply, line)
    assert (line["tenant"], line["decision"], line["api"], line["model"]) == ("team-a", "admitted", api, model)
    (entry,) = served
    assert entry["path"] == forwarded
    assert line["path"] == forwarded  # the access log shows what the upstream received
    assert KEY not in json.dumps(line) and KEY not in entry["path"]
    charged = int(line["input_tokens"]) + int(line["output_tokens"])
    if api == "count_tokens":
        assert charged == 0
    else:
        assert charged == entry["usage"]["input"] + entry["usage"]["output"] > 0


@pytest.mark.parametrize("path", REFUSED)
def test_spelling_that_is_not_read_is_refused(denv, upstream, path):
    status, reply, line, served = send(denv, upstream, path, CONVERSE_BODY)
    assert (status, reply) == (404, NOT_FOUND), line
    assert not served
    assert line.get("tenant") in (None, "", "-") and line.get("decision") in (None, "", "-")


def test_a_query_key_never_reaches_a_log_line_even_when_refused(denv, upstream):
    """An unknown key in the query: 401 in Google's shape; the access log, the Envoy log and
    the upstream never see the key."""
    secret = "sk-not-a-tenant-" + uuid.uuid4().hex
    status, reply, line, served = send(
        denv, upstream, f"/v1beta/models/gemini-2.5-flash:generateContent?key={secret}&alt=sse", GEMINI_BODY,
        key_header=False)
    assert status == 401 and reply["error"]["status"] == "UNAUTHENTICATED"
    assert line["path"] == "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse"
    assert not served
    assert secret not in json.dumps(denv.access_lines()) and secret not in denv.log()
