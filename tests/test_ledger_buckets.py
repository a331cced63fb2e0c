"""
Tests for keychestamp.ledger.buckets: the token-bucket arithmetic, against
numbers worked out by hand.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from keychestamp.ledger.buckets import (
    Bucket,
    Limit,
    emptyAt,
    headroom,
    level,
    spend,
    threshold,
    usedCount,
    whenBelow,
)

# 5 per 500 s: one request refills every 100 s.
FIVE = Limit("test", 5, 500.0)
T0 = 1_800_000_000.0


def spent(limit: Limit, times: list) -> Bucket:
    bucket = None
    for t in times:
        bucket = spend(bucket, limit, t)
    assert bucket is not None
    return bucket


class LimitTests(SynchronousTestCase):
    """
    A limit is a positive integer capacity over a positive period.
    """

    def test_interval(self) -> None:
        """
        Let's Encrypt's published refill rates follow: 300 per 3 h is one per
        36 s, 5 per 7 days one per 33.6 h, 10 per 3 h one per 18 min.
        """
        self.assertEqual(Limit("o", 300, 10800).interval, 36.0)
        self.assertEqual(Limit("s", 5, 604800).interval, 120960.0)
        self.assertEqual(Limit("a", 10, 10800).interval, 1080.0)

    def test_invalid(self) -> None:
        """
        Zero capacity, a fractional capacity and a zero period are refused.
        """
        self.assertRaises(ValueError, Limit, "x", 0, 10.0)
        self.assertRaises(ValueError, Limit, "x", 1.5, 10.0)  # type: ignore[arg-type]
        self.assertRaises(ValueError, Limit, "x", 1, 0.0)


class RefillTests(SynchronousTestCase):
    """
    Usage drains continuously at capacity/period, and a partly refilled
    request still counts as used.
    """

    def test_burstThenRefill(self) -> None:
        """
        Five requests at T0 fill the bucket; 50 s later half a request has
        refilled (still 5 used, no headroom); after 100 s one is free; after
        250 s 2.5 are free (3 used); after 500 s all are.
        """
        bucket = spent(FIVE, [T0] * 5)
        self.assertEqual(bucket, Bucket(5.0, T0))
        self.assertEqual((usedCount(bucket, FIVE, T0), headroom(bucket, FIVE, T0)), (5, 0))
        self.assertAlmostEqual(level(bucket, FIVE, T0 + 50), 4.5)
        self.assertEqual((usedCount(bucket, FIVE, T0 + 50), headroom(bucket, FIVE, T0 + 50)), (5, 0))
        self.assertEqual((usedCount(bucket, FIVE, T0 + 100), headroom(bucket, FIVE, T0 + 100)), (4, 1))
        self.assertEqual(usedCount(bucket, FIVE, T0 + 250), 3)
        self.assertEqual((usedCount(bucket, FIVE, T0 + 500), headroom(bucket, FIVE, T0 + 500)), (0, 5))
        self.assertEqual(level(bucket, FIVE, T0 + 10_000), 0.0)

    def test_spacedSpending(self) -> None:
        """
        Requests at T0, T0+30 and T0+60: the level is 1, then 1.7, then 2.4;
        two requests in use either way; empty at T0+60+240.
        """
        bucket = spent(FIVE, [T0, T0 + 30, T0 + 60])
        self.assertAlmostEqual(bucket.used, 2.4)
        self.assertEqual(bucket.at, T0 + 60)
        self.assertEqual(usedCount(bucket, FIVE, T0 + 60), 3)
        self.assertAlmostEqual(emptyAt(bucket, FIVE), T0 + 300)

    def test_notCapped(self) -> None:
        """
        Spending beyond capacity is recorded (the CA accepted it, so the
        table is wrong), and headroom stays at zero rather than negative.
        """
        bucket = spent(FIVE, [T0] * 7)
        self.assertEqual(usedCount(bucket, FIVE, T0), 7)
        self.assertEqual(headroom(bucket, FIVE, T0), 0)

    def test_timeNeverRunsBackwards(self) -> None:
        """
        A request stamped before the bucket's time is counted at the
        bucket's time: usage never grows into the past.
        """
        bucket = spent(FIVE, [T0 + 100, T0 + 40])
        self.assertEqual(bucket, Bucket(2.0, T0 + 100))
        self.assertEqual(usedCount(bucket, FIVE, T0), 2)

    def test_empty(self) -> None:
        """
        No bucket is no usage.
        """
        self.assertEqual((level(None, FIVE, T0), usedCount(None, FIVE, T0), headroom(None, FIVE, T0)), (0.0, 0, 5))


class ThresholdTests(SynchronousTestCase):
    """
    The 80 % and 95 % marks as request counts.
    """

    def test_marks(self) -> None:
        """
        80 % of 5 is 4 and 95 % of 5 rounds up to 5; 300 gives 240 and 285;
        10 gives 8 and 10 (9.5 up); 50 gives 40 and 48 (47.5 up); 1 gives 1.
        """
        cases = {5: (4, 5), 300: (240, 285), 10: (8, 10), 50: (40, 48), 1: (1, 1)}
        for capacity, (at80, at95) in cases.items():
            self.assertEqual((threshold(capacity, 80), threshold(capacity, 95)), (at80, at95), capacity)

    def test_whenBelow(self) -> None:
        """
        Four requests at T0 in a 5-per-500 s bucket: under 4 (below 80 %)
        once one has refilled, at T0+100; under 1 at T0+400.
        """
        bucket = spent(FIVE, [T0] * 4)
        self.assertEqual(whenBelow(bucket, FIVE, 4), T0 + 100)
        self.assertEqual(usedCount(bucket, FIVE, T0 + 99), 4)
        self.assertEqual(usedCount(bucket, FIVE, whenBelow(bucket, FIVE, 4)), 3)
        self.assertEqual(whenBelow(bucket, FIVE, 1), T0 + 400)
        self.assertEqual(whenBelow(bucket, FIVE, 5), T0)

    def test_whenBelowLetsEncryptOrders(self) -> None:
        """
        240 new orders in one second against 300 per 3 h: 80 % reached;
        below it again after one refill, 36 s later.
        """
        orders = Limit("new-orders-per-account", 300, 10800)
        bucket = spent(orders, [T0] * 240)
        self.assertEqual(usedCount(bucket, orders, T0), 240)
        self.assertAlmostEqual(whenBelow(bucket, orders, 240), T0 + 36)
        self.assertEqual(usedCount(bucket, orders, T0 + 35), 240)
        self.assertEqual(usedCount(bucket, orders, T0 + 36), 239)
