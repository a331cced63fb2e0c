"""
Tests for keychestamp.ca: the root CA, leaf minting and caching, key file
permissions, and real TLS handshakes with the leaves under strict verification
(Python's ssl with VERIFY_X509_STRICT, curl, lego / Go's crypto/x509).
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keychestamp import ca as camodule
from keychestamp.ca import (
    LEAF_RENEW_BEFORE,
    CertificateAuthority,
    KeyPermissionError,
    LeafServerCreator,
    serverContext,
    sniContext,
)

T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


class FakeNow:
    """
    A settable UTC clock for C{CertificateAuthority(now=...)}.
    """

    def __init__(self, when: datetime.datetime = T0) -> None:
        self.when = when

    def __call__(self) -> datetime.datetime:
        return self.when

    def advance(self, delta: datetime.timedelta) -> None:
        self.when += delta


def makeCA(testCase: SynchronousTestCase, **kwargs: object) -> CertificateAuthority:
    """
    A new CA in a fresh directory (the C{ca} child of a new temporary path).
    """
    return CertificateAuthority(FilePath(testCase.mktemp()).child("ca"), **kwargs)  # type: ignore[arg-type]


def mode(path: FilePath) -> int:
    return stat.S_IMODE(os.stat(path.path).st_mode)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# -- processes --------------------------------------------------------------


class Collector(ProcessProtocol):
    """
    Collects a child process's output; C{ended} fires with its exit code
    (None when a signal ended it; then C{signal} says which).
    """

    def __init__(self) -> None:
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        self.ended: Deferred = Deferred()
        self.signal: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.signal = reason.value.signal
        self.ended.callback(reason.value.exitCode)


async def runProcess(
    argv: Sequence[str],
    env: Optional[Dict[str, str]] = None,
    path: Optional[str] = None,
    timeout: float = 60.0,
) -> Tuple[bytes, bytes, Optional[int]]:
    """
    Run C{argv} without blocking the reactor; return (stdout, stderr, exit
    code). A process still running after C{timeout} seconds is killed and the
    call fails.
    """
    proto = Collector()
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, argv[0], list(argv), env=dict(os.environ) if env is None else env, path=path
    )
    killed = []

    def kill() -> None:
        killed.append(True)
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    call = reactor.callLater(timeout, kill)  # type: ignore[attr-defined]
    code = await proto.ended
    if call.active():
        call.cancel()
    if killed:
        raise AssertionError(f"{argv[0]} did not finish within {timeout} s; stderr: {b''.join(proto.err)!r}")
    return b"".join(proto.out), b"".join(proto.err), code


# -- the root ---------------------------------------------------------------


class RootTests(SynchronousTestCase):
    """
    The root certificate and key: made once, kept, and what a strict verifier
    expects of a CA.
    """

    def setUp(self) -> None:
        self.now = FakeNow()
        self.ca = makeCA(self, now=self.now)
        self.root = self.ca.rootCert

    def test_basicConstraintsCriticalCA(self) -> None:
        """
        The root says CA:TRUE in a critical basicConstraints extension.
        """
        ext = self.root.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.ca)

    def test_keyUsageCertSign(self) -> None:
        """
        The root's critical keyUsage allows signing certificates.
        """
        ext = self.root.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.key_cert_sign)

    def test_subjectKeyIdentifier(self) -> None:
        """
        The root carries a subjectKeyIdentifier derived from its public key.
        """
        ski = self.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(ski, x509.SubjectKeyIdentifier.from_public_key(self.root.public_key()))

    def test_selfSigned(self) -> None:
        """
        The root is self-issued and its signature verifies with its own key.
        """
        self.assertEqual(self.root.issuer, self.root.subject)
        self.root.verify_directly_issued_by(self.root)

    def test_validity(self) -> None:
        """
        The root is valid now (from the injected clock) and for years to come.
        """
        self.assertLessEqual(self.root.not_valid_before_utc, T0)
        self.assertGreater(self.root.not_valid_after_utc, T0 + datetime.timedelta(days=9 * 365))

    def test_keyMatchesCertificate(self) -> None:
        """
        root.key on disk is the private key of root.crt, and rootPEM is root.crt.
        """
        directory = FilePath(self.ca._dir.path)
        key = serialization.load_pem_private_key(directory.child("root.key").getContent(), None)
        self.assertEqual(key.public_key(), self.root.public_key())
        self.assertEqual(directory.child("root.crt").getContent(), self.ca.rootPEM)
        self.assertEqual(x509.load_pem_x509_certificate(self.ca.rootPEM), self.root)

    def test_fileModes(self) -> None:
        """
        The CA directory is 0700, both keys 0600; the root certificate is
        public but not executable.
        """
        directory = FilePath(self.ca._dir.path)
        self.assertEqual(mode(directory), 0o700)
        self.assertEqual(mode(directory.child("root.key")), 0o600)
        self.assertEqual(mode(directory.child("leaf.key")), 0o600)
        self.assertEqual(mode(directory.child("root.crt")) & 0o111, 0)
        self.assertEqual(mode(directory.child("root.crt")) & 0o600, 0o600)

    def test_reusedOnSecondStart(self) -> None:
        """
        A second CertificateAuthority on the same directory loads the same
        root (same certificate bytes) and the same leaf key.
        """
        again = CertificateAuthority(FilePath(self.ca._dir.path), now=self.now)
        self.assertEqual(again.rootPEM, self.ca.rootPEM)
        self.assertEqual(
            again.rootKey.private_numbers(), self.ca.rootKey.private_numbers()
        )
        self.assertEqual(again.leafKey.private_numbers(), self.ca.leafKey.private_numbers())

    def test_distinctCAsDistinctRoots(self) -> None:
        """
        Two working directories get two different roots (subject and key), so
        a leaf of one is never mistaken for a leaf of the other.
        """
        other = makeCA(self, now=self.now)
        self.assertNotEqual(other.rootCert.subject, self.root.subject)
        self.assertNotEqual(other.rootCert.public_key(), self.root.public_key())


# -- leaves -----------------------------------------------------------------


class LeafTests(SynchronousTestCase):
    """
    Leaves for CONNECT hosts: the right SAN type, chained to the root, one
    shared key, cached in memory and on disk, renewed before expiry.
    """

    def setUp(self) -> None:
        self.now = FakeNow()
        self.ca = makeCA(self, now=self.now)

    def test_dnsName(self) -> None:
        """
        A DNS name gets a DNSName SAN (and the name as CN).
        """
        cert, _ = self.ca.leafFor("acme-v02.api.letsencrypt.org")
        self.assertEqual(
            sans(cert).get_values_for_type(x509.DNSName), ["acme-v02.api.letsencrypt.org"]
        )
        self.assertEqual(sans(cert).get_values_for_type(x509.IPAddress), [])
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([a.value for a in cn], ["acme-v02.api.letsencrypt.org"])

    def test_ipv4Address(self) -> None:
        """
        An IPv4 address gets an IPAddress SAN, not a DNSName.
        """
        import ipaddress

        cert, _ = self.ca.leafFor("127.0.0.1")
        self.assertEqual(
            sans(cert).get_values_for_type(x509.IPAddress), [ipaddress.ip_address("127.0.0.1")]
        )
        self.assertEqual(sans(cert).get_values_for_type(x509.DNSName), [])

    def test_ipv6Address(self) -> None:
        """
        An IPv6 address, bare or in brackets as in a CONNECT authority, gets an
        IPAddress SAN; both spellings give the same certificate.
        """
        import ipaddress

        cert, _ = self.ca.leafFor("::1")
        self.assertEqual(
            sans(cert).get_values_for_type(x509.IPAddress), [ipaddress.ip_address("::1")]
        )
        self.assertEqual(sans(cert).get_values_for_type(x509.DNSName), [])
        self.assertIs(self.ca.leafFor("[::1]")[0], cert)

    def test_chainsToRoot(self) -> None:
        """
        The leaf is issued and signed by the root, and its
        authorityKeyIdentifier is the root's subjectKeyIdentifier.
        """
        cert, _ = self.ca.leafFor("pebble.example")
        cert.verify_directly_issued_by(self.ca.rootCert)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = self.ca.rootCert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ski.digest)

    def test_serverAuthOnly(self) -> None:
        """
        The leaf is an end entity for TLS servers: EKU serverAuth, critical
        basicConstraints CA:FALSE, keyUsage digitalSignature without certSign.
        """
        cert, _ = self.ca.leafFor("pebble.example")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertFalse(bc.value.ca)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.digital_signature)
        self.assertFalse(ku.key_cert_sign)

    def test_validNowAndWithinRoot(self) -> None:
        """
        A new leaf is valid at the injected time and never outlives the root.
        """
        cert, _ = self.ca.leafFor("pebble.example")
        self.assertLess(cert.not_valid_before_utc, T0)
        self.assertGreater(cert.not_valid_after_utc, T0 + LEAF_RENEW_BEFORE)
        self.assertLessEqual(cert.not_valid_after_utc, self.ca.rootCert.not_valid_after_utc)

    def test_longNameHasEmptySubjectAndCriticalSAN(self) -> None:
        """
        A name too long for a CN (64+ characters) leaves the subject empty, and
        then the SAN is critical, as RFC 5280 4.2.1.6 requires.
        """
        name = "a" * 40 + "." + "b" * 40 + ".example"
        cert, _ = self.ca.leafFor(name)
        self.assertEqual(len(cert.subject), 0)
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertTrue(ext.critical)
        self.assertEqual(ext.value.get_values_for_type(x509.DNSName), [name])

    def test_leavesShareOneKey(self) -> None:
        """
        Every leaf carries the CA's one leaf key: no key generation per host.
        """
        (a, keyA), (b, keyB) = self.ca.leafFor("a.example"), self.ca.leafFor("127.0.0.2")
        self.assertEqual(a.public_key(), self.ca.leafKey.public_key())
        self.assertEqual(b.public_key(), self.ca.leafKey.public_key())
        self.assertIs(keyA, self.ca.leafKey)
        self.assertIs(keyB, self.ca.leafKey)

    def test_noKeyGenerationForNewHosts(self) -> None:
        """
        Once the CA exists, minting leaves for new hosts never generates a key.
        """

        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("a key was generated for a leaf")

        self.patch(camodule.ec, "generate_private_key", forbidden)
        cert, _ = self.ca.leafFor("new.example")
        self.assertEqual(sans(cert).get_values_for_type(x509.DNSName), ["new.example"])

    def test_mintingIsCheap(self) -> None:
        """
        Fifty new hosts cost far less than fifty key generations would: the
        bound (100 ms a leaf on average) is generous for a loaded machine.
        """
        start = time.monotonic()
        serials = {self.ca.leafFor(f"host{i}.example")[0].serial_number for i in range(50)}
        elapsed = time.monotonic() - start
        self.assertEqual(len(serials), 50)
        self.assertLess(elapsed, 5.0)

    def test_memoryCacheReturnsSameObject(self) -> None:
        """
        Asking twice for one host (in any case, with a trailing dot) returns
        the cached certificate object.
        """
        first = self.ca.leafFor("acme.example")
        self.assertIs(self.ca.leafFor("acme.example"), first)
        self.assertIs(self.ca.leafFor("ACME.Example.")[0], first[0])

    def test_memoryCacheIsBounded(self) -> None:
        """
        The memory cache holds at most C{cacheSize} leaves; an evicted leaf
        comes back from disk, the same certificate.
        """
        ca = makeCA(self, now=self.now, cacheSize=2)
        first, _ = ca.leafFor("one.example")
        ca.leafFor("two.example")
        ca.leafFor("three.example")
        self.assertEqual(len(ca._cache), 2)
        again, _ = ca.leafFor("one.example")
        self.assertIsNot(again, first)
        self.assertEqual(again.serial_number, first.serial_number)

    def test_diskCacheSurvivesRestart(self) -> None:
        """
        A new CertificateAuthority on the same directory serves the leaf it
        minted before (same serial), for DNS names and addresses.
        """
        names = ["acme.example", "127.0.0.1", "::1"]
        before = {n: self.ca.leafFor(n)[0].serial_number for n in names}
        again = CertificateAuthority(FilePath(self.ca._dir.path), now=self.now)
        self.assertEqual({n: again.leafFor(n)[0].serial_number for n in names}, before)

    def test_unpersistedLeafStaysInMemory(self) -> None:
        """
        persist=False (names a client picks: SNI) writes nothing to disk, and
        a new CertificateAuthority does not know the leaf.
        """
        before = sorted(os.listdir(self.ca._leafDir.path))
        cert, _ = self.ca.leafFor("sni-chosen.example", persist=False)
        self.assertEqual(sorted(os.listdir(self.ca._leafDir.path)), before)
        self.assertIs(self.ca.leafFor("sni-chosen.example", persist=False)[0], cert)
        again = CertificateAuthority(FilePath(self.ca._dir.path), now=self.now)
        self.assertNotEqual(again.leafFor("sni-chosen.example", persist=False)[0].serial_number, cert.serial_number)

    def test_freshLeafKept(self) -> None:
        """
        A leaf far from expiry is kept as time passes.
        """
        cert, _ = self.ca.leafFor("acme.example")
        self.now.advance(datetime.timedelta(days=100))
        self.assertIs(self.ca.leafFor("acme.example")[0], cert)

    def test_nearExpiryLeafReminted(self) -> None:
        """
        A leaf within LEAF_RENEW_BEFORE of its expiry is replaced, in memory
        and on disk: a restarted CA does not serve the old one either.
        """
        cert, _ = self.ca.leafFor("acme.example")
        self.now.when = cert.not_valid_after_utc - LEAF_RENEW_BEFORE + datetime.timedelta(seconds=1)
        renewed, _ = self.ca.leafFor("acme.example")
        self.assertNotEqual(renewed.serial_number, cert.serial_number)
        self.assertGreater(renewed.not_valid_after_utc, cert.not_valid_after_utc)
        self.assertLess(renewed.not_valid_before_utc, self.now.when)
        again = CertificateAuthority(FilePath(self.ca._dir.path), now=self.now)
        self.assertEqual(again.leafFor("acme.example")[0].serial_number, renewed.serial_number)

    def test_expiredDiskLeafReminted(self) -> None:
        """
        A leaf cached on disk that has expired meanwhile (the proxy was down)
        is not served after a restart.
        """
        cert, _ = self.ca.leafFor("acme.example")
        later = FakeNow(cert.not_valid_after_utc + datetime.timedelta(days=1))
        again = CertificateAuthority(FilePath(self.ca._dir.path), now=later)
        renewed, _ = again.leafFor("acme.example")
        self.assertNotEqual(renewed.serial_number, cert.serial_number)
        self.assertGreater(renewed.not_valid_after_utc, later.when)

    def test_leafOfAnotherRootNotServed(self) -> None:
        """
        Cached leaf files signed by a different root (copied working
        directory, regenerated root) are ignored and re-minted.
        """
        cert, _ = self.ca.leafFor("acme.example")
        other = makeCA(self, now=self.now)
        FilePath(other._dir.path).child("leaves").remove()
        FilePath(self.ca._dir.path).child("leaves").copyTo(FilePath(other._dir.path).child("leaves"))
        mine, _ = other.leafFor("acme.example")
        self.assertNotEqual(mine.serial_number, cert.serial_number)
        mine.verify_directly_issued_by(other.rootCert)


# -- permissions and logs ---------------------------------------------------


class PermissionTests(SynchronousTestCase):
    """
    The proxy refuses keys that others can read, with one line saying what to
    chmod.
    """

    def setUp(self) -> None:
        ca = makeCA(self)
        self.directory = FilePath(ca._dir.path)
        self.rootPEM = ca.rootPEM

    def assertRefused(self, path: FilePath, chmod: str) -> None:
        with self.assertRaises(KeyPermissionError) as raised:
            CertificateAuthority(self.directory)
        message = str(raised.exception)
        self.assertIn(f"chmod {chmod} {path.path}", message)
        self.assertNotIn("\n", message)

    def test_groupReadableRootKey(self) -> None:
        """
        A group-readable root.key is refused: chmod 600.
        """
        os.chmod(self.directory.child("root.key").path, 0o640)
        self.assertRefused(self.directory.child("root.key"), "600")

    def test_otherReadableLeafKey(self) -> None:
        """
        A world-readable leaf.key is refused: chmod 600.
        """
        os.chmod(self.directory.child("leaf.key").path, 0o604)
        self.assertRefused(self.directory.child("leaf.key"), "600")

    def test_groupReadableDirectory(self) -> None:
        """
        A CA directory that group or others can read is refused: chmod 700.
        """
        os.chmod(self.directory.path, 0o750)
        self.assertRefused(self.directory, "700")

    def test_otherListableDirectory(self) -> None:
        """
        A CA directory that others can enter (o+x) is refused too.
        """
        os.chmod(self.directory.path, 0o701)
        self.assertRefused(self.directory, "700")

    def test_privateDirectoryAccepted(self) -> None:
        """
        The modes the CA itself creates are accepted on the next start.
        """
        self.assertEqual(CertificateAuthority(self.directory).rootPEM, self.rootPEM)


class LogTests(SynchronousTestCase):
    """
    Diagnostics never carry key material.
    """

    def test_keysNeverLogged(self) -> None:
        """
        Creating a CA, reloading it, minting leaves and failing to cache one
        on disk log events, none of which holds a private key.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        ca = makeCA(self)
        directory = FilePath(ca._dir.path)
        ca.leafFor("acme.example")
        ca._leafPath("blocked.example").makedirs()  # the cache write fails and is logged
        ca.leafFor("blocked.example")
        CertificateAuthority(directory).leafFor("acme.example")
        self.assertTrue(events, "expected the CA to log something")
        self.assertTrue(any("blocked.example" in formatEvent(e) for e in events))
        secrets = []
        for name in ("root.key", "leaf.key"):
            pem = directory.child(name).getContent().decode("ascii")
            secrets.extend(line for line in pem.splitlines() if "-----" not in line)
        for event in events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn("PRIVATE KEY", text)
            for line in secrets:
                self.assertNotIn(line, text)


