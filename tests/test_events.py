"""
Tests for keychestamp.events: the envelope, persistent ids and fan-out to sinks.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import List

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from keychestamp.events import (
    Event,
    EventLog,
    IBacklog,
    IdStore,
    IEventSink,
    formatTime,
)

ENVELOPE_KEYS = [
    "msg",
    "params",
    "time",
    "proxy",
    "server",
    "path",
    "code",
    "id",
    "host",
    "ip",
    "version",
    "backlog",
    "log_time",
]

# 2019-12-11 08:40:37 UTC, the README's example.
WHEN = 1576053637.0


@implementer(IEventSink)
class RecordingSink:
    """A sink that keeps what it got and accepts it at once."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.events: List[Event] = []

    def emit(self, event: Event) -> "Deferred[None]":
        self.events.append(event)
        return succeed(None)


@implementer(IEventSink)
class FailingSink:
    """A sink that refuses every event while C{failing}."""

    def __init__(self, name: str = "broken", raiseSynchronously: bool = False) -> None:
        self.name = name
        self.failing = True
        self.raiseSynchronously = raiseSynchronously

    def emit(self, event: Event) -> "Deferred[None]":
        if not self.failing:
            return succeed(None)
        if self.raiseSynchronously:
            raise OSError(28, "No space left on device")
        return fail(OSError(28, "No space left on device"))


@implementer(IEventSink)
class PendingSink:
    """A sink whose acceptance the test fires by hand."""

    name = "pending"

    def __init__(self) -> None:
        self.pending: List[Deferred[None]] = []

    def emit(self, event: Event) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d


@implementer(IBacklog)
class FixedBacklog:
    """A queue of a given length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def backlog(self) -> int:
        return self.n


class IdStoreTests(SynchronousTestCase):
    """
    Tests for L{IdStore}.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.path = self.dir.child("event-id")

    def store(self, reserve: int = 1000) -> IdStore:
        s = IdStore(self.path, reserve=reserve)
        self.addCleanup(s.close)
        return s

    def test_firstIdsCountFromOne(self) -> None:
        """
        A new store hands out 1, 2, 3.
        """
        s = self.store()
        self.assertEqual([s.next(), s.next(), s.next()], [1, 2, 3])
        self.assertEqual(s.last, 3)

    def test_createsDirectoryAndPrivateFile(self) -> None:
        """
        A missing directory is created and the id file is 0600.
        """
        self.store()
        self.assertTrue(self.dir.isdir())
        self.assertEqual(stat.S_IMODE(os.stat(self.path.path).st_mode), 0o600)

    def test_tightensExistingFileMode(self) -> None:
        """
        An existing id file with a looser mode is set to 0600.
        """
        self.dir.makedirs()
        self.path.setContent(b"")
        os.chmod(self.path.path, 0o644)
        self.store()
        self.assertEqual(stat.S_IMODE(os.stat(self.path.path).st_mode), 0o600)

    def test_continuesAfterCleanClose(self) -> None:
        """
        After close() a new store continues at last + 1, without a gap.
        """
        s = IdStore(self.path, reserve=10)
        for _ in range(25):
            s.next()
        s.close()
        self.assertEqual(self.store(reserve=10).next(), 26)

    def test_stopServiceCloses(self) -> None:
        """
        Stopping the service closes the store cleanly.
        """
        s = IdStore(self.path)
        s.startService()
        s.next()
        s.stopService()
        self.assertRaises(RuntimeError, s.next)
        self.assertEqual(self.store().next(), 2)

    def test_crashSkipsReservedIdsNeverRepeats(self) -> None:
        """
        What the disk shows after a crash (a copy of the file while the store
        is open) makes the next store start after the reserved ceiling: a
        gap, never a repeated id.
        """
        s = self.store(reserve=10)
        for _ in range(3):
            s.next()
        crashed = self.dir.child("crashed")
        shutil.copyfile(self.path.path, crashed.path)
        with capturedLogs() as events:
            after = IdStore(crashed, reserve=10)
        self.addCleanup(after.close)
        self.assertEqual(after.next(), 11)
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in events))

    def test_lastIdInFileWithoutSync(self) -> None:
        """
        Every id is written to the file (page cache) as it is handed out.
        """
        s = self.store(reserve=100)
        for _ in range(7):
            s.next()
        self.assertEqual(int.from_bytes(self.path.getContent()[:8], "big"), 7)

    def test_secondStoreOnSameFileRefused(self) -> None:
        """
        Two stores on one file would repeat ids: the second one fails.
        """
        self.store()
        error = self.assertRaises(OSError, IdStore, self.path)
        self.assertIn("in use", str(error))

    def test_corruptFileRefused(self) -> None:
        """
        A file of the wrong size is refused with a clear error.
        """
        self.dir.makedirs()
        self.path.setContent(b"12345")
        error = self.assertRaises(OSError, IdStore, self.path)
        self.assertIn("not an event id file", str(error))

    def test_closeIsIdempotent(self) -> None:
        """
        close() twice is harmless and next() after close raises.
        """
        s = IdStore(self.path)
        s.close()
        s.close()
        self.assertRaises(RuntimeError, s.next)


