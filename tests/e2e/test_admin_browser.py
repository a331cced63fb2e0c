"""
The status page in a real browser: Debian's chromium, headless, loads the
admin page of a real C{twistd -n keychestamp} that relayed real certbot
flows to Pebble (one that succeeds, one that fails with a hostile user
agent, one that does not trust keychestamp's CA), and the test reads the
DOM chromium dumps. A screenshot is kept as a test artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.e2e import harness

#: A user agent that would run script if the page did not escape it.
HOSTILE_AGENT = "BrokenBot/1.0 <script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"

#: Small limits for Pebble, so that the ledger's headroom bars have
#: something to show (where the ledger exists).
LIMITS = {"*": {"new-orders-per-account": {"capacity": 4, "period_s": 10800},
                "certs-per-exact-set": {"capacity": 2, "period_s": 604800}}}

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)


def chromiumBinary() -> Optional[str]:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(binary: str, args: List[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """
    Run headless chromium once with a fresh, empty profile.
    """
    with tempfile.TemporaryDirectory(prefix="kc-chromium-") as profile:
        try:
            result = subprocess.run(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": profile, "LC_ALL": "C.UTF-8"},
            )
        except subprocess.TimeoutExpired as e:
            raise harness.HarnessError(f"chromium timed out after {timeout}s: {e}")
    if result.returncode != 0:
        raise harness.HarnessError(
            "chromium exited %s\n%s" % (result.returncode, result.stderr.decode("utf-8", "replace")[-3000:]))
    return result


class DOM(HTMLParser):
    """
    What the test reads from the dumped DOM: every start tag with its
    attributes, the title, and each client row's class and text.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tags: List[Tuple[str, Dict[str, Optional[str]]]] = []
        self.title = ""
        self.rows: List[Tuple[str, str]] = []
        self._inTitle = False
        self._row: Optional[List[str]] = None
        self._rowClass = ""

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "title":
            self._inTitle = True
        if tag == "tr" and "data-client" in attributes:
            self._row, self._rowClass = [], attributes.get("class") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._inTitle = False
        if tag == "tr" and self._row is not None:
            self.rows.append((self._rowClass, " ".join(" ".join(self._row).split())))
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._inTitle:
            self.title += data
        if self._row is not None:
            self._row.append(data)

    def values(self, cls: str) -> List[int]:
        return [int(a["data-value"] or 0) for _, a in self.tags if a.get("class") == cls]


