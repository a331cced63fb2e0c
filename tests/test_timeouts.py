# -*- test-case-name: tests.test_timeouts -*-
"""
Every timeout of the proxy, driven by a fake clock (an HTTPHandler or a
ProxyConnection on a StringTransport, a fake Agent), and the ones that
involve an upstream also against real sockets on loopback with small values.

Each one closes the connection, writes one diagnostic line, and reports a
proxy-error when a request was in flight.
"""

from __future__ import annotations

import socket
from typing import List

from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from keychestamp.exchange import (
    STAGE_CLIENT_TIMEOUT,
    STAGE_CLIENT_TLS,
    STAGE_UPSTREAM_RESPONSE,
    STAGE_UPSTREAM_TIMEOUT,
)
from keychestamp.proxy.http import HTTPHandler
from keychestamp.proxy.policy import ConnectPolicy
from keychestamp.proxy.server import Timeouts
from keychestamp.proxy.tunnel import Tunnel, TunnelUpstream
from tests.test_hardening import (
    FakeResponse,
    ScriptedUpstream,
    Unit,
    intercepted,
    normalRequest,
    assertServed,
    openClient,
    settle,
    startProxy,
    status,
    talk,
    waitUntil,
    writes,
)

GET = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"
ORIGIN = ("https", "localhost", 443)


def respond(unit: Unit, length: int = 2, body: bytes = b"ok", finish: bool = True) -> FakeResponse:
    """
    Answer the pending request of the fake Agent.
    """
    response = FakeResponse(200, Headers({b"content-type": [b"text/plain"]}), length)
    unit.agent.requests[-1].deferred.callback(response)
    if body:
        response.protocol.dataReceived(body)  # type: ignore[union-attr]
    if finish:
        response.finish()
    return response


