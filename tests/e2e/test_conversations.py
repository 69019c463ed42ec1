"""Conversations through the real Envoy (two workers): a runaway agent loop stopped by its step
and dollar caps while another conversation of the tenant goes on; the SDK's own error, not
retried; exactly `max_requests` steps admitted when they race over both workers; the ledger's
step and running cost, and the conversation metrics."""
import concurrent.futures
import hashlib
import re
import time
import uuid

import openai
import pytest

from harness import Envoy, http

CHAT = "/v1/chat/completions"
CONTENT = "x" * 1000


def config():
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "conversations": {"header": "x-conversation-id", "idle_seconds": 600,
                          "cost_thresholds_usd": ["0.002", "0.005"]},
        "tenants": {
            "agents": {"conversation_limits": {"max_requests": 8, "usd": "0.01"},
                       "limits": [{"name": "tpd", "tokens": 10000000, "window": "day"}]},
            "racers": {"conversation_limits": {"max_requests": 10}},
        },
        # $1 per million input tokens, $2 per million output: a step of 1,000 + 40 is $0.00108.
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
    }


@pytest.fixture(scope="module")
def cenv(upstream):
    proc = Envoy(config(), upstream.port)
    yield proc
    proc.stop()


def step(envoy, conversation, tenant="agents"):
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-conversation-id": conversation,
               "x-fake-input-tokens": "1000", "x-fake-output-tokens": "40"}
    body = {"model": "gpt-4o-mini", "max_tokens": 40, "messages": [{"role": "user", "content": CONTENT}]}
    status, resp_headers, data = http("POST", envoy.url + CHAT, body, headers)
    return rid, status, resp_headers, data


def metric(text, family, tenant, **labels):
    for line in text.splitlines():
        m = re.match(rf"^{family}\{{(.*)\}} (\d+)$", line)
        if m and f'tenant="{tenant}"' in m.group(1) and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return int(m.group(2))
    return None


def test_a_runaway_loop_is_stopped_by_its_caps_and_another_conversation_goes_on(cenv):
    loop = f"loop-{uuid.uuid4()}"
    steps, costs = [], []
    for _ in range(20):
        rid, status, headers, data = step(cenv, loop)
        if status != 200:
            break
        line = cenv.access_line(rid)
        steps.append(int(line["conversation_step"]))
        costs.append(line["conversation_cost_usd"])
    # Eight steps of $0.00108 fit the dollar cap ($0.01): the step cap (8) stops the loop.
    assert steps == list(range(1, 9)), steps
    assert costs[-1] == 0.00864
    assert status == 429 and headers["x-should-retry"] == "false" and "retry-after" not in headers
    line = cenv.access_line(rid)
    assert line["decision"] == "conversation_budget_exceeded"
    assert line["refused_by"] == "agents/conversation.max_requests"
    # The SDK raises its own error and does not retry it.
    client = openai.OpenAI(base_url=cenv.url + "/v1", api_key="unused", max_retries=2,
                           default_headers={"x-tenant": "agents", "x-conversation-id": loop})
    started = time.time()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "conversation_budget_exceeded"
    assert time.time() - started < 2, "the SDK retried a spent conversation"
    # Another conversation of the same tenant is not affected.
    rid, status, _, _ = step(cenv, f"other-{uuid.uuid4()}")
    assert status == 200 and cenv.access_line(rid)["conversation_step"] == 1
    text = cenv.prometheus()
    assert metric(text, "tollgate_conversations_started", "agents") >= 2
    assert metric(text, "tollgate_conversations_over", "agents", threshold="0_002") >= 1
    assert metric(text, "tollgate_conversations_over", "agents", threshold="0_005") >= 1
    assert metric(text, "tollgate_conversations_active", "agents") >= 2
    assert metric(text, "tollgate_denials", "agents", reason="conversation_budget_exceeded") >= 2


def test_racing_steps_of_one_conversation_are_exact_over_both_workers(cenv):
    conversation = f"race-{uuid.uuid4()}"

    def one(_):
        rid, status, _, _ = step(cenv, conversation, tenant="racers")
        return rid, status

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    admitted = [rid for rid, status in results if status == 200]
    assert len(admitted) == 10
    assert sorted(int(cenv.access_line(rid)["conversation_step"]) for rid in admitted) == list(range(1, 11))
    assert {status for _, status in results} == {200, 429}
