"""
Tests for what the admin listener renders, without sockets: the metrics
(parsed with prometheus_client's own parser, labels bounded, a registry of
their own) and the HTML page (self-contained, hostile values escaped).
"""

from __future__ import annotations

import re

from prometheus_client import REGISTRY
from twisted.trial.unittest import SynchronousTestCase

from keychestamp.admin import metrics as metricsModule
from keychestamp.admin.metrics import identifiersLabel, problemLabel
from keychestamp.admin.page import renderPage
from tests.test_admin import HOSTILE, PROBLEM, SERVER, START, FakeLedger, Fixture, event, problem, tagsOf


class MetricsTests(SynchronousTestCase):
    """
    /metrics' content, parsed with prometheus_client's own parser.
    """

    def test_counters(self) -> None:
        """
        Exchanges by msg, server and outcome; problems by type; proxy errors
        by stage.
        """
        f = Fixture()
        f.emit(event("new-order", 201), event("new-order", 201),
               event("new-order", 429, problem=problem("rateLimited")),
               event("chall", error={"type": PROBLEM + "dns", "detail": "NXDOMAIN"}),
               event("proxy-error", 0, server="", stage="upstream-connect", reason="refused"))
        s = f.scrape()
        exchanges = s["keychestamp_exchanges_total"]
        self.assertEqual(exchanges[(("msg", "new-order"), ("outcome", "ok"), ("server", SERVER))], 2.0)
        self.assertEqual(exchanges[(("msg", "new-order"), ("outcome", "problem"), ("server", SERVER))], 1.0)
        self.assertEqual(exchanges[(("msg", "proxy-error"), ("outcome", "error"), ("server", "none"))], 1.0)
        self.assertEqual(s["keychestamp_problems_total"],
                         {(("server", SERVER), ("type", "rateLimited")): 1.0,
                          (("server", SERVER), ("type", "dns")): 1.0})
        self.assertEqual(s["keychestamp_proxy_errors_total"],
                         {(("server", "none"), ("stage", "upstream-connect")): 1.0})

    def test_gauges(self) -> None:
        """
        Poster backlog, open connections, certificate expiry per identifier
        set, failing clients and rate-limit usage per limit and key.
        """

        class Poster:
            url, lastDelivery, lastError, consecutiveFailures = "http://c/e", None, None, 0

            def backlog(self) -> int:
                return 5

        ledger = FakeLedger([{"server": "s", "limit": "orders", "key": "/a/1", "used": 9, "capacity": 10,
                              "ratio": 0.9}])
        f = Fixture(headroom=ledger, poster=Poster())
        f.emit(event("cert", serial="01", not_after="2024-01-01T00:00:00Z", names=["b.example", "a.example"]),
               event("new-order", 429, client="10.0.0.9", problem=problem("rateLimited")))
        s = f.scrape()
        self.assertEqual(s["keychestamp_poster_backlog"], {(): 5.0})
        self.assertEqual(s["keychestamp_client_connections"], {(): 3.0})
        self.assertEqual(s["keychestamp_certificate_not_after_timestamp_seconds"],
                         {(("identifiers", "a.example,b.example"), ("server", SERVER)): 1704067200.0})
        self.assertEqual(s["keychestamp_client_failing_since_timestamp_seconds"],
                         {(("agent", "CertbotACMEClient"), ("client", "10.0.0.9")): START})
        self.assertEqual(s["keychestamp_ratelimit_usage_ratio"],
                         {(("key", "/a/1"), ("limit", "orders"), ("server", "s")): 0.9})
        self.assertEqual(s["keychestamp_event_sink_failing"][(("sink", "file"),)], 0.0)

    def test_labelsBounded(self) -> None:
        """
        Unknown msgs, stages and problem types become "other", and servers
        beyond the cap share "other": a busy proxy's series stay bounded.
        """
        self.patch(metricsModule, "MAX_SERVERS", 2)
        f = Fixture()
        for i in range(50):
            server = f"ca{i}.example"
            f.emit(event("new-order", 400, server=server, problem={"type": f"urn:x:{i}"}),
                   event(f"made-up-{i}", server=server),
                   event("proxy-error", 0, server=server, stage=f"stage-{i}", reason="r"))
        s = f.scrape()
        servers = {dict(k)["server"] for k in s["keychestamp_exchanges_total"]}
        self.assertEqual(servers, {"ca0.example", "ca1.example", "other"})
        self.assertEqual({dict(k)["msg"] for k in s["keychestamp_exchanges_total"]},
                         {"new-order", "other", "proxy-error"})
        self.assertEqual({dict(k)["type"] for k in s["keychestamp_problems_total"]}, {"other"})
        self.assertEqual({dict(k)["stage"] for k in s["keychestamp_proxy_errors_total"]}, {"other"})
        self.assertLessEqual(len(s["keychestamp_exchanges_total"]), 9)

    def test_labelHelpers(self) -> None:
        """
        Problem types map to RFC names; long identifier sets are cut but
        stay distinct.
        """
        self.assertEqual(problemLabel(PROBLEM + "caa"), "caa")
        self.assertEqual(problemLabel("about:blank"), "other")
        self.assertEqual(problemLabel(""), "none")
        many = [f"host{i}.example.com" for i in range(40)]
        a, b = identifiersLabel(many), identifiersLabel(many + ["x.example"])
        self.assertLessEqual(len(a), metricsModule.MAX_IDENTIFIERS_LABEL)
        self.assertNotEqual(a, b)

    def test_ownRegistry(self) -> None:
        """
        Two AdminMetrics in one process do not collide, count apart, and
        leave the global registry alone.
        """
        one, two = Fixture(), Fixture()
        one.emit(event("directory"))
        self.assertEqual(len(one.scrape()["keychestamp_exchanges_total"]), 1)
        self.assertNotIn("keychestamp_exchanges_total", two.scrape())
        self.assertIsNone(REGISTRY.get_sample_value("keychestamp_exchanges_total",
                                                    {"msg": "directory", "server": SERVER, "outcome": "ok"}))


