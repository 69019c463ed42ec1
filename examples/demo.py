#!/usr/bin/env python3
"""`make demo`: the fake LLM upstream and the real Envoy 1.40 with tollgate.wasm, on loopback.

Sends a few requests with the official SDKs (two tenants, JSON and streaming, a refusal) and
prints what Tollgate saw: the answers and the JSON access-log lines (the per-request ledger).
`--serve` keeps everything up until Ctrl-C so you can try it with curl or the SDKs.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests/e2e"))

import anthropic  # noqa: E402
import openai  # noqa: E402
from harness import Envoy, FakeUpstream, http  # noqa: E402

KEY_A, KEY_B = "sk-demo-team-a", "sk-demo-team-b"  # envoy/tollgate.json holds their SHA-256


def step(text):
    print(f"\n\033[1m▶ {text}\033[0m", flush=True)


def main():
    serve = "--serve" in sys.argv
    step("starting the fake LLM upstream and Envoy 1.40 with tollgate.wasm")
    upstream = FakeUpstream("demo-provider")
    with open(os.path.join(ROOT, "envoy/tollgate.json"), encoding="utf-8") as f:
        envoy = Envoy(json.load(f), upstream.port)
    print(f"  upstream  {upstream.url}\n  envoy     {envoy.url}  (admin {envoy.admin})")
    try:
        oai = openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY_A, max_retries=0)
        step("team-a: OpenAI chat completion through Envoy")
        r = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
        print(f"  answer: {r.choices[0].message.content!r}\n  usage:  {r.usage.prompt_tokens} in, "
              f"{r.usage.completion_tokens} out")

        step("team-a asks for the alias 'smart': Tollgate routes it, Envoy's route table serves it")
        raw = oai.chat.completions.with_raw_response.create(
            model="smart", messages=[{"role": "user", "content": "Think hard."}])
        print(f"  x-tollgate-model: {raw.headers['x-tollgate-model']}  "
              f"(upstream saw model {raw.parse().model!r})")

        step("team-b: Anthropic streaming message through Envoy")
        claude = anthropic.Anthropic(base_url=envoy.url, api_key=KEY_B, max_retries=0)
        with claude.messages.stream(model="claude-3-5-haiku", max_tokens=64,
                                    messages=[{"role": "user", "content": "Hi"}]) as stream:
            text = "".join(stream.text_stream)
        print(f"  streamed: {text!r}")

        step("team-b asks for more than is left of its 2,000 tokens per minute: 429")
        oai_b = openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY_B, max_retries=0)
        try:
            oai_b.chat.completions.create(model="gpt-4o-mini", max_tokens=1990,
                                          messages=[{"role": "user", "content": "a long essay"}])
        except openai.RateLimitError as err:
            print(f"  openai.RateLimitError {err.status_code} ({err.code}), retry-after "
                  f"{err.response.headers['retry-after']}s: {err.body['message']}")

        step("the usage view: each tenant's budgets (GET /tollgate/usage with the admin token)")
        view = json.loads(http("GET", envoy.url + "/tollgate/usage", None,
                               {"authorization": "Bearer tollgate-admin-demo"})[2])
        for tenant in view["tenants"]:
            for limit in tenant["limits"]:
                print(f"  {tenant['tenant']:7} {limit['name']:10} used {limit['used']:>10} of {limit['limit']:>8}"
                      f"  reserved {limit['reserved']}  resets {limit['resets_at']}")

        step("an unknown API key is refused in the API's own error shape")
        try:
            openai.OpenAI(base_url=envoy.url + "/v1", api_key="sk-stolen", max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError as err:
            print(f"  openai.AuthenticationError {err.status_code}: {err.body['message']}")

        step("the access log: one JSON line per request (tenant, API, model, tokens)")
        time.sleep(0.3)
        lines = [line for line in envoy.access_lines() if line["api"]]
        for line in lines:
            keep = {k: line[k] for k in ("status", "tenant", "api", "model", "served_model", "stream", "input_tokens",
                                         "output_tokens", "usage_source", "decision")}
            print("  " + json.dumps(keep))
        ok = len(lines) == 5
        if serve:
            step(f"serving: try  curl {envoy.url}/v1/chat/completions -H 'authorization: Bearer {KEY_A}' "
                 "-d '{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'")
            print("  Ctrl-C stops Envoy and the upstream.")
            while True:
                time.sleep(3600)
        step("demo done" if ok else "demo FAILED: expected 5 access-log lines")
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 0
    finally:
        envoy.stop()
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
