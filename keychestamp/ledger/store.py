# -*- test-case-name: tests.test_ledger -*-
"""
The ledger's state in SQLite: ``ledger.sqlite`` in the working directory (or
in memory, for reports).

Every call is a short statement on the reactor thread: lookups by primary key
and small index ranges, never a scan of a table per event. The engine groups
the statements of one event in one transaction (WAL journal,
C{synchronous=NORMAL}: a commit survives the process being killed). Rows
that can no longer matter are pruned by age, so the tables stay as small as
the traffic of the longest period.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import Any, Dict, Iterator, List, Optional, Sequence

from twisted.python.filepath import FilePath

__all__ = ["LEDGER_FILE", "Store", "StoreError"]

#: The ledger's file name in the working directory.
LEDGER_FILE = "ledger.sqlite"

#: How long rows are kept (seconds). Orders and authorizations expire at the
#: CA within a week; an exact-set renewal needs an earlier certificate, which
#: lives at most 90 days; expired certificates stay 30 days for reports.
ORDER_RETENTION = 8 * 86400
ISSUED_RETENTION = 90 * 86400
STREAK_RETENTION = 30 * 86400
CERT_RETENTION = 30 * 86400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directories (
    server TEXT PRIMARY KEY,
    path   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS buckets (
    server     TEXT NOT NULL,
    limit_name TEXT NOT NULL,
    key        TEXT NOT NULL,
    used       REAL NOT NULL,
    at         REAL NOT NULL,
    capacity   INTEGER NOT NULL,
    period     REAL NOT NULL,
    warned     INTEGER NOT NULL,
    clear_at   REAL,
    empty_at   REAL NOT NULL,
    PRIMARY KEY (server, limit_name, key)
);
CREATE INDEX IF NOT EXISTS buckets_clear ON buckets (clear_at) WHERE clear_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS buckets_empty ON buckets (empty_at);
CREATE TABLE IF NOT EXISTS orders (
    server      TEXT NOT NULL,
    finalize    TEXT NOT NULL,
    account     TEXT NOT NULL,
    identifiers TEXT NOT NULL,
    exempt      TEXT NOT NULL,
    state       TEXT NOT NULL,
    created     REAL NOT NULL,
    PRIMARY KEY (server, finalize)
);
CREATE INDEX IF NOT EXISTS orders_created ON orders (created);
CREATE TABLE IF NOT EXISTS authzs (
    server     TEXT NOT NULL,
    authz      TEXT NOT NULL,
    finalize   TEXT NOT NULL,
    account    TEXT NOT NULL,
    identifier TEXT NOT NULL,
    failed     INTEGER NOT NULL,
    created    REAL NOT NULL,
    PRIMARY KEY (server, authz)
);
CREATE INDEX IF NOT EXISTS authzs_created ON authzs (created);
CREATE TABLE IF NOT EXISTS issued (
    server      TEXT NOT NULL,
    identifiers TEXT NOT NULL,
    at          REAL NOT NULL,
    PRIMARY KEY (server, identifiers)
);
CREATE INDEX IF NOT EXISTS issued_at ON issued (at);
CREATE TABLE IF NOT EXISTS streaks (
    server      TEXT NOT NULL,
    account     TEXT NOT NULL,
    identifiers TEXT NOT NULL,
    failures    INTEGER NOT NULL,
    flagged     INTEGER NOT NULL,
    first_at    REAL NOT NULL,
    last_at     REAL NOT NULL,
    problem     TEXT NOT NULL,
    PRIMARY KEY (server, account, identifiers)
);
CREATE INDEX IF NOT EXISTS streaks_last ON streaks (last_at);
CREATE TABLE IF NOT EXISTS certs (
    identifiers TEXT PRIMARY KEY,
    serial      TEXT NOT NULL,
    not_before  REAL NOT NULL,
    not_after   REAL NOT NULL,
    server      TEXT NOT NULL,
    account     TEXT NOT NULL,
    issuer      TEXT NOT NULL,
    client      TEXT NOT NULL,
    seen        REAL NOT NULL,
    due         REAL NOT NULL,
    flagged     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS certs_due ON certs (due) WHERE flagged = 0;
CREATE INDEX IF NOT EXISTS certs_not_after ON certs (not_after);
PRAGMA user_version = 1;
"""