def _memoryHandshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """
    Drive a handshake between two memory-BIO connections; raise the first
    SSL.Error, tagged with the side that raised it.
    """
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(20):
        done = 0
        for side, conn, peer in (("client", client, server), ("server", server, client)):
            try:
                conn.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                raise SSL.Error(side, e.args)
            try:
                peer.bio_write(conn.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


class ServerContextTests(SynchronousTestCase):
    """
    The shared server context, handshaking in memory with pyOpenSSL clients.
    """

    def setUp(self) -> None:
        self.ca = makeCA(self)
        self.creator = LeafServerCreator(serverContext(), self.ca.leafFor("acme.example"))

    def client(self, version: int) -> SSL.Connection:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
        conn = SSL.Connection(ctx, None)
        conn.set_tlsext_host_name(b"acme.example")
        return conn

    def test_tls12Accepted(self) -> None:
        """
        A TLS 1.2 client completes the handshake and sees the leaf.
        """
        client = self.client(SSL.TLS1_2_VERSION)
        _memoryHandshake(self.creator.serverConnectionForTLS(None), client)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(
            client.get_peer_certificate(as_cryptography=True), self.ca.leafFor("acme.example")[0]
        )

    def test_belowTLS12Refused(self) -> None:
        """
        The server refuses a TLS 1.1 client (the server raises, not the
        client).
        """
        with self.assertRaises(SSL.Error) as raised:
            _memoryHandshake(self.creator.serverConnectionForTLS(None), self.client(SSL.TLS1_1_VERSION))
        self.assertEqual(raised.exception.args[0], "server")
        self.assertIn("unsupported protocol", repr(raised.exception.args[1]))


# -- real handshakes --------------------------------------------------------


class _Responder(Protocol):
    """
    The decrypted side: answers the first HTTP request with 200 "ok" and
    closes; records what it received.
    """

    def connectionMade(self) -> None:
        self.received = b""
        self.lost: Deferred = Deferred()
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and self.transport is not None and not getattr(self, "_answered", False):
            self._answered = True
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
            )
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


