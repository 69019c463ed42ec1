#!/usr/bin/env python3
"""Fake OpenAI / Anthropic / Gemini upstream for Tollgate end-to-end tests.

Speaks just enough of the real wire formats that the official ``openai``,
``anthropic`` (AnthropicVertex too) and ``google-genai`` Python SDKs parse its
replies (JSON and SSE), and keeps a ledger
of every API request together with the usage it reported, so tests can compare
what the filter accounted with what the "provider" actually sent.
Python 3.11 standard library only, but for the Bedrock dialect (tests/fake_bedrock.py, imported
on the first Bedrock request), which needs botocore.

CLI::

    python3 tests/fake_upstream.py --port 0 --name NAME [--port-file PATH]
                                   [--sigv4 ACCESS_KEY:SECRET_KEY:REGION]

Binds 127.0.0.1 only (port 0 picks a free port), prints ``LISTENING <port>`` on
stdout and, with --port-file, writes the port to PATH (atomically). Stops on
SIGTERM/SIGINT. ``--quiet`` silences the per-request log on stderr. ``--sigv4``: every Bedrock
request must carry a valid SigV4 signature for these test credentials (service ``bedrock``),
checked with botocore's own signer; else 403 InvalidSignatureException (see fake_bedrock).

Endpoints (POST, matched by path suffix, query string ignored):
    .../chat/completions   OpenAI Chat Completions   (api "chat_completions")
    .../responses          OpenAI Responses          (api "responses")
    .../embeddings         OpenAI Embeddings         (api "embeddings")
    .../messages           Anthropic Messages        (api "messages")
Google dialects (tests/fake_google.py; `{m}` = the model segment, percent-decoded
into the ledger's "model"; AI Studio `/v1|v1beta/models/{m}`, Vertex
`/v1|v1beta1/projects/P/locations/L/publishers/google/models/{m}`, express mode
`/v1beta1/publishers/google/models/{m}`; any prefix, trailing slash allowed):
    .../models/{m}:generateContent         Gemini JSON             (api "generate_content")
    .../models/{m}:streamGenerateContent   ?alt=sse: SSE, `data: {...}` + CRLF CRLF;
                                           without alt: one JSON array
                                           `[{...}\n,\r\n{...}\n]`, one HTTP chunk
                                           per element     (api "generate_content")
    .../models/{m}:countTokens             {"totalTokens", "promptTokensDetails"}
                                           (api "count_tokens": ledger usage all 0,
                                           the count in "total_tokens")
    .../models/{m}:embedContent            {"embedding": {"values"}}; Vertex adds
                                           usageMetadata.promptTokenCount
    .../models/{m}:batchEmbedContents      {"embeddings": [...]}, no usage (AI Studio;
                                           google-genai's embed_content on AI Studio)
                                                                    (api "embed_content")
    .../publishers/anthropic/models/{m}:rawPredict, :streamRawPredict
                                           Claude on Vertex: Anthropic Messages JSON /
                                           SSE, model from the path (api "raw_predict");
                                           {m} = count-tokens: {"input_tokens"} (api
                                           "count_tokens")
  Google JSON bodies are pretty-printed (two-space indent, as Google's front end),
  SSE lines are one-line JSON; zero counts are left out of usageMetadata (proto3);
  errors are {"error": {"code", "message", "status": "RESOURCE_EXHAUSTED"|...}}
  (400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND,
  5xx INTERNAL/UNAVAILABLE/...), for rawPredict too.
    .../model/{modelId}/converse, /converse-stream,
    .../model/{modelId}/invoke, /invoke-with-response-stream
                           AWS Bedrock runtime        (api "converse" / "invoke"): answered by
                           tests/fake_bedrock.py (event streams, Bedrock errors, SigV4 check and
                           its own knobs x-fake-stream-exception, x-fake-corrupt-crc,
                           x-fake-error-type: see its docstring)
Control: ``GET /ledger`` (JSON array, arrival order; ``?id=ID``: only that id's entries, without
dumping a ledger of tens of thousands), ``DELETE /ledger`` or
``POST /ledger/reset`` (clear), ``GET /healthz`` ("ok"). Anything else: 404.
A body that is not a JSON object: 400 in the API's error shape.

Knobs (request headers; all optional)
=================================  =========================================
x-fake-request-id: ID              ledger entry id (default: random uuid hex)
x-fake-delay-ms: MS                sleep before answering
x-fake-chunks: N                   content chunks (default 3); JSON content =
                                   the chunks joined; SSE = one delta each
x-fake-hold-ms: MS                 SSE: sleep before the last piece (a client that
                                   leaves mid-stream always can, however slow)
x-fake-split: SEED                 SSE: cut the body at random byte offsets
                                   (random.Random(SEED)), one HTTP chunk per
                                   piece, ~3 ms apart. Default: one HTTP chunk
                                   per SSE event
x-fake-no-usage: 1                 omit usage (chat stream: no usage chunk;
                                   JSON: no usage key; responses: usage null;
                                   anthropic: no usage in message_start/delta)
x-fake-status-server: NAME         apply x-fake-status only on the server named NAME
x-fake-status: NNN                 error NNN in the API's shape (429 adds
                                   retry-after: 1)
x-fake-reset-after: N              SSE: send N events, then RST the
                                   connection (no terminating chunk). JSON:
                                   send headers + first N body bytes, then RST
x-fake-reset-before-end: N         JSON: send headers + all but the last N body
                                   bytes, then RST (1: only the closing brace is
                                   missing, the usage passed whole)
x-fake-record-body: 1              SSE: keep the exact bytes sent (`sse_body`) and the
                                   usage event (`usage_event`) in the ledger entry
x-fake-gzip: 1                     gzip the body (content-encoding: gzip)
                                   whatever accept-encoding says; SSE is
                                   gzip-sync-flushed per event
x-fake-input-tokens: N             usage overrides (see below)
x-fake-output-tokens: N
x-fake-generate: max               a vLLM-like upstream: output = all its body allows, read as
                                   vLLM reads it (see permissive_output)
x-fake-cached-tokens: N
x-fake-cache-write-tokens: N
x-fake-reasoning-tokens: N
x-fake-hostile: MODE               a hostile upstream (see below)
x-fake-invalid-count: JSON         the garbage count of invalid-usage (default -1)
x-fake-bomb-bytes: N               decoded size of a bomb / endless line
                                   (default 1 GiB = 1073741824)
--- Google paths only (generateContent / streamGenerateContent) ---
x-fake-sse-eol: crlf|lf|cr         line ends of the alt=sse stream (default crlf,
                                   as Google); an event ends with two of them
x-fake-usage-placement: MODE       streams: `every` (default) = usageMetadata with
                                   running totals on every chunk; `last` = only on
                                   the last chunk; `separate` = a final usage-only
                                   chunk (no candidates)
x-fake-tool-prompt-tokens: N       toolUsePromptTokenCount (default 0)
x-fake-block: REASON               200 with promptFeedback.blockReason = REASON
                                   (e.g. SAFETY), no candidates, usage with
                                   promptTokenCount only (a stream: one chunk)
=================================  =========================================
On Google paths x-fake-status, -status-server, -reset-after (SSE events /
JSON-array elements / JSON bytes), -reset-before-end, -split, -hold-ms,
-no-usage, -delay-ms, -chunks, -gzip, -record-body, -generate and the usage
knobs work as above; x-fake-hostile takes absurd-usage, foreign-usage and
invalid-usage only (invalid-usage poisons candidatesTokenCount).
Knobs combine (split + gzip + reset-after cuts the gzip stream after event N).
A malformed knob (non-integer, negative) gives a 400 in the API's shape.
The content text contains non-ASCII ("café ☕"), so random byte splits can cut
UTF-8 sequences.
Without x-fake-gzip the reply is always identity-encoded, even when the
request's accept-encoding allows gzip (the header is kept in the ledger).

Hostile modes (x-fake-hostile), for the filter's memory and usage guarantees.
Bombs answer any API path with a Chat Completions body (JSON for the *-json
modes, SSE otherwise), whatever the request's stream flag, and are generated
as a stream of compressed 1 MiB blocks (each full-flushed, so one compressed
block is reused): about 1 MB on the wire per GiB decoded, never held in memory.
    gzip-bomb-json     gzip JSON: content = N bytes of "a", usage at the end
    deflate-bomb-json  the same as content-encoding: deflate (zlib wrapper)
    gzip-bomb-sse      gzip SSE: role chunk, 2 content deltas, N bytes of
                       1 KiB comment lines, the usage chunk, [DONE]
    gzip-bomb-line     gzip SSE: role chunk, 1 content delta, then ONE data
                       line of N bytes, then the usage chunk and [DONE]
    endless-line       identity SSE: the same single N-byte data line,
                       unencoded (plain bytes streamed in 1 MiB writes)
    absurd-usage       the normal reply of the API, usage input = output =
                       2**63 (total_tokens 2**64)
    foreign-usage      the normal reply, but the usage object has the other
                       vendor's fields (OpenAI paths: Anthropic's input_tokens /
                       output_tokens, Responses: prompt_tokens /
                       completion_tokens, Messages: prompt_tokens /
                       completion_tokens)
    invalid-usage      the normal reply, but the output count of the usage
                       (chat: completion_tokens, responses and messages:
                       output_tokens, in message_delta for a stream;
                       embeddings: prompt_tokens) is the JSON value of
                       x-fake-invalid-count (default -1: also 2.5, 1e30,
                       "5", 18446744073709551616, ...)
Bombs record in the ledger "hostile", "sent_bytes" (body bytes on the wire)
and "sent_sha256" (of those bytes), so tests can check the client got them
untouched; their "usage" is the usage written in the body.

Usage model. Defaults: input = max(1, ceil(len(raw body bytes) / 4)),
output = 2 * chunks + 1, at most the request's max-tokens field (times chat's n),
as a real provider would (x-fake-output-tokens is sent as given), cached_input = cache_write_input = reasoning = 0.
Headers override, then: input = max(input, cached + cache_write) and
output = max(output, reasoning). Fields a wire format cannot express are forced
to 0 in the ledger: reasoning for Anthropic; everything but input for
embeddings (output 0). Normalised usage ``input`` counts ALL prompt tokens
(cached and cache-write included). On the wire:
    OpenAI chat        prompt_tokens = input, completion_tokens = output,
                       prompt_tokens_details.cached_tokens = cached_input,
                       (.cache_write_tokens = cache_write_input, only if > 0),
                       completion_tokens_details.reasoning_tokens = reasoning
    OpenAI responses   input_tokens = input, output_tokens = output,
                       input_tokens_details {cached_tokens, cache_write_tokens},
                       output_tokens_details.reasoning_tokens = reasoning
    OpenAI embeddings  prompt_tokens = total_tokens = input
    Anthropic          input_tokens = input - cached - cache_write,
                       cache_read_input_tokens = cached_input,
                       cache_creation_input_tokens = cache_write_input,
                       output_tokens = output (message_start says 1; the
                       message_delta carries the final cumulative count)
    Gemini             promptTokenCount = x-fake-input-tokens (default the
                       estimate above; at least cached), cachedContentTokenCount
                       = cached_input (inside promptTokenCount),
                       toolUsePromptTokenCount = x-fake-tool-prompt-tokens,
                       thoughtsTokenCount = reasoning, candidatesTokenCount =
                       output - reasoning; totalTokenCount = their sum. The
                       ledger's normalised usage: input = promptTokenCount +
                       toolUsePromptTokenCount, output = candidatesTokenCount +
                       thoughtsTokenCount, cached_input = cachedContentTokenCount,
                       reasoning = thoughtsTokenCount, cache_write_input = 0.
                       The cap is generationConfig.maxOutputTokens x candidateCount
                       (also generation_config / max_output_tokens /
                       candidate_count); x-fake-generate: max = the cap, else
                       30000 x candidateCount. finishReason MAX_TOKENS when the
                       output reaches the cap. candidateCount answers that many
                       candidates. Embeddings: input only (AI Studio reports none:
                       "usage_on_wire": false, "usage_sent": false).
    Claude on Vertex   as Anthropic (cap: max_tokens)

Ledger entry (recorded before the body is written, then updated)::

    {"id", "server": NAME, "api", "path" (raw, with query), "model",
     "stream": bool, "include_usage": bool (usage would be on the wire absent
     x-fake-no-usage: false only for a chat stream without
     stream_options.include_usage), "status": int,
     "usage": {"input", "output", "cached_input", "cache_write_input",
     "reasoning"} (all 0 for error replies), "usage_sent": bool (the reply
     carrying the final usage reached the socket),
     "events": int (SSE events in the full reply), "events_sent": int,
     "reset": bool, "completed": bool (whole body written),
     "client_disconnected": bool, "headers": {lower-cased name: value;
     authorization / x-api-key / x-goog-api-key: true}, "body": parsed request JSON or null}
Google entries add "method" (generateContent, ...), "dialect" ("ai_studio" or
"vertex"), "stream_format" ("sse", "json_array" or null); generate_content adds
"block", "placement", "sse_eol", "candidate_count"; embed_content
"usage_on_wire"; count_tokens "total_tokens". "events" counts SSE events or
JSON-array pieces (the closing "]" is a piece of its own).
"""

