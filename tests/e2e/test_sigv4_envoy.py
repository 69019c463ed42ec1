"""Bedrock's SigV4 added by the real Envoy 1.40 (`envoy.filters.http.aws_request_signing`), verified
by the fake Bedrock upstream with botocore's own signer (tests/fake_bedrock.py, --sigv4).

Without the Tollgate wasm filter (it does not read Bedrock paths before issue 20 lands, so the
shipped route table would answer 404): a Lua filter stands in for it, in its place in the HTTP
filter chain, and does what Tollgate's clamp will do: it rewrites the body
(`inferenceConfig.maxTokens` / `max_tokens` lowered to 64, the length changes). The listener has
the shipped path settings of envoy/tollgate.yaml (normalize_path, merge_slashes,
path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD) or KEEP_UNCHANGED.

What it shows:
- The signing filter as an UPSTREAM HTTP filter of the Bedrock cluster (the cluster and filter
  are envoy/snippets/bedrock-sigv4.yaml, loaded here) signs what is sent: the body after the
  rewrite, the path after normalisation, the Host after the route's host rewrite, again on each
  retry. boto3's own signature (the client's credentials) is replaced, never forwarded.
- Model ids as boto3 encodes them (`%3A`, `%2F`) and an ARN with a raw `/`: the exact path
  forwarded under each listener setting, and the signature verifies under both. But the shipped
  UNESCAPE_AND_FORWARD forwards boto3's `%2F` as `/`, which live Bedrock routes as another path
  (HTTP 200 UnknownOperationException; the fake's x-fake-bedrock-routing: real): KEEP_UNCHANGED,
  or re-encoding the model segment after normalisation (the Lua stand-in's REENCODE, what
  Tollgate should do), forwards boto3's exact path.
- The same filter in the HCM chain (after Tollgate, before the router) signs the Host the client
  sent; a route host rewrite (auto_host_rewrite in tollgate-providers.yaml) then breaks the
  signature, and a virtual host's request_headers_to_remove [authorization] would strip it.
"""
import copy
import json
import os
import uuid

import boto3
import pytest
import yaml
from botocore.config import Config

from harness import ROOT, Envoy, FakeUpstream, free_port, http, render

AK, SK, REGION = "AKIDENVOYSIGNER00001", "envoy/signing+secret/000000000000000000001", "us-east-1"
TENANT_AK, TENANT_SK = "AKIDTENANTCLIENT0001", "tenant-secret-not-known-to-bedrock"
BEDROCK_HOST = "bedrock-runtime.us-east-1.amazonaws.com"
SNIPPET = os.path.join(ROOT, "envoy", "snippets", "bedrock-sigv4.yaml")

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE = "us.anthropic.claude-3-5-sonnet-20240620-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet"
APP_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6"
ARN_PATH = ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
            "us.anthropic.claude-3-5-sonnet/converse")
MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]

# The stand-in for Tollgate: buffers the body, lowers the output caps to 64 (a clamp); with
# REENCODE, also writes the Bedrock model segment of :path fully percent-encoded again (what this
# report proposes Tollgate does on every Bedrock request, after Envoy's path normalisation).
CLAMP_LUA = """
local REENCODE = __REENCODE__
local OPS = {["converse"]=true, ["converse-stream"]=true, ["invoke"]=true,
             ["invoke-with-response-stream"]=true}
local function reencode(path)
  local p, query = path, ""
  local q = path:find("?", 1, true)
  if q then p, query = path:sub(1, q - 1), path:sub(q) end
  local prefix, id, op, tail = p:match("^(.-/model/)(.+)/([%a%-]+)(/*)$")
  if not prefix or not OPS[op] then return path end
  id = id:gsub("%%(%x%x)", function(x) return string.char(tonumber(x, 16)) end)
  id = id:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end)
  return prefix .. id .. "/" .. op .. tail .. query
end
function envoy_on_request(h)
  if h:headers():get(":method") ~= "POST" then return end
  if REENCODE then h:headers():replace(":path", reencode(h:headers():get(":path"))) end
  local body = h:body()
  if body == nil then return end
  local s = body:getBytes(0, body:length())
  local out, a = string.gsub(s, '"maxTokens":%s*%d+', '"maxTokens":64')
  local out2, b = string.gsub(out, '"max_tokens":%s*%d+', '"max_tokens":64')
  if a + b > 0 then
    body:setBytes(out2)
    h:headers():replace("content-length", tostring(#out2))
  end
end
"""