PYTHON_CLIENT = r"""
import socket, ssl, sys
name, address, port, cafile, alpn = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=cafile)
ctx.verify_flags |= ssl.VERIFY_X509_STRICT
assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
if alpn:
    ctx.set_alpn_protocols(alpn.split(","))
with socket.create_connection((address, int(port)), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
        body = b""
        while True:
            try:
                chunk = tls.recv(4096)
            except ssl.SSLEOFError:
                break
            if not chunk:
                break
            body += chunk
        print(tls.version(), tls.selected_alpn_protocol())
        print(sorted(v for _, v in tls.getpeercert()["subjectAltName"]))
        sys.stdout.write(body.decode("ascii", "replace"))
"""

GO_CLIENT = r"""
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func main() {
	name, address, port, cafile := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	pem, err := os.ReadFile(cafile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fmt.Fprintln(os.Stderr, "no certificate in", cafile)
		os.Exit(2)
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", net.JoinHostPort(address, port),
		&tls.Config{RootCAs: pool, ServerName: name})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Println("verified chains:", len(conn.ConnectionState().VerifiedChains))
	conn.Write([]byte("GET / HTTP/1.1\r\nHost: " + name + "\r\n\r\n"))
	body, _ := io.ReadAll(conn)
	os.Stdout.Write(body)
}
"""


