"""
Tests for keychestamp.ledger.limits (the limit table and --limits) and
keychestamp.ledger.domains (registered domains, identifier sets).
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from keychestamp.ledger.buckets import Limit
from keychestamp.ledger.domains import Domains, identifierSet, normalise, setFromKey, setKey
from keychestamp.ledger.limits import (
    LETS_ENCRYPT,
    LIMIT_NAMES,
    LimitsError,
    LimitTable,
    loadLimits,
    parseLimits,
    serverOf,
)

LE = "acme-v02.api.letsencrypt.org"
STAGING = "acme-staging-v02.api.letsencrypt.org"


class LimitTableTests(SynchronousTestCase):
    """
    Built-in values for Let's Encrypt, nothing for other servers unless the
    file names them.
    """

    def test_letsEncryptBuiltIn(self) -> None:
        """
        Production and staging get 300/3h, 50/7d, 5/7d, 5/1h and 10/3h.
        """
        table = LimitTable()
        for server in (LE, STAGING):
            url, limits = table.lookup(server)
            self.assertEqual(url, f"https://{server}/directory")
            self.assertEqual(
                {n: (l.capacity, l.period) for n, l in limits.items()},
                {
                    "new-orders-per-account": (300, 10800),
                    "certs-per-registered-domain": (50, 604800),
                    "certs-per-exact-set": (5, 604800),
                    "failed-authz-per-identifier-per-account": (5, 3600),
                    "new-accounts-per-ip": (10, 10800),
                },
            )
        self.assertEqual(set(LETS_ENCRYPT), set(LIMIT_NAMES))

    def test_otherServersNone(self) -> None:
        """
        Any other server has no limits by default.
        """
        self.assertEqual(LimitTable().lookup("acme.zerossl.com"), (None, {}))

    def test_fileNamesServer(self) -> None:
        """
        A file entry by directory URL applies to that host:port; the default
        port is dropped as events drop it.
        """
        table = LimitTable(parseLimits({
            "https://pebble:14000/dir": {"certs-per-exact-set": {"capacity": 3, "period_s": 60}},
            "https://ca.example:443/acme/directory": {"new-orders-per-account": {"capacity": 2, "period_s": 10}},
        }))
        url, limits = table.lookup("pebble:14000", "/dir")
        self.assertEqual(url, "https://pebble:14000/dir")
        self.assertEqual(limits, {"certs-per-exact-set": Limit("certs-per-exact-set", 3, 60.0)})
        self.assertEqual(list(table.lookup("ca.example")[1]), ["new-orders-per-account"])
        self.assertEqual(table.lookup("pebble:14001"), (None, {}))

    def test_star(self) -> None:
        """
        ``*`` applies to every server not named, not to Let's Encrypt.
        """
        table = LimitTable(parseLimits({"*": {"new-accounts-per-ip": {"capacity": 1, "period_s": 5}}}))
        self.assertEqual(list(table.lookup("step-ca.internal:9000")[1]), ["new-accounts-per-ip"])
        self.assertEqual(table.lookup(LE)[1]["new-accounts-per-ip"].capacity, 10)

    def test_mergeOverBuiltIn(self) -> None:
        """
        A file entry for Let's Encrypt changes the limits it names, keeps the
        others, and null switches one off.
        """
        table = LimitTable(parseLimits({
            f"https://{LE}/directory": {
                "certs-per-exact-set": {"capacity": 7, "period_s": 604800},
                "new-accounts-per-ip": None,
            }
        }))
        limits = table.lookup(LE)[1]
        self.assertEqual(limits["certs-per-exact-set"].capacity, 7)
        self.assertEqual(limits["new-orders-per-account"].capacity, 300)
        self.assertNotIn("new-accounts-per-ip", limits)

    def test_pathDisambiguates(self) -> None:
        """
        Two directories on one host: the one whose path the proxy saw wins.
        """
        table = LimitTable(parseLimits({
            "https://ca.example/a/directory": {"certs-per-exact-set": {"capacity": 1, "period_s": 1}},
            "https://ca.example/b/directory": {"certs-per-exact-set": {"capacity": 2, "period_s": 1}},
        }))
        self.assertEqual(table.lookup("ca.example", "/b/directory")[1]["certs-per-exact-set"].capacity, 2)
        self.assertEqual(table.lookup("ca.example", "/a/directory")[1]["certs-per-exact-set"].capacity, 1)

    def test_serverOf(self) -> None:
        """
        Scheme-default ports are dropped, others kept, IPv6 bracketed, hosts
        lower-cased.
        """
        self.assertEqual(serverOf("https://ACME.Example:443/dir"), ("acme.example", "/dir"))
        self.assertEqual(serverOf("http://ca:80"), ("ca", "/"))
        self.assertEqual(serverOf("https://[::1]:14000/dir"), ("[::1]:14000", "/dir"))


class LoadLimitsTests(SynchronousTestCase):
    """
    --limits FILE is checked completely, with one clear message.
    """

    def load(self, data: object) -> LimitTable:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        return loadLimits(path)

    def test_good(self) -> None:
        """
        A well-formed file loads.
        """
        table = self.load({"https://ca.example/dir": {"new-orders-per-account": {"capacity": 4, "period_s": 3.5}}})
        self.assertEqual(table.lookup("ca.example")[1]["new-orders-per-account"], Limit("new-orders-per-account", 4, 3.5))

    def test_none(self) -> None:
        """
        Without a file, only the built-ins.
        """
        self.assertEqual(list(loadLimits(None).lookup(LE)[1]), list(LETS_ENCRYPT))

    def test_bad(self) -> None:
        """
        Not JSON, not an object, an unknown name, a bad capacity or period,
        extra keys and a URL that is not http(s) are each refused, naming the
        problem.
        """
        cases = [
            ("{", "not valid JSON"),
            ([], "must be a JSON object"),
            ({"https://x/d": {"certs-per-fqdn": {"capacity": 1, "period_s": 1}}}, "unknown limit 'certs-per-fqdn'"),
            ({"https://x/d": {"certs-per-exact-set": {"capacity": 0, "period_s": 1}}}, "capacity"),
            ({"https://x/d": {"certs-per-exact-set": {"capacity": True, "period_s": 1}}}, "capacity"),
            ({"https://x/d": {"certs-per-exact-set": {"capacity": 1, "period_s": -1}}}, "period_s"),
            ({"https://x/d": {"certs-per-exact-set": {"capacity": 1, "period_s": 1, "x": 2}}}, "capacity"),
            ({"ftp://x/d": {}}, "not an http(s) directory URL"),
            ({"https://x/d": 5}, "must be an object"),
        ]
        for data, message in cases:
            e = self.assertRaises(LimitsError, self.load, data)
            self.assertIn(message, str(e), data)

    def test_unreadable(self) -> None:
        """
        A missing file is a LimitsError, not an OSError.
        """
        e = self.assertRaises(LimitsError, loadLimits, self.mktemp())
        self.assertIn("cannot read", str(e))


class DomainsTests(SynchronousTestCase):
    """
    Registered domains from the bundled Public Suffix List.
    """

    def setUp(self) -> None:
        self.domains = Domains()

    def test_icann(self) -> None:
        """
        www.example.co.uk counts against example.co.uk; a.b.example.com
        against example.com.
        """
        self.assertEqual(self.domains.registered("www.example.co.uk"), "example.co.uk")
        self.assertEqual(self.domains.registered("a.b.example.com"), "example.com")

    def test_suffixItself(self) -> None:
        """
        A name that is itself a public suffix (co.uk, github.io) counts
        against itself.
        """
        self.assertEqual(self.domains.registered("co.uk"), "co.uk")
        self.assertEqual(self.domains.registered("github.io"), "github.io")

    def test_privateSection(self) -> None:
        """
        github.io is in the list's private section, as Let's Encrypt uses it:
        every user's site is its own registered domain.
        """
        self.assertEqual(self.domains.registered("foo.github.io"), "foo.github.io")
        self.assertEqual(self.domains.registered("www.foo.github.io"), "foo.github.io")

    def test_idn(self) -> None:
        """
        An IDN under an IDN TLD (例子.中国 under .中国), as A-labels or written
        in Unicode, counts against the same A-label registered domain.
        """
        self.assertEqual(self.domains.registered("www.xn--fsqu00a.xn--fiqs8s"), "xn--fsqu00a.xn--fiqs8s")
        self.assertEqual(self.domains.registered("www.例子.中国"), "xn--fsqu00a.xn--fiqs8s")
        self.assertEqual(normalise("例子.中国"), "xn--fsqu00a.xn--fiqs8s")

    def test_wildcardCaseDot(self) -> None:
        """
        A wildcard counts against the domain under it; case and a trailing
        dot do not matter.
        """
        self.assertEqual(self.domains.registered("*.Shop.Example.COM."), "example.com")

    def test_unknownTLD(self) -> None:
        """
        Names under a TLD not in the list (test names) fall under the
        default rule: the last two labels.
        """
        self.assertEqual(self.domains.registered("a.b.fleet.example"), "fleet.example")

    def test_addresses(self) -> None:
        """
        An IPv4 address is its own domain; an IPv6 address counts by /64.
        """
        self.assertEqual(self.domains.registered("192.0.2.7"), "192.0.2.7")
        self.assertEqual(self.domains.registered("2001:DB8::1:2:3:4"), "2001:db8::/64")

    def test_registeredSet(self) -> None:
        """
        One entry per registered domain of a set.
        """
        self.assertEqual(
            self.domains.registeredSet(["a.example.com", "b.example.com", "example.net"]),
            ("example.com", "example.net"),
        )


class IdentifierSetTests(SynchronousTestCase):
    """
    The exact set of an order.
    """

    def test_setIgnoresOrderCaseRepeats(self) -> None:
        """
        Order, case, trailing dots and repeats do not change the set.
        """
        one = identifierSet([{"type": "dns", "value": "B.example."}, {"type": "dns", "value": "a.example"}])
        two = identifierSet(["a.example", "b.example", "A.example"])
        self.assertEqual(one, ("a.example", "b.example"))
        self.assertEqual(one, two)

    def test_wildcardDistinct(self) -> None:
        """
        A wildcard is a different identifier than its base name.
        """
        self.assertEqual(identifierSet(["*.example.com", "example.com"]), ("*.example.com", "example.com"))

    def test_key(self) -> None:
        """
        A set's key reads back as the set; junk is skipped.
        """
        key = setKey(("a.example", "b.example"))
        self.assertEqual(setFromKey(key), ["a.example", "b.example"])
        self.assertEqual(identifierSet("nope"), ())
        self.assertEqual(identifierSet([{"type": "dns"}, 5]), ())
