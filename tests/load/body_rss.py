"""Envoy's resident memory under concurrent large request bodies (issue 18, item 15).

Starts the real Envoy with the built filter (or `--wasm PATH`) and the fake upstream, sends
`--concurrency` bodies of `--mib` MiB at once from one tenant, and prints VmRSS before, at the
peak (sampled every 50 ms) and after, plus how many requests got which status. Not part of
`make test`: it takes a few seconds and a few hundred MiB.

    .venv/bin/python tests/load/body_rss.py [--wasm target/.../tollgate.wasm] [--limits JSON]
"""
import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import harness  # noqa: E402


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wasm", default=harness.WASM)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--mib", type=float, default=3.9)
    parser.add_argument("--limits", default="{}", help="the plugin's limits section (JSON)")
    parser.add_argument("--path", default="/v1/chat/completions",
                        help="another path (e.g. /v1/other) passes through Tollgate unread")
    args = parser.parse_args()
    harness.WASM = os.path.abspath(args.wasm)
    limits = {"max_request_body_bytes": 4 * 1024 * 1024, **json.loads(args.limits)}
    config = {"identity": {"source": "header", "header": "x-tenant"}, "tenants": {"a": {}},
              "limits": limits}
    upstream = harness.FakeUpstream()
    envoy = harness.Envoy(config, upstream.port)
    content = "x" * int(args.mib * 1024 * 1024 - 200)
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                       "messages": [{"role": "user", "content": content}]}).encode()
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(envoy.proc.pid))
            time.sleep(0.05)

    def send(_):
        req = urllib.request.Request(envoy.url + args.path, data=body, method="POST",
                                     headers={"content-type": "application/json", "x-tenant": "a"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError as err:
            return type(err).__name__

    try:
        time.sleep(1)
        before = rss_mib(envoy.proc.pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            statuses = [str(s) for s in pool.map(send, range(args.concurrency))]
        stop.set()
        sampler.join()
        time.sleep(2)
        after = rss_mib(envoy.proc.pid)
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        print(f"{args.concurrency} x {args.mib} MiB to {args.path}, limits {json.dumps(limits)}: RSS before "
              f"{before:.0f} MiB, peak {peak[0]:.0f} MiB, after {after:.0f} MiB; statuses {counts}")
    finally:
        envoy.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
