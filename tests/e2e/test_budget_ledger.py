"""Ledger exactness under concurrency (budget acceptance).

More than 1,000 requests from 50 concurrent clients across six tenants with small budgets:
Chat Completions, Responses and Messages, JSON and SSE mixed, with clients that walk away
mid-stream, upstream resets, upstream errors and answers without usage. One run (a module-scoped
fixture) drives the load while a sampler reads the usage view every ~50 ms; the tests then check
what it recorded:

* per tenant and limit, `used` equals the sum of what the admitted requests' access-log lines were
  charged (USD limits: the exact decimal cost), `reserved` is 0 and nothing is in flight;
* every charged line follows the documented settlement: reported usage equals the fake upstream's
  ledger, observed usage is the prompt estimate of the client's body plus the deltas that passed,
  the reservation is charged only when nothing better is known, refunds only on errors and resets;
* no sample of a strict tenant's bucket ever showed used + reserved above the limit, and its final
  usage is within the limit;
* refusals are 429s in the API's shape with retry-after and never reach the upstream;
* the mix really happened (>= 10 % mid-stream aborts, >= 5 % upstream resets, refusals and
  admissions both plentiful).
"""
import collections
import concurrent.futures
import hashlib
import json
import math
import random
import socket
import threading
import time
import uuid
from decimal import Decimal

import pytest

from harness import Envoy, http

SEED = 20240611
REQUESTS = 1200
CLIENTS = 50
ADMIN_TOKEN = "ledger-admin-token"
VIEW_PATH = "/tollgate/usage"
DEFAULT_OUTPUT = 64
PRICE_IN, PRICE_OUT = Decimal("1.00"), Decimal("2.00")  # USD per million tokens

