# -*- test-case-name: tests.test_ledger_report -*-
"""
Reading audit files for reports and rebuilds: JSON lines (or gzip-compressed
rotated files), from one proxy or several, merged in time order.

Ids are per proxy, so an event is identified by (proxy, id); the same event
found twice (an audit file and a collector's copy, a file given twice) is
read once. Lines that are not events are skipped and counted.
"""

from __future__ import annotations

import gzip
import heapq
import json
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from keychestamp.ledger.engine import eventTime

__all__ = ["AuditReader"]

Event = Dict[str, Any]


def _open(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


class AuditReader:
    """
    The events of some audit files, oldest first, each once.

    @param paths: the files.
    @param onSkip: called with (path, line number, why) for each skipped line.
    """

    def __init__(self, paths: Iterable[str], onSkip: Optional[Callable[[str, int, str], None]] = None) -> None:
        self.paths: List[str] = list(paths)
        self._onSkip = onSkip
        self.read = 0
        self.skipped = 0
        self.duplicates = 0
        self.proxies: Set[str] = set()

    def _skip(self, path: str, number: int, why: str) -> None:
        self.skipped += 1
        if self._onSkip is not None:
            self._onSkip(path, number, why)

    def _file(self, index: int, path: str) -> Iterator[Tuple[float, int, int, Event]]:
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    self._skip(path, number, "not JSON")
                    continue
                if not isinstance(event, dict) or not isinstance(event.get("msg"), str):
                    self._skip(path, number, "not an event")
                    continue
                when = eventTime(event)
                if when is None:
                    self._skip(path, number, "no time")
                    continue
                yield when, index, number, event

    def __iter__(self) -> Iterator[Event]:
        """
        Every event once, merged across files by time (each file is in
        logging order already).

        @raise OSError: a file cannot be read.
        """
        seen: Dict[str, Set[int]] = {}
        streams = [self._file(i, p) for i, p in enumerate(self.paths)]
        for _, _, _, event in heapq.merge(*streams, key=lambda item: item[:3]):
            proxy, eventId = event.get("proxy"), event.get("id")
            if isinstance(proxy, str) and isinstance(eventId, int):
                ids = seen.setdefault(proxy, set())
                if eventId in ids:
                    self.duplicates += 1
                    continue
                ids.add(eventId)
                self.proxies.add(proxy)
            self.read += 1
            yield event
