# -*- test-case-name: tests.test_admin -*-
"""
Prometheus metrics on a registry of the proxy's own (never the global one,
so two proxies in one process do not collide).

Counters are fed by the same event sink as the status page. Gauges that
describe the present (queue length, connections, certificate expiry,
rate-limit usage, failing clients) are taken from the status document on
the reactor thread just before each scrape: prometheus_client's Twisted
resource collects in a thread of the reactor's pool, where nothing of the
running proxy may be touched.

Every label value is bounded: C{msg}, C{stage} and the problem C{type} come
from fixed lists (else C{other}); C{server} is one of the first
L{MAX_SERVERS} servers seen (else C{other}); per-client, per-certificate
and per-bucket series come from tables that are capped themselves.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, Iterable, List, Optional, Set

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from keychestamp.admin.stats import ACME_ERROR_PREFIX, ERROR, OK, PROBLEM, Observation

#: Distinct servers with their own label value; the rest are "other".
MAX_SERVERS = 32

#: Longest identifier-set label; longer ones are cut and made unique by a hash.
MAX_IDENTIFIERS_LABEL = 200

MSGS = frozenset({
    "directory", "new-nonce", "new-acct", "new-order", "auth", "chall", "order", "final",
    "revoke-cert", "key-change", "account", "new-authz", "cert", "renewal-info", "proxy-error",
})

STAGES = frozenset({
    "client-tls", "client-timeout", "upstream-connect", "upstream-tls", "upstream-timeout",
    "upstream-response",
})

#: RFC 8555 section 6.7, RFC 9773 (alreadyReplaced) and the profiles draft.
PROBLEM_TYPES = frozenset({
    "accountDoesNotExist", "alreadyReplaced", "alreadyRevoked", "badCSR", "badNonce",
    "badPublicKey", "badRevocationReason", "badSignatureAlgorithm", "caa", "compound",
    "connection", "dns", "externalAccountRequired", "incorrectResponse", "invalidContact",
    "invalidProfile", "malformed", "orderNotReady", "rateLimited", "rejectedIdentifier",
    "serverInternal", "tls", "unauthorized", "unsupportedContact", "unsupportedIdentifier",
    "userActionRequired",
})


def problemLabel(kind: str) -> str:
    """
    The bounded label of a problem type: the RFC name, C{none} or C{other}.
    """
    if not kind:
        return "none"
    if kind.startswith(ACME_ERROR_PREFIX) and kind[len(ACME_ERROR_PREFIX):] in PROBLEM_TYPES:
        return kind[len(ACME_ERROR_PREFIX):]
    return "other"


def identifiersLabel(names: Iterable[str]) -> str:
    """
    A certificate's names as one label value: sorted, comma-separated, cut
    to L{MAX_IDENTIFIERS_LABEL} characters with a hash keeping it unique.
    """
    text = ",".join(sorted(names))
    if len(text) <= MAX_IDENTIFIERS_LABEL:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return f"{text[:MAX_IDENTIFIERS_LABEL - 14]}~{digest}"


class _PresentCollector:
    """
    Serves the gauge families built by L{AdminMetrics.refresh}. The swap of
    one immutable tuple is atomic, so the scraping thread never sees a
    half-built set.
    """

    NAMES = (
        "keychestamp_info", "keychestamp_uptime_seconds", "keychestamp_client_connections",
        "keychestamp_event_sink_failing", "keychestamp_poster_backlog",
        "keychestamp_poster_last_delivery_timestamp_seconds",
        "keychestamp_poster_consecutive_failures", "keychestamp_clients",
        "keychestamp_client_failing_since_timestamp_seconds",
        "keychestamp_certificate_not_after_timestamp_seconds",
        "keychestamp_ratelimit_usage_ratio",
    )

    def __init__(self) -> None:
        self.families: tuple = ()

    def describe(self) -> List[Metric]:
        """
        The names, so that the registry refuses a clash at registration.
        """
        return [GaugeMetricFamily(name, name) for name in self.NAMES]

    def collect(self) -> Iterable[Metric]:
        """
        The families of the last refresh (called in the scraping thread).
        """
        return self.families


class AdminMetrics:
    """
    The metrics of one proxy: counters fed with L{observe}, gauges set by
    L{refresh}, all in L{registry}.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.exchanges = Counter(
            "keychestamp_exchanges", "ACME exchanges relayed (and proxy errors), by message type, "
            "server and outcome (ok, problem, error)", ["msg", "server", "outcome"], registry=self.registry,
        )
        self.problems = Counter(
            "keychestamp_problems", "ACME problems and validation errors, by server and RFC 8555 type",
            ["server", "type"], registry=self.registry,
        )
        self.proxyErrors = Counter(
            "keychestamp_proxy_errors", "Exchanges the proxy could not relay, by server and stage",
            ["server", "stage"], registry=self.registry,
        )
        self.ledgerEvents = Counter(
            "keychestamp_ledger_events", "Events the rate-limit ledger derived, by type",
            ["msg"], registry=self.registry,
        )
        self._present = _PresentCollector()
        self.registry.register(self._present)
        self._servers: Set[str] = set()

    def _server(self, server: str) -> str:
        if not server:
            return "none"
        if server in self._servers:
            return server
        if len(self._servers) < MAX_SERVERS:
            self._servers.add(server)
            return server
        return "other"

    def observe(self, observation: Observation) -> None:
        """
        Count one event (called by L{keychestamp.admin.stats.AdminStats}, on
        the reactor thread).
        """
        if observation.derived:
            self.ledgerEvents.labels(msg=observation.msg).inc()
            return
        server = self._server(observation.server)
        msg = observation.msg if observation.msg in MSGS else "other"
        outcome = observation.outcome if observation.outcome in (OK, PROBLEM, ERROR) else "other"
        self.exchanges.labels(msg=msg, server=server, outcome=outcome).inc()
        if observation.outcome == ERROR:
            stage = observation.stage if observation.stage in STAGES else "other"
            self.proxyErrors.labels(server=server, stage=stage).inc()
        elif observation.outcome == PROBLEM:
            self.problems.labels(server=server, type=problemLabel(observation.failure)).inc()

    def refresh(self, status: Dict[str, Any]) -> None:
        """
        Rebuild the gauges from a status document (see
        L{keychestamp.admin.status.StatusSource.status}); call it on the
        reactor thread before each scrape.
        """
        families: List[Metric] = []

        def gauge(name: str, doc: str, labels: List[str] = ()) -> GaugeMetricFamily:  # type: ignore[assignment]
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            families.append(family)
            return family

        gauge("keychestamp_info", "This proxy: id and version", ["proxy", "version"]).add_metric(
            [status["proxy"], status["version"]], 1)
        gauge("keychestamp_uptime_seconds", "Seconds since the proxy started").add_metric([], status["uptime"])
        gauge("keychestamp_client_connections", "Open client connections").add_metric([], status["connections"])
        failing = gauge("keychestamp_event_sink_failing", "1 while an event sink's last emit failed", ["sink"])
        for sink, error in sorted(status["health"]["sinks"].items()):
            failing.add_metric([sink], 0 if error is None else 1)
        poster = status.get("poster")
        if poster is not None:
            if poster["backlog"] is not None:
                gauge("keychestamp_poster_backlog", "Events spooled, not yet accepted by the collector"
                      ).add_metric([], poster["backlog"])
            if poster["last_delivery"] is not None:
                gauge("keychestamp_poster_last_delivery_timestamp_seconds",
                      "When the collector last accepted an event").add_metric([], poster["last_delivery"])
            gauge("keychestamp_poster_consecutive_failures", "Failed POSTs since the queue last moved"
                  ).add_metric([], poster["consecutive_failures"])
        clients = status["clients"]
        count = gauge("keychestamp_clients", "ACME clients seen since start, by state", ["state"])
        count.add_metric(["failing"], sum(1 for c in clients if c["failing"]))
        count.add_metric(["ok"], sum(1 for c in clients if not c["failing"]))
        since = gauge("keychestamp_client_failing_since_timestamp_seconds",
                      "When a client's current streak of failures began (only failing clients)",
                      ["client", "agent"])
        for client in clients:
            if client["failing"]:
                since.add_metric([client["address"], client["product"]], client["failing_since"])
        notAfter = gauge("keychestamp_certificate_not_after_timestamp_seconds",
                         "Expiry of the newest certificate seen per server and identifier set",
                         ["server", "identifiers"])
        for cert in status["certificates"]:
            notAfter.add_metric([cert["server"], identifiersLabel(cert["names"])], cert["not_after"])
        if status.get("ratelimits") is not None:
            ratio = gauge("keychestamp_ratelimit_usage_ratio",
                          "Used share of a rate limit's bucket (1 = exhausted)", ["server", "limit", "key"])
            seen: Set[tuple] = set()
            for row in status["ratelimits"]:
                labels = (row["server"], row["limit"], row["key"])
                if labels not in seen:
                    seen.add(labels)
                    ratio.add_metric(list(labels), row["ratio"])
        self._present.families = tuple(families)
