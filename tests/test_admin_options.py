"""
--admin at parse time: a server endpoint, never the proxy's port, and no
address other machines can reach unless --allow names who may.
"""

from __future__ import annotations

from tests.test_options import OptionsCase


class AdminOptionTests(OptionsCase):
    """
    Accepted and refused --admin values.
    """

    def test_offByDefault(self) -> None:
        """
        Without --admin there is no admin listener.
        """
        self.assertIsNone(self.parse()["admin"])

    def test_loopback(self) -> None:
        """
        Loopback addresses (IPv4, IPv6, localhost) need no --allow.
        """
        for value in ("tcp:8444:interface=127.0.0.1", r"tcp6:8444:interface=\:\:1",
                      "tcp:8444:interface=localhost", "unix:/run/keychestamp-admin.sock"):
            self.assertEqual(self.parse("--admin", value)["admin"], value)

    def test_allInterfacesRefused(self) -> None:
        """
        tcp:PORT listens on every interface: refused without --allow.
        """
        line = self.assertOneLineError("--admin", "tcp:8444", mentions="--admin")
        self.assertIn("all interfaces", line)
        self.assertOneLineError("--admin", "tcp6:8444", mentions="all interfaces")
        self.assertOneLineError("--admin", "tcp:8444:interface=0.0.0.0", mentions="all interfaces")

    def test_allInterfacesWithAllow(self) -> None:
        """
        An explicit --allow makes every interface acceptable: the ACL
        applies to the admin listener too.
        """
        options = self.parse("--allow", "192.168.1.0/24", "--admin", "tcp:8444")
        self.assertEqual(options["admin"], "tcp:8444")

    def test_nonLoopbackCovered(self) -> None:
        """
        A private address is accepted when an explicit --allow covers it.
        """
        options = self.parse("--allow", "10.0.0.0/8", "--admin", "tcp:8444:interface=10.1.2.3")
        self.assertEqual(options["admin"], "tcp:8444:interface=10.1.2.3")

    def test_nonLoopbackUncovered(self) -> None:
        """
        A non-loopback address is refused under the default ACL, and under
        an explicit --allow that does not cover it.
        """
        self.assertOneLineError("--admin", "tcp:8444:interface=10.1.2.3", mentions="10.1.2.3")
        line = self.assertOneLineError("--allow", "192.168.0.0/16", "--admin", "tcp:8444:interface=10.1.2.3",
                                       mentions="no --allow network covers it")
        self.assertIn("--allow 10.1.2.3/32", line)

    def test_notAnEndpoint(self) -> None:
        """
        Unknown endpoint types and bad ports are one-line errors.
        """
        self.assertOneLineError("--admin", "carrier-pigeon:8444", mentions="not a server endpoint")
        self.assertOneLineError("--admin", "tcp:port", mentions="not a server endpoint")

    def test_proxyPortRefused(self) -> None:
        """
        The admin listener never shares the proxy's port.
        """
        self.assertOneLineError("--admin", "tcp:8443:interface=127.0.0.1", mentions="proxy's own port")
        self.assertOneLineError("-p", "9000", "--admin", "tcp:9000:interface=127.0.0.1", mentions="9000")
