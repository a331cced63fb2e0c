"""
The `keychestamp` console script and `python -m keychestamp`: the same service
and options as `twistd -n keychestamp`, in the foreground, for supervisor and
systemd units written for the original; and the `keychestamp report` and
`keychestamp ledger rebuild` commands over audit files.
"""

from __future__ import annotations

import sys
from typing import List, Optional


def twistdArguments(argv: List[str]) -> List[str]:
    """
    The twistd command line that runs keychestamp with C{argv} in the
    foreground, logging to stderr, without a pid file.
    """
    return ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "keychestamp", *argv]


def main(argv: Optional[List[str]] = None) -> None:
    from twisted.scripts.twistd import run

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["report"], ["ledger"]):
        # `keychestamp report ...` and `keychestamp ledger rebuild ...`:
        # commands over audit files, not the proxy.
        from keychestamp.ledger.report import run as runLedgerCommand

        status = runLedgerCommand(args)
        if status is not None:
            raise SystemExit(status)
    sys.argv = twistdArguments(args)
    run()
