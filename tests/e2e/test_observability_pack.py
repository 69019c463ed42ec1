"""The observability pack in examples/observability/: the Prometheus config and rules pass promtool
(and the rules' own unit tests), every metric the alerts and the dashboard query is one the filter
or Envoy really exports (the contract below), and a live Envoy running the shipped config serves
every tenant-labelled family the dashboard uses, with its labels."""
import json
import os
import re
import shutil
import subprocess
import time
import uuid

import pytest
import yaml

from conftest import KEYS, api_key_config
from harness import ROOT, Envoy, http

PACK = os.path.join(ROOT, "examples", "observability")

# ---------------------------------------------------------------------------------------------
# The contract: metric families as Envoy's /stats/prometheus serves them. Envoy strips the
# `wasmcustom` stat namespace of Wasm metrics, so `wasmcustom.tollgate.tenant.<t>.model.<m>.requests`
# is served as `tollgate_requests{tenant="<t>",model="<m>"}` (labels from the stats_tags of
# envoy/tollgate.yaml). Label values: `.` → `_`; `_other` past the label caps; `_unknown` for the
# tenant of a request refused before it had one.
# ---------------------------------------------------------------------------------------------
TENANT_MODEL_COUNTERS = {
    "tollgate_requests",
    "tollgate_input_tokens",
    "tollgate_output_tokens",
    "tollgate_cached_input_tokens",
    "tollgate_cache_write_input_tokens",
    "tollgate_cost_micro_usd",
    "tollgate_cache_hits",
    "tollgate_cache_misses",
    "tollgate_cache_saved_tokens",
    "tollgate_cache_saved_micro_usd",
}
TENANT_REASON_COUNTERS = {"tollgate_denials"}
DENIAL_REASONS = {"unauthenticated", "bad_request", "model_not_found", "too_large",
                  "model_not_allowed", "rate_limited", "quota_exceeded",
                  "internal"}  # 500: the gateway could not rewrite a request body
TENANT_GAUGES = {"tollgate_in_flight"}
TENANT_HISTOGRAMS = {
    "tollgate_tokens_per_request",
    "tollgate_cost_micro_usd_per_request",
    "tollgate_time_to_first_token_ms",
}
GLOBAL_METRICS = {
    "tollgate_cache_entries",
    "tollgate_cache_bytes",
    "tollgate_cache_stores",
    "tollgate_cache_evictions",
}
# Envoy built-ins the pack uses (cluster stats; histogram in milliseconds).
ENVOY_BUILTINS = {
    "envoy_cluster_upstream_rq_time": {"envoy_cluster_name"},
    "envoy_cluster_upstream_rq_xx": {"envoy_cluster_name", "envoy_response_code_class"},
    "envoy_cluster_upstream_rq_total": {"envoy_cluster_name"},
}
HISTOGRAMS = TENANT_HISTOGRAMS | {"envoy_cluster_upstream_rq_time"}
# Budget alerts, budget-tree gauges and conversations (docs/budgets.md).
LIMIT_METRICS = {
    "tollgate_budget_alerts": {"tenant", "limit", "threshold"},
    "tollgate_budget_used": {"tenant", "limit"},
    "tollgate_conversations_started": {"tenant"},
    "tollgate_conversations_over": {"tenant", "threshold"},
}

FAMILY_LABELS = {
    **{m: {"tenant", "model"} for m in TENANT_MODEL_COUNTERS},
    **{m: {"tenant", "reason"} for m in TENANT_REASON_COUNTERS},
    **{m: {"tenant"} for m in TENANT_GAUGES | TENANT_HISTOGRAMS},
    **{m: set() for m in GLOBAL_METRICS},
    **ENVOY_BUILTINS,
    **LIMIT_METRICS,
}
CONTRACT = set(FAMILY_LABELS)
# Labels Prometheus adds to every series (static job, and the Kubernetes example's relabelling).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "app"}

IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
SUFFIX = re.compile(r"_(bucket|sum|count)$")

