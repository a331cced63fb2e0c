#!/usr/bin/env python3
"""
Benchmark keychestamp against a loopback nginx ACME-like upstream with hey.

Runs the same hey loads straight to nginx ("direct") and through the proxy
(``hey -x``), alternating the two run by run, and prints medians and the
proxy/direct ratios taken from the same repetition.  See README.rst beside
this file.  Standard library only, except ``cryptography`` (a dependency of
keychestamp) to make the throwaway test CA.  Not run by CI.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")

DEFAULT_PROXY_CMD = (
    "{twistd} -n --pidfile= keychestamp -e {etc} -p {port}"
    " -a 127.0.0.1 --upstream-ca {ca} --intercept {upstream}"
)
DEFAULT_PROXY_ARGS = "-f {audit} --noapi"
DEFAULT_VARIANTS = [
    "file-only=-f {audit} --noapi",
    "poster-up=--api-url {collector_up}",
    "poster-down=--api-url {collector_down}",
]

# Targets from the issue: (load, figure, comparison, limit).
TARGETS = [
    ("ka-get-c20", "rps_ratio", ">=", 0.25),
    ("ka-get-c20", "cpu_us_per_req", "<=", 400.0),
    ("newconn-get-c10", "rps_ratio", ">=", 0.4),
    ("ka-get-c1", "added_p50_ms", "<=", 1.0),
    ("*", "peak_rss_mb", "<=", 60.0),
]


class Load:
    """One hey load: what to request and how many parallel connections."""

    def __init__(self, name: str, title: str, method: str, path: str,
                 conns: int, keepalive: bool, status: int) -> None:
        self.name = name
        self.title = title
        self.method = method
        self.path = path
        self.conns = conns
        self.keepalive = keepalive
        self.status = status


LOADS = [
    Load("ka-get-c20", "keep-alive GET /directory, c=20",
         "GET", "/directory", 20, True, 200),
    Load("ka-post-c20", "keep-alive POST 1.5 KB JWS /acme/new-order, c=20",
         "POST", "/acme/new-order", 20, True, 201),
    Load("newconn-get-c10", "new connection per request GET /directory, c=10",
         "GET", "/directory", 10, False, 200),
    Load("ka-get-c1", "keep-alive GET /directory, c=1 (latency)",
         "GET", "/directory", 1, True, 200),
]
LOADS_BY_NAME = {load.name: load for load in LOADS}


def log(msg: str) -> None:
    """Progress lines go to stderr so stdout holds only the report."""
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class BenchError(Exception):
    """A setup step failed; the message says which and why."""


# --------------------------------------------------------------------------
# processes


def _pdeathsig() -> None:
    """In the child: get SIGKILL if the benchmark itself dies uncleanly."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Processes:
    """Every process the benchmark starts, so all of them are stopped on exit."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: List[subprocess.Popen] = []

    def start(self, name: str, argv: Sequence[str], stdout: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None
              ) -> subprocess.Popen:
        out = open(stdout or os.path.join(self.logdir, name + ".out"), "wb")
        err = open(os.path.join(self.logdir, name + ".err"), "wb")
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=env, cwd=cwd, start_new_session=True, preexec_fn=_pdeathsig)
        finally:
            out.close()
            err.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it after timeout."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("%s did not stop in %.0f s, killing"
                    % (getattr(proc, "bench_name", proc.pid), timeout))
            # Whatever is left in its group (nginx workers, children): kill.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, timeout=10.0)

    def err_tail(self, proc: subprocess.Popen, lines: int = 15) -> str:
        path = os.path.join(self.logdir, getattr(proc, "bench_name", "x") + ".err")
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                data = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(data[-lines:])
        return ""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float,
                   procs: Processes) -> None:
    """Until something accepts on 127.0.0.1:port; fail if proc exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("%s exited with %s before listening on %d:\n%s" % (
                proc.bench_name, proc.returncode, port, procs.err_tail(proc)))
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        time.sleep(0.1)
    raise BenchError("%s not listening on %d after %.0f s:\n%s" % (
        proc.bench_name, port, timeout, procs.err_tail(proc)))


# --------------------------------------------------------------------------
# /proc readings


def _children_map() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> List[int]:
    kids = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, []))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its live descendants, plus their reaped children."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open("/proc/%d/stat" % p) as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def tree_hwm_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of pid plus its descendants, in MB."""
    kb = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        kb += int(line.split()[1])
    return kb / 1024.0


