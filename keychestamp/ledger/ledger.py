# -*- test-case-name: tests.test_ledger -*-
"""
The ledger as an event sink beside the file observer and the poster: every
event the proxy logs updates the ledger, and what the ledger derives
(warnings, failing clients, expiring certificates, and their clearing) goes
back through the same event log, so it reaches the file and the collector
like any ACME event.

It never raises into the event path: a failure of the ledger is a failed
Deferred for that event (the event log reports it as the sink's health) and
a diagnostic, and the other sinks carry on. It ignores the derived events it
emitted itself when they come back through the event log.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from keychestamp.events import Event, IEventSink
from keychestamp.ledger.buckets import Bucket, Limit, usedCount, whenBelow
from keychestamp.ledger.engine import DERIVED_EVENTS, Derived, LedgerEngine
from keychestamp.ledger.limits import loadLimits
from keychestamp.ledger.store import Store
from keychestamp.ledger.text import key as keyText, period as periodText

__all__ = ["Ledger", "makeLedger"]

#: How often, at most, the ledger wakes to prune old rows when nothing is due.
PRUNE_INTERVAL = 3600.0

#: The event log's C{log(msg, params, server, path, code, when)}.
LogFunction = Callable[..., Any]


@implementer(IEventSink)
class Ledger(Service):
    """
    The ledger sink and the service that owns its file and its timer.

    @param engine: the rules and the store.
    @param clock: schedules clearing and expiry checks.
    @param log: diagnostics.
    """

    name = "ledger"

    def __init__(self, engine: LedgerEngine, clock: IReactorTime, log: Optional[Logger] = None) -> None:
        self.engine = engine
        self._clock = clock
        self._diag = log if log is not None else Logger()
        self._eventLog: Optional[LogFunction] = None
        self._timer: Optional[IDelayedCall] = None
        self._failing = False
        self._lastPrune: Optional[float] = None
        self._closed = False

    def setEventLog(self, log: LogFunction) -> None:
        """
        Where derived events go: the event log's C{log}. Set after the event
        log is built, because the event log needs its sinks (this one too)
        when it is built.
        """
        self._eventLog = log

    # IEventSink

    def emit(self, event: Event) -> "Deferred[None]":
        """
        Update the ledger from one event, then log the events it derived.
        Fails (never raises) if the ledger could not be updated.
        """
        if event.get("msg") in DERIVED_EVENTS:
            return succeed(None)
        if self._closed:
            # An exchange that finished while the proxy stopped: the audit
            # file has it, and `keychestamp ledger rebuild` can replay it.
            self._diag.debug("Ledger closed; event {id} not counted", id=event.get("id"))
            return succeed(None)
        try:
            derived = self.engine.handle(event)
        except Exception:
            failure = Failure()
            if not self._failing:
                self._failing = True
                self._diag.failure(
                    "Ledger could not take event {id}; further failures are logged "
                    "at debug level until it recovers", failure, id=event.get("id"),
                )
            else:
                self._diag.debug("Ledger still failing on event {id}: {error}", id=event.get("id"),
                                 error=failure.getErrorMessage())
            return fail(failure)
        if self._failing:
            self._failing = False
            self._diag.info("Ledger recovered with event {id}", id=event.get("id"))
        self._publish(derived)
        self._schedule()
        return succeed(None)

    # Service

    def startService(self) -> None:
        """Emit what fell due while the proxy was down, and start the timer."""
        super().startService()
        self._tick()

    def stopService(self) -> None:
        """Stop the timer and close the file."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._closed = True
        self.engine.close()

    # IHeadroom (keychestamp.admin): the status page and /metrics

    def headroom(self) -> List[Dict[str, Any]]:
        """
        Every bucket in use now: server, limit, key (as text), used,
        capacity, ratio, window, reset (when it has room again, if full).
        Used counts are lower bounds.
        """
        if self._closed:
            return []
        now = self._clock.seconds()
        rows = []
        for row in self.engine.store.usedBuckets(now):
            limit = Limit(row["limit_name"], row["capacity"], row["period"])
            bucket = Bucket(row["used"], row["at"])
            used = usedCount(bucket, limit, now)
            item: Dict[str, Any] = {
                "server": row["server"], "limit": limit.name, "key": keyText(json.loads(row["key"])),
                "used": used, "capacity": limit.capacity, "ratio": used / limit.capacity,
                "window": periodText(limit.period), "lower_bound": True,
            }
            if used >= limit.capacity:
                item["reset"] = whenBelow(bucket, limit, limit.capacity)
            rows.append(item)
        return rows

    # timer

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        try:
            derived = self.engine.due(now)
            if self._lastPrune is None or now - self._lastPrune >= PRUNE_INTERVAL:
                self._lastPrune = now
                self.engine.prune(now)
        except Exception:
            self._diag.failure("Ledger timer failed")
            derived = []
        self._publish(derived)
        self._schedule()

    def _schedule(self) -> None:
        if not self.running:
            return
        now = self._clock.seconds()
        try:
            nextDue = self.engine.nextDue()
        except Exception:
            self._diag.failure("Ledger cannot read its next due time")
            nextDue = None
        target = now + PRUNE_INTERVAL if nextDue is None else min(nextDue, now + PRUNE_INTERVAL)
        delay = max(0.0, target - now)
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= now + delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._tick)

    def _publish(self, derived: List[Derived]) -> None:
        for d in derived:
            if self._eventLog is None:
                self._diag.debug("Ledger has no event log; {msg} dropped", msg=d.msg)
                continue
            try:
                result = self._eventLog(d.msg, d.params, d.server, "", 0, d.when)
            except Exception:
                self._diag.failure("Event log refused derived {msg} event", msg=d.msg)
                continue
            if isinstance(result, Deferred):
                result.addErrback(
                    lambda reason, msg=d.msg: self._diag.failure("Event log failed on {msg} event", reason, msg=msg)
                )


def makeLedger(options: Mapping[str, Any], workdir: FilePath, clock: IReactorTime, log: Optional[Logger] = None) -> Ledger:
    """
    The proxy's ledger: ``ledger.sqlite`` in the working directory, the
    limit table of --limits (checked already by the options), --failing-after,
    --expiry-days and --egress-ip.
    """
    limits = options.get("limit-table")
    if limits is None:
        limits = loadLimits(options.get("limits"))
    engine = LedgerEngine(
        Store.inDirectory(workdir),
        limits,
        failingAfter=options.get("failing-after") or 3,
        expiryDays=options.get("expiry-days") if options.get("expiry-days") is not None else 30.0,
        egress=options.get("egress-ip"),
    )
    return Ledger(engine, clock, log)
