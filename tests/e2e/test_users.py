"""End users inside a tenant through the real Envoy (two workers): per-user limits from a trusted
header, a collision in a small slot space counted, thousands of distinct ids in a bounded key
space; users named by the official SDKs' own fields (OpenAI `user`, Anthropic
`metadata.user_id`)."""
import concurrent.futures
import hashlib
import json
import re
import uuid

import anthropic
import openai
import pytest

from harness import Envoy, http

ADMIN_TOKEN = "users-view"
CHAT = "/v1/chat/completions"
CONTENT = "x" * 1000  # ~1,080 bytes: a reservation of ~310 tokens, input up to its bytes
SLOTS = 2


def slot(user_id):
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "little") % SLOTS


def pseudonym(user_id):
    return hashlib.sha256(user_id.encode()).digest()[:8].hex()


def config(user, slots):
    return {
        "identity": {"source": "header", "header": "x-tenant", "user": user, "user_slots": slots},
        "tenants": {
            "app": {"limits": [{"name": "tpd", "tokens": 10000000, "window": "day"}],
                    "user_limits": [{"name": "user-tpd", "tokens": 1200, "window": "day"}]},
            "plain": {},
        },
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
        "usage_view": {"path": "/tollgate/usage",
                       "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }


@pytest.fixture(scope="module")
def uenv(upstream):
    proc = Envoy(config({"source": "header", "header": "x-user"}, SLOTS), upstream.port)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def benv(upstream):
    proc = Envoy(config({"source": "body", "ledger": "raw"}, 1024), upstream.port)
    yield proc
    proc.stop()


def chat(envoy, user, tenant="app"):
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": "1000", "x-fake-output-tokens": "40"}
    if user is not None:
        headers["x-user"] = user
    body = {"model": "gpt-4o-mini", "max_tokens": 40, "messages": [{"role": "user", "content": CONTENT}]}
    status, _, data = http("POST", envoy.url + CHAT, body, headers)
    return rid, status, data


def view(envoy):
    status, _, data = http("GET", envoy.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, data
    return json.loads(data)


def counter(text, family, tenant):
    for line in text.splitlines():
        m = re.match(rf"^{family}\{{(.*)\}} (\d+)$", line)
        if m and f'tenant="{tenant}"' in m.group(1):
            return int(m.group(2))
    return 0


def test_each_user_has_a_budget_and_a_shared_slot_is_stricter_and_counted(uenv):
    ids = [f"user-{n}" for n in range(20)]
    alice = ids[0]
    carol = next(i for i in ids[1:] if slot(i) == slot(alice))
    bob = next(i for i in ids[1:] if slot(i) != slot(alice))
    rid, status, _ = chat(uenv, alice)
    assert status == 200
    assert uenv.access_line(rid)["user"] == pseudonym(alice)
    rid, status, data = chat(uenv, alice)
    assert status == 429, data
    line = uenv.access_line(rid)
    assert (line["refused_by"], line["user"]) == ("app/user-tpd", pseudonym(alice))
    # Bob has a slot of his own; Carol shares Alice's: refused with her, and counted.
    assert chat(uenv, bob)[1] == 200
    assert chat(uenv, carol)[1] == 429
    assert counter(uenv.prometheus(), "tollgate_user_slot_collisions", "app") >= 1
    # A tenant without per-user limits is not limited per user.
    for _ in range(3):
        assert chat(uenv, alice, tenant="plain")[1] == 200
    v = view(uenv)
    assert v["user_slots"] == SLOTS
    app = next(t for t in v["tenants"] if t["tenant"] == "app")
    assert [l["name"] for l in app["user_limits"]] == ["user-tpd"]
    assert [l["name"] for l in app["limits"]] == ["tpd"]


def test_thousands_of_distinct_ids_stay_in_the_configured_key_space(uenv):
    before = view(uenv)["shared_keys"]

    def one(n):
        return chat(uenv, f"flood-{n}-{uuid.uuid4()}")[1]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(2000)))
    assert set(statuses) <= {200, 429}
    after = view(uenv)["shared_keys"]
    assert after["bound"] == before["bound"]
    assert after["present"] <= after["bound"]


def test_the_official_sdks_name_the_user_in_their_own_fields(benv):
    client = openai.OpenAI(base_url=benv.url + "/v1", api_key="unused", max_retries=0,
                           default_headers={"x-tenant": "app"})
    ask = dict(model="gpt-4o-mini", max_tokens=40, messages=[{"role": "user", "content": CONTENT}],
               extra_headers={"x-fake-input-tokens": "1000", "x-fake-output-tokens": "40"})
    client.chat.completions.create(user="u-17", **ask)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(user="u-17", **ask)
    assert "user-tpd" in info.value.message
    # The same user through Anthropic's SDK: its own budget, already spent.
    claude = anthropic.Anthropic(base_url=benv.url, api_key="unused", max_retries=0,
                                 default_headers={"x-tenant": "app"})
    with pytest.raises(anthropic.RateLimitError):
        claude.messages.create(model="claude-3-5-haiku", max_tokens=40, metadata={"user_id": "u-17"},
                               messages=[{"role": "user", "content": CONTENT}])
    # Another user goes on.
    client.chat.completions.create(user="u-18", **ask)
    users = [l["user"] for l in benv.access_lines() if l.get("tenant") == "app"]
    assert users.count("u-17") == 3 and users.count("u-18") == 1