class AgentCertbot(harness.Certbot):
    """
    certbot sending its own User-Agent.
    """

    def __init__(self, *args: Any, userAgent: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.userAgent = userAgent

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return super().run(*args, "--user-agent", self.userAgent, check=check)


def getJSON(url: str, timeout: float = 5.0) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return json.loads(response.read())


class StatusPageBrowserTests(SynchronousTestCase):
    """
    Pebble, a collector, the proxy with --admin, certbot, chromium.
    """

    def setUp(self) -> None:
        missing = harness.missingBinaries("pebble", "certbot")
        if missing:
            raise SkipTest("browser test needs %s on PATH (Debian packages pebble, certbot)" % ", ".join(missing))
        self.chromium = chromiumBinary()
        if self.chromium is None:
            raise SkipTest("browser test needs Debian's chromium (apt-get install chromium)")
        self.hostName = harness.loopbackHostName()
        if self.hostName is None:
            raise SkipTest("browser test needs this host's own name to resolve only to 127.0.0.1")
        reason = harness.pluginUnavailable()
        if reason is not None:
            raise SkipTest("browser test: %s" % (reason,))
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.pebble = harness.Pebble(os.path.join(self.base, "pebble"), self.hostName)
        self.addCleanup(self.pebble.stop)
        self.pebble.start()
        self.collector = harness.Collector(os.path.join(self.base, "collector"))
        self.addCleanup(self.collector.stop)
        self.collector.start()
        self.adminPort = harness.freePort()
        limits = os.path.join(self.base, "limits.json")
        with open(limits, "w") as f:
            json.dump(LIMITS, f)
        self.proxy = harness.KeychestampProxy(
            os.path.join(self.base, "proxy"), upstreamCA=self.pebble.tlsCA, intercept=[self.pebble.hostPort],
            apiURL=self.collector.url, level="INFO",
            extraArgs=["--admin", "tcp:%d:interface=127.0.0.1" % (self.adminPort,), "--limits", limits],
        )
        self.bundle = harness.writeBundle(os.path.join(self.base, "bundle.pem"), pemData=[self.proxy.rootPEM()])
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.adminURL = "http://127.0.0.1:%d/" % (self.adminPort,)

    def step(self, fn: Any) -> Any:
        try:
            return fn()
        except harness.HarnessError as e:
            self.fail("%s\n--- keychestamp log ---\n%s" % (e, self.proxy.log()[-8000:]))

    def certbot(self, name: str, bundle: Optional[str] = None, userAgent: Optional[str] = None) -> harness.Certbot:
        directory = os.path.join(self.base, name)
        bundle = bundle or self.bundle
        if userAgent is None:
            return harness.Certbot(directory, self.pebble.directoryURL, bundle, proxy=self.proxy.url())
        return AgentCertbot(directory, self.pebble.directoryURL, bundle, proxy=self.proxy.url(), userAgent=userAgent)

    def waitForStatus(self, ready: Any, timeout: float = 30.0) -> Dict[str, Any]:
        """
        Poll /status.json (bounded) until C{ready(status)}.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = getJSON(self.adminURL + "status.json")
            if ready(status):
                return status
            if time.monotonic() > deadline:
                self.fail("status never became ready:\n" + json.dumps(status, indent=1)[:6000])
            time.sleep(0.2)

    def test_statusPage(self) -> None:
        """
        After a good certbot flow, a failing one (a second revocation, with
        a user agent full of markup) and a client that does not trust
        keychestamp's CA, chromium shows: the clients, failing ones first
        and marked, the hostile agent as text (no script ran), orders and
        failures in the hourly chart, and both certificates by expiry.
        """
        good = self.certbot("good")
        self.step(lambda: good.certonly(["admin-good.example"], "good"))

        bad = self.certbot("bad", userAgent=HOSTILE_AGENT)
        self.step(lambda: bad.certonly(["admin-bad.example"], "bad"))
        self.step(lambda: bad.revoke("bad"))
        again = self.step(lambda: bad.run("revoke", "--cert-path", bad.certPath("bad"), "--reason",
                                          "superseded", "--no-delete-after-revoke", check=False))
        self.assertNotEqual(again.returncode, 0, "a second revocation should fail")

        distrustful = self.certbot("distrustful", bundle=self.pebble.tlsCA)
        result = self.step(lambda: distrustful.run("register", "-m", "x@example.com", "--agree-tos",
                                                   "--no-eff-email", check=False))
        self.assertNotEqual(result.returncode, 0)

        status = self.waitForStatus(
            lambda s: {c["product"] for c in s["clients"] if c["failing"]} >= {"BrokenBot", ""}
            and len(s["certificates"]) == 2)
        self.assertTrue(status["health"]["ok"], status["health"])

        dump = self.step(lambda: chromium(self.chromium, ["--dump-dom", self.adminURL]))
        dom = DOM()
        dom.feed(dump.stdout.decode("utf-8"))

        self.assertTrue(dom.title.startswith("keychestamp "), dom.title)
        self.assertEqual([t for t, _ in dom.tags if t in ("script", "img")], [])
        self.assertIn(("meta", {"http-equiv": "refresh", "content": "30"}), dom.tags)

        classes = [cls for cls, _ in dom.rows]
        self.assertEqual(classes, sorted(classes, key=lambda c: c != "failing"), dom.rows)
        failing = [text for cls, text in dom.rows if cls == "failing"]
        healthy = [text for cls, text in dom.rows if cls == "ok"]
        self.assertTrue(all(text.startswith("FAILING 127.0.0.1") for text in failing), failing)
        self.assertTrue(any(HOSTILE_AGENT in text and "alreadyRevoked" in text for text in failing), failing)
        self.assertTrue(any("proxy-error:client-tls" in text for text in failing), failing)
        self.assertTrue(any("CertbotACMEClient/" in text for text in healthy), healthy)

        ids = {a.get("id") for _, a in dom.tags}
        self.assertTrue({"chart-hours", "chart-expiry", "clients", "problems", "poster"} <= ids, ids)
        self.assertEqual(sum(dom.values("bar-orders")), 2)
        self.assertGreaterEqual(sum(dom.values("bar-failures")), 2)
        self.assertEqual(dom.values("bar-expiry"), [0, 0, 0, 0, 2])
        if status["ratelimits"] is not None:
            # the ledger has landed: its buckets are drawn as headroom bars
            self.assertGreaterEqual(len([a for t, a in dom.tags if a.get("class") == "bar-headroom"]), 1)

        shot = os.path.join(os.path.abspath(self.mktemp()), "status-page.png")
        os.makedirs(os.path.dirname(shot))
        self.step(lambda: chromium(self.chromium, ["--screenshot=" + shot, "--window-size=1280,1600",
                                                   self.adminURL]))
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        sys.stderr.write("status page screenshot: %s\n" % (shot,))
