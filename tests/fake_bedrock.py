"""The AWS Bedrock runtime dialect of the fake upstream (tests/fake_upstream.py dispatches here).

Answers as bedrock-runtime does (botocore 1.44's service model, rest-json, signing name
`bedrock`), byte for byte enough that boto3 parses every reply:

    POST …/model/{modelId}/converse                      Converse JSON           api "converse"
    POST …/model/{modelId}/converse-stream               ConverseStream events   api "converse"
    POST …/model/{modelId}/invoke                        Anthropic Messages JSON api "invoke"
    POST …/model/{modelId}/invoke-with-response-stream   `chunk` events          api "invoke"

`modelId` is everything between `/model/` and the operation, percent-decoded (boto3 sends
`%3A` and `%2F`; an application inference profile ARN may come with a raw `/`). Streams are
`application/vnd.amazon.eventstream` frames with real CRCs (tests/eventstream_fixtures.py's
encoder, checked against botocore's decoder). Errors: the status, `x-amzn-errortype: NAME:…`
and `{"message": …}`, as Bedrock sends them.

Usage (normalised in the ledger as the other APIs): the fake's usage model (see fake_upstream's
docstring; x-fake-input/output/cached/cache-write-tokens knobs). reasoning is always 0 (neither
wire format reports it apart).
    Converse  usage.inputTokens = input - cached - cache_write, cacheReadInputTokens = cached,
              cacheWriteInputTokens = cache_write, outputTokens = output, totalTokens = input +
              output (JSON `usage`; stream: the last `metadata` event). Output is at most
              `inferenceConfig.maxTokens`.
    Invoke    Anthropic Messages usage (input_tokens without cache, cache_read_input_tokens,
              cache_creation_input_tokens; stream: message_start, then the final output_tokens in
              message_delta); output at most `max_tokens`. message_stop carries
              `amazon-bedrock-invocationMetrics` {inputTokenCount (without cache, as Bedrock),
              outputTokenCount, invocationLatency, firstByteLatency}; the JSON reply carries the
              same counts in `x-amzn-bedrock-input-token-count` / `-output-token-count` headers.

Knobs (besides fake_upstream's x-fake-request-id, -delay-ms, -chunks, -hold-ms, -split,
-status, -status-server, -reset-after (frames), -input/-output/-cached/-cache-write-tokens,
-generate: max (output = inferenceConfig.maxTokens or max_tokens, else 30000)):
    x-fake-no-usage: 1              no usage at all (Converse: no `usage` / a metadata event with
                                    metrics only; Invoke: no Anthropic usage, no invocation metrics)
    x-fake-no-usage: anthropic      Invoke stream: no Anthropic usage, invocation metrics kept
    x-fake-error-type: NAME         the x-amzn-errortype of an x-fake-status error (default by
                                    status: 400 ValidationException, 401 UnrecognizedClient…,
                                    403 AccessDenied…, 404 ResourceNotFound…, 408 ModelTimeout…,
                                    424 ModelError…, 429 Throttling…, 500 InternalServer…,
                                    503 ServiceUnavailable…)
    x-fake-stream-exception: NAME[:AFTER]
                                    stream: after AFTER event frames (default 1) an `exception`
                                    frame (`:exception-type NAME`, {"message": …}) inside the 200
                                    stream, then the stream ends
    x-fake-corrupt-crc: N           stream: flip one byte of frame N's payload (0-based), so its
                                    message CRC is wrong
    x-fake-bedrock-routing: real    route as live Bedrock does: a modelId holding a raw "/" (an
                                    ARN whose "/" was not sent as %2F) splits the path, and
                                    Bedrock answers HTTP 200 with the Coral body
                                    {"Output":{"__type":"com.amazon.coral.service#UnknownOperationException"},"Version":"1.0"}
                                    (seen live: vercel/ai #17523, PRs #17524/#17548). Default:
                                    the raw "/" is accepted and decoded like %2F.
SigV4 (server flag `--sigv4 ACCESS_KEY:SECRET_KEY:REGION`, service `bedrock`): every Bedrock
request's `authorization` is checked with botocore's own signer (SigV4Auth; over exactly the headers
named in SignedHeaders, without botocore's client-side blacklist) over the request as received
(raw path, the signed headers' values, the body); a mismatch, another key, scope or a
wrong `x-amz-content-sha256` answers 403 InvalidSignatureException, none answers 403
MissingAuthenticationTokenException. The ledger's `sigv4` is "ok", "bad" or "absent" (null
without --sigv4), `sigv4_reason` says why it was bad.

Ledger entry: fake_upstream's fields with api "converse" / "invoke", "model" the decoded
modelId, "model_segment" (the raw path segment(s)), "raw_slash" (the segment held a raw "/"),
"unknown_operation" (answered as live Bedrock routes a raw "/"), "operation", "path" (raw, as received),
"events" / "events_sent" counting event-stream frames, "stream_exception", "corrupt_frame",
"sigv4", "sigv4_reason".
"""

