#!/usr/bin/env python3
"""`make loadtest`: a mixed LLM workload through the real Envoy 1.40 + tollgate.wasm, with Locust.

Starts its own stack on loopback, like `make demo`: the fake LLM upstream (tests/fake_upstream.py)
and Envoy with envoy/tollgate.yaml and a plugin configuration derived from envoy/tollgate.json
(same prices, routing, aliases, cache), but with four tenants whose API keys are generated for
this run:

  acme     weight 4  large budgets: should see no denials
  globex   weight 3  5,000 tokens per user per 10 s: about 2/3 of what its users ask for
  initech  weight 2  max_concurrent = half its users: concurrency denials
  hooli    weight 1  tiny: 5,000 tokens/minute and $0.002/day: rate_limited, then quota_exceeded

Then it runs Locust headless (tests/load/locustfile.py: simple/moderate/complex prompts, ~30%
streaming, an Anthropic share, embeddings) and prints a report:

  * Locust, per request type: requests, failures, p50/p95/p99/max latency, req/s; time to
    first byte of streams; admitted and denied (429) requests apart;
  * Envoy's JSON access log, per tenant: requests, admitted, denied by decision (rate_limited,
    quota_exceeded, ...), cache hits, streams, tokens charged, cost, gateway p50/p95;
  * each tenant's budgets at the end (the usage view), and a reconciliation of the tokens the
    upstream reported with what Tollgate charged.

The report is also written as JSON to target/loadtest/report.json, next to Locust's CSV and HTML
files and the access log. Timing is measured and printed, never asserted; the exit status is 1
only if the run broke (over 1% of requests failed — a non-429 error, a broken stream, a
connection error — or nothing was admitted).

    LOADTEST_USERS=50 LOADTEST_SECONDS=60 .venv/bin/python tests/load/run.py
    (flags --users / --seconds / --spawn-rate override the variables)
"""
import argparse
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from decimal import Decimal

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests/e2e"))
sys.path.insert(0, HERE)

from harness import ENVOY, WASM, Envoy, FakeUpstream, http  # noqa: E402
from tenant_slots import users_per_tenant  # noqa: E402

