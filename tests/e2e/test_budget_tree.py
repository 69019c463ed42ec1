"""Budget trees through the real Envoy (two workers): org → team → key, each level refusing in
turn with `refused_by` in the ledger and the SDK's own error; concurrent requests of two keys
under one strict team settled exactly once at every level (ledger = usage view = gauges); a
shadow limit that never refuses but says so."""
import concurrent.futures
import hashlib
from http.client import HTTPException
import json
import re
import socket
import time
import uuid

import openai
import pytest

from harness import Envoy, http

ADMIN_TOKEN = "tree-view"
CHAT = "/v1/chat/completions"
CONTENT = "x" * 1000  # a body of about 1,080 bytes: input up to its bytes, a reservation of ~310


def tree_config():
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenant_defaults": {"default_output_tokens": 64},
        "tenants": {
            "org": {"limits": [{"name": "tpd", "tokens": 3300, "window": "day"},
                               {"name": "usd", "usd": "10.00", "window": "month"}]},
            "team": {"parent": "org", "limits": [{"name": "tpd", "tokens": 2300, "window": "day"}]},
            "team-a": {"parent": "team", "limits": [{"name": "tpd", "tokens": 1300, "window": "day"}]},
            "team-c": {"parent": "team", "limits": []},
            "team-b": {"parent": "org", "limits": []},
            # A strict team of its own, for the concurrent run.
            "lab": {"strict": True, "limits": [{"name": "tpd", "tokens": 30000, "window": "day"}]},
            "lab-1": {"parent": "lab", "limits": []},
            "lab-2": {"parent": "lab", "limits": [{"name": "tpd", "tokens": 12000, "window": "day"}]},
            # Chaos at every level: aborts, resets and errors under a three-level tree.
            "chaos-org": {"limits": [{"name": "tpd", "tokens": 10000000, "window": "day"}]},
            "chaos-team": {"parent": "chaos-org",
                           "limits": [{"name": "tpd", "tokens": 5000000, "window": "day"}]},
            "chaos-key": {"parent": "chaos-team",
                          "limits": [{"name": "tpd", "tokens": 1000000, "window": "day"}]},
            "chaos-sib": {"parent": "chaos-team", "limits": []},
            # Alerts at half and 80 % of its day.
            "alerted": {"limits": [{"name": "tpd", "tokens": 10000, "window": "day",
                                    "alert_at": [0.5, 0.8]}]},
            # A budget rolled out in shadow first.
            "shadowed": {"limits": [{"name": "tpd", "tokens": 100000, "window": "day"},
                                    {"name": "tpd-next", "tokens": 1200, "window": "day",
                                     "mode": "shadow"}]},
        },
        "prices": {"*": {"input": "1.00", "output": "2.00"}},
        "usage_view": {"path": "/tollgate/usage",
                       "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }


@pytest.fixture(scope="module")
def tenv(upstream):
    proc = Envoy(tree_config(), upstream.port)
    yield proc
    proc.stop()


def view(envoy):
    status, _, data = http("GET", envoy.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, data
    return {t["tenant"]: t for t in json.loads(data)["tenants"]}


def used(envoy, tenant, limit="tpd"):
    entry = next(l for l in view(envoy)[tenant]["limits"] if l["name"] == limit)
    return entry["used"], entry["reserved"]


def chat(envoy, tenant, usage=(1000, 40), max_tokens=40):
    rid = str(uuid.uuid4())
    body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": CONTENT}]}
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": str(usage[0]),
               "x-fake-output-tokens": str(usage[1])}
    status, _, data = http("POST", envoy.url + CHAT, body, headers)
    return rid, status, data


def gauge(text, tenant, limit):
    """The value of `tollgate_budget_used{tenant,limit}` in a /stats/prometheus text."""
    for line in text.splitlines():
        m = re.match(r"^tollgate_budget_used\{(.*)\} (\d+)$", line)
        if m and f'tenant="{tenant}"' in m.group(1) and f'limit="{limit}"' in m.group(1):
            return int(m.group(2))
    return None


def test_each_level_refuses_in_turn_naming_itself(tenv):
    # team-a spends 1,040 of its own 1,300: charged at every level.
    _, status, _ = chat(tenv, "team-a")
    assert status == 200
    assert [used(tenv, t)[0] for t in ("team-a", "team", "org")] == [1040, 1040, 1040]
    # Its own limit refuses it next.
    rid, status, data = chat(tenv, "team-a")
    assert status == 429, data
    assert tenv.access_line(rid)["refused_by"] == "team-a/tpd"
    # team-c has no limit of its own: the team's refuses it once spent.
    assert chat(tenv, "team-c")[1] == 200
    rid, status, data = chat(tenv, "team-c")
    assert status == 429, data
    line = tenv.access_line(rid)
    assert (line["decision"], line["refused_by"]) == ("rate_limited", "team/tpd")
    assert "of 'team'" in json.loads(data)["error"]["message"]
    # team-b sits under org: the org's limit refuses it, and the SDK raises its own error.
    assert chat(tenv, "team-b")[1] == 200
    client = openai.OpenAI(base_url=tenv.url + "/v1", api_key="unused", max_retries=0,
                           default_headers={"x-tenant": "team-b"})
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=40,
                                       messages=[{"role": "user", "content": CONTENT}])
    assert "of 'org'" in info.value.message
    # Every level holds exactly what its requests were charged, nothing reserved.
    assert [used(tenv, t) for t in ("team-a", "team", "org")] == [(1040, 0), (2080, 0), (3120, 0)]
    # The view shows the tree, each level with its own limits only.
    v = view(tenv)
    assert v["team-a"]["parent"] == "team" and "parent" not in v["org"]
    assert v["org"]["children"] == ["team", "team-b"] and v["team"]["children"] == ["team-a", "team-c"]
    assert [l["name"] for l in v["team-a"]["limits"]] == ["tpd"]
    # Each level's gauge, under its own label (one settlement per worker sets it).
    text = tenv.prometheus()
    assert gauge(text, "org", "tpd") == 3120
    assert gauge(text, "team", "tpd") == 2080
    assert gauge(text, "team-a", "tpd") == 1040