import base64
import calendar
import hashlib
import hmac
import json
import random
import re
import time
import uuid
from urllib.parse import unquote, urlsplit

import eventstream_fixtures as es

PATH_RE = re.compile(r"^(?P<prefix>.*?)/model/(?P<model>.+?)/"
                     r"(?P<op>converse|converse-stream|invoke|invoke-with-response-stream)/*$")
OPERATIONS = {"converse": ("converse", False), "converse-stream": ("converse", True),
              "invoke": ("invoke", False), "invoke-with-response-stream": ("invoke", True)}
ERROR_TYPES = {400: "ValidationException", 401: "UnrecognizedClientException",
               403: "AccessDeniedException", 404: "ResourceNotFoundException",
               408: "ModelTimeoutException", 424: "ModelErrorException",
               429: "ThrottlingException", 500: "InternalServerException",
               503: "ServiceUnavailableException"}
ERROR_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
EVENTSTREAM = "application/vnd.amazon.eventstream"
UNCAPPED_OUTPUT = 30000
UNKNOWN_OPERATION = {"Output": {"__type": "com.amazon.coral.service#UnknownOperationException"},
                     "Version": "1.0"}
SIGV4_SERVICE = "bedrock"


def match(raw_path):
    """(api, model_id, operation, stream) for a Bedrock runtime path, else None."""
    m = PATH_RE.match(urlsplit(raw_path).path)
    if not m:
        return None
    api, stream = OPERATIONS[m["op"]]
    return {"api": api, "model": unquote(m["model"]), "model_segment": m["model"],
            "raw_slash": "/" in m["model"], "operation": m["op"], "stream": stream}


def error_body(status, message, error_type=None):
    name = error_type or ERROR_TYPES.get(status, "InternalServerException" if status >= 500
                                         else "ValidationException")
    return name, [("x-amzn-errortype", name + ERROR_SUFFIX)], {"message": message}


# --------------------------------------------------------------------------- SigV4
_signer_class = None


def _server_side_signer(credentials, region):
    """botocore's SigV4Auth, but over exactly the headers the request names (see below)."""
    global _signer_class
    if _signer_class is None:
        _signer_class = _define_signer()
    return _signer_class(credentials, SIGV4_SERVICE, region)


def _define_signer():
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import HTTPHeaders

    class ServerSideSigV4(SigV4Auth):
        """botocore's SigV4 over exactly the headers the client signed: botocore's client-side
        blacklist (user-agent, connection, …) is its own choice of what to sign; a server checks
        whatever SignedHeaders names (Envoy signs user-agent, for one)."""

        def headers_to_sign(self, request):
            header_map = HTTPHeaders()
            for name, value in request.headers.items():
                header_map[name.lower()] = value
            return header_map

    return ServerSideSigV4


