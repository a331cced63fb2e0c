"""
Tests for keychestamp.sinks.file: the JSON-lines audit file.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from typing import BinaryIO, List

from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from keychestamp.events import IEventSink
from keychestamp.sinks.file import FileSink, FileSinkError, encodeEvent, openAppend

# 2019-12-11 08:40:37 UTC
WHEN = 1576053637.0


def makeEvent(eventId: int = 1, **extra: object) -> dict:
    """An envelope as the event log builds it."""
    event = {
        "msg": "new-order",
        "params": {"identifiers": ["example.com"]},
        "time": "2019-12-11 08:40:37",
        "proxy": "i0lxcglxufdwnplehph0kqfp@amp.keychest.net",
        "server": "acme-v02.api.letsencrypt.org",
        "path": "/acme/new-order",
        "code": 201,
        "id": eventId,
        "host": "h",
        "ip": "127.0.0.1",
        "version": "0.4.0",
        "backlog": 0,
        "log_time": "2019-12-11 08:40:37",
    }
    event.update(extra)
    return event


def readLines(path: FilePath) -> List[dict]:
    """The JSON objects in a JSON-lines file."""
    return [json.loads(line) for line in path.getContent().decode("utf-8").splitlines()]


class FlakyFile:
    """
    A file object whose writes fail with ENOSPC while C{full}, as on a full disk.
    """

    def __init__(self, real: BinaryIO, state: dict) -> None:
        self.real = real
        self.state = state

    def write(self, data: bytes) -> int:
        if self.state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real.write(data)

    def flush(self) -> None:
        self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


class FileSinkTests(SynchronousTestCase):
    """
    Tests for L{FileSink} without a reactor.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(WHEN + 5)
        self.dir = FilePath(self.mktemp())
        self.path = self.dir.child("logs").child("audit.json")

    def startedSink(self, **kwargs) -> FileSink:
        sink = FileSink(self.path, self.clock, **kwargs)
        sink.startService()
        self.addCleanup(lambda: sink.running and sink.stopService())
        return sink

    def test_interfaces(self) -> None:
        """
        FileSink provides IEventSink and IService, named "file".
        """
        sink = FileSink(self.path, self.clock)
        self.assertTrue(verifyObject(IEventSink, sink))
        self.assertTrue(verifyObject(IService, sink))
        self.assertEqual(sink.name, "file")

    def test_constructorTouchesNothing(self) -> None:
        """
        Building the sink creates nothing on disk.
        """
        FileSink(self.path, self.clock)
        self.assertFalse(self.dir.exists())

    def test_onePerLineFlushed(self) -> None:
        """
        Each emit appends one JSON object on its own line, readable as soon as
        the Deferred fired, with log_time set to the time of writing.
        """
        sink = self.startedSink()
        self.successResultOf(sink.emit(makeEvent(1)))
        self.assertEqual([e["id"] for e in readLines(self.path)], [1])
        self.clock.advance(60)
        self.successResultOf(sink.emit(makeEvent(2)))
        lines = readLines(self.path)
        self.assertEqual([e["id"] for e in lines], [1, 2])
        self.assertEqual(
            [e["log_time"] for e in lines],
            ["2019-12-11 08:40:42", "2019-12-11 08:41:42"],
        )

    def test_keyOrderAndFormat(self) -> None:
        """
        Lines keep the envelope's key order and use json.dumps' default
        separators.
        """
        sink = self.startedSink()
        self.successResultOf(sink.emit(makeEvent(1)))
        line = self.path.getContent().decode("utf-8")
        self.assertTrue(line.startswith('{"msg": "new-order", "params": {'))
        self.assertTrue(line.endswith('"log_time": "2019-12-11 08:40:42"}\n'))
        self.assertEqual(line.count("\n"), 1)

    def test_eventNotMutated(self) -> None:
        """
        The sink sets log_time on a copy: the event it got is unchanged.
        """
        sink = self.startedSink()
        event = makeEvent(1)
        sink.emit(event)
        self.assertEqual(event, makeEvent(1))

    def test_utf8(self) -> None:
        """
        Non-ASCII text is written as UTF-8; a lone surrogate falls back to
        an escaped line instead of failing.
        """
        sink = self.startedSink()
        self.successResultOf(sink.emit(makeEvent(1, params={"agent": "Zürich"})))
        self.successResultOf(sink.emit(makeEvent(2, params={"agent": "\ud800"})))
        self.assertIn("Zürich".encode("utf-8"), self.path.getContent())
        self.assertEqual(
            [e["params"]["agent"] for e in readLines(self.path)], ["Zürich", "\ud800"]
        )

    def test_unserializableFails(self) -> None:
        """
        An event that is not JSON fails the Deferred and writes nothing.
        """
        sink = self.startedSink()
        self.failureResultOf(sink.emit(makeEvent(1, params=object())), TypeError)
        self.assertEqual(self.path.getContent(), b"")

    def test_appendsToExisting(self) -> None:
        """
        An existing file is appended to, never truncated.
        """
        self.path.parent().makedirs()
        self.path.setContent(b'{"id": 0}\n')
        sink = self.startedSink()
        sink.emit(makeEvent(1))
        self.assertEqual([e["id"] for e in readLines(self.path)], [0, 1])

    def test_partialLineRepaired(self) -> None:
        """
        A file ending in a cut-off line gets a newline first, so the next
        event starts on a line of its own.
        """
        self.path.parent().makedirs()
        self.path.setContent(b'{"id": 0}\n{"id": 1, "ms')
        sink = self.startedSink()
        sink.emit(makeEvent(2))
        lines = self.path.getContent().splitlines()
        self.assertEqual(len(lines), 3)
        self.assertEqual(json.loads(lines[2])["id"], 2)

    def test_directoriesCreated(self) -> None:
        """
        Missing parent directories are created 0750.
        """
        self.startedSink()
        self.assertEqual(stat.S_IMODE(os.stat(self.path.parent().path).st_mode), 0o750)
        self.assertTrue(self.path.isfile())

    def test_unwritablePathCheck(self) -> None:
        """
        A path under a regular file cannot be created: check() raises
        FileSinkError whose str() is one line naming the path.
        """
        self.dir.makedirs()
        afile = self.dir.child("afile")
        afile.setContent(b"")
        path = afile.child("sub").child("audit.json")
        sink = FileSink(path, self.clock)
        error = self.assertRaises(FileSinkError, sink.check)
        self.assertIsInstance(error, OSError)
        self.assertIn(path.path, str(error))
        self.assertNotIn("\n", str(error))
        self.assertRaises(FileSinkError, sink.startService)
        self.assertFalse(sink.running)

    def test_checkCreatesFile(self) -> None:
        """
        check() on a good path succeeds (the file now exists).
        """
        FileSink(self.path, self.clock).check()
        self.assertTrue(self.path.isfile())

    def test_emitWhenStoppedFails(self) -> None:
        """
        A sink that is not running refuses events.
        """
        sink = FileSink(self.path, self.clock)
        self.failureResultOf(sink.emit(makeEvent()), RuntimeError)

    def test_reopenAfterRename(self) -> None:
        """
        After logrotate renamed the file, reopen() makes later events go to a
        new file at the path, and earlier ones stay in the renamed one.
        """
        sink = self.startedSink()
        sink.emit(makeEvent(1))
        rotated = self.path.sibling("audit.json.1")
        self.path.moveTo(rotated)
        sink.emit(makeEvent(2))
        sink.reopen()
        sink.emit(makeEvent(3))
        self.assertEqual([e["id"] for e in readLines(rotated)], [1, 2])
        self.assertEqual([e["id"] for e in readLines(self.path)], [3])

    def test_stopClosesAndFlushes(self) -> None:
        """
        stopService closes the file; what was written is on disk.
        """
        sink = self.startedSink()
        sink.emit(makeEvent(1))
        sink.stopService()
        self.assertFalse(sink.running)
        self.assertEqual([e["id"] for e in readLines(self.path)], [1])
        self.failureResultOf(sink.emit(makeEvent(2)), RuntimeError)

    def test_writeFailureLoudThenRecovers(self) -> None:
        """
        ENOSPC fails the Deferred and is logged critical once per streak;
        the next emit reopens the file and succeeds.
        """
        state = {"full": False}
        opened: List[FlakyFile] = []

        def opener(path: str) -> BinaryIO:
            f = FlakyFile(openAppend(path), state)
            opened.append(f)
            return f  # type: ignore[return-value]

        sink = self.startedSink(opener=opener)
        self.successResultOf(sink.emit(makeEvent(1)))
        state["full"] = True
        with capturedLogs() as events:
            failure1 = self.failureResultOf(sink.emit(makeEvent(2)), OSError)
            self.failureResultOf(sink.emit(makeEvent(3)), OSError)
        self.assertEqual(failure1.value.errno, errno.ENOSPC)
        critical = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn(self.path.path, critical[0]["path"])
        self.assertIn("No space left", sink.lastError)
        state["full"] = False
        with capturedLogs() as events:
            self.successResultOf(sink.emit(makeEvent(4)))
        self.assertIsNone(sink.lastError)
        self.assertTrue(any(e["log_level"] == LogLevel.info for e in events))
        self.assertEqual([e["id"] for e in readLines(self.path)], [1, 4])
        self.assertGreater(len(opened), 1)

    def test_twoSinksInOneMultiService(self) -> None:
        """
        Two file sinks with different names run side by side in one
        MultiService, each writing its own file.
        """
        other = self.path.sibling("other.json")
        parent = MultiService()
        FileSink(self.path, self.clock).setServiceParent(parent)
        FileSink(other, self.clock, name="file2").setServiceParent(parent)
        parent.startService()
        self.addCleanup(parent.stopService)
        parent.getServiceNamed("file").emit(makeEvent(1))
        parent.getServiceNamed("file2").emit(makeEvent(2))
        self.assertEqual([e["id"] for e in readLines(self.path)], [1])
        self.assertEqual([e["id"] for e in readLines(other)], [2])

    def test_signalNeedsThreadCalls(self) -> None:
        """
        reopenOnSignal with a clock that cannot take calls from a signal
        handler is refused at construction.
        """
        self.assertRaises(TypeError, FileSink, self.path, Clock(), True)

    def test_encodeEvent(self) -> None:
        """
        encodeEvent gives one newline-terminated line.
        """
        self.assertEqual(encodeEvent({"a": 1, "b": "x"}), b'{"a": 1, "b": "x"}\n')