# Grafana's variables, replaced to give plain PromQL.
GRAFANA_VARS = [("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
                ("${tenant}", ".*"), ("$tenant", ".*"), ("${model}", ".*"), ("$model", ".*")]


def grafana_to_promql(expr):
    for var, value in GRAFANA_VARS:
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr):
    """Metric names (as written: with _bucket etc.) and recording-rule names an expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)   # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)              # label matchers
    expr = GROUPING.sub("", expr)                      # by (...), on (...), …
    expr = re.sub(r"\[[^\]]*\]", "", expr)             # range selectors
    names = set()
    for ident in IDENT.findall(expr):
        if ":" in ident or ident.startswith(("tollgate_", "envoy_")):
            names.add(ident)
    return names


def family(name):
    return SUFFIX.sub("", name) if SUFFIX.sub("", name) in HISTOGRAMS else name


def load_yaml(name):
    with open(os.path.join(PACK, name), encoding="utf-8") as f:
        return f.read()


def rules():
    return [r for g in yaml.safe_load(load_yaml("alerts.yml"))["groups"] for r in g["rules"]]


def dashboard():
    with open(os.path.join(PACK, "grafana-dashboard.json"), encoding="utf-8") as f:
        return json.load(f)


def dashboard_panels(dash):
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dash):
    return [(p["title"], t["expr"]) for p in dashboard_panels(dash) for t in p.get("targets", [])
            if t.get("expr")]


def variable_queries(dash):
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((v["name"], q))
    return out


def check_expr_names(where, expr, recorded):
    """Every metric an expression reads is in the contract, with labels the family has."""
    for name in metric_names(expr):
        if ":" in name:
            assert name in recorded, f"{where}: recording rule {name} is not defined in alerts.yml"
            continue
        fam = family(name)
        assert fam in CONTRACT, f"{where}: {name} is not a documented metric ({expr})"
        if name != fam:
            assert fam in HISTOGRAMS, name
    for name, matchers in SELECTOR.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        fam = family(name)
        if fam not in CONTRACT:
            continue
        allowed = FAMILY_LABELS[fam] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        for label in MATCHER.findall(matchers):
            assert label in allowed, f"{where}: {name} has no label {label!r}"


# ---------------------------------------------------------------------------------------------
# promtool
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: install Debian's `prometheus` package")
        pytest.skip("promtool not installed (Debian package `prometheus`); CI requires it")
    return path


def run_promtool(promtool, *args, cwd=PACK):
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_check_rules(promtool):
    out = run_promtool(promtool, "check", "rules", "alerts.yml")
    assert "SUCCESS" in out


def test_promtool_check_config(promtool):
    out = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_promtool_unit_tests_of_the_rules(promtool):
    # Alerts fire (and stay quiet) on synthetic series shaped like Envoy's.
    out = run_promtool(promtool, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    # promtool has no expression checker: each query becomes a recording rule.
    dash = dashboard()
    exprs = [grafana_to_promql(e) for _, e in dashboard_exprs(dash)]
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                            for i, e in enumerate(exprs)]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    out = run_promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in out


def kubernetes_example():
    """prometheus.yml with its commented Kubernetes example uncommented."""
    out, inside = [], False
    for line in load_yaml("prometheus.yml").splitlines():
        if "--- BEGIN kubernetes example ---" in line:
            inside = True
        elif "--- END kubernetes example ---" in line:
            inside = False
        else:
            out.append(re.sub(r"^  # ", "  ", line) if inside else line)
    return yaml.safe_load("\n".join(out))


def test_kubernetes_scrape_example_is_valid(promtool, tmp_path):
    cfg = kubernetes_example()
    job = next(j for j in cfg["scrape_configs"] if j.get("kubernetes_sd_configs"))
    assert job["metrics_path"] == "/stats/prometheus"
    relabel = job["relabel_configs"]
    assert any(r.get("replacement") == "$1:15020" and r.get("target_label") == "__address__" for r in relabel)
    targets = {r.get("target_label") for r in relabel}
    assert {"namespace", "pod"} <= targets, "prometheus-adapter needs namespace and pod labels"
    # Debian's promtool is built without Kubernetes service discovery: check everything else.
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["10.0.0.1:15020"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(os.path.join(PACK, "alerts.yml"), tmp_path / "alerts.yml")
    run_promtool(promtool, "check", "config", str(tmp_path / "prometheus.yml"), cwd=tmp_path)


# ---------------------------------------------------------------------------------------------
# Static checks (no promtool needed)
# ---------------------------------------------------------------------------------------------


def test_scrape_config_targets_envoy_admin():
    cfg = yaml.safe_load(load_yaml("prometheus.yml"))
    assert cfg["rule_files"] == ["alerts.yml"]
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/stats/prometheus"
    assert job["static_configs"][0]["targets"] == ["envoy:9901"]


def test_scrape_configs_keep_every_metric_the_pack_uses():
    used = set()
    for r in rules():
        used |= {n for n in metric_names(r["expr"]) if ":" not in n}
    for _, e in dashboard_exprs(dashboard()):
        used |= metric_names(e)
    jobs = yaml.safe_load(load_yaml("prometheus.yml"))["scrape_configs"] + [
        j for j in kubernetes_example()["scrape_configs"] if j.get("kubernetes_sd_configs")]
    for job in jobs:
        for rc in job.get("metric_relabel_configs", []):
            if rc.get("action") == "keep" and rc.get("source_labels") == ["__name__"]:
                keep = re.compile(rf"^(?:{rc['regex']})$")
                dropped = sorted(n for n in used if not keep.match(n))
                assert not dropped, f"{job['job_name']} drops {dropped}"


def test_alerts_use_only_documented_metrics():
    all_rules = rules()
    recorded = {r["record"] for r in all_rules if "record" in r}
    used = set()
    for r in all_rules:
        check_expr_names(r.get("alert") or r.get("record"), r["expr"], recorded)
        used |= {family(n) for n in metric_names(r["expr"]) if ":" not in n}
    # Reasons named in matchers are real reasons.
    for r in all_rules:
        for m in re.finditer(r'reason\s*(?:=~|!~|!=|=)\s*"([^"]*)"', r["expr"]):
            assert set(m.group(1).split("|")) <= DENIAL_REASONS, m.group(0)
    assert {"tollgate_cost_micro_usd", "tollgate_cost_micro_usd_per_request", "tollgate_denials",
            "tollgate_requests", "tollgate_in_flight"} <= used


def test_every_alert_is_complete():
    alerts = [r for r in rules() if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for a in alerts:
        assert "for" in a, a["alert"]
        assert a["labels"]["severity"] in {"info", "warning", "critical"}, a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
    assert {"TollgateDailySpendHigh", "TollgateCostPerRequestP95High", "TollgateDenialRateHigh",
            "TollgateTenantAtBudget", "TollgateInFlightHigh"} <= set(names)


def test_dashboard_uses_only_documented_metrics():
    dash = dashboard()
    recorded = set()  # the dashboard must work without the recording rules
    used = set()
    for title, expr in dashboard_exprs(dash):
        check_expr_names(title, grafana_to_promql(expr), recorded)
        used |= {family(n) for n in metric_names(expr)}
    for name, query in variable_queries(dash):
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert m, f"variable {name}: {query}"
        check_expr_names(f"variable {name}", grafana_to_promql(m.group(1)), recorded)
        assert m.group(2) in FAMILY_LABELS[family(metric_names(m.group(1)).pop())]
    # The panels the pack promises.
    assert {"tollgate_input_tokens", "tollgate_output_tokens", "tollgate_cost_micro_usd",
            "tollgate_cache_hits", "tollgate_cache_misses", "tollgate_denials", "tollgate_in_flight",
            "tollgate_time_to_first_token_ms", "tollgate_cost_micro_usd_per_request"} <= used


def test_dashboard_shape():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dict(variable_queries(dash))["tenant"] == "label_values(tollgate_requests, tenant)"
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"], p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for words in ("tokens / s", "cost per hour", "top tenants by cost", "cache hit ratio",
                  "denials by reason", "in flight by tenant", "p95 time to first token",
                  "p95 cost per request"):
        assert words in titles, words


def test_hpa_scales_on_the_adapter_metric():
    docs = [d for d in yaml.safe_load_all(load_yaml("hpa.yaml")) if d]
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "tollgate_in_flight"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    adapter = next(d for d in docs if d["kind"] == "ConfigMap")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == "tollgate_in_flight"
    assert metric_names(rule["seriesQuery"]) == {"tollgate_in_flight"}
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)" == rule["metricsQuery"]


def test_readme_covers_the_pack_and_gen_ai_mapping():
    text = load_yaml("README.md")
    for name in ("prometheus.yml", "alerts.yml", "alerts_test.yml", "grafana-dashboard.json", "hpa.yaml"):
        assert name in text, name
    for term in ("gen_ai.client.token.usage", "gen_ai.token.type", "gen_ai.server.time_to_first_token",
                 "gen_ai.request.model", "gen_ai.response.model", "gen_ai.client.operation.duration"):
        assert term in text, term


# ---------------------------------------------------------------------------------------------
# Live: the real Envoy with the shipped config serves what the dashboard queries.
# ---------------------------------------------------------------------------------------------

PRICES = {
    "gpt-4o-mini": {"input": "0.15", "output": "0.60", "cached_input": "0.075"},
    "claude-3-5-haiku": {"input": "0.80", "output": "4.00", "cached_input": "0.08", "cache_write_input": "1.00"},
}
ROUTING = {"models": {"gpt-4o-mini": {"route": "openai"}, "claude-3-5-haiku": {"route": "anthropic"}}}
# The plugin's response-cache section (the shape of the shipped cache configuration).
CACHE = {"cache": {"max_entries": 256, "ttl_seconds": 300}}


def parse_prometheus(text):
    """[(name, {label: value}, value)] of every sample."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if m:
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def dashboard_families():
    fams = set()
    for _, e in dashboard_exprs(dashboard()):
        fams |= {family(n) for n in metric_names(e)}
    return fams


