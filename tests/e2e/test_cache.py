"""The response cache inside Envoy (--concurrency 2): exact, scoped, bounded by construction."""
import concurrent.futures
import http.client
import json
import threading
import time
import uuid

import anthropic
import openai
import pytest

from harness import Envoy, http as request, raw_post

CACHE = {
    "max_entries": 64,
    "max_bytes": 1048576,
    "max_entry_bytes": 65536,
    "ttl_seconds": 300,
    "models": {
        "embed-global": {"scope": "global"},
        "short-lived": {"ttl_seconds": 1, "policy": "always"},
        "chatty": {"policy": "always"},
    },
    "key_headers": ["x-variant"],
}
# Tenants only the module's Envoy has (test_caps_hold_under_20000_distinct_requests counts the
# shared-data keys of tenants a and b alone).
CLAMP_WINDOW_S = 2
EXTRA_TENANTS = {
    "clamp": {"limits": [{"name": "t2s", "tokens": 600, "window": f"{CLAMP_WINDOW_S}s"}],
              "clamp_min_output_tokens": 10},
    "strict": {"strict": True},
}


def config(cache=None, extra_tenants=None):
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenants": {"a": {}, "b": {}, **(extra_tenants or {})},
        "tenant_defaults": {"default_output_tokens": 100},
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
        "cache": cache or CACHE,
    }


@pytest.fixture(scope="module")
def cenv(upstream):
    # Exact connection balancing: a new connection goes to the worker with the fewest open ones,
    # so connections held open together land on both workers (see the cross-worker test).
    proc = Envoy(config(extra_tenants=EXTRA_TENANTS), upstream.port,
                 extra={"CONNECTION_BALANCE": "{exact_balance: {}}"})
    yield proc
    proc.stop()


def calls(upstream, tag):
    """Upstream calls whose request body carries this test's tag."""
    return [e for e in upstream.ledger() if json.dumps(e.get("body")).find(tag) >= 0]


def chat(envoy, tenant="a", tag=None, model="gpt-4o-mini", temperature=0, stream=False, headers=None, extra=None,
         path="/v1/chat/completions"):
    tag = tag or str(uuid.uuid4())
    body = {"model": model, "temperature": temperature, "max_tokens": 50, "stream": stream,
            "messages": [{"role": "user", "content": f"question {tag}"}], **(extra or {})}
    body = {k: v for k, v in body.items() if v is not None}
    rid = str(uuid.uuid4())
    h = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid}
    h.update(headers or {})
    status, resp_headers, data = request("POST", envoy.url + path, body, h)
    return status, resp_headers, data, rid, tag


def test_repeated_json_request_is_a_hit(cenv, upstream):
    s1, h1, d1, rid1, tag = chat(cenv)
    s2, h2, d2, rid2, _ = chat(cenv, tag=tag)
    assert (s1, s2) == (200, 200)
    assert (h1["x-tollgate-cache"], h2["x-tollgate-cache"]) == ("miss", "hit")
    assert d1 == d2
    assert len(calls(upstream, tag)) == 1
    hit = cenv.access_line(rid2)
    assert (hit["cache"], hit["usage_source"], hit["input_tokens"], hit["llm_cost_usd"]) == (
        "hit", "cache", 0, 0)


def raw_stream(port, tenant, body):
    head, out = raw_post(port, "/v1/chat/completions",
                         {"content-type": "application/json", "x-tenant": tenant, "x-fake-split": "9"}, body)
    return head, out


