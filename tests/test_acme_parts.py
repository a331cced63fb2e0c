# -*- test-case-name: tests.test_acme_parts -*-
"""
Tests for the classifier's small parts: URL and header helpers
(L{keychestamp.acme.message}), the bounded URL memory
(L{keychestamp.acme.directory}), shape fallback (L{keychestamp.acme.shapes})
and certificate description (L{keychestamp.acme.certs}).
"""

from __future__ import annotations

import datetime

from twisted.trial.unittest import SynchronousTestCase

from keychestamp.acme.certs import describeLeaf, formatSerial, formatTime
from keychestamp.acme.directory import LRU, AcmeKnowledge, Known
from keychestamp.acme.message import linkTargets, originOf, parseRetryAfter, splitURL, urlPath
from keychestamp.acme.shapes import sameURL

from .acme_support import makeChain

UTC = datetime.timezone.utc


class URLTests(SynchronousTestCase):
    """
    originOf, splitURL, urlPath, sameURL.
    """

    def test_origin(self) -> None:
        """Case, default ports and IPv6 brackets are normalised."""
        self.assertEqual(originOf("HTTPS", "ACME.Test", 443), "https://acme.test")
        self.assertEqual(originOf("https", "::1", 14000), "https://[::1]:14000")
        self.assertEqual(originOf("http", "[::1]", 80), "http://[::1]")

    def test_split(self) -> None:
        """Absolute URLs split into origin and path with query; relative ones need a base."""
        self.assertEqual(splitURL("https://Localhost:14000/my-order/1?a=b"),
                         ("https://localhost:14000", "/my-order/1?a=b"))
        self.assertEqual(splitURL("https://x.test"), ("https://x.test", "/"))
        self.assertEqual(splitURL("/acct/1", "https://x.test:443/new"), ("https://x.test", "/acct/1"))
        for bad in (None, "", "/relative", "mailto:a@b", "https://[::1/x", "https://x.test:99999/", 5):
            self.assertIsNone(splitURL(bad), bad)

    def test_path(self) -> None:
        """urlPath is the path component, '' for non-strings."""
        self.assertEqual(urlPath("https://acme-v02.api.letsencrypt.org/acme/acct/11760188"), "/acme/acct/11760188")
        self.assertEqual(urlPath("https://x.test/a?b"), "/a")
        self.assertEqual(urlPath(None), "")
        self.assertEqual(urlPath("https://[::1/x"), "")

    def test_sameURL(self) -> None:
        """sameURL ignores a default port and host case, not the path."""
        self.assertTrue(sameURL("https://X.test:443/acct/1", "https://x.test/acct/1"))
        self.assertFalse(sameURL("https://x.test/acct/1", "https://x.test/acct/2"))
        self.assertFalse(sameURL(None, None))


class HeaderTests(SynchronousTestCase):
    """
    parseRetryAfter, linkTargets.
    """

    def test_retryAfter(self) -> None:
        """Seconds become int; dates stay strings; absent or blank is None."""
        self.assertEqual(parseRetryAfter(" 120 "), 120)
        self.assertEqual(parseRetryAfter("Wed, 21 Oct 2015 07:28:00 GMT"), "Wed, 21 Oct 2015 07:28:00 GMT")
        self.assertEqual(parseRetryAfter("-5"), "-5")
        self.assertEqual(parseRetryAfter("١٢"), "١٢")
        self.assertIsNone(parseRetryAfter(None))
        self.assertIsNone(parseRetryAfter("  "))

    def test_links(self) -> None:
        """Relations are matched in repeated and comma-joined headers, quoted or not."""
        headers = [
            ("Link", '<https://x.test/dir>;rel="index", <https://x.test/a/1>; rel="up"'),
            ("link", "<https://x.test/c/1/1>;rel=alternate"),
            ("Link", '<https://x.test/c/1/2>;rel="alternate other"'),
            ("Link", "<broken"),
            ("Other", '<https://x.test/no>;rel="up"'),
        ]
        self.assertEqual(linkTargets(headers, "up"), ["https://x.test/a/1"])
        self.assertEqual(linkTargets(headers, "alternate"), ["https://x.test/c/1/1", "https://x.test/c/1/2"])
        self.assertEqual(linkTargets(headers, "help"), [])


class LRUTests(SynchronousTestCase):
    """
    The LRU behind the memory.
    """

    def test_evictsLeastRecentlyUsed(self) -> None:
        """Beyond its size the least recently used entry goes; get refreshes."""
        lru: LRU[str, int] = LRU(2)
        lru.set("a", 1)
        lru.set("b", 2)
        self.assertEqual(lru.get("a"), 1)
        lru.set("c", 3)
        self.assertEqual((lru.get("b"), lru.get("a"), lru.get("c"), len(lru)), (None, 1, 3, 2))

    def test_size(self) -> None:
        """A size below one is refused."""
        self.assertRaises(ValueError, LRU, 0)


