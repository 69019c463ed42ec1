"""Model routing through Envoy's own route table, with fake upstreams standing for providers:
models and aliases land on the right cluster with the right model name, weighted aliases split
as configured, conversations stick, tenants near their budget are downgraded, unknown models
are refused (or defaulted), clients cannot pick a cluster, and Envoy's retries settle once."""
import collections
import hashlib
import json
import uuid

import pytest

from harness import Envoy, FakeUpstream, http

ADMIN = "routing-admin"
ROUTING = {
    "conversation_header": "x-conversation-id",
    "models": {
        "gpt-4o": {"route": "openai", "upstream_model": "gpt-4o-2024-11-20"},
        "gpt-4o-mini": {"route": "openai"},
        "claude-3-5-haiku": {"route": "anthropic", "upstream_model": "claude-3-5-haiku-20241022"},
        "llama": {"route": "selfhosted", "upstream_model": "meta-llama/Llama-3.3-70B-Instruct"},
        "gpt-4o-ha": {"route": "openai-failover", "upstream_model": "gpt-4o"},
    },
    "aliases": {
        "canary": {"targets": [{"model": "gpt-4o", "weight": 90}, {"model": "llama", "weight": 10}]},
        "smart": {"targets": [{"model": "gpt-4o"}], "downgrade_to": "gpt-4o-mini"},
    },
}
PRICES = {"gpt-4o": {"input": "2.50", "output": "10.00"}, "gpt-4o-mini": {"input": "0.15", "output": "0.60"},
          "*": {"input": "1.00", "output": "1.00"}}


def config(**routing_extra):
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenant_defaults": {"default_output_tokens": 50},
        "tenants": {
            "team": {"limits": [{"name": "tph", "tokens": 1000000, "window": "hour"}]},
            "thrifty": {"limits": [{"name": "tph", "tokens": 1000, "window": "hour"},
                                   {"name": "usd", "usd": "1.00", "window": "day"}],
                        "downgrade_at": 0.5},
            "own-alias": {"aliases": {"smart": {"targets": [{"model": "llama"}]}}},
        },
        "prices": PRICES,
        "routing": {**ROUTING, **routing_extra},
        "usage_view": {"path": "/tollgate/usage", "admin_token_sha256": hashlib.sha256(ADMIN.encode()).hexdigest()},
    }


@pytest.fixture(scope="module")
def providers():
    ups = {name: FakeUpstream(name) for name in ("openai-1", "openai-2", "anthropic", "selfhosted", "backup")}
    yield ups
    for up in ups.values():
        up.stop()


def endpoints(*ups):
    return ",".join(f"127.0.0.1:{u.port}" for u in ups)


def start(providers, plugin_config):
    return Envoy(plugin_config, providers["openai-1"].port, extra={
        "OPENAI_ENDPOINTS": endpoints(providers["openai-1"], providers["openai-2"]),
        "ANTHROPIC_ENDPOINTS": endpoints(providers["anthropic"]),
        "SELFHOSTED_ENDPOINTS": endpoints(providers["selfhosted"]),
        "OPENAI_BACKUP_ENDPOINTS": endpoints(providers["backup"]),
    })


@pytest.fixture(scope="module")
def renv(providers):
    proc = start(providers, config())
    yield proc
    proc.stop()


def find(providers, rid):
    """(server name, ledger entries) of the request `rid` across all fake providers."""
    hits = [(name, e) for name, up in providers.items() for e in up.ledger() if e["id"] == rid]
    assert hits, f"request {rid} reached no provider"
    return hits


def ask(envoy, model, tenant="team", path="/v1/chat/completions", headers=None, body=None):
    rid = str(uuid.uuid4())
    payload = body or {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    h = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid, "x-fake-request-id": rid}
    h.update(headers or {})
    status, resp_headers, data = http("POST", envoy.url + path, payload, h)
    return rid, status, resp_headers, data


