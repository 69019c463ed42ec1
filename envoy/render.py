#!/usr/bin/env python3
"""Renders an Envoy config template of this folder: ${NAME} fields from KEY=VALUE arguments.

    python3 envoy/render.py envoy/tollgate.yaml LISTEN_PORT=10000 PLUGIN_CONFIG_FILE=envoy/tollgate.json

PLUGIN_CONFIG_FILE (a JSON file) becomes PLUGIN_CONFIG, the plugin configuration string;
every field without a value takes the default below. Unknown ${NAME}s are an error.
"""
import json
import os
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULTS = {
    "ADMIN_PORT": "9901",
    "LISTEN_ADDRESS": "127.0.0.1",
    "LISTEN_PORT": "10000",
    "UPSTREAM_PORT": "18000",
    "ACCESS_LOG": "/dev/stdout",
    "WASM_PATH": os.path.join(ROOT, "target/wasm32-wasip1/release/tollgate.wasm"),
    "PLUGIN_CONFIG_FILE": os.path.join(HERE, "tollgate.json"),
    # tollgate-jwt.yaml: a demo HS256 key ("tollgate-demo-secret-change-me"); use your IdP's JWKS.
    "JWT_ISSUER": "https://idp.example.internal",
    "JWKS": json.dumps(json.dumps({"keys": [{
        "kty": "oct", "alg": "HS256", "kid": "demo",
        "k": "dG9sbGdhdGUtZGVtby1zZWNyZXQtY2hhbmdlLW1l"}]})),
}


def render(template_text, values):
    merged = dict(DEFAULTS)
    merged.update(values)
    if "PLUGIN_CONFIG" not in values:
        with open(merged["PLUGIN_CONFIG_FILE"], encoding="utf-8") as f:
            config = json.load(f)
        merged["PLUGIN_CONFIG"] = json.dumps(json.dumps(config, separators=(",", ":")))
    return string.Template(template_text).substitute(merged)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    values = dict(arg.split("=", 1) for arg in argv[2:])
    with open(argv[1], encoding="utf-8") as f:
        sys.stdout.write(render(f.read(), values))


if __name__ == "__main__":
    main(sys.argv)
