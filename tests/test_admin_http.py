"""
The admin listener over real HTTP on loopback: a proxy built by
makeService with --admin, its resources, /healthz's verdicts, the --allow
ACL, and two proxies with their own metrics in one process.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any, Dict, List, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from keychestamp.service import makeService
from tests.support import ProxyFixture, parseOptions
from tests.test_proxy import curl, raw

ADMIN = ["--admin", "tcp:0:interface=127.0.0.1"]
HOSTILE = "Evil/1.0 <script>alert(1)</script>"


@inlineCallbacks
def fetch(port: int, path: str, method: bytes = b"GET"):  # type: ignore[no-untyped-def]
    """
    (status, headers, body) of one request to 127.0.0.1:port, on a
    connection closed after it.
    """
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    d = agent.request(method, f"http://127.0.0.1:{port}{path}".encode("ascii"), Headers({}))
    d.addTimeout(20, reactor)
    response = yield d
    body = yield readBody(response).addTimeout(20, reactor)
    return response.code, response.headers, body


def metricSamples(text: bytes) -> Dict[str, Dict[Tuple[Tuple[str, str], ...], float]]:
    """
    Parse an exposition with prometheus_client's own parser.
    """
    samples: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


class AdminHTTPTests(TestCase):
    """
    One proxy with --admin on an ephemeral loopback port.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.fx = yield ProxyFixture(self, ADMIN).start()
        self.admin = self.fx.service.admin
        self.port = self.admin.port.getHost().port

    def log(self, msg: str, code: int = 200, agent: str = "CertbotACMEClient/2.1", **params: Any) -> Deferred:
        """
        Log one event through the proxy's EventLog (to every sink).
        """
        p: Dict[str, Any] = {"epoch": int(time.time()), "client": "127.0.0.1", "agent": agent}
        p.update(params)
        return self.fx.service.events.log(msg, p, "acme.test:14000", "/x", code, time.time())

    @inlineCallbacks
    def test_page(self):  # type: ignore[no-untyped-def]
        """
        / is the HTML page, with the proxy's id, the clients seen, hostile
        values escaped, and headers that forbid scripts and framing.
        """
        yield self.log("new-order", 201, account="/acct/1")
        yield self.log("new-order", 429, agent=HOSTILE,
                       problem={"type": "urn:ietf:params:acme:error:rateLimited", "detail": "<b>slow</b>"})
        code, headers, body = yield fetch(self.port, "/")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"default-src 'none'", headers.getRawHeaders(b"content-security-policy")[0])
        self.assertIn(self.fx.options["proxy-id"].encode(), body)
        self.assertIn(b"Evil/1.0 &lt;script&gt;alert(1)&lt;/script&gt;", body)
        self.assertIn(b"&lt;b&gt;slow&lt;/b&gt;", body)
        self.assertNotIn(b"<script", body)
        self.assertIn(b"FAILING", body)

    @inlineCallbacks
    def test_statusJSON(self):  # type: ignore[no-untyped-def]
        """
        /status.json has the page's data: health, clients, hours, problems.
        """
        yield self.log("new-order", 201)
        code, headers, body = yield fetch(self.port, "/status.json")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"])
        status = json.loads(body)
        self.assertEqual(status["proxy"], self.fx.options["proxy-id"])
        self.assertTrue(status["health"]["ok"])
        self.assertEqual(set(status["health"]["sinks"]) & {"admin", "file"}, {"admin", "file"})
        self.assertEqual(set(status["health"]["sinks"].values()), {None})
        self.assertEqual([(c["address"], c["product"]) for c in status["clients"]],
                         [("127.0.0.1", "CertbotACMEClient")])
        self.assertEqual(status["hours"][-1]["orders"], 1)
        self.assertIsNone(status["poster"])

    @inlineCallbacks
    def test_metrics(self):  # type: ignore[no-untyped-def]
        """
        /metrics is Prometheus text that prometheus_client parses, with the
        exchanges counted and the open connections gauge.
        """
        yield self.log("new-order", 201)
        yield self.log("proxy-error", 0, stage="client-tls", reason="unknown ca")
        code, headers, body = yield fetch(self.port, "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        samples = metricSamples(body)
        exchanges = samples["keychestamp_exchanges_total"]
        self.assertEqual(exchanges[(("msg", "new-order"), ("outcome", "ok"), ("server", "acme.test:14000"))], 1)
        self.assertEqual(samples["keychestamp_proxy_errors_total"],
                         {(("server", "acme.test:14000"), ("stage", "client-tls")): 1.0})
        self.assertIn((), samples["keychestamp_client_connections"])
        self.assertEqual(samples["keychestamp_clients"][(("state", "failing"),)], 1.0)

    @inlineCallbacks
    def test_healthz(self):  # type: ignore[no-untyped-def]
        """
        /healthz is 200 while the proxy listens, 503 with the reason once
        its port is closed.
        """
        code, _, body = yield fetch(self.port, "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        yield self.fx.service.listeningPort.stopListening()
        code, _, body = yield fetch(self.port, "/healthz")
        self.assertEqual((code, body), (503, b"the proxy is not listening\n"))

    @inlineCallbacks
    def test_healthzSinkFailing(self):  # type: ignore[no-untyped-def]
        """
        A sink that fails an event makes /healthz 503, naming it.
        """
        sink = self.fx.service.events.sinks[0]
        self.patch(sink, "emit", lambda event: _fail(OSError(28, "No space left on device")))
        yield self.log("directory")
        code, _, body = yield fetch(self.port, "/healthz")
        self.assertEqual(code, 503)
        self.assertIn(b"event sink file is failing: OSError", body)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @inlineCallbacks
    def test_notFoundAndMethods(self):  # type: ignore[no-untyped-def]
        """
        Unknown paths are 404, paths under a resource too; only GET and
        HEAD are served.
        """
        for path in ("/nope", "/status.json/x", "/metrics/x"):
            code, _, _ = yield fetch(self.port, path)
            self.assertEqual(code, 404, path)
        code, _, _ = yield fetch(self.port, "/", b"POST")
        self.assertEqual(code, 405)
        code, _, body = yield fetch(self.port, "/healthz", b"HEAD")
        self.assertEqual((code, body), (200, b""))

    @inlineCallbacks
    def test_notOnProxyPort(self):  # type: ignore[no-untyped-def]
        """
        The proxy's own port does not serve the admin resources.
        """
        self.assertNotEqual(self.port, self.fx.proxyPort)
        answer = yield raw(self.fx.proxyPort, b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertNotIn(b"200", answer.split(b"\r\n", 1)[0])
        self.assertNotIn(self.fx.options["proxy-id"].encode(), answer)

    @inlineCallbacks
    def test_relayedExchange(self):  # type: ignore[no-untyped-def]
        """
        An exchange curl makes through the proxy shows up with curl's agent.
        """
        if not shutil.which("curl"):
            raise SkipTest("curl is not installed")
        out, err, code = yield curl(
            "-x", f"http://127.0.0.1:{self.fx.proxyPort}", "--cacert", self.fx.rootFile,
            f"https://localhost:{self.fx.port}/directory",
        )
        self.assertEqual(code, 0, err)
        _, _, body = yield fetch(self.port, "/status.json")
        clients = json.loads(body)["clients"]
        self.assertEqual([(c["address"], c["product"], c["last_msg"]) for c in clients],
                         [("127.0.0.1", "curl", "directory")])


def _fail(error: Exception) -> Deferred:
    from twisted.internet.defer import fail

    return fail(error)


class AdminACLTests(TestCase):
    """
    The admin listener answers only clients inside --allow.
    """

    timeout = 60

    @inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        """
        A loopback client outside an explicit --allow gets 403 and no data.
        """
        fx = yield ProxyFixture(self, ["--allow", "10.0.0.0/8", *ADMIN]).start()
        port = fx.service.admin.port.getHost().port
        code, _, body = yield fetch(port, "/status.json")
        self.assertEqual(code, 403)
        self.assertNotIn(fx.options["proxy-id"].encode(), body)
        answer = yield raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)

    @inlineCallbacks
    def test_allowed(self):  # type: ignore[no-untyped-def]
        """
        An explicit --allow covering loopback admits it.
        """
        fx = yield ProxyFixture(self, ["--allow", "127.0.0.0/8", *ADMIN]).start()
        code, _, _ = yield fetch(fx.service.admin.port.getHost().port, "/healthz")
        self.assertEqual(code, 200)


class TwoProxiesTests(TestCase):
    """
    Two proxies in one process, each with its own admin listener.
    """

    timeout = 60

    @inlineCallbacks
    def test_ownMetrics(self):  # type: ignore[no-untyped-def]
        """
        Their metrics do not collide: each counts its own events.
        """
        one = yield ProxyFixture(self, ADMIN).start()
        two = yield ProxyFixture(self, ADMIN).start()
        yield one.service.events.log("directory", {"client": "127.0.0.1", "agent": "a"}, "s", "/", 200, time.time())
        texts: List[bytes] = []
        for fx in (one, two):
            _, _, body = yield fetch(fx.service.admin.port.getHost().port, "/metrics")
            texts.append(body)
        self.assertEqual(len(metricSamples(texts[0])["keychestamp_exchanges_total"]), 1)
        self.assertNotIn("keychestamp_exchanges_total", metricSamples(texts[1]))
        self.assertNotEqual(one.service.admin.metrics.registry, two.service.admin.metrics.registry)


class AdminStartTests(TestCase):
    """
    A busy admin port stops the start, loudly.
    """

    timeout = 60

    @inlineCallbacks
    def test_portInUse(self):  # type: ignore[no-untyped-def]
        """
        startService raises CannotListenError when the admin port is taken.
        """
        fx = yield ProxyFixture(self).start()
        options = parseOptions(["-e", fx.tmp + "/etc2", "-n", "-f", fx.tmp + "/audit2.json", "-p", "1",
                                "--admin", f"tcp:{fx.port}:interface=127.0.0.1"])
        from twisted.internet.endpoints import TCP4ServerEndpoint

        service = makeService(options, reactor, endpoint=TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        self.assertRaises(CannotListenError, service.startService)
        yield service.stopService()
        self.assertIsNone(service.admin.port)
