"""Per-tenant budgets through the real Envoy: refusals the SDKs understand, window rollover,
clamp mode, concurrency, per-request cap, model allow-list, include_usage injection, rate-limit
headers and a bounded shared-data key space."""
import concurrent.futures
import hashlib
import json
import threading
import time
import uuid

import anthropic
import openai
import pytest

from harness import Envoy, http, raw_post

ADMIN_TOKEN = "view-secret"
CHAT = "/v1/chat/completions"


def budget_config(extra_tenants=None):
    tenants = {
        "small": {"limits": [{"name": "tph", "tokens": 3000, "window": "hour"}]},
        "broke": {"limits": [{"name": "daily", "usd": "0.000001", "window": "day"}]},
        "roll": {"limits": [{"name": "t2s", "tokens": 200, "window": "2s"}]},
        "clamp": {"limits": [{"name": "tph", "tokens": 600, "window": "hour"}], "clamp_min_output_tokens": 10},
        "conc": {"max_concurrent": 1},
        "capped": {"max_output_tokens": 100, "models": ["gpt-4o-mini", "claude-3-5-haiku"]},
        "meter": {"limits": [{"name": "tph", "tokens": 1000000, "window": "hour"}]},
    }
    tenants.update(extra_tenants or {})
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenant_defaults": {"default_output_tokens": 64},
        "tenants": tenants,
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
        "usage_view": {"path": "/tollgate/usage",
                       "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }


@pytest.fixture(scope="module")
def genv(upstream):
    proc = Envoy(budget_config(), upstream.port)
    yield proc
    proc.stop()


def usage_view(envoy):
    status, _, data = http("GET", envoy.url + "/tollgate/usage", None, {"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, data
    return {t["tenant"]: t for t in json.loads(data)["tenants"]}


def limit_of(envoy, tenant, name="tph"):
    return next(l for l in usage_view(envoy)[tenant]["limits"] if l["name"] == name)


def chat(envoy, tenant, body_extra=None, headers=None, path=CHAT):
    rid = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], **(body_extra or {})}
    h = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid, "x-fake-request-id": rid}
    h.update(headers or {})
    status, resp_headers, data = http("POST", envoy.url + path, body, h)
    return rid, status, resp_headers, data


def sdk(envoy, tenant):
    return openai.OpenAI(base_url=envoy.url + "/v1", api_key="unused", max_retries=0,
                         default_headers={"x-tenant": tenant})


