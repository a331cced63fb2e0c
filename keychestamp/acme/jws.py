"""
Reading ACME's JWS messages without verifying them.

keychestamp only observes: it never checks a signature (the server does), so
all it needs is the protected header (C{url}, C{kid}, C{jwk}) and the payload.
Everything here is defensive: a client may send anything, and nothing in this
module raises on bad input. Signatures are never returned, so they can never
reach an event.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = [
    "DecodedJWS",
    "NOT_JSON",
    "b64urlDecode",
    "decodeJWS",
    "jwkThumbprint",
    "loadJSON",
    "looksLikeJWS",
]


class _NotJSON:
    """
    The type of L{NOT_JSON}.
    """

    def __repr__(self) -> str:
        return "NOT_JSON"

    def __bool__(self) -> bool:
        return False


#: What L{loadJSON} returns for bytes that are not JSON (None is valid JSON).
NOT_JSON: Any = _NotJSON()


def loadJSON(data: bytes) -> Any:
    """
    Parse JSON from bytes, or return L{NOT_JSON}.

    Catches everything JSON parsing can raise on hostile input: syntax
    errors, bad UTF-8, nesting too deep for the recursion limit, integers too
    long for C{int()}.
    """
    try:
        return json.loads(data)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError):
        return NOT_JSON


def b64urlDecode(value: Any) -> Optional[bytes]:
    """
    Decode base64url with or without padding (RFC 7515 uses none); None when
    C{value} is not a string of that alphabet.
    """
    if not isinstance(value, str):
        return None
    try:
        raw = value.strip().encode("ascii")
    except UnicodeEncodeError:
        return None
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class DecodedJWS:
    """
    The readable parts of a flattened JWS (RFC 7515 §7.2.2): the protected
    header and the payload. The signature is deliberately not kept.
    """

    protected: Dict[str, Any]
    """The decoded protected header; {} when it could not be decoded."""
    payload: Any
    """
    The decoded payload: parsed JSON (usually a dict), C{""} for an empty
    payload (POST-as-GET), or L{NOT_JSON} when it is not JSON.
    """

    @property
    def postAsGet(self) -> bool:
        """An empty payload: RFC 8555 §6.3 POST-as-GET."""
        return isinstance(self.payload, str) and self.payload == ""

    @property
    def url(self) -> str:
        """The protected C{url} the client signed, or ''."""
        value = self.protected.get("url")
        return value if isinstance(value, str) else ""

    @property
    def kid(self) -> str:
        """The account URL the message is signed for (C{kid}), or ''."""
        value = self.protected.get("kid")
        return value if isinstance(value, str) else ""

    @property
    def jwk(self) -> Optional[Dict[str, Any]]:
        """The embedded public key (new-acct, revoke-cert by certificate key)."""
        value = self.protected.get("jwk")
        return value if isinstance(value, dict) else None

    @property
    def payloadObject(self) -> Dict[str, Any]:
        """The payload if it is a JSON object, else {}."""
        return self.payload if isinstance(self.payload, dict) else {}


def _decodeFlattened(message: Dict[str, Any]) -> Optional[DecodedJWS]:
    protectedRaw = b64urlDecode(message.get("protected"))
    payloadRaw = b64urlDecode(message.get("payload"))
    if payloadRaw is None:
        return None
    protected = loadJSON(protectedRaw) if protectedRaw is not None else NOT_JSON
    if not isinstance(protected, dict):
        protected = {}
    if payloadRaw == b"":
        payload: Any = ""
    else:
        payload = loadJSON(payloadRaw)
    return DecodedJWS(protected=protected, payload=payload)


def decodeJWS(message: Any) -> Optional[DecodedJWS]:
    """
    Decode a flattened JWS given as bytes (a request body) or as an already
    parsed dict (the inner JWS of a key-change, an EAB).

    @return: the decoded message, or None if this is not a JWS with a
        decodable payload.
    """
    if isinstance(message, (bytes, bytearray)):
        message = loadJSON(bytes(message))
    if not isinstance(message, dict):
        return None
    if not isinstance(message.get("payload"), str):
        return None
    if "protected" not in message and "signature" not in message:
        return None
    return _decodeFlattened(message)


def looksLikeJWS(value: Any) -> bool:
    """
    A JSON object with the members of a flattened JWS.
    """
    return (
        isinstance(value, dict)
        and isinstance(value.get("protected"), str)
        and isinstance(value.get("payload"), str)
        and "signature" in value
    )


#: RFC 7638 §3.2: the required members of each key type, the only ones hashed.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


def jwkThumbprint(jwk: Any) -> Optional[str]:
    """
    The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without
    padding: it names an account key without logging the key itself.

    @return: the thumbprint, or None if C{jwk} is not a JWK of a known type.
    """
    if not isinstance(jwk, dict):
        return None
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        return None
    canonical = {}
    for name in members:
        value = jwk.get(name)
        # Members are base64url or names: ASCII, so the JSON needs no escaping.
        if not isinstance(value, str) or not value.isascii():
            return None
        canonical[name] = value
    encoded = json.dumps(canonical, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(encoded.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