@pytest.mark.parametrize("include_usage", [True, False])
def test_sse_replay_is_byte_identical(cenv, upstream, include_usage):
    tag = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "temperature": 0, "stream": True, "max_tokens": 50,
            "messages": [{"role": "user", "content": f"stream {tag}"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    head1, first = raw_stream(cenv.port, "a", body)
    head2, second = raw_stream(cenv.port, "a", body)
    assert "x-tollgate-cache: miss" in head1 and "x-tollgate-cache: hit" in head2
    assert "text/event-stream" in head2
    assert first == second and first.endswith(b"data: [DONE]\n\n")
    assert len(calls(upstream, tag)) == 1


def test_sdks_read_hits(cenv, upstream):
    oai = openai.OpenAI(base_url=cenv.url + "/v1", api_key="x", max_retries=0, default_headers={"x-tenant": "a"})
    tag = str(uuid.uuid4())
    for _ in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
            model="gpt-4o-mini", temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"sdk {tag}"}]) if c.choices)
        assert text
    emb = [oai.embeddings.create(model="text-embedding-3-small", input=[f"emb {tag}"]) for _ in range(2)]
    assert emb[0].data[0].embedding == emb[1].data[0].embedding
    claude = anthropic.Anthropic(base_url=cenv.url, api_key="x", max_retries=0, default_headers={"x-tenant": "a"})
    msgs = []
    for _ in range(2):
        with claude.messages.stream(model="claude-3-5-haiku", max_tokens=30, extra_body={"temperature": 0},
                                    messages=[{"role": "user", "content": f"claude {tag}"}]) as s:
            msgs.append(s.get_final_message())
    assert msgs[0].content[0].text == msgs[1].content[0].text
    assert msgs[1].usage.output_tokens == msgs[0].usage.output_tokens
    assert len(calls(upstream, tag)) == 3  # one per API: every second request was a hit


def test_entries_stored_by_one_worker_are_hit_by_the_other(upstream):
    # Its own Envoy, with exact connection balancing and no other client: a new connection goes
    # to the worker with the fewest open ones, so connections held open together alternate
    # between the workers. (The module's Envoy has connections other tests left open in SDK
    # pools, which can all sit on one worker.) Right after start-up a worker may not have joined
    # the balancer yet, hence a few more connections than two.
    env = Envoy(config(), upstream.port, extra={"CONNECTION_BALANCE": "{exact_balance: {}}"})
    tag = str(uuid.uuid4())
    body = json.dumps({"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 50, "stream": False,
                       "messages": [{"role": "user", "content": f"question {tag}"}]})
    conns, seen = [], []
    try:
        for _ in range(16):
            conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
            conns.append(conn)  # held open until the end
            rid = str(uuid.uuid4())
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"content-type": "application/json", "x-tenant": "a", "x-request-id": rid})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert resp.getheader("x-tollgate-cache") == ("hit" if seen else "miss")
            seen.append(env.access_line(rid)["worker"])
            if seen[-1] != seen[0]:
                break
    finally:
        for conn in conns:
            conn.close()
        env.stop()
    stored_by, hit_by = seen[0], seen[-1]
    assert stored_by != hit_by, seen
    assert len(calls(upstream, tag)) == 1


def test_key_covers_the_path_deployment_and_api_version(cenv, upstream):
    """On Azure OpenAI the deployment in the path picks the model and api-version the API."""
    azure = "/openai/deployments/{}/chat/completions?api-version={}"
    paths = ["/v1/chat/completions", azure.format("gpt-4o", "2024-10-21"),
             azure.format("other-deploy", "2024-10-21"), azure.format("gpt-4o", "2025-01-01-preview")]
    _, _, _, _, tag = chat(cenv, path=paths[0])
    for path in paths[1:]:
        _, h, _, _, _ = chat(cenv, tag=tag, path=path)
        assert h["x-tollgate-cache"] == "miss", path
    for path in paths:
        _, h, _, _, _ = chat(cenv, tag=tag, path=path)
        assert h["x-tollgate-cache"] == "hit", path
    assert [e["path"] for e in calls(upstream, tag)] == paths


KEY_HEADERS = ["openai-beta", "openai-organization", "openai-project", "anthropic-version", "anthropic-beta",
               "x-variant"]  # the last one from cache.key_headers


