"""
Classifying an exchange by its shape alone, for when the server never told us
what its URL is (the proxy restarted in the middle of a client's flow, or the
entry was evicted from the bounded memory).

The request speaks first, because it says what the client asked for: the
JWS payload's members (identifiers, csr, certificate, an inner JWS) and the
protected header (jwk for new accounts, kid equal to the URL for account
updates). The response decides the rest: a PEM chain, an order, an
authorization, a challenge, a directory, an ARI window, an empty nonce answer.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .jws import DecodedJWS, decodeJWS, looksLikeJWS
from .message import PEM_CHAIN, AcmeMessage, splitURL

__all__ = ["guessKind", "sameURL"]

_ACCOUNT_BODY_MEMBERS = ("contact", "orders", "key", "initialIp", "createdAt")
_CHALLENGE_MEMBERS = ("type", "token", "status", "url")


def sameURL(first: Any, second: Any) -> bool:
    """
    Two URLs name the same resource once scheme, host case and default
    ports are normalised.
    """
    a = splitURL(first)
    return a is not None and a == splitURL(second)


def _isKeyChange(payload: Dict[str, Any]) -> bool:
    """
    RFC 8555 §7.3.5: the payload of a key-change is itself a JWS, signed by
    the new key, whose payload names the account and the old key.
    """
    if not looksLikeJWS(payload):
        return False
    inner = decodeJWS(payload)
    if inner is None:
        return False
    innerPayload = inner.payloadObject
    return "account" in innerPayload or "oldKey" in innerPayload


def _requestKind(message: AcmeMessage, jws: DecodedJWS) -> Optional[str]:
    if jws.kid and sameURL(jws.kid, message.url):
        return "account"
    payload = jws.payload
    if not isinstance(payload, dict):
        return None
    if _isKeyChange(payload):
        return "key-change"
    if "identifiers" in payload:
        return "new-order"
    if "identifier" in payload:
        return "new-authz"
    if "csr" in payload:
        return "final"
    if "certificate" in payload:
        return "revoke-cert"
    if jws.jwk is not None and not jws.kid:
        # Only newAccount is signed with a jwk and has such a payload
        # (RFC 8555 §6.2); revoke-cert, the other one, names a certificate.
        return "new-acct"
    return None


def _bodyKind(message: AcmeMessage, body: Dict[str, Any]) -> Optional[str]:
    if isinstance(body.get("newNonce"), str):
        return "directory"
    if isinstance(body.get("suggestedWindow"), dict):
        return "renewal-info"
    if "identifiers" in body and "finalize" in body:
        return "order"
    if "identifier" in body and "challenges" in body:
        return "auth"
    if all(member in body for member in _CHALLENGE_MEMBERS):
        return "chall"
    if "status" in body and any(member in body for member in _ACCOUNT_BODY_MEMBERS):
        jws = message.jws
        if jws is not None and jws.jwk is not None and not jws.kid:
            return "new-acct"
        return "account"
    return None


def _responseKind(message: AcmeMessage) -> Optional[str]:
    if message.responseType == PEM_CHAIN and message.status < 300:
        return "cert"
    body = message.responseJSON
    if body is not None and message.problem is None:
        kind = _bodyKind(message, body)
        if kind is not None:
            return kind
    if (
        message.method in ("HEAD", "GET")
        and 200 <= message.status < 300
        and not message.exchange.responseBody
        and message.hasHeader("replay-nonce")
    ):
        return "new-nonce"
    return None


def guessKind(message: AcmeMessage) -> Optional[str]:
    """
    The event type of an exchange on a URL we know nothing about, from the
    shape of its request and response; None when it does not look like ACME.
    """
    jws = message.jws
    if jws is not None:
        kind = _requestKind(message, jws)
        if kind is not None:
            return kind
    return _responseKind(message)