#: Tables and their columns in primary-key order, for L{Store.dump}.
_TABLES = ("directories", "buckets", "orders", "authzs", "issued", "streaks", "certs")


class StoreError(Exception):
    """
    The ledger file could not be opened or written; the message says which
    and why.
    """


Row = sqlite3.Row


class Store:
    """
    The ledger's tables. C{path} None keeps them in memory (reports).
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        target = ":memory:"
        if path is not None:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            except OSError as e:
                raise StoreError(f"cannot open ledger {path}: {e.strerror or e}") from e
            target = path
        try:
            db = sqlite3.connect(target, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open ledger {target}: {e}") from e
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 250")
            if path is not None:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            db.close()
            raise StoreError(f"cannot open ledger {target}: {e}") from e
        self._db: Optional[sqlite3.Connection] = db

    @classmethod
    def inDirectory(cls, directory: FilePath) -> "Store":
        """The ledger file of a working directory."""
        return cls(directory.child(LEDGER_FILE).path)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"ledger {self.path or ':memory:'} is closed")
        return self._db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction: committed on success, rolled back on any error."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def _one(self, sql: str, args: Sequence[Any]) -> Optional[Row]:
        return self.db.execute(sql, args).fetchone()

    def _exec(self, sql: str, args: Sequence[Any]) -> None:
        self.db.execute(sql, args)

    # directories

    def directories(self) -> Dict[str, str]:
        """server -> the directory path seen for it (one row per server)."""
        return {r["server"]: r["path"] for r in self.db.execute("SELECT server, path FROM directories")}

    def setDirectory(self, server: str, path: str) -> None:
        self._exec("INSERT OR REPLACE INTO directories (server, path) VALUES (?, ?)", (server, path))

    # buckets

    def bucket(self, server: str, limit: str, key: str) -> Optional[Row]:
        return self._one(
            "SELECT * FROM buckets WHERE server = ? AND limit_name = ? AND key = ?", (server, limit, key)
        )

    def putBucket(
        self, server: str, limit: str, key: str, used: float, at: float, capacity: int,
        period: float, warned: int, clearAt: Optional[float], emptyAt: float,
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO buckets (server, limit_name, key, used, at, capacity, period,"
            " warned, clear_at, empty_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (server, limit, key, used, at, capacity, period, warned, clearAt, emptyAt),
        )

    def clearBucket(self, server: str, limit: str, key: str) -> None:
        self._exec(
            "UPDATE buckets SET warned = 0, clear_at = NULL WHERE server = ? AND limit_name = ? AND key = ?",
            (server, limit, key),
        )

    def dueClears(self, now: float, limit: int = 100) -> List[Row]:
        return self.db.execute(
            "SELECT * FROM buckets WHERE clear_at IS NOT NULL AND clear_at <= ? ORDER BY clear_at LIMIT ?",
            (now, limit),
        ).fetchall()

    def buckets(self) -> List[Row]:
        """Every bucket (reports; the table holds only the longest period)."""
        return self.db.execute("SELECT * FROM buckets ORDER BY server, limit_name, key").fetchall()

    def usedBuckets(self, now: float, limit: int = 1000) -> List[Row]:
        """Buckets not yet empty at C{now} (the admin page), fullest first."""
        return self.db.execute(
            "SELECT * FROM buckets WHERE empty_at > ? ORDER BY empty_at DESC LIMIT ?", (now, limit)
        ).fetchall()

    # orders and authorizations

    def order(self, server: str, finalize: str) -> Optional[Row]:
        return self._one("SELECT * FROM orders WHERE server = ? AND finalize = ?", (server, finalize))

    def putOrder(
        self, server: str, finalize: str, account: str, identifiers: str, exempt: str, state: str, created: float
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO orders (server, finalize, account, identifiers, exempt, state, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (server, finalize, account, identifiers, exempt, state, created),
        )

    def setOrderState(self, server: str, finalize: str, state: str) -> None:
        self._exec("UPDATE orders SET state = ? WHERE server = ? AND finalize = ?", (state, server, finalize))

    def authz(self, server: str, authz: str) -> Optional[Row]:
        return self._one("SELECT * FROM authzs WHERE server = ? AND authz = ?", (server, authz))

    def putAuthz(
        self, server: str, authz: str, finalize: str, account: str, identifier: str, failed: int, created: float
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO authzs (server, authz, finalize, account, identifier, failed, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (server, authz, finalize, account, identifier, failed, created),
        )

    # issued sets (exact-set renewals)

    def issuedBefore(self, server: str, identifiers: str) -> bool:
        return self._one(
            "SELECT 1 FROM issued WHERE server = ? AND identifiers = ?", (server, identifiers)
        ) is not None

    def putIssued(self, server: str, identifiers: str, at: float) -> None:
        self._exec(
            "INSERT OR REPLACE INTO issued (server, identifiers, at) VALUES (?, ?, ?)", (server, identifiers, at)
        )

    # failure streaks

    def streak(self, server: str, account: str, identifiers: str) -> Optional[Row]:
        return self._one(
            "SELECT * FROM streaks WHERE server = ? AND account = ? AND identifiers = ?",
            (server, account, identifiers),
        )

    def putStreak(
        self, server: str, account: str, identifiers: str, failures: int, flagged: int,
        firstAt: float, lastAt: float, problem: str,
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO streaks (server, account, identifiers, failures, flagged, first_at,"
            " last_at, problem) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (server, account, identifiers, failures, flagged, firstAt, lastAt, problem),
        )

    def deleteStreak(self, server: str, account: str, identifiers: str) -> None:
        self._exec(
            "DELETE FROM streaks WHERE server = ? AND account = ? AND identifiers = ?",
            (server, account, identifiers),
        )

    def flaggedStreaks(self) -> List[Row]:
        return self.db.execute(
            "SELECT * FROM streaks WHERE flagged = 1 ORDER BY server, account, identifiers"
        ).fetchall()

    # certificates (the latest per identifier set)

    def cert(self, identifiers: str) -> Optional[Row]:
        return self._one("SELECT * FROM certs WHERE identifiers = ?", (identifiers,))

    def putCert(
        self, identifiers: str, serial: str, notBefore: float, notAfter: float, server: str,
        account: str, issuer: str, client: str, seen: float, due: float, flagged: int,
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO certs (identifiers, serial, not_before, not_after, server, account,"
            " issuer, client, seen, due, flagged) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (identifiers, serial, notBefore, notAfter, server, account, issuer, client, seen, due, flagged),
        )

    def flagCert(self, identifiers: str) -> None:
        self._exec("UPDATE certs SET flagged = 1 WHERE identifiers = ?", (identifiers,))

    def dueCerts(self, now: float, limit: int = 100) -> List[Row]:
        return self.db.execute(
            "SELECT * FROM certs WHERE flagged = 0 AND due <= ? ORDER BY due LIMIT ?", (now, limit)
        ).fetchall()

    def certs(self) -> List[Row]:
        """Every certificate kept, soonest expiry first (reports)."""
        return self.db.execute("SELECT * FROM certs ORDER BY not_after, identifiers").fetchall()

    # timers

    def nextDue(self) -> Optional[float]:
        """The earliest time a warning clears or a certificate becomes due."""
        (clear,) = self.db.execute("SELECT min(clear_at) FROM buckets WHERE clear_at IS NOT NULL").fetchone()
        (due,) = self.db.execute("SELECT min(due) FROM certs WHERE flagged = 0").fetchone()
        times = [t for t in (clear, due) if t is not None]
        return min(times) if times else None

    def prune(self, now: float) -> None:
        """
        Forget what can no longer matter at C{now}: empty buckets with no
        warning, old orders, authorizations, issued sets and streaks, and
        certificates long expired.
        """
        db = self.db
        db.execute("DELETE FROM buckets WHERE warned = 0 AND empty_at <= ?", (now,))
        db.execute("DELETE FROM orders WHERE created < ?", (now - ORDER_RETENTION,))
        db.execute("DELETE FROM authzs WHERE created < ?", (now - ORDER_RETENTION,))
        db.execute("DELETE FROM issued WHERE at < ?", (now - ISSUED_RETENTION,))
        db.execute("DELETE FROM streaks WHERE last_at < ?", (now - STREAK_RETENTION,))
        db.execute("DELETE FROM certs WHERE not_after < ?", (now - CERT_RETENTION,))

    def dump(self) -> Dict[str, List[tuple]]:
        """Every row of every table, sorted: for comparing two ledgers."""
        result = {}
        for table in _TABLES:
            rows = self.db.execute(f"SELECT * FROM {table}").fetchall()
            result[table] = sorted(tuple(_round(v) for v in row) for row in rows)
        return result


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value