CONFIG = {
    "identity": {"source": "header", "header": "x-tenant"},
    "tenant_defaults": {
        "limits": [{"name": "tph", "tokens": 15000, "window": "hour"}],
        "strict": True,
        "default_output_tokens": DEFAULT_OUTPUT,
    },
    "tenants": {
        # Defaults only.
        "t1": {},
        # A token limit and a USD limit; the USD one binds first.
        "t2": {"limits": [{"name": "tph", "tokens": 20000, "window": "hour"},
                          {"name": "usd", "usd": "0.011", "window": "day"}]},
        # A daily token limit and a concurrency cap.
        "t3": {"limits": [{"name": "tpd", "tokens": 11000, "window": "day"}], "max_concurrent": 4},
        # Not strict: admission uses the estimate, so settlement may overshoot.
        "t4": {"strict": False, "limits": [{"name": "tph", "tokens": 10000, "window": "hour"}]},
        # A tenant-wide limit and a model-scoped one.
        "t5": {"limits": [{"name": "tph", "tokens": 16000, "window": "hour"},
                          {"name": "mini", "tokens": 5500, "window": "hour", "model": "gpt-4o-mini"}]},
        # Two windows, and a smaller default output reservation (still >= 2 * 20 + 1).
        "t6": {"limits": [{"name": "tph", "tokens": 13000, "window": "hour"},
                          {"name": "tpd", "tokens": 10500, "window": "day"}],
               "default_output_tokens": 48},
    },
    "prices": {"*": {"input": str(PRICE_IN), "output": str(PRICE_OUT)}},
    "usage_view": {"path": VIEW_PATH, "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
}
TENANTS = sorted(CONFIG["tenants"])
STRICT = {t for t in TENANTS if CONFIG["tenants"][t].get("strict", True)}


def default_output(tenant):
    return CONFIG["tenants"][tenant].get("default_output_tokens", DEFAULT_OUTPUT)


# --------------------------------------------------------------------------- request plan
PATHS = {"chat_completions": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
# A content-bearing delta event, as the fake upstream writes it (compact JSON).
DELTA_MARKERS = {
    "chat_completions": b'"delta":{"content":"',  # the role chunk has "content":"" after "role"
    "responses": b'"type":"response.output_text.delta"',
    "messages": b'"type":"content_block_delta"',
}
# SSE events before the first content delta (chat: role chunk; responses: created, in_progress,
# output_item.added, content_part.added; messages: message_start, content_block_start, ping).
PREAMBLE_EVENTS = {"chat_completions": 1, "responses": 4, "messages": 3}


def plan_requests(rng):
    """The request mix: a list of dicts, one per request."""
    specs = []
    for _ in range(REQUESTS):
        tenant = rng.choice(TENANTS)
        api = rng.choices(["chat_completions", "responses", "messages"], [4, 3, 3])[0]
        mode = rng.choices(
            ["normal", "abort", "early_abort", "reset", "no_usage", "error"],
            [40, 32, 2, 16, 5, 5],
        )[0]
        stream = mode in ("abort",) or (mode != "abort" and rng.random() < 0.55)
        if mode == "abort":
            chunks = rng.randint(9, 20)
        else:
            chunks = rng.randint(1, 20)
        model = "claude-3-5-haiku" if api == "messages" else rng.choice(["gpt-4o-mini", "gpt-4o"])
        text = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(rng.randint(10, 280)))
        body = {"model": model}
        if api == "responses":
            body["input"] = text
        else:
            body["messages"] = [{"role": "user", "content": text}]
        # Max tokens >= the fake's output (2 * chunks + 1), or none (strict mode injects it).
        max_tokens = rng.randint(2 * chunks + 1, 64)
        field = {"chat_completions": rng.choice(["max_completion_tokens", "max_tokens", None]),
                 "responses": rng.choice(["max_output_tokens", None]),
                 "messages": "max_tokens"}[api]
        if field:
            body[field] = max_tokens
        else:
            max_tokens = None
        include_usage = False
        if stream:
            body["stream"] = True
            if api == "chat_completions" and rng.random() < 0.75:
                body["stream_options"] = {"include_usage": True}
                include_usage = True
        rid = str(uuid.uuid4())
        headers = {"x-tenant": tenant, "x-request-id": rid, "x-fake-request-id": rid,
                   "x-fake-chunks": str(chunks)}
        if api == "messages":
            headers["anthropic-version"] = "2023-06-01"
        abort_after = None
        if mode == "abort":
            # Stop after this many content deltas (0: right after the first body bytes). The
            # split knob paces the stream (~3 ms per piece) so the client leaves mid-stream.
            abort_after = rng.choice([0, 1, 2, 3, 5])
            headers["x-fake-split"] = str(rng.randint(1, 1 << 30))
            # The end is held back, so even a client slowed by a busy machine leaves mid-stream.
            headers["x-fake-hold-ms"] = "1500"
        elif mode == "early_abort":
            headers["x-fake-delay-ms"] = "600"  # the client leaves before any answer
        elif mode == "reset":
            if stream:
                total = PREAMBLE_EVENTS[api] + chunks + 2  # lower bound of the event count
                headers["x-fake-reset-after"] = str(rng.randint(0, total - 1))
            else:
                headers["x-fake-reset-after"] = str(rng.randint(0, 60))
        elif mode == "no_usage":
            headers["x-fake-no-usage"] = "1"
        elif mode == "error":
            headers["x-fake-status"] = rng.choice(["500", "503", "429"])
        if mode == "normal" and stream and rng.random() < 0.15:
            headers["x-fake-split"] = str(rng.randint(1, 1 << 30))
        raw = json.dumps(body, separators=(",", rng.choice([":", ": "]))).encode()
        specs.append({"rid": rid, "tenant": tenant, "api": api, "model": model, "stream": stream,
                      "mode": mode, "chunks": chunks, "max_tokens": max_tokens,
                      "include_usage": include_usage, "abort_after": abort_after,
                      "headers": headers, "body": raw})
    return specs


# --------------------------------------------------------------------------- raw HTTP/1.1 client
class _Chunked:
    """Incremental decoder of a chunked body."""

    def __init__(self):
        self.buf, self.out, self.done, self.need = b"", b"", False, None

    def feed(self, data):
        self.buf += data
        while not self.done:
            if self.need is None:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                self.need = int(self.buf[:end].split(b";")[0], 16)
                self.buf = self.buf[end + 2:]
                if self.need == 0:
                    self.done = True
                    return
            if len(self.buf) < self.need + 2:
                return
            self.out += self.buf[:self.need]
            self.buf = self.buf[self.need + 2:]
            self.need = None


def complete_deltas(api, body):
    """Content-bearing delta events that arrived whole (terminated by a blank line)."""
    events = body.split(b"\n\n")[:-1]
    return sum(1 for e in events if DELTA_MARKERS[api] in e)


def send(port, spec):
    """Runs one request as its mode says; returns what the client saw."""
    result = {"status": None, "headers": {}, "body": b"", "complete": False, "deltas": 0,
              "aborted": False, "early_abort": False, "error": None,
              "started": time.monotonic(), "ended": None}
    head = [f"POST {PATHS[spec['api']]} HTTP/1.1", "host: tollgate.test", "connection: close",
            "content-type: application/json", f"content-length: {len(spec['body'])}"]
    head += [f"{k}: {v}" for k, v in spec["headers"].items()]
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + spec["body"])
        if spec["mode"] == "early_abort":
            time.sleep(0.15)
            result["early_abort"] = True
            return result
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the response headers")
            buf += data
        raw_head, rest = buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        result["status"] = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        result["headers"] = headers
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = None if chunked else int(headers.get("content-length", "-1"))
        dec = _Chunked() if chunked else None
        body = b""
        abort_after = spec["abort_after"] if result["status"] == 200 else None
        data = rest
        while True:
            if chunked:
                dec.feed(data)
                body = dec.out
                done = dec.done
            else:
                body += data
                done = length >= 0 and len(body) >= length
            result["body"] = body
            if spec["stream"] and result["status"] == 200:
                result["deltas"] = complete_deltas(spec["api"], body)
            if done:
                result["complete"] = True
                return result
            if abort_after is not None and body and result["deltas"] >= abort_after:
                result["aborted"] = True  # walk away mid-stream
                return result
            data = sock.recv(65536)
            if not data:
                return result  # cut short (upstream reset passed on, or no length)
    except (ConnectionError, socket.timeout, OSError) as err:
        result["error"] = repr(err)
        return result
    finally:
        result["ended"] = time.monotonic()
        sock.close()


