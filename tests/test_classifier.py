# -*- test-case-name: tests.test_classifier -*-
"""
Tests for L{keychestamp.acme.classifier}: every event type against recorded
shapes of Pebble, Let's Encrypt and another RFC 8555 CA, each both with the
directory and earlier exchanges seen ("warm") and alone ("cold", as after a
proxy restart); failures; secrets; robustness.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from keychestamp.acme import AcmeClassifier, AcmeKnowledge, IEventLogger
from keychestamp.exchange import (
    STAGE_CLIENT_TLS,
    STAGE_UPSTREAM_TIMEOUT,
    Exchange,
    IExchangeObserver,
    ProxyFailure,
)

from .acme_support import (
    SIGNATURE_B64,
    RecordingEventLogger,
    encodeJWS,
    expectedEvent,
    flowNames,
    loadFlow,
    makeExchange,
)


def diagnostics() -> Tuple[Logger, List[Dict[str, Any]]]:
    """A Logger whose events are collected in a list, for asserting diagnostics."""
    events: List[Dict[str, Any]] = []
    return Logger(observer=events.append), events


def replay(flowName: str, cold: bool = False) -> Dict[str, List[Dict[str, Any]]]:
    """
    Feed a fixture flow to a classifier, in order; C{cold} uses a new
    classifier for each exchange. Returns the log calls of each exchange.
    """
    flow = loadFlow(flowName)
    results: Dict[str, List[Dict[str, Any]]] = {}
    logger = RecordingEventLogger()
    classifier = AcmeClassifier(logger)
    for entry in flow["exchanges"]:
        if cold:
            logger = RecordingEventLogger()
            classifier = AcmeClassifier(logger)
        before = len(logger.calls)
        classifier.exchangeCompleted(makeExchange(flow, entry))
        results[entry["name"]] = logger.calls[before:]
    return results


class FlowMixin:
    """
    Checks one fixture entry: the event it yields warm and cold, every param
    and the envelope arguments (server, path, code, when).
    """

    flowName = ""

    def assertEntry(self, name: str, msg: Optional[str]) -> Dict[str, Any]:
        """
        Assert the entry's events, warm and cold, equal the fixture's
        expectations and that the warm one is of type C{msg}; return its params.
        """
        flow = loadFlow(self.flowName)
        entry = next(item for item in flow["exchanges"] if item["name"] == name)
        warmParams: Dict[str, Any] = {}
        for cold in (False, True):
            calls = replay(self.flowName, cold)[name]
            expected = expectedEvent(flow, entry, cold)
            if expected is None:
                self.assertEqual(calls, [], f"{name} ({'cold' if cold else 'warm'})")  # type: ignore[attr-defined]
                continue
            self.assertEqual(len(calls), 1, f"{name} ({'cold' if cold else 'warm'})")  # type: ignore[attr-defined]
            call = calls[0]
            self.assertEqual((call["msg"], call["params"]), expected)  # type: ignore[attr-defined]
            server = flow["host"] if flow["port"] == 443 else f"{flow['host']}:{flow['port']}"
            self.assertEqual(  # type: ignore[attr-defined]
                (call["server"], call["path"], call["code"], call["when"]),
                (server, entry["path"], entry["response"]["status"], entry["started"]),
            )
            if not cold:
                warmParams = call["params"]
        if msg is not None:
            self.assertEqual(entry["expect"]["msg"], msg)  # type: ignore[attr-defined]
        return warmParams


class PebbleFlowTests(FlowMixin, SynchronousTestCase):
    """
    Pebble's layout: /dir, /nonce-plz, /sign-me-up, /order-plz, /authZ/,
    /chalZ/, /finalize-order/, /my-order/, /certZ/, /my-account/,
    /rollover-account-key, /revoke-cert, ARI under /draft-ietf-acme-ari-03/.
    """

    flowName = "pebble-flow"

    def test_directory(self) -> None:
        """GET /dir is a directory event with only the common params."""
        params = self.assertEntry("directory", "directory")
        self.assertEqual(set(params), {"epoch", "client", "agent"})

    def test_newNonce(self) -> None:
        """HEAD /nonce-plz is new-nonce."""
        self.assertEntry("new-nonce", "new-nonce")

    def test_newAccount(self) -> None:
        """POST /sign-me-up: contact, email, account from Location, the key's thumbprint."""
        params = self.assertEntry("new-acct", "new-acct")
        self.assertEqual(params["account"], "/my-account/7a3f9e2b41c6d805")

    def test_newOrder(self) -> None:
        """POST /order-plz: domains, authz paths, finalize, order, account and profile."""
        params = self.assertEntry("new-order", "new-order")
        self.assertEqual(params["profile"], "shortlived")
        self.assertNotIn("replaces", params)

    def test_auth(self) -> None:
        """POST-as-GET on /authZ/ is auth, pending then valid."""
        self.assertEntry("auth", "auth")
        self.assertEqual(self.assertEntry("auth-valid", "auth")["status"], "valid")

    def test_chall(self) -> None:
        """POST {} on /chalZ/ is chall."""
        self.assertEntry("chall", "chall")

    def test_order(self) -> None:
        """POST-as-GET on /my-order/ is order; without the removed chall key."""
        params = self.assertEntry("order-ready", "order")
        self.assertNotIn("chall", params)
        self.assertEqual(self.assertEntry("order-valid", "order")["certificate"], "/certZ/1f2e3d4c5b6a7988")

    def test_final(self) -> None:
        """POST {csr} on /finalize-order/ is final."""
        self.assertEntry("final", "final")

    def test_cert(self) -> None:
        """POST-as-GET on /certZ/ (and its alternate) is cert, described from the PEM."""
        self.assertEntry("cert", "cert")
        self.assertEntry("cert-alternate", "cert")

    def test_renewalInfo(self) -> None:
        """GET under the directory's renewalInfo is renewal-info; no Retry-After gives null."""
        params = self.assertEntry("renewal-info", "renewal-info")
        self.assertIsNone(params["retry_after"])
        self.assertNotIn("explanation_url", params)

    def test_account(self) -> None:
        """POSTs to the account URL are account events: update, lookup, deactivate."""
        actions = [
            self.assertEntry(name, "account")["action"]
            for name in ("account-update", "account-lookup", "account-deactivate")
        ]
        self.assertEqual(actions, ["update", "lookup", "deactivate"])

    def test_keyChange(self) -> None:
        """POST /rollover-account-key is key-change."""
        self.assertEntry("key-change", "key-change")

    def test_revokeCert(self) -> None:
        """POST /revoke-cert with kid names the account; with jwk, only a thumbprint."""
        self.assertEntry("revoke-cert", "revoke-cert")
        params = self.assertEntry("revoke-cert-by-key", "revoke-cert")
        self.assertEqual(params["account"], "")

    def test_newAccountOnlyReturnExisting(self) -> None:
        """onlyReturnExisting stays new-acct, flagged."""
        params = self.assertEntry("new-acct-existing", "new-acct")
        self.assertIs(params["only_return_existing"], True)

    def test_listOrders(self) -> None:
        """The orders list URL named by the account is not an event."""
        self.assertEntry("list-orders", None)


