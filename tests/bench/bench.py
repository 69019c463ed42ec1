#!/usr/bin/env python3
"""`make bench`: what a wasm filter and Tollgate cost Envoy, side by side in one run.

Gateway variants, each the shipped envoy/tollgate.yaml (Envoy 1.40, V8, `--concurrency 1`):
  bare       no wasm filter
  noop       a Rust wasm filter that does nothing (tests/bench/noop/): the floor any filter pays
  naive      the obvious filter doing Tollgate's kind of work (tests/bench/naive/): both bodies
             buffered and serde-parsed, a route header + clear_route_cache, one CAS, one counter
  minimal    Tollgate: API keys (SHA-256), one token limit, one routed model; no cache, no USD
             limit, no concurrency limit
  realistic  minimal + a USD limit (with prices) + max_concurrent + the cache (deterministic); the
             request has `temperature: 0.2`, so the cache is bypassed
  hit        the realistic config, the same body every time with `temperature: 0`: after the
             first request every request is a cache hit
  gemini     the minimal config for a Gemini model: `…/models/gemini-2.5-flash:generateContent`,
             a Gemini body and answer (JSON only)
  converse   the minimal config for a Bedrock model: `…/model/anthropic.claude…:0/converse`, a
             Converse body and answer (JSON only; Tollgate re-encodes the path's model id)
  global     the minimal config with its token limit `global`: leased from the test rate-limit
             service (tests/rls, Limitador's answers, over Redis) in refills of a quarter of what
             is left, so a request pays for the lease check and, rarely, a refill (JSON only)
  minimal@before, realistic@before
             with --before WASM: the minimal and realistic configs with another build (say the
             previous commit's), timed in the same run as the current one
With --ladder the Tollgate variants are instead one feature added at a time (base, +tokens,
+routing, +usd, +concurrent, +cache) and a per-feature cost table is printed.

Upstream: a second Envoy answering with `direct_response` after reading the request body (1 KB
chat JSON, or a 22-event SSE stream). Load: wrk, a ~1.16 KB chat body, 1 and 16 connections, JSON
and SSE. Per run: req/s, p50, p99, gateway Envoy CPU µs per request (utime + stime from /proc),
RSS, and non-2xx / socket errors. Timing is printed, never asserted.

Then (--rss-seconds) the memory: bare, noop, minimal and realistic each started at `--concurrency
1` and 2, driven for a few seconds at 16 connections, and their RSS read (a worker is one more
wasm VM: compiled code and linear memory).

Then, per wasm variant with a counting build (tollgate `--features bench-count`, naive
`--features count`), a short run (--count-seconds, 4 connections) gives host calls and
allocations per request: the counters wasmcustom.tollgate.bench.{host_calls,allocations} over
the requests Envoy completed (http.llm.downstream_rq_completed). Timing comes only from the
normal builds.

    python3 tests/bench/bench.py [--seconds 10] [--only bare,minimal] [--ladder] [--count-seconds 2]
                                 [--before path/to/previous/tollgate.wasm]
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests/e2e"))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
import render  # noqa: E402
from harness import ENVOY, WASM, free_port, http  # noqa: E402

NOOP = os.path.join(HERE, "noop/target/wasm32-wasip1/release/noop.wasm")
NAIVE = os.path.join(HERE, "naive/target/wasm32-wasip1/release/naive.wasm")
BEFORE_TEMPLATE = ""  # set by --before-template
RATELIMIT_ENDPOINTS = "127.0.0.1:8081"  # the test rate-limit service's, when `global` runs
NAIVE_COUNT = os.path.join(HERE, "naive/target/count/wasm32-wasip1/release/naive.wasm")
COUNT_WASM = os.path.join(ROOT, "target/bench-count/wasm32-wasip1/release/tollgate.wasm")
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY = "sk-bench-tenant-07"
MODEL = "gpt-4o-mini"

CHAT_REQUEST = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a terse assistant. " * 8},
        {"role": "user", "content": "Summarise the following text in one sentence. " + "lorem ipsum dolor sit amet " * 28},
    ],
    "max_tokens": 256,
    "temperature": 0.2,
}
CHAT_RESPONSE = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1760000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Lorem ipsum dolor sit amet. " * 24},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 260, "completion_tokens": 170, "total_tokens": 430,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
})


def sse_response(chunks=20):
    def event(obj):
        return "data: " + json.dumps(obj) + "\n\n"
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1760000000, "model": MODEL}
    out = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None})]
    for i in range(chunks):
        out.append(event({**base, "choices": [{"index": 0, "delta": {"content": f" word{i}"}}], "usage": None}))
    out.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}))
    out.append(event({**base, "choices": [], "usage": {"prompt_tokens": 260, "completion_tokens": chunks,
                                                          "total_tokens": 260 + chunks}}))
    out.append("data: [DONE]\n\n")
    return "".join(out)


# Tollgate features, in the order --ladder adds them.
LADDER = ("tokens", "routing", "usd", "concurrent", "cache")
MINIMAL = ("tokens", "routing")
REALISTIC = LADDER


GEMINI_MODEL = "gemini-2.5-flash"
BEDROCK_MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
GEMINI_REQUEST = {
    "contents": [{"role": "user", "parts": [{"text": CHAT_REQUEST["messages"][1]["content"]}]}],
    "systemInstruction": {"parts": [{"text": CHAT_REQUEST["messages"][0]["content"]}]},
    "generationConfig": {"maxOutputTokens": 256, "temperature": 0.2},
}
GEMINI_RESPONSE = json.dumps({
    "candidates": [{"content": {"role": "model", "parts": [{"text": "Lorem ipsum dolor sit amet. " * 24}]},
                    "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 260, "candidatesTokenCount": 170, "totalTokenCount": 430},
    "modelVersion": GEMINI_MODEL, "responseId": "bench",
})
CONVERSE_REQUEST = {
    "messages": [{"role": "user", "content": [{"text": CHAT_REQUEST["messages"][1]["content"]}]}],
    "system": [{"text": CHAT_REQUEST["messages"][0]["content"]}],
    "inferenceConfig": {"maxTokens": 256, "temperature": 0.2},
}
CONVERSE_RESPONSE = json.dumps({
    "output": {"message": {"role": "assistant", "content": [{"text": "Lorem ipsum dolor sit amet. " * 24}]}},
    "stopReason": "end_turn",
    "usage": {"inputTokens": 260, "outputTokens": 170, "totalTokens": 430},
    "metrics": {"latencyMs": 500},
})
# api -> (request path, model, request body, answer file name)
APIS = {
    "chat": ("/v1/chat/completions", MODEL, CHAT_REQUEST, "chat.json"),
    "gemini": (f"/v1beta/models/{GEMINI_MODEL}:generateContent", GEMINI_MODEL, GEMINI_REQUEST, "gemini.json"),
    "converse": (f"/model/{BEDROCK_MODEL}/converse", BEDROCK_MODEL, CONVERSE_REQUEST, "converse.json"),
    "tree": ("/v1/chat/completions", MODEL, CHAT_REQUEST, "chat.json"),
    "global": ("/v1/chat/completions", MODEL, CHAT_REQUEST, "chat.json"),
}


def tollgate_config(features, tenants=50, model=MODEL):
    """Tenants by API key (SHA-256 digests) plus `features`: tokens (one token limit), routing
    (a routing table with the requested model only), usd (a USD limit and the model's prices),
    concurrent (max_concurrent), cache (deterministic policy)."""
    keys = [{"sha256": hashlib.sha256(f"sk-bench-tenant-{i:02d}".encode()).hexdigest(), "tenant": f"tenant-{i:02d}"}
            for i in range(tenants)]
    config = {"identity": {"source": "api_key", "api_keys": keys},
              "tenants": {f"tenant-{i:02d}": {} for i in range(tenants)}}
    policy = {"limits": []}
    if "tokens" in features:
        policy["limits"].append({"name": "tpm", "tokens": 10_000_000_000, "window": "minute"})
    if "usd" in features:
        policy["limits"].append({"name": "daily-usd", "usd": "1000000", "window": "day"})
        config["prices"] = {model: {"input": "0.15", "output": "0.60", "cached_input": "0.075"}}
    if "concurrent" in features:
        policy["max_concurrent"] = 1000
    if not policy["limits"]:
        del policy["limits"]
    if policy:
        config["tenant_defaults"] = policy
    if "routing" in features:
        config["routing"] = {"models": {model: {"route": "openai"}}}
    if "cache" in features:
        config["cache"] = {"max_entries": 256, "max_bytes": 4194304, "policy": "deterministic"}
    if "global" in features:
        config["global_budgets"] = {"cluster": "ratelimit", "replicas": 1, "refill_share": 0.25}
        for limit in policy["limits"]:
            limit["global"] = True
    if "tree" in features:
        # A 3-level tree (tenant → team → org, a token limit each), a per-user limit (users from
        # x-user) and a conversation limit (x-conversation-id): what such a request touches.
        big = 10_000_000_000
        for name in config["tenants"]:
            config["tenants"][name] = {"parent": "team"}
        config["tenants"]["team"] = {"parent": "org", "limits": [{"name": "team-tpm", "tokens": big, "window": "minute"}]}
        config["tenants"]["org"] = {"limits": [{"name": "org-tpm", "tokens": big, "window": "minute"}]}
        config["identity"]["user"] = {"source": "header", "header": "x-user"}
        policy["user_limits"] = [{"name": "user-tpm", "tokens": big, "window": "minute"}]
        policy["conversation_limits"] = {"max_requests": 10**15, "tokens": 10**15}
        config["conversations"] = {"header": "x-conversation-id"}
        config["tenant_defaults"] = policy
    return config


def variants(ladder, before=None):
    """name -> (wasm, counting wasm or None, plugin config, request temperature, api)."""
    out = {"bare": (None, None, {}, 0.2, "chat"), "noop": (NOOP, None, {}, 0.2, "chat"),
           "naive": (NAIVE, NAIVE_COUNT, {}, 0.2, "chat")}
    if ladder:
        for i, feature in enumerate(("base",) + LADDER):
            name = "base" if i == 0 else "+" + feature
            out[name] = (WASM, COUNT_WASM, tollgate_config(LADDER[:i]), 0.2, "chat")
    else:
        out["minimal"] = (WASM, COUNT_WASM, tollgate_config(MINIMAL), 0.2, "chat")
        out["realistic"] = (WASM, COUNT_WASM, tollgate_config(REALISTIC), 0.2, "chat")
        out["hit"] = (WASM, COUNT_WASM, tollgate_config(REALISTIC), 0, "chat")
        if before:
            out["minimal@before"] = (before, None, tollgate_config(MINIMAL), 0.2, "chat")
            out["realistic@before"] = (before, None, tollgate_config(REALISTIC), 0.2, "chat")
        out["tree"] = (WASM, COUNT_WASM, tollgate_config(MINIMAL + ("tree",)), 0.2, "tree")
        out["gemini"] = (WASM, COUNT_WASM, tollgate_config(MINIMAL, model=GEMINI_MODEL), 0.2, "gemini")
        out["converse"] = (WASM, COUNT_WASM, tollgate_config(MINIMAL, model=BEDROCK_MODEL), 0.2, "converse")
        out["global"] = (WASM, COUNT_WASM, tollgate_config(MINIMAL + ("global",)), 0.2, "global")
    return out


def request_body(stream, temperature, api="chat"):
    if api == "gemini":
        return json.dumps(dict(GEMINI_REQUEST, generationConfig=dict(GEMINI_REQUEST["generationConfig"],
                                                                     temperature=temperature)))
    if api == "converse":
        return json.dumps(dict(CONVERSE_REQUEST, inferenceConfig=dict(CONVERSE_REQUEST["inferenceConfig"],
                                                                      temperature=temperature)))
    body = dict(CHAT_REQUEST, temperature=temperature)
    if stream:
        body["stream"] = True
    return json.dumps(body)


def start_rls(config):
    """The test rate-limit service over a fresh Redis, serving `config`'s global limits."""
    global RATELIMIT_ENDPOINTS
    from harness import RateLimitService, Redis
    redis = Redis()
    rls = RateLimitService(config, redis)
    RATELIMIT_ENDPOINTS = f"127.0.0.1:{rls.port}"
    return redis, rls


def rss_run(name, wasm, config, upstream, seconds, workdir, concurrency):
    """RSS in MiB of a gateway at `concurrency` workers after `seconds` at 16 connections."""
    gw = Gateway(f"{name}.rss{concurrency}", wasm, config, upstream, workdir, concurrency)
    try:
        wrk(gw.url, 16, seconds, False, 0.2, workdir, "chat")
        return gw.rss_mib()
    finally:
        gw.stop()


def request_headers(stream, api="chat"):
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    if api == "tree":
        headers["x-user"] = "bench-user"
        headers["x-conversation-id"] = "bench-conversation"
        return headers
    if api == "global":
        return headers
    if stream:
        headers["x-bench-stream"] = "1"
    if api != "chat":
        headers["x-bench-api"] = api
    return headers


class Proc:
    def __init__(self, config_text, workdir, name, concurrency=1):
        self.path = os.path.join(workdir, name + ".yaml")
        with open(self.path, "w") as f:
            f.write(config_text)
        self.log = open(os.path.join(workdir, name + ".log"), "w")
        self.proc = subprocess.Popen([ENVOY, "-c", self.path, "--concurrency", str(concurrency), "--disable-hot-restart",
                                      "--log-level", "warn"], stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, admin_port):
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{admin_port}/ready", timeout=1)[2].strip() == b"LIVE":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(open(self.log.name).read()[-3000:])
            time.sleep(0.1)
        raise RuntimeError("envoy not ready")

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Gateway(Proc):
    """The shipped envoy/tollgate.yaml with `wasm` as its filter (none: the filter removed)."""

    def __init__(self, name, wasm, plugin_config, upstream, workdir, concurrency=1):
        # The @before variants run with the before commit's own config when given (its access
        # log is part of what it costs).
        path = BEFORE_TEMPLATE if name.endswith("@before") and BEFORE_TEMPLATE else os.path.join(ROOT, "envoy/tollgate.yaml")
        with open(path) as f:
            template = f.read()
        if wasm is None:
            start = template.index("          - name: tollgate\n")
            end = template.index("          - name: envoy.filters.http.router\n")
            template = template[:start] + template[end:]
        self.listen, self.admin = free_port(), free_port()
        super().__init__(render.render(template, {
            "ADMIN_PORT": str(self.admin), "LISTEN_PORT": str(self.listen), "UPSTREAM_PORT": str(upstream),
            "ACCESS_LOG": os.path.join(workdir, f"{name}.access.log"), "WASM_PATH": wasm or NOOP,
            "PLUGIN_CONFIG": json.dumps(json.dumps(plugin_config)),
            "RATELIMIT_ENDPOINTS": RATELIMIT_ENDPOINTS,
        }), workdir, name, concurrency)
        try:
            self.wait_ready(self.admin)
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.listen}"

    def stats(self, pattern):
        """Counters whose name matches the regex `pattern`, from the admin's /stats."""
        text = http("GET", f"http://127.0.0.1:{self.admin}/stats?filter={urllib.parse.quote(pattern)}", timeout=5)[2].decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def probe(self, stream, temperature, api="chat"):
        """One request as wrk sends it: (status, x-tollgate-cache, the x-tollgate-route header the
        upstream received: the backend echoes it; "-" when the gateway answered itself)."""
        status, headers, _ = http("POST", self.url + APIS[api][0],
                                  request_body(stream, temperature, api).encode(), request_headers(stream, api))
        route = headers.get("x-bench-route", "-") or "(none)"
        return status, headers.get("x-tollgate-cache", "-"), route


