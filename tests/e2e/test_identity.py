"""Tenant identity from a trusted header, from JWT claims in Envoy metadata, and the default
tenant. In key or metadata mode a client-sent tenant header changes nothing."""
import base64
import hashlib
import hmac
import json
import time
import uuid

import pytest

from conftest import KEYS
from harness import Envoy, http, raw_post

SECRET = b"tollgate-demo-secret-change-me"  # the demo key of envoy/tollgate-jwt.yaml
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims, secret=SECRET):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "demo"}).encode())
    body = b64(json.dumps({"iss": "https://idp.example.internal", "exp": int(time.time()) + 600, **claims}).encode())
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def call(envoy, headers):
    rid = str(uuid.uuid4())
    status, _, data = http("POST", envoy.url + "/v1/chat/completions", CHAT,
                           {"content-type": "application/json", "x-request-id": rid, **headers})
    return status, data, rid


@pytest.fixture(scope="module")
def header_envoy(upstream):
    proc = Envoy({"identity": {"source": "header", "header": "x-tenant-id", "default_tenant": "guests"},
                  "tenants": {"team-a": {}, "guests": {}}}, upstream.port)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def jwt_envoy(upstream):
    with open("envoy/tollgate-jwt.json", encoding="utf-8") as f:
        config = json.load(f)
    proc = Envoy(config, upstream.port, template="tollgate-jwt.yaml")
    yield proc
    proc.stop()


def test_trusted_header_names_the_tenant(header_envoy):
    status, _, rid = call(header_envoy, {"x-tenant-id": "team-a"})
    assert status == 200
    assert header_envoy.access_line(rid)["tenant"] == "team-a"


def test_unknown_or_missing_header_goes_to_default_tenant(header_envoy):
    for headers in ({"x-tenant-id": "team-zzz"}, {}):
        status, _, rid = call(header_envoy, headers)
        assert status == 200
        assert header_envoy.access_line(rid)["tenant"] == "guests"


def test_jwt_claim_names_the_tenant(jwt_envoy):
    status, _, rid = call(jwt_envoy, {"authorization": f"Bearer {jwt({'tenant': 'team-b'})}"})
    assert status == 200, _
    assert jwt_envoy.access_line(rid)["tenant"] == "team-b"


def test_client_tenant_header_cannot_override_the_claim(jwt_envoy):
    status, _, rid = call(jwt_envoy, {"authorization": f"Bearer {jwt({'tenant': 'team-b'})}",
                                      "x-tenant-id": "team-a", "x-tollgate-tenant": "team-a"})
    assert status == 200
    assert jwt_envoy.access_line(rid)["tenant"] == "team-b"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_bearer_scheme_in_any_case_names_the_tenant(jwt_envoy, envoy, scheme):
    """The scheme is case-insensitive (RFC 9110): the shipped jwt_authn config lists the usual
    spellings (its value_prefix is matched case-sensitively), and API keys read any case."""
    status, _, rid = call(jwt_envoy, {"authorization": f"{scheme} {jwt({'tenant': 'team-b'})}"})
    assert status == 200, _
    assert jwt_envoy.access_line(rid)["tenant"] == "team-b"
    status, _, rid = call(envoy, {"authorization": f"{scheme} {KEYS['team-a']}"})
    assert status == 200, _
    assert envoy.access_line(rid)["tenant"] == "team-a"


@pytest.mark.parametrize("token", [None, "forged", "bad-signature", "unknown-tenant"])
def test_missing_or_bad_jwt_is_401_in_api_shape(jwt_envoy, token):
    headers = {}
    if token == "forged":
        headers["authorization"] = "Bearer not.a.jwt"
    elif token == "bad-signature":
        headers["authorization"] = f"Bearer {jwt({'tenant': 'team-a'}, secret=b'wrong')}"
    elif token == "unknown-tenant":
        headers["authorization"] = f"Bearer {jwt({'tenant': 'team-zzz'})}"
    status, data, _ = call(jwt_envoy, headers)
    assert status == 401
    assert json.loads(data)["error"]["code"] == "invalid_api_key"


A, B = KEYS["team-a"], KEYS["team-b"]


@pytest.mark.parametrize("path,credentials", [
    ("/v1/chat/completions", [("x-api-key", A), ("authorization", f"Bearer {B}")]),
    ("/v1/chat/completions", [("x-api-key", A), ("x-api-key", B)]),
    ("/v1/chat/completions", [("authorization", f"Bearer {B}"), ("authorization", f"Bearer {A}")]),
    ("/v1/messages", [("x-api-key", A), ("api-key", B)]),
])
def test_conflicting_api_keys_are_401_in_api_shape(envoy, path, credentials):
    """Two credential headers naming different keys: Tollgate would bill one while an upstream
    may authenticate the other, so the request is refused before it goes anywhere."""
    head, rest = raw_post(envoy.port, path, [("content-type", "application/json"), *credentials],
                          {**CHAT, "max_tokens": 5})
    assert head.startswith("HTTP/1.1 401"), head
    error = json.loads(rest)
    if path == "/v1/messages":
        assert error["type"] == "error" and error["error"]["type"] == "authentication_error"
    else:
        assert error["error"]["code"] == "invalid_api_key"
    assert "different API keys" in rest.decode()


def test_the_same_key_twice_is_one_credential(envoy):
    key = KEYS["team-b"]
    status, _, rid = call(envoy, {"x-api-key": key, "authorization": f"Bearer {key}"})
    assert status == 200
    assert envoy.access_line(rid)["tenant"] == "team-b"