# --------------------------------------------------------------------------- usage view
def read_view(envoy):
    status, _, data = http("GET", envoy.url + VIEW_PATH, headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                           timeout=10)
    assert status == 200, data
    return json.loads(data)


def amount(limit, key):
    value = limit[key]
    return Decimal(value) if limit["unit"] == "usd" else int(value)


class Sampler(threading.Thread):
    """Reads the usage view every ~50 ms while the load runs."""

    def __init__(self, envoy):
        super().__init__(daemon=True)
        self.envoy, self.samples, self.errors = envoy, [], []
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            try:
                self.samples.append(read_view(self.envoy))
            except Exception as err:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(err))
            self.stop_event.wait(0.05)


# --------------------------------------------------------------------------- the run
def wait_out_hour_boundary():
    """Hourly windows must not roll over mid-run: start after the boundary if it is close."""
    left = 3600 - time.time() % 3600
    if left < 75:
        time.sleep(left + 1)


@pytest.fixture(scope="module")
def run(upstream):
    wait_out_hour_boundary()
    envoy = Envoy(CONFIG, upstream.port)
    try:
        rng = random.Random(SEED)
        specs = plan_requests(rng)
        before = read_view(envoy)
        sampler = Sampler(envoy)
        sampler.start()
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda s: send(envoy.port, s), specs))
        load_s = time.monotonic() - t0
        # Settle: every request logged, nothing reserved or in flight.
        rids = {s["rid"] for s in specs}
        deadline = time.monotonic() + 30
        while True:
            lines = {l["client_request_id"]: l for l in envoy.access_lines() if l.get("client_request_id") in rids}
            view = read_view(envoy)
            idle = all(t["in_flight"] == 0 and all(amount(l, "reserved") == 0 for l in t["limits"])
                       for t in view["tenants"])
            if (len(lines) == len(rids) and idle) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        sampler.stop_event.set()
        sampler.join(5)
        ledger = {e["id"]: e for e in upstream.ledger() if e["id"] in rids}
        data = {"envoy": envoy, "specs": specs, "results": results, "lines": lines, "ledger": ledger,
                "before": before, "final": view, "samples": sampler.samples,
                "sampler_errors": sampler.errors, "load_s": load_s, "settle_s": time.monotonic() - t0 - load_s}
        print_summary(data)
        yield data
    finally:
        envoy.stop()
    assert "panicked" not in envoy.log(), envoy.log()[-4000:]


