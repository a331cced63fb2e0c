"""
Tests for keychestamp.options: every flag of DESIGN.md's command-line table,
the defaults, one-line errors for bad values, the working directory and its
config.json, and --ca.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import stat
import sys
from typing import Dict, List, Optional

from cryptography import x509
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from keychestamp import options as optionsModule
from keychestamp.ca import CertificateAuthority
from keychestamp.options import Options, defaultWorkDir

ID_PATTERN = re.compile(r"^[a-z0-9]{24}@amp\.keychest\.net$")

#: DESIGN.md: loopback and private ranges.
DESIGN_DEFAULT_ALLOW = [
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
        "fe80::/10",
    )
]


def mode(path: FilePath) -> int:
    return stat.S_IMODE(os.stat(path.path).st_mode)


class OptionsCase(SynchronousTestCase):
    """
    Parses with a private working directory, an empty environment, and
    captured stdout and stderr.
    """

    def setUp(self) -> None:
        self.etc = FilePath(self.mktemp())
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def parse(self, *args: str, environ: Optional[Dict[str, str]] = None, etc: bool = True) -> Options:
        options = Options(environ={} if environ is None else environ, stdout=self.stdout)
        options.parseOptions((["-e", self.etc.path] if etc else []) + list(args))
        return options

    def assertOneLineError(self, *args: str, mentions: str = "", etc: bool = True) -> str:
        """
        Parsing C{args} exits non-zero with exactly one line on stderr (naming
        C{mentions}) and nothing on stdout; return the line.
        """
        self.stderr.seek(0)
        self.stderr.truncate()
        with self.assertRaises(SystemExit) as raised:
            self.parse(*args, etc=etc)
        self.assertNotIn(raised.exception.code, (0, None))
        text = self.stderr.getvalue()
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.endswith("\n"), text)
        self.assertIn(mentions, text)
        self.assertEqual(self.stdout.getvalue(), "")
        return text


class DefaultsTests(OptionsCase):
    """
    Without flags, the values DESIGN.md promises.
    """

    def test_defaults(self) -> None:
        """
        Port 8443, level INFO, the KeyChest API URL, all interfaces, the API
        poster on and no file log, no extra intercepts or tunnel ports, the
        default client networks.
        """
        o = self.parse()
        self.assertEqual(o["port"], 8443)
        self.assertEqual(o["level"], "INFO")
        self.assertEqual(o["api-url"], "https://keychest.net/api/v1.0/amp/event")
        self.assertIsNone(o["addr"])
        self.assertFalse(o["noapi"])
        self.assertIsNone(o["file"])
        self.assertFalse(o["ca"])
        self.assertIsNone(o["upstream-ca"])
        self.assertEqual(o["intercept"], [])
        self.assertEqual(o["connect-port"], [])
        self.assertEqual(sorted(map(str, o["allow"])), sorted(map(str, DESIGN_DEFAULT_ALLOW)))

    def test_noapiImpliesDefaultAuditFile(self) -> None:
        """
        -n turns the file log on at /var/log/keychestamp/audit.json (checked
        for writability, here intercepted so the test does not touch /var/log).
        """
        checked: List[str] = []
        self.patch(optionsModule, "_appendable", lambda path, option: checked.append(path))
        o = self.parse("-n")
        self.assertTrue(o["noapi"])
        self.assertEqual(o["file"], "/var/log/keychestamp/audit.json")
        self.assertEqual(checked, ["/var/log/keychestamp/audit.json"])

    def test_noapiWithFile(self) -> None:
        """
        -n -f PATH logs to PATH, which is created before anything listens.
        """
        audit = FilePath(self.mktemp()).child("logs").child("audit.json")
        o = self.parse("-n", "-f", audit.path)
        self.assertEqual(o["file"], audit.path)
        self.assertTrue(audit.exists())

    def test_fileWithoutNoapi(self) -> None:
        """
        -f alone keeps the API poster and adds the file log.
        """
        audit = FilePath(self.mktemp())
        o = self.parse("-f", audit.path)
        self.assertFalse(o["noapi"])
        self.assertEqual(o["file"], audit.path)

    def test_limitsHaveDefaults(self) -> None:
        """
        Every limit and timeout option has a positive default (max-connections
        derived from the file limit when left at 0).
        """
        o = self.parse()
        for name, default, _ in optionsModule.LIMITS:
            self.assertGreater(o[name], 0, name)


class FlagTests(OptionsCase):
    """
    Every flag of DESIGN.md's table, short and long.
    """

    def test_shortFlags(self) -> None:
        """
        -l -n -f -p -a -e are parsed into their values.
        """
        audit = FilePath(self.mktemp())
        o = self.parse("-l", "DEBUG", "-n", "-f", audit.path, "-p", "9443", "-a", "127.0.0.1")
        self.assertEqual(
            (o["level"], o["noapi"], o["file"], o["port"], o["addr"], o["etc"]),
            ("DEBUG", True, audit.path, 9443, "127.0.0.1", self.etc.path),
        )

    def test_longFlags(self) -> None:
        """
        The long spellings, including the repeatable ones, in order.
        """
        bundle = FilePath(self.mktemp())
        from tests.support import TestCA

        bundle.setContent(TestCA().pem)
        audit = FilePath(self.mktemp())
        o = Options(environ={}, stdout=self.stdout)
        o.parseOptions(
            [
                "--etc", self.etc.path, "--level", "ERROR", "--noapi", "--file", audit.path,
                "--port", "8080", "--addr", "::1", "--api-url", "https://collector.example/ev",
                "--upstream-ca", bundle.path,
                "--intercept", "pebble.example:14000", "--intercept", "step-ca.internal",
                "--allow", "203.0.113.0/24", "--allow", "2001:db8::/32",
                "--connect-port", "8443", "--connect-port", "9000",
            ]
        )
        self.assertEqual(o["etc"], self.etc.path)
        self.assertEqual(o["level"], "ERROR")
        self.assertTrue(o["noapi"])
        self.assertEqual(o["file"], audit.path)
        self.assertEqual(o["port"], 8080)
        self.assertEqual(o["addr"], "::1")
        self.assertEqual(o["api-url"], "https://collector.example/ev")
        self.assertEqual(o["upstream-ca"], bundle.path)
        self.assertEqual(o["intercept"], [("pebble.example", 14000), ("step-ca.internal", None)])
        self.assertEqual(
            o["allow"], [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32")]
        )
        self.assertEqual(o["connect-port"], [8443, 9000])

    def test_levels(self) -> None:
        """
        Every level of the table is accepted, in any case; WARN means WARNING.
        """
        for given, expected in [
            ("debug", "DEBUG"), ("Info", "INFO"), ("WARNING", "WARNING"), ("warn", "WARNING"),
            ("error", "ERROR"), ("CRITICAL", "CRITICAL"),
        ]:
            self.assertEqual(self.parse("-l", given)["level"], expected)

    def test_addresses(self) -> None:
        """
        -a takes IPv4 and IPv6 addresses, brackets allowed.
        """
        self.assertEqual(self.parse("-a", "::")["addr"], "::")
        self.assertEqual(self.parse("-a", "[::1]")["addr"], "::1")
        self.assertEqual(self.parse("-a", "0.0.0.0")["addr"], "0.0.0.0")

    def test_interceptForms(self) -> None:
        """
        --intercept takes HOST, HOST:PORT, [V6]:PORT and '*', lowercased
        without a trailing dot.
        """
        o = self.parse(
            "--intercept", "*", "--intercept", "Pebble.Example.", "--intercept", "[::1]:14000",
            "--intercept", "10.0.0.5:9000",
        )
        self.assertEqual(
            o["intercept"], [("*", None), ("pebble.example", None), ("::1", 14000), ("10.0.0.5", 9000)]
        )

    def test_allowReplacesDefaults(self) -> None:
        """
        --allow replaces the default networks; host bits are tolerated.
        """
        o = self.parse("--allow", "10.1.2.3/8")
        self.assertEqual(o["allow"], [ipaddress.ip_network("10.0.0.0/8")])

    def test_ca(self) -> None:
        """
        -c (and --ca) print exactly the root certificate in PEM, creating the
        CA on first use, and exit 0; the same certificate the second time.
        """
        with self.assertRaises(SystemExit) as raised:
            self.parse("-c")
        self.assertEqual(raised.exception.code, 0)
        printed = self.stdout.getvalue()
        root = self.etc.child("ca").child("root.crt").getContent()
        self.assertEqual(printed.encode("ascii"), root)
        certs = x509.load_pem_x509_certificates(printed.encode("ascii"))
        self.assertEqual(len(certs), 1)
        self.assertTrue(printed.startswith("-----BEGIN CERTIFICATE-----\n"))
        self.assertTrue(printed.endswith("-----END CERTIFICATE-----\n"))
        self.assertEqual(self.stderr.getvalue(), "")
        self.stdout.seek(0)
        self.stdout.truncate()
        with self.assertRaises(SystemExit) as raised:
            self.parse("--ca")
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual(self.stdout.getvalue().encode("ascii"), root)

    def test_caBeforeAuditFile(self) -> None:
        """
        --ca exits before the audit file is checked, so `keychestamp -n --ca`
        works for an operator who cannot write /var/log.
        """

        def forbidden(path: str, option: str) -> None:
            raise AssertionError("--ca must not touch the audit file")

        self.patch(optionsModule, "_appendable", forbidden)
        with self.assertRaises(SystemExit) as raised:
            self.parse("-n", "--ca")
        self.assertEqual(raised.exception.code, 0)
        self.assertIn("BEGIN CERTIFICATE", self.stdout.getvalue())

    def test_help(self) -> None:
        """
        -h prints usage naming every option of the table and every limit, and
        exits 0.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            self.parse("-h")
        self.assertIn(raised.exception.code, (0, None))
        text = out.getvalue()
        for short, long in [
            ("-h", "--help"), ("-l", "--level"), ("-n", "--noapi"), ("-f", "--file"),
            ("-p", "--port"), ("-a", "--addr"), ("-e", "--etc"), ("-c", "--ca"),
        ]:
            self.assertIn(f"{short}, {long}", text)
        for long in ["--api-url", "--intercept", "--allow", "--upstream-ca", "--connect-port",
                     "--limits", "--admin"]:
            self.assertIn(long, text)
        for name, _, _ in optionsModule.LIMITS:
            self.assertIn("--" + name, text)

    def test_authority(self) -> None:
        """
        The parsed options carry the CA of the working directory and the
        proxy id of its config.json.
        """
        o = self.parse()
        self.assertIsInstance(o["authority"], CertificateAuthority)
        self.assertEqual(o["authority"].rootPEM, self.etc.child("ca").child("root.crt").getContent())
        config = json.loads(self.etc.child("config.json").getContent())
        self.assertEqual(o["proxy-id"], config["id"])


