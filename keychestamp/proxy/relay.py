"""
Moving bodies between the client and the upstream with backpressure, keeping
the first bytes of each for the exchange observer.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from keychestamp.exchange import OBSERVED_BODY_LIMIT

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
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred:
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


class ResponseRelay(Protocol):
    """
    Receives an upstream response body from the Agent and writes it to the
    client, framed for the client's connection; the upstream transport is
    registered as the client's producer, so a slow client pauses the upstream.
    """

    def __init__(self, handler: "HTTPHandler", chunked: bool, bodyTimeout: float) -> None:
        self._handler = handler
        self._chunked = chunked
        self._bodyTimeout = bodyTimeout
        self._timer: Optional[IDelayedCall] = None
        self._registered = False
        self.tap = BodyTap()
        self.finished = False

    def connectionMade(self) -> None:
        client = self._handler.transport
        if client is not None and not self._handler.closed:
            client.registerProducer(self.transport, True)
            self._registered = True
        self._arm()

    def _arm(self) -> None:
        if self._bodyTimeout:
            clock = self._handler.clock
            if self._timer is None or not self._timer.active():
                self._timer = clock.callLater(self._bodyTimeout, self._idle)
            else:
                self._timer.reset(self._bodyTimeout)

    def _idle(self) -> None:
        self._timer = None
        self._handler.responseBodyStalled()
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