def verify_sigv4(config, method, raw_path, header_pairs, body, now=None):
    """("ok" | "bad" | "absent", reason, canonical request) for a request as received.
    `config` = (access_key, secret_key, region); `header_pairs` = [(name, value)] as received."""
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    access_key, secret_key, region = config
    headers = {}
    for k, v in header_pairs:
        k = k.lower()
        headers[k] = f"{headers[k]},{v}" if k in headers else v
    auth = headers.get("authorization")
    if not auth:
        return "absent", "no authorization header", None
    m = re.match(r"^AWS4-HMAC-SHA256 Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*"
                 r"Signature=([0-9a-f]{64})$", auth.strip())
    if not m:
        return "bad", "authorization is not AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…", None
    credential, signed, signature = m.groups()
    parts = credential.split("/")
    amz_date = headers.get("x-amz-date", "")
    if len(parts) != 5 or parts[0] != access_key:
        return "bad", f"unknown access key or malformed credential {credential!r}", None
    if parts[2:] != [region, SIGV4_SERVICE, "aws4_request"]:
        return "bad", f"credential scope {'/'.join(parts[1:])!r} is not */{region}/{SIGV4_SERVICE}/aws4_request", None
    if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date) or amz_date[:8] != parts[1]:
        return "bad", f"x-amz-date {amz_date!r} missing or not the scope's date", None
    skew = abs(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")) - (time.time() if now is None else now))
    if skew > 900:
        return "bad", f"x-amz-date is {skew:.0f} s away from now (AWS allows 900)", None
    names = signed.split(";")
    if "host" not in names:
        return "bad", "host is not signed", None
    missing = [n for n in names if n not in headers]
    if missing:
        return "bad", f"signed headers not received: {missing}", None
    claimed = headers.get("x-amz-content-sha256")
    if claimed is not None and claimed != "UNSIGNED-PAYLOAD" and claimed != hashlib.sha256(body).hexdigest():
        return "bad", "x-amz-content-sha256 is not the body's hash", None
    # The request as received: only the signed headers, the raw path (botocore canonicalises it
    # as AWS does for every service but S3: dot segments resolved, then each byte but
    # unreserved and "/" percent-encoded again, so a received %3A is signed as %253A).
    request = AWSRequest(method=method, url=f"http://{headers['host']}{raw_path}",
                         headers={n: headers[n] for n in names}, data=body)
    request.context["timestamp"] = amz_date
    signer = _server_side_signer(Credentials(access_key, secret_key), region)
    if signer.signed_headers(signer.headers_to_sign(request)) != signed:
        return "bad", "SignedHeaders is not sorted lower-case names", None
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, signature):
        return "bad", "signature mismatch", canonical
    return "ok", None, canonical


# --------------------------------------------------------------------------- usage
def _cap(api, body):
    if api == "converse":
        ic = body.get("inferenceConfig")
        value = ic.get("maxTokens") if isinstance(ic, dict) else None
    else:
        value = body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def compute_usage(fu, api, raw_len, headers, n_chunks, body):
    """fake_upstream's usage model with Bedrock's output caps; reasoning 0."""
    cap = _cap(api, body)
    h = {k.lower(): v for k, v in headers.items()}
    generate_max = (h.get("x-fake-generate") or "").strip().lower() == "max"
    h.pop("x-fake-generate", None)  # fake_upstream's permissive_output knows no Bedrock field
    u = fu.compute_usage("bedrock_" + api, raw_len, h, n_chunks, body)
    if generate_max:
        u["output"] = cap or UNCAPPED_OUTPUT
    elif "x-fake-output-tokens" not in h and cap is not None:
        u["output"] = min(u["output"], cap)
    u["reasoning"] = 0
    return u


