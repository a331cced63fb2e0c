"""
Test support: a throwaway CA for upstream servers, a real twisted.web HTTPS
upstream on loopback, and a proxy built with makeService on an ephemeral port.

Nothing here weakens the product: the upstream is trusted through
--upstream-ca exactly as an operator would trust Pebble or step-ca.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor as globalReactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from keychestamp.exchange import Exchange, IExchangeObserver, ProxyFailure
from keychestamp.options import Options


class TestCA:
    """
    A CA for the test upstream (what Pebble or a private CA would be).
    """

    def __init__(self, name: str = "keychestamp test upstream CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, names: Sequence[str]) -> Tuple[bytes, bytes]:
        """
        (certificate PEM, key PEM) for a server with these DNS names / IPs.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        sans: List[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        keyPEM = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), keyPEM

    def writePEM(self, directory: str) -> str:
        path = os.path.join(directory, "upstream-ca.pem")
        with open(path, "wb") as f:
            f.write(self.pem)
        return path


class Recorder(Resource):
    """
    The test upstream: records what reached it and answers per path.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Dict[str, Any]] = []
        self.hang: List[Deferred] = []

    def render(self, request):  # type: ignore[no-untyped-def]
        body = request.content.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.uri,
                "headers": list(request.requestHeaders.getAllRawHeaders()),
                "body": body,
            }
        )
        path = request.path
        if path == b"/hang":
            d: Deferred = Deferred()
            self.hang.append(d)
            return NOT_DONE_YET
        if path == b"/directory":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"replay-nonce", b"nonce-1")
            request.responseHeaders.addRawHeader(b"link", b'<https://x/a>;rel="one"')
            request.responseHeaders.addRawHeader(b"link", b'<https://x/b>;rel="two"')
            return b'{"newNonce": "https://localhost/acme/new-nonce"}'
        if path == b"/echo":
            request.setHeader(b"content-type", b"application/octet-stream")
            return body
        if path == b"/created":
            request.setResponseCode(201)
            request.setHeader(b"location", b"https://localhost/acme/order/1")
            return b'{"status": "pending"}'
        if path == b"/nonce":
            request.setHeader(b"replay-nonce", b"nonce-2")
            request.setHeader(b"cache-control", b"no-store")
            if request.method == b"GET":
                request.setResponseCode(204)
            return b""
        if path == b"/gzip":
            import gzip

            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", b"application/json")
            return gzip.compress(b'{"zipped": true}')
        request.setResponseCode(404)
        return b"no such thing"


@implementer(IExchangeObserver)
class CollectingObserver:
    """
    Keeps every exchange and failure; waiters fire when one arrives.
    """

    def __init__(self) -> None:
        self.exchanges: List[Exchange] = []
        self.failures: List[ProxyFailure] = []
        self._waiters: List[Deferred] = []

    def exchangeCompleted(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)
        self._wake()

    def proxyFailed(self, failure: ProxyFailure) -> None:
        self.failures.append(failure)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def next(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d


def parseOptions(args: Sequence[str], environ: Optional[Dict[str, str]] = None) -> Options:
    options = Options(environ=environ if environ is not None else {})
    options.parseOptions(list(args))
    return options


class ProxyFixture:
    """
    An upstream (twisted.web over TLS from TestCA, on 127.0.0.1) and a proxy
    (makeService on 127.0.0.1:0) in this process; stop() tears both down.
    """

    def __init__(self, testCase: Any, extraArgs: Sequence[str] = (), intercept: bool = True) -> None:
        self.testCase = testCase
        self.tmp = tempfile.mkdtemp(prefix="kc-proxy-")
        testCase.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = TestCA()
        self.caFile = self.ca.writePEM(self.tmp)
        self.resource = Recorder()
        self.observer = CollectingObserver()
        self.extraArgs = list(extraArgs)
        self.intercept = intercept

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        certPEM, keyPEM = self.ca.issue(["localhost", "127.0.0.1"])
        options = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM).options()
        self.upstreamPort = globalReactor.listenSSL(0, Site(self.resource), options, interface="127.0.0.1")
        self.testCase.addCleanup(self.upstreamPort.stopListening)
        self.port = self.upstreamPort.getHost().port
        from keychestamp.service import makeService

        args = ["-e", os.path.join(self.tmp, "etc"), "-f", os.path.join(self.tmp, "audit.json"), "-n",
                "--upstream-ca", self.caFile, "-l", "DEBUG"]
        if self.intercept:
            args += ["--intercept", f"localhost:{self.port}", "--intercept", f"127.0.0.1:{self.port}"]
        args += self.extraArgs
        self.options = parseOptions(args)
        self.service = makeService(
            self.options,
            globalReactor,
            extraObservers=[self.observer],
            endpoint=TCP4ServerEndpoint(globalReactor, 0, interface="127.0.0.1"),
        )
        self.service.options = self.options
        yield self.service.startService()
        self.testCase.addCleanup(self.service.stopService)
        self.testCase.addCleanup(self.waitIdle)
        self.proxyPort = self.service.listeningPort.getHost().port
        self.rootPEM = self.options["authority"].rootPEM
        self.rootFile = os.path.join(self.tmp, "proxy-root.pem")
        with open(self.rootFile, "wb") as f:
            f.write(self.rootPEM)
        return self

    @inlineCallbacks
    def waitIdle(self, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        """
        Wait (bounded) until the proxy has no client connection left, so a
        test ends with a clean reactor.
        """
        deadline = globalReactor.seconds() + timeout
        while self.service.factory.connections and globalReactor.seconds() < deadline:
            yield deferLater(globalReactor, 0.01, lambda: None)
