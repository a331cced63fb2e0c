"""
Blind tunnels for hosts that are not intercepted (DNS-provider APIs and other
non-ACME traffic sent through the same proxy): bytes both ways, with
backpressure and half-close, and an idle timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from keychestamp.exchange import STAGE_UPSTREAM_CONNECT, STAGE_UPSTREAM_TIMEOUT, ProxyFailure
from keychestamp.proxy.policy import clientAddress

if TYPE_CHECKING:
    from keychestamp.proxy.http import HTTPHandler
    from keychestamp.proxy.server import ProxyContext


@implementer(IHalfCloseableProtocol)
class TunnelUpstream(Protocol):
    """
    The upstream leg of a tunnel.
    """

    def __init__(self, tunnel: "Tunnel") -> None:
        self._tunnel = tunnel

    def connectionMade(self) -> None:
        self._tunnel.upstreamConnected(self)

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.fromUpstream(data)

    _readClosed = _writeClosed = False

    def readConnectionLost(self) -> None:
        self._readClosed = True
        self._tunnel.upstreamHalfClosed()
        if self._writeClosed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # Twisted does not close a socket shut down both ways by itself
        self._writeClosed = True
        if self._readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tunnel.upstreamLost()


class Tunnel(Protocol):
    """
    The client leg: it sits where the client's HTTP handler diverts its bytes
    after CONNECT.
    """

    def __init__(self, context: "ProxyContext", handler: "HTTPHandler", host: str, port: int, early: bytes) -> None:
        self._ctx = context
        self._handler = handler
        self._host = host
        self._port = port
        self._early = [early] if early else []
        self._upstream: Optional[TunnelUpstream] = None
        self._timer: Optional[IDelayedCall] = None
        self._closed = False

    def start(self) -> None:
        # what the client sends before the upstream answers waits in the
        # socket, not in our memory
        self._handler.pauseReading("tunnel")
        endpoint = HostnameEndpoint(
            self._ctx.reactor, self._host, self._port, timeout=self._ctx.timeouts.connect or None
        )
        d = endpoint.connect(Factory.forProtocol(lambda: TunnelUpstream(self)))
        d.addErrback(self._connectFailed)

    def _connectFailed(self, reason: Failure) -> None:
        if self._closed:
            return
        timeout = "timeout" in reason.getErrorMessage().lower()
        stage = STAGE_UPSTREAM_TIMEOUT if timeout else STAGE_UPSTREAM_CONNECT
        text = f"cannot open a tunnel to {self._host}:{self._port}: {reason.getErrorMessage()}"
        self._ctx.observer.proxyFailed(
            ProxyFailure(
                client=self._handler._client[0],
                server=f"{self._host}:{self._port}",
                stage=stage,
                reason=text,
                time=self._ctx.reactor.seconds(),
                method="CONNECT",
            )
        )
        self._handler.tunnelFailed(504 if timeout else 502, text)

    def upstreamConnected(self, upstream: TunnelUpstream) -> None:
        if self._closed:
            upstream.transport.abortConnection()
            return
        if _address(upstream.transport.getPeer()) == _address(self._handler.transport.getHost()):
            # a name that resolved to the very address the client reached us on
            upstream.transport.abortConnection()
            self._ctx.log.info(
                "{client}: refused CONNECT {host}:{port}: the proxy's own address (a loop)",
                client=self._handler._client[0], host=self._host, port=self._port,
            )
            self._handler.tunnelFailed(
                403, f"CONNECT {self._host}:{self._port} refused: the proxy's own address (a loop)"
            )
            return
        self._upstream = upstream
        client = self._handler.transport
        client.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        for data in self._early:
            upstream.transport.write(data)
        self._early = []
        client.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(client, True)
        self._handler.resumeReading("tunnel")
        self._arm()

    def _arm(self) -> None:
        seconds = self._ctx.timeouts.tunnel
        if not seconds or self._closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self._ctx.reactor.callLater(seconds, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self._ctx.log.debug("tunnel to {host}:{port} idle, closing", host=self._host, port=self._port)
        self._handler.transport.abortConnection()
        if self._upstream is not None:
            self._upstream.transport.abortConnection()

    # client -> upstream
    def dataReceived(self, data: bytes) -> None:
        if self._upstream is None:
            self._early.append(data)
        else:
            self._upstream.transport.write(data)
            self._arm()

    def readConnectionLost(self) -> None:
        if self._upstream is not None:
            self._upstream.transport.loseWriteConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._upstream is not None:
            self._upstream.transport.loseConnection()

    # upstream -> client
    def fromUpstream(self, data: bytes) -> None:
        if self._closed:
            return
        self._handler.transport.write(data)
        self._arm()

    def upstreamHalfClosed(self) -> None:
        client = self._handler.transport
        if not isinstance(client, TLSMemoryBIOProtocol):
            client.loseWriteConnection()
        else:
            client.loseConnection()

    def upstreamLost(self) -> None:
        # the idle timer keeps running: a client that does not read what is
        # left is dropped when it fires
        if not self._closed:
            self._handler.transport.loseConnection()


def _address(address: object) -> Tuple[str, int]:
    return clientAddress(getattr(address, "host", "")), getattr(address, "port", 0)


class TunnelOpener:
    """
    Opens tunnels for a proxy (the seam tests replace).
    """

    def __init__(self, context: "ProxyContext") -> None:
        self._ctx = context

    def open(self, handler: "HTTPHandler", host: str, port: int, early: bytes) -> Tunnel:
        tunnel = Tunnel(self._ctx, handler, host, port, early)
        tunnel.start()
        return tunnel
