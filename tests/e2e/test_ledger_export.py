"""The billing export: the ledger's request id is one no client can choose, and a crash loses
(almost) nothing of the ledger with the flush flags every shipped Envoy runs with."""
import http.client as httpclient
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid

import yaml

from conftest import KEYS, api_key_config
from harness import ENVOY, ROOT, WASM, Envoy, free_port, http, render

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_two_tenants_with_one_request_id_get_distinct_ledger_ids(envoy):
    """Two tenants send the same x-request-id: two ledger lines, each with its own request_id
    (a UUID Envoy draws), and the client's id kept apart as client_request_id."""
    rid = "same-" + uuid.uuid4().hex
    for tenant in ("team-a", "team-b"):
        status, _, _ = http("POST", envoy.url + "/v1/chat/completions", CHAT,
                            {"content-type": "application/json", "x-request-id": rid,
                             "authorization": f"Bearer {KEYS[tenant]}"})
        assert status == 200
    deadline = time.time() + 5
    while True:
        lines = [line for line in envoy.access_lines() if line.get("client_request_id") == rid]
        if len(lines) == 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert sorted(line["tenant"] for line in lines) == ["team-a", "team-b"]
    ids = [line["request_id"] for line in lines]
    assert ids[0] != ids[1]
    assert all(UUID.match(i) for i in ids), ids


def test_client_chosen_values_cannot_forge_ledger_fields(envoy):
    """The line is text Envoy does not escape: a client's quotes, backslashes and control bytes
    in x-request-id, the path or the model stay inside their own fields (Tollgate writes them,
    escaped), on a request Tollgate reads and on one it passes through."""
    forged = 'x","tenant":"victim","input_tokens":0,"a":"\\'
    body = dict(CHAT, model='gpt-4o-mini","decision":"admitted')
    http("POST", envoy.url + '/v1/chat/completions?q="x"', body,
         {"content-type": "application/json", "x-request-id": forged,
          "authorization": f"Bearer {KEYS['team-a']}"})
    http("GET", envoy.url + '/v1/models?"tenant":"victim"', None, {"x-request-id": forged + "2"})
    read = envoy.access_line(forged)  # parsed and checked against the schema by the harness
    assert read["tenant"] == "team-a" and read["client_request_id"] == forged, read
    assert read["model"] == 'gpt-4o-mini","decision":"admitted' and read["input_tokens"] > 0, read
    assert read["path"].endswith('?q="x"') or read["path"].endswith("?q=%22x%22"), read
    passed = envoy.access_line(forged + "2")
    assert passed["tenant"] is None and passed["method"] == "GET", passed


def complete_lines(path):
    """The access log's lines that were written whole (a SIGKILL can cut the last one)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for line in text.split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def crash_under_load(upstream, flags=None, clients=8, admitted_before_kill=300):
    """Envoy under `clients` keep-alive clients, SIGKILLed once `admitted_before_kill` requests
    were answered 200 (or after 10 s). Returns (admitted 200s, of those without a ledger line)."""
    env = Envoy(api_key_config(), upstream.port, flags=flags)
    admitted, stop = [], threading.Event()

    def client():
        conn = httpclient.HTTPConnection("127.0.0.1", env.port, timeout=10)
        body = json.dumps(CHAT)
        while not stop.is_set():
            rid = uuid.uuid4().hex
            try:
                conn.request("POST", "/v1/chat/completions", body,
                             {"content-type": "application/json", "x-request-id": rid,
                              "authorization": f"Bearer {KEYS['team-a']}"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, httpclient.HTTPException):
                return  # Envoy is gone: this request was not answered
            if resp.status == 200:
                admitted.append(rid)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(admitted) < admitted_before_kill and time.time() < deadline:
            time.sleep(0.005)
        os.kill(env.proc.pid, signal.SIGKILL)
        env.proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop.set()
        env.stop()
    logged = {line.get("client_request_id") for line in complete_lines(env.access_log)}
    answered = list(admitted)
    return len(answered), sum(rid not in logged for rid in answered)


# What a SIGKILL may lose with the shipped flags: the lines of requests answered in the moment
# between Envoy writing the response and its flush thread writing the line (microseconds, more on
# a loaded machine). Measured: 0 of about 300 in each of 10 runs (8 clients, 2 workers, 2 shared
# cores); Envoy's defaults (a flush at 64 KiB or every 10 s) lost 39 to 48 of about 305 in each
# of 5 runs of the same test.
LOST_BOUND = 2


def test_sigkill_under_load_loses_at_most_a_few_ledger_lines(upstream):
    answered, lost = crash_under_load(upstream)
    assert answered >= 100, "the load did not get going"
    assert lost <= LOST_BOUND, f"{lost} of {answered} answered requests have no ledger line"


def shipped_flags_in(command):
    flags = render.ENVOY_FLAGS
    return any(command[i:i + len(flags)] == list(flags) for i in range(len(command)))


def test_every_shipped_envoy_runs_with_the_flush_flags():
    """Both compose examples spell render.ENVOY_FLAGS; Istio's gateway sets the same through
    ProxyConfig (Istio passes no minimum size of 0, so 1 KiB: one ledger line or two)."""
    for example in ("docker-compose", "global"):
        with open(os.path.join(ROOT, "examples", example, "docker-compose.yml"), encoding="utf-8") as f:
            services = yaml.safe_load(f)["services"]
        envoys = [s for s in services.values() if str(s.get("image", "")).startswith("envoyproxy/envoy")]
        assert envoys, example
        for service in envoys:
            assert shipped_flags_in(service["command"]), (example, service["command"])
    with open(os.path.join(ROOT, "examples", "istio", "gateway-values.yaml"), encoding="utf-8") as f:
        values = yaml.safe_load(f)
    proxy = yaml.safe_load(values["podAnnotations"]["proxy.istio.io/config"])
    assert proxy["fileFlushInterval"] == "0.1s"
    assert proxy["fileFlushMinSizeKb"] == 1


def shipped_ledger_format(template="tollgate.yaml"):
    """The template's ledger line format (its file access log's text format)."""
    with open(os.path.join(ROOT, "envoy", template), encoding="utf-8") as f:
        config = yaml.safe_load(render.render(f.read(), {}))
    (listener,) = [l for l in config["static_resources"]["listeners"] if l["name"] == "llm"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (log,) = [a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.file"]
    log_format = log["typed_config"]["log_format"]
    assert log_format["omit_empty_values"] is True, template
    return log_format["text_format_source"]["inline_string"]


def request_id_filter(template):
    """The first HTTP filter of the template's listener: the one that draws the request id."""
    with open(os.path.join(ROOT, "envoy", template), encoding="utf-8") as f:
        config = yaml.safe_load(render.render(f.read(), {}))
    (listener,) = [l for l in config["static_resources"]["listeners"] if l["name"] == "llm"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]