def print_summary(d):
    modes = collections.Counter(s["mode"] for s in d["specs"])
    decisions = collections.Counter(l.get("decision") for l in d["lines"].values())
    sources = collections.Counter(l.get("usage_source") for l in d["lines"].values()
                                  if l.get("decision") == "admitted")
    aborted = sum(r["aborted"] for r in d["results"])
    resets = sum(1 for e in d["ledger"].values() if e["reset"])
    print(f"\nledger run: {len(d['specs'])} requests, {CLIENTS} clients, load {d['load_s']:.1f}s, "
          f"settle {d['settle_s']:.1f}s, {len(d['samples'])} view samples")
    print(f"  planned modes {dict(modes)}")
    print(f"  decisions {dict(decisions)}; usage sources {dict(sources)}")
    print(f"  mid-stream aborts {aborted}, upstream resets {resets}, "
          f"streams {sum(s['stream'] for s in d['specs'])}")
    for t in d["final"]["tenants"]:
        print(f"  {t['tenant']}: " + ", ".join(
            f"{l['name']} used {l['used']}/{l['limit']} reserved {l['reserved']}" for l in t["limits"]))


# --------------------------------------------------------------------------- helpers for checks
def admitted(d):
    return [(s, r, d["lines"][s["rid"]]) for s, r in zip(d["specs"], d["results"])
            if d["lines"].get(s["rid"], {}).get("decision") == "admitted"]


def tokens(line, field):
    return int(line[field])


def reservation(spec):
    """What strict / non-strict admission reserved: (prompt, output)."""
    n = len(spec["body"])
    prompt = n if spec["tenant"] in STRICT else math.ceil(n / 4)
    output = spec["max_tokens"] if spec["max_tokens"] is not None else default_output(spec["tenant"])
    return prompt, output


def deltas_sent(spec, entry):
    """Content deltas among the SSE events the fake upstream wrote before its reset."""
    return max(0, min(spec["chunks"], entry["events_sent"] - PREAMBLE_EVENTS[spec["api"]]))


USAGE_FIELDS = {"input": "input_tokens", "output": "output_tokens", "cached_input": "cached_input_tokens",
                "cache_write_input": "cache_write_input_tokens", "reasoning": "reasoning_tokens"}


def line_usage(line):
    return {k: tokens(line, f) for k, f in USAGE_FIELDS.items()}


# --------------------------------------------------------------------------- tests
def test_every_request_was_logged_and_settled(run):
    missing = [s["rid"] for s in run["specs"] if s["rid"] not in run["lines"]]
    assert not missing, f"{len(missing)} requests without an access-log line, e.g. {missing[:3]}"
    assert not run["sampler_errors"], run["sampler_errors"][:3]
    for t in run["final"]["tenants"]:
        assert t["in_flight"] == 0, t
        for limit in t["limits"]:
            assert amount(limit, "reserved") == 0, (t["tenant"], limit)
    for spec, line in ((s, run["lines"][s["rid"]]) for s in run["specs"]):
        assert line["tenant"] == spec["tenant"], line
        assert line["decision"] in ("admitted", "rate_limited", "quota_exceeded"), line