# Some tests have the upstream report more input tokens than a short body holds; Tollgate
# bounds reported input by the body's bytes (README, Limits and guarantees): prompts are padded.
PAD = " lorem ipsum dolor sit amet" * 24


def chat(env, key, model="gpt-4o-mini", stream=False, knobs=None, body_extra=None):
    rid = str(uuid.uuid4())
    body = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "Hello there" + PAD}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    body.update(body_extra or {})
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}",
               "x-request-id": rid, "x-fake-request-id": rid, **(knobs or {})}
    return http("POST", env.url + "/v1/chat/completions", body, headers)


def messages(env, key, knobs=None):
    body = {"model": "claude-3-5-haiku", "max_tokens": 32, "messages": [{"role": "user", "content": "Hi" + PAD}]}
    headers = {"content-type": "application/json", "x-api-key": key, "anthropic-version": "2023-06-01",
               **(knobs or {})}
    return http("POST", env.url + "/v1/messages", body, headers)


def wait_for_series(env, wanted, timeout=15.0):
    """Polls /stats/prometheus until every (name, required labels) in `wanted` has a sample;
    histograms reach the admin endpoint on the stats flush (5 s). Returns the samples and what
    is still missing."""
    deadline = time.time() + timeout
    while True:
        samples = parse_prometheus(env.prometheus())
        missing = [(name, need) for name, need in wanted
                   if not any(n == name and all(labels.get(k) == v if v else k in labels
                                                for k, v in need.items())
                              for n, labels, _ in samples)]
        if not missing or time.time() > deadline:
            return samples, missing
        time.sleep(0.5)


