"""
What a certificate download tells an operator: the leaf's serial, validity,
names and issuer, read from the PEM chain the ACME server returned.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from cryptography import x509

__all__ = ["describeLeaf", "formatSerial", "formatTime"]

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"


def formatSerial(serial: int) -> str:
    """
    Lower-case hex without colons, zero-padded to whole bytes (Boulder's
    /acme/cert/<serial> form for its 18-byte serials).
    """
    text = format(serial, "x")
    return text.zfill(len(text) + len(text) % 2)


def formatTime(when: datetime) -> str:
    """ISO 8601 UTC with a Z: "YYYY-MM-DDTHH:MM:SSZ"."""
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parseTime(text: Any) -> Optional[float]:
    """
    The inverse of L{formatTime} for a cert event's not_before/not_after:
    POSIX seconds, or None for anything else.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _emptyDescription() -> Dict[str, Any]:
    return {"serial": "", "not_before": "", "not_after": "", "names": [], "issuer": ""}


def _names(leaf: x509.Certificate) -> List[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    names: List[str] = []
    for name in san:
        if isinstance(name, x509.DNSName):
            names.append(name.value)
        elif isinstance(name, x509.IPAddress):
            names.append(str(name.value))
    return names


def describeLeaf(body: bytes) -> Dict[str, Any]:
    """
    serial, not_before, not_after, names (DNS and IP SANs) and issuer (RFC
    4514) of the first certificate of a PEM chain. Only the first PEM block
    is parsed, so a chain cut short after the leaf still describes it. Each
    value is empty when the body holds no parsable certificate.
    """
    description = _emptyDescription()
    # find() rather than a regular expression: linear on hostile bodies.
    start = body.find(_BEGIN)
    end = body.find(_END, start + 1) if start >= 0 else -1
    if end < 0:
        return description
    try:
        leaf = x509.load_pem_x509_certificates(body[start : end + len(_END)])[0]
        description["serial"] = formatSerial(leaf.serial_number)
        description["not_before"] = formatTime(leaf.not_valid_before_utc)
        description["not_after"] = formatTime(leaf.not_valid_after_utc)
        description["issuer"] = leaf.issuer.rfc4514_string()
        description["names"] = _names(leaf)
    except Exception:
        # cryptography raises ValueError for most malformed input, but a
        # certificate is attacker-controllable input: never let it escape.
        return _emptyDescription()
    return description
