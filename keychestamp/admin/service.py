# -*- test-case-name: tests.test_admin -*-
"""
The admin listener as a service: a twisted.web Site on the --admin
endpoint, admitting only clients inside --allow, like the proxy itself.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from keychestamp.admin.metrics import AdminMetrics
from keychestamp.admin.resources import adminRoot
from keychestamp.admin.stats import AdminStats
from keychestamp.admin.status import StatusSource
from keychestamp.proxy.http import simpleResponse
from keychestamp.proxy.policy import ClientACL, clientAddress

#: A refused client gets this long to send its request head.
REFUSE_TIMEOUT = 10.0

#: The most bytes read from a refused client before answering.
REFUSE_READ_LIMIT = 16384


class _Forbidden(Protocol):
    """
    Reads the request head of a client outside --allow, answers 403 and
    closes. (Closing before reading would make the kernel reset the
    connection, and the client would see an error instead of the answer.)
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._seen = b""
        self._timeout: Any = None

    def connectionMade(self) -> None:
        self._timeout = self._clock.callLater(REFUSE_TIMEOUT, self._answer)

    def dataReceived(self, data: bytes) -> None:
        self._seen = (self._seen + data)[-REFUSE_READ_LIMIT:]
        if b"\r\n\r\n" in self._seen or b"\n\n" in self._seen or len(self._seen) >= REFUSE_READ_LIMIT:
            self._answer()

    def _answer(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self.transport is not None and self.connected:
            self.transport.write(simpleResponse(403, "this admin listener does not serve your address\n"))
            self.transport.loseConnection()
            self.connected = False

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


class AdminSite(Site):
    """
    The admin Site: --allow first; no access log (a scrape every few
    seconds would bury twistd's log).
    """

    noisy = False
    displayTracebacks = False

    def __init__(self, resource: Resource, acl: ClientACL, clock: IReactorTime, log: Optional[Logger] = None) -> None:
        super().__init__(resource, timeout=60)
        self._acl = acl
        self._clock = clock
        self._diagnostics = log or Logger()

    def buildProtocol(self, addr: Any) -> Any:
        """
        A 403 for a client outside --allow, else the usual HTTP channel.
        """
        host = getattr(addr, "host", None)
        if host is not None and not self._acl.allows(host):
            self._diagnostics.warn("admin listener refused client {client}: not in --allow",
                                   client=clientAddress(host))
            return _Forbidden(self._clock)
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        """
        No access log.
        """


class AdminService(Service):
    """
    Listens on the admin endpoint while running. A port that cannot be
    bound fails C{startService} at once, so the proxy does not start
    half-configured.

    @ivar port: the L{IListeningPort} while listening, else None.
    @ivar source: the L{StatusSource} behind every page.
    @ivar metrics: the L{AdminMetrics} behind /metrics.
    """

    name = "admin"

    def __init__(self, endpoint: Any, site: AdminSite, source: StatusSource, metrics: AdminMetrics,
                 log: Optional[Logger] = None) -> None:
        self._endpoint = endpoint
        self._site = site
        self.source = source
        self.metrics = metrics
        self.port: Optional[IListeningPort] = None
        self._log = log or Logger()

    def startService(self) -> None:
        """
        Listen; raise at once if the endpoint refuses.
        """
        Service.startService(self)
        outcome: list = []
        d: Deferred = self._endpoint.listen(self._site)
        d.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            self.running = False
            outcome[0].raiseException()
        if outcome:
            self._listening(outcome[0])
        else:
            d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        if not self.running:
            port.stopListening()
            return
        self.port = port
        host = port.getHost()
        address = f"{host.host}:{host.port}" if hasattr(host, "port") else str(host)
        self._log.info("keychestamp admin listener on {address}", address=address)

    def _failed(self, reason: Failure) -> None:
        self._log.failure("keychestamp admin listener could not listen", reason)

    def stopService(self) -> Optional[Deferred]:  # type: ignore[override]
        """
        Stop listening (open connections end with the process).
        """
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _proxyListening(parent: Any) -> bool:
    port = getattr(parent, "listeningPort", None)
    return port is not None and bool(getattr(port, "connected", True))


def _proxyConnections(parent: Any) -> int:
    factory = getattr(parent, "factory", None)
    return int(getattr(factory, "connections", 0) or 0)


def _sinkHealth(parent: Any) -> Any:
    events = getattr(parent, "events", None)
    return events.health() if events is not None else {}


def makeAdminService(
    description: str,
    reactor: Any,
    parent: Any,
    stats: AdminStats,
    acl: ClientACL,
    proxyId: str,
    version: str,
    poster: Any = None,
    headroom: Any = None,
    endpoint: Any = None,
    log: Optional[Logger] = None,
) -> AdminService:
    """
    The admin listener of the proxy tree C{parent} (read for its
    C{listeningPort}, C{factory.connections} and C{events.health()}).

    @param description: the --admin endpoint string.
    @param stats: the L{AdminStats} sink already among the proxy's sinks.
    @param poster: the poster, or None with -n.
    @param headroom: an L{keychestamp.admin.interfaces.IHeadroom} provider
        (the rate-limit ledger), or None.
    @param endpoint: listen here instead of C{description} (tests).
    """
    if endpoint is None:
        from twisted.internet.endpoints import serverFromString

        endpoint = serverFromString(reactor, description)
    if headroom is not None and not callable(getattr(headroom, "headroom", None)):
        headroom = None
    metrics = AdminMetrics()
    stats.subscribe(metrics.observe)
    source = StatusSource(
        stats,
        reactor,
        proxyId,
        version,
        listening=lambda: _proxyListening(parent),
        health=lambda: _sinkHealth(parent),
        connections=lambda: _proxyConnections(parent),
        poster=poster,
        headroom=headroom,
        host=socket.gethostname(),
    )
    site = AdminSite(adminRoot(source, metrics), acl, reactor, log)
    return AdminService(endpoint, site, source, metrics, log)
