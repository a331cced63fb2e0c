"""
The upstream side: an Agent with a persistent connection pool whose TLS is
verified against the system trust store plus the --upstream-ca bundle, with the
hostname or IP address checked by service_identity. There is no way to turn
verification off.
"""

from __future__ import annotations

import os
import ssl
import warnings
from collections import OrderedDict
from typing import Iterable, List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory, _StandardEndpointFactory
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from keychestamp.proxy.relay import StrictClientFactory

FALLBACK_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)


def systemBundlePath() -> Optional[str]:
    """
    The PEM file of the system trust store (honours SSL_CERT_FILE as OpenSSL
    does).
    """
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *FALLBACK_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def loadPEMCertificates(path: str) -> List[x509.Certificate]:
    """
    Every certificate in a PEM bundle (Certificate.loadPEM reads only one).
    """
    with open(path, "rb") as f:
        data = f.read()
    with warnings.catch_warnings():
        # some system roots have non-positive serials; they still verify
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(data)


def trustedCertificates(extraBundle: Optional[str]) -> List[x509.Certificate]:
    """
    The system trust store followed by the extra bundle.
    """
    certs: List[x509.Certificate] = []
    system = systemBundlePath()
    if system:
        certs.extend(loadPEMCertificates(system))
    if extraBundle:
        certs.extend(loadPEMCertificates(extraBundle))
    if not certs:
        raise ValueError("no trusted certificates: no system bundle and no --upstream-ca")
    return certs


def trustRoot(certs: Iterable[x509.Certificate]) -> object:
    return tssl.trustRootFromCertificates(
        [
            tssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in certs
        ]
    )


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """
    Like BrowserLikePolicyForHTTPS, but keeps one connection creator (and so one
    OpenSSL context with the trust store loaded) per host instead of building a
    new one for every connection.
    """

    def __init__(self, root: object, cacheSize: int = 256) -> None:
        self._root = root
        self._cache: "OrderedDict[bytes, IOpenSSLClientConnectionCreator]" = OrderedDict()
        self._cacheSize = cacheSize

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        creator = self._cache.get(hostname)
        if creator is None:
            creator = tssl.optionsForClientTLS(
                hostname.decode("ascii"),
                trustRoot=self._root,
                acceptableProtocols=[b"http/1.1"],
            )
            self._cache[hostname] = creator
            if len(self._cache) > self._cacheSize:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(hostname)
        return creator


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class QuietPool(HTTPConnectionPool):
    """
    A connection pool whose per-connection factories do not log "Starting
    factory" for every connection (Twisted's client protocol already turns
    Nagle off).
    """

    _factory = _QuietFactory


class StrictPool(QuietPool):
    """
    The proxy's upstream pool: response heads are parsed as strictly as
    requests (see L{keychestamp.proxy.relay.StrictClientProtocol}).
    """

    _factory = StrictClientFactory


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """
    Agent builds a HostnameEndpoint (an IDNA encoding, a TLS creator lookup)
    for every request, even one that goes out on a pooled connection; this
    keeps one endpoint per upstream instead.
    """

    def __init__(self, reactor: object, policy: IPolicyForHTTPS, connectTimeout: float, cacheSize: int = 256) -> None:
        self._standard = _StandardEndpointFactory(reactor, policy, connectTimeout or None, None)
        self._cache: "OrderedDict[tuple, object]" = OrderedDict()
        self._cacheSize = cacheSize

    def endpointForURI(self, uri: object) -> object:
        key = (uri.scheme, uri.host, uri.port)  # type: ignore[attr-defined]
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._standard.endpointForURI(uri)
            self._cache[key] = endpoint
            if len(self._cache) > self._cacheSize:
                self._cache.popitem(last=False)
        return endpoint


class UpstreamClient:
    """
    The Agent and pool the proxy forwards through; close() drops cached
    connections (stopService).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        extraBundle: Optional[str] = None,
        connectTimeout: float = 10.0,
        certificates: Optional[List[x509.Certificate]] = None,
        maxPersistentPerHost: int = 64,
    ) -> None:
        self.pool = StrictPool(reactor, persistent=True)
        # enough idle connections per upstream for a busy fleet's concurrency,
        # so a burst does not close and reopen TLS connections
        self.pool.maxPersistentPerHost = maxPersistentPerHost
        self.pool.cachedConnectionTimeout = 120
        root = trustRoot(certificates if certificates is not None else trustedCertificates(extraBundle))
        self.agent = Agent.usingEndpointFactory(
            reactor, CachingEndpointFactory(reactor, VerifyingPolicy(root), connectTimeout), self.pool
        )

    def close(self):
        return self.pool.closeCachedConnections()
