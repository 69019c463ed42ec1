"""AWS Bedrock runtime through the real Envoy + Tollgate (issue 20): boto3 bedrock-runtime,
unchanged, against the fake upstream's Bedrock dialect (tests/fake_bedrock.py, checked on its own
by test_fake_bedrock.py). Tollgate's charge (access-log line, metrics) must equal what the fake's
ledger says it reported.

How boto3 authenticates to Tollgate: a tenant's boto3 client keeps signing with AWS credentials
of its own (any: Tollgate ignores an `authorization: AWS4-HMAC-SHA256 …` header, it names no
Bearer key) and sends its Tollgate key as `x-api-key`, added by a `before-sign` event hook
(`client.meta.events.register("before-sign.bedrock-runtime.*", …)`, the same hook the knobs use).
`AWS_BEARER_TOKEN_BEDROCK` is no way: botocore refuses bearer tokens over plain HTTP, and a
deployment must not hand its tenants a Bedrock API key anyway. Envoy's `aws_request_signing`
(section 5) replaces the client's signature with the gateway's.

Sections: 1. the four operations with a model id, an inference-profile id and an ARN; 2. stream
chaos (exception frame, corrupt CRC, client leaving, upstream reset) settled once each; 3. refusals
as boto3 exceptions, with the requests counted at Envoy; 4. strict and clamp mode; 5. SigV4 by
Envoy after Tollgate rewrote the body (a second Envoy, a fake that verifies the signature).

What it shows about boto3 (botocore 1.44): a token window limit (429 ThrottlingException) is sent
3 times in standard mode (two retries); a spent USD budget (400 ServiceQuotaExceededException) and
an unknown key (401 UnrecognizedClientException) once, in standard and legacy mode. What passed
of an interrupted stream is charged: a ConverseStream cut before its `metadata` event is charged
the prompt estimate + the deltas seen (`observed`); an Invoke stream whose `message_start` passed
is charged its Anthropic usage so far (`reported`).
"""
import copy
import json
import os
import re
import socket
import time
import uuid

import boto3
import pytest
import yaml
from botocore.config import Config
from botocore.eventstream import ChecksumMismatch
from botocore.exceptions import ClientError, EventStreamError

from conftest import KEYS, api_key_config, sha256
from harness import ROOT, Envoy, FakeUpstream, http, render

REGION = "us-east-1"
# The tenant's own AWS credentials: never Bedrock's, never checked by Tollgate.
TENANT_AK, TENANT_SK = "AKIDTENANTCLIENT0001", "tenant-secret-not-known-to-bedrock"
# Envoy's Bedrock credentials (section 5; static test values the fake verifies with).
AK, SK = "AKIDENVOYSIGNER00001", "envoy/signing+secret/000000000000000000001"
SNIPPET = os.path.join(ROOT, "envoy", "snippets", "bedrock-sigv4.yaml")

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE = "us.anthropic.claude-3-5-sonnet-20240620-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet"
MODEL_IDS = [MODEL, PROFILE, ARN]
ENCODED = {MODEL: "anthropic.claude-3-5-sonnet-20240620-v1%3A0",
           PROFILE: "us.anthropic.claude-3-5-sonnet-20240620-v1%3A0",
           ARN: "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
                "us.anthropic.claude-3-5-sonnet"}

