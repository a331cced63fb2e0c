"""
ACME events: the envelope every event carries, and the sink seam the logging
services (file observer, poster, ledger) plug into.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import Attribute, Interface

Event = Dict[str, Any]


class IEventSink(Interface):
    """
    Somewhere events go: the JSON-lines file, the KeyChest poster, the ledger.

    A sink receives the complete envelope (msg, params, time, proxy, server,
    path, code, id, host, ip, version, backlog, log_time) as a dict it must not
    mutate; it sets its own log_time on a copy if it writes one.
    """

    name = Attribute("A short name for diagnostics and /healthz, e.g. 'file' or 'poster'.")

    def emit(event: Event) -> "Deferred[None]":
        """
        Take one event. The Deferred fires once the event is safely accepted
        (written to the file, stored in the spool): that is when it counts as
        logged. It fails if the sink could not accept it.
        """


class IBacklog(Interface):
    """
    A sink with a queue (the poster): its length becomes each event's backlog.
    """

    def backlog() -> int:
        """The number of events waiting to be delivered."""


def formatTime(seconds: float) -> str:
    """
    The envelope's time format: UTC "YYYY-MM-DD HH:MM:SS", as the original wrote it.
    """
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


#: A suggested name for the id file in the working directory.
ID_FILE_NAME = "event-id"

_ID_RECORD = struct.Struct(">QQ")


class IdStore(Service):
    """
    The event id counter, persisted in the working directory so that
    (proxy, id) identifies an event across restarts.

    The file holds two big-endian 64-bit numbers: the last id handed out, and a
    reserved ceiling. Every id costs one 8-byte C{os.pwrite} (no fsync): the
    page cache is enough against a process crash. The ceiling is raised by
    C{reserve} ids at a time and that write is followed by C{fdatasync}, so only
    one call in C{reserve} waits for the disk. L{close} (also called from
    C{stopService}) sets the ceiling to the last id and syncs.

    Restart semantics:
      - after a clean close the next id is last + 1: no gap, no repeat;
      - after a crash of any kind (kill -9, OOM, power loss) the file shows a
        ceiling above the last id, and the next id is ceiling + 1: a gap of at
        most C{reserve} ids, but never a repeated id even if the page cache was
        lost with the machine.

    The file is created 0600 (its directory 0700 if missing) and locked with
    C{flock}, so a second proxy on the same working directory fails at start
    instead of handing out the same ids. Opening happens in the constructor:
    a bad path raises L{OSError} before anything listens.

    As a L{Service} it can join the service tree; add it before the services
    that log events so that it stops after them.
    """

    _log = Logger()

    def __init__(self, path: Union[str, FilePath], reserve: int = 1000) -> None:
        if reserve < 1:
            raise ValueError("reserve must be at least 1")
        self.name = "event-ids"
        self.path = path.path if isinstance(path, FilePath) else os.fspath(path)
        self._reserve = reserve
        self._writeFailing = False
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(
                    errno.EWOULDBLOCK,
                    "event id file is in use by another keychestamp",
                    self.path,
                ) from None
            os.fchmod(fd, 0o600)
            last, ceiling = self._read(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd: Optional[int] = fd
        if ceiling != last:
            start = max(last, ceiling)
            self._log.warn(
                "Event ids: {path} shows an unclean stop (last id {last}, "
                "reserved up to {ceiling}); continuing after {start}",
                path=self.path,
                last=last,
                ceiling=ceiling,
                start=start,
            )
            last = start
        self._last = last
        self._ceiling = last
        self._write(_ID_RECORD.pack(last, last), sync=True)

    def _read(self, fd: int) -> Tuple[int, int]:
        data = os.pread(fd, _ID_RECORD.size + 1, 0)
        if not data:
            return 0, 0
        if len(data) != _ID_RECORD.size:
            raise OSError(
                errno.EINVAL,
                f"not an event id file ({len(data)} bytes, expected {_ID_RECORD.size})",
                self.path,
            )
        last, ceiling = _ID_RECORD.unpack(data)
        return last, ceiling

    def _write(self, data: bytes, sync: bool) -> None:
        """
        Write at offset 0. A failure is loud but does not stop ids being handed
        out: losing the event would be worse than risking a repeat id.
        """
        assert self._fd is not None
        try:
            os.pwrite(self._fd, data, 0)
            if sync:
                os.fdatasync(self._fd)
        except OSError as e:
            if not self._writeFailing:
                self._writeFailing = True
                self._log.critical(
                    "Event ids: cannot write {path}: {error}", path=self.path, error=e
                )
        else:
            if self._writeFailing:
                self._writeFailing = False
                self._log.info("Event ids: {path} writable again", path=self.path)

    @property
    def last(self) -> int:
        """The last id handed out (0 before the first event ever)."""
        return self._last

    def next(self) -> int:
        """
        Hand out the next id: previous + 1.
        """
        if self._fd is None:
            raise RuntimeError(f"event id store {self.path} is closed")
        self._last += 1
        if self._last > self._ceiling:
            self._ceiling = self._last + self._reserve - 1
            self._write(_ID_RECORD.pack(self._last, self._ceiling), sync=True)
        else:
            self._write(_ID_RECORD.pack(self._last, self._ceiling)[:8], sync=False)
        return self._last

    def close(self) -> None:
        """
        Record a clean stop (ceiling = last id), sync and release the file.
        Idempotent.
        """
        if self._fd is None:
            return
        self._ceiling = self._last
        self._write(_ID_RECORD.pack(self._last, self._last), sync=True)
        os.close(self._fd)
        self._fd = None

    def stopService(self) -> None:
        """
        Close the id file when the service tree stops.
        """
        super().stopService()
        self.close()


class EventLog:
    """
    Turns classified ACME exchanges into complete envelopes and hands each to
    every sink.

    The envelope keys and their order follow the original product's README:
    msg, params, time, proxy, server, path, code, id, host, ip, version,
    backlog, log_time. Sinks run independently: one failing sink is a
    diagnostic (once per streak of failures) and never stops the others, and
    L{health} says which sink failed last.
    """

    _log = Logger()

    def __init__(
        self,
        proxyId: str,
        sinks: Sequence[IEventSink],
        idStore: IdStore,
        clock: IReactorTime,
        host: str,
        ip: str,
        version: str,
        backlog: Optional[IBacklog] = None,
    ) -> None:
        self._proxyId = proxyId
        self._sinks: Tuple[IEventSink, ...] = tuple(sinks)
        self._idStore = idStore
        self._clock = clock
        self._host = host
        self._ip = ip
        self._version = version
        self._backlog = backlog
        # Health is keyed by sink name; two sinks with one name get "#2", "#3".
        self._names: List[str] = []
        for sink in self._sinks:
            name, n = str(sink.name), 1
            while name in self._names:
                n += 1
                name = f"{sink.name}#{n}"
            self._names.append(name)
        self._health: Dict[str, Optional[str]] = {name: None for name in self._names}

    @property
    def sinks(self) -> Tuple[IEventSink, ...]:
        """The sinks every event goes to, in order."""
        return self._sinks

    def health(self) -> Dict[str, Optional[str]]:
        """
        Sink name -> the error of its last emit if that failed, else None.
        """
        return dict(self._health)

    def _backlogNow(self) -> int:
        if self._backlog is None:
            return 0
        try:
            return int(self._backlog.backlog())
        except Exception:
            self._log.failure("Backlog provider failed; reporting backlog 0")
            return 0

    def log(
        self,
        msg: str,
        params: Dict[str, Any],
        server: str,
        path: str,
        code: int,
        when: float,
    ) -> "Deferred[Optional[Event]]":
        """
        Build the envelope for one event and emit it to every sink.

        @param when: POSIX time of the exchange (becomes "time").
        @return: a Deferred that fires, once every sink accepted or refused
            the event, with the envelope (or None if no id could be
            allocated). It never fails.
        """
        try:
            eventId = self._idStore.next()
        except Exception:
            self._log.failure("Event {msg} dropped: no event id", msg=msg)
            return succeed(None)
        event: Event = {
            "msg": msg,
            "params": params,
            "time": formatTime(when),
            "proxy": self._proxyId,
            "server": server,
            "path": path,
            "code": code,
            "id": eventId,
            "host": self._host,
            "ip": self._ip,
            "version": self._version,
            "backlog": self._backlogNow(),
            "log_time": formatTime(self._clock.seconds()),
        }
        results = [
            maybeDeferred(sink.emit, event).addBoth(self._emitted, name, eventId)
            for name, sink in zip(self._names, self._sinks)
        ]
        return gatherResults(results).addCallback(lambda _: event)

    def _emitted(self, result: object, name: str, eventId: int) -> None:
        previous = self._health[name]
        if isinstance(result, Failure):
            self._health[name] = _describe(result)
            if previous is None:
                self._log.failure(
                    "Event sink {sink} failed on event {id}; further failures "
                    "are logged at debug level until it recovers",
                    result,
                    sink=name,
                    id=eventId,
                )
            else:
                self._log.debug(
                    "Event sink {sink} still failing on event {id}: {error}",
                    sink=name,
                    id=eventId,
                    error=self._health[name],
                )
        else:
            self._health[name] = None
            if previous is not None:
                self._log.info(
                    "Event sink {sink} recovered with event {id}", sink=name, id=eventId
                )
        return None


def _describe(failure: Failure) -> str:
    """A one-line description of a sink's failure for /healthz."""
    text = str(failure.value)
    name = type(failure.value).__name__
    return f"{name}: {text}" if text else name
