"""
The `keychestamp` console script and `python -m keychestamp`: the same service
and options as `twistd -n keychestamp`, in the foreground, for supervisor and
systemd units written for the original.
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

    sys.argv = twistdArguments(list(sys.argv[1:] if argv is None else argv))
    run()
