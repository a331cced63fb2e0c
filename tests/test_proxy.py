"""
The proxy against a real twisted.web HTTPS upstream on loopback, driven by
real clients (curl, Python's http.client, urllib3) as subprocesses.
"""

from __future__ import annotations

import gzip
import re
import json
import os
import shutil
import sys
from typing import Dict, Optional, Sequence

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site
from zope.interface import implementer

from keychestamp.exchange import STAGE_CLIENT_TLS, STAGE_UPSTREAM_TIMEOUT, STAGE_UPSTREAM_TLS
from tests.support import ProxyFixture, Recorder, TestCA

CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "LANG": "C.UTF-8"}


def run(executable: str, args: Sequence[str], env: Optional[Dict[str, str]] = None) -> Deferred:
    return getProcessOutputAndValue(executable, list(args), env=env or CLEAN_ENV)


def curl(*args: str) -> Deferred:
    if not shutil.which("curl"):
        raise SkipTest("curl is not installed")
    return run(shutil.which("curl"), ["-sS", "--max-time", "20", "--suppress-connect-headers", *args])  # type: ignore[arg-type]


class RawClient(Protocol):
    """
    Sends bytes, collects everything until the connection closes.
    """

    def __init__(self, payload: bytes, closeAfterSend: bool = False) -> None:
        self.payload = payload
        self.closeAfterSend = closeAfterSend
        self.received = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        if self.closeAfterSend:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.received)


def raw(port: int, payload: bytes, closeAfterSend: bool = False) -> Deferred:
    client = RawClient(payload, closeAfterSend)
    d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    d.addCallback(lambda _: client.done)
    d.addTimeout(20, reactor)
    return d


_INTERCEPTED_CLIENT = """
import socket, ssl, sys
proxyPort, target, cafile, request = int(sys.argv[1]), sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
s = socket.create_connection(("127.0.0.1", proxyPort), timeout=20)
s.sendall(b"CONNECT " + target.encode() + b" HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
head = b""
while not head.endswith(b"\\r\\n\\r\\n"):
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
t = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname=target.rsplit(":", 1)[0])
t.sendall(request)
data = b""
while True:
    chunk = t.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.buffer.write(data)
"""


def intercepted(proxyPort: int, target: str, cafile: str, request: bytes) -> Deferred:
    """
    Python's ssl client: CONNECT target, TLS trusting cafile, send request
    bytes as they are, read to the end; fires with (out, err, code).
    """
    return run(sys.executable, ["-c", _INTERCEPTED_CLIENT, str(proxyPort), target, cafile, request.hex()])