def wrk(url, connections, seconds, stream, temperature, workdir, api="chat"):
    script = os.path.join(workdir, "post.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f"wrk.body = {json.dumps(request_body(stream, temperature, api))}\n")
        for k, v in request_headers(stream, api).items():
            f.write(f'wrk.headers["{k}"] = "{v}"\n')
    proc = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
                           url + APIS[api][0]], capture_output=True, text=True)
    out = proc.stdout

    def number(pattern, cast=int, default=0):
        m = re.search(pattern, out, re.M)
        return cast(m.group(1)) if m else default

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result = {"rps": number(r"Requests/sec:\s+([\d.]+)", float), "total": number(r"(\d+) requests in"),
              "p50": pct(50), "p99": pct(99), "non2xx": number(r"Non-2xx or 3xx responses: (\d+)"),
              "socket": sum(int(g) for g in socket.groups()) if socket else 0}
    if not result["total"]:
        print(f"    wrk produced no requests: {proc.stderr.strip() or out.strip()}", flush=True)
    return result


def errors(r):
    return r["non2xx"] + r["socket"] + (0 if r["total"] else 1)


def count_run(name, wasm, config, temperature, upstream, seconds, workdir, api="chat"):
    """Host calls and allocations per request with a counting build:
    {stream: (calls per request, allocations per request, requests, errors)}."""
    gw = Gateway(name + ".count", wasm, config, upstream, workdir)
    out = {}
    try:
        pattern = r"^(wasmcustom\.tollgate\.bench\.|http\.llm\.downstream_rq_completed$)"
        for stream in STREAMS[api]:
            gw.probe(stream, temperature, api)
            wrk(gw.url, 4, 1, stream, temperature, workdir, api)  # warm-up: VM, pools, metric ids, cache
            time.sleep(0.3)
            before = gw.stats(pattern)
            r = wrk(gw.url, 4, seconds, stream, temperature, workdir, api)
            time.sleep(0.5)  # requests cut by wrk's end are logged (and flushed) a moment later
            after = gw.stats(pattern)

            def delta(suffix):
                return sum(v - before.get(k, 0) for k, v in after.items() if k.endswith(suffix))
            served = delta("downstream_rq_completed")
            calls, allocs = delta("bench.host_calls"), delta("bench.allocations")
            if not served or not (calls or allocs):
                print(f"    {name} count run: no counters ({after}); skipped", flush=True)
                continue
            out[stream] = (calls / served, allocs / served, served, errors(r))
            by_name = {k.rsplit(".", 1)[1]: v - before.get(k, 0) for k, v in after.items()
                       if ".bench.calls." in k and v > before.get(k, 0)}
            if by_name:
                print(f"    {name} {'sse' if stream else 'json'} host calls per request: " + ", ".join(
                    f"{k} {v / served:.1f}" for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])),
                    flush=True)
    finally:
        gw.stop()
    return out


