"""
The proxy's own certificate authority: a root made once and kept, and leaf
certificates minted on demand for the hosts clients CONNECT to.

Every leaf shares one key pair (made once, kept beside the root), so a new host
costs one ECDSA signature rather than a key generation. Leaves are cached in
memory (bounded) and on disk, so a restart serves the same certificates.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import stat
from collections import OrderedDict
from typing import Callable, Optional, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

ROOT_NAME = "KeyChest AMP proxy root CA"
ROOT_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=199)
LEAF_BACKDATE = datetime.timedelta(days=2)
LEAF_RENEW_BEFORE = datetime.timedelta(days=30)
MEMORY_CACHE_SIZE = 1000

LeafPair = Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


class KeyPermissionError(Exception):
    """
    The CA key or its directory is readable by someone other than the owner.
    """


def _writeFile(path: FilePath, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """
    Write a file atomically, created with C{mode} (no window in which a key
    exists with wider permissions). FilePath.setContent would create it 0777
    less the umask: executable certificates.
    """
    tmp = path.temporarySibling(b".tmp" if isinstance(path.path, bytes) else ".tmp")
    fd = os.open(tmp.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp.path, path.path)
    except OSError:
        os.unlink(tmp.path)
        raise


def _writePrivate(path: FilePath, data: bytes) -> None:
    """
    Write a file that only the owner may read.
    """
    _writeFile(path, data, 0o600)


def _checkPrivate(path: FilePath) -> None:
    mode = os.stat(path.path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"{path.path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod {'700' if stat.S_ISDIR(mode) else '600'} {path.path}"
        )


def _isIP(name: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CertificateAuthority:
    """
    The root certificate and key in C{directory} (created 0700), and the leaf
    factory.

    @param now: returns the current UTC datetime; tests pass a fixed clock.
    """

    log = Logger()

    def __init__(
        self,
        directory: FilePath,
        now: Callable[[], datetime.datetime] = _now,
        cacheSize: int = MEMORY_CACHE_SIZE,
    ) -> None:
        self._dir = directory
        self._now = now
        self._cacheSize = cacheSize
        self._cache: "OrderedDict[str, LeafPair]" = OrderedDict()
        self._leafDir = directory.child("leaves")
        for d in (directory, self._leafDir):
            if not d.isdir():
                d.makedirs()
                os.chmod(d.path, 0o700)
        self.rootKey, self.rootCert = self._loadOrCreateRoot()
        self.leafKey = self._loadOrCreateKey(directory.child("leaf.key"))
        self._rootSKI = self.rootCert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        self.rootPEM: bytes = self.rootCert.public_bytes(serialization.Encoding.PEM)

    # -- the root -------------------------------------------------------

    def _loadOrCreateKey(self, path: FilePath) -> ec.EllipticCurvePrivateKey:
        if path.exists():
            _checkPrivate(path)
            key = serialization.load_pem_private_key(path.getContent(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path.path}: expected an EC private key")
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        _writePrivate(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return key

    def _loadOrCreateRoot(self) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        keyPath = self._dir.child("root.key")
        certPath = self._dir.child("root.crt")
        _checkPrivate(self._dir)
        if keyPath.exists() and certPath.exists():
            key = self._loadOrCreateKey(keyPath)
            cert = x509.load_pem_x509_certificate(certPath.getContent())
            return key, cert
        key = self._loadOrCreateKey(keyPath)
        now = self._now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, ROOT_NAME),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "KeyChest AMP"),
                x509.NameAttribute(
                    NameOID.ORGANIZATIONAL_UNIT_NAME, secrets.token_hex(4)
                ),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        _writeFile(certPath, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self.log.info("created a new root CA in {dir}", dir=self._dir.path)
        return key, cert

    # -- leaves ---------------------------------------------------------

    def leafFor(self, name: str, persist: bool = True) -> LeafPair:
        """
        A certificate for C{name} (a DNS name or an IP address) and its key.

        @param persist: keep it on disk too. Names a client chooses freely
            (the SNI of a TLS connection to the proxy itself) stay in the
            bounded memory cache only, so a client cannot fill the disk.
        """
        name = name.strip("[]").lower().rstrip(".")
        pair = self._cache.get(name)
        if pair is not None and self._fresh(pair[0]):
            self._cache.move_to_end(name)
            return pair
        pair = (self._loadLeaf(name) if persist else None) or self._mintLeaf(name, persist)
        self._cache[name] = pair
        if len(self._cache) > self._cacheSize:
            self._cache.popitem(last=False)
        return pair

    def _fresh(self, cert: x509.Certificate) -> bool:
        return cert.not_valid_after_utc - LEAF_RENEW_BEFORE > self._now()

    def _leafPath(self, name: str) -> FilePath:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        return self._leafDir.child(digest + ".pem")

    def _loadLeaf(self, name: str) -> Optional[LeafPair]:
        path = self._leafPath(name)
        try:
            cert = x509.load_pem_x509_certificate(path.getContent())
        except (OSError, ValueError):
            return None
        if (
            not self._fresh(cert)
            or cert.issuer != self.rootCert.subject
            or cert.public_key() != self.leafKey.public_key()
        ):
            return None
        return cert, self.leafKey

    def _mintLeaf(self, name: str, persist: bool = True) -> LeafPair:
        now = self._now()
        ip = _isIP(name)
        san: x509.GeneralName = x509.IPAddress(ip) if ip else x509.DNSName(name)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) < 64 else []
        )
        notAfter = min(now + LEAF_LIFETIME, self.rootCert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.rootCert.subject)
            .public_key(self.leafKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(notAfter)
            .add_extension(x509.SubjectAlternativeName([san]), critical=len(name) >= 64)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._rootSKI),
                critical=False,
            )
            .sign(self.rootKey, hashes.SHA256())
        )
        if persist:
            try:
                _writeFile(self._leafPath(name), cert.public_bytes(serialization.Encoding.PEM), 0o644, sync=False)
            except OSError as e:
                self.log.warn("cannot cache the leaf for {name} on disk: {error}", name=name, error=e)
        return cert, self.leafKey


def _selectHTTP11(conn: SSL.Connection, protocols: list) -> bytes:
    """
    ALPN: we speak HTTP/1.1 on the decrypted stream; a client offering only h2
    gets no ALPN answer and falls back (RFC 7301 allows the server to ignore).
    """
    return b"http/1.1" if b"http/1.1" in protocols else SSL.NO_OVERLAPPING_PROTOCOLS


def serverContext() -> SSL.Context:
    """
    One shared server context for every intercepted connection; the leaf is set
    per connection.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.set_alpn_select_callback(_selectHTTP11)
    ctx.set_session_id(b"keychestamp")
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class LeafServerCreator:
    """
    Server-side TLS for one intercepted connection, presenting the leaf for a
    name known in advance (the CONNECT authority).
    """

    def __init__(self, context: SSL.Context, pair: LeafPair) -> None:
        self._context = context
        self._pair = pair

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        conn.use_certificate(self._pair[0])
        conn.use_privatekey(self._pair[1])
        return conn


def sniContext(ca: CertificateAuthority) -> SSL.Context:
    """
    A server context for clients that speak TLS to the proxy itself: the leaf
    is swapped for the name the client asked for (SNI) during the handshake;
    without SNI the connection keeps the leaf it was created with (the local
    address, see L{LeafServerCreator}).
    """
    log = Logger()
    ctx = serverContext()

    def onServerName(conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        if raw:
            try:
                # SNI carries A-labels; the "idna" codec would turn them into
                # U-labels, which a DNSName SAN refuses.
                cert, key = ca.leafFor(raw.decode("ascii"), persist=False)
            except Exception:
                log.failure("no leaf for SNI name {name!r}", name=raw)
                return
            conn.use_certificate(cert)
            conn.use_privatekey(key)

    ctx.set_tlsext_servername_callback(onServerName)
    return ctx
