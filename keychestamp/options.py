"""
The command line (compatible with the original keychestamp), the working
directory and its config.json.

Every check that can fail runs here, before anything listens, and a failure is
one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import secrets
import string
import sys
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from twisted.python import usage
from twisted.python.filepath import FilePath

from keychestamp import __version__

DEFAULT_PORT = 8443
DEFAULT_API_URL = "https://keychest.net/api/v1.0/amp/event"
DEFAULT_AUDIT_FILE = "/var/log/keychestamp/audit.json"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ID_ALPHABET = string.ascii_lowercase + string.digits
ID_DOMAIN = "@amp.keychest.net"

#: Client networks served by default: loopback and private ranges.
DEFAULT_ALLOW = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
)

#: (option, default, help) of the limits and timeouts; all are numbers.
LIMITS: Sequence[Tuple[str, float, str]] = (
    ("max-request-line", 8192, "longest request line in bytes (414 above)"),
    ("max-header-size", 65536, "largest request or response header block in bytes (431 above)"),
    ("max-headers", 100, "most header fields in a request or response (431 above)"),
    ("max-connections", 0, "most concurrent client connections (0: a quarter of the file limit, at most 4096)"),
    ("header-timeout", 30.0, "seconds to receive a complete request head"),
    ("tls-timeout", 15.0, "seconds for a TLS handshake with a client"),
    ("idle-timeout", 60.0, "seconds a keep-alive client connection may stay idle"),
    ("connect-timeout", 10.0, "seconds to connect to an upstream"),
    ("response-timeout", 60.0, "seconds for an upstream to send its response head (504 after)"),
    ("body-timeout", 60.0, "seconds an upstream may pause between body bytes"),
    ("tunnel-timeout", 600.0, "seconds a tunnel may stay idle both ways"),
)


def _idOK(value: Any) -> bool:
    if not isinstance(value, str) or not value.endswith(ID_DOMAIN):
        return False
    local = value[: -len(ID_DOMAIN)]
    return len(local) == 24 and all(c in ID_ALPHABET for c in local)


def newProxyId() -> str:
    """
    A fresh proxy id: 24 lowercase letters and digits @amp.keychest.net.
    """
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(24)) + ID_DOMAIN


def defaultWorkDir(environ: Dict[str, str]) -> str:
    """
    -e's default: $KC_CONFIG_DIR, else ~/.keychestamp.
    """
    if environ.get("KC_CONFIG_DIR"):
        return environ["KC_CONFIG_DIR"]
    return os.path.join(os.path.expanduser("~"), ".keychestamp")


def prepareWorkDir(path: FilePath) -> Dict[str, Any]:
    """
    Create the working directory (0700) and its config.json with a persistent
    proxy id on first use; return the config. A directory that exists is
    reused as it is.
    """
    if not path.isdir():
        path.makedirs()
        os.chmod(path.path, 0o700)
    configFile = path.child("config.json")
    config: Dict[str, Any] = {}
    if configFile.exists():
        try:
            config = json.loads(configFile.getContent().decode("utf-8"))
        except ValueError as e:
            raise usage.UsageError(f"{configFile.path} is not valid JSON: {e}")
        if not isinstance(config, dict):
            raise usage.UsageError(f"{configFile.path} must hold a JSON object")
    if not _idOK(config.get("id")):
        config["id"] = newProxyId()
        tmp = configFile.temporarySibling(".tmp")
        fd = os.open(tmp.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(config, indent=2).encode("utf-8") + b"\n")
        os.replace(tmp.path, configFile.path)
    return config


def parseHeader(value: str) -> Tuple[str, str]:
    name, sep, rest = value.partition(":")
    name = name.strip()
    control = any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in rest)
    if not sep or not name or any(c in name for c in " \t\r\n") or control:
        raise usage.UsageError(f"--api-header wants 'Name: value', not {value!r}")
    return name, rest.strip()


def parseIntercept(value: str) -> Tuple[str, Optional[int]]:
    """
    HOST, HOST:PORT, [V6]:PORT or '*'.
    """
    value = value.strip()
    if value == "*":
        return "*", None
    host, port = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise usage.UsageError(f"--intercept: bad host {value!r}")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise usage.UsageError(f"--intercept: bad host {value!r}")
            port = _port(rest[1:], "--intercept")
    elif value.count(":") == 1:
        host, p = value.split(":")
        port = _port(p, "--intercept")
    if not host or any(c in host for c in "/ \t@"):
        raise usage.UsageError(f"--intercept: bad host {value!r}")
    return host.lower().rstrip("."), port


def _port(value: str, option: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise usage.UsageError(f"{option}: {value!r} is not a port number")
    if not 1 <= port <= 65535:
        raise usage.UsageError(f"{option}: {port} is not in 1..65535")
    return port


def _readable(path: str, option: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise usage.UsageError(f"{option}: cannot read {path}: {e.strerror}")
    return path


def _pemBundle(path: str, option: str) -> None:
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            if not x509.load_pem_x509_certificates(f.read()):
                raise ValueError("no certificate")
    except ValueError as e:
        raise usage.UsageError(f"{option}: {path} is not a PEM certificate bundle ({e})")


def _httpURL(value: str, option: str) -> None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port
    except ValueError as e:
        raise usage.UsageError(f"{option}: {value!r} is not a URL ({e})")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage.UsageError(f"{option}: {value!r} is not an http(s) URL")


def _appendable(path: str, option: str) -> None:
    """
    Fail now, before anything listens, if the audit file cannot be written:
    the file sink's own check (directories 0750, file 0640), done early.
    """
    from keychestamp.sinks.file import FileSink

    try:
        FileSink(path, clock=None).check()  # type: ignore[arg-type]
    except OSError as e:
        raise usage.UsageError(f"{option}: {e}")


class Options(usage.Options):
    """
    keychestamp's options, shared by `twistd keychestamp`, the `keychestamp`
    console script and `python -m keychestamp`.
    """

    synopsis = "[options]"
    longdesc = (
        "A pass-through MITM proxy for ACMEv2 clients: point HTTPS_PROXY at it and "
        "every ACME exchange becomes a JSON event in a local file and/or at the "
        "KeyChest API. Version " + __version__ + "."
    )

    optFlags = [
        ["noapi", "n", "disable the API poster; log to " + DEFAULT_AUDIT_FILE + " unless -f says where"],
        ["ca", "c", "print the root certificate (PEM) to stdout and exit"],
    ]
    optParameters = [
        ["level", "l", "INFO", "minimum level of diagnostic logs: " + ", ".join(LEVELS)],
        ["file", "f", None, "write ACME events as JSON lines to this file"],
        ["port", "p", DEFAULT_PORT, "listening port", int],
        ["addr", "a", None, "listening address (default: all interfaces, IPv4 and IPv6)"],
        ["etc", "e", None, "working directory (default: $KC_CONFIG_DIR, else ~/.keychestamp)"],
        ["api-url", None, DEFAULT_API_URL, "where the poster POSTs events"],
        ["upstream-ca", None, None, "extra PEM bundle trusted for upstream servers"],
        ["limits", None, None, "JSON rate-limit table for the ledger"],
        ["failing-after", None, 3, "consecutive failed orders or validations that flag a client (ledger)", int],
        ["expiry-days", None, 30.0, "days before not_after a certificate is flagged as expiring (ledger)", float],
        ["egress-ip", None, None, "the proxy's address as the ACME server sees it, for new-accounts-per-ip (ledger)"],
        ["admin", None, None, "admin listener endpoint, e.g. tcp:8444:interface=127.0.0.1"],
    ] + [[name, None, default, help, type(default)] for (name, default, help) in LIMITS]

    def __init__(self, environ: Optional[Dict[str, str]] = None, stdout: Optional[TextIO] = None) -> None:
        super().__init__()
        self._environ = dict(os.environ if environ is None else environ)
        self._stdout = stdout
        self["intercept"] = []
        self["allow"] = []
        self["connect-port"] = []
        self["api-header"] = []

    #: -h as in the original; usage.Options only knows --help.
    opt_h = usage.Options.opt_help

    def opt_intercept(self, value: str) -> None:
        """also intercept HOST[:PORT] (repeatable; '*' = every host); default: the public ACME CAs"""
        self["intercept"].append(parseIntercept(value))

    def opt_allow(self, value: str) -> None:
        """client network allowed to use the proxy, CIDR (repeatable; replaces the default loopback + private ranges)"""
        try:
            self["allow"].append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise usage.UsageError(f"--allow: {value!r} is not a network (CIDR)")

    def opt_connect_port(self, value: str) -> None:
        """also tunnel to this port for hosts not intercepted (repeatable; default only 443)"""
        self["connect-port"].append(_port(value, "--connect-port"))

    def opt_api_header(self, value: str) -> None:
        """extra 'Name: value' header on every POST to --api-url (repeatable)"""
        self["api-header"].append(parseHeader(value))

    def opt_version(self) -> None:
        """print the version and exit"""
        self._write(__version__ + "\n")
        raise SystemExit(0)

    def _write(self, text: str) -> None:
        out = self._stdout if self._stdout is not None else sys.stdout
        out.write(text)
        out.flush()

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        """
        Parse, and turn any error into one line on stderr and exit status 2.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"keychestamp: error: {e}\n")
            raise SystemExit(2)

    def postOptions(self) -> None:
        level = str(self["level"]).upper()
        if level == "WARN":
            level = "WARNING"
        if level not in LEVELS:
            raise usage.UsageError(f"--level: {self['level']!r} is not one of {', '.join(LEVELS)}")
        self["level"] = level
        _port(str(self["port"]), "--port")
        if self["addr"] is not None:
            try:
                self["addr"] = str(ipaddress.ip_address(self["addr"].strip("[]")))
            except ValueError:
                raise usage.UsageError(f"--addr: {self['addr']!r} is not an IP address")
        for name, default, _ in LIMITS:
            if self[name] < 0:
                raise usage.UsageError(f"--{name}: must not be negative")
        if not self["max-connections"]:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            self["max-connections"] = max(16, min(4096, soft // 4))
        if self["admin"]:
            from keychestamp.admin.endpoint import AdminEndpointError, checkAdminEndpoint

            try:
                checkAdminEndpoint(self["admin"], self["allow"], self["port"])
            except AdminEndpointError as e:
                raise usage.UsageError(str(e))
        if not self["allow"]:
            self["allow"] = [ipaddress.ip_network(n) for n in DEFAULT_ALLOW]
        if self["upstream-ca"]:
            _readable(self["upstream-ca"], "--upstream-ca")
            _pemBundle(self["upstream-ca"], "--upstream-ca")
        _httpURL(self["api-url"], "--api-url")
        if self["limits"]:
            _readable(self["limits"], "--limits")
        from keychestamp.ledger.limits import LimitsError, loadLimits

        try:
            self["limit-table"] = loadLimits(self["limits"])
        except LimitsError as e:
            raise usage.UsageError(str(e))
        if self["failing-after"] < 1:
            raise usage.UsageError("--failing-after: must be at least 1")
        if self["expiry-days"] < 0:
            raise usage.UsageError("--expiry-days: must not be negative")
        if self["egress-ip"] is not None:
            try:
                self["egress-ip"] = str(ipaddress.ip_address(self["egress-ip"].strip("[]")))
            except ValueError:
                raise usage.UsageError(f"--egress-ip: {self['egress-ip']!r} is not an IP address")
        self["etc"] = self["etc"] or defaultWorkDir(self._environ)
        try:
            self["config"] = prepareWorkDir(FilePath(os.path.abspath(self["etc"])))
        except OSError as e:
            raise usage.UsageError(f"--etc: cannot use {self['etc']}: {e.strerror or e}")
        self["proxy-id"] = self["config"]["id"]
        if self["noapi"] and not self["file"]:
            self["file"] = DEFAULT_AUDIT_FILE
        for name, value in self["config"].get("api_headers", {}).items():
            self["api-header"].append(parseHeader(f"{name}: {value}"))
        from keychestamp.ca import CertificateAuthority, KeyPermissionError

        try:
            self["authority"] = CertificateAuthority(FilePath(os.path.abspath(self["etc"])).child("ca"))
        except KeyPermissionError as e:
            raise usage.UsageError(str(e))
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot load the CA in {self['etc']}: {e}")
        if self["ca"]:
            self._write(self["authority"].rootPEM.decode("ascii"))
            raise SystemExit(0)
        if self["file"]:
            _appendable(self["file"], "--file")