def test_used_equals_the_sum_of_charged_lines(run):
    """Per tenant and limit: used == what its admitted lines were charged (USD: exact cost)."""
    before = {t["tenant"]: t for t in run["before"]["tenants"]}
    for t in run["final"]["tenants"]:
        lines = [l for s, r, l in admitted(run) if s["tenant"] == t["tenant"]]
        assert lines, f"no admitted request for {t['tenant']}"
        for limit in t["limits"]:
            start = next(l for l in before[t["tenant"]]["limits"] if l["name"] == limit["name"])
            assert amount(start, "used") == 0, start
            assert start["resets_at"] == limit["resets_at"], "the window rolled over mid-run"
            counted = [l for l in lines if limit["model"] in (None, l["model"])]
            if limit["unit"] == "tokens":
                expected = sum(tokens(l, "input_tokens") + tokens(l, "output_tokens") for l in counted)
            else:
                # Cache prices default to the input price, so cost = input × in + output × out.
                expected = sum((tokens(l, "input_tokens") * PRICE_IN + tokens(l, "output_tokens") * PRICE_OUT)
                               / Decimal(1_000_000) for l in counted)
            assert amount(limit, "used") == expected, (t["tenant"], limit, expected, len(counted))


def test_strict_tenants_never_went_over_a_limit(run):
    """No sample ever showed used + reserved above a strict tenant's limit; final used within it."""
    assert len(run["samples"]) >= 20, len(run["samples"])
    worst, peak_reserved = {}, collections.Counter()
    for sample in run["samples"] + [run["final"]]:
        for t in sample["tenants"]:
            for limit in t["limits"]:
                total = amount(limit, "used") + amount(limit, "reserved")
                key = (t["tenant"], limit["name"])
                worst[key] = max(worst.get(key, 0), total)
                if limit["unit"] == "tokens":
                    peak_reserved[key] = max(peak_reserved[key], amount(limit, "reserved"))
                if t["tenant"] in STRICT:
                    assert total <= amount(limit, "limit"), (sample["now"], t["tenant"], limit)
                assert amount(limit, "remaining") == max(0, amount(limit, "limit") - total), limit
    for t in run["final"]["tenants"]:
        if t["tenant"] in STRICT:
            for limit in t["limits"]:
                assert amount(limit, "used") <= amount(limit, "limit"), (t["tenant"], limit)
    print("\n  peak used+reserved: " + ", ".join(f"{t}/{n} {v}" for (t, n), v in sorted(worst.items())))
    print("  peak reserved: " + ", ".join(f"{t}/{n} {v}" for (t, n), v in sorted(peak_reserved.items())))
    # The sampler really watched requests in flight (the check above is not vacuous).
    assert sum(1 for v in peak_reserved.values() if v > 0) >= 3, peak_reserved


def test_reported_usage_equals_the_upstream_ledger(run):
    """Whole answers with usage are charged exactly what the upstream reported."""
    checked = 0
    for spec, res, line in admitted(run):
        entry = run["ledger"].get(spec["rid"])
        if spec["mode"] != "normal":
            continue
        assert entry is not None, spec["rid"]
        assert res["complete"] and res["status"] == 200, (spec["rid"], res["error"], res["status"])
        assert entry["completed"] and entry["usage_sent"], entry
        assert line["usage_source"] == "reported", (spec["mode"], spec["api"], line)
        assert line_usage(line) == entry["usage"], (line, entry["usage"])
        assert line["api"] == spec["api"] and line["model"] == spec["model"], line
        assert line["stream"] is bool(spec["stream"]), line
        checked += 1
    assert checked >= 200, checked


def test_fallbacks_without_usage(run):
    """2xx without usage: SSE charges the prompt estimate + every delta; JSON the reservation.
    Upstream errors are refunded."""
    seen = collections.Counter()
    for spec, res, line in admitted(run):
        entry = run["ledger"][spec["rid"]]
        n = len(spec["body"])
        if spec["mode"] == "no_usage":
            assert res["complete"], res
            if spec["stream"]:
                assert line["usage_source"] == "observed", line
                assert line_usage(line) == {"input": math.ceil(n / 4), "output": spec["chunks"],
                                            "cached_input": 0, "cache_write_input": 0, "reasoning": 0}, line
            else:
                prompt, output = reservation(spec)
                assert line["usage_source"] == "reservation", line
                assert (tokens(line, "input_tokens"), tokens(line, "output_tokens")) == (prompt, output), line
            seen[spec["mode"]] += 1
        elif spec["mode"] == "error":
            assert res["status"] == int(spec["headers"]["x-fake-status"]), res["status"]
            assert line["usage_source"] == "refunded", line
            assert line_usage(line) == dict.fromkeys(USAGE_FIELDS, 0), line
            assert entry["status"] == res["status"]
            seen[spec["mode"]] += 1
    assert seen["no_usage"] >= 10 and seen["error"] >= 10, seen


