# -*- test-case-name: tests.test_filesink -*-
"""
The file observer: ACME events as JSON lines, one object per line, appended
and flushed per event, reopened on SIGHUP so logrotate's create mode works.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from types import FrameType
from typing import Any, BinaryIO, Callable, Optional, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from keychestamp.events import Event, IEventSink, formatTime

Opener = Callable[[str], BinaryIO]


class FileSinkError(OSError):
    """
    The audit file cannot be opened for appending; str() is one line for stderr.
    """

    def __str__(self) -> str:
        return f"cannot open audit file {self.filename}: {self.strerror}"


def openAppend(path: str) -> BinaryIO:
    """
    Open C{path} for appending (0640 when created) and, if it does not end
    with a newline (a line cut short by a crash or a full disk), add one so
    the next event starts on its own line.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            if os.pread(fd, 1, st.st_size - 1) != b"\n":
                os.write(fd, b"\n")
        return os.fdopen(fd, "ab", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def encodeEvent(event: Event) -> bytes:
    """
    One event as one UTF-8 JSON line, with the separators json.dumps uses by
    default (", " and ": "), as the original wrote its file. A string that
    cannot be UTF-8 (a lone surrogate) falls back to ASCII escapes for that line.
    """
    text = json.dumps(event, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(event, ensure_ascii=True).encode("ascii")
    return data + b"\n"


class _ChainedHandler:
    """
    A Python signal handler that schedules a call on the reactor thread and
    then calls whatever handler was installed before it.

    Removal is order-independent: if another handler was installed on top of
    this one, this one is only deactivated (it keeps forwarding), so the later
    handler's chain stays intact.
    """

    def __init__(
        self, signum: int, reactor: IReactorFromThreads, call: Callable[[], object]
    ) -> None:
        self._signum = signum
        self._reactor = reactor
        self._call = call
        self.active = True
        self.previous: Any = signal.getsignal(signum)
        signal.signal(signum, self)

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.active:
            # Signal handlers run between any two bytecodes, possibly in the
            # middle of a write: only queue the work, as the reactor's own
            # SIGINT handler does.
            self._reactor.callFromThread(self._call)
        if callable(self.previous):
            self.previous(signum, frame)

    def _effectivePrevious(self) -> Any:
        previous = self.previous
        while isinstance(previous, _ChainedHandler) and not previous.active:
            previous = previous.previous
        return previous

    def remove(self) -> None:
        self.active = False
        if signal.getsignal(self._signum) is self:
            restored = self._effectivePrevious()
            signal.signal(
                self._signum, signal.SIG_DFL if restored is None else restored
            )


@implementer(IEventSink)
class FileSink(Service):
    """
    Appends each event as a JSON line to one file, which only this service
    writes.

    An event counts as logged once its line is in the kernel (one unbuffered
    C{write} per event, no fsync): it survives a crash of the proxy, not of the
    machine. A write error (disk full, EIO) fails that emit, is logged
    critical once per streak of failures, and closes the file; the next emit
    reopens it and tries again.

    The constructor touches nothing on disk. Call L{check} before anything
    listens to turn an unusable path into a L{FileSinkError} (one line via
    str()); C{startService} raises the same error.

    @param path: the audit file.
    @param clock: the time source for each line's log_time; with
        C{reopenOnSignal} it must also provide L{IReactorFromThreads} (the
        reactor does), used to move the SIGHUP work onto the reactor thread.
    @param reopenOnSignal: install a SIGHUP handler while running that reopens
        the file (chained to any previous Python handler, restored on stop).
    @param name: the sink and service name; two file sinks under one
        MultiService need different names.
    @param opener: opens the file for appending (tests replace it).
    """

    _log = Logger()

    def __init__(
        self,
        path: Union[FilePath, str],
        clock: IReactorTime,
        reopenOnSignal: bool = False,
        *,
        name: str = "file",
        opener: Opener = openAppend,
    ) -> None:
        self.path = path.path if isinstance(path, FilePath) else os.fspath(path)
        if reopenOnSignal and not IReactorFromThreads.providedBy(clock):
            raise TypeError(
                "reopenOnSignal needs a clock providing IReactorFromThreads"
            )
        self.name = name
        self._clock = clock
        self._reopenOnSignal = reopenOnSignal
        self._opener = opener
        self._file: Optional[BinaryIO] = None
        self._handler: Optional[_ChainedHandler] = None
        self._failures = 0
        self.lastError: Optional[str] = None
        """The error of the last failed write or open, None once one succeeds."""

    def _open(self) -> BinaryIO:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
            return self._opener(self.path)
        except OSError as e:
            raise FileSinkError(e.errno, e.strerror or str(e), self.path) from e

    def check(self) -> None:
        """
        Make sure the file can be opened for appending (creating missing
        directories 0750 and the file itself 0640).

        @raise FileSinkError: it cannot.
        """
        self._open().close()

    def startService(self) -> None:
        """
        Open the file and, if asked, install the SIGHUP handler.

        @raise FileSinkError: the file cannot be opened.
        """
        self._file = self._open()
        super().startService()
        if self._reopenOnSignal:
            try:
                self._handler = _ChainedHandler(
                    signal.SIGHUP, self._clock, self.reopen  # type: ignore[arg-type]
                )
            except ValueError as e:
                # signal.signal only works in the main thread.
                self._log.error(
                    "Cannot reopen {path} on SIGHUP: {error}", path=self.path, error=e
                )

    def stopService(self) -> None:
        """
        Remove the SIGHUP handler, then flush, sync and close the file.
        """
        super().stopService()
        if self._handler is not None:
            self._handler.remove()
            self._handler = None
        self._close(sync=True)

    def _close(self, sync: bool = False) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.flush()
            if sync:
                os.fsync(f.fileno())
        except (OSError, ValueError) as e:
            self._log.warn("Closing {path}: {error}", path=self.path, error=e)
        finally:
            try:
                f.close()
            except OSError as e:
                self._log.warn("Closing {path}: {error}", path=self.path, error=e)

    def reopen(self) -> None:
        """
        Close the file and open the path again (after logrotate renamed it).
        A failure is logged and left to the next emit, which tries again.
        """
        if not self.running:
            return
        self._close()
        try:
            self._file = self._open()
        except FileSinkError as e:
            self._failed(e)
        else:
            self._log.info("Reopened audit file {path}", path=self.path)

    def _failed(self, error: OSError) -> None:
        self._failures += 1
        self.lastError = str(error)
        if self._failures == 1:
            self._log.critical(
                "AUDIT EVENTS ARE NOT BEING WRITTEN to {path}: {error}; "
                "retrying with every event",
                path=self.path,
                error=error,
            )

    def emit(self, event: Event) -> "Deferred[None]":
        """
        Append one event with log_time set to now (on a copy); the Deferred
        fires when the line is written, or fails with the write error.
        """
        if not self.running:
            return fail(RuntimeError(f"file sink {self.name} is not running"))
        record = dict(event)
        record["log_time"] = formatTime(self._clock.seconds())
        try:
            data = encodeEvent(record)
        except (TypeError, ValueError) as e:
            return fail(e)
        try:
            if self._file is None:
                self._file = self._open()
            view = memoryview(data)
            while view:
                written = self._file.write(view)
                if not written:
                    raise OSError(errno.EIO, "short write", self.path)
                view = view[written:]
            self._file.flush()
        except OSError as e:
            self._close()
            self._failed(e)
            return fail(e)
        if self._failures:
            self._log.info(
                "Audit file {path} written again after {count} failed events",
                path=self.path,
                count=self._failures,
            )
            self._failures = 0
            self.lastError = None
        return succeed(None)
