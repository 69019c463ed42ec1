#!/usr/bin/env python3
"""`make soak`: ten minutes of mixed traffic, hostile upstream answers included, through the real
Envoy 1.40 (`envoy/tollgate.yaml`, `--concurrency 2`) and tollgate.wasm. Not part of `make test`.

Traffic, from 32 concurrent clients, in rounds until SOAK_SECONDS have passed:
  * the ledger test's mix (tests/e2e/test_budget_ledger.py: Chat Completions, Responses and
    Messages, JSON and SSE, mid-stream client aborts, upstream resets, errors, answers without
    usage) over six tenants whose daily budgets run out during the run (refusals too);
  * cacheable requests (temperature 0, a small set repeated): hits and stores;
  * hostile upstream answers (tests/fake_upstream.py `x-fake-hostile`): gzip and deflate bombs of
    1 GiB in JSON and SSE, one 1 GiB SSE line inside gzip, an endless plain SSE line, absurd usage
    (2^63 tokens), a usage object of the other API's shape.

It samples Envoy's RSS (/proc/PID/status) every 5 s and prints, then checks:
  * RSS flat after warm-up: the growth from the first minute's end to the end (and the peak);
  * `reserved` and `in_flight` back to 0 for every tenant, `tollgate_in_flight` 0;
  * no VM reload or failure (`wasm.tollgate.vm_reload*` 0, no panic or trap in Envoy's log);
  * every request has exactly one access-log line, every admitted one has a tenant and a usage
    source, and per tenant and limit `used` equals the sum its admitted lines were charged.
The figures go to stdout and target/soak/report.json; the exit status is 1 if a check fails.
Timing is printed, never asserted.

    SOAK_SECONDS=600 .venv/bin/python tests/soak/run.py
"""
import collections
import concurrent.futures
import json
import os
import random
import sys
import time
import uuid
from decimal import Decimal

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from harness import Envoy, FakeUpstream, http  # noqa: E402
import test_budget_ledger as ledger  # noqa: E402

SECONDS = int(os.environ.get("SOAK_SECONDS", "600"))
CLIENTS = 32
ROUND = 400
HOSTILE = ["gzip-bomb-json", "deflate-bomb-json", "gzip-bomb-sse", "gzip-bomb-line",
           "endless-line", "absurd-usage", "foreign-usage"]
PRICE_IN, PRICE_OUT = ledger.PRICE_IN, ledger.PRICE_OUT


def soak_config():
    """The ledger test's tenants with daily windows, budgets sized to run out mid-soak, and the
    response cache on."""
    config = json.loads(json.dumps(ledger.CONFIG))
    # The ledger test's hourly budgets, scaled so that they last most of the run at this
    # machine's rate: the small ones run out towards its end (refusals too).
    scale = max(1, SECONDS)
    for tenant in [config["tenant_defaults"], *config["tenants"].values()]:
        for limit in tenant.get("limits", []):
            limit["window"] = "day"
            if "tokens" in limit:
                limit["tokens"] *= scale
            else:
                limit["usd"] = str(Decimal(limit["usd"]) * scale)
    config["cache"] = {"max_entries": 64, "max_bytes": 1048576, "max_entry_bytes": 65536,
                       "ttl_seconds": 30}
    return config


