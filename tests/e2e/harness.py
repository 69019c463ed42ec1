"""Processes for the e2e suite: the fake LLM upstream and the real Envoy with the built .wasm.

Everything binds 127.0.0.1 on free ports and is stopped by PID.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
import render  # noqa: E402

ENVOY = os.path.join(ROOT, ".venv/bin/envoy")
WASM = os.path.join(ROOT, "target/wasm32-wasip1/release/tollgate.wasm")
FAKE = os.path.join(ROOT, "tests/fake_upstream.py")
RLS = os.path.join(ROOT, "target/rls/debug/tollgate-test-rls")
LIMITS = os.path.join(ROOT, "target/debug/tollgate-limits")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=30):
    """A plain request; returns (status, headers dict (lower-case), body bytes)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


class LedgerLine(dict):
    """One ledger line: a fact the record does not have reads as None (absent facts are
    absent from the line)."""

    def __missing__(self, key):
        return None


_LEDGER_SCHEMA = []


def ledger_line(text):
    """An access-log line, parsed and validated against envoy/ledger.schema.json."""
    import jsonschema
    if not _LEDGER_SCHEMA:
        with open(os.path.join(ROOT, "envoy", "ledger.schema.json"), encoding="utf-8") as f:
            _LEDGER_SCHEMA.append(jsonschema.Draft202012Validator(json.load(f)))
    line = json.loads(text)
    errors = sorted(_LEDGER_SCHEMA[0].iter_errors(line), key=str)
    assert not errors, f"ledger line {text!r} does not match envoy/ledger.schema.json: {errors[0].message}"
    return LedgerLine(line)


