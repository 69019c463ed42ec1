"""Global budgets through the real Envoy: limits leased from a rate-limit service (the test RLS
server: Limitador's library over redis-server, serving what `tollgate-limits limitador` writes),
refilled in chunks, refused with the service's verdict, and decided as configured when the
service or Redis is down."""
import json
import time
import uuid

import pytest

from harness import Envoy, RateLimitService, Redis, http

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def config(limits, **extra):
    base = {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenants": {"team-g": {"limits": limits}, "team-f": {"limits": [
            {"name": "tpd", "tokens": 100000, "window": "day", "global": True, "fallback": 300}]}},
        "global_budgets": {"cluster": "ratelimit", "replicas": 1, "refill_share": 0.25,
                           "timeout_ms": 300},
    }
    base.update(extra)
    return base


CONFIG = config([{"name": "tpd", "tokens": 4000, "window": "day", "global": True}])


@pytest.fixture(scope="module")
def stack(upstream):
    redis = Redis()
    rls = RateLimitService(CONFIG, redis)
    envoy = Envoy(CONFIG, upstream.port, extra={"RATELIMIT_ENDPOINTS": f"127.0.0.1:{rls.port}"})
    yield envoy, rls, redis
    envoy.stop()
    rls.stop()
    redis.stop()


def chat(envoy, tenant, max_tokens=100, path=CHAT, output=40):
    rid = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}]}
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": "10", "x-fake-output-tokens": str(output)}
    if path == MESSAGES:
        headers["anthropic-version"] = "2023-06-01"
    status, resp_headers, data = http("POST", envoy.url + path, body, headers)
    return rid, status, resp_headers, data


def refills(envoy):
    stats = envoy.stats("cluster.ratelimit.upstream_rq_total")
    return stats.get("cluster.ratelimit.upstream_rq_total", 0)


def granted_in_redis(redis, policy, limit):
    """What the service granted this window: Limitador's counters of (policy, limit)."""
    return sum(v for k, v in redis.counters().items() if f"{policy}/{limit}" in k or
               (policy in k and limit in k))


def test_a_lease_is_refilled_in_chunks_and_the_global_counter_holds_what_was_granted(stack):
    envoy, _, redis = stack
    before = refills(envoy)
    ids = []
    for _ in range(6):
        rid, status, _, data = chat(envoy, "team-g")
        assert status == 200, data
        ids.append(rid)
    # A refill takes a quarter of what is left: 1,000 tokens, each request ~110 reserved and
    # 50 charged: a few refills for six requests, not one per request.
    calls = refills(envoy) - before
    assert 1 <= calls <= 3, calls
    lines = [envoy.access_line(rid) for rid in ids]
    assert all(line["global"] == "lease" for line in lines)
    charged = sum(int(l["input_tokens"]) + int(l["output_tokens"]) for l in lines)
    granted = granted_in_redis(redis, "team-g", "tpd")
    assert charged <= granted <= 4000, (charged, granted)


def test_the_service_refusing_is_a_429_once_the_global_budget_is_spent(stack):
    envoy, _, redis = stack
    statuses = [chat(envoy, "team-g", max_tokens=300, output=290)[1] for _ in range(20)]
    assert 429 in statuses, statuses
    first = statuses.index(429)
    assert all(s == 429 for s in statuses[first:]), statuses
    rid, status, headers, data = chat(envoy, "team-g", max_tokens=300)
    assert status == 429
    assert json.loads(data)["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    assert granted_in_redis(redis, "team-g", "tpd") <= 4000
    prom = envoy.prometheus()
    assert 'tollgate_global_refills{tenant="team-g",reason="granted"}' in prom
    # The lease gauges, as of the last refill: this one Envoy was granted all Redis counts.
    gauges = {line.split(" ")[0]: int(float(line.split(" ")[1])) for line in prom.splitlines()
              if line.startswith("tollgate_global_granted{") or
              line.startswith("tollgate_global_remaining{")}
    granted = gauges['tollgate_global_granted{tenant="team-g",limit="tpd"}']
    assert granted == granted_in_redis(redis, "team-g", "tpd"), gauges
    assert gauges['tollgate_global_remaining{tenant="team-g",limit="tpd"}'] <= 4000 - granted


def test_without_the_service_requests_get_503_or_the_fallback_allowance(stack):
    envoy, rls, redis = stack
    rls.stop()
    try:
        rid, status, headers, data = chat(envoy, "team-g", max_tokens=1)
        assert status in (429, 503), data  # team-g's lease may still cover it, or be spent
        # A tenant whose lease is empty: 503 in the API's own shape.
        fresh = config([{"name": "other", "tokens": 4000, "window": "day", "global": True}])
        del fresh  # (team-f has a fallback allowance; see below)
        rid, status, headers, data = chat(envoy, "team-f", max_tokens=100)
        assert status == 200, data
        assert envoy.access_line(rid)["global"] == "fallback"
        # The allowance is 300 tokens a day: spent after a few requests, then 503.
        statuses = [chat(envoy, "team-f", max_tokens=100)[1] for _ in range(4)]
        assert statuses.count(503) >= 1, statuses
        rid, status, headers, data = chat(envoy, "team-f", max_tokens=100, path=MESSAGES)
        assert status == 503
        body = json.loads(data)
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert headers["retry-after"] == "1"
        assert envoy.access_line(rid)["decision"] == "budget_unavailable"
    finally:
        rls.start()
    # Back: after the backoff the lease is refilled from the service again.
    deadline = time.time() + 10
    while time.time() < deadline:
        rid, status, _, _ = chat(envoy, "team-f", max_tokens=100)
        if status == 200 and envoy.access_line(rid)["global"] == "lease":
            break
        time.sleep(0.3)
    else:
        pytest.fail("the lease was not refilled after the service came back")


def test_without_redis_the_service_answers_unavailable_and_requests_get_503(stack):
    envoy, _, redis = stack
    redis.stop()
    try:
        # team-f's fallback allowance is spent (see above), and its lease has no room for this.
        rid, status, headers, data = chat(envoy, "team-f", max_tokens=60000)
        assert status == 503, data
        assert json.loads(data)["error"]["code"] == "budget_service_unavailable"
        prom = envoy.prometheus()
        assert 'tollgate_global_refills{tenant="team-f",reason="unavailable"}' in prom
    finally:
        redis.start(redis.port)
    deadline = time.time() + 15
    while time.time() < deadline:
        rid, status, _, _ = chat(envoy, "team-f", max_tokens=60000)
        if status == 200:
            break
        time.sleep(0.3)
    else:
        pytest.fail("no refill once Redis was back")