class KnowledgeTests(SynchronousTestCase):
    """
    AcmeKnowledge.
    """

    def test_directory(self) -> None:
        """Directory endpoints, the directory URL itself, and the renewalInfo prefix."""
        knowledge = AcmeKnowledge()
        knowledge.learnDirectory(
            "https://localhost:14000/dir",
            {"newNonce": "https://localhost:14000/nonce-plz", "newAccount": "/sign-me-up",
             "renewalInfo": "https://localhost:14000/draft-ietf-acme-ari-03/renewalInfo",
             "keyChange": 5, "meta": {"newOrder": "https://localhost:14000/no"}},
        )
        self.assertEqual(knowledge.lookup("https://LOCALHOST:14000/dir"), Known("directory"))
        self.assertEqual(knowledge.lookup("https://localhost:14000/nonce-plz"), Known("new-nonce"))
        self.assertEqual(knowledge.lookup("https://localhost:14000/sign-me-up"), Known("new-acct"))
        self.assertEqual(knowledge.lookup("https://localhost:14000/draft-ietf-acme-ari-03/renewalInfo/a.b?x"),
                         Known("renewal-info"))
        self.assertIsNone(knowledge.lookup("https://localhost:14000/draft-ietf-acme-ari-03/renewalInfoX"))
        self.assertIsNone(knowledge.lookup("https://localhost:14000/no"))
        self.assertIsNone(knowledge.lookup("https://localhost:14001/nonce-plz"))

    def test_rootPrefixIgnored(self) -> None:
        """A renewalInfo at the root would claim every URL of the origin: ignored."""
        knowledge = AcmeKnowledge()
        knowledge.learnDirectory("https://x.test/dir", {"renewalInfo": "https://x.test/"})
        self.assertIsNone(knowledge.lookup("https://x.test/acme/order/1"))

    def test_endpointsWin(self) -> None:
        """An object URL never overrides a directory endpoint."""
        knowledge = AcmeKnowledge()
        knowledge.learnDirectory("https://x.test/dir", {"newOrder": "https://x.test/new-order"})
        knowledge.learn("https://x.test/new-order", "account", "/evil")
        self.assertEqual(knowledge.lookup("https://x.test/new-order"), Known("new-order"))

    def test_ownerKept(self) -> None:
        """Relearning a URL without an owner keeps the owner seen before."""
        knowledge = AcmeKnowledge()
        knowledge.learn("https://x.test/o/1", "order", "/acct/1")
        knowledge.learn("https://x.test/o/1", "order")
        self.assertEqual(knowledge.lookup("https://x.test/o/1"), Known("order", "/acct/1"))
        knowledge.learn("c/1", "chall", "/acct/1", base="https://x.test/a/1")
        self.assertEqual(knowledge.lookup("https://x.test/a/c/1"), Known("chall", "/acct/1"))

    def test_bounded(self) -> None:
        """Object URLs per origin and origins are both bounded."""
        knowledge = AcmeKnowledge(maxOrigins=3, maxObjects=10)
        for number in range(100):
            knowledge.learn(f"https://x.test/o/{number}", "order")
            knowledge.learn(f"https://h{number}.test/o/1", "order")
        self.assertIsNone(knowledge.lookup("https://x.test/o/0"))
        self.assertEqual(knowledge.lookup("https://x.test/o/99"), Known("order"))
        self.assertIsNone(knowledge.lookup("https://h0.test/o/1"))
        self.assertEqual(knowledge.lookup("https://h99.test/o/1"), Known("order"))
        self.assertLessEqual(len(knowledge._origins), 3)

    def test_garbage(self) -> None:
        """Non-URLs are neither learned nor found."""
        knowledge = AcmeKnowledge()
        knowledge.learn(None, "order")
        knowledge.learn(["https://x.test/"], "order")
        knowledge.learnDirectory("not a url", {"newNonce": "also not"})
        self.assertIsNone(knowledge.lookup(None))
        self.assertEqual(len(knowledge._origins), 0)


class CertificateTests(SynchronousTestCase):
    """
    describeLeaf on real chains made with cryptography.
    """

    notBefore = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    notAfter = datetime.datetime(2025, 4, 2, 3, 4, 4, tzinfo=UTC)

    def test_leaf(self) -> None:
        """The first certificate of the chain: serial, dates, DNS and IP names, issuer."""
        chain = makeChain(0x0ABC, ["a.example", "b.example"], ["192.0.2.1", "2001:db8::1"],
                          self.notBefore, self.notAfter, [("C", "US"), ("O", "Test, Inc."), ("CN", "Test CA")])
        self.assertEqual(
            describeLeaf(chain),
            {"serial": "0abc", "not_before": "2025-01-02T03:04:05Z", "not_after": "2025-04-02T03:04:04Z",
             "names": ["a.example", "b.example", "192.0.2.1", "2001:db8::1"],
             "issuer": "CN=Test CA,O=Test\\, Inc.,C=US"},
        )

    def test_leafOfCutChain(self) -> None:
        """A chain cut inside the second certificate still describes the leaf."""
        chain = makeChain(7, ["a.example"], [], self.notBefore, self.notAfter, [("CN", "CA")])
        cut = chain[: chain.index(b"-----END CERTIFICATE-----") + 200]
        self.assertEqual(describeLeaf(cut)["serial"], "07")

    def test_noSAN(self) -> None:
        """A leaf without subjectAltName has no names."""
        chain = makeChain(1, [], [], self.notBefore, self.notAfter, [("CN", "CA")])
        self.assertEqual(describeLeaf(chain)["names"], [])

    def test_garbage(self) -> None:
        """Bodies without a parsable certificate give empty values."""
        empty = {"serial": "", "not_before": "", "not_after": "", "names": [], "issuer": ""}
        for body in (b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                     b"-----BEGIN CERTIFICATE-----\n" * 1000):
            self.assertEqual(describeLeaf(body), empty)

    def test_formats(self) -> None:
        """Serials are zero-padded to whole bytes; times are UTC with Z."""
        self.assertEqual(formatSerial(0x3A1B), "3a1b")
        self.assertEqual(formatSerial(0x3A1), "03a1")
        self.assertEqual(formatSerial(0), "00")
        east = datetime.timezone(datetime.timedelta(hours=2))
        self.assertEqual(formatTime(datetime.datetime(2025, 1, 1, 2, 0, 0, tzinfo=east)), "2025-01-01T00:00:00Z")
        self.assertEqual(formatTime(datetime.datetime(2025, 1, 1)), "2025-01-01T00:00:00Z")
