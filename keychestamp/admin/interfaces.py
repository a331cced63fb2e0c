"""
The seams of the admin listener that other parts of keychestamp provide.
"""

from __future__ import annotations

from zope.interface import Interface


class IHeadroom(Interface):
    """
    Current rate-limit usage (the ledger), for the status page's headroom
    bars and the C{keychestamp_ratelimit_usage_ratio} gauge.
    """

    def headroom() -> "list[dict]":
        """
        One dict per tracked bucket, called on the reactor thread each time
        the page, /status.json or /metrics is read:

        C{server}: the ACME server (C{host[:port]}), C{limit}: the limit's
        name (e.g. C{"new-orders-per-account"}), C{key}: what the bucket
        counts for (an account path, a registered domain, an IP...),
        C{used}: requests counted in the current window, C{capacity}: the
        limit, C{ratio}: C{used / capacity} (0.0 .. 1.0 or above when over).
        Optional: C{window} (a human text such as C{"3h"}) and C{reset}
        (POSIX seconds when the bucket has room again).

        Return the buckets worth showing; the admin listener shows and
        exports at most L{keychestamp.admin.stats.MAX_HEADROOM} of them,
        fullest first.
        """
