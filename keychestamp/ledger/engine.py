# -*- test-case-name: tests.test_ledger -*-
"""
The ledger's rules: ACME events in, state in the L{Store} and derived events
out. No reactor and no I/O but the store, so the live sink, the rebuild
command and reports replay the same events to the same state.

What counts (see docs/ledger.rst for the whole story):

  - a new account (new-acct answered 201) against ``new-accounts-per-ip``,
    keyed by the address the server recorded (``source``) or the configured
    egress address;
  - a new order (new-order answered 201) against ``new-orders-per-account``,
    unless it renews: an ARI renewal (``replaces``) or an exact set issued
    before on that server;
  - a certificate when its order becomes valid (an ``order`` or ``final``
    event with status valid), once per order, against
    ``certs-per-exact-set`` (unless ARI) and ``certs-per-registered-domain``
    (unless any renewal);
  - a failed validation (an ``auth`` event with status invalid), once per
    authorization, against ``failed-authz-per-identifier-per-account``
    (unless ARI).

Time is the event's own (params.epoch), so replaying files gives what the
live proxy computed; L{LedgerEngine.due} advances it without events.
"""

from __future__ import annotations

import calendar
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from keychestamp.acme.certs import parseTime
from keychestamp.events import formatTime
from keychestamp.ledger.buckets import Bucket, Limit, emptyAt, spend, threshold, usedCount, whenBelow
from keychestamp.ledger.domains import Domains, identifierSet, identifierValue, setFromKey, setKey
from keychestamp.ledger.limits import (
    CERTS_PER_DOMAIN,
    CERTS_PER_SET,
    FAILED_AUTHZ,
    NEW_ACCOUNTS,
    NEW_ORDERS,
    LimitTable,
)
from keychestamp.ledger.store import Store

__all__ = ["DERIVED_EVENTS", "Derived", "LedgerEngine", "UNKNOWN_EGRESS", "eventTime"]

RATE_LIMIT_WARNING = "rate-limit-warning"
CLIENT_FAILING = "client-failing"
CERT_EXPIRING = "cert-expiring"
CLEARED = "-cleared"

#: Every event type the ledger emits; it ignores them when they come back.
DERIVED_EVENTS = frozenset(
    name + suffix for name in (RATE_LIMIT_WARNING, CLIENT_FAILING, CERT_EXPIRING) for suffix in ("", CLEARED)
)

#: The key of new-accounts-per-ip when neither the server nor the operator
#: says which address the CA sees.
UNKNOWN_EGRESS = "unknown-egress"

#: Problems that are no sign of a failing client: clients retry them at once.
_NOT_FAILURES = frozenset({"urn:ietf:params:acme:error:badNonce"})

_ERROR_PREFIX = "urn:ietf:params:acme:error:"


@dataclass
class Derived:
    """A derived event for the event log: its type, params, server and time."""

    msg: str
    params: Dict[str, Any]
    server: str
    when: float


def eventTime(event: Mapping[str, Any]) -> Optional[float]:
    """
    When an event happened: params.epoch, else the envelope's UTC "time".
    """
    params = event.get("params")
    epoch = params.get("epoch") if isinstance(params, dict) else None
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        return float(epoch)
    text = event.get("time")
    if isinstance(text, str):
        try:
            return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")))
        except ValueError:
            return None
    return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _path(path: str) -> str:
    return path.split("?", 1)[0]


def _number(value: float) -> Any:
    return int(value) if float(value).is_integer() else value


@dataclass
class _Context:
    """One event being handled, and the derived events it produced."""

    event: Mapping[str, Any]
    msg: str
    params: Mapping[str, Any]
    server: str
    path: str
    code: int
    t: float
    out: List[Derived] = field(default_factory=list)
    counted: bool = False

    @property
    def client(self) -> str:
        return _str(self.params.get("client"))

    @property
    def agent(self) -> str:
        return _str(self.params.get("agent"))

    @property
    def account(self) -> str:
        return _str(self.params.get("account"))

    @property
    def cause(self) -> Dict[str, Any]:
        return {"msg": self.msg, "id": self.event.get("id"), "proxy": self.event.get("proxy")}

    @property
    def problem(self) -> Optional[Dict[str, Any]]:
        problem = self.params.get("problem")
        return problem if isinstance(problem, dict) else None


