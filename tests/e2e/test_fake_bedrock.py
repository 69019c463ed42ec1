"""The fake upstream's Bedrock dialect, checked with boto3 itself (no Envoy): every operation of
bedrock-runtime parses, model ids arrive percent-encoded and are decoded in the ledger, the
usage is Bedrock's, errors and exception frames raise boto3's own classes, standard-mode retries
of a ThrottlingException are counted, and the fake's SigV4 check accepts boto3's signatures and
refuses anything else. If this file fails, fix the fake before blaming Tollgate."""
import base64
import json
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError

from harness import FakeUpstream, http

AK, SK, REGION = "AKIDFAKEBEDROCK0001", "fake/secret+key/for/tests0000000000000001", "us-east-1"
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE = "us.anthropic.claude-3-5-sonnet-20240620-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet"
APP_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6"
MODEL_IDS = [MODEL, PROFILE, ARN]
ENCODED = {MODEL: "anthropic.claude-3-5-sonnet-20240620-v1%3A0",
           PROFILE: "us.anthropic.claude-3-5-sonnet-20240620-v1%3A0",
           ARN: "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
                "us.anthropic.claude-3-5-sonnet"}
MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


def anthropic_body(**extra):
    return json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 200,
                       "messages": [{"role": "user", "content": "Hello"}], **extra})


@pytest.fixture(scope="module")
def fake():
    up = FakeUpstream("bedrock", args=["--sigv4", f"{AK}:{SK}:{REGION}"])
    yield up
    up.stop()


def client(fake, access_key=AK, secret_key=SK, **config):
    return boto3.client("bedrock-runtime", endpoint_url=fake.url, region_name=REGION,
                        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        config=Config(retries={"mode": "standard"}, **config))


def with_headers(c, **headers):
    """Knobs as request headers (added before signing, so they are signed like any header)."""
    def add(request, **_):
        for k, v in headers.items():
            request.headers[k] = v
    c.meta.events.register("before-sign.bedrock-runtime.*", add)
    return c