class PageTests(SynchronousTestCase):
    """
    The HTML page.
    """

    def page(self, f: Fixture) -> bytes:
        return renderPage(f.source.status())

    def test_sections(self) -> None:
        """
        The page refreshes itself, shows the facts, the clients with the
        failing one marked, the charts, problems, certificates, headroom
        bars and the poster.
        """
        ledger = FakeLedger([{"server": "s", "limit": "orders", "key": "/a/1", "used": 9, "capacity": 10,
                              "ratio": 0.9}])
        f = Fixture(headroom=ledger)
        f.emit(event("new-order", 201),
               event("new-order", 429, client="10.0.0.9", problem=problem("rateLimited", "too many")),
               event("cert", serial="01", not_after="2024-01-01T00:00:00Z", names=["a.example"]))
        page = self.page(f)
        tags = tagsOf(page)
        self.assertIn(("meta", {"http-equiv": "refresh", "content": "30"}), tags)
        ids = {a.get("id") for _, a in tags}
        for section in ("clients", "activity", "problems", "certificates", "ratelimits", "poster",
                        "chart-hours", "chart-expiry", "proxy-id", "uptime", "events-per-minute"):
            self.assertIn(section, ids)
        rows = [a for t, a in tags if t == "tr" and "data-client" in a]
        self.assertEqual([(r["data-client"], r["class"]) for r in rows], [("10.0.0.9", "failing"), ("10.0.0.5", "ok")])
        self.assertIn(b"FAILING", page)
        self.assertEqual(len([a for t, a in tags if t == "rect" and a.get("class") == "bar-headroom"]), 1)
        self.assertEqual(sum(int(a["data-value"]) for t, a in tags if a.get("class") == "bar-orders"), 1)
        self.assertIn(b"rateLimited", page)
        self.assertIn(b"Events are not posted", page)

    def test_selfContained(self) -> None:
        """
        No script and nothing loaded from elsewhere: the only links are the
        relative ones to the other resources.
        """
        f = Fixture()
        f.emit(event("directory"))
        tags = tagsOf(self.page(f))
        self.assertNotIn("script", [t for t, _ in tags])
        self.assertEqual([a for _, a in tags if "src" in a], [])
        self.assertEqual([a["href"] for t, a in tags if t == "a"], ["status.json", "metrics", "healthz"])

    def test_hostileValuesEscaped(self) -> None:
        """
        Markup in a user agent, a problem detail, an identifier, an account
        or a server name is shown as text, never parsed as markup.
        """
        ledger = FakeLedger([{"server": "<b>s</b>", "limit": "<i>l</i>", "key": "<script>k</script>",
                              "used": 1, "capacity": 2}])
        f = Fixture(headroom=ledger)
        f.emit(event("new-order", 400, agent=HOSTILE, server='x"><script>alert(3)</script>',
                     account="/a/<script>", problem=problem("malformed", "<img src=y onerror=alert(4)>")),
               event("cert", agent=HOSTILE, serial="<s>", not_after="2030-01-01T00:00:00Z",
                     names=["<script>alert(5)</script>.example"], issuer="CN=<svg onload=alert(6)>"),
               event("proxy-error", 0, agent=HOSTILE, client="<b>", stage="<x>", reason="<script>r</script>"))
        page = self.page(f)
        tags = tagsOf(page)
        self.assertEqual([t for t, _ in tags if t in ("script", "img", "b", "i", "s", "x")], [])
        self.assertEqual([t for t, a in tags if any(k.startswith("on") for k in a)], [])
        self.assertEqual(len([t for t, _ in tags if t == "svg"]), 3)
        self.assertIn(b"Evil/6.6 &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertIn(b"&lt;img src=y onerror=alert(4)&gt;", page)
        self.assertNotIn(b"<script", page)
        self.assertIsNone(re.search(rb"<img", page))

    def test_empty(self) -> None:
        """
        A proxy that saw nothing yet still renders, saying so.
        """
        page = self.page(Fixture())
        self.assertIn(b"No ACME client seen since start.", page)
        self.assertIn(b"No rate-limit ledger in this proxy.", page)
