"""
The ACME classifier: the observer that turns each relayed exchange into at
most one ACME event.

It is pure (sans-IO): no reactor, no files, no sockets. It reads an
L{Exchange}, decides what the exchange was from what the server itself said
(its directory, Location headers, the URLs named in orders, authorizations
and challenges, the kid of signed requests), falls back to the shape of the
messages when it was told nothing, and hands the event to an
L{IEventLogger}. It runs on the reactor thread in the proxy's data path, so
it is fast, bounded in memory, and never raises.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from keychestamp.exchange import Exchange, IExchangeObserver, ProxyFailure

from .directory import AcmeKnowledge, Known
from .message import AcmeMessage, urlPath
from .params import EVENT_TYPES, buildParams
from .shapes import guessKind

__all__ = ["AcmeClassifier", "IEventLogger", "PROXY_ERROR"]

#: The event type of a proxy-level failure.
PROXY_ERROR = "proxy-error"

_METHODS = frozenset({"GET", "HEAD", "POST"})
_OBJECT_KINDS = frozenset({"account", "order", "auth", "chall", "final", "cert"})
_LOCATION_KINDS = {"new-acct": "account", "new-order": "order", "new-authz": "auth", "final": "order"}
_ORDER_KINDS = frozenset({"new-order", "order", "final"})
_AUTHZ_KINDS = frozenset({"auth", "new-authz"})
_MAX_LEARNED = 1000


class IEventLogger(Interface):
    """
    Where the classifier sends events: the event log builds the envelope
    (id, time, proxy, host, ...) and hands it to the sinks.
    """

    def log(
        msg: str, params: Dict[str, Any], server: str, path: str, code: int, when: float
    ) -> "Deferred[Any]":
        """
        Log one event.

        @param msg: the event type ("new-order", ...).
        @param params: the type's params.
        @param server: host[:port] of the ACME server.
        @param path: the request path.
        @param code: the HTTP status (0 for a proxy-error).
        @param when: POSIX time of the exchange.
        @return: a Deferred that fires when the event is logged.
        """


@implementer(IExchangeObserver)
class AcmeClassifier:
    """
    Classifies exchanges into ACME events (see docs/events.rst).

    @param log: receives the events.
    @param log_diag: diagnostics (classifier failures); a new Logger if None.
    @param knowledge: the URL memory; one per classifier by default. Pass one
        to share it or to bound it differently.
    """

    def __init__(
        self,
        log: IEventLogger,
        log_diag: Optional[Logger] = None,
        knowledge: Optional[AcmeKnowledge] = None,
    ) -> None:
        self._events = log
        self._diag = log_diag if log_diag is not None else Logger()
        self.knowledge = knowledge if knowledge is not None else AcmeKnowledge()

    # IExchangeObserver

    def exchangeCompleted(self, exchange: Exchange) -> None:
        """
        Log the exchange's event, if it is one. Never raises: an exchange
        that breaks the classifier is dropped with a diagnostic.
        """
        try:
            event = self.classify(exchange)
            if event is None:
                return
            msg, params = event
            args = (msg, params, exchange.server, exchange.path, exchange.status, exchange.started)
        except Exception:
            self._diag.failure(
                "ACME classifier failed on {method} {path}; exchange dropped",
                method=getattr(exchange, "method", "?"),
                path=getattr(exchange, "path", "?"),
            )
            return
        self._emit(*args)

    def proxyFailed(self, failure: ProxyFailure) -> None:
        """
        Log a proxy-error event (code 0: there was no HTTP answer from the
        ACME server). Never raises.
        """
        try:
            params: Dict[str, Any] = {
                "epoch": int(failure.time),
                "client": failure.client,
                "agent": failure.userAgent or "",
                "server": failure.server,
                "stage": failure.stage,
                "reason": failure.reason,
            }
            if failure.method is not None:
                params["method"] = failure.method
            if failure.path is not None:
                params["path"] = failure.path
            args = (PROXY_ERROR, params, failure.server, failure.path or "", 0, failure.time)
        except Exception:
            self._diag.failure("Could not describe proxy failure {failure!r}", failure=failure)
            return
        self._emit(*args)

    # Classification

    def classify(self, exchange: Exchange) -> Optional[Tuple[str, Dict[str, Any]]]:
        """
        (event type, params) of an exchange, or None when it is not an ACME
        exchange we recognise. Updates the URL memory from what the server
        said. May raise on a broken Exchange; L{exchangeCompleted} guards.
        """
        message = AcmeMessage(exchange)
        if message.method not in _METHODS:
            return None
        known = self._lookup(message)
        kind = known.kind if known is not None else guessKind(message)
        if kind is None:
            return None
        account = self._account(message, known)
        self._learn(message, kind, account)
        if kind not in EVENT_TYPES:
            return None
        return kind, buildParams(kind, message, account)

    def _lookup(self, message: AcmeMessage) -> Optional[Known]:
        known = self.knowledge.lookup(message.url)
        if known is None and message.jws is not None and message.jws.url:
            known = self.knowledge.lookup(message.jws.url)
        return known

    def _account(self, message: AcmeMessage, known: Optional[Known]) -> str:
        """
        The account path: the kid that signed the request, else the owner
        remembered for the URL (plain GETs carry no kid), else ''.
        """
        if message.jws is not None and message.jws.kid:
            return urlPath(message.jws.kid)
        if known is not None:
            return known.account
        return ""

    def _learn(self, message: AcmeMessage, kind: str, account: str) -> None:
        """
        Remember the URLs this exchange revealed. Only successful answers
        teach anything: an error names no new object.
        """
        if message.status >= 400:
            return
        knowledge, url = self.knowledge, message.url
        jws = message.jws
        if jws is not None and jws.kid:
            knowledge.learn(jws.kid, "account", urlPath(jws.kid))
        body = message.responseJSON if message.problem is None else None
        if kind == "directory":
            if body is not None and isinstance(body.get("newNonce"), str):
                knowledge.learnDirectory(url, body)
            return
        if kind in _OBJECT_KINDS:
            knowledge.learn(url, kind, account)
        location = message.location
        if location and kind in _LOCATION_KINDS:
            owner = urlPath(location) if kind == "new-acct" else account
            knowledge.learn(location, _LOCATION_KINDS[kind], owner)
        if kind == "cert":
            for alternate in message.links("alternate")[:_MAX_LEARNED]:
                knowledge.learn(alternate, "cert", account)
        if body is None:
            return
        if kind in _ORDER_KINDS:
            self._learnOrder(body, account, url)
        elif kind in _AUTHZ_KINDS:
            self._learnChallenges(body.get("challenges"), account, url)
        elif kind == "chall":
            knowledge.learn(body.get("url"), "chall", account, url)
            for up in message.links("up")[:_MAX_LEARNED]:
                knowledge.learn(up, "auth", account)
        elif kind in ("account", "new-acct"):
            knowledge.learn(body.get("orders"), "orders", account or urlPath(message.location), url)
        elif kind == "orders":
            orders = body.get("orders")
            for order in orders[:_MAX_LEARNED] if isinstance(orders, list) else ():
                knowledge.learn(order, "order", account, url)

    def _learnOrder(self, body: Dict[str, Any], account: str, base: str) -> None:
        authorizations = body.get("authorizations")
        if isinstance(authorizations, list):
            for authz in authorizations[:_MAX_LEARNED]:
                self.knowledge.learn(authz, "auth", account, base)
        self.knowledge.learn(body.get("finalize"), "final", account, base)
        self.knowledge.learn(body.get("certificate"), "cert", account, base)

    def _learnChallenges(self, challenges: Any, account: str, base: str) -> None:
        if not isinstance(challenges, list):
            return
        for challenge in challenges[:_MAX_LEARNED]:
            if isinstance(challenge, dict):
                self.knowledge.learn(challenge.get("url"), "chall", account, base)

    # Output

    def _emit(
        self, msg: str, params: Dict[str, Any], server: str, path: str, code: int, when: float
    ) -> None:
        """
        Hand one event to the event log, exactly once, and make sure neither
        an exception nor a failed Deferred from it reaches the proxy.
        """
        try:
            result = self._events.log(msg, params, server, path, code, when)
        except Exception:
            self._diag.failure("Event log refused {msg} event", msg=msg)
            return
        if isinstance(result, Deferred):
            result.addErrback(
                lambda reason: self._diag.failure("Event log failed on {msg} event", reason, msg=msg)
            )
