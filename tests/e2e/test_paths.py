"""Path spellings (issue 10): every way of writing an LLM path is either read and charged as the
LLM call it is, or refused with a 404 in OpenAI's error shape. None reaches the upstream unmetered.

The shipped connection manager normalises the path before any filter runs (normalize_path,
merge_slashes, path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD), so Tollgate reads, the
route table matches and the upstream receives the same path. A path that is still not an LLM path
after that falls to the route table's `not-found` route. Requests go over raw sockets, because
urllib would normalise the paths itself.

The tenants: `team-a` may use gpt-4o-mini only; `spent` has used more than its 3,000 tokens.
Each spelling is sent without an API key, for a model outside the allow-list, by the spent tenant,
and as an admissible request. A spelling that is read must give exactly what the real path gives
(401, 403, 429, or 200 charged against the budget); one that is refused must leave no trace in
the ledger or the budgets and never reach the fake upstream (its ledger and Envoy's upstream_host
say so). Windows are 365-day windows ("31536000s"), so none resets during the test.
"""
import hashlib
import json
import socket
import uuid

import pytest

from harness import Envoy, FakeUpstream, http, raw_post

KEY_A, KEY_SPENT = "sk-paths-team-a", "sk-paths-spent"
ADMIN = "paths-admin"
VIEW = "/tollgate/usage"
CANONICAL = "/v1/chat/completions"
WINDOW = "31536000s"
NOT_FOUND = {"error": {"message": "Not found.", "type": "invalid_request_error", "param": None,
                       "code": "not_found"}}

# Spellings Envoy 1.40 normalises into an LLM path: (as sent, as forwarded, logged and charged).
READ = [
    ("/v1/chat/complet%69ons", CANONICAL),
    ("/v1/chat%2Fcompletions", CANONICAL),
    ("/v1/chat%2fcompletions", CANONICAL),
    ("/v1/%63hat/completions", CANONICAL),
    ("/v1/%63hat/complet%69ons", CANONICAL),
    ("//v1//chat/completions", CANONICAL),
    ("/v1/./chat/completions", CANONICAL),
    ("/v1/%2e/chat/completions", CANONICAL),
    ("/v1/%2E%2E/v1/chat/completions", CANONICAL),
    ("/v1/chat%5Ccompletions", CANONICAL),
    ("/v1/chat/completions/", "/v1/chat/completions/"),
    ("/v1/chat/completions?api-version=1&x=%2F", "/v1/chat/completions?api-version=1&x=%2F"),
]
# Spellings that are not an LLM path after normalisation: refused by the route table.
REFUSED = [
    "/V1/Chat/Completions",
    "/v1/chat/COMPLETIONS",
    "/v1/chat/completions;x=1",
    "/v1/chat;x=1/completions",
    "/v1/chat%252Fcompletions",
    "/v1/chat/completions%3F",
    "/v1/chat/completions%20",
]
SCENARIOS = ["no_key", "forbidden_model", "over_budget", "admitted"]


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def plugin_config(routed):
    config = {
        "identity": {"source": "api_key", "api_keys": [
            {"sha256": sha256(KEY_A), "tenant": "team-a"},
            {"sha256": sha256(KEY_SPENT), "tenant": "spent"},
        ]},
        "tenant_defaults": {
            "limits": [{"name": "tokens", "tokens": 3000, "window": WINDOW}],
            "models": ["gpt-4o-mini"],
        },
        "tenants": {"team-a": {}, "spent": {}},
        "usage_view": {"path": VIEW, "admin_token_sha256": sha256(ADMIN)},
    }
    if routed:
        config["routing"] = {"models": {"gpt-4o-mini": {"route": "openai"}, "gpt-4o": {"route": "openai"},
                                        "claude-3-5-haiku": {"route": "anthropic"}}}
    return config


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream("paths")
    yield up
    up.stop()


# With `routing`, admitted requests take the header routes; without it, `openai-default`.
@pytest.fixture(scope="module", params=["routed", "unrouted"])
def penv(request, upstream):
    proc = Envoy(plugin_config(request.param == "routed"), upstream.port)
    # Spend the `spent` tenant's budget on the real path: the upstream reports 3,500 input tokens
    # (reported usage is bounded by the request: output by max_tokens, input by the body's bytes).
    result = send(proc, upstream, CANONICAL, "admitted", key=KEY_SPENT,
                  extra={"x-fake-input-tokens": "3500"}, content="x" * 3600)
    assert result["status"] == 200, result
    assert usage(proc)["spent"]["used"] > 3000
    yield proc
    proc.stop()
    assert "panicked" not in proc.log()


def usage(envoy):
    status, _, data = http("GET", envoy.url + VIEW, None, {"authorization": f"Bearer {ADMIN}"})
    assert status == 200, data
    return {t["tenant"]: {k: t["limits"][0][k] for k in ("used", "reserved")}
            for t in json.loads(data)["tenants"]}


def send(envoy, upstream, path, scenario, key=None, extra=None, method="POST", content="hi"):
    """One request over a raw socket; its status, JSON body, access-log line and the fake
    upstream's ledger entries for it."""
    model = "gpt-4o" if scenario == "forbidden_model" else "gpt-4o-mini"
    if key is None:
        key = {"no_key": None, "over_budget": KEY_SPENT}.get(scenario, KEY_A)
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-request-id": rid, "x-fake-request-id": rid}
    if key:
        headers["authorization"] = f"Bearer {key}"
    headers.update(extra or {})
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
    if method == "POST":
        head, data = raw_post(envoy.port, path, headers, body)
    else:
        head, data = raw_request(envoy.port, method, path, headers)
    status_line, *header_lines = head.split("\r\n")
    resp_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        resp_headers[name.strip().lower()] = value.strip()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return {
        "path": path, "status": int(status_line.split()[1]), "headers": resp_headers, "body": parsed,
        "line": envoy.access_line(rid),
        "served": [e for e in upstream.ledger() if e["id"] == rid],
    }