class EventLogTests(SynchronousTestCase):
    """
    Tests for L{EventLog}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(WHEN + 2)
        self.idPath = FilePath(self.mktemp()).child("event-id")

    def eventLog(self, sinks, backlog=None) -> EventLog:
        ids = IdStore(self.idPath)
        self.addCleanup(ids.close)
        return EventLog(
            "i0lxcglxufdwnplehph0kqfp@amp.keychest.net",
            sinks,
            ids,
            self.clock,
            "MacBook2018.local",
            "127.0.0.1",
            "0.4.0",
            backlog=backlog,
        )

    def logOne(self, log: EventLog, code: int = 201):
        return log.log(
            "new-acct",
            {"contact": ["mailto:a@example.com"]},
            "acme-staging-v02.api.letsencrypt.org",
            "/acme/new-acct",
            code,
            WHEN,
        )

    def test_formatTime(self) -> None:
        """
        Times are UTC "YYYY-MM-DD HH:MM:SS".
        """
        self.assertEqual(formatTime(WHEN), "2019-12-11 08:40:37")
        self.assertEqual(formatTime(0.999), "1970-01-01 00:00:00")

    def test_envelope(self) -> None:
        """
        The sink gets the envelope with the original's keys, in order, and
        the values the README shows.
        """
        sink = RecordingSink()
        self.successResultOf(self.logOne(self.eventLog([sink])))
        [event] = sink.events
        self.assertEqual(list(event), ENVELOPE_KEYS)
        self.assertEqual(
            event,
            {
                "msg": "new-acct",
                "params": {"contact": ["mailto:a@example.com"]},
                "time": "2019-12-11 08:40:37",
                "proxy": "i0lxcglxufdwnplehph0kqfp@amp.keychest.net",
                "server": "acme-staging-v02.api.letsencrypt.org",
                "path": "/acme/new-acct",
                "code": 201,
                "id": 1,
                "host": "MacBook2018.local",
                "ip": "127.0.0.1",
                "version": "0.4.0",
                "backlog": 0,
                "log_time": "2019-12-11 08:40:39",
            },
        )

    def test_resultIsEnvelope(self) -> None:
        """
        The Deferred fires with the envelope the sinks got.
        """
        sink = RecordingSink()
        event = self.successResultOf(self.logOne(self.eventLog([sink])))
        self.assertIs(event, sink.events[0])

    def test_logTimeFollowsClock(self) -> None:
        """
        log_time is the clock's time when the event is logged.
        """
        sink = RecordingSink()
        log = self.eventLog([sink])
        self.logOne(log)
        self.clock.advance(3600)
        self.logOne(log)
        self.assertEqual(
            [e["log_time"] for e in sink.events],
            ["2019-12-11 08:40:39", "2019-12-11 09:40:39"],
        )
        self.assertEqual({e["time"] for e in sink.events}, {"2019-12-11 08:40:37"})

    def test_idsIncreaseAndSurviveRestart(self) -> None:
        """
        Ids go up by one per event and continue in a new EventLog on the
        same id file after a clean stop.
        """
        sink = RecordingSink()
        ids = IdStore(self.idPath)
        log = EventLog("p", [sink], ids, self.clock, "h", "127.0.0.1", "v")
        for _ in range(3):
            self.logOne(log)
        ids.close()
        log2 = self.eventLog([sink])
        self.logOne(log2)
        self.logOne(log2)
        self.assertEqual([e["id"] for e in sink.events], [1, 2, 3, 4, 5])

    def test_backlogFromProvider(self) -> None:
        """
        backlog is what the IBacklog provider says when the event is logged.
        """
        queue = FixedBacklog(0)
        verifyObject(IBacklog, queue)
        sink = RecordingSink()
        log = self.eventLog([sink], backlog=queue)
        queue.n = 7
        self.logOne(log)
        queue.n = 12
        self.logOne(log)
        self.assertEqual([e["backlog"] for e in sink.events], [7, 12])

    def test_failingSinkDoesNotStopOthers(self) -> None:
        """
        A sink that fails (asynchronously or by raising) does not keep the
        event from the other sinks, and the Deferred still fires.
        """
        first, last = RecordingSink("first"), RecordingSink("last")
        log = self.eventLog(
            [first, FailingSink("async"), FailingSink("sync", True), last]
        )
        event = self.successResultOf(self.logOne(log))
        self.assertEqual(event["id"], 1)
        self.assertEqual(len(first.events), 1)
        self.assertEqual(len(last.events), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

    def test_healthNamesFailingSink(self) -> None:
        """
        health() shows the last error of a failing sink and None for the
        others, and clears once the sink accepts again.
        """
        broken = FailingSink()
        log = self.eventLog([RecordingSink(), broken])
        self.assertEqual(log.health(), {"memory": None, "broken": None})
        self.logOne(log)
        health = log.health()
        self.assertIsNone(health["memory"])
        self.assertIn("No space left on device", health["broken"])
        broken.failing = False
        self.logOne(log)
        self.assertEqual(log.health(), {"memory": None, "broken": None})
        self.flushLoggedErrors(OSError)

    def test_failureLoggedOncePerStreak(self) -> None:
        """
        A sink failing on every event is logged as an error once, not per
        event.
        """
        log = self.eventLog([FailingSink()])
        for _ in range(5):
            self.logOne(log)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_sameNamesKeptApart(self) -> None:
        """
        Two sinks with one name get separate health entries.
        """
        log = self.eventLog([RecordingSink("file"), RecordingSink("file")])
        self.assertEqual(sorted(log.health()), ["file", "file#2"])

    def test_waitsForEverySink(self) -> None:
        """
        The Deferred fires only once every sink has accepted the event.
        """
        pending = PendingSink()
        d = self.logOne(self.eventLog([RecordingSink(), pending]))
        self.assertNoResult(d)
        pending.pending[0].callback(None)
        self.assertEqual(self.successResultOf(d)["id"], 1)

    def test_sinksProperty(self) -> None:
        """
        sinks lists the sinks in order.
        """
        a, b = RecordingSink("a"), RecordingSink("b")
        self.assertEqual(self.eventLog([a, b]).sinks, (a, b))

    def test_closedIdStoreDoesNotFail(self) -> None:
        """
        With the id store closed the event cannot be numbered: it is logged
        as a failure and the Deferred fires with None rather than failing.
        """
        sink = RecordingSink()
        ids = IdStore(self.idPath)
        log = EventLog("p", [sink], ids, self.clock, "h", "127.0.0.1", "v")
        ids.close()
        self.assertIsNone(self.successResultOf(self.logOne(log)))
        self.assertEqual(sink.events, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_fakeSinksProvideInterface(self) -> None:
        """
        The test doubles really provide IEventSink.
        """
        for sink in (RecordingSink(), FailingSink(), PendingSink()):
            self.assertTrue(verifyObject(IEventSink, sink))