def test_usage_view_needs_its_token(genv):
    assert http("GET", genv.url + "/tollgate/usage", None, {})[0] == 401
    assert http("GET", genv.url + "/tollgate/usage", None, {"authorization": "Bearer nope"})[0] == 401
    view = json.loads(http("GET", genv.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {ADMIN_TOKEN}"})[2])
    assert view["shared_keys"]["bound"] == view["shared_keys"]["present"] > 0


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_usage_view_reads_the_bearer_scheme_case_insensitively(genv, scheme):
    """RFC 9110: the authentication scheme is case-insensitive (the view used to 401 these)."""
    status, _, data = http("GET", genv.url + "/tollgate/usage", None,
                           {"authorization": f"{scheme} {ADMIN_TOKEN}"})
    assert status == 200 and "tenants" in json.loads(data), (status, data)
    assert http("GET", genv.url + "/tollgate/usage", None, {"authorization": f"{scheme} nope"})[0] == 401


def test_openai_sdk_raises_rate_limit_error_with_retry_after(genv):
    client = sdk(genv, "small")
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=500, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as info:
        # More output than is left of the 3,000 tokens per hour.
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=2990,
                                       messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.code == "rate_limit_exceeded" and err.type == "tokens"
    retry_after = int(err.response.headers["retry-after"])
    assert 1 <= retry_after <= 3600
    tph = limit_of(genv, "small")
    assert tph["used"] + tph["reserved"] <= 3000 and tph["reserved"] == 0


def test_spent_usd_budget_is_insufficient_quota_and_not_retried(genv):
    client = openai.OpenAI(base_url=genv.url + "/v1", api_key="unused", max_retries=2,
                           default_headers={"x-tenant": "broke"})
    started = time.time()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert time.time() - started < 2, "the SDK retried a spent quota"


def test_anthropic_sdk_raises_rate_limit_error(genv):
    client = anthropic.Anthropic(base_url=genv.url, api_key="unused", max_retries=0,
                                 default_headers={"x-tenant": "broke"})
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="claude-3-5-haiku", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert "retry-after" in info.value.response.headers


def test_window_rollover_frees_the_budget(genv):
    # A 2-second window of 200 tokens: exhaust it, be refused, then be admitted in the next one.
    statuses = []
    for _ in range(10):
        _, status, headers, _ = chat(genv, "roll", {"max_tokens": 60})
        statuses.append(status)
        if status == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429
    assert int(headers["retry-after"]) <= 2
    time.sleep(int(headers["retry-after"]) + 0.2)
    _, status, _, _ = chat(genv, "roll", {"max_tokens": 60})
    assert status == 200


def test_clamp_mode_lowers_max_tokens_to_what_is_left(genv, upstream):
    rid, status, _, _ = chat(genv, "clamp", {"max_tokens": 5000})
    assert status == 200
    sent = upstream.entry(rid)["body"]
    assert sent["max_tokens"] < 600, sent
    line = genv.access_line(rid)
    assert line["decision"] == "admitted"
    # Once less than the clamp minimum is left, requests are refused.
    for _ in range(30):
        _, status, _, _ = chat(genv, "clamp", {"max_tokens": 5000})
        if status == 429:
            break
    assert status == 429


def test_concurrency_limit(genv):
    slow = threading.Thread(target=chat, args=(genv, "conc"), kwargs={"headers": {"x-fake-delay-ms": "1500"}})
    slow.start()
    time.sleep(0.5)
    _, status, headers, data = chat(genv, "conc")
    slow.join()
    assert status == 429
    assert json.loads(data)["error"]["type"] == "requests"
    assert headers["retry-after"] == "1"
    assert usage_view(genv)["conc"]["in_flight"] == 0
    _, status, _, _ = chat(genv, "conc")
    assert status == 200


def test_per_request_cap_and_model_allow_list(genv):
    _, status, _, data = chat(genv, "capped", {"max_tokens": 101})
    assert status == 400
    assert json.loads(data)["error"]["param"] == "max_completion_tokens"
    _, status, _, data = chat(genv, "capped", {"max_tokens": 100})
    assert status == 200
    _, status, _, data = chat(genv, "capped", {"model": "gpt-4o"})
    assert status == 403
    assert json.loads(data)["error"]["code"] == "model_not_allowed"
    client = anthropic.Anthropic(base_url=genv.url, api_key="unused", max_retries=0,
                                 default_headers={"x-tenant": "capped"})
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(model="claude-opus", max_tokens=10, messages=[{"role": "user", "content": "hi"}])


def raw_stream(port, tenant, body, rid):
    """The raw response body bytes of a streamed chat request."""
    return raw_post(port, CHAT, {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
                                 "x-fake-request-id": rid, "x-fake-chunks": "5", "x-fake-split": "3",
                                 "x-fake-record-body": "1"}, body)


def test_injected_include_usage_is_invisible_to_the_client(genv, upstream):
    before = limit_of(genv, "meter")["used"]
    rid = str(uuid.uuid4())
    head, client_bytes = raw_stream(genv.port, "meter", {"model": "gpt-4o-mini", "stream": True,
                                                          "messages": [{"role": "user", "content": "hi"}]}, rid)
    entry = upstream.entry(rid)
    assert entry["body"]["stream_options"] == {"include_usage": True}, "Tollgate asked for usage"
    # Byte for byte what the upstream sent, minus exactly the usage chunk.
    assert entry["usage_event"] and '"choices": []' in entry["usage_event"].replace('"choices":[]', '"choices": []')
    assert client_bytes.decode() == entry["sse_body"].replace(entry["usage_event"], "")
    assert client_bytes.decode().endswith("data: [DONE]\n\n")
    # A client that asked for usage gets the upstream's stream unchanged, usage chunk included.
    rid2 = str(uuid.uuid4())
    _, with_usage = raw_stream(genv.port, "meter", {"model": "gpt-4o-mini", "stream": True,
                                                     "stream_options": {"include_usage": True},
                                                     "messages": [{"role": "user", "content": "hi"}]}, rid2)
    assert with_usage.decode() == upstream.entry(rid2)["sse_body"]
    line = genv.access_line(rid)
    assert line["usage_source"] == "reported"
    assert (int(line["input_tokens"]), int(line["output_tokens"])) == (entry["usage"]["input"], entry["usage"]["output"])
    entry2 = upstream.entry(rid2)
    time.sleep(0.1)
    after = limit_of(genv, "meter")["used"]
    assert after - before == sum(e["usage"]["input"] + e["usage"]["output"] for e in (entry, entry2))


def test_rate_limit_headers_on_admitted_responses(genv):
    _, status, headers, _ = chat(genv, "meter", {"max_tokens": 10})
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "1000000"
    assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 1000000
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    _, status, headers, _ = chat(genv, "meter", {"model": "claude-3-5-haiku", "max_tokens": 10},
                                 path="/v1/messages")
    assert status == 200
    assert headers["anthropic-ratelimit-tokens-limit"] == "1000000"
    assert headers["anthropic-ratelimit-tokens-reset"].endswith("Z")


def test_shared_data_keys_stay_at_the_configured_bound(upstream):
    """10,000 requests over 1,000 tenants: the key space is the one the configuration implies."""
    tenants = {f"tenant-{i:04d}": {} for i in range(1000)}
    config = budget_config(tenants)
    config["tenant_defaults"]["limits"] = [{"name": "tph", "tokens": 10_000_000, "window": "hour"}]
    proc = Envoy(config, upstream.port)
    try:
        metric = "wasmcustom.tollgate.shared_data.keys_created"
        created_at_start = proc.stats(metric)[metric]
        payload = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}).encode()

        def worker(start):
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
            codes = []
            for i in range(start, start + 500):
                conn.request("POST", CHAT, body=payload, headers={"content-type": "application/json",
                                                                   "x-tenant": f"tenant-{i % 1000:04d}"})
                resp = conn.getresponse()
                resp.read()
                codes.append(resp.status)
            conn.close()
            return codes

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            codes = [c for chunk in pool.map(worker, range(0, 10_000, 500)) for c in chunk]
        assert len(codes) == 10_000 and set(codes) == {200}
        view = json.loads(http("GET", proc.url + "/tollgate/usage", None,
                               {"authorization": f"Bearer {ADMIN_TOKEN}"})[2])
        # Every tenant: one record (its slots and the buckets of all its limits); one in-flight
        # key per tenant label (the default cap of 100 labels, plus `_other`).
        expected = len(budget_config()["tenants"]) + 1000 + 100 + 1
        assert view["shared_keys"] == {"bound": expected, "present": expected}
        # No key was created on the request path: only at configuration time (each worker
        # creates what is still missing when it configures, so the count is the bound).
        assert proc.stats(metric)[metric] == created_at_start == expected
        vm = proc.stats("wasm")
        assert vm["wasm.tollgate.vm_reload"] == 0 and vm["wasm.tollgate.vm_reload_failure"] == 0
    finally:
        proc.stop()


def test_both_workers_hammering_one_tenant(genv):
    before = limit_of(genv, "meter")["used"]
    payload = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})

    def worker(_):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", genv.port, timeout=30)
        total = 0
        for _ in range(100):
            conn.request("POST", CHAT, body=payload, headers={"content-type": "application/json", "x-tenant": "meter"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            total += body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        conn.close()
        return total

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        charged = sum(pool.map(worker, range(16)))
    tph = limit_of(genv, "meter")
    assert tph["used"] - before == charged, "every one of 1,600 settlements landed exactly once"
    assert tph["reserved"] == 0
    vm = genv.stats("wasm")
    assert vm["wasm.tollgate.vm_reload"] == 0 and vm["wasm.tollgate.vm_reload_failure"] == 0