# The other APIs are timed with JSON answers only.
STREAMS = {"chat": (False, True), "gemini": (False,), "converse": (False,), "tree": (False,), "global": (False,)}


def main():
    global WASM, BEFORE_TEMPLATE
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10, help="each timed wrk run")
    ap.add_argument("--only", default="", help="variants to run, e.g. bare,minimal")
    ap.add_argument("--ladder", action="store_true",
                    help="Tollgate variants add one feature at a time: base, +tokens, +routing, +usd, "
                         "+concurrent, +cache (bypass); prints the per-feature cost")
    ap.add_argument("--count-seconds", type=int, default=2,
                    help="the counting builds' run per body (0: no host call / allocation counts)")
    ap.add_argument("--rss-seconds", type=int, default=3,
                    help="load before reading the RSS at --concurrency 1 and 2 (0: no RSS table)")
    ap.add_argument("--wasm", default=WASM, help="the tollgate.wasm timed")
    ap.add_argument("--before", default="", help="another tollgate.wasm (say the previous commit's), timed "
                                                   "as minimal@before and realistic@before in the same run")
    ap.add_argument("--before-template", default="",
                    help="the Envoy template the @before variants run with (the before commit's envoy/tollgate.yaml)")
    args = ap.parse_args()
    WASM = os.path.abspath(args.wasm)
    BEFORE_TEMPLATE = os.path.abspath(args.before_template) if args.before_template else ""
    table = variants(args.ladder, os.path.abspath(args.before) if args.before else None)
    only = [v for v in args.only.split(",") if v]
    if set(only) - set(table):
        sys.exit(f"--only: unknown variant(s) {', '.join(sorted(set(only) - set(table)))}; "
                 f"variants: {', '.join(table)}")
    names = [v for v in table if not only or v in only]
    for name in names:
        for path in table[name][:2]:
            if path and not os.path.exists(path):
                sys.exit(f"{name}: {os.path.relpath(path, ROOT)} is missing (make bench builds it)")
    workdir = tempfile.mkdtemp(prefix="tollgate-bench-")
    with open(os.path.join(workdir, "chat.json"), "w") as f:
        f.write(CHAT_RESPONSE)
    for name, text in (("gemini.json", GEMINI_RESPONSE), ("converse.json", CONVERSE_RESPONSE)):
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    with open(os.path.join(workdir, "chat.sse"), "w") as f:
        f.write(sse_response())
    print(f"request body: {len(request_body(False, 0.2))} bytes JSON, {len(request_body(True, 0.2))} streamed; "
          f"response: {len(CHAT_RESPONSE)} bytes JSON, {len(sse_response())} SSE; {args.seconds} s per run", flush=True)
    backend_port, backend_admin = free_port(), free_port()
    with open(os.path.join(HERE, "backend.yaml")) as f:
        backend = Proc(render.render(f.read(), {
            "ADMIN_PORT": str(backend_admin), "LISTEN_PORT": str(backend_port),
            "JSON_BODY": os.path.join(workdir, "chat.json"), "SSE_BODY": os.path.join(workdir, "chat.sse"),
            "GEMINI_BODY": os.path.join(workdir, "gemini.json"),
            "CONVERSE_BODY": os.path.join(workdir, "converse.json")}),
            workdir, "backend")
    backend.wait_ready(backend_admin)
    results, counts, probe_errors, rss = {}, {}, [], {}
    rls_stack = start_rls(table["global"][2]) if "global" in names else ()
    try:
        for name in names:
            wasm, count_wasm, config, temperature, api = table[name]
            gw = Gateway(name, wasm, config, backend_port, workdir)
            try:
                for stream in STREAMS[api]:
                    status, cache, route = gw.probe(stream, temperature, api)
                    if temperature == 0:
                        status, cache, route = gw.probe(stream, temperature, api)  # the first one stored it
                    flag = "" if status == 200 else "  <-- ERRORS"
                    if flag:
                        probe_errors.append(f"{name} {'sse' if stream else 'json'} probe: status {status}")
                    print(f"  {name:11} {'sse ' if stream else 'json'} probe: status {status}, "
                          f"upstream got x-tollgate-route {route}, x-tollgate-cache {cache}{flag}", flush=True)
                wrk(gw.url, 4, 2, False, temperature, workdir, api)  # warm-up: VMs, connection pools
                for stream in STREAMS[api]:
                    for conns in (1, 16):
                        before = gw.cpu_seconds()
                        r = wrk(gw.url, conns, args.seconds, stream, temperature, workdir, api)
                        r["cpu_us"] = (gw.cpu_seconds() - before) * 1e6 / max(r["total"], 1)
                        r["rss"] = gw.rss_mib()
                        results[(name, stream, conns)] = r
                        flag = "  <-- ERRORS" if errors(r) else ""
                        print(f"  {name:11} {'sse ' if stream else 'json'} c={conns:<3} {r['rps']:9.0f} req/s  "
                              f"p50 {r['p50']:7.0f} µs  p99 {r['p99']:7.0f} µs  cpu {r['cpu_us']:6.1f} µs/req  "
                              f"rss {r['rss']:5.1f} MiB  non-2xx {r['non2xx']}  socket errors {r['socket']}{flag}",
                              flush=True)
            finally:
                gw.stop()
        if args.count_seconds:
            for name in names:
                wasm, count_wasm, config, temperature, api = table[name]
                if count_wasm:
                    counts[name] = count_run(name, count_wasm, config, temperature, backend_port,
                                             args.count_seconds, workdir, api)
        if args.rss_seconds:
            for name in [n for n in ("bare", "noop", "minimal", "realistic") if n in names]:
                wasm, _, config, _, _ = table[name]
                for concurrency in (1, 2):
                    rss[(name, concurrency)] = rss_run(name, wasm, config, backend_port, args.rss_seconds,
                                                       workdir, concurrency)
    finally:
        for proc in reversed(rls_stack):
            proc.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the access logs: hundreds of MB
    report(args, names, results, counts, probe_errors, rss)