class InterceptTests(TestCase):
    """
    CONNECT to an intercepted host: our leaf, then HTTP/1.1 relayed upstream.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.fx = yield ProxyFixture(self).start()

    def proxyURL(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.fx.proxyPort}"

    def upstreamURL(self, path: str) -> str:
        return f"https://localhost:{self.fx.port}{path}"

    @inlineCallbacks
    def test_curlConnect(self):
        """
        curl -x http:// gets the upstream's answer with every end-to-end
        header, repeated Link headers included, and the observer the exchange.
        """
        out, err, code = yield curl(
            "-i", "--cacert", self.fx.rootFile, "-x", self.proxyURL(), self.upstreamURL("/directory")
        )
        self.assertEqual(code, 0, err)
        head, body = out.split(b"\r\n\r\n", 1)
        self.assertIn(b"200 OK", head)
        self.assertEqual(body, b'{"newNonce": "https://localhost/acme/new-nonce"}')
        self.assertIn(b"Replay-Nonce: nonce-1", head)
        self.assertIn(b'Link: <https://x/a>;rel="one"', head)
        self.assertIn(b'Link: <https://x/b>;rel="two"', head)
        (exchange,) = self.fx.observer.exchanges
        self.assertEqual(exchange.method, "GET")
        self.assertEqual(exchange.url, self.upstreamURL("/directory"))
        self.assertEqual(exchange.status, 200)
        self.assertEqual(exchange.client, "127.0.0.1")
        self.assertIn(("Link", '<https://x/b>;rel="two"'), exchange.responseHeaders)
        self.assertEqual(json.loads(exchange.responseBody), {"newNonce": "https://localhost/acme/new-nonce"})

    @inlineCallbacks
    def test_curlHTTPSProxy(self):
        """
        curl --proxy https:// speaks TLS to the proxy, then TLS inside it.
        """
        out, err, code = yield curl(
            "--cacert", self.fx.rootFile, "--proxy-cacert", self.fx.rootFile,
            "-x", self.proxyURL("https"), self.upstreamURL("/directory"),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b'{"newNonce": "https://localhost/acme/new-nonce"}')
        self.assertEqual(len(self.fx.observer.exchanges), 1)

    @inlineCallbacks
    def test_postBodyAndHeaders(self):
        """
        A POST body reaches the upstream unchanged; hop-by-hop headers and the
        headers named in Connection do not; no X-Forwarded-For is added.
        """
        body = b'{"protected":"x","payload":"y","signature":"z"}' * 30
        out, err, code = yield curl(
            "--cacert", self.fx.rootFile, "-x", self.proxyURL(),
            "-H", "Content-Type: application/jose+json", "-H", "Connection: X-Secret",
            "-H", "X-Secret: 1", "-H", "Proxy-Connection: keep-alive", "-H", "Keep-Alive: timeout=5",
            "--data-binary", body, self.upstreamURL("/echo"),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, body)
        (seen,) = self.fx.resource.requests
        names = {n.lower() for n, _ in seen["headers"]}
        self.assertEqual(seen["body"], body)
        self.assertIn(b"content-type", names)
        for hop in (b"x-secret", b"proxy-connection", b"keep-alive", b"x-forwarded-for", b"forwarded", b"via"):
            self.assertNotIn(hop, names)
        self.assertEqual(self.fx.observer.exchanges[0].requestBody, body)

    @inlineCallbacks
    def test_chunkedRequest(self):
        """
        A chunked request body is decoded and relayed whole.
        """
        body = b"x" * 100000
        out, err, code = yield curl(
            "--cacert", self.fx.rootFile, "-x", self.proxyURL(),
            "-H", "Transfer-Encoding: chunked", "--data-binary", body, self.upstreamURL("/echo"),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out), len(body))
        self.assertEqual(self.fx.resource.requests[0]["body"], body)

    @inlineCallbacks
    def test_headAndNoContent(self):
        """
        HEAD and a 204 answer relay their headers and no body.
        """
        out, err, code = yield curl(
            "-I", "--cacert", self.fx.rootFile, "-x", self.proxyURL(), self.upstreamURL("/nonce")
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"Replay-Nonce: nonce-2", out)
        out, err, code = yield curl(
            "-i", "--cacert", self.fx.rootFile, "-x", self.proxyURL(), self.upstreamURL("/nonce")
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"204", out.split(b"\r\n", 1)[0])
        self.assertEqual([e.method for e in self.fx.observer.exchanges], ["HEAD", "GET"])

    @inlineCallbacks
    def test_gzipAsSent(self):
        """
        A gzip response reaches the client as sent; the observer sees it decoded.
        """
        out, err, code = yield curl(
            "--cacert", self.fx.rootFile, "-x", self.proxyURL(), "-H", "Accept-Encoding: gzip",
            self.upstreamURL("/gzip"),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(gzip.decompress(out), b'{"zipped": true}')
        self.assertEqual(self.fx.observer.exchanges[0].responseBody, b'{"zipped": true}')

    @inlineCallbacks
    def test_keepAliveAndPipelining(self):
        """
        Several requests on one intercepted connection, sent at once, come back
        in order.
        """
        out, err, code = yield intercepted(
            self.fx.proxyPort, f"localhost:{self.fx.port}", self.fx.rootFile,
            b"GET /directory HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /nonce HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /missing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(code, 0, err)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
        self.assertEqual(statuses, [b"200", b"204", b"404"])
        self.assertEqual([e.path for e in self.fx.observer.exchanges], ["/directory", "/nonce", "/missing"])

    @inlineCallbacks
    def test_httpClientConnect(self):
        """
        Python's http.client through CONNECT (set_tunnel), the way requests and
        certbot use it.
        """
        script = f"""
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile={self.fx.rootFile!r})
ctx.verify_flags |= ssl.VERIFY_X509_STRICT
c = http.client.HTTPSConnection("127.0.0.1", {self.fx.proxyPort}, context=ctx, timeout=20)
c.set_tunnel("localhost", {self.fx.port})
c.request("POST", "/created", body=b"{{}}", headers={{"Content-Type": "application/jose+json"}})
r = c.getresponse()
sys.stdout.write("%d %s %s" % (r.status, r.getheader("Location"), r.read().decode()))
"""
        out, err, code = yield run(sys.executable, ["-c", script])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b'201 https://localhost/acme/order/1 {"status": "pending"}')

    @inlineCallbacks
    def test_urllib3HTTPSProxy(self):
        """
        urllib3 with an https:// proxy: TLS to the proxy, TLS inside it.
        """
        script = f"""