# tollgate-providers.yaml's virtual host removes these on every route.
VHOST_REMOVES = ["authorization", "x-api-key", "api-key", "x-tollgate-route", "x-tollgate-model"]


def snippet():
    with open(SNIPPET, encoding="utf-8") as f:
        return yaml.safe_load(render.render(f.read(), {}))


def bootstrap(listen, admin, upstream_port, escaped="UNESCAPE_AND_FORWARD", placement="cluster",
              credentials="env", host_rewrite=True, reencode=False):
    """A minimal Bedrock listener; `placement`: the signing filter on the cluster ("cluster", as
    the snippet) or in the HCM chain after the clamp ("hcm")."""
    snip = snippet()
    cluster = copy.deepcopy(snip["cluster"])
    # The fake: plain HTTP on 127.0.0.1 instead of TLS to bedrock-runtime.<region>.amazonaws.com.
    cluster.pop("transport_socket", None)
    cluster["type"] = "STATIC"
    cluster.pop("dns_lookup_family", None)
    cluster["load_assignment"] = {"cluster_name": cluster["name"], "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": upstream_port}}}}]}]}
    opts = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    opts.pop("auto_config", None)
    opts["explicit_http_config"] = {"http_protocol_options": {}}
    signing = next(f for f in opts["http_filters"] if f["name"] == "envoy.filters.http.aws_request_signing")
    if credentials == "inline":
        signing["typed_config"]["credential_provider"] = {
            "custom_credential_provider_chain": True,
            "inline_credential": {"access_key_id": AK, "secret_access_key": SK}}
    route = copy.deepcopy(snip["route"])
    # No Tollgate here to set x-tollgate-route.
    route["match"]["headers"] = [m for m in route["match"]["headers"] if m["name"] != "x-tollgate-route"]
    route["route"].pop("auto_host_rewrite", None)
    if host_rewrite:
        # auto_host_rewrite takes the DNS name of a LOGICAL_DNS cluster; the STATIC fake has none.
        route["route"]["host_rewrite_literal"] = BEDROCK_HOST
    vhost = {"name": "bedrock", "domains": ["*"], "routes": [route],
             "request_headers_to_remove": list(VHOST_REMOVES)}
    hcm_filters = [{"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": CLAMP_LUA.replace("__REENCODE__", "true" if reencode else "false")}}}]
    if placement == "hcm":
        opts["http_filters"] = [f for f in opts["http_filters"] if f is not signing]
        hcm_filters.append(signing)
        # The router must then keep what the filter added before it: the virtual host's
        # authorization and the route's x-amz-* removals would strip the signature.
        vhost["request_headers_to_remove"] = [h for h in vhost["request_headers_to_remove"]
                                              if h != "authorization"]
        route.pop("request_headers_to_remove", None)
    hcm_filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bedrock", "normalize_path": True, "merge_slashes": True,
        "path_with_escaped_slashes_action": escaped,
        "route_config": {"name": "bedrock", "virtual_hosts": [vhost]},
        "http_filters": hcm_filters}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "bedrock", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": [cluster]}}


class SigningEnvoy:
    def __init__(self, tmp_path, upstream_port, **kw):
        listen, admin = free_port(), free_port()
        path = tmp_path / f"bedrock-{uuid.uuid4().hex[:8]}.yaml"
        # The harness renders it as a template again: "$" is written "$$".
        path.write_text(json.dumps(bootstrap(listen, admin, upstream_port, **kw), indent=1)
                        .replace("$", "$$"))
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
        try:  # Envoy inherits the environment: its credentials for the "env" variants
            self.envoy = Envoy("{}", upstream_port, template=str(path),
                               extra={"LISTEN_PORT": str(listen), "ADMIN_PORT": str(admin)})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.url = self.envoy.url

    def stop(self):
        self.envoy.stop()


