"""
Packaging and entry points: the twistd plugin, the `keychestamp` console
script and `python -m keychestamp`.

The in-tree tests are quick. InstalledTests does what an operator does: a
fresh virtualenv (without system site packages), `pip install` of a copy of
the repository (dependencies from the configured package index; pip's cache
makes this ~10 s after the first time), then runs the installed commands from
a directory outside the repository so nothing is imported from the source tree.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import ClassVar, Dict, List, Optional, Sequence, Set, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError, ProcessExitedAlready
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from keychestamp.options import Options
from keychestamp.script import twistdArguments
from tests.test_ca import Collector, runProcess

REPOSITORY = FilePath(__file__).parent().parent()


def pythonSources(root: FilePath) -> Set[str]:
    """
    The package's .py files relative to C{root}, '/'-separated.
    """
    found = set()
    for path in root.child("keychestamp").walk():
        if path.basename().endswith(".py") and "__pycache__" not in path.segmentsFrom(root):
            found.add("/".join(path.segmentsFrom(root)))
    return found


class InTreeTests(SynchronousTestCase):
    """
    The plugin and entry points as seen from the source tree.
    """

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.etc = FilePath(self.mktemp())

    def test_noInitInPluginDirectories(self) -> None:
        """
        twisted/ and twisted/plugins/ have no __init__.py: one would hide
        Twisted's own package and every other plugin.
        """
        self.assertFalse(REPOSITORY.descendant(["twisted", "__init__.py"]).exists())
        self.assertFalse(REPOSITORY.descendant(["twisted", "plugins", "__init__.py"]).exists())
        self.assertTrue(REPOSITORY.descendant(["twisted", "plugins", "keychestamp_plugin.py"]).exists())

    def test_everyPackageHasInit(self) -> None:
        """
        Every directory of the package holding modules has an __init__.py;
        setup.py's find_packages skips one without it, and the installed
        proxy then fails to import.
        """
        missing = []
        for path in REPOSITORY.child("keychestamp").walk():
            if path.isdir() and path.basename() != "__pycache__":
                if any(c.basename().endswith(".py") for c in path.children()):
                    if not path.child("__init__.py").exists():
                        missing.append(path.path)
        self.assertEqual(missing, [], "package directories without __init__.py")

    def test_pluginDiscovered(self) -> None:
        """
        Twisted's plugin system finds one keychestamp ServiceMaker whose
        options are keychestamp's and whose module has makeService.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "keychestamp"]
        self.assertEqual(len(makers), 1)
        self.assertIsInstance(makers[0].options(), Options)
        from keychestamp import tap

        self.assertTrue(callable(tap.makeService))

    def test_twistdCommandLine(self) -> None:
        """
        `twistd -n keychestamp ... -n` parses: the first -n is twistd's
        --nodaemon, the second keychestamp's --noapi.
        """
        audit = FilePath(self.mktemp())
        config = ServerOptions()
        config.parseOptions(
            ["-n", "keychestamp", "-e", self.etc.path, "-n", "-f", audit.path, "-p", "18443"]
        )
        self.assertTrue(config["nodaemon"])
        self.assertEqual(config.subCommand, "keychestamp")
        self.assertTrue(config.subOptions["noapi"])
        self.assertEqual(config.subOptions["file"], audit.path)
        self.assertEqual(config.subOptions["port"], 18443)

    def test_twistdPrintsCA(self) -> None:
        """
        `twistd keychestamp -e DIR --ca` prints the root PEM, nothing else,
        and exits 0.
        """
        with self.assertRaises(SystemExit) as raised:
            ServerOptions().parseOptions(["keychestamp", "-e", self.etc.path, "--ca"])
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual(
            self.stdout.getvalue().encode("ascii"),
            self.etc.descendant(["ca", "root.crt"]).getContent(),
        )

    def test_twistdBadValueOneLine(self) -> None:
        """
        A bad value under twistd is one line on stderr and exit 2, not
        twistd's usage dump.
        """
        with self.assertRaises(SystemExit) as raised:
            ServerOptions().parseOptions(["keychestamp", "-e", self.etc.path, "-p", "70000"])
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(self.stderr.getvalue().count("\n"), 1)
        self.assertIn("70000", self.stderr.getvalue())
        self.assertEqual(self.stdout.getvalue(), "")

    def test_scriptRunsTwistdInForeground(self) -> None:
        """
        The console script's twistd command line is foreground, without a pid
        file, and hands every argument to keychestamp.
        """
        audit = FilePath(self.mktemp()).path
        argv = twistdArguments(["-e", self.etc.path, "-p", "18443", "-n", "-f", audit])
        config = ServerOptions()
        config.parseOptions(argv[1:])
        self.assertTrue(config["nodaemon"])
        self.assertEqual(config["pidfile"], "")
        self.assertEqual(config.subCommand, "keychestamp")
        self.assertEqual(config.subOptions["port"], 18443)
        self.assertTrue(config.subOptions["noapi"])
        self.assertEqual(config.subOptions["file"], audit)