def test_concurrent_keys_of_a_strict_team_are_exact_at_every_level(tenv, upstream):
    """Two keys under one strict team, 60 requests at once over both workers: no level goes
    over its limit, and each level's use is the sum of its requests' ledger lines."""
    def one(i):
        tenant = "lab-1" if i % 2 else "lab-2"
        rid, status, _ = chat(tenv, tenant, usage=(900, 500), max_tokens=500)
        return tenant, rid, status

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(60)))
    statuses = {s for _, _, s in results}
    assert statuses <= {200, 429} and 200 in statuses and 429 in statuses
    charged = {"lab-1": 0, "lab-2": 0}
    for tenant, rid, status in results:
        line = tenv.access_line(rid)
        if status == 200:
            charged[tenant] += int(line["input_tokens"]) + int(line["output_tokens"])
        else:
            assert line["refused_by"] in ("lab/tpd", "lab-2/tpd")
    assert used(tenv, "lab-2") == (charged["lab-2"], 0)
    assert used(tenv, "lab") == (charged["lab-1"] + charged["lab-2"], 0)
    # Strict mode at the team's level: no level was charged past its limit.
    assert used(tenv, "lab")[0] <= 30000 and used(tenv, "lab-2")[0] <= 12000


def test_a_shadow_limit_reports_what_it_would_refuse_and_never_refuses(tenv):
    rids = []
    for _ in range(3):
        rid, status, data = chat(tenv, "shadowed")
        assert status == 200, data
        rids.append(rid)
    lines = [tenv.access_line(rid) for rid in rids]
    assert lines[0]["shadow_refusal"] is None
    assert [l["shadow_refusal"] for l in lines[1:]] == ["shadowed/tpd-next"] * 2
    assert all(l["decision"] == "admitted" and l["refused_by"] is None for l in lines)
    assert used(tenv, "shadowed", "tpd-next") == (3120, 0)
    text = tenv.prometheus()
    m = re.search(r'^tollgate_shadow_refusals\{[^}]*tenant="shadowed"[^}]*\} (\d+)$', text, re.M)
    assert m and int(m.group(1)) == 2, text[-2000:]