class LetsEncryptFlowTests(FlowMixin, SynchronousTestCase):
    """
    Let's Encrypt's layout as in keychestamp 0.3.1's examples, including
    Boulder's plain GETs on authz, order and cert URLs.
    """

    flowName = "letsencrypt-flow"

    def test_directory(self) -> None:
        """GET /directory, with a random extra entry, is directory."""
        self.assertEntry("directory", "directory")

    def test_newNonce(self) -> None:
        """HEAD (200) and GET (204) /acme/new-nonce are new-nonce."""
        self.assertEntry("new-nonce", "new-nonce")
        self.assertEntry("new-nonce-get", "new-nonce")

    def test_newAccount(self) -> None:
        """POST /acme/new-acct: source is the initialIp the server recorded."""
        params = self.assertEntry("new-acct", "new-acct")
        self.assertEqual(params["source"], "81.174.162.194")

    def test_newOrder(self) -> None:
        """POST /acme/new-order gives the 0.3.1 example's params."""
        params = self.assertEntry("new-order", "new-order")
        self.assertEqual(params["order"], "/acme/order/11760188/65280010")

    def test_auth(self) -> None:
        """authz-v3 by POST-as-GET, then by plain GET (account remembered warm)."""
        self.assertEntry("auth", "auth")
        self.assertEqual(self.assertEntry("auth-get", "auth")["account"], "/acme/acct/11760188")

    def test_chall(self) -> None:
        """POST {} to chall-v3 is chall."""
        self.assertEntry("chall", "chall")

    def test_final(self) -> None:
        """POST {csr} to /acme/finalize/ is final; Retry-After on success is not a failure."""
        params = self.assertEntry("final", "final")
        self.assertNotIn("retry_after", params)

    def test_order(self) -> None:
        """Plain GET on /acme/order/ is order."""
        self.assertEntry("order-get", "order")

    def test_cert(self) -> None:
        """Plain GET on /acme/cert/ is cert with the leaf's serial, dates, names, issuer."""
        self.assertEntry("cert-get", "cert")

    def test_revokeCert(self) -> None:
        """POST /acme/revoke-cert is revoke-cert."""
        self.assertEntry("revoke-cert", "revoke-cert")

    def test_keyChange(self) -> None:
        """POST /acme/key-change is key-change, whatever the account-shaped answer."""
        self.assertEntry("key-change", "key-change")