def test_key_covers_the_headers_that_select_the_answer(cenv, upstream):
    _, h, _, _, tag = chat(cenv)
    assert h["x-tollgate-cache"] == "miss"
    for name in KEY_HEADERS:
        for value in ("v1", "v2"):
            _, h, _, _, _ = chat(cenv, tag=tag, headers={name: value})
            assert h["x-tollgate-cache"] == "miss", (name, value)
    assert len(calls(upstream, tag)) == 1 + 2 * len(KEY_HEADERS)
    # Other headers do not split entries; key headers match whatever their order and name case.
    _, h, _, _, _ = chat(cenv, tag=tag, headers={"x-trace": "1", "user-agent": "other"})
    assert h["x-tollgate-cache"] == "hit"
    both = {"OpenAI-Beta": "assistants=v2", "Anthropic-Version": "2023-06-01"}
    _, h, _, _, _ = chat(cenv, tag=tag, headers=both)
    assert h["x-tollgate-cache"] == "miss"
    _, h, _, _, _ = chat(cenv, tag=tag, headers={"anthropic-version": "2023-06-01", "openai-beta": "assistants=v2"})
    assert h["x-tollgate-cache"] == "hit"


def sleep_to_window_start(window_s):
    """Until just after the next boundary of a window aligned to the epoch (at most window_s)."""
    time.sleep(window_s - time.time() % window_s + 0.05)


def test_a_clamped_answer_is_not_replayed_to_an_unclamped_request(cenv, upstream):
    """Clamp mode sent the upstream a lower max_tokens: that answer may be truncated and must not
    be served to the same request once the budget is back."""
    for _ in range(5):
        tag = str(uuid.uuid4())
        sleep_to_window_start(CLAMP_WINDOW_S)
        # Burn most of the 600-token window (about 450), then ask for 200 more: clamped.
        s, _, _, _, _ = chat(cenv, tenant="clamp", extra={"max_tokens": 420},
                             headers={"x-fake-output-tokens": "400"})
        assert s == 200
        s, h, _, _, _ = chat(cenv, tenant="clamp", tag=tag, extra={"max_tokens": 200})
        sent = calls(upstream, tag)
        if s == 200 and sent and sent[-1]["body"]["max_tokens"] < 200:
            break  # clamped (else the window turned between the two requests: again)
    else:
        pytest.fail("never clamped")
    assert h["x-tollgate-cache"] == "miss"
    sleep_to_window_start(CLAMP_WINDOW_S)  # a fresh window: 200 output tokens fit again
    s, h, _, _, _ = chat(cenv, tenant="clamp", tag=tag, extra={"max_tokens": 200})
    assert s == 200 and h["x-tollgate-cache"] == "miss", "the clamped answer was replayed"
    assert calls(upstream, tag)[-1]["body"]["max_tokens"] == 200
    s, h, _, _, _ = chat(cenv, tenant="clamp", tag=tag, extra={"max_tokens": 200})
    assert h["x-tollgate-cache"] == "hit"
    assert len(calls(upstream, tag)) == 2


def test_strict_tenants_keep_caching_the_max_tokens_they_inject(cenv, upstream):
    """Strict mode writes the default max_tokens into requests without one: the key is of that
    request, the same for every repeat, so repeats are hits."""
    _, h1, _, _, tag = chat(cenv, tenant="strict", extra={"max_tokens": None})
    _, h2, _, _, _ = chat(cenv, tenant="strict", tag=tag, extra={"max_tokens": None})
    assert (h1["x-tollgate-cache"], h2["x-tollgate-cache"]) == ("miss", "hit")
    sent = calls(upstream, tag)
    assert len(sent) == 1 and sent[0]["body"]["max_completion_tokens"] == 100, sent[0]["body"]


