"""Google dialects of the fake upstream: Gemini (AI Studio and Vertex AI) and Claude on Vertex.

Loaded by tests/fake_upstream.py, which dispatches every POST whose path (query string ignored,
trailing slashes allowed, any prefix) ends in ``/models/{model}:{method}`` here. Python 3.11
standard library only. Wire formats as google-genai 3.3 and anthropic's AnthropicVertex read them
(see their sources in .venv: google/genai/_api_client.py, models.py, errors.py;
anthropic/lib/vertex/_client.py):

* JSON bodies are pretty-printed with two-space indents as Google's front end writes them;
  SSE events are one line of JSON with ``", "``-less ``": "`` separators, ended by a blank line
  (``data: {...}\\r\\n\\r\\n``: Google uses CRLF; ``x-fake-sse-eol`` picks LF or CR instead);
  the JSON-array stream (``:streamGenerateContent`` without ``alt=sse``) is
  ``[{...}\\n,\\r\\n{...}\\n]``, one HTTP chunk per element.
* usageMetadata follows proto3 JSON: a count that is 0 is left out (a blocked prompt has no
  candidatesTokenCount, a model that did not think has no thoughtsTokenCount).
* Errors: ``{"error": {"code": N, "message": ..., "status": "RESOURCE_EXHAUSTED", ...}}``
  (rawPredict too: Vertex answers quota errors in its own shape).

The module docstring of fake_upstream.py documents the endpoints, the knobs and the ledger.
"""

import base64, hashlib, json, math, random, re, string, struct, time, uuid  # noqa: E401
from urllib.parse import unquote, urlsplit

import fake_upstream as fu

# `/models/{model}:{method}`; the model segment is everything after the last `/models/` up to the
# last `:` (a raw `:` may sit inside a Vertex model version), percent-decoded afterwards.
PATH_RE = re.compile(r"/models/(?P<model>[^/]+):(?P<method>[A-Za-z]+)$")
METHODS = {  # method -> (ledger api, stream format or None)
    "generateContent": ("generate_content", None),
    "streamGenerateContent": ("generate_content", "stream"),
    "countTokens": ("count_tokens", None),
    "embedContent": ("embed_content", None),
    "batchEmbedContents": ("embed_content", None),
    "rawPredict": ("raw_predict", None),
    "streamRawPredict": ("raw_predict", "stream"),
}
GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "INVALID_ARGUMENT", 409: "ABORTED", 412: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
EOLS = {"crlf": b"\r\n", "lf": b"\n", "cr": b"\r"}
PLACEMENTS = ("every", "last", "separate")
HOSTILE_OK = ("absurd-usage", "foreign-usage", "invalid-usage")
SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")


def match(path):
    """(api, method, model, path kind) for a Google path, else None. `path` has no query string."""
    m = PATH_RE.search(path.rstrip("/"))
    if not m or m.group("method") not in METHODS:
        return None
    api, _ = METHODS[m.group("method")]
    anthropic = "/publishers/anthropic/models/" in path
    if (api == "raw_predict") != anthropic:
        return None  # rawPredict is Claude on Vertex only; Gemini methods are never under anthropic
    vertex = "/publishers/" in path
    return api, m.group("method"), unquote(m.group("model")), "vertex" if vertex else "ai_studio"


# --------------------------------------------------------------------------- encoding
def pretty(obj):
    """Google's JSON body encoding (ESF): two-space indent, `": "`, non-ASCII kept."""
    return json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8")


def sse_line(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ": ")).encode("utf-8")


def google_error(status, message):
    err = {"code": status, "message": message,
           "status": GOOGLE_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")}
    if status == 429:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]
    return {"error": err}


def _response_id():
    return "".join(random.choice(string.ascii_letters + string.digits + "-_") for _ in range(22))


def _gen_config(body):
    cfg = body.get("generationConfig")
    if not isinstance(cfg, dict):
        cfg = body.get("generation_config")
    return cfg if isinstance(cfg, dict) else {}