class LetsEncryptRenewalTests(FlowMixin, SynchronousTestCase):
    """
    Today's Let's Encrypt: ARI, profiles, replaces, /acme/authz/ and /acme/chall/.
    """

    flowName = "letsencrypt-renewal"

    def test_renewalInfo(self) -> None:
        """renewal-info: cert_id, window, Retry-After as int seconds, explanation URL."""
        params = self.assertEntry("renewal-info", "renewal-info")
        self.assertEqual(params["retry_after"], 21600)

    def test_newOrderRenewal(self) -> None:
        """new-order carries profile and replaces from the payload."""
        params = self.assertEntry("new-order", "new-order")
        self.assertEqual(
            (params["profile"], params["replaces"]),
            ("tlsserver", "kjJ9W8Hp3RP1CNy4M2Fv6Y5T3cs.A6Gyw9Tl9gcYKTpLXG1-j5AS"),
        )

    def test_newStylePaths(self) -> None:
        """/acme/authz/{acct}/{id} and /acme/chall/{acct}/{authz}/{id} classify."""
        self.assertEntry("auth", "auth")
        self.assertEntry("chall", "chall")

    def test_issuance(self) -> None:
        """final, order and the certificate by POST-as-GET."""
        self.assertEqual(self.assertEntry("final", "final")["status"], "valid")
        self.assertEntry("order", "order")
        self.assertEqual(self.assertEntry("cert", "cert")["issuer"], "CN=E8,O=Let's Encrypt,C=US")


class OtherCAFlowTests(FlowMixin, SynchronousTestCase):
    """
    Another RFC 8555 CA: non-default port, newAuthz, EAB, IP identifiers.
    """

    flowName = "other-ca"

    def test_directory(self) -> None:
        """A provisioner directory under a path is directory."""
        self.assertEntry("directory", "directory")

    def test_newAccountEAB(self) -> None:
        """EAB is reduced to eab: true; a relative Location still gives the path."""
        params = self.assertEntry("new-acct-eab", "new-acct")
        self.assertIs(params["eab"], True)

    def test_newAuthz(self) -> None:
        """newAuthz (pre-authorization) is new-authz."""
        self.assertEntry("new-authz", "new-authz")

    def test_authDeactivate(self) -> None:
        """Deactivating an authorization learned from Location is auth."""
        self.assertEntry("auth-deactivate", "auth")

    def test_newOrderIP(self) -> None:
        """IP identifiers are domains like DNS ones."""
        self.assertEntry("new-order-ip", "new-order")


