"""Global budgets without strict mode, the overshoot and its bound: three Envoys
(`--concurrency 2`) lease one non-strict tenant's minute limit from the test rate-limit service
(Limitador's library over redis-server) while 24 clients send requests that name no max tokens
and use more than was reserved for them (a slow upstream keeps many in flight).

Without strict mode a request may use more than it reserved: its settlement draws the overage
from the replica's lease, and a lease overdrawn asks the next refill for the shortfall too, so
the service counts it. What no refill covers is the overshoot: at most the overage of the
requests in flight when the leases stopped being refilled, i.e. ≤ requests in flight × the
largest overage. The test asserts that bound and prints the figures (`pytest -s`); timing is
never asserted.
"""
import json
import math
import threading
import time
import uuid

import pytest

from harness import Envoy, RateLimitService, Redis, http

LIMIT = 3000
REPLICAS = 3
CLIENTS = 24
SECONDS = 8
RESERVED_OUTPUT = 20
INPUT, OUTPUT = 10, 60


def config():
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenants": {"n": {"default_output_tokens": RESERVED_OUTPUT, "limits": [
            {"name": "tpm", "tokens": LIMIT, "window": "minute", "global": True}]}},
        "global_budgets": {"cluster": "ratelimit", "replicas": REPLICAS, "refill_share": 0.25,
                           "timeout_ms": 500},
    }


def body(n):
    return json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "x" * (20 + n % 40)}]}).encode()


def overage(raw):
    """What a request charges beyond its reservation (the prompt estimate is bytes ÷ 4)."""
    return INPUT + OUTPUT - (math.ceil(len(raw) / 4) + RESERVED_OUTPUT)


@pytest.fixture(scope="module")
def run(upstream):
    redis = Redis()
    rls = RateLimitService(config(), redis)
    extra = {"RATELIMIT_ENDPOINTS": f"127.0.0.1:{rls.port}"}
    envoys = [Envoy(config(), upstream.port, extra=extra) for _ in range(REPLICAS)]
    sent, lock = [], threading.Lock()
    # One minute: start early in it, so the whole run falls in one window.
    while not 2 <= time.time() % 60 <= 40:
        time.sleep(0.2)
    stop = time.time() + SECONDS

    def client(n):
        envoy = envoys[n % REPLICAS]
        i = 0
        while time.time() < stop:
            raw = body(n * 1000 + i)
            i += 1
            rid = str(uuid.uuid4())
            headers = {"content-type": "application/json", "x-tenant": "n", "x-request-id": rid,
                       "x-fake-request-id": rid, "x-fake-input-tokens": str(INPUT),
                       "x-fake-output-tokens": str(OUTPUT), "x-fake-delay-ms": "150"}
            status = http("POST", envoy.url + "/v1/chat/completions", raw, headers)[0]
            with lock:
                sent.append((rid, status, raw))
            if status != 200:
                time.sleep(0.05)

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 60)
        time.sleep(1.0)  # the last access-log lines
        lines = []
        for envoy in envoys:
            lines += envoy.access_lines()
        counters = redis.counters()
    finally:
        for envoy in envoys:
            envoy.stop()
        rls.stop()
        redis.stop()
    return {"sent": sent, "lines": lines, "counters": counters}


def test_the_overshoot_stays_within_requests_in_flight_times_their_overage(run):
    admitted = [l for l in run["lines"] if l.get("tenant") == "n" and l.get("decision") == "admitted"]
    refused = [s for _, s, _ in run["sent"] if s == 429]
    assert admitted and refused, "the load must spend the limit"
    charged = sum(int(l["input_tokens"]) + int(l["output_tokens"]) for l in admitted)
    granted = sum(v for k, v in run["counters"].items() if "tpm" in k)
    largest = max(overage(raw) for _, s, raw in run["sent"] if s == 200)
    bound = CLIENTS * largest
    overshoot = max(0, charged - LIMIT)
    print(f"\nnon-strict, {REPLICAS} replicas, {CLIENTS} clients: {len(admitted)} admitted, "
          f"{len(refused)} refused; charged {charged} against the limit {LIMIT} "
          f"(overshoot {overshoot}); the service granted {granted}; "
          f"bound {CLIENTS} in flight × {largest} = {bound}")
    assert largest > 0, "each request must use more than it reserved"
    assert overshoot <= bound, (charged, bound)
    # The overdrafts that a refill covered are in the service's counter: what it counted is at
    # least what was charged less the overage still in flight at the end.
    assert granted >= charged - bound, (granted, charged)
