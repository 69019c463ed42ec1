#!/usr/bin/env python3
"""`make bench`: Envoy + Tollgate against the same Envoy without the filter, in one run.

Variants: (a) bare Envoy, (b) Envoy + a no-op wasm filter (the floor any wasm filter pays),
(c) Envoy + tollgate.wasm with the shipped config shape. Upstream: a second Envoy answering with
`direct_response` (1 KB chat JSON, or an SSE stream). Load: wrk, 1 KB chat request bodies, at 1
and 16 connections. Per run: req/s, p50, p99, gateway Envoy CPU-µs per request (from
/proc/PID/stat), resident memory. Timing is printed, never asserted.

    python3 tests/bench/bench.py [--seconds 10] [--wasm path] [--only tollgate]
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests/e2e"))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
import render  # noqa: E402
from harness import ENVOY, WASM, free_port, http  # noqa: E402

NOOP = os.path.join(HERE, "noop/target/wasm32-wasip1/release/noop.wasm")
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY = "sk-bench-tenant-07"
DROP = []

CHAT_REQUEST = json.dumps({
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a terse assistant. " * 8},
        {"role": "user", "content": "Summarise the following text in one sentence. " + "lorem ipsum dolor sit amet " * 22},
    ],
    "max_tokens": 256,
    "temperature": 0.2,
})
CHAT_RESPONSE = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1760000000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Lorem ipsum dolor sit amet. " * 24},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 260, "completion_tokens": 170, "total_tokens": 430,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
})


def sse_response(chunks=20):
    def event(obj):
        return "data: " + json.dumps(obj) + "\n\n"
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1760000000, "model": "gpt-4o-mini"}
    out = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None})]
    for i in range(chunks):
        out.append(event({**base, "choices": [{"index": 0, "delta": {"content": f" word{i}"}}], "usage": None}))
    out.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}))
    out.append(event({**base, "choices": [], "usage": {"prompt_tokens": 260, "completion_tokens": chunks,
                                                          "total_tokens": 260 + chunks}}))
    out.append("data: [DONE]\n\n")
    return "".join(out)


def plugin_config(tenants=50):
    """A realistic configuration: tenants by API key (SHA-256), token and USD budgets, routing
    with an alias, prices, and the cache on (every request is eligible and misses: bodies differ)."""
    keys = [{"sha256": hashlib.sha256(f"sk-bench-tenant-{i:02d}".encode()).hexdigest(), "tenant": f"tenant-{i:02d}"}
            for i in range(tenants)]
    return {
        "identity": {"source": "api_key", "api_keys": keys},
        "tenants": {f"tenant-{i:02d}": {} for i in range(tenants)},
        "tenant_defaults": {
            "limits": [{"name": "tpm", "tokens": 10_000_000_000, "window": "minute"},
                       {"name": "daily-usd", "usd": "1000000", "window": "day"}],
            "max_concurrent": 1000, "max_output_tokens": 4096,
        },
        "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60", "cached_input": "0.075"},
                   "*": {"input": "1.00", "output": "2.00"}},
        "routing": {"models": {"gpt-4o-mini": {"route": "openai"}, "gpt-4o": {"route": "openai"}},
                    "aliases": {"fast": {"targets": [{"model": "gpt-4o-mini", "weight": 9},
                                                     {"model": "gpt-4o", "weight": 1}]}}},
        "cache": {"max_entries": 256, "max_bytes": 4194304, "policy": "deterministic"},
    }


def trimmed_config(drop):
    """The realistic configuration without some features (for `--drop cache,routing,limits`):
    what each feature costs per request."""
    config = plugin_config()
    for feature in drop:
        if feature == "limits":
            config["tenant_defaults"] = {}
        elif feature == "routing":
            config.pop("routing")
        elif feature:
            config.pop(feature)
    return config


class Proc:
    def __init__(self, config_text, workdir, name):
        self.path = os.path.join(workdir, name + ".yaml")
        with open(self.path, "w") as f:
            f.write(config_text)
        self.log = open(os.path.join(workdir, name + ".log"), "w")
        self.proc = subprocess.Popen([ENVOY, "-c", self.path, "--concurrency", "1", "--disable-hot-restart",
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


def gateway_config(variant, wasm, listen, admin, upstream, access_log):
    with open(os.path.join(ROOT, "envoy/tollgate.yaml")) as f:
        template = f.read()
    if variant == "bare":
        start = template.index("          - name: tollgate\n")
        end = template.index("          - name: envoy.filters.http.router\n")
        template = template[:start] + template[end:]
    return render.render(template, {
        "ADMIN_PORT": str(admin), "LISTEN_PORT": str(listen), "UPSTREAM_PORT": str(upstream),
        "ACCESS_LOG": access_log, "WASM_PATH": NOOP if variant == "noop" else wasm,
        "PLUGIN_CONFIG": json.dumps(json.dumps(trimmed_config(DROP))),
    })


def wrk(url, connections, seconds, stream, workdir):
    script = os.path.join(workdir, "post.lua")
    with open(script, "w") as f:
        headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
        if stream:
            headers["x-bench-stream"] = "1"
        body = json.loads(CHAT_REQUEST)
        body.update(model="fast", temperature=0)
        if stream:
            body["stream"] = True
        # Every request differs (a counter in the prompt): the cache is looked up and misses.
        template = json.dumps(body).replace("%", "%%").replace("Summarise", "[%d] Summarise", 1)
        f.write(f"local template = {json.dumps(template)}\n")
        f.write("local headers = {}\n")
        for k, v in headers.items():
            f.write(f'headers["{k}"] = "{v}"\n')
        f.write("local n = 0\n")
        f.write("request = function()\n  n = n + 1\n"
                "  return wrk.format(\"POST\", nil, headers, string.format(template, n))\nend\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
                          url + "/v1/chat/completions"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1, "ms": 1000, "s": 1e6}[unit]
    return {"rps": rps, "total": total, "p50": pct(50), "p99": pct(99), "errors": int(non2xx.group(1)) if non2xx else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--wasm", default=WASM)
    ap.add_argument("--only", default="")
    ap.add_argument("--drop", default="", help="features left out of Tollgate's config: cache,routing,limits")
    args = ap.parse_args()
    DROP.extend(args.drop.split(","))
    workdir = tempfile.mkdtemp(prefix="tollgate-bench-")
    with open(os.path.join(workdir, "chat.json"), "w") as f:
        f.write(CHAT_RESPONSE)
    with open(os.path.join(workdir, "chat.sse"), "w") as f:
        f.write(sse_response())
    backend_port, backend_admin = free_port(), free_port()
    with open(os.path.join(HERE, "backend.yaml")) as f:
        backend = Proc(render.render(f.read(), {
            "ADMIN_PORT": str(backend_admin), "LISTEN_PORT": str(backend_port),
            "JSON_BODY": os.path.join(workdir, "chat.json"), "SSE_BODY": os.path.join(workdir, "chat.sse")}),
            workdir, "backend")
    backend.wait_ready(backend_admin)
    variants = [v for v in ("bare", "noop", "tollgate") if not args.only or v in args.only.split(",")]
    results = {}
    try:
        for variant in variants:
            listen, admin = free_port(), free_port()
            gw = Proc(gateway_config(variant, args.wasm, listen, admin, backend_port,
                                     os.path.join(workdir, f"{variant}.access.log")), workdir, variant)
            gw.wait_ready(admin)
            url = f"http://127.0.0.1:{listen}"
            wrk(url, 4, 2, False, workdir)  # warm-up: VMs, connection pools
            for stream in (False, True):
                for conns in (1, 16):
                    before = gw.cpu_seconds()
                    r = wrk(url, conns, args.seconds, stream, workdir)
                    r["cpu_us"] = (gw.cpu_seconds() - before) * 1e6 / max(r["total"], 1)
                    r["rss"] = gw.rss_mib()
                    results[(variant, stream, conns)] = r
                    print(f"  {variant:9} {'sse ' if stream else 'json'} c={conns:<3} {r['rps']:9.0f} req/s  "
                          f"p50 {r['p50']:7.0f} µs  p99 {r['p99']:7.0f} µs  cpu {r['cpu_us']:6.1f} µs/req  "
                          f"rss {r['rss']:5.1f} MiB  non-2xx {r['errors']}", flush=True)
            gw.stop()
    finally:
        backend.stop()
    print(f"\nwasm: {os.path.relpath(args.wasm, ROOT)} {os.path.getsize(args.wasm)} bytes; "
          f"noop.wasm {os.path.getsize(NOOP)} bytes")
    print(f"{'body':5} {'conns':>5} {'variant':9} {'req/s':>9} {'×bare':>6} {'p50 µs':>8} {'+p50':>6} "
          f"{'p99 µs':>8} {'cpu µs':>7} {'+cpu':>6} {'rss MiB':>8}")
    for stream in (False, True):
        for conns in (1, 16):
            bare = results.get(("bare", stream, conns))
            for variant in variants:
                r = results[(variant, stream, conns)]
                ratio = r["rps"] / bare["rps"] if bare else float("nan")
                dp50 = r["p50"] - bare["p50"] if bare else float("nan")
                dcpu = r["cpu_us"] - bare["cpu_us"] if bare else float("nan")
                print(f"{'sse' if stream else 'json':5} {conns:>5} {variant:9} {r['rps']:9.0f} {ratio:6.2f} "
                      f"{r['p50']:8.0f} {dp50:+6.0f} {r['p99']:8.0f} {r['cpu_us']:7.1f} {dcpu:+6.1f} {r['rss']:8.1f}")


if __name__ == "__main__":
    main()
