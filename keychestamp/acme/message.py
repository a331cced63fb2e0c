"""
A parsed, read-only view of one relayed exchange, as the classifier needs it.

Parsing is lazy and bounded: the request body is decoded as a JWS only for a
POST whose body starts like JSON, the response body is parsed as JSON only
when its content type (or, without one, its first byte) says JSON, and never
when the proxy truncated it. Nothing here raises on hostile input.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urljoin, urlsplit

from keychestamp.exchange import Exchange, headerValue, headerValues

from .jws import NOT_JSON, DecodedJWS, decodeJWS, loadJSON

__all__ = [
    "AcmeMessage",
    "PEM_CHAIN",
    "PROBLEM_JSON",
    "linkTargets",
    "originOf",
    "parseRetryAfter",
    "splitURL",
    "urlPath",
]

PROBLEM_JSON = "application/problem+json"
PEM_CHAIN = "application/pem-certificate-chain"

_DEFAULT_PORTS = {"https": 443, "http": 80}

_REL = re.compile(r"""\brel\s*=\s*(?:"([^"]*)"|([^\s;,]+))""", re.IGNORECASE)


def originOf(scheme: str, host: str, port: Optional[int]) -> str:
    """
    scheme://authority in one canonical form (lower case, IPv6 in brackets,
    no default port), so that URLs named by a server and the exchange's own
    origin compare equal.
    """
    scheme = scheme.lower()
    host = host.lower().strip("[]")
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


_SIMPLE_URL = re.compile(r"(https?)://([a-z0-9.-]+)(?::([0-9]{1,5}))?(/[^#\s\\]*)?\Z", re.IGNORECASE)


def splitURL(url: Any, base: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """
    (origin, path with query) of an absolute URL, or of a relative one
    resolved against C{base}; None for anything that is not an http(s) URL.
    """
    if not isinstance(url, str) or not url:
        return None
    simple = _SIMPLE_URL.match(url)
    if simple is not None and (simple.group(3) is None or int(simple.group(3)) <= 65535):
        # the common case (absolute, a plain host): no urllib on the hot path
        scheme, host, port, path = simple.groups()
        return originOf(scheme, host, int(port) if port else None), path or "/"
    try:
        if base is not None:
            url = urljoin(base, url)
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        return None
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return originOf(parts.scheme, parts.hostname, port), path


def urlPath(url: Any) -> str:
    """
    The path component of a URL ("/acme/acct/11760188"), which is what events
    carry instead of whole URLs; '' for anything that is not a string URL.
    """
    if not isinstance(url, str):
        return ""
    try:
        return urlsplit(url).path
    except ValueError:
        return ""


def parseRetryAfter(value: Optional[str]) -> Union[int, str, None]:
    """
    Retry-After (RFC 9110 §10.2.3) as int seconds, or the raw text when it is
    an HTTP date; None when absent or empty.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    return value


def linkTargets(headers: List[Tuple[str, str]], rel: str) -> List[str]:
    """
    The targets of the C{Link} headers (RFC 8288) with relation C{rel}, in
    order; one header may carry several comma-separated links.
    """
    targets = []
    for value in headerValues(headers, "link"):
        for target, params in _splitLinks(value):
            for quoted, bare in _REL.findall(params):
                if rel in (quoted or bare).lower().split():
                    targets.append(target.strip())
                    break
    return targets


def _splitLinks(value: str) -> List[Tuple[str, str]]:
    """
    (target, parameters) of each link in one Link value; str.find keeps it
    linear whatever the server sends, and parameters are capped in length.
    """
    links = []
    position = 0
    while True:
        start = value.find("<", position)
        if start < 0:
            break
        end = value.find(">", start)
        if end < 0:
            break
        following = value.find("<", end)
        params = value[end + 1 : following if following >= 0 else len(value)]
        links.append((value[start + 1 : end], params[:512]))
        position = end + 1
    return links


def _mediaType(headers: List[Tuple[str, str]]) -> str:
    value = headerValue(headers, "content-type")
    if value is None:
        return ""
    return value.split(";", 1)[0].strip().lower()


def _startsWith(body: bytes, char: bytes) -> bool:
    return body[:64].lstrip()[:1] == char


class AcmeMessage:
    """
    The request and response of one exchange, decoded on demand.
    """

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.method = exchange.method.upper()
        self.origin = originOf(exchange.scheme, exchange.host, exchange.port)
        self.path = exchange.path
        self.url = f"{self.origin}{self.path}"
        self.status = exchange.status
        self.truncated = bool(exchange.requestTruncated or exchange.responseTruncated)

    @cached_property
    def jws(self) -> Optional[DecodedJWS]:
        """The request's JWS (ACME POSTs), or None."""
        body = self.exchange.requestBody
        if self.method != "POST" or self.exchange.requestTruncated:
            return None
        if not body or not _startsWith(body, b"{"):
            return None
        return decodeJWS(body)

    @cached_property
    def payload(self) -> Dict[str, Any]:
        """The JWS payload when it is a JSON object, else {}."""
        return self.jws.payloadObject if self.jws is not None else {}

    @cached_property
    def responseType(self) -> str:
        """The response's media type, lower case, without parameters."""
        return _mediaType(self.exchange.responseHeaders)

    @cached_property
    def responseJSON(self) -> Optional[Dict[str, Any]]:
        """The response body when it is a JSON object, else None."""
        body = self.exchange.responseBody
        if not body or self.exchange.responseTruncated:
            return None
        kind = self.responseType
        if kind:
            if not kind.endswith("json"):  # application/json, application/problem+json
                return None
        elif not _startsWith(body, b"{"):
            return None
        value = loadJSON(body)
        return value if value is not NOT_JSON and isinstance(value, dict) else None

    @cached_property
    def problem(self) -> Optional[Dict[str, Any]]:
        """
        The RFC 7807 problem document of a failed exchange: served as
        application/problem+json, or (servers that get the type wrong) any
        JSON error answer whose type is an ACME error URN.
        """
        body = self.responseJSON
        if self.responseType == PROBLEM_JSON:
            return body if body is not None else {}
        if body is not None and self.status >= 400:
            kind = body.get("type")
            if isinstance(kind, str) and kind.startswith("urn:ietf:params:acme:error:"):
                return body
        return None

    @cached_property
    def agent(self) -> str:
        """The client's User-Agent, or ''."""
        return headerValue(self.exchange.requestHeaders, "user-agent") or ""

    @cached_property
    def location(self) -> str:
        """The response's Location resolved to an absolute URL, or ''."""
        value = headerValue(self.exchange.responseHeaders, "location")
        if not value:
            return ""
        try:
            return urljoin(self.url, value.strip())
        except ValueError:
            return ""

    @cached_property
    def retryAfter(self) -> Union[int, str, None]:
        """The response's Retry-After, parsed by L{parseRetryAfter}."""
        return parseRetryAfter(headerValue(self.exchange.responseHeaders, "retry-after"))

    def links(self, rel: str) -> List[str]:
        """Absolute targets of the response's Link headers with relation C{rel}."""
        result = []
        for target in linkTargets(self.exchange.responseHeaders, rel):
            try:
                result.append(urljoin(self.url, target))
            except ValueError:
                continue
        return result

    def hasHeader(self, name: str) -> bool:
        """The response carries header C{name}."""
        return headerValue(self.exchange.responseHeaders, name) is not None