class SignalTests(TestCase):
    """
    SIGHUP handling with the real reactor and a real signal.
    """

    def setUp(self) -> None:
        # Put a recording Python handler first: it is what our handler must
        # chain to, and it keeps a missing handler from killing the test run.
        self.previousCalls: List[int] = []
        self.recorder = lambda signum, frame: self.previousCalls.append(signum)
        original = signal.signal(signal.SIGHUP, self.recorder)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()

    def sink(self, name: str) -> FileSink:
        sink = FileSink(self.dir.child(name), reactor, reopenOnSignal=True, name=name)
        sink.startService()
        self.addCleanup(lambda: sink.running and sink.stopService())
        return sink

    async def waitFor(self, condition, timeout: float = 5.0) -> None:
        """Poll every 10 ms until condition() is true, for at most timeout."""
        for _ in range(int(timeout / 0.01)):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not met in time")

    def rotate(self, sink: FileSink) -> FilePath:
        path = FilePath(sink.path)
        rotated = path.sibling(path.basename() + ".1")
        path.moveTo(rotated)
        return rotated

    async def test_sighupReopens(self) -> None:
        """
        A real SIGHUP makes the sink reopen its path (chaining to the previous
        handler); stopService puts the previous handler back.
        """
        sink = self.sink("audit.json")
        sink.emit(makeEvent(1))
        rotated = self.rotate(sink)
        os.kill(os.getpid(), signal.SIGHUP)
        await self.waitFor(lambda: FilePath(sink.path).exists())
        sink.emit(makeEvent(2))
        self.assertEqual([e["id"] for e in readLines(rotated)], [1])
        self.assertEqual([e["id"] for e in readLines(FilePath(sink.path))], [2])
        self.assertEqual(self.previousCalls, [signal.SIGHUP])
        self.assertIsNot(signal.getsignal(signal.SIGHUP), self.recorder)
        sink.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), self.recorder)
        os.kill(os.getpid(), signal.SIGHUP)
        await self.waitFor(lambda: len(self.previousCalls) == 2)

    async def test_twoSinksStoppedOutOfOrder(self) -> None:
        """
        Two sinks both reopen on SIGHUP; stopping the first one installed
        does not take the handler away from the second, and stopping both
        restores the original handler.
        """
        a, b = self.sink("a.json"), self.sink("b.json")
        self.rotate(a)
        self.rotate(b)
        os.kill(os.getpid(), signal.SIGHUP)
        await self.waitFor(
            lambda: FilePath(a.path).exists() and FilePath(b.path).exists()
        )
        a.stopService()
        self.rotate(a)
        self.rotate(b)
        os.kill(os.getpid(), signal.SIGHUP)
        await self.waitFor(lambda: FilePath(b.path).exists())
        self.assertFalse(FilePath(a.path).exists())
        self.assertEqual(self.previousCalls, [signal.SIGHUP, signal.SIGHUP])
        b.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), self.recorder)
