"""
Tests for the admin listener's parts without sockets: the event summary
(keychestamp.admin.stats) and the status document. The helpers here serve
tests.test_admin_render too.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from keychestamp.admin import stats as statsModule
from keychestamp.admin.interfaces import IHeadroom
from keychestamp.admin.metrics import AdminMetrics
from keychestamp.admin.page import renderPage
from keychestamp.admin.stats import AdminStats, observe, product
from keychestamp.admin.status import StatusSource, headroomRows
from keychestamp.events import IEventSink

START = 1_700_000_000.0
SERVER = "acme.example:14000"
CERTBOT = "CertbotACMEClient/2.1.0 (certbot; debian 12) Authenticator/manual Installer/None Py/3.11.2"
HOSTILE = 'Evil/6.6 "><script>alert(1)</script><img src=x onerror=alert(2)>'
PROBLEM = "urn:ietf:params:acme:error:"


def event(msg: str, code: int = 200, client: str = "10.0.0.5", agent: str = CERTBOT,
          server: str = SERVER, **params: Any) -> Dict[str, Any]:
    """
    An envelope as EventLog builds it.
    """
    p = {"epoch": int(START), "client": client, "agent": agent}
    p.update(params)
    return {"msg": msg, "params": p, "time": "2023-11-14 22:13:20", "proxy": "p@amp.keychest.net",
            "server": server, "path": "/x", "code": code, "id": 1}


def problem(kind: str, detail: str = "", status: int = 400) -> Dict[str, Any]:
    return {"type": PROBLEM + kind, "detail": detail, "status": status}


@implementer(IHeadroom)
class FakeLedger:
    """
    A rate-limit ledger with fixed buckets.
    """

    def __init__(self, rows: List[Dict[str, Any]]) -> None:
        self.rows = rows

    def headroom(self) -> List[Dict[str, Any]]:
        return self.rows


class Tags(HTMLParser):
    """
    Every element start tag of a document, with its attributes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tags: List[Tuple[str, Dict[str, Optional[str]]]] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tagsOf(page: bytes) -> List[Tuple[str, Dict[str, Optional[str]]]]:
    parser = Tags()
    parser.feed(page.decode("utf-8"))
    return parser.tags


class Fixture:
    """
    An AdminStats on a Clock with metrics subscribed, and a StatusSource.
    """

    def __init__(self, headroom: Any = None, poster: Any = None) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.stats = AdminStats(self.clock)
        self.metrics = AdminMetrics()
        self.stats.subscribe(self.metrics.observe)
        self.listening = True
        self.sinks: Dict[str, Optional[str]] = {"file": None, "admin": None}
        self.source = StatusSource(
            self.stats, self.clock, "p@amp.keychest.net", "9.9", lambda: self.listening,
            lambda: self.sinks, connections=lambda: 3, poster=poster, headroom=headroom, host="box",
        )

    def emit(self, *events: Dict[str, Any]) -> None:
        for e in events:
            self.stats.emit(e)

    def client(self, address: str = "10.0.0.5", name: str = "CertbotACMEClient") -> Dict[str, Any]:
        for c in self.source.status()["clients"]:
            if c["address"] == address and c["product"] == name:
                return c
        raise AssertionError(f"no client {address} {name}")

    def scrape(self) -> Dict[str, Any]:
        """
        The registry's exposition, parsed by prometheus_client: name ->
        {labels tuple: value}.
        """
        self.metrics.refresh(self.source.status())
        samples: Dict[str, Any] = {}
        for family in text_string_to_metric_families(generate_latest(self.metrics.registry).decode()):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples


class ObserveTests(SynchronousTestCase):
    """
    Each event's outcome.
    """

    def test_outcomes(self) -> None:
        """
        ok, problem (problem document, validation error, invalid status,
        HTTP error) and error (proxy-error, with its stage).
        """
        self.assertEqual(observe(event("new-order", 201)).outcome, "ok")
        self.assertEqual(observe(event("new-order", 429, problem=problem("rateLimited"))).failure,
                         PROBLEM + "rateLimited")
        self.assertEqual(observe(event("auth", error={"type": PROBLEM + "dns", "detail": "x"})).outcome,
                         "problem")
        self.assertEqual(observe(event("order", status="invalid")).outcome, "problem")
        self.assertEqual(observe(event("directory", 503)).outcome, "problem")
        o = observe(event("proxy-error", 0, stage="client-tls", reason="unknown ca"))
        self.assertEqual((o.outcome, o.stage, o.failure), ("error", "client-tls", "proxy-error:client-tls"))

    def test_product(self) -> None:
        """
        A client is told apart by the first product token of its agent.
        """
        self.assertEqual(product(CERTBOT), "CertbotACMEClient")
        self.assertEqual(product("lego-cli/4.9 xenolf-acme/4.9 (release; linux; amd64)"), "lego-cli")
        self.assertEqual(product(""), "")