# -- the installed package ----------------------------------------------------


class Installed:
    """
    A virtualenv with keychestamp installed from a copy of the repository.
    """

    def __init__(self, root: FilePath, source: FilePath, purelib: FilePath) -> None:
        self.root = root
        self.source = source
        self.bin = root.child("venv").child("bin")
        self.purelib = purelib

    def command(self, name: str) -> str:
        return self.bin.child(name).path

    def env(self) -> Dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "KC_CONFIG_DIR", "PYTHONSTARTUP")
        }
        env["PATH"] = self.bin.path + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        return env

    def record(self) -> List[str]:
        """
        The files pip installed for keychestamp (its RECORD).
        """
        infos = [p for p in self.purelib.children() if re.match(r"keychestamp-.*\.dist-info$", p.basename())]
        if len(infos) != 1:
            raise AssertionError(f"expected one keychestamp dist-info, found {infos}")
        return [line.split(",")[0] for line in infos[0].child("RECORD").getContent().decode().splitlines()]


async def buildInstalled() -> Installed:
    root = FilePath(tempfile.mkdtemp(prefix="kc-pkg-"))
    atexit.register(shutil.rmtree, root.path, True)
    source = root.child("src")
    shutil.copytree(
        REPOSITORY.path,
        source.path,
        ignore=shutil.ignore_patterns(
            ".git", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache",
            ".venv", ".lego",
        ),
    )
    out, err, code = await runProcess(
        [sys.executable, "-m", "venv", root.child("venv").path], timeout=180
    )
    if code != 0:
        raise SkipTest(f"cannot create a virtualenv: {err.decode('utf-8', 'replace').strip()[-300:]}")
    venvPython = root.child("venv").child("bin").child("python").path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out, err, code = await runProcess(
        [venvPython, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source.path],
        env=env,
        path=root.path,
        timeout=540,
    )
    if code != 0:
        raise AssertionError("pip install failed:\n" + (out + err).decode("utf-8", "replace")[-3000:])
    out, err, code = await runProcess(
        [venvPython, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env, timeout=60
    )
    return Installed(root, source, FilePath(out.decode().strip()))


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Fetch(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


class InstalledTests(TestCase):
    """
    After `pip install` into a fresh virtualenv: `twistd --help` lists the
    plugin, the three entry points behave the same, the service runs in the
    foreground.
    """

    timeout = 600

    #: Built by the first test that needs it and shared by the rest of this
    #: run (one install, not one per test); an error is kept too, so later
    #: tests fail or skip fast.
    _installed: ClassVar[Optional[Installed]] = None
    _installError: ClassVar[Optional[BaseException]] = None

    async def installed(self) -> Installed:
        cls = type(self)
        if cls._installError is not None:
            raise cls._installError
        if cls._installed is None:
            try:
                cls._installed = await buildInstalled()
            except BaseException as e:
                cls._installError = e
                raise
        return cls._installed

    async def runInstalled(self, args: Sequence[str], timeout: float = 60.0) -> Tuple[bytes, bytes, Optional[int]]:
        """
        Run an installed command from a directory outside the repository.
        """
        inst = await self.installed()
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        return await runProcess([inst.command(args[0]), *args[1:]], env=inst.env(), path=cwd.path, timeout=timeout)

    async def test_twistdHelpListsPlugin(self) -> None:
        """
        `twistd --help` lists keychestamp among the commands.
        """
        out, err, code = await self.runInstalled(["twistd", "--help"])
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"(?m)^\s+keychestamp\s+Pass-through")

    async def test_caFromEveryEntryPoint(self) -> None:
        """
        `twistd keychestamp --ca`, `keychestamp --ca` and `python -m
        keychestamp --ca` print exactly the same single PEM certificate, the
        one kept in the working directory, and exit 0.
        """
        etc = FilePath(self.mktemp()).path
        out, err, code = await self.runInstalled(["twistd", "keychestamp", "-e", etc, "--ca"])
        self.assertEqual(code, 0, err)
        certs = x509.load_pem_x509_certificates(out)
        self.assertEqual(len(certs), 1)
        self.assertEqual(out, certs[0].public_bytes(serialization.Encoding.PEM))
        self.assertEqual(out, FilePath(etc).descendant(["ca", "root.crt"]).getContent())
        for argv in (["keychestamp", "-e", etc, "--ca"], ["python", "-m", "keychestamp", "-e", etc, "--ca"]):
            again, err, code = await self.runInstalled(argv)
            self.assertEqual((code, again), (0, out), (argv, err))

    async def test_pluginInstalledWithoutInit(self) -> None:
        """
        The wheel installs twisted/plugins/keychestamp_plugin.py and every
        module of the package, and no __init__.py of its own in twisted/ or
        twisted/plugins/ (the one there belongs to Twisted), nor a stale
        dropin.cache or the tests.
        """
        inst = await self.installed()
        record = inst.record()
        self.assertIn("twisted/plugins/keychestamp_plugin.py", record)
        self.assertTrue(inst.purelib.descendant(["twisted", "plugins", "keychestamp_plugin.py"]).exists())
        self.assertNotIn("twisted/__init__.py", record)
        self.assertNotIn("twisted/plugins/__init__.py", record)
        self.assertEqual([r for r in record if r.endswith("dropin.cache") or r.startswith("tests/")], [])
        self.assertEqual(sorted(pythonSources(inst.source) - set(record)), [], "modules not installed")
        twistedInit = inst.purelib.descendant(["twisted", "plugins", "__init__.py"])
        if twistedInit.exists():
            owners = [
                p.basename()
                for p in inst.purelib.children()
                if p.basename().endswith(".dist-info")
                and p.child("RECORD").exists()
                and "twisted/plugins/__init__.py" in [
                    line.split(",")[0] for line in p.child("RECORD").getContent().decode().splitlines()
                ]
            ]
            self.assertEqual([o.split("-")[0].lower() for o in owners], ["twisted"])

    async def test_badPortOneLine(self) -> None:
        """
        `keychestamp -p 70000` (and the twistd form) exits non-zero with one
        line on stderr.
        """
        etc = FilePath(self.mktemp()).path
        for argv in (["keychestamp", "-e", etc, "-p", "70000"], ["twistd", "keychestamp", "-e", etc, "-p", "70000"]):
            out, err, code = await self.runInstalled(argv)
            self.assertNotIn(code, (0, None))
            self.assertEqual(err.count(b"\n"), 1, err)
            self.assertIn(b"70000", err)
            self.assertEqual(out, b"")

    async def assertServes(self, argv: List[str], expectPidFile: bool) -> None:
        """
        Start C{argv} (a foreground keychestamp on 127.0.0.1:PORT), wait until
        it listens, fetch the root through it as a proxy client would, then
        SIGTERM it and expect a clean exit.
        """
        inst = await self.installed()
        base = FilePath(self.mktemp())
        cwd = base.child("run")
        cwd.makedirs()
        etc, audit, port = base.child("etc"), base.child("audit.json"), freePort()
        args = [inst.command(argv[0]), *argv[1:], "-e", etc.path, "-p", str(port), "-a", "127.0.0.1",
                "-n", "-f", audit.path]
        proto = Collector()
        process = reactor.spawnProcess(proto, args[0], args, env=inst.env(), path=cwd.path)  # type: ignore[attr-defined]

        async def stop() -> None:
            if not proto.ended.called:
                try:
                    process.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
                await proto.ended

        self.addCleanup(stop)
        deadline = time.monotonic() + 60
        while True:
            try:
                probe = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
                    Factory.forProtocol(Protocol)
                )
                probe.transport.loseConnection()
                break
            except ConnectionRefusedError:
                pass
            if proto.ended.called or time.monotonic() > deadline:
                self.fail(f"{argv[0]} did not listen on {port}: {b''.join(proto.out + proto.err)!r}")
            await deferLater(reactor, 0.1)
        fetch = _Fetch(
            b"GET http://amp.keychest.net/ HTTP/1.1\r\nHost: amp.keychest.net\r\nConnection: close\r\n\r\n"
        )
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(Factory.forProtocol(lambda: fetch))
        response = await fetch.done.addTimeout(20, reactor)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:200])
        self.assertTrue(response.endswith(etc.descendant(["ca", "root.crt"]).getContent()), response[-200:])
        self.assertTrue(audit.exists())
        self.assertEqual(cwd.child("twistd.pid").exists(), expectPidFile)
        process.signalProcess("TERM")
        code = await proto.ended.addTimeout(30, reactor)
        output = b"".join(proto.out + proto.err)
        # twistd stops cleanly, then re-raises the signal so that its exit
        # status says what stopped it.
        self.assertIn((code, proto.signal), [(0, None), (None, signal.SIGTERM)], output)
        self.assertIn(b"Server Shut Down.", output)

    async def test_twistdForeground(self) -> None:
        """
        `twistd -n keychestamp ...` runs the proxy in the foreground.
        """
        await self.assertServes(["twistd", "-n", "keychestamp"], expectPidFile=True)

    async def test_consoleScriptForeground(self) -> None:
        """
        The `keychestamp` console script runs the same service in the
        foreground, without leaving a pid file behind.
        """
        await self.assertServes(["keychestamp"], expectPidFile=False)