def report(problems, what):
    """Fails with every violation grouped by kind, so one run shows the whole picture."""
    if problems:
        kinds = collections.Counter(kind for kind, _ in problems)
        examples = {}
        for kind, detail in problems:
            examples.setdefault(kind, detail)
        pytest.fail(f"{len(problems)} {what} violate the documented settlement: {dict(kinds)}\n"
                    + "\n".join(f"- {k}: {v}" for k, v in examples.items()), pytrace=False)


def brief(line):
    return {k: line.get(k) for k in ("client_request_id", "tenant", "api", "stream", "input_tokens", "output_tokens",
                                     "usage_source", "status", "response_flags")}


def test_upstream_resets_are_charged_per_the_fallbacks(run):
    """Reset JSON: refunded (a cut body is not trusted). Reset SSE: the usage if it got through,
    else the prompt estimate + the deltas that passed, else refunded; never less output than the
    deltas that passed."""
    count, problems = 0, []
    for spec, res, line in admitted(run):
        if spec["mode"] != "reset":
            continue
        entry = run["ledger"][spec["rid"]]
        assert entry["reset"], entry
        assert not res["complete"], (spec["rid"], res)
        count += 1
        usage, source = line_usage(line), line["usage_source"]
        zero = dict.fromkeys(USAGE_FIELDS, 0)
        if not spec["stream"]:
            if source != "refunded" or usage != zero:
                problems.append(("json reset not refunded", brief(line)))
            continue
        sent = deltas_sent(spec, entry)
        if entry["usage_sent"]:
            if source != "reported" or usage != entry["usage"]:
                problems.append(("usage sent before the reset but not charged", (brief(line), entry["usage"])))
        elif sent > 0:
            if usage["output"] < sent:
                problems.append((f"{spec['api']} reset after deltas charged less output than passed",
                                 f"{sent} deltas passed, charged {brief(line)}"))
            elif source == "observed" and usage != {"input": math.ceil(len(spec["body"]) / 4), "output": sent,
                                                    "cached_input": 0, "cache_write_input": 0, "reasoning": 0}:
                problems.append(("observed reset charge is not estimate + deltas", (sent, brief(line))))
            elif source not in ("observed", "reported"):
                problems.append(("reset after deltas neither observed nor reported", brief(line)))
        elif source == "reported":
            # Messages: message_start (input usage) passed before any delta.
            if spec["api"] != "messages" or usage["input"] != entry["usage"]["input"]:
                problems.append(("reset before deltas reported something else", brief(line)))
        elif source != "refunded" or usage != zero:
            problems.append(("reset before any output not refunded", brief(line)))
    assert count >= 30, count
    report(problems, f"of {count} reset requests")


def test_client_aborts_are_charged_per_the_fallbacks(run):
    """A client that leaves mid-stream: the prompt estimate of its own body (not the rewritten one
    the upstream saw) + the deltas that passed, and never less output than the client itself saw;
    a client that leaves before any output is charged the reservation."""
    count, problems = 0, []
    for spec, res, line in admitted(run):
        if spec["mode"] not in ("abort", "early_abort"):
            continue
        entry = run["ledger"].get(spec["rid"])
        usage, source = line_usage(line), line["usage_source"]
        prompt, output = reservation(spec)
        if spec["mode"] == "early_abort":
            if source != "reservation" or (usage["input"], usage["output"]) != (prompt, output):
                problems.append(("left before the answer, not charged the reservation", (prompt, output, brief(line))))
            continue
        assert res["aborted"], (spec["rid"], res["status"], res["error"])
        assert entry is not None, spec["rid"]
        count += 1
        seen = res["deltas"]
        if source == "refunded":
            problems.append(("client abort refunded", brief(line)))
        elif source == "reservation":
            if seen:
                problems.append(("reservation charged although deltas reached the client", (seen, brief(line))))
            if (usage["input"], usage["output"]) != (prompt, output):
                problems.append(("reservation charge differs from the reservation", (prompt, output, brief(line))))
        else:
            if usage["output"] < seen:
                problems.append((f"{spec['api']} abort charged less output than the client saw",
                                 f"client saw {seen} deltas, charged {brief(line)}"))
            if usage["output"] > entry["usage"]["output"]:
                problems.append(("abort charged more output than the upstream produced", (brief(line), entry["usage"])))
        if source == "observed" and (usage["input"] != math.ceil(len(spec["body"]) / 4)
                                     or usage["cached_input"] or usage["cache_write_input"] or usage["reasoning"]):
            problems.append(("observed input is not the client body's estimate", (len(spec["body"]), brief(line))))
        if source == "reported" and usage["input"] != entry["usage"]["input"]:
            problems.append(("reported input differs from the ledger", (brief(line), entry["usage"])))
    assert count >= 100, count
    report(problems, f"of {count} aborted streams")