class FakeUpstream:
    """tests/fake_upstream.py; `args`: more command-line flags (e.g. ["--sigv4", "AK:SK:REGION"])."""

    def __init__(self, name="upstream", args=()):
        self.name = name
        fd, self.port_file = tempfile.mkstemp(prefix="fake-port-")
        os.close(fd)
        os.unlink(self.port_file)
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, "--port", "0", "--name", name, "--port-file", self.port_file,
             *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 15
        while time.time() < deadline:
            if os.path.exists(self.port_file) and open(self.port_file).read().strip():
                self.port = int(open(self.port_file).read().strip())
                break
            if self.proc.poll() is not None:
                raise RuntimeError("fake upstream exited")
            time.sleep(0.05)
        else:
            raise RuntimeError("fake upstream did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def ledger(self):
        return json.loads(http("GET", self.url + "/ledger")[2])

    def entry(self, request_id, timeout=5.0):
        deadline = time.time() + timeout
        query = "/ledger?id=" + urllib.parse.quote(request_id)
        while time.time() < deadline:
            for e in json.loads(http("GET", self.url + query)[2]):
                if e["id"] == request_id:
                    return e
            time.sleep(0.05)
        raise AssertionError(f"no ledger entry {request_id}")

    def reset(self):
        http("DELETE", self.url + "/ledger")

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if os.path.exists(self.port_file):
            os.unlink(self.port_file)


class Envoy:
    """The real Envoy 1.40 running a rendered config from envoy/, with the shipped flags
    (render.ENVOY_FLAGS) unless `flags` replaces them."""

    def __init__(self, plugin_config, upstream_port, template="tollgate.yaml", concurrency=2,
                 extra=None, expect_failure=False, flags=None):
        self.dir = tempfile.mkdtemp(prefix="tollgate-envoy-")
        self.port = free_port()
        self.admin_port = free_port()
        self.access_log = os.path.join(self.dir, "access.log")
        open(self.access_log, "w").close()
        values = {
            "ADMIN_PORT": str(self.admin_port),
            "LISTEN_PORT": str(self.port),
            "UPSTREAM_PORT": str(upstream_port),
            "ACCESS_LOG": self.access_log,
            "WASM_PATH": WASM,
            "PLUGIN_CONFIG": json.dumps(
                plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
            ),
        }
        values.update(extra or {})
        # A caller may pin the ports (the demo prefers 10000/9901).
        self.port, self.admin_port = int(values["LISTEN_PORT"]), int(values["ADMIN_PORT"])
        with open(os.path.join(ROOT, "envoy", template), encoding="utf-8") as f:
            text = render.render(f.read(), values)
        self.config_path = os.path.join(self.dir, "envoy.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text)
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", self.config_path, "--concurrency", str(concurrency),
             "--disable-hot-restart", "--log-level", "info", *(flags or render.ENVOY_FLAGS)],
            stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        if expect_failure:
            return
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("envoy exited:\n" + self.log()[-4000:])
            try:
                if http("GET", self.admin + "/ready", timeout=1)[2].strip() == b"LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("envoy did not become ready:\n" + self.log()[-4000:])

    def wait_exit(self, timeout=60):
        return self.proc.wait(timeout=timeout)

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def access_lines(self):
        """The complete lines of the access log. Envoy flushes its buffer when it fills, which
        can end the file inside a line: a last line without its newline is still being written.
        Each is checked against the ledger's schema (envoy/ledger.schema.json)."""
        with open(self.access_log, encoding="utf-8") as f:
            return [ledger_line(line) for line in f if line.strip() and line.endswith("\n")]

    def access_line(self, request_id, timeout=5.0):
        """The access-log line of the request sent with `x-request-id: request_id`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.access_lines():
                if line.get("client_request_id") == request_id:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no access log line for {request_id}")

    def stats(self, filter_regex=""):
        """Admin /stats as {name: value} (counters and gauges)."""
        body = http("GET", self.admin + "/stats?filter=" + filter_regex)[2].decode()
        out = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def prometheus(self):
        return http("GET", self.admin + "/stats/prometheus")[2].decode()

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def _stop(proc, timeout=5):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class Redis:
    """Debian's redis-server 7.0 on a free port, nothing persisted."""

    def __init__(self):
        self.start(free_port())

    def start(self, port):
        self.port = port
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                if self.command("PING") == "+PONG":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def command(self, *args):
        """One command over RESP; the reply's first line (or, for a bulk string, its value)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(str(a))}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"$") and not data.startswith(b"$-1"):
                size = int(data[1:data.index(b"\r\n")])
                while len(data) < data.index(b"\r\n") + 2 + size:
                    data += sock.recv(65536)
                start = data.index(b"\r\n") + 2
                return data[start:start + size].decode()
            if data.startswith(b"*"):
                while not data.endswith(b"\r\n"):
                    data += sock.recv(65536)
                return data.decode()
            return data.split(b"\r\n")[0].decode()

    def counters(self):
        """{key: value} of every integer counter Limitador keeps."""
        out = {}
        listing = self.command("KEYS", "*")
        for line in listing.split("\r\n"):
            if line and not line.startswith(("*", "$")):
                value = self.command("GET", line)
                if value.lstrip("-").isdigit():
                    out[line] = int(value)
        return out

    def stop(self):
        _stop(self.proc)


class RateLimitService:
    """The test rate limit service (tests/rls) over Redis, serving the limits `tollgate-limits`
    writes for `plugin_config`: `engine="limitador"` answers as limitador-server (limitador 0.14,
    `tollgate-limits limitador`), `engine="ratelimit"` as envoyproxy/ratelimit's Redis cache
    (`tollgate-limits ratelimit`). `headers`: the engine's rate-limit headers (default: on for
    Limitador, DRAFT_VERSION_03; off for ratelimit, as its LIMIT_RESPONSE_HEADERS_ENABLED).
    Every answered call is observed in `grants_log` (see `grants()`); neither real server has it
    and it changes no answer."""

    def __init__(self, plugin_config, redis, headers=None, engine="limitador", faults=()):
        if engine not in ("limitador", "ratelimit"):
            raise ValueError(f"unknown engine {engine}")
        self.dir = tempfile.mkdtemp(prefix="tollgate-rls-")
        config_path = os.path.join(self.dir, "plugin.json")
        with open(config_path, "w") as f:
            json.dump(plugin_config, f)
        name = "limits.yaml" if engine == "limitador" else "ratelimit-config.yaml"
        self.limits = os.path.join(self.dir, name)
        with open(self.limits, "w") as f:
            f.write(subprocess.check_output([LIMITS, engine, config_path], text=True))
        self.grants_log = os.path.join(self.dir, "grants.log")
        self.engine = engine
        self.redis = redis
        self.headers = (engine == "limitador") if headers is None else headers
        # The server's fault options (`--delay-file FILE`, `--claim-remaining N`): see tests/rls.
        self.faults = [str(a) for a in faults]
        self.port = None
        self.start()

    def start(self):
        port_file = os.path.join(self.dir, "port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        args = [RLS, "--engine", self.engine, "--redis", self.redis.url, "--port-file", port_file,
                "--grants-log", self.grants_log]
        if self.engine == "limitador":
            args += ["--limits", self.limits]
            if self.headers:
                args += ["--rate-limit-headers", "DRAFT_VERSION_03"]
        else:
            args += ["--config", self.limits]
            if self.headers:
                args += ["--response-headers"]
        if self.port is not None:
            args += ["--port", str(self.port)]
        args += self.faults
        self.log = open(os.path.join(self.dir, "rls.log"), "a")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if os.path.exists(port_file) and open(port_file).read().strip():
                port = int(open(port_file).read().strip())
                if self.port is None:
                    self.port = port
                elif port != self.port:
                    # Restarted: it must come back where Envoy's cluster points.
                    raise RuntimeError("the rate limit service came back on another port")
                return
            if self.proc.poll() is not None:
                raise RuntimeError("the rate limit service exited:\n" + open(self.log.name).read())
            time.sleep(0.05)
        raise RuntimeError("the rate limit service did not start")

    def grants(self):
        """Every counted descriptor of every answered call, in order: dicts of `code` (`OK` or
        `OVER_LIMIT`), `hits`, `after` (the counter after the increase; None for Limitador,
        which does not say) and `key` (ratelimit: its Redis key; Limitador: domain:entries)."""
        out = []
        if not os.path.exists(self.grants_log):
            return out
        with open(self.grants_log, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue
                code, hits, after, key = line.rstrip("\n").split("\t", 3)
                out.append({"code": code, "hits": int(hits),
                            "after": None if after == "-" else int(after), "key": key})
        return out

    def stop(self):
        _stop(self.proc)
        self.log.close()


def raw_post(port, path, headers, body):
    """POST over a raw socket (`connection: close`) and return the response head and the body
    bytes exactly as sent (chunked transfer decoded by hand), for byte-level comparisons.
    `headers`: a dict, or a list of (name, value) pairs to send one name twice."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    pairs = headers.items() if isinstance(headers, dict) else headers
    lines = "".join(f"{k}: {v}\r\n" for k, v in pairs)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\n{lines}content-length: {len(payload)}\r\n"
                 f"connection: close\r\n\r\n".encode() + payload)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return head.decode(), rest
    out = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return head.decode(), out
