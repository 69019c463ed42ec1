"""Bad input gets its documented status and an error body in the API's own shape."""
import http.client
import json
import select
import socket
import uuid

import pytest

from conftest import KEYS, api_key_config
from harness import Envoy, http as request


def openai_error(data):
    body = json.loads(data)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def anthropic_error(data):
    body = json.loads(data)
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]


def post(envoy, path, body, headers=None, key=KEYS["team-a"]):
    h = {"content-type": "application/json", "authorization": f"Bearer {key}", "x-request-id": str(uuid.uuid4())}
    h.update(headers or {})
    status, resp_headers, data = request("POST", envoy.url + path, body, h)
    return status, resp_headers, data, h["x-request-id"]


def test_malformed_json_is_400_openai(envoy, upstream):
    status, headers, data, rid = post(envoy, "/v1/chat/completions", b'{"model": "gpt-4o", "messages": [')
    assert status == 400
    assert headers["content-type"] == "application/json"
    err = openai_error(data)
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]
    assert envoy.access_line(rid)["decision"] == "bad_request"
    assert all(e["id"] != rid for e in upstream.ledger()), "a refused request reached the upstream"


def test_malformed_json_is_400_anthropic(envoy):
    status, _, data, _ = post(envoy, "/v1/messages", b"not json at all")
    assert status == 400
    assert anthropic_error(data)["type"] == "invalid_request_error"


def test_missing_model_names_the_param(envoy):
    status, _, data, _ = post(envoy, "/v1/chat/completions", {"messages": []})
    assert status == 400
    assert openai_error(data)["param"] == "model"


def test_wrong_field_type_names_the_param(envoy):
    status, _, data, _ = post(envoy, "/v1/responses", {"model": "m", "max_output_tokens": "lots"})
    assert status == 400
    assert openai_error(data)["param"] == "max_output_tokens"


def test_body_over_cap_with_content_length_is_413(envoy):
    big = {"model": "m", "input": "x" * 70000}
    status, _, data, rid = post(envoy, "/v1/embeddings", big)
    assert status == 413
    err = openai_error(data)
    assert err["code"] == "request_too_large" and "65536" in err["message"]
    assert envoy.access_line(rid)["decision"] == "too_large"


def test_chunked_body_over_cap_is_413(envoy):
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    chunks = [b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"'] + [b"y" * 8192] * 10 + [b'"}]}']
    conn.request("POST", "/v1/messages", body=iter(chunks), encode_chunked=True,
                 headers={"content-type": "application/json", "x-api-key": KEYS["team-a"]})
    resp = conn.getresponse()
    assert resp.status == 413
    assert anthropic_error(resp.read())["type"] == "request_too_large"
    conn.close()


def test_chunked_body_under_cap_is_read(envoy, upstream):
    rid = str(uuid.uuid4())
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    chunks = [b'{"model":"claude-x","max_tokens":5,', b'"messages":[{"role":"user","content":"hi"}]}']
    conn.request("POST", "/v1/messages", body=iter(chunks), encode_chunked=True,
                 headers={"content-type": "application/json", "x-api-key": KEYS["team-a"],
                          "x-request-id": rid, "x-fake-request-id": rid})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    conn.close()
    line = envoy.access_line(rid)
    assert line["model"] == "claude-x"
    assert line["output_tokens"] == upstream.entry(rid)["usage"]["output"]


@pytest.mark.parametrize("path,check", [("/v1/chat/completions", openai_error), ("/v1/messages", anthropic_error)])
def test_unknown_tenant_is_401_in_api_shape(envoy, path, check):
    status, _, data, rid = post(envoy, path, {"model": "m"}, key="sk-nobody")
    assert status == 401
    err = check(data)
    assert err.get("code") == "invalid_api_key" or err["type"] == "authentication_error"
    assert envoy.access_line(rid)["decision"] == "unauthenticated"


def test_missing_key_is_401(envoy):
    status, _, data = request("POST", envoy.url + "/v1/chat/completions", {"model": "m"},
                              {"content-type": "application/json"})
    assert status == 401
    assert "No API key" in openai_error(data)["message"]


def test_non_utf8_header_is_401_not_a_trap(envoy):
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("authorization", b"Bearer \xff\xfe\x80")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", "13")
    conn.endheaders(b'{"model":"m"}')
    resp = conn.getresponse()
    assert resp.status == 401
    openai_error(resp.read())
    conn.close()


