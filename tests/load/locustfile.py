"""Locust profile for `make loadtest`: a mixed LLM workload through Tollgate.

Each simulated user is one client application of one tenant (its API key). It sends:

  simple    short question, max_tokens 64                     (weight 50)
  moderate  1-2 KB multi-turn conversation, max_tokens 256     (weight 30)
  complex   8-16 KB document + tools, max_tokens 1024          (weight 12)
  embeddings  a document chunk to /v1/embeddings               (weight 8)

About 30% of the chat-like requests stream (the SSE stream is read to its end and must end
properly: `data: [DONE]` or `event: message_stop`), about 25% go to Anthropic's /v1/messages,
the rest to OpenAI's /v1/chat/completions. A fifth of the simple JSON questions come from a small
FAQ with temperature 0, which the response cache may answer.

The fake upstream (tests/fake_upstream.py) takes its latency and answer size from request
headers; the users send a realistic delay per kind (x-fake-delay-ms) and answer length
(x-fake-chunks).

Stats names are "<kind>/<json|stream>" (and "embeddings"). A 429 is an expected answer of a
budget or concurrency limit, not an error: it is recorded as a success under "<name> 429", so
latency figures of admitted requests stay apart, and the user then waits the retry-after it was
given (at most LOADTEST_BACKOFF_MAX seconds), like the official SDKs. Every other non-2xx, a broken stream or a
connection error is a failure. Streaming entries report the time until the last byte; the time
to the first body byte is collected separately.

Environment:
  LOADTEST_TENANTS   JSON list [{"tenant", "key", "weight"}] (run.py sets it; default: the demo's
                     two keys from envoy/tollgate.json)
  LOADTEST_EXTRA     path: at exit, write this file's own summary (Locust's percentiles per name,
                     time to first byte, 429 kinds per tenant) as JSON
  LOADTEST_DELAY_SCALE  multiply the fake upstream delays (default 1)
  LOADTEST_WAIT      think time "MIN,MAX" seconds between a user's requests (default "0.1,0.5")
  LOADTEST_BACKOFF_MAX  after a 429 a user waits its retry-after, at most this many seconds
                     (default 5; 0: no back-off, hammer the limit)

Usable on its own against a running demo (`make demo DEMO_ARGS=--serve`):
  .venv/bin/locust -f tests/load/locustfile.py --host http://127.0.0.1:PORT
"""
import json
import os
import random
import sys
import time
import uuid

from locust import FastHttpUser, events, task
from locust.stats import StatsEntry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tenant_slots import slots  # noqa: E402

DEMO_TENANTS = [
    {"tenant": "team-a", "key": "sk-demo-team-a", "weight": 3},
    {"tenant": "team-b", "key": "sk-demo-team-b", "weight": 1},
]
TENANTS = json.loads(os.environ.get("LOADTEST_TENANTS") or "null") or DEMO_TENANTS
DELAY_SCALE = float(os.environ.get("LOADTEST_DELAY_SCALE", "1"))
_WAIT = [float(x) for x in os.environ.get("LOADTEST_WAIT", "0.1,0.5").split(",")]
BACKOFF_MAX = float(os.environ.get("LOADTEST_BACKOFF_MAX", "5"))


SLOTS = slots(TENANTS)

# --- prompt material ------------------------------------------------------------------------
WORDS = (
    "the a of to and in is for on with that as by this be are from at or an it we our your "
    "gateway budget tenant token request response latency stream model route upstream cache "
    "invoice customer order shipment warehouse inventory forecast revenue quarter margin "
    "contract clause liability termination renewal payment schedule penalty warranty "
    "patient dosage symptom diagnosis treatment follow-up allergy record consent "
    "kubernetes pod deployment rollout canary metric alert incident postmortem runbook "
    "python function class exception retry timeout queue worker schema migration index "
    "summary analysis risk policy compliance audit evidence control owner deadline "
    "café naïve résumé — “quoted” 東京 données"
).split()
QUESTIONS = (
    "What is the capital of France?", "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.", "How many days are in a leap year?",
    "What does HTTP 429 mean?", "Convert 5 km to miles.", "Who wrote Hamlet?",
    "What is 17 times 23?", "Name three primary colours.", "What is the boiling point of water?",
    "Spell 'necessary' backwards.", "What time zone is Tokyo in?",
    "Define latency in one sentence.", "Is 97 a prime number?", "What is JSON?",
    "Suggest a name for a cat.",
)
TOOLS = [
    {"name": "search_documents", "description": "Full-text search over the contract archive.",
     "parameters": {"type": "object", "properties": {
         "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
         "required": ["query"]}},
    {"name": "get_invoice", "description": "Fetch one invoice by its number.",
     "parameters": {"type": "object", "properties": {"number": {"type": "string"}},
                    "required": ["number"]}},
    {"name": "create_ticket", "description": "Open a ticket for a human reviewer.",
     "parameters": {"type": "object", "properties": {
         "title": {"type": "string"}, "severity": {"type": "string", "enum": ["low", "high"]},
         "body": {"type": "string"}}, "required": ["title", "severity"]}},
]
OPENAI_TOOLS = [{"type": "function", "function": t} for t in TOOLS]
ANTHROPIC_TOOLS = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                   for t in TOOLS]
DOCS = None  # embeddings corpus, built on first use


