"""
The record of one relayed HTTP exchange, and the seam through which the proxy hands it on.

The proxy knows nothing about ACME: it builds an L{Exchange} for every request it
relayed (or a L{ProxyFailure} when it could not) and gives it to an
L{IExchangeObserver}. The ACME classifier is one such observer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from twisted.logger import Logger
from zope.interface import Interface, implementer

HeaderList = List[Tuple[str, str]]

#: How much of a request or response body the observer gets; longer bodies are
#: relayed in full but only this prefix is kept (ACME messages are a few KB).
OBSERVED_BODY_LIMIT = 256 * 1024


def headerValues(headers: Sequence[Tuple[str, str]], name: str) -> List[str]:
    """
    All values of a header, in order; names compare case-insensitively.
    """
    name = name.lower()
    return [v for (n, v) in headers if n.lower() == name]


def headerValue(headers: Sequence[Tuple[str, str]], name: str) -> Optional[str]:
    """
    The first value of a header, or None.
    """
    values = headerValues(headers, name)
    return values[0] if values else None


@dataclass
class Exchange:
    """
    One request the proxy relayed and the response it relayed back.

    Header names keep the case they had on the wire; values are latin-1 decoded
    strings. Bodies hold at most L{OBSERVED_BODY_LIMIT} bytes; the response body
    is decoded (gzip/deflate removed) so an observer can parse it.
    """

    client: str
    """The client's IP address (IPv4-mapped IPv6 shown as IPv4)."""
    clientPort: int
    method: str
    scheme: str
    """'https' for intercepted CONNECT streams, 'http' for absolute-form requests."""
    host: str
    port: int
    path: str
    """The request target in origin form (path and query)."""
    requestHeaders: HeaderList
    requestBody: bytes
    status: int
    responseHeaders: HeaderList
    responseBody: bytes
    started: float
    """Seconds since the epoch when the request head was complete."""
    finished: float
    """Seconds since the epoch when the response was fully relayed."""
    requestTruncated: bool = False
    responseTruncated: bool = False

    @property
    def server(self) -> str:
        """
        The upstream authority as the event's "server" field shows it: the host,
        with the port only when it is not the scheme's default.
        """
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The absolute URL of the request."""
        return f"{self.scheme}://{self.server}{self.path}"

    @property
    def origin(self) -> str:
        """scheme://authority, the key under which an ACME directory is remembered."""
        return f"{self.scheme}://{self.server}"


@dataclass
class ProxyFailure:
    """
    Something the proxy could not do for a client: the TLS handshake with our
    leaf failed, the upstream was unreachable, timed out or failed verification.
    """

    client: str
    server: str
    """host[:port] of the intended upstream ('' when unknown)."""
    stage: str
    """One of the STAGE_* names below."""
    reason: str
    time: float
    method: Optional[str] = None
    path: Optional[str] = None
    userAgent: Optional[str] = None


STAGE_CLIENT_TLS = "client-tls"
"""The client aborted the TLS handshake with our leaf (usually: it does not trust our CA)."""
STAGE_UPSTREAM_CONNECT = "upstream-connect"
"""The upstream could not be reached (refused, DNS failure, unreachable)."""
STAGE_UPSTREAM_TLS = "upstream-tls"
"""The upstream's TLS failed: verification failed, alert or close in the handshake."""
STAGE_UPSTREAM_TIMEOUT = "upstream-timeout"
"""The upstream did not connect or answer in time."""
STAGE_UPSTREAM_RESPONSE = "upstream-response"
"""The upstream's response was malformed or cut short."""
STAGE_CLIENT_TIMEOUT = "client-timeout"
"""The client did not finish its request in time."""


class IExchangeObserver(Interface):
    """
    Receives every completed exchange and every proxy-level failure.

    Implementations must not raise and must return quickly: they run on the
    reactor thread in the middle of the proxy's data path.
    """

    def exchangeCompleted(exchange: Exchange) -> None:
        """
        A request was relayed and its response relayed back in full.
        """

    def proxyFailed(failure: ProxyFailure) -> None:
        """
        The proxy could not serve a client; see L{ProxyFailure}.
        """


@implementer(IExchangeObserver)
class LoggingObserver:
    """
    The default observer: one DEBUG diagnostic line per exchange.
    """

    def __init__(self, log: Optional[Logger] = None) -> None:
        self._log = log if log is not None else Logger()

    def exchangeCompleted(self, exchange: Exchange) -> None:
        self._log.debug(
            "{client} {method} {url} -> {status} ({ms:.1f} ms)",
            client=exchange.client,
            method=exchange.method,
            url=exchange.url,
            status=exchange.status,
            ms=(exchange.finished - exchange.started) * 1000,
        )

    def proxyFailed(self, failure: ProxyFailure) -> None:
        self._log.debug(
            "{client} -> {server}: {stage}: {reason}",
            client=failure.client,
            server=failure.server,
            stage=failure.stage,
            reason=failure.reason,
        )


@implementer(IExchangeObserver)
class ObserverFanOut:
    """
    Hands each exchange to several observers; one that raises does not stop
    the others and never reaches the proxy.
    """

    def __init__(self, observers: Sequence[IExchangeObserver], log: Optional[Logger] = None) -> None:
        self._observers = list(observers)
        self._log = log if log is not None else Logger()

    def exchangeCompleted(self, exchange: Exchange) -> None:
        for observer in self._observers:
            try:
                observer.exchangeCompleted(exchange)
            except Exception:
                self._log.failure("exchange observer {observer!r} failed", observer=observer)

    def proxyFailed(self, failure: ProxyFailure) -> None:
        for observer in self._observers:
            try:
                observer.proxyFailed(failure)
            except Exception:
                self._log.failure("exchange observer {observer!r} failed", observer=observer)