def test_non_llm_path_is_not_read_and_never_reaches_the_upstream(envoy, upstream):
    rid = str(uuid.uuid4())
    status, _, data = request("GET", envoy.url + "/v1/models", None, {"x-request-id": rid})
    # Tollgate did not intervene (no tenant, no decision); the route table's catch-all answered.
    assert status == 404
    assert openai_error(data)["code"] == "not_found"
    line = envoy.access_line(rid)
    assert line["tenant"] is None and line["decision"] is None
    assert line["upstream_host"] in (None, "") and line["route_name"] == "not-found"


def test_get_on_llm_path_is_not_an_llm_call(envoy):
    rid = str(uuid.uuid4())
    status, _, data = request("GET", envoy.url + "/v1/chat/completions", None, {"x-request-id": rid})
    # No tenant check (not 401), no body read: not an LLM call, and not forwarded either.
    assert status == 404 and openai_error(data)["code"] == "not_found"
    line = envoy.access_line(rid)
    assert line["tenant"] is None and line["upstream_host"] in (None, "")


def test_request_without_body_is_400(envoy):
    status, _, data = request("POST", envoy.url + "/v1/chat/completions", None,
                              {"authorization": f"Bearer {KEYS['team-a']}", "content-length": "0"})
    assert status == 400
    openai_error(data)


@pytest.mark.parametrize("path,shape,extra", [
    ("/v1/chat/completions", openai_error, {}),
    # A stream without include_usage: Tollgate would inject it (the rewrite used to fail with 500).
    ("/v1/chat/completions", openai_error, {"stream": True}),
    ("/v1/messages", anthropic_error, {"max_tokens": 5}),
])
def test_deeply_nested_body_is_400_in_the_apis_shape(envoy, upstream, path, shape, extra):
    """10,000 nested arrays: refused by Tollgate before it goes anywhere (at most 100 levels)."""
    deep = "[" * 10000 + "]" * 10000
    body = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x":%s%s}'
            % (deep, "".join(f',"{k}":{json.dumps(v)}' for k, v in extra.items()))).encode()
    status, headers, data, rid = post(envoy, path, body)
    assert status == 400 and headers["content-type"] == "application/json", data
    err = shape(data)
    assert "nested too deeply" in err["message"] and "100" in err["message"], err
    if shape is openai_error:
        assert err["param"] is None and err["type"] == "invalid_request_error"
    assert envoy.access_line(rid)["decision"] == "bad_request"
    assert all(e["id"] != rid for e in upstream.ledger()), "a refused request reached the upstream"


def test_nesting_at_the_limit_is_admitted(envoy, upstream):
    inner = "[" * 97 + "1" + "]" * 97  # + the body object and the message list/object: 100 levels
    body = ('{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi","x":%s}]}' % inner).encode()
    status, _, _, rid = post(envoy, "/v1/chat/completions", body)
    assert status == 200
    assert envoy.access_line(rid)["decision"] == "admitted"


def test_bodies_past_what_one_vm_may_buffer_get_429(upstream):
    """One worker (one VM) may have 128 KiB of request bodies buffered at once: of three bodies
    held open with 50,000 bytes each, the one that would pass it is refused with 429 (retry
    soon) before its end; the other two complete."""
    limits = {"max_request_body_bytes": 65536, "max_buffered_request_bytes": 131072}
    proc = Envoy(api_key_config(limits=limits), upstream.port, concurrency=1)
    body = json.dumps({"model": "m", "max_tokens": 5, "input": "x" * 59900}).encode()
    socks = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
            sock.sendall(f"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         f"authorization: Bearer {KEYS['team-a']}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                         + body[:50000])
            socks.append(sock)
        ready, _, _ = select.select(socks, [], [], 10)
        assert len(ready) == 1, "exactly one body passes the VM's cap"
        head, data = read_response(ready[0])
        assert head.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in head.lower(), head
        error = openai_error(data)
        assert error["code"] == "rate_limit_exceeded" and "buffering" in error["message"]
        for sock in socks:
            if sock is not ready[0]:
                sock.sendall(body[50000:])
                head, _ = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        for sock in socks:
            sock.close()
        proc.stop()


def read_response(sock):
    """One HTTP/1.1 response with a content-length: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, rest
        rest += chunk
    return head, rest
