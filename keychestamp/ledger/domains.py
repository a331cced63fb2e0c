# -*- test-case-name: tests.test_ledger_domains -*-
"""
Identifiers as rate limits see them: the exact set of an order, and the
registered domain each name counts against.

The registered domain comes from the Public Suffix List bundled in the
``publicsuffixlist`` package (ICANN and private sections, as Let's Encrypt
uses it; no network at run time): ``www.example.co.uk`` counts against
``example.co.uk``, ``foo.github.io`` against itself. A name that is itself a
public suffix counts against itself. An IPv4 address counts as its own
domain, an IPv6 address by its /64, as at Let's Encrypt.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

from publicsuffixlist import PublicSuffixList

__all__ = ["Domains", "identifierSet", "identifierValue", "normalise", "setKey", "setFromKey"]

_CACHE_SIZE = 4096


def normalise(value: str) -> str:
    """
    A DNS name or IP address as the ledger keys it: lower case, no trailing
    dot, A-labels (an IDN written in Unicode is converted), IPs canonical.
    """
    value = value.strip().rstrip(".").lower()
    if ":" in value or value.replace(".", "").isdigit():
        # only what could be an address pays for the (raising) parse
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    if not value.isascii():
        try:
            value = ".".join(
                label if label == "*" else label.encode("idna").decode("ascii")
                for label in value.split(".")
            )
        except UnicodeError:
            pass
    return value


def identifierValue(identifier: Any) -> Optional[str]:
    """
    The normalised value of an ACME identifier ``{"type", "value"}`` (or a
    bare name), or None when it has none.
    """
    if isinstance(identifier, dict):
        identifier = identifier.get("value")
    if isinstance(identifier, str) and identifier.strip():
        return normalise(identifier)
    return None


def identifierSet(identifiers: Any) -> Tuple[str, ...]:
    """
    The exact set of identifiers, sorted, without repeats: what Let's
    Encrypt's "exact set" limit compares.
    """
    if not isinstance(identifiers, (list, tuple)):
        return ()
    values = {identifierValue(i) for i in identifiers}
    return tuple(sorted(v for v in values if v))


def setKey(identifiers: Iterable[str]) -> str:
    """A set as one string (a JSON list), for keys in the ledger."""
    return json.dumps(list(identifiers), separators=(",", ":"))


def setFromKey(key: str) -> List[str]:
    """The identifiers of a L{setKey} string."""
    try:
        value = json.loads(key)
    except ValueError:
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


class Domains:
    """
    Registered domains from the bundled Public Suffix List. Loading the list
    costs a few milliseconds, so one instance serves a ledger.
    """

    def __init__(self, psl: Optional[PublicSuffixList] = None) -> None:
        self._psl = psl if psl is not None else PublicSuffixList()
        self._cache: Dict[str, str] = {}

    def registered(self, value: str) -> str:
        """
        The registered domain C{value} counts against (see the module
        docstring); C{value} may be a wildcard, an IP address or an IDN.
        """
        name = normalise(value)
        if name.startswith("*."):
            name = name[2:]
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        result = self._compute(name)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[name] = result
        return result

    def _compute(self, name: str) -> str:
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            if address.version == 6:
                return str(ipaddress.ip_network(f"{address}/64", strict=False))
            return str(address)
        try:
            private = self._psl.privatesuffix(name)
        except Exception:
            private = None
        return private or name

    def registeredSet(self, identifiers: Iterable[str]) -> Tuple[str, ...]:
        """The distinct registered domains of a set, sorted."""
        return tuple(sorted({self.registered(i) for i in identifiers}))
