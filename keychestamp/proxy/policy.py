"""
Who may use the proxy, which CONNECT targets are intercepted, which are only
tunnelled, and which are refused.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Set, Tuple

#: The public ACME CAs intercepted by default (directory hosts). Everything
#: else is tunnelled untouched unless --intercept names it.
PUBLIC_ACME_HOSTS = (
    "acme-v02.api.letsencrypt.org",
    "acme-staging-v02.api.letsencrypt.org",
    "acme.zerossl.com",
    "api.buypass.com",
    "api.test4.buypass.no",
    "dv.acme-v02.api.pki.goog",
    "dv.acme-v02.test-api.pki.goog",
    "acme.ssl.com",
    "acme.sectigo.com",
    "acme.digicert.com",
    "acme-api.actalis.com",
    "acme.harica.gr",
)

#: The name under which the proxy answers itself (root certificate download).
LOCAL_HOST = "amp.keychest.net"

INTERCEPT = "intercept"
TUNNEL = "tunnel"
LOCAL = "local"

Network = ipaddress._BaseNetwork  # type: ignore[name-defined]


def clientAddress(host: str) -> str:
    """
    The client's address as events show it: an IPv4-mapped IPv6 address
    (from a dual-stack listener) becomes plain IPv4.
    """
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class ClientACL:
    """
    --allow: the networks whose clients are served.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = list(networks)

    def allows(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(clientAddress(host).split("%", 1)[0])
        except ValueError:
            return False
        return any(address in net for net in self._networks if net.version == address.version)


class ConnectPolicy:
    """
    What to do with CONNECT host:port: intercept it (ACME servers), tunnel it
    (anything else, on allowed ports only), or refuse it.
    """

    def __init__(
        self,
        intercept: Sequence[Tuple[str, Optional[int]]] = (),
        connectPorts: Iterable[int] = (),
        defaults: Iterable[str] = PUBLIC_ACME_HOSTS,
        ownAddresses: Iterable[Tuple[str, int]] = (),
    ) -> None:
        self._all = any(host == "*" for host, _ in intercept)
        self._hosts: Set[Tuple[str, Optional[int]]] = {(h, None) for h in defaults}
        self._hosts.update((h.lower(), p) for h, p in intercept if h != "*")
        self._tunnelPorts = {443, *connectPorts}
        self._plainPorts = {80, *connectPorts}
        self._own = {(self._norm(h), p) for h, p in ownAddresses}

    @staticmethod
    def _norm(host: str) -> str:
        host = host.strip("[]").lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host
        mapped = getattr(address, "ipv4_mapped", None)
        return str(mapped or address)

    def _isOwn(self, host: str, port: int, local: Optional[Tuple[str, int]]) -> bool:
        """
        Whether host:port is this proxy's listener: a configured own address,
        or the address the client reached us on, or (on that port) a name for
        this machine: localhost, a loopback or unspecified address.
        """
        if (host, port) in self._own:
            return True
        if local is None or port != local[1]:
            return False
        if host == self._norm(local[0]) or host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified

    def intercepts(self, host: str, port: int) -> bool:
        host = self._norm(host)
        return self._all or (host, None) in self._hosts or (host, port) in self._hosts

    def _known(
        self, host: str, port: int, local: Optional[Tuple[str, int]]
    ) -> Optional[Tuple[Optional[str], str]]:
        norm = self._norm(host)
        if norm == LOCAL_HOST:
            return LOCAL, "the proxy itself"
        if self._isOwn(norm, port, local):
            return None, "a request to the proxy's own address (a loop)"
        if self.intercepts(norm, port):
            return INTERCEPT, "ACME server"
        return None

    def decide(
        self, host: str, port: int, local: Optional[Tuple[str, int]] = None
    ) -> Tuple[Optional[str], str]:
        """
        (INTERCEPT | TUNNEL | LOCAL | None, reason) for CONNECT; None means
        refuse with 403. C{local} is the (address, port) the client connected to.
        """
        known = self._known(host, port, local)
        if known is not None:
            return known
        if port in self._tunnelPorts:
            return TUNNEL, "not an ACME server"
        return None, f"port {port} is not allowed for tunnels (see --connect-port)"

    def decidePlain(
        self, host: str, port: int, local: Optional[Tuple[str, int]] = None
    ) -> Tuple[Optional[str], str]:
        """
        The same policy for an absolute-form request (C{GET http://host:port/}),
        which the proxy relays itself: hosts to intercept on their ports, the
        proxy's own answers, and otherwise port 80 and --connect-port ports
        only, so absolute URLs are no way around the CONNECT rules.
        """
        known = self._known(host, port, local)
        if known is not None:
            return known
        if port in self._plainPorts:
            return TUNNEL, "not an ACME server"
        return None, f"port {port} is not allowed for plain HTTP (see --connect-port)"
