# -*- test-case-name: tests.test_ledger_buckets -*-
"""
Token-bucket arithmetic, the way Let's Encrypt's Boulder counts (GCRA): a
limit of C{capacity} per C{period} refills one request every
C{period / capacity} seconds, continuously, never above full.

Pure functions over immutable values, so that the numbers can be checked by
hand. A bucket is stored as the tokens in use at one instant; usage drains
linearly from there.

"Used" as reported is an integer: C{capacity} minus the requests the CA would
still accept now (Boulder's "remaining" is C{floor}, so a token that has
partly refilled is still in use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "Bucket",
    "Limit",
    "emptyAt",
    "headroom",
    "level",
    "spend",
    "threshold",
    "usedCount",
    "whenBelow",
]

#: Slack, in tokens, for floating-point error: epoch seconds are ~1.8e9, so
#: sums of them carry errors far above 1e-9.
EPSILON = 1e-4


@dataclass(frozen=True)
class Limit:
    """
    One rate limit: C{capacity} requests per C{period} seconds.
    """

    name: str
    capacity: int
    period: float

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"{self.name}: capacity must be a positive integer")
        if not self.period > 0:
            raise ValueError(f"{self.name}: period_s must be positive")

    @property
    def interval(self) -> float:
        """Seconds to refill one request."""
        return self.period / self.capacity


@dataclass(frozen=True)
class Bucket:
    """
    C{used} tokens in use (possibly fractional) at POSIX time C{at}.
    """

    used: float
    at: float


def level(bucket: Optional[Bucket], limit: Limit, now: float) -> float:
    """
    Tokens in use at C{now} (fractional, never negative). A time before the
    bucket's own is taken as the bucket's time: usage never grows backwards.
    """
    if bucket is None:
        return 0.0
    elapsed = max(0.0, now - bucket.at)
    return max(0.0, bucket.used - elapsed / limit.interval)


def spend(bucket: Optional[Bucket], limit: Limit, now: float, cost: int = 1) -> Bucket:
    """
    The bucket after C{cost} requests at C{now}. Not capped at capacity: the
    proxy only counts what the CA accepted, so usage above capacity means the
    limit table is wrong (or the account has an override), and shows.
    """
    at = now if bucket is None else max(now, bucket.at)
    return Bucket(level(bucket, limit, at) + cost, at)


def usedCount(bucket: Optional[Bucket], limit: Limit, now: float) -> int:
    """
    Requests in use at C{now}: a partly refilled token still counts.
    """
    value = level(bucket, limit, now)
    return max(0, math.ceil(value - EPSILON))


def headroom(bucket: Optional[Bucket], limit: Limit, now: float) -> int:
    """
    Requests the CA would still accept at C{now}, by what the proxy saw.
    """
    return max(0, limit.capacity - usedCount(bucket, limit, now))


def threshold(capacity: int, percent: int) -> int:
    """
    The smallest count that is at least C{percent} % of C{capacity}: 4 of 5
    is 80 %, 5 of 5 is the first count at or above 95 %.
    """
    return max(1, -((-capacity * percent) // 100))


def whenBelow(bucket: Bucket, limit: Limit, count: int) -> float:
    """
    The earliest time at which L{usedCount} is below C{count} (C{count} >= 1),
    with no further spending: the level has drained to C{count - 1}.
    """
    excess = bucket.used - (count - 1)
    if excess <= 0:
        return bucket.at
    return bucket.at + excess * limit.interval


def emptyAt(bucket: Bucket, limit: Limit) -> float:
    """
    When the bucket is full again (nothing in use), with no further spending.
    """
    return whenBelow(bucket, limit, 1)
