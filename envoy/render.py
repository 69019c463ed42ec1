#!/usr/bin/env python3
"""Renders an Envoy config template of this folder: ${NAME} fields from KEY=VALUE arguments.

    python3 envoy/render.py envoy/tollgate.yaml LISTEN_PORT=10000 PLUGIN_CONFIG_FILE=envoy/tollgate.json

PLUGIN_CONFIG_FILE (a JSON file) becomes PLUGIN_CONFIG, the plugin configuration string;
every field without a value takes the default below. Unknown ${NAME}s are an error.
The *_ENDPOINTS fields take "IP:PORT,IP:PORT…" (STATIC clusters: IP addresses; a bare PORT means
127.0.0.1) and become a YAML flow list of lb_endpoints; left empty, they are one endpoint at
127.0.0.1:UPSTREAM_PORT. The clusters of RATELIMIT_ENDPOINTS, LEDGER_COLLECTOR_ENDPOINTS and
ALERTS_ENDPOINTS are STRICT_DNS: HOST:PORT works there too.

    python3 envoy/render.py envoy/tollgate.yaml OPENAI_ENDPOINTS=127.0.0.1:18001,127.0.0.1:18002
"""
import json
import os
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULTS = {
    "ADMIN_PORT": "9901",
    # The admin interface (stats, config dump) must never face clients: loopback by default.
    "ADMIN_ADDRESS": "127.0.0.1",
    "LISTEN_ADDRESS": "127.0.0.1",
    "LISTEN_PORT": "10000",
    # tollgate.yaml's listener: how accepted connections are spread over the workers. null: the
    # kernel's (SO_REUSEPORT hashing); the e2e cache test uses "{exact_balance: {}}".
    "CONNECTION_BALANCE": "null",
    "UPSTREAM_PORT": "18000",
    "ACCESS_LOG": "/dev/stdout",
    "WASM_PATH": os.path.join(ROOT, "target/wasm32-wasip1/release/tollgate.wasm"),
    "PLUGIN_CONFIG_FILE": os.path.join(HERE, "tollgate.json"),
    # tollgate-jwt.yaml: a demo HS256 key ("tollgate-demo-secret-change-me"); use your IdP's JWKS.
    "JWT_ISSUER": "https://idp.example.internal",
    "JWKS": json.dumps(json.dumps({"keys": [{
        "kty": "oct", "alg": "HS256", "kid": "demo",
        "k": "dG9sbGdhdGUtZGVtby1zZWNyZXQtY2hhbmdlLW1l"}]})),
    # tollgate.yaml / tollgate-jwt.yaml upstream clusters (see ENDPOINT_FIELDS);
    # empty: 127.0.0.1:UPSTREAM_PORT.
    "OPENAI_ENDPOINTS": "",
    "OPENAI_BACKUP_ENDPOINTS": "",
    "ANTHROPIC_ENDPOINTS": "",
    "SELFHOSTED_ENDPOINTS": "",
    # The rate-limit service global budgets are leased from (Limitador's gRPC port by default;
    # a STRICT_DNS cluster, so a name like limitador:8081 works too).
    "RATELIMIT_ENDPOINTS": "127.0.0.1:8081",
    # The receiver budget alert events are POSTed to (`alerts.cluster: "alerts"`; STRICT_DNS).
    "ALERTS_ENDPOINTS": "127.0.0.1:9095",
    # tollgate-providers.yaml: the OpenTelemetry collector (OTLP/gRPC) the ledger is exported to.
    "LEDGER_COLLECTOR_ENDPOINTS": "127.0.0.1:4317",
    # tollgate-providers.yaml: SDS files with the provider API keys, and the Azure OpenAI resource.
    "SECRETS_DIR": os.path.join(HERE, "secrets"),
    "AZURE_OPENAI_HOST": "example.openai.azure.com",
    # tollgate-providers.yaml: the Vertex AI region ({region}-aiplatform.googleapis.com) and the
    # Bedrock runtime region (bedrock-runtime.{region}.amazonaws.com, SigV4's region).
    "VERTEX_REGION": "us-east5",
    "BEDROCK_REGION": "us-east-1",
}

# The command-line flags every shipped Envoy runs with (the tests, `make demo`, both compose
# examples; examples/istio/gateway-values.yaml sets the same through ProxyConfig). They bound what
# a crash loses of the access log, the billing ledger: by default Envoy buffers access-log lines
# until 64 KiB are waiting or 10 s have passed, so a SIGKILL lost up to that much. With
# a minimum flush size of 0, each line goes to the file's flush thread as soon as it is written
# (one write per line or per burst, on that thread, never on a worker); the 100 ms timer is the
# backstop. A bootstrap cannot set these: they are Envoy flags only.
ENVOY_FLAGS = ("--file-flush-min-size-kb", "0", "--file-flush-interval-msec", "100")

# Fields given as "IP:PORT,…" and rendered as a YAML flow list of Envoy lb_endpoints.
ENDPOINT_FIELDS = ("OPENAI_ENDPOINTS", "OPENAI_BACKUP_ENDPOINTS", "ANTHROPIC_ENDPOINTS",
                   "SELFHOSTED_ENDPOINTS", "RATELIMIT_ENDPOINTS", "LEDGER_COLLECTOR_ENDPOINTS",
                   "ALERTS_ENDPOINTS")


def lb_endpoints(spec):
    """ "127.0.0.1:18001,[::1]:18002,18003" -> a one-line YAML list of lb_endpoints."""
    items = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        host = host.strip("[]") if sep else "127.0.0.1"
        if not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise ValueError(f"bad endpoint {part!r}: want IP:PORT")
        items.append('{endpoint: {address: {socket_address: {address: "%s", port_value: %d}}}}'
                     % (host, int(port)))
    if not items:
        raise ValueError(f"no endpoint in {spec!r}")
    return "[" + ", ".join(items) + "]"


def render(template_text, values):
    merged = dict(DEFAULTS)
    merged.update(values)
    if "PLUGIN_CONFIG" not in values:
        with open(merged["PLUGIN_CONFIG_FILE"], encoding="utf-8") as f:
            config = json.load(f)
        merged["PLUGIN_CONFIG"] = json.dumps(json.dumps(config, separators=(",", ":")))
    for name in ENDPOINT_FIELDS:
        if "${%s}" % name in template_text:
            merged[name] = lb_endpoints(merged[name] or "127.0.0.1:%s" % merged["UPSTREAM_PORT"])
    return string.Template(template_text).substitute(merged)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    values = dict(arg.split("=", 1) for arg in argv[2:])
    with open(argv[1], encoding="utf-8") as f:
        sys.stdout.write(render(f.read(), values))


if __name__ == "__main__":
    main(sys.argv)
