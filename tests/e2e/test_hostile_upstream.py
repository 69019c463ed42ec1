"""A hostile upstream (tests/fake_upstream.py `x-fake-hostile`) against the real Envoy: gzip and
deflate bombs (1 MB on the wire, 1 GiB decoded), a single 1 GiB SSE line inside gzip, an endless
plain SSE line, absurd usage (2^63 tokens) and usage in the other vendor's shape.

For every bomb: the VM does not trap, the client gets the upstream's bytes untouched, the ledger
line names the tenant and a fallback usage source, the tenant's reservation and in-flight count
return to 0, and Envoy's peak resident memory (VmHWM) grows by less than RSS_BOUND over all of
them."""
import hashlib
import json
import os
import re
import socket
import time
import uuid

import pytest

from harness import ROOT, Envoy, http

ADMIN_TOKEN = "hostile-view"
TENANT = "hostile"
BIG = 1 << 30
RSS_BOUND = 64 << 20
PLAIN_LINE = 256 << 20  # the endless plain line: every byte goes through Envoy to the client
def config():
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenant_defaults": {"default_output_tokens": 100},
        "tenants": {TENANT: {"limits": [{"name": "tpd", "tokens": 10**15, "window": "day"}]}},
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
        "limits": {"max_reported_tokens": 1000000},
        "usage_view": {"path": "/tollgate/usage",
                       "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }


def rss(pid, field="VmHWM"):
    """Envoy's peak resident memory (VmHWM: a bomb's transient allocation counts even if the VM
    freed it again), or its current one (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


@pytest.fixture(scope="module")
def henv(upstream, tmp_path_factory):
    proc = Envoy(config(), upstream.port)
    # Warm both workers' VMs with ordinary requests before the baseline.
    for _ in range(8):
        assert post(proc, {"stream": False})[0] == 200
    proc.rss_before = rss(proc.proc.pid)
    yield proc
    proc.stop()


def post(envoy, body_extra, headers=None, path="/v1/chat/completions"):
    """POST over a raw socket; returns (status, headers, body bytes as sent, request id). The
    body is hashed as it arrives (a GiB never sits in the test's memory)."""
    rid = str(uuid.uuid4())
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                       **body_extra}).encode()
    h = {"content-type": "application/json", "x-tenant": TENANT, "x-request-id": rid,
         "x-fake-request-id": rid, **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in h.items())
    sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\n{lines}content-length: {len(body)}\r\n"
                 f"connection: close\r\n\r\n".encode() + body)
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers_in = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers_in[name.strip().lower()] = value.strip()
    digest, size = hashlib.sha256(), 0
    if headers_in.get("transfer-encoding", "").lower() == "chunked":
        while (n := int(reader.readline().split(b";")[0], 16)):
            left = n
            while left:
                piece = reader.read(min(left, 1 << 20))
                assert piece, "connection closed mid-chunk"
                digest.update(piece)
                left -= len(piece)
            reader.readline()
    else:
        left = int(headers_in.get("content-length", "0"))
        while left:
            piece = reader.read(min(left, 1 << 20))
            assert piece, "connection closed mid-body"
            digest.update(piece)
            left -= len(piece)
    sock.close()
    return status, headers_in, (size, digest.hexdigest()), rid


