"""
The ledger end to end: a small scripted fleet of real ACME clients through a
real C{twistd -n keychestamp} to two Pebbles, with a --limits file of low
capacities.

  - a lego that orders the same names again and again (always-valid Pebble);
  - a lego whose validation always fails (a Pebble that really validates,
    and nothing answers the challenge);
  - a certbot that obtains a certificate and renews it once.

The first two must be flagged by derived events in the audit file before
their configured limit is reached; the third must not be flagged at all.
Then `keychestamp report` reads the audit file, and `keychestamp ledger
rebuild` gives the ledger the proxy kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.e2e import harness

Event = Dict[str, Any]

REPEAT = ["repeat.example", "www.repeat.example"]
FAIL = ["fail.example"]
RENEW = ["renew.example"]
DERIVED = ("rate-limit-warning", "client-failing", "cert-expiring")


def lowLimits() -> Dict[str, Any]:
    return {
        "new-orders-per-account": {"capacity": 20, "period_s": 10800},
        "certs-per-registered-domain": {"capacity": 10, "period_s": 604800},
        "certs-per-exact-set": {"capacity": 5, "period_s": 604800},
        "failed-authz-per-identifier-per-account": {"capacity": 5, "period_s": 3600},
        "new-accounts-per-ip": {"capacity": 10, "period_s": 10800},
    }


class LedgerFleetTests(SynchronousTestCase):
    """
    Derived events from a fleet, through the proxy, against Pebble.
    """

    def setUp(self) -> None:
        self.hostName = harness.requireEnvironment()
        reason = harness.pluginUnavailable()
        if reason is not None:
            raise SkipTest("end-to-end ledger test: %s" % (reason,))
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.pebble = harness.Pebble(os.path.join(self.base, "pebble"), self.hostName)
        self.addCleanup(self.pebble.stop)
        self.pebble.start()
        self.failing = harness.ValidatingPebble(os.path.join(self.base, "pebble-failing"), self.hostName)
        self.addCleanup(self.failing.stop)
        self.failing.start()
        upstreamCA = harness.writeBundle(os.path.join(self.base, "upstream-ca.pem"),
                                         pemFiles=[self.pebble.tlsCA, self.failing.tlsCA])
        self.limitsPath = os.path.join(self.base, "limits.json")
        with open(self.limitsPath, "w") as f:
            # one server by its directory URL, the other through "*"
            json.dump({self.pebble.directoryURL: lowLimits(), "*": lowLimits()}, f)
        self.proxy = harness.KeychestampProxy(
            os.path.join(self.base, "proxy"),
            upstreamCA=upstreamCA,
            intercept=[self.pebble.hostPort, self.failing.hostPort],
            extraArgs=["--limits", self.limitsPath],
            level="INFO",
        )
        self.bundle = harness.writeBundle(os.path.join(self.base, "bundle.pem"), pemData=[self.proxy.rootPEM()])
        self.addCleanup(self.proxy.stop)
        self.proxy.start()

    def step(self, fn: Any) -> Any:
        try:
            return fn()
        except harness.HarnessError as e:
            self.fail("%s\n--- keychestamp log ---\n%s" % (e, self.proxy.log()[-8000:]))

    def audit(self) -> List[Event]:
        return harness.readAudit(self.proxy.auditPath)

    def accountOf(self, events: List[Event], server: str) -> str:
        accounts = {e["params"].get("account") for e in events
                    if e["server"] == server and e["msg"] == "new-order" and e["code"] == 201}
        self.assertEqual(len(accounts), 1, accounts)
        return accounts.pop()

    def test_fleet(self) -> None:
        """
        The repeating client gets a certs-per-exact-set warning at 4 of 5,
        the failing one a client-failing event after 3 failures (5 allowed),
        the renewing one nothing; report and rebuild agree with the proxy.
        """
        proxyURL = self.proxy.url("http")
        repeater = harness.Lego(os.path.join(self.base, "repeater"), self.pebble.directoryURL, self.bundle,
                                proxy=proxyURL, email="repeat@example.com", timeout=60)
        for _ in range(4):
            self.step(lambda: repeater.obtain(REPEAT))

        failing = harness.Lego(os.path.join(self.base, "failing"), self.failing.directoryURL, self.bundle,
                               proxy=proxyURL, email="fail@example.com", timeout=60)
        for _ in range(3):
            result = self.step(lambda: failing.run(FAIL, "run", check=False))
            self.assertNotEqual(result.returncode, 0, result.stderr)

        renewer = harness.Certbot(os.path.join(self.base, "renewer"), self.pebble.directoryURL, self.bundle,
                                  proxy=proxyURL, email="renew@example.com", timeout=60)
        self.step(lambda: renewer.certonly(RENEW, "renewer"))
        self.step(lambda: renewer.renew("renewer"))

        events = self.audit()
        derived = [e for e in events if e["msg"].split("-cleared")[0] in DERIVED]
        self.assertTrue(derived, [e["msg"] for e in events])

        # the repeater: warned at 4 of 5 certificates for its exact set
        warnings = [e for e in derived if e["msg"] == "rate-limit-warning"]
        exact = [e for e in warnings if e["params"]["limit"] == "certs-per-exact-set"]
        self.assertEqual(len(exact), 1, warnings)
        p = exact[0]["params"]
        self.assertEqual((p["key"], p["used"], p["capacity"], p["level"], p["lower_bound"]),
                         ({"identifiers": REPEAT}, 4, 5, 80, True))
        self.assertLess(p["used"], p["capacity"])
        self.assertEqual((exact[0]["server"], p["directory"]), (self.pebble.hostPort, self.pebble.directoryURL))
        valid = [e for e in events if e["server"] == self.pebble.hostPort and e["msg"] == "order"
                 and e["params"]["status"] == "valid"
                 and sorted(i["value"] for i in e["params"]["identifiers"]) == REPEAT]
        self.assertEqual(len({e["path"] for e in valid}), 4)
        self.assertGreater(exact[0]["id"], max(e["id"] for e in valid))

        # the failing client: flagged after 3 failed validations of 5 allowed
        failingAccount = self.accountOf(events, self.failing.hostPort)
        flagged = [e for e in derived if e["msg"] == "client-failing"]
        self.assertEqual(len(flagged), 1, flagged)
        p = flagged[0]["params"]
        self.assertEqual((flagged[0]["server"], p["account"], p["identifiers"], p["failures"], p["threshold"]),
                         (self.failing.hostPort, failingAccount, FAIL, 3, 3))
        self.assertTrue(p["problem"]["type"].startswith("urn:ietf:params:acme:error:"), p["problem"])
        invalid = {e["path"] for e in events if e["msg"] == "auth" and e["params"].get("status") == "invalid"}
        self.assertEqual(len(invalid), 3)

        # the renewing client: two certificates, never flagged
        certs = [e for e in events if e["msg"] == "cert" and e["params"]["names"] == RENEW]
        self.assertEqual(len({e["params"]["serial"] for e in certs}), 2)
        renewAccount = certs[0]["params"]["account"]
        self.assertTrue(renewAccount)
        for e in derived:
            self.assertNotIn("renew.example", json.dumps(e["params"]))
            accounts = {e["params"].get("account"), e["params"].get("key", {}).get("account")}
            self.assertFalse(e["server"] == self.pebble.hostPort and renewAccount in accounts, e)

        # the report over the audit file says the same
        report = subprocess.run(
            [sys.executable, "-m", "keychestamp", "report", "--json", "--limits", self.limitsPath,
             self.proxy.auditPath],
            cwd=harness.REPOSITORY, env=harness.proxyEnvironment(self.base), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(report.returncode, 0, report.stderr)
        data = json.loads(report.stdout)
        accounts = {(a["server"], a["account"]): a for a in data["accounts"]}
        renewer = accounts[(self.pebble.hostPort, renewAccount)]
        self.assertEqual((renewer["certificates"], renewer["failures"]), (2, {}))
        failed = accounts[(self.failing.hostPort, failingAccount)]
        self.assertEqual((failed["certificates"], sum(failed["failures"].values())), (0, 3))
        self.assertIn("client-failing", [c["msg"] for c in data["conditions"]])

        # the proxy kept its ledger; a rebuild from the audit file equals it
        # twistd re-raises the SIGTERM it shut down cleanly on
        self.assertIn(self.proxy.stop(), (0, -15))
        etc = self.proxy.etcDir
        rebuilt = os.path.join(self.base, "rebuilt")
        os.makedirs(rebuilt)
        result = subprocess.run(
            [sys.executable, "-m", "keychestamp", "ledger", "rebuild", "-e", rebuilt, "--limits", self.limitsPath,
             self.proxy.auditPath],
            cwd=harness.REPOSITORY, env=harness.proxyEnvironment(self.base), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        from keychestamp.ledger.engine import LedgerEngine
        from keychestamp.ledger.limits import loadLimits
        from keychestamp.ledger.store import Store

        now = max(e["params"]["epoch"] for e in events) + 1
        dumps = []
        for directory in (etc, rebuilt):
            store = Store(os.path.join(directory, "ledger.sqlite"))
            self.addCleanup(store.close)
            LedgerEngine(store, loadLimits(self.limitsPath)).due(now)
            store.prune(now)
            dumps.append(store.dump())
        self.assertEqual(dumps[0], dumps[1])
        self.assertTrue(dumps[0]["buckets"])