def plan_round(rng):
    ledger.REQUESTS = ROUND
    specs = ledger.plan_requests(rng)
    for spec in specs:
        roll = rng.random()
        if roll < 0.06:
            mode = rng.choice(HOSTILE)
            spec["headers"]["x-fake-hostile"] = mode
            spec["mode"] = "hostile"
            spec["hostile"] = mode
            spec["abort_after"] = None
            spec["api"] = "chat_completions"
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bomb"}],
                    "max_tokens": 50}
            if mode in ("gzip-bomb-sse", "gzip-bomb-line", "endless-line"):
                body["stream"] = True
            spec["stream"] = bool(body.get("stream"))
            if mode == "endless-line":
                # Past max_sse_line_bytes (1 MiB) many times over; every byte reaches the client.
                spec["headers"]["x-fake-bomb-bytes"] = str(8 << 20)
            spec["body"] = json.dumps(body).encode()
        elif roll < 0.16:
            spec["mode"] = "cacheable"
            spec["api"] = "chat_completions"
            spec["stream"] = False
            spec["abort_after"] = None
            body = {"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 40,
                    "messages": [{"role": "user", "content": f"question {rng.randint(0, 9)}"}]}
            spec["body"] = json.dumps(body).encode()
            for knob in ("x-fake-split", "x-fake-reset-after", "x-fake-no-usage", "x-fake-status",
                         "x-fake-delay-ms"):
                spec["headers"].pop(knob, None)
    return specs


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_out_day_boundary():
    left = 86400 - time.time() % 86400
    if left < SECONDS + 120:
        print(f"waiting {left:.0f}s for the UTC day to roll over")
        time.sleep(left + 1)