def test_every_shipped_ledger_has_an_id_no_client_chooses():
    """The plain, jwt and providers configs and Istio's ledger patch print the same ledger:
    request_id is a UUID Envoy draws (once per request in the plain configs, where two access logs
    may print it; the line's own on Istio, which has one), the client's x-request-id is
    client_request_id."""
    shipped = shipped_ledger_format()
    assert shipped.startswith("{%FILTER_STATE(wasm.tollgate.ledger:PLAIN)%")
    assert '"request_id":"%FILTER_STATE(tollgate.request_id:PLAIN)%"' in shipped
    for template in ("tollgate.yaml", "tollgate-jwt.yaml", "tollgate-providers.yaml"):
        assert shipped_ledger_format(template) == shipped, template
        first = request_id_filter(template)
        assert first["name"] == "envoy.filters.http.set_filter_state", template
        (rule,) = first["typed_config"]["on_request_headers"]
        assert rule["object_key"] == "tollgate.request_id"
        assert rule["format_string"]["text_format_source"]["inline_string"] == "%UNIQUE_ID%"
    with open(os.path.join(ROOT, "examples", "istio", "ledger-telemetry.yaml"), encoding="utf-8") as f:
        (ledger,) = yaml.safe_load_all(f)
    (patch,) = ledger["spec"]["configPatches"]
    (log,) = patch["patch"]["value"]["typed_config"]["access_log"]
    istio = log["typed_config"]["log_format"]
    assert istio["omit_empty_values"] is True
    assert istio["text_format_source"]["inline_string"] == shipped.replace(
        "%FILTER_STATE(tollgate.request_id:PLAIN)%", "%UNIQUE_ID%")
    # The OpenTelemetry export's body is the same line.
    with open(os.path.join(ROOT, "envoy", "tollgate-providers.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(render.render(f.read(), {}))
    (listener,) = [l for l in config["static_resources"]["listeners"] if l["name"] == "llm"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (otel,) = [a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.open_telemetry"]
    assert otel["typed_config"]["body"]["string_value"] + "\n" == shipped


def test_the_opentelemetry_export_sends_each_line_with_the_same_request_id(tmp_path):
    """envoy/tollgate-providers.yaml's OpenTelemetry access logger sends a request's record to the
    collector (every 100 ms; the test waits at most 5 s) with the file line's request_id. The
    collector is a bare socket that answers HTTP/2's SETTINGS and keeps the bytes: protobuf
    strings travel as they are."""
    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen(4)
    collector.settimeout(10)
    received = bytearray()

    def serve():
        try:
            conn, _ = collector.accept()
        except OSError:
            return
        conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS frame
        while data := conn.recv(65536):
            received.extend(data)

    threading.Thread(target=serve, daemon=True).start()
    port, admin = free_port(), free_port()
    with open(os.path.join(ROOT, "envoy", "tollgate-providers.yaml"), encoding="utf-8") as f:
        text = render.render(f.read(), {
            "LISTEN_PORT": str(port), "ADMIN_PORT": str(admin), "WASM_PATH": WASM,
            "ACCESS_LOG": str(tmp_path / "access.log"),
            "PLUGIN_CONFIG_FILE": os.path.join(ROOT, "envoy", "tollgate-providers.json"),
            "LEDGER_COLLECTOR_ENDPOINTS": "127.0.0.1:%d" % collector.getsockname()[1]})
    (tmp_path / "envoy.yaml").write_text(text, encoding="utf-8")
    with open(tmp_path / "envoy.log", "w") as log:
        proc = subprocess.Popen([ENVOY, "-c", str(tmp_path / "envoy.yaml"), "--concurrency", "1",
                                 "--disable-hot-restart", *render.ENVOY_FLAGS], stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "envoy.log").read_text()
            try:
                if http("GET", f"http://127.0.0.1:{admin}/ready", timeout=1)[2].strip() == b"LIVE":
                    break
            except OSError:
                pass
            time.sleep(0.1)
        # No key: Tollgate's 401, a ledger line like any other, and no provider is called.
        status, _, _ = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", CHAT,
                            {"content-type": "application/json", "x-request-id": "client-chosen"})
        assert status == 401
        deadline = time.time() + 5
        while True:
            lines = complete_lines(tmp_path / "access.log")
            if lines and lines[-1]["request_id"].encode() in received:
                break
            assert time.time() < deadline, (lines, bytes(received))
            time.sleep(0.05)
        assert lines[-1]["client_request_id"] == "client-chosen"
        assert b"unauthenticated" in received  # the record's decision attribute
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        collector.close()