def knobbed(fake, **headers):
    rid = uuid.uuid4().hex
    headers = {"x-fake-request-id": rid, **{k.replace("_", "-"): str(v) for k, v in headers.items()}}
    return with_headers(client(fake), **headers), rid


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_converse(fake, model_id):
    c, rid = knobbed(fake, x_fake_input_tokens=1000, x_fake_cached_tokens=600,
                     x_fake_cache_write_tokens=100, x_fake_output_tokens=9)
    r = c.converse(modelId=model_id, messages=MESSAGES)
    assert r["output"]["message"]["content"][0]["text"] == "Hello from bedrock"
    assert r["stopReason"] == "end_turn" and r["metrics"]["latencyMs"] > 0
    assert r["usage"] == {"inputTokens": 300, "outputTokens": 9, "totalTokens": 1009,
                          "cacheReadInputTokens": 600, "cacheWriteInputTokens": 100}
    e = fake.entry(rid)
    assert e["path"] == f"/model/{ENCODED[model_id]}/converse"
    assert (e["api"], e["model"], e["operation"], e["stream"]) == ("converse", model_id, "converse", False)
    assert e["usage"] == {"input": 1000, "output": 9, "cached_input": 600, "cache_write_input": 100,
                          "reasoning": 0}
    assert e["sigv4"] == "ok" and e["completed"] and e["usage_sent"]


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_converse_stream(fake, model_id):
    c, rid = knobbed(fake, x_fake_cached_tokens=7, x_fake_split=3)
    r = c.converse_stream(modelId=model_id, messages=MESSAGES, inferenceConfig={"maxTokens": 4})
    events = list(r["stream"])
    kinds = [next(iter(ev)) for ev in events]
    assert kinds == ["messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockDelta",
                     "contentBlockStop", "messageStop", "metadata"]
    assert events[-2]["messageStop"]["stopReason"] == "max_tokens"
    usage = events[-1]["metadata"]["usage"]
    e = fake.entry(rid)
    assert e["path"] == f"/model/{ENCODED[model_id]}/converse-stream" and e["model"] == model_id
    assert e["stream"] and e["events"] == e["events_sent"] == 7 and e["usage_sent"]
    assert usage["outputTokens"] == 4 == e["usage"]["output"]  # inferenceConfig.maxTokens bounds it
    assert usage["inputTokens"] + usage["cacheReadInputTokens"] + usage["cacheWriteInputTokens"] \
        == e["usage"]["input"] and e["usage"]["cached_input"] == 7
    assert r["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_invoke_model(fake, model_id):
    c, rid = knobbed(fake, x_fake_cached_tokens=50, x_fake_input_tokens=80)
    r = c.invoke_model(modelId=model_id, body=anthropic_body(max_tokens=5))
    msg = json.loads(r["body"].read())
    assert msg["type"] == "message" and msg["content"][0]["text"] == "Hello from bedrock"
    assert msg["usage"]["input_tokens"] == 30 and msg["usage"]["cache_read_input_tokens"] == 50
    assert msg["usage"]["output_tokens"] == 5 and msg["stop_reason"] == "max_tokens"
    headers = r["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amzn-bedrock-input-token-count"] == "30"
    assert headers["x-amzn-bedrock-output-token-count"] == "5"
    e = fake.entry(rid)
    assert e["path"] == f"/model/{ENCODED[model_id]}/invoke"
    assert (e["api"], e["model"], e["stream"]) == ("invoke", model_id, False)
    assert e["usage"] == {"input": 80, "output": 5, "cached_input": 50, "cache_write_input": 0,
                          "reasoning": 0}


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_invoke_model_with_response_stream(fake, model_id):
    c, rid = knobbed(fake, x_fake_cache_write_tokens=20, x_fake_input_tokens=100, x_fake_split=11)
    r = c.invoke_model_with_response_stream(modelId=model_id, body=anthropic_body())
    events = [json.loads(ev["chunk"]["bytes"]) for ev in r["body"]]
    assert [ev["type"] for ev in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start, delta, stop = events[0]["message"]["usage"], events[-2]["usage"], events[-1]
    assert (start["input_tokens"], start["cache_creation_input_tokens"]) == (80, 20)
    assert delta["output_tokens"] == 7
    assert stop["amazon-bedrock-invocationMetrics"]["inputTokenCount"] == 80  # cache left out
    assert stop["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 7
    e = fake.entry(rid)
    assert e["path"] == f"/model/{ENCODED[model_id]}/invoke-with-response-stream"
    assert (e["api"], e["model"], e["stream"], e["events"]) == ("invoke", model_id, True, 8)
    assert e["usage"] == {"input": 100, "output": 7, "cached_input": 0, "cache_write_input": 20,
                          "reasoning": 0}


def test_raw_slash_in_an_application_inference_profile_arn(fake):
    """Another client may send the ARN's "/" unencoded: the modelId is still the whole ARN."""
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    path = "/model/" + APP_ARN.replace(":", "%3A") + "/converse"
    body = json.dumps({"messages": MESSAGES}).encode()
    req = AWSRequest("POST", fake.url + path, headers={"content-type": "application/json",
                                                       "x-fake-request-id": "raw-slash"}, data=body)
    botocore.auth.SigV4Auth(Credentials(AK, SK), "bedrock", REGION).add_auth(req)
    status, _, data = http("POST", fake.url + path, body, dict(req.headers.items()))
    assert status == 200, data
    e = fake.entry("raw-slash")
    assert (e["model"], e["model_segment"], e["sigv4"]) == (APP_ARN, path.split("/", 2)[2][:-9], "ok")


def test_throttling_is_retried_twice_in_standard_mode(fake):
    c, rid = knobbed(fake, x_fake_status=429)
    with pytest.raises(c.exceptions.ThrottlingException) as err:
        c.converse(modelId=MODEL, messages=MESSAGES)
    assert err.value.response["Error"]["Message"] == "fake bedrock: injected status 429"
    entries = [e for e in fake.ledger() if e["id"] == rid]
    assert len(entries) == 3  # boto3 standard mode: max_attempts 3
    # Retries also carry ttl=… (the client's deadline) before attempt=N.
    assert [e["headers"]["amz-sdk-request"].rsplit("attempt=", 1)[1] for e in entries] == [
        "1; max=3", "2; max=3", "3; max=3"]
    assert len({e["headers"]["amz-sdk-invocation-id"] for e in entries}) == 1
    assert all(e["status"] == 429 and e["error_type"] == "ThrottlingException" for e in entries)


@pytest.mark.parametrize("status,error", [(400, "ValidationException"),
                                          (403, "AccessDeniedException"),
                                          (401, "UnrecognizedClientException"),
                                          # Modelled (400), not a throttle: raised once, a candidate
                                          # for a spent budget that no retry can cure.
                                          (400, "ServiceQuotaExceededException")])
def test_errors_raise_the_sdks_class(fake, status, error):
    c, rid = knobbed(fake, x_fake_status=status, x_fake_error_type=error)
    with pytest.raises(ClientError) as err:
        c.invoke_model(modelId=MODEL, body=anthropic_body())
    assert err.value.response["Error"]["Code"] == error
    if error != "UnrecognizedClientException":  # not in bedrock-runtime's model: plain ClientError
        assert isinstance(err.value, getattr(c.exceptions, error))
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert len([e for e in fake.ledger() if e["id"] == rid]) == 1  # not retried


@pytest.mark.parametrize("op", ["converse_stream", "invoke_model_with_response_stream"])
def test_exception_frame_inside_a_200_stream(fake, op):
    c, rid = knobbed(fake, x_fake_stream_exception="throttlingException:2")
    if op == "converse_stream":
        stream = c.converse_stream(modelId=ARN, messages=MESSAGES)["stream"]
    else:
        stream = c.invoke_model_with_response_stream(modelId=ARN, body=anthropic_body())["body"]
    seen = []
    with pytest.raises(EventStreamError) as err:
        for ev in stream:
            seen.append(ev)
    assert len(seen) == 2
    assert err.value.response["Error"]["Code"] == "throttlingException"
    e = fake.entry(rid)
    assert e["status"] == 200 and e["stream_exception"] == "throttlingException"
    assert e["events"] == 3 and not e["usage_sent"]


def test_corrupt_crc_is_caught_by_botocore(fake):
    c, rid = knobbed(fake, x_fake_corrupt_crc=2)
    stream = c.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"]
    seen = []
    with pytest.raises(ChecksumMismatch):
        for ev in stream:
            seen.append(ev)
    assert len(seen) == 2 and fake.entry(rid)["corrupt_frame"] == 2


def test_generate_max_and_no_usage_knobs(fake):
    c, rid = knobbed(fake, x_fake_generate="max")
    r = c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 123})
    assert r["usage"]["outputTokens"] == 123 == fake.entry(rid)["usage"]["output"]
    c, rid = knobbed(fake, x_fake_no_usage="anthropic")
    events = [json.loads(ev["chunk"]["bytes"]) for ev in
              c.invoke_model_with_response_stream(modelId=MODEL, body=anthropic_body())["body"]]
    assert all("usage" not in ev and "usage" not in ev.get("message", {}) for ev in events)
    assert events[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 7
    c, rid = knobbed(fake, x_fake_no_usage=1)
    assert "usage" not in c.converse(modelId=MODEL, messages=MESSAGES)


def test_reset_after_cuts_the_event_stream(fake):
    c, rid = knobbed(fake, x_fake_reset_after=2)
    stream = c.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"]
    seen = []
    with pytest.raises(Exception):
        for ev in stream:
            seen.append(ev)
    e = fake.entry(rid)
    assert len(seen) == 2 and e["reset"] and e["events_sent"] == 2 and not e["completed"]


def test_frames_decode_with_botocore_and_record_body(fake):
    """The raw bytes: botocore's decoder reads every frame, CRCs included."""
    c, rid = knobbed(fake, x_fake_record_body=1)
    list(c.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
    buf = EventStreamBuffer()
    buf.add_data(base64.b64decode(fake.entry(rid)["body_b64"]))
    frames = list(buf)
    assert [f.headers[":event-type"] for f in frames][-1] == "metadata"
    assert all(f.headers[":message-type"] == "event" for f in frames)


def test_sigv4_verification(fake):
    """boto3's signature passes (every test above); a wrong secret, another key, a body changed
    after signing, or no signature at all are refused with Bedrock's 403."""
    bad = with_headers(client(fake, secret_key="not-the-secret"), **{"x-fake-request-id": "bad-secret"})
    with pytest.raises(ClientError) as err:
        bad.converse(modelId=MODEL, messages=MESSAGES)
    assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert fake.entry("bad-secret")["sigv4"] == "bad"
    assert fake.entry("bad-secret")["sigv4_reason"] == "signature mismatch"

    other = with_headers(client(fake, access_key="AKIDOTHER"), **{"x-fake-request-id": "other-key"})
    with pytest.raises(ClientError):
        other.converse(modelId=MODEL, messages=MESSAGES)
    assert fake.entry("other-key")["sigv4"] == "bad"

    tamper = with_headers(client(fake), **{"x-fake-request-id": "tampered"})

    def change_body(request, **_):  # the prepared request, signed, about to be sent
        request.body = request.body.replace(b"Hello", b"Jello")
    tamper.meta.events.register("before-send.bedrock-runtime.*", change_body)
    with pytest.raises(ClientError):
        tamper.converse(modelId=MODEL, messages=MESSAGES)
    assert fake.entry("tampered")["sigv4"] == "bad"
    assert fake.entry("tampered")["body"]["messages"][0]["content"][0]["text"] == "Jello"

    status, headers, data = http("POST", fake.url + "/model/m/converse", {"messages": MESSAGES},
                                 {"x-fake-request-id": "unsigned", "content-type": "application/json"})
    assert status == 403 and headers["x-amzn-errortype"].startswith("MissingAuthenticationTokenException")
    assert json.loads(data) == {"message": "Missing Authentication Token"}
    assert fake.entry("unsigned")["sigv4"] == "absent"


def test_without_sigv4_flag_nothing_is_checked():
    up = FakeUpstream("bedrock-nosig")
    try:
        status, _, data = http("POST", up.url + "/model/m%3A1/invoke", json.loads(anthropic_body()),
                               {"x-fake-request-id": "x"})
        assert status == 200, data
        e = up.entry("x")
        assert e["sigv4"] is None and e["model"] == "m:1" and e["api"] == "invoke"
    finally:
        up.stop()