def _cfg_int(cfg, *names):
    for n in names:
        v = cfg.get(n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def candidate_count(body):
    n = _cfg_int(_gen_config(body), "candidateCount", "candidate_count")
    return n if n and n > 0 else 1


def max_output(body):
    """maxOutputTokens x candidateCount (thinking and answer together), None without a cap."""
    cap = _cfg_int(_gen_config(body), "maxOutputTokens", "max_output_tokens")
    return cap * candidate_count(body) if cap and cap > 0 else None


def gemini_usage(headers, raw_len, body, n_chunks):
    """(wire counts, normalised ledger usage) of a generateContent answer."""
    cap = max_output(body)
    default_output = 2 * n_chunks + 1 if cap is None else min(2 * n_chunks + 1, cap)
    if (headers.get("x-fake-generate") or "").strip().lower() == "max":
        default_output = cap if cap is not None else fu.UNCAPPED_OUTPUT * candidate_count(body)
    k = fu._int_knob
    prompt = k(headers, "x-fake-input-tokens", max(1, math.ceil(raw_len / 4)))
    tool = k(headers, "x-fake-tool-prompt-tokens", 0)
    cached = k(headers, "x-fake-cached-tokens", 0)
    thoughts = k(headers, "x-fake-reasoning-tokens", 0)
    output = max(k(headers, "x-fake-output-tokens", default_output), thoughts)
    prompt = max(prompt, cached)
    wire = {"prompt": prompt, "candidates": output - thoughts, "thoughts": thoughts, "tool": tool,
            "cached": cached}
    usage = {"input": prompt + tool, "output": output, "cached_input": cached,
             "cache_write_input": 0, "reasoning": thoughts}
    return wire, usage


def usage_metadata(w, vertex, candidates=None):
    """usageMetadata as Google writes it (zero counts left out); `candidates` overrides the
    candidate count (a running total in a stream)."""
    cand = w["candidates"] if candidates is None else candidates
    um = {}
    if w["prompt"]:
        um["promptTokenCount"] = w["prompt"]
    if cand:
        um["candidatesTokenCount"] = cand
    um["totalTokenCount"] = w["prompt"] + cand + w["thoughts"] + w["tool"]
    if w["cached"]:
        um["cachedContentTokenCount"] = w["cached"]
    um["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": w["prompt"]}]
    if w["cached"]:
        um["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": w["cached"]}]
    if cand and vertex:
        um["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": cand}]
    if w["tool"]:
        um["toolUsePromptTokenCount"] = w["tool"]
        um["toolUsePromptTokensDetails"] = [{"modality": "TEXT", "tokenCount": w["tool"]}]
    if w["thoughts"]:
        um["thoughtsTokenCount"] = w["thoughts"]
    if vertex:
        um["trafficType"] = "ON_DEMAND"
    return um


def _hostile_usage(c, um):
    if um is None:
        return None
    if c["hostile"] == "foreign-usage":
        return {"prompt_tokens": um.get("promptTokenCount", 0),
                "completion_tokens": um.get("candidatesTokenCount", 0)}
    if c["hostile"] == "invalid-usage":
        um = {**um, "candidatesTokenCount": c["invalid_count"]}
    return um


