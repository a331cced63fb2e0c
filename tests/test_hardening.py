# -*- test-case-name: tests.test_hardening -*-
"""
Hardening (issue 6): strict parsing on every surface with nothing forwarded,
limits, streaming with backpressure, upstream faults against misbehaving
upstreams on loopback, the CONNECT policy and the CA key check; against a
real proxy (tests.support.ProxyFixture) and, where a socket adds nothing,
against an HTTPHandler with Twisted's doubles.

The helpers here (a layered TLS/CONNECT client, scripted upstreams, a fake
Agent) are shared with tests.test_timeouts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProtocolNegotiationFactory, IPushProducer
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport, StringTransportWithDisconnection
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Site
from zope.interface import implementer

from keychestamp.ca import CertificateAuthority
from keychestamp.exchange import (
    OBSERVED_BODY_LIMIT,
    STAGE_UPSTREAM_CONNECT,
    STAGE_UPSTREAM_RESPONSE,
    STAGE_UPSTREAM_TIMEOUT,
    STAGE_UPSTREAM_TLS,
)
from keychestamp.proxy.http import HTTPHandler
from keychestamp.proxy.http11 import Limits
from keychestamp.proxy.policy import INTERCEPT, LOCAL, TUNNEL, ClientACL, ConnectPolicy
from keychestamp.proxy.relay import StrictClientFactory
from keychestamp.proxy.server import ProxyContext, ProxyFactory, Timeouts
from tests.support import CollectingObserver, ProxyFixture, Recorder
from tests.test_http11 import CONNECT_REJECTED, REJECTED, fill

WAIT = 10.0  # seconds: the bound on every wait in these tests


# -- waiting ---------------------------------------------------------------


@inlineCallbacks
def waitUntil(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition"):  # type: ignore[no-untyped-def]
    """
    Poll until C{predicate()} is true; fail after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield deferLater(reactor, 0.005, lambda: None)


def settle(seconds: float) -> Deferred:
    """
    Let the reactor run for a while (to show something does NOT happen).
    """
    return deferLater(reactor, seconds, lambda: None)


# -- a client that layers TLS and CONNECT as real proxy clients do --------------


class _One(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class _Socket(Protocol):
    """
    The TCP end: passes bytes up to the outermost layer above it.
    """

    def __init__(self, up: Protocol) -> None:
        self.up = up

    def connectionMade(self) -> None:
        self.up.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.up.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.up.connectionLost(reason)


class LayeredClient(Protocol):
    """
    Runs C{steps} over one connection: ("tls", name) puts a TLS layer that
    trusts C{root} on the stream, ("connect", b"host:port") sends a CONNECT
    and waits for its 200; then sends C{payload} and collects what comes back
    (or hands it to C{onData}) until the connection closes.
    """

    def __init__(self, steps: Sequence[Tuple[str, Any]], payload: bytes, root: Optional[bytes]) -> None:
        self.steps = list(steps)
        self.payload = payload
        self._root = Certificate.loadPEM(root) if root else None
        self.socket = _Socket(self)
        self._below: Any = self.socket
        self._connectHead: Optional[bytes] = None
        self.connectAnswer = b""
        self.received = b""
        self.count = 0
        self.onData: Optional[Callable[[bytes], None]] = None
        self.ready: Deferred = Deferred()
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self._advance()

    def _advance(self) -> None:
        while self.steps:
            kind, arg = self.steps.pop(0)
            if kind == "tls":
                creator = optionsForClientTLS(arg, trustRoot=self._root)
                tls = TLSMemoryBIOFactory(creator, True, _One(self)).buildProtocol(None)
                if self._below is self.socket:
                    self.socket.up = tls
                else:
                    self._below.wrappedProtocol = tls
                self._below = tls
                tls.makeConnection(self.transport)  # calls our connectionMade again
                return
            if kind == "connect":
                self._connectHead = b""
                self.transport.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (arg, arg))
                return
        if self.payload:
            self.transport.write(self.payload)
        if not self.ready.called:
            self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self._connectHead is not None:
            self._connectHead += data
            end = self._connectHead.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = self._connectHead[: end + 4], self._connectHead[end + 4 :]
            self._connectHead = None
            self.connectAnswer = head
            if not head.startswith(b"HTTP/1.1 200 "):
                self.steps = []
                self.received = head + rest
                return
            self._advance()
            return
        self.count += len(data)
        if self.onData is not None:
            self.onData(data)
        else:
            self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(self.received)


def openClient(port: int, steps: Sequence[Tuple[str, Any]] = (), payload: bytes = b"",
               root: Optional[bytes] = None) -> Tuple[LayeredClient, Deferred]:
    """
    A LayeredClient connecting to 127.0.0.1:port; the Deferred fires with its
    bytes when the connection closes (bounded).
    """
    client = LayeredClient(steps, payload, root)
    d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client.socket)
    d.addCallback(lambda _: client.done)
    d.addTimeout(WAIT, reactor)
    return client, d


def talk(port: int, steps: Sequence[Tuple[str, Any]] = (), payload: bytes = b"",
         root: Optional[bytes] = None) -> Deferred:
    return openClient(port, steps, payload, root)[1]


def intercepted(host: bytes) -> List[Tuple[str, Any]]:
    """
    The steps of a CONNECT to an intercepted host: CONNECT, then TLS.
    """
    return [("connect", host), ("tls", host.rsplit(b":", 1)[0].decode())]


TLS_TO_PROXY = [("tls", "127.0.0.1")]


def status(answer: bytes) -> int:
    """
    The status code of the first response in C{answer} (0 if none).
    """
    if not answer.startswith(b"HTTP/1.1 "):
        return 0
    return int(answer[9:12])


# -- scripted upstreams on loopback ---------------------------------------------


