#!/usr/bin/env python3
"""`make validate`: every shipped Envoy config renders and passes `envoy --mode validate`."""
import glob
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "envoy"))
import render  # noqa: E402

ENVOY = os.path.join(ROOT, ".venv/bin/envoy")


def main():
    configs = sorted(glob.glob(os.path.join(ROOT, "envoy", "*.yaml")))
    failed = 0
    for path in configs:
        with open(path, encoding="utf-8") as f:
            plugin = path[: -len(".yaml")] + ".json"
            values = {"PLUGIN_CONFIG_FILE": plugin} if os.path.exists(plugin) else {}
            text = render.render(f.read(), values)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as out:
            out.write(text)
        proc = subprocess.run(
            [ENVOY, "--mode", "validate", "-c", out.name, "--log-level", "error"],
            capture_output=True, text=True, timeout=120,
        )
        os.unlink(out.name)
        ok = proc.returncode == 0
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} envoy --mode validate {os.path.relpath(path, ROOT)}")
        if not ok:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
    print(f"validate: {len(configs) - failed} passed, {failed} failed")
    sys.exit(1 if failed or not configs else 0)


if __name__ == "__main__":
    main()
