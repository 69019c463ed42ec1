"""Budget alert webhooks through the real Envoy (two workers), received by the shipped receiver
(examples/observability/alert_receiver.py): one POST per threshold crossing under 50 concurrent
requests across both workers, with the documented version-1 event; a failing receiver gets each
event exactly 1 + retries times; a receiver that is down changes nothing for the requests."""
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from harness import ROOT, Envoy, _stop, free_port, http

RECEIVER = os.path.join(ROOT, "examples", "observability", "alert_receiver.py")
CHAT = "/v1/chat/completions"
CONTENT = "x" * 1000  # input up to ~1,080 bytes: each request is charged 1,000 + 40 tokens


class Receiver:
    def __init__(self, status=204):
        self.port = free_port()
        self.out = open(os.path.join(ROOT, "target", f"alert-receiver-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, RECEIVER, "--port", str(self.port), "--status", str(status)],
            stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{self.port}/events", timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the alert receiver did not start")

    def seen(self):
        data = json.loads(http("GET", f"http://127.0.0.1:{self.port}/events")[2])
        return data["posts"], data["events"]

    def stop(self):
        _stop(self.proc)
        self.out.close()


def config(retries=3):
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenant_defaults": {"default_output_tokens": 64},
        "tenants": {
            # The team inherits its org's alerting limit: the events name the org.
            "org": {"limits": [{"name": "tpd", "tokens": 40000, "window": "day",
                                "alert_at": [0.5, 0.8, 1.0]}]},
            "team": {"parent": "org", "limits": []},
            "solo": {"limits": [{"name": "tpd", "tokens": 2000, "window": "day",
                                 "alert_at": [0.5]}]},
        },
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
        "alerts": {"cluster": "alerts", "path": "/hooks/tollgate", "retries": retries,
                   "replica": "envoy-a"},
    }


def chat(envoy, tenant):
    rid = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "max_tokens": 40,
            "messages": [{"role": "user", "content": CONTENT}]}
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": "1000",
               "x-fake-output-tokens": "40"}
    started = time.time()
    status, _, data = http("POST", envoy.url + CHAT, body, headers)
    return status, time.time() - started


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def webhook_stats(envoy):
    stats = envoy.stats("alert_webhooks")
    return {k.rsplit(".", 1)[-1]: v for k, v in stats.items()}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def test_one_post_per_crossing_under_fifty_concurrent_requests(upstream, receiver):
    envoy = Envoy(config(), upstream.port,
                  extra={"ALERTS_ENDPOINTS": f"127.0.0.1:{receiver.port}"})
    try:
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda _: chat(envoy, "team"), range(50)))
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        # 50 × 1,040 tokens pass all three thresholds of 40,000.
        assert statuses.count(200) >= 39
        assert wait_for(lambda: len(receiver.seen()[1]) >= 3)
        time.sleep(1.5)  # anything late (a duplicate) would arrive now
        posts, events = receiver.seen()
        assert posts == 3, events
        assert sorted(e["threshold"] for e in events) == [0.5, 0.8, 1.0]
        tomorrow = (datetime.datetime.now(datetime.timezone.utc).date()
                    + datetime.timedelta(days=1)).isoformat() + "T00:00:00Z"
        for e in events:
            assert (e["version"], e["type"], e["tenant"], e["limit"]) == (1, "budget_alert", "org", "tpd")
            assert (e["amount"], e["unit"], e["window"]) == (40000, "tokens", "day")
            assert e["used"] >= e["threshold"] * 40000
            assert (e["replica"], e["global"], e["shadow"]) == ("envoy-a", False, False)
            assert e["resets_at"] == tomorrow
            assert e["id"] == (f"org/tpd/{int(e['threshold'] * 100)}/{e['window_start']}/envoy-a")
        # Counted once per threshold too, under the org's label.
        stats = envoy.stats("budget_alerts")
        for pct in ("50", "80", "100"):
            assert stats[f"wasmcustom.tollgate.tenant.org.limit.tpd.threshold.{pct}.budget_alerts"] == 1
        assert wait_for(lambda: webhook_stats(envoy).get("delivered") == 3)
        assert webhook_stats(envoy) == {"sent": 3, "delivered": 3}
    finally:
        envoy.stop()


def test_a_failing_receiver_gets_each_event_one_plus_retries_times(upstream):
    failing = Receiver(status=503)
    envoy = Envoy(config(retries=2), upstream.port,
                  extra={"ALERTS_ENDPOINTS": f"127.0.0.1:{failing.port}"})
    try:
        # solo's 2,000: the first request's 1,040 crosses 50 %.
        assert [chat(envoy, "solo")[0] for _ in range(2)] == [200, 200]
        # Backoff 0.5 s, then 1 s: three attempts within ~1.5 s, and no fourth.
        assert wait_for(lambda: webhook_stats(envoy).get("failed") == 1)
        time.sleep(1.0)
        assert failing.seen()[0] == 3
        assert webhook_stats(envoy) == {"sent": 3, "failed": 1}
    finally:
        envoy.stop()
        failing.stop()


def test_a_receiver_that_is_down_changes_nothing_for_the_requests(upstream):
    down = free_port()  # nothing listens there
    envoy = Envoy(config(retries=1), upstream.port, extra={"ALERTS_ENDPOINTS": f"127.0.0.1:{down}"})
    try:
        results = [chat(envoy, "solo") for _ in range(3)]
        # The third is refused by the budget (2,080 of 2,000 used), not by the receiver.
        assert [s for s, _ in results] == [200, 200, 429]
        assert max(t for _, t in results) < 2.0
        assert wait_for(lambda: webhook_stats(envoy).get("failed") == 1)
        assert webhook_stats(envoy) == {"sent": 2, "failed": 1}
        assert chat(envoy, "team")[0] == 200
    finally:
        envoy.stop()
