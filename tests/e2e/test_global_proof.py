"""Global budgets across three Envoy replicas, the proof: three Envoys (`--concurrency 2` each)
lease one tenant's minute limit and its parent's day limit (a budget tree: org → g) from one
rate-limit service (tests/rls over
redis-server) while 64 clients send mixed requests (JSON and SSE, clients leaving mid-stream,
upstream resets, errors, answers without usage) spread over the three listeners, across a
minute boundary; one Envoy is killed with SIGKILL mid-run and another one started in its place.
It runs against both engines the test server has: Limitador (limitador-server's answers: a read,
then an increment when admitted) and envoyproxy/ratelimit (its Redis cache: `INCRBY`, then
compare, so a refused refill stays counted), the latter in a shorter run.

One run per engine (module fixtures) drives the load; the tests check what it recorded:
* strict mode: the tokens charged per window, summed over every replica's ledger, within what
  the service granted, and that within the limit (for envoyproxy/ratelimit, whose `INCRBY` is
  atomic, always; for Limitador up to its racing read-then-increment);
* what the service granted minus the ledgers' sum (capacity stranded in leases) within the
  stated bound; with envoyproxy/ratelimit, the refused hits Redis counted too (printed);
* remote calls per admitted request, and the added latency against local budgets;
* the same load with local budgets only charges about three times the limit.
What the service granted is Limitador's Redis counters (it counts admitted hits only), or for
envoyproxy/ratelimit the test server's grants log (its counters hold granted + refused hits).
Figures are printed (`pytest -s`) for the README; timing is never asserted.
"""
import collections
import json
import os
import random
import re
import signal
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

from harness import Envoy, RateLimitService, Redis
from test_budget_ledger import PATHS, send

MINUTE_LIMIT = 4000
DAY_LIMIT = 7000
REPLICAS = 3
WORKERS = 2
CLIENTS = 64
RUN_SECONDS = 26
# The envoyproxy/ratelimit run: shorter, started later in the minute, still across a boundary.
RATELIMIT_SECONDS = 22
SHARE = 0.25


def config(global_, minute=MINUTE_LIMIT, day=DAY_LIMIT):
    return {
        "identity": {"source": "header", "header": "x-tenant"},
        # The day limit is g's parent's: a budget tree's ancestor leases its own global limit
        # (its scope in the descriptor), charged by g's requests at both levels.
        "tenants": {
            "org": {"strict": True, "limits": [
                {"name": "tpd", "tokens": day, "window": "day", "global": global_}]},
            "g": {"parent": "org", "strict": True, "default_output_tokens": 64, "limits": [
                {"name": "tpm", "tokens": minute, "window": "minute", "global": global_}]}},
        "global_budgets": {"cluster": "ratelimit", "replicas": REPLICAS, "refill_share": SHARE,
                           "timeout_ms": 500},
    }


def spec(rng):
    mode = rng.choices(["normal", "abort", "reset", "error", "no_usage"], [60, 20, 10, 5, 5])[0]
    stream = mode == "abort" or rng.random() < 0.5
    chunks = rng.randint(2, 12)
    text = "".join(rng.choice("abcdefgh ijklmnop") for _ in range(rng.randint(20, 200)))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
            "max_tokens": rng.randint(2 * chunks + 1, 64)}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    rid = str(uuid.uuid4())
    headers = {"x-tenant": "g", "x-request-id": rid, "x-fake-request-id": rid,
               "x-fake-chunks": str(chunks)}
    abort_after = None
    if mode == "abort":
        abort_after = rng.choice([0, 1, 2])
        headers["x-fake-split"] = str(rng.randint(1, 1 << 30))
        headers["x-fake-hold-ms"] = "800"
    elif mode == "reset":
        headers["x-fake-reset-after"] = str(rng.randint(0, 4 if stream else 60))
    elif mode == "error":
        headers["x-fake-status"] = "500"
    elif mode == "no_usage":
        headers["x-fake-no-usage"] = "1"
    return {"rid": rid, "api": "chat_completions", "mode": mode, "stream": stream,
            "abort_after": abort_after, "headers": headers,
            "body": json.dumps(body).encode()}


def near_a_minute_boundary(margin=1.5):
    second = time.time() % 60
    return second < margin or second > 60 - margin