import argparse, base64, fcntl, gzip, hashlib, json, math, os, random, signal  # noqa: E401
import socket, string, struct, sys, termios, threading, time, uuid, zlib  # noqa: E401
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.modules.setdefault("fake_upstream", sys.modules[__name__])  # one module, run or imported
try:  # the Gemini / Vertex dialects (a container that mounts only this file answers them 404)
    import fake_google  # noqa: E402
except ImportError:
    fake_google = None

API_SUFFIXES = (("/chat/completions", "chat_completions"), ("/responses", "responses"),
                ("/embeddings", "embeddings"), ("/messages", "messages"))
SECRET_HEADERS = ("authorization", "x-api-key")
WORDS = ("Hello", " from", " {name}", ":", " café", " ☕", " tokens", " flow", ",", " ok")
SPLIT_MAX_PIECE = 48
SPLIT_SLEEP_S = 0.003

OPENAI_ERRORS = {  # status -> (type, code)
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", None), 405: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"), 500: ("server_error", None),
    502: ("server_error", None), 503: ("server_error", "service_unavailable"),
}
ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 503: "api_error", 529: "overloaded_error",
}


class KnobError(ValueError):
    """A malformed x-fake-* header or request body (answered with a 400)."""


# --------------------------------------------------------------------------- ledger
class Ledger:
    def __init__(self):
        self._lock = threading.Lock()
        self._entries = []

    def add(self, entry):
        with self._lock:
            self._entries.append(entry)

    def update(self, entry, **fields):
        with self._lock:
            entry.update(fields)

    def dump(self, entry_id=None):
        with self._lock:
            entries = self._entries if entry_id is None else [
                e for e in self._entries if e.get("id") == entry_id]
            return json.dumps(entries, ensure_ascii=False)

    def clear(self):
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------------- helpers
def _rand(n, alphabet=string.ascii_letters + string.digits):
    return "".join(random.choice(alphabet) for _ in range(n))