def expected_series(families, tenant):
    wanted = []
    for fam in sorted(families):
        need = {k: None for k in FAMILY_LABELS[fam]}
        if "tenant" in need:
            need["tenant"] = tenant
        name = fam + "_bucket" if fam in HISTOGRAMS else fam
        if fam in HISTOGRAMS:
            need["le"] = None
        wanted.append((name, need))
    return wanted


@pytest.fixture(scope="module")
def live(upstream):
    env = Envoy(api_key_config(prices=PRICES, routing=ROUTING), upstream.port)
    try:
        assert chat(env, KEYS["team-a"], knobs={"x-fake-input-tokens": "300", "x-fake-cached-tokens": "100",
                                                "x-fake-output-tokens": "40"})[0] == 200
        assert chat(env, KEYS["team-a"], stream=True, knobs={"x-fake-chunks": "4"})[0] == 200
        assert messages(env, KEYS["team-b"], knobs={"x-fake-input-tokens": "200", "x-fake-cached-tokens": "50",
                                                    "x-fake-cache-write-tokens": "30"})[0] == 200
        assert chat(env, "sk-not-a-key")[0] == 401
        assert chat(env, KEYS["team-a"], model="no-such-model")[0] == 400
        yield env
    finally:
        env.stop()


def test_live_envoy_serves_every_tenant_family_the_dashboard_uses(live):
    families = dashboard_families()
    labelled = sorted(f for f in families if "tenant" in FAMILY_LABELS[f]
                      and f not in {"tollgate_cache_hits", "tollgate_cache_misses",
                                    "tollgate_cache_saved_tokens", "tollgate_cache_saved_micro_usd"})
    assert labelled, families
    wanted = expected_series(labelled, "team-a")
    wanted.append(("tollgate_cache_write_input_tokens", {"tenant": "team-b", "model": "claude-3-5-haiku"}))
    wanted.append(("tollgate_denials", {"tenant": "team-a", "reason": "model_not_found"}))
    wanted.append(("tollgate_denials", {"tenant": "_unknown", "reason": "unauthenticated"}))
    # Envoy's own families the pack uses, with their labels.
    for fam, labels in ENVOY_BUILTINS.items():
        if fam in families:
            wanted.append((fam + "_bucket" if fam in HISTOGRAMS else fam, {k: None for k in labels}))
    samples, missing = wait_for_series(live, wanted)
    assert not missing, f"missing series: {missing}\nseries served: " + ", ".join(
        sorted({n for n, _, _ in samples if n.startswith("tollgate")}))
    # The served model is the label (no `_other`: both models are in the price table).
    models = {labels.get("model") for n, labels, _ in samples if n == "tollgate_requests"}
    assert models == {"gpt-4o-mini", "claude-3-5-haiku"}, models
    requests = {labels["tenant"]: v for n, labels, v in samples
                if n == "tollgate_requests" and labels.get("model") == "gpt-4o-mini"}
    assert requests.get("team-a") == 2, requests
    # Every denial reason served is one the alerts know.
    reasons = {labels["reason"] for n, labels, _ in samples if n == "tollgate_denials"}
    assert reasons <= DENIAL_REASONS, reasons
    # The dashboard's tenant variable (label_values(tollgate_requests, tenant)) lists both tenants.
    tenants = {labels["tenant"] for n, labels, _ in samples if n == "tollgate_requests"}
    assert tenants == {"team-a", "team-b"}, tenants
    # Nothing left in flight once every request ended.
    assert all(v == 0 for n, _, v in samples if n == "tollgate_in_flight")