BROKE_KEY, NARROW_KEY, SMALL_KEY = "sk-test-broke", "sk-test-narrow", "sk-test-small"
STRICT_KEY, CLAMP_KEY, CHAOS_KEY = "sk-test-strict", "sk-test-clamp", "sk-test-chaos"
CAPPED_KEY = "sk-test-capped"
EXTRA_TENANTS = {
    "broke": (BROKE_KEY, {"limits": [{"name": "daily", "usd": "0.000001", "window": "day"}]}),
    "narrow": (NARROW_KEY, {"models": [MODEL]}),
    "small": (SMALL_KEY, {"limits": [{"name": "tph", "tokens": 300, "window": "hour"}]}),
    "strict": (STRICT_KEY, {"strict": True, "default_output_tokens": 64,
                            "limits": [{"name": "tpm", "tokens": 1000000, "window": "month"}]}),
    "clamp": (CLAMP_KEY, {"limits": [{"name": "tph", "tokens": 2000, "window": "hour"}],
                          "clamp_min_output_tokens": 10}),
    # Clamp mode with a per-request cap: every request above it is lowered to 100.
    "capped": (CAPPED_KEY, {"max_output_tokens": 100, "clamp_min_output_tokens": 10,
                            "limits": [{"name": "tph", "tokens": 10000000, "window": "hour"}]}),
    "chaos": (CHAOS_KEY, {"limits": [{"name": "tph", "tokens": 10000000, "window": "hour"}]}),
}
# Tollgate bounds reported input by the body's bytes: prompts are padded past the knobs below.
PAD = " lorem ipsum dolor sit amet" * 24
PROMPT = "Say hi" + PAD
MESSAGES = [{"role": "user", "content": [{"text": PROMPT}]}]
KNOBS = {"x-fake-input-tokens": "120", "x-fake-cached-tokens": "50",
         "x-fake-cache-write-tokens": "20", "x-fake-output-tokens": "9"}
TOKEN_FIELDS = {"input": "input_tokens", "output": "output_tokens", "cached_input": "cached_input_tokens",
                "cache_write_input": "cache_write_input_tokens", "reasoning": "reasoning_tokens"}


def plugin_config():
    config = api_key_config(prices={"*": {"input": "1.00", "output": "2.00"}})
    for tenant, (key, settings) in EXTRA_TENANTS.items():
        config["identity"]["api_keys"].append({"sha256": sha256(key), "tenant": tenant})
        config["tenants"][tenant] = settings
    return config


@pytest.fixture(scope="module")
def bup():
    up = FakeUpstream("bedrock-up")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def benv(bup):
    proc = Envoy(plugin_config(), bup.port)
    yield proc
    proc.stop()
    assert "panicked" not in proc.log(), proc.log()[-4000:]


def rid():
    return "bed-" + uuid.uuid4().hex


def client(env, key=KEYS["team-a"], retries=None, **headers):
    """boto3 as a tenant uses it: endpoint = Envoy, its own AWS credentials, its Tollgate key
    as x-api-key (see the module doc). `headers`: knobs and ids, on every attempt."""
    c = boto3.client("bedrock-runtime", endpoint_url=env.url, region_name=REGION,
                     aws_access_key_id=TENANT_AK, aws_secret_access_key=TENANT_SK,
                     config=Config(retries=retries or {"mode": "standard", "max_attempts": 1},
                                   read_timeout=30, connect_timeout=5))
    sent = {"x-api-key": key, **headers}

    def add(request, **_):
        for k, v in sent.items():
            request.headers[k] = v
    c.meta.events.register("before-sign.bedrock-runtime.*", add)
    return c


def hdrs(request_id, **knobs):
    return {"x-request-id": request_id, "x-fake-request-id": request_id, **knobs}


def anthropic_body(max_tokens=200, **extra):
    return json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": PROMPT}], **extra})


def charged(env, up, request_id, source="reported", tenant="team-a", fields=TOKEN_FIELDS):
    """The access-log line equals the fake's ledger entry, field by field."""
    entry, line = up.entry(request_id), env.access_line(request_id)
    for ledger_field, log_field in fields.items():
        assert line[log_field] == entry["usage"][ledger_field], (ledger_field, line, entry)
    assert (line["usage_source"], line["tenant"], line["api"], line["model"]) == (
        source, tenant, entry["api"], entry["model"]), (line, entry)
    return entry, line


def attempts(env, request_id, settle=0.5):
    """Access-log lines of one client request id (every boto3 attempt sends the same one): once
    the first is there, `settle` more seconds for any later one (lines are flushed within
    100 ms, render.ENVOY_FLAGS; boto3 has returned, so no attempt is still to come)."""
    env.access_line(request_id)
    time.sleep(settle)
    return [l for l in env.access_lines() if l.get("client_request_id") == request_id]