class Scripted(Protocol):
    """
    An upstream that reads a request head and then runs C{script(self)};
    C{received} keeps every byte the proxy sent.
    """

    def __init__(self, server: "ScriptedUpstream") -> None:
        self.server = server
        self.received = b""
        self.ran = False

    def connectionMade(self) -> None:
        self.server.connections.append(self)
        self.lost = False
        if self.server.onConnect is not None:
            self.server.onConnect(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.ran and self.server.onFirstBytes:
            self.ran = True
            self.server.script(self)  # type: ignore[misc]
        if not self.ran and b"\r\n\r\n" in self.received:
            self.ran = True
            self.server.heads.append(self.received.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
            if self.server.script is not None:
                self.server.script(self)


@implementer(IProtocolNegotiationFactory)
class _ScriptedFactory(Factory):
    """
    Offers http/1.1 over ALPN (Twisted's server TLS fails a handshake whose
    client offers ALPN when the factory names no protocol).
    """

    noisy = False

    def __init__(self, server: "ScriptedUpstream") -> None:
        self._server = server

    def buildProtocol(self, addr: object) -> Protocol:
        return Scripted(self._server)

    def acceptableProtocols(self) -> List[bytes]:
        return [b"http/1.1"]


class ScriptedUpstream:
    """
    A TLS (or plain TCP) server on 127.0.0.1 that runs a script per request:
    a misbehaving upstream.
    """

    def __init__(self, testCase: TestCase, fx: Optional[ProxyFixture], script: Optional[Callable[[Scripted], None]],
                 tls: bool = True, onConnect: Optional[Callable[[Scripted], None]] = None,
                 onFirstBytes: bool = False, certificate: Optional[Tuple[bytes, bytes]] = None) -> None:
        self.script = script
        self.onFirstBytes = onFirstBytes
        self.onConnect = onConnect
        self.connections: List[Scripted] = []
        self.heads: List[bytes] = []
        factory = _ScriptedFactory(self)
        if tls:
            assert fx is not None
            certPEM, keyPEM = certificate or fx.ca.issue(["localhost", "127.0.0.1"])
            options = PrivateCertificate.loadPEM(certPEM + keyPEM).options()
            self.listening = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        else:
            self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        testCase.addCleanup(self.close)
        self.port = self.listening.getHost().port

    def close(self) -> Deferred:
        for c in self.connections:
            if not c.lost:
                c.transport.abortConnection()
        return self.listening.stopListening()


def writes(data: bytes, then: str = "keep") -> Callable[[Scripted], None]:
    """
    A script: write C{data}, then keep the connection, close it, or reset it.
    """

    def script(p: Scripted) -> None:
        p.transport.write(data)
        if then == "close":
            p.transport.loseConnection()
        elif then == "reset":
            reactor.callLater(0.05, p.transport.abortConnection)

    return script


@inlineCallbacks
def startProxy(testCase: TestCase, args: Sequence[str] = (), intercept: bool = True):  # type: ignore[no-untyped-def]
    """
    A ProxyFixture that also intercepts localhost on every port (for the
    scripted upstreams) and answers plain HTTP on a loopback Recorder.
    """
    recorder = Recorder()
    plain = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    testCase.addCleanup(plain.stopListening)
    plainPort = plain.getHost().port
    fx = ProxyFixture(
        testCase, ["--intercept", "localhost", "--connect-port", str(plainPort), *args], intercept=intercept
    )
    yield fx.start()
    fx.plain = recorder
    fx.plainPort = plainPort
    return fx


def normalRequest(fx: ProxyFixture) -> Deferred:
    """
    GET /directory from the fixture's upstream, the way a client would.
    """
    return talk(
        fx.proxyPort, intercepted(b"localhost:%d" % fx.port),
        b"GET /directory HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", fx.rootPEM,
    )


def assertServed(testCase: TestCase, answer: bytes) -> None:
    testCase.assertEqual(status(answer), 200, answer[:200])
    testCase.assertTrue(answer.endswith(b'{"newNonce": "https://localhost/acme/new-nonce"}'), answer[-200:])


# -- doubles for HTTPHandler unit tests --------------------------------------------


class FakeRequest:
    def __init__(self, method: bytes, uri: bytes, headers: Headers, bodyProducer: Any, d: Deferred) -> None:
        self.method, self.uri, self.headers, self.bodyProducer, self.deferred = method, uri, headers, bodyProducer, d
        self.cancelled = False
        self.body = b""
        self.bodyDone: Optional[Deferred] = None

    def consume(self) -> None:
        """
        Start the body producer as the Agent would, collecting the bytes.
        """
        request = self

        class Consumer:
            def write(self, data: bytes) -> None:
                request.body += data

        self.bodyDone = self.bodyProducer.startProducing(Consumer())


class FakeAgent:
    """
    Records requests; the test answers them (or not).
    """

    def __init__(self) -> None:
        self.requests: List[FakeRequest] = []

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None, bodyProducer: Any = None) -> Deferred:
        def cancel(d: Deferred) -> None:
            request.cancelled = True

        d: Deferred = Deferred(cancel)
        request = FakeRequest(method, uri, headers or Headers(), bodyProducer, d)
        self.requests.append(request)
        return d


@implementer(IPushProducer)
class FakeBodyTransport:
    """
    The upstream side of a response body: records pause/resume/stop.
    """

    def __init__(self) -> None:
        self.state = "producing"
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.state = "paused"
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class FakeResponse:
    """
    Enough of IResponse for the handler.
    """

    def __init__(self, code: int = 200, headers: Optional[Headers] = None, length: Any = UNKNOWN_LENGTH,
                 phrase: bytes = b"OK") -> None:
        self.code = code
        self.phrase = phrase
        self.version = (b"HTTP", 1, 1)
        self.headers = headers if headers is not None else Headers()
        self.length = length
        self.transport = FakeBodyTransport()
        self.protocol: Optional[Protocol] = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def finish(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))


