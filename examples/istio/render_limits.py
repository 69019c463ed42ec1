#!/usr/bin/env python3
"""Rewrites the limits ConfigMap in examples/istio/global-budgets.yaml from the plugin
configuration that envoyfilter-stop-iteration.yaml carries, with `tollgate-limits limitador`.
Re-run it after any change to a global limit, a tenant or global_budgets.domain there:

    python3 examples/istio/render_limits.py            # rewrites global-budgets.yaml's ConfigMap
    python3 examples/istio/render_limits.py --check    # exit 1 if the ConfigMap is stale

tollgate-limits is taken from --tollgate-limits, else $TOLLGATE_LIMITS, else target/debug or
target/release (`make rls` builds it), else `cargo run --features cli --bin tollgate-limits`.
Needs PyYAML (tests/requirements.txt) to read the EnvoyFilter; only the ConfigMap's
`limits.yaml: |` block is replaced, the rest of the file is left as it is.
tests/e2e/test_deploy_surfaces.py fails when the ConfigMap differs from a fresh render.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ENVOYFILTER = os.path.join(HERE, "envoyfilter-stop-iteration.yaml")
MANIFEST = os.path.join(HERE, "global-budgets.yaml")
KEY_LINE = "  limits.yaml: |"
INDENT = "    "


def plugin_config(path=ENVOYFILTER):
    """The plugin configuration (a dict) of the EnvoyFilter's ECDS Wasm config."""
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    (envoyfilter,) = [d for d in docs if d["kind"] == "EnvoyFilter"]
    (patch,) = [p for p in envoyfilter["spec"]["configPatches"] if p["applyTo"] == "EXTENSION_CONFIG"]
    wasm = patch["patch"]["value"]["typed_config"]["value"]["config"]
    return json.loads(wasm["configuration"]["value"])


def tollgate_limits_command(explicit=None):
    if explicit:
        return [explicit]
    if os.environ.get("TOLLGATE_LIMITS"):
        return [os.environ["TOLLGATE_LIMITS"]]
    for profile in ("debug", "release"):
        path = os.path.join(ROOT, "target", profile, "tollgate-limits")
        if os.path.exists(path):
            return [path]
    return ["cargo", "run", "-q", "--manifest-path", os.path.join(ROOT, "Cargo.toml"),
            "--features", "cli", "--bin", "tollgate-limits", "--"]


def generate(config, command=None):
    """What `tollgate-limits limitador` writes for `config`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "plugin.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        return subprocess.check_output(tollgate_limits_command(command) + ["limitador", path], text=True)


def render(manifest_text, limits):
    """manifest_text with the ConfigMap's `limits.yaml: |` block replaced by `limits`."""
    lines = manifest_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == KEY_LINE]
    if len(starts) != 1:
        raise ValueError(f"expected one line {KEY_LINE!r} in the manifest, found {len(starts)}")
    start = end = starts[0] + 1
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    if any(not line.strip() for line in limits.splitlines()) or not limits.endswith("\n"):
        raise ValueError("the limits do not fit a `|` block: blank lines or no final newline")
    block = "".join(INDENT + line + "\n" for line in limits.splitlines())
    return "".join(lines[:start]) + block + "".join(lines[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the ConfigMap is stale")
    parser.add_argument("--tollgate-limits", help="path of the tollgate-limits binary")
    args = parser.parse_args(argv)
    limits = generate(plugin_config(), args.tollgate_limits)
    with open(MANIFEST, encoding="utf-8") as f:
        current = f.read()
    fresh = render(current, limits)
    if args.check:
        if fresh != current:
            print(f"{MANIFEST}: the limits ConfigMap is stale: run python3 examples/istio/render_limits.py",
                  file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        with open(MANIFEST, "w", encoding="utf-8") as f:
            f.write(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
