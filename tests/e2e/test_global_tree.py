"""A parent's global limit through two real Envoy replicas and the test RLS (Limitador's library
over redis-server): the organisation's strict global budget is one counter, leased by both
replicas for both of its teams; summed over both ledgers, never a token over. A global per-user
limit: one counter per user slot, held over both replicas, another user unaffected."""
import concurrent.futures
import uuid

import pytest

from harness import Envoy, RateLimitService, Redis, http

CHAT = "/v1/chat/completions"
ORG_TOKENS = 3000
USER_TOKENS = 800

CONFIG = {
    "identity": {"source": "header", "header": "x-tenant",
                 "user": {"source": "header", "header": "x-user"}},
    "tenants": {
        "team-u": {"strict": True, "limits": [], "user_limits": [
            {"name": "user-tpd", "tokens": USER_TOKENS, "window": "day", "global": True}]},
        "org": {"strict": True,
                "limits": [{"name": "tpd", "tokens": ORG_TOKENS, "window": "day", "global": True}]},
        "team-1": {"parent": "org", "limits": []},
        "team-2": {"parent": "org", "limits": []},
    },
    "global_budgets": {"cluster": "ratelimit", "replicas": 2, "refill_share": 0.25, "timeout_ms": 300},
}


@pytest.fixture(scope="module")
def replicas(upstream):
    redis = Redis()
    rls = RateLimitService(CONFIG, redis)
    extra = {"RATELIMIT_ENDPOINTS": f"127.0.0.1:{rls.port}"}
    envoys = [Envoy(CONFIG, upstream.port, extra=extra) for _ in range(2)]
    yield envoys
    for e in envoys:
        e.stop()
    rls.stop()
    redis.stop()


def chat(envoy, tenant, user=None):
    rid = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "max_tokens": 60, "messages": [{"role": "user", "content": "hello " * 20}]}
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": "100", "x-fake-output-tokens": "60"}
    if user:
        headers["x-user"] = user
    status, _, data = http("POST", envoy.url + CHAT, body, headers)
    return rid, status, data


def leased_tokens(results, limit):
    """The tokens charged to the admitted requests of `results` ((envoy, rid, status, body)),
    each paid by a lease, summed over their ledgers; each refusal is `limit`'s (or its lease
    stayed busy: "retry", no limit named)."""
    charged = 0
    for envoy, rid, status, _ in results:
        line = envoy.access_line(rid)
        if status == 200:
            assert line["global"] == "lease"
            charged += int(line["input_tokens"]) + int(line["output_tokens"])
        else:
            assert line["refused_by"] in (limit, None), line
    return charged


def test_a_parents_global_budget_holds_over_both_replicas_and_both_teams(replicas):
    jobs = [(replicas[i % 2], "team-1" if i % 3 else "team-2") for i in range(120)]

    def one(job):
        envoy, tenant = job
        rid, status, data = chat(envoy, tenant)
        return envoy, rid, status, data

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, jobs))
    statuses = {status for _, _, status, _ in results}
    assert statuses <= {200, 429}, [d for _, _, s, d in results if s not in (200, 429)][:2]
    assert 200 in statuses and 429 in statuses
    charged = leased_tokens(results, "org/tpd")
    # One counter for the organisation: both replicas, both teams, never a token over.
    assert 0 < charged <= ORG_TOKENS
    assert charged > ORG_TOKENS // 3, "the leases left most of the budget unused"


def test_a_global_per_user_limit_holds_over_both_replicas_and_spares_other_users(replicas):
    jobs = [replicas[i % 2] for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda e: (e, *chat(e, "team-u", "user-1")), jobs))
    statuses = [status for _, _, status, _ in results]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    charged = leased_tokens(results, "team-u/user-tpd")
    # One counter for the user, over both replicas: never a token over.
    assert USER_TOKENS // 3 < charged <= USER_TOKENS
    # Another user of the tenant has a counter of their own.
    assert [chat(e, "team-u", "user-2")[1] for e in replicas] == [200, 200]
