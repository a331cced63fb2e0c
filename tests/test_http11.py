# -*- test-case-name: tests.test_http11 -*-
"""
The strict HTTP/1.1 parsers, sans-IO: every refused request form with its
status (the same table drives the handler and real-socket tests in
test_hardening), property tests of the request-head parser and the chunked
decoder, and the strict check of upstream response heads.
"""

from __future__ import annotations

import time
from typing import List, Tuple, Union

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from keychestamp.proxy.http11 import (
    ChunkedDecoder,
    HTTPError,
    Limits,
    RequestHead,
    checkRelayedResponse,
    checkResponseHead,
    findHeadEnd,
    parseAuthority,
    parseHead,
    splitAbsolute,
)
from keychestamp.proxy.relay import BadResponseHead, StrictClientProtocol

#: In a template, {T} is replaced by the request target of the surface under
#: test (an absolute URL on the listening port, a path on a decrypted stream).
REJECTED: List[Tuple[str, bytes, int]] = [
    ("Content-Length with Transfer-Encoding",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding with Content-Length",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("two differing Content-Length fields",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("differing Content-Length list", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\nhello!", 400),
    ("Content-Length with a sign", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello", 400),
    ("negative Content-Length", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\nhello", 400),
    ("hexadecimal Content-Length", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\nhello", 400),
    ("empty Content-Length", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\nhello", 400),
    ("Content-Length with inner space", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: 5 5\r\n\r\nhello", 400),
    ("Content-Length of 19 digits", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000000000000000\r\n\r\n", 400),
    ("Content-Length in Arabic digits",
     "POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length: \u0665\r\n\r\nhello".encode("utf-8"), 400),
    ("Transfer-Encoding gzip", b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nxx", 400),
    ("Transfer-Encoding gzip, chunked",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding chunked, gzip",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding chunked twice",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding identity", b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    ("Transfer-Encoding in HTTP/1.0",
     b"POST {T} HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("space before a colon", b"GET {T} HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    ("tab before a colon", b"POST {T} HTTP/1.1\r\nHost: h\r\nContent-Length\t: 5\r\n\r\nhello", 400),
    ("obs-fold", b"GET {T} HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    ("field line without a colon", b"GET {T} HTTP/1.1\r\nHost: h\r\nX-No-Colon\r\n\r\n", 400),
    ("empty field name", b"GET {T} HTTP/1.1\r\nHost: h\r\n: x\r\n\r\n", 400),
    ("NUL in a value", b"GET {T} HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400),
    ("bare CR in a value", b"GET {T} HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400),
    ("bare LF line end", b"GET {T} HTTP/1.1\nHost: h\r\n\r\n", 400),
    ("bare LF between fields", b"GET {T} HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n", 400),
    ("method with a parenthesis", b"G(T {T} HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("method with a slash", b"GET/ {T} HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("method with a quote", b'G"T {T} HTTP/1.1\r\nHost: h\r\n\r\n', 400),
    ("method with a NUL", b"G\x00T {T} HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("two spaces in the request line", b"GET  {T} HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("DEL in the target", b"GET {T}\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("lower-case version", b"GET {T} http/1.1\r\nHost: h\r\n\r\n", 400),
    ("HTTP/2.0 request line", b"GET {T} HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    ("chunk size not hex", b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("negative chunk size", b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n", 400),
    ("chunk size with 0x", b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n", 400),
    ("chunk size with a space", b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n", 400),
    ("chunk size of 17 digits",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nx", 400),
    ("chunk data not followed by CRLF",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400),
    ("bare LF after a chunk size",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
    ("control character in a chunk extension",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;\x01\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk size line too long",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"a" * 5000, 400),
    ("malformed trailer",
     b"POST {T} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnot a trailer\r\n\r\n", 400),
    ("request line over 8 KiB", b"GET {T}" + b"a" * 8200 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    ("request line over 8 KiB, unfinished", b"GET {T}" + b"a" * 8200, 414),
    ("header block over 64 KiB",
     b"GET {T} HTTP/1.1\r\nHost: h\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n" * 1 + b"".join(
         b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000) for i in range(8)) + b"\r\n", 431),
    ("header block over 64 KiB, unfinished",
     b"GET {T} HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9)), 431),
    ("101 header fields",
     b"GET {T} HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: x\r\n" % i for i in range(100)) + b"\r\n", 431),
]

#: CONNECT forms, refused where CONNECT is allowed (the listening port).
CONNECT_REJECTED: List[Tuple[str, bytes, int]] = [
    ("CONNECT without a port", b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
    ("CONNECT to port 0", b"CONNECT example.com:0 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to port 65536", b"CONNECT example.com:65536 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to port 99999999", b"CONNECT example.com:99999999 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT with an empty port", b"CONNECT example.com: HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT with a named port", b"CONNECT example.com:https HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT with a negative port", b"CONNECT example.com:-443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT without a host", b"CONNECT :443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to a dot", b"CONNECT .:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT with userinfo", b"CONNECT user@example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to a URL", b"CONNECT https://example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT with a path", b"CONNECT example.com:443/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to an unclosed IPv6 literal", b"CONNECT [::1:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to a bad IPv6 literal", b"CONNECT [::g]:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT to a non-ASCII host", "CONNECT b\u00fccher.example:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    ("CONNECT with a body", b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("CONNECT line over 8 KiB", b"CONNECT " + b"a" * 8200 + b".example:443 HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("CONNECT head over 64 KiB",
     b"CONNECT example.com:443 HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9))
     + b"\r\n", 431),
    ("CONNECT with 101 fields",
     b"CONNECT example.com:443 HTTP/1.1\r\n" + b"".join(b"X-%d: x\r\n" % i for i in range(101)) + b"\r\n", 431),
]


def fill(template: bytes, target: bytes) -> bytes:
    """
    A table entry for the surface under test.
    """
    return template.replace(b"{T}", target)


def outcome(raw: bytes, limits: Limits = Limits()) -> Union[int, RequestHead, None]:
    """
    What the sans-IO layer makes of a client's bytes, read the way the handler
    reads them: the status of a refusal, the parsed head, or None while
    incomplete.
    """
    try:
        end = findHeadEnd(raw, limits)
        if end < 0:
            return None
        head = parseHead(raw[:end], limits)
        if head.method == b"CONNECT":
            parseAuthority(head.target)
            if head.hasBody:
                return 400
        else:
            splitAbsolute(head.target)
        if head.chunked:
            ChunkedDecoder().feed(raw[end:])
        return head
    except HTTPError as e:
        return e.status


class RejectedFormsTests(SynchronousTestCase):
    """
    Every form in the tables is refused with its status by the parser alone.
    """

    def test_rejected(self):
        """
        Each entry of REJECTED gets its status.
        """
        for name, template, status in REJECTED:
            self.assertEqual(outcome(fill(template, b"http://h/x")), status, name)

    def test_connectRejected(self):
        """
        Each entry of CONNECT_REJECTED gets its status.
        """
        for name, raw, status in CONNECT_REJECTED:
            self.assertEqual(outcome(raw), status, name)

    def test_accepted(self):
        """
        Near misses that are valid are accepted: repeated equal lengths,
        trailing whitespace around values, CONNECT to an IPv6 literal,
        obs-text in a value.
        """
        for raw in (
            b"POST http://h/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"POST http://h/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
            b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nX-A: \t value \t\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nX-A: caf\xe9\r\n\r\n",
            b"GET http://h/ HTTP/1.0\r\n\r\n",
            b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT example.com.:65535 HTTP/1.1\r\n\r\n",
        ):
            self.assertIsInstance(outcome(raw), RequestHead, raw)

    def test_parsedParts(self):
        """
        The parser keeps names as sent, trims values, reads the framing and
        the Connection tokens.
        """
        head = outcome(
            b"POST http://h/p?q HTTP/1.1\r\nX-MiXed:  a b \r\nContent-Length: 5, 5\r\n"
            b"Connection: close, X-MiXed\r\n\r\nhello"
        )
        assert isinstance(head, RequestHead)
        self.assertEqual(head.headers[0], (b"X-MiXed", b"a b"))
        self.assertEqual(head.contentLength, 5)
        self.assertFalse(head.keepAlive)
        self.assertEqual(head.connectionTokens, (b"close", b"x-mixed"))

    def test_authority(self):
        """
        parseAuthority lower-cases, drops a final dot, takes ports 1..65535.
        """
        self.assertEqual(parseAuthority(b"Example.COM.:443"), ("example.com", 443))
        self.assertEqual(parseAuthority(b"[::1]:1"), ("::1", 1))
        self.assertEqual(parseAuthority(b"h", 80), ("h", 80))
        for bad in (b"h:0", b"h:65536", b"..:443", b"[]:443", b"h:44 3"):
            self.assertRaises(HTTPError, parseAuthority, bad)


class LimitTests(SynchronousTestCase):
    """
    The head limits are configurable and checked before the head is complete.
    """

    def test_configurable(self):
        """
        Smaller limits give 414 and 431 at their own sizes.
        """
        limits = Limits(maxRequestLine=100, maxHeaderSize=1000, maxHeaders=3)
        self.assertEqual(outcome(b"GET http://h/" + b"a" * 100 + b" HTTP/1.1\r\n\r\n", limits), 414)
        self.assertIsInstance(outcome(b"GET http://h/" + b"a" * 70 + b" HTTP/1.1\r\n\r\n", limits), RequestHead)
        self.assertEqual(outcome(b"GET http://h/ HTTP/1.1\r\nX: " + b"a" * 1000, limits), 431)
        self.assertEqual(outcome(b"GET http://h/ HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", limits), 431)

    def test_exactLimit(self):
        """
        A request line of exactly the limit is allowed, one byte more is not,
        also while its CRLF is still arriving.
        """
        limits = Limits(maxRequestLine=30)
        line = b"GET http://h/" + b"a" * (30 - len(b"GET http://h/ HTTP/1.1")) + b" HTTP/1.1"
        self.assertEqual(len(line), 30)
        self.assertEqual(findHeadEnd(line + b"\r", limits), -1)
        self.assertIsInstance(outcome(line + b"\r\n\r\n", limits), RequestHead)
        self.assertEqual(outcome(line[:-8] + b"a HTTP/1.1\r", limits), 414)

    def test_dribbledHeadIsLinear(self):
        """
        A 64 KiB head sent a byte at a time, searched incrementally as the
        handler does, costs well under a second (it was quadratic).
        """
        data = b"GET http://h/ HTTP/1.1\r\n" + b"X-A: " + b"a" * 65400
        limits = Limits()
        buffer = b""
        started = time.process_time()
        with self.assertRaises(HTTPError) as caught:
            for i in range(len(data) + 200):
                buffer += data[i : i + 1] or b"b"
                findHeadEnd(buffer, limits, len(buffer) - 1)
        self.assertEqual(caught.exception.status, 431)
        self.assertLess(time.process_time() - started, 0.6)


class ChunkedDecoderTests(SynchronousTestCase):
    """
    The chunked decoder, fed in pieces.
    """

    def test_decode(self):
        """
        Chunks, extensions and trailers decode to the data; what follows the
        last chunk is left over (a pipelined request).
        """
        decoder = ChunkedDecoder()
        raw = b"5;a=b\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n"
        out = b"".join(b"".join(decoder.feed(raw[i : i + 3])) for i in range(0, len(raw), 3))
        self.assertEqual(out, b"hello 0123456789")
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.leftover, b"GET / HTTP/1.1\r\n")

    def test_trailersBounded(self):
        """
        Endless trailers get 431 once they pass 64 KiB.
        """
        decoder = ChunkedDecoder()
        decoder.feed(b"0\r\n")
        with self.assertRaises(HTTPError) as caught:
            for _ in range(2000):
                decoder.feed(b"X-T: " + b"a" * 60 + b"\r\n")
        self.assertEqual(caught.exception.status, 431)

    def test_dribbledSizeLine(self):
        """
        A size line dribbled a byte at a time is refused at 4 KiB, quickly.
        """
        decoder = ChunkedDecoder()
        started = time.process_time()
        with self.assertRaises(HTTPError):
            decoder.feed(b"5;")
            for _ in range(5000):
                decoder.feed(b"a")
        self.assertLess(time.process_time() - started, 0.5)


def _decode(pieces: List[bytes]) -> Tuple[str, bytes, bytes]:
    """
    ("ok", data, leftover) or ("error", status, b"") for input in pieces.
    """
    decoder = ChunkedDecoder()
    out = []
    try:
        for piece in pieces:
            out.extend(decoder.feed(piece))
    except HTTPError as e:
        return ("error", str(e.status).encode(), b"")
    return ("ok" if decoder.done else "open", b"".join(out), decoder.leftover)


def _split(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


_FRAGMENTS = [
    b"GET", b"POST", b"CONNECT", b" ", b"  ", b"\t", b"http://", b"h", b"/", b"[::1]", b":", b"443", b"0",
    b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"Host: h", b"Content-Length: ", b"5",
    b"-1", b",", b"Transfer-Encoding: ", b"chunked", b"gzip", b"Connection: close", b"\x00", b"\xff",
    b"hello", b"a" * 100, b"5\r\nhello\r\n", b"0\r\n\r\n", b";x=y",
]

_heads = st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map(b"".join)
_tokens = st.text("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12)
_values = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)

_PROPERTY = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


class PropertyTests(SynchronousTestCase):
    """
    Whatever the bytes: a well-formed request or a clean refusal, never
    another exception, in bounded time, whichever way the bytes are split.
    """

    def _clean(self, result: object) -> None:
        if isinstance(result, int):
            self.assertIn(result, (400, 414, 431, 505))
        else:
            self.assertTrue(result is None or isinstance(result, RequestHead), result)

    @_PROPERTY
    @given(st.binary(max_size=3000))
    def test_anyBytes(self, raw):
        """
        Random bytes: a head, a 4xx/505, or still incomplete.
        """
        self._clean(outcome(raw))

    @_PROPERTY
    @given(_heads)
    def test_nearlyRequests(self, raw):
        """
        Requests assembled from HTTP-looking fragments: the same.
        """
        self._clean(outcome(raw))

    @_PROPERTY
    @given(_heads, st.lists(st.integers(min_value=0), max_size=10))
    def test_splitInvariant(self, raw, cuts):
        """
        Searching for the head's end incrementally, as the handler does,
        accepts the same head (or refuses, or waits) as searching it whole.
        """
        limits = Limits(maxRequestLine=64, maxHeaderSize=256)

        def judge(buffer: bytes, end: int) -> Union[int, str]:
            try:
                if end >= 0:
                    parseHead(buffer[:end], limits)
                return end
            except HTTPError:
                return "refused"

        def whole() -> Union[int, str]:
            try:
                return judge(raw, findHeadEnd(raw, limits))
            except HTTPError:
                return "refused"

        def incremental() -> Union[int, str]:
            buffer, scanned = b"", 0
            try:
                for piece in _split(raw, cuts):
                    buffer += piece
                    end = findHeadEnd(buffer, limits, scanned)
                    if end >= 0:
                        return judge(buffer, end)
                    scanned = len(buffer)
                return -1
            except HTTPError:
                return "refused"

        self.assertEqual(incremental(), whole())

    @_PROPERTY
    @given(
        st.sampled_from([b"GET", b"POST", b"PUT", b"X-CUSTOM"]),
        st.lists(st.tuples(_tokens, _values), max_size=20),
    )
    def test_roundTrip(self, method, fields):
        """
        A well-formed request parses back to what was written.
        """
        fields = [(n.encode(), v) for n, v in fields if n.lower() not in ("content-length", "transfer-encoding")]
        raw = b"%s http://h/p HTTP/1.1\r\n%s\r\n" % (method, b"".join(b"%s: %s\r\n" % f for f in fields))
        head = outcome(raw)
        assert isinstance(head, RequestHead), head
        self.assertEqual((head.method, head.target, head.headers), (method, b"http://h/p", fields))

    @_PROPERTY
    @given(st.binary(max_size=3000))
    def test_decoderAnyBytes(self, raw):
        """
        Random bytes into the chunked decoder: data or a 400/431.
        """
        state, data, _ = _decode([raw])
        if state == "error":
            self.assertIn(data, (b"400", b"431"))

    @_PROPERTY
    @given(
        st.lists(st.binary(min_size=1, max_size=300), max_size=8),
        st.lists(st.sampled_from([b"", b";a", b";a=b", b';a="q"']), min_size=8, max_size=8),
        st.lists(st.integers(min_value=0), max_size=12),
        st.binary(max_size=20),
    )
    def test_decoderRoundTrip(self, chunks, extensions, cuts, after):
        """
        Chunked-encoded data split anywhere decodes to the data, with what
        follows left over.
        """
        raw = b"".join(b"%x%s\r\n%s\r\n" % (len(c), e, c) for c, e in zip(chunks, extensions))
        raw += b"0\r\n\r\n" + after
        self.assertEqual(_decode(_split(raw, cuts)), ("ok", b"".join(chunks), after))

    @_PROPERTY
    @given(
        st.lists(st.sampled_from([b"5", b"0", b"a", b"\r\n", b"\n", b"hello", b";x", b"\r", b"z", b" "]), max_size=30),
        st.lists(st.integers(min_value=0), max_size=10),
    )
    def test_decoderSplitInvariant(self, parts, cuts):
        """
        How bytes are split never changes what the decoder makes of them.
        """
        raw = b"".join(parts)
        self.assertEqual(_decode(_split(raw, cuts)), _decode([raw]))


class ResponseHeadTests(SynchronousTestCase):
    """
    Upstream response heads are held to the same strictness (502).
    """

    BAD = [
        ("Content-Length with Transfer-Encoding",
         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("differing Content-Length fields", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
        ("Content-Length with a sign", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"),
        ("Transfer-Encoding gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ("chunked, then gzip on another line",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ("space before a colon", b"HTTP/1.1 200 OK\r\nContent-Type : text/plain\r\n\r\n"),
        ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n"),
        ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"),
        ("garbage status line", b"garbage\r\n\r\n"),
        ("status 600", b"HTTP/1.1 600 What\r\n\r\n"),
        ("four-digit status", b"HTTP/1.1 2000 OK\r\n\r\n"),
        ("HTTP/2 status line", b"HTTP/2 200 OK\r\n\r\n"),
        ("NUL in a value", b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n"),
        ("101 fields", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n"),
    ]

    def test_bad(self):
        """
        Each bad head is refused with 502.
        """
        for name, head in self.BAD:
            with self.assertRaises(HTTPError, msg=name) as caught:
                checkResponseHead(head, Limits())
            self.assertEqual(caught.exception.status, 502, name)

    def test_good(self):
        """
        Ordinary heads pass and give their status.
        """
        self.assertEqual(checkResponseHead(b"HTTP/1.1 204\r\n\r\n", Limits()), 204)
        self.assertEqual(checkResponseHead(b"HTTP/1.0 100 Continue\r\n\r\n", Limits()), 100)
        self.assertEqual(
            checkResponseHead(b"HTTP/1.1 201 Cr\xe9\xe9\r\nContent-Length: 2, 2\r\nLink: <a>\r\nLink: <b>\r\n\r\n", Limits()),
            201,
        )

    def test_relayed(self):
        """
        What Twisted's lenient parser lets through is checked before it is
        written to the client: status range, names, values, limits.
        """
        limits = Limits(maxHeaders=2, maxHeaderSize=100)
        checkRelayedResponse(200, [(b"Content-Type", [b"text/plain"])], limits)
        for code, headers in (
            (-1, []),
            (1000, []),
            (200, [(b"content-type ", [b"x"])]),
            (200, [(b"x", [b"a\rb"])]),
            (200, [(b"x", [b"1", b"2", b"3"])]),
            (200, [(b"x", [b"a" * 100])]),
        ):
            with self.assertRaises(HTTPError, msg=repr((code, headers))) as caught:
                checkRelayedResponse(code, headers, limits)
            self.assertEqual(caught.exception.status, 502)


class StrictClientProtocolTests(SynchronousTestCase):
    """
    The Agent's connection protocol checks each response head before
    Twisted's parser sees it.
    """

    def _request(self):
        protocol = StrictClientProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        d = protocol.request(Request(b"GET", b"/", Headers({b"host": [b"h"]}), None))
        return protocol, transport, d

    def test_refused(self):
        """
        Content-Length beside Transfer-Encoding (which Twisted alone would
        read as chunked) fails the request and closes the connection.
        """
        protocol, transport, d = self._request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-")
        self.assertNoResult(d)
        protocol.dataReceived(b"Encoding: chunked\r\n\r\n0\r\n\r\n")
        failure = self.failureResultOf(d, ResponseNeverReceived)
        (reason,) = failure.value.reasons
        self.assertIsInstance(reason.value, BadResponseHead)
        self.assertTrue(transport.disconnecting)

    def test_bareLFEarly(self):
        """
        A bare LF fails the request at once, not when the head would end.
        """
        protocol, transport, d = self._request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\n")
        self.failureResultOf(d, ResponseNeverReceived)

    def test_byteByByteWithInterim(self):
        """
        A 100 Continue and then a good response, a byte at a time, arrive as
        the final response with its body.
        """
        protocol, transport, d = self._request()
        raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok"
        for i in range(len(raw)):
            protocol.dataReceived(raw[i : i + 1])
        response = self.successResultOf(d)
        self.assertEqual((response.code, response.headers.getRawHeaders(b"x-a")), (200, [b"b"]))
        from twisted.web.client import readBody

        self.assertEqual(self.successResultOf(readBody(response)), b"ok")

    def test_interimThenBad(self):
        """
        The head after a 1xx is checked too.
        """
        protocol, transport, d = self._request()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nA : b\r\n\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertIsInstance(failure.value.reasons[0].value, BadResponseHead)