def drive(envoys, seconds, events=()):
    """64 clients over the live Envoys for `seconds`; `events`: (at second, callable). New
    requests pause within 1.5 s of a minute boundary (more than a refill's wait), so a
    request's start time names the window it was admitted in."""
    stop = time.monotonic() + seconds
    results, lock = [], threading.Lock()

    def client(n):
        rng = random.Random(n)
        i = n
        while time.monotonic() < stop:
            if near_a_minute_boundary():
                time.sleep(0.05)
                continue
            live = [e for e in envoys if e is not None and e.proc.poll() is None]
            if not live:
                time.sleep(0.05)
                continue
            envoy = live[i % len(live)]
            i += 1
            s = spec(rng)
            started = time.time()
            try:
                r = send(envoy.port, s)
            except OSError:  # the Envoy just killed
                continue
            r.update(rid=s["rid"], mode=s["mode"], started_at=started,
                     latency=r["ended"] - r["started"])
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    begun = time.monotonic()
    for t in threads:
        t.start()
    for at, action in events:
        time.sleep(max(0.0, begun + at - time.monotonic()))
        action()
    for t in threads:
        t.join(timeout=seconds + 60)
    return results


def wait_for_second(lo, hi):
    """Sleeps until the second of the minute is in [lo, hi)."""
    while not lo <= time.time() % 60 < hi:
        time.sleep(0.2)


