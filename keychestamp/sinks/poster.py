# -*- test-case-name: tests.test_poster -*-
"""
The KeyChest poster: every event POSTed as JSON to an HTTP collector,
durably and in order.

L{Poster.emit} only appends the event to the L{Spool} (that is when it counts
as logged) and wakes the sender. The sender posts the oldest spooled event,
waits for the answer, and only then moves on: one request in flight at a
time, so the collector sees the events in C{seq} order even across retries.
A 2xx answer removes the event; a permanent refusal (4xx other than 408 and
429) moves it to the dead table; anything else (other statuses, connection
errors, timeouts) keeps it at the head of the queue and retries after an
exponential, jittered, bounded backoff or the server's C{Retry-After}.
"""

from __future__ import annotations

import email.utils
import json
import random as _random
from typing import Any, Callable, Dict, List, Optional, Tuple

from hyperlink import URL
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from keychestamp import __version__
from keychestamp.events import Event, IBacklog, IEventSink, formatTime
from keychestamp.sinks.spool import Spool, SpoolError
from keychestamp.upstream import QuietPool

#: How much of an answer's body is read and kept (diagnostics, dead table).
ANSWER_BODY_LIMIT = 4096

#: How much of an answer's body goes into a log line.
LOGGED_BODY_LIMIT = 300


def parseRetryAfter(value: str, now: float) -> Optional[float]:
    """
    Seconds to wait according to a C{Retry-After} value: delay-seconds or an
    HTTP-date (RFC 9110 10.2.3). None when it is neither.
    """
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    try:
        when = email.utils.mktime_tz(parsed)
    except (OverflowError, ValueError):
        return None
    return max(0.0, when - now)


def buildHTTPClient(
    reactor: Any,
    trustRoot: Any = None,
    connectTimeout: float = 10.0,
) -> Tuple[HTTPClient, HTTPConnectionPool]:
    """
    A treq client for the poster with its own connection pool (treq's global
    pool would outlive the service), verifying TLS certificates and host
    names against C{trustRoot} (default: the platform's trust store).

    Give the pool to L{Poster} so C{stopService} closes its connections.

    @param reactor: an C{IReactorTCP}, C{IReactorTime} provider.
    @param trustRoot: an C{IOpenSSLTrustRoot}, e.g. from
        C{twisted.internet.ssl.trustRootFromCertificates}, or None.
    """
    pool = QuietPool(reactor, persistent=True)
    # One request at a time: one connection is enough. Close idle ones
    # before common server keep-alive limits (5 s in Node, more elsewhere)
    # so a POST rarely lands on a connection the server is closing.
    pool.maxPersistentPerHost = 1
    pool.cachedConnectionTimeout = 4
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(trustRoot),
        connectTimeout=connectTimeout,
        pool=pool,
    )
    return HTTPClient(agent), pool


class _BodyPrefix(Protocol):
    """
    Read a response body to its end, keeping only its first bytes.
    Cancelling the Deferred drops the connection.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: List[bytes] = []
        self._size = 0
        self.done: "Deferred[bytes]" = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            data = data[: self._limit - self._size]
            self._chunks.append(data)
            self._size += len(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, d: "Deferred[bytes]") -> None:
        if self.transport is not None:
            self.transport.stopProducing()


def _readPrefix(response: IResponse, limit: int) -> "Deferred[bytes]":
    if response.length == 0:
        return succeed(b"")
    reader = _BodyPrefix(limit)
    response.deliverBody(reader)
    return reader.done


def _describe(error: BaseException) -> str:
    """
    A one-line account of why a POST failed (Twisted wraps socket errors
    in ResponseNeverReceived and friends: show the inner reasons).
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = "; ".join(_describe(r.value) for r in reasons)
        return f"{type(error).__name__}: {inner}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _mergeHeaders(extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"keychestamp/{__version__}",
    }
    for name, value in (extra or {}).items():
        if any(c in name + value for c in "\r\n\0") or not name.strip():
            raise ValueError(f"invalid header for the poster: {name!r}")
        for known in [k for k in headers if k.lower() == name.lower()]:
            del headers[known]
        headers[name] = value
    return headers


