"""
The listening side: the factory that admits clients (--allow, connection cap),
the per-connection protocol that tells TLS from plain HTTP on the first bytes,
and the TLS layering that works the same over TCP and inside another TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from keychestamp.ca import CertificateAuthority, LeafServerCreator, serverContext, sniContext
from keychestamp.exchange import IExchangeObserver
from keychestamp.proxy.http import HTTPHandler, simpleResponse
from keychestamp.proxy.http11 import Limits
from keychestamp.proxy.policy import ClientACL, ConnectPolicy, clientAddress
from keychestamp.proxy.tunnel import TunnelOpener
from keychestamp.upstream import UpstreamClient


@dataclass
class Timeouts:
    """
    Seconds; 0 turns a timeout off.
    """

    header: float = 30.0
    tls: float = 15.0
    idle: float = 60.0
    connect: float = 10.0
    response: float = 60.0
    body: float = 60.0
    tunnel: float = 600.0


class ProxyContext:
    """
    Everything a connection needs, built once per proxy and passed down
    explicitly (no module state, so two proxies can share a process).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        ca: CertificateAuthority,
        upstream: UpstreamClient,
        observer: IExchangeObserver,
        policy: ConnectPolicy,
        acl: ClientACL,
        limits: Optional[Limits] = None,
        timeouts: Optional[Timeouts] = None,
        maxConnections: int = 1024,
        bundlePEM: Optional[Callable[[], bytes]] = None,
        log: Optional[Logger] = None,
    ) -> None:
        self.reactor = reactor
        self.ca = ca
        self.upstream = upstream
        self.observer = observer
        self.policy = policy
        self.acl = acl
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.maxConnections = maxConnections
        self.bundlePEM = bundlePEM or (lambda: ca.rootPEM)
        self.log = log or Logger(namespace="keychestamp.proxy")
        self.tunnels = TunnelOpener(self)
        self._leafContext = serverContext()
        self._sniContext = sniContext(ca)

    def wrapTLS(self, transport: object, inner: Protocol, name: Optional[str]) -> Protocol:
        """
        Put server-side TLS between C{transport} and C{inner}, presenting a leaf
        for C{name}; None means the client speaks TLS to the proxy itself, and
        the leaf follows its SNI (else the local address).

        The returned protocol takes the raw bytes: the caller forwards its
        dataReceived/connectionLost into it. Unlike transport.startTLS this
        stacks correctly inside an outer TLS layer.
        """
        if name is None:
            local = transport.getHost().host  # type: ignore[attr-defined]
            creator = LeafServerCreator(self._sniContext, self.ca.leafFor(clientAddress(local)))
        else:
            creator = LeafServerCreator(self._leafContext, self.ca.leafFor(name))
        factory = TLSMemoryBIOFactory(creator, False, _OneProtocol(inner), clock=self.reactor)
        tls = factory.buildProtocol(transport.getPeer())  # type: ignore[attr-defined]
        tls.makeConnection(transport)
        return tls


class _OneProtocol(Factory):
    """
    A factory that hands out one protocol built in advance.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


def _looksLikeTLS(data: bytes) -> Optional[bool]:
    """
    A TLS ClientHello starts with a handshake record: 0x16 0x03 (0x00..0x03).
    None while we cannot tell yet.
    """
    if data[0] != 0x16:
        return False
    if len(data) < 3:
        return None
    return data[1] == 0x03 and data[2] <= 0x03


@implementer(IHalfCloseableProtocol)
class ProxyConnection(Protocol):
    """
    One client connection on the listening port.
    """

    def __init__(self, context: ProxyContext, factory: "ProxyFactory") -> None:
        self._ctx = context
        self._factory = factory
        self._sink: Optional[Protocol] = None
        self._handler: Optional[HTTPHandler] = None
        self._early = b""

    def connectionMade(self) -> None:
        self._factory.connections += 1
        peer = self.transport.getPeer()
        self._client = (clientAddress(peer.host), peer.port)
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self._handler = HTTPHandler(self._ctx, self._client)
        self._handler.opened = self._ctx.reactor.seconds()
        self._firstBytes = None
        if self._ctx.timeouts.header:
            self._firstBytes = self._ctx.reactor.callLater(self._ctx.timeouts.header, self._silent)

    def _silent(self) -> None:
        self._firstBytes = None
        self._ctx.log.debug("{client}: closing, sent nothing in time", client=self._client[0])
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.dataReceived(data)
            return
        data = self._early + data
        tls = _looksLikeTLS(data)
        if tls is None:
            self._early = data
            return
        self._early = b""
        if self._firstBytes is not None and self._firstBytes.active():
            self._firstBytes.cancel()
        assert self._handler is not None
        if tls:
            self._handler._tls = True
            self._handler._handshook = False
            self._sink = self._ctx.wrapTLS(self.transport, self._handler, None)
        else:
            self._handler.makeConnection(self.transport)
            self._sink = self._handler
        self._sink.dataReceived(data)

    _readClosed = _writeClosed = False

    def readConnectionLost(self) -> None:
        self._readClosed = True
        if self._sink is self._handler and self._handler is not None:
            self._handler.readConnectionLost()
        else:
            self.transport.loseConnection()
        if self._writeClosed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # Twisted does not close a socket shut down both ways by itself
        self._writeClosed = True
        if self._readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._factory.connections -= 1
        if self._firstBytes is not None and self._firstBytes.active():
            self._firstBytes.cancel()
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.connectionLost(reason)


class _Refuse(Protocol):
    """
    Answers one fixed response and closes: clients outside --allow (403) and
    connections beyond --max-connections (503).
    """

    def __init__(self, response: bytes) -> None:
        self._response = response

    def connectionMade(self) -> None:
        self.transport.write(self._response)
        self.transport.loseConnection()


class ProxyFactory(Factory):
    """
    Admits clients: --allow first, then the connection cap.
    """

    noisy = False

    def __init__(self, context: ProxyContext) -> None:
        self._ctx = context
        self.connections = 0

    def buildProtocol(self, addr) -> Protocol:  # type: ignore[no-untyped-def]
        host = getattr(addr, "host", "")
        if not self._ctx.acl.allows(host):
            self._ctx.log.warn(
                "refused client {client}: not in --allow", client=clientAddress(host)
            )
            return _Refuse(simpleResponse(403, "this proxy does not serve your address\n"))
        if self.connections >= self._ctx.maxConnections:
            self._ctx.log.warn(
                "refused client {client}: {n} connections open (--max-connections)",
                client=clientAddress(host), n=self.connections,
            )
            return _Refuse(simpleResponse(503, "too many connections, retry later\n", ((b"Retry-After", b"1"),)))
        return ProxyConnection(self._ctx, self)
