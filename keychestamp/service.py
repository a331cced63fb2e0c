"""
makeService(): the MultiService tree of one proxy, built from parsed Options.

    MultiService
      event-ids      IdStore (stops last: it is added first)
      file           FileSink (with -f / -n)
      poster         Poster (unless -n)
      ledger         rate-limit ledger: a sink, its SQLite file and its timer
      upstream       closes the Agent's pooled connections on stop
      proxy          the listening port
      admin          status page, /status.json, /metrics, /healthz (with --admin)

Nothing here is global: two services built from two Options run side by side
in one process.
"""

from __future__ import annotations

import os
import socket
from typing import Any, List, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from twisted.python.filepath import FilePath
from zope.interface import classImplements

from keychestamp import __version__
from keychestamp.acme.classifier import AcmeClassifier, IEventLogger
from keychestamp.ca import CertificateAuthority
from keychestamp.events import IEventSink, EventLog, IdStore
from keychestamp.exchange import IExchangeObserver, LoggingObserver, ObserverFanOut
from keychestamp.ledger.ledger import makeLedger
from keychestamp.options import Options
from keychestamp.proxy.http11 import Limits
from keychestamp.proxy.policy import ClientACL, ConnectPolicy
from keychestamp.proxy.server import ProxyContext, ProxyFactory, Timeouts
from keychestamp.sinks.file import FileSink
from keychestamp.sinks.poster import Poster, buildHTTPClient
from keychestamp.sinks.spool import Spool
from keychestamp.upstream import UpstreamClient, systemBundlePath, trustRoot, trustedCertificates


classImplements(EventLog, IEventLogger)


def diagnosticsLogger(level: str, namespace: str = "keychestamp") -> Logger:
    """
    A Logger whose events below -l's level are dropped before they reach
    twistd's log. Per service, not global.
    """
    name = {"WARNING": "warn"}.get(level.upper(), level.lower())
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(name))
    return Logger(namespace=namespace, observer=FilteringLogObserver(globalLogPublisher, [predicate]))


def proxyAddress() -> str:
    """
    The proxy's own IP address for the events' "ip" field.
    """
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def makePoster(options: Options, workdir: FilePath, reactor: Any) -> Poster:
    """
    The poster with its spool in the working directory, trusting the system
    roots plus --upstream-ca (a private collector).
    """
    spool = Spool(workdir.child("spool"))
    client, pool = buildHTTPClient(
        reactor, trustRoot(trustedCertificates(options["upstream-ca"])), options["connect-timeout"]
    )
    return Poster(spool, options["api-url"], client, reactor, headers=dict(options["api-header"]), pool=pool)


class _UpstreamService(Service):
    name = "upstream"

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream

    def stopService(self):  # type: ignore[no-untyped-def]
        Service.stopService(self)
        return self._upstream.close()


class _BundlePEM:
    """
    Our root followed by the system trust store, for clients whose CA setting
    replaces the system roots (REQUESTS_CA_BUNDLE, LEGO_CA_CERTIFICATES).
    """

    def __init__(self, rootPEM: bytes) -> None:
        self._rootPEM = rootPEM
        self._cached: Optional[bytes] = None

    def __call__(self) -> bytes:
        if self._cached is None:
            system = systemBundlePath()
            extra = b""
            if system:
                with open(system, "rb") as f:
                    extra = f.read()
            self._cached = self._rootPEM + b"\n" + extra
        return self._cached


class _RecordingEndpoint:
    """
    Remembers the listening port, so the tree can tell where it listens
    (tests and embedders pass port 0 through C{endpoint}).
    """

    def __init__(self, endpoint: Any, parent: MultiService) -> None:
        self._endpoint = endpoint
        self._parent = parent

    def listen(self, factory: Any) -> Any:
        d = self._endpoint.listen(factory)

        def record(port: Any) -> Any:
            self._parent.listeningPort = port  # type: ignore[attr-defined]
            return port

        return d.addCallback(record)