def ledgers(paths):
    """Every complete access-log line. The Envoy killed with SIGKILL may leave its last line
    cut short: that record was never written whole, so it is not counted (leaving it out only
    lowers the charges the proof bounds from above)."""
    lines = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines += [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
    return lines


def charged(line):
    return int(line["input_tokens"] or 0) + int(line["output_tokens"] or 0)


def minute_of(line):
    return line["time"][:16]


def run_engine(engine, upstream, start, seconds, kill_at, replace_at):
    """One proof run against `engine`: three Envoys leasing from the test server over a fresh
    redis-server, started when the second of the minute is within `start`, driven for `seconds`;
    the second Envoy is SIGKILLed at `kill_at` and a fourth started at `replace_at`."""
    redis = Redis()
    rls = RateLimitService(config(True), redis, engine=engine)
    extra = {"RATELIMIT_ENDPOINTS": f"127.0.0.1:{rls.port}"}
    envoys = [Envoy(config(True), upstream.port, extra=extra) for _ in range(REPLICAS)]
    logs = [e.access_log for e in envoys]
    stats = {}
    killed = envoys[1]

    def kill():
        stats["killed"] = killed.stats("cluster.ratelimit.upstream_rq_total")
        os.kill(killed.proc.pid, signal.SIGKILL)
        killed.proc.wait()

    def replace():
        envoys.append(Envoy(config(True), upstream.port, extra=extra))
        logs.append(envoys[-1].access_log)

    try:
        wait_for_second(*start)
        results = drive(envoys, seconds, [(kill_at, kill), (replace_at, replace)])
        time.sleep(1.0)  # the last access-log lines (flushed every 50 ms)
        calls = sum(e.stats("cluster.ratelimit.upstream_rq_total").get(
            "cluster.ratelimit.upstream_rq_total", 0) for e in envoys if e.proc.poll() is None)
        calls += stats["killed"].get("cluster.ratelimit.upstream_rq_total", 0)
        lines = ledgers(logs)
        counters = redis.counters()
        grants = rls.grants()
    finally:
        for e in envoys:
            e.stop()
        rls.stop()
        redis.stop()
    return {"engine": engine, "results": results, "lines": lines, "counters": counters,
            "grants": grants, "calls": calls}


@pytest.fixture(scope="module")
def proof(upstream):
    run = run_engine("limitador", upstream, (38, 44), RUN_SECONDS, 6, 10)
    # A budget large against one request: how many requests one refill serves.
    redis = Redis()
    big = config(True, minute=2_000_000, day=20_000_000)
    rls = RateLimitService(big, redis)
    extra = {"RATELIMIT_ENDPOINTS": f"127.0.0.1:{rls.port}"}
    larges = [Envoy(big, upstream.port, extra=extra) for _ in range(REPLICAS)]
    try:
        wait_for_second(2, 46)
        large = drive(larges, 8)
        time.sleep(1.0)
        large_calls = sum(e.stats("cluster.ratelimit.upstream_rq_total").get(
            "cluster.ratelimit.upstream_rq_total", 0) for e in larges)
        large_lines = ledgers([e.access_log for e in larges])
    finally:
        for e in larges:
            e.stop()
        rls.stop()
        redis.stop()
    # The baseline: the same load with local budgets only, within one minute.
    locals_ = [Envoy(config(False), upstream.port) for _ in range(REPLICAS)]
    try:
        wait_for_second(2, 40)
        base = drive(locals_, 8)
        time.sleep(1.0)
        base_lines = ledgers([e.access_log for e in locals_])
    finally:
        for e in locals_:
            e.stop()
    run.update(base=base, base_lines=base_lines, large=large, large_calls=large_calls,
               large_lines=large_lines)
    return run


@pytest.fixture(scope="module")
def proof_ratelimit(upstream):
    """The same proof against envoyproxy/ratelimit's answers: 22 s from the 42nd-52nd second
    (the Limitador fixture usually ends there, so it seldom waits), one Envoy killed at 5 s and
    another started at 8 s."""
    return run_engine("ratelimit", upstream, (42, 52), RATELIMIT_SECONDS, 5, 8)


def admitted(lines):
    return [l for l in lines if l.get("tenant") == "g" and l.get("decision") == "admitted"]


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else 0


def window_start(window):
    """The Unix second a window id starts at (`2026-11-28T07:05` or `2026-11-28`, UTC): the
    start envoyproxy/ratelimit's epoch-aligned MINUTE or DAY gives the same window."""
    fmt = "%Y-%m-%dT%H:%M" if "T" in window else "%Y-%m-%d"
    return int(datetime.strptime(window, fmt).replace(tzinfo=timezone.utc).timestamp())


RATELIMIT_KEY = re.compile(r"_tollgate\.limit_(?P<limit>.+?)_tollgate\.scope_.*"
                           r"_tollgate\.window_(?P<window>.+)_(?P<start>\d+)$")


def ratelimit_counters(run):
    """envoyproxy/ratelimit's counters, one per Redis key: {key: {limit, window, own (keyed by
    the window's own start, not a refill that reached the server after the window turned),
    granted, refused (hits answered OVER_LIMIT), counted (Redis's value)}}."""
    out = {}
    for g in run["grants"]:
        m = RATELIMIT_KEY.search(g["key"])
        c = out.setdefault(g["key"], {
            "limit": m["limit"], "window": m["window"],
            "own": int(m["start"]) == window_start(m["window"]),
            "granted": 0, "refused": 0, "counted": run["counters"].get(g["key"], 0)})
        c["granted" if g["code"] == "OK" else "refused"] += g["hits"]
    return out


def granted(run, limit, window):
    """What the service granted to (limit, window): Limitador's Redis counters (it counts what
    it admits only), or envoyproxy/ratelimit's OK answers on the window's own counter."""
    if run["engine"] == "limitador":
        return sum(v for k, v in run["counters"].items() if limit in k and window in k)
    return sum(c["granted"] for c in ratelimit_counters(run).values()
               if c["limit"] == limit and c["window"] == window and c["own"])


def charged_per_window(run):
    """{(limit, window id): tokens charged}, summed over every replica's ledger."""
    out = collections.Counter()
    for line in admitted(run["lines"]):
        out[("tpm", minute_of(line))] += charged(line)
        out[("tpd", line["time"][:10])] += charged(line)
    return out


def check_load(run):
    modes = collections.Counter(r["mode"] for r in run["results"])
    statuses = collections.Counter(r["status"] for r in run["results"])
    minutes = {minute_of(l) for l in admitted(run["lines"])}
    sent = {datetime.fromtimestamp(r["started_at"], timezone.utc).strftime("%Y-%m-%dT%H:%M")
            for r in run["results"]}
    print(f"\n  [{run['engine']}] requests {len(run['results'])}, modes {dict(modes)}, "
          f"statuses {dict(statuses)}")
    print(f"  admitted lines {len(admitted(run['lines']))} over minutes {sorted(minutes)}")
    assert len(sent) == 2, sent  # the run crossed a minute boundary
    assert statuses[429] > 0 and statuses[200] > 0
    assert modes["abort"] > 20 and modes["reset"] > 10


def check_charges(run):
    spent = charged_per_window(run)
    per_minute = {w: v for (limit, w), v in spent.items() if limit == "tpm"}
    per_day = {w: v for (limit, w), v in spent.items() if limit == "tpd"}
    print(f"\n  [{run['engine']}] charged per minute over the replicas: {per_minute} "
          f"(limit {MINUTE_LIMIT}); day {per_day} (limit {DAY_LIMIT})")
    grants = {(limit, w): granted(run, limit, w) for (limit, w) in spent}
    limits = {"tpm": MINUTE_LIMIT, "tpd": DAY_LIMIT}
    # Strict mode charges at most what the service granted.
    for key, value in spent.items():
        assert value <= grants[key], (key, value, grants[key])
    if run["engine"] == "limitador":
        # Limitador's ShouldRateLimit reads, then increments: refills racing from several
        # replicas can pass together (one per live Envoy at a time, each at most a chunk: a
        # share of the limit over the replicas, or one request's estimate), so the service
        # grants at most the limit plus (replicas - 1) chunks.
        for key in spent:
            limit = limits[key[0]]
            chunk = max(64 + 400, int(SHARE * limit / REPLICAS))
            assert grants[key] <= limit + (REPLICAS - 1) * chunk, (key, grants[key])
    else:
        # envoyproxy/ratelimit's INCRBY then compare is atomic: every counter grants at most
        # the limit, so the charges stay within the limit too.
        for key, c in ratelimit_counters(run).items():
            assert c["granted"] <= limits[c["limit"]], (key, c)
            # Every hit it answered was counted (a call cut off mid-flight may count more).
            assert c["counted"] >= c["granted"] + c["refused"], (key, c)
        for key, value in spent.items():
            assert value <= grants[key] <= limits[key[0]], (key, value, grants[key])
    over = {f"{l} {w}": max(0, g - limits[l]) for (l, w), g in grants.items()}
    print(f"  the service granted {dict((f'{l} {w}', g) for (l, w), g in grants.items())}: "
          f"over the limit by {over}; charged over the limit: "
          f"{dict((f'{l} {w}', max(0, v - limits[l])) for (l, w), v in spent.items())}")


def check_stranded(run):
    spent = charged_per_window(run)
    print(f"\n  [{run['engine']}] redis counters: {run['counters']}")
    # Per replica (four processes ran): a chunk per worker plus less than one request's
    # estimate (strict: prompt bytes + 64), a chunk being a share of the limit over the
    # replicas, or the estimate.
    estimate = 64 + 400
    limits = {"tpm": MINUTE_LIMIT, "tpd": DAY_LIMIT}
    for (name, window), value in sorted(spent.items()):
        limit = limits[name]
        given = granted(run, name, window)
        stranded = given - value
        chunk = max(estimate, int(SHARE * limit / REPLICAS))
        bound = (REPLICAS + 1) * (WORKERS * chunk + estimate)
        print(f"  {name} {window} (limit {limit}): granted {given}, charged {value}, "
              f"stranded {stranded} (bound {bound})")
        assert value <= given, (value, given)
        assert 0 <= stranded <= bound
    if run["engine"] == "ratelimit":
        for key, c in sorted(ratelimit_counters(run).items()):
            late = "" if c["own"] else " (a refill the server counted after its window turned)"
            print(f"  redis {c['limit']} {c['window']}: counted {c['counted']} = granted "
                  f"{c['granted']} + refused and counted {c['counted'] - c['granted']} "
                  f"({c['refused']} hits answered OVER_LIMIT){late}")


def check_calls(run):
    lines = admitted(run["lines"])
    calls = run["calls"]
    print(f"\n  [{run['engine']}] refill calls {calls} for {len(lines)} admitted requests: "
          f"{calls / max(1, len(lines)):.3f} per admitted request")
    # Refusals are remembered for the window: a storm of 429s makes few calls.
    assert calls < len(run["results"]) / 20


def test_the_load_was_what_the_proof_needs(proof):
    check_load(proof)


def test_strict_charges_per_window_stay_within_the_limit_across_replicas(proof):
    check_charges(proof)


def test_redis_holds_what_was_granted_and_leases_strand_within_the_bound(proof):
    check_stranded(proof)


def test_remote_calls_and_latency(proof):
    check_calls(proof)
    ok = [r["latency"] for r in proof["results"] if r["status"] == 200]
    base_ok = [r["latency"] for r in proof["base"] if r["status"] == 200]
    print(f"  latency of 200s, global p50 {percentile(ok, 50) * 1000:.1f} ms p99 "
          f"{percentile(ok, 99) * 1000:.1f} ms; local p50 {percentile(base_ok, 50) * 1000:.1f} "
          f"ms p99 {percentile(base_ok, 99) * 1000:.1f} ms")
    large = admitted(proof["large_lines"])
    large_ok = [r["latency"] for r in proof["large"] if r["status"] == 200]
    print(f"  a budget of 2,000,000 tokens a minute: {proof['large_calls']} refill calls for "
          f"{len(large)} admitted requests ({proof['large_calls'] / max(1, len(large)):.4f} each); "
          f"latency p50 {percentile(large_ok, 50) * 1000:.1f} ms p99 "
          f"{percentile(large_ok, 99) * 1000:.1f} ms")
    assert len(large) > 100 and proof["large_calls"] < len(large) / 10


def test_local_budgets_alone_charge_about_three_times_the_limit(proof):
    lines = admitted(proof["base_lines"])
    per_minute = collections.Counter()
    for line in lines:
        per_minute[minute_of(line)] += charged(line)
    total = max(per_minute.values())
    print(f"\n  local budgets only: charged {dict(per_minute)} against a limit of {MINUTE_LIMIT}")
    assert total > 2 * MINUTE_LIMIT


# envoyproxy/ratelimit (its Redis cache: INCRBY, then compare), the shorter run.

def test_ratelimit_engine_the_load_was_what_the_proof_needs(proof_ratelimit):
    check_load(proof_ratelimit)


def test_ratelimit_engine_charges_within_what_it_granted_and_grants_within_the_limit(
        proof_ratelimit):
    check_charges(proof_ratelimit)


def test_ratelimit_engine_strands_within_the_bound_and_counts_refused_hits(proof_ratelimit):
    check_stranded(proof_ratelimit)


def test_ratelimit_engine_remote_calls(proof_ratelimit):
    check_calls(proof_ratelimit)