def tenant_view(envoy):
    status, _, data = http("GET", envoy.url + "/tollgate/usage", None, {"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, data
    return next(t for t in json.loads(data)["tenants"] if t["tenant"] == TENANT)


def settled(envoy):
    """Bounded wait for the access-log writer and settlement (on_log runs after the reply)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        view = tenant_view(envoy)
        if view["in_flight"] == 0 and all(l["reserved"] == 0 for l in view["limits"]):
            return view
        time.sleep(0.05)
    raise AssertionError(f"reservation or in-flight left behind: {view}")


# mode, stream, x-fake-bomb-bytes, the ledger's usage_source
BOMBS = [
    ("gzip-bomb-json", False, BIG, "reservation"),
    ("deflate-bomb-json", False, BIG, "reservation"),
    ("gzip-bomb-sse", True, BIG, "observed"),
    ("gzip-bomb-line", True, BIG, "observed"),
    # Plain bodies have no total cap: the line is dropped, the usage after it is still read.
    ("endless-line", True, PLAIN_LINE, "reported"),
]


@pytest.mark.parametrize("mode,stream,size,source", BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_is_survived_and_settled(henv, upstream, mode, stream, size, source):
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    status, headers, (_, digest), rid = post(henv, extra, {"x-fake-hostile": mode, "x-fake-bomb-bytes": str(size)})
    entry = upstream.entry(rid)
    assert status == 200
    # The client got the upstream's bytes, untouched (Tollgate decodes a private copy only).
    assert entry["completed"] and digest == entry["sent_sha256"], (mode, entry.get("sent_bytes"))
    assert headers.get("content-encoding") == {"gzip": "gzip", "defl": "deflate"}.get(mode[:4]), headers
    line = henv.access_line(rid)
    assert line["tenant"] == TENANT and line["decision"] == "admitted"
    assert line["usage_source"] == source, line
    if source == "reported":
        assert line["output_tokens"] == entry["usage"]["output"]
    else:
        assert line["usage_anomaly"] in ("decode_limit", None), line
    settled(henv)


def test_absurd_usage_is_clamped_and_counted(henv, upstream):
    before = henv.stats("usage_anomalies").get(f"wasmcustom.tollgate.tenant.{TENANT}.usage_anomalies", 0)
    status, _, _, rid = post(henv, {"max_completion_tokens": 50}, {"x-fake-hostile": "absurd-usage"})
    assert status == 200
    assert upstream.entry(rid)["usage"]["output"] == 2**63
    line = henv.access_line(rid)
    # Output within the request's own max tokens; input within body bytes + max_reported_tokens.
    assert line["output_tokens"] == 50, line
    assert 0 < int(line["input_tokens"]) <= 1000000 + 1000, line
    assert line["usage_source"] == "reported" and line["usage_anomaly"] == "clamped", line
    assert float(line["llm_cost_usd"]) < 1.01, line
    stats = henv.stats("usage_anomalies")
    assert stats[f"wasmcustom.tollgate.tenant.{TENANT}.usage_anomalies"] == before + 1, stats
    settled(henv)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_absurd_usage_without_max_tokens_is_held_to_the_configured_bound(henv, upstream, stream):
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    status, _, _, rid = post(henv, extra, {"x-fake-hostile": "absurd-usage"})
    assert status == 200
    line = henv.access_line(rid)
    assert line["output_tokens"] == 1000000 and line["usage_anomaly"] == "clamped", line
    settled(henv)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_foreign_usage_shape_falls_back(henv, upstream, stream):
    """Anthropic's usage fields on a chat path are not chat usage: charged like a missing usage
    (the reservation for JSON, the observed deltas for a stream), never 0/0."""
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    status, _, _, rid = post(henv, extra, {"x-fake-hostile": "foreign-usage"})
    assert status == 200
    line = henv.access_line(rid)
    if stream:
        assert line["usage_source"] == "observed" and line["output_tokens"] == 3, line
    else:
        assert line["usage_source"] == "reservation" and line["output_tokens"] == 100, line
    assert line["usage_anomaly"] == "foreign_usage", line
    settled(henv)


def test_foreign_usage_shape_on_messages_falls_back(henv, upstream):
    status, _, _, rid = post(henv, {"model": "claude-3-5-haiku", "max_tokens": 64, "stream": True},
                             {"x-fake-hostile": "foreign-usage"}, path="/v1/messages")
    assert status == 200
    line = henv.access_line(rid)
    assert line["usage_source"] == "observed" and line["output_tokens"] == 3, line
    settled(henv)


# Garbage where a count should be: negative, fractional, 1e30, a string, 2^64.
INVALID_COUNTS = ["-1", "2.5", "1e30", '"5"', "18446744073709551616"]
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
# id, path, body, the ledger's usage_source and output_tokens (the fallbacks, as before)
INVALID = [
    ("chat-json", "/v1/chat/completions", {}, "reservation", 100),
    ("chat-sse", "/v1/chat/completions", STREAM, "observed", 3),
    ("responses-json", "/v1/responses", {"input": "hi"}, "reservation", 100),
    ("responses-sse", "/v1/responses", {"input": "hi", "stream": True}, "observed", 3),
    ("embeddings", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, "reservation", 0),
    ("messages-json", "/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 64}, "reservation", 64),
    # message_start's usage stands; the garbage message_delta is ignored: the deltas that passed.
    ("messages-sse", "/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 64, "stream": True},
     "reported", 3),
]


@pytest.mark.parametrize("path,extra,source,output", [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_invalid_usage_falls_back_and_is_flagged(henv, upstream, path, extra, source, output):
    """Garbage counts used to fall back silently: now the ledger says invalid_usage and the
    usage_anomalies metric counts each response."""
    metric = f"wasmcustom.tollgate.tenant.{TENANT}.usage_anomalies"
    before = henv.stats("usage_anomalies").get(metric, 0)
    for bad in INVALID_COUNTS:
        status, _, _, rid = post(henv, extra, {"x-fake-hostile": "invalid-usage",
                                               "x-fake-invalid-count": bad}, path=path)
        assert status == 200, bad
        line = henv.access_line(rid)
        assert line["usage_anomaly"] == "invalid_usage", (bad, line)
        assert (line["usage_source"], line["output_tokens"]) == (source, output), (bad, line)
    assert henv.stats("usage_anomalies").get(metric, 0) == before + len(INVALID_COUNTS)
    settled(henv)


def test_zz_memory_stayed_bounded_and_the_vm_never_failed(henv):
    grown = rss(henv.proc.pid) - henv.rss_before
    print(f"envoy peak RSS {henv.rss_before / (1 << 20):.1f} MiB before the hostile upstream, "
          f"grew by {grown / (1 << 20):.1f} MiB (now {rss(henv.proc.pid, 'VmRSS') / (1 << 20):.1f} MiB)")
    assert grown < RSS_BOUND, f"Envoy's peak RSS grew by {grown >> 20} MiB"
    stats = henv.stats("wasm")
    for name in ("wasm.tollgate.vm_reload", "wasm.tollgate.vm_reload_failure"):
        assert stats.get(name, 0) == 0, (name, stats)
    log = henv.log()
    for sign in ("panicked", "Wasm VM failed", "wasm trap", "memory allocation", "Function: proxy_on_"):
        assert sign not in log, log[-3000:]
    # The VM still answers and settles.
    assert post(henv, {})[0] == 200
    settled(henv)
