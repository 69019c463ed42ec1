#!/usr/bin/env python3
"""A receiver for Tollgate's budget alert webhooks (`alerts` in the plugin configuration), to
start from: it prints each event as one JSON line and keeps them for `GET /events`. Replace the
`handle` function with what your alerting needs (a Slack or PagerDuty call, a ticket).

    python3 examples/observability/alert_receiver.py --port 9095

Events are version 1 (docs/budgets.md, "Alert webhooks"). Tollgate retries an event after no
answer, 408, 429 or a 5xx, so the same event (same `id`) can arrive twice when an answer is
lost: deduplicate on `id`, as `handle` does here. `--status` makes it answer every POST with
another status (the tests use it to play a failing receiver). Python standard library only.
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 64 * 1024
EVENTS = []
SEEN = set()
LOCK = threading.Lock()


def handle(event):
    """One event, once per `id`: printed as a JSON line (stdout), kept for GET /events."""
    with LOCK:
        if event.get("id") in SEEN:
            return
        SEEN.add(event.get("id"))
        EVENTS.append(event)
    print(json.dumps(event, sort_keys=True), flush=True)


class Handler(BaseHTTPRequestHandler):
    status = 204
    posts = 0

    def do_POST(self):
        with LOCK:
            Handler.posts += 1
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            return self.answer(413)
        try:
            event = json.loads(self.rfile.read(length))
        except ValueError:
            return self.answer(400)
        if not isinstance(event, dict) or event.get("version") != 1:
            return self.answer(400)
        if Handler.status // 100 == 2:
            handle(event)
        self.answer(Handler.status)

    def do_GET(self):
        if self.path != "/events":
            return self.answer(404)
        with LOCK:
            body = json.dumps({"posts": Handler.posts, "events": EVENTS}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer(self, status):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9095)
    parser.add_argument("--status", type=int, default=204, help="answer every POST with this")
    args = parser.parse_args()
    Handler.status = args.status
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"alert receiver on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
