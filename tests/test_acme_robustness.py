# -*- test-case-name: tests.test_acme_robustness -*-
"""
Property tests: whatever a client or server sends, the classifier neither
raises nor logs more than one event per exchange.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from keychestamp.acme import AcmeClassifier, AcmeKnowledge
from keychestamp.exchange import Exchange

from .acme_support import RecordingEventLogger

_ACME_KEYS = [
    "newNonce", "newAccount", "newOrder", "renewalInfo", "identifiers", "identifier",
    "finalize", "authorizations", "certificate", "challenges", "type", "token", "status",
    "url", "csr", "contact", "suggestedWindow", "start", "end", "error", "subproblems",
    "orders", "account", "oldKey", "protected", "payload", "signature", "jwk", "kid", "kty",
    "onlyReturnExisting", "externalAccountBinding", "replaces", "profile", "expires",
    "explanationURL", "initialIp", "detail", "value",
]
_URLS = [
    "https://acme.test/dir", "https://acme.test/new-order", "https://acme.test/a/1",
    "https://acme.test/c/1", "https://ACME.test:443/o/1", "https://acme.test:8443/x",
    "http://acme.test/a/1", "/a/1", "c/2", "https://[::1]/z", "https://[bad/", "mailto:x@y",
    "ftp://acme.test/", "", "https://acme.test/renewal/abc.def",
]

urls = st.sampled_from(_URLS)
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=12) | urls
)
jsonValues = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_ACME_KEYS) | st.text(max_size=6), children, max_size=6),
    max_leaves=25,
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


identifierValues = st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["dns", "ip"]) | jsonValues, "value": st.text(max_size=12) | jsonValues}
)
challengeValues = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["http-01", "dns-01"]) | jsonValues,
        "url": urls | jsonValues,
        "token": st.text(max_size=5),
        "status": st.sampled_from(["pending", "valid", "invalid"]) | jsonValues,
        "error": jsonValues,
    },
)
#: JSON objects shaped like ACME's (orders, authorizations, challenges,
#: accounts, directories, problems, ARI), with members that may be of any type.
acmeObjects = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["pending", "valid", "invalid", "ready"]) | jsonValues,
        "identifiers": st.lists(identifierValues, max_size=3) | jsonValues,
        "identifier": identifierValues | jsonValues,
        "finalize": urls | jsonValues,
        "authorizations": st.lists(urls, max_size=3) | jsonValues,
        "certificate": urls | jsonValues,
        "challenges": st.lists(challengeValues, max_size=3) | jsonValues,
        "type": st.sampled_from(["http-01", "urn:ietf:params:acme:error:rateLimited"]) | jsonValues,
        "token": st.text(max_size=5),
        "url": urls,
        "error": jsonValues,
        "newNonce": urls | jsonValues,
        "newOrder": urls,
        "renewalInfo": urls | jsonValues,
        "suggestedWindow": (
            st.fixed_dictionaries({}, optional={"start": jsonValues, "end": jsonValues}) | jsonValues
        ),
        "explanationURL": urls | jsonValues,
        "contact": (
            st.lists(st.sampled_from(["mailto:a@b.test", "MAILTO:", "tel:1"]) | jsonValues, max_size=3)
            | jsonValues
        ),
        "orders": urls | jsonValues,
        "initialIp": jsonValues,
        "detail": jsonValues,
        "subproblems": st.lists(jsonValues, max_size=3) | jsonValues,
        "csr": st.text(max_size=8),
        "onlyReturnExisting": jsonValues,
        "externalAccountBinding": jsonValues,
        "profile": jsonValues,
        "replaces": jsonValues,
    },
)


_JWK = {"kty": "EC", "crv": "P-256", "x": "eA", "y": "eQ"}


@st.composite
def jwsBodies(draw: Any) -> bytes:
    """A flattened JWS with ACME-like or arbitrary header and payload (or garbage)."""
    header = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "url": urls | jsonValues,
                "kid": urls | jsonValues,
                "jwk": st.just(_JWK) | jsonValues,
                "alg": st.just("ES256"),
            },
        )
    )
    payloadValue = draw(acmeObjects | jsonValues | st.builds(lambda: "JWS"))
    if payloadValue == "JWS":
        inner = {"account": "https://acme.test/a/1", "oldKey": _JWK}
        payloadValue = {"protected": _b64(b"{}"), "payload": _b64(json.dumps(inner).encode()), "signature": ""}
    payload = draw(
        st.just(b"") | st.binary(max_size=40) | st.just(json.dumps(payloadValue).encode())
    )
    message = {
        "protected": draw(st.just(_b64(json.dumps(header).encode())) | st.text(max_size=10)),
        "payload": draw(st.just(_b64(payload)) | st.text(max_size=10) | jsonValues),
        "signature": "c2ln",
    }
    return json.dumps(message).encode()


bodies = st.one_of(
    st.binary(max_size=200),
    jsonValues.map(lambda value: json.dumps(value).encode()),
    acmeObjects.map(lambda value: json.dumps(value).encode()),
    jwsBodies(),
    st.binary(max_size=120).map(
        lambda raw: b"-----BEGIN CERTIFICATE-----\n" + raw + b"\n-----END CERTIFICATE-----\n"
    ),
)

#: Responses lean towards ACME-shaped objects so that most kinds get exercised.
responseBodies = st.one_of(
    acmeObjects.map(lambda value: json.dumps(value).encode()),
    challengeValues.map(lambda value: json.dumps(value).encode()),
    bodies,
)

_HEADER_NAMES = [
    "Content-Type", "Location", "Link", "Retry-After", "Replay-Nonce", "User-Agent", "X-Other",
]
_HEADER_VALUES = [
    "application/json", "application/problem+json", "application/pem-certificate-chain",
    "application/jose+json; charset=utf-8", "text/html", "<https://acme.test/a/1>;rel=\"up\"",
    "<https://acme.test/c/9>;rel=alternate, <x>", "<<<>>>;rel=", "120", "Wed, 21 Oct 2015 07:28:00 GMT",
    "-5", "https://acme.test/o/1", "/relative", "",
]
headerLists = st.lists(
    st.tuples(
        st.sampled_from(_HEADER_NAMES) | st.text(max_size=8),
        st.sampled_from(_HEADER_VALUES) | urls | st.text(max_size=30),
    ),
    max_size=6,
)


@st.composite
def exchanges(draw: Any, sane: bool = True) -> Exchange:
    """
    An Exchange with arbitrary content. C{sane}: fields have the types the
    proxy promises (only their content is hostile); otherwise anything goes.
    """
    started = draw(st.floats(min_value=0, max_value=4e9)) if sane else draw(st.floats() | st.none())
    return Exchange(
        client=draw(st.text(max_size=15)),
        clientPort=draw(st.integers(0, 65535)),
        method=draw(st.sampled_from(["GET", "HEAD", "POST", "POST", "post", "OPTIONS"]) | st.text(max_size=6)),
        scheme=draw(st.sampled_from(["https", "http"])) if sane else draw(st.text(max_size=6)),
        host=draw(st.sampled_from(["acme.test", "ACME.test", "::1"]) if sane else st.text(max_size=10)),
        port=draw(st.sampled_from([443, 443, 8443]) if sane else st.integers(-1, 70000)),
        path=draw(
            st.sampled_from(["/dir", "/new-order", "/nonce", "/acct", "/a/1", "/c/1", "/o/1", "/renewal/x", "/x"])
            | st.text(max_size=20)
        ),
        requestHeaders=draw(headerLists),
        requestBody=draw(bodies),
        status=draw(st.sampled_from([200, 201, 204, 400, 404, 429, 500, 503]) if sane else st.integers(-5, 1000)),
        responseHeaders=draw(headerLists),
        responseBody=draw(responseBodies),
        started=started,
        finished=started,
        requestTruncated=draw(st.booleans()),
        responseTruncated=draw(st.booleans()),
    )


_DIRECTORY = {
    "newNonce": "https://acme.test/nonce", "newOrder": "https://acme.test/new-order",
    "newAccount": "https://acme.test/acct", "renewalInfo": "https://acme.test/renewal",
}


class RobustnessTests(SynchronousTestCase):
    """
    Hypothesis properties of exchangeCompleted.
    """

    def _feed(self, batch: List[Exchange]) -> List[Dict[str, Any]]:
        events = RecordingEventLogger()
        diag: List[Dict[str, Any]] = []
        classifier = AcmeClassifier(events, Logger(observer=diag.append), AcmeKnowledge(maxObjects=8))
        classifier.knowledge.learnDirectory("https://acme.test/dir", _DIRECTORY)
        for exchange in batch:
            before = len(events.calls)
            classifier.exchangeCompleted(exchange)
            self.assertIn(len(events.calls) - before, (0, 1))
        for call in events.calls:
            json.dumps(call["params"], allow_nan=False)
            self.assertIsInstance(call["params"]["epoch"], int)
        return diag

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(exchanges(), min_size=1, max_size=4))
    def test_hostileContent(self, batch: List[Exchange]) -> None:
        """
        Arbitrary bytes, JSON and headers never raise, give at most one event
        per exchange, JSON-serialisable params, and not even a diagnostic:
        the classifier handles them rather than catching its own failure.
        """
        diag = self._feed(batch)
        self.assertEqual([event for event in diag if "log_failure" in event], [])

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(exchanges(sane=False), min_size=1, max_size=3))
    def test_hostileFields(self, batch: List[Exchange]) -> None:
        """Even fields of impossible values never make exchangeCompleted raise."""
        self._feed(batch)