def raw_request(port, method, path, headers):
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\n{lines}connection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(), rest


def empty(value):
    return value in (None, "", "-")


def reached_upstream(result):
    return bool(result["served"]) or not empty(result["line"].get("upstream_host"))


def check_never_unmetered(result):
    """The invariant: whatever reached the upstream was read (tenant) and admitted (decision)."""
    if reached_upstream(result):
        line = result["line"]
        assert not empty(line.get("tenant")) and line.get("decision") == "admitted", (
            f"{result['path']} reached the upstream unmetered: {line}")


def outcome(result):
    body = result["body"] if isinstance(result["body"], dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    line = result["line"]
    fields = [line.get(k) for k in ("tenant", "decision", "api", "model")]
    return (result["status"], error.get("code"), *(None if empty(f) else f for f in fields))


@pytest.fixture(scope="module")
def canonical(penv, upstream):
    """What the real path gives in each scenario."""
    return {s: outcome(send(penv, upstream, CANONICAL, s)) for s in SCENARIOS}


def test_the_real_path_is_read_in_every_scenario(penv, upstream, canonical):
    assert canonical["no_key"][:4] == (401, "invalid_api_key", None, "unauthenticated")
    assert canonical["forbidden_model"][:4] == (403, "model_not_allowed", "team-a", "model_not_allowed")
    assert canonical["over_budget"][:4] == (429, "rate_limit_exceeded", "spent", "rate_limited")
    assert canonical["admitted"][:4] == (200, None, "team-a", "admitted")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("path,forwarded", READ, ids=[p for p, _ in READ])
def test_spelling_is_read_and_charged_like_the_real_path(penv, upstream, canonical, path, forwarded,
                                                        scenario):
    before = usage(penv)
    result = send(penv, upstream, path, scenario)
    check_never_unmetered(result)
    line = result["line"]
    assert outcome(result) == canonical[scenario], (path, result["body"], line)
    # Tollgate read, and the access log records, the path the upstream received.
    assert line["path"] == forwarded
    after = usage(penv)
    if scenario != "admitted":
        assert not reached_upstream(result) and after == before
        return
    (entry,) = result["served"]
    assert entry["path"] == forwarded
    charged = int(line["input_tokens"]) + int(line["output_tokens"])
    assert charged == entry["usage"]["input"] + entry["usage"]["output"] > 0
    assert after["team-a"]["used"] - before["team-a"]["used"] == charged
    assert after["team-a"]["reserved"] == 0


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("path", REFUSED)
def test_spelling_that_is_not_an_llm_path_is_refused(penv, upstream, path, scenario):
    before = usage(penv)
    result = send(penv, upstream, path, scenario)
    check_never_unmetered(result)
    assert (result["status"], result["body"]) == (404, NOT_FOUND), result
    assert result["headers"]["content-type"] == "application/json"
    line = result["line"]
    assert not reached_upstream(result), line
    assert empty(line.get("tenant")) and empty(line.get("decision")), line
    assert usage(penv) == before


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("path", [CANONICAL, "/v1/chat/complet%69ons", "/v1/models", "/ledger"])
def test_other_methods_and_paths_never_reach_the_upstream(penv, upstream, method, path):
    result = send(penv, upstream, path, "admitted", method=method)
    assert (result["status"], result["body"]) == (404, NOT_FOUND), result
    assert not reached_upstream(result), result["line"]
    assert empty(result["line"].get("tenant")) and empty(result["line"].get("decision"))


def test_anthropic_spelling_is_read_as_messages(penv, upstream):
    """An encoded Messages path is read as Messages: Anthropic's error shape, the allow-list."""
    rid = str(uuid.uuid4())
    body = {"model": "claude-3-5-haiku", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    head, data = raw_post(penv.port, "/v1/messag%65s", {
        "content-type": "application/json", "x-api-key": KEY_A, "anthropic-version": "2023-06-01",
        "x-request-id": rid, "x-fake-request-id": rid}, body)
    assert head.startswith("HTTP/1.1 403 ")
    error = json.loads(data)
    assert error["type"] == "error" and error["error"]["type"] == "permission_error"
    line = penv.access_line(rid)
    assert (line["path"], line["api"], line["tenant"], line["decision"]) == (
        "/v1/messages", "messages", "team-a", "model_not_allowed")
    assert not any(e["id"] == rid for e in upstream.ledger())


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "HEAD"])
def test_usage_view_answers_get_only(penv, method):
    """The usage view is read-only: other methods get 405 with `allow: GET`, with or without the
    admin token, and change nothing."""
    before = usage(penv)
    for headers in ({"authorization": f"Bearer {ADMIN}"}, {}):
        rid = str(uuid.uuid4())
        status, resp_headers, data = http(method, penv.url + VIEW, b"{}" if method in ("POST", "PUT") else None,
                                          {**headers, "x-request-id": rid})
        assert status == 405, data
        assert resp_headers["allow"] == "GET"
        if method != "HEAD":
            assert resp_headers["content-type"] == "application/json"
            error = json.loads(data)["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")
        line = penv.access_line(rid)
        assert line["decision"] == "method_not_allowed" and not reached_upstream(
            {"served": [], "line": line})
    assert usage(penv) == before
    # GET still answers, with the token only.
    assert http("GET", penv.url + VIEW, None, {})[0] == 401
