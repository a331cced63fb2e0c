# -*- test-case-name: tests.test_admin -*-
"""
One status document for the page, /status.json, /metrics and /healthz,
gathered on the reactor thread from the running proxy.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from hyperlink import URL
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from keychestamp.admin.stats import MAX_HEADROOM, AdminStats, clip


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def shownURL(url: Any) -> str:
    """
    A collector URL without what may be secret in it (credentials, query).
    """
    try:
        return clip(URL.from_text(str(url)).replace(userinfo="", query=(), fragment="").to_text(), 200)
    except Exception:
        return ""


def headroomRows(provider: Any) -> List[Dict[str, Any]]:
    """
    The ledger's buckets, checked and clipped, fullest first, at most
    L{MAX_HEADROOM}. A malformed row is skipped, not shown half.
    """
    rows = []
    for item in provider.headroom():
        try:
            used, capacity = _number(item["used"]), _number(item["capacity"])
            ratio = _number(item["ratio"]) if "ratio" in item else (used / capacity if capacity else 0.0)
            row: Dict[str, Any] = {
                "server": clip(item["server"], 120),
                "limit": clip(item["limit"], 80),
                "key": clip(item["key"], 200),
                "used": used,
                "capacity": capacity,
                "ratio": max(0.0, ratio),
            }
        except (KeyError, TypeError, ValueError):
            continue
        if item.get("window") is not None:
            row["window"] = clip(item["window"], 40)
        if isinstance(item.get("reset"), (int, float)):
            row["reset"] = float(item["reset"])
        rows.append(row)
    rows.sort(key=lambda r: (-r["ratio"], r["server"], r["limit"], r["key"]))
    return rows[:MAX_HEADROOM]


class StatusSource:
    """
    Reads the running proxy: how long it has run, whether it listens,
    whether its sinks take events, its connections, the poster's queue,
    the ledger's headroom, and the event summary of L{AdminStats}.

    Every dependency is a plain value or a callable, so that tests and
    embedders can build one without a whole service tree.
    """

    _log = Logger()

    def __init__(
        self,
        stats: AdminStats,
        clock: IReactorTime,
        proxyId: str,
        version: str,
        listening: Callable[[], bool],
        health: Callable[[], Mapping[str, Optional[str]]],
        connections: Callable[[], int] = lambda: 0,
        poster: Any = None,
        headroom: Any = None,
        host: str = "",
    ) -> None:
        """
        @param poster: the poster (L{keychestamp.sinks.poster.Poster}), or
            None when events are not posted (-n).
        @param headroom: an L{keychestamp.admin.interfaces.IHeadroom}
            provider (the rate-limit ledger), or None.
        """
        self.stats = stats
        self._clock = clock
        self.proxyId = proxyId
        self.version = version
        self.host = host
        self._listening = listening
        self._health = health
        self._connections = connections
        self._poster = poster
        self._headroom = headroom

    def healthz(self) -> Tuple[bool, List[str]]:
        """
        (healthy, reasons): healthy while the proxy listens and no sink's
        last emit failed.
        """
        reasons = []
        try:
            listening = bool(self._listening())
        except Exception as e:
            listening, reasons = False, [f"cannot tell whether the proxy listens: {e}"]
        if not listening and not reasons:
            reasons.append("the proxy is not listening")
        for name, error in sorted(self._health().items()):
            if error is not None:
                reasons.append(f"event sink {name} is failing: {clip(error)}")
        return not reasons, reasons

    def _posterStatus(self) -> Optional[Dict[str, Any]]:
        poster = self._poster
        if poster is None:
            return None
        try:
            backlog: Optional[int] = int(poster.backlog())
        except Exception as e:
            self._log.debug("Poster backlog unavailable: {error}", error=e)
            backlog = None
        error = getattr(poster, "lastError", None)
        return {
            "url": shownURL(getattr(poster, "url", "")),
            "backlog": backlog,
            "last_delivery": getattr(poster, "lastDelivery", None),
            "last_error": None if error is None else clip(error),
            "consecutive_failures": int(getattr(poster, "consecutiveFailures", 0) or 0),
            "next_attempt": getattr(poster, "nextAttempt", None),
            "delivered": int(getattr(poster, "delivered", 0) or 0),
            "dead_lettered": int(getattr(poster, "deadLettered", 0) or 0),
        }

    def _headroomStatus(self) -> Optional[List[Dict[str, Any]]]:
        if self._headroom is None:
            return None
        try:
            return headroomRows(self._headroom)
        except Exception:
            self._log.failure("Rate-limit headroom unavailable")
            return None

    def status(self) -> Dict[str, Any]:
        """
        The whole status document (what /status.json returns).
        """
        now = self._clock.seconds()
        healthy, reasons = self.healthz()
        try:
            connections = int(self._connections())
        except Exception:
            connections = 0
        document: Dict[str, Any] = {
            "proxy": self.proxyId,
            "version": self.version,
            "host": self.host,
            "now": now,
            "started": self.stats.started,
            "uptime": max(0.0, now - self.stats.started),
            "health": {"ok": healthy, "reasons": reasons, "sinks": dict(self._health())},
            "connections": connections,
        }
        document.update(self.stats.snapshot(now))
        document["poster"] = self._posterStatus()
        document["ratelimits"] = self._headroomStatus()
        return document
