"""
Real ACME clients through a real C{twistd -n keychestamp} process to Pebble.

The clients trust only the proxy's root: if the proxy tunnelled Pebble's
traffic instead of intercepting it, their TLS check would fail, so a
passing client proves the interception, not just the tunnel.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.e2e import harness

T = TypeVar("T")


class ThroughProxyTests(SynchronousTestCase):
    """
    certbot and lego through keychestamp, with Pebble as the ACME server.
    """

    def setUp(self) -> None:
        hostName = harness.requireEnvironment()
        reason = harness.pluginUnavailable()
        if reason is not None:
            raise SkipTest("end-to-end proxy test: %s" % (reason,))
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

        self.pebble = harness.Pebble(os.path.join(self.base, "pebble"), hostName)
        self.addCleanup(self.pebble.stop)
        self.pebble.start()

        self.proxy = harness.KeychestampProxy(
            os.path.join(self.base, "proxy"),
            upstreamCA=self.pebble.tlsCA,
            intercept=[self.pebble.hostPort],
        )
        # --ca first: it creates the CA the started proxy then reuses.
        root = self.proxy.rootPEM()
        self.bundle = harness.writeBundle(
            os.path.join(self.base, "bundle.pem"), pemData=[root]
        )
        self.addCleanup(self.proxy.stop)
        self.proxy.start()

    def _withProxyLog(self, step: Callable[[], T]) -> T:
        """
        Run a client step; on failure, show the proxy's log with the client's.
        """
        try:
            return step()
        except harness.HarnessError as e:
            self.fail("%s\n--- keychestamp log ---\n%s" % (e, self.proxy.log()[-8000:]))

    def test_clients(self) -> None:
        """
        certbot (plain-HTTP proxy URL) and lego both obtain certificates
        through the proxy, and the proxy writes its audit file.
        """
        certbot = harness.Certbot(
            os.path.join(self.base, "certbot"), self.pebble.directoryURL,
            self.bundle, proxy=self.proxy.url("http"),
        )
        self._withProxyLog(certbot.register)
        self._withProxyLog(
            lambda: certbot.certonly(["e2e-one.example", "e2e-two.example"], "e2e")
        )
        self.assertTrue(os.path.exists(certbot.certPath("e2e")))

        lego = harness.Lego(
            os.path.join(self.base, "lego"), self.pebble.directoryURL,
            self.bundle, proxy=self.proxy.url("http"),
        )
        self._withProxyLog(lambda: lego.obtain(["e2e-lego.example"]))
        self.assertTrue(os.path.exists(lego.certPath("e2e-lego.example")))

        self.assertTrue(
            os.path.exists(self.proxy.auditPath),
            "no audit file; keychestamp log:\n" + self.proxy.log()[-8000:],
        )
