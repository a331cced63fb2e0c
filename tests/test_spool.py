"""
Tests for keychestamp.sinks.spool: the poster's durable SQLite queue.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.trial.unittest import SynchronousTestCase

from keychestamp.sinks.spool import DEAD_BODY_LIMIT, Spool, SpoolError


class FullDisk(sqlite3.Connection):
    """
    A connection that opens normally and then fails every INSERT the way
    SQLite does when the disk is full.
    """

    def execute(self, sql, *args):  # type: ignore[no-untyped-def, override]
        if sql.lstrip().upper().startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)

    def executemany(self, sql, *args):  # type: ignore[no-untyped-def, override]
        if sql.lstrip().upper().startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().executemany(sql, *args)


class SpoolTests(SynchronousTestCase):
    """
    The queue operations and what survives a reopen.
    """

    def setUp(self) -> None:
        self.directory = os.path.join(self.mktemp(), "spool")
        self.spool = Spool(self.directory, now=lambda: 86400.0)
        self.addCleanup(self.spool.close)

    def test_appendReturnsLength(self) -> None:
        """
        append returns the queue length after the append.
        """
        self.assertEqual(
            [self.spool.append({"id": i}) for i in range(3)], [1, 2, 3]
        )
        self.assertEqual(self.spool.backlog(), 3)

    def test_peekInOrder(self) -> None:
        """
        peek returns the oldest events first, with increasing seqs, as dicts
        equal to what was appended.
        """
        events = [{"id": i, "msg": "order", "params": {"n": "é"}} for i in range(4)]
        for e in events:
            self.spool.append(e)
        rows = self.spool.peek(3)
        self.assertEqual([e for (_, e) in rows], events[:3])
        seqs = [s for (s, _) in rows]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), 3)

    def test_remove(self) -> None:
        """
        remove forgets one event and lowers the backlog; removing an unknown
        seq changes nothing.
        """
        for i in range(3):
            self.spool.append({"id": i})
        (seq, _), = self.spool.peek(1)
        self.spool.remove(seq)
        self.spool.remove(seq)
        self.spool.remove(10_000)
        self.assertEqual(self.spool.backlog(), 2)
        self.assertEqual([e["id"] for (_, e) in self.spool.peek(10)], [1, 2])

    def test_setAside(self) -> None:
        """
        setAside moves the event to the dead table with its status, the
        answer's body (truncated) and the time; the queue goes on.
        """
        self.spool.append({"id": 1})
        self.spool.append({"id": 2})
        (seq, _), = self.spool.peek(1)
        self.spool.setAside(seq, 400, "x" * (DEAD_BODY_LIMIT + 10))
        self.assertEqual(self.spool.backlog(), 1)
        self.assertEqual([e["id"] for (_, e) in self.spool.peek(10)], [2])
        (dseq, event, status, body, when), = self.spool.dead()
        self.assertEqual(
            (dseq, event, status, len(body), when),
            (seq, {"id": 1}, 400, DEAD_BODY_LIMIT, "1970-01-02 00:00:00"),
        )

    def test_reopenKeepsContent(self) -> None:
        """
        A new Spool on the same directory counts and returns what the first
        one left, and seqs keep growing even after the queue was emptied.
        """
        for i in range(3):
            self.spool.append({"id": i})
        (seq, _), = self.spool.peek(1)
        self.spool.setAside(seq, 422, "no")
        self.spool.close()
        again = Spool(self.directory)
        self.addCleanup(again.close)
        self.assertEqual(again.backlog(), 2)
        rows = again.peek(10)
        self.assertEqual([e["id"] for (_, e) in rows], [1, 2])
        for s, _ in rows:
            again.remove(s)
        again.close()
        third = Spool(self.directory)
        self.addCleanup(third.close)
        third.append({"id": 3})
        (newSeq, _), = third.peek(1)
        self.assertGreater(newSeq, rows[-1][0])
        self.assertEqual(len(third.dead()), 1)

    def test_usableAfterClose(self) -> None:
        """
        After close, the next call opens the file again (an event emitted
        during shutdown is still kept).
        """
        self.spool.append({"id": 1})
        self.spool.close()
        self.spool.close()
        self.assertEqual(self.spool.append({"id": 2}), 2)
        self.assertEqual(len(self.spool.peek(5)), 2)

    def test_walAndModes(self) -> None:
        """
        The file uses the WAL journal; the directory is 0700 and the file
        0600.
        """
        db = sqlite3.connect(self.spool.path)
        self.addCleanup(db.close)
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
        self.assertEqual(mode, "wal")
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.spool.path).st_mode), 0o600)
        self.assertEqual(os.path.basename(self.spool.path), "spool.sqlite")

    def test_undecodableRowSetAside(self) -> None:
        """
        A row that is not a JSON object (edited by hand) goes to the dead
        table instead of blocking the queue.
        """
        self.spool.append({"id": 1})
        db = sqlite3.connect(self.spool.path, isolation_level=None)
        self.addCleanup(db.close)
        db.execute("UPDATE queue SET event = 'not json'")
        self.spool.append({"id": 2})
        self.assertEqual([e for (_, e) in self.spool.peek(5)], [{"id": 2}])
        self.assertEqual(self.spool.backlog(), 1)
        (_, _, status, body, _), = self.spool.dead()
        self.assertIsNone(status)
        self.assertIn("undecodable", body)


class SpoolErrorTests(SynchronousTestCase):
    """
    A spool that cannot be written says so with a SpoolError naming the
    file; it never half-succeeds.
    """

    def test_directoryUnderARegularFile(self) -> None:
        """
        A directory that cannot be created (its parent is a regular file,
        which stops root too) raises SpoolError naming it.
        """
        parent = self.mktemp()
        with open(parent, "w") as f:
            f.write("not a directory")
        where = os.path.join(parent, "spool")
        e = self.assertRaises(SpoolError, Spool, where)
        self.assertIn(where, str(e))
        self.assertIn("cannot create spool directory", str(e))

    def test_fileIsADirectory(self) -> None:
        """
        spool.sqlite being a directory raises SpoolError naming it.
        """
        where = self.mktemp()
        os.makedirs(os.path.join(where, "spool.sqlite"))
        e = self.assertRaises(SpoolError, Spool, where)
        self.assertIn(os.path.join(where, "spool.sqlite"), str(e))

    def test_diskFull(self) -> None:
        """
        A failing INSERT raises SpoolError carrying SQLite's reason, and the
        backlog does not count the event.
        """
        spool = Spool(self.mktemp(), connectionFactory=FullDisk)
        self.addCleanup(spool.close)
        e = self.assertRaises(SpoolError, spool.append, {"id": 1})
        self.assertIn("database or disk is full", str(e))
        self.assertIn(spool.path, str(e))
        self.assertEqual(spool.backlog(), 0)
        self.assertEqual(spool.peek(1), [])

    def test_diskFullDuringSetAside(self) -> None:
        """
        A setAside that cannot write leaves the event in the queue.
        """
        where = self.mktemp()
        spool = Spool(where)
        spool.append({"id": 1})
        (seq, _), = spool.peek(1)
        spool.close()
        broken = Spool(where, connectionFactory=FullDisk)
        self.addCleanup(broken.close)
        self.assertRaises(SpoolError, broken.setAside, seq, 400, "no")
        self.assertEqual(broken.backlog(), 1)
        self.assertEqual([s for (s, _) in broken.peek(1)], [seq])
        self.assertEqual(broken.dead(), [])

    def test_notSerialisable(self) -> None:
        """
        An event JSON cannot encode raises SpoolError, not TypeError.
        """
        spool = Spool(self.mktemp())
        self.addCleanup(spool.close)
        self.assertRaises(SpoolError, spool.append, {"id": object()})
        self.assertEqual(spool.backlog(), 0)

    def test_replacedByDirectoryAfterClose(self) -> None:
        """
        When the file was replaced by a directory, the reopen on the next
        append fails with SpoolError.
        """
        where = self.mktemp()
        spool = Spool(where)
        spool.close()
        for name in os.listdir(where):
            os.remove(os.path.join(where, name))
        os.mkdir(spool.path)
        self.assertRaises(SpoolError, spool.append, {"id": 1})
