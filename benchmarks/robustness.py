#!/usr/bin/env python3
"""
Robustness under hostile clients and a misbehaving upstream (issue 6).

Starts a loopback HTTPS upstream (a child process of this script) and the
proxy (``python -m keychestamp``), then for ``--duration`` seconds runs, all at
once: slow-header clients, idle connections, a large body streamed up and
down, clients of a dripping upstream and connection churn, while one normal
client keeps making requests (a new connection, CONNECT, TLS and
GET /directory each time). Prints the normal client's success rate and
latency (alone first, then under the load), the proxy's peak RSS, CPU time
and file descriptors before, during and after.

Loopback only; every socket has a timeout; every child is stopped on exit.
Standard library only, plus ``cryptography`` (a keychestamp dependency) for
the throwaway upstream CA. Not run by CI. See README.rst beside this file.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import http.server
import ipaddress
import os
import random
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BLOCK = b"x" * 65536
DIRECTORY = (
    b'{"newNonce": "https://localhost/acme/new-nonce", "newAccount": "https://localhost/acme/new-acct",'
    b' "newOrder": "https://localhost/acme/new-order", "revokeCert": "https://localhost/acme/revoke-cert",'
    b' "keyChange": "https://localhost/acme/key-change", "meta": {"termsOfService": "https://localhost/tos"}}'
)


# -- the upstream (a child process: python robustness.py --upstream DIR) --------------


class UpstreamHandler(http.server.BaseHTTPRequestHandler):
    """
    GET /directory, POST /upload (body discarded), GET /big/N (N bytes as
    fast as they go), GET /drip/N (one byte every half second).
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/directory":
            self._head(200, len(DIRECTORY), "application/json")
            self.wfile.write(DIRECTORY)
        elif self.path.startswith("/big/"):
            size = int(self.path[5:])
            self._head(200, size, "application/octet-stream")
            while size > 0:
                chunk = BLOCK[: min(size, len(BLOCK))]
                self.wfile.write(chunk)
                size -= len(chunk)
        elif self.path.startswith("/drip/"):
            size = int(self.path[6:])
            self._head(200, size, "application/octet-stream")
            self.wfile.flush()
            for _ in range(size):
                time.sleep(0.5)
                self.wfile.write(b"d")
                self.wfile.flush()
        else:
            self._head(404, 0, "text/plain")

    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length", "0"))
        while left > 0:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                return
            left -= len(data)
        self._head(204, None, None)

    def _head(self, status: int, length: Optional[int], contentType: Optional[str]) -> None:
        self.send_response(status)
        if contentType:
            self.send_header("Content-Type", contentType)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()