# --------------------------------------------------------------------------- builders
def build_generate(c):
    """("json", obj, usage_included) or (stream format, [pieces], index of the final usage)."""
    w, vertex, n = c["wire"], c["vertex"], c["n_candidates"]
    meta = {"modelVersion": c["model"], "responseId": c["response_id"]}
    if vertex:
        meta = {"modelVersion": c["model"], "createTime": c["create_time"],
                "responseId": c["response_id"]}

    def um(candidates=None):
        return None if c["no_usage"] else _hostile_usage(c, usage_metadata(w, vertex, candidates))

    def response(cands, usage):
        obj = {}
        if cands is not None:
            obj["candidates"] = cands
        if c["block"]:
            obj["promptFeedback"] = {"blockReason": c["block"], "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]}
        if usage is not None:
            obj["usageMetadata"] = usage
        obj.update(meta)
        return obj

    def cands(text, finish):
        out = []
        for i in range(n):
            cand = {"content": {"role": "model", "parts": [{"text": text}]}}
            if finish:
                cand["finishReason"] = finish
            if vertex and finish:
                cand["avgLogprobs"] = -0.25
            cand["index"] = i
            out.append(cand)
        return out

    finish = "MAX_TOKENS" if c["truncated"] else "STOP"
    if c["block"]:
        objs = [response(None, um())]
    elif not c["stream"]:
        return "json", pretty(response(cands("".join(c["chunks"]), finish), um())), not c["no_usage"]
    else:
        pieces, total = c["chunks"] or [""], w["candidates"]
        objs = []
        for i, piece in enumerate(pieces):
            last = i + 1 == len(pieces)
            running = math.ceil(total * (i + 1) / len(pieces))
            usage = um(running) if c["placement"] == "every" or (last and c["placement"] == "last") else None
            objs.append(response(cands(piece, finish if last else None), usage))
        if c["placement"] == "separate" and not c["no_usage"]:
            objs.append(response(None, um()))
    if not c["stream"]:  # a blocked prompt, not streamed
        return "json", pretty(objs[0]), not c["no_usage"]
    usage_idx = None if c["no_usage"] else len(objs) - 1
    if c["stream"] == "sse":
        eol = c["eol"]
        return "sse", [b"data: " + sse_line(o) + eol + eol for o in objs], usage_idx
    events = [(b"[" if i == 0 else b"\n,\r\n") + pretty(o) for i, o in enumerate(objs)]
    events.append(b"\n]")
    return "json_array", events, usage_idx


def build_count_tokens(c):
    w, obj = c["wire"], {"totalTokens": c["wire"]["prompt"]}
    if w["cached"]:
        obj["cachedContentTokenCount"] = w["cached"]
    if c["vertex"]:
        obj["totalBillableCharacters"] = 4 * w["prompt"]
    obj["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": w["prompt"]}]
    return "json", pretty(obj), False


def _vector(item, dims):
    seed = hashlib.sha256(fu._jdump(item)).digest()
    vec = [(seed[k % 32] - 127.5) / 127.5 for k in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in vec]


def _dims(obj, default=8):
    cfg = obj.get("embedContentConfig") if isinstance(obj.get("embedContentConfig"), dict) else obj
    d = cfg.get("outputDimensionality", cfg.get("output_dimensionality", default))
    if not isinstance(d, int) or isinstance(d, bool) or not 0 < d <= 4096:
        raise fu.KnobError("outputDimensionality must be an integer in 1..4096")
    return d


def build_embed(c):
    body = c["body"]
    if c["method"] == "batchEmbedContents":
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not reqs or not all(isinstance(r, dict) for r in reqs):
            raise fu.KnobError("* BatchEmbedContentsRequest.requests: contents is not specified")
        obj = {"embeddings": [{"values": _vector(r.get("content"), _dims(r))} for r in reqs]}
        return "json", pretty(obj), False
    if not isinstance(body.get("content"), dict):
        raise fu.KnobError("* EmbedContentRequest.content: contents is not specified")
    obj = {"embedding": {"values": _vector(body["content"], _dims(body))}}
    if c["vertex"] and not c["no_usage"]:  # Vertex reports usage for embedContent; AI Studio never
        obj["usageMetadata"] = _hostile_usage(c, {"promptTokenCount": c["wire"]["prompt"],
                                                   "totalTokenCount": c["wire"]["prompt"]})
        obj["truncated"] = False
    return "json", pretty(obj), c["vertex"] and not c["no_usage"]


