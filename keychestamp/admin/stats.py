# -*- test-case-name: tests.test_admin -*-
"""
A bounded, in-memory summary of the events for the admin listener.

L{AdminStats} is one more event sink. It keeps what an operator wants at a
glance (who the ACME clients are and whether they are failing, orders and
failures per hour, problem types, certificates by expiry) and nothing that
grows with traffic: every table has a cap and forgets its least recently
seen rows, every string is clipped. It starts empty at each start; the audit
file is the record, this is the dashboard.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from keychestamp.acme.certs import parseTime
from keychestamp.events import Event, IEventSink

#: Caps on what is kept.
MAX_CLIENTS = 500
MAX_AGENTS_PER_CLIENT = 4
MAX_ACCOUNTS_PER_CLIENT = 8
MAX_PROBLEM_TYPES = 100
MAX_CERTIFICATES = 1000
MAX_HEADROOM = 200
#: Longest string kept from an event (user agents, details, names).
MAX_TEXT = 300

HOURS = 24
MINUTES = 5

OK, PROBLEM, ERROR = "ok", "problem", "error"

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"

#: Failures a client retries on its own: counted, never marking it failing.
ROUTINE_PROBLEMS = frozenset({ACME_ERROR_PREFIX + "badNonce"})

#: Events the rate-limit ledger derives (docs/ledger.rst): no client made
#: them, so they are listed as notices, not counted as exchanges.
LEDGER_EVENTS = frozenset(
    name + suffix
    for name in ("rate-limit-warning", "client-failing", "cert-expiring")
    for suffix in ("", "-cleared")
)

#: How many ledger notices are kept.
MAX_NOTICES = 20


def clip(value: Any, limit: int = MAX_TEXT) -> str:
    """
    A value as a bounded, printable string (control characters replaced).
    """
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def shortProblem(kind: str) -> str:
    """
    An ACME error URN without its common prefix (C{rateLimited}).
    """
    return kind[len(ACME_ERROR_PREFIX):] if kind.startswith(ACME_ERROR_PREFIX) else kind


def product(agent: str) -> str:
    """
    The first product token of a User-Agent (C{CertbotACMEClient},
    C{lego-cli}): what tells two ACME clients on one host apart, while the
    rest of the header changes with every subcommand and version.
    """
    token = agent.strip().split(None, 1)[0] if agent.strip() else ""
    return clip(token.split("/", 1)[0], 60)


@dataclass(frozen=True)
class Observation:
    """
    What one event says, reduced to bounded values (for the metrics).

    @ivar outcome: C{ok}, C{problem} (the server refused, or validation
        failed) or C{error} (the proxy could not relay it).
    @ivar failure: the problem type, C{proxy-error:<stage>}, or "".
    """

    msg: str
    server: str
    outcome: str
    failure: str
    stage: str
    event: Event
    derived: bool = False


def observe(event: Event) -> Observation:
    """
    Classify an event's outcome.
    """
    params = event.get("params")
    params = params if isinstance(params, dict) else {}
    msg = clip(event.get("msg"), 40)
    server = clip(event.get("server"), 120)
    if msg in LEDGER_EVENTS:
        return Observation(msg, server, OK, "", "", event, derived=True)
    if msg == "proxy-error":
        stage = clip(params.get("stage"), 40)
        return Observation(msg, server, ERROR, "proxy-error:" + stage, stage, event)
    problem = params.get("problem")
    if isinstance(problem, dict):
        return Observation(msg, server, PROBLEM, clip(problem.get("type"), 200), "", event)
    error = params.get("error")
    if isinstance(error, dict) and error:
        return Observation(msg, server, PROBLEM, clip(error.get("type"), 200), "", event)
    code = event.get("code")
    if params.get("status") == "invalid" or (isinstance(code, int) and code >= 400):
        return Observation(msg, server, PROBLEM, "", "", event)
    return Observation(msg, server, OK, "", "", event)


def _detail(observation: Observation) -> str:
    params = observation.event.get("params") or {}
    for key in ("problem", "error"):
        if isinstance(params.get(key), dict):
            return clip(params[key].get("detail"))
    if observation.outcome == ERROR:
        return clip(params.get("reason"))
    if observation.outcome == PROBLEM:
        return clip(f"HTTP {observation.event.get('code')}, status {params.get('status') or '-'}")
    return ""


def noticeSummary(event: Event) -> str:
    """
    A ledger event's params in one line (limit, key, usage, client,
    identifiers, days left), for the notices list.
    """
    params = event.get("params")
    params = params if isinstance(params, dict) else {}
    parts = []
    for name in ("limit", "key", "client", "account", "identifiers", "days_left"):
        value = params.get(name)
        if value not in (None, "", [], {}):
            shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            parts.append(f"{name} {shown}")
    if isinstance(params.get("used"), (int, float)) and isinstance(params.get("capacity"), (int, float)):
        parts.append(f"used {params['used']} of {params['capacity']}")
    return clip(", ".join(parts))


def concludesWork(observation: Observation) -> bool:
    """
    Whether a successful event shows a client got what it came for, which
    ends a failing streak: a certificate, a valid order, a revocation, a
    key change, a new or updated account. Nonces, directories and polls
    succeed on the way to failures too and end nothing.
    """
    if observation.outcome != OK:
        return False
    params = observation.event.get("params") or {}
    msg = observation.msg
    if msg == "cert":
        return bool(params.get("serial"))
    if msg in ("order", "final"):
        return params.get("status") == "valid"
    if msg == "account":
        return params.get("action") in ("update", "deactivate")
    if msg == "new-acct":
        return observation.event.get("code") == 201
    return msg in ("revoke-cert", "key-change")


@dataclass
class ClientRecord:
    """
    One ACME client: an address and the product of its User-Agent.
    """

    address: str
    product: str
    firstSeen: float
    lastSeen: float = 0.0
    agents: List[str] = field(default_factory=list)
    accounts: List[Tuple[str, str]] = field(default_factory=list)
    exchanges: int = 0
    failures: int = 0
    lastMsg: str = ""
    lastServer: str = ""
    lastTime: str = ""
    lastOutcome: str = OK
    lastFailure: str = ""
    lastDetail: str = ""
    failingSince: Optional[float] = None

    def snapshot(self) -> Dict[str, Any]:
        """
        The row as plain values.
        """
        return {
            "address": self.address,
            "product": self.product,
            "agents": list(self.agents),
            "accounts": [{"server": s, "account": a} for s, a in self.accounts],
            "first_seen": self.firstSeen,
            "last_seen": self.lastSeen,
            "exchanges": self.exchanges,
            "failures": self.failures,
            "last_msg": self.lastMsg,
            "last_server": self.lastServer,
            "last_time": self.lastTime,
            "last_outcome": self.lastOutcome,
            "last_failure": self.lastFailure,
            "last_detail": self.lastDetail,
            "failing": self.failingSince is not None,
            "failing_since": self.failingSince,
        }


def _remember(items: List[Any], item: Any, cap: int) -> None:
    """
    Put C{item} first in a most-recent-first list of at most C{cap}.
    """
    if item in items:
        items.remove(item)
    items.insert(0, item)
    del items[cap:]


def _bounded(table: "OrderedDict[Any, Any]", key: Any, cap: int, make: Callable[[], Any]) -> Any:
    """
    The row for C{key}, made if new, moved to the recent end; the least
    recently used rows beyond C{cap} are forgotten.
    """
    row = table.get(key)
    if row is None:
        row = table[key] = make()
        while len(table) > cap:
            table.popitem(last=False)
    else:
        table.move_to_end(key)
    return row


@implementer(IEventSink)
class AdminStats:
    """
    The event sink behind the status page. Never fails an event: a summary
    that cannot be updated is a diagnostic, not a lost event.
    """

    name = "admin"
    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.started = clock.seconds()
        self.total = 0
        self._observers: List[Callable[[Observation], None]] = []
        self._clients: "OrderedDict[Tuple[str, str], ClientRecord]" = OrderedDict()
        self._problems: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        self._certs: "OrderedDict[Tuple[str, Tuple[str, ...]], Dict[str, Any]]" = OrderedDict()
        self._hours: Dict[int, List[int]] = {}
        self._minutes: Dict[int, int] = {}
        self._notices: List[Dict[str, Any]] = []

    def subscribe(self, observer: Callable[[Observation], None]) -> None:
        """
        Call C{observer} with the L{Observation} of every event (the metrics).
        """
        self._observers.append(observer)

    def emit(self, event: Event) -> "Deferred[None]":
        """
        Take one event into the summary, then hand its L{Observation} to the
        subscribers.
        """
        try:
            observation = observe(event)
            self._record(observation, self._clock.seconds())
            for observer in self._observers:
                observer(observation)
        except Exception:
            self._log.failure("Admin statistics could not take event {id}", id=event.get("id"))
        return succeed(None)

    def _record(self, o: Observation, now: float) -> None:
        self.total += 1
        minute, hour = int(now // 60), int(now // 3600)
        self._minutes[minute] = self._minutes.get(minute, 0) + 1
        for old in [m for m in self._minutes if m <= minute - MINUTES - 1]:
            del self._minutes[old]
        if o.derived:
            _remember(self._notices, {"msg": o.msg, "server": o.server, "seen": now,
                                      "summary": noticeSummary(o.event)}, MAX_NOTICES)
            return
        bucket = self._hours.setdefault(hour, [0, 0])
        for old in [h for h in self._hours if h <= hour - HOURS]:
            del self._hours[old]
        failed = o.outcome != OK and o.failure not in ROUTINE_PROBLEMS
        if o.msg == "new-order" and o.outcome == OK:
            bucket[0] += 1
        if failed:
            bucket[1] += 1
        params = o.event.get("params") or {}
        address = clip(params.get("client"), 64)
        agent = clip(params.get("agent"))
        key = (address, product(agent))
        client = _bounded(self._clients, key, MAX_CLIENTS, lambda: ClientRecord(address, key[1], now))
        client.lastSeen = now
        client.exchanges += 1
        if agent:
            _remember(client.agents, agent, MAX_AGENTS_PER_CLIENT)
        account = params.get("account")
        if isinstance(account, str) and account:
            _remember(client.accounts, (o.server, clip(account)), MAX_ACCOUNTS_PER_CLIENT)
        client.lastMsg, client.lastServer = o.msg, o.server
        client.lastTime = clip(o.event.get("time"), 40)
        client.lastOutcome, client.lastFailure, client.lastDetail = o.outcome, o.failure, _detail(o)
        if failed:
            client.failures += 1
            if client.failingSince is None:
                client.failingSince = now
        elif concludesWork(o):
            client.failingSince = None
        if o.outcome != OK:
            self._recordProblem(o, address, now)
        if o.msg == "cert" and o.outcome == OK:
            self._recordCert(o, params, address, now)

    def _recordProblem(self, o: Observation, address: str, now: float) -> None:
        kind = o.failure or f"HTTP {o.event.get('code')}"
        row = _bounded(self._problems, kind, MAX_PROBLEM_TYPES, lambda: {"type": kind, "count": 0})
        row["count"] += 1
        row.update(
            short=shortProblem(kind), last_seen=now, last_detail=_detail(o),
            last_client=address, last_server=o.server, last_msg=o.msg,
        )

    def _recordCert(self, o: Observation, params: Dict[str, Any], address: str, now: float) -> None:
        notAfter = parseTime(params.get("not_after"))
        names = params.get("names")
        if notAfter is None or not isinstance(names, list) or not names:
            return
        names = tuple(sorted({clip(n, 255) for n in names[:100]}))
        row = _bounded(self._certs, (o.server, names), MAX_CERTIFICATES, dict)
        if row and row["not_after"] > notAfter:
            return  # an older certificate downloaded again: keep the newest
        row.update(
            server=o.server, names=list(names), not_after=notAfter,
            serial=clip(params.get("serial"), 80), issuer=clip(params.get("issuer")),
            client=address, seen=now,
        )

    def eventsPerMinute(self, now: float) -> float:
        """
        The average rate over the last L{MINUTES} minutes (the current,
        incomplete minute included).
        """
        minute = int(now // 60)
        recent = sum(n for m, n in self._minutes.items() if m > minute - MINUTES)
        since = max(self.started, (minute - MINUTES + 1) * 60.0)
        return round(recent * 60.0 / max(60.0, now - since), 2)

    def snapshot(self, now: float) -> Dict[str, Any]:
        """
        Everything as plain, JSON-ready values: clients (failing first, the
        longest failing first, then the most recently seen), the last 24
        hours (oldest first), problem types (most recent first) and
        certificates (soonest expiry first).
        """
        # Most recent first before sorting, so that ties keep recency.
        clients = [c.snapshot() for c in reversed(self._clients.values())]
        clients.sort(key=lambda c: (not c["failing"], c["failing_since"] or 0.0, -c["last_seen"]))
        hour = int(now // 3600)
        hours = [
            {"start": h * 3600, "orders": self._hours.get(h, [0, 0])[0], "failures": self._hours.get(h, [0, 0])[1]}
            for h in range(hour - HOURS + 1, hour + 1)
        ]
        problems = sorted((dict(p) for p in reversed(self._problems.values())), key=lambda p: -p["last_seen"])
        certs = []
        for row in self._certs.values():
            cert = dict(row)
            cert["days_left"] = round((row["not_after"] - now) / 86400.0, 1)
            certs.append(cert)
        certs.sort(key=lambda c: c["not_after"])
        return {
            "events": {"total": self.total, "per_minute": self.eventsPerMinute(now)},
            "clients": clients,
            "hours": hours,
            "problems": problems,
            "certificates": certs,
            "ledger_events": [dict(n) for n in self._notices],
        }
