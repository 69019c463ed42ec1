"""Strict mode against every request field that sets how much an upstream generates (issue 18 A),
through the official openai SDK and a vLLM-like upstream that generates all its body allows
(`x-fake-generate: max`: `max_completion_tokens or max_tokens`, 0 meaning no cap, `n` outputs,
numbers coerced as pydantic does).

* `n` reserves every output: three `n: 20, max_tokens: 100` calls against 5,000 tokens a month (a window that will not turn mid-test)
  admit two, and the tenant's usage stays within the limit (before: 6,069 of 5,000).
* thirty concurrent `n: 128` calls are all refused (before: 21 admitted, 269,535 tokens charged).
* a max tokens of 0, and counts that are not positive integers (`"20"`, `20.0`), get a 400 naming
  the field (before: 0 reserved and 30,000 tokens generated, or n read as 1).
* a tenant's `max_choices` caps `n`.
"""
import concurrent.futures
import hashlib
import json

import openai
import pytest

from harness import Envoy, http

ADMIN_TOKEN = "strict-fields-admin"
LIMIT = 5000
GENERATE = {"x-fake-generate": "max"}


def config():
    strict = {"strict": True, "default_output_tokens": 64,
              "limits": [{"name": "tph", "tokens": LIMIT, "window": "month"}]}
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenants": {"n20": strict, "n128": strict, "zero": strict, "lax": strict,
                    "capped": {**strict, "max_choices": 4}},
        "usage_view": {"path": "/tollgate/usage",
                       "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }


@pytest.fixture(scope="module")
def senv(upstream):
    proc = Envoy(config(), upstream.port)
    yield proc
    proc.stop()


def sdk(envoy, tenant):
    return openai.OpenAI(base_url=envoy.url + "/v1", api_key="unused", max_retries=0,
                         default_headers={"x-tenant": tenant, **GENERATE})


def used(envoy, tenant):
    status, _, data = http("GET", envoy.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, data
    view = {t["tenant"]: t for t in json.loads(data)["tenants"]}
    limit = next(l for l in view[tenant]["limits"] if l["name"] == "tph")
    return limit["used"], limit["reserved"]


def ask(client, **extra):
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **extra)


def test_n_reserves_every_output(senv):
    client = sdk(senv, "n20")
    outcomes = []
    for _ in range(3):
        try:
            reply = ask(client, max_tokens=100, n=20)
            outcomes.append(reply.usage.completion_tokens)
        except openai.RateLimitError:
            outcomes.append("429")
    # Each admitted call generated (and was charged) 20 x 100 tokens; the third did not fit.
    assert outcomes == [2000, 2000, "429"], outcomes
    spent, reserved = used(senv, "n20")
    assert reserved == 0 and spent <= LIMIT, spent
    assert spent >= 4000


def test_concurrent_wide_requests_cannot_pass_the_limit(senv):
    client = sdk(senv, "n128")

    def one(_):
        try:
            ask(client, max_tokens=100, n=128)
            return 200
        except openai.RateLimitError:
            return 429

    with concurrent.futures.ThreadPoolExecutor(max_workers=30) as pool:
        statuses = list(pool.map(one, range(30)))
    # 128 x 100 output tokens never fit 5,000: nothing is admitted, nothing is charged.
    assert statuses == [429] * 30
    assert used(senv, "n128") == (0, 0)


@pytest.mark.parametrize("extra,param", [
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 0, "max_tokens": 5000}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"n": "20"}, "max_tokens": 100}, "n"),
    ({"extra_body": {"n": 20.0}, "max_tokens": 100}, "n"),
    ({"extra_body": {"best_of": 0}}, "best_of"),
])
def test_counts_that_lift_the_cap_are_refused(senv, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk(senv, "zero"), **extra)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body
    assert used(senv, "zero") == (0, 0)


def test_both_max_fields_reserve_the_larger(senv):
    # vLLM reads max_completion_tokens first; a server that reads max_tokens would generate 300.
    reply = ask(sdk(senv, "lax"), max_completion_tokens=50, max_tokens=300)
    assert reply.usage.completion_tokens == 50
    client = sdk(senv, "lax").with_options(default_headers={
        "x-tenant": "lax", "x-fake-generate": "max", "x-fake-output-tokens": "300"})
    reply = ask(client, max_completion_tokens=50, max_tokens=300)
    assert reply.usage.completion_tokens == 300
    spent, reserved = used(senv, "lax")
    assert reserved == 0 and 350 <= spent <= LIMIT


def test_max_choices_caps_n(senv):
    client = sdk(senv, "capped")
    assert len(ask(client, max_tokens=10, n=4).choices) >= 1
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, max_tokens=10, n=5)
    assert err.value.body["param"] == "n"
