"""
Tests for keychestamp.sinks.poster: delivery of spooled events to an HTTP
collector (state machine on StubTreq and a Clock; then real loopback sockets,
and a spool left by a process killed with SIGKILL).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from keychestamp.events import IBacklog, IEventSink
from keychestamp.sinks.poster import Poster, buildHTTPClient, parseRetryAfter
from keychestamp.sinks.spool import Spool, SpoolError

URL = "https://collector.example/api/v1.0/amp/event"

#: (status, headers, body); status None: never answer.
Answer = Tuple[Optional[int], Dict[str, str], bytes]



def emitNow(poster: Poster, e: Dict[str, Any]) -> "Deferred[None]":
    """
    emit, then commit at once (in production the reactor commits one turn
    later, grouping the events of that turn into one transaction).
    """
    d = poster.emit(e)
    poster.commit()
    return d

class ScriptedCollector(Resource):
    """
    Answers each POST with the next scripted answer, then 200; records what
    it was sent.
    """

    isLeaf = True

    def __init__(self, script: List[Answer]) -> None:
        super().__init__()
        self.script = list(script)
        self.requests: List[Tuple[Any, Dict[str, Any]]] = []

    def ids(self) -> List[int]:
        return [body["id"] for (_, body) in self.requests]

    def render_POST(self, request: Any) -> Any:
        self.requests.append(
            (request.requestHeaders, json.loads(request.content.read()))
        )
        status, headers, body = self.script.pop(0) if self.script else (200, {}, b"ok")
        if status is None:
            return NOT_DONE_YET
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class FlakyClient:
    """
    A treq-compatible client whose first C{failures} posts fail with
    ConnectionRefusedError; later ones go to C{delegate}.
    """

    def __init__(self, failures: int, delegate: Any) -> None:
        self.failures = failures
        self.delegate = delegate
        self.calls = 0

    def post(self, url: str, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            return fail(ConnectionRefusedError("127.0.0.1:443"))
        return self.delegate.post(url, **kwargs)


class FakePool:
    """
    Records closeCachedConnections.
    """

    closed = 0

    def closeCachedConnections(self) -> "Deferred[None]":
        self.closed += 1
        return succeed(None)


def event(n: int) -> Dict[str, Any]:
    return {"msg": "new-order", "params": {"n": n}, "id": n, "log_time": "old"}


class PosterTests(SynchronousTestCase):
    """
    The delivery state machine, in memory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = os.path.join(self.mktemp(), "spool")
        self.spool = Spool(self.directory)
        self.addCleanup(self.spool.close)

    def poster(
        self, script: List[Answer], client: Any = None, **kwargs: Any
    ) -> Tuple[Poster, ScriptedCollector]:
        collector = ScriptedCollector(script)
        kwargs.setdefault("random", lambda: 0.0)
        poster = Poster(
            self.spool,
            URL,
            client if client is not None else StubTreq(collector),
            self.clock,
            **kwargs,
        )
        poster.startService()
        self.addCleanup(lambda: poster.running and poster.stopService())
        return poster, collector

    def test_interfaces(self) -> None:
        """
        The poster is an event sink named "poster" with a backlog.
        """
        poster, _ = self.poster([])
        self.assertTrue(verifyObject(IEventSink, poster))
        self.assertTrue(verifyObject(IBacklog, poster))
        self.assertEqual(poster.name, "poster")

    def test_successRemoves(self) -> None:
        """
        A 2xx answer removes the event; emit fired once it was spooled.
        """
        poster, collector = self.poster([(201, {}, b"created")])
        self.clock.advance(5)
        d = emitNow(poster, event(1))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(collector.ids(), [1])
        self.assertEqual(poster.backlog(), 0)
        self.assertEqual(self.spool.peek(1), [])
        self.assertEqual(poster.lastDelivery, 5)
        self.assertEqual((poster.consecutiveFailures, poster.delivered), (0, 1))

    def test_bodyAndHeaders(self) -> None:
        """
        The body is the event as spooled, as JSON, with log_time set when it
        is sent; Content-Type is application/json and the extra headers go
        along. The caller's dict is not changed.
        """
        poster, collector = self.poster(
            [], headers={"Authorization": "Bearer s3cret", "X-Tenant": "a"}
        )
        self.clock.advance(100)
        original = event(7)
        emitNow(poster, original)
        self.assertEqual(original["log_time"], "old")
        ((headers, body),) = collector.requests
        self.assertEqual(body, dict(event(7), log_time="1970-01-01 00:01:40"))
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(headers.getRawHeaders("authorization"), ["Bearer s3cret"])
        self.assertEqual(headers.getRawHeaders("x-tenant"), ["a"])
        self.assertTrue(headers.getRawHeaders("user-agent")[0].startswith("keychestamp/"))

    def test_headerReplacesDefault(self) -> None:
        """
        An extra header replaces a default of the same name, whatever its case.
        """
        poster, collector = self.poster(
            [], headers={"content-type": "application/json; charset=utf-8"}
        )
        emitNow(poster, event(1))
        ((headers, _),) = collector.requests
        self.assertEqual(
            headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"]
        )

    def test_emitBeforeStart(self) -> None:
        """
        Events emitted before the service starts are spooled and sent, in
        order, when it starts.
        """
        collector = ScriptedCollector([])
        poster = Poster(self.spool, URL, StubTreq(collector), self.clock)
        for n in (1, 2):
            self.successResultOf(emitNow(poster, event(n)))
        self.assertEqual((collector.ids(), poster.backlog()), ([], 2))
        poster.startService()
        self.addCleanup(poster.stopService)
        self.assertEqual((collector.ids(), poster.backlog()), ([1, 2], 0))

    def assertRetryDelay(self, jitter: float, low: float, high: float) -> None:
        """
        A 500 is retried no sooner than C{low} and no later than C{high}.
        """
        poster, collector = self.poster([(500, {}, b"oops")], random=lambda: jitter)
        emitNow(poster, event(1))
        self.assertEqual(collector.ids(), [1])
        self.assertEqual((poster.backlog(), poster.consecutiveFailures), (1, 1))
        self.assertIn("500", poster.lastError)
        self.clock.advance(low - 0.001)
        self.assertEqual(collector.ids(), [1])
        self.clock.advance(high - low + 0.002)
        self.assertEqual(collector.ids(), [1, 1])
        self.assertEqual((poster.backlog(), poster.consecutiveFailures), (0, 0))

    def test_retryAfterBackoffLowJitter(self) -> None:
        """
        After a 500 the event is sent again after the backoff: with the
        lowest jitter, half of initialBackoff.
        """
        self.assertRetryDelay(0.0, 0.5, 0.5)

    def test_retryAfterBackoffHighJitter(self) -> None:
        """
        With the highest jitter the first retry comes just before
        initialBackoff.
        """
        self.assertRetryDelay(0.999999, 0.999999, 0.999999)

    def test_backoffGrowsAndCaps(self) -> None:
        """
        Each consecutive failure doubles the base delay up to maxBackoff.
        """
        poster, collector = self.poster(
            [(502, {}, b"")] * 8, random=lambda: 0.5, maxBackoff=10
        )
        emitNow(poster, event(1))
        delays = []
        for _ in range(8):
            delay = poster.nextAttempt - self.clock.seconds()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(
            delays, [0.75 * b for b in (1, 2, 4, 8, 10, 10, 10, 10)]
        )
        self.assertEqual(len(collector.requests), 9)
        self.assertEqual(poster.backlog(), 0)

    def test_retryAfterSeconds(self) -> None:
        """
        A 429 with Retry-After: 7 is retried after exactly 7 seconds.
        """
        poster, collector = self.poster([(429, {"Retry-After": "7"}, b"slow down")])
        emitNow(poster, event(1))
        self.clock.advance(6.99)
        self.assertEqual(collector.ids(), [1])
        self.clock.advance(0.01)
        self.assertEqual(collector.ids(), [1, 1])
        self.assertEqual(poster.backlog(), 0)

    def test_retryAfterDate(self) -> None:
        """
        A 503 with an HTTP-date Retry-After waits until that date.
        """
        self.clock.advance(1_700_000_000)
        when = datetimeToString(1_700_000_020).decode()
        poster, collector = self.poster([(503, {"Retry-After": when}, b"")])
        emitNow(poster, event(1))
        self.assertEqual(poster.nextAttempt, 1_700_000_020)
        self.clock.advance(20)
        self.assertEqual(collector.ids(), [1, 1])

    def test_retryAfterOnlyOn429And503(self) -> None:
        """
        Retry-After on a 500 is not honoured: the backoff applies.
        """
        poster, _ = self.poster([(500, {"Retry-After": "100"}, b"")])
        emitNow(poster, event(1))
        self.assertEqual(poster.nextAttempt - self.clock.seconds(), 0.5)

    def test_retryAfterCapped(self) -> None:
        """
        An absurd Retry-After is honoured only up to maxRetryAfter.
        """
        poster, _ = self.poster([(429, {"Retry-After": "99999999"}, b"")])
        emitNow(poster, event(1))
        self.assertEqual(poster.nextAttempt, Poster.maxRetryAfter)

    def test_retryAfterZero(self) -> None:
        """
        Retry-After: 0 waits initialBackoff, not zero (no busy loop).
        """
        poster, _ = self.poster([(503, {"Retry-After": "0"}, b"")], initialBackoff=2)
        emitNow(poster, event(1))
        self.assertEqual(poster.nextAttempt - self.clock.seconds(), 2)

    def test_parseRetryAfter(self) -> None:
        """
        Retry-After is seconds or an HTTP-date; anything else is None.
        """
        self.assertEqual(parseRetryAfter(" 12 ", 0), 12)
        self.assertEqual(parseRetryAfter("Thu, 01 Jan 1970 00:01:00 GMT", 30), 30)
        self.assertEqual(parseRetryAfter("Thu, 01 Jan 1970 00:01:00 GMT", 90), 0)
        self.assertIsNone(parseRetryAfter("soon", 0))
        self.assertIsNone(parseRetryAfter("-5", 0))

    def test_connectionRefused(self) -> None:
        """
        A connection error keeps the event and retries with backoff.
        """
        client = FlakyClient(2, StubTreq(ScriptedCollector([])))
        poster, _ = self.poster([], client=client)
        emitNow(poster, event(1))
        self.assertEqual((client.calls, poster.consecutiveFailures), (1, 1))
        self.assertIn("ConnectionRefusedError", poster.lastError)
        self.clock.advance(0.5)
        self.assertEqual((client.calls, poster.consecutiveFailures), (2, 2))
        self.clock.advance(1.0)
        self.assertEqual((client.calls, poster.consecutiveFailures), (3, 0))
        self.assertEqual(poster.backlog(), 0)

    def test_refusedSetAside(self) -> None:
        """
        A 400 logs the status and body, moves the event to the dead table,
        and the next event is delivered.
        """
        poster, collector = self.poster([(400, {}, b"missing field 'msg'")])
        with capturedLogs() as logs:
            emitNow(poster, event(1))
            emitNow(poster, event(2))
        self.assertEqual(collector.ids(), [1, 2])
        self.assertEqual(poster.backlog(), 0)
        (_, dead, status, body, _), = self.spool.dead()
        self.assertEqual((dead["id"], status, body), (1, 400, "missing field 'msg'"))
        errors = [e for e in logs if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["status"], 400)
        self.assertIn("missing field", errors[0]["body"])
        self.assertEqual(poster.deadLettered, 1)

    def test_noSecretsInLogs(self) -> None:
        """
        Log lines show the URL without its query string or credentials, and
        never a header value.
        """
        collector = ScriptedCollector([(500, {}, b""), (400, {}, b"")])
        poster = Poster(
            self.spool,
            "https://u:pw1@collector.example/raw?token=tok2",
            StubTreq(collector),
            self.clock,
            headers={"Authorization": "Splunk tok3"},
            random=lambda: 0.0,
        )
        with capturedLogs() as logs:
            poster.startService()
            emitNow(poster, event(1))
            self.clock.advance(0.5)
            self.successResultOf(poster.stopService())
        text = "\n".join(formatEvent(e) for e in logs)
        self.assertIn("https://collector.example/raw", text)
        self.assertEqual(len(logs), 3)
        for secret in ("pw1", "tok2", "tok3"):
            self.assertNotIn(secret, text)

    def test_retryableClientErrors(self) -> None:
        """
        408, 429 and redirects are retried, not set aside.
        """
        poster, collector = self.poster(
            [(408, {}, b""), (429, {}, b""), (302, {"Location": "/x"}, b"")]
        )
        emitNow(poster, event(1))
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.assertEqual(collector.ids(), [1, 1, 1, 1])
        self.assertEqual(self.spool.dead(), [])

    def test_orderAcrossRetries(self) -> None:
        """
        Events emitted while the head is backing off wait behind it (no
        request is sent early) and everything arrives in order.
        """
        poster, collector = self.poster([(500, {}, b""), (503, {}, b"")])
        emitNow(poster, event(1))
        emitNow(poster, event(2))
        self.assertEqual(collector.ids(), [1])
        self.clock.advance(0.5)
        emitNow(poster, event(3))
        self.assertEqual(collector.ids(), [1, 1])
        self.clock.advance(1.0)
        self.assertEqual(collector.ids(), [1, 1, 1, 2, 3])

    def test_timeout(self) -> None:
        """
        A POST unanswered after timeout seconds is cancelled and retried.
        """
        poster, collector = self.poster([(None, {}, b"")], timeout=30)
        emitNow(poster, event(1))
        self.clock.advance(29)
        self.assertEqual(poster.consecutiveFailures, 0)
        self.clock.advance(1)
        self.assertEqual(poster.consecutiveFailures, 1)
        self.assertIn("TimeoutError", poster.lastError)
        self.clock.advance(0.5)
        self.assertEqual((collector.ids(), poster.backlog()), ([1, 1], 0))

    def test_stopWaitsGraceThenKeeps(self) -> None:
        """
        stopService waits shutdownGrace for a POST that is never answered,
        then cancels it; the event stays spooled and a new poster on the same
        spool sends it.
        """
        pool = FakePool()
        poster, collector = self.poster(
            [(None, {}, b"")], shutdownGrace=5, pool=pool
        )
        emitNow(poster, event(1))
        stopped = poster.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(pool.closed, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

        spool = Spool(self.directory)
        self.addCleanup(spool.close)
        self.assertEqual(spool.backlog(), 1)
        collector2 = ScriptedCollector([])
        again = Poster(spool, URL, StubTreq(collector2), self.clock)
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual((collector2.ids(), again.backlog()), ([1], 0))

    def test_stopWhileBackingOff(self) -> None:
        """
        stopService during a backoff returns at once and leaves no timer.
        """
        poster, collector = self.poster([(500, {}, b"")])
        emitNow(poster, event(1))
        self.successResultOf(poster.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(poster.nextAttempt)
        self.assertEqual(self.spool.backlog(), 1)
        emitNow(poster, event(2))
        self.assertEqual(collector.ids(), [1])
        self.assertEqual(self.spool.backlog(), 2)

    def test_stopThenStart(self) -> None:
        """
        A stopped poster started again sends what was spooled meanwhile.
        """
        poster, collector = self.poster([])
        self.successResultOf(poster.stopService())
        emitNow(poster, event(1))
        poster.startService()
        self.assertEqual((collector.ids(), poster.backlog()), ([1], 0))

    def test_badURL(self) -> None:
        """
        A URL that is not http(s) is refused at construction.
        """
        for url in ("ftp://x/", "keychest.net/api", ""):
            self.assertRaises(
                ValueError, Poster, self.spool, url, object(), self.clock
            )

    def test_badHeader(self) -> None:
        """
        A header with a line break is refused at construction.
        """
        self.assertRaises(
            ValueError,
            Poster,
            self.spool,
            URL,
            object(),
            self.clock,
            headers={"Authorization": "x\r\nEvil: 1"},
        )


class BrokenSpoolTests(SynchronousTestCase):
    """
    A spool that cannot store an event makes emit fail loudly, never raise.
    """

    def assertLostLoudly(self, poster: Poster) -> None:
        with capturedLogs() as logs:
            d = emitNow(poster, event(9))
        failure = self.failureResultOf(d, SpoolError)
        critical = [e for e in logs if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertEqual(critical[0]["id"], 9)
        self.assertEqual(critical[0]["error"], str(failure.value))
        self.assertIn("spool", poster.lastError)

    def test_diskFull(self) -> None:
        """
        A connection failing with "database or disk is full".
        """
        from tests.test_spool import FullDisk

        spool = Spool(self.mktemp(), connectionFactory=FullDisk)
        self.addCleanup(spool.close)
        poster = Poster(spool, URL, object(), Clock())
        poster.startService()
        self.assertLostLoudly(poster)
        self.assertEqual(poster.backlog(), 0)

    def test_senderSpoolTrouble(self) -> None:
        """
        When the sender cannot write the spool (here: moving a refused event
        to the dead table), it logs a critical line, keeps the event and
        tries again later.
        """
        from tests.test_spool import FullDisk

        where = self.mktemp()
        first = Spool(where)
        first.append(event(1))
        first.close()
        spool = Spool(where, connectionFactory=FullDisk)
        self.addCleanup(spool.close)
        clock = Clock()
        collector = ScriptedCollector([(400, {}, b"no")] * 2)
        poster = Poster(spool, URL, StubTreq(collector), clock, random=lambda: 0.0)
        with capturedLogs() as logs:
            poster.startService()
        critical = [e for e in logs if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn("database or disk is full", critical[0]["error"])
        self.assertEqual((spool.backlog(), poster.consecutiveFailures), (1, 1))
        self.assertEqual(poster.nextAttempt, 0.5)
        clock.advance(0.5)
        self.assertEqual(collector.ids(), [1, 1])
        self.successResultOf(poster.stopService())

    def test_fileReplacedByDirectory(self) -> None:
        """
        The spool file was replaced by a directory while closed.
        """
        where = self.mktemp()
        spool = Spool(where)
        poster = Poster(spool, URL, object(), Clock())
        poster.startService()
        self.successResultOf(poster.stopService())
        for name in os.listdir(where):
            os.remove(os.path.join(where, name))
        os.mkdir(spool.path)
        self.assertLostLoudly(poster)


# Real sockets on loopback.


class _TrackedChannel(HTTPChannel):
    """
    Lets the test wait until the server side of every connection is gone,
    so the reactor is clean.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.site.channels.discard(self)
        if not self.site.channels:
            waiters, self.site.waiters = self.site.waiters, []
            for d in waiters:
                d.callback(None)


class Collector(Resource):
    """
    A JSON collector that fires C{complete} once it has C{expected}
    distinct ids.
    """

    isLeaf = True

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.ids: List[int] = []
        self.contentTypes: set = set()
        self.complete: Deferred[None] = Deferred()

    def render_POST(self, request: Any) -> bytes:
        self.contentTypes.update(request.requestHeaders.getRawHeaders("content-type"))
        self.ids.append(json.loads(request.content.read())["id"])
        if len(set(self.ids)) >= self.expected and not self.complete.called:
            self.complete.callback(None)
        return b'{"ok": true}'


class RecordingClient:
    """
    Wraps a client; C{refused} fires with the error of the C{n}th failed
    post.
    """

    def __init__(self, client: Any, n: int) -> None:
        self.client = client
        self.n = n
        self.failures = 0
        self.refused: Deferred[BaseException] = Deferred()

    def post(self, url: str, **kwargs: Any) -> Any:
        def failed(f: Failure) -> Failure:
            self.failures += 1
            if self.failures == self.n:
                self.refused.callback(f.value)
            return f

        return self.client.post(url, **kwargs).addErrback(failed)


def dedup(ids: List[int]) -> List[int]:
    seen: set = set()
    return [i for i in ids if not (i in seen or seen.add(i))]


CHILD = """
import sys, time
from keychestamp.sinks.spool import Spool
spool = Spool(sys.argv[1])
for i in range(1, int(sys.argv[2]) + 1):
    spool.append({"msg": "order", "id": i, "params": {"n": i}})
sys.stdout.write("ready\\n")
sys.stdout.flush()
time.sleep(60)
"""


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[BaseException] = Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready\n" in self.output and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if not self.ready.called:
            self.ready.errback(reason)
        self.ended.callback(reason.value)


class LoopbackTests(TestCase):
    """
    A real treq client with its own pool against a twisted.web collector on
    127.0.0.1.
    """

    timeout = 60

    def collectorSite(self, collector: Collector) -> Site:
        site = Site(collector)
        site.protocol = _TrackedChannel
        site.channels = set()
        site.waiters = []
        site.noisy = False
        return site

    async def stopAll(self, poster: Poster, site: Site, ports: List[Any]) -> None:
        await poster.stopService()
        for port in ports:
            await port.stopListening()
        if site.channels:
            d: Deferred[None] = Deferred()
            site.waiters.append(d)
            await d.addTimeout(5, reactor)

    def startPoster(self, spool: Spool, port: int, client: Any, pool: Any) -> Poster:
        poster = Poster(
            spool,
            f"http://127.0.0.1:{port}/event",
            client,
            reactor,
            headers={"Authorization": "Bearer t"},
            initialBackoff=0.05,
            maxBackoff=0.2,
            timeout=5,
            pool=pool,
        )
        poster.startService()
        return poster

    def test_collectorDownThenUp(self) -> None:
        """
        Events emitted while the collector's port is closed (connection
        refused) and after it opens all arrive, once each after
        deduplication, in order.
        """
        return Deferred.fromCoroutine(self._collectorDownThenUp())

    async def _collectorDownThenUp(self) -> None:
        collector = Collector(50)
        site = self.collectorSite(collector)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()

        spool = Spool(self.mktemp())
        self.addCleanup(spool.close)
        real, pool = buildHTTPClient(reactor)
        client = RecordingClient(real, 3)
        poster = self.startPoster(spool, number, client, pool)
        ports: List[Any] = []
        try:
            for n in range(1, 26):
                self.successResultOf(emitNow(poster, event(n)))
            refused = await client.refused.addTimeout(10, reactor)
            self.assertIsInstance(refused, ConnectionRefusedError)
            ports.append(reactor.listenTCP(number, site, interface="127.0.0.1"))
            for n in range(26, 51):
                self.successResultOf(emitNow(poster, event(n)))
            await collector.complete.addTimeout(20, reactor)
        finally:
            await self.stopAll(poster, site, ports)
        self.assertEqual(dedup(collector.ids), list(range(1, 51)))
        self.assertEqual(collector.contentTypes, {"application/json"})
        self.assertEqual(spool.backlog(), 0)
        self.assertIn("ConnectionRefusedError", poster.lastError)
        self.assertEqual(poster.consecutiveFailures, 0)

    def test_afterSIGKILL(self) -> None:
        """
        1,000 events appended by a process then killed with SIGKILL are all
        delivered, in order, by a poster on the same spool.
        """
        return Deferred.fromCoroutine(self._afterSIGKILL())

    async def _afterSIGKILL(self) -> None:
        where = self.mktemp()
        child = _Child()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-c", CHILD, where, "1000"], env=env
        )
        self.addCleanup(lambda: child.running and process.signalProcess("KILL"))
        await child.ready.addTimeout(30, reactor)
        process.signalProcess("KILL")
        reason = await child.ended.addTimeout(10, reactor)
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.signal, 9)

        spool = Spool(where)
        self.addCleanup(spool.close)
        self.assertEqual(spool.backlog(), 1000)
        collector = Collector(1000)
        site = self.collectorSite(collector)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        client, pool = buildHTTPClient(reactor)
        poster = self.startPoster(spool, port.getHost().port, client, pool)
        try:
            await collector.complete.addTimeout(30, reactor)
        finally:
            await self.stopAll(poster, site, [port])
        self.assertEqual(dedup(collector.ids), list(range(1, 1001)))
        self.assertEqual(spool.backlog(), 0)

    def selfSignedFor127(self) -> Tuple[bytes, bytes]:
        """
        A throwaway key and self-signed certificate for IP 127.0.0.1, PEM.
        """
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test collector")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        keyPEM = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return keyPEM, cert.public_bytes(serialization.Encoding.PEM)

    async def _overTLS(
        self, trusted: bool
    ) -> Tuple[Optional[BaseException], Spool, Collector]:
        from twisted.internet import ssl

        keyPEM, certPEM = self.selfSignedFor127()
        collector = Collector(1)
        site = self.collectorSite(collector)
        port = reactor.listenSSL(
            0,
            site,
            ssl.PrivateCertificate.loadPEM(keyPEM + certPEM).options(),
            interface="127.0.0.1",
        )
        trustRoot = (
            ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(certPEM)])
            if trusted
            else None
        )
        real, pool = buildHTTPClient(reactor, trustRoot=trustRoot)
        client = RecordingClient(real, 1)
        spool = Spool(self.mktemp())
        self.addCleanup(spool.close)
        poster = Poster(
            spool,
            f"https://127.0.0.1:{port.getHost().port}/event",
            client,
            reactor,
            timeout=5,
            pool=pool,
        )
        poster.startService()
        error = None
        try:
            emitNow(poster, event(1))
            if trusted:
                await collector.complete.addTimeout(10, reactor)
            else:
                error = await client.refused.addTimeout(10, reactor)
        finally:
            await self.stopAll(poster, site, [port])
        return error, spool, collector

    def test_untrustedCertificate(self) -> None:
        """
        The real client verifies the collector's certificate against the
        platform trust: a self-signed one fails, and the event stays.
        """

        async def run() -> None:
            error, spool, collector = await self._overTLS(trusted=False)
            self.assertEqual((collector.ids, spool.backlog()), ([], 1))
            reasons = " ".join(str(r.value) for r in getattr(error, "reasons", []))
            self.assertIn("certificate verify failed", reasons)

        return Deferred.fromCoroutine(run())

    def test_trustRoot(self) -> None:
        """
        With that certificate as the trust root, the event is delivered.
        """

        async def run() -> None:
            _, spool, collector = await self._overTLS(trusted=True)
            self.assertEqual((collector.ids, spool.backlog()), ([1], 0))

        return Deferred.fromCoroutine(run())


class GroupCommitTests(SynchronousTestCase):
    """
    Events emitted in one reactor turn are spooled in one transaction.
    """

    def test_burstIsOneTransaction(self) -> None:
        """
        Three emits in one turn: nothing is spooled (and no Deferred has fired)
        until the reactor turns; then all three are stored by one appendMany
        call, in order, and every Deferred fires.
        """
        spool = Spool(self.mktemp())
        self.addCleanup(spool.close)
        calls: List[int] = []
        original = spool.appendMany

        def counting(events):  # type: ignore[no-untyped-def]
            calls.append(len(events))
            return original(events)

        spool.appendMany = counting  # type: ignore[method-assign]
        clock = Clock()
        poster = Poster(spool, URL, object(), clock)
        ds = [poster.emit(event(n)) for n in (1, 2, 3)]
        self.assertEqual(poster.backlog(), 3)
        self.assertEqual(spool.backlog(), 0)
        for d in ds:
            self.assertNoResult(d)
        clock.advance(0)
        self.assertEqual(calls, [3])
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual([e["id"] for _, e in spool.peek(10)], [1, 2, 3])

    def test_stopCommits(self) -> None:
        """
        stopService stores what was emitted in the last turn.
        """
        where = self.mktemp()
        spool = Spool(where)
        clock = Clock()
        poster = Poster(spool, URL, object(), clock)
        poster.startService()
        poster.emit(event(7))
        poster.stopService()
        again = Spool(where)
        self.addCleanup(again.close)
        self.assertEqual([e["id"] for _, e in again.peek(10)], [7])
