"""Streams that never finish are still settled and logged: what `on_log` writes reaches the
connection manager's access log."""
import json
import socket
import time
import uuid

import pytest

from conftest import KEYS
from harness import http


def test_client_abort_mid_stream_is_logged_with_observed_output(envoy, upstream):
    rid = str(uuid.uuid4())
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "a long story"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {KEYS['team-a']}\r\nx-request-id: {rid}\r\nx-fake-request-id: {rid}\r\n".encode()
        + b"x-fake-chunks: 400\r\nx-fake-split: 7\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode() + body
    )
    received = b""
    while received.count(b"data: ") < 5:
        received += sock.recv(4096)
    sock.close()  # the client walks away mid-stream
    line = envoy.access_line(rid, timeout=15)
    assert line["decision"] == "admitted"
    assert line["usage_source"] == "observed"
    assert int(line["output_tokens"]) >= 3  # at least the content deltas that passed
    entry = upstream.entry(rid)
    assert int(line["output_tokens"]) < entry["usage"]["output"]  # the stream was cut short


def test_upstream_reset_mid_stream_is_logged(envoy, upstream):
    rid = str(uuid.uuid4())
    status, _, data = (None, None, None)
    try:
        status, _, data = http("POST", envoy.url + "/v1/messages",
                               {"model": "claude-3-5-haiku", "max_tokens": 50, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]},
                               {"x-api-key": KEYS["team-a"], "x-request-id": rid, "x-fake-request-id": rid,
                                "x-fake-chunks": "10", "x-fake-reset-after": "5"})
    except Exception:  # noqa: BLE001 - the client sees a broken stream; that is the point
        pass
    line = envoy.access_line(rid, timeout=15)
    assert line["decision"] == "admitted"
    assert "UR" in line["response_flags"] or "UPE" in line["response_flags"] or line["status"] == 200
    # message_start (with input usage) and some deltas passed before the reset.
    assert line["usage_source"] in ("observed", "reported")
    assert int(line["input_tokens"]) > 0


def test_upstream_reset_after_headers_logs_no_usage(envoy, upstream):
    rid = str(uuid.uuid4())
    try:
        http("POST", envoy.url + "/v1/chat/completions",
             {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
             {"authorization": f"Bearer {KEYS['team-a']}", "x-request-id": rid,
              "x-fake-request-id": rid, "x-fake-reset-after": "0"})
    except Exception:  # noqa: BLE001 - headers arrived, then the body was cut
        pass
    line = envoy.access_line(rid, timeout=15)
    assert "UR" in line["response_flags"] or "UPE" in line["response_flags"], line
    assert line["usage_source"] == "refunded" and line["output_tokens"] == 0


CUT_JSON = [
    # (id, path, body, bytes cut from the end, the ledger's usage_source)
    ("chat-usage-passed", "/v1/chat/completions", {"model": "gpt-4o-mini"}, 1, "reported"),
    ("chat-cut-in-usage", "/v1/chat/completions", {"model": "gpt-4o-mini"}, 2, "refunded"),
    ("messages-usage-passed", "/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 50}, 1, "reported"),
    ("messages-cut-in-usage", "/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 50}, 2, "refunded"),
]


@pytest.mark.parametrize("path,body,cut,source", [c[1:] for c in CUT_JSON], ids=[c[0] for c in CUT_JSON])
def test_json_cut_short_after_its_usage_is_charged_the_usage(envoy, upstream, path, body, cut, source):
    """A JSON 200 whose upstream resets after the usage object passed whole (only the closing
    brace missing) is charged that usage, like a cut stream; cut inside the usage, nothing (it
    used to be refunded in both cases)."""
    rid = str(uuid.uuid4())
    try:
        http("POST", envoy.url + path, {**body, "messages": [{"role": "user", "content": "hi"}]},
             {"authorization": f"Bearer {KEYS['team-a']}", "x-request-id": rid,
              "x-fake-request-id": rid, "x-fake-reset-before-end": str(cut)})
    except Exception:  # noqa: BLE001 - the body was cut short: the client sees a broken response
        pass
    line = envoy.access_line(rid, timeout=15)
    entry = upstream.entry(rid)
    assert entry["reset"] and not entry["completed"], entry
    assert "UR" in line["response_flags"] or "UPE" in line["response_flags"], line
    assert line["usage_source"] == source, line
    if source == "reported":
        assert (line["input_tokens"], line["output_tokens"]) == (
            entry["usage"]["input"], entry["usage"]["output"]), (line, entry["usage"])
    else:
        assert line["output_tokens"] == 0, line