# --------------------------------------------------------------------------- 1. the operations
USAGE = {"input": 120, "output": 9, "cached_input": 50, "cache_write_input": 20, "reasoning": 0}


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_converse(benv, bup, model_id):
    request_id = rid()
    r = client(benv, **hdrs(request_id, **KNOBS)).converse(modelId=model_id, messages=MESSAGES)
    assert r["usage"] == {"inputTokens": 50, "outputTokens": 9, "totalTokens": 129,
                          "cacheReadInputTokens": 50, "cacheWriteInputTokens": 20}
    entry, line = charged(benv, bup, request_id)
    assert (line["api"], line["model"], entry["usage"]) == ("converse", model_id, USAGE)
    # Envoy's UNESCAPE_AND_FORWARD made %2F a "/"; Tollgate encoded the segment again.
    assert entry["path"] == f"/model/{ENCODED[model_id]}/converse"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_converse_stream(benv, bup, model_id):
    request_id = rid()
    c = client(benv, **hdrs(request_id, **KNOBS, **{"x-fake-split": "7"}))
    events = list(c.converse_stream(modelId=model_id, messages=MESSAGES)["stream"])
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 9
    entry, line = charged(benv, bup, request_id)
    assert (line["api"], line["model"], entry["usage"], line["stream"]) == ("converse", model_id, USAGE, True)
    assert entry["path"] == f"/model/{ENCODED[model_id]}/converse-stream"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_invoke_model(benv, bup, model_id):
    request_id = rid()
    r = client(benv, **hdrs(request_id, **KNOBS)).invoke_model(modelId=model_id, body=anthropic_body())
    msg = json.loads(r["body"].read())
    assert msg["usage"]["cache_read_input_tokens"] == 50 and msg["usage"]["output_tokens"] == 9
    entry, line = charged(benv, bup, request_id)
    assert (line["api"], line["model"], entry["usage"]) == ("invoke", model_id, USAGE)
    assert entry["path"] == f"/model/{ENCODED[model_id]}/invoke"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_invoke_model_with_response_stream(benv, bup, model_id):
    request_id = rid()
    c = client(benv, **hdrs(request_id, **KNOBS, **{"x-fake-split": "11"}))
    events = [json.loads(ev["chunk"]["bytes"]) for ev in
              c.invoke_model_with_response_stream(modelId=model_id, body=anthropic_body())["body"]]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    entry, line = charged(benv, bup, request_id)
    assert (line["api"], line["model"], entry["usage"], line["stream"]) == ("invoke", model_id, USAGE, True)
    assert entry["path"] == f"/model/{ENCODED[model_id]}/invoke-with-response-stream"


def test_invoke_stream_without_anthropic_usage_falls_back_to_invocation_metrics(benv, bup):
    """x-fake-no-usage: anthropic: only message_stop's amazon-bedrock-invocationMetrics tell
    the usage (its input leaves cache tokens out: none here)."""
    request_id = rid()
    c = client(benv, **hdrs(request_id, **{"x-fake-input-tokens": "77", "x-fake-output-tokens": "6",
                                          "x-fake-no-usage": "anthropic"}))
    events = [json.loads(ev["chunk"]["bytes"]) for ev in
              c.invoke_model_with_response_stream(modelId=MODEL, body=anthropic_body())["body"]]
    assert "usage" not in events[0]["message"]
    assert events[-1]["amazon-bedrock-invocationMetrics"]["inputTokenCount"] == 77
    entry, line = charged(benv, bup, request_id)
    assert (line["input_tokens"], line["output_tokens"]) == (77, 6)


APP_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6"


def test_arn_reaches_bedrock_routed_as_live_bedrock_routes(benv, bup):
    """x-fake-bedrock-routing: real: a raw "/" in the forwarded model segment would be HTTP 200
    UnknownOperationException (an empty Converse answer in boto3). boto3's %2F survives Envoy's
    UNESCAPE_AND_FORWARD because Tollgate encodes the segment again."""
    request_id = rid()
    c = client(benv, **hdrs(request_id, **{"x-fake-bedrock-routing": "real"}))
    r = c.converse(modelId=ARN, messages=MESSAGES)
    assert r["output"]["message"]["role"] == "assistant" and r["usage"]["outputTokens"] > 0
    entry = bup.entry(request_id)
    assert not entry["unknown_operation"] and not entry["raw_slash"]
    assert entry["path"] == f"/model/{ENCODED[ARN]}/converse"