def _jdump(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _int_knob(headers, name, default):
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise KnobError(f"header {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise KnobError(f"header {name} must be >= 0")
    return value


def _json_knob(headers, name, default):
    raw = headers.get(name)
    try:
        return default if raw is None else json.loads(raw)
    except ValueError:
        raise KnobError(f"header {name} must be a JSON value, got {raw!r}") from None


def _flag(headers, name):
    return (headers.get(name) or "").strip().lower() in ("1", "true", "yes", "on")


def max_output(api, body):
    """The request's own output cap, which a real provider never exceeds (per choice)."""
    names = {"chat_completions": ("max_completion_tokens", "max_tokens"), "responses": ("max_output_tokens",),
             "messages": ("max_tokens",)}.get(api, ())
    cap = next((body[n] for n in names if isinstance(body.get(n), int) and body[n] > 0), None)
    n = body.get("n") if api == "chat_completions" and isinstance(body.get("n"), int) else 1
    return None if cap is None else cap * max(1, n)


UNCAPPED_OUTPUT = 30000


def _lax_count(value):
    """A count as pydantic's lax mode coerces it (vLLM): ints, integral floats, numeric strings,
    booleans. None when absent or null; ValueError when the upstream would refuse it."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        value = float(value.strip())
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def permissive_output(api, body):
    """All the output a vLLM-like upstream may generate for this body: `max_completion_tokens or
    max_tokens` (0 or null is no cap: UNCAPPED_OUTPUT per output), times `n` / `best_of`."""
    names = {"chat_completions": ("max_completion_tokens", "max_tokens"), "responses": ("max_output_tokens",),
             "messages": ("max_tokens",)}.get(api, ())
    try:
        cap = next((c for c in (_lax_count(body.get(n)) for n in names) if c), None)
        outputs = max(_lax_count(body.get("n")) or 1, _lax_count(body.get("best_of")) or 1)
    except (ValueError, TypeError):
        raise KnobError("a count field is not a number (vLLM answers 400)") from None
    return (cap or UNCAPPED_OUTPUT) * outputs


def compute_usage(api, raw_len, headers, n_chunks, body=None):
    """Deterministic normalised usage for a request (see module docstring)."""
    cap = max_output(api, body or {})
    default_output = 2 * n_chunks + 1 if cap is None else min(2 * n_chunks + 1, cap)
    if (headers.get("x-fake-generate") or "").strip().lower() == "max":
        default_output = permissive_output(api, body or {})
    u = {
        "input": _int_knob(headers, "x-fake-input-tokens", max(1, math.ceil(raw_len / 4))),
        "output": _int_knob(headers, "x-fake-output-tokens", default_output),
        "cached_input": _int_knob(headers, "x-fake-cached-tokens", 0),
        "cache_write_input": _int_knob(headers, "x-fake-cache-write-tokens", 0),
        "reasoning": _int_knob(headers, "x-fake-reasoning-tokens", 0),
    }
    if api == "messages":
        u["reasoning"] = 0  # Anthropic folds thinking into output_tokens
    if api == "embeddings":
        u.update(output=0, cached_input=0, cache_write_input=0, reasoning=0)
    u["input"] = max(u["input"], u["cached_input"] + u["cache_write_input"])
    u["output"] = max(u["output"], u["reasoning"])
    return u


def _poison(c, wire_usage, key):
    """invalid-usage: the count `key` becomes the garbage value asked for."""
    if c["hostile"] == "invalid-usage":
        wire_usage[key] = c["invalid_count"]


def openai_error(status, message):
    etype, code = OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def anthropic_error(status, message):
    etype = ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": etype, "message": message},
            "request_id": "req_" + _rand(24)}


def _sse(data, event=None):
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + (data if isinstance(data, bytes) else _jdump(data)) + b"\n\n"


# --------------------------------------------------------------------------- wire formats
# Each builder gets a context dict and returns ("json", obj, usage_included) or
# ("sse", [event bytes], index of the event carrying the final usage or None).
def build_chat(c):
    u, text, created = c["usage"], "".join(c["chunks"]), int(time.time())
    cid = "chatcmpl-" + _rand(29)
    wire_usage = {
        "prompt_tokens": u["input"], "completion_tokens": u["output"],
        "total_tokens": u["input"] + u["output"],
        "prompt_tokens_details": {"cached_tokens": u["cached_input"], "audio_tokens": 0,
                                  **({"cache_write_tokens": u["cache_write_input"]}
                                     if u["cache_write_input"] else {})},
        "completion_tokens_details": {"reasoning_tokens": u["reasoning"], "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }
    if c["hostile"] == "foreign-usage":
        wire_usage = {"input_tokens": u["input"], "output_tokens": u["output"]}
    _poison(c, wire_usage, "completion_tokens")
    if not c["stream"]:
        obj = {"id": cid, "object": "chat.completion", "created": created, "model": c["model"],
               "choices": [{"index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None,
                                        "annotations": []},
                            "logprobs": None, "finish_reason": "stop"}],
               "service_tier": "default", "system_fingerprint": "fp_fake"}
        if not c["no_usage"]:
            obj["usage"] = wire_usage
        return "json", obj, not c["no_usage"]

    def chunk(delta, finish=None):
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": c["model"], "service_tier": "default", "system_fingerprint": "fp_fake",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
               "obfuscation": _rand(8)}  # real streams pad chunks with this random field
        if c["include_usage"]:
            obj["usage"] = None
        return _sse(obj)

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in c["chunks"]]
    events.append(chunk({}, "stop"))
    usage_idx = None
    if c["include_usage"] and not c["no_usage"]:
        usage_idx = len(events)
        events.append(_sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": c["model"], "service_tier": "default",
                            "system_fingerprint": "fp_fake", "choices": [], "usage": wire_usage}))
    events.append(_sse(b"[DONE]"))
    return "sse", events, usage_idx


def build_responses(c):
    u, body, text, created = c["usage"], c["body"], "".join(c["chunks"]), int(time.time())
    rid, mid = "resp_" + uuid.uuid4().hex + uuid.uuid4().hex[:18], "msg_" + uuid.uuid4().hex * 2

    def response(status, output, usage):
        return {
            "id": rid, "object": "response", "created_at": created, "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": None,
            "model": c["model"], "output": output, "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": None, "reasoning": {"effort": None, "summary": None},
            "safety_identifier": None, "service_tier": "default", "store": True,
            "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": [], "top_logprobs": 0, "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None,
            "metadata": body.get("metadata") or {},
            "completed_at": int(time.time()) if status == "completed" else None,
        }

    wire_usage = None if c["no_usage"] else {
        "input_tokens": u["input"],
        "input_tokens_details": {"cached_tokens": u["cached_input"],
                                 "cache_write_tokens": u["cache_write_input"]},
        "output_tokens": u["output"],
        "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
        "total_tokens": u["input"] + u["output"],
    }
    if wire_usage and c["hostile"] == "foreign-usage":
        wire_usage = {"prompt_tokens": u["input"], "completion_tokens": u["output"]}
    if wire_usage:
        _poison(c, wire_usage, "output_tokens")

    def part(t):
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": t}

    def message(status, content):
        return {"id": mid, "type": "message", "status": status, "content": content,
                "role": "assistant"}

    done_msg = message("completed", [part(text)])
    if not c["stream"]:
        return "json", response("completed", [done_msg], wire_usage), not c["no_usage"]

    seq = iter(range(1 << 30))

    def ev(name, **fields):
        return _sse({"type": name, "sequence_number": next(seq), **fields}, event=name)

    loc = {"item_id": mid, "output_index": 0, "content_index": 0}
    events = [
        ev("response.created", response=response("in_progress", [], None)),
        ev("response.in_progress", response=response("in_progress", [], None)),
        ev("response.output_item.added", output_index=0, item=message("in_progress", [])),
        ev("response.content_part.added", **loc, part=part("")),
    ]
    events += [ev("response.output_text.delta", **loc, delta=p, logprobs=[], obfuscation=_rand(8)) for p in c["chunks"]]
    events += [
        ev("response.output_text.done", **loc, text=text, logprobs=[]),
        ev("response.content_part.done", **loc, part=part(text)),
        ev("response.output_item.done", output_index=0, item=done_msg),
        ev("response.completed", response=response("completed", [done_msg], wire_usage)),
    ]
    return "sse", events, None if c["no_usage"] else len(events) - 1


def _embedding_inputs(inp):
    if isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp)):
        return [inp]
    if isinstance(inp, list) and inp:
        return inp
    raise KnobError("'input' must be a non-empty string or array")


def build_embeddings(c):
    body, u = c["body"], c["usage"]
    try:
        dims = int(body.get("dimensions") or 8)
    except (TypeError, ValueError):
        raise KnobError("'dimensions' must be an integer") from None
    as_b64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(_embedding_inputs(body.get("input"))):
        seed = hashlib.sha256(_jdump(item)).digest()
        vec = [(seed[k % 32] - 127.5) / 127.5 for k in range(dims)]
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        vec = [v / norm for v in vec]
        if as_b64:
            emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode("ascii")
        else:
            emb = [struct.unpack("<f", struct.pack("<f", v))[0] for v in vec]  # float32 values
        data.append({"object": "embedding", "index": i, "embedding": emb})
    obj = {"object": "list", "data": data, "model": c["model"]}
    if not c["no_usage"]:
        obj["usage"] = {"prompt_tokens": u["input"], "total_tokens": u["input"]}
        if c["hostile"] == "foreign-usage":
            obj["usage"] = {"input_tokens": u["input"]}
        _poison(c, obj["usage"], "prompt_tokens")
    return "json", obj, not c["no_usage"]


def build_messages(c):
    u, text = c["usage"], "".join(c["chunks"])
    mid = "msg_01" + _rand(22)
    wire_usage = {"input_tokens": u["input"] - u["cached_input"] - u["cache_write_input"],
                  "cache_creation_input_tokens": u["cache_write_input"],
                  "cache_read_input_tokens": u["cached_input"],
                  "output_tokens": u["output"], "service_tier": "standard"}
    foreign = c["hostile"] == "foreign-usage"
    if foreign:
        wire_usage = {"prompt_tokens": u["input"], "completion_tokens": u["output"]}

    def message(content, stop_reason, usage):
        m = {"id": mid, "type": "message", "role": "assistant", "model": c["model"],
             "content": content, "stop_reason": stop_reason, "stop_sequence": None}
        if not c["no_usage"]:
            m["usage"] = usage
        return m

    if not c["stream"]:
        _poison(c, wire_usage, "output_tokens")
        return "json", message([{"type": "text", "text": text}], "end_turn", wire_usage), not c["no_usage"]
    events = [
        _sse({"type": "message_start",
              "message": message([], None, wire_usage if foreign else {**wire_usage, "output_tokens": 1})},
             "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             "content_block_start"),
        _sse({"type": "ping"}, "ping"),
    ]
    events += [_sse({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": p}}, "content_block_delta")
               for p in c["chunks"]]
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if not c["no_usage"]:
        delta["usage"] = {"completion_tokens" if foreign else "output_tokens": u["output"]}
        _poison(c, delta["usage"], "output_tokens")
    events.append(_sse(delta, "message_delta"))
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return "sse", events, None if c["no_usage"] else len(events) - 2


# --------------------------------------------------------------------------- hostile bodies
HOSTILE_MODES = ("gzip-bomb-json", "deflate-bomb-json", "gzip-bomb-sse", "gzip-bomb-line",
                 "endless-line", "absurd-usage", "foreign-usage", "invalid-usage")
BOMB_MODES = HOSTILE_MODES[:5]
BOMB_BLOCK = 1 << 20
BOMB_DEFAULT_BYTES = 1 << 30
ABSURD_TOKENS = 1 << 63
_FILLERS = {"text": b"a" * BOMB_BLOCK,
            "comments": (b":" + b"a" * 1022 + b"\n") * (BOMB_BLOCK // 1024)}
_bomb_cache, _bomb_lock = {}, threading.Lock()


def _deflate_segment(data, final):
    """Raw deflate of `data` from an empty window, ending byte-aligned (full flush) or final:
    segments concatenate into one valid deflate stream."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


def _bomb_filler(kind):
    with _bomb_lock:
        if kind not in _bomb_cache:
            _bomb_cache[kind] = _deflate_segment(_FILLERS[kind], False)
        return _FILLERS[kind], _bomb_cache[kind]


def _bomb_checksum(wrapper, prefix, kind, n):
    """gzip CRC-32 / zlib Adler-32 of prefix + filler * n (cached: ~1 s per GiB to compute)."""
    key = (wrapper, prefix, kind, n)
    with _bomb_lock:
        if key in _bomb_cache:
            return _bomb_cache[key]
    fn, block = (zlib.crc32, 0) if wrapper == "gzip" else (zlib.adler32, 1)
    value = fn(prefix, block)
    for _ in range(n):
        value = fn(_FILLERS[kind], value)
    with _bomb_lock:
        _bomb_cache[key] = value
    return value


def compressed_bomb(wrapper, prefix, kind, n, suffix):
    """(length, iterator of pieces) of `prefix + filler * n + suffix` compressed with `wrapper`
    ("gzip" or "deflate" = zlib), without ever holding the decoded body."""
    _, block = _bomb_filler(kind)
    head = _deflate_segment(prefix, False)
    tail = _deflate_segment(suffix, True)
    check = _bomb_checksum(wrapper, prefix, kind, n)
    if wrapper == "gzip":
        size = len(prefix) + n * BOMB_BLOCK + len(suffix)
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        trailer = struct.pack("<II", zlib.crc32(suffix, check), size & 0xFFFFFFFF)
    else:
        header = b"\x78\xda"
        trailer = struct.pack(">I", zlib.adler32(suffix, check))
    per_write = max(1, 65536 // len(block))
    length = len(header) + len(head) + n * len(block) + len(tail) + len(trailer)

    def pieces():
        yield header + head
        left = n
        while left:
            k = min(per_write, left)
            yield block * k
            left -= k
        yield tail + trailer

    return length, pieces()


def bomb_parts(mode, model, usage):
    """(content type, prefix, filler kind, suffix) of a bomb's decoded body."""
    cid, created = "chatcmpl-hostile", 1700000000
    wire_usage = {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
                  "total_tokens": usage["input"] + usage["output"]}
    if mode.endswith("-json"):
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model}
        prefix = _jdump(head)[:-1] + b',"choices":[{"index":0,"message":{"role":"assistant","content":"'
        suffix = (b'"},"finish_reason":"stop"}],"usage":' + _jdump(wire_usage) + b"}")
        return "application/json", prefix, "text", suffix

    def chunk(delta=None, finish=None, use=None):
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [] if use else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if use:
            obj["usage"] = use
        return _sse(obj)

    deltas = 2 if mode == "gzip-bomb-sse" else 1
    prefix = chunk({"role": "assistant", "content": ""})
    prefix += b"".join(chunk({"content": "hi"}) for _ in range(deltas))
    end = chunk({}, "stop") + chunk(use=wire_usage) + _sse(b"[DONE]")
    if mode == "gzip-bomb-sse":
        return "text/event-stream", prefix, "comments", end
    prefix += b'data: {"id":"' + cid.encode() + b'","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
    return "text/event-stream", prefix, "text", b'"}}]}\n\n' + end


BUILDERS = {"chat_completions": build_chat, "responses": build_responses,
            "embeddings": build_embeddings, "messages": build_messages}


# --------------------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream/1.0"
    sys_version = ""

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write(f"[{self.server.name}] {self.address_string()} {fmt % args}\n")

    # ---- low-level I/O
    def _read_body(self):
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _start(self, status, ctype, extra, length=None):
        self.send_response(status)
        self.send_header("content-type", ctype)
        if length is None:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(length))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()

    def _send_simple(self, status, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else _jdump(body)
        self._start(status, ctype, (), len(data))
        self.wfile.write(data)

    def _chunk(self, data):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _abort(self):
        """Wait until the kernel has pushed out what we wrote, then RST the connection."""
        self.close_connection = True
        deadline = time.monotonic() + 1.0
        try:  # TIOCOUTQ on a TCP socket = bytes not yet acknowledged by the peer (Linux)
            while time.monotonic() < deadline:
                if struct.unpack("i", fcntl.ioctl(self.connection, termios.TIOCOUTQ, b"\0" * 4))[0] == 0:
                    break
                time.sleep(0.002)
        except OSError:
            pass
        time.sleep(0.02)  # let the peer consume the bytes before the reset
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.rfile.close()
        self.connection.close()  # real close (makefile refs released) -> RST

    # ---- routing
    def _route(self):
        path, method = urlsplit(self.path).path.rstrip("/"), self.command
        raw = self._read_body()
        api = next((name for suffix, name in API_SUFFIXES if path.endswith(suffix)), None)
        google = fake_google.match(path) if method == "POST" and fake_google else None
        if google:
            fake_google.handle(self, google, raw)
        elif (method, path) == ("GET", "/healthz"):
            self._send_simple(200, b"ok", "text/plain")
        elif (method, path) == ("GET", "/ledger"):
            entry_id = parse_qs(urlsplit(self.path).query).get("id", [None])[0]
            self._send_simple(200, self.server.ledger.dump(entry_id).encode("utf-8"))
        elif (method, path) in (("DELETE", "/ledger"), ("POST", "/ledger/reset")):
            self.server.ledger.clear()
            self._send_simple(200, {"ok": True})
        elif method == "POST" and api:
            self._handle_api(api, raw)
        elif method == "POST" and "/model/" in path and _bedrock().match(self.path):
            _bedrock().handle(self, sys.modules[__name__], raw, _bedrock().match(self.path))
        else:
            self._send_simple(404, openai_error(404, f"Invalid URL ({method} {path})"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _route

    # ---- API requests
    def _handle_api(self, api, raw):
        hdrs = {}
        for k, v in self.headers.items():
            k = k.lower()
            hdrs[k] = True if k in SECRET_HEADERS else (f"{hdrs[k]}, {v}" if k in hdrs else v)
        try:
            body, bad_json = json.loads(raw.decode("utf-8")), None
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # JSON and UTF-8 decode errors
            body, bad_json = None, f"We could not parse the JSON body of your request. ({exc})"
        b = body or {}
        stream = bool(b.get("stream")) and api != "embeddings"
        include_usage = not stream or api != "chat_completions" or bool(
            isinstance(b.get("stream_options"), dict) and b["stream_options"].get("include_usage"))
        entry = {"id": self.headers.get("x-fake-request-id") or uuid.uuid4().hex,
                 "server": self.server.name, "api": api, "path": self.path,
                 "model": b.get("model") if isinstance(b.get("model"), str) else "",
                 "stream": stream, "include_usage": include_usage, "status": 200,
                 "usage": dict.fromkeys(("input", "output", "cached_input", "cache_write_input",
                                         "reasoning"), 0),
                 "usage_sent": False, "events": 0, "events_sent": 0, "reset": False,
                 "completed": False, "client_disconnected": False, "headers": hdrs, "body": body}
        self.server.ledger.add(entry)
        try:
            self._answer(api, len(raw), b, entry, bad_json)
        except (BrokenPipeError, ConnectionResetError):
            self.server.ledger.update(entry, completed=False, client_disconnected=True)
            self.close_connection = True

    def _answer(self, api, raw_len, body, entry, error):
        h, payload, usage = self.headers, None, entry["usage"]
        try:
            n_chunks = _int_knob(h, "x-fake-chunks", 3)
            reset_after = _int_knob(h, "x-fake-reset-after", None)
            reset_before_end = _int_knob(h, "x-fake-reset-before-end", None)
            delay = _int_knob(h, "x-fake-delay-ms", 0)
            status = 400 if error else _int_knob(h, "x-fake-status", 200)
            only = h.get("x-fake-status-server")
            if only and only != self.server.name:
                status = 200  # the error knob is for another server (retry tests)
            if not 200 <= status < 600:
                raise KnobError("x-fake-status must be a valid HTTP status")
            hostile = (h.get("x-fake-hostile") or "").strip().lower() or None
            if hostile and hostile not in HOSTILE_MODES:
                raise KnobError(f"x-fake-hostile must be one of {', '.join(HOSTILE_MODES)}")
            if status < 300:
                usage = compute_usage(api, raw_len, h, n_chunks, body)
                if hostile == "absurd-usage":
                    usage.update(input=ABSURD_TOKENS, output=ABSURD_TOKENS)
                if hostile in BOMB_MODES:
                    usage = {**usage, "cached_input": 0, "cache_write_input": 0, "reasoning": 0}
                    self.server.ledger.update(entry, status=status, usage=usage, hostile=hostile)
                    return self._write_bomb(entry, hostile, usage,
                                            _int_knob(h, "x-fake-bomb-bytes", BOMB_DEFAULT_BYTES))
                chunks = [WORDS[i % len(WORDS)].format(name=self.server.name) for i in range(n_chunks)]
                kind, payload, usage_where = BUILDERS[api]({
                    "model": entry["model"], "body": body, "stream": entry["stream"],
                    "include_usage": entry["include_usage"], "usage": usage,
                    "no_usage": _flag(h, "x-fake-no-usage"), "chunks": chunks, "hostile": hostile,
                    "invalid_count": _json_knob(h, "x-fake-invalid-count", -1)})
        except KnobError as exc:
            status, error, reset_after, delay, payload, usage = 400, str(exc), None, 0, None, entry["usage"]
            reset_before_end = None
            hostile = None
        self.server.ledger.update(entry, status=status, usage=usage,
                                  **({"hostile": hostile} if payload is not None and hostile else {}))
        if delay:
            time.sleep(delay / 1000.0)
        gz = _flag(h, "x-fake-gzip")
        extra = [("request-id" if api == "messages" else "x-request-id", "req_" + _rand(24))]
        extra += [("content-encoding", "gzip")] if gz else []
        if payload is None:  # error reply in the API's shape
            shape = anthropic_error if api == "messages" else openai_error
            kind, usage_where = "json", False
            payload = shape(status, error or f"fake upstream: injected status {status}")
            extra += [("retry-after", "1")] if status == 429 else []
        if kind == "json":
            self._write_json(entry, status, payload, usage_where, extra, gz, reset_after, reset_before_end)
        else:
            self._write_sse(entry, payload, usage_where, extra, gz, reset_after, h.get("x-fake-split"))

    def _write_bomb(self, entry, mode, usage, size):
        """A hostile body (see "Hostile modes"), streamed; the ledger gets its length and hash."""
        ctype, prefix, kind, suffix = bomb_parts(mode, entry["model"], usage)
        n = max(1, size // BOMB_BLOCK)
        digest, sent = hashlib.sha256(), 0
        extra = [("x-request-id", "req_" + _rand(24))]
        if mode == "endless-line":
            pieces = [prefix] + [_FILLERS[kind]] * n + [suffix]
            length = None
        else:
            wrapper = "deflate" if mode.startswith("deflate") else "gzip"
            extra.append(("content-encoding", wrapper))
            length, pieces = compressed_bomb(wrapper, prefix, kind, n, suffix)
        if ctype == "application/json":
            self._start(200, ctype, extra, length)
        else:
            self._start(200, ctype, [("cache-control", "no-cache")] + extra)
        for piece in pieces:
            digest.update(piece)
            sent += len(piece)
            if ctype == "application/json":
                self.wfile.write(piece)
            else:
                self._chunk(piece)
        if ctype != "application/json":
            self.wfile.write(b"0\r\n\r\n")
        self.server.ledger.update(entry, completed=True, usage_sent=True, sent_bytes=sent,
                                  sent_sha256=digest.hexdigest())

    def _write_json(self, entry, status, obj, usage_included, extra, gz, reset_after, reset_before_end=None):
        data = obj if isinstance(obj, bytes) else _jdump(obj)
        data = gzip.compress(data, mtime=0) if gz else data
        self._start(status, "application/json", extra, len(data))
        if reset_before_end:
            reset_after = max(0, len(data) - reset_before_end)
        if reset_after is not None and reset_after < len(data):
            self.server.ledger.update(entry, reset=True)
            self.wfile.write(data[:reset_after])
            return self._abort()
        self.server.ledger.update(entry, completed=True, usage_sent=usage_included)
        self.wfile.write(data)

    def _write_sse(self, entry, events, usage_idx, extra, gz, reset_after, split,
                   ctype="text/event-stream; charset=utf-8"):
        ledger, total = self.server.ledger, len(events)
        self._start(200, ctype, [("cache-control", "no-cache")] + extra)
        reset = reset_after is not None and reset_after < total
        events = events[:reset_after] if reset else events
        blobs = list(events)
        if gz:  # one sync-flushed gzip member, so every event is decodable on arrival
            z = zlib.compressobj(6, zlib.DEFLATED, 31)
            blobs = [z.compress(e) + z.flush(zlib.Z_SYNC_FLUSH) for e in events]
            blobs += [] if reset else [z.flush(zlib.Z_FINISH)]
        if split is not None:
            rng, data, blobs, pos = random.Random(split), b"".join(blobs), [], 0
            while pos < len(data):
                n = rng.randint(1, SPLIT_MAX_PIECE)
                blobs.append(data[pos:pos + n])
                pos += n
        usage_sent = usage_idx is not None and usage_idx < len(events)
        ledger.update(entry, events=total)
        if _flag(self.headers, "x-fake-record-body") and not gz:
            # The exact SSE bytes sent (tests compare what the client received against them).
            ledger.update(entry, sse_body=b"".join(events).decode("utf-8"),
                          usage_event=events[usage_idx].decode("utf-8") if usage_sent else None)
        hold = _int_knob(self.headers, "x-fake-hold-ms", 0) / 1000
        for i, blob in enumerate(blobs):
            if i and split is not None:
                time.sleep(SPLIT_SLEEP_S)
            if hold and i + 1 == len(blobs):
                time.sleep(hold)
            self._chunk(blob)
        if reset:
            ledger.update(entry, reset=True, events_sent=len(events), usage_sent=usage_sent)
            return self._abort()
        ledger.update(entry, completed=True, events_sent=total, usage_sent=usage_sent)
        self.wfile.write(b"0\r\n\r\n")


def _bedrock():
    """The Bedrock dialect (tests/fake_bedrock.py), imported on first use: it needs botocore."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import fake_bedrock
    return fake_bedrock


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # default 5 drops SYNs under parallel tests

    def __init__(self, port, name, quiet=False, sigv4=None):
        super().__init__(("127.0.0.1", port), Handler)
        self.name, self.quiet, self.ledger = name, quiet, Ledger()
        self.sigv4 = sigv4  # (access key, secret key, region): Bedrock requests must be signed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free)")
    ap.add_argument("--name", default="upstream", help="server name recorded in the ledger")
    ap.add_argument("--port-file", help="write the bound port to this file")
    ap.add_argument("--quiet", action="store_true", help="no per-request log on stderr")
    ap.add_argument("--sigv4", metavar="ACCESS_KEY:SECRET_KEY:REGION",
                    help="Bedrock paths: verify each request's SigV4 signature (service bedrock)")
    args = ap.parse_args(argv)
    sigv4 = None
    if args.sigv4:
        sigv4 = tuple(args.sigv4.split(":"))
        if len(sigv4) != 3 or not all(sigv4):
            ap.error("--sigv4 wants ACCESS_KEY:SECRET_KEY:REGION")

    server = Server(args.port, args.name, args.quiet, sigv4)
    port = server.server_address[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"LISTENING {port}", flush=True)

    def stop(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