Facts = Callable[[str, Dict[str, Any]], None]


class LedgerEngine:
    """
    The ledger over a L{Store}.

    @param failingAfter: consecutive failed orders or validations of one
        account and identifier set that make a client-failing event.
    @param expiryDays: a certificate is expiring this many days before its
        not_after (or a third of its lifetime before, if that is shorter).
    @param egress: the proxy's address as the CA sees it, for
        new-accounts-per-ip when the server does not report one.
    @param facts: called with ("order" | "issued" | "failure", details) for
        each counted thing; reports tally them.
    """

    def __init__(
        self,
        store: Store,
        limits: Optional[LimitTable] = None,
        domains: Optional[Domains] = None,
        failingAfter: int = 3,
        expiryDays: float = 30.0,
        egress: Optional[str] = None,
        facts: Optional[Facts] = None,
    ) -> None:
        if failingAfter < 1:
            raise ValueError("failingAfter must be at least 1")
        self.store = store
        self.limits = limits if limits is not None else LimitTable()
        self.domains = domains if domains is not None else Domains()
        self.failingAfter = failingAfter
        self.expirySeconds = expiryDays * 86400.0
        self.egress = egress or UNKNOWN_EGRESS
        self._facts = facts
        self._directories = store.directories()

    # public

    def handle(self, event: Mapping[str, Any]) -> List[Derived]:
        """
        Take one event (the complete envelope); return the derived events it
        and the time it happened at produced. Derived events, events without
        a time and unknown types are ignored.
        """
        msg = event.get("msg")
        params = event.get("params")
        if not isinstance(msg, str) or msg in DERIVED_EVENTS or not isinstance(params, dict):
            return []
        t = eventTime(event)
        if t is None:
            return []
        code = event.get("code")
        ctx = _Context(
            event, msg, params, _str(event.get("server")).lower(), _path(_str(event.get("path"))),
            code if isinstance(code, int) else 0, t,
        )
        handler = getattr(self, "_on_" + msg.replace("-", "_"), None)
        if (
            msg == "directory"
            and ctx.problem is None
            and self._directories.get(ctx.server) == ctx.path
        ):
            # a directory already known (clients fetch it on every run):
            # nothing to write, so no transaction on this hot path
            handler = None
        if handler is None and ctx.problem is None:
            # nonces, challenges, ...: nothing to count, and no need to run
            # the timers early (the live timer or the next event does)
            return []
        with self.store.transaction():
            ctx.out.extend(self._due(t))
            if handler is not None:
                handler(ctx)
            if ctx.problem is not None and not ctx.counted:
                self._fact("failure", ctx, ctx.account, (), ctx.problem, streak=False)
        return ctx.out

    def due(self, now: float) -> List[Derived]:
        """Warnings that have cleared and certificates that became due by C{now}."""
        with self.store.transaction():
            return self._due(now)

    def nextDue(self) -> Optional[float]:
        """When L{due} next has something to do, or None."""
        return self.store.nextDue()

    def prune(self, now: float) -> None:
        """Forget rows that can no longer matter (see L{Store.prune})."""
        with self.store.transaction():
            self.store.prune(now)

    def directoryURL(self, server: str) -> str:
        """
        The server's directory URL: https://server plus the directory path
        the proxy saw, else the matching --limits entry's URL, else
        https://server/.
        """
        path = self._directories.get(server)
        if path:
            return f"https://{server}{path}"
        url, _ = self.limits.lookup(server)
        return url or f"https://{server}/"

    def limitsFor(self, server: str) -> Mapping[str, Limit]:
        """The limits that apply to a server."""
        return self.limits.lookup(server, self._directories.get(server))[1]

    def close(self) -> None:
        self.store.close()

    # timers

    def _due(self, now: float) -> List[Derived]:
        out: List[Derived] = []
        for row in self.store.dueClears(now):
            limit = Limit(row["limit_name"], row["capacity"], row["period"])
            at = row["clear_at"]
            used = usedCount(Bucket(row["used"], row["at"]), limit, at)
            params = self._limitParams(int(math.ceil(at)), "", "", row["server"], limit, row["key"], used, row["warned"])
            out.append(Derived(RATE_LIMIT_WARNING + CLEARED, params, row["server"], at))
            self.store.clearBucket(row["server"], row["limit_name"], row["key"])
        for row in self.store.dueCerts(now):
            out.append(Derived(CERT_EXPIRING, self._certParams(row, row["due"]), row["server"], row["due"]))
            self.store.flagCert(row["identifiers"])
        return out

    # event handlers: _on_<msg>

    def _on_directory(self, ctx: _Context) -> None:
        if ctx.code == 200 and ctx.path and self._directories.get(ctx.server) != ctx.path:
            self._directories[ctx.server] = ctx.path
            self.store.setDirectory(ctx.server, ctx.path)

    def _on_new_acct(self, ctx: _Context) -> None:
        if ctx.code == 201:
            source = _str(ctx.params.get("source")) or self.egress
            self._spend(ctx, NEW_ACCOUNTS, {"ip": source})

    def _on_new_order(self, ctx: _Context) -> None:
        ids = identifierSet(ctx.params.get("domains"))
        if ctx.problem is not None:
            self._failure(ctx, ctx.account, ids, ctx.problem)
            return
        if ctx.code != 201 or not ids:
            return
        finalize = _path(_str(ctx.params.get("finalize")) or _str(ctx.params.get("order")))
        if not finalize or self.store.order(ctx.server, finalize) is not None:
            return
        key = setKey(ids)
        exempt = "ari" if ctx.params.get("replaces") else ("renewal" if self.store.issuedBefore(ctx.server, key) else "")
        self.store.putOrder(ctx.server, finalize, ctx.account, key, exempt, "pending", ctx.t)
        authz = ctx.params.get("authz")
        for path in authz if isinstance(authz, list) else ():
            if isinstance(path, str) and path:
                self.store.putAuthz(ctx.server, _path(path), finalize, ctx.account, "", 0, ctx.t)
        if not exempt:
            self._spend(ctx, NEW_ORDERS, {"account": ctx.account})
        self._fact("order", ctx, ctx.account, ids, None, exempt=exempt)

    def _on_order(self, ctx: _Context) -> None:
        self._orderStatus(ctx, _path(_str(ctx.params.get("finalize"))), identifierSet(ctx.params.get("identifiers")))

    def _on_final(self, ctx: _Context) -> None:
        if ctx.problem is not None:
            row = self.store.order(ctx.server, ctx.path)
            if row is not None and row["state"] == "pending":
                self.store.setOrderState(ctx.server, ctx.path, "failed")
                self._failure(ctx, row["account"] or ctx.account, tuple(setFromKey(row["identifiers"])), ctx.problem)
            return
        self._orderStatus(ctx, ctx.path, ())

    def _on_auth(self, ctx: _Context) -> None:
        if ctx.params.get("status") != "invalid" or ctx.code >= 400:
            return
        path = _path(_str(ctx.params.get("authz"))) or ctx.path
        row = self.store.authz(ctx.server, path)
        if row is not None and row["failed"]:
            return
        identifier = identifierValue(ctx.params.get("identifier")) or (row["identifier"] if row else "")
        order = self.store.order(ctx.server, row["finalize"]) if row is not None else None
        account = ctx.account or (row["account"] if row is not None else "")
        self.store.putAuthz(
            ctx.server, path, row["finalize"] if row else "", account, identifier, 1, row["created"] if row else ctx.t
        )
        error = ctx.params.get("error")
        error = error if isinstance(error, dict) else {"type": "", "detail": ""}
        if identifier and (order is None or order["exempt"] != "ari"):
            self._spend(ctx, FAILED_AUTHZ, {"account": account, "identifier": identifier})
        if order is None:
            self._failure(ctx, account, (identifier,) if identifier else (), error)
        elif order["state"] == "pending":
            self.store.setOrderState(ctx.server, order["finalize"], "failed")
            self._failure(ctx, order["account"] or account, tuple(setFromKey(order["identifiers"])), error)
        else:
            self._fact("failure", ctx, account, (identifier,) if identifier else (), error, streak=False)

    def _on_cert(self, ctx: _Context) -> None:
        notAfter = parseTime(ctx.params.get("not_after"))
        notBefore = parseTime(ctx.params.get("not_before"))
        ids = identifierSet(ctx.params.get("names"))
        serial = _str(ctx.params.get("serial"))
        if ctx.code != 200 or notAfter is None or not ids or not serial:
            return
        if notBefore is None:
            notBefore = notAfter
        key = setKey(ids)
        row = self.store.cert(key)
        if row is not None and (row["serial"] == serial or row["not_after"] >= notAfter):
            return
        lead = min(self.expirySeconds, max(0.0, notAfter - notBefore) / 3.0)
        due = notAfter - lead
        self.store.putCert(
            key, serial, notBefore, notAfter, ctx.server, ctx.account, _str(ctx.params.get("issuer")),
            ctx.client, ctx.t, due, 0,
        )
        if row is not None and row["flagged"]:
            params = self._certParams(row, ctx.t)
            params.update(client=ctx.client, agent=ctx.agent, cause=ctx.cause)
            params["renewed_by"] = {
                "serial": serial, "not_after": ctx.params.get("not_after"), "server": ctx.server,
                "account": ctx.account,
            }
            ctx.out.append(Derived(CERT_EXPIRING + CLEARED, params, row["server"], ctx.t))
        if due <= ctx.t:
            new = self.store.cert(key)
            assert new is not None
            params = self._certParams(new, ctx.t)
            params.update(agent=ctx.agent, cause=ctx.cause)
            ctx.out.append(Derived(CERT_EXPIRING, params, ctx.server, ctx.t))
            self.store.flagCert(key)

    # orders

    def _orderStatus(self, ctx: _Context, finalize: str, ids: Tuple[str, ...]) -> None:
        status = ctx.params.get("status")
        if ctx.code >= 400 or status not in ("valid", "invalid") or not finalize:
            return
        row = self.store.order(ctx.server, finalize)
        if row is not None:
            if row["state"] == status or (status == "invalid" and row["state"] != "pending"):
                return
            ids = tuple(setFromKey(row["identifiers"]))
            account, exempt = row["account"] or ctx.account, row["exempt"]
        elif not ids:
            return
        else:
            account = ctx.account
            exempt = "renewal" if self.store.issuedBefore(ctx.server, setKey(ids)) else ""
            self.store.putOrder(ctx.server, finalize, account, setKey(ids), exempt, status, ctx.t)
        self.store.setOrderState(ctx.server, finalize, status)
        if status == "invalid":
            error = ctx.params.get("error")
            self._failure(ctx, account, ids, error if isinstance(error, dict) else {"type": "", "detail": ""})
            return
        key = setKey(ids)
        if exempt != "ari":
            self._spend(ctx, CERTS_PER_SET, {"identifiers": list(ids)})
        if not exempt:
            for domain in self.domains.registeredSet(ids):
                self._spend(ctx, CERTS_PER_DOMAIN, {"registered_domain": domain})
        self.store.putIssued(ctx.server, key, ctx.t)
        self._success(ctx, account, ids)
        self._fact("issued", ctx, account, ids, None, exempt=exempt)

    def _failure(self, ctx: _Context, account: str, ids: Sequence[str], problem: Dict[str, Any]) -> None:
        """A failed order or validation: one more in this account and set's streak."""
        streak = problem.get("type") not in _NOT_FAILURES
        self._fact("failure", ctx, account, ids, problem, streak=streak)
        if not streak:
            return
        key = setKey(ids)
        row = self.store.streak(ctx.server, account, key)
        failures = (row["failures"] if row else 0) + 1
        flagged = row["flagged"] if row else 0
        first = row["first_at"] if row else ctx.t
        if failures >= self.failingAfter and not flagged:
            flagged = 1
            ctx.out.append(Derived(CLIENT_FAILING, {
                "epoch": int(ctx.t), "client": ctx.client, "agent": ctx.agent,
                "server": ctx.server, "directory": self.directoryURL(ctx.server),
                "account": account, "identifiers": list(ids), "failures": failures,
                "threshold": self.failingAfter, "first_failure": int(first),
                "problem": problem, "cause": ctx.cause,
            }, ctx.server, ctx.t))
        self.store.putStreak(ctx.server, account, key, failures, flagged, first, ctx.t, json.dumps(problem))

    def _success(self, ctx: _Context, account: str, ids: Sequence[str]) -> None:
        key = setKey(ids)
        row = self.store.streak(ctx.server, account, key)
        if row is None:
            return
        if row["flagged"]:
            ctx.out.append(Derived(CLIENT_FAILING + CLEARED, {
                "epoch": int(ctx.t), "client": ctx.client, "agent": ctx.agent,
                "server": ctx.server, "directory": self.directoryURL(ctx.server),
                "account": account, "identifiers": list(ids), "failures": row["failures"],
                "first_failure": int(row["first_at"]), "cause": ctx.cause,
            }, ctx.server, ctx.t))
        self.store.deleteStreak(ctx.server, account, key)

    # buckets

    def _spend(self, ctx: _Context, name: str, key: Dict[str, Any]) -> None:
        limit = self.limitsFor(ctx.server).get(name)
        if limit is None:
            return
        keyText = json.dumps(key, sort_keys=True, separators=(",", ":"))
        row = self.store.bucket(ctx.server, name, keyText)
        before = Bucket(row["used"], row["at"]) if row is not None else None
        bucket = spend(before, limit, ctx.t)
        used = usedCount(bucket, limit, ctx.t)
        warned = row["warned"] if row is not None else 0
        at80, at95 = threshold(limit.capacity, 80), threshold(limit.capacity, 95)
        reached = 95 if used >= at95 else 80 if used >= at80 else 0
        clearAt = whenBelow(bucket, limit, at80)
        if reached > warned:
            warned = reached
            params = self._limitParams(int(ctx.t), ctx.client, ctx.agent, ctx.server, limit, keyText, used, reached)
            params.update(
                back_under_80=int(math.ceil(clearAt)), back_under_80_time=formatTime(math.ceil(clearAt)),
                cause=ctx.cause,
            )
            ctx.out.append(Derived(RATE_LIMIT_WARNING, params, ctx.server, ctx.t))
        self.store.putBucket(
            ctx.server, name, keyText, bucket.used, bucket.at, limit.capacity, limit.period, warned,
            clearAt if warned else None, emptyAt(bucket, limit),
        )

    def _limitParams(
        self, epoch: int, client: str, agent: str, server: str, limit: Limit, keyText: str, used: int, level: int
    ) -> Dict[str, Any]:
        return {
            "epoch": epoch, "client": client, "agent": agent, "server": server, "directory": self.directoryURL(server), "limit": limit.name,
            "key": json.loads(keyText), "used": used, "capacity": limit.capacity,
            "period": _number(limit.period), "level": level, "lower_bound": True,
        }

    def _certParams(self, row: Any, now: float) -> Dict[str, Any]:
        return {
            "epoch": int(now), "client": row["client"], "agent": "",
            "server": row["server"], "directory": self.directoryURL(row["server"]),
            "account": row["account"], "identifiers": setFromKey(row["identifiers"]),
            "serial": row["serial"], "not_after": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["not_after"])),
            "issuer": row["issuer"], "days_left": round((row["not_after"] - now) / 86400.0, 1),
            "expired": row["not_after"] <= now,
            "threshold_days": round((row["not_after"] - row["due"]) / 86400.0, 1),
        }

    # facts for reports

    def _fact(
        self, kind: str, ctx: _Context, account: str, ids: Sequence[str], problem: Optional[Mapping[str, Any]],
        streak: bool = False, exempt: str = "",
    ) -> None:
        if kind == "failure":
            ctx.counted = True
        if self._facts is None:
            return
        ptype = _str(problem.get("type")) if problem else ""
        self._facts(kind, {
            "server": ctx.server, "account": account, "identifiers": list(ids), "client": ctx.client,
            "time": ctx.t, "msg": ctx.msg, "type": ptype[len(_ERROR_PREFIX):] if ptype.startswith(_ERROR_PREFIX) else ptype,
            "streak": streak, "exempt": exempt,
            "registered_domains": list(self.domains.registeredSet(ids)),
        })