def makeService(
    options: Options,
    reactor: Any = None,
    extraObservers: List[IExchangeObserver] = (),
    endpoint: Any = None,
) -> MultiService:
    """
    The whole proxy as one MultiService. C{endpoint} replaces the listening
    endpoint that --addr/--port name (embedders, tests on port 0); once
    started, the tree's C{listeningPort} is the IListeningPort.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    log = diagnosticsLogger(options["level"])
    workdir = FilePath(os.path.abspath(options["etc"]))
    ca = options.get("authority") or CertificateAuthority(workdir.child("ca"))
    parent = MultiService()

    ids = IdStore(workdir.child("event-id"))
    ids.setServiceParent(parent)
    sinks: List[IEventSink] = []
    if options["file"]:
        fileSink = FileSink(options["file"], reactor, reopenOnSignal=options.get("reopen-on-sighup", True))
        fileSink.setServiceParent(parent)
        sinks.append(fileSink)
    backlog = None
    if not options["noapi"]:
        poster = makePoster(options, workdir, reactor)
        poster.setServiceParent(parent)
        sinks.append(poster)
        backlog = poster
    adminStats = None
    if options.get("admin"):
        from keychestamp.admin.stats import AdminStats

        adminStats = AdminStats(reactor)
        sinks.append(adminStats)
    # The ledger is the last sink: it sees each event after the others took
    # it, and its derived events go back through the event log below.
    ledger = makeLedger(options, workdir, reactor, log)
    ledger.setServiceParent(parent)
    sinks.append(ledger)
    parent.ledger = ledger  # type: ignore[attr-defined]
    events = EventLog(
        options["proxy-id"],
        sinks,
        ids,
        reactor,
        host=socket.gethostname(),
        ip=proxyAddress(),
        version=__version__,
        backlog=backlog,
    )
    parent.events = events  # type: ignore[attr-defined]
    ledger.setEventLog(events.log)

    observer = ObserverFanOut([LoggingObserver(log), AcmeClassifier(events), *extraObservers], log)

    upstream = UpstreamClient(reactor, options["upstream-ca"], connectTimeout=options["connect-timeout"])
    _UpstreamService(upstream).setServiceParent(parent)

    port, addr = options["port"], options["addr"]
    own = [(addr or "::", port), ("localhost", port), ("127.0.0.1", port), ("::1", port)]
    if addr in (None, "::", "0.0.0.0"):
        own.append((socket.gethostname(), port))
    context = ProxyContext(
        reactor,
        ca,
        upstream,
        observer,
        ConnectPolicy(options["intercept"], options["connect-port"], ownAddresses=own),
        ClientACL(options["allow"]),
        limits=Limits(
            maxRequestLine=options["max-request-line"],
            maxHeaderSize=options["max-header-size"],
            maxHeaders=options["max-headers"],
        ),
        timeouts=Timeouts(
            header=options["header-timeout"],
            tls=options["tls-timeout"],
            idle=options["idle-timeout"],
            connect=options["connect-timeout"],
            response=options["response-timeout"],
            body=options["body-timeout"],
            tunnel=options["tunnel-timeout"],
        ),
        maxConnections=options["max-connections"],
        bundlePEM=_BundlePEM(ca.rootPEM),
        log=log,
    )
    if endpoint is not None:
        pass
    elif addr is None or ":" in addr:
        endpoint = TCP6ServerEndpoint(reactor, port, backlog=1024, interface=addr or "::")
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, backlog=1024, interface=addr)
    factory = ProxyFactory(context)
    parent.factory = factory  # type: ignore[attr-defined]
    listener = StreamServerEndpointService(_RecordingEndpoint(endpoint, parent), factory)
    listener._raiseSynchronously = True
    listener.setName("proxy")
    listener.setServiceParent(parent)
    parent.context = context  # type: ignore[attr-defined]
    if adminStats is not None:
        from keychestamp.admin.service import makeAdminService

        # Last child: stops first, and never on the proxy's port.
        admin = makeAdminService(
            options["admin"], reactor, parent, adminStats, ClientACL(options["allow"]),
            options["proxy-id"], __version__, poster=backlog,
            headroom=getattr(parent, "ledger", None), log=log,
        )
        admin.setServiceParent(parent)
        parent.admin = admin  # type: ignore[attr-defined]
    log.info(
        "keychestamp {version} proxy {id} on {addr} port {port}; working directory {etc}",
        version=__version__, id=options["proxy-id"], addr=addr or "::", port=port, etc=workdir.path,
    )
    return parent