class FakeUpstream:
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent


class Unit:
    """
    A ProxyContext on a fake clock with a fake Agent, a collecting observer
    and a list of the diagnostic log events.
    """

    def __init__(self, testCase: SynchronousTestCase, timeouts: Optional[Timeouts] = None,
                 limits: Optional[Limits] = None, policy: Optional[ConnectPolicy] = None) -> None:
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        self.observer = CollectingObserver()
        self.events: List[dict] = []
        ca = CertificateAuthority(FilePath(testCase.mktemp()).child("ca"))
        self.context = ProxyContext(
            self.clock, ca, FakeUpstream(self.agent), self.observer,  # type: ignore[arg-type]
            policy or ConnectPolicy([("localhost", None)], ownAddresses=[("127.0.0.1", 8443)]),
            ClientACL([ipaddress.ip_network("127.0.0.0/8")]),
            limits=limits, timeouts=timeouts, log=Logger(namespace="test", observer=self.events.append),
        )

    def transport(self) -> StringTransportWithDisconnection:
        t = StringTransportWithDisconnection(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443), peerAddress=IPv4Address("TCP", "127.0.0.1", 50000)
        )
        return t

    def handler(self, origin: Optional[Tuple[str, str, int]] = None, tls: bool = False) -> Tuple[HTTPHandler, StringTransportWithDisconnection]:
        """
        An HTTPHandler connected to a StringTransport: on the listening port
        (origin None) or on a decrypted stream to origin.
        """
        handler = HTTPHandler(self.context, ("127.0.0.1", 50000), origin=origin, tls=tls)
        transport = self.transport()
        transport.protocol = handler
        handler.makeConnection(transport)
        return handler, transport

    def connection(self) -> Tuple[Protocol, StringTransportWithDisconnection]:
        """
        A ProxyConnection from the factory, as the listening port builds it.
        """
        factory = ProxyFactory(self.context)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = self.transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def debugLines(self) -> List[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.debug]


# -- 1. strict parsing, nothing forwarded ------------------------------------------