def test_refusals_are_429s_in_the_api_shape(run):
    """Refused requests got a 429 with retry-after in their API's shape and never went upstream."""
    refused = 0
    for spec, res in zip(run["specs"], run["results"]):
        line = run["lines"][spec["rid"]]
        if line["decision"] == "admitted":
            assert spec["rid"] in run["ledger"], spec["rid"]
            continue
        refused += 1
        assert spec["rid"] not in run["ledger"], "a refused request reached the upstream"
        if spec["mode"] == "early_abort":
            continue
        assert res["status"] == 429 and res["complete"], (res["status"], res["error"])
        assert int(res["headers"]["retry-after"]) >= 1, res["headers"]
        body = json.loads(res["body"])
        if spec["api"] == "messages":
            assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error", body
        elif line["decision"] == "quota_exceeded":
            assert body["error"]["type"] == "insufficient_quota", body
            assert body["error"]["code"] == "insufficient_quota", body
        else:
            assert body["error"]["code"] == "rate_limit_exceeded", body
            assert body["error"]["type"] in ("tokens", "requests"), body
        if line["decision"] == "quota_exceeded":
            assert spec["tenant"] == "t2", line  # the only tenant with a USD limit
    assert refused >= 0.2 * len(run["specs"]), refused


def test_the_mix_was_met(run):
    specs, results = run["specs"], run["results"]
    total = len(specs)
    assert total >= 1000
    lines = list(run["lines"].values())
    admitted_n = sum(l["decision"] == "admitted" for l in lines)
    # Mid-stream: the client left before the end of the body, and the upstream never finished it.
    aborted = sum(1 for s, r in zip(specs, results) if r["aborted"] and run["lines"][s["rid"]]["decision"] == "admitted"
                  and not run["ledger"][s["rid"]]["completed"])
    resets = sum(1 for e in run["ledger"].values() if e["reset"])
    streams = sum(s["stream"] for s in specs)
    per_tenant = collections.Counter((l["tenant"], l["decision"]) for l in lines)
    print(f"\n  admitted {admitted_n}, refused {total - admitted_n}, aborted {aborted}, resets {resets}, "
          f"streams {streams}/{total}")
    print("  per tenant: " + ", ".join(f"{t}:{d}={n}" for (t, d), n in sorted(per_tenant.items())))
    assert aborted >= 0.10 * total, aborted
    assert resets >= 0.05 * total, resets
    assert 0.3 * total <= admitted_n <= 0.8 * total, admitted_n
    assert 0.3 * total <= streams <= 0.8 * total, streams
    assert sum(1 for s in specs if s["stream"] and s["api"] == "chat_completions" and not s["include_usage"]) >= 30
    for tenant in TENANTS:
        assert per_tenant[(tenant, "admitted")] >= 20, tenant
        assert per_tenant[(tenant, "rate_limited")] + per_tenant[(tenant, "quota_exceeded")] >= 10, tenant
    assert per_tenant[("t2", "quota_exceeded")] >= 5
    assert run["load_s"] < 60, run["load_s"]