def test_raw_slash_application_profile_arn_is_sent_encoded(benv, bup):
    """Another client sends an application inference profile ARN with its "/" raw: the same
    model, and Bedrock receives it as %2F."""
    request_id = rid()
    path = "/model/" + APP_ARN.replace(":", "%3A") + "/invoke"
    status, _, data = http("POST", benv.url + path, json.loads(anthropic_body()),
                           {"content-type": "application/json", "x-api-key": KEYS["team-a"],
                            **hdrs(request_id, **{"x-fake-bedrock-routing": "real", **KNOBS})})
    assert status == 200 and json.loads(data)["type"] == "message", data
    entry, line = charged(benv, bup, request_id)
    assert line["model"] == APP_ARN and not entry["unknown_operation"]
    assert entry["path"] == "/model/" + APP_ARN.replace(":", "%3A").replace("/", "%2F") + "/invoke"


# --------------------------------------------------------------------------- 2. stream chaos
CHAOS = []  # (request id, tenant) of every chaos request sent


def chaos_client(env, request_id, **knobs):
    CHAOS.append(request_id)
    return client(env, key=CHAOS_KEY, **hdrs(request_id, **knobs))


@pytest.mark.parametrize("op", ["converse_stream", "invoke_model_with_response_stream"])
def test_exception_frame_inside_a_200_stream(benv, bup, op):
    request_id = rid()
    c = chaos_client(benv, request_id, **{"x-fake-stream-exception": "throttlingException:3",
                                          "x-fake-output-tokens": "40"})
    with pytest.raises(EventStreamError) as info:
        if op == "converse_stream":
            list(c.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
        else:
            list(c.invoke_model_with_response_stream(modelId=MODEL, body=anthropic_body())["body"])
    assert info.value.response["Error"]["Code"] == "throttlingException"
    entry, line = bup.entry(request_id), benv.access_line(request_id)
    assert entry["stream_exception"] == "throttlingException" and entry["status"] == 200
    assert line["usage_anomaly"] == "stream_exception", line
    # Only what passed: the fake's usage (40 output tokens) never did. Converse: no metadata
    # event passed, the deltas seen are charged; Invoke: message_start's usage passed.
    assert line["usage_source"] == ("observed" if op == "converse_stream" else "reported"), line
    assert int(line["output_tokens"]) < 40 and int(line["input_tokens"]) > 0, line


def test_corrupt_crc_stops_reading_usage_without_a_trap(benv, bup):
    request_id = rid()
    c = chaos_client(benv, request_id, **{"x-fake-corrupt-crc": "2"})
    with pytest.raises(ChecksumMismatch):  # the client received the upstream's bytes unchanged
        list(c.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
    entry, line = bup.entry(request_id), benv.access_line(request_id)
    assert entry["corrupt_frame"] == 2 and entry["completed"]
    assert line["usage_anomaly"].startswith("eventstream_"), line
    assert line["usage_anomaly"] == "eventstream_message_crc", line
    assert "panicked" not in benv.log()


def raw_stream_then_leave(env, path, headers, body, quiet=0.8):
    """POST over a raw socket, read the answer until it has been silent `quiet` seconds, then
    close the connection (bounded: 15 s in all)."""
    payload = json.dumps(body).encode()
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{lines}"
                 f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
    data, deadline = b"", time.time() + 15
    sock.settimeout(quiet)
    while time.time() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    return data


@pytest.mark.parametrize("op", ["converse-stream", "invoke-with-response-stream"])
def test_client_leaving_mid_stream(benv, bup, op):
    """The fake holds the last piece of its last frame 5 s (x-fake-hold-ms); the client leaves
    while it waits: every frame but the last passed. ConverseStream's last is `metadata` (the
    usage): charged what was observed. Invoke's last is message_stop: Anthropic's usage
    (message_delta) passed, charged as reported."""
    request_id = rid()
    CHAOS.append(request_id)
    body = ({"messages": MESSAGES} if op == "converse-stream" else json.loads(anthropic_body()))
    head = raw_stream_then_leave(benv, f"/model/{ENCODED[ARN]}/{op}",
                                 {"x-api-key": CHAOS_KEY, **hdrs(request_id, **{
                                     "x-fake-chunks": "12", "x-fake-split": "5", "x-fake-hold-ms": "5000"})},
                                 body)
    assert head.startswith(b"HTTP/1.1 200")
    line, entry = benv.access_line(request_id, timeout=10), bup.entry(request_id)
    assert line["tenant"] == "chaos" and line["model"] == ARN
    assert "DC" in line["response_flags"], line  # downstream connection termination
    if op == "converse-stream":
        assert line["usage_source"] == "observed", line
        assert 0 < int(line["output_tokens"]) < 4096, line  # 4096: the reservation
    else:
        assert line["usage_source"] == "reported", line
        assert int(line["output_tokens"]) == entry["usage"]["output"], (line, entry)


@pytest.mark.parametrize("op", ["converse_stream", "invoke_model_with_response_stream"])
def test_upstream_reset_mid_stream(benv, bup, op):
    request_id = rid()
    c = chaos_client(benv, request_id, **{"x-fake-reset-after": "3", "x-fake-chunks": "6"})
    with pytest.raises(Exception):
        if op == "converse_stream":
            list(c.converse_stream(modelId=PROFILE, messages=MESSAGES)["stream"])
        else:
            list(c.invoke_model_with_response_stream(modelId=PROFILE, body=anthropic_body())["body"])
    entry, line = bup.entry(request_id), benv.access_line(request_id)
    assert entry["reset"] and entry["events_sent"] == 3
    # Converse: no metadata event passed; Invoke: message_start's usage passed (docs/budgets.md:
    # usage events seen before a reset are reported usage), never the fake's final output.
    assert line["usage_source"] == ("observed" if op == "converse_stream" else "reported"), line
    assert line["tenant"] == "chaos" and int(line["output_tokens"]) < entry["usage"]["output"], line
    assert len(attempts(benv, request_id)) == 1  # the 200 was forwarded: no retry


def prom(text, family, **labels):
    total = 0
    for line in text.splitlines():
        m = re.match(rf"^{family}\{{(.*)\}} (\d+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += int(m.group(2))
    return total


def test_chaos_requests_settled_once_and_metrics_equal_the_ledger(benv, bup):
    """Every chaos request: one access-log line; the tenant's metrics are the lines' sums."""
    if not CHAOS:
        pytest.skip("run with the chaos tests above")
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = [l for l in benv.access_lines() if l["tenant"] == "chaos"]
        text = benv.prometheus()
        if len(lines) == len(CHAOS) and prom(text, "tollgate_requests", tenant="chaos") == len(CHAOS):
            break
        time.sleep(0.1)
    assert sorted(l["client_request_id"] for l in lines) == sorted(CHAOS)
    assert prom(text, "tollgate_requests", tenant="chaos") == len(CHAOS)
    assert prom(text, "tollgate_input_tokens", tenant="chaos") == sum(int(l["input_tokens"]) for l in lines)
    assert prom(text, "tollgate_output_tokens", tenant="chaos") == sum(int(l["output_tokens"]) for l in lines)
    assert "panicked" not in benv.log()


# --------------------------------------------------------------------------- 3. refusals
def refused(env, up, key, model_id=MODEL, retries=None, **body):
    request_id = rid()
    c = client(env, key=key, retries=retries, **hdrs(request_id))
    started = time.time()
    with pytest.raises(ClientError) as info:
        c.converse(modelId=model_id, messages=MESSAGES, **body)
    err = info.value.response
    assert not [e for e in up.ledger() if e["id"] == request_id], "a refusal reached the upstream"
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"], attempts(env, request_id), \
        time.time() - started


@pytest.mark.parametrize("mode", ["standard", "legacy"])
def test_unknown_key_is_unrecognized_client(benv, bup, mode):
    code, status, lines, _ = refused(benv, bup, "sk-unknown", retries={"mode": mode})
    assert (code, status, len(lines)) == ("UnrecognizedClientException", 401, 1)
    assert lines[0]["decision"] == "unauthenticated"


def test_model_outside_the_allow_list_is_access_denied(benv, bup):
    code, status, lines, _ = refused(benv, bup, NARROW_KEY, model_id=PROFILE)
    assert (code, status, lines[0]["decision"]) == ("AccessDeniedException", 403, "model_not_allowed")


@pytest.mark.parametrize("mode", ["standard", "legacy"])
def test_spent_budget_is_one_request_in_every_retry_mode(benv, bup, mode):
    """ServiceQuotaExceededException, 400: botocore retries neither (legacy mode retries every
    429, standard mode ThrottlingException)."""
    code, status, lines, took = refused(benv, bup, BROKE_KEY, retries={"mode": mode})
    assert (code, status) == ("ServiceQuotaExceededException", 400)
    assert len(lines) == 1 and lines[0]["decision"] == "quota_exceeded", lines
    assert took < 2


def test_token_rate_limit_is_throttling_and_boto3_retries_it(benv, bup):
    """ThrottlingException, 429: boto3's standard mode sends it three times (two retries)."""
    code, status, lines, _ = refused(benv, bup, SMALL_KEY, retries={"mode": "standard"},
                                     inferenceConfig={"maxTokens": 5000})
    assert (code, status) == ("ThrottlingException", 429)
    assert len(lines) == 3 and {l["decision"] for l in lines} == {"rate_limited"}, lines


# --------------------------------------------------------------------------- 4. strict / clamp
def test_strict_mode_injects_max_tokens(benv, bup):
    request_id = rid()
    c = client(benv, key=STRICT_KEY, **hdrs(request_id, **{"x-fake-generate": "max"}))
    r = c.converse(modelId=MODEL, messages=MESSAGES)
    entry, line = charged(benv, bup, request_id, tenant="strict")
    assert entry["body"]["inferenceConfig"]["maxTokens"] == 64
    assert r["usage"]["outputTokens"] == 64 == int(line["output_tokens"])


def test_strict_mode_injects_into_an_inference_config_without_max_tokens(benv, bup):
    request_id = rid()
    c = client(benv, key=STRICT_KEY, **hdrs(request_id, **{"x-fake-generate": "max"}))
    events = list(c.converse_stream(modelId=PROFILE, messages=MESSAGES,
                                    inferenceConfig={"temperature": 0.5})["stream"])
    entry, line = charged(benv, bup, request_id, tenant="strict")
    assert entry["body"]["inferenceConfig"] == {"temperature": 0.5, "maxTokens": 64}
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 64 == int(line["output_tokens"])


def test_strict_mode_injects_invoke_max_tokens(benv, bup):
    request_id = rid()
    c = client(benv, key=STRICT_KEY, **hdrs(request_id, **{"x-fake-generate": "max"}))
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31",
                       "messages": [{"role": "user", "content": PROMPT}]})
    msg = json.loads(c.invoke_model(modelId=MODEL, body=body)["body"].read())
    entry, line = charged(benv, bup, request_id, tenant="strict")
    assert entry["body"]["max_tokens"] == 64 == msg["usage"]["output_tokens"]
    assert "model" not in entry["body"] and "stream_options" not in entry["body"]


def test_clamp_mode_lowers_invoke_max_tokens(benv, bup):
    request_id = rid()
    c = client(benv, key=CLAMP_KEY, **hdrs(request_id, **{"x-fake-generate": "max"}))
    msg = json.loads(c.invoke_model(modelId=MODEL, body=anthropic_body(max_tokens=5000))["body"].read())
    entry, line = charged(benv, bup, request_id, tenant="clamp")
    lowered = entry["body"]["max_tokens"]
    assert 10 <= lowered < 2000, entry["body"]
    assert msg["usage"]["output_tokens"] == lowered == int(line["output_tokens"])


# --------------------------------------------------------------------------- 5. SigV4 after Tollgate
def sigv4_template(directory):
    """envoy/tollgate.yaml with the `openai` cluster (where an unrouted LLM request goes) signed
    by Envoy's aws_request_signing as an upstream filter (envoy/snippets/bedrock-sigv4.yaml's,
    with inline static test credentials), and the snippet route's removal of a client's own
    SigV4 pieces. The ${FIELDS} stay for harness.Envoy to render."""
    with open(os.path.join(ROOT, "envoy", "tollgate.yaml"), encoding="utf-8") as f:
        # ${FIELD}s (not YAML inside flow mappings) become quoted sentinels while it is edited.
        doc = yaml.safe_load(re.sub(r"\$\{([A-Z_]+)\}", r'"@@\1@@"', f.read()))
    with open(SNIPPET, encoding="utf-8") as f:
        snip = yaml.safe_load(render.render(f.read(), {}))
    filters = copy.deepcopy(snip["cluster"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"])
    signing = next(f for f in filters if f["name"] == "envoy.filters.http.aws_request_signing")
    signing["typed_config"]["credential_provider"] = {
        "custom_credential_provider_chain": True,
        "inline_credential": {"access_key_id": AK, "secret_access_key": SK}}
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "openai")
    # YAML anchors are shared objects: copy before changing this cluster only.
    cluster["typed_extension_protocol_options"] = opts = copy.deepcopy(cluster["typed_extension_protocol_options"])
    opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"] = filters
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        vhost["routes"] = [copy.deepcopy(r) for r in vhost["routes"]]
        for route in vhost["routes"]:
            if route.get("route", {}).get("cluster") == "openai":
                route["request_headers_to_remove"] = [*snip["route"]["request_headers_to_remove"],
                                                      "authorization", "x-api-key"]
    # The loaded template's strings are still template text ("$$" escapes); every ${FIELD} was
    # an unquoted YAML scalar: written back unquoted for the renderer.
    text = re.sub(r'"@@([A-Z_]+)@@"', r"${\1}", json.dumps(doc, indent=1))
    path = os.path.join(directory, "tollgate-bedrock-sigv4.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def sup():
    up = FakeUpstream("bedrock-sigv4", args=["--sigv4", f"{AK}:{SK}:{REGION}"])
    yield up
    up.stop()


@pytest.fixture(scope="module")
def senv(sup, tmp_path_factory):
    proc = Envoy(plugin_config(), sup.port, template=sigv4_template(str(tmp_path_factory.mktemp("sigv4"))))
    yield proc
    proc.stop()
    assert "panicked" not in proc.log(), proc.log()[-4000:]


def signed(up, request_id):
    entry = up.entry(request_id)
    assert entry["sigv4"] == "ok", (entry["sigv4_reason"], entry["path"], entry["headers"])
    return entry


def test_sigv4_verifies_after_a_clamp_rewrote_the_converse_body(senv, sup):
    request_id = rid()
    c = client(senv, key=CAPPED_KEY, **hdrs(request_id, **{"x-fake-generate": "max"}))
    r = c.converse(modelId=ARN, messages=MESSAGES, inferenceConfig={"maxTokens": 5000})
    entry = signed(sup, request_id)
    lowered = entry["body"]["inferenceConfig"]["maxTokens"]
    assert lowered == 100 == r["usage"]["outputTokens"]
    assert entry["path"] == f"/model/{ENCODED[ARN]}/converse" and entry["model"] == ARN
    _, line = charged(senv, sup, request_id, tenant="capped")
    assert line["api"] == "converse"


@pytest.mark.parametrize("model_id", [PROFILE, ARN])
def test_sigv4_verifies_after_a_clamp_rewrote_the_invoke_stream_body(senv, sup, model_id):
    request_id = rid()
    c = client(senv, key=CAPPED_KEY, **hdrs(request_id, **{"x-fake-generate": "max", "x-fake-split": "9"}))
    events = [json.loads(ev["chunk"]["bytes"]) for ev in c.invoke_model_with_response_stream(
        modelId=model_id, body=anthropic_body(max_tokens=5000))["body"]]
    entry = signed(sup, request_id)
    lowered = entry["body"]["max_tokens"]
    assert lowered == 100 == events[-2]["usage"]["output_tokens"]
    assert entry["path"] == f"/model/{ENCODED[model_id]}/invoke-with-response-stream"
    _, line = charged(senv, sup, request_id, tenant="capped")
    assert line["api"] == "invoke" and int(line["output_tokens"]) == lowered


def test_sigv4_verifies_after_strict_mode_injected_max_tokens(senv, sup):
    request_id = rid()
    c = client(senv, key=STRICT_KEY, **hdrs(request_id, **{"x-fake-generate": "max", "x-fake-split": "13"}))
    events = list(c.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
    entry = signed(sup, request_id)
    assert entry["body"]["inferenceConfig"] == {"maxTokens": 64}
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 64
    assert entry["path"] == f"/model/{ENCODED[MODEL]}/converse-stream"
    charged(senv, sup, request_id, tenant="strict")
