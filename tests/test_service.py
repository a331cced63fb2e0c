"""
makeService's pieces that need no socket.
"""

from __future__ import annotations

from typing import List

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from keychestamp.options import LEVELS
from keychestamp.service import diagnosticsLogger


class DiagnosticsLevelTests(SynchronousTestCase):
    """
    -l LEVEL filters diagnostics per service, for every level of the table.
    """

    def capture(self) -> List[dict]:
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_everyLevel(self) -> None:
        """
        Every level the options accept builds a logger (WARNING is Twisted's
        'warn'); a message below the level is dropped, one at it passes.
        """
        order = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
        self.assertEqual(sorted(order), sorted(LEVELS))
        for i, level in enumerate(order):
            events = self.capture()
            log = diagnosticsLogger(level, namespace="kc-test")
            emit = [log.debug, log.info, log.warn, log.error, log.critical]
            for j, method in enumerate(emit):
                method("message {n}", n=j)
            seen = sorted(e["n"] for e in events if e.get("log_namespace") == "kc-test")
            self.assertEqual(seen, list(range(i, 5)), level)
