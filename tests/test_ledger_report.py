"""
Tests for `keychestamp report` and `keychestamp ledger rebuild`
(keychestamp.ledger.report, replay, text): rebuild equals live, reports over
several proxies' files, the command line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
from typing import Any, Dict, List, Sequence

from twisted.trial.unittest import SynchronousTestCase

from keychestamp.events import Event, IdStore
from keychestamp.ledger.limits import LimitTable, parseLimits
from keychestamp.ledger.replay import AuditReader
from keychestamp.ledger.report import REPORT_FORMAT, buildReport, parseDuration, rebuild, run
from keychestamp.ledger.store import Store
from keychestamp.sinks.file import encodeEvent
from tests.test_ledger import DAY, HOUR, LE, SET_INTERVAL, T0, Flow, LiveCase

OTHER_PROXY = "zyxwvutsrqponmlkjihgfedc@amp.keychest.net"


def writeAudit(path: str, events: Sequence[Event]) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        for event in events:
            f.write(encodeEvent(event))
    return path


def fleet(flow: Flow) -> List[Event]:
    """
    A little of everything: a directory, an account, an exact set renewed
    four times (warning), a client failing validation three times, a
    certificate download.
    """
    events = [flow.directory(T0), flow.newAccount(T0, "/acct/1")]
    for i in range(4):
        events += flow.issue(T0 + i * HOUR, "/acct/1", ["www.example.com", "example.com"])
    for i in range(3):
        event, finalize, authz = flow.newOrder(T0 + 10 * HOUR + i, "/acct/1", ["broken.example.net"])
        events += [event, flow.authInvalid(T0 + 10 * HOUR + i, "/acct/1", authz[0], "broken.example.net")]
    events.append(flow.cert(T0 + 11 * HOUR, "/acct/1", ["example.com", "www.example.com"], "0fee",
                            T0 + 11 * HOUR, T0 + 11 * HOUR + 90 * DAY))
    return events


class RebuildEqualsLiveTests(LiveCase):
    """
    Replaying the audit file the live proxy wrote gives the same ledger.
    """

    def test_rebuildEqualsLive(self) -> None:
        """
        The live ledger (with its timer clearing a warning and flagging an
        expiring certificate) and one rebuilt from the events it logged,
        derived events included, hold the same rows.
        """
        flow = Flow()
        for event in fleet(flow):
            self.log(event)
        self.clock.advance(SET_INTERVAL)
        more = Flow(client="10.0.0.9")
        more.id = 10_000
        for event in more.issue(self.clock.seconds(), "/acct/2", ["late.example.org"]):
            self.log(event)
        self.clock.advance(62 * DAY)
        msgs = [e["msg"] for e in self.listSink.events]
        for derived in ("rate-limit-warning", "rate-limit-warning-cleared", "client-failing", "cert-expiring"):
            self.assertIn(derived, msgs)
        now = self.clock.seconds()
        audit = writeAudit(os.path.join(self.workdir, "audit.json"), self.listSink.events)
        self.stop()

        other = os.path.abspath(self.mktemp())
        os.makedirs(other)
        reader = rebuild(other, [audit], now=now)
        self.assertEqual(reader.read, len(self.listSink.events))
        live = Store(os.path.join(self.workdir, "ledger.sqlite"))
        rebuilt = Store(os.path.join(other, "ledger.sqlite"))
        self.addCleanup(live.close)
        self.addCleanup(rebuilt.close)
        from keychestamp.ledger.engine import LedgerEngine

        for store in (live, rebuilt):
            LedgerEngine(store).due(now)
            store.prune(now)
        self.assertEqual(live.dump(), rebuilt.dump())
        self.assertTrue(live.dump()["certs"])
        self.assertFalse(os.path.exists(os.path.join(other, "ledger.sqlite.rebuild")))


class RebuildTests(SynchronousTestCase):
    """
    The rebuild command's safety.
    """

    def test_refusedWhileProxyRuns(self) -> None:
        """
        A working directory whose event-id file a proxy holds is not rebuilt.
        """
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        ids = IdStore(os.path.join(workdir, "event-id"))
        self.addCleanup(ids.close)
        audit = writeAudit(os.path.join(workdir, "a.json"), fleet(Flow()))
        e = self.assertRaises(OSError, rebuild, workdir, [audit])
        self.assertIn("running", str(e))
        self.assertFalse(os.path.exists(os.path.join(workdir, "ledger.sqlite")))

    def test_replacesOld(self) -> None:
        """
        A rebuild replaces an existing ledger (here one from other traffic).
        """
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        old = Store(os.path.join(workdir, "ledger.sqlite"))
        old.putIssued("old.server", '["old.example"]', T0)
        old.close()
        audit = writeAudit(os.path.join(workdir, "a.json.gz"), fleet(Flow()))
        rebuild(workdir, [audit], now=T0 + DAY)
        store = Store(os.path.join(workdir, "ledger.sqlite"))
        self.addCleanup(store.close)
        self.assertFalse(store.issuedBefore("old.server", '["old.example"]'))
        self.assertTrue(store.issuedBefore(LE, '["example.com","www.example.com"]'))


class ReaderTests(SynchronousTestCase):
    """
    Audit files from several proxies, merged.
    """

    def test_mergeDedupeSkip(self) -> None:
        """
        Two proxies' files merge by time; the same event twice (a file given
        twice) is read once; ids are per proxy; broken lines are skipped.
        """
        one, two = Flow(), Flow(proxy=OTHER_PROXY)
        a = writeAudit(self.mktemp(), [one.newAccount(T0, "/a"), one.newAccount(T0 + 20, "/b")])
        b = writeAudit(self.mktemp(), [two.newAccount(T0 + 10, "/c")])
        with open(b, "a") as f:
            f.write("not json\n[1]\n")
        skipped: List[Any] = []
        reader = AuditReader([a, b, a], lambda *why: skipped.append(why))
        events = list(reader)
        self.assertEqual([e["params"]["account"] for e in events], ["/a", "/c", "/b"])
        self.assertEqual((reader.read, reader.duplicates, reader.skipped), (3, 2, 2))
        self.assertEqual(reader.proxies, {one.proxy, OTHER_PROXY})
        self.assertEqual([w[2] for w in skipped], ["not JSON", "not an event"])


class ReportTests(SynchronousTestCase):
    """
    The report's figures.
    """

    def setUp(self) -> None:
        self.one = Flow()
        self.two = Flow(proxy=OTHER_PROXY, client="10.0.0.6")
        self.two.orders = 100  # the CA's order URLs differ whoever asks
        self.files = [
            writeAudit(self.mktemp(), fleet(self.one)),
            writeAudit(self.mktemp(), self.two.issue(T0 + 5 * HOUR, "/acct/9", ["shop.example.com"])
                       + [self.two.newOrder(T0 + 5 * HOUR, "/acct/9", ["x.example.com"], problem="rateLimited")[0]]),
        ]
        self.now = T0 + 12 * HOUR

    def report(self, **kw: Any) -> Dict[str, Any]:
        return buildReport(self.files, now=self.now, **kw)

    def test_tallies(self) -> None:
        """
        Per account, registered domain and client: orders, certificates and
        failures by problem type, from both proxies' files.
        """
        r = self.report()
        self.assertEqual(r["format"], REPORT_FORMAT)
        self.assertTrue(r["lower_bound"])
        self.assertEqual(r["proxies"], sorted([self.one.proxy, OTHER_PROXY]))
        accounts = {a["account"]: a for a in r["accounts"]}
        self.assertEqual((accounts["/acct/1"]["orders"], accounts["/acct/1"]["certificates"],
                          accounts["/acct/1"]["failures"]), (7, 4, {"connection": 3}))
        self.assertEqual(accounts["/acct/9"]["failures"], {"rateLimited": 1})
        self.assertEqual(accounts["/acct/1"]["clients"], ["10.0.0.5"])
        domains = {d["registered_domain"]: d for d in r["registered_domains"]}
        self.assertEqual((domains["example.com"]["orders"], domains["example.com"]["certificates"]), (5, 5))
        self.assertEqual(domains["example.net"]["failures"], {"connection": 3})
        clients = {c["client"]: c for c in r["clients"]}
        self.assertEqual(clients["10.0.0.6"]["accounts"], [{"server": LE, "account": "/acct/9"}])

    def test_headroomAndConditions(self) -> None:
        """
        Headroom per limit now: the renewed set has 1 of 5 left and is
        flagged; the account shows its new-orders headroom; the failing
        client and the certificate are listed.
        """
        r = self.report()
        limits = {(b["limit"], json.dumps(b["key"])): b for b in r["limits"]}
        exact = limits[("certs-per-exact-set", json.dumps({"identifiers": ["example.com", "www.example.com"]}))]
        self.assertEqual((exact["used"], exact["capacity"], exact["headroom"]), (4, 5, 1))
        self.assertEqual(r["limits"][0], exact)
        account = [a for a in r["accounts"] if a["account"] == "/acct/1"][0]
        orders = [h for h in account["headroom"] if h["limit"] == "new-orders-per-account"][0]
        # 300 per 3 h refill in 36 s each: the orders are long refilled
        self.assertEqual((orders["used"], orders["headroom"], orders["full_at"]), (0, 300, None))
        self.now = T0 + 10 * HOUR + 2
        account = [a for a in self.report()["accounts"] if a["account"] == "/acct/1"][0]
        orders = [h for h in account["headroom"] if h["limit"] == "new-orders-per-account"][0]
        # three failing orders at +0, +1, +2 s: level 3 - 2/36, 3 in use, empty 106 s later
        self.assertEqual((orders["used"], orders["headroom"]), (3, 297))
        self.assertEqual(orders["full_at"], "2027-01-15T18:01:48Z")
        conditions = sorted(c["msg"] for c in r["conditions"])
        self.assertEqual(conditions, ["client-failing", "rate-limit-warning"])
        self.assertEqual([c["identifiers"] for c in r["certificates"]], [["example.com", "www.example.com"]])
        self.assertEqual(r["certificates"][0]["state"], "ok")

    def test_since(self) -> None:
        """
        --since limits the tallies, not the headroom.
        """
        r = self.report(since=2 * HOUR + 1)
        accounts = {a["account"]: a for a in r["accounts"]}
        self.assertEqual((accounts["/acct/1"]["orders"], accounts["/acct/1"]["certificates"]), (3, 0))
        self.assertNotIn("/acct/9", accounts)
        self.assertEqual(r["since"], "2027-01-15T17:59:59Z")
        exact = [b for b in r["limits"] if b["limit"] == "certs-per-exact-set" and "example.com" in b["key"]["identifiers"]]
        self.assertEqual(exact[0]["used"], 4)

    def test_expiryStates(self) -> None:
        """
        Later, the certificate is expiring, then expired.
        """
        self.now = T0 + 11 * HOUR + 70 * DAY
        self.assertEqual(self.report()["certificates"][0]["state"], "expiring")
        self.now = T0 + 11 * HOUR + 91 * DAY
        self.assertEqual(self.report()["certificates"][0]["state"], "expired")

    def test_limitsFile(self) -> None:
        """
        A limit table changes the figures: 10 per exact set leaves 6.
        """
        table = LimitTable(parseLimits({f"https://{LE}/directory": {
            "certs-per-exact-set": {"capacity": 10, "period_s": 604800}}}))
        r = self.report(limits=table)
        exact = [b for b in r["limits"] if b["limit"] == "certs-per-exact-set" and "www.example.com" in b["key"]["identifiers"]]
        self.assertEqual(exact[0]["headroom"], 6)


class CommandTests(SynchronousTestCase):
    """
    `keychestamp report` and `keychestamp ledger rebuild` on the command line.
    """

    def setUp(self) -> None:
        self.audit = writeAudit(os.path.abspath(self.mktemp()), fleet(Flow()))
        self.out, self.err = io.StringIO(), io.StringIO()

    def test_notACommand(self) -> None:
        """
        Anything else is left to the proxy.
        """
        self.assertIsNone(run(["-p", "8443"], self.out, self.err))

    def test_json(self) -> None:
        """
        --json prints the report as one JSON document.
        """
        self.assertEqual(run(["report", "--json", self.audit], self.out, self.err), 0)
        report = json.loads(self.out.getvalue())
        self.assertEqual(report["format"], REPORT_FORMAT)
        self.assertEqual(report["events"]["read"], len(fleet(Flow())))

    def test_text(self) -> None:
        """
        The text report has its sections, the lower-bound notice and the
        rows.
        """
        self.assertEqual(run(["report", "--since", "30d", self.audit], self.out, self.err), 0)
        text = self.out.getvalue()
        for heading in ("Accounts", "Registered domains", "Client addresses", "Limits in use",
                        "Certificates by expiry", "Active conditions", "lower bounds"):
            self.assertIn(heading, text)
        self.assertIn("certs-per-exact-set", text)
        self.assertIn("identifiers=example.com,www.example.com", text)
        self.assertIn(">=", text)

    def test_errors(self) -> None:
        """
        No file, an unreadable file, a bad duration and a bad limits file are
        one line on stderr and status 2.
        """
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("{")
        for argv in (["report"], ["report", "/nonexistent/audit"], ["report", "--since", "soon", self.audit],
                     ["report", "--limits", bad, self.audit], ["ledger", "rebuild", "-e", "/nonexistent", self.audit],
                     ["ledger", "frobnicate"]):
            self.err = io.StringIO()
            self.assertEqual(run(argv, self.out, self.err), 2, argv)
            self.assertEqual(len(self.err.getvalue().splitlines()), 1, (argv, self.err.getvalue()))

    def test_rebuild(self) -> None:
        """
        ledger rebuild -e DIR writes DIR/ledger.sqlite and says so.
        """
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.assertEqual(run(["ledger", "rebuild", "-e", workdir, self.audit], self.out, self.err), 0)
        self.assertIn("ledger.sqlite", self.out.getvalue())
        self.assertTrue(os.path.exists(os.path.join(workdir, "ledger.sqlite")))

    def test_consoleScript(self) -> None:
        """
        The console script dispatches `report` before twistd.
        """
        from keychestamp import script

        self.patch(sys, "stdout", self.out)
        e = self.assertRaises(SystemExit, script.main, ["report", "--json", self.audit])
        self.assertEqual(e.code, 0)
        self.assertEqual(json.loads(self.out.getvalue())["format"], REPORT_FORMAT)

    def test_durations(self) -> None:
        """
        Durations with units, combined, and plain seconds.
        """
        self.assertEqual(parseDuration("90s"), 90)
        self.assertEqual(parseDuration("30m"), 1800)
        self.assertEqual(parseDuration("1d12h"), 129600)
        self.assertEqual(parseDuration("2w"), 14 * 86400)
        self.assertEqual(parseDuration("45"), 45)
        for bad in ("", "1y", "h", "1h x"):
            self.assertRaises(ValueError, parseDuration, bad)