@pytest.mark.parametrize("model,servers,upstream_model", [
    ("gpt-4o", {"openai-1", "openai-2"}, "gpt-4o-2024-11-20"),
    ("gpt-4o-mini", {"openai-1", "openai-2"}, "gpt-4o-mini"),
    ("claude-3-5-haiku", {"anthropic"}, "claude-3-5-haiku-20241022"),
    ("llama", {"selfhosted"}, "meta-llama/Llama-3.3-70B-Instruct"),
    ("smart", {"openai-1", "openai-2"}, "gpt-4o-2024-11-20"),
    ("gpt-4o-ha", {"openai-1", "openai-2"}, "gpt-4o"),
])
def test_models_and_aliases_land_on_their_upstream(renv, providers, model, servers, upstream_model):
    path = "/v1/messages" if model.startswith("claude") else "/v1/chat/completions"
    rid, status, headers, data = ask(renv, model, path=path)
    assert status == 200, data
    [(server, entry)] = find(providers, rid)
    assert server in servers
    assert entry["body"]["model"] == upstream_model
    served = ROUTING["aliases"].get(model, {}).get("targets", [{"model": model}])[0]["model"]
    assert headers["x-tollgate-model"] == served
    line = renv.access_line(rid)
    assert (line["model"], line["served_model"]) == (model, served)
    assert line["route"] == ROUTING["models"][served]["route"]
    # The rewritten body kept its content-length right: the upstream parsed it whole.
    assert entry["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_weighted_alias_splits_90_10(renv, providers):
    counts = collections.Counter()
    payload = json.dumps({"model": "canary", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", renv.port, timeout=30)
    for _ in range(1000):
        conn.request("POST", "/v1/chat/completions", body=payload,
                     headers={"content-type": "application/json", "x-tenant": "team"})
        resp = conn.getresponse()
        resp.read()
        counts[resp.getheader("x-tollgate-model")] += 1
    conn.close()
    assert counts["gpt-4o"] + counts["llama"] == 1000
    assert 870 <= counts["gpt-4o"] <= 930, counts  # 90% ± 3 points


def test_conversations_stick_to_one_target(renv, providers):
    for conv in ("conv-a", "conv-b", "conv-c", "conv-d"):
        served = {ask(renv, "canary", headers={"x-conversation-id": conv})[2]["x-tollgate-model"] for _ in range(15)}
        assert len(served) == 1, (conv, served)


def test_tenant_alias_override(renv, providers):
    rid, status, headers, _ = ask(renv, "smart", tenant="own-alias")
    assert status == 200
    assert headers["x-tollgate-model"] == "llama"
    assert find(providers, rid)[0][0] == "selfhosted"


def usage_view(envoy):
    data = http("GET", envoy.url + "/tollgate/usage", None, {"authorization": f"Bearer {ADMIN}"})[2]
    return {t["tenant"]: {l["name"]: l for l in t["limits"]} for t in json.loads(data)["tenants"]}


def test_budget_aware_downgrade(renv, providers):
    # Below half of the 1,000 tokens per hour: the alias's default target.
    rid, status, headers, _ = ask(renv, "smart", tenant="thrifty")
    assert status == 200 and headers["x-tollgate-model"] == "gpt-4o"
    line = renv.access_line(rid)
    cost_4o = (int(line["input_tokens"]) * 2.5 + int(line["output_tokens"]) * 10) / 1e6
    # Spend past 50% on another model.
    while usage_view(renv)["thrifty"]["tph"]["used"] < 520:
        ask(renv, "llama", tenant="thrifty", headers={"x-fake-output-tokens": "150"})
    before = usage_view(renv)["thrifty"]
    rid, status, headers, _ = ask(renv, "smart", tenant="thrifty")
    assert status == 200
    assert headers["x-tollgate-model"] == "gpt-4o-mini", "past 50%: downgraded"
    [(server, entry)] = find(providers, rid)
    assert entry["body"]["model"] == "gpt-4o-mini"
    line = renv.access_line(rid)
    assert (line["model"], line["served_model"]) == ("smart", "gpt-4o-mini")
    # Priced at the served model's price: the USD budget moved by the gpt-4o-mini cost.
    after = usage_view(renv)["thrifty"]
    from decimal import Decimal
    moved = Decimal(after["usd"]["used"]) - Decimal(before["usd"]["used"])
    expected = (Decimal(line["input_tokens"]) * Decimal("0.15") + Decimal(line["output_tokens"]) * Decimal("0.60")) / 10**6
    assert moved == expected, (moved, expected, cost_4o)


@pytest.mark.parametrize("path,shape", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")])
def test_unknown_model_is_400_in_api_shape(renv, path, shape):
    rid, status, _, data = ask(renv, "gpt-9-ultra", path=path)
    assert status == 400
    body = json.loads(data)
    if shape == "openai":
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    else:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert renv.access_line(rid)["decision"] == "model_not_found"


def test_unknown_model_can_take_a_default_route(providers):
    proc = start(providers, config(unknown_model_route="selfhosted"))
    try:
        rid, status, headers, _ = ask(proc, "mistral-small")
        assert status == 200
        [(server, entry)] = find(providers, rid)
        assert server == "selfhosted" and entry["body"]["model"] == "mistral-small"
    finally:
        proc.stop()


def test_client_cannot_pick_the_cluster(renv, providers):
    rid, status, _, _ = ask(renv, "gpt-4o-mini", headers={"x-tollgate-route": "selfhosted",
                                                         "x-tollgate-model": "llama"})
    assert status == 200
    [(server, entry)] = find(providers, rid)
    assert server in ("openai-1", "openai-2")
    assert entry["headers"]["x-tollgate-route"] == "openai"
    # Not an LLM path: Tollgate does not touch it, and the route table ignores the header there.
    rid = str(uuid.uuid4())
    http("GET", renv.url + "/v1/models", None, {"x-tollgate-route": "selfhosted", "x-request-id": rid})
    assert all(e["id"] != rid for e in providers["selfhosted"].ledger())


def test_envoy_retry_to_another_host_is_settled_once(renv, providers):
    before = usage_view(renv)
    rids = []
    for _ in range(12):
        rid, status, _, data = ask(renv, "gpt-4o-mini", tenant="team",
                                   headers={"x-fake-status": "503", "x-fake-status-server": "openai-1"})
        assert status == 200, data
        rids.append(rid)
    retried = 0
    charged = 0
    for rid in rids:
        hits = find(providers, rid)
        served = [e for name, e in hits if e["status"] == 200]
        assert len(served) == 1 and served[0]["server"] == "openai-2"
        retried += len(hits) == 2
        line = renv.access_line(rid)
        assert line["usage_source"] == "reported"
        assert (int(line["input_tokens"]), int(line["output_tokens"])) == (served[0]["usage"]["input"],
                                                                            served[0]["usage"]["output"])
        charged += int(line["input_tokens"]) + int(line["output_tokens"])
    assert retried >= 3, "some requests hit openai-1 first and were retried"
    after = usage_view(renv)
    assert after["team"]["tph"]["used"] - before["team"]["tph"]["used"] == charged
    assert after["team"]["tph"]["reserved"] == 0
