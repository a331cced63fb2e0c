"""
Tests for the ledger: the rules (keychestamp.ledger.engine) against
hand-computed windows, and the live sink (keychestamp.ledger.ledger) with a
Clock and a real EventLog.

Times are chosen so the arithmetic is easy: Let's Encrypt's 5 certificates
per exact set per 7 days refill one every 120,960 s (33.6 h); 5 failed
authorizations per hour one every 720 s; 10 accounts per 3 h one every
1,080 s.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from keychestamp.events import Event, EventLog, IdStore, IEventSink, formatTime
from keychestamp.ledger.engine import DERIVED_EVENTS, LedgerEngine, eventTime
from keychestamp.ledger.ledger import Ledger, makeLedger
from keychestamp.ledger.limits import LimitTable, parseLimits
from keychestamp.ledger.store import Store, StoreError

LE = "acme-v02.api.letsencrypt.org"
PROXY = "abcdefghijklmnopqrstuvwx@amp.keychest.net"
T0 = 1_800_000_000
HOUR = 3600
DAY = 86400
SET_INTERVAL = 120960
PROBLEM = "urn:ietf:params:acme:error:"


class Flow:
    """
    Events as the classifier makes them, for one server, client and proxy.
    """

    def __init__(self, server: str = LE, client: str = "10.0.0.5", proxy: str = PROXY) -> None:
        self.server = server
        self.client = client
        self.proxy = proxy
        self.id = 0
        self.orders = 0

    def event(self, msg: str, params: Dict[str, Any], t: float, code: int = 200, path: str = "") -> Event:
        self.id += 1
        full = {"epoch": int(t), "client": self.client, "agent": "test-client/1.0"}
        full.update(params)
        return {
            "msg": msg, "params": full, "time": formatTime(t), "proxy": self.proxy, "server": self.server,
            "path": path, "code": code, "id": self.id, "host": "h", "ip": "127.0.0.1", "version": "t",
            "backlog": 0, "log_time": formatTime(t),
        }

    def directory(self, t: float, path: str = "/directory") -> Event:
        return self.event("directory", {}, t, path=path)

    def newAccount(self, t: float, account: str, source: str = "", code: int = 201) -> Event:
        return self.event("new-acct", {"contact": [], "email": "a@b", "account": account, "source": source,
                                       "status": "valid"}, t, code, "/acme/new-acct")

    def newOrder(
        self, t: float, account: str, names: Sequence[str], replaces: Optional[str] = None,
        problem: Optional[str] = None,
    ) -> Tuple[Event, str, List[str]]:
        """(event, finalize path, authz paths)."""
        self.orders += 1
        n = self.orders
        finalize = f"/acme/finalize/{n}"
        authz = [f"/acme/authz/{n}/{i}" for i in range(len(names))]
        params: Dict[str, Any] = {
            "domains": [{"type": "dns", "value": v} for v in names], "authz": authz, "finalize": finalize,
            "account": account, "order": f"/acme/order/{n}",
        }
        if replaces:
            params["replaces"] = replaces
        code = 201
        if problem:
            code = 429 if problem == "rateLimited" else 400
            params.update(authz=[], finalize="", order="", problem={"type": PROBLEM + problem, "detail": "no",
                                                                    "status": code})
        return self.event("new-order", params, t, code, "/acme/new-order"), finalize, authz

    def order(self, t: float, account: str, finalize: str, names: Sequence[str], status: str = "valid") -> Event:
        params = {"account": account, "status": status, "finalize": finalize, "certificate": "",
                  "identifiers": [{"type": "dns", "value": v} for v in names]}
        if status == "invalid":
            params["error"] = {"type": PROBLEM + "unauthorized", "detail": "order failed"}
        return self.event("order", params, t, 200, finalize.replace("finalize", "order"))

    def final(self, t: float, account: str, finalize: str, status: str = "valid", problem: str = "") -> Event:
        params: Dict[str, Any] = {"account": account, "status": status, "certificate": ""}
        code = 200
        if problem:
            code = 403
            params["status"] = ""
            params["problem"] = {"type": PROBLEM + problem, "detail": "x", "status": 403}
        return self.event("final", params, t, code, finalize)

    def authInvalid(self, t: float, account: str, authz: str, name: str, error: str = "connection") -> Event:
        return self.event("auth", {
            "account": account, "authz": authz, "status": "invalid", "expires": "",
            "identifier": {"type": "dns", "value": name},
            "error": {"type": PROBLEM + error, "detail": f"{name} did not answer"},
        }, t, 200, authz)

    def cert(self, t: float, account: str, names: Sequence[str], serial: str, notBefore: float, notAfter: float) -> Event:
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return self.event("cert", {
            "account": account, "certificate": f"/acme/cert/{serial}", "serial": serial,
            "not_before": time.strftime(fmt, time.gmtime(notBefore)),
            "not_after": time.strftime(fmt, time.gmtime(notAfter)),
            "names": list(names), "issuer": "CN=Test CA",
        }, t, 200, f"/acme/cert/{serial}")

    def issue(self, t: float, account: str, names: Sequence[str], replaces: Optional[str] = None) -> List[Event]:
        """A whole successful order: new-order at t, order valid at t."""
        event, finalize, _ = self.newOrder(t, account, names, replaces)
        return [event, self.final(t, account, finalize, "processing"), self.order(t, account, finalize, names)]


class EngineCase(SynchronousTestCase):
    """
    An in-memory engine and a way to feed it.
    """

    limits: Optional[LimitTable] = None

    def setUp(self) -> None:
        self.store = Store(None)
        self.addCleanup(self.store.close)
        self.engine = LedgerEngine(self.store, self.limits)
        self.derived: List[Any] = []

    def feed(self, *events: Event) -> List[Any]:
        out = []
        for e in events:
            out.extend(self.engine.handle(e))
        self.derived.extend(out)
        return out

    def msgs(self, derived: Sequence[Any]) -> List[str]:
        return [d.msg for d in derived]

    def bucket(self, server: str, limit: str, key: Dict[str, Any]) -> Any:
        return self.store.bucket(server, limit, json.dumps(key, sort_keys=True, separators=(",", ":")))


class ExactSetTests(EngineCase):
    """
    certs-per-exact-set (5 per 7 days) with Let's Encrypt's values.
    """

    def test_warningAt80AndClearing(self) -> None:
        """
        Certificates for one set at T0, +1h, +2h, +3h: the fourth makes 4 of
        5 in use (3.91 by level, a partly refilled one still counts), 80 %:
        one warning, back under 80 % when one whole certificate has refilled
        since T0, T0 + 120,960 s. The cleared event comes at exactly that
        time, not a second earlier.
        """
        flow, names = Flow(), ["www.example.com", "example.com"]
        for i in range(3):
            self.assertEqual(self.feed(*flow.issue(T0 + i * HOUR, "/acct/1", names)), [])
        out = self.feed(*flow.issue(T0 + 3 * HOUR, "/acct/1", names))
        self.assertEqual(self.msgs(out), ["rate-limit-warning"])
        p = out[0].params
        self.assertEqual(
            (p["limit"], p["key"], p["used"], p["capacity"], p["period"], p["level"], p["back_under_80"]),
            ("certs-per-exact-set", {"identifiers": ["example.com", "www.example.com"]}, 4, 5, 604800, 80,
             T0 + SET_INTERVAL),
        )
        self.assertEqual(p["back_under_80_time"], formatTime(T0 + SET_INTERVAL))
        self.assertEqual((p["server"], p["directory"], p["lower_bound"]), (LE, f"https://{LE}/directory", True))
        self.assertEqual((p["client"], p["cause"]["msg"]), ("10.0.0.5", "order"))
        self.assertEqual(out[0].when, T0 + 3 * HOUR)
        self.assertEqual(self.engine.due(T0 + SET_INTERVAL - 1), [])
        self.assertEqual(self.engine.nextDue(), T0 + SET_INTERVAL)
        cleared = self.engine.due(T0 + SET_INTERVAL)
        self.assertEqual(self.msgs(cleared), ["rate-limit-warning-cleared"])
        self.assertEqual((cleared[0].params["used"], cleared[0].params["level"], cleared[0].when),
                         (3, 80, T0 + SET_INTERVAL))
        self.assertEqual(self.engine.due(T0 + 30 * DAY), [])

    def test_warningAt95(self) -> None:
        """
        The fifth certificate in the same hour reaches 95 % (5 of 5): a
        second warning, level 95; the clear then waits for two refills.
        """
        flow, names = Flow(), ["a.example.org"]
        for i in range(4):
            self.feed(*flow.issue(T0 + i, "/acct/1", names))
        out = self.feed(*flow.issue(T0 + 4, "/acct/1", names))
        self.assertEqual(self.msgs(out), ["rate-limit-warning"])
        self.assertEqual((out[0].params["used"], out[0].params["level"]), (5, 95))
        # level 5 - 0 at T0+4 (4 s of refill is 0.00003); under 4 needs 2 refills
        self.assertEqual(out[0].params["back_under_80"], T0 + 2 * SET_INTERVAL)
        self.assertEqual(self.msgs(self.engine.due(T0 + SET_INTERVAL + 10)), [])
        cleared = self.engine.due(T0 + 2 * SET_INTERVAL)
        self.assertEqual([(d.msg, d.params["level"]) for d in cleared], [("rate-limit-warning-cleared", 95)])

    def test_renewalExemptions(self) -> None:
        """
        Renewing the same set counts against the exact-set limit only: the
        new-orders and registered-domain buckets hold the first order alone.
        """
        flow, names = Flow(), ["example.com"]
        for i in range(4):
            self.feed(*flow.issue(T0 + i, "/acct/1", names))
        self.assertEqual(self.bucket(LE, "new-orders-per-account", {"account": "/acct/1"})["used"], 1.0)
        self.assertEqual(self.bucket(LE, "certs-per-registered-domain", {"registered_domain": "example.com"})["used"], 1.0)
        self.assertAlmostEqual(
            self.bucket(LE, "certs-per-exact-set", {"identifiers": ["example.com"]})["used"], 4 - 3 / SET_INTERVAL
        )
        self.assertEqual(self.msgs(self.derived), ["rate-limit-warning"])

    def test_ariRenewalExemptFromAll(self) -> None:
        """
        Orders that name the certificate they replace (ARI) count against no
        limit at all: four of them add nothing to any bucket and warn of
        nothing.
        """
        flow, names = Flow(), ["example.com"]
        self.feed(*flow.issue(T0, "/acct/1", names))
        for i in range(1, 5):
            self.feed(*flow.issue(T0 + i, "/acct/1", names, replaces=f"aki.serial{i}"))
        self.assertEqual(self.derived, [])
        self.assertEqual(self.bucket(LE, "certs-per-exact-set", {"identifiers": ["example.com"]})["used"], 1.0)
        self.assertEqual(self.bucket(LE, "new-orders-per-account", {"account": "/acct/1"})["used"], 1.0)

    def test_ariFailedValidationNotCounted(self) -> None:
        """
        A failed validation of an ARI renewal is not counted against the
        failed-authorization limit (it still counts for client-failing).
        """
        flow = Flow()
        event, _, authz = flow.newOrder(T0, "/acct/1", ["ari.example"], replaces="aki.serial")
        self.feed(event, flow.authInvalid(T0, "/acct/1", authz[0], "ari.example"))
        self.assertEqual(self.store.buckets(), [])
        self.assertEqual(self.store.streak(LE, "/acct/1", '["ari.example"]')["failures"], 1)

    def test_countedOncePerOrder(self) -> None:
        """
        An order seen valid several times (final, then polls) is one
        certificate.
        """
        flow = Flow()
        event, finalize, _ = flow.newOrder(T0, "/acct/1", ["x.example"])
        self.feed(event, flow.final(T0, "/acct/1", finalize, "valid"),
                  flow.order(T0 + 1, "/acct/1", finalize, ["x.example"]),
                  flow.order(T0 + 2, "/acct/1", finalize, ["x.example"]))
        self.assertEqual(self.bucket(LE, "certs-per-exact-set", {"identifiers": ["x.example"]})["used"], 1.0)

    def test_orderUnseenAtCreation(self) -> None:
        """
        An order the proxy did not see created (restart mid-flow) is still
        counted when a poll shows it valid.
        """
        flow = Flow()
        self.feed(flow.order(T0, "/acct/1", "/acme/finalize/77", ["y.example"]))
        self.assertEqual(self.bucket(LE, "certs-per-exact-set", {"identifiers": ["y.example"]})["used"], 1.0)


class OtherLimitTests(EngineCase):
    """
    The other four limits, each against its own window.
    """

    limits = LimitTable(parseLimits({
        f"https://{LE}/directory": {"certs-per-registered-domain": {"capacity": 5, "period_s": 500}},
    }))

    def test_newOrdersPerAccount(self) -> None:
        """
        240 new orders for different sets in one second: the 240th passes 80 %
        of 300; no warning for another account; under 80 % 36 s later.
        """
        flow = Flow()
        out = []
        for i in range(240):
            event, _, _ = flow.newOrder(T0, "/acct/1", [f"n{i}.example.net"])
            out += self.feed(event)
        self.assertEqual(self.msgs(out), ["rate-limit-warning"])
        self.assertEqual((out[0].params["key"], out[0].params["used"]), ({"account": "/acct/1"}, 240))
        self.assertEqual(out[0].params["cause"]["id"], flow.id)
        event, _, _ = flow.newOrder(T0, "/acct/2", ["other.example.net"])
        self.assertEqual(self.feed(event), [])
        self.assertEqual(out[0].params["back_under_80"], T0 + 36)
        self.assertEqual(self.msgs(self.engine.due(T0 + 36)), ["rate-limit-warning-cleared"])

    def test_certsPerRegisteredDomain(self) -> None:
        """
        With 5 per 500 s: certificates for four different sets under
        example.co.uk, 10 s apart, warn at the fourth (level 3.7, 4 in use);
        a set under another registered domain does not count; back under 80 %
        at 30 + 0.7 * 100 = T0 + 100.
        """
        flow = Flow()
        for i in range(4):
            self.feed(*flow.issue(T0 + 10 * i, "/acct/1", [f"h{i}.example.co.uk"]))
            self.feed(*flow.issue(T0 + 10 * i, "/acct/1", [f"h{i}.other{i}.co.uk"]))
        warnings = [d for d in self.derived if d.params["limit"] == "certs-per-registered-domain"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0].params["key"], {"registered_domain": "example.co.uk"})
        self.assertEqual(warnings[0].params["back_under_80"], T0 + 100)
        bucket = self.bucket(LE, "certs-per-registered-domain", {"registered_domain": "example.co.uk"})
        self.assertAlmostEqual(bucket["used"], 3.7)
        bucket = self.bucket(LE, "certs-per-registered-domain", {"registered_domain": "other0.co.uk"})
        self.assertEqual(bucket["used"], 1.0)

    def test_failedAuthorizations(self) -> None:
        """
        Failed validations of one identifier at T0, +60, +120, +180: the
        fourth passes 80 % of 5 per hour (level 3.75); back under 80 % at
        T0 + 180 + 0.75 * 720 = T0 + 720. Each authorization counts once
        however often it is polled.
        """
        flow = Flow()
        out = []
        for i in range(4):
            event, finalize, authz = flow.newOrder(T0 + 60 * i, "/acct/1", ["fail.example"])
            out += self.feed(event, flow.authInvalid(T0 + 60 * i, "/acct/1", authz[0], "fail.example"),
                             flow.authInvalid(T0 + 60 * i, "/acct/1", authz[0], "fail.example"))
        limitWarnings = [d for d in out if d.msg == "rate-limit-warning"]
        self.assertEqual(len(limitWarnings), 1)
        p = limitWarnings[0].params
        self.assertEqual((p["limit"], p["key"], p["used"]),
                         ("failed-authz-per-identifier-per-account",
                          {"account": "/acct/1", "identifier": "fail.example"}, 4))
        self.assertEqual(p["back_under_80"], T0 + 720)
        self.assertEqual([d.msg for d in self.engine.due(T0 + 720)], ["rate-limit-warning-cleared"])

    def test_newAccountsPerIP(self) -> None:
        """
        Eight new accounts in eight seconds pass 80 % of 10 per 3 h. Without
        a source address from the server they count against "unknown-egress";
        with one, against it; 200 (an existing account) does not count.
        """
        flow = Flow()
        out = []
        for i in range(8):
            out += self.feed(flow.newAccount(T0 + i, f"/acct/{i}"))
            self.feed(flow.newAccount(T0 + i, f"/acct/{i}", code=200))
        self.assertEqual(self.msgs(out), ["rate-limit-warning"])
        self.assertEqual(out[0].params["key"], {"ip": "unknown-egress"})
        self.feed(flow.newAccount(T0 + 9, "/acct/99", source="198.51.100.7"))
        self.assertEqual(self.bucket(LE, "new-accounts-per-ip", {"ip": "198.51.100.7"})["used"], 1.0)

    def test_noLimitsNoBuckets(self) -> None:
        """
        A server with no limits (not Let's Encrypt, not in the file) keeps no
        buckets and never warns.
        """
        flow = Flow(server="pebble.test:14000")
        for i in range(20):
            self.feed(*flow.issue(T0 + i, "/acct/1", ["p.example"]))
        self.assertEqual(self.store.buckets(), [])
        self.assertEqual(self.derived, [])


class ClientFailingTests(EngineCase):
    """
    client-failing after consecutive failed orders or validations.
    """

    def test_threeValidationFailures(self) -> None:
        """
        Three orders whose validation fails flag the account and set once,
        with the last problem; a fourth does not flag again; a valid order
        clears it.
        """
        flow, names = Flow(), ["fail.example"]
        fired = []
        for i in range(4):
            event, finalize, authz = flow.newOrder(T0 + i, "/acct/1", names)
            fired += self.feed(event, flow.authInvalid(T0 + i, "/acct/1", authz[0], names[0],
                                                        "dns" if i == 2 else "connection"),
                               flow.order(T0 + i, "/acct/1", finalize, names, "invalid"))
            if i == 1:
                self.assertEqual([d for d in fired if d.msg == "client-failing"], [])
        failing = [d for d in fired if d.msg == "client-failing"]
        self.assertEqual(len(failing), 1)
        p = failing[0].params
        self.assertEqual((p["account"], p["identifiers"], p["failures"], p["threshold"], p["first_failure"]),
                         ("/acct/1", names, 3, 3, T0))
        self.assertEqual(p["problem"]["type"], PROBLEM + "dns")
        out = self.feed(*flow.issue(T0 + 10, "/acct/1", names))
        cleared = [d for d in out if d.msg == "client-failing-cleared"]
        self.assertEqual(len(cleared), 1)
        self.assertEqual(cleared[0].params["failures"], 4)

    def test_failedOrdersRefused(self) -> None:
        """
        new-order refused three times (rejectedIdentifier) flags; badNonce
        answers in between do not count and do not break the streak.
        """
        flow = Flow()
        out = []
        for i in range(3):
            out += self.feed(flow.newOrder(T0 + i, "/acct/1", ["bad.example"], problem="badNonce")[0])
            out += self.feed(flow.newOrder(T0 + i, "/acct/1", ["bad.example"], problem="rejectedIdentifier")[0])
        failing = [d for d in out if d.msg == "client-failing"]
        self.assertEqual(len(failing), 1)
        self.assertEqual(failing[0].params["problem"]["type"], PROBLEM + "rejectedIdentifier")

    def test_successInBetween(self) -> None:
        """
        Two failures, a success, two failures: never three in a row.
        """
        flow, names = Flow(), ["flaky.example"]

        def fail(t: int) -> None:
            event, finalize, authz = flow.newOrder(t, "/acct/1", names)
            self.feed(event, flow.authInvalid(t, "/acct/1", authz[0], names[0]))

        fail(T0)
        fail(T0 + 1)
        self.feed(*flow.issue(T0 + 2, "/acct/1", names))
        fail(T0 + 3)
        fail(T0 + 4)
        self.assertNotIn("client-failing", self.msgs(self.derived))

    def test_perAccountAndSet(self) -> None:
        """
        Failures of different accounts or different sets are separate
        streaks; finalize errors count once per order.
        """
        flow = Flow()
        for i, (account, name) in enumerate([("/a/1", "x.example"), ("/a/2", "x.example"), ("/a/1", "y.example")]):
            event, finalize, _ = flow.newOrder(T0 + i, account, [name])
            self.feed(event, flow.final(T0 + i, account, finalize, problem="badCSR"),
                      flow.final(T0 + i, account, finalize, problem="badCSR"))
        self.assertNotIn("client-failing", self.msgs(self.derived))
        self.assertEqual(self.store.streak(LE, "/a/1", '["x.example"]')["failures"], 1)

    def test_configurable(self) -> None:
        """
        failingAfter=1 flags at the first failure.
        """
        self.engine = LedgerEngine(self.store, failingAfter=1)
        flow = Flow()
        self.assertEqual(self.msgs(self.feed(flow.newOrder(T0, "/a", ["z.example"], problem="caa")[0])),
                         ["client-failing"])


class CertExpiringTests(EngineCase):
    """
    cert-expiring when a certificate nears not_after and no later one for
    its set was seen.
    """

    def test_expiringThenRenewed(self) -> None:
        """
        A 90-day certificate issued at T0 is due at not_after - 30 days: the
        event fires then, once; a later certificate for the same set clears
        it; a re-download of the old one does nothing.
        """
        flow, names = Flow(), ["shop.example"]
        self.feed(flow.cert(T0, "/acct/1", names, "01aa", T0, T0 + 90 * DAY))
        self.assertEqual(self.engine.nextDue(), T0 + 60 * DAY)
        self.assertEqual(self.engine.due(T0 + 60 * DAY - 1), [])
        due = self.engine.due(T0 + 60 * DAY)
        self.assertEqual(self.msgs(due), ["cert-expiring"])
        p = due[0].params
        self.assertEqual((p["identifiers"], p["serial"], p["days_left"], p["expired"], p["threshold_days"]),
                         (names, "01aa", 30.0, False, 30.0))
        self.assertEqual(p["not_after"], "2027-04-15T08:00:00Z")
        self.assertEqual(self.engine.due(T0 + 70 * DAY), [])
        self.assertEqual(self.feed(flow.cert(T0 + 61 * DAY, "/acct/1", names, "01aa", T0, T0 + 90 * DAY)), [])
        out = self.feed(flow.cert(T0 + 62 * DAY, "/acct/1", list(reversed(names)), "02bb", T0 + 62 * DAY,
                                  T0 + 152 * DAY))
        self.assertEqual(self.msgs(out), ["cert-expiring-cleared"])
        self.assertEqual(out[0].params["renewed_by"]["serial"], "02bb")
        self.assertEqual(self.engine.nextDue(), T0 + 122 * DAY)

    def test_renewedBeforeDue(self) -> None:
        """
        A certificate renewed before it is due is never flagged.
        """
        flow, names = Flow(), ["a.example", "b.example"]
        self.feed(flow.cert(T0, "", names, "01", T0, T0 + 90 * DAY))
        self.feed(flow.cert(T0 + 50 * DAY, "", names, "02", T0 + 50 * DAY, T0 + 140 * DAY))
        self.assertEqual(self.engine.due(T0 + 100 * DAY), [])

    def test_otherSetNoRenewal(self) -> None:
        """
        A certificate for a different set (one name more) is not a renewal.
        """
        flow = Flow()
        self.feed(flow.cert(T0, "", ["a.example"], "01", T0, T0 + 90 * DAY))
        self.feed(flow.cert(T0 + DAY, "", ["a.example", "b.example"], "02", T0 + DAY, T0 + 91 * DAY))
        self.assertEqual(self.msgs(self.engine.due(T0 + 60 * DAY)), ["cert-expiring"])

    def test_shortLivedAndAlreadyDue(self) -> None:
        """
        A 6-day certificate is due a third of its lifetime before not_after
        (2 days), not 30 days; one seen when already due fires at once.
        """
        flow = Flow()
        self.feed(flow.cert(T0, "", ["short.example"], "01", T0, T0 + 6 * DAY))
        self.assertEqual(self.engine.nextDue(), T0 + 4 * DAY)
        out = self.feed(flow.cert(T0, "", ["old.example"], "02", T0 - 80 * DAY, T0 + 10 * DAY))
        self.assertEqual(self.msgs(out), ["cert-expiring"])
        self.assertEqual(out[0].params["days_left"], 10.0)


class EngineRobustnessTests(EngineCase):
    """
    What the engine ignores.
    """

    def test_ignoresDerivedAndJunk(self) -> None:
        """
        Its own derived events, events without params or time, unknown types
        and failed answers without problems change nothing.
        """
        flow = Flow()
        for msg in DERIVED_EVENTS:
            self.assertEqual(self.engine.handle(flow.event(msg, {}, T0)), [])
        self.assertEqual(self.engine.handle({"msg": "new-order"}), [])
        self.assertEqual(self.engine.handle({"msg": "new-order", "params": {}}), [])
        self.assertEqual(self.engine.handle(flow.event("surprise", {}, T0)), [])
        self.assertEqual(self.store.dump()["orders"], [])

    def test_eventTime(self) -> None:
        """
        params.epoch first, else the envelope's time.
        """
        self.assertEqual(eventTime({"params": {"epoch": 5}, "time": "2000-01-01 00:00:00"}), 5.0)
        self.assertEqual(eventTime({"params": {}, "time": "2000-01-01 00:00:00"}), 946684800.0)
        self.assertIsNone(eventTime({"params": {}, "time": "yesterday"}))

    def test_directoryURL(self) -> None:
        """
        The directory URL is https://server plus the directory path seen,
        else the limits entry's URL, else https://server/.
        """
        flow = Flow(server="pebble.test:14000")
        self.assertEqual(self.engine.directoryURL("pebble.test:14000"), "https://pebble.test:14000/")
        self.assertEqual(self.engine.directoryURL(LE), f"https://{LE}/directory")
        self.feed(flow.directory(T0, "/dir"))
        self.assertEqual(self.engine.directoryURL("pebble.test:14000"), "https://pebble.test:14000/dir")


@implementer(IEventSink)
class ListSink:
    """Keeps every event it is given."""

    name = "list"

    def __init__(self) -> None:
        self.events: List[Event] = []

    def emit(self, event: Event) -> Any:
        self.events.append(event)
        return succeed(None)


class LiveCase(SynchronousTestCase):
    """
    The sink in an EventLog, with a Clock, a file ledger and a list sink.
    """

    limits: Optional[LimitTable] = None

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.clock = Clock()
        self.clock.advance(T0)
        self.start()

    def start(self) -> None:
        self.ids = IdStore(os.path.join(self.workdir, "event-id"))
        self.listSink = ListSink()
        self.store = Store(os.path.join(self.workdir, "ledger.sqlite"))
        self.ledger = Ledger(LedgerEngine(self.store, self.limits), self.clock)
        self.events = EventLog(PROXY, [self.listSink, self.ledger], self.ids, self.clock, "h", "127.0.0.1", "t")
        self.ledger.setEventLog(self.events.log)
        self.ledger.startService()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.ledger.stopService()
            self.ids.close()

    def tearDown(self) -> None:
        self.stop()

    def log(self, event: Event) -> None:
        """Log like the classifier: at the event's time."""
        when = event["params"]["epoch"]
        if when > self.clock.seconds():
            self.clock.advance(when - self.clock.seconds())
        self.successResultOf(self.events.log(event["msg"], event["params"], event["server"], event["path"],
                                             event["code"], when))

    def logged(self, *msgs: str) -> List[Event]:
        return [e for e in self.listSink.events if e["msg"] in msgs]


class LiveTests(LiveCase):
    """
    The ledger in the event path.
    """

    def test_interface(self) -> None:
        """
        The ledger is an event sink named "ledger".
        """
        self.assertTrue(verifyObject(IEventSink, self.ledger))
        self.assertEqual(self.ledger.name, "ledger")

    def test_derivedThroughEventLog(self) -> None:
        """
        A warning goes through the event log (an id, the envelope, after the
        event that caused it) and comes back to the ledger, which ignores it;
        the clearing comes from the timer at its time.
        """
        flow = Flow()
        for i in range(4):
            for e in flow.issue(T0 + i * HOUR, "/acct/1", ["www.example.com"]):
                self.log(e)
        warnings = self.logged("rate-limit-warning")
        self.assertEqual(len(warnings), 1)
        w = warnings[0]
        self.assertEqual((w["server"], w["path"], w["code"], w["proxy"]), (LE, "", 0, PROXY))
        self.assertEqual(w["time"], formatTime(T0 + 3 * HOUR))
        before = [e for e in self.listSink.events if e["id"] < w["id"]]
        self.assertEqual(before[-1]["msg"], "order")
        self.assertEqual(w["params"]["cause"]["id"], before[-1]["id"])
        self.assertEqual(self.events.health(), {"list": None, "ledger": None})
        self.clock.advance(T0 + SET_INTERVAL - 1 - self.clock.seconds())
        self.assertEqual(self.logged("rate-limit-warning-cleared"), [])
        self.clock.advance(1)
        cleared = self.logged("rate-limit-warning-cleared")
        self.assertEqual(len(cleared), 1)
        self.assertEqual(cleared[0]["time"], formatTime(T0 + SET_INTERVAL))

    def test_restartKeepsLedger(self) -> None:
        """
        After a restart the ledger remembers: the fifth certificate of a set
        after four before the restart makes the 95 % warning (not a second 80 %
        one), and a warning pending at stop clears on time after the start.
        """
        flow = Flow()
        for i in range(4):
            for e in flow.issue(T0 + i, "/acct/1", ["keep.example"]):
                self.log(e)
        self.assertEqual([e["params"]["level"] for e in self.logged("rate-limit-warning")], [80])
        self.stop()
        self.start()
        for e in flow.issue(T0 + 10, "/acct/1", ["keep.example"]):
            self.log(e)
        self.assertEqual([e["params"]["level"] for e in self.logged("rate-limit-warning")], [95])
        self.clock.advance(2 * SET_INTERVAL)
        self.assertEqual(len(self.logged("rate-limit-warning-cleared")), 1)

    def test_dueWhileDown(self) -> None:
        """
        A certificate that became due while the proxy was down is reported
        when it starts, at the time it became due.
        """
        flow = Flow()
        self.log(flow.cert(T0, "/acct/1", ["down.example"], "0a", T0, T0 + 90 * DAY))
        self.stop()
        self.clock.advance(65 * DAY)
        self.start()
        expiring = self.logged("cert-expiring")
        self.assertEqual(len(expiring), 1)
        self.assertEqual(expiring[0]["time"], formatTime(T0 + 60 * DAY))

    def test_neverRaises(self) -> None:
        """
        A ledger that cannot write fails its emit (the event log shows it as
        the sink's health, other sinks still get the event) and logs once.
        """
        self.store.db.execute("DROP TABLE orders")
        flow = Flow()
        with capturedLogs() as logs:
            for i in range(3):
                self.log(flow.newOrder(T0 + i, "/acct/1", [f"x{i}.example"])[0])
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertEqual(len(self.logged("new-order")), 3)
        self.assertIn("ledger", self.events.health())
        self.assertIsNotNone(self.events.health()["ledger"])
        ledgerFailures = [l for l in logs if "Ledger could not take" in l.get("log_format", "")]
        self.assertEqual(len(ledgerFailures), 1)

    def test_afterStop(self) -> None:
        """
        Events after the ledger stopped are not counted and do not fail.
        """
        self.stop()
        ledger = self.ledger
        self.assertIsNone(self.successResultOf(ledger.emit(Flow().newAccount(T0, "/a"))))

    def test_headroom(self) -> None:
        """
        headroom() lists buckets in use for the admin page, keys as text.
        """
        flow = Flow()
        for e in flow.issue(T0, "/acct/1", ["h.example"]):
            self.log(e)
        rows = {r["limit"]: r for r in self.ledger.headroom()}
        self.assertEqual(rows["new-orders-per-account"]["key"], "account=/acct/1")
        self.assertEqual((rows["certs-per-exact-set"]["used"], rows["certs-per-exact-set"]["capacity"],
                          rows["certs-per-exact-set"]["window"]), (1, 5, "1w"))


class MakeLedgerTests(SynchronousTestCase):
    """
    makeLedger builds the proxy's ledger from its options.
    """

    def test_options(self) -> None:
        """
        ledger.sqlite in the working directory, --failing-after,
        --expiry-days, --egress-ip.
        """
        from twisted.python.filepath import FilePath

        workdir = FilePath(self.mktemp())
        workdir.makedirs()
        ledger = makeLedger({"failing-after": 5, "expiry-days": 10.0, "egress-ip": "192.0.2.1", "limits": None},
                            workdir, Clock())
        self.addCleanup(ledger.engine.close)
        self.assertTrue(workdir.child("ledger.sqlite").exists())
        self.assertEqual((ledger.engine.failingAfter, ledger.engine.expirySeconds, ledger.engine.egress),
                         (5, 10 * DAY, "192.0.2.1"))

    def test_unwritable(self) -> None:
        """
        A ledger file that cannot be created is a StoreError naming it.
        """
        e = self.assertRaises(StoreError, Store, "/proc/kc-no/ledger.sqlite")
        self.assertIn("/proc/kc-no/ledger.sqlite", str(e))