# --------------------------------------------------------------------------- wire formats
def converse_usage(u):
    return {"inputTokens": u["input"] - u["cached_input"] - u["cache_write_input"],
            "outputTokens": u["output"], "totalTokens": u["input"] + u["output"],
            "cacheReadInputTokens": u["cached_input"], "cacheWriteInputTokens": u["cache_write_input"]}


def stop_reason(api, u, body):
    cap = _cap(api, body)
    return ("max_tokens" if cap is not None and u["output"] >= cap else "end_turn")


def build_converse(c):
    """("json", obj, usage_included) or ("frames", [frame bytes], usage frame index or None)."""
    u, text = c["usage"], "".join(c["chunks"])
    reason = stop_reason("converse", u, c["body"])
    metrics = {"latencyMs": 100 + 7 * len(c["chunks"])}
    if not c["stream"]:
        obj = {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
               "stopReason": reason, "metrics": metrics}
        if not c["no_usage"]:
            obj["usage"] = converse_usage(u)
        return "json", obj, not c["no_usage"]
    pad = es.PAD
    frames = [es.event("messageStart", {"p": pad[:3], "role": "assistant"})]
    frames += [es.event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece},
                                              "p": pad[:len(piece) % 17]})
               for piece in c["chunks"]]
    frames.append(es.event("contentBlockStop", {"contentBlockIndex": 0, "p": pad[:8]}))
    frames.append(es.event("messageStop", {"p": pad[:14], "stopReason": reason}))
    meta = {"metrics": metrics, "p": pad[:20]}
    if not c["no_usage"]:
        meta["usage"] = converse_usage(u)
    frames.append(es.event("metadata", meta))
    return "frames", frames, None if c["no_usage"] else len(frames) - 1


def build_invoke(c, fu):
    """Anthropic Messages through fake_upstream's builder; the stream's events become chunks."""
    u = c["usage"]
    ctx = {**c, "model": c["model"], "no_usage": bool(c["no_usage"])}
    kind, payload, where = fu.build_messages(ctx)
    metrics = {"inputTokenCount": u["input"] - u["cached_input"] - u["cache_write_input"],
               "outputTokenCount": u["output"], "invocationLatency": 120 + 7 * len(c["chunks"]),
               "firstByteLatency": 60}
    if kind == "json":
        payload["stop_reason"] = stop_reason("invoke", u, c["body"])
        return "json", payload, where, metrics
    events = []
    for blob in payload:
        data = blob.split(b"data: ", 1)[1].rstrip(b"\n")
        ev = json.loads(data)
        if ev["type"] == "ping":  # Bedrock does not forward Anthropic's pings
            continue
        if ev["type"] == "message_delta":
            ev["delta"]["stop_reason"] = stop_reason("invoke", u, c["body"])
        events.append(ev)
    if c["no_usage"] != "1":  # "anthropic": only the invocation metrics tell the usage
        events[-1]["amazon-bedrock-invocationMetrics"] = metrics
    frames = [es.chunk(ev) for ev in events]
    usage_idx = None
    if not c["no_usage"]:
        usage_idx = next(i for i, ev in enumerate(events) if ev["type"] == "message_delta")
    elif c["no_usage"] == "anthropic":
        usage_idx = len(frames) - 1
    return "frames", frames, usage_idx, metrics


def corrupt(frame):
    """The frame with the first byte of its payload flipped (message CRC now wrong)."""
    headers_len = int.from_bytes(frame[4:8], "big")
    pos = 12 + headers_len
    if pos >= len(frame) - 4:  # no payload: flip a header byte instead
        pos = 12
    return frame[:pos] + bytes([frame[pos] ^ 0x01]) + frame[pos + 1:]