class HandlerRejectionTests(SynchronousTestCase):
    """
    Each refused form, fed to an HTTPHandler: its status, the connection
    closed, and no complete request handed to the Agent.
    """

    def _check(self, origin: Optional[Tuple[str, str, int]], target: bytes, table: List[Tuple[str, bytes, int]]) -> None:
        unit = Unit(self)
        for name, template, expected in table:
            handler, transport = unit.handler(origin)
            handler.dataReceived(fill(template, target))
            answer = transport.value()
            self.assertEqual(status(answer), expected, (name, answer[:100]))
            self.assertTrue(answer.endswith(b"\n") and b"Connection: close" in answer, name)
            self.assertTrue(handler.closed and not transport.connected, name)
            for request in unit.agent.requests:
                # a chunk error is found after forwarding began: the request
                # is cancelled and its body fails, so the Agent aborts it
                self.assertTrue(request.cancelled, name)
                request.consume()
                self.failureResultOf(request.bodyDone)
            unit.agent.requests.clear()

    def test_listeningPort(self):
        """
        On the listening port (absolute-form and CONNECT).
        """
        self._check(None, b"http://example.com/x", REJECTED + CONNECT_REJECTED)

    def test_decryptedStream(self):
        """
        On a decrypted CONNECT stream (origin-form); CONNECT there is 400.
        """
        self._check(("https", "localhost", 443), b"/x", REJECTED)
        self._check(("https", "localhost", 443), b"/x", [("CONNECT inside", b"CONNECT a:443 HTTP/1.1\r\n\r\n", 400)])

    def test_splitAnywhere(self):
        """
        A byte at a time, each refused form still gets its status.
        """
        unit = Unit(self)
        for name, template, expected in REJECTED[:30] + CONNECT_REJECTED[:12]:
            handler, transport = unit.handler()
            raw = fill(template, b"http://example.com/x")
            for i in range(len(raw)):
                if handler.closed:
                    break
                handler.dataReceived(raw[i : i + 1])
            self.assertEqual(status(transport.value()), expected, name)

    def test_rebuiltRequest(self):
        """
        What the Agent gets is built from the parsed request: hop-by-hop
        fields and the ones Connection names are gone, Host is the target's,
        framing is the proxy's (Content-Length of the decoded body).
        """
        unit = Unit(self)
        handler, transport = unit.handler(("https", "localhost", 8443))
        handler.dataReceived(
            b"\r\nPOST /new-order HTTP/1.1\r\nHost: evil.example\r\nConnection: X-Drop\r\nX-Drop: 1\r\n"
            b"Proxy-Connection: keep-alive\r\nTransfer-Encoding: chunked\r\nX-Keep:  kept \r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        (request,) = unit.agent.requests
        self.assertEqual(request.uri, b"https://localhost:8443/new-order")
        names = {n.lower() for n, _ in request.headers.getAllRawHeaders()}
        self.assertEqual(names, {b"host", b"x-keep"})
        self.assertEqual(request.headers.getRawHeaders(b"host"), [b"localhost:8443"])
        self.assertEqual(request.headers.getRawHeaders(b"x-keep"), [b"kept"])
        request.consume()
        self.assertEqual(request.body, b"hello")
        self.successResultOf(request.bodyDone)


class RealRejectionTests(TestCase):
    """
    The refused forms against a real proxy on all its surfaces: the listening
    port, TLS to the proxy, a decrypted CONNECT stream, and TLS to the proxy
    with a decrypted stream inside; the upstreams never see a request.
    """

    timeout = 120

    @inlineCallbacks
    def _table(self, fx: ProxyFixture, steps: List[Tuple[str, Any]], target: bytes, table) -> Any:  # type: ignore[no-untyped-def]
        wrong = []
        for name, template, expected in table:
            try:
                answer = yield talk(fx.proxyPort, steps, fill(template, target), fx.rootPEM)
            except Exception as e:
                answer = repr(e).encode()
            if status(answer) != expected:
                wrong.append((name, expected, answer[:80]))
        self.assertEqual(wrong, [])

    @inlineCallbacks
    def test_allSurfaces(self):
        """
        Every entry of the tables on every surface: its status, the
        connection closed, nothing reached either upstream.
        """
        fx = yield startProxy(self)
        absolute = b"http://127.0.0.1:%d/x" % fx.plainPort
        inner = intercepted(b"localhost:%d" % fx.port)
        yield self._table(fx, [], absolute, REJECTED + CONNECT_REJECTED)
        yield self._table(fx, TLS_TO_PROXY, absolute, REJECTED + CONNECT_REJECTED)
        yield self._table(fx, inner, b"/x", REJECTED)
        yield self._table(fx, TLS_TO_PROXY + inner, b"/x", REJECTED)
        self.assertEqual(fx.resource.requests, [])
        self.assertEqual(fx.plain.requests, [])
        answer = yield normalRequest(fx)
        assertServed(self, answer)

    @inlineCallbacks
    def test_upstreamGetsTheProxysRequest(self):
        """
        The bytes that reach the upstream are the proxy's own serialisation:
        one Content-Length, no client framing or hop-by-hop fields, values
        trimmed, the chunked body decoded.
        """
        fx = ProxyFixture(self, ["--intercept", "localhost"])
        upstream = ScriptedUpstream(self, fx, writes(b"HTTP/1.1 204 No Content\r\n\r\n"))
        yield fx.start()
        answer = yield talk(
            fx.proxyPort, intercepted(b"localhost:%d" % upstream.port),
            b"POST /x HTTP/1.1\r\nHost: other\r\nTransfer-Encoding: chunked\r\nX-A:   spaced   \r\n"
            b"Keep-Alive: 5\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
            fx.rootPEM,
        )
        self.assertEqual(status(answer), 204, answer)
        yield waitUntil(lambda: upstream.connections and upstream.connections[0].received.endswith(b"0\r\n\r\n"))
        sent = upstream.connections[0].received
        head, body = sent.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /x HTTP/1.1")
        fields = sorted(line.lower() for line in lines[1:])
        self.assertIn(b"x-a: spaced", fields)
        self.assertIn(b"host: localhost:%d" % upstream.port, fields)
        self.assertIn(b"transfer-encoding: chunked", fields)
        for gone in (b"keep-alive", b"connection: close", b"x-trailer", b"host: other"):
            self.assertFalse([f for f in fields if f.startswith(gone)], gone)
        # re-chunked by the proxy: no client extension or trailer survives
        self.assertEqual(body, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")


# -- 2. limits ----------------------------------------------------------------------


HOLD = b"GET http://amp.keychest.net/ HTTP/1.1\r\n"  # an unfinished head: the connection stays open
ROOT_REQUEST = b"GET http://amp.keychest.net/ HTTP/1.1\r\nHost: amp.keychest.net\r\nConnection: close\r\n\r\n"


class ConnectionCapTests(TestCase):
    """
    --max-connections: new clients beyond it get 503 at once and a close,
    while the connections already open carry on.
    """

    timeout = 60

    @inlineCallbacks
    def test_cap(self):
        """
        With three connections open the fourth is refused with 503 and
        Retry-After within a second; the three then finish their requests,
        and once they are gone a new client is served.
        """
        fx = yield startProxy(self, ["--max-connections", "3"])
        held = [openClient(fx.proxyPort, [], HOLD) for _ in range(3)]
        yield waitUntil(lambda: fx.service.factory.connections == 3, what="three connections")
        started = reactor.seconds()
        answer = yield talk(fx.proxyPort, [], ROOT_REQUEST)
        self.assertEqual(status(answer), 503, answer)
        self.assertIn(b"Retry-After: 1", answer)
        self.assertLess(reactor.seconds() - started, 1.0)
        for client, _ in held:
            client.transport.write(b"Host: amp.keychest.net\r\nConnection: close\r\n\r\n")
        answers = yield gatherResults([d for _, d in held])
        for answer in answers:
            self.assertEqual(status(answer), 200)
            self.assertTrue(answer.endswith(fx.rootPEM))
        yield waitUntil(lambda: fx.service.factory.connections == 0, what="connections closed")
        answer = yield talk(fx.proxyPort, [], ROOT_REQUEST)
        self.assertEqual(status(answer), 200)


class _Process(ProcessProtocol):
    """
    A child process whose output is kept; C{ended} fires with its exit code.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else None
        self.ended.callback(code)


def childEnvironment() -> dict:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    }


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@inlineCallbacks
def stopProcess(process: _Process, transport: Any):  # type: ignore[no-untyped-def]
    """
    SIGTERM, then SIGKILL after five seconds; bounded.
    """
    if process.ended.called:
        return
    try:
        transport.signalProcess("TERM")
    except Exception:
        pass
    deadline = reactor.seconds() + 5
    while not process.ended.called and reactor.seconds() < deadline:
        yield settle(0.02)
    if not process.ended.called:
        transport.signalProcess("KILL")
        yield process.ended


class DescriptorExhaustionTests(TestCase):
    """
    Running out of file descriptors does not stop the listener for good.
    """

    timeout = 90
    LIMIT = 64

    def _fds(self, pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    @inlineCallbacks
    def test_exhaustAndRecover(self):
        """
        A proxy with RLIMIT_NOFILE 64: a hundred idle clients exhaust its
        descriptors and a new client gets no answer; once they are gone a new
        client is served by the same process, and its log never shows a key.
        """
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc")
        tmp = tempfile.mkdtemp(prefix="kc-fd-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = freePort()
        wrapper = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.LIMIT}, {self.LIMIT})); "
            "os.execv(sys.executable, [sys.executable, '-m', 'keychestamp'] + sys.argv[1:])"
        )
        args = [sys.executable, "-c", wrapper, "-e", os.path.join(tmp, "etc"), "-n", "-f", os.path.join(tmp, "a.json"),
                "-a", "127.0.0.1", "-p", str(port), "--max-connections", "1000", "-l", "DEBUG"]
        process = _Process()
        transport = reactor.spawnProcess(process, sys.executable, args, env=childEnvironment(), path=tmp)
        self.addCleanup(stopProcess, process, transport)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        yield waitUntil(listening, 20, "the proxy to listen")
        answer = yield talk(port, [], ROOT_REQUEST)
        self.assertEqual(status(answer), 200, answer)
        pid = transport.pid
        before = self._fds(pid)

        held = []
        for _ in range(100):
            held.append(openClient(port, [], HOLD))
        yield waitUntil(lambda: self._fds(pid) >= self.LIMIT - 1, what="descriptors exhausted")
        yield settle(0.2)
        self.assertLessEqual(self._fds(pid), self.LIMIT)
        answer = yield talk(port, [], ROOT_REQUEST)
        self.assertEqual(answer, b"")  # accepted and closed at once (Twisted's reserve descriptor)

        for client, d in held:
            if client.transport is not None:
                client.transport.loseConnection()
        yield gatherResults([d.addErrback(lambda f: None) for _, d in held])
        yield waitUntil(lambda: self._fds(pid) <= before + 1, what="descriptors released")
        answer = yield talk(port, [], ROOT_REQUEST)
        self.assertEqual(status(answer), 200, answer)
        self.assertFalse(process.ended.called)
        yield stopProcess(process, transport)
        key = open(os.path.join(tmp, "etc", "ca", "root.key"), "rb").read()
        body = b"".join(key.splitlines()[1:-1])
        log = process.out + process.err
        self.assertTrue(b"EMFILE encountered" in log, "Twisted's descriptor reserve was not used")
        self.assertNotIn(body[:40], log.replace(b"\n", b""))
        self.assertNotIn(b"PRIVATE KEY", log)


# -- 3. streaming with backpressure -------------------------------------------------


BLOCK = os.urandom(65536)


@implementer(IPushProducer)
class Pusher:
    """
    Writes C{total} bytes (BLOCK repeated) to a consumer as fast as it is
    allowed to: a fast sender.
    """

    def __init__(self, consumer: Any, total: int) -> None:
        self.consumer = consumer
        self.total = total
        self.sent = 0
        self.paused = False
        self.finished = False
        self._scheduled = True
        consumer.registerProducer(self, True)
        reactor.callLater(0, self._loop)

    def _loop(self) -> None:
        self._scheduled = False
        while not self.paused and self.sent < self.total:
            self.consumer.write(BLOCK[: self.total - self.sent])
            self.sent += min(len(BLOCK), self.total - self.sent)
        if self.sent >= self.total and not self.finished:
            self.finished = True
            self.consumer.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self._scheduled and not self.finished:
            self._scheduled = True
            reactor.callLater(0, self._loop)

    def stopProducing(self) -> None:
        self.paused = True


def expectedDigest(total: int) -> str:
    h = hashlib.sha256()
    for _ in range(total // len(BLOCK)):
        h.update(BLOCK)
    return h.hexdigest()


class Streamer(Protocol):
    """
    The upstream of the streaming test: stops reading after the request head
    until told, checks the body, then answers with a body as large, sent as
    fast as it may.
    """

    def __init__(self, test: "StreamingTests") -> None:
        self.test = test
        self.head = b""
        self.inHead = True
        self.bodyCount = 0
        self.digest = hashlib.sha256()
        self.pusher: Optional[Pusher] = None

    def dataReceived(self, data: bytes) -> None:
        if self.inHead:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, data = self.head.split(b"\r\n\r\n", 1)
            self.inHead = False
            self.transport.pauseProducing()  # a slow upstream
            self.test.streamer = self
        self.bodyCount += len(data)
        self.digest.update(data)
        if self.bodyCount == self.test.SIZE:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.test.SIZE)
            self.pusher = Pusher(self.transport, self.test.SIZE)


@implementer(IProtocolNegotiationFactory)
class _StreamerFactory(Factory):
    noisy = False

    def __init__(self, test: "StreamingTests") -> None:
        self.test = test

    def buildProtocol(self, addr: object) -> Protocol:
        return Streamer(self.test)

    def acceptableProtocols(self) -> List[bytes]:
        return [b"http/1.1"]


@inlineCallbacks
def stalled(progress: Callable[[], int], paused: Callable[[], bool], quiet: float = 0.3):  # type: ignore[no-untyped-def]
    """
    Wait (bounded) until a sender is paused and C{progress()} has not moved
    for C{quiet} seconds.
    """
    deadline = reactor.seconds() + WAIT
    last, since = -1, reactor.seconds()
    while reactor.seconds() < deadline:
        now = progress()
        if now != last or not paused():
            last, since = now, reactor.seconds()
        elif reactor.seconds() - since >= quiet:
            return now
        yield settle(0.02)
    raise AssertionError("the sender never stalled")


class StreamingTests(TestCase):
    """
    64 MiB up and 64 MiB down through an intercepted stream: the proxy
    pauses whichever side is fast while the other is slow, relays both bodies
    in full, and gives the observer only the first 256 KiB of each.
    """

    timeout = 120
    SIZE = 64 * 1024 * 1024
    BOUND = 16 * 1024 * 1024  # socket buffers on both legs, at most

    @inlineCallbacks
    def test_bothWays(self):
        """
        Upload while the upstream does not read: the client is paused, the
        proxy stops reading its socket, and the bytes it took stay far below
        the body; download while the client does not read: the upstream is
        paused likewise. Then everything arrives intact.
        """
        self.streamer: Optional[Streamer] = None
        fx = ProxyFixture(self, ["--intercept", "localhost"])
        yield fx.start()
        certPEM, keyPEM = fx.ca.issue(["localhost"])
        upstream = reactor.listenSSL(
            0, _StreamerFactory(self), PrivateCertificate.loadPEM(certPEM + keyPEM).options(), interface="127.0.0.1"
        )
        self.addCleanup(upstream.stopListening)
        connections: List[Any] = []
        build = fx.service.factory.buildProtocol

        def spy(addr: object) -> Protocol:
            protocol = build(addr)
            protocol.taken = 0
            received = protocol.dataReceived

            def counting(data: bytes) -> None:
                protocol.taken += len(data)
                received(data)

            protocol.dataReceived = counting
            connections.append(protocol)
            return protocol

        fx.service.factory.buildProtocol = spy

        client, done = openClient(
            fx.proxyPort, intercepted(b"localhost:%d" % upstream.getHost().port),
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % self.SIZE,
            fx.rootPEM,
        )
        yield client.ready
        pusher = Pusher(client.transport, self.SIZE)
        yield waitUntil(lambda: self.streamer is not None, what="the upstream to get the head")
        sent = yield stalled(lambda: pusher.sent, lambda: pusher.paused)
        (proxied,) = connections
        self.assertLess(sent, self.BOUND)
        self.assertLess(proxied.taken - self.streamer.bodyCount, self.BOUND)
        self.assertNotIn(proxied.transport, reactor.getReaders())  # the proxy paused the client

        response: dict = {"head": b"", "inHead": True, "count": 0, "digest": hashlib.sha256()}

        def onData(data: bytes) -> None:
            if response["inHead"]:
                response["head"] += data
                if b"\r\n\r\n" not in response["head"]:
                    return
                response["head"], data = response["head"].split(b"\r\n\r\n", 1)
                response["inHead"] = False
            response["count"] += len(data)
            response["digest"].update(data)

        client.onData = onData
        client.socket.transport.pauseProducing()  # a client that does not read
        self.streamer.transport.resumeProducing()
        yield waitUntil(lambda: self.streamer.pusher is not None, 60, what="the upload to complete")
        self.assertEqual(self.streamer.digest.hexdigest(), expectedDigest(self.SIZE))
        produced = yield stalled(lambda: self.streamer.pusher.sent, lambda: self.streamer.pusher.paused)
        self.assertLess(produced, self.BOUND)
        self.assertEqual(response["count"], 0)

        client.socket.transport.resumeProducing()
        yield waitUntil(lambda: response["count"] == self.SIZE, 60, "the download")
        yield done
        self.assertIn(b"HTTP/1.1 200 OK", response["head"])
        self.assertEqual(response["count"], self.SIZE)
        self.assertEqual(response["digest"].hexdigest(), expectedDigest(self.SIZE))
        (exchange,) = fx.observer.exchanges
        self.assertTrue(exchange.requestTruncated)
        self.assertTrue(exchange.responseTruncated)
        self.assertEqual(exchange.requestBody, (BLOCK * 4)[:OBSERVED_BODY_LIMIT])
        self.assertEqual(exchange.responseBody, (BLOCK * 4)[:OBSERVED_BODY_LIMIT])
        # closed while the client was paused: the proxy still finishes the close
        yield waitUntil(lambda: fx.service.factory.connections == 0, 2, "the proxy to close")


# -- 5. upstream faults ----------------------------------------------------------


TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"  # fatal handshake_failure


class UpstreamFaultTests(TestCase):
    """
    Each upstream fault, from a real misbehaving server on loopback: the
    client gets an answer, the operator a proxy-error, and a normal request
    running beside it and one after it succeed.
    """

    timeout = 90

    @inlineCallbacks
    def _fault(self, fx: ProxyFixture, host: bytes, expected: int, stage: str,  # type: ignore[no-untyped-def]
               path: bytes = b"/x"):
        before = len(fx.observer.failures)
        faulty = talk(
            fx.proxyPort, intercepted(host),
            b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path, fx.rootPEM,
        )
        beside = normalRequest(fx)
        answer, normal = yield gatherResults([faulty, beside])
        assertServed(self, normal)
        if expected:
            self.assertEqual(status(answer), expected, (host, answer[:200]))
        new = fx.observer.failures[before:]
        self.assertEqual([f.stage for f in new], [stage], (host, [f.reason for f in new]))
        after = yield normalRequest(fx)
        assertServed(self, after)
        return answer, new[0]

    @inlineCallbacks
    def test_faults(self):
        """
        Refused, DNS failure, close in the TLS handshake, a TLS alert, a
        certificate from an unknown CA, garbage instead of a status line, no
        answer at all: 502 (504 for no answer), each with its stage.
        """
        fx = ProxyFixture(self, ["--intercept", "localhost", "--intercept", "nowhere.invalid",
                                 "--response-timeout", "1"])
        closing = ScriptedUpstream(self, fx, lambda p: p.transport.loseConnection(), tls=False, onFirstBytes=True)
        alerting = ScriptedUpstream(self, fx, writes(TLS_ALERT, "close"), tls=False, onFirstBytes=True)
        from tests.support import TestCA

        untrusted = ScriptedUpstream(self, fx, writes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                                     certificate=TestCA("other").issue(["localhost"]))
        garbage = ScriptedUpstream(self, fx, writes(b"garbage\r\n\r\n"))
        silent = ScriptedUpstream(self, fx, None)
        yield fx.start()
        # what upstream.py should wire (see test_strictParserWired): it also
        # tells a close in the TLS handshake from a close after it
        fx.service.context.upstream.pool._factory = StrictClientFactory
        refused = freePort()

        yield self._fault(fx, b"localhost:%d" % refused, 502, STAGE_UPSTREAM_CONNECT)
        answer, failure = yield self._fault(fx, b"nowhere.invalid:443", 502, STAGE_UPSTREAM_CONNECT)
        self.assertIn("DNS", failure.reason)
        yield self._fault(fx, b"localhost:%d" % closing.port, 502, STAGE_UPSTREAM_TLS)
        yield self._fault(fx, b"localhost:%d" % alerting.port, 502, STAGE_UPSTREAM_TLS)
        yield self._fault(fx, b"localhost:%d" % untrusted.port, 502, STAGE_UPSTREAM_TLS)
        self.assertEqual(untrusted.heads, [])
        yield self._fault(fx, b"localhost:%d" % garbage.port, 502, STAGE_UPSTREAM_RESPONSE)
        yield self._fault(fx, b"localhost:%d" % silent.port, 504, STAGE_UPSTREAM_TIMEOUT)

    @inlineCallbacks
    def test_tunnelFaults(self):
        """
        A tunnel whose upstream is refused or does not resolve: 502 for the
        CONNECT and a proxy-error.
        """
        refused = freePort()
        fx = yield startProxy(self, ["--connect-port", str(refused)], intercept=False)
        for target in (b"127.0.0.1:%d" % refused, b"nowhere.invalid:443"):
            before = len(fx.observer.failures)
            answer = yield talk(fx.proxyPort, [], b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
            self.assertEqual(status(answer), 502, answer)
            self.assertEqual([f.stage for f in fx.observer.failures[before:]], [STAGE_UPSTREAM_CONNECT])

    @inlineCallbacks
    def test_resetMidResponse(self):
        """
        An upstream that resets after part of the body: the client gets the
        head and what was relayed, then its connection closes (short of the
        Content-Length); an upstream-response proxy-error; others unharmed.
        """
        fx = ProxyFixture(self, ["--intercept", "localhost"])
        resetting = ScriptedUpstream(
            self, fx, writes(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000, "reset")
        )
        yield fx.start()
        answer, failure = yield self._fault(fx, b"localhost:%d" % resetting.port, 0, STAGE_UPSTREAM_RESPONSE)
        head, body = answer.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Length: 100000", head)
        self.assertTrue(0 < len(body) <= 1000, len(body))
        self.assertIn("cut short", failure.reason)


# -- 1. responses: the same strictness --------------------------------------------


class ResponseStrictnessTests(TestCase):
    """
    Malformed responses from a raw upstream get the client a 502.
    """

    timeout = 60

    CHECKED_IN_HANDLER = [
        ("whitespace before a colon", b"HTTP/1.1 200 OK\r\nContent-Type : text/plain\r\nContent-Length: 2\r\n\r\nok"),
        ("negative status", b"HTTP/1.1 -1 Odd\r\nContent-Length: 2\r\n\r\nok"),
        ("garbage status line", b"HTTP/1.1 OK\r\n\r\n"),
        ("differing Content-Length fields", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"),
        ("signed Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
    ]
    NEEDS_STRICT_PARSER = [
        ("Content-Length with Transfer-Encoding",
         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("chunked, then gzip",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
        ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok"),
    ]

    @inlineCallbacks
    def _check(self, fx: ProxyFixture, table: List[Tuple[str, bytes]]):  # type: ignore[no-untyped-def]
        wrong = []
        for name, raw in table:
            upstream = ScriptedUpstream(self, fx, writes(raw, "close"))
            before = len(fx.observer.failures)
            answer = yield talk(fx.proxyPort, intercepted(b"localhost:%d" % upstream.port),
                                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", fx.rootPEM)
            stages = [f.stage for f in fx.observer.failures[before:]]
            if status(answer) != 502 or stages != [STAGE_UPSTREAM_RESPONSE]:
                wrong.append((name, answer[:120], stages))
        self.assertEqual(wrong, [])
        self.assertEqual(fx.observer.exchanges, [])

    @inlineCallbacks
    def test_lenientAgentChecked(self):
        """
        What Twisted's Agent accepts but must not reach the client (a name
        with whitespace before the colon, a status out of range) and what it
        refuses itself: 502.
        """
        fx = yield startProxy(self)
        yield self._check(fx, self.CHECKED_IN_HANDLER)
        assertServed(self, (yield normalRequest(fx)))

    @inlineCallbacks
    def test_strictParser(self):
        """
        With the strict client protocol on the upstream pool: Content-Length
        beside Transfer-Encoding, a second Transfer-Encoding, bare LF and
        obs-fold also get 502, and normal responses still pass.
        """
        fx = yield startProxy(self)
        fx.service.context.upstream.pool._factory = StrictClientFactory
        yield self._check(fx, self.NEEDS_STRICT_PARSER + self.CHECKED_IN_HANDLER)
        assertServed(self, (yield normalRequest(fx)))

    @inlineCallbacks
    def test_strictParserWired(self):
        """
        The proxy's own upstream pool builds the strict client protocol.
        """
        fx = yield startProxy(self)
        self.assertTrue(issubclass(fx.service.context.upstream.pool._factory, StrictClientFactory))


# -- 6. CONNECT policy -------------------------------------------------------------


class ConnectPolicyTests(SynchronousTestCase):
    """
    Which CONNECT targets are intercepted, tunnelled or refused.
    """

    def test_intercepted(self):
        """
        A default ACME CA or HOST without a port: any port; HOST:PORT: that
        port only (elsewhere it is an ordinary host); * : everything.
        """
        policy = ConnectPolicy([("pebble", 14000), ("step-ca", None)])
        self.assertEqual(policy.decide("acme-v02.api.letsencrypt.org", 443)[0], INTERCEPT)
        self.assertEqual(policy.decide("ACME-V02.api.letsencrypt.org.", 8443)[0], INTERCEPT)
        self.assertEqual(policy.decide("pebble", 14000)[0], INTERCEPT)
        self.assertEqual(policy.decide("pebble", 443)[0], TUNNEL)
        self.assertIsNone(policy.decide("pebble", 14001)[0])
        self.assertEqual(policy.decide("step-ca", 9000)[0], INTERCEPT)
        everything = ConnectPolicy([("*", None)])
        self.assertEqual(everything.decide("example.com", 1)[0], INTERCEPT)
        self.assertEqual(everything.decide("amp.keychest.net", 443)[0], LOCAL)

    def test_tunnelled(self):
        """
        Other hosts: 443 and the --connect-port ports only.
        """
        policy = ConnectPolicy([], connectPorts=[8443])
        self.assertEqual(policy.decide("api.dns.example", 443)[0], TUNNEL)
        self.assertEqual(policy.decide("api.dns.example", 8443)[0], TUNNEL)
        decision, why = policy.decide("api.dns.example", 22)
        self.assertIsNone(decision)
        self.assertIn("--connect-port", why)

    def test_loop(self):
        """
        The proxy's own listening address is refused, whichever spelling:
        configured own addresses, and on the port the client reached,
        localhost, any loopback or unspecified address, IPv4-mapped too,
        even when every host is intercepted.
        """
        policy = ConnectPolicy([("*", None)], connectPorts=[8443], ownAddresses=[("192.0.2.7", 8443)])
        local = ("127.0.0.1", 8443)
        for host in ("192.0.2.7", "localhost", "LOCALHOST.", "127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "::",
                     "::ffff:127.0.0.1", "[::1]", "a.localhost"):
            decision, why = policy.decide(host, 8443, local)
            self.assertIsNone(decision, host)
            self.assertIn("loop", why)
        self.assertEqual(policy.decide("localhost", 8444, local)[0], INTERCEPT)
        self.assertEqual(policy.decide("example.com", 8443, local)[0], INTERCEPT)
        mapped = ("::ffff:10.0.0.5", 3128)
        self.assertIsNone(ConnectPolicy().decide("10.0.0.5", 3128, mapped)[0])

    def test_tunnelToOwnAddress(self):
        """
        A name that resolves to the address the client reached the proxy on
        is refused with 403 once the tunnel's connection shows it.
        """
        from keychestamp.proxy.tunnel import Tunnel, TunnelUpstream

        unit = Unit(self, policy=ConnectPolicy([], connectPorts=[8443]))
        opened: List[Tunnel] = []
        unit.context.tunnels.open = lambda handler, host, port, early: opened.append(  # type: ignore[assignment]
            Tunnel(unit.context, handler, host, port, early)) or opened[-1]
        handler, transport = unit.handler()
        handler.dataReceived(b"CONNECT myself.example:8443 HTTP/1.1\r\n\r\n")
        upstream = TunnelUpstream(opened[0])
        upstream.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 8443)))
        self.assertEqual(status(transport.value()), 403)
        self.assertIn(b"loop", transport.value())
        self.assertTrue(upstream.transport.disconnecting)


class ConnectPolicyRealTests(TestCase):
    """
    The policy on a real proxy: 403 and a diagnostic line.
    """

    timeout = 60

    @inlineCallbacks
    def test_refusals(self):
        """
        CONNECT to the proxy's own port (as 127.0.0.1, localhost, [::1]) and
        to a port not allowed for tunnels: 403, nothing opened, one line each.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        lines: List[str] = []

        def observe(event: dict) -> None:
            if "refused CONNECT" in (event.get("log_format") or ""):
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        fx = yield startProxy(self, ["--intercept", "*"])
        own = fx.proxyPort
        for target in (b"127.0.0.1:%d" % own, b"localhost:%d" % own, b"[::1]:%d" % own):
            answer = yield talk(own, [], b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
            self.assertEqual(status(answer), 403, (target, answer))
            self.assertIn(b"loop", answer)
        fx2 = yield startProxy(self, intercept=False)
        answer = yield talk(fx2.proxyPort, [], b"CONNECT example.com:25 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status(answer), 403)
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("example.com:25", lines[-1])


# -- 7. key hygiene, in a real process ------------------------------------------------


class KeyPermissionProcessTests(TestCase):
    """
    twistd refuses to start with a CA key or directory others can read.
    """

    timeout = 60

    @inlineCallbacks
    def _start(self, etc: str):  # type: ignore[no-untyped-def]
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            raise SkipTest("no twistd next to the interpreter")
        process = _Process()
        args = [twistd, "-n", "--pidfile=", "keychestamp", "-e", etc, "-n", "-f", os.path.join(etc, "audit.json"),
                "-a", "127.0.0.1", "-p", str(freePort())]
        transport = reactor.spawnProcess(process, twistd, args, env=childEnvironment(), path=etc)
        timer = reactor.callLater(30, transport.signalProcess, "KILL")
        code = yield process.ended
        if timer.active():
            timer.cancel()
        return code, process

    @inlineCallbacks
    def test_readableKey(self):
        """
        root.key 0644 or ca/ 0755: a non-zero exit before listening and one
        stderr line saying what to chmod; the key is not in the output.
        """
        etc = tempfile.mkdtemp(prefix="kc-key-")
        self.addCleanup(shutil.rmtree, etc, True)
        ca = CertificateAuthority(FilePath(etc).child("ca"))
        del ca
        keyPath = os.path.join(etc, "ca", "root.key")
        key = open(keyPath, "rb").read()
        for path, mode, fix in ((keyPath, 0o644, "chmod 600"), (os.path.dirname(keyPath), 0o755, "chmod 700")):
            os.chmod(path, mode)
            code, process = yield self._start(etc)
            os.chmod(path, 0o600 if path == keyPath else 0o700)
            self.assertNotEqual(code, 0)
            lines = process.err.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, process.err)
            self.assertIn(f"{fix} {path}", lines[0])
            self.assertNotIn(b"".join(key.splitlines()[1:2]), process.out + process.err)