def test_live_envoy_serves_the_cache_families(upstream):
    env = Envoy(api_key_config(prices=PRICES, routing=ROUTING, **CACHE), upstream.port)
    try:
        deterministic = {"temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
        first = chat(env, KEYS["team-a"], body_extra=deterministic)
        second = chat(env, KEYS["team-a"], body_extra=deterministic)
        assert first[0] == second[0] == 200
        assert second[2] == first[2], "the second identical request should be answered from the cache"
        families = {f for f in dashboard_families() if f.startswith("tollgate_cache")}
        labelled = sorted(f for f in families if "tenant" in FAMILY_LABELS[f])
        assert {"tollgate_cache_hits", "tollgate_cache_misses"} <= set(labelled)
        wanted = expected_series(labelled, "team-a")
        # Global cache families (evictions appear only once something was evicted).
        wanted += [(f, {}) for f in sorted(families & GLOBAL_METRICS) if f != "tollgate_cache_evictions"]
        samples, missing = wait_for_series(env, wanted)
        assert not missing, f"missing series: {missing}\nseries served: " + ", ".join(
            sorted({n for n, _, _ in samples if n.startswith("tollgate")}))
        hits = sum(v for n, labels, v in samples if n == "tollgate_cache_hits" and labels.get("tenant") == "team-a")
        misses = sum(v for n, labels, v in samples if n == "tollgate_cache_misses" and labels.get("tenant") == "team-a")
        assert (hits, misses) == (1, 1)
        # A hit is an answered request (the miss was admitted and ended); neither stays in flight.
        requests = sum(v for n, labels, v in samples if n == "tollgate_requests" and labels.get("tenant") == "team-a")
        assert requests == 2
        assert all(v == 0 for n, _, v in samples if n == "tollgate_in_flight")
    finally:
        env.stop()
