"""examples/global/: the docker-compose layout of global budgets (Redis, Limitador, two Envoy
replicas running one config), checked without a container engine, then run on loopback as the
compose file lays it out: two Envoys rendered from the same template and plugin.json, the test
rate-limit service (Limitador's library) serving the limits file from the same plugin.json, and
redis-server.
* the compose file: every mounted path exists, each published port is one its service listens
  on, both replicas run one config, `replicas` matches, Limitador uses `redis` storage and the
  generated limits file, the `ratelimit` cluster names the limitador service;
* envoy.yaml is a fresh render, and `envoy --mode validate` accepts it;
* live: the README's requests through both replicas, each with its own lease of one counter in
  Redis, the usage view showing it, and a replica started in a killed one's place continuing
  from Redis's counter.
"""
import importlib.util
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import yaml

from harness import ENVOY, Envoy, RateLimitService, Redis, http

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIR = os.path.join(ROOT, "examples", "global")
_spec = importlib.util.spec_from_file_location("global_render", os.path.join(DIR, "render.py"))
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

KEYS = {"team-a": "sk-demo-team-a", "team-b": "sk-demo-team-b"}
ADMIN_TOKEN = "tollgate-admin-demo"


def compose():
    with open(os.path.join(DIR, "docker-compose.yml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def plugin():
    with open(os.path.join(DIR, "plugin.json"), encoding="utf-8") as f:
        return json.load(f)


def envoys(services):
    return {name: s for name, s in services.items() if s["image"].startswith("envoyproxy/envoy")}


def test_mounted_paths_exist_and_are_read_only():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            host, container, mode = volume.split(":")
            assert mode == "ro", (name, volume)
            path = os.path.normpath(os.path.join(DIR, host))
            if path.endswith("tollgate.wasm"):
                assert path == os.path.join(ROOT, "target", "wasm32-wasip1", "release", "tollgate.wasm")
            else:
                assert os.path.isfile(path), (name, volume)


def test_published_ports_are_ones_the_services_listen_on():
    config = yaml.safe_load(render.render())
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin = config["admin"]["address"]["socket_address"]
    listening = {"envoy": {listener["port_value"], admin["port_value"]}, "limitador": {8080}}
    host_ports = []
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            bind, host, container = port.split(":")
            assert bind == "127.0.0.1", (name, port)
            kind = "envoy" if name.startswith("envoy") else name
            assert int(container) in listening[kind], (name, port)
            host_ports.append(int(host))
    assert len(host_ports) == len(set(host_ports))
    assert {10000, 10001} <= set(host_ports)


def test_the_replicas_run_one_config_and_lease_from_limitador_over_redis():
    services = compose()["services"]
    replicas = envoys(services)
    assert len(replicas) == 2
    first, second = replicas.values()
    assert (first["image"], first["command"], first["volumes"]) == \
        (second["image"], second["command"], second["volumes"])
    budgets = plugin()["global_budgets"]
    assert budgets["replicas"] == len(replicas)
    # Each fake provider lives in its own replica's network namespace.
    fakes = {s["network_mode"] for n, s in services.items() if n.startswith("fake-llm")}
    assert fakes == {f"service:{n}" for n in replicas}
    # The cluster the plugin names is the limitador service's gRPC port, resolved by name.
    clusters = yaml.safe_load(render.render())["static_resources"]["clusters"]
    cluster = next(c for c in clusters if c["name"] == budgets["cluster"])
    assert cluster["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in json.dumps(cluster)
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("limitador", 8081)
    # Limitador: the generated limits file, `redis` storage (not redis_cached) at the redis
    # service, with the headers that say what is left.
    limitador = services["limitador"]
    command = limitador["command"]
    limits_mount = next(v for v in limitador["volumes"] if v.startswith("./limitador-limits.yaml:"))
    assert limits_mount.split(":")[1] in command
    assert command[command.index("--rate-limit-headers") + 1] == "DRAFT_VERSION_03"
    storage = command.index("redis")
    assert command[storage + 1] == "redis://redis:6379" and "redis" in services
    assert "redis_cached" not in command
    assert "--rls-port" not in command  # 8081, its default


def test_envoy_yaml_is_a_fresh_render_and_validates(tmp_path):
    with open(os.path.join(DIR, "envoy.yaml"), encoding="utf-8") as f:
        assert f.read() == render.render(), "run python3 examples/global/render.py"
    local = tmp_path / "envoy.yaml"
    local.write_text(render.render(
        wasm_path=os.path.join(ROOT, "target", "wasm32-wasip1", "release", "tollgate.wasm"),
        access_log=str(tmp_path / "access.log"), ratelimit="localhost:8081"))
    result = subprocess.run([ENVOY, "--mode", "validate", "-c", str(local)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the layout, run on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def layout(upstream):
    redis = Redis()
    rls = RateLimitService(plugin(), redis)
    with open(rls.limits, encoding="utf-8") as generated, \
            open(os.path.join(DIR, "limitador-limits.yaml"), encoding="utf-8") as shipped:
        assert generated.read() == shipped.read(), "run make limits-examples"
    # The service by name, as in the compose file: the cluster resolves it.
    extra = {"RATELIMIT_ENDPOINTS": f"localhost:{rls.port}"}
    replicas = [Envoy(plugin(), upstream.port, extra=extra) for _ in range(2)]
    yield replicas, rls, redis, extra
    for envoy in replicas:
        envoy.stop()
    rls.stop()
    redis.stop()


def chat(envoy, tenant, max_tokens=64, output=40):
    rid = str(uuid.uuid4())
    status, headers, data = http(
        "POST", envoy.url + "/v1/chat/completions",
        {"model": "gpt-4o-mini", "max_tokens": max_tokens,
         "messages": [{"role": "user", "content": "Hello!"}]},
        {"authorization": f"Bearer {KEYS[tenant]}", "content-type": "application/json",
         "x-request-id": rid, "x-fake-request-id": rid, "x-fake-input-tokens": "10",
         "x-fake-output-tokens": str(output)})
    return rid, status, headers, data


def lease(envoy, tenant, limit):
    status, _, data = http("GET", envoy.url + "/tollgate/usage", None,
                           {"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, data
    view = next(t for t in json.loads(data)["tenants"] if t["tenant"] == tenant)
    return next(l for l in view["limits"] if l["name"] == limit)["global"]


def counter(redis, tenant, limit, window=""):
    """Limitador's counters of (tenant, limit), of one minute window when given (its key names
    the descriptor, the window id among it)."""
    return sum(v for k, v in redis.counters().items() if tenant in k and limit in k and window in k)


def quiet_minute(needed=30.0):
    """The id of the minute window the caller can finish in: waits for the next one when fewer
    than `needed` seconds are left (the `tpm` counter and the leases start afresh there)."""
    left = 60 - time.time() % 60
    if left < needed:
        time.sleep(left + 0.5)
    return time.strftime("%Y-%m-%dT%H:%M", time.gmtime())


def test_both_replicas_lease_one_global_counter(layout):
    replicas, _, redis, _ = layout
    quiet_minute(needed=20)
    for envoy in replicas:
        rid, status, headers, data = chat(envoy, "team-a")
        assert status == 200, data
        assert headers["x-tollgate-model"] == "gpt-4o-mini"
        assert envoy.access_line(rid)["global"] == "lease"
    leases = [lease(envoy, "team-a", "tpm") for envoy in replicas]
    # Each replica took its own chunk: a tenth of the 100,000 left, split over two replicas.
    assert all(l["granted"] >= 5000 and 0 < l["used"] <= l["granted"] for l in leases), leases
    assert counter(redis, "team-a", "tpm") == sum(l["granted"] for l in leases)
    assert all(l["global_remaining"] is not None for l in leases)


def test_a_replica_started_in_a_killed_ones_place_continues_from_redis(layout, upstream):
    replicas, _, redis, extra = layout
    # One minute window for the whole test (it restarts an Envoy): the surviving replica's
    # request makes sure this window's counter exists.
    window = quiet_minute()
    assert chat(replicas[1], "team-a")[1] == 200
    before = counter(redis, "team-a", "tpm", window)
    assert before > 0
    killed = replicas.pop(0)
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(timeout=10)
    killed.stop()
    replacement = Envoy(plugin(), upstream.port, extra=extra)
    replicas.insert(0, replacement)
    rid, status, _, data = chat(replacement, "team-a")
    assert status == 200, data
    fresh = lease(replacement, "team-a", "tpm")
    # The counter went on from where it was: the new lease is added to it, not a new count.
    assert counter(redis, "team-a", "tpm", window) == before + fresh["granted"]
    assert quiet_minute(needed=0) == window, "the test outlived its minute"
    assert fresh["global_remaining"] <= 100000 - before
