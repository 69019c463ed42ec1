#!/usr/bin/env python3
"""AWS event-stream (application/vnd.amazon.eventstream) encoder and Tollgate's test vectors.

Builds frames per the specification (prelude: total length, headers length, CRC32 of both; headers;
payload; CRC32 of every byte before it) with zlib.crc32, checks every frame with botocore's own
decoder (botocore.eventstream.EventStreamBuffer), and writes the fixtures that the Rust tests of
src/api/eventstream.rs and src/api/bedrock_stream.rs decode (include_bytes!):

    python3 tests/eventstream_fixtures.py            # rewrite tests/fixtures/eventstream/*.bin
    python3 tests/eventstream_fixtures.py --check    # fail if a committed file differs

The encoder (`message`, `event`, `exception`, `chunk`) is importable, for the fake Bedrock upstream
of the e2e suite. Needs botocore (it ships with boto3).
"""

import base64
import json
import pathlib
import struct
import sys
import uuid
import zlib

from botocore.eventstream import EventStreamBuffer

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "eventstream"

# Header value types.
TRUE, FALSE, BYTE, SHORT, INT, LONG, BYTES, STRING, TIMESTAMP, UUID = range(10)


def header(name, kind, value=None):
    raw = name.encode()
    out = struct.pack(">B", len(raw)) + raw + struct.pack(">B", kind)
    if kind in (TRUE, FALSE):
        return out
    if kind == BYTE:
        return out + struct.pack(">b", value)
    if kind == SHORT:
        return out + struct.pack(">h", value)
    if kind == INT:
        return out + struct.pack(">i", value)
    if kind in (LONG, TIMESTAMP):
        return out + struct.pack(">q", value)
    if kind in (BYTES, STRING):
        data = value if kind == BYTES else value.encode()
        return out + struct.pack(">H", len(data)) + data
    if kind == UUID:
        return out + value.bytes
    raise ValueError(kind)


def message(headers, payload):
    """One frame: `headers` is a list of (name, kind, value), `payload` bytes."""
    block = b"".join(header(*h) for h in headers)
    total = 12 + len(block) + len(payload) + 4
    prelude = struct.pack(">II", total, len(block))
    prelude += struct.pack(">I", zlib.crc32(prelude) & 0xFFFFFFFF)
    body = prelude + block + payload
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def _json(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def event(event_type, obj):
    """An event frame as Bedrock sends it (header order as seen on the wire)."""
    return message(
        [
            (":event-type", STRING, event_type),
            (":content-type", STRING, "application/json"),
            (":message-type", STRING, "event"),
        ],
        _json(obj),
    )


def exception(exception_type, text):
    return message(
        [
            (":exception-type", STRING, exception_type),
            (":content-type", STRING, "application/json"),
            (":message-type", STRING, "exception"),
        ],
        _json({"message": text}),
    )


def error(code, text):
    return message(
        [
            (":error-code", STRING, code),
            (":error-message", STRING, text),
            (":message-type", STRING, "error"),
        ],
        b"",
    )


# Bedrock pads events with a "p" member of varying length (it hides token lengths).
PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"


def chunk(anthropic_event):
    """An InvokeModelWithResponseStream `chunk`: base64 of one Anthropic Messages event."""
    raw = _json(anthropic_event)
    return event("chunk", {"bytes": base64.b64encode(raw).decode(), "p": PAD[: len(raw) % 20]})


def converse_events():
    return [
        event("messageStart", {"p": "abc", "role": "assistant"}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hello"}, "p": "abcd"}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": ", \"usage\" world"}, "p": "a"}),
        event("contentBlockStop", {"contentBlockIndex": 0, "p": "abcdefgh"}),
        event("messageStop", {"p": "abcdefghijklmn", "stopReason": "end_turn"}),
    ]


def converse_stream():
    return converse_events() + [
        event(
            "metadata",
            {
                "metrics": {"latencyMs": 812},
                "p": "abcdefghijklmnopqrstuvwxyzABCDEF",
                "usage": {
                    "cacheReadInputTokens": 3000,
                    "cacheWriteInputTokens": 1200,
                    "inputTokens": 25,
                    "outputTokens": 12,
                    "totalTokens": 4237,
                },
            },
        )
    ]