import sys, urllib3
pool = urllib3.ProxyManager("https://127.0.0.1:{self.fx.proxyPort}", ca_certs={self.fx.rootFile!r},
                            proxy_ssl_context=None, timeout=20)
r = pool.request("GET", "https://localhost:{self.fx.port}/directory", retries=False)
sys.stdout.write("%d %s" % (r.status, r.data.decode()))
"""
        out, err, code = yield run(sys.executable, ["-c", script])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b'200 {"newNonce": "https://localhost/acme/new-nonce"}')

    @inlineCallbacks
    def test_rootCertificate(self):
        """
        http://amp.keychest.net/ (plain, and https after CONNECT) is the root
        PEM, answered by the proxy itself; /bundle.pem adds the system roots.
        """
        out, err, code = yield curl("-i", "-x", self.proxyURL(), "http://amp.keychest.net/")
        self.assertEqual(code, 0, err)
        head, body = out.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Type: application/x-x509-ca-cert", head)
        self.assertEqual(body, self.fx.rootPEM)
        out, err, code = yield curl("--cacert", self.fx.rootFile, "-x", self.proxyURL(), "https://amp.keychest.net/")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, self.fx.rootPEM)
        out, err, code = yield curl("-x", self.proxyURL(), "http://amp.keychest.net/bundle.pem")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(self.fx.rootPEM))
        self.assertGreater(out.count(b"BEGIN CERTIFICATE"), 2)
        self.assertEqual(self.fx.resource.requests, [])

    @inlineCallbacks
    def test_clientDistrustsCA(self):
        """
        A client that does not trust our CA aborts the handshake: it fails, and
        the observer gets a client-tls proxy failure.
        """
        out, err, code = yield curl("-x", self.proxyURL(), self.upstreamURL("/directory"))
        self.assertNotEqual(code, 0)
        for _ in range(50):
            if self.fx.observer.failures:
                break
            yield self.fx.observer.next().addTimeout(5, reactor)
        (failure,) = self.fx.observer.failures
        self.assertEqual(failure.stage, STAGE_CLIENT_TLS)
        self.assertEqual(failure.server, f"localhost:{self.fx.port}")
        self.assertEqual(self.fx.resource.requests, [])

    @inlineCallbacks
    def test_garbage(self):
        """
        Garbage on the listening port gets 400 and a close; the proxy keeps
        serving others.
        """
        answer = yield raw(self.fx.proxyPort, b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        answer = yield raw(self.fx.proxyPort, b"GET http://amp.keychest.net/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"BEGIN CERTIFICATE", answer)

    @inlineCallbacks
    def test_clientClosesMidRequest(self):
        """
        A client that goes away in the middle of a request body does not
        harm the proxy or reach the upstream with a partial request.
        """
        head = (
            b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial"
        )
        answer = yield raw(self.fx.proxyPort, head, closeAfterSend=True)
        self.assertEqual(answer, b"")
        out, err, code = yield curl("--cacert", self.fx.rootFile, "-x", self.proxyURL(), self.upstreamURL("/directory"))
        self.assertEqual(code, 0, err)

    @inlineCallbacks
    def test_absoluteFormHTTP(self):
        """
        GET http://host/path (absolute form) is relayed to a plain HTTP upstream.
        """
        resource = Recorder()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        plain = port.getHost().port
        fx = yield ProxyFixture(self, ["--connect-port", str(plain)]).start()
        out, err, code = yield curl("-x", f"http://127.0.0.1:{fx.proxyPort}", f"http://127.0.0.1:{plain}/directory")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b'{"newNonce": "https://localhost/acme/new-nonce"}')
        self.assertEqual(resource.requests[0]["path"], b"/directory")
        self.assertEqual(fx.observer.exchanges[0].scheme, "http")

    @inlineCallbacks
    def test_absoluteFormPolicy(self):
        """
        Absolute-form requests obey the CONNECT rules: a port that is neither
        80 nor --connect-port (here a loopback service) is refused with 403 and
        nothing reaches it; so is the proxy's own port.
        """
        resource = Recorder()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for target in (f"http://127.0.0.1:{port.getHost().port}/x", f"http://127.0.0.1:{self.fx.proxyPort}/x"):
            out, err, code = yield curl("-i", "-x", self.proxyURL(), target)
            self.assertEqual(code, 0, err)
            self.assertTrue(out.startswith(b"HTTP/1.1 403 "), out)
        self.assertEqual(resource.requests, [])

    @inlineCallbacks
    def test_plainHTTPInsideTLS(self):
        """
        An http:// absolute URL inside an intercepted TLS stream is refused
        (400), never sent upstream unencrypted.
        """
        out, err, code = yield intercepted(
            self.fx.proxyPort, f"localhost:{self.fx.port}", self.fx.rootFile,
            b"GET http://localhost:%d/directory HTTP/1.1\r\nHost: localhost\r\n\r\n" % self.fx.port,
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertEqual(self.fx.resource.requests, [])

    @inlineCallbacks
    def test_localAnswersOnePerConnection(self):
        """
        The proxy's own answers close the connection: 300 pipelined bundle
        requests get one answer, not 300 (no pile of unread answers, no deep
        recursion); HEAD gets headers only, even for a 404.
        """
        pipelined = b"GET http://amp.keychest.net/bundle.pem HTTP/1.1\r\nHost: x\r\n\r\n" * 300
        answer = yield raw(self.fx.proxyPort, pipelined)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 1)
        answer = yield raw(self.fx.proxyPort, b"HEAD http://amp.keychest.net/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\n"), answer)


class FailureTests(TestCase):
    """
    Upstream failures answer the client properly and reach the observer.
    """

    timeout = 60

    @inlineCallbacks
    def test_untrustedUpstream(self):
        """
        An upstream whose certificate we cannot verify gets nothing: 502.
        """
        fx = yield ProxyFixture(self).start()
        other = TestCA("some other CA")
        certPEM, keyPEM = other.issue(["localhost", "127.0.0.1"])
        resource = Recorder()
        port = reactor.listenSSL(
            0, Site(resource), ssl.PrivateCertificate.loadPEM(certPEM + keyPEM).options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        fx2 = yield ProxyFixture(self, ["--intercept", f"localhost:{port.getHost().port}"]).start()
        out, err, code = yield curl(
            "-i", "--cacert", fx2.rootFile, "-x", f"http://127.0.0.1:{fx2.proxyPort}",
            f"https://localhost:{port.getHost().port}/directory",
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 502 "), out)
        self.assertEqual(resource.requests, [])
        self.assertEqual([f.stage for f in fx2.observer.failures], [STAGE_UPSTREAM_TLS])
        del fx

    @inlineCallbacks
    def test_upstreamNeverAnswers(self):
        """
        An upstream that never answers gets the client a 504 after
        --response-timeout.
        """
        fx = yield ProxyFixture(self, ["--response-timeout", "1"]).start()
        out, err, code = yield curl(
            "-i", "--cacert", fx.rootFile, "-x", f"http://127.0.0.1:{fx.proxyPort}",
            f"https://localhost:{fx.port}/hang",
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 504 "), out)
        self.assertEqual([f.stage for f in fx.observer.failures], [STAGE_UPSTREAM_TIMEOUT])
        for d in fx.resource.hang:
            d.callback(None)

    @inlineCallbacks
    def test_upstreamRefused(self):
        """
        A closed upstream port gets 502.
        """
        fx = yield ProxyFixture(self, ["--intercept", "127.0.0.1:1"]).start()
        out, err, code = yield curl(
            "-i", "-x", f"http://127.0.0.1:{fx.proxyPort}", "--cacert", fx.rootFile, "https://127.0.0.1:1/"
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 502 "), out)

    @inlineCallbacks
    def test_clientNotAllowed(self):
        """
        A client outside --allow gets 403 and nothing is relayed.
        """
        fx = yield ProxyFixture(self, ["--allow", "10.0.0.0/8"]).start()
        out, err, code = yield curl(
            "-i", "-x", f"http://127.0.0.1:{fx.proxyPort}", "http://amp.keychest.net/"
        )
        self.assertIn(b"403", out.split(b"\r\n", 1)[0] if out else b"" + err)
        self.assertNotIn(b"BEGIN CERTIFICATE", out)


class TunnelTests(TestCase):
    """
    Hosts not intercepted are tunnelled untouched.
    """

    timeout = 60

    @inlineCallbacks
    def test_notIntercepted(self):
        """
        The client sees the upstream's own certificate through a tunnel.
        """
        fx = ProxyFixture(self, intercept=False)
        fx.extraArgs = ["--connect-port", "0"] if False else []
        yield fx.start()
        # allow the tunnel port: rebuild with --connect-port now that we know it
        yield fx.service.stopService()
        fx2 = yield ProxyFixture(self, ["--connect-port", str(fx.port)], intercept=False).start()
        out, err, code = yield curl(
            "--cacert", fx.caFile, "-x", f"http://127.0.0.1:{fx2.proxyPort}",
            f"https://localhost:{fx.port}/directory",
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b'{"newNonce": "https://localhost/acme/new-nonce"}')
        self.assertEqual(fx2.observer.exchanges, [])

    @inlineCallbacks
    def test_portNotAllowed(self):
        """
        A tunnel to a port neither 443 nor --connect-port is refused (403).
        """
        fx = yield ProxyFixture(self, intercept=False).start()
        answer = yield raw(fx.proxyPort, f"CONNECT localhost:{fx.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)


@implementer(IHalfCloseableProtocol)
class _EchoUntilEOF(Protocol):
    """
    A plain TCP upstream: echoes, and on the client's EOF (half-close) writes
    a last line and closes its side.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"|saw EOF")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class TunnelHalfCloseTests(TestCase):
    """
    Half-close crosses a tunnel in both directions.
    """

    timeout = 60

    @inlineCallbacks
    def test_halfClose(self):
        """
        The client shuts down its sending side after a request; the upstream
        sees EOF, still answers, and the client reads that answer to the end.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(_EchoUntilEOF), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        upstreamPort = port.getHost().port
        fx = yield ProxyFixture(self, ["--connect-port", str(upstreamPort)], intercept=False).start()
        script = f"""