@implementer(IEventSink, IBacklog)
class Poster(Service):
    """
    Deliver spooled events to an HTTP collector, at least once and in order.

    @ivar lastDelivery: C{clock.seconds()} of the last accepted POST, or None.
    @ivar lastError: the last failure or refusal, one line, or None.
    @ivar consecutiveFailures: failed attempts since the last answer that
        moved the queue on (2xx or a refusal); 0 when healthy.
    @ivar nextAttempt: C{clock.seconds()} of the next retry while backing
        off, else None.
    @ivar delivered: events accepted by the collector since start.
    @ivar deadLettered: events refused and set aside since start.
    """

    name = "poster"

    #: Retry-After is honoured up to this many seconds.
    maxRetryAfter = 3600.0

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        url: str,
        client: Any,
        clock: IReactorTime,
        headers: Optional[Dict[str, str]] = None,
        initialBackoff: float = 1.0,
        maxBackoff: float = 300.0,
        timeout: float = 30.0,
        shutdownGrace: float = 5.0,
        random: Callable[[], float] = _random.random,
        pool: Optional[HTTPConnectionPool] = None,
    ) -> None:
        """
        @param spool: the durable queue (already open).
        @param url: the collector's URL (http or https).
        @param client: a treq C{HTTPClient}, or anything with a compatible
            C{post(url, data=, headers=, allow_redirects=, unbuffered=)}.
        @param clock: schedules retries, timeouts and the shutdown grace.
        @param headers: extra request headers (e.g. Authorization); they
            replace the defaults (Content-Type, User-Agent) of the same name.
        @param initialBackoff: base delay after the first failure, seconds.
        @param maxBackoff: the backoff never exceeds this, seconds.
        @param timeout: one POST, answer body included, seconds.
        @param shutdownGrace: how long C{stopService} waits for a POST in
            flight before cancelling it, seconds.
        @param random: returns a float in [0, 1): the jitter.
        @param pool: the client's connection pool, closed by C{stopService}.
        """
        parsed = URL.from_text(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"the poster needs an http(s) URL, not {url!r}")
        if not 0 < initialBackoff <= maxBackoff:
            raise ValueError("need 0 < initialBackoff <= maxBackoff")
        self._spool = spool
        self.url = url
        # For log lines: no credentials or query string (tokens live there).
        self._shownURL = parsed.replace(userinfo="", query=(), fragment="").to_text()
        self._client = client
        self._clock = clock
        self._headers = _mergeHeaders(headers)
        self._initialBackoff = initialBackoff
        self._maxBackoff = maxBackoff
        self._timeout = timeout
        self._shutdownGrace = shutdownGrace
        self._random = random
        self._pool = pool

        self.lastDelivery: Optional[float] = None
        self.lastError: Optional[str] = None
        self.consecutiveFailures = 0
        self.nextAttempt: Optional[float] = None
        self.delivered = 0
        self.deadLettered = 0

        self._busy = False
        self._unspooled: List[Tuple[Event, "Deferred[None]"]] = []
        self._commitCall: Optional[IDelayedCall] = None
        self._inflight: Optional[Deferred[Any]] = None
        self._retryCall: Optional[IDelayedCall] = None
        self._idleWaiters: List[Deferred[None]] = []

    # IEventSink, IBacklog

    def emit(self, event: Event) -> "Deferred[None]":
        """
        Spool the event, then wake the sender. The Deferred fires once the
        event is stored; events emitted in the same reactor turn share one
        SQLite transaction (a group commit), so a burst costs one WAL write.
        It fails (never raises) when the spool cannot store it: the event is
        then lost, said loudly.
        """
        d: "Deferred[None]" = Deferred()
        self._unspooled.append((event, d))
        if self._commitCall is None:
            self._commitCall = self._clock.callLater(0, self.commit)
        return d

    def commit(self) -> None:
        """
        Store the events emitted since the last commit (called by the
        reactor one turn after emit, and before the service stops).
        """
        if self._commitCall is not None and self._commitCall.active():
            self._commitCall.cancel()
        self._commitCall = None
        batch, self._unspooled = self._unspooled, []
        if not batch:
            return
        try:
            self._spool.appendMany([event for event, _ in batch])
        except Exception as e:
            self.lastError = f"spool: {e}"
            for event, d in batch:
                self.log.critical(
                    "KeyChest poster LOST event id={id} msg={msg}: it could not "
                    "be spooled ({error})",
                    id=event.get("id") if isinstance(event, dict) else None,
                    msg=event.get("msg") if isinstance(event, dict) else None,
                    error=str(e),
                )
                d.errback(e)
            return
        for _, d in batch:
            d.callback(None)
        self._wake()

    def backlog(self) -> int:
        """
        Events not yet accepted by the collector (spooled, or about to be).
        """
        return self._spool.backlog() + len(self._unspooled)

    # Service

    def startService(self) -> None:
        """
        Open the spool and send what a previous run left in it.
        """
        self._spool.open()
        Service.startService(self)
        left = self._spool.backlog()
        self.log.info(
            "KeyChest poster delivering to {url}; {left} events spooled",
            url=self._shownURL,
            left=left,
        )
        self._wake()

    def stopService(self) -> "Deferred[None]":
        """
        Stop sending. A POST in flight gets C{shutdownGrace} seconds to be
        answered, then it is cancelled; undelivered events stay spooled.
        """
        Service.stopService(self)
        self.commit()  # spooled now, sent after the next start
        if self._retryCall is not None:
            if self._retryCall.active():
                self._retryCall.cancel()
            self._retryCall = None
            self.nextAttempt = None
        idle = self._whenIdle()
        if self._inflight is not None:
            timer = self._clock.callLater(self._shutdownGrace, self._abandon)

            def stopTimer(result: object) -> object:
                if timer.active():
                    timer.cancel()
                return result

            idle.addBoth(stopTimer)

        def release(result: object) -> "Deferred[None] | None":
            self._spool.close()
            if self._pool is not None:
                return self._pool.closeCachedConnections()
            return None

        return idle.addCallback(release).addCallback(lambda _: None)

    def _abandon(self) -> None:
        if self._inflight is not None:
            self.log.warn(
                "KeyChest poster: POST still unanswered after {grace} s at "
                "shutdown; cancelled, the event stays spooled",
                grace=self._shutdownGrace,
            )
            self._inflight.cancel()

    # the sender

    def _whenIdle(self) -> "Deferred[None]":
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        return d

    def _wake(self) -> None:
        """
        Start the sender unless it is already sending or backing off.
        """
        if not self.running or self._busy or self._retryCall is not None:
            return
        self._busy = True
        Deferred.fromCoroutine(self._drain()).addBoth(self._drained)

    def _drained(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure):
            # A bug, not a delivery problem: say so and keep trying.
            self.log.failure("KeyChest poster sender crashed", result)
            if self.running:
                self._retryLater(self._maxBackoff)
        waiters, self._idleWaiters = self._idleWaiters, []
        for d in waiters:
            d.callback(None)

    def _retryLater(self, delay: float) -> None:
        self.nextAttempt = self._clock.seconds() + delay
        self._retryCall = self._clock.callLater(delay, self._retryNow)

    def _retryNow(self) -> None:
        self._retryCall = None
        self.nextAttempt = None
        self._wake()

    def _backoff(self) -> float:
        """
        The next delay: initialBackoff doubled per consecutive failure,
        capped at maxBackoff, then jittered into [half, all] of it.
        """
        exponent = min(max(self.consecutiveFailures - 1, 0), 64)
        base = min(self._maxBackoff, self._initialBackoff * 2.0**exponent)
        return base * (0.5 + 0.5 * self._random())

    async def _drain(self) -> None:
        """
        Send the queue, oldest first, one POST at a time, until it is empty,
        the service stops, or a failure schedules a retry.
        """
        while self.running:
            try:
                batch = self._spool.peek(1)
                if not batch:
                    return
                seq, event = batch[0]
                delay = await self._deliver(seq, event)
            except SpoolError as e:
                self.consecutiveFailures += 1
                self.lastError = f"spool: {e}"
                delay = self._backoff()
                self.log.critical(
                    "KeyChest poster cannot use its spool ({error}); "
                    "retrying in {delay:.2f} s",
                    error=str(e),
                    delay=delay,
                )
            if delay is not None:
                if self.running:
                    self._retryLater(delay)
                return

    async def _post(self, body: bytes) -> Tuple[int, Optional[str], bytes]:
        for attempt in (1, 2):
            try:
                response = await self._client.post(
                    self.url,
                    data=body,
                    headers=self._headers,
                    allow_redirects=False,
                    unbuffered=True,
                )
                break
            except ResponseNeverReceived as e:
                # A pooled connection the collector closed while it sat idle:
                # send once more on a new connection at once rather than
                # backing off (delivery is at-least-once anyway).
                if attempt == 2 or not all(f.check(ConnectionDone, ConnectionLost) for f in e.reasons):
                    raise
        answer = await _readPrefix(response, ANSWER_BODY_LIMIT)
        retryAfter = response.headers.getRawHeaders("retry-after")
        return response.code, (retryAfter[0] if retryAfter else None), answer

    async def _deliver(self, seq: int, event: Event) -> Optional[float]:
        """
        POST one event. Returns None when the queue moved on, or the delay
        before trying this event again.
        """
        body = dict(event)
        body["log_time"] = formatTime(self._clock.seconds())
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        attempt = Deferred.fromCoroutine(self._post(data.encode("utf-8")))
        attempt.addTimeout(self._timeout, self._clock, self._timedOut)
        self._inflight = attempt
        try:
            status, retryAfter, answer = await attempt
        except Exception as e:
            if not self.running:
                return None  # cancelled at shutdown: it stays spooled
            return self._failed(event, _describe(e))
        finally:
            self._inflight = None

        if 200 <= status < 300:
            self._spool.remove(seq)
            if self.consecutiveFailures:
                self.log.info(
                    "KeyChest poster: {url} accepts events again after "
                    "{n} failed attempts",
                    url=self._shownURL,
                    n=self.consecutiveFailures,
                )
            self.consecutiveFailures = 0
            self.lastDelivery = self._clock.seconds()
            self.delivered += 1
            return None

        text = answer.decode("utf-8", "replace")
        if 400 <= status < 500 and status not in (408, 429):
            self.log.error(
                "KeyChest poster: {url} refused event id={id} msg={msg} "
                "with HTTP {status}: {body!r}; moved to the dead table "
                "(seq {seq})",
                url=self._shownURL,
                id=event.get("id"),
                msg=event.get("msg"),
                status=status,
                body=text[:LOGGED_BODY_LIMIT],
                seq=seq,
            )
            self._spool.setAside(seq, status, text)
            self.lastError = f"HTTP {status} (dead letter): {text[:LOGGED_BODY_LIMIT]}"
            self.consecutiveFailures = 0
            self.deadLettered += 1
            return None

        wait: Optional[float] = None
        if status in (429, 503) and retryAfter is not None:
            asked = parseRetryAfter(retryAfter, self._clock.seconds())
            if asked is not None:
                # Never sooner than initialBackoff: "Retry-After: 0" on every
                # answer must not turn into a busy loop.
                wait = min(max(asked, self._initialBackoff), self.maxRetryAfter)
        return self._failed(
            event, f"HTTP {status}: {text[:LOGGED_BODY_LIMIT]!r}", wait
        )

    def _timedOut(self, result: object, timeout: float) -> None:
        # Cancelling the request may surface as ResponseNeverReceived
        # rather than CancelledError: say what really happened.
        raise TimeoutError(f"no answer within {timeout} s")

    def _failed(
        self, event: Event, reason: str, wait: Optional[float] = None
    ) -> float:
        self.consecutiveFailures += 1
        self.lastError = reason
        delay = self._backoff() if wait is None else wait
        self.log.warn(
            "KeyChest poster: delivery of event id={id} to {url} failed "
            "({reason}); attempt {n}, next in {delay:.2f} s, {backlog} waiting",
            id=event.get("id"),
            url=self._shownURL,
            reason=reason,
            n=self.consecutiveFailures,
            delay=delay,
            backlog=self._spool.backlog(),
        )
        return delay