def main():
    wait_out_day_boundary()
    upstream = FakeUpstream("soak")
    envoy = Envoy(soak_config(), upstream.port)
    problems = []
    try:
        before = ledger.read_view(envoy)
        rng = random.Random(20261128)
        specs, results, rss = [], [], []
        t0 = time.monotonic()
        next_sample = t0
        rounds = 0
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            while time.monotonic() - t0 < SECONDS:
                batch = plan_round(rng)
                futures = [pool.submit(ledger.send, envoy.port, s) for s in batch]
                for fut in futures:
                    while not fut.done():
                        if time.monotonic() >= next_sample:
                            rss.append((round(time.monotonic() - t0, 1), rss_kib(envoy.proc.pid)))
                            next_sample += 5
                        time.sleep(0.05)
                specs += batch
                results += [f.result() for f in futures]
                rounds += 1
                elapsed = time.monotonic() - t0
                print(f"  {elapsed:5.0f}s  round {rounds}: {len(specs)} requests, "
                      f"RSS {rss[-1][1] / 1024 if rss else 0:.1f} MiB", flush=True)
        load_s = time.monotonic() - t0
        rids = {s["rid"] for s in specs}
        deadline = time.monotonic() + 60
        while True:
            all_lines = [l for l in envoy.access_lines() if l.get("client_request_id") in rids]
            view = ledger.read_view(envoy)
            idle = all(t["in_flight"] == 0 and all(ledger.amount(l, "reserved") == 0 for l in t["limits"])
                       for t in view["tenants"])
            if (len({l["client_request_id"] for l in all_lines}) == len(rids) and idle) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        rss.append((round(time.monotonic() - t0, 1), rss_kib(envoy.proc.pid)))

        # ---- checks
        per_rid = collections.Counter(l["client_request_id"] for l in all_lines)
        missing = [r for r in rids if per_rid[r] == 0]
        doubled = [r for r, n in per_rid.items() if n > 1]
        if missing:
            problems.append(f"{len(missing)} requests without an access-log line")
        if doubled:
            problems.append(f"{len(doubled)} requests with more than one access-log line")
        lines = {l["client_request_id"]: l for l in all_lines}
        for t in view["tenants"]:
            if t["in_flight"] != 0:
                problems.append(f"{t['tenant']} in_flight {t['in_flight']}")
            for limit in t["limits"]:
                if ledger.amount(limit, "reserved") != 0:
                    problems.append(f"{t['tenant']}/{limit['name']} reserved {limit['reserved']}")
        gauges = [l for l in envoy.prometheus().splitlines()
                  if l.startswith("tollgate_in_flight{") and not l.endswith(" 0")]
        if gauges:
            problems.append(f"tollgate_in_flight not 0: {gauges}")
        stats = envoy.stats("wasm")
        reloads = {k: v for k, v in stats.items() if "vm_reload" in k}
        if any(reloads.values()):
            problems.append(f"VM reloads: {reloads}")
        log = envoy.log()
        for sign in ("panicked", "Wasm VM failed", "wasm trap", "Function: proxy_on_"):
            if sign in log:
                problems.append(f"Envoy's log shows {sign!r}")
        by_spec = {s["rid"]: s for s in specs}
        admitted = [l for l in lines.values() if l.get("decision") == "admitted"]
        for l in admitted:
            if l.get("tenant") != by_spec[l["client_request_id"]]["tenant"] or not l.get("usage_source"):
                problems.append(f"admitted line without tenant or usage source: {l}")
                break
        start = {t["tenant"]: t for t in before["tenants"]}
        for t in view["tenants"]:
            mine = [l for l in admitted if l["tenant"] == t["tenant"]]
            for limit in t["limits"]:
                first = next(x for x in start[t["tenant"]]["limits"] if x["name"] == limit["name"])
                if first["resets_at"] != limit["resets_at"]:
                    problems.append("a daily window rolled over mid-run")
                counted = [l for l in mine if limit["model"] in (None, l["model"])]
                if limit["unit"] == "tokens":
                    expected = sum(int(l["input_tokens"]) + int(l["output_tokens"]) for l in counted)
                else:
                    expected = sum((int(l["input_tokens"]) * PRICE_IN + int(l["output_tokens"]) * PRICE_OUT)
                                   / Decimal(1_000_000) for l in counted)
                used = ledger.amount(limit, "used") - ledger.amount(first, "used")
                if used != expected:
                    problems.append(f"{t['tenant']}/{limit['name']}: used {used}, lines charged {expected}")

        # ---- figures
        warm = next((kib for s, kib in rss if s >= 60), rss[0][1] if rss else 0)
        end = rss[-1][1] if rss else 0
        peak = max((kib for _, kib in rss), default=0)
        modes = collections.Counter(s.get("hostile") or s["mode"] for s in specs)
        decisions = collections.Counter(l.get("decision") for l in lines.values())
        sources = collections.Counter(l.get("usage_source") for l in admitted)
        caches = collections.Counter(l.get("cache") for l in admitted if l.get("cache"))
        report = {
            "date": time.strftime("%Y-%m-%d"), "seconds": round(load_s), "requests": len(specs),
            "clients": CLIENTS, "modes": dict(modes), "decisions": dict(decisions),
            "usage_sources": dict(sources), "cache": dict(caches),
            "rss_mib": {"start": round(rss[0][1] / 1024, 1) if rss else None,
                        "after_warmup": round(warm / 1024, 1), "end": round(end / 1024, 1),
                        "peak": round(peak / 1024, 1),
                        "growth_after_warmup": round((end - warm) / 1024, 1)},
            "rss_samples": rss, "vm_reloads": reloads,
            "final_usage": {t["tenant"]: {l["name"]: [l["used"], l["limit"]] for l in t["limits"]}
                            for t in view["tenants"]},
            "problems": problems,
        }
        os.makedirs(os.path.join(ROOT, "target", "soak"), exist_ok=True)
        with open(os.path.join(ROOT, "target", "soak", "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nsoak: {len(specs)} requests in {load_s:.0f}s from {CLIENTS} clients")
        print(f"  modes {dict(modes)}")
        print(f"  decisions {dict(decisions)}")
        print(f"  usage sources {dict(sources)}; cache {dict(caches)}")
        print(f"  Envoy RSS MiB: start {report['rss_mib']['start']}, after 60 s {report['rss_mib']['after_warmup']}, "
              f"end {report['rss_mib']['end']}, peak {report['rss_mib']['peak']}")
        print(f"  VM reloads {reloads}")
        print("  " + ("all checks passed" if not problems else "PROBLEMS:\n    " + "\n    ".join(problems)))
    finally:
        envoy.stop()
        upstream.stop()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
