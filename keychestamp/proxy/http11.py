"""
Strict HTTP/1.1 request parsing (RFC 9112), sans-IO.

Anything that two parsers could read two ways (Content-Length beside
Transfer-Encoding, differing Content-Length values, whitespace before a colon,
obs-fold, bare LF) is refused, so what the proxy forwards is exactly what it
understood. The proxy then writes the upstream request itself from the parsed
parts; the client's raw bytes never go upstream. Upstream response heads are
held to the same rules (L{checkResponseHead}, L{checkRelayedResponse}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]+\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?\Z")

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)


class HTTPError(Exception):
    """
    A request the proxy refuses; C{status} is the answer it gets.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


@dataclass
class Limits:
    """
    Size limits of a request head.
    """

    maxRequestLine: int = 8192
    maxHeaderSize: int = 65536
    maxHeaders: int = 100


@dataclass
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: List[Tuple[bytes, bytes]]
    contentLength: Optional[int] = None
    chunked: bool = False
    keepAlive: bool = True
    connectionTokens: Tuple[bytes, ...] = field(default_factory=tuple)

    def get(self, name: bytes) -> Optional[bytes]:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    @property
    def hasBody(self) -> bool:
        return self.chunked or bool(self.contentLength)


def findHeadEnd(buffer: bytes, limits: Limits, start: int = 0) -> int:
    """
    The index just past the blank line that ends the head, or -1 while the
    head is incomplete. Raises L{HTTPError} once the head is too long to be
    allowed (414 for the request line, 431 for the header block).

    C{start} is how much of C{buffer} an earlier call already searched, so a
    client sending its head a byte at a time costs linear, not quadratic, time.
    """
    end = buffer.find(b"\r\n\r\n", max(0, start - 3))
    # a bare LF would otherwise leave us waiting for a CRLF CRLF until the timeout
    stop = end + 4 if end >= 0 else len(buffer)
    lf = buffer.find(b"\n", start, stop)
    while lf >= 0:
        if lf == 0 or buffer[lf - 1] != 0x0D:
            raise HTTPError(400, "bare LF in the head")
        lf = buffer.find(b"\n", lf + 1, stop)
    # the request line's end, looked for only where it may be
    lineEnd = buffer.find(b"\r\n", 0, limits.maxRequestLine + 2)
    if end >= 0:
        if end + 4 > limits.maxHeaderSize:
            if lineEnd < 0:
                raise HTTPError(414, "request line too long")
            raise HTTPError(431, "header block too large")
        return end + 4
    if lineEnd < 0 and len(buffer) - buffer.endswith(b"\r") > limits.maxRequestLine:
        raise HTTPError(414, "request line too long")
    if len(buffer) > limits.maxHeaderSize:
        raise HTTPError(431, "header block too large")
    return -1


def parseHead(head: bytes, limits: Limits) -> RequestHead:
    """
    Parse a complete request head (ending in CRLF CRLF) strictly.
    """
    if b"\n" in head.replace(b"\r\n", b""):
        raise HTTPError(400, "bare LF in request head")
    if b"\r" in head.replace(b"\r\n", b""):
        raise HTTPError(400, "bare CR in request head")
    lines = head[:-4].split(b"\r\n")
    requestLine = lines[0]
    if len(requestLine) > limits.maxRequestLine:
        raise HTTPError(414, "request line too long")
    parts = requestLine.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HTTPError(400, "method is not a token")
    if not _TARGET.match(target):
        raise HTTPError(400, "malformed request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/") and len(version) == 8:
            raise HTTPError(505, "HTTP version not supported")
        raise HTTPError(400, "malformed HTTP version")
    request = RequestHead(method, target, version, _fieldLines(lines[1:], limits))
    _framing(request)
    return request