def serveUpstream(directory: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), UpstreamHandler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(directory, "upstream.pem"), os.path.join(directory, "upstream.key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def makeCA(directory: str) -> None:
    """
    A throwaway CA (ca.pem) and a certificate for localhost (upstream.pem/.key).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "robustness upstream CA")])
    ca = (
        x509.CertificateBuilder().subject_name(caName).issuer_name(caName).public_key(caKey.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(caName).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    for name, data in (
        ("ca.pem", ca.public_bytes(pem)),
        ("upstream.pem", cert.public_bytes(pem)),
        ("upstream.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    ):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


# -- measuring the proxy -------------------------------------------------------------


def procStatus(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets(pid: int, proxyPort: int, upstreamPort: int) -> Dict[str, int]:
    """
    The process's TCP sockets by kind: clients (on the proxy's port),
    upstream (to the upstream's port), other (listener, tunnels).
    """
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    kinds = {"clients": 0, "upstream": 0, "other": 0}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[9] not in inodes:
                        continue
                    local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                    if remote == upstreamPort:
                        kinds["upstream"] += 1
                    elif local == proxyPort and remote:
                        kinds["clients"] += 1
                    else:
                        kinds["other"] += 1
        except OSError:
            pass
    return kinds


# -- the loads -----------------------------------------------------------------------


class Run:
    """
    What every load thread shares: where to connect, when to stop, counters.
    """

    def __init__(self, proxyPort: int, upstreamPort: int, proxyRoot: str) -> None:
        self.proxyPort = proxyPort
        self.upstreamPort = upstreamPort
        self.context = ssl.create_default_context(cafile=proxyRoot)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Dict[str, float] = {}

    def add(self, name: str, n: float = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def connection(self, timeout: float = 10) -> http.client.HTTPSConnection:
        c = http.client.HTTPSConnection("127.0.0.1", self.proxyPort, context=self.context, timeout=timeout)
        c.set_tunnel("localhost", self.upstreamPort)
        return c

    def raw(self, timeout: float = 5) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.proxyPort), timeout=timeout)


def normalClient(run: Run, until: threading.Event, latencies: List[Optional[float]]) -> None:
    """
    A new connection, CONNECT, TLS and GET /directory, again and again.
    """
    while not until.is_set():
        started = time.monotonic()
        try:
            c = run.connection()
            c.request("GET", "/directory")
            r = c.getresponse()
            body = r.read()
            c.close()
            ok = r.status == 200 and body == DIRECTORY
        except (OSError, http.client.HTTPException):
            ok = False
        latencies.append(time.monotonic() - started if ok else None)
        until.wait(0.02)


def slowHeaders(run: Run, n: int) -> None:
    """
    n clients sending their head a byte every two seconds; reconnect when cut.
    """
    head = b"GET http://amp.keychest.net/ HTTP/1.1\r\nHost: amp.keychest.net\r\nX-Slow: " + b"a" * 10000
    selector = selectors.DefaultSelector()
    sent: Dict[socket.socket, int] = {}

    def open_() -> None:
        try:
            s = run.raw()
        except OSError:
            run.add("slow-header connect failures")
            return
        s.setblocking(False)
        sent[s] = 0
        selector.register(s, selectors.EVENT_READ)

    for _ in range(n):
        open_()
    nextDrip = time.monotonic()
    while not run.stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data:
                selector.unregister(s)
                s.close()  # type: ignore[union-attr]
                del sent[s]  # type: ignore[arg-type]
                run.add("slow-header clients cut")
                open_()
        if time.monotonic() >= nextDrip:
            nextDrip += 2
            for s in list(sent):
                try:
                    s.send(head[sent[s] : sent[s] + 1])
                    sent[s] += 1
                except OSError:
                    pass
    for s in sent:
        s.close()


def idleConnections(run: Run, n: int) -> None:
    """
    n connections that never send a byte; reconnect when cut.
    """
    selector = selectors.DefaultSelector()
    for _ in range(n):
        try:
            s = run.raw()
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        except OSError:
            run.add("idle connect failures")
    while not run.stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            s = key.fileobj
            selector.unregister(s)
            s.close()  # type: ignore[union-attr]
            run.add("idle connections cut")
            try:
                s = run.raw()
                s.setblocking(False)
                selector.register(s, selectors.EVENT_READ)
            except OSError:
                run.add("idle connect failures")
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]


def bigBodies(run: Run, size: int) -> None:
    """
    Upload size bytes, then download as many, through one intercepted stream.
    """
    while not run.stop.is_set():
        try:
            c = run.connection(timeout=30)
            c.putrequest("POST", "/upload")
            c.putheader("Content-Length", str(size))
            c.endheaders()
            left = size
            while left > 0 and not run.stop.is_set():
                c.send(BLOCK[: min(left, len(BLOCK))])
                left -= min(left, len(BLOCK))
            if left:
                c.close()
                return
            r = c.getresponse()
            r.read()
            run.add("bytes up", size)
            c.request("GET", f"/big/{size}")
            r = c.getresponse()
            while not run.stop.is_set():
                data = r.read(1 << 16)
                if not data:
                    break
                run.add("bytes down", len(data))
            c.close()
        except (OSError, http.client.HTTPException):
            run.add("big body errors")


def drips(run: Run) -> None:
    """
    A response from an upstream that sends a byte every half second.
    """
    while not run.stop.is_set():
        try:
            c = run.connection(timeout=30)
            c.request("GET", "/drip/20")
            r = c.getresponse()
            body = r.read()
            c.close()
            run.add("drip responses" if len(body) == 20 else "drip errors")
        except (OSError, http.client.HTTPException):
            run.add("drip errors")


def churn(run: Run) -> None:
    """
    Connections opened and dropped every which way.
    """
    hello = bytes.fromhex("16030100") + b"\x40"
    while not run.stop.is_set():
        action = random.randrange(5)
        try:
            s = run.raw(timeout=5)
            if action == 1:
                s.sendall(b"\x00\x01garbage\r\n\r\n")
                s.recv(1024)
            elif action == 2:
                s.sendall(hello)
            elif action == 3:
                s.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: x\r\n\r\n" % run.upstreamPort)
                s.recv(1024)
            elif action == 4:
                s.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: x\r\n\r\n" % run.upstreamPort)
                s.recv(1024)
                t = run.context.wrap_socket(s, server_hostname="localhost")
                s = t
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            run.add("churned connections")
        except (OSError, ssl.SSLError):
            run.add("churn errors")


# -- the run -------------------------------------------------------------------------


def summary(latencies: List[Optional[float]]) -> str:
    ok = sorted(x for x in latencies if x is not None)
    if not latencies:
        return "no requests"
    rate = 100.0 * len(ok) / len(latencies)
    if not ok:
        return f"{len(latencies)} requests, 0 succeeded"

    def pct(p: float) -> float:
        return ok[min(len(ok) - 1, int(p * len(ok)))] * 1000

    return (
        f"{len(latencies)} requests, {rate:.1f} % succeeded; latency ms: p50 {pct(0.5):.1f}, "
        f"p90 {pct(0.9):.1f}, p99 {pct(0.99):.1f}, max {ok[-1] * 1000:.1f}"
    )


def waitListening(port: int, child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"the proxy is not listening on {port}; see its log")


def stopChild(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--baseline", type=float, default=5, help="seconds of the normal client alone (default 5)")
    parser.add_argument("--slow", type=int, default=200, help="slow-header clients (default 200)")
    parser.add_argument("--idle", type=int, default=300, help="idle connections (default 300)")
    parser.add_argument("--drips", type=int, default=20, help="clients of the dripping upstream (default 20)")
    parser.add_argument("--churners", type=int, default=2, help="connection-churn threads (default 2)")
    parser.add_argument("--body-mb", type=int, default=256, help="size of the streamed body in MiB (default 256)")
    parser.add_argument("--proxy-args", default="", help="extra proxy arguments")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the work directory (logs, audit file)")
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.upstream:
        serveUpstream(options.upstream)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    tmp = tempfile.mkdtemp(prefix="kc-robust-")
    makeCA(tmp)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    children: List[subprocess.Popen] = []
    try:
        upstream = subprocess.Popen([sys.executable, __file__, "--upstream", tmp], stdout=subprocess.PIPE, env=env,
                                    start_new_session=True)
        children.append(upstream)
        upstreamPort = int(upstream.stdout.readline())  # type: ignore[union-attr]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            proxyPort = s.getsockname()[1]
        log = open(os.path.join(tmp, "proxy.log"), "wb")
        proxy = subprocess.Popen(
            [sys.executable, "-m", "keychestamp", "-e", os.path.join(tmp, "etc"), "-n",
             "-f", os.path.join(tmp, "audit.json"), "-a", "127.0.0.1", "-p", str(proxyPort),
             "--upstream-ca", os.path.join(tmp, "ca.pem"), "--intercept", "localhost", "-l", "ERROR",
             *options.proxy_args.split()],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        children.append(proxy)
        waitListening(proxyPort, proxy, 30)
        run = Run(proxyPort, upstreamPort, os.path.join(tmp, "etc", "ca", "root.crt"))
        pid = proxy.pid
        print(f"proxy pid {pid} on 127.0.0.1:{proxyPort}, upstream on {upstreamPort}, work dir {tmp}", file=sys.stderr)

        alone: List[Optional[float]] = []
        done = threading.Event()
        t = threading.Thread(target=normalClient, args=(run, done, alone), daemon=True)
        t.start()
        time.sleep(options.baseline)
        done.set()
        t.join(15)
        fdsBefore, rssBefore, cpuBefore = fds(pid), procStatus(pid, "VmRSS"), cpuSeconds(pid)

        loaded: List[Optional[float]] = []
        threads = [threading.Thread(target=normalClient, args=(run, run.stop, loaded), daemon=True),
                   threading.Thread(target=slowHeaders, args=(run, options.slow), daemon=True),
                   threading.Thread(target=idleConnections, args=(run, options.idle), daemon=True),
                   threading.Thread(target=bigBodies, args=(run, options.body_mb << 20), daemon=True)]
        threads += [threading.Thread(target=drips, args=(run,), daemon=True) for _ in range(options.drips)]
        threads += [threading.Thread(target=churn, args=(run,), daemon=True) for _ in range(options.churners)]
        for t in threads:
            t.start()
        peakFds = 0
        deadline = time.monotonic() + options.duration
        while time.monotonic() < deadline:
            if proxy.poll() is not None:
                raise SystemExit("the proxy died; see " + log.name)
            peakFds = max(peakFds, fds(pid))
            time.sleep(0.5)
        run.stop.set()
        for t in threads:
            t.join(35)
        time.sleep(3)  # the proxy notices the closed sockets
        fdsAfter, peakRSS, rssAfter = fds(pid), procStatus(pid, "VmHWM"), procStatus(pid, "VmRSS")
        kinds = sockets(pid, proxyPort, upstreamPort)
        cpu = cpuSeconds(pid) - cpuBefore

        print(f"keychestamp robustness run: {options.duration:g} s of load on loopback")
        print(f"  normal client alone:      {summary(alone)}")
        print(f"  normal client under load: {summary(loaded)}")
        print(f"  load: {options.slow} slow-header clients, {options.idle} idle connections, "
              f"{options.body_mb} MiB up and down repeatedly, {options.drips} drip clients, "
              f"{options.churners} churn threads")
        for name in sorted(run.counts):
            value = run.counts[name]
            shown = f"{value / 2**20:.0f} MiB" if name.startswith("bytes") else f"{value:.0f}"
            print(f"    {name}: {shown}")
        print(f"  proxy RSS: {rssBefore / 1024:.1f} MiB before, peak {peakRSS / 1024:.1f} MiB, "
              f"{rssAfter / 1024:.1f} MiB after")
        print(f"  proxy CPU during the load: {cpu:.1f} s")
        print(f"  proxy file descriptors: {fdsBefore} before, peak {peakFds}, {fdsAfter} after "
              f"(sockets after: {kinds['clients']} client, {kinds['upstream']} pooled upstream, {kinds['other']} other)")
        print(f"  proxy still running: {proxy.poll() is None}")
    finally:
        for child in reversed(children):
            stopChild(child)
        if not options.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
