#!/usr/bin/env python3
"""`make demo`: the fake LLM upstream and the real Envoy 1.40 with tollgate.wasm, on loopback.

A short narrated scenario with the official SDKs: two tenants, an alias routed to another model,
a cache hit, a Gemini call (google-genai) and a Bedrock Converse call (boto3), a tenant hitting its
token budget (the 429), an unknown key, then the ledger lines and the Prometheus metrics. In a terminal it then keeps Envoy up until Ctrl-C (or
`make demo-stop`); without a terminal (CI) it stops after the scenario. `--serve` / `--no-serve`
force either.
"""
import json
import os
import signal
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests/e2e"))

import anthropic  # noqa: E402
import boto3  # noqa: E402
import openai  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402
from google import genai  # noqa: E402
from google.genai import types as genai_types  # noqa: E402
from harness import Envoy, FakeUpstream, http  # noqa: E402
from render import ENVOY_FLAGS  # noqa: E402

KEY_A, KEY_B = "sk-demo-team-a", "sk-demo-team-b"  # envoy/tollgate.json holds their SHA-256
ADMIN_TOKEN = "tollgate-admin-demo"
# The Gemini and Bedrock models of the demo, routed and priced as in envoy/tollgate-providers.json
# (prices from examples/prices/prices-2026-12-07.json).
GEMINI = "gemini-2.5-flash"
BEDROCK = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
PID_FILE = os.path.join(ROOT, ".run/demo.pid")
BOLD, DIM, END = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def step(text):
    print(f"\n{BOLD}▶ {text}{END}", flush=True)


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def scenario(envoy):
    oai = openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY_A, max_retries=0)

    step("team-a: an OpenAI chat completion through Envoy")
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
    print(f"  answer {r.choices[0].message.content!r}; usage {r.usage.prompt_tokens} in, "
          f"{r.usage.completion_tokens} out")

    step("team-a asks for the alias 'smart': Tollgate picks the model, Envoy's route table serves it")
    raw = oai.chat.completions.with_raw_response.create(
        model="smart", messages=[{"role": "user", "content": "Think hard."}])
    print(f"  x-tollgate-model: {raw.headers['x-tollgate-model']} (the upstream saw model {raw.parse().model!r})")

    step("team-a asks the same deterministic question twice: the second answer comes from the cache")
    for attempt in (1, 2):
        raw = oai.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": "What is Envoy?"}])
        print(f"  attempt {attempt}: x-tollgate-cache: {raw.headers['x-tollgate-cache']}")

    step("team-a: Gemini generateContent with google-genai (the model is in the path, the key in x-goog-api-key)")
    gemini = genai.Client(api_key=KEY_A, http_options=genai_types.HttpOptions(base_url=envoy.url))
    r = gemini.models.generate_content(model=GEMINI, contents="Hello!")
    um = r.usage_metadata
    print(f"  answer {r.text!r}; usageMetadata {um.prompt_token_count} prompt, {um.candidates_token_count} "
          f"candidates, {um.thoughts_token_count or 0} thoughts (all thoughts are billed as output)")

    step("team-a: Bedrock Converse with boto3 (SigV4-signed by the SDK; the tenant key in x-api-key)")
    bedrock = boto3.client("bedrock-runtime", endpoint_url=envoy.url, region_name="us-east-1",
                           aws_access_key_id="demo", aws_secret_access_key="demo",
                           config=BotoConfig(retries={"mode": "standard", "max_attempts": 1}))
    bedrock.meta.events.register("before-sign.bedrock-runtime.*",
                                 lambda request, **_: request.headers.__setitem__("x-api-key", KEY_A))
    r = bedrock.converse(modelId=BEDROCK, messages=[{"role": "user", "content": [{"text": "Hello!"}]}],
                         inferenceConfig={"maxTokens": 64})
    print(f"  answer {r['output']['message']['content'][0]['text']!r}; usage {r['usage']['inputTokens']} in, "
          f"{r['usage']['outputTokens']} out (boto3 sent the path /model/{BEDROCK.replace(':', '%3A')}/converse)")

    step("team-b: an Anthropic streaming message through Envoy")
    claude = anthropic.Anthropic(base_url=envoy.url, api_key=KEY_B, max_retries=0)
    with claude.messages.stream(model="claude-3-5-haiku", max_tokens=64,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join(stream.text_stream)
    print(f"  streamed {text!r}")

    step("team-b asks for more than is left of its 2,000 tokens per minute: 429")
    try:
        openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY_B, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", max_tokens=1990, messages=[{"role": "user", "content": "a long essay"}])
        print("  unexpectedly admitted")
        return False
    except openai.RateLimitError as err:
        print(f"  openai.RateLimitError {err.status_code} ({err.code}), retry-after "
              f"{err.response.headers['retry-after']} s: {err.body['message']}")

    step("an unknown API key is refused in the API's own error shape")
    try:
        openai.OpenAI(base_url=envoy.url + "/v1", api_key="sk-stolen", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        return False
    except openai.AuthenticationError as err:
        print(f"  openai.AuthenticationError {err.status_code}: {err.body['message']}")

    step("the budgets, as the usage view shows them (GET /tollgate/usage with the admin token)")
    view = json.loads(http("GET", envoy.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {ADMIN_TOKEN}"})[2])
    for tenant in view["tenants"]:
        for limit in tenant["limits"]:
            print(f"  {tenant['tenant']:7} {limit['name']:10} used {limit['used']:>10} of {limit['limit']:>8}"
                  f"  reserved {limit['reserved']}  resets {limit['resets_at']}")

    step("the ledger: one JSON access-log line per request")
    time.sleep(0.3)
    lines = [line for line in envoy.access_lines() if line["api"]]
    for line in lines:
        keep = {k: line[k] for k in ("request_id", "status", "tenant", "api", "model", "served_model", "stream",
                                     "input_tokens", "output_tokens", "llm_cost_usd", "cache", "decision")}
        print("  " + json.dumps(keep))

    step("the Prometheus metrics (GET /stats/prometheus on Envoy's admin port)")
    for line in envoy.prometheus().splitlines():
        if line.startswith("tollgate_") and ("_requests{" in line or "_cost_micro_usd{" in line
                                               or "_denials{" in line or "_cache_hits{" in line):
            print("  " + line)
    return len(lines) == 9


def main():
    serve = "--serve" in sys.argv or (sys.stdin.isatty() and "--no-serve" not in sys.argv)
    step("starting the fake LLM upstream and Envoy 1.40 with tollgate.wasm")
    upstream = FakeUpstream("demo-provider")
    with open(os.path.join(ROOT, "envoy/tollgate.json"), encoding="utf-8") as f:
        plugin = json.load(f)
    # Gemini and Bedrock: their routes and example prices, as in the providers config. The demo's
    # Envoy (envoy/tollgate.yaml) has no gemini or bedrock route: its openai-default route takes
    # these requests to the same fake provider, which speaks both dialects.
    with open(os.path.join(ROOT, "examples/prices/prices-2026-12-07.json"), encoding="utf-8") as f:
        example_prices = json.load(f)["prices"]
    for model, route in ((GEMINI, "gemini"), (BEDROCK, "bedrock")):
        plugin["routing"]["models"][model] = {"route": route}
        plugin["prices"][model] = example_prices[model]
    fixed = {"LISTEN_PORT": "10000", "ADMIN_PORT": "9901"} if port_free(10000) and port_free(9901) else {}
    envoy = Envoy(plugin, upstream.port, extra=fixed)
    os.makedirs(os.path.dirname(PID_FILE), exist_ok=True)
    with open(PID_FILE, "w") as f:
        f.write(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"  fake upstream  {upstream.url}\n  Envoy          {envoy.url}  (admin {envoy.admin})\n"
          f"  access log     {envoy.access_log}  (flushed per line: {' '.join(ENVOY_FLAGS)})")
    try:
        ok = scenario(envoy)
        step("demo done: every step succeeded" if ok else "demo FAILED: a step did not do what it should")
        if ok and serve:
            print(f"""
  Envoy stays up. Try it (Ctrl-C or `make demo-stop` stops everything):
    curl -s {envoy.url}/v1/chat/completions -H 'authorization: Bearer {KEY_A}' \\
         -H 'content-type: application/json' \\
         -d '{{"model":"smart","messages":[{{"role":"user","content":"hi"}}]}}'
    python3 -c "import openai; print(openai.OpenAI(base_url='{envoy.url}/v1', api_key='{KEY_A}')\\
.chat.completions.create(model='gpt-4o-mini', messages=[{{'role':'user','content':'hi'}}]))"
    curl -s '{envoy.url}/v1beta/models/{GEMINI}:generateContent' -H 'x-goog-api-key: {KEY_A}' \\
         -H 'content-type: application/json' -d '{{"contents":[{{"parts":[{{"text":"hi"}}]}}]}}'
    curl -s {envoy.url}/tollgate/usage -H 'authorization: Bearer {ADMIN_TOKEN}' | jq
    curl -s {envoy.admin}/stats/prometheus | grep ^tollgate_
    tail -f {envoy.access_log}""", flush=True)
            while True:
                time.sleep(3600)
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 0
    finally:
        envoy.stop()
        upstream.stop()
        if os.path.exists(PID_FILE):
            os.unlink(PID_FILE)
        print(f"{DIM}stopped Envoy and the fake upstream{END}")


if __name__ == "__main__":
    sys.exit(main())