class FailureTests(FlowMixin, SynchronousTestCase):
    """
    Problem documents, Retry-After, validation errors.
    """

    flowName = "failures"

    def test_accountDoesNotExist(self) -> None:
        """A failed onlyReturnExisting is new-acct with the problem."""
        params = self.assertEntry("new-acct-does-not-exist", "new-acct")
        self.assertEqual(params["problem"]["status"], 400)

    def test_badNonce(self) -> None:
        """badNonce answers are events of the request's type, warm and cold."""
        self.assertEntry("new-order-bad-nonce", "new-order")
        params = self.assertEntry("order-bad-nonce", "order")
        self.assertEqual(params["problem"]["type"], "urn:ietf:params:acme:error:badNonce")

    def test_rateLimited(self) -> None:
        """429 rateLimited: problem plus retry_after in seconds."""
        params = self.assertEntry("new-order-rate-limited", "new-order")
        self.assertEqual(params["retry_after"], 86400)

    def test_rateLimitedHTTPDate(self) -> None:
        """A Retry-After that is an HTTP date is kept as the raw string."""
        params = self.assertEntry("new-order-rate-limited-http-date", "new-order")
        self.assertEqual(params["retry_after"], "Wed, 11 Dec 2019 15:40:03 GMT")

    def test_subproblems(self) -> None:
        """subproblems are carried with type, detail and identifier."""
        params = self.assertEntry("new-order-rejected-identifiers", "new-order")
        self.assertEqual(len(params["problem"]["subproblems"]), 2)

    def test_serverInternal(self) -> None:
        """serverInternal with Retry-After: 60 on a known challenge URL."""
        self.assertEqual(self.assertEntry("chall-server-internal", "chall")["retry_after"], 60)

    def test_loadBalancer503(self) -> None:
        """A non-ACME 503 with Retry-After on new-nonce: event, retry_after, no problem."""
        params = self.assertEntry("new-nonce-503", "new-nonce")
        self.assertNotIn("problem", params)

    def test_challengeError(self) -> None:
        """An invalid challenge carries its error."""
        params = self.assertEntry("chall-invalid", "chall")
        self.assertEqual(params["error"]["type"], "urn:ietf:params:acme:error:connection")

    def test_authorizationError(self) -> None:
        """An invalid authz carries the first failing challenge's error."""
        params = self.assertEntry("auth-invalid", "auth")
        self.assertEqual(params["error"]["type"], "urn:ietf:params:acme:error:unauthorized")

    def test_orderError(self) -> None:
        """An invalid order carries its own error."""
        self.assertEntry("order-invalid", "order")

    def test_orderNotReady(self) -> None:
        """finalize refused with orderNotReady is final with the problem."""
        self.assertEntry("final-order-not-ready", "final")

    def test_alreadyRevoked(self) -> None:
        """A refused revocation is revoke-cert with the problem."""
        self.assertEntry("revoke-cert-already-revoked", "revoke-cert")

    def test_renewalInfoNotFound(self) -> None:
        """An ARI 404 under the known prefix is renewal-info with empty window."""
        self.assertEntry("renewal-info-not-found", "renewal-info")


class AllFlowsTests(SynchronousTestCase):
    """
    Properties over every fixture exchange.
    """

    def test_everyEntryMatches(self) -> None:
        """Every fixture exchange, warm and cold, yields exactly its expected event."""
        checked = 0
        for name in flowNames():
            flow = loadFlow(name)
            for cold in (False, True):
                results = replay(name, cold)
                for entry in flow["exchanges"]:
                    expected = expectedEvent(flow, entry, cold)
                    got = [(call["msg"], call["params"]) for call in results[entry["name"]]]
                    self.assertEqual(got, [expected] if expected else [], (name, entry["name"], cold))
                    checked += 1
        self.assertGreater(checked, 100)

    def test_noSecrets(self) -> None:
        """
        No signature, key member or EAB MAC of any fixture reaches an event:
        every secret in the fixtures is marked SECRET (keys) or is the dummy
        signature.
        """
        dumped = []
        for name in flowNames():
            for cold in (False, True):
                for calls in replay(name, cold).values():
                    dumped.append(json.dumps(calls))
        text = "\n".join(dumped)
        self.assertNotIn(SIGNATURE_B64, text)
        self.assertNotIn("SECRET", text)
        self.assertNotIn("PKijwkY", text)
        self.assertNotIn('"key"', text)
        self.assertNotIn("jwk\"", text)

    def test_originalTypesKeepTheirKeys(self) -> None:
        """
        The ten original types carry the 0.3.1 keys (order without "chall"),
        plus only the documented optional ones.
        """
        original = {
            "directory": set(),
            "new-nonce": set(),
            "new-acct": {"contact", "email", "account", "source", "status"},
            "new-order": {"domains", "authz", "finalize", "account", "order"},
            "auth": {"account", "authz", "status", "expires", "identifier"},
            "chall": {"account", "chall", "status"},
            "order": {"account", "status", "identifiers", "finalize", "certificate"},
            "final": {"account", "status", "certificate"},
            "revoke-cert": {"account"},
            "key-change": {"account"},
        }
        optional = {
            "problem", "retry_after", "truncated", "error", "jwk_thumbprint",
            "only_return_existing", "eab", "profile", "replaces",
        }
        seen = set()
        for name in flowNames():
            for calls in replay(name).values():
                for call in calls:
                    keys = set(call["params"]) - {"epoch", "client", "agent"}
                    if call["msg"] in original:
                        seen.add(call["msg"])
                        self.assertTrue(original[call["msg"]] <= keys, call)
                        self.assertTrue(keys - original[call["msg"]] <= optional, call)
        self.assertEqual(seen, set(original))


