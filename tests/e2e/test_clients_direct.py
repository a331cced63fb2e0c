"""
Real ACME clients straight to Pebble, with no proxy: proves the harness.

If this fails, the through-proxy tests cannot tell a proxy bug from a
harness or client setup problem.
"""

from __future__ import annotations

import os
from typing import List

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import harness


def _names(cert: x509.Certificate) -> List[str]:
    """
    The DNS names of a certificate's SAN, in order.
    """
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.DNSName)


class DirectClientsTests(SynchronousTestCase):
    """
    certbot and lego against Pebble without keychestamp in between.
    """

    def setUp(self) -> None:
        hostName = harness.requireEnvironment()
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.pebble = harness.Pebble(os.path.join(self.base, "pebble"), hostName)
        self.addCleanup(self.pebble.stop)
        self.pebble.start()
        # Only Pebble's HTTPS CA: the clients must not need the system roots.
        self.bundle = harness.writeBundle(
            os.path.join(self.base, "bundle.pem"), [self.pebble.tlsCA]
        )

    def test_certbot(self) -> None:
        """
        certbot registers, obtains one certificate for two names, renews it
        (a new serial), updates the account and revokes the certificate.
        """
        certbot = harness.Certbot(
            os.path.join(self.base, "certbot"), self.pebble.directoryURL, self.bundle
        )
        certbot.register()
        certbot.certonly(["e2e-one.example", "e2e-two.example"], "e2e")
        first = harness.leafCertificate(certbot.certPath("e2e"))
        self.assertEqual(
            sorted(_names(first)), ["e2e-one.example", "e2e-two.example"]
        )
        certbot.renew("e2e")
        renewed = harness.leafCertificate(certbot.certPath("e2e"))
        self.assertNotEqual(renewed.serial_number, first.serial_number)
        certbot.updateAccount("e2e-updated@example.com")
        result = certbot.revoke("e2e")
        self.assertIn("successfully revoked", result.stdout)

    def test_lego(self) -> None:
        """
        lego registers and obtains a certificate for one name, renews it
        (a new serial) and revokes it.
        """
        lego = harness.Lego(
            os.path.join(self.base, "lego"), self.pebble.directoryURL, self.bundle
        )
        lego.obtain(["e2e-lego.example"])
        first = harness.leafCertificate(lego.certPath("e2e-lego.example"))
        self.assertEqual(_names(first), ["e2e-lego.example"])
        lego.renew(["e2e-lego.example"])
        renewed = harness.leafCertificate(lego.certPath("e2e-lego.example"))
        self.assertNotEqual(renewed.serial_number, first.serial_number)
        result = lego.revoke(["e2e-lego.example"])
        self.assertIn("Certificate was revoked", result.stderr)