def _fieldLines(lines: List[bytes], limits: Limits) -> List[Tuple[bytes, bytes]]:
    """
    The (name, value) pairs of a head's field lines, strictly: a token, the
    colon right after it, a value without control characters, no obs-fold.
    """
    if len(lines) > limits.maxHeaders:
        raise HTTPError(431, "too many header fields")
    headers: List[Tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon:
            raise HTTPError(400, "header line without a colon")
        if not _TOKEN.match(name):
            raise HTTPError(400, "malformed header name")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value):
            raise HTTPError(400, "control character in a header value")
        headers.append((name, value))
    return headers


def _commaList(values: List[bytes]) -> List[bytes]:
    return [item.strip(b" \t") for v in values for item in v.split(b",") if item.strip(b" \t")]


def _framing(request: RequestHead) -> None:
    lengths: List[bytes] = []
    codings: List[bytes] = []
    connection: List[bytes] = []
    for name, value in request.headers:
        lname = name.lower()
        if lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname == b"connection":
            connection.append(value)
    tokens = tuple(t.lower() for t in _commaList(connection))
    request.connectionTokens = tokens
    if request.version == b"HTTP/1.1":
        request.keepAlive = b"close" not in tokens
    else:
        request.keepAlive = False
    if codings:
        if lengths:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if request.version != b"HTTP/1.1":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        _onlyChunked(codings)
        request.chunked = True
    elif lengths:
        request.contentLength = _contentLength(lengths)


def _onlyChunked(codings: List[bytes]) -> None:
    if [c.lower() for c in _commaList(codings)] != [b"chunked"]:
        raise HTTPError(400, "unsupported Transfer-Encoding")


def _contentLength(lengths: List[bytes]) -> int:
    """
    The one length several Content-Length values agree on (RFC 9110 8.6).
    """
    values = set(_commaList(lengths)) if all(lengths) else {b""}
    if len(values) != 1:
        raise HTTPError(400, "conflicting Content-Length values")
    (value,) = values
    if not _DIGITS.match(value):
        raise HTTPError(400, "malformed Content-Length")
    return int(value)


def checkResponseHead(head: bytes, limits: Limits) -> int:
    """
    Check an upstream's response head (ending in CRLF CRLF) with the same
    strictness as a request head, and return its status code. Twisted's
    client parser alone would accept bare LF, whitespace before a colon,
    obs-fold, and Content-Length beside Transfer-Encoding. Raises
    L{HTTPError} (the proxy answers 502).
    """
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise HTTPError(502, "bare CR or LF in the response head")
    lines = head[:-4].split(b"\r\n")
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        raise HTTPError(502, "malformed status line")
    status = int(match.group(1))
    if not 100 <= status <= 599:
        raise HTTPError(502, "status code out of range")
    try:
        headers = _fieldLines(lines[1:], limits)
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        codings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
        if codings:
            if lengths:
                raise HTTPError(502, "both Content-Length and Transfer-Encoding")
            _onlyChunked(codings)
        elif lengths:
            _contentLength(lengths)
    except HTTPError as e:
        raise HTTPError(502, f"response: {e.reason}")
    return status


def checkRelayedResponse(
    code: int, headers: Iterable[Tuple[bytes, Sequence[bytes]]], limits: Limits
) -> None:
    """
    Check what the proxy is about to write to the client from a parsed
    upstream response: a real status code, token header names (whitespace
    before a colon ends up in Twisted's header name), values without control
    characters, and the header limits. Raises L{HTTPError} (502).
    """
    if not 100 <= code <= 599:
        raise HTTPError(502, "status code out of range")
    count = size = 0
    for name, values in headers:
        if not _TOKEN.match(name):
            raise HTTPError(502, "malformed header name")
        for value in values:
            if not _FIELD_VALUE.match(value):
                raise HTTPError(502, "control character in a header value")
            count += 1
            size += len(name) + len(value) + 4
    if count > limits.maxHeaders:
        raise HTTPError(502, "too many header fields")
    if size > limits.maxHeaderSize:
        raise HTTPError(502, "header block too large")


