# -*- test-case-name: tests.test_jws -*-
"""
Tests for L{keychestamp.acme.jws}: decoding flattened JWS without
verifying, tolerating garbage, and RFC 7638 thumbprints.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from keychestamp.acme.jws import (
    NOT_JSON,
    b64urlDecode,
    decodeJWS,
    jwkThumbprint,
    loadJSON,
    looksLikeJWS,
)

from .acme_support import b64url, encodeJWS

#: RFC 7638 §3.1's example key and its thumbprint.
RFC7638_KEY = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
        "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
        "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


class Base64Tests(SynchronousTestCase):
    """
    b64urlDecode.
    """

    def test_unpadded(self) -> None:
        """RFC 7515 base64url without padding decodes, URL-safe characters included."""
        self.assertEqual(b64urlDecode("-_8"), b"\xfb\xff")
        self.assertEqual(b64urlDecode("YQ"), b"a")

    def test_padded(self) -> None:
        """Padding, which some clients add, is tolerated."""
        self.assertEqual(b64urlDecode("YQ=="), b"a")

    def test_empty(self) -> None:
        """The empty string is the empty payload of POST-as-GET."""
        self.assertEqual(b64urlDecode(""), b"")

    def test_garbage(self) -> None:
        """Non-strings, non-ASCII and characters outside the alphabet give None."""
        for value in (None, 5, ["YQ"], "é", "Y Q", "Y", "YQ=A"):
            self.assertIsNone(b64urlDecode(value), value)

    def test_standardAlphabetTolerated(self) -> None:
        """
        '+' and '/' are accepted too: an observer reads what the server will
        judge, it does not enforce the encoding.
        """
        self.assertEqual(b64urlDecode("+/8"), b"\xfb\xff")


class LoadJSONTests(SynchronousTestCase):
    """
    loadJSON never raises.
    """

    def test_valid(self) -> None:
        """JSON parses, null included."""
        self.assertIsNone(loadJSON(b"null"))
        self.assertEqual(loadJSON(b'{"a": [1]}'), {"a": [1]})

    def test_invalid(self) -> None:
        """Syntax errors, bad UTF-8, deep nesting and giant integers give NOT_JSON."""
        for data in (b"{", b"\xff\xfe", b"[" * 100000, b"1" * 5000):
            self.assertIs(loadJSON(data), NOT_JSON)
        self.assertFalse(NOT_JSON)


class DecodeTests(SynchronousTestCase):
    """
    decodeJWS.
    """

    def test_flattened(self) -> None:
        """Protected header and JSON payload are decoded; the signature is not kept."""
        body = json.dumps(
            encodeJWS({"protected": {"alg": "ES256", "kid": "https://a/acct/1", "url": "https://a/x"},
                       "payload": {"identifiers": []}})
        ).encode()
        jws = decodeJWS(body)
        assert jws is not None
        self.assertEqual((jws.kid, jws.url, jws.jwk), ("https://a/acct/1", "https://a/x", None))
        self.assertEqual(jws.payload, {"identifiers": []})
        self.assertFalse(jws.postAsGet)
        self.assertNotIn("signature", vars(jws))

    def test_postAsGet(self) -> None:
        """An empty payload is POST-as-GET; payloadObject is then {}."""
        jws = decodeJWS(json.dumps(encodeJWS({"protected": {}, "payload": ""})).encode())
        assert jws is not None
        self.assertTrue(jws.postAsGet)
        self.assertEqual(jws.payloadObject, {})

    def test_jwk(self) -> None:
        """jwk is returned when it is an object."""
        jws = decodeJWS({"protected": b64url(b'{"jwk": {"kty": "EC"}}'), "payload": "", "signature": ""})
        assert jws is not None
        self.assertEqual(jws.jwk, {"kty": "EC"})

    def test_nonJSONPayload(self) -> None:
        """A payload that is not JSON is NOT_JSON, not an error."""
        jws = decodeJWS({"protected": b64url(b"{}"), "payload": b64url(b"\x00\x01"), "signature": "x"})
        assert jws is not None
        self.assertIs(jws.payload, NOT_JSON)
        self.assertEqual(jws.payloadObject, {})

    def test_badHeader(self) -> None:
        """A protected header that is not a JSON object becomes {}; its fields ''."""
        for protected in ("!!", b64url(b"[1]"), b64url(b'{"kid": 5, "url": null, "jwk": "k"}')):
            jws = decodeJWS({"protected": protected, "payload": "", "signature": "x"})
            assert jws is not None
            self.assertEqual((jws.kid, jws.url, jws.jwk), ("", "", None))

    def test_notJWS(self) -> None:
        """Bodies that are not a flattened JWS give None."""
        for body in (b"", b"garbage", b"[]", b'{"payload": 5}', b'{"a": 1}', b'{"payload": "!!", "protected": ""}',
                     b'{"payload": ""}', None, 7):
            self.assertIsNone(decodeJWS(body), body)

    def test_looksLikeJWS(self) -> None:
        """The inner JWS of a key-change is recognised by its members."""
        self.assertTrue(looksLikeJWS({"protected": "", "payload": "", "signature": ""}))
        self.assertFalse(looksLikeJWS({"protected": "", "payload": ""}))
        self.assertFalse(looksLikeJWS(["protected", "payload", "signature"]))


class ThumbprintTests(SynchronousTestCase):
    """
    jwkThumbprint.
    """

    def test_rfc7638Example(self) -> None:
        """RFC 7638 §3.1's RSA example gives its published thumbprint."""
        self.assertEqual(jwkThumbprint(RFC7638_KEY), RFC7638_THUMBPRINT)

    def test_ignoresOptionalMembers(self) -> None:
        """Only the required members count: alg, kid, use change nothing."""
        bare = {name: RFC7638_KEY[name] for name in ("kty", "n", "e")}
        self.assertEqual(jwkThumbprint(bare), RFC7638_THUMBPRINT)

    def test_ecAndOKP(self) -> None:
        """EC and OKP keys have thumbprints, different per key."""
        ec = jwkThumbprint({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AQ"})
        okp = jwkThumbprint({"kty": "OKP", "crv": "Ed25519", "x": "AA"})
        self.assertIsNotNone(ec)
        self.assertIsNotNone(okp)
        self.assertNotEqual(ec, okp)

    def test_invalid(self) -> None:
        """Unknown types, missing or non-string members give None."""
        for jwk in (None, [], {}, {"kty": ["EC"]}, {"kty": "XX"}, {"kty": "EC", "crv": "P-256", "x": "A"},
                    {"kty": "RSA", "n": 5, "e": "AQAB"}, {"kty": "oct", "k": "é"}):
            self.assertIsNone(jwkThumbprint(jwk), jwk)
