# -*- test-case-name: tests.test_admin -*-
"""
The admin listener's twisted.web resources: C{/} (the status page),
C{/status.json}, C{/metrics} (Prometheus text format) and C{/healthz}.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request

from keychestamp.admin.metrics import AdminMetrics
from keychestamp.admin.page import renderPage
from keychestamp.admin.status import StatusSource

#: On every answer: nothing runs, nothing loads from elsewhere, nothing is
#: cached or framed, even if a value ever escaped the escaping.
SECURITY_HEADERS = (
    (b"Content-Security-Policy",
     b"default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
     b"frame-ancestors 'none'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
)


def _secure(request: Request, contentType: bytes) -> None:
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", contentType)


class _Leaf(Resource):
    """
    A resource with no children: anything under it is 404.
    """

    isLeaf = True

    def __init__(self, source: StatusSource) -> None:
        super().__init__()
        self._source = source

    def render(self, request: Request) -> Any:
        if request.postpath:
            return NoResource().render(request)
        return super().render(request)


class StatusPage(_Leaf):
    """
    C{/}: the HTML status page.
    """

    def render_GET(self, request: Request) -> bytes:
        _secure(request, b"text/html; charset=utf-8")
        return renderPage(self._source.status())


class StatusJSON(_Leaf):
    """
    C{/status.json}: the page's data.
    """

    def render_GET(self, request: Request) -> bytes:
        _secure(request, b"application/json; charset=utf-8")
        return json.dumps(self._source.status(), indent=1, sort_keys=True).encode("utf-8") + b"\n"


class Healthz(_Leaf):
    """
    C{/healthz}: 200 while the proxy listens and its sinks take events,
    else 503; the body says why.
    """

    def render_GET(self, request: Request) -> bytes:
        _secure(request, b"text/plain; charset=utf-8")
        healthy, reasons = self._source.healthz()
        if healthy:
            return b"ok\n"
        request.setResponseCode(503)
        return ("\n".join(reasons) + "\n").encode("utf-8")


class Metrics(_Leaf):
    """
    C{/metrics}: prometheus_client's Twisted resource on the proxy's own
    registry. The gauges are refreshed here, on the reactor thread; the
    resource then renders in the reactor's thread pool.
    """

    def __init__(self, source: StatusSource, metrics: AdminMetrics) -> None:
        super().__init__(source)
        self._metrics = metrics
        self._exposition: Optional[Resource] = None

    def render(self, request: Request) -> Any:
        if request.postpath:
            return NoResource().render(request)
        if self._exposition is None:
            # Made on first use: it takes the reactor's thread pool, which
            # should not be started just because the admin listener exists.
            from prometheus_client.twisted import MetricsResource

            self._exposition = MetricsResource(registry=self._metrics.registry)
        self._metrics.refresh(self._source.status())
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        return self._exposition.render(request)


def adminRoot(source: StatusSource, metrics: AdminMetrics) -> Resource:
    """
    The resource tree of the admin listener.
    """
    root = Resource()
    root.putChild(b"", StatusPage(source))
    root.putChild(b"status.json", StatusJSON(source))
    root.putChild(b"metrics", Metrics(source, metrics))
    root.putChild(b"healthz", Healthz(source))
    return root
