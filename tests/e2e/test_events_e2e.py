"""
The events are the product: real certbot and lego flows through a real
C{twistd -n keychestamp} process to Pebble, asserted on the audit file (and on
what a local collector received from the poster).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

from cryptography import x509
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.e2e import harness

Event = Dict[str, Any]


def serialOf(cert: x509.Certificate) -> str:
    """
    The serial as events show it: lowercase hex, whole bytes, no colons.
    """
    text = "%x" % (cert.serial_number,)
    return text if len(text) % 2 == 0 else "0" + text


def notAfterOf(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def msgs(events: Sequence[Event]) -> List[str]:
    return [e["msg"] for e in events]


class _ProxyCase(SynchronousTestCase):
    """
    Pebble, a collector, and the proxy (poster on, feeding the collector).
    """

    apiURL = True

    def setUp(self) -> None:
        self.hostName = harness.requireEnvironment()
        reason = harness.pluginUnavailable()
        if reason is not None:
            raise SkipTest("end-to-end proxy test: %s" % (reason,))
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.pebble = harness.Pebble(os.path.join(self.base, "pebble"), self.hostName)
        self.addCleanup(self.pebble.stop)
        self.pebble.start()
        self.collector = harness.Collector(os.path.join(self.base, "collector"))
        self.addCleanup(self.collector.stop)
        if self.apiURL:
            self.collector.start()
        self.proxy = harness.KeychestampProxy(
            os.path.join(self.base, "proxy"),
            upstreamCA=self.pebble.tlsCA,
            intercept=[self.pebble.hostPort],
            apiURL=self.collector.url if self.apiURL else None,
        )
        self.bundle = harness.writeBundle(os.path.join(self.base, "bundle.pem"), pemData=[self.proxy.rootPEM()])
        self.addCleanup(self.proxy.stop)
        self.proxy.start()

    def step(self, fn: Any) -> Any:
        try:
            return fn()
        except harness.HarnessError as e:
            self.fail("%s\n--- keychestamp log ---\n%s" % (e, self.proxy.log()[-8000:]))

    def audit(self) -> List[Event]:
        return harness.readAudit(self.proxy.auditPath)

    def since(self, mark: int) -> List[Event]:
        return [e for e in self.audit() if e["id"] > mark]

    def lastId(self) -> int:
        events = self.audit()
        return events[-1]["id"] if events else 0

    def assertEnvelope(self, events: Sequence[Event]) -> None:
        """
        Every event has the full envelope; ids grow by one; the server is Pebble.
        """
        self.assertTrue(events)
        keys = ["msg", "params", "time", "proxy", "server", "path", "code", "id", "host", "ip",
                "version", "backlog", "log_time"]
        for e in events:
            self.assertEqual(list(e), keys)
            self.assertRegex(e["proxy"], r"^[a-z0-9]{24}@amp\.keychest\.net$")
            self.assertRegex(e["time"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
            self.assertEqual(e["server"], self.pebble.hostPort)
            self.assertEqual(e["params"]["client"], "127.0.0.1")
        ids = [e["id"] for e in events]
        self.assertEqual(ids, list(range(ids[0], ids[0] + len(ids))))

    def assertCertEvent(self, events: Sequence[Event], certPath: str) -> None:
        """
        The last cert event describes the certificate the client saved.
        """
        saved = harness.leafCertificate(certPath)
        cert = [e for e in events if e["msg"] == "cert"][-1]
        self.assertEqual(cert["code"], 200)
        self.assertEqual(cert["params"]["serial"], serialOf(saved))
        self.assertEqual(cert["params"]["not_after"], notAfterOf(saved))

    def assertOrderFlow(self, events: Sequence[Event], names: Sequence[str]) -> None:
        """
        new-order for exactly these names, authorizations, a finalize, an order
        that ends valid, and the certificate, in protocol order.
        """
        kinds = msgs(events)
        for kind in ("new-order", "auth", "chall", "final", "cert"):
            self.assertIn(kind, kinds)
        self.assertLess(kinds.index("new-order"), kinds.index("chall"))
        self.assertLess(kinds.index("chall"), kinds.index("final"))
        self.assertLess(kinds.index("final"), len(kinds) - 1 - kinds[::-1].index("cert"))
        order = [e for e in events if e["msg"] == "new-order"][-1]
        self.assertEqual(order["code"], 201)
        self.assertEqual(sorted(d["value"] for d in order["params"]["domains"]), sorted(names))
        self.assertTrue(order["params"]["finalize"].startswith("/"))
        self.assertTrue(order["params"]["order"].startswith("/"))
        self.assertTrue(order["params"]["account"].startswith("/"))
        statuses = [e["params"].get("status") for e in events if e["msg"] in ("order", "final")]
        self.assertEqual(statuses[-1], "valid")
        self.assertIn("valid", [e["params"].get("status") for e in events if e["msg"] == "auth"])


class CertbotEventsTests(_ProxyCase):
    """
    certbot's whole life cycle, through HTTPS_PROXY=http:// and https://.
    """

    def test_certbotLifeCycle(self) -> None:
        """
        register, certonly for two names, renew, update_account and revoke each
        leave their events, and the collector got the same events.
        """
        certbot = harness.Certbot(os.path.join(self.base, "certbot"), self.pebble.directoryURL,
                                  self.bundle, proxy=self.proxy.url("http"))
        names = ["e2e-one.example", "e2e-two.example"]

        self.step(certbot.register)
        registered = self.audit()
        acct = [e for e in registered if e["msg"] == "new-acct"]
        self.assertEqual([e["code"] for e in acct], [201])
        self.assertEqual(acct[0]["params"]["contact"], ["mailto:e2e@example.com"])
        self.assertEqual(acct[0]["params"]["email"], "e2e@example.com")
        self.assertEqual(acct[0]["params"]["status"], "valid")
        account = acct[0]["params"]["account"]
        self.assertTrue(account.startswith("/my-account/"), account)
        self.assertIn("directory", msgs(registered))

        mark = self.lastId()
        self.step(lambda: certbot.certonly(names, "e2e"))
        issued = self.since(mark)
        self.assertOrderFlow(issued, names)
        self.assertCertEvent(issued, certbot.certPath("e2e"))
        for e in issued:
            if e["msg"] in ("new-order", "order", "final", "auth", "chall", "cert"):
                self.assertEqual(e["params"]["account"], account, e)
        firstSerial = harness.leafCertificate(certbot.certPath("e2e")).serial_number

        mark = self.lastId()
        self.step(lambda: certbot.renew("e2e"))
        renewed = self.since(mark)
        self.assertOrderFlow(renewed, names)
        self.assertCertEvent(renewed, certbot.certPath("e2e"))
        self.assertNotEqual(harness.leafCertificate(certbot.certPath("e2e")).serial_number, firstSerial)

        mark = self.lastId()
        self.step(lambda: certbot.updateAccount("new@example.com"))
        updated = self.since(mark)
        update = [e for e in updated if e["msg"] == "account"]
        self.assertTrue(update, msgs(updated))
        self.assertEqual(update[-1]["params"]["action"], "update")
        self.assertEqual(update[-1]["params"]["contact"], ["mailto:new@example.com"])
        self.assertEqual(update[-1]["params"]["account"], account)

        mark = self.lastId()
        self.step(lambda: certbot.revoke("e2e"))
        revoked = [e for e in self.since(mark) if e["msg"] == "revoke-cert"]
        self.assertEqual([e["code"] for e in revoked], [200])
        self.assertEqual(revoked[0]["params"]["account"], account)

        audit = self.audit()
        self.assertEnvelope(audit)
        # the poster delivered the same events, field for field but log_time/backlog
        collected = self.collector.waitFor(len(audit))
        byId = {e["id"]: e for e in collected}
        self.assertEqual(sorted(byId), [e["id"] for e in audit])
        strip = lambda e: {k: v for k, v in e.items() if k not in ("log_time", "backlog")}  # noqa: E731
        for e in audit:
            self.assertEqual(strip(byId[e["id"]]), strip(e))

    def test_certbotThroughHTTPSProxy(self) -> None:
        """
        HTTPS_PROXY=https:// (TLS to the proxy, TLS inside it) gives the same
        events.
        """
        certbot = harness.Certbot(os.path.join(self.base, "certbot"), self.pebble.directoryURL,
                                  self.bundle, proxy=self.proxy.url("https"))
        self.step(certbot.register)
        self.step(lambda: certbot.certonly(["e2e-tls.example"], "tls"))
        audit = self.audit()
        self.assertEnvelope(audit)
        self.assertEqual([e["code"] for e in audit if e["msg"] == "new-acct"], [201])
        self.assertOrderFlow(audit, ["e2e-tls.example"])
        self.assertCertEvent(audit, certbot.certPath("tls"))


class LegoEventsTests(_ProxyCase):
    """
    lego run, renew and revoke.
    """

    apiURL = False

    def test_legoLifeCycle(self) -> None:
        """
        lego's flows leave their events; the cert events match what lego saved.
        """
        lego = harness.Lego(os.path.join(self.base, "lego"), self.pebble.directoryURL,
                            self.bundle, proxy=self.proxy.url("http"))
        names = ["e2e-lego.example"]
        self.step(lambda: lego.obtain(names))
        first = self.audit()
        self.assertEqual([e["code"] for e in first if e["msg"] == "new-acct"], [201])
        self.assertOrderFlow(first, names)
        self.assertCertEvent(first, lego.certPath(names[0]))
        self.assertIn("acme", [e for e in first if e["msg"] == "new-order"][0]["params"]["agent"])

        mark = self.lastId()
        self.step(lambda: lego.renew(names))
        renewed = self.since(mark)
        self.assertOrderFlow(renewed, names)
        self.assertCertEvent(renewed, lego.certPath(names[0]))

        mark = self.lastId()
        self.step(lambda: lego.revoke(names))
        revoked = [e for e in self.since(mark) if e["msg"] == "revoke-cert"]
        self.assertEqual([e["code"] for e in revoked], [200])
        self.assertEnvelope(self.audit())


class RestartTests(_ProxyCase):
    """
    The proxy restarted in the middle of a flow.
    """

    apiURL = False

    def test_restartMidFlow(self) -> None:
        """
        certbot's auth hook stops the proxy after new-order; a new proxy
        process finishes the flow without having seen the directory: its
        events are still classified (fallback path) and ids continue.
        """
        certbot = harness.Certbot(os.path.join(self.base, "certbot"), self.pebble.directoryURL,
                                  self.bundle, proxy=self.proxy.url("http"))
        self.step(certbot.register)
        marker = os.path.join(self.base, "restarted")
        hook = (
            "kill -TERM %d; i=0; while [ ! -e %s ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
            % (self.proxy.process.pid, marker)
        )
        argv = ["certbot", "certonly", "--cert-name", "r", "-d", "e2e-restart.example",
                "--manual", "--preferred-challenges", "http",
                "--manual-auth-hook", hook, "--manual-cleanup-hook", "/bin/true",
                "-m", certbot.email, "--agree-tos", "--no-eff-email", "--key-type", "ecdsa",
                "--config-dir", certbot.configDir, "--work-dir", certbot.workDir,
                "--logs-dir", certbot.logsDir, "--server", self.pebble.directoryURL, "--non-interactive"]
        client = subprocess.Popen(argv, env=certbot.env, cwd=certbot.directory,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: client.poll() is None and client.kill())
        try:
            self.proxy.process.wait(60)
        except subprocess.TimeoutExpired:
            self.fail("the auth hook never stopped the proxy")
        before = self.audit()
        self.assertIn("new-order", msgs(before))
        self.proxy.start()
        with open(marker, "w"):
            pass
        output, _ = client.communicate(timeout=120)
        self.assertEqual(client.returncode, 0, output.decode("utf-8", "replace")[-4000:])
        after = self.since(before[-1]["id"])
        self.assertEqual(after[0]["id"], before[-1]["id"] + 1)
        self.assertNotIn("directory", msgs(after))
        for kind in ("chall", "auth", "final", "cert"):
            self.assertIn(kind, msgs(after))
        self.assertCertEvent(after, certbot.certPath("r"))
        self.assertEnvelope(before + after)


class PosterKillTests(_ProxyCase):
    """
    The poster's spool survives SIGKILL.
    """

    apiURL = True

    def test_killedWithQueuedEvents(self) -> None:
        """
        1,000 events queued while the collector is down survive a SIGKILL of
        the proxy and are all delivered, in order, after the restart.
        """
        self.collector.stop()
        script = (
            "import http.client, ssl, sys\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
            "c = http.client.HTTPSConnection('127.0.0.1', int(sys.argv[2]), context=ctx, timeout=30)\n"
            "c.set_tunnel(sys.argv[3], int(sys.argv[4]))\n"
            "for i in range(1000):\n"
            "    c.request('GET', '/dir', headers={'User-Agent': 'kill-test'})\n"
            "    r = c.getresponse(); r.read(); assert r.status == 200, r.status\n"
        )
        subprocess.run(
            [sys.executable, "-c", script, self.bundle, str(self.proxy.port), self.hostName,
             str(self.pebble.port)],
            check=True, timeout=120, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        deadline = time.monotonic() + 30
        while len(self.audit()) < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        audit = self.audit()
        self.assertEqual(len(audit), 1000)
        self.assertTrue(audit[-1]["backlog"] >= 990, audit[-1]["backlog"])
        self.proxy.kill()
        self.collector.start()
        self.proxy.start()
        collected = self.collector.waitFor(1000, timeout=120)
        ids = []
        for e in collected:
            if e["id"] not in ids:
                ids.append(e["id"])
        self.assertEqual(ids, [e["id"] for e in audit])