def _exchange(**overrides: Any) -> Exchange:
    """An Exchange with harmless defaults."""
    fields: Dict[str, Any] = dict(
        client="127.0.0.1",
        clientPort=40000,
        method="GET",
        scheme="https",
        host="acme.test",
        port=443,
        path="/",
        requestHeaders=[],
        requestBody=b"",
        status=200,
        responseHeaders=[],
        responseBody=b"",
        started=1700000000.9,
        finished=1700000001.0,
    )
    fields.update(overrides)
    return Exchange(**fields)


class ClassifierTests(SynchronousTestCase):
    """
    The observer contract, truncation, odd servers and robustness.
    """

    def setUp(self) -> None:
        self.events = RecordingEventLogger()
        self.diagLog, self.diag = diagnostics()
        self.classifier = AcmeClassifier(self.events, self.diagLog)

    def test_interfaces(self) -> None:
        """The classifier is an IExchangeObserver; the fake log an IEventLogger."""
        self.assertTrue(verifyObject(IExchangeObserver, self.classifier))
        self.assertTrue(verifyObject(IEventLogger, self.events))
        self.assertTrue(verifyClass(IEventLogger, RecordingEventLogger))

    def test_defaultDiagnostics(self) -> None:
        """Without log_diag the classifier makes its own Logger and memory."""
        classifier = AcmeClassifier(self.events)
        self.assertIsInstance(classifier._diag, Logger)
        self.assertIsInstance(classifier.knowledge, AcmeKnowledge)

    def test_notACME(self) -> None:
        """An HTML page or a CORS preflight is no event."""
        self.classifier.exchangeCompleted(
            _exchange(responseHeaders=[("Content-Type", "text/html")], responseBody=b"<html></html>")
        )
        self.classifier.exchangeCompleted(_exchange(method="OPTIONS", responseHeaders=[("Replay-Nonce", "x")]))
        self.assertEqual(self.events.calls, [])

    def test_responseTruncated(self) -> None:
        """A truncated order answer still classifies from the request, flagged truncated."""
        flow = loadFlow("letsencrypt-flow")
        entry = next(item for item in flow["exchanges"] if item["name"] == "new-order")
        exchange = makeExchange(flow, entry)
        exchange.responseBody = exchange.responseBody[:40]
        exchange.responseTruncated = True
        self.classifier.exchangeCompleted(exchange)
        [call] = self.events.calls
        self.assertEqual(call["msg"], "new-order")
        self.assertIs(call["params"]["truncated"], True)
        self.assertEqual(call["params"]["domains"], [{"type": "dns", "value": "lex.keychest.net"}])
        self.assertEqual(call["params"]["authz"], [])
        self.assertEqual(call["params"]["order"], "/acme/order/11760188/65280010")

    def test_requestTruncated(self) -> None:
        """A truncated request on a known URL classifies from memory, flagged truncated."""
        flow = loadFlow("pebble-flow")
        for entry in flow["exchanges"][:2]:
            self.classifier.exchangeCompleted(makeExchange(flow, entry))
        entry = next(item for item in flow["exchanges"] if item["name"] == "new-order")
        exchange = makeExchange(flow, entry)
        exchange.requestBody = exchange.requestBody[:100]
        exchange.requestTruncated = True
        self.classifier.exchangeCompleted(exchange)
        call = self.events.calls[-1]
        self.assertEqual(call["msg"], "new-order")
        self.assertIs(call["params"]["truncated"], True)
        self.assertEqual(call["params"]["account"], "")
        self.assertEqual(call["params"]["domains"], entry["response"]["json"]["identifiers"])

    def test_problemWithPlainJSONType(self) -> None:
        """A server that serves an ACME problem as application/json still gets params.problem."""
        body = {"type": "urn:ietf:params:acme:error:unauthorized", "detail": "no", "status": 403}
        exchange = _exchange(
            method="HEAD",
            status=403,
            path="/new-nonce",
            responseHeaders=[("Content-Type", "application/json"), ("Replay-Nonce", "n")],
            responseBody=json.dumps(body).encode(),
        )
        self.classifier.knowledge.learnDirectory(
            "https://acme.test/dir", {"newNonce": "https://acme.test/new-nonce"}
        )
        self.classifier.exchangeCompleted(exchange)
        [call] = self.events.calls
        self.assertEqual(call["params"]["problem"], body)

    def test_problemWithoutBody(self) -> None:
        """application/problem+json with an unparsable body still marks the failure."""
        self.classifier.knowledge.learnDirectory(
            "https://acme.test/dir", {"newNonce": "https://acme.test/new-nonce"}
        )
        self.classifier.exchangeCompleted(
            _exchange(
                path="/new-nonce",
                status=500,
                responseHeaders=[("Content-Type", "application/problem+json")],
                responseBody=b"{oops",
            )
        )
        [call] = self.events.calls
        self.assertEqual(call["params"]["problem"], {"type": "", "detail": "", "status": 500})

    def test_queryIgnoredInObjectPaths(self) -> None:
        """The authz param is the path without the query string."""
        self.classifier.knowledge.learn("https://acme.test/authz/1?x=1", "auth")
        self.classifier.exchangeCompleted(_exchange(path="/authz/1?x=1"))
        [call] = self.events.calls
        self.assertEqual(
            (call["msg"], call["params"]["authz"], call["path"]), ("auth", "/authz/1", "/authz/1?x=1")
        )

    def test_emptyMailtoSkipped(self) -> None:
        """new-acct's email is the first non-empty mailto: contact."""
        body = encodeJWS(
            {"protected": {"jwk": {"kty": "EC"}}, "payload": {"contact": ["mailto:", "tel:1", "MAILTO:b@c.test"]}}
        )
        self.classifier.exchangeCompleted(_exchange(method="POST", requestBody=json.dumps(body).encode()))
        [call] = self.events.calls
        self.assertEqual(call["msg"], "new-acct")
        self.assertEqual(call["params"]["contact"], ["mailto:", "tel:1", "MAILTO:b@c.test"])
        self.assertEqual(call["params"]["email"], "b@c.test")

    def test_ordersListTeachesOrders(self) -> None:
        """Order URLs named by an account's orders list are remembered as orders."""
        flow = loadFlow("pebble-flow")
        for entry in flow["exchanges"]:
            if entry["name"] in ("new-acct", "list-orders"):
                self.classifier.exchangeCompleted(makeExchange(flow, entry))
        known = self.classifier.knowledge.lookup(
            "https://localhost:14000/my-order/c0Yz8mJd3iHq0Yc5rM1sZbUvQx9Nw2eLkPaRtF7gA4o"
        )
        assert known is not None
        self.assertEqual((known.kind, known.account), ("order", "/my-account/7a3f9e2b41c6d805"))

    def test_logRaises(self) -> None:
        """An event log that raises is caught, logged once as a diagnostic, not retried."""
        self.events.exception = RuntimeError("disk on fire")
        flow = loadFlow("pebble-flow")
        self.classifier.exchangeCompleted(makeExchange(flow, flow["exchanges"][0]))
        self.assertEqual(len(self.events.calls), 1)
        self.assertEqual(len([e for e in self.diag if "log_failure" in e]), 1)

    def test_logFails(self) -> None:
        """A failed Deferred from the event log is consumed and logged."""
        self.events.result = fail(RuntimeError("spool full"))
        flow = loadFlow("pebble-flow")
        self.classifier.exchangeCompleted(makeExchange(flow, flow["exchanges"][0]))
        failures = [e for e in self.diag if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)

    def test_logReturnsPendingDeferred(self) -> None:
        """A Deferred that fails later is handled too."""
        pending: Deferred[Any] = Deferred()
        self.events.result = pending
        flow = loadFlow("pebble-flow")
        self.classifier.exchangeCompleted(makeExchange(flow, flow["exchanges"][0]))
        self.assertEqual(self.diag, [])
        pending.errback(RuntimeError("late"))
        self.assertEqual(len([e for e in self.diag if "log_failure" in e]), 1)

    def test_brokenExchange(self) -> None:
        """An Exchange with impossible field types is dropped with a diagnostic."""
        self.classifier.exchangeCompleted(_exchange(method=None))  # type: ignore[arg-type]
        self.classifier.exchangeCompleted(_exchange(host=None))  # type: ignore[arg-type]
        self.assertEqual(self.events.calls, [])
        self.assertEqual(len([e for e in self.diag if "log_failure" in e]), 2)

    def test_memoryBounded(self) -> None:
        """The classifier's memory keeps a bounded number of object URLs per origin."""
        classifier = AcmeClassifier(self.events, knowledge=AcmeKnowledge(maxObjects=5))
        for number in range(50):
            body = {"identifier": {"type": "dns", "value": "a.test"}, "status": "valid",
                    "challenges": [{"type": "http-01", "url": f"https://acme.test/c/{number}",
                                    "token": "t", "status": "valid"}]}
            classifier.exchangeCompleted(
                _exchange(path=f"/a/{number}", responseHeaders=[("Content-Type", "application/json")],
                          responseBody=json.dumps(body).encode())
            )
        self.assertEqual(len(self.events.calls), 50)
        self.assertIsNone(classifier.knowledge.lookup("https://acme.test/c/0"))
        self.assertEqual(classifier.knowledge.lookup("https://acme.test/c/49").kind, "chall")