class HandshakeTests(TestCase):
    """
    Leaves served by LeafServerCreator over a real loopback TLS server, checked
    by independent strict clients.
    """

    timeout = 180

    def setUp(self) -> None:
        self.ca = makeCA(self)
        self.rootFile = FilePath(self.mktemp())
        self.rootFile.setContent(self.ca.rootPEM)

    def serve(self, pair: object = None, context: Optional[SSL.Context] = None, interface: str = "127.0.0.1") -> Factory:
        """
        Listen on an ephemeral loopback port with TLS from LeafServerCreator;
        return the wrapped factory (its C{port} and C{connections}).
        """
        inner = Factory.forProtocol(_Responder)
        inner.connections = []  # type: ignore[attr-defined]
        creator = LeafServerCreator(context or serverContext(), pair)  # type: ignore[arg-type]
        port: IListeningPort = reactor.listenTCP(  # type: ignore[attr-defined]
            0, TLSMemoryBIOFactory(creator, False, inner), interface=interface
        )
        inner.port = port.getHost().port  # type: ignore[attr-defined]

        async def cleanup() -> None:
            await port.stopListening()
            for conn in inner.connections:  # type: ignore[attr-defined]
                if not conn.lost.called and conn.transport is not None:
                    conn.transport.abortConnection()
            await DeferredList([c.lost for c in inner.connections])  # type: ignore[attr-defined]

        self.addCleanup(cleanup)
        return inner

    async def python(
        self, name: str, port: int, address: str = "127.0.0.1", cafile: Optional[str] = None, alpn: str = ""
    ) -> Tuple[bytes, bytes, Optional[int]]:
        return await runProcess(
            [sys.executable, "-c", PYTHON_CLIENT, name, address, str(port), cafile or self.rootFile.path, alpn],
            timeout=30,
        )

    async def assertPythonAccepts(self, name: str, address: str = "127.0.0.1", **kwargs: object) -> List[str]:
        """
        Serve the leaf for C{name} and have the strict Python client fetch
        through it; return the client's output lines.
        """
        server = self.serve(self.ca.leafFor(name), **kwargs)  # type: ignore[arg-type]
        out, err, code = await self.python(name, server.port, address)  # type: ignore[attr-defined]
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        lines = out.decode("ascii").splitlines()
        self.assertEqual(lines[-1], "ok")
        return lines

    async def test_pythonStrictDNSName(self) -> None:
        """
        Python's ssl with VERIFY_X509_STRICT accepts the leaf for a DNS name.
        """
        lines = await self.assertPythonAccepts("acme.example")
        self.assertEqual(lines[1], "['acme.example']")

    async def test_pythonStrictIPv4(self) -> None:
        """
        ... and for an IPv4 address (checked against the IPAddress SAN).
        """
        lines = await self.assertPythonAccepts("127.0.0.1")
        self.assertEqual(lines[1], "['127.0.0.1']")

    async def test_pythonStrictIPv6(self) -> None:
        """
        ... and for ::1, served on ::1.
        """
        try:
            reactor.listenTCP(0, Factory(), interface="::1").stopListening()  # type: ignore[attr-defined]
        except Exception as e:
            self.skipTest(f"no IPv6 loopback here: {e}")
        lines = await self.assertPythonAccepts("::1", address="::1", interface="::1")
        self.assertEqual(lines[1], "['0:0:0:0:0:0:0:1']")

    async def test_pythonStrictLongName(self) -> None:
        """
        ... and for a name too long for a CN (empty subject, critical SAN),
        which OpenSSL's strict mode checks separately.
        """
        name = "a" * 40 + "." + "b" * 40 + ".example"
        await self.assertPythonAccepts(name)

    async def test_pythonHostnameMismatch(self) -> None:
        """
        The check is real: a leaf for another name is rejected.
        """
        server = self.serve(self.ca.leafFor("good.example"))
        out, err, code = await self.python("evil.example", server.port)  # type: ignore[attr-defined]
        self.assertNotEqual(code, 0)
        self.assertIn(b"CERTIFICATE_VERIFY_FAILED", err)

    async def test_pythonOtherRoot(self) -> None:
        """
        The check is real: a client trusting another proxy's root rejects ours.
        """
        other = FilePath(self.mktemp())
        other.setContent(makeCA(self).rootPEM)
        server = self.serve(self.ca.leafFor("acme.example"))
        out, err, code = await self.python("acme.example", server.port, cafile=other.path)  # type: ignore[attr-defined]
        self.assertNotEqual(code, 0)
        self.assertIn(b"CERTIFICATE_VERIFY_FAILED", err)

    async def test_alpnChoosesHTTP11(self) -> None:
        """
        A client offering h2 and http/1.1 gets http/1.1; one offering only h2
        gets no ALPN answer rather than a failed handshake.
        """
        server = self.serve(self.ca.leafFor("acme.example"))
        out, err, code = await self.python("acme.example", server.port, alpn="h2,http/1.1")  # type: ignore[attr-defined]
        self.assertEqual(code, 0, err)
        self.assertTrue(out.decode().splitlines()[0].endswith(" http/1.1"), out)
        out, err, code = await self.python("acme.example", server.port, alpn="h2")  # type: ignore[attr-defined]
        self.assertEqual(code, 0, err)
        self.assertTrue(out.decode().splitlines()[0].endswith(" None"), out)

    async def test_sniPicksTheLeaf(self) -> None:
        """
        With sniContext, a client's SNI name gets a leaf for that name (strict
        verification passes), including an IDNA A-label.
        """
        for name in ("sni.example", "xn--bcher-kva.example"):
            server = self.serve(self.ca.leafFor("127.0.0.1"), context=sniContext(self.ca))
            out, err, code = await self.python(name, server.port)  # type: ignore[attr-defined]
            self.assertEqual(code, 0, err.decode("utf-8", "replace"))
            self.assertEqual(out.decode().splitlines()[1], repr([name]))

    async def test_noSNIKeepsDefaultLeaf(self) -> None:
        """
        Without SNI (a client connecting to an address), sniContext keeps the
        leaf the connection was created with.
        """
        server = self.serve(self.ca.leafFor("127.0.0.1"), context=sniContext(self.ca))
        out, err, code = await self.python("127.0.0.1", server.port)  # type: ignore[attr-defined]
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        self.assertEqual(out.decode().splitlines()[1], "['127.0.0.1']")

    async def test_curl(self) -> None:
        """
        curl, trusting only our root, fetches through the leaf for a DNS name
        and for an address.
        """
        curl = shutil.which("curl")
        if curl is None:
            self.skipTest("curl is not installed")
        for name in ("acme.example", "127.0.0.1"):
            server = self.serve(self.ca.leafFor(name))
            port = server.port  # type: ignore[attr-defined]
            out, err, code = await runProcess(
                [curl, "-sS", "--max-time", "10", "--cacert", self.rootFile.path,
                 "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                timeout=30,
            )
            self.assertEqual((code, out), (0, b"ok\n"), err)

    async def runLego(self, url: str, trust: bool) -> Tuple[bytes, bytes, Optional[int]]:
        lego = shutil.which("lego")
        if lego is None:
            self.skipTest("lego is not installed")
        home = FilePath(self.mktemp())
        home.makedirs()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home.path}
        if trust:
            env["LEGO_CA_CERTIFICATES"] = self.rootFile.path
        return await runProcess(
            [lego, "--server", url, "--email", "test@example.com", "--domains", "example.com",
             "--accept-tos", "--http", "--path", home.child("lego").path, "run"],
            env=env,
            path=home.path,
            timeout=60,
        )

    async def test_legoTrustsTheLeaf(self) -> None:
        """
        lego (Go's crypto/x509), with LEGO_CA_CERTIFICATES = our root, completes
        the handshake and sends its directory request, for a DNS name and an
        address. Without our root it refuses the leaf and sends nothing.
        """
        for name in ("localhost", "127.0.0.1"):
            server = self.serve(self.ca.leafFor(name))
            port = server.port  # type: ignore[attr-defined]
            out, err, code = await self.runLego(f"https://{name}:{port}/directory", trust=True)
            received = b"".join(c.received for c in server.connections)  # type: ignore[attr-defined]
            self.assertTrue(received.startswith(b"GET /directory HTTP/1.1\r\n"), out + err)
            self.assertNotIn(b"x509:", out + err)
        server = self.serve(self.ca.leafFor("localhost"))
        url = f"https://localhost:{server.port}/directory"  # type: ignore[attr-defined]
        out, err, code = await self.runLego(url, trust=False)
        self.assertNotEqual(code, 0)
        self.assertIn(b"x509:", out + err)
        self.assertEqual([c.received for c in server.connections if c.received], [])  # type: ignore[attr-defined]

    async def test_goCryptoTLS(self) -> None:
        """
        Go's crypto/tls client with our root as its only trust accepts the
        leaf for a DNS name and for an address, and rejects a wrong name.
        """
        go = shutil.which("go")
        if go is None:
            self.skipTest("go is not installed (lego, a Go binary, covers crypto/x509 when present)")
        program = FilePath(self.mktemp())
        program.makedirs()
        program.child("client.go").setContent(GO_CLIENT.encode("ascii"))
        built = program.child("client").path
        env = dict(os.environ)
        if "HOME" not in env and "GOCACHE" not in env:
            env["GOCACHE"] = program.child("gocache").path
        out, err, code = await runProcess(
            [go, "build", "-o", built, "client.go"], env=env, path=program.path, timeout=300
        )
        self.assertEqual(code, 0, err)
        for name, expected in (("acme.example", 0), ("127.0.0.1", 0), ("wrong.example", 1)):
            server = self.serve(self.ca.leafFor("127.0.0.1" if name == "127.0.0.1" else "acme.example"))
            out, err, code = await runProcess(
                [built, name, "127.0.0.1", str(server.port), self.rootFile.path], timeout=30  # type: ignore[attr-defined]
            )
            self.assertEqual(code, expected, out + err)
            if expected == 0:
                self.assertIn(b"verified chains: 1", out)
                self.assertTrue(out.endswith(b"ok\n"), out)
            else:
                self.assertIn(b"x509:", err)
