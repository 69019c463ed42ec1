"""Cost accounting: the JSON access log is the billing ledger, and the Prometheus families agree
with it and with an independent computation from the price table, to the micro-USD."""
import collections
import json
import re
import time
import uuid
from decimal import ROUND_HALF_UP, Decimal

import pytest

from harness import Envoy, http

PRICES = {
    "gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25"},
    "gpt-4o-mini": {"input": "0.15", "output": "0.60", "cached_input": "0.075"},
    "claude-3-5-haiku": {"input": "0.80", "output": "4.00", "cached_input": "0.08", "cache_write_input": "1.00"},
    "text-embedding-3-small": {"input": "0.02", "output": "0"},
}
TENANTS = ["acme", "globex", "initech"]


def config(**extra):
    c = {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenants": {t: {} for t in TENANTS},
        "tenant_defaults": {"default_output_tokens": 100},
        "prices": PRICES,
        "routing": {"conversation_header": "x-conversation-id",
                    "models": {m: {"route": "openai" if not m.startswith("claude") else "anthropic"} for m in PRICES}},
    }
    c.update(extra)
    return c


def expected_cost(line):
    """Independent computation: exact decimal cost, rounded half-up to the micro-USD."""
    p = {k: Decimal(v) for k, v in PRICES[line["served_model"]].items()}
    cached = Decimal(line["cached_input_tokens"])
    write = Decimal(line["cache_write_input_tokens"])
    uncached = Decimal(line["input_tokens"]) - cached - write
    usd = (uncached * p["input"] + cached * p.get("cached_input", p["input"])
           + write * p.get("cache_write_input", p["input"]) + Decimal(line["output_tokens"]) * p["output"]) / 10**6
    return usd.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def prom_samples(text, family):
    """{frozenset(labels): value} of one family."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{family}\{{(.*)\}} (\d+)$", line)
        if m:
            labels = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(r'\w+="[^"]*"', m.group(1)))
            out[frozenset((k, v.strip('"')) for k, v in labels)] = int(m.group(2))
    return out


# Some tests have the upstream report more input tokens than a short body holds; Tollgate
# bounds reported input by the body's bytes (README, Limits and guarantees): prompts are padded.
PAD = " lorem ipsum dolor sit amet" * 24


def send(envoy, tenant, model, stream=False, path="/v1/chat/completions", knobs=None, conversation=None):
    rid = str(uuid.uuid4())
    if path.endswith("embeddings"):
        body = {"model": model, "input": ["a" + PAD, "b"]}
    else:
        # Above every output the mix asks the fake for (at most 90): usage over max tokens is clamped.
        body = {"model": model, "max_tokens": 100, "stream": stream,
                "messages": [{"role": "user", "content": "hi" + PAD}]}
    h = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid, "x-fake-request-id": rid}
    if conversation:
        h["x-conversation-id"] = conversation
    h.update(knobs or {})
    status, _, _ = http("POST", envoy.url + path, body, h)
    return rid, status


@pytest.fixture(scope="module")
def mix(upstream):
    env = Envoy(config(), upstream.port)
    rids = []
    try:
        for i in range(60):
            tenant = TENANTS[i % 3]
            model = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku", "text-embedding-3-small"][i % 4]
            path = {"claude-3-5-haiku": "/v1/messages", "text-embedding-3-small": "/v1/embeddings"}.get(
                model, "/v1/chat/completions")
            knobs = {"x-fake-input-tokens": str(100 + i), "x-fake-output-tokens": str(7 * i % 90 + 1)}
            if model == "gpt-4o" or model == "claude-3-5-haiku":
                knobs["x-fake-cached-tokens"] = str(i % 40)
            if model == "claude-3-5-haiku":
                knobs["x-fake-cache-write-tokens"] = str(i % 13)
            rids.append(send(env, tenant, model, stream=(i % 2 == 0 and "embeddings" not in path), path=path,
                             knobs=knobs, conversation=f"conv-{i % 5}"))
        # Denials: an unknown model and an unknown tenant.
        rids.append(send(env, "acme", "gpt-5-nonexistent"))
        rids.append(send(env, "nobody", "gpt-4o"))
        deadline = time.time() + 10
        while len(env.access_lines()) < len(rids) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(5.5)  # histograms reach the admin endpoint on the stats flush (5 s)
        yield env, rids, env.prometheus()
    finally:
        env.stop()


def test_one_ledger_line_per_request_with_the_billing_fields(mix, upstream):
    env, rids, _ = mix
    lines = {l["client_request_id"]: l for l in env.access_lines()}
    assert set(lines) == {rid for rid, _ in rids}
    for rid, status in rids:
        line = lines[rid]
        for field in ("time", "api", "decision", "status"):
            assert field in line, field
        if line["decision"] == "admitted":
            for field in ("served_model", "route", "stream", "conversation_id", "input_tokens", "output_tokens",
                          "cached_input_tokens", "llm_cost_usd", "upstream_ms"):
                assert field in line, field
            entry = upstream.entry(rid)
            assert int(line["input_tokens"]) == entry["usage"]["input"]
            assert int(line["output_tokens"]) == entry["usage"]["output"]
            assert Decimal(str(line["llm_cost_usd"])) == expected_cost(line), line
            assert line["conversation_id"].startswith("conv-")


def test_prometheus_counters_equal_the_ledger(mix):
    env, rids, prom = mix
    lines = [l for l in env.access_lines() if l["decision"] == "admitted"]
    sums = collections.defaultdict(lambda: collections.Counter())
    for l in lines:
        key = frozenset({("tenant", l["tenant"]), ("model", l["served_model"])})
        sums[key]["requests"] += 1
        sums[key]["input_tokens"] += int(l["input_tokens"])
        sums[key]["output_tokens"] += int(l["output_tokens"])
        sums[key]["cached_input_tokens"] += int(l["cached_input_tokens"])
        sums[key]["cache_write_input_tokens"] += int(l["cache_write_input_tokens"])
        sums[key]["cost_micro_usd"] += int(Decimal(str(l["llm_cost_usd"])) * 10**6)
    for family in ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_micro_usd"):
        got = prom_samples(prom, f"tollgate_{family}")
        want = {k: v[family] for k, v in sums.items() if v[family]}
        assert {k: v for k, v in got.items() if v} == want, family
    # The cost counter equals an independent computation from the price table.
    independent = sum(expected_cost(l) for l in lines) * 10**6
    assert sum(prom_samples(prom, "tollgate_cost_micro_usd").values()) == independent
    assert sum(Decimal(str(l["llm_cost_usd"])) for l in lines) * 10**6 == independent


def test_denials_histograms_and_in_flight(mix):
    _, _, prom = mix
    denials = prom_samples(prom, "tollgate_denials")
    assert denials[frozenset({("tenant", "acme"), ("reason", "model_not_found")})] == 1
    assert denials[frozenset({("tenant", "_unknown"), ("reason", "unauthenticated")})] == 1
    counts = prom_samples(prom, "tollgate_tokens_per_request_count")
    assert sum(counts.values()) == 60
    assert sum(prom_samples(prom, "tollgate_time_to_first_token_ms_count").values()) == 30  # streams only
    assert all(v == 0 for v in prom_samples(prom, "tollgate_in_flight").values())
    assert 'tollgate_cost_micro_usd_per_request_bucket{tenant="acme",le="100"}' in prom


def test_label_cardinality_is_bounded(upstream):
    tenants = {f"tenant-{i:04d}": {} for i in range(1000)}
    env = Envoy(config(tenants=tenants, metrics={"max_tenant_labels": 50}), upstream.port)
    try:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
        payload = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        for i in range(1000):
            conn.request("POST", "/v1/chat/completions", body=payload,
                         headers={"content-type": "application/json", "x-tenant": f"tenant-{i:04d}"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        conn.close()
        samples = prom_samples(env.prometheus(), "tollgate_requests")
        values = {dict(k)["tenant"] for k in samples}
        assert len(values) == 51 and "_other" in values, len(values)
        assert sum(samples.values()) == 1000
    finally:
        env.stop()