def report(args, names, results, counts, probe_errors, rss):
    sizes = [(os.path.relpath(p, ROOT), os.path.getsize(p)) for p in (WASM, NOOP, NAIVE, COUNT_WASM, NAIVE_COUNT)
             if os.path.exists(p)]
    print("\nwasm: " + "; ".join(f"{p} {n} bytes" for p, n in sizes))
    print(f"\n{'body':5} {'conns':>5} {'variant':11} {'req/s':>9} {'×bare':>6} {'p50 µs':>8} {'+p50':>6} "
          f"{'p99 µs':>8} {'cpu µs':>7} {'+cpu':>6} {'rss MiB':>8} {'+rss':>6} {'errors':>6}")
    nan = float("nan")
    for stream in (False, True):
        for conns in (1, 16):
            bare = results.get(("bare", stream, conns))
            for name in names:
                r = results.get((name, stream, conns))
                if r is None:
                    continue
                ratio = r["rps"] / bare["rps"] if bare and bare["rps"] else nan
                dp50 = r["p50"] - bare["p50"] if bare else nan
                dcpu = r["cpu_us"] - bare["cpu_us"] if bare else nan
                drss = r["rss"] - bare["rss"] if bare else nan
                print(f"{'sse' if stream else 'json':5} {conns:>5} {name:11} {r['rps']:9.0f} {ratio:6.2f} "
                      f"{r['p50']:8.0f} {dp50:+6.0f} {r['p99']:8.0f} {r['cpu_us']:7.1f} {dcpu:+6.1f} "
                      f"{r['rss']:8.1f} {drss:+6.1f} {errors(r):6}")
    for line in probe_errors:
        print(f"!! {line}")
    failed = [(k, r) for k, r in results.items() if errors(r)]
    for (name, stream, conns), r in failed:
        print(f"!! {name} {'sse' if stream else 'json'} c={conns}: {r['non2xx']} non-2xx, "
              f"{r['socket']} socket errors, {r['total']} requests")
    if args.ladder:
        steps = [n for n in names if n == "base" or n.startswith("+")]
        print("\nper feature: Envoy CPU µs per request added by each step (base: over bare)")
        print(f"{'feature':12} " + " ".join(f"{('sse' if s else 'json') + ' c=' + str(c):>10}"
                                            for s in (False, True) for c in (1, 16)))
        for i, name in enumerate(steps):
            prev = "bare" if i == 0 else steps[i - 1]
            cells = []
            for s in (False, True):
                for c in (1, 16):
                    a, b = results.get((name, s, c)), results.get((prev, s, c))
                    cells.append(f"{a['cpu_us'] - b['cpu_us']:+10.1f}" if a and b else f"{'':>10}")
            print(f"{name:12} " + " ".join(cells))
    if rss:
        print(f"\nRSS MiB after {args.rss_seconds} s at 16 connections (+: over bare; Tollgate also over noop)")
        print(f"{'variant':11} {'c=1':>7} {'+bare':>7} {'+noop':>7} {'c=2':>7} {'+bare':>7} {'+noop':>7}")
        for name in ("bare", "noop", "minimal", "realistic"):
            cells = []
            for c in (1, 2):
                mib, bare, noop = rss.get((name, c)), rss.get(("bare", c)), rss.get(("noop", c))
                cells += [f"{mib:7.1f}" if mib else f"{'':>7}",
                          f"{mib - bare:+7.1f}" if mib and bare and name != "bare" else f"{'':>7}",
                          f"{mib - noop:+7.1f}" if mib and noop and name not in ("bare", "noop") else f"{'':>7}"]
            if any(c.strip() for c in cells):
                print(f"{name:11} " + " ".join(cells))
    if counts:
        print(f"\nper request, counting builds ({args.count_seconds} s, 4 connections; host calls: wasm -> Envoy)")
        print(f"{'variant':11} {'json calls':>10} {'json allocs':>11} {'sse calls':>10} {'sse allocs':>11} {'requests':>9}")
        for name in names:
            if name not in counts:
                continue
            c = counts[name]
            cells = []
            for stream in (False, True):
                calls, allocs, _, _ = c.get(stream, (nan, nan, 0, 0))
                cells += [f"{calls:10.1f}", f"{allocs:11.1f}"]
            served = "/".join(str(c[s][2]) for s in (False, True) if s in c)
            bad = sum(c[s][3] for s in c)
            print(f"{name:11} {' '.join(cells)} {served:>9}" + (f"  <-- {bad} errors" if bad else ""))


if __name__ == "__main__":
    main()