def test_scope_is_the_tenant_unless_global(cenv, upstream):
    _, _, _, _, tag = chat(cenv, tenant="a")
    _, h, _, _, _ = chat(cenv, tenant="b", tag=tag)
    assert h["x-tollgate-cache"] == "miss"
    assert len(calls(upstream, tag)) == 2
    emb = {"model": "embed-global", "input": [f"shared {tag}"]}
    for tenant, want in (("a", "miss"), ("b", "hit")):
        status, headers, _ = request("POST", cenv.url + "/v1/embeddings", emb,
                                     {"content-type": "application/json", "x-tenant": tenant})
        assert status == 200 and headers["x-tollgate-cache"] == want


@pytest.mark.parametrize("share", [None, 8])
def test_one_tenants_traffic_does_not_evict_anothers_entry(upstream, share):
    """Tenant a's entry survives tenant b sending 120 distinct deterministic requests through a
    16-slot table (fair replacement), and with max_entries_per_scope b holds at most its share."""
    cache = {"max_entries": 16, "ways": 4}
    if share:
        cache["max_entries_per_scope"] = share
    proc = Envoy(config(cache), upstream.port)
    try:
        _, h, body, _, tag = chat(proc, tenant="a", tag="a-kept")
        assert h["x-tollgate-cache"] == "miss"
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        for i in range(120):
            conn.request("POST", "/v1/chat/completions", headers={"content-type": "application/json", "x-tenant": "b"},
                         body=json.dumps({"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 5,
                                          "messages": [{"role": "user", "content": f"b-{i}"}]}))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200 and resp.getheader("x-tollgate-cache") == "miss"
        conn.close()
        _, h, again, _, _ = chat(proc, tenant="a", tag=tag)
        assert h["x-tollgate-cache"] == "hit"
        assert again == body
        s = proc.stats("tollgate")
        # b recycles its own slots: it keeps storing, within its share.
        assert s["wasmcustom.tollgate.cache.stores"] >= 1 + (share or 15) + 10
        assert s["wasmcustom.tollgate.cache.entries"] <= 1 + (share or 15)
    finally:
        proc.stop()


def test_non_deterministic_requests_bypass(cenv, upstream):
    _, h1, _, _, tag = chat(cenv, temperature=0.7)
    _, h2, _, _, _ = chat(cenv, tag=tag, temperature=0.7)
    assert (h1["x-tollgate-cache"], h2["x-tollgate-cache"]) == ("bypass", "bypass")
    assert len(calls(upstream, tag)) == 2


def test_ttl_expiry(cenv, upstream):
    _, h1, _, _, tag = chat(cenv, model="short-lived", temperature=1)
    _, h2, _, _, _ = chat(cenv, tag=tag, model="short-lived", temperature=1)
    time.sleep(1.2)
    _, h3, _, _, _ = chat(cenv, tag=tag, model="short-lived", temperature=1)
    assert [h["x-tollgate-cache"] for h in (h1, h2, h3)] == ["miss", "hit", "miss"]
    assert len(calls(upstream, tag)) == 2


def test_no_cache_refreshes_and_no_store_skips_both(cenv, upstream):
    _, _, _, _, tag = chat(cenv)
    _, h, _, _, _ = chat(cenv, tag=tag, headers={"cache-control": "no-cache"})
    assert h["x-tollgate-cache"] == "store"
    _, h, _, _, _ = chat(cenv, tag=tag)
    assert h["x-tollgate-cache"] == "hit"
    assert len(calls(upstream, tag)) == 2
    _, h, _, _, tag2 = chat(cenv, headers={"cache-control": "no-store"})
    assert h["x-tollgate-cache"] == "bypass"
    _, h, _, _, _ = chat(cenv, tag=tag2)
    assert h["x-tollgate-cache"] == "miss", "no-store stored nothing"
    _, h, _, _, _ = chat(cenv, tag=tag, headers={"cache-control": "no-store"})
    assert h["x-tollgate-cache"] == "bypass", "no-store does not read either"