class StatsTests(SynchronousTestCase):
    """
    The bounded summary behind the page.
    """

    def test_sink(self) -> None:
        """
        AdminStats is an event sink whose emit always succeeds, even on an
        event it cannot read.
        """
        f = Fixture()
        verifyObject(IEventSink, f.stats)
        self.assertIsNone(self.successResultOf(f.stats.emit({"msg": "x", "params": None})))
        self.assertIsNone(self.successResultOf(f.stats.emit(event("directory"))))
        self.assertEqual(f.stats.total, 2)

    def test_clientTable(self) -> None:
        """
        One row per address and agent product, with the agents and accounts
        seen and the last exchange.
        """
        f = Fixture()
        f.emit(event("new-acct", 201, account="/acct/1"), event("new-order", 201, account="/acct/1"),
               event("directory", agent="lego-cli/4.9"), event("directory", client="10.0.0.6"))
        c = f.client()
        self.assertEqual(c["agents"], [CERTBOT])
        self.assertEqual(c["accounts"], [{"server": SERVER, "account": "/acct/1"}])
        self.assertEqual((c["last_msg"], c["last_outcome"], c["exchanges"]), ("new-order", "ok", 2))
        self.assertEqual(len(f.source.status()["clients"]), 3)

    def test_failingUntilWorkConcludes(self) -> None:
        """
        A failure marks the client failing from then on; polls and nonces do
        not clear it, a certificate does.
        """
        f = Fixture()
        f.emit(event("new-order", 201))
        self.assertFalse(f.client()["failing"])
        f.emit(event("auth", error={"type": PROBLEM + "unauthorized", "detail": "no"}))
        failingSince = f.clock.seconds()
        f.clock.advance(600)
        f.emit(event("new-nonce"), event("directory"), event("order", status="pending"))
        c = f.client()
        self.assertTrue(c["failing"])
        self.assertEqual(c["failing_since"], failingSince)
        self.assertEqual(c["failures"], 1)
        f.emit(event("cert", serial="0a", not_after="2024-01-01T00:00:00Z", names=["a.example"]))
        self.assertFalse(f.client()["failing"])

    def test_badNonceIsRoutine(self) -> None:
        """
        badNonce is counted as a problem type but marks nobody failing and
        is no failure in the hourly chart.
        """
        f = Fixture()
        f.emit(event("new-order", 400, problem=problem("badNonce")))
        self.assertFalse(f.client()["failing"])
        status = f.source.status()
        self.assertEqual(status["hours"][-1]["failures"], 0)
        self.assertEqual([p["short"] for p in status["problems"]], ["badNonce"])

    def test_failingFirst(self) -> None:
        """
        Failing clients come first, the longest failing first.
        """
        f = Fixture()
        f.emit(event("directory", client="10.0.0.1"))
        f.emit(event("proxy-error", 0, client="10.0.0.2", agent="", stage="client-tls", reason="r"))
        f.clock.advance(10)
        f.emit(event("new-order", 429, client="10.0.0.3", problem=problem("rateLimited")))
        f.clock.advance(10)
        f.emit(event("directory", client="10.0.0.4"))
        order = [c["address"] for c in f.source.status()["clients"]]
        self.assertEqual(order, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1"])

    def test_bounded(self) -> None:
        """
        Clients, agents, accounts, problem types and certificates are capped,
        the least recently seen forgotten; long strings are clipped.
        """
        self.patch(statsModule, "MAX_CLIENTS", 3)
        self.patch(statsModule, "MAX_PROBLEM_TYPES", 2)
        self.patch(statsModule, "MAX_CERTIFICATES", 2)
        f = Fixture()
        for i in range(5):
            f.emit(event("directory", client=f"10.0.0.{i}"))
            f.clock.advance(1)
        self.assertEqual([c["address"] for c in f.source.status()["clients"]],
                         ["10.0.0.4", "10.0.0.3", "10.0.0.2"])
        for i in range(10):
            f.emit(event("account", client="10.0.0.4", agent=f"CertbotACMEClient/{i}", account=f"/a/{i}"))
        c = f.client("10.0.0.4")
        self.assertEqual(len(c["agents"]), statsModule.MAX_AGENTS_PER_CLIENT)
        self.assertEqual(c["agents"][0], "CertbotACMEClient/9")
        self.assertEqual(len(c["accounts"]), statsModule.MAX_ACCOUNTS_PER_CLIENT)
        for kind in ("dns", "caa", "tls"):
            f.emit(event("chall", error={"type": PROBLEM + kind, "detail": "d" * 5000}))
        problems = f.source.status()["problems"]
        self.assertEqual([p["short"] for p in problems], ["tls", "caa"])
        self.assertLessEqual(len(problems[0]["last_detail"]), statsModule.MAX_TEXT)
        for name in ("a", "b", "c"):
            f.emit(event("cert", serial="01", not_after="2030-01-01T00:00:00Z", names=[name + ".example"]))
        self.assertEqual([c["names"] for c in f.source.status()["certificates"]],
                         [["b.example"], ["c.example"]])

    def test_hours(self) -> None:
        """
        24 hourly buckets, oldest first: orders created and failures; older
        hours drop out.
        """
        f = Fixture()
        f.emit(event("new-order", 201), event("new-order", 201), event("final", 403, problem=problem("unauthorized")))
        f.clock.advance(3 * 3600)
        f.emit(event("new-order", 201))
        hours = f.source.status()["hours"]
        self.assertEqual(len(hours), 24)
        self.assertEqual([(h["orders"], h["failures"]) for h in hours[-4:]], [(2, 1), (0, 0), (0, 0), (1, 0)])
        self.assertEqual(hours[-1]["start"], int((START + 3 * 3600) // 3600) * 3600)
        f.clock.advance(30 * 3600)
        f.emit(event("directory"))
        self.assertEqual(sum(h["orders"] for h in f.source.status()["hours"]), 0)
        self.assertLessEqual(len(f.stats._hours), 24)

    def test_certificates(self) -> None:
        """
        One row per server and identifier set, the newest certificate kept,
        soonest expiry first, with the days left.
        """
        f = Fixture()
        f.emit(event("cert", serial="02", not_after="2023-11-24T22:13:20Z", names=["b.example", "a.example"]),
               event("cert", serial="01", not_after="2023-11-20T22:13:20Z", names=["a.example", "b.example"]),
               event("cert", serial="03", not_after="2023-11-12T22:13:20Z", names=["old.example"]),
               event("cert", serial="", not_after="", names=[]))
        certs = f.source.status()["certificates"]
        self.assertEqual([(c["serial"], c["days_left"]) for c in certs], [("03", -2.0), ("02", 10.0)])
        self.assertEqual(certs[1]["names"], ["a.example", "b.example"])

    def test_ledgerEvents(self) -> None:
        """
        Events the ledger derives are notices, most recent first: no client
        made them, so no client row, no exchange, no failure.
        """
        f = Fixture()
        f.emit(event("rate-limit-warning", 0, client="", agent="", limit="new-orders-per-account",
                     key={"account": "/a/1"}, used=250, capacity=300),
               event("cert-expiring", 0, client="10.0.0.5", agent="", identifiers=["a.example"], days_left=9.5))
        status = f.source.status()
        self.assertEqual(status["clients"], [])
        self.assertEqual(sum(h["failures"] for h in status["hours"]), 0)
        self.assertEqual([n["msg"] for n in status["ledger_events"]], ["cert-expiring", "rate-limit-warning"])
        self.assertEqual(status["ledger_events"][1]["summary"],
                         'limit new-orders-per-account, key {"account": "/a/1"}, used 250 of 300')
        samples = f.scrape()
        self.assertEqual(samples["keychestamp_ledger_events_total"],
                         {(("msg", "cert-expiring"),): 1.0, (("msg", "rate-limit-warning"),): 1.0})
        self.assertNotIn("keychestamp_exchanges_total", samples)
        self.assertIn(b"Recent ledger notices", renderPage(status))

    def test_eventsPerMinute(self) -> None:
        """
        The rate is averaged over the last five minutes (the current one
        included, as far as it has gone).
        """
        f = Fixture()
        f.clock.advance(3600 + 60 - START % 60)
        for _ in range(10):
            f.emit(event("directory"))
            f.clock.advance(30)
        self.assertEqual(f.source.status()["events"]["per_minute"], 2.0)
        f.clock.advance(600)
        self.assertEqual(f.source.status()["events"]["per_minute"], 0.0)


class StatusTests(SynchronousTestCase):
    """
    The status document and /healthz's verdict.
    """

    def test_healthy(self) -> None:
        """
        Healthy while the proxy listens and no sink failed.
        """
        self.assertEqual(Fixture().source.healthz(), (True, []))

    def test_notListening(self) -> None:
        """
        A proxy that does not listen is unhealthy, with the reason.
        """
        f = Fixture()
        f.listening = False
        self.assertEqual(f.source.healthz(), (False, ["the proxy is not listening"]))

    def test_sinkFailing(self) -> None:
        """
        A sink whose last emit failed makes it unhealthy, naming the sink.
        """
        f = Fixture()
        f.sinks["file"] = "OSError: disk full"
        healthy, reasons = f.source.healthz()
        self.assertFalse(healthy)
        self.assertEqual(reasons, ["event sink file is failing: OSError: disk full"])
        self.assertFalse(f.source.status()["health"]["ok"])

    def test_poster(self) -> None:
        """
        The poster's queue and last delivery, without the collector URL's
        credentials or query.
        """

        class Poster:
            url = "https://user:secret@collector.example/event?token=t"
            lastDelivery, lastError, consecutiveFailures = START - 5, "HTTP 503", 2
            delivered, deadLettered, nextAttempt = 7, 1, None

            def backlog(self) -> int:
                return 42

        p = Fixture(poster=Poster()).source.status()["poster"]
        self.assertEqual(p["url"], "https://collector.example/event")
        self.assertEqual((p["backlog"], p["last_delivery"], p["consecutive_failures"]), (42, START - 5, 2))

    def test_headroomRows(self) -> None:
        """
        The ledger's rows are checked (malformed ones skipped), fullest
        first, and capped.
        """
        ledger = FakeLedger([
            {"server": "s", "limit": "orders", "key": "/a/1", "used": 1, "capacity": 10, "ratio": 0.1},
            {"server": "s", "limit": "certs", "key": "example.com", "used": 45, "capacity": 50},
            {"server": "s", "limit": "broken"},
            {"server": "s", "limit": "bad", "key": "k", "used": "many", "capacity": 1, "ratio": 1},
        ])
        verifyObject(IHeadroom, ledger)
        rows = headroomRows(ledger)
        self.assertEqual([(r["limit"], r["ratio"]) for r in rows], [("certs", 0.9), ("orders", 0.1)])
        self.patch(statsModule, "MAX_HEADROOM", 1)
        from keychestamp.admin import status as statusModule

        self.patch(statusModule, "MAX_HEADROOM", 1)
        self.assertEqual(len(headroomRows(ledger)), 1)

    def test_noLedger(self) -> None:
        """
        Without a ledger the document says so with null.
        """
        self.assertIsNone(Fixture().source.status()["ratelimits"])