@pytest.fixture(scope="module")
def fake():
    up = FakeUpstream("bedrock-sigv4", args=["--sigv4", f"{AK}:{SK}:{REGION}"])
    yield up
    up.stop()


VARIANTS = {
    # name: (bootstrap kwargs, path Bedrock receives for ARN_PATH, expected sigv4)
    "shipped-paths+cluster-filter+env-credentials": (
        {"escaped": "UNESCAPE_AND_FORWARD", "placement": "cluster", "credentials": "env"},
        ARN_PATH.replace("%2F", "/"), "ok"),
    "keep-unchanged+cluster-filter+inline-credentials": (
        {"escaped": "KEEP_UNCHANGED", "placement": "cluster", "credentials": "inline"},
        ARN_PATH, "ok"),
    # The shipped listener, and the model segment written encoded again after normalisation.
    "shipped-paths+reencoded-model+cluster-filter": (
        {"escaped": "UNESCAPE_AND_FORWARD", "placement": "cluster", "credentials": "env",
         "reencode": True}, ARN_PATH, "ok"),
    # In the HCM chain: right only while nothing after it changes the request...
    "shipped-paths+hcm-filter+no-host-rewrite": (
        {"escaped": "UNESCAPE_AND_FORWARD", "placement": "hcm", "credentials": "env",
         "host_rewrite": False}, ARN_PATH.replace("%2F", "/"), "ok"),
    # ...and the route's host rewrite (auto_host_rewrite in tollgate-providers.yaml) does.
    "shipped-paths+hcm-filter+host-rewrite": (
        {"escaped": "UNESCAPE_AND_FORWARD", "placement": "hcm", "credentials": "env"},
        ARN_PATH.replace("%2F", "/"), "bad"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, fake, tmp_path_factory):
    kwargs, arn_path, expected = VARIANTS[request.param]
    proc = SigningEnvoy(tmp_path_factory.mktemp("sigv4"), fake.port, **kwargs)
    proc.host_rewrite = kwargs.get("host_rewrite", True)
    proc.placement = kwargs["placement"]
    proc.reencode = kwargs.get("reencode", False)
    yield proc, arn_path, expected
    proc.stop()


def tenant_client(url, **headers):
    """boto3 as a tenant uses it: its own (non-Bedrock) credentials, endpoint = Envoy."""
    c = boto3.client("bedrock-runtime", endpoint_url=url, region_name=REGION,
                     aws_access_key_id=TENANT_AK, aws_secret_access_key=TENANT_SK,
                     config=Config(retries={"mode": "standard", "max_attempts": 1}))

    def add(request, **_):
        for k, v in headers.items():
            request.headers[k] = v
    c.meta.events.register("before-sign.bedrock-runtime.*", add)
    return c


def check(fake, proc, rid, expected):
    e = fake.entry(rid)
    assert e["sigv4"] == expected, (e["sigv4_reason"], e["path"], e["headers"])
    # The ledger hides authorization; "ok" means it was Envoy's key, not the tenant's.
    assert e["headers"]["authorization"] is True
    assert "x-amz-content-sha256" in e["headers"]  # the payload hash Envoy signed
    if expected == "bad":  # only the Host changed after signing
        assert e["sigv4_reason"] == "signature mismatch"
    assert (e["headers"]["host"] == BEDROCK_HOST) == proc.host_rewrite
    return e


def test_converse_arn_path_and_clamped_body(fake, variant):
    """The brief's path: boto3 encodes the inference-profile ARN's `:` and `/`."""
    proc, arn_path, expected = variant
    rid = uuid.uuid4().hex
    c = tenant_client(proc.url, **{"x-fake-request-id": rid, "x-fake-generate": "max"})
    if expected == "ok":
        r = c.converse(modelId=ARN, messages=MESSAGES, inferenceConfig={"maxTokens": 4096})
        assert r["usage"]["outputTokens"] == 64  # the fake read the clamped body
    else:
        with pytest.raises(c.exceptions.ClientError) as err:
            c.converse(modelId=ARN, messages=MESSAGES, inferenceConfig={"maxTokens": 4096})
        assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
    e = check(fake, proc, rid, expected)
    assert e["path"] == arn_path
    assert e["model"] == ARN  # decoded either way
    assert e["body"]["inferenceConfig"]["maxTokens"] == 64  # (and content-length followed it)


@pytest.mark.parametrize("op", ["converse_stream", "invoke_model", "invoke_model_with_response_stream"])
def test_other_operations_and_model_ids(fake, variant, op):
    proc, _, expected = variant
    rid = uuid.uuid4().hex
    c = tenant_client(proc.url, **{"x-fake-request-id": rid})
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 4096,
                       "messages": [{"role": "user", "content": "Hello"}]})
    try:
        if op == "converse_stream":
            out = list(c.converse_stream(modelId=PROFILE, messages=MESSAGES)["stream"])
            assert "metadata" in out[-1]
        elif op == "invoke_model":
            assert json.loads(c.invoke_model(modelId=MODEL, body=body)["body"].read())["type"] == "message"
        else:
            out = [json.loads(ev["chunk"]["bytes"]) for ev in
                   c.invoke_model_with_response_stream(modelId=ARN, body=body)["body"]]
            assert out[-1]["type"] == "message_stop"
        assert expected == "ok"
    except c.exceptions.ClientError as err:
        assert expected == "bad", err
        assert err.response["Error"]["Code"] == "InvalidSignatureException"
    e = check(fake, proc, rid, expected)
    if op != "converse_stream":
        assert e["body"]["max_tokens"] == 64
    assert e["model"] == {"converse_stream": PROFILE, "invoke_model": MODEL,
                          "invoke_model_with_response_stream": ARN}[op]


