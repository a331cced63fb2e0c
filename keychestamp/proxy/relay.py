"""
Moving bodies between the client and the upstream with backpressure, keeping
the first bytes of each for the exchange observer; and the Agent's connection
protocol that checks each upstream response head strictly.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable, List, Optional

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import STATUS, HTTP11ClientProtocol
from twisted.web.client import ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from keychestamp.exchange import OBSERVED_BODY_LIMIT
from keychestamp.proxy.http11 import HTTPError, Limits, checkResponseHead, findHeadEnd

if TYPE_CHECKING:
    from keychestamp.proxy.http import HTTPHandler


class BodyTap:
    """
    Keeps at most OBSERVED_BODY_LIMIT bytes of a body and notes whether there
    was more.
    """

    __slots__ = ("_parts", "_size", "truncated")

    def __init__(self) -> None:
        self._parts: List[bytes] = []
        self._size = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = OBSERVED_BODY_LIMIT - self._size
        if room <= 0:
            if data:
                self.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self._parts.append(data)
        self._size += len(data)

    def value(self) -> bytes:
        return b"".join(self._parts)


def decodeContent(body: bytes, encoding: Optional[str]) -> bytes:
    """
    The body with its Content-Encoding (gzip, deflate) removed, for the
    observer only; the client gets the bytes as sent. Undecodable bodies are
    returned as they are.
    """
    if not encoding or not body:
        return body
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        wbits = 47
    elif encoding == "deflate":
        wbits = 15
    else:
        return body
    try:
        return zlib.decompressobj(wbits).decompress(body, OBSERVED_BODY_LIMIT)
    except zlib.error:
        if encoding == "deflate":
            try:
                return zlib.decompressobj(-15).decompress(body, OBSERVED_BODY_LIMIT)
            except zlib.error:
                pass
        return body


@implementer(IBodyProducer)
class StreamingBody:
    """
    The client's request body as the Agent's body producer: bytes go upstream
    as they arrive, and when the upstream is slow the client is paused.
    """

    def __init__(self, length: Optional[int], pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause = pause
        self._resume = resume
        self._consumer: Optional[IConsumer] = None
        self._pending: List[bytes] = []
        self._pendingSize = 0
        self._done: Optional[Deferred] = None
        self._complete = False
        self._failed: Optional[Failure] = None
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred:
        if self._failed is not None:
            # the client went away before the Agent was ready for the body
            return fail(self._failed)
        self._consumer = consumer
        for chunk in self._pending:
            consumer.write(chunk)
        if self._pendingSize:
            self._resume()
        self._pending = []
        self._pendingSize = 0
        if self._complete:
            return succeed(None)
        self._done = Deferred()
        return self._done

    def write(self, data: bytes) -> None:
        if self.stopped:
            return
        if self._consumer is not None:
            self._consumer.write(data)
        else:
            self._pending.append(data)
            self._pendingSize += len(data)
            if self._pendingSize > 65536:
                self._pause()

    def finish(self) -> None:
        self._complete = True
        if self._done is not None:
            d, self._done = self._done, None
            d.callback(None)

    def fail(self, reason: Failure) -> None:
        """
        The client went away mid-body: the upstream request is abandoned.
        """
        self.stopped = True
        self._failed = reason
        if self._done is not None:
            d, self._done = self._done, None
            d.errback(reason)

    def pauseProducing(self) -> None:
        self._pause()

    def resumeProducing(self) -> None:
        self._resume()

    def stopProducing(self) -> None:
        self.stopped = True
        self._resume()


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """
    Receives an upstream response body from the Agent and writes it to the
    client, framed for the client's connection. It is the client transport's
    producer and passes pauses on to the upstream transport, so a slow client
    pauses the upstream; the body timeout then blames the client, not the
    upstream.
    """

    def __init__(self, handler: "HTTPHandler", chunked: bool, bodyTimeout: float) -> None:
        self._handler = handler
        self._chunked = chunked
        self._bodyTimeout = bodyTimeout
        self._timer: Optional[IDelayedCall] = None
        self._registered = False
        self._clientPaused = False
        self.tap = BodyTap()
        self.finished = False

    def connectionMade(self) -> None:
        client = self._handler.transport
        if client is not None and not self._handler.closed:
            client.registerProducer(self, True)
            self._registered = True
        self._arm()

    def pauseProducing(self) -> None:
        self._clientPaused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._clientPaused = False
        if not self.finished:
            self.transport.resumeProducing()
            self._arm()

    def stopProducing(self) -> None:
        self.stop()

    def _arm(self) -> None:
        if self._bodyTimeout:
            clock = self._handler.clock
            if self._timer is None or not self._timer.active():
                self._timer = clock.callLater(self._bodyTimeout, self._idle)
            else:
                self._timer.reset(self._bodyTimeout)

    def _idle(self) -> None:
        self._timer = None
        self._handler.responseBodyStalled(self._clientPaused)
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.tap.add(data)
        if self._chunked:
            self._handler.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._handler.transport.write(data)
        self._arm()

    def stop(self) -> None:
        """
        The client went away: stop reading the upstream.
        """
        if self.transport is not None and not self.finished:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._registered:
            self._registered = False
            client = self._handler.transport
            if client is not None:
                client.unregisterProducer()
        complete = reason.check(ResponseDone, PotentialDataLoss) is not None
        if complete and self._chunked and not self._handler.closed:
            self._handler.transport.write(b"0\r\n\r\n")
        self._handler.responseRelayed(complete, reason)


class BadResponseHead(Exception):
    """
    An upstream's response head that the strict parser refused.
    """


class UpstreamHandshakeLost(Exception):
    """
    The upstream closed the connection during the TLS handshake.
    """


@implementer(IHandshakeListener)
class StrictClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol with every response head held back
    until complete and checked by L{checkResponseHead} before Twisted's own
    parser, which accepts bare LF, whitespace before a colon and
    Content-Length beside Transfer-Encoding, sees it. A head that fails fails
    the request (the proxy answers 502) and the upstream connection closes.

    It also tells a close during the TLS handshake (a TLS failure) from a
    close after it, which the Agent reports alike.
    """

    limits = Limits()
    _held = b""
    _scanned = 0
    _handshook = False

    def handshakeCompleted(self) -> None:
        self._handshook = True

    def connectionLost(self, reason: Failure) -> None:
        if not self._handshook and ISSLTransport.providedBy(self.transport) and not reason.check(SSL.Error):
            why = reason.getErrorMessage()
            reason = Failure(UpstreamHandshakeLost(f"closed during the TLS handshake: {why}"))
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        while data:
            parser = self._parser
            if parser is None or parser.state != STATUS:
                super().dataReceived(data)
                return
            held = self._held + data
            try:
                end = findHeadEnd(held, self.limits, self._scanned)
                if end >= 0:
                    checkResponseHead(held[:end], self.limits)
            except HTTPError as e:
                self._held, self._scanned = b"", 0
                reason = {414: "status line too long", 431: "response head too large"}.get(e.status, e.reason)
                self._giveUp(Failure(BadResponseHead(reason)))
                return
            if end < 0:
                self._held, self._scanned = held, len(held)
                return
            self._held, self._scanned = b"", 0
            # a 1xx head leaves the parser waiting for the next head
            super().dataReceived(held[:end])
            data = held[end:]


class StrictClientFactory(_HTTP11ClientFactory):
    """
    The connection pool's per-connection factory (HTTPConnectionPool._factory)
    that builds L{StrictClientProtocol}.
    """

    noisy = False

    def buildProtocol(self, addr: object) -> StrictClientProtocol:
        return StrictClientProtocol(self._quiescentCallback)