def cpu_times() -> List[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_percent(before: List[int], after: List[int]) -> float:
    delta = [a - b for a, b in zip(after, before)]
    total = sum(delta[:8])  # guest time is already inside user
    return 100.0 * delta[7] / total if total > 0 and len(delta) > 7 else 0.0


def wait_quiet(pid: int, timeout: float, window: float = 0.4,
               threshold: float = 0.011) -> bool:
    """Until the tree's CPU moves by at most `threshold` s over `window` s."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = tree_cpu_seconds(pid)
        if now - last <= threshold:
            return True
        last = now
    return False


# --------------------------------------------------------------------------
# test PKI, request body, nginx


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_pki(directory: str) -> Dict[str, str]:
    """A throwaway CA and a leaf for localhost/127.0.0.1 (EC P-256)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise BenchError("the cryptography package is missing for %s: run with the "
                         "virtualenv that has keychestamp (PYTHON=/path/to/venv/bin/python)"
                         % sys.executable)
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keychestamp bench test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, name) for name in ("ca.pem", "leaf.pem", "leaf.key")}
    pem = serialization.Encoding.PEM
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(paths["leaf.pem"], "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(os.path.join(directory, "leaf.key"), "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(paths["leaf.key"], 0o600)
    return paths


def make_jws(base: str, size: int = 1536) -> bytes:
    """A real ES256-signed flattened JWS new-order request of about `size` bytes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ec.generate_private_key(ec.SECP256R1())
    protected = b64u(json.dumps({
        "alg": "ES256", "kid": base + "/acme/acct/1234567890",
        "nonce": b64u(os.urandom(32)), "url": base + "/acme/new-order",
    }, separators=(",", ":")).encode())
    identifiers: List[Dict[str, str]] = []
    while True:
        identifiers.append({"type": "dns",
                            "value": "www%02d.benchmark-%d.example.org" % (len(identifiers), 7)})
        payload = b64u(json.dumps({"identifiers": identifiers},
                                  separators=(",", ":")).encode())
        r, s = decode_dss_signature(key.sign((protected + "." + payload).encode(),
                                             ec.ECDSA(hashes.SHA256())))
        body = json.dumps({"protected": protected, "payload": payload,
                           "signature": b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))},
                          separators=(",", ":")).encode()
        if len(body) >= size - 40:
            return body


def nginx_conf(prefix: str, port: int, status_port: int, pki: Dict[str, str]) -> str:
    base = "https://localhost:%d" % port
    directory = json.dumps({
        "keyChange": base + "/acme/key-change",
        "meta": {"caaIdentities": ["localhost"],
                 "termsOfService": base + "/terms/v1.pdf",
                 "website": base + "/"},
        "newAccount": base + "/acme/new-acct",
        "newNonce": base + "/acme/new-nonce",
        "newOrder": base + "/acme/new-order",
        "renewalInfo": base + "/acme/renewal-info",
        "revokeCert": base + "/acme/revoke-cert",
    }, indent=2)
    order = json.dumps({
        "status": "pending", "expires": "2030-01-08T00:00:00Z",
        "identifiers": [{"type": "dns", "value": "www%02d.benchmark-7.example.org" % i}
                        for i in range(3)],
        "authorizations": [base + "/acme/authz/1234567890/%d" % (11 + i) for i in range(3)],
        "finalize": base + "/acme/finalize/1234567890/99",
    }, indent=2)
    for text in (directory, order):
        assert "'" not in text and "$" not in text and "\\" not in text
    tmp = os.path.join(prefix, "tmp")
    return """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        add_header Cache-Control "public, max-age=0, no-cache" always;
        location = /directory {{
            default_type application/json;
            return 200 '{directory}';
        }}
        location = /acme/new-nonce {{
            add_header Replay-Nonce $request_id always;
            add_header Cache-Control no-store always;
            add_header Link '<{base}/directory>;rel="index"' always;
            if ($request_method = GET) {{ return 204; }}
            return 200;
        }}
        location = /acme/new-order {{
            default_type application/json;
            add_header Replay-Nonce $request_id always;
            add_header Location {base}/acme/order/1234567890/99 always;
            add_header Link '<{base}/directory>;rel="index"' always;
            return 201 '{order}';
        }}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{status_port};
        location = /status {{ stub_status; }}
    }}
}}
""".format(prefix=prefix, tmp=tmp, port=port, status_port=status_port, base=base,
           cert=pki["leaf.pem"], key=pki["leaf.key"], directory=directory, order=order)


def nginx_status(status_port: int) -> Dict[str, int]:
    """accepts/requests counters from stub_status (they include this query)."""
    url = "http://127.0.0.1:%d/status" % status_port
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    lines = text.splitlines()
    accepts, handled, requests = (int(x) for x in lines[2].split())
    return {"accepts": accepts, "requests": requests}


# --------------------------------------------------------------------------
# collector for the poster variants


def twistd_argv(python: str) -> List[str]:
    """The twistd beside `python` (a venv's bin/), else twistd run through `python`."""
    found = shutil.which(python)
    if found:
        beside = os.path.join(os.path.dirname(found), "twistd")
        if os.access(beside, os.X_OK):
            return [beside]
    return [python, "-c", "import sys; sys.argv[0] = 'twistd'; "
            "from twisted.scripts.twistd import run; run()"]


def serve_collector(port_file: str) -> None:
    """A tiny HTTP/1.1 collector: 200 to every POST, GET /count says how many."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    count = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # head and body leave in two writes: without this, Nagle plus the
            # client's delayed ACK stalls every answer by ~40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            with lock:
                count[0] += 1
            self._answer(b'{"status":"ok"}')

        def do_GET(self) -> None:
            with lock:
                n = count[0]
            self._answer(json.dumps({"count": n}).encode())

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


def collector_count(port: int) -> int:
    with urllib.request.urlopen("http://127.0.0.1:%d/count" % port, timeout=5) as resp:
        return json.loads(resp.read())["count"]


# --------------------------------------------------------------------------
# preflight: one request of each kind, with Python's http.client


def preflight(nginx_port: int, ca: str, body: bytes, proxy_port: Optional[int]) -> None:
    """Fail early, with the status and body, if an exchange does not work."""
    if proxy_port is None:
        ctx = ssl.create_default_context(cafile=ca)
        host, port = "localhost", nginx_port
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        host, port = "127.0.0.1", proxy_port
    where = "direct" if proxy_port is None else "through the proxy on %d" % proxy_port
    conn = http.client.HTTPSConnection(host, port, timeout=15, context=ctx)
    if proxy_port is not None:
        conn.set_tunnel("localhost", nginx_port)
    checks = [
        ("GET", "/directory", None, 200, "newOrder"),
        ("HEAD", "/acme/new-nonce", None, 200, "Replay-Nonce"),
        ("POST", "/acme/new-order", body, 201, "Location"),
    ]
    try:
        for method, path, data, status, needle in checks:
            headers = {"Content-Type": "application/jose+json"} if data else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            ok = resp.status == status and (
                needle.encode() in text or resp.getheader(needle) is not None)
            if not ok:
                raise BenchError("%s %s %s: got %s %s %r" % (
                    where, method, path, resp.status, resp.reason, text[:300]))
    except (OSError, http.client.HTTPException) as e:
        raise BenchError("%s: %s: %s" % (where, type(e).__name__, e))
    finally:
        conn.close()


# --------------------------------------------------------------------------
# hey


HEY_STEP = 0.0001  # hey prints times in seconds with 4 decimals


def percentile(sorted_values: List[float], p: float) -> float:
    """p-th percentile of hey's rounded times, interpolated within the rounding step.

    hey rounds to 0.1 ms, about the whole loopback latency at concurrency 1; taking the
    rank's position among the equal values spreads them evenly over their step.
    """
    n = len(sorted_values)
    if not n:
        return float("nan")
    rank = min(float(n), max(1.0, p / 100.0 * n))
    value = sorted_values[int(math.ceil(rank)) - 1]
    first = bisect.bisect_left(sorted_values, value - HEY_STEP / 10)
    last = bisect.bisect_right(sorted_values, value + HEY_STEP / 10)
    low = max(0.0, value - HEY_STEP / 2)
    high = value + HEY_STEP / 2
    return low + (high - low) * (rank - first) / (last - first)


def parse_hey_csv(path: str) -> Dict[str, object]:
    """Latencies, status codes and new-connection count of one hey -o csv run."""
    lats: List[float] = []
    codes: Dict[str, int] = {}
    new_conns = 0
    span = 0.0
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 8 or not parts[0][:1].isdigit():
                continue
            rt, dial, code, offset = float(parts[0]), float(parts[1]), parts[6], float(parts[7])
            lats.append(rt)
            codes[code] = codes.get(code, 0) + 1
            if dial > 0:  # hey records DNS+dialup only when the connection is new
                new_conns += 1
            span = max(span, offset + rt)
    return {"lats": lats, "codes": codes, "new_conns": new_conns, "span": span}


class Bench:
    """The upstream, the proxies, and one function to run a load once."""

    def __init__(self, args: argparse.Namespace, tmp: str, procs: Processes) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.nginx_port = 0
        self.status_port = 0
        self.pki: Dict[str, str] = {}
        self.body_path = os.path.join(tmp, "new-order.jws")
        self.body = b""
        self.collector_port: Optional[int] = None
        self.collector_down_port: Optional[int] = None

    def start_upstream(self) -> None:
        self.pki = make_pki(self.tmp)
        prefix = os.path.join(self.tmp, "nginx")
        for sub in ("", "tmp", "logs"):
            os.makedirs(os.path.join(prefix, sub), exist_ok=True)
        self.nginx_port, self.status_port = free_port(), free_port()
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(prefix, self.nginx_port, self.status_port, self.pki))
        self.body = make_jws("https://localhost:%d" % self.nginx_port)
        with open(self.body_path, "wb") as f:
            f.write(self.body)
        proc = self.procs.start("nginx", [self.args.nginx, "-p", prefix + "/", "-c", conf,
                                          "-e", os.path.join(prefix, "error.log")])
        wait_listening(self.status_port, proc, 15, self.procs)
        wait_listening(self.nginx_port, proc, 15, self.procs)
        preflight(self.nginx_port, self.pki["ca.pem"], self.body, None)
        log("nginx %d up on https://localhost:%d (stub_status on %d), JWS body %d bytes"
            % (proc.pid, self.nginx_port, self.status_port, len(self.body)))

    def start_collector(self) -> None:
        port_file = os.path.join(self.tmp, "collector.port")
        proc = self.procs.start("collector", [sys.executable, os.path.abspath(__file__),
                                              "--serve-collector", port_file])
        deadline = time.monotonic() + 15
        while not os.path.exists(port_file):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("collector did not start:\n" + self.procs.err_tail(proc))
            time.sleep(0.05)
        with open(port_file) as f:
            self.collector_port = int(f.read())
        self.collector_down_port = free_port()
        log("collector up on %d; nothing listens on %d (collector down)"
            % (self.collector_port, self.collector_down_port))

    def placeholders(self, name: str, port: int) -> Dict[str, str]:
        home = os.path.join(self.tmp, "proxy-" + name)
        values = {
            "python": self.args.python,
            "tmp": self.tmp,
            "etc": os.path.join(home, "etc"),
            "audit": os.path.join(home, "audit.json"),
            "port": str(port),
            "ca": self.pki["ca.pem"],
            "upstream": "localhost:%d" % self.nginx_port,
            "collector_up": "http://127.0.0.1:%s/event" % self.collector_port,
            "collector_down": "http://127.0.0.1:%s/event" % self.collector_down_port,
        }
        os.makedirs(values["etc"], exist_ok=True)
        return values

    def start_proxy(self, name: str, extra: str) -> "Proxy":
        port = free_port()
        values = self.placeholders(name, port)
        template = " ".join(x for x in (self.args.proxy_cmd, extra,
                                        os.environ.get("PROXY_ARGS_EXTRA", "")) if x)
        try:
            argv = []
            for part in shlex.split(template):
                argv += twistd_argv(self.args.python) if part == "{twistd}" else [
                    part.format(**values)]
        except KeyError as e:
            raise BenchError("unknown placeholder %s in proxy command %r" % (e, template))
        log("starting proxy %s: %s" % (name, " ".join(shlex.quote(a) for a in argv)))
        proc = self.procs.start("proxy-" + name, argv, cwd=self.tmp)
        wait_listening(port, proc, self.args.start_timeout, self.procs)
        posts = self.collector_port is not None and any(
            values["collector_up"] in a for a in argv)
        proxy = Proxy(name, proc, port, argv, values["audit"], posts)
        preflight(self.nginx_port, self.pki["ca.pem"], self.body, port)
        log("proxy %s (pid %d) up on 127.0.0.1:%d, preflight ok" % (name, proc.pid, port))
        return proxy

    def hey_argv(self, load: Load, duration: float, proxy: Optional["Proxy"]) -> List[str]:
        argv = [self.args.hey, "-z", "%gs" % duration, "-c", "1", "-cpus", "1",
                "-o", "csv", "-t", "20"]
        if load.method == "POST":
            argv += ["-m", "POST", "-D", self.body_path, "-T", "application/jose+json"]
        if not load.keepalive:
            argv.append("-disable-keepalive")
        if proxy is not None:
            argv += ["-x", "http://127.0.0.1:%d" % proxy.port]
        argv.append("https://localhost:%d%s" % (self.nginx_port, load.path))
        return argv

    def run_hey(self, load: Load, duration: float, proxy: Optional["Proxy"],
                tag: str) -> Dict[str, object]:
        """load.conns hey processes of one connection each, run in parallel."""
        argv = self.hey_argv(load, duration, proxy)
        outs, running = [], []
        for i in range(load.conns):
            out = os.path.join(self.tmp, "hey-%s-%d.csv" % (tag, i))
            outs.append(out)
            running.append(self.procs.start("hey-%s-%d" % (tag, i), argv, stdout=out))
        deadline = time.monotonic() + duration + 30
        failed = []
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed.append("%s timed out" % proc.bench_name)
            if proc.returncode not in (0, None):
                failed.append("%s exit %s: %s" % (proc.bench_name, proc.returncode,
                                                   self.procs.err_tail(proc, 3)))
            self.procs.stop(proc, timeout=2)
            if not failed:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.tmp, proc.bench_name + ".err"))
        lats: List[float] = []
        codes: Dict[str, int] = {}
        new_conns, rps = 0, 0.0
        for out in outs:
            res = parse_hey_csv(out)
            lats.extend(res["lats"])  # type: ignore[arg-type]
            for code, n in res["codes"].items():  # type: ignore[union-attr]
                codes[code] = codes.get(code, 0) + n
            new_conns += res["new_conns"]  # type: ignore[operator]
            if res["span"]:
                rps += len(res["lats"]) / max(res["span"], duration)  # type: ignore
            os.unlink(out)
        lats.sort()
        return {"requests": len(lats), "rps": rps, "codes": codes,
                "p50_ms": percentile(lats, 50) * 1000, "p99_ms": percentile(lats, 99) * 1000,
                "mean_ms": (sum(lats) / len(lats) * 1000) if lats else float("nan"),
                "client_new_conns": new_conns, "hey_failures": failed}

    def measure(self, load: Load, duration: float, proxy: Optional["Proxy"],
                tag: str) -> Dict[str, object]:
        """One run: hey load plus upstream counters, proxy CPU and peak RSS."""
        st0 = nginx_status(self.status_port)
        cpu0 = tree_cpu_seconds(proxy.proc.pid) if proxy else 0.0
        events0 = proxy.event_count(self) if proxy else 0
        stat0 = cpu_times()
        res = self.run_hey(load, duration, proxy, tag)
        stat1 = cpu_times()
        quiet = True
        if proxy is not None:
            quiet = wait_quiet(proxy.proc.pid, self.args.quiet_timeout)
            if proxy.proc.poll() is not None:
                raise BenchError("proxy %s died (exit %s):\n%s" % (
                    proxy.name, proxy.proc.returncode, self.procs.err_tail(proxy.proc)))
            cpu = tree_cpu_seconds(proxy.proc.pid) - cpu0
            res["proxy_cpu_s"] = cpu
            res["cpu_us_per_req"] = (cpu / res["requests"] * 1e6  # type: ignore[operator]
                                     if res["requests"] else float("nan"))
            res["peak_rss_mb"] = tree_hwm_mb(proxy.proc.pid)
            res["proxy_quiet"] = quiet
            res["events"] = proxy.event_count(self) - events0
        else:
            time.sleep(0.2)
        st1 = nginx_status(self.status_port)
        # minus one: the second stub_status query counts itself
        res["upstream_accepts"] = st1["accepts"] - st0["accepts"] - 1
        res["upstream_requests"] = st1["requests"] - st0["requests"] - 1
        res["steal_pct"] = steal_percent(stat0, stat1)
        res["warnings"] = check_run(load, res, proxy)
        return res


class Proxy:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, argv: List[str],
                 audit: str, posts_to_collector: bool) -> None:
        self.posts_to_collector = posts_to_collector
        self.name = name
        self.proc = proc
        self.port = port
        self.argv = argv
        self.audit = audit

    def event_count(self, bench: Bench) -> int:
        """Events so far: audit lines, plus what the collector received if in use."""
        n = 0
        if os.path.exists(self.audit):
            with open(self.audit, "rb") as f:
                n += sum(1 for _ in f)
        if self.posts_to_collector and bench.collector_port:
            n += collector_count(bench.collector_port)
        return n


def check_run(load: Load, res: Dict[str, object], proxy: Optional[Proxy]) -> List[str]:
    """Say what makes a run untrustworthy: errors, broken keep-alive, short counts."""
    warn = []
    bad = {c: n for c, n in res["codes"].items() if c != str(load.status)}  # type: ignore
    if bad:
        warn.append("unexpected status %s" % bad)
    if res["hey_failures"]:
        warn.append("; ".join(res["hey_failures"]))  # type: ignore[arg-type]
    if not res["requests"]:
        warn.append("no requests completed")
    new_conns = res["client_new_conns"]
    if load.keepalive and new_conns > 2 * load.conns:  # type: ignore[operator]
        warn.append("client opened %s connections for %d keep-alive workers"
                    % (new_conns, load.conns))
    if not load.keepalive and new_conns < 0.95 * res["requests"]:  # type: ignore[operator]
        warn.append("only %s new connections for %s requests" % (new_conns, res["requests"]))
    if proxy is None:
        if load.keepalive and res["upstream_accepts"] > 2 * load.conns:  # type: ignore
            warn.append("nginx accepted %s connections for %d keep-alive workers"
                        % (res["upstream_accepts"], load.conns))
    if res["upstream_requests"] < res["requests"]:  # type: ignore[operator]
        warn.append("nginx counted %s requests, hey %s"
                    % (res["upstream_requests"], res["requests"]))
    if proxy is not None and not res.get("proxy_quiet", True):
        warn.append("proxy CPU not quiet within --quiet-timeout after the run")
    return warn


# --------------------------------------------------------------------------
# plans


def fmt(value: object, spec: str = "%.1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec % value


def median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def summarise(runs: List[Dict[str, object]], loads: List[Load], targets: List[str],
              reference: str) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """Medians per (load, target), and ratios to `reference` from the same repetition."""
    out: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for load in loads:
        out[load.name] = {}
        by = {(r["target"], r["rep"]): r for r in runs if r["load"] == load.name}
        reps = sorted({r["rep"] for r in runs if r["load"] == load.name})
        for target in targets:
            mine = [by[(target, rep)] for rep in reps if (target, rep) in by]
            row: Dict[str, Optional[float]] = {}
            for key in ("rps", "p50_ms", "p99_ms", "mean_ms", "cpu_us_per_req",
                        "peak_rss_mb", "upstream_accepts", "client_new_conns", "steal_pct",
                        "events", "requests"):
                row[key] = median([float(r[key]) for r in mine if r.get(key) is not None])
            pairs = [(by[(target, rep)], by[(reference, rep)]) for rep in reps
                     if (target, rep) in by and (reference, rep) in by]
            for key in ("rps", "p50_ms", "p99_ms"):
                row[key + "_ratio"] = median([
                    float(a[key]) / float(b[key]) for a, b in pairs
                    if b[key] and not math.isnan(float(b[key]))])
            row["added_p50_ms"] = median([float(a["p50_ms"]) - float(b["p50_ms"])
                                          for a, b in pairs])
            row["warnings"] = sum(len(r["warnings"]) for r in mine)  # type: ignore
            row["reps"] = len(mine)
            out[load.name][target] = row
    return out


def events_per_request(runs: List[Dict[str, object]], load: str,
                       target: str) -> Optional[float]:
    return median([float(r["events"]) / float(r["requests"]) for r in runs
                   if r["load"] == load and r["target"] == target
                   and r.get("events") is not None and r["requests"]])


def print_table(summary, loads: List[Load], targets: List[str], reference: str,
                out=sys.stdout) -> None:
    head = ("%-16s %-12s %9s %7s %7s %8s %7s %8s %7s %7s %8s %7s %7s %5s"
            % ("load", "target", "req/s", "p50 ms", "p99 ms", "cpu us/r", "rss MB",
               "x req/s", "x p50", "x p99", "+p50 ms", "c-conn", "u-conn", "warn"))
    out.write(head + "\n" + "-" * len(head) + "\n")
    for load in loads:
        for i, target in enumerate(targets):
            row = summary[load.name][target]
            ref = target == reference
            out.write("%-16s %-12s %9s %7s %7s %8s %7s %8s %7s %7s %8s %7s %7s %5s\n" % (
                load.name if i == 0 else "", target,
                fmt(row["rps"], "%.0f"), fmt(row["p50_ms"], "%.2f"), fmt(row["p99_ms"], "%.2f"),
                fmt(row["cpu_us_per_req"], "%.0f"), fmt(row["peak_rss_mb"], "%.1f"),
                "1" if ref else fmt(row["rps_ratio"], "%.3f"),
                "1" if ref else fmt(row["p50_ms_ratio"], "%.2f"),
                "1" if ref else fmt(row["p99_ms_ratio"], "%.2f"),
                "0" if ref else fmt(row["added_p50_ms"], "%+.2f"),
                fmt(row["client_new_conns"], "%.0f"), fmt(row["upstream_accepts"], "%.0f"),
                str(row["warnings"])))
    reps = max(int(summary[load.name][reference]["reps"] or 0) for load in loads)
    out.write("\nmedians of %s repetition(s); x = ratio to %s in the same repetition; "
              "+p50 = added p50 latency;\n"
              "cpu us/r = proxy CPU (utime+stime of its process tree) per request, from the "
              "start of the run until quiet;\n"
              "rss = proxy peak RSS (VmHWM) so far; c-conn = connections hey opened; "
              "u-conn = connections nginx accepted.\n" % (reps, reference))


def check_targets(summary, loads: List[Load], target: str) -> List[Dict[str, object]]:
    names = {load.name for load in loads}
    results = []
    for load_name, key, op, limit in TARGETS:
        if load_name == "*":
            values = [summary[n][target].get(key) for n in names]
            values = [v for v in values if v is not None]
            value = max(values) if values else None
        elif load_name in names:
            value = summary[load_name][target].get(key)
        else:
            continue
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        results.append({"load": load_name, "figure": key, "op": op, "limit": limit,
                        "value": value, "pass": ok})
    return results


def run_plan(bench: Bench, loads: List[Load], targets: Dict[str, Optional[Proxy]],
             reps: int, duration: float) -> List[Dict[str, object]]:
    """Every load for every target, targets rotated each repetition."""
    names = list(targets)
    runs = []
    if bench.args.warmup > 0:
        for name, proxy in targets.items():
            for load in loads:
                log("warm-up %s %s %.1f s" % (load.name, name, bench.args.warmup))
                res = bench.measure(load, bench.args.warmup, proxy, "warmup")
                if res["warnings"]:
                    log("  warm-up warnings: %s" % res["warnings"])
    for rep in range(reps):
        shift = rep % len(names)
        order = names[shift:] + names[:shift]
        for load in loads:
            for name in order:
                res = bench.measure(load, duration, targets[name], "%s-%d" % (name, rep))
                res.update({"load": load.name, "target": name, "rep": rep})
                runs.append(res)
                log("rep %d %-16s %-12s %8.0f req/s p50 %.2f p99 %.2f ms%s%s" % (
                    rep, load.name, name, res["rps"], res["p50_ms"], res["p99_ms"],
                    "  cpu %.0f us/req rss %.1f MB" % (res["cpu_us_per_req"],
                                                     res["peak_rss_mb"])
                    if targets[name] else "",
                    "  WARN: " + " | ".join(res["warnings"]) if res["warnings"] else ""))
    return runs


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="proxy.sh",
        description="Benchmark keychestamp against a loopback nginx upstream with hey "
                    "(direct vs through the proxy, alternated, medians of repetitions).")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (3)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of warm-up per load and target, 0 = none (1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 s x 1 repetition, 0.5 s warm-up")
    p.add_argument("--loads", default=None,
                   help="comma-separated subset of: %s (default all; with --variants "
                        "ka-get-c20)" % ", ".join(LOADS_BY_NAME))
    p.add_argument("--direct-only", action="store_true",
                   help="only the direct runs (no proxy started)")
    p.add_argument("--variants", nargs="*", metavar="NAME=ARGS", default=None,
                   help="compare proxy variants instead of direct vs proxy: each NAME=ARGS "
                        "replaces --proxy-args; ratios are to the first; default: %s"
                        % " ".join(repr(v) for v in DEFAULT_VARIANTS))
    p.add_argument("--python", default=os.environ.get("PYTHON", sys.executable or "python3"),
                   help="python of the venv with keychestamp, {python} in the proxy command "
                        "(default $PYTHON, else this interpreter)")
    p.add_argument("--proxy-cmd", default=os.environ.get("KC_BENCH_PROXY_CMD",
                                                         DEFAULT_PROXY_CMD),
                   help="proxy command template (default $KC_BENCH_PROXY_CMD, else %r); "
                        "placeholders {twistd} (the twistd beside --python; a whole argument) "
                        "{python} {port} {etc} {audit} {ca} {upstream} {tmp} "
                        "{collector_up} {collector_down}" % DEFAULT_PROXY_CMD)
    p.add_argument("--proxy-args", default=os.environ.get("KC_BENCH_PROXY_ARGS",
                                                          DEFAULT_PROXY_ARGS),
                   help="logging arguments appended to the proxy command (default %r); "
                        "$PROXY_ARGS_EXTRA is appended after them" % DEFAULT_PROXY_ARGS)
    p.add_argument("--start-timeout", type=float, default=60.0,
                   help="seconds to wait for the proxy to listen (60)")
    p.add_argument("--quiet-timeout", type=float, default=15.0,
                   help="seconds to wait for the proxy's CPU to settle after a run (15)")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--hey", default=shutil.which("hey") or "/usr/bin/hey")
    p.add_argument("--json", metavar="PATH", help="also write a JSON summary here")
    p.add_argument("--check", action="store_true",
                   help="exit 3 if a target is missed or a run has warnings")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument("--serve-collector", metavar="PORTFILE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.reps, args.warmup = 3.0, 1, 0.5
    if args.loads is None:
        args.loads = ("ka-get-c20" if args.variants is not None
                      else ",".join(l.name for l in LOADS))
    unknown = [n for n in args.loads.split(",") if n not in LOADS_BY_NAME]
    if unknown:
        p.error("unknown load(s) %s; choose from %s" % (unknown, ", ".join(LOADS_BY_NAME)))
    if args.reps < 1 or args.duration <= 0:
        p.error("--reps must be >= 1 and --duration > 0")
    return args


def environment(args: argparse.Namespace) -> Dict[str, object]:
    def version(argv: List[str]) -> str:
        with contextlib.suppress(Exception):
            r = subprocess.run(argv, capture_output=True, timeout=10)
            return (r.stdout + r.stderr).decode(errors="replace").splitlines()[0]
        return "?"
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "nginx": version([args.nginx, "-v"]),
            "hey": version(["dpkg-query", "-W", "-f", "${Version}", "hey"]),
            "python": args.python, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    if args.serve_collector:
        serve_collector(args.serve_collector)
        return 0
    for tool in (args.nginx, args.hey):
        if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
            log("%s not found: apt-get install nginx-light hey" % tool)
            return 2

    def on_signal(signum: int, frame: object) -> None:
        log("signal %d: stopping every process started" % signum)
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)

    tmp = tempfile.mkdtemp(prefix="kc-bench-")
    procs = Processes(tmp)
    bench = Bench(args, tmp, procs)
    loads = [LOADS_BY_NAME[n] for n in args.loads.split(",")]
    try:
        bench.start_upstream()
        variants = (args.variants or DEFAULT_VARIANTS) if args.variants is not None else []
        templates = variants + [args.proxy_cmd, args.proxy_args,
                                os.environ.get("PROXY_ARGS_EXTRA", "")]
        if not args.direct_only and any("{collector" in t for t in templates):
            bench.start_collector()
        if args.variants is not None:
            targets: Dict[str, Optional[Proxy]] = {}
            for spec in variants:
                name, _, extra = spec.partition("=")
                if not name or name in targets or not name.replace("-", "").isalnum():
                    raise BenchError("bad variant %r: want NAME=ARGS with a unique NAME" % spec)
                targets[name] = bench.start_proxy(name, extra)
            reference = next(iter(targets))
        else:
            targets = {"direct": None}
            if not args.direct_only:
                targets["proxy"] = bench.start_proxy("proxy", args.proxy_args)
            reference = "direct"
        runs = run_plan(bench, loads, targets, args.reps, args.duration)
        summary = summarise(runs, loads, list(targets), reference)
        out = sys.stdout
        out.write("\nkeychestamp benchmark: %d repetition(s) x %g s per run, %d CPUs, "
                  "upstream nginx https://localhost:%d\n"
                  % (args.reps, args.duration, os.cpu_count() or 0, bench.nginx_port))
        for n, p in targets.items():
            out.write("  %-12s %s\n" % (n, " ".join(shlex.quote(a) for a in p.argv)
                                         if p else "hey straight to nginx"))
        out.write("\n")
        print_table(summary, loads, list(targets), reference)
        proxied = [n for n, p in targets.items() if p]
        if proxied:
            out.write("events logged per request (audit lines + collector POSTs), median: %s\n"
                      % ", ".join("%s %s" % (n, " ".join(
                          "%s=%s" % (l.name, fmt(events_per_request(runs, l.name, n), "%.2f"))
                          for l in loads)) for n in proxied))
        checks: List[Dict[str, object]] = []
        if args.variants is None and "proxy" in targets:
            checks = check_targets(summary, loads, "proxy")
            sys.stdout.write("\ntargets (proxy):\n")
            for c in checks:
                sys.stdout.write("  %-4s %-16s %-15s %s %-6g (got %s)\n" % (
                    "PASS" if c["pass"] else "FAIL", c["load"], c["figure"], c["op"],
                    c["limit"], fmt(c["value"], "%.3f")))
        warned = [r for r in runs if r["warnings"]]
        if warned:
            sys.stdout.write("\nwarnings (such runs are suspect):\n")
            for r in warned:
                sys.stdout.write("  rep %s %s %s: %s\n" % (r["rep"], r["load"], r["target"],
                                                          " | ".join(r["warnings"])))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment(args),
                           "config": {"duration": args.duration, "reps": args.reps,
                                      "warmup": args.warmup, "loads": [l.name for l in loads],
                                      "targets": {n: (p.argv if p else None)
                                                  for n, p in targets.items()},
                                      "reference": reference,
                                      "jws_bytes": len(bench.body)},
                           "summary": summary, "targets_check": checks, "runs": runs},
                          f, indent=2, default=str)
            log("JSON summary written to %s" % args.json)
        if args.check and (warned or not all(c["pass"] for c in checks)):
            return 3
        return 0
    except BenchError as e:
        log("error: %s" % e)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # cleanup is bounded; let it finish
        procs.stop_all()
        if args.keep_tmp:
            log("temp dir kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
