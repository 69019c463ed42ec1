"""Global budgets against a slow or lying rate-limit service, through the real Envoy (two
workers): a service that counts refills after Envoy's deadline (tests/rls `--delay-file`), one
that says an absurd `limit_remaining` (`--claim-remaining`), and one that is down (the backoff is
per Envoy). Each test uses its own tenant, so the order does not matter."""
import os
import tempfile
import threading
import time
import uuid

import pytest

from harness import Envoy, RateLimitService, Redis, http

CHAT = "/v1/chat/completions"

CONFIG = {
    "identity": {"source": "header", "header": "x-tenant"},
    "tenants": {
        # The slow service: a 40,000-token day, refills of half of what is left.
        "slow": {"limits": [{"name": "tpd", "tokens": 40000, "window": "day", "global": True}]},
        # The lying service: a 3,000,000-token day.
        "lied": {"limits": [
            {"name": "tpd", "tokens": 3000000, "window": "day", "global": True}]},
        "down": {"limits": [{"name": "tpd", "tokens": 40000, "window": "day", "global": True}]},
        # A fallback allowance of 300 tokens, refills of 1,000 tokens and less.
        "fb": {"limits": [
            {"name": "tpd", "tokens": 2000, "window": "day", "global": True, "fallback": 300}]},
    },
    "global_budgets": {"cluster": "ratelimit", "replicas": 1, "refill_share": 0.5,
                       "timeout_ms": 250},
}
TIMEOUT_MS = 250
DELAY_MS = 600


@pytest.fixture(scope="module")
def stack(upstream):
    redis = Redis()
    delay_file = os.path.join(tempfile.mkdtemp(prefix="tollgate-delay-"), "delay-ms")
    rls = RateLimitService(CONFIG, redis, faults=["--delay-file", delay_file])
    envoy = Envoy(CONFIG, upstream.port, extra={"RATELIMIT_ENDPOINTS": f"127.0.0.1:{rls.port}"})
    yield envoy, rls, redis, delay_file
    envoy.stop()
    rls.stop()
    redis.stop()


def chat(envoy, tenant, max_tokens=100, output=40):
    rid = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}]}
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": "10",
               "x-fake-output-tokens": str(output)}
    status, _, data = http("POST", envoy.url + CHAT, body, headers, timeout=10)
    return rid, status, data


def counted(redis, tenant):
    """What Limitador's counter of (tenant, tpd) holds: everything the service counted."""
    return sum(v for k, v in redis.counters().items() if f"{tenant}" in k and "tpd" in k)


def metric(envoy, name, tenant, reason=None):
    labels = f'tenant="{tenant}"' + (f',reason="{reason}"' if reason else "")
    for line in envoy.prometheus().splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return int(float(line.split(" ")[1]))
    return 0


def test_refills_counted_after_the_deadline_strand_one_chunk_and_the_budget_recovers(stack):
    envoy, rls, redis, delay_file = stack
    with open(delay_file, "w") as f:
        f.write(str(DELAY_MS))
    try:
        # 3.5 s of requests while every refill is answered after Envoy's 250 ms deadline; the
        # service counts each all the same.
        statuses = []
        end = time.time() + 3.5
        while time.time() < end:
            statuses.append(chat(envoy, "slow")[1])
            time.sleep(0.05)
        assert set(statuses) == {503}, statuses
    finally:
        os.unlink(delay_file)
    time.sleep(DELAY_MS / 1000 + 0.5)  # the last late call is counted
    lost = metric(envoy, "tollgate_global_refills", "slow", "unavailable")
    stranded = counted(redis, "slow")
    unconfirmed = metric(envoy, "tollgate_global_unconfirmed", "slow")
    print(f"slow service: {lost} refills lost, {stranded} tokens counted by the service, "
          f"none granted; {unconfirmed} unconfirmed")
    # The backoff (1 s, 2 s, ...) is per Envoy: at most three calls in 3.5 s.
    assert 1 <= lost <= 3, lost
    # The first lost call asked a chunk (half of 40,000); the later ones only a request's need
    # (~110 tokens): the bound is a chunk + (lost calls - 1) x the largest estimate.
    assert stranded <= 20000 + (lost - 1) * 200, stranded
    # Every token the service counted and never granted is in the metric.
    assert unconfirmed == stranded
    # The service is well again: after the backoff, the tenant (charged nothing) is admitted.
    deadline = time.time() + 10
    while time.time() < deadline:
        rid, status, _ = chat(envoy, "slow")
        if status == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the budget did not recover once the service was well")
    assert envoy.access_line(rid)["global"] == "lease"


def test_a_remaining_above_the_limit_is_clamped_and_chunks_stay_within_the_limit(stack):
    envoy, rls, redis, _ = stack
    rls.stop()
    faults = rls.faults
    rls.faults = faults + ["--claim-remaining", "4294967295"]
    rls.start()
    try:
        before = envoy.stats("cluster.ratelimit.upstream_rq_total").get(
            "cluster.ratelimit.upstream_rq_total", 0)
        # Four requests of 700,000 tokens against a 3,000,000 day: they all fit.
        statuses = [chat(envoy, "lied", max_tokens=700000, output=700000)[1] for _ in range(4)]
        calls = envoy.stats("cluster.ratelimit.upstream_rq_total").get(
            "cluster.ratelimit.upstream_rq_total", 0) - before
        asks = [(g["code"], g["hits"]) for g in rls.grants() if "lied" in g["key"]]
        print(f"lying service: statuses {statuses}, {calls} calls, asks {asks}")
        assert statuses == [200] * 4, statuses
        # No chunk past the limit, so none refused while the budget has room.
        assert all(code == "OK" and hits <= 3000000 for code, hits in asks), asks
        assert calls <= 3, calls
        assert counted(redis, "lied") <= 3000000
    finally:
        rls.stop()
        rls.faults = faults
        rls.start()


def test_the_outage_backoff_is_per_envoy_not_per_worker(stack):
    envoy, rls, redis, _ = stack
    rls.stop()
    try:
        # Four clients on new connections (both workers) for 3.2 s: the service is asked at
        # 0 s, 1 s and 3 s at most (per Envoy), where a per-worker backoff asks twice a second.
        end = time.time() + 3.2
        statuses = []

        def client():
            while time.time() < end:
                statuses.append(chat(envoy, "down")[1])
                time.sleep(0.02)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = metric(envoy, "tollgate_global_refills", "down", "unavailable")
        print(f"service down: {len(statuses)} requests, {failed} calls")
        assert set(statuses) == {503}
        assert 1 <= failed <= 3, failed
    finally:
        rls.start()


def test_the_fallback_label_is_on_the_requests_the_allowance_paid_for_only(stack):
    envoy, rls, redis, _ = stack
    rls.stop()
    try:
        rid, status, data = chat(envoy, "fb", max_tokens=50)
        assert status == 200, data
        labels = [(envoy.access_line(rid)["global"], rid)]
    finally:
        rls.start()
    time.sleep(1.1)  # the backoff after the failed refill
    # The service answers every refill now: 30 requests through several chunks.
    for _ in range(30):
        rid, status, data = chat(envoy, "fb", max_tokens=50)
        assert status == 200, data
        labels.append((envoy.access_line(rid)["global"], rid))
    fallback = [rid for label, rid in labels if label == "fallback"]
    charged = sum(int(envoy.access_line(rid)["input_tokens"]) +
                  int(envoy.access_line(rid)["output_tokens"]) for rid in fallback)
    print(f"fallback label: {len(fallback)} of {len(labels)} requests, {charged} tokens")
    assert fallback == [labels[0][1]], [label for label, _ in labels]
    assert charged <= 300