def parseAuthority(authority: bytes, defaultPort: Optional[int] = None) -> Tuple[str, int]:
    """
    host:port (or [v6]:port) of a CONNECT target or an absolute URL, checked:
    the port must be 1..65535 and the host a plausible name or address.
    """
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "non-ASCII authority")
    if "@" in text:
        raise HTTPError(400, "userinfo in authority")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HTTPError(400, "malformed IPv6 authority")
        host, rest = text[1:end], text[end + 1 :]
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise HTTPError(400, "malformed IPv6 address")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, rest = text, ""
        else:
            rest = ":" + port
        if not host or not _HOST.match(host):
            raise HTTPError(400, "malformed host")
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
            raise HTTPError(400, "malformed port")
        port = int(rest[1:])
    elif defaultPort is not None:
        port = defaultPort
    else:
        raise HTTPError(400, "CONNECT target needs host:port")
    if not 1 <= port <= 65535:
        raise HTTPError(400, "port out of range")
    host = host.lower().rstrip(".")
    if not host:
        raise HTTPError(400, "malformed host")
    return host, port


def splitAbsolute(target: bytes) -> Tuple[str, str, int, bytes]:
    """
    scheme, host, port and origin-form path of an absolute-form target.
    """
    scheme, sep, rest = target.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in (b"http", b"https"):
        raise HTTPError(400, "request target is not an absolute http URL")
    slash = len(rest)
    for stop in (b"/", b"?"):
        i = rest.find(stop)
        if 0 <= i < slash:
            slash = i
    authority, path = rest[:slash], rest[slash:]
    if b"#" in path:
        path = path.split(b"#", 1)[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    host, port = parseAuthority(authority, 443 if scheme == b"https" else 80)
    return scheme.decode("ascii"), host, port, path


class ChunkedDecoder:
    """
    Decodes a chunked body incrementally; C{feed} returns the data decoded so
    far and, once the last chunk and trailers are read, C{done} is true and
    C{leftover} holds the bytes that followed (a pipelined request).
    """

    maxLine = 4096
    maxTrailers = 65536

    def __init__(self) -> None:
        self._buffer = b""
        self._remaining = -1  # -1: expecting a size line; -2: expecting CRLF after data
        self._trailers = False
        self._trailerBytes = 0
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> List[bytes]:
        if self.done:
            self.leftover += data
            return []
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        out: List[bytes] = []
        pos = 0
        while pos < len(buffer):
            if self._remaining > 0:
                take = buffer[pos : pos + self._remaining]
                out.append(take)
                pos += len(take)
                self._remaining -= len(take)
                if self._remaining == 0:
                    self._remaining = -2
                continue
            if self._remaining == -2:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
                pos += 2
                self._remaining = -1
                continue
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                if len(buffer) - pos > self.maxLine:
                    raise HTTPError(400, "chunk size line too long")
                break
            line = buffer[pos:end]
            pos = end + 2
            if b"\n" in line or b"\r" in line:
                raise HTTPError(400, "bare CR or LF in chunked framing")
            if self._trailers:
                self._trailerBytes += len(line) + 2
                if self._trailerBytes > self.maxTrailers:
                    raise HTTPError(431, "trailers too large")
                if line == b"":
                    self.done = True
                    self.leftover = buffer[pos:]
                    return out
                name, colon, value = line.partition(b":")
                if not colon or not _TOKEN.match(name) or not _FIELD_VALUE.match(value.strip(b" \t")):
                    raise HTTPError(400, "malformed trailer field")
                continue
            size, _, extension = line.partition(b";")
            if not _HEX.match(size):
                raise HTTPError(400, "malformed chunk size")
            if extension and not _FIELD_VALUE.match(extension):
                raise HTTPError(400, "malformed chunk extension")
            n = int(size, 16)
            if n == 0:
                self._trailers = True
            else:
                self._remaining = n
        self._buffer = buffer[pos:]
        return out
