# -*- test-case-name: tests.e2e.test_clients_direct -*-
"""
End-to-end harness: Pebble, the keychestamp proxy and real ACME clients.

Everything here runs real processes on loopback, each with a bounded
timeout, and keeps every file under a directory the test owns.  The
clients get an explicit, minimal environment: these machines export
SSL_CERT_FILE, REQUESTS_CA_BUNDLE and friends to every process, and a
client that silently used the system bundle would hide trust mistakes.

The harness is synchronous on purpose: it drives external processes from
a L{SynchronousTestCase}, where no reactor runs, so blocking waits with a
deadline are the simplest correct thing.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SkipTest

#: The repository root, put on PYTHONPATH of the proxy process.
REPOSITORY = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)

#: Pebble's knobs for a fast, deterministic run: every challenge is valid,
#: no artificial validation delay, no deliberately rejected nonces.
PEBBLE_ENV = {
    "PEBBLE_VA_ALWAYS_VALID": "1",
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    # no reuse of valid authorizations: every order walks its challenges,
    # so the flows (and their events) are the same on every run
    "PEBBLE_AUTHZREUSE": "0",
}

#: PATH for the processes the harness starts; their environment is built
#: from scratch so nothing inherited changes their trust or their proxy.
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


class HarnessError(Exception):
    """
    A process of the harness did not start, answer or finish in time.
    """


class ClientFailed(HarnessError):
    """
    An ACME client exited non-zero; the message carries its output.
    """

    def __init__(self, name: str, result: subprocess.CompletedProcess) -> None:
        self.result = result
        super().__init__(
            "%s exited %s\n$ %s\n--- stdout ---\n%s\n--- stderr ---\n%s"
            % (
                name,
                result.returncode,
                " ".join(result.args),
                _tail(result.stdout),
                _tail(result.stderr),
            )
        )


def _tail(text: Optional[str], limit: int = 6000) -> str:
    """
    The end of a long output, where the error usually is.
    """
    text = text or ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


# -- discovery ---------------------------------------------------------------


def missingBinaries(*names: str) -> List[str]:
    """
    The names among C{names} that are not on PATH.
    """
    return [name for name in names if shutil.which(name) is None]


def loopbackHostName() -> Optional[str]:
    """
    This host's own name if it resolves only to 127.0.0.1, else L{None}.

    Go (lego) never proxies C{localhost} or loopback IP literals, but it
    does proxy any other name, even one that resolves to 127.0.0.1 (here
    through /etc/hosts).  Pebble is given a certificate for this name so
    every client reaches it by a name that goes through the proxy.
    """
    name = socket.gethostname()
    if not name or name == "localhost" or _isIPLiteral(name):
        return None
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = {info[4][0] for info in infos}
    return name if addresses == {"127.0.0.1"} else None


def _isIPLiteral(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requireEnvironment() -> str:
    """
    This host's loopback name, or raise L{SkipTest} saying what is missing.
    """
    missing = missingBinaries("pebble", "certbot", "lego")
    if missing:
        raise SkipTest(
            "end-to-end test needs %s on PATH (Debian packages pebble, certbot, lego)"
            % (", ".join(missing),)
        )
    hostName = loopbackHostName()
    if hostName is None:
        raise SkipTest(
            "end-to-end test needs this host's own name to resolve only to "
            "127.0.0.1 (e.g. through /etc/hosts), so that Go clients proxy it"
        )
    return hostName


def twistdCommand() -> List[str]:
    """
    The argv prefix that runs twistd with this interpreter.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return [beside]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd "
            "import run; sys.exit(run())"]


def proxyEnvironment(home: str = "/nonexistent") -> Dict[str, str]:
    """
    A minimal environment for a twistd process that loads keychestamp from
    this repository; C{home} keeps it from touching the real ~/.keychestamp.
    """
    return {
        "PATH": os.environ.get("PATH", _BASE_PATH),
        "PYTHONPATH": REPOSITORY,
        "LC_ALL": "C.UTF-8",
        "HOME": home,
    }


def pluginUnavailable(timeout: float = 60.0) -> Optional[str]:
    """
    Why the keychestamp twistd plugin cannot be used, or L{None} if it can.
    """
    try:
        result = subprocess.run(
            twistdCommand() + ["--help"],
            env=proxyEnvironment(),
            cwd=REPOSITORY,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return "twistd --help failed: %s" % (e,)
    if "keychestamp" not in result.stdout:
        return "twistd does not list the keychestamp plugin"
    return None


# -- test PKI ----------------------------------------------------------------


def _keyUsage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca,
        crl_sign=ca, encipher_only=False, decipher_only=False,
    )