class BadValueTests(OptionsCase):
    """
    Each bad value: one clear line on stderr and a non-zero exit.
    """

    def test_upstreamCANotPEM(self) -> None:
        """
        --upstream-ca naming a readable file that holds no certificate is
        refused.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        self.assertOneLineError("--upstream-ca", path, mentions="--upstream-ca")

    def test_apiURLNotHTTP(self) -> None:
        """
        --api-url must be an http(s) URL with a host.
        """
        self.assertOneLineError("--api-url", "ftp://x/", mentions="--api-url")

    def test_apiHeaderControlCharacter(self) -> None:
        """
        --api-header values with control characters are refused.
        """
        self.assertOneLineError("--api-header", "X: a\x01b", mentions="--api-header")

    def test_portZero(self) -> None:
        """
        -p 0 is refused.
        """
        self.assertOneLineError("-p", "0", mentions="--port")

    def test_portTooLarge(self) -> None:
        """
        -p 70000 is refused.
        """
        self.assertOneLineError("-p", "70000", mentions="70000")

    def test_portNotANumber(self) -> None:
        """
        -p abc is refused.
        """
        self.assertOneLineError("-p", "abc", mentions="abc")

    def test_unknownLevel(self) -> None:
        """
        -l LOUD is refused, and the line lists the levels.
        """
        line = self.assertOneLineError("-l", "LOUD", mentions="LOUD")
        self.assertIn("DEBUG", line)

    def test_badAddress(self) -> None:
        """
        -a nope is refused.
        """
        self.assertOneLineError("--addr", "nope", mentions="--addr")

    def test_badNetwork(self) -> None:
        """
        --allow x is refused.
        """
        self.assertOneLineError("--allow", "x", mentions="--allow")

    def test_badInterceptPort(self) -> None:
        """
        --intercept a:b is refused.
        """
        self.assertOneLineError("--intercept", "a:b", mentions="--intercept")

    def test_badInterceptHost(self) -> None:
        """
        --intercept with a URL instead of a host is refused.
        """
        self.assertOneLineError("--intercept", "https://pebble/dir", mentions="--intercept")

    def test_missingUpstreamCA(self) -> None:
        """
        --upstream-ca naming a missing file is refused.
        """
        missing = self.mktemp()
        self.assertOneLineError("--upstream-ca", missing, mentions=missing)

    def test_missingLimits(self) -> None:
        """
        --limits naming a missing file is refused.
        """
        self.assertOneLineError("--limits", self.mktemp(), mentions="--limits")

    def test_connectPortZero(self) -> None:
        """
        --connect-port 0 is refused.
        """
        self.assertOneLineError("--connect-port", "0", mentions="--connect-port")

    def test_negativeTimeout(self) -> None:
        """
        A negative timeout is refused.
        """
        self.assertOneLineError("--idle-timeout", "-1", mentions="--idle-timeout")

    def test_unknownOption(self) -> None:
        """
        An unknown option is one line too, not the whole usage text.
        """
        self.assertOneLineError("--bogus", mentions="bogus")

    def test_unwritableAuditFile(self) -> None:
        """
        -f under a path that cannot be a directory is refused before anything
        listens.
        """
        blocker = FilePath(self.mktemp())
        blocker.setContent(b"")
        self.assertOneLineError("-f", blocker.child("audit.json").path, mentions="--file")

    def test_unusableWorkingDirectory(self) -> None:
        """
        -e under a regular file is refused.
        """
        blocker = FilePath(self.mktemp())
        blocker.setContent(b"")
        self.assertOneLineError("-e", blocker.child("etc").path, mentions="--etc", etc=False)

    def test_brokenConfig(self) -> None:
        """
        A config.json that is not JSON is refused, naming the file.
        """
        self.etc.makedirs()
        self.etc.child("config.json").setContent(b"{not json")
        self.assertOneLineError(mentions="config.json")

    def test_groupReadableKey(self) -> None:
        """
        A CA key readable by others stops the start with one line naming the
        chmod to run.
        """
        self.parse()
        key = self.etc.child("ca").child("root.key")
        os.chmod(key.path, 0o644)
        self.assertOneLineError(mentions=f"chmod 600 {key.path}")

    def test_groupReadableCADirectory(self) -> None:
        """
        A CA directory readable by others stops the start the same way.
        """
        self.parse()
        directory = self.etc.child("ca")
        os.chmod(directory.path, 0o755)
        self.assertOneLineError(mentions=f"chmod 700 {directory.path}")


class WorkingDirectoryTests(OptionsCase):
    """
    -e, $KC_CONFIG_DIR, ~/.keychestamp; created 0700 with a persistent id.
    """

    def test_created(self) -> None:
        """
        A missing working directory (and its parents) is created 0700, with
        config.json holding a proxy id, and the CA inside it.
        """
        self.etc = FilePath(self.mktemp()).child("deep").child("etc")
        o = self.parse()
        self.assertEqual(mode(self.etc), 0o700)
        config = json.loads(self.etc.child("config.json").getContent())
        self.assertRegex(config["id"], ID_PATTERN)
        self.assertEqual(o["proxy-id"], config["id"])
        self.assertEqual(mode(self.etc.child("ca")), 0o700)
        self.assertEqual(mode(self.etc.child("ca").child("root.key")), 0o600)

    def test_configNotWorldReadable(self) -> None:
        """
        config.json (it may hold API headers) is readable by the owner only.
        """
        self.parse()
        self.assertEqual(mode(self.etc.child("config.json")), 0o600)

    def test_reused(self) -> None:
        """
        A second start keeps the id, the config file and the root.
        """
        first = self.parse()
        config = self.etc.child("config.json").getContent()
        second = self.parse()
        self.assertEqual(second["proxy-id"], first["proxy-id"])
        self.assertEqual(self.etc.child("config.json").getContent(), config)
        self.assertEqual(second["authority"].rootPEM, first["authority"].rootPEM)

    def test_invalidIdReplacedOtherKeysKept(self) -> None:
        """
        A config.json without a valid id gets one; its other keys stay.
        """
        self.etc.makedirs()
        self.etc.child("config.json").setContent(b'{"id": "Not-Valid", "note": "kept"}')
        o = self.parse()
        config = json.loads(self.etc.child("config.json").getContent())
        self.assertRegex(config["id"], ID_PATTERN)
        self.assertEqual(config["note"], "kept")
        self.assertEqual(o["proxy-id"], config["id"])

    def test_environment(self) -> None:
        """
        Without -e, $KC_CONFIG_DIR names the working directory.
        """
        o = self.parse(environ={"KC_CONFIG_DIR": self.etc.path}, etc=False)
        self.assertEqual(o["etc"], self.etc.path)
        self.assertRegex(json.loads(self.etc.child("config.json").getContent())["id"], ID_PATTERN)

    def test_optionOverridesEnvironment(self) -> None:
        """
        -e wins over $KC_CONFIG_DIR.
        """
        other = FilePath(self.mktemp())
        o = self.parse(environ={"KC_CONFIG_DIR": other.path})
        self.assertEqual(o["etc"], self.etc.path)
        self.assertFalse(other.exists())

    def test_home(self) -> None:
        """
        Without -e or $KC_CONFIG_DIR, ~/.keychestamp.
        """
        home = FilePath(self.mktemp())
        home.makedirs()
        self.patch(os, "environ", dict(os.environ, HOME=home.path))
        self.assertEqual(defaultWorkDir({}), home.child(".keychestamp").path)
        o = self.parse(etc=False)
        self.assertEqual(o["etc"], home.child(".keychestamp").path)
        self.assertEqual(mode(home.child(".keychestamp")), 0o700)