# --------------------------------------------------------------------------- handler
def handle(handler, fu, raw, info):
    """Answer one Bedrock request on fake_upstream's `handler` (a BaseHTTPRequestHandler)."""
    server, h = handler.server, handler.headers
    hdrs = {}
    for k, v in h.items():
        k = k.lower()
        hdrs[k] = True if k in fu.SECRET_HEADERS else (f"{hdrs[k]}, {v}" if k in hdrs else v)
    try:
        body, bad = json.loads(raw.decode("utf-8")), None
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        body, bad = None, f"Malformed input request: {exc}, please reformat your input and try again."
    sig, reason = None, None
    if server.sigv4:
        sig, reason, _ = verify_sigv4(server.sigv4, handler.command, handler.path,
                                      list(h.items()), raw)
    entry = {"id": h.get("x-fake-request-id") or uuid.uuid4().hex, "server": server.name,
             "api": info["api"], "operation": info["operation"], "path": handler.path,
             "model": info["model"], "model_segment": info["model_segment"],
             "raw_slash": info["raw_slash"], "unknown_operation": False,
             "stream": info["stream"], "include_usage": True, "status": 200,
             "usage": dict.fromkeys(("input", "output", "cached_input", "cache_write_input",
                                     "reasoning"), 0),
             "usage_sent": False, "events": 0, "events_sent": 0, "reset": False,
             "completed": False, "client_disconnected": False, "headers": hdrs, "body": body,
             "sigv4": sig, "sigv4_reason": reason, "stream_exception": None, "corrupt_frame": None}
    server.ledger.add(entry)
    try:
        _answer(handler, fu, len(raw), body or {}, entry, bad, sig)
    except (BrokenPipeError, ConnectionResetError):
        server.ledger.update(entry, completed=False, client_disconnected=True)
        handler.close_connection = True


