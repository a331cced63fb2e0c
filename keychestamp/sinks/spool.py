# -*- test-case-name: tests.test_spool -*-
"""
The poster's durable queue: one SQLite file, C{spool.sqlite}, in the working
directory's C{spool/}.

An event counts as logged once it is in this file, so the proxy never waits
for the collector. The poster reads the queue in order, removes what the
collector accepted and moves what it refused for good to the C{dead} table,
where an operator can read it with the C{sqlite3} command line tool.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Sequence, Callable, List, Optional, Tuple, Type, Union

from twisted.logger import Logger
from twisted.python.filepath import FilePath

from keychestamp.events import Event, formatTime

#: How much of a refused answer's body is kept in the dead table.
DEAD_BODY_LIMIT = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead (
    seq    INTEGER PRIMARY KEY,
    event  TEXT NOT NULL,
    status INTEGER,
    body   TEXT,
    time   TEXT NOT NULL
);
PRAGMA user_version = 1;
"""


class SpoolError(Exception):
    """
    The spool could not be opened or written (unwritable directory, disk
    full, damaged file). The message names the file and the cause.
    """


class Spool:
    """
    A queue of events in SQLite (standard library, WAL journal).

    Every call runs on the reactor thread and is one short transaction:
    C{synchronous=NORMAL} in WAL mode commits without waiting for C{fsync}.
    A committed event survives the process being killed (SIGKILL, OOM,
    crash), which is the failure that matters here; after a power loss or
    kernel crash the last few commits may be lost. The queue length is
    counted once when the file is opened and then kept in memory, so
    L{backlog} costs nothing per event.

    C{close} releases the file; any later call opens it again, so an event
    emitted while the application shuts down is still kept.
    """

    filename = "spool.sqlite"

    log = Logger()

    def __init__(
        self,
        directory: Union[str, FilePath],
        now: Callable[[], float] = time.time,
        connectionFactory: Type[sqlite3.Connection] = sqlite3.Connection,
    ) -> None:
        """
        Open (creating if needed) the spool in C{directory}.

        @param directory: the spool directory; created with mode 0700.
        @param now: wall clock, for the time a dead letter was set aside.
        @param connectionFactory: the C{sqlite3.Connection} class to use
            (tests pass a subclass that fails like a full disk).
        @raise SpoolError: the directory or the file cannot be created or
            opened.
        """
        if isinstance(directory, FilePath):
            directory = directory.path
        self.directory: str = directory
        self.path: str = os.path.join(directory, self.filename)
        self._now = now
        self._factory = connectionFactory
        self._db: Optional[sqlite3.Connection] = None
        self._backlog = 0
        self.open()

    # lifecycle

    def open(self) -> None:
        """
        Open the file if it is not open yet, and count the queue.

        @raise SpoolError: it cannot be created or opened.
        """
        if self._db is not None:
            return
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SpoolError(
                f"cannot create spool directory {self.directory}: "
                f"{e.strerror or e}"
            ) from e
        try:
            # Create the file ourselves so it is 0600 whatever the umask;
            # SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            raise SpoolError(
                f"cannot open spool {self.path}: {e.strerror or e}"
            ) from e
        db: Optional[sqlite3.Connection] = None
        try:
            db = sqlite3.connect(
                self.path, isolation_level=None, factory=self._factory
            )
            # A writer from outside (an operator's sqlite3 shell) may hold
            # the lock briefly; wait a little, never long, on the reactor.
            db.execute("PRAGMA busy_timeout = 250")
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
            (count,) = db.execute("SELECT count(*) FROM queue").fetchone()
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        if mode.lower() != "wal":
            self.log.warn(
                "Spool {path} could not use the WAL journal (got {mode!r}); "
                "writes will be slower",
                path=self.path,
                mode=mode,
            )
        self._db = db
        self._backlog = count

    def close(self) -> None:
        """
        Close the file (SQLite folds the WAL back into it). Safe to call
        twice; a later call to any other method opens it again.
        """
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def _connection(self) -> sqlite3.Connection:
        self.open()
        assert self._db is not None
        return self._db

    # the queue

    def append(self, event: Event) -> int:
        """
        Store one event at the end of the queue.

        @return: the queue length after the append.
        @raise SpoolError: it was not stored (disk full, read-only, damaged
            file, or an event that is not JSON-serialisable).
        """
        try:
            text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise SpoolError(f"event is not JSON-serialisable: {e}") from e
        try:
            self._connection().execute(
                "INSERT INTO queue (event) VALUES (?)", (text,)
            )
        except sqlite3.Error as e:
            raise SpoolError(f"cannot append to spool {self.path}: {e}") from e
        self._backlog += 1
        return self._backlog

    def appendMany(self, events: Sequence[Event]) -> int:
        """
        Store several events at the end of the queue in one transaction (a
        group commit: one WAL write for a burst of events).

        @return: the queue length after the append.
        @raise SpoolError: none of them was stored.
        """
        try:
            rows = [(json.dumps(e, ensure_ascii=False, separators=(",", ":")),) for e in events]
        except (TypeError, ValueError) as e:
            raise SpoolError(f"event is not JSON-serialisable: {e}") from e
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO queue (event) VALUES (?)", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise SpoolError(f"cannot append to spool {self.path}: {e}") from e
        self._backlog += len(rows)
        return self._backlog

    def peek(self, n: int) -> List[Tuple[int, Event]]:
        """
        The first C{n} events of the queue, oldest first, as (seq, event).

        A row that is not a JSON object (edited by hand) is moved to the dead
        table rather than blocking the queue forever.

        @raise SpoolError: the file cannot be read.
        """
        try:
            rows = self._connection().execute(
                "SELECT seq, event FROM queue ORDER BY seq LIMIT ?", (n,)
            ).fetchall()
        except sqlite3.Error as e:
            raise SpoolError(f"cannot read spool {self.path}: {e}") from e
        result: List[Tuple[int, Event]] = []
        for seq, text in rows:
            try:
                event = json.loads(text)
                if not isinstance(event, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self.log.error(
                    "Spool {path}: row {seq} is not a JSON object ({error}); "
                    "moved to the dead table",
                    path=self.path,
                    seq=seq,
                    error=str(e),
                )
                self.setAside(seq, None, f"undecodable spool row: {e}")
                continue
            result.append((seq, event))
        return result

    def remove(self, seq: int) -> None:
        """
        Forget a delivered event. Removing a seq that is not queued is a
        no-op.

        @raise SpoolError: the file cannot be written.
        """
        try:
            cursor = self._connection().execute(
                "DELETE FROM queue WHERE seq = ?", (seq,)
            )
        except sqlite3.Error as e:
            raise SpoolError(f"cannot write spool {self.path}: {e}") from e
        self._backlog -= cursor.rowcount

    def setAside(self, seq: int, status: Optional[int], body: str) -> None:
        """
        Move an event the collector refused for good to the dead table, with
        the HTTP status and (the start of) the answer's body.

        @raise SpoolError: the file cannot be written.
        """
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO dead (seq, event, status, body, time)"
                    " SELECT seq, event, ?, ?, ? FROM queue WHERE seq = ?",
                    (status, body[:DEAD_BODY_LIMIT], formatTime(self._now()), seq),
                )
                cursor = db.execute("DELETE FROM queue WHERE seq = ?", (seq,))
                removed = cursor.rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise SpoolError(f"cannot write spool {self.path}: {e}") from e
        self._backlog -= removed

    def backlog(self) -> int:
        """
        The number of events in the queue (counted at open, kept in memory).
        """
        return self._backlog

    def dead(self, limit: int = 100) -> List[Tuple[int, Event, Optional[int], str, str]]:
        """
        The most recent dead letters, newest first, as (seq, event, status,
        body, time): for a status page and tests.

        @raise SpoolError: the file cannot be read.
        """
        try:
            rows = self._connection().execute(
                "SELECT seq, event, status, body, time FROM dead"
                " ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        except sqlite3.Error as e:
            raise SpoolError(f"cannot read spool {self.path}: {e}") from e
        out = []
        for seq, text, status, body, when in rows:
            try:
                event = json.loads(text)
            except ValueError:
                event = {"raw": text}
            out.append((seq, event, status, body, when))
        return out