def test_errors_are_not_stored(cenv, upstream):
    s1, h1, _, _, tag = chat(cenv, headers={"x-fake-status": "500"})
    s2, h2, _, _, _ = chat(cenv, tag=tag)
    assert (s1, s2) == (500, 200)
    assert h2["x-tollgate-cache"] == "miss"


def test_over_cap_entry_is_delivered_intact_but_not_stored(cenv, upstream):
    tag = str(uuid.uuid4())
    body = {"model": "chatty", "max_tokens": 50000, "messages": [{"role": "user", "content": f"long {tag}"}]}
    knobs = {"content-type": "application/json", "x-tenant": "a", "x-fake-chunks": "20000"}
    status, headers, data = request("POST", cenv.url + "/v1/chat/completions", body, knobs)
    assert status == 200 and len(data) > CACHE["max_entry_bytes"]
    assert json.loads(data)["usage"]["completion_tokens"] == 40001  # delivered whole
    status, headers, again = request("POST", cenv.url + "/v1/chat/completions", body, knobs)
    assert headers["x-tollgate-cache"] == "miss", "over the entry cap: not stored"
    assert len(again) == len(data)
    assert len(calls(upstream, tag)) == 2


def test_caps_hold_under_20000_distinct_requests(upstream):
    """256 entries / 4 MiB: sampled entries and bytes never pass the caps, the key count stays
    at its bound, and Envoy's memory grows by no more than the cap plus a measured overhead."""
    cache = {"max_entries": 256, "max_bytes": 4 * 1024 * 1024, "max_entry_bytes": 262144, "ttl_seconds": 3600,
             "models": {"chatty": {"policy": "always"}}}
    proc = Envoy(config(cache), upstream.port)
    samples, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            s = proc.stats("tollgate")
            samples.append((s.get("wasmcustom.tollgate.cache.entries", 0), s.get("wasmcustom.tollgate.cache.bytes", 0)))
            time.sleep(0.1)

    def rss_kib():
        with open(f"/proc/{proc.proc.pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    try:
        rss_before = rss_kib()
        t = threading.Thread(target=sampler)
        t.start()

        def worker(start):
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
            for i in range(start, start + 2500):
                # Varied response sizes (up to ~36 KB): the byte cap binds before the entry cap.
                body = json.dumps({"model": "chatty", "max_tokens": 20000,
                                   "messages": [{"role": "user", "content": f"distinct {i}"}]})
                conn.request("POST", "/v1/chat/completions", body=body,
                             headers={"content-type": "application/json", "x-tenant": "ab"[i % 2],
                                      "x-fake-chunks": str((i % 7) * 1200 + 1)})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
            conn.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, range(0, 20000, 2500)))
        stop.set()
        t.join()
        rss_after = rss_kib()
        s = proc.stats("tollgate")
        entries, held = s["wasmcustom.tollgate.cache.entries"], s["wasmcustom.tollgate.cache.bytes"]
        assert len(samples) > 10
        assert max(e for e, _ in samples) <= 256 and max(b for _, b in samples) <= 4 * 1024 * 1024
        assert entries <= 256 and held <= 4 * 1024 * 1024
        assert s["wasmcustom.tollgate.cache.stores"] >= 1000
        assert held > 3 * 1024 * 1024, "the byte cap was reached"
        # The key count stays at the bound the configuration implies: 2 per slot + 1 + 64 scope
        # counters, plus the two tenants' records and one in-flight key per tenant label
        # (team-a, team-b, _other).
        assert s["wasmcustom.tollgate.shared_data.keys_created"] == 2 * 256 + 1 + 64 + 2 + 3
        growth_mib = (rss_after - rss_before) / 1024
        print(f"\ncache: {entries} entries, {held} bytes held; Envoy RSS +{growth_mib:.1f} MiB over 20,000 requests")
        assert growth_mib <= 4 + 16, "cap (4 MiB) plus the measured overhead bound"
    finally:
        stop.set()
        proc.stop()