def _answer(handler, fu, raw_len, body, entry, bad, sig):
    server, h, ledger = handler.server, handler.headers, handler.server.ledger
    extra = [("x-amzn-requestid", str(uuid.uuid4()))]
    error_type = None
    try:
        n_chunks = fu._int_knob(h, "x-fake-chunks", 3)
        reset_after = fu._int_knob(h, "x-fake-reset-after", None)
        delay = fu._int_knob(h, "x-fake-delay-ms", 0)
        corrupt_at = fu._int_knob(h, "x-fake-corrupt-crc", None)
        status = fu._int_knob(h, "x-fake-status", 200)
        only = h.get("x-fake-status-server")
        if only and only != server.name:
            status = 200
        if not 200 <= status < 600:
            raise fu.KnobError("x-fake-status must be a valid HTTP status")
        error_type = (h.get("x-fake-error-type") or "").strip() or None
        exc_knob = (h.get("x-fake-stream-exception") or "").strip()
        exc_name, exc_after = None, None
        if exc_knob:
            exc_name, _, after = exc_knob.partition(":")
            if not re.fullmatch(r"[A-Za-z]+", exc_name) or (after and not after.isdigit()):
                raise fu.KnobError("x-fake-stream-exception must be NAME[:AFTER]")
            exc_after = int(after) if after else 1
        no_usage = (h.get("x-fake-no-usage") or "").strip().lower()
        no_usage = "anthropic" if no_usage == "anthropic" else ("1" if fu._flag(h, "x-fake-no-usage") else "")
        real_routing = (h.get("x-fake-bedrock-routing") or "").strip().lower()
        if real_routing not in ("", "real"):
            raise fu.KnobError("x-fake-bedrock-routing must be real")
        if real_routing and entry["raw_slash"]:  # Bedrock routes before it authenticates
            ledger.update(entry, unknown_operation=True)
            return handler._write_json(entry, 200, UNKNOWN_OPERATION, False, extra, False, None)
        if bad:
            status, error_type, message = 400, "ValidationException", bad
        elif sig in ("bad", "absent"):
            status = 403
            error_type = "InvalidSignatureException" if sig == "bad" else "MissingAuthenticationTokenException"
            message = ("The request signature we calculated does not match the signature you provided. "
                       "Check your AWS Secret Access Key and signing method. Consult the service "
                       "documentation for details." if sig == "bad" else "Missing Authentication Token")
        else:
            message = f"fake bedrock: injected status {status}"
        payload, usage = None, entry["usage"]
        if status < 300:
            usage = compute_usage(fu, entry["api"], raw_len, h, n_chunks, body)
            chunks = [fu.WORDS[i % len(fu.WORDS)].format(name=server.name) for i in range(n_chunks)]
            ctx = {"model": entry["model"], "body": body, "stream": entry["stream"], "usage": usage,
                   "no_usage": no_usage, "chunks": chunks, "hostile": None, "invalid_count": -1,
                   "include_usage": True}
            if entry["api"] == "converse":
                kind, payload, usage_where = build_converse(ctx)
                metrics = None
            else:
                kind, payload, usage_where, metrics = build_invoke(ctx, fu)
    except fu.KnobError as exc:
        status, error_type, message, payload = 400, "ValidationException", str(exc), None
        usage, reset_after, delay, corrupt_at, exc_name = entry["usage"], None, 0, None, None
    ledger.update(entry, status=status, usage=usage)
    if delay:
        time.sleep(delay / 1000.0)
    if payload is None:
        name, headers, obj = error_body(status, message, error_type)
        ledger.update(entry, error_type=name)
        return handler._write_json(entry, status, obj, False, extra + headers, False, None)
    if kind == "json":
        if entry["api"] == "invoke":
            extra += [("x-amzn-bedrock-invocation-latency", str(metrics["invocationLatency"]))]
            if usage_where:
                extra += [("x-amzn-bedrock-input-token-count", str(metrics["inputTokenCount"])),
                          ("x-amzn-bedrock-output-token-count", str(metrics["outputTokenCount"]))]
        return handler._write_json(entry, 200, payload, usage_where, extra, False, reset_after,
                                   fu._int_knob(h, "x-fake-reset-before-end", None))
    if exc_name:
        payload = payload[:exc_after] + [es.exception(
            exc_name, f"fake bedrock: injected {exc_name} after {exc_after} events")]
        usage_where = usage_where if usage_where is not None and usage_where < exc_after else None
        ledger.update(entry, stream_exception=exc_name)
    if corrupt_at is not None and corrupt_at < len(payload):
        payload[corrupt_at] = corrupt(payload[corrupt_at])
        ledger.update(entry, corrupt_frame=corrupt_at)
    _write_frames(handler, fu, entry, payload, usage_where, extra, reset_after,
                  h.get("x-fake-split"))


def _write_frames(handler, fu, entry, frames, usage_idx, extra, reset_after, split):
    ledger, total = handler.server.ledger, len(frames)
    handler._start(200, EVENTSTREAM, extra)
    reset = reset_after is not None and reset_after < total
    frames = frames[:reset_after] if reset else frames
    blobs = list(frames)
    if split is not None:
        rng, data, blobs, pos = random.Random(split), b"".join(frames), [], 0
        while pos < len(data):
            n = rng.randint(1, fu.SPLIT_MAX_PIECE)
            blobs.append(data[pos:pos + n])
            pos += n
    usage_sent = usage_idx is not None and usage_idx < len(frames)
    ledger.update(entry, events=total)
    if fu._flag(handler.headers, "x-fake-record-body"):
        ledger.update(entry, body_b64=base64.b64encode(b"".join(frames)).decode())
    hold = fu._int_knob(handler.headers, "x-fake-hold-ms", 0) / 1000
    for i, blob in enumerate(blobs):
        if i and split is not None:
            time.sleep(fu.SPLIT_SLEEP_S)
        if hold and i + 1 == len(blobs):
            time.sleep(hold)
        handler._chunk(blob)
    if reset:
        ledger.update(entry, reset=True, events_sent=len(frames), usage_sent=usage_sent)
        return handler._abort()
    ledger.update(entry, completed=True, events_sent=total, usage_sent=usage_sent)
    handler.wfile.write(b"0\r\n\r\n")
