"""
HTTP/1.1 on one stream from a client: the proxy's listening port (CONNECT and
absolute-form requests) or a decrypted CONNECT stream (origin-form requests to
one upstream). One request is handled at a time; pipelined requests wait in
the buffer, so responses go back in order.

This is where a request becomes an L{Exchange}: see L{HTTPHandler._complete}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Set, Tuple

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from keychestamp.exchange import (
    STAGE_CLIENT_TIMEOUT,
    STAGE_CLIENT_TLS,
    STAGE_UPSTREAM_CONNECT,
    STAGE_UPSTREAM_RESPONSE,
    STAGE_UPSTREAM_TIMEOUT,
    STAGE_UPSTREAM_TLS,
    Exchange,
    ProxyFailure,
)
from keychestamp.proxy.http11 import (
    HOP_BY_HOP,
    ChunkedDecoder,
    HTTPError,
    RequestHead,
    checkRelayedResponse,
    findHeadEnd,
    parseAuthority,
    parseHead,
    splitAbsolute,
)
from keychestamp.proxy.policy import LOCAL_HOST, TUNNEL
from keychestamp.proxy.tunnel import Tunnel
from keychestamp.proxy.relay import (
    BodyTap,
    ResponseRelay,
    StreamingBody,
    UpstreamHandshakeLost,
    decodeContent,
)

if TYPE_CHECKING:
    from keychestamp.proxy.server import ProxyContext

PIPELINE_BUFFER = 65536
NO_BODY_STATUS = (204, 304)
IDLE = "idle keep-alive"
CLOSING = "the close"


def _phrase(status: int) -> bytes:
    return RESPONSES.get(status, b"Unknown")


def simpleResponse(
    status: int, text: str, extra: Tuple[Tuple[bytes, bytes], ...] = (), close: bool = True, noBody: bool = False
) -> bytes:
    """
    A complete short response the proxy writes itself (errors, local answers);
    C{noBody} for an answer to HEAD (the length is still the body's).
    """
    body = text.encode("utf-8")
    head = [b"HTTP/1.1 %d %s" % (status, _phrase(status))]
    contentType = [v for n, v in extra if n.lower() == b"content-type"]
    if not contentType:
        head.append(b"Content-Type: text/plain; charset=utf-8")
    head.extend(b"%s: %s" % pair for pair in extra)
    head.append(b"Content-Length: %d" % len(body))
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + (b"" if noBody else body)


def authorityOf(scheme: str, host: str, port: int) -> str:
    name = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return name if port == default else f"{name}:{port}"


def classifyUpstreamFailure(reason: Failure) -> Tuple[int, str, str]:
    """
    (status for the client, stage, reason text) for an upstream failure.
    """
    inner = [reason]
    if reason.check(ResponseNeverReceived, ResponseFailed):
        inner = list(reason.value.reasons) or inner
    for f in inner:
        if f.check(ConnectTimeoutError, DeferredTimeoutError, CancelledError):
            return 504, STAGE_UPSTREAM_TIMEOUT, "upstream did not answer in time"
    for f in inner:
        if f.check(DNSLookupError):
            return 502, STAGE_UPSTREAM_CONNECT, f"DNS lookup failed: {f.getErrorMessage()}"
        if f.check(ConnectError):
            return 502, STAGE_UPSTREAM_CONNECT, f"cannot connect: {f.getErrorMessage()}"
    for f in inner:
        text = f.getErrorMessage()
        typ = f.type.__module__ + "." + f.type.__name__ if f.type else ""
        tls = "SSL" in typ or "VerificationError" in typ or f.check(UpstreamHandshakeLost)
        if tls or "certificate" in text.lower():
            return 502, STAGE_UPSTREAM_TLS, f"TLS with the upstream failed: {text}"
    text = "; ".join(f.getErrorMessage() for f in inner)
    return 502, STAGE_UPSTREAM_RESPONSE, f"bad or no response from upstream: {text}"


@implementer(IHandshakeListener)
class HTTPHandler(Protocol):
    """
    HTTP/1.1 server on one client stream.

    @param origin: None on the listening port (proxy mode: CONNECT and
        absolute-form); (scheme, host, port) on a decrypted CONNECT stream.
    @param tls: whether this stream is the plaintext inside a TLS layer the
        proxy terminates (a handshake failure then becomes a proxy-error).
    """

    def __init__(
        self,
        context: "ProxyContext",
        client: Tuple[str, int],
        origin: Optional[Tuple[str, str, int]] = None,
        tls: bool = False,
    ) -> None:
        self._ctx = context
        self.clock = context.reactor
        self._client = client
        self._origin = origin
        self._tls = tls
        self._handshook = not tls
        self._buffer = b""
        self._scanned = 0  # bytes of _buffer already searched for the head's end
        self._state = "head"  # head, body, waiting, diverted
        self._divert: Optional[Protocol] = None
        self._timer: Optional[IDelayedCall] = None
        self._timerWhat = ""
        self._timedOut: Optional[str] = None
        #: when the client's connection opened (the first head's deadline
        #: counts from then), if earlier than connectionMade
        self.opened: Optional[float] = None
        self._pauses: Set[str] = set()
        self._eof = False
        self.closed = False
        self._lost = self._aborted = False
        # the request in flight
        self._head: Optional[RequestHead] = None
        self._target: Tuple[str, str, int, bytes] = ("", "", 0, b"")
        self._bodyLeft = 0
        self._chunks: Optional[ChunkedDecoder] = None
        self._producer: Optional[StreamingBody] = None
        self._requestTap: Optional[BodyTap] = None
        self._relay: Optional[ResponseRelay] = None
        self._response: Optional[IResponse] = None
        self._pending = None
        self._started = 0.0
        self._responseStarted = False

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        if self._tls:
            self._setTimer(self._ctx.timeouts.tls, "TLS handshake")
            return
        seconds = self._ctx.timeouts.header
        if seconds and self.opened is not None:
            seconds = max(seconds - (self.clock.seconds() - self.opened), 0.001)
        self._setTimer(seconds, "request head")

    def handshakeCompleted(self) -> None:
        self._handshook = True
        self._setTimer(self._ctx.timeouts.header, "request head")

    def _setTimer(self, seconds: float, what: str) -> None:
        self._cancelTimer()
        self._timerWhat = what
        if seconds:
            self._timer = self.clock.callLater(seconds, self._timeout, what)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timeout(self, what: str) -> None:
        self._timer = None
        self._timedOut = what
        self._ctx.log.debug("{client}: closing, {what} timed out", client=self._client[0], what=what)
        if self._state == "body" and self._head is not None and what != CLOSING:
            self._failure(STAGE_CLIENT_TIMEOUT, f"{what} timed out")
        self._abort()

    def pauseReading(self, why: str) -> None:
        """
        Stop reading from the client until L{resumeReading} with the same
        reason (the tunnel, while its upstream is not connected yet).
        """
        self._pause(why)

    def resumeReading(self, why: str) -> None:
        self._resume(why)

    def _pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pauseProducing()
            if self._state == "body":
                # we stopped reading the body: the client is not the slow one
                self._cancelTimer()
        self._pauses.add(why)

    def _resume(self, why: str) -> None:
        if why in self._pauses:
            self._pauses.discard(why)
            if not self._pauses and self.transport is not None and not self.closed:
                self.transport.resumeProducing()
                if self._state == "body":
                    self._setTimer(self._ctx.timeouts.header, "request body")

    def _abort(self) -> None:
        if not self._lost and not self._aborted and self.transport is not None:
            self.closed = self._aborted = True
            self.transport.abortConnection()

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            if self._pauses:
                # read again: a TLS close waits for the client's close_notify
                # (and any close for its FIN), which a paused socket never sees
                self._pauses.clear()
                self.transport.resumeProducing()
            self.transport.loseConnection()
            # a client that neither reads what is left nor closes must not
            # hold the connection for ever
            self._setTimer(self._ctx.timeouts.idle, CLOSING)

    def readConnectionLost(self) -> None:
        """
        The client half-closed: finish what is in flight, then close.
        """
        self._eof = True
        if self._divert is not None:
            if isinstance(self._divert, Tunnel):
                self._divert.readConnectionLost()
            else:
                self._close()
        elif self._state == "head":
            # nothing in flight, and a partial head can no longer complete
            self._close()
        elif self._state == "body":
            self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._lost = True
        self._cancelTimer()
        if self._tls and not self._handshook:
            why = reason.getErrorMessage() if reason.value else "closed"
            text = f"client aborted the TLS handshake (does it trust the proxy CA?): {why}"
            if self._timedOut is not None:
                text = f"client did not complete the TLS handshake in {self._ctx.timeouts.tls:g} s"
            self._ctx.observer.proxyFailed(
                ProxyFailure(
                    client=self._client[0],
                    server=self._originAuthority(),
                    stage=STAGE_CLIENT_TLS,
                    reason=text,
                    time=self.clock.seconds(),
                )
            )
        if self._divert is not None:
            divert, self._divert = self._divert, None
            divert.connectionLost(reason)
        if self._producer is not None:
            self._producer.fail(reason)
        if self._pending is not None:
            self._pending.cancel()
        if self._relay is not None and not self._relay.finished:
            self._relay.stop()

    def _originAuthority(self) -> str:
        if self._origin is None:
            return ""
        return authorityOf(*self._origin)

    # -- reading ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._divert is not None:
            self._divert.dataReceived(data)
            return
        if self.closed:
            return
        if self._state == "body":
            self._bodyData(data)
        else:
            self._buffer += data
        self._process()

    def _process(self) -> None:
        try:
            while self._state == "head" and self._buffer and not self.closed:
                if self._buffer[:1] in (b"\r", b"\n"):
                    self._buffer = self._buffer.lstrip(b"\r\n")
                    self._scanned = 0
                    continue
                end = findHeadEnd(self._buffer, self._ctx.limits, self._scanned)
                if end < 0:
                    self._scanned = len(self._buffer)
                    if self._timer is None or self._timerWhat == IDLE:
                        # a request has begun: its head must be complete in time
                        self._setTimer(self._ctx.timeouts.header, "request head")
                    return
                head = parseHead(self._buffer[:end], self._ctx.limits)
                self._buffer = self._buffer[end:]
                self._scanned = 0
                self._request(head)
        except HTTPError as e:
            self._refuse(e.status, e.reason)
            return
        if self._state == "waiting" and len(self._buffer) > PIPELINE_BUFFER:
            self._pause("pipeline")

    def _refuse(self, status: int, reason: str) -> None:
        """
        Answer a request we will not forward, and close.
        """
        self._ctx.log.info(
            "{client}: {status} {reason}", client=self._client[0], status=status, reason=reason
        )
        if self._responseStarted or self.closed:
            self._abort()
            return
        self.transport.write(simpleResponse(status, reason + "\n"))
        self._close()

    def _request(self, head: RequestHead) -> None:
        self._cancelTimer()
        self._head = head
        self._started = self.clock.seconds()
        self._responseStarted = False
        if self._origin is None:
            if head.method == b"CONNECT":
                self._connect(head)
                return
            scheme, host, port, path = splitAbsolute(head.target)
            local = self.transport.getHost()
            decision, why = self._ctx.policy.decidePlain(
                host, port, (getattr(local, "host", ""), getattr(local, "port", 0))
            )
            if decision is None:
                raise HTTPError(403, f"{scheme}://{authorityOf(scheme, host, port)} refused: {why}")
        else:
            if head.method == b"CONNECT":
                raise HTTPError(400, "CONNECT inside an intercepted stream")
            if head.target.startswith(b"/"):
                scheme, host, port = self._origin
                path = head.target
            else:
                scheme, host, port, path = splitAbsolute(head.target)
                if (scheme, host, port) != self._origin:
                    # another host, or http:// inside TLS: never out unencrypted
                    raise HTTPError(400, "absolute URL for another origin on an intercepted stream")
        self._target = (scheme, host, port, path)
        if host == LOCAL_HOST:
            self._local(head, path)
            return
        self._forward(head)

    # -- CONNECT ---------------------------------------------------------

    def _connect(self, head: RequestHead) -> None:
        host, port = parseAuthority(head.target)
        if head.hasBody:
            raise HTTPError(400, "CONNECT with a body")
        local = self.transport.getHost()
        decision, why = self._ctx.policy.decide(
            host, port, (getattr(local, "host", ""), getattr(local, "port", 0))
        )
        if decision is None:
            self._ctx.log.info(
                "{client}: refused CONNECT {host}:{port}: {why}",
                client=self._client[0], host=host, port=port, why=why,
            )
            self.transport.write(simpleResponse(403, f"CONNECT {host}:{port} refused: {why}\n"))
            self._close()
            return
        leftover, self._buffer = self._buffer, b""
        self._state = "diverted"
        if decision == TUNNEL:
            self._divert = self._ctx.tunnels.open(self, host, port, leftover)
            return
        self.transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        inner = HTTPHandler(self._ctx, self._client, origin=("https", host, port), tls=True)
        self._divert = self._ctx.wrapTLS(self.transport, inner, host)
        if leftover:
            self._divert.dataReceived(leftover)

    def tunnelFailed(self, status: int, reason: str) -> None:
        """
        Called by the tunnel when the upstream could not be reached.
        """
        self._divert = None
        self.transport.write(simpleResponse(status, reason + "\n"))
        self._close()

    # -- the proxy answering itself ---------------------------------------

    def _local(self, head: RequestHead, path: bytes) -> None:
        if head.hasBody:
            raise HTTPError(400, "no body expected")
        path = path.split(b"?", 1)[0]
        noBody = head.method == b"HEAD"
        if head.method not in (b"GET", b"HEAD"):
            response = simpleResponse(405, "GET only\n", ((b"Allow", b"GET, HEAD"),))
        elif path in (b"/", b"/ca.crt", b"/ca.pem"):
            response = self._pem(self._ctx.ca.rootPEM, b"application/x-x509-ca-cert", noBody)
        elif path == b"/bundle.pem":
            response = self._pem(self._ctx.bundlePEM(), b"application/x-pem-file", noBody)
        else:
            response = simpleResponse(404, "not found\n", noBody=noBody)
        # One answer per connection: a client pipelining requests for the
        # bundle cannot pile up answers it never reads (nor recurse here).
        self.transport.write(response)
        self._requestDone(False)

    def _pem(self, body: bytes, contentType: bytes, noBody: bool) -> bytes:
        lines = [
            b"HTTP/1.1 200 OK",
            b"Content-Type: " + contentType,
            b"Content-Length: %d" % len(body),
            b"Cache-Control: no-store",
            b"Connection: close",
        ]
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if noBody else body)

    # -- forwarding --------------------------------------------------------

    def _forward(self, head: RequestHead) -> None:
        scheme, host, port, path = self._target
        authority = authorityOf(scheme, host, port)
        drop = HOP_BY_HOP.union(head.connectionTokens, (b"host", b"content-length", b"expect"))
        headers = Headers()
        for name, value in head.headers:
            if name.lower() not in drop:
                headers.addRawHeader(name, value)
        headers.addRawHeader(b"Host", authority.encode("ascii"))
        self._requestTap = BodyTap()
        if head.hasBody:
            self._producer = StreamingBody(
                None if head.chunked else head.contentLength,
                lambda: self._pause("upstream"),
                lambda: self._resume("upstream"),
            )
            self._chunks = ChunkedDecoder() if head.chunked else None
            self._bodyLeft = head.contentLength or 0
            self._state = "body"
            self._setTimer(self._ctx.timeouts.header, "request body")
            expect = head.get(b"expect")
            if expect is not None and expect.lower() == b"100-continue" and head.version == b"HTTP/1.1":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self._producer = None
            self._state = "waiting"
        url = f"{scheme}://{authority}".encode("ascii") + path
        d = self._ctx.upstream.agent.request(head.method, url, headers, self._producer)
        if self._ctx.timeouts.response:
            d.addTimeout(self._ctx.timeouts.response, self.clock)
        self._pending = d
        d.addCallbacks(self._gotResponse, self._upstreamFailed)
        if self._state == "body" and self._buffer:
            data, self._buffer = self._buffer, b""
            self._bodyData(data)

    def _bodyData(self, data: bytes) -> None:
        assert self._producer is not None and self._requestTap is not None
        if self._timer is not None and self._ctx.timeouts.header:
            # the body's deadline is between bytes, not for the whole body
            self._timer.reset(self._ctx.timeouts.header)
        if self._chunks is not None:
            try:
                chunks = self._chunks.feed(data)
            except HTTPError as e:
                self._producer.fail(Failure(e))
                self._refuse(e.status, e.reason)
                return
            for chunk in chunks:
                self._requestTap.add(chunk)
                self._producer.write(chunk)
            if self._chunks.done:
                self._buffer += self._chunks.leftover
                self._bodyDone()
            return
        take = data[: self._bodyLeft]
        self._bodyLeft -= len(take)
        if take:
            self._requestTap.add(take)
            self._producer.write(take)
        if self._bodyLeft == 0:
            self._buffer += data[len(take) :]
            self._bodyDone()

    def _bodyDone(self) -> None:
        self._cancelTimer()
        self._state = "waiting"
        self._chunks = None
        if self._producer is not None:
            self._producer.finish()
        # the upstream's backpressure no longer concerns this client
        self._resume("upstream")

    def _gotResponse(self, response: IResponse) -> None:
        self._pending = None
        if self.closed:
            response.deliverBody(Protocol())
            return
        head = self._head
        assert head is not None
        try:
            checkRelayedResponse(response.code, response.headers.getAllRawHeaders(), self._ctx.limits)
        except HTTPError as e:
            response.deliverBody(_Discard())
            self._answerFailure(502, STAGE_UPSTREAM_RESPONSE, f"bad response from upstream: {e.reason}")
            return
        self._response = response
        keepAlive = head.keepAlive and not self._eof
        noBody = head.method == b"HEAD" or response.code in NO_BODY_STATUS or 100 <= response.code < 200
        lines = [b"HTTP/1.1 %d %s" % (response.code, response.phrase.replace(b"\r", b"").replace(b"\n", b""))]
        for name, values in response.headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value)
        chunked = False
        if noBody:
            pass
        elif response.length is not UNKNOWN_LENGTH:
            lines.append(b"Content-Length: %d" % response.length)
        elif head.version == b"HTTP/1.1":
            lines.append(b"Transfer-Encoding: chunked")
            chunked = True
        else:
            keepAlive = False
        if not keepAlive:
            lines.append(b"Connection: close")
        self._keepAlive = keepAlive
        self._responseStarted = True
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self._relay = ResponseRelay(self, chunked, self._ctx.timeouts.body)
        response.deliverBody(self._relay)

    def responseBodyStalled(self, clientStalled: bool) -> None:
        """
        No byte of the response body moved for --body-timeout: end the
        response short and close (the client sees it cut). Whoever stalled
        is named: the upstream, or a client that stopped reading.
        """
        if clientStalled:
            stage, what = STAGE_CLIENT_TIMEOUT, "client stopped reading the response"
        else:
            stage, what = STAGE_UPSTREAM_TIMEOUT, "upstream body stalled"
        self._ctx.log.debug("{client}: closing, {what}", client=self._client[0], what=what)
        self._failure(stage, what)
        self._abort()

    def responseRelayed(self, complete: bool, reason: Failure) -> None:
        """
        The response body ended: complete the exchange, then read on or close.
        """
        relay, self._relay = self._relay, None
        if not complete:
            if not self.closed:
                self._failure(STAGE_UPSTREAM_RESPONSE, f"response cut short: {reason.getErrorMessage()}")
            self._abort()
            return
        if self._state == "body":
            # the upstream answered before the request body was complete:
            # the stream is out of sync, so it ends here.
            self._keepAlive = False
            if self._producer is not None:
                self._producer.stopProducing()
        assert relay is not None
        self._complete(relay)
        self._requestDone(self._keepAlive)

    def _complete(self, relay: ResponseRelay) -> None:
        head, response = self._head, self._response
        assert head is not None and response is not None and self._requestTap is not None
        scheme, host, port, path = self._target
        responseHeaders: List[Tuple[str, str]] = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, values in response.headers.getAllRawHeaders()
            for v in values
        ]
        encoding = response.headers.getRawHeaders(b"content-encoding", [None])[0]
        body = relay.tap.value()
        exchange = Exchange(
            client=self._client[0],
            clientPort=self._client[1],
            method=head.method.decode("ascii"),
            scheme=scheme,
            host=host,
            port=port,
            path=path.decode("latin-1"),
            requestHeaders=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers],
            requestBody=self._requestTap.value(),
            status=response.code,
            responseHeaders=responseHeaders,
            responseBody=decodeContent(body, encoding.decode("latin-1") if encoding else None),
            started=self._started,
            finished=self.clock.seconds(),
            requestTruncated=self._requestTap.truncated,
            responseTruncated=relay.tap.truncated,
        )
        try:
            self._ctx.observer.exchangeCompleted(exchange)
        except Exception:
            self._ctx.log.failure("exchange observer failed")

    def _requestDone(self, keepAlive: bool) -> None:
        self._head = None
        self._response = None
        self._producer = None
        self._requestTap = None
        self._responseStarted = False
        if not keepAlive or self._eof:
            self._close()
            return
        self._state = "head"
        self._resume("pipeline")
        self._resume("upstream")
        if self._buffer:
            self._setTimer(self._ctx.timeouts.header, "request head")
            self._process()
        else:
            self._setTimer(self._ctx.timeouts.idle, IDLE)

    def _upstreamFailed(self, reason: Failure) -> None:
        self._pending = None
        if self.closed:
            return
        self._answerFailure(*classifyUpstreamFailure(reason))

    def _answerFailure(self, status: int, stage: str, text: str) -> None:
        """
        The request could not be relayed: a proxy-error, a line, the status.
        """
        self._failure(stage, text)
        self._ctx.log.info(
            "{client}: {status} for {url}: {reason}",
            client=self._client[0], status=status, url=self._url(), reason=text,
        )
        if self._producer is not None:
            self._producer.stopProducing()
        self.transport.write(simpleResponse(status, text + "\n"))
        self._close()

    def _url(self) -> str:
        scheme, host, port, path = self._target
        return f"{scheme}://{authorityOf(scheme, host, port)}{path.decode('latin-1')}"

    def _failure(self, stage: str, reason: str) -> None:
        head = self._head
        scheme, host, port, path = self._target
        agent = head.get(b"user-agent") if head is not None else None
        self._ctx.observer.proxyFailed(
            ProxyFailure(
                client=self._client[0],
                server=authorityOf(scheme, host, port) if host else self._originAuthority(),
                stage=stage,
                reason=reason,
                time=self.clock.seconds(),
                method=head.method.decode("ascii") if head is not None else None,
                path=path.decode("latin-1") if host else None,
                userAgent=agent.decode("latin-1") if agent is not None else None,
            )
        )


class _Discard(Protocol):
    """
    Takes a response body we will not relay, and drops its connection.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()