def _writePEM(path: str, data: bytes, mode: int = 0o644) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)


def makeTLSFiles(directory: str, hostName: str) -> Tuple[str, str, str]:
    """
    Make a throwaway CA and a server certificate for C{hostName},
    C{localhost} and 127.0.0.1, signed by it, for Pebble's HTTPS listener.

    @return: paths of (CA certificate, server certificate, server key).
    """
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    caKey = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keychestamp e2e test CA")])
    caSKI = x509.SubjectKeyIdentifier.from_public_key(caKey.public_key())

    def builder(subject: str, public: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(caName)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )

    caCert = (
        builder("keychestamp e2e test CA", caKey.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_keyUsage(ca=True), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    san = [x509.DNSName(hostName), x509.DNSName("localhost"),
           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        builder(hostName, key.public_key())
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_keyUsage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(caSKI),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )

    paths = tuple(os.path.join(directory, n) for n in ("test-ca.pem", "pebble-cert.pem", "pebble-key.pem"))
    _writePEM(paths[0], caCert.public_bytes(serialization.Encoding.PEM))
    _writePEM(paths[1], cert.public_bytes(serialization.Encoding.PEM))
    _writePEM(paths[2], key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    return paths[0], paths[1], paths[2]


def writeBundle(path: str, pemFiles: Iterable[str] = (), pemData: Iterable[bytes] = ()) -> str:
    """
    Concatenate PEM files and PEM blobs into one trust bundle at C{path}.
    """
    parts = []
    for name in pemFiles:
        with open(name, "rb") as f:
            parts.append(f.read().strip() + b"\n")
    parts.extend(blob.strip() + b"\n" for blob in pemData)
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    return path


def leafCertificate(path: str) -> x509.Certificate:
    """
    The first certificate of a PEM file (a client's saved leaf or chain).
    """
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())[0]


# -- processes ---------------------------------------------------------------


def _waitFor(
    ready: Callable[[], bool], process: subprocess.Popen, what: str, logPath: str, timeout: float
) -> None:
    """
    Poll C{ready()} until it is true, the process dies, or C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise HarnessError(
                "%s exited with %s before it was ready; log:\n%s"
                % (what, process.returncode, _tail(_read(logPath)))
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise HarnessError(
                "%s not ready after %ss; log:\n%s" % (what, timeout, _tail(_read(logPath)))
            )
        time.sleep(0.1)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        return "<%s>" % (e,)


def _stop(process: Optional[subprocess.Popen], timeout: float) -> Optional[int]:
    """
    SIGTERM, then SIGKILL after C{timeout}; returns the exit status.
    """
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


def _portAccepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Pebble:
    """
    A Pebble ACME server on 127.0.0.1, reached as C{hostName}.

    @ivar directoryURL: the ACME directory URL clients use.
    @ivar tlsCA: PEM file of the CA that signed Pebble's HTTPS certificate.
    @cvar environment: Pebble's knobs (L{PEBBLE_ENV}).
    """

    environment: Mapping[str, str] = PEBBLE_ENV

    def __init__(self, directory: str, hostName: str, binary: str = "pebble") -> None:
        self.directory = directory
        self.hostName = hostName
        self.binary = binary
        self.port = freePort()
        self.managementPort = freePort()
        self.hostPort = "%s:%d" % (hostName, self.port)
        self.directoryURL = "https://%s/dir" % (self.hostPort,)
        self.configPath = os.path.join(directory, "pebble-config.json")
        self.logPath = os.path.join(directory, "pebble.log")
        self.tlsCA, self._cert, self._key = makeTLSFiles(
            os.path.join(directory, "tls"), hostName
        )
        self.process: Optional[subprocess.Popen] = None

    def _writeConfig(self) -> None:
        config = {
            "pebble": {
                "listenAddress": "127.0.0.1:%d" % (self.port,),
                "managementListenAddress": "127.0.0.1:%d" % (self.managementPort,),
                "certificate": self._cert,
                "privateKey": self._key,
                # Unused with PEBBLE_VA_ALWAYS_VALID, but Pebble wants them.
                "httpPort": freePort(),
                "tlsPort": freePort(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        with open(self.configPath, "w") as f:
            json.dump(config, f, indent=2)

    def _sslContext(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.tlsCA)

    def _get(self, url: str, timeout: float = 2.0) -> bytes:
        """
        GET C{url} directly (never through a proxy), trusting Pebble's CA.
        """
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=self._sslContext()),
        )
        with opener.open(url, timeout=timeout) as response:
            return response.read()

    def _answers(self) -> bool:
        try:
            return b"newOrder" in self._get(self.directoryURL, timeout=1.0)
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = 20.0) -> "Pebble":
        """
        Start Pebble and wait until its directory answers.
        """
        os.makedirs(self.directory, exist_ok=True)
        self._writeConfig()
        env = {"PATH": _BASE_PATH, "HOME": self.directory, "LC_ALL": "C.UTF-8"}
        env.update(self.environment)
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-config", self.configPath],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _waitFor(self._answers, self.process, "pebble", self.logPath, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """
        Stop Pebble; returns its exit status.
        """
        return _stop(self.process, timeout)

    def issuingRoot(self) -> bytes:
        """
        PEM of the root that signs the certificates Pebble issues.
        """
        return self._get("https://127.0.0.1:%d/roots/0" % (self.managementPort,))


#: Pebble's knobs with real validation: PEBBLE_VA_ALWAYS_VALID unset, so a
#: challenge nobody answers fails (at once, with PEBBLE_VA_NOSLEEP).
PEBBLE_VALIDATING_ENV = {k: v for k, v in PEBBLE_ENV.items() if k != "PEBBLE_VA_ALWAYS_VALID"}


class ValidatingPebble(Pebble):
    """
    A Pebble that really validates challenges: with nothing answering them,
    every validation fails (a client that is failing).
    """

    environment = PEBBLE_VALIDATING_ENV


class KeychestampProxy:
    """
    The proxy as a real C{twistd -n keychestamp} process on 127.0.0.1.

    @ivar auditPath: the JSON-lines audit file (-f).
    @ivar etcDir: the working directory (-e) holding its CA.
    @ivar logPath: twistd's log (its stdout and stderr).
    """

    def __init__(
        self,
        directory: str,
        upstreamCA: str,
        intercept: Sequence[str],
        extraArgs: Sequence[str] = (),
        level: str = "DEBUG",
        apiURL: Optional[str] = None,
    ) -> None:
        self.apiURL = apiURL
        self.directory = directory
        self.upstreamCA = upstreamCA
        self.intercept = list(intercept)
        self.extraArgs = list(extraArgs)
        self.level = level
        self.port = freePort()
        self.etcDir = os.path.join(directory, "etc")
        self.auditPath = os.path.join(directory, "audit.json")
        self.logPath = os.path.join(directory, "twistd.log")
        self.process: Optional[subprocess.Popen] = None

    def url(self, scheme: str = "http") -> str:
        """
        The value for a client's HTTPS_PROXY: C{http} or C{https} to the proxy.
        """
        return "%s://127.0.0.1:%d" % (scheme, self.port)

    def command(self) -> List[str]:
        """
        The full twistd argv.
        """
        argv = twistdCommand() + [
            "-n", "--pidfile=", "keychestamp",
            "-e", self.etcDir,
            "-p", str(self.port),
            "-a", "127.0.0.1",
            "-f", self.auditPath,
            *(["--api-url", self.apiURL] if self.apiURL else ["--noapi"]),
            "--upstream-ca", self.upstreamCA,
            "-l", self.level,
        ]
        for target in self.intercept:
            argv += ["--intercept", target]
        return argv + self.extraArgs

    def rootPEM(self, timeout: float = 60.0) -> bytes:
        """
        The proxy's root certificate, from C{twistd keychestamp -e DIR --ca}.
        """
        os.makedirs(self.directory, exist_ok=True)
        result = subprocess.run(
            twistdCommand() + ["-n", "--pidfile=", "keychestamp", "-e", self.etcDir, "--ca"],
            cwd=self.directory,
            env=proxyEnvironment(self.directory),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if result.returncode != 0 or b"-----BEGIN CERTIFICATE-----" not in result.stdout:
            raise HarnessError(
                "keychestamp --ca exited %s\nstdout:\n%s\nstderr:\n%s"
                % (
                    result.returncode,
                    _tail(result.stdout.decode("utf-8", "replace")),
                    _tail(result.stderr.decode("utf-8", "replace")),
                )
            )
        return result.stdout

    def start(self, timeout: float = 30.0) -> "KeychestampProxy":
        """
        Start the proxy and wait until its port accepts connections.
        """
        os.makedirs(self.directory, exist_ok=True)
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.directory,
                env=proxyEnvironment(self.directory),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _waitFor(
            lambda: _portAccepts(self.port), self.process, "keychestamp",
            self.logPath, timeout,
        )
        return self

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """
        SIGTERM the proxy (SIGKILL after C{timeout}); returns its exit status.
        """
        return _stop(self.process, timeout)

    def log(self) -> str:
        """
        What twistd has logged so far.
        """
        return _read(self.logPath)

    def kill(self, timeout: float = 15.0) -> Optional[int]:
        """
        SIGKILL the proxy (no clean shutdown at all); returns its exit status.
        """
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.kill()
        return self.process.wait(timeout)


class Collector:
    """
    A local HTTP collector (tests/e2e/collector.py) that appends every POSTed
    body as one line to a file and answers 200: what the poster feeds.
    """

    def __init__(self, directory: str, port: Optional[int] = None) -> None:
        self.directory = directory
        self.port = port or freePort()
        self.path = os.path.join(directory, "collected.jsonl")
        self.logPath = os.path.join(directory, "collector.log")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/event" % (self.port,)

    def start(self, timeout: float = 20.0) -> "Collector":
        os.makedirs(self.directory, exist_ok=True)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collector.py")
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, script, str(self.port), self.path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        _waitFor(lambda: _portAccepts(self.port), self.process, "collector", self.logPath, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        return _stop(self.process, timeout)

    def events(self) -> List[Dict[str, Any]]:
        return readAudit(self.path) if os.path.exists(self.path) else []

    def waitFor(self, count: int, timeout: float = 60.0) -> List[Dict[str, Any]]:
        """
        Wait (bounded) until C{count} distinct event ids have arrived.
        """
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if len({e["id"] for e in events}) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.1)


# -- audit file --------------------------------------------------------------


def readAudit(path: str) -> List[Dict[str, Any]]:
    """
    Every event of a JSON-lines audit file, in file order.
    """
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                events.append(json.loads(line))
    return events


def eventsOf(events: Iterable[Mapping[str, Any]], *msgs: str) -> List[Mapping[str, Any]]:
    """
    The events whose C{msg} is one of C{msgs}, in order.
    """
    return [event for event in events if event.get("msg") in msgs]


# -- clients -----------------------------------------------------------------


def clientEnvironment(
    home: str, caBundle: str, proxy: Optional[str]
) -> Dict[str, str]:
    """
    A minimal environment for an ACME client: trust only C{caBundle}, use
    C{proxy} (or none) for HTTPS, and never bypass it.
    """
    env = {
        "PATH": _BASE_PATH,
        "HOME": home,
        "LC_ALL": "C.UTF-8",
        "REQUESTS_CA_BUNDLE": caBundle,
        "SSL_CERT_FILE": caBundle,
        "LEGO_CA_CERTIFICATES": caBundle,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    if proxy is not None:
        env["HTTPS_PROXY"] = env["https_proxy"] = proxy
    return env


def _run(
    name: str, argv: List[str], env: Mapping[str, str], cwd: str,
    timeout: float, check: bool,
) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(
            "%s timed out after %ss\n$ %s\n%s\n%s"
            % (name, timeout, " ".join(argv), _tail(_decode(e.stdout)), _tail(_decode(e.stderr)))
        )
    if check and result.returncode != 0:
        raise ClientFailed(name, result)
    return result


def _decode(data: Any) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""


class Certbot:
    """
    Debian's certbot with its own config/work/logs dirs under C{directory}.

    It authenticates with the manual plugin and no-op hooks: Pebble runs
    with PEBBLE_VA_ALWAYS_VALID, so nothing has to be served.
    """

    def __init__(
        self, directory: str, server: str, caBundle: str,
        proxy: Optional[str] = None, email: str = "e2e@example.com",
        timeout: float = 90.0,
    ) -> None:
        self.directory = directory
        self.server = server
        self.email = email
        self.timeout = timeout
        self.configDir = os.path.join(directory, "config")
        self.workDir = os.path.join(directory, "work")
        self.logsDir = os.path.join(directory, "logs")
        home = os.path.join(directory, "home")
        for d in (self.configDir, self.workDir, self.logsDir, home):
            os.makedirs(d, exist_ok=True)
        self.env = clientEnvironment(home, caBundle, proxy)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """
        Run C{certbot ARGS} with the common options appended.
        """
        argv = ["certbot", *args,
                "--config-dir", self.configDir,
                "--work-dir", self.workDir,
                "--logs-dir", self.logsDir,
                "--server", self.server,
                "--non-interactive"]
        return _run("certbot", argv, self.env, self.directory, self.timeout, check)

    def register(self) -> subprocess.CompletedProcess:
        """
        Create the account.
        """
        return self.run("register", "-m", self.email, "--agree-tos", "--no-eff-email")

    def certonly(self, names: Sequence[str], certName: str) -> subprocess.CompletedProcess:
        """
        Obtain one certificate for C{names}, saved as lineage C{certName}.
        """
        domains = []
        for name in names:
            domains += ["-d", name]
        return self.run(
            "certonly", "--cert-name", certName, *domains,
            "--manual", "--preferred-challenges", "http",
            "--manual-auth-hook", "/bin/true",
            "--manual-cleanup-hook", "/bin/true",
            "-m", self.email, "--agree-tos", "--no-eff-email",
            "--key-type", "ecdsa",
        )

    def renew(self, certName: str) -> subprocess.CompletedProcess:
        """
        Renew C{certName} now (no random sleep: stdin is not a tty).
        """
        return self.run(
            "renew", "--cert-name", certName, "--force-renewal",
            "--no-random-sleep-on-renew",
        )

    def updateAccount(self, email: str) -> subprocess.CompletedProcess:
        """
        Change the account's contact address.
        """
        return self.run("update_account", "-m", email, "--no-eff-email")

    def revoke(self, certName: str) -> subprocess.CompletedProcess:
        """
        Revoke the current certificate of C{certName}, keeping its files.
        """
        return self.run(
            "revoke", "--cert-path", self.certPath(certName),
            "--reason", "superseded", "--no-delete-after-revoke",
        )

    def certPath(self, certName: str) -> str:
        """
        The current leaf certificate of a lineage.
        """
        return os.path.join(self.configDir, "live", certName, "cert.pem")


class Lego:
    """
    Debian's lego with its data under C{directory}.

    HTTP-01 with lego's own server on a free loopback port: Pebble never
    connects to it (PEBBLE_VA_ALWAYS_VALID), but lego insists on a solver.
    """

    def __init__(
        self, directory: str, server: str, caBundle: str,
        proxy: Optional[str] = None, email: str = "e2e@example.com",
        timeout: float = 90.0,
    ) -> None:
        self.directory = directory
        self.server = server
        self.email = email
        self.timeout = timeout
        self.path = os.path.join(directory, "lego")
        home = os.path.join(directory, "home")
        for d in (self.path, home):
            os.makedirs(d, exist_ok=True)
        self.env = clientEnvironment(home, caBundle, proxy)

    def run(self, names: Sequence[str], *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """
        Run C{lego GLOBALS COMMAND...} for C{names}.
        """
        argv = ["lego", "--server", self.server, "--email", self.email,
                "--accept-tos", "--path", self.path,
                "--key-type", "ec256",
                "--http", "--http.port", "127.0.0.1:%d" % (freePort(),)]
        for name in names:
            argv += ["--domains", name]
        argv += list(command)
        return _run("lego", argv, self.env, self.directory, self.timeout, check)

    def obtain(self, names: Sequence[str]) -> subprocess.CompletedProcess:
        """
        C{lego run}: register if needed and obtain a certificate.
        """
        return self.run(names, "run")

    def renew(self, names: Sequence[str]) -> subprocess.CompletedProcess:
        """
        C{lego renew} now: any certificate counts as due, no random sleep.
        """
        return self.run(names, "renew", "--days", "100000", "--no-random-sleep")

    def revoke(self, names: Sequence[str]) -> subprocess.CompletedProcess:
        """
        C{lego revoke}, keeping the certificate files.
        """
        return self.run(names, "revoke", "--keep")

    def certPath(self, name: str) -> str:
        """
        Where lego saved the certificate (leaf first, then the chain) whose
        first domain is C{name}.
        """
        return os.path.join(self.path, "certificates", "%s.crt" % (name.replace("*", "_"),))
