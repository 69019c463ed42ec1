"""A VM that dies mid-exchange leaks no budget: the reservation and the concurrency slot its
request held expire after `limits.reservation_ttl_seconds` (at most 8/7 of it), without an Envoy
restart, and the tenant is admitted again.

The VM is killed by a test-only build (`--features test-trap`, never in releases): a request with
`x-tollgate-test-trap` makes the filter panic once the request is admitted, as a decompression
bomb once did."""
import hashlib
import json
import os
import time
import uuid

import pytest

from harness import ROOT, Envoy, http

TRAP_WASM = os.path.join(ROOT, "target/test-trap/wasm32-wasip1/release/tollgate.wasm")
ADMIN_TOKEN = "view-secret"
TTL_SECONDS = 7


@pytest.fixture(scope="module")
def trap_envoy(upstream):
    config = {
        "identity": {"source": "header", "header": "x-tenant"},
        "tenants": {"victim": {"max_concurrent": 1, "default_output_tokens": 600,
                               "limits": [{"name": "tph", "tokens": 1000, "window": "hour"}]}},
        "limits": {"reservation_ttl_seconds": TTL_SECONDS},
        "usage_view": {"path": "/tollgate/usage",
                       "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }
    proc = Envoy(config, upstream.port, extra={"WASM_PATH": TRAP_WASM})
    yield proc
    proc.stop()


def past_reload(send, timeout=10.0):
    """`send()` until the answer is not the 503 that a worker whose VM died gives until Envoy
    reloads it (FAIL_RELOAD, 1 s back-off by default)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = send()
        if answer[0] != 503 or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def victim(envoy):
    status, _, data = past_reload(lambda: http("GET", envoy.url + "/tollgate/usage", None,
                                               {"authorization": f"Bearer {ADMIN_TOKEN}"}))
    assert status == 200, data
    tenant = next(t for t in json.loads(data)["tenants"] if t["tenant"] == "victim")
    return tenant["in_flight"], tenant["limits"][0]


def chat(envoy, headers=None):
    return past_reload(lambda: send_chat(envoy, headers))[::-1]


def send_chat(envoy, headers=None):
    rid = str(uuid.uuid4())
    h = {"content-type": "application/json", "x-tenant": "victim", "x-request-id": rid,
         "x-fake-request-id": rid, **(headers or {})}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    try:
        status = http("POST", envoy.url + "/v1/chat/completions", body, h, timeout=10)[0]
    except OSError:
        status = None  # the connection died with the VM
    return status, rid


def test_a_dead_vm_leaks_no_reservation_or_slot(trap_envoy):
    status, _ = send_chat(trap_envoy, {"x-tollgate-test-trap": "1"})
    assert status != 200
    assert "tollgate test trap" in trap_envoy.log()
    died_at = time.monotonic()
    # The dead VM's holdings are still counted: the tenant's one slot is taken.
    in_flight, limit = victim(trap_envoy)
    assert in_flight == 1 and limit["reserved"] > 0, (in_flight, limit)
    assert chat(trap_envoy)[1] == 429
    # They expire within the stated bound (8/7 of the TTL), with no restart.
    bound = TTL_SECONDS * 8 / 7
    deadline = died_at + bound + 5
    while time.monotonic() < deadline:
        in_flight, limit = victim(trap_envoy)
        if in_flight == 0 and limit["reserved"] == 0:
            break
        time.sleep(0.25)
    assert (in_flight, limit["reserved"], limit["used"]) == (0, 0, 0)
    # The tenant is admitted again and charged exactly what it uses.
    rid, status = chat(trap_envoy)
    assert status == 200
    line = trap_envoy.access_line(rid)
    assert line["tenant"] == "victim" and line["decision"] == "admitted"
    in_flight, limit = victim(trap_envoy)
    charged = int(line["input_tokens"]) + int(line["output_tokens"])
    assert (in_flight, limit["reserved"], limit["used"]) == (0, 0, charged)
    # The Prometheus gauge is set from the shared count, so the dead VM's request left it too.
    assert 'tollgate_in_flight{tenant="victim"} 0' in trap_envoy.prometheus().splitlines()