def test_live_bedrock_routing_of_the_forwarded_path(fake, variant):
    """Live Bedrock splits a path at a raw "/" and answers HTTP 200 UnknownOperationException
    (fake: x-fake-bedrock-routing: real): the shipped UNESCAPE_AND_FORWARD turns boto3's %2F into
    that "/" and breaks every ARN model id; KEEP_UNCHANGED or re-encoding the segment does not."""
    proc, arn_path, expected = variant
    if expected != "ok":
        pytest.skip("signature refused in this variant")
    rid = uuid.uuid4().hex
    c = tenant_client(proc.url, **{"x-fake-request-id": rid, "x-fake-bedrock-routing": "real"})
    r = c.converse(modelId=ARN, messages=MESSAGES)
    e = fake.entry(rid)
    assert e["path"] == arn_path and e["raw_slash"] == ("inference-profile/" in arn_path)
    if e["raw_slash"]:
        # boto3 parses the 200 as an empty Converse answer: no output, no usage, no error.
        assert e["unknown_operation"] and "output" not in r and "usage" not in r
    else:
        assert not e["unknown_operation"] and r["output"]["message"]["role"] == "assistant"


def test_raw_slash_arn_and_a_client_signature_never_reach_bedrock(fake, variant):
    """An application inference profile ARN with its `/` unencoded, sent with a stale client
    signature and session token: Envoy's signature replaces them."""
    proc, _, expected = variant
    path = "/model/" + APP_ARN.replace(":", "%3A") + "/invoke"
    status, _, data = http("POST", proc.url + path,
                           {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 10,
                            "messages": [{"role": "user", "content": "Hi"}]},
                           {"x-fake-request-id": "raw-" + proc.url, "content-type": "application/json",
                            "authorization": "AWS4-HMAC-SHA256 Credential=" + TENANT_AK
                            + "/20200101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature="
                            + "0" * 64,
                            "x-amz-security-token": "tenant-session-token"})
    assert status == (200 if expected == "ok" else 403), data
    e = check(fake, proc, "raw-" + proc.url, expected)
    assert e["model"] == APP_ARN
    assert e["path"] == (path.replace("application-inference-profile/", "application-inference-profile%2F")
                         if proc.reencode else path)
    # The route drops it; so does Envoy's signer without a session token of its own (the hcm
    # variants, where no route removes it).
    assert "x-amz-security-token" not in e["headers"]