LOCUST = os.path.join(ROOT, ".venv/bin/locust")
OUT_DIR = os.path.join(ROOT, "target/loadtest")
EMBEDDING_MODEL = "text-embedding-3-small"


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def tenant_plan(users):
    """The four tenants: name, weight, generated key, and their policy (sized by their users)."""
    base = [("acme", 4), ("globex", 3), ("initech", 2), ("hooli", 1)]
    plan = [{"tenant": name, "weight": weight, "key": f"sk-load-{name}-{secrets.token_hex(12)}"}
            for name, weight in base]
    per = users_per_tenant(plan, users)
    policies = {
        "acme": {"limits": [{"name": "tpm", "tokens": 50_000_000, "window": "minute"},
                            {"name": "daily-usd", "usd": "1000.00", "window": "day"}],
                 "max_concurrent": 1000},
        # One user asks for about 8k tokens per 10 s at full speed: 5k per user and 10 s window
        # is spent before each window is over, whatever the length of the run.
        "globex": {"limits": [{"name": "tokens-10s", "tokens": 5_000 * max(1, per["globex"]), "window": "10s"},
                              {"name": "daily-usd", "usd": "100.00", "window": "day"}],
                   "max_concurrent": 1000},
        "initech": {"limits": [{"name": "tpm", "tokens": 50_000_000, "window": "minute"}],
                    "max_concurrent": max(1, per["initech"] // 2)},
        "hooli": {"limits": [{"name": "tpm", "tokens": 5_000, "window": "minute"},
                             {"name": "daily-usd", "usd": "0.002", "window": "day"}],
                  "max_concurrent": 1000},
    }
    for t in plan:
        t["policy"] = policies[t["tenant"]]
        t["users"] = per[t["tenant"]]
    return plan


def plugin_config(plan, admin_token):
    with open(os.path.join(ROOT, "envoy/tollgate.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["identity"] = {"source": "api_key",
                       "api_keys": [{"sha256": sha256(t["key"]), "tenant": t["tenant"]} for t in plan]}
    cfg["tenants"] = {t["tenant"]: t["policy"] for t in plan}
    routing = cfg.setdefault("routing", {"models": {}})
    routing.setdefault("models", {}).setdefault(EMBEDDING_MODEL, {"route": "openai"})
    cfg.setdefault("prices", {}).setdefault(EMBEDDING_MODEL, {"input": "0.02", "output": "0"})
    cfg["usage_view"] = {"path": "/tollgate/usage", "admin_token_sha256": sha256(admin_token)}
    return cfg


# --- figures ------------------------------------------------------------------------------------
def pct(values, q):
    """Nearest-rank percentile of a list (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def num(v, cast=int):
    if v in (None, "", "-"):
        return cast(0)
    try:
        return cast(str(v)) if cast is Decimal else cast(v)
    except (ValueError, ArithmeticError):
        return cast(0)


def access_log_summary(lines, plan):
    order = [t["tenant"] for t in plan]
    tenants = {}
    apis = {}
    for line in lines:
        if not line.get("api"):
            continue  # not an LLM request (the usage view)
        name = line.get("tenant") or "(none)"
        t = tenants.setdefault(name, {
            "requests": 0, "admitted": 0, "denied": {}, "other_status": {}, "streams": 0,
            "cache_hits": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal(0),
            "_ms": [], "served_models": {}})
        t["requests"] += 1
        apis[line["api"]] = apis.get(line["api"], 0) + 1
        decision = line.get("decision") or "-"
        status = num(line.get("status"))
        if decision == "admitted":
            t["admitted"] += 1
            t["_ms"].append(num(line.get("duration_ms")))
            served = line.get("served_model") or line.get("model") or "-"
            t["served_models"][served] = t["served_models"].get(served, 0) + 1
        else:
            t["denied"][decision] = t["denied"].get(decision, 0) + 1
        if decision == "admitted" and not 200 <= status < 300:
            t["other_status"][str(status)] = t["other_status"].get(str(status), 0) + 1
        if line.get("stream") is True:
            t["streams"] += 1
        if line.get("cache") == "hit":
            t["cache_hits"] += 1
        t["input_tokens"] += num(line.get("input_tokens"))
        t["output_tokens"] += num(line.get("output_tokens"))
        t["cost_usd"] += num(line.get("llm_cost_usd"), Decimal)
    for t in tenants.values():
        ms = t.pop("_ms")
        t["gateway_ms"] = {"p50": pct(ms, 0.5), "p95": pct(ms, 0.95), "p99": pct(ms, 0.99)}
        t["cost_usd"] = str(t["cost_usd"])
    ordered = {k: tenants[k] for k in order if k in tenants}
    ordered.update({k: v for k, v in tenants.items() if k not in ordered})
    return ordered, apis


def ledger_summary(upstream):
    try:
        entries = upstream.ledger()
    except (OSError, ValueError):
        return None
    out = {"requests": len(entries), "ok": 0, "input_tokens": 0, "output_tokens": 0}
    for e in entries:
        if e.get("status") == 200:
            out["ok"] += 1
            out["input_tokens"] += e["usage"]["input"]
            out["output_tokens"] += e["usage"]["output"]
    return out


def usage_view(envoy, admin_token):
    status, _, body = http("GET", envoy.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {admin_token}"}, timeout=10)
    if status != 200:
        return {}
    return {t["tenant"]: [{k: lim.get(k) for k in ("name", "limit", "used", "reserved")}
                          for lim in t.get("limits", [])] for t in json.loads(body)["tenants"]}


# --- printing -----------------------------------------------------------------------------------
def ms(v):
    return "-" if v is None else f"{v:,.0f}"


def amount(v):
    """Tokens with thousands separators, USD (a decimal string) as $x.xxxx."""
    if isinstance(v, int):
        return f"{v:,}"
    try:
        return f"${Decimal(str(v)):,.4f}"
    except ArithmeticError:
        return str(v)


def table(headers, rows, right=None):
    right = right if right is not None else set(range(1, len(headers)))
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("  " + "  ".join(c.rjust(width[i]) if i in right else c.ljust(width[i])
                                    for i, c in enumerate(r)))
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in width))
    return "\n".join(out)


def print_report(r):
    B, N = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    p = r["params"]
    print(f"\n{B}Tollgate load test{N}  {p['users']} users, {p['seconds']} s, spawn {p['spawn_rate']}/s, "
          f"Envoy concurrency {p['envoy_concurrency']}, {p['cpus']} CPUs")
    lc = r["locust"]
    by_name = {s["name"]: s for s in lc["stats"]}
    ttfb = lc.get("ttfb_ms", {})

    print(f"\n{B}Latency by request type{N} (Locust, client side, ms; streams until the last byte)")
    rows = []
    kinds = [n for n in by_name if n not in ("Aggregated", "Admitted (not 429)", "Denied (429)")]
    key = {"simple": 0, "moderate": 1, "complex": 2, "embeddings": 3}
    kinds.sort(key=lambda n: (n.endswith(" 429"), key.get(n.split("/")[0].split(" ")[0], 9), n))
    for n in kinds + ["Admitted (not 429)", "Denied (429)", "Aggregated"]:
        s = by_name.get(n)
        if not s or not s["requests"]:
            continue
        t = ttfb.get(n)
        rows.append([n, f"{s['requests']:,}", s["failures"], ms(s["p50"]), ms(s["p95"]), ms(s["p99"]),
                     ms(s["max_ms"]), f"{s['rps']:.1f}",
                     f"{ms(t['p50'])}/{ms(t['p95'])}" if t else ""])
    print(table(["request", "reqs", "fails", "p50", "p95", "p99", "max", "req/s", "ttfb p50/p95"], rows))
    if lc["errors"]:
        print("\n  failures:")
        for e in lc["errors"]:
            print(f"    {e['occurrences']:>6} × {e['name']}: {e['error']}")

    print(f"\n{B}Per tenant{N} (Envoy access log: what Tollgate decided and charged)")
    rows = []
    for name, t in r["tenants"].items():
        plan = r["plan"].get(name, {})
        denied = ", ".join(f"{k} {v:,}" for k, v in sorted(t["denied"].items())) or "-"
        share = f"{t['admitted'] / t['requests']:.0%}" if t["requests"] else "-"
        rows.append([name, plan.get("users", "-"), f"{t['requests']:,}", f"{t['admitted']:,}", share, denied,
                     f"{t['cache_hits']:,}", f"{t['streams']:,}", f"{t['input_tokens']:,}",
                     f"{t['output_tokens']:,}", f"${Decimal(t['cost_usd']):.4f}",
                     f"{ms(t['gateway_ms']['p50'])}/{ms(t['gateway_ms']['p95'])}"])
    print(table(["tenant", "users", "reqs", "admitted", "%", "denied (429 by decision)", "cache hits",
                 "streams", "input tok", "output tok", "cost", "p50/p95 ms"], rows, right=set(range(1, 12)) - {5}))
    kinds = r.get("client_429_kinds") or {}
    if kinds:
        print("  429s as clients saw them: " + "; ".join(
            f"{n}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) for n, d in kinds.items()))
    if r.get("apis"):
        print("  requests by API: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r["apis"].items())))

    if r.get("budgets"):
        print(f"\n{B}Budgets at the end{N} (usage view)")
        rows = []
        for name, limits in sorted(r["budgets"].items(), key=lambda kv: list(r["plan"]).index(kv[0])
                                   if kv[0] in r["plan"] else 99):
            plan = r["plan"].get(name, {})
            conc = plan.get("policy", {}).get("max_concurrent", "-")
            rows.append([name, "; ".join(f"{lim['name']} {amount(lim['used'])} / {amount(lim['limit'])}"
                                         for lim in limits), conc])
        print(table(["tenant", "used/limit (current window)", "max_concurrent"], rows, right={2}))

    rec = r.get("reconciliation")
    if rec:
        print(f"\n  upstream reported {rec['upstream_input_tokens']:,} in / {rec['upstream_output_tokens']:,} out "
              f"over {rec['upstream_ok']:,} answers; Tollgate charged {rec['charged_input_tokens']:,} in / "
              f"{rec['charged_output_tokens']:,} out (cache hits are answered by Tollgate and free)")
    print(f"  locust requests {r['checks']['locust_requests']:,}, access-log LLM lines "
          f"{r['checks']['access_log_lines']:,}")
    print(f"\n  report: {os.path.relpath(r['files']['report'], ROOT)}   "
          f"locust CSV/HTML: {os.path.relpath(r['files']['locust_csv_prefix'], ROOT)}_*.csv, "
          f"{os.path.relpath(r['files']['locust_html'], ROOT)}")


# --- the run ------------------------------------------------------------------------------------
def stop_pid(proc, sig=signal.SIGTERM, timeout=15):
    """Locust stops on SIGTERM (its users are stopped, its summary written)."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _interrupt(*_):
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=int(os.environ.get("LOADTEST_USERS", "50")))
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("LOADTEST_SECONDS", "60")))
    ap.add_argument("--spawn-rate", type=float, default=float(os.environ.get("LOADTEST_SPAWN_RATE", "0")),
                    help="users started per second (default: users / 5, at least 1)")
    ap.add_argument("--envoy-concurrency", type=int, default=int(os.environ.get("LOADTEST_ENVOY_CONCURRENCY", "2")))
    args = ap.parse_args()
    spawn_rate = args.spawn_rate or max(1.0, args.users / 5)
    for path, what in ((WASM, "make build"), (ENVOY, "make envoy"), (LOCUST, "make loadtest")):
        if not os.path.exists(path):
            sys.exit(f"missing {os.path.relpath(path, ROOT)}: run `{what}` first")
    os.makedirs(OUT_DIR, exist_ok=True)
    files = {"report": os.path.join(OUT_DIR, "report.json"), "extra": os.path.join(OUT_DIR, "locust-extra.json"),
             "locust_csv_prefix": os.path.join(OUT_DIR, "locust"), "locust_html": os.path.join(OUT_DIR, "locust.html"),
             "locust_log": os.path.join(OUT_DIR, "locust.log"), "access_log": os.path.join(OUT_DIR, "access.log")}
    for path in (files["extra"],):
        if os.path.exists(path):
            os.unlink(path)

    # Ctrl-C and SIGTERM (e.g. a CI timeout) stop everything this run started, by PID (SIGINT
    # is handled even where a parent shell left it ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    admin_token = "tollgate-admin-" + secrets.token_hex(8)
    plan = tenant_plan(args.users)
    upstream = envoy = locust = None
    try:
        upstream = FakeUpstream("loadtest-provider")
        envoy = Envoy(plugin_config(plan, admin_token), upstream.port, concurrency=args.envoy_concurrency)
        print(f"upstream {upstream.url}  envoy {envoy.url} (admin {envoy.admin})")
        print("tenants: " + ", ".join(f"{t['tenant']} ({t['users']} users)" for t in plan))
        print(f"running Locust: {args.users} users, {args.seconds} s …", flush=True)
        env = dict(os.environ,
                   LOADTEST_TENANTS=json.dumps([{k: t[k] for k in ("tenant", "key", "weight")} for t in plan]),
                   LOADTEST_EXTRA=files["extra"])
        with open(files["locust_log"], "w") as log:
            locust = subprocess.Popen(
                [LOCUST, "-f", os.path.join(HERE, "locustfile.py"), "--headless", "--only-summary",
                 "-u", str(args.users), "-r", str(spawn_rate), "-t", f"{args.seconds}s",
                 "--stop-timeout", "30", "--host", envoy.url, "--csv", files["locust_csv_prefix"],
                 "--html", files["locust_html"], "--loglevel", "WARNING"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            locust.wait(timeout=args.seconds + 120)
        if not os.path.exists(files["extra"]):
            with open(files["locust_log"]) as f:
                sys.exit("Locust did not finish its run:\n" + f.read()[-4000:])
        time.sleep(0.5)  # Envoy flushes the access log every 50 ms
        with open(files["extra"]) as f:
            extra = json.load(f)
        lines = envoy.access_lines()
        tenants, apis = access_log_summary(lines, plan)
        budgets = usage_view(envoy, admin_token)
        ledger = ledger_summary(upstream)
        with open(envoy.access_log) as src, open(files["access_log"], "w") as dst:
            dst.write(src.read())
    except KeyboardInterrupt:
        print("\ninterrupted: stopping Locust, Envoy and the upstream", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_pid(locust)
        if envoy is not None:
            envoy.stop()
        if upstream is not None:
            upstream.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    total = next(s for s in extra["stats"] if s["name"] == "Aggregated")
    admitted = sum(t["admitted"] for t in tenants.values())
    charged = [ln for ln in lines if ln.get("api") and ln.get("decision") == "admitted" and ln.get("cache") != "hit"]
    report = {
        "params": {"users": args.users, "seconds": args.seconds, "spawn_rate": spawn_rate,
                   "envoy_concurrency": args.envoy_concurrency, "cpus": os.cpu_count()},
        "plan": {t["tenant"]: {"weight": t["weight"], "users": t["users"], "policy": t["policy"]} for t in plan},
        "locust": {"stats": extra["stats"], "errors": extra["errors"], "users_started": extra["users"],
                   "ttfb_ms": {n: {"count": len(v), "p50": pct(v, 0.5), "p95": pct(v, 0.95), "p99": pct(v, 0.99)}
                               for n, v in extra["ttfb_ms"].items()}},
        "tenants": tenants,
        "client_429_kinds": extra["denials"],
        "apis": apis,
        "budgets": budgets,
        "reconciliation": ledger and {
            "upstream_ok": ledger["ok"], "upstream_input_tokens": ledger["input_tokens"],
            "upstream_output_tokens": ledger["output_tokens"],
            "charged_input_tokens": sum(num(ln.get("input_tokens")) for ln in charged),
            "charged_output_tokens": sum(num(ln.get("output_tokens")) for ln in charged)},
        "checks": {"locust_requests": total["requests"], "locust_failures": total["failures"],
                   "access_log_lines": sum(t["requests"] for t in tenants.values()), "admitted": admitted},
        "files": files,
    }
    with open(files["report"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print_report(report)
    broken = total["requests"] == 0 or admitted == 0 or total["failures"] > 0.01 * total["requests"]
    if broken:
        print(f"\nload test FAILED: {total['failures']:,} of {total['requests']:,} requests failed, "
              f"{admitted:,} admitted", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