import socket, sys
s = socket.create_connection(("127.0.0.1", {fx.proxyPort}), timeout=20)
s.sendall(b"CONNECT 127.0.0.1:{upstreamPort} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
head = b""
while not head.endswith(b"\\r\\n\\r\\n"):
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
s.sendall(b"hello")
rest = b""
while b"echo:hello" not in rest:
    rest += s.recv(100)
s.shutdown(socket.SHUT_WR)
while True:
    chunk = s.recv(100)
    if not chunk:
        break
    rest += chunk
sys.stdout.write(rest.decode())
"""
        out, err, code = yield run(sys.executable, ["-c", script])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"echo:hello|saw EOF")


class IPv6Tests(TestCase):
    """
    -a ::1 listens on IPv6 loopback.
    """

    timeout = 60

    @inlineCallbacks
    def test_ipv6Listener(self):
        """
        A proxy on ::1 serves curl -x http://[::1]:port.
        """
        fx = ProxyFixture(self)
        from keychestamp.service import makeService
        from tests.support import parseOptions

        options = parseOptions(["-e", os.path.join(fx.tmp, "etc"), "-a", "::1", "-f", os.path.join(fx.tmp, "a.json"), "-n"])
        try:
            service = makeService(options, reactor, endpoint=TCP6ServerEndpoint(reactor, 0, interface="::1"))
            yield service.startService()
        except Exception as e:
            raise SkipTest(f"no IPv6 loopback here: {e}")
        self.addCleanup(service.stopService)
        port = service.listeningPort.getHost().port
        out, err, code = yield curl("-x", f"http://[::1]:{port}", "http://amp.keychest.net/")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, options["authority"].rootPEM)

    @inlineCallbacks
    def test_dualStackDefault(self):
        """
        Without -a the proxy listens on all interfaces, IPv4 and IPv6 alike
        (one socket on :: with IPv4 mapped).
        """
        import socket as _socket

        probe = _socket.socket(_socket.AF_INET6)
        try:
            probe.bind(("::", 0))
        except OSError as e:
            raise SkipTest(f"no IPv6 here: {e}")
        port = probe.getsockname()[1]
        probe.close()
        fx = ProxyFixture(self)
        from keychestamp.service import makeService
        from tests.support import parseOptions

        options = parseOptions(["-e", os.path.join(fx.tmp, "etc"), "-p", str(port), "-f", os.path.join(fx.tmp, "a.json"), "-n"])
        service = makeService(options, reactor)
        yield service.startService()
        self.addCleanup(service.stopService)
        for proxy in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            out, err, code = yield curl("-x", proxy, "http://amp.keychest.net/")
            self.assertEqual(code, 0, err)
            self.assertEqual(out, options["authority"].rootPEM)


class TunnelPauseTests(TestCase):
    """
    A tunnel reads nothing more from its client until its upstream is
    connected, so early bytes wait in the socket, not in memory.
    """

    def test_pausedUntilConnected(self):
        """
        start() pauses the client; upstreamConnected() writes the early bytes
        upstream and resumes it.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from keychestamp.proxy.server import Timeouts
        from keychestamp.proxy.tunnel import Tunnel, TunnelUpstream

        calls = []

        class Handler:
            _client = ("127.0.0.1", 1)
            transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))

            def pauseReading(self, why):
                calls.append(("pause", why))

            def resumeReading(self, why):
                calls.append(("resume", why))

        class Context:
            reactor = MemoryReactorClock()
            timeouts = Timeouts(tunnel=0)

        handler = Handler()
        tunnel = Tunnel(Context(), handler, "example.net", 443, b"early")
        tunnel.start()
        self.assertEqual(calls, [("pause", "tunnel")])
        upstream = TunnelUpstream(tunnel)
        upstream.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 443)))
        self.assertEqual(calls, [("pause", "tunnel"), ("resume", "tunnel")])
        self.assertEqual(upstream.transport.value(), b"early")
        self.assertTrue(handler.transport.value().startswith(b"HTTP/1.1 200 "))