class ClientHeadTimeoutTests(SynchronousTestCase):
    """
    A request head must be complete --header-timeout (30 s) after the
    connection opened: slowloris.
    """

    def test_silent(self):
        """
        A client that sends nothing is cut at 30 s, with one DEBUG line.
        """
        unit = Unit(self)
        protocol, transport = unit.connection()
        unit.clock.advance(29.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertTrue(transport.disconnected)  # set by abortConnection only
        self.assertEqual(len(unit.debugLines()), 1)
        self.assertIn("sent nothing", unit.debugLines()[0])
        self.assertEqual(unit.observer.failures, [])

    def test_lateStart(self):
        """
        A head begun 20 s in still has to be complete 30 s after the
        connection opened, not 30 s after its first byte.
        """
        unit = Unit(self)
        protocol, transport = unit.connection()
        unit.clock.advance(20)
        protocol.dataReceived(b"GET http://example.com/ HT")
        unit.clock.advance(9.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertEqual(unit.debugLines(), ["127.0.0.1: closing, request head timed out"])
        self.assertEqual(unit.observer.failures, [])
        self.assertEqual(unit.agent.requests, [])

    def test_drip(self):
        """
        A byte every five seconds does not extend the deadline.
        """
        unit = Unit(self)
        protocol, transport = unit.connection()
        head = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
        for i in range(6):
            protocol.dataReceived(head[i : i + 1])
            unit.clock.advance(4.99)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)

    def test_configurable(self):
        """
        --header-timeout 5 cuts at 5 s; 0 turns it off.
        """
        unit = Unit(self, Timeouts(header=5))
        protocol, transport = unit.connection()
        unit.clock.advance(5)
        self.assertFalse(transport.connected)
        unit = Unit(self, Timeouts(header=0))
        protocol, transport = unit.connection()
        protocol.dataReceived(b"GET http://example.com/ HT")
        unit.clock.advance(10000)
        self.assertTrue(transport.connected)


class IdleTimeoutTests(SynchronousTestCase):
    """
    A keep-alive connection may stay idle --idle-timeout (60 s) after a
    response; once the next request has begun, its head gets 30 s.
    """

    def _served(self, unit: Unit):  # type: ignore[no-untyped-def]
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(GET)
        respond(unit)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nok"))
        return handler, transport

    def test_idle(self):
        """
        60 s without a byte after a response: closed, one DEBUG line, no
        proxy-error (no request in flight).
        """
        unit = Unit(self)
        handler, transport = self._served(unit)
        unit.clock.advance(59.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertEqual(unit.debugLines(), ["127.0.0.1: closing, idle keep-alive timed out"])
        self.assertEqual(unit.observer.failures, [])

    def test_nextHead(self):
        """
        The next head begun 10 s after the response must be complete 30 s
        later; one sent in time is served.
        """
        unit = Unit(self)
        handler, transport = self._served(unit)
        unit.clock.advance(10)
        handler.dataReceived(b"GET /y HTTP/1.1\r\n")
        unit.clock.advance(29.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertIn("request head timed out", unit.debugLines()[0])

        unit = Unit(self)
        handler, transport = self._served(unit)
        unit.clock.advance(59)
        handler.dataReceived(GET)
        self.assertEqual(len(unit.agent.requests), 2)
        respond(unit)
        unit.clock.advance(59)
        self.assertTrue(transport.connected)


class TLSHandshakeTimeoutTests(SynchronousTestCase):
    """
    A TLS handshake with a client must finish in --tls-timeout (15 s).
    """

    def test_toTheProxy(self):
        """
        TLS to the proxy itself (a ClientHello begun, never finished): closed
        at 15 s with a client-tls proxy-error saying it timed out.
        """
        unit = Unit(self)
        protocol, transport = unit.connection()
        protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01")
        unit.clock.advance(14.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        (failure,) = unit.observer.failures
        self.assertEqual(failure.stage, STAGE_CLIENT_TLS)
        self.assertIn("did not complete the TLS handshake in 15 s", failure.reason)
        self.assertEqual(unit.debugLines(), ["127.0.0.1: closing, TLS handshake timed out"])

    def test_afterConnect(self):
        """
        After CONNECT to an intercepted host, the client must finish the TLS
        handshake with our leaf in 15 s.
        """
        unit = Unit(self, Timeouts(tls=3))
        handler, transport = unit.handler()
        handler.dataReceived(b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        unit.clock.advance(3)
        self.assertFalse(transport.connected)
        (failure,) = unit.observer.failures
        self.assertEqual((failure.stage, failure.server), (STAGE_CLIENT_TLS, "localhost"))


class RequestBodyTimeoutTests(SynchronousTestCase):
    """
    A request body may pause --header-timeout between bytes, unless the
    proxy itself stopped reading it.
    """

    def test_stalledBody(self):
        """
        Bytes reset the deadline; 30 s without one: closed and a
        client-timeout proxy-error (a request was in flight).
        """
        unit = Unit(self, Timeouts(response=0))
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
        unit.clock.advance(29)
        handler.dataReceived(b"!")
        unit.clock.advance(29.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        (failure,) = unit.observer.failures
        self.assertEqual((failure.stage, failure.method, failure.path), (STAGE_CLIENT_TIMEOUT, "POST", "/x"))
        self.assertEqual(unit.debugLines(), ["127.0.0.1: closing, request body timed out"])

    def test_pausedByUpstream(self):
        """
        While the upstream's backpressure has the client paused, the client
        is not timed out; the deadline starts again on resume.
        """
        unit = Unit(self, Timeouts(response=0))
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
        producer = unit.agent.requests[0].bodyProducer
        producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        unit.clock.advance(1000)
        self.assertTrue(transport.connected)
        producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        unit.clock.advance(30)
        self.assertFalse(transport.connected)


class UpstreamTimeoutTests(SynchronousTestCase):
    """
    The upstream's response head (--response-timeout, 60 s, 504) and the gaps
    in its body (--body-timeout, 60 s, the response cut short).
    """

    def test_responseHead(self):
        """
        No response head in 60 s: 504, the Agent's request cancelled, an
        upstream-timeout proxy-error, the connection closed.
        """
        unit = Unit(self)
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(GET)
        unit.clock.advance(59.9)
        self.assertEqual(transport.value(), b"")
        unit.clock.advance(0.1)
        self.assertEqual(status(transport.value()), 504)
        self.assertTrue(unit.agent.requests[0].cancelled)
        self.assertFalse(transport.connected)
        (failure,) = unit.observer.failures
        self.assertEqual(failure.stage, STAGE_UPSTREAM_TIMEOUT)

    def test_connectTimeoutAnswers504(self):
        """
        An upstream connect that timed out (the Agent's TimeoutError) is a
        504 too, not a 502.
        """
        unit = Unit(self)
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(GET)
        unit.agent.requests[0].deferred.errback(Failure(error.TimeoutError()))
        self.assertEqual(status(transport.value()), 504)
        self.assertEqual(unit.observer.failures[0].stage, STAGE_UPSTREAM_TIMEOUT)

    def _stalled(self, unit: Unit):  # type: ignore[no-untyped-def]
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(GET)
        response = respond(unit, length=100, body=b"x" * 10, finish=False)
        return handler, transport, response

    def test_bodyIdle(self):
        """
        A byte resets the 60 s; 60 s without one: the client's response ends
        short and its connection is aborted, one upstream-timeout proxy-error,
        one DEBUG line, the upstream stopped; the Agent's report of the cut
        body that follows adds nothing.
        """
        unit = Unit(self)
        handler, transport, response = self._stalled(unit)
        unit.clock.advance(59)
        response.protocol.dataReceived(b"y")  # type: ignore[union-attr]
        unit.clock.advance(59.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertTrue(transport.disconnected)  # set by abortConnection only
        self.assertTrue(transport.value().endswith(b"\r\n\r\n" + b"x" * 10 + b"y"))
        self.assertEqual(response.transport.state, "stopped")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))  # type: ignore[union-attr]
        self.assertEqual([f.stage for f in unit.observer.failures], [STAGE_UPSTREAM_TIMEOUT])
        self.assertEqual(unit.debugLines(), ["127.0.0.1: closing, upstream body stalled"])
        self.assertEqual(unit.observer.exchanges, [])

    def test_clientNotReading(self):
        """
        When the client stops reading, the upstream is paused and the timeout
        blames the client (client-timeout), not the upstream; reading again
        restarts the 60 s.
        """
        unit = Unit(self)
        handler, transport, response = self._stalled(unit)
        transport.producer.pauseProducing()
        self.assertEqual(response.transport.state, "paused")
        unit.clock.advance(50)
        transport.producer.resumeProducing()
        self.assertEqual(response.transport.state, "producing")
        unit.clock.advance(59.9)
        self.assertTrue(transport.connected)
        transport.producer.pauseProducing()
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        (failure,) = unit.observer.failures
        self.assertEqual(failure.stage, STAGE_CLIENT_TIMEOUT)
        self.assertIn("stopped reading", failure.reason)

    def test_cutShort(self):
        """
        An upstream that closes mid-body (no timeout): an upstream-response
        proxy-error and the client's connection aborted.
        """
        unit = Unit(self)
        handler, transport, response = self._stalled(unit)
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))  # type: ignore[union-attr]
        self.assertTrue(transport.disconnected)  # set by abortConnection only
        self.assertEqual([f.stage for f in unit.observer.failures], [STAGE_UPSTREAM_RESPONSE])

    def test_off(self):
        """
        --response-timeout 0 and --body-timeout 0 turn them off.
        """
        unit = Unit(self, Timeouts(response=0, body=0))
        handler, transport, response = self._stalled(unit)
        unit.clock.advance(10000)
        self.assertTrue(transport.connected)


class ConnectTimeoutTests(SynchronousTestCase):
    """
    --connect-timeout (10 s) reaches the connection attempts.
    """

    def test_tunnel(self):
        """
        A tunnel's upstream connection is attempted with the connect timeout.
        """
        unit = Unit(self, Timeouts(connect=7), policy=ConnectPolicy([], connectPorts=[8443]))
        handler, transport = unit.handler()
        handler.dataReceived(b"CONNECT 192.0.2.1:8443 HTTP/1.1\r\n\r\n")
        unit.clock.advance(0)
        (attempt,) = unit.clock.tcpClients
        self.assertEqual((attempt[1], attempt[3]), (8443, 7))

    def test_agent(self):
        """
        The upstream Agent's connections are attempted with it as well.
        """
        from keychestamp.upstream import UpstreamClient
        from tests.support import TestCA

        unit = Unit(self)
        client = UpstreamClient(unit.clock, connectTimeout=7, certificates=[TestCA().cert])
        client.agent.request(b"GET", b"https://192.0.2.1:4443/")
        unit.clock.advance(0)
        (attempt,) = unit.clock.tcpClients
        self.assertEqual((attempt[1], attempt[3]), (4443, 7))


class TunnelTimeoutTests(SynchronousTestCase):
    """
    A tunnel idle both ways for --tunnel-timeout (10 min) is closed.
    """

    def _tunnel(self, unit: Unit, draining: bool = True):  # type: ignore[no-untyped-def]
        opened: List[Tunnel] = []

        def open(handler, host, port, early):  # type: ignore[no-untyped-def]
            opened.append(Tunnel(unit.context, handler, host, port, early))
            return opened[-1]

        unit.context.tunnels.open = open  # type: ignore[assignment]
        if draining:
            handler, transport = unit.handler()
        else:
            handler = HTTPHandler(unit.context, ("127.0.0.1", 50000))
            transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
            handler.makeConnection(transport)
        handler.dataReceived(b"CONNECT dns-api.example:443 HTTP/1.1\r\n\r\n")
        upstream = TunnelUpstream(opened[0])
        upstreamTransport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 443))
        upstream.makeConnection(upstreamTransport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        return handler, transport, upstream, upstreamTransport

    def test_idle(self):
        """
        Traffic either way resets the 10 minutes; then both sides are closed
        with one DEBUG line.
        """
        unit = Unit(self, policy=ConnectPolicy([]))
        handler, transport, upstream, upstreamTransport = self._tunnel(unit)
        unit.clock.advance(300)
        handler.dataReceived(b"client bytes")
        unit.clock.advance(300)
        upstream.dataReceived(b"server bytes")
        unit.clock.advance(599.9)
        self.assertTrue(transport.connected)
        unit.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertTrue(upstreamTransport.disconnecting)
        self.assertEqual(upstreamTransport.value(), b"client bytes")
        self.assertTrue(transport.value().endswith(b"server bytes"))
        self.assertEqual(unit.debugLines(), ["tunnel to dns-api.example:443 idle, closing"])
        self.assertEqual(unit.observer.failures, [])

    def test_clientNotReadingAfterUpstreamClosed(self):
        """
        The upstream closed but the client does not read what is left: the
        client's connection is closing, and dropped when the timer fires.
        """
        unit = Unit(self, policy=ConnectPolicy([]))
        handler, transport, upstream, upstreamTransport = self._tunnel(unit, draining=False)
        upstream.dataReceived(b"last words")
        upstream.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(transport.disconnecting)
        unit.clock.advance(600)
        self.assertTrue(transport.disconnected)


class ClosingTests(SynchronousTestCase):
    """
    A connection the proxy closes is gone within --idle-timeout even if the
    client neither reads nor closes, and a paused socket is read again so
    the close can complete.
    """

    def test_clientNeverCloses(self):
        """
        After a 400 the transport is closing; a client that does not finish
        the close (its socket never drains, or no TLS close_notify comes) is
        aborted after the idle timeout, with one DEBUG line and no proxy-error.
        """
        unit = Unit(self)
        handler = HTTPHandler(unit.context, ("127.0.0.1", 50000), origin=ORIGIN)
        transport = StringTransport()  # does not report connectionLost by itself
        handler.makeConnection(transport)
        handler.dataReceived(b"GET /x HTTP/1.1\r\nHost : h\r\n\r\n")
        self.assertEqual(status(transport.value()), 400)
        self.assertTrue(transport.disconnecting)
        unit.clock.advance(59.9)
        self.assertFalse(transport.disconnected)
        unit.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(unit.debugLines(), ["127.0.0.1: closing, the close timed out"])
        self.assertEqual(unit.observer.failures, [])

    def test_closeWhilePaused(self):
        """
        A connection closed while the proxy had stopped reading it (pipelined
        requests beyond the buffer) is read again.
        """
        unit = Unit(self)
        handler, transport = unit.handler(ORIGIN)
        handler.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + GET * 3000)
        self.assertEqual(transport.producerState, "paused")
        respond(unit)
        self.assertFalse(transport.connected)
        self.assertEqual(transport.producerState, "producing")


# -- the same against real sockets, with small values ------------------------------


class RealTimeoutTests(TestCase):
    """
    The timeouts on a real proxy with sub-second values.
    """

    timeout = 60

    @inlineCallbacks
    def test_slowloris(self):
        """
        A client that never finishes its head is cut after --header-timeout;
        others are served meanwhile.
        """
        fx = yield startProxy(self, ["--header-timeout", "0.5"])
        started = reactor.seconds()
        client, done = openClient(fx.proxyPort, [], b"GET http://amp.keychest.net/ HTTP/1.1\r\nHost:")
        assertServed(self, (yield normalRequest(fx)))
        answer = yield done
        self.assertEqual(answer, b"")
        self.assertTrue(0.4 < reactor.seconds() - started < 5)

    @inlineCallbacks
    def test_tlsHandshake(self):
        """
        CONNECT, then no TLS: closed after --tls-timeout, a client-tls
        proxy-error.
        """
        fx = yield startProxy(self, ["--tls-timeout", "0.5"])
        answer = yield talk(fx.proxyPort, [], b"CONNECT localhost:%d HTTP/1.1\r\nHost: x\r\n\r\n" % fx.port)
        self.assertEqual(status(answer), 200)
        yield waitUntil(lambda: fx.observer.failures)
        self.assertEqual(fx.observer.failures[0].stage, STAGE_CLIENT_TLS)

    @inlineCallbacks
    def test_idleKeepAlive(self):
        """
        A keep-alive connection left idle after its response is closed after
        --idle-timeout.
        """
        fx = yield startProxy(self, ["--idle-timeout", "0.5"])
        started = reactor.seconds()
        answer = yield talk(fx.proxyPort, intercepted(b"localhost:%d" % fx.port),
                            b"GET /directory HTTP/1.1\r\nHost: localhost\r\n\r\n", fx.rootPEM)
        self.assertEqual(status(answer), 200)
        self.assertTrue(0.4 < reactor.seconds() - started < 5)

    @inlineCallbacks
    def test_responseHead(self):
        """
        An upstream that accepts the request and never answers: 504 after
        --response-timeout, and the upstream-timeout proxy-error.
        """
        fx = yield startProxy(self, ["--response-timeout", "0.5"])
        silent = ScriptedUpstream(self, fx, None)
        started = reactor.seconds()
        answer = yield talk(fx.proxyPort, intercepted(b"localhost:%d" % silent.port), GET, fx.rootPEM)
        self.assertEqual(status(answer), 504, answer)
        self.assertTrue(0.4 < reactor.seconds() - started < 5)
        self.assertEqual([f.stage for f in fx.observer.failures], [STAGE_UPSTREAM_TIMEOUT])
        self.assertEqual(len(silent.heads), 1)

    @inlineCallbacks
    def test_bodyIdle(self):
        """
        An upstream that stalls mid-body: after --body-timeout the client has
        the head and the bytes sent, and its connection closes; one
        upstream-timeout proxy-error; the next client is served.
        """
        fx = yield startProxy(self, ["--body-timeout", "0.5"])
        stalling = ScriptedUpstream(self, fx, writes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10))
        started = reactor.seconds()
        answer = yield talk(fx.proxyPort, intercepted(b"localhost:%d" % stalling.port), GET, fx.rootPEM)
        self.assertTrue(0.4 < reactor.seconds() - started < 5)
        head, body = answer.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Length: 100", head)
        self.assertEqual(body, b"x" * 10)
        yield waitUntil(lambda: fx.observer.failures)
        yield settle(0.1)
        self.assertEqual([f.stage for f in fx.observer.failures], [STAGE_UPSTREAM_TIMEOUT])
        assertServed(self, (yield normalRequest(fx)))

    @inlineCallbacks
    def test_connect(self):
        """
        An upstream whose accept queue is full (SYNs dropped): 504 after
        --connect-timeout.
        """
        blackhole = socket.socket()
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        self.addCleanup(blackhole.close)
        port = blackhole.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port), timeout=1)
        self.addCleanup(filler.close)
        fx = yield startProxy(self, ["--connect-timeout", "0.5", "--intercept", f"127.0.0.1:{port}"])
        started = reactor.seconds()
        answer = yield talk(fx.proxyPort, intercepted(b"127.0.0.1:%d" % port), GET, fx.rootPEM)
        self.assertEqual(status(answer), 504, answer)
        self.assertTrue(0.4 < reactor.seconds() - started < 5)
        self.assertEqual([f.stage for f in fx.observer.failures], [STAGE_UPSTREAM_TIMEOUT])

    @inlineCallbacks
    def test_tlsCloseNeverAnswered(self):
        """
        A client on an intercepted stream that stops reading after its bad
        request never answers the proxy's close_notify: the proxy drops the
        connection after --idle-timeout anyway.
        """
        fx = yield startProxy(self, ["--idle-timeout", "0.5"])
        client, done = openClient(fx.proxyPort, intercepted(b"localhost:%d" % fx.port),
                                  b"GET /directory HTTP/1.1\r\nHost: localhost\r\n\r\n", fx.rootPEM)
        yield waitUntil(lambda: client.received.endswith(b'"}'), what="a first response")
        client.received = b""
        client.socket.transport.pauseProducing()
        client.transport.write(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n")
        yield waitUntil(lambda: fx.service.factory.connections == 1)
        started = reactor.seconds()
        yield waitUntil(lambda: fx.service.factory.connections == 0, 5, "the proxy to drop the connection")
        self.assertLess(reactor.seconds() - started, 3)
        client.socket.transport.resumeProducing()
        answer = yield done
        self.assertEqual(status(answer), 400)

    @inlineCallbacks
    def test_tunnelIdle(self):
        """
        A tunnel with no traffic either way is closed after --tunnel-timeout.
        """
        upstream = ScriptedUpstream(self, None, None, tls=False)
        fx = yield startProxy(self, ["--tunnel-timeout", "0.5", "--connect-port", str(upstream.port)], intercept=False)
        started = reactor.seconds()
        answer = yield talk(fx.proxyPort, [], b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % upstream.port)
        self.assertEqual(status(answer), 200)
        self.assertTrue(0.4 < reactor.seconds() - started < 5)
        yield waitUntil(lambda: upstream.connections and upstream.connections[0].lost)