def test_budget_alerts_are_counted_once_per_threshold_under_concurrency(tenv):
    """50 requests at once over both workers: each threshold is counted once."""
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: chat(tenv, "alerted")[1], range(50)))
    assert 200 in statuses and 429 in statuses
    text = tenv.prometheus()
    counts = {}
    for line in text.splitlines():
        m = re.match(r'^tollgate_budget_alerts\{(.*)\} (\d+)$', line)
        if m and 'tenant="alerted"' in m.group(1):
            threshold = re.search(r'threshold="([^"]+)"', m.group(1)).group(1)
            counts[threshold] = int(m.group(2))
    assert counts == {"50": 1, "80": 1}, counts


CHAOS = ("json", "sse", "client-abort", "upstream-reset", "upstream-500", "json-cut")


def chaos_request(envoy, tenant, mode):
    """One request of `mode`; returns its client request id once it has ended (or was cut)."""
    rid = str(uuid.uuid4())
    stream = mode in ("sse", "client-abort", "upstream-reset")
    body = {"model": "gpt-4o-mini", "max_tokens": 200, "stream": stream,
            "messages": [{"role": "user", "content": CONTENT}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"content-type": "application/json", "x-tenant": tenant, "x-request-id": rid,
               "x-fake-request-id": rid, "x-fake-input-tokens": "900",
               "x-fake-output-tokens": "150"}
    headers.update({
        "upstream-reset": {"x-fake-reset-after": "3"},
        "upstream-500": {"x-fake-status": "500"},
        "json-cut": {"x-fake-reset-before-end": "5"},
        "client-abort": {"x-fake-chunks": "400", "x-fake-split": "7"},
    }.get(mode, {}))
    if mode != "client-abort":
        try:
            http("POST", envoy.url + CHAT, body, headers)
        except (OSError, HTTPException):
            pass  # a reset reaches the client as a cut connection (or a cut chunked body)
        return rid
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\n{head}content-length: {len(data)}\r\n\r\n"
                 .encode() + data)
    received = b""
    while received.count(b"data: ") < 5:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    sock.close()  # the client walks away mid-stream
    return rid


def test_chaos_settles_every_level_exactly_once_ledger_view_and_gauges_agree(tenv):
    """48 requests under a three-level tree (two keys of one team) over both workers: client
    aborts mid-stream, upstream resets mid-stream and mid-body, upstream errors. Afterwards no
    level holds a reservation, each level's use is the sum of its requests' ledger lines, and
    each level's gauge says the same."""
    jobs = [("chaos-key" if i % 2 else "chaos-sib", CHAOS[i % len(CHAOS)]) for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        rids = list(pool.map(lambda job: (job[0], chaos_request(tenv, *job)), jobs))
    # One last plain request settles last at every level, so each gauge is the final use.
    rids.append(("chaos-key", chaos_request(tenv, "chaos-key", "json")))
    charged = {"chaos-key": 0, "chaos-sib": 0}
    sources = set()
    for tenant, rid in rids:
        line = tenv.access_line(rid, timeout=20)
        sources.add(line.get("usage_source"))
        assert line["tenant"] == tenant and line["decision"] == "admitted", line
        values = (str(line.get(f, "")) for f in ("input_tokens", "output_tokens"))
        charged[tenant] += sum(int(v) for v in values if v.isdigit())
    # Settled from what was reported, what passed, and the reservation of what had no usage.
    assert {"reported", "observed", "refunded"} <= sources, sources
    deadline = time.time() + 10
    while time.time() < deadline and any(used(tenv, t)[1] for t in ("chaos-org", "chaos-team")):
        time.sleep(0.1)
    total = charged["chaos-key"] + charged["chaos-sib"]
    assert used(tenv, "chaos-key") == (charged["chaos-key"], 0)
    assert used(tenv, "chaos-team") == (total, 0)
    assert used(tenv, "chaos-org") == (total, 0)
    prom = tenv.prometheus()
    for tenant, value in (("chaos-key", charged["chaos-key"]), ("chaos-team", total),
                          ("chaos-org", total)):
        assert gauge(prom, tenant, "tpd") == value