# --------------------------------------------------------------------------- handler
def handle(h, found, raw):
    """Answer one Google request on fake_upstream's Handler `h`; `found` is match()'s result."""
    api, method, model, kind = found
    hdrs = {}
    for k, v in h.headers.items():
        k = k.lower()
        hdrs[k] = True if k in SECRET_HEADERS else (f"{hdrs[k]}, {v}" if k in hdrs else v)
    query = urlsplit(h.path).query
    try:
        body, bad_json = json.loads(raw.decode("utf-8")), None
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        body, bad_json = None, f"Invalid JSON payload received. {exc}"
    b = body or {}
    stream = None
    if METHODS[method][1]:
        if api == "raw_predict":
            stream = "sse"
        else:
            stream = "sse" if "alt=sse" in query.split("&") else "json_array"
    entry = {"id": h.headers.get("x-fake-request-id") or uuid.uuid4().hex,
             "server": h.server.name, "api": api, "method": method, "dialect": kind,
             "path": h.path, "model": model, "stream": bool(stream), "stream_format": stream,
             "include_usage": True, "status": 200,
             "usage": dict.fromkeys(("input", "output", "cached_input", "cache_write_input",
                                     "reasoning"), 0),
             "usage_sent": False, "events": 0, "events_sent": 0, "reset": False,
             "completed": False, "client_disconnected": False, "headers": hdrs, "body": body}
    h.server.ledger.add(entry)
    try:
        _answer(h, api, method, kind, len(raw), b, entry, bad_json)
    except (BrokenPipeError, ConnectionResetError):
        h.server.ledger.update(entry, completed=False, client_disconnected=True)
        h.close_connection = True