def text(n_bytes, rng=random):
    """About n_bytes of word salad (UTF-8), different every call."""
    out, size = [], 0
    while size < n_bytes:
        chunk = rng.choices(WORDS, k=64)
        out.extend(chunk)
        size += sum(len(w.encode()) + 1 for w in chunk)
    s = " ".join(out).encode()[:n_bytes].decode("utf-8", "ignore")
    return s[:1].upper() + s[1:] + "."


def conversation(n_bytes):
    """user/assistant turns (starting and ending with user) totalling about n_bytes."""
    turns = random.choice((3, 5))
    per = n_bytes // turns
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text(per)} for i in range(turns)]


# --- the user -------------------------------------------------------------------------------
KINDS = {  # kind: (fake delay ms range, answer chunks, max_tokens)
    "simple": ((60, 150), 4, 64),
    "moderate": ((200, 450), 16, 256),
    "complex": ((600, 1400), 48, 1024),
    "embeddings": ((20, 60), 1, None),
}
_counter = {"users": 0}
EXTRA = {"ttfb_ms": {}, "denials": {}, "requests": {}}


class TollgateClient(FastHttpUser):
    _backoff = 0.0
    # A stream is read to its end within the task: no request is cut by a network timeout
    # shorter than the slowest complex answer.
    network_timeout = 120.0
    connection_timeout = 10.0

    def wait_time(self):
        """Think time; after a 429, at least its retry-after (capped), as the SDKs do."""
        backoff, self._backoff = self._backoff, 0.0
        return max(backoff, random.uniform(*_WAIT))

    def on_start(self):
        slot = SLOTS[_counter["users"] % len(SLOTS)]
        _counter["users"] += 1
        self.tenant, self.key = slot["tenant"], slot["key"]

    # -- tasks
    @task(50)
    def simple(self):
        if random.random() < 0.2:  # FAQ, deterministic: cacheable
            self.chat("simple", [{"role": "user", "content": random.choice(QUESTIONS)}],
                      stream=False, extra={"temperature": 0}, anthropic=False)
            return
        msgs = [{"role": "user", "content": random.choice(QUESTIONS) + " " + text(random.randint(40, 200))}]
        self.chat("simple", msgs, model=random.choice(("gpt-4o-mini", "gpt-4o-mini", "default")))

    @task(30)
    def moderate(self):
        self.chat("moderate", conversation(random.randint(1024, 2048)))

    @task(12)
    def complex(self):
        system = "You are a careful contract analyst. " + text(1500)
        doc = text(random.randint(8 * 1024, 16 * 1024) - 1700)
        msgs = [{"role": "user", "content": "Document:\n" + doc + "\n\nList the risky clauses and open a "
                 "ticket for each one above medium severity."}]
        self.chat("complex", msgs, system=system, tools=True,
                  model=random.choice(("gpt-4o", "smart", "gpt-4o-mini")))

    @task(8)
    def embeddings(self):
        global DOCS
        if DOCS is None:
            rng = random.Random(7)
            DOCS = [text(rng.randint(300, 1500), rng) for _ in range(200)]
        body = {"model": "text-embedding-3-small", "input": random.choice(DOCS)}
        self.send("embeddings", "/v1/embeddings", body, self.openai_headers(), stream=False, kind="embeddings")

    # -- request builders
    def openai_headers(self):
        return {"authorization": f"Bearer {self.key}"}

    def chat(self, kind, messages, stream=None, model=None, system=None, tools=False, extra=None,
             anthropic=None):
        if stream is None:
            stream = random.random() < 0.3
        if anthropic is None:
            anthropic = random.random() < 0.25
        max_tokens = KINDS[kind][2]
        if anthropic:
            body = {"model": "claude-3-5-haiku", "max_tokens": max_tokens, "messages": messages}
            if system:
                body["system"] = system
            if tools:
                body["tools"] = ANTHROPIC_TOOLS
            headers = {"x-api-key": self.key, "anthropic-version": "2023-06-01"}
            path = "/v1/messages"
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + messages
            body = {"model": model or "gpt-4o-mini", "max_tokens": max_tokens, "messages": msgs}
            if tools:
                body["tools"] = OPENAI_TOOLS
            headers = self.openai_headers()
            path = "/v1/chat/completions"
        if stream:
            body["stream"] = True
        body.update(extra or {})
        self.send(f"{kind}/{'stream' if stream else 'json'}", path, body, headers, stream, kind)

    def send(self, name, path, body, headers, stream, kind):
        (lo, hi), chunks, _ = KINDS[kind]
        headers = dict(headers, **{
            "content-type": "application/json",
            "accept-encoding": "identity",
            "x-request-id": f"lt-{self.tenant}-{uuid.uuid4().hex}",
            "x-fake-delay-ms": str(int(random.randint(lo, hi) * DELAY_SCALE)),
            "x-fake-chunks": str(chunks),
        })
        EXTRA["requests"][self.tenant] = EXTRA["requests"].get(self.tenant, 0) + 1
        start = time.perf_counter()
        with self.client.post(path, data=json.dumps(body), headers=headers, name=name,
                              stream=stream, catch_response=True) as resp:
            status = resp.status_code
            if status == 429:
                resp.request_meta["name"] = f"{name} 429"
                try:
                    self._backoff = min(float(resp.headers.get("retry-after") or 0), BACKOFF_MAX)
                except ValueError:
                    self._backoff = BACKOFF_MAX
                self.count_denial(resp)
                if stream:
                    resp.content  # noqa: B018 (drain the short error body)
                resp.success()
                return
            if status != 200:
                err = getattr(resp, "error", None)
                resp.failure(f"HTTP {status}" + (f" ({type(err).__name__})" if status == 0 and err else ""))
                return
            if not stream:
                try:
                    json.loads(resp.content)
                except (ValueError, TypeError) as err:
                    resp.failure(f"bad JSON body: {err}")
                return
            ttfb, tail, size = None, b"", 0
            try:
                # read(n) waits for n bytes: one byte first (time to first byte), then blocks.
                for chunk_size in (1, 8192):
                    for chunk in resp.iter_content(chunk_size=chunk_size, decode_content=False):
                        if ttfb is None:
                            ttfb = (time.perf_counter() - start) * 1000
                        size += len(chunk)
                        tail = (tail + chunk)[-256:]
                        if chunk_size == 1:
                            break
            except Exception as err:  # noqa: BLE001 (a cut stream is a failure, whatever raised)
                resp.failure(f"stream broken: {err!r}")
                return
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = size
            if b"[DONE]" not in tail and b"message_stop" not in tail:
                resp.failure("stream ended without its terminating event")
                return
            if ttfb is not None:
                EXTRA["ttfb_ms"].setdefault(name, []).append(round(ttfb, 1))

    def count_denial(self, resp):
        """Classify a 429 as the client sees it: tokens (window limit), requests (concurrency) or
        quota (a spent USD budget: x-should-retry: false)."""
        try:
            err = json.loads(resp.content).get("error") or {}
        except (ValueError, TypeError, AttributeError):
            err = {}
        message = str(err.get("message", ""))
        if resp.headers.get("x-should-retry") == "false" or err.get("type") == "insufficient_quota":
            why = "quota"
        elif "concurrent" in message or err.get("type") == "requests":
            why = "concurrency"
        else:
            why = "tokens"
        d = EXTRA["denials"].setdefault(self.tenant, {})
        d[why] = d.get(why, 0) + 1


def _percentiles(entry):
    return {f"p{int(q * 100)}": entry.get_response_time_percentile(q) for q in (0.5, 0.95, 0.99)}


@events.quitting.add_listener
def _dump_extra(environment, **_kw):
    path = os.environ.get("LOADTEST_EXTRA")
    if not path:
        return
    stats = environment.stats
    rows = []
    admitted = StatsEntry(stats, "Admitted (not 429)", "")
    denied = StatsEntry(stats, "Denied (429)", "")
    for entry in stats.entries.values():
        (denied if entry.name.endswith(" 429") else admitted).extend(entry)
    for entry in list(stats.entries.values()) + [admitted, denied, stats.total]:
        rows.append({
            "name": entry.name, "method": entry.method, "requests": entry.num_requests,
            "failures": entry.num_failures, "avg_ms": round(entry.avg_response_time, 1),
            "max_ms": round(entry.max_response_time or 0, 1), "rps": round(entry.total_rps, 2),
            **_percentiles(entry),
        })
    errors = [{"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
              for e in stats.errors.values()]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"stats": rows, "errors": errors, "users": _counter["users"], **EXTRA}, f)