class ProxyFailedTests(SynchronousTestCase):
    """
    proxy-error events.
    """

    def test_proxyError(self) -> None:
        """A failure with method and path: every param, server, path, code 0, when."""
        events = RecordingEventLogger()
        AcmeClassifier(events).proxyFailed(
            ProxyFailure(
                client="10.1.2.3",
                server="acme-v02.api.letsencrypt.org",
                stage=STAGE_UPSTREAM_TIMEOUT,
                reason="no answer in 30 s",
                time=1700000000.7,
                method="POST",
                path="/acme/new-order",
                userAgent="lego/4",
            )
        )
        self.assertEqual(
            events.calls,
            [{
                "msg": "proxy-error",
                "params": {
                    "epoch": 1700000000, "client": "10.1.2.3", "agent": "lego/4",
                    "server": "acme-v02.api.letsencrypt.org", "stage": "upstream-timeout",
                    "reason": "no answer in 30 s", "method": "POST", "path": "/acme/new-order",
                },
                "server": "acme-v02.api.letsencrypt.org",
                "path": "/acme/new-order",
                "code": 0,
                "when": 1700000000.7,
            }],
        )

    def test_proxyErrorHandshake(self) -> None:
        """A client that rejects our leaf: no method or path keys, path '', agent ''."""
        events = RecordingEventLogger()
        AcmeClassifier(events).proxyFailed(
            ProxyFailure("192.168.0.9", "acme-v02.api.letsencrypt.org", STAGE_CLIENT_TLS,
                         "tlsv1 alert unknown ca", 1700000001.0)
        )
        [call] = events.calls
        self.assertEqual(
            call["params"],
            {"epoch": 1700000001, "client": "192.168.0.9", "agent": "",
             "server": "acme-v02.api.letsencrypt.org", "stage": "client-tls",
             "reason": "tlsv1 alert unknown ca"},
        )
        self.assertEqual((call["path"], call["code"]), ("", 0))

    def test_proxyErrorNeverRaises(self) -> None:
        """A broken failure record or a raising log is caught."""
        events = RecordingEventLogger()
        events.exception = RuntimeError("boom")
        diagLog, diag = diagnostics()
        classifier = AcmeClassifier(events, diagLog)
        classifier.proxyFailed(ProxyFailure("c", "s", "x", "r", float("nan")))
        classifier.proxyFailed(ProxyFailure("c", "s", "x", "r", 1.0))
        self.assertEqual(len(events.calls), 1)
        self.assertEqual(len([e for e in diag if "log_failure" in e]), 2)