def _answer(h, api, method, kind, raw_len, body, entry, error):
    hd, payload, usage, fmt, usage_where = h.headers, None, entry["usage"], "json", False
    extra_ledger = {}
    try:
        n_chunks = fu._int_knob(hd, "x-fake-chunks", 3)
        reset_after = fu._int_knob(hd, "x-fake-reset-after", None)
        reset_before_end = fu._int_knob(hd, "x-fake-reset-before-end", None)
        delay = fu._int_knob(hd, "x-fake-delay-ms", 0)
        status = 400 if error else fu._int_knob(hd, "x-fake-status", 200)
        only = hd.get("x-fake-status-server")
        if only and only != h.server.name:
            status = 200
        if not 200 <= status < 600:
            raise fu.KnobError("x-fake-status must be a valid HTTP status")
        hostile = (hd.get("x-fake-hostile") or "").strip().lower() or None
        if hostile and hostile not in HOSTILE_OK:
            raise fu.KnobError(f"x-fake-hostile on Google paths must be one of {', '.join(HOSTILE_OK)}")
        eol_name = (hd.get("x-fake-sse-eol") or "crlf").strip().lower()
        placement = (hd.get("x-fake-usage-placement") or "every").strip().lower()
        block = (hd.get("x-fake-block") or "").strip().upper() or None
        if eol_name not in EOLS:
            raise fu.KnobError("x-fake-sse-eol must be lf, crlf or cr")
        if placement not in PLACEMENTS:
            raise fu.KnobError("x-fake-usage-placement must be every, last or separate")
        if block and not re.fullmatch(r"[A-Z_]{1,40}", block):
            raise fu.KnobError("x-fake-block must be a BlockReason such as SAFETY")
        if status < 300:
            chunks = [fu.WORDS[i % len(fu.WORDS)].format(name=h.server.name) for i in range(n_chunks)]
            ctx = {"model": entry["model"], "body": body, "stream": entry["stream_format"],
                   "no_usage": fu._flag(hd, "x-fake-no-usage"), "chunks": chunks, "hostile": hostile,
                   "invalid_count": fu._json_knob(hd, "x-fake-invalid-count", -1),
                   "vertex": kind == "vertex", "method": method}
            if api == "raw_predict" and entry["model"] == "count-tokens":
                # AnthropicVertex's messages.count_tokens: `publishers/anthropic/models/
                # count-tokens:rawPredict`, the model in the body; generates nothing.
                n = fu._int_knob(hd, "x-fake-input-tokens", max(1, math.ceil(raw_len / 4)))
                extra_ledger.update(api="count_tokens", total_tokens=n)
                fmt, payload, usage_where = "json", fu._jdump({"input_tokens": n}), False
            elif api == "raw_predict":
                usage = fu.compute_usage("messages", raw_len, hd, n_chunks, body)
                if hostile == "absurd-usage":
                    usage.update(input=fu.ABSURD_TOKENS, output=fu.ABSURD_TOKENS)
                ctx.update(usage=usage, stream=bool(entry["stream"]), include_usage=True)
                fmt, payload, usage_where = fu.build_messages(ctx)
                if fmt == "json":
                    payload = fu._jdump(payload)
            else:
                wire, usage = gemini_usage(hd, raw_len, body, n_chunks)
                if hostile == "absurd-usage":
                    wire.update(prompt=fu.ABSURD_TOKENS, candidates=fu.ABSURD_TOKENS, thoughts=0,
                                tool=0, cached=0)
                    usage = {**usage, "input": fu.ABSURD_TOKENS, "output": fu.ABSURD_TOKENS,
                             "cached_input": 0, "reasoning": 0}
                ctx.update(wire=wire)
                if api == "count_tokens":
                    extra_ledger["total_tokens"] = wire["prompt"]
                    usage = dict.fromkeys(usage, 0)  # generates nothing, never billed
                    fmt, payload, usage_where = build_count_tokens(ctx)
                elif api == "embed_content":
                    usage = {**usage, "input": wire["prompt"], "output": 0, "cached_input": 0,
                             "reasoning": 0}
                    fmt, payload, usage_where = build_embed(ctx)
                    extra_ledger["usage_on_wire"] = bool(usage_where)
                else:
                    if block:
                        wire.update(candidates=0, thoughts=0)
                        usage = {**usage, "output": 0, "reasoning": 0}
                    cap = max_output(body)
                    ctx.update(eol=EOLS[eol_name], placement=placement, block=block,
                               n_candidates=candidate_count(body), response_id=_response_id(),
                               create_time=time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                               truncated=cap is not None and usage["output"] >= cap)
                    fmt, payload, usage_where = build_generate(ctx)
                    extra_ledger.update(block=block, placement=placement if entry["stream"] else None,
                                        sse_eol=eol_name if entry["stream_format"] == "sse" else None,
                                        candidate_count=ctx["n_candidates"])
    except fu.KnobError as exc:
        status, error, reset_after, reset_before_end, delay = 400, str(exc), None, None, 0
        payload, usage = None, entry["usage"]
    h.server.ledger.update(entry, status=status, usage=usage, **extra_ledger)
    if delay:
        time.sleep(delay / 1000.0)
    gz = fu._flag(hd, "x-fake-gzip")
    extra = [("x-request-id", "req_" + fu._rand(24))] if api == "raw_predict" else []
    extra += [("vary", "Origin"), ("vary", "X-Origin"), ("vary", "Referer")]
    extra += [("content-encoding", "gzip")] if gz else []
    if payload is None:
        fmt, usage_where = "json", False
        payload = pretty(google_error(status, error or f"fake upstream: injected status {status}"))
        extra += [("retry-after", "1")] if status == 429 else []
    if fmt == "json":
        h._write_json(entry, status, payload, usage_where, extra, gz, reset_after, reset_before_end)
    else:
        ctype = "application/json; charset=UTF-8" if fmt == "json_array" else "text/event-stream"
        h._write_sse(entry, payload, usage_where, extra, gz, reset_after, hd.get("x-fake-split"),
                     ctype=ctype)
