# -*- test-case-name: tests.test_ledger_limits -*-
"""
The limit table: which rate limits each ACME server has, as data.

Let's Encrypt's production and staging directories get Let's Encrypt's
published values; any other server gets none unless ``--limits FILE`` names
it. The file is a JSON object mapping a directory URL (or ``"*"``, any server
not named otherwise) to limits by name::

    {"https://acme.example.net/directory":
        {"certs-per-exact-set": {"capacity": 5, "period_s": 604800}},
     "*": {"new-orders-per-account": {"capacity": 100, "period_s": 10800}}}

An entry for a directory that has built-in values is merged over them name by
name; ``null`` switches a built-in limit off.

Events name their server as ``host[:port]`` (the port only when it is not
the default), so a URL matches by its host and port; when several URLs share
one, the one whose path is the directory path the proxy saw wins.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from keychestamp.ledger.buckets import Limit

__all__ = [
    "BUILTIN",
    "LETS_ENCRYPT",
    "LIMIT_NAMES",
    "LimitTable",
    "LimitsError",
    "loadLimits",
    "serverOf",
]

NEW_ORDERS = "new-orders-per-account"
CERTS_PER_DOMAIN = "certs-per-registered-domain"
CERTS_PER_SET = "certs-per-exact-set"
FAILED_AUTHZ = "failed-authz-per-identifier-per-account"
NEW_ACCOUNTS = "new-accounts-per-ip"

#: Every limit the ledger knows, in the order reports show them.
LIMIT_NAMES: Tuple[str, ...] = (NEW_ORDERS, CERTS_PER_DOMAIN, CERTS_PER_SET, FAILED_AUTHZ, NEW_ACCOUNTS)

_HOUR = 3600
_WEEK = 7 * 24 * _HOUR

#: Let's Encrypt's published values (letsencrypt.org/docs/rate-limits).
LETS_ENCRYPT: Mapping[str, Limit] = {
    NEW_ORDERS: Limit(NEW_ORDERS, 300, 3 * _HOUR),
    CERTS_PER_DOMAIN: Limit(CERTS_PER_DOMAIN, 50, _WEEK),
    CERTS_PER_SET: Limit(CERTS_PER_SET, 5, _WEEK),
    FAILED_AUTHZ: Limit(FAILED_AUTHZ, 5, _HOUR),
    NEW_ACCOUNTS: Limit(NEW_ACCOUNTS, 10, 3 * _HOUR),
}

#: Built-in entries. Staging gets production's values: its own are higher,
#: so warnings come early there; a --limits entry can say otherwise.
BUILTIN: Mapping[str, Mapping[str, Limit]] = {
    "https://acme-v02.api.letsencrypt.org/directory": LETS_ENCRYPT,
    "https://acme-staging-v02.api.letsencrypt.org/directory": LETS_ENCRYPT,
}

_DEFAULT_PORTS = {"https": 443, "http": 80}


class LimitsError(ValueError):
    """
    The --limits file is unreadable or not a limit table; str() is one line.
    """


def serverOf(url: str) -> Tuple[str, str]:
    """
    (``host[:port]`` as events name the server, path) of a directory URL.

    @raise LimitsError: not an http(s) URL with a host.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise LimitsError(f"{url!r} is not a URL: {e}") from None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        raise LimitsError(f"{url!r} is not an http(s) directory URL")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme.lower()]:
        host = f"{host}:{port}"
    return host, parts.path or "/"


def _parseLimit(where: str, name: str, value: Any) -> Optional[Limit]:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"capacity", "period_s"}:
        raise LimitsError(f'{where}: {name} must be {{"capacity": N, "period_s": S}} or null')
    capacity, period = value["capacity"], value["period_s"]
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise LimitsError(f"{where}: {name}: capacity must be a positive integer")
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not period > 0:
        raise LimitsError(f"{where}: {name}: period_s must be a positive number of seconds")
    return Limit(name, capacity, float(period))


def parseLimits(data: Any, where: str = "--limits") -> Dict[str, Dict[str, Optional[Limit]]]:
    """
    Check a decoded limits document; URL (or ``*``) -> name -> Limit or None.

    @raise LimitsError: on anything that is not a limit table, naming it.
    """
    if not isinstance(data, dict):
        raise LimitsError(f"{where}: must be a JSON object mapping directory URLs to limits")
    table: Dict[str, Dict[str, Optional[Limit]]] = {}
    for url, limits in data.items():
        if url != "*":
            serverOf(url)
        if not isinstance(limits, dict):
            raise LimitsError(f"{where}: {url}: must be an object of limits by name")
        entry: Dict[str, Optional[Limit]] = {}
        for name, value in limits.items():
            if name not in LIMIT_NAMES:
                raise LimitsError(f"{where}: {url}: unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
            entry[name] = _parseLimit(f"{where}: {url}", name, value)
        table[url] = entry
    return table


def loadLimits(path: Optional[str]) -> "LimitTable":
    """
    The limit table: the built-ins, with the file at C{path} (if any) over them.

    @raise LimitsError: the file cannot be read or is not a limit table.
    """
    if path is None:
        return LimitTable()
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise LimitsError(f"--limits: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise LimitsError(f"--limits: {path} is not valid JSON: {e}") from None
    return LimitTable(parseLimits(data, f"--limits {path}"))


class LimitTable:
    """
    Limits per ACME server: the built-ins, and a parsed file over them.
    """

    def __init__(self, overrides: Optional[Mapping[str, Mapping[str, Optional[Limit]]]] = None) -> None:
        merged: Dict[str, Dict[str, Optional[Limit]]] = {url: dict(v) for url, v in BUILTIN.items()}
        for url, entry in (overrides or {}).items():
            merged.setdefault(url, {}).update(entry)
        self._default = {n: v for n, v in merged.pop("*", {}).items() if v is not None}
        # server (host[:port]) -> [(path, url, limits)]
        self._byServer: Dict[str, list] = {}
        for url in sorted(merged):
            server, path = serverOf(url)
            limits = {n: v for n, v in merged[url].items() if v is not None}
            self._byServer.setdefault(server, []).append((path, url, limits))

    def entries(self) -> Iterable[Tuple[str, Mapping[str, Limit]]]:
        """(URL or ``*``, limits) of every entry, for documentation and reports."""
        for server in sorted(self._byServer):
            for _, url, limits in self._byServer[server]:
                yield url, limits
        if self._default:
            yield "*", self._default

    def lookup(self, server: str, directoryPath: Optional[str] = None) -> Tuple[Optional[str], Mapping[str, Limit]]:
        """
        (the directory URL of the matching entry or None for ``*`` or no
        entry, its limits by name) for a server as events name it.
        """
        candidates = self._byServer.get(server.lower())
        if not candidates:
            return None, dict(self._default)
        for path, url, limits in candidates:
            if path == directoryPath:
                return url, limits
        _, url, limits = candidates[0]
        return url, limits