def invoke_stream():
    return [
        chunk(
            {
                "type": "message_start",
                "message": {
                    "id": "msg_bdrk_01",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-20250514",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 25,
                        "cache_creation_input_tokens": 1200,
                        "cache_read_input_tokens": 3000,
                        "output_tokens": 1,
                    },
                },
            }
        ),
        chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!\n\"usage\""}}),
        chunk({"type": "content_block_stop", "index": 0}),
        chunk(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 15},
            }
        ),
        chunk(
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 25,
                    "outputTokenCount": 15,
                    "invocationLatency": 640,
                    "firstByteLatency": 310,
                },
            }
        ),
    ]


def converse_throttled():
    return converse_events()[:2] + [
        exception("throttlingException", "Too many requests, please wait before trying again.")
    ]


def invoke_stream_error():
    return invoke_stream()[:3] + [
        exception("modelStreamErrorException", "The model stream ended with an error.")
    ]


def invoke_stream_metrics_only():
    """An Invoke stream whose Anthropic events carry no usage: only the invocation metrics."""
    return [
        chunk({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": []}}),
        chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        chunk({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        chunk(
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 40,
                    "outputTokenCount": 3,
                    "invocationLatency": 100,
                    "firstByteLatency": 50,
                },
            }
        ),
    ]


def every_header_type():
    return [
        message(
            [
                ("t", TRUE, None),
                ("f", FALSE, None),
                ("byte", BYTE, -7),
                ("short", SHORT, -300),
                ("int", INT, 70000),
                ("long", LONG, -(2**40)),
                ("bytes", BYTES, b"\x00\xff\x10"),
                ("string", STRING, "h\u00e9"),
                ("timestamp", TIMESTAMP, 1751000000123),
                ("uuid", UUID, uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")),
                (":message-type", STRING, "event"),
                (":event-type", STRING, "custom"),
            ],
            b"payload",
        ),
        message([], b""),
        error("InternalFailure", "boom"),
    ]


FIXTURES = {
    "converse_stream.bin": converse_stream,
    "invoke_stream.bin": invoke_stream,
    "converse_throttled.bin": converse_throttled,
    "invoke_stream_error.bin": invoke_stream_error,
    "invoke_stream_metrics_only.bin": invoke_stream_metrics_only,
    "every_header_type.bin": every_header_type,
}


def _verify(frames):
    """botocore decodes every frame, with the same headers and payload we encoded."""
    buf = EventStreamBuffer()
    buf.add_data(b"".join(frames))
    decoded = list(buf)
    assert len(decoded) == len(frames), (len(decoded), len(frames))
    for raw, msg in zip(frames, decoded):
        assert msg.prelude.total_length == len(raw)
        assert raw.endswith(msg.payload + struct.pack(">I", msg.crc))


def main():
    check = "--check" in sys.argv[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, build in FIXTURES.items():
        frames = build()
        _verify(frames)
        data = b"".join(frames)
        path = OUT / name
        if check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(name)
        else:
            path.write_bytes(data)
    # botocore reads the same value of every header type.
    buf = EventStreamBuffer()
    buf.add_data(every_header_type()[0])
    typed = next(iter(buf)).headers
    assert typed == {
        "t": True,
        "f": False,
        "byte": -7,
        "short": -300,
        "int": 70000,
        "long": -(2**40),
        "bytes": b"\x00\xff\x10",
        "string": "h\u00e9",
        "timestamp": 1751000000123,
        "uuid": uuid.UUID("01234567-89ab-cdef-0123-456789abcdef").bytes,
        ":message-type": "event",
        ":event-type": "custom",
    }, typed
    # And the Bedrock payloads are what we meant (the chunk's base64 is an Anthropic event).
    buf = EventStreamBuffer()
    buf.add_data(b"".join(invoke_stream()))
    first = json.loads(next(iter(buf)).payload)
    assert json.loads(base64.b64decode(first["bytes"]))["type"] == "message_start"
    if stale:
        print("stale fixtures:", ", ".join(stale))
        return 1
    print(f"{len(FIXTURES)} fixtures {'checked' if check else 'written'} in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
