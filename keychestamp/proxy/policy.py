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
        self._own = {(self._norm(h), p) for h, p in ownAddresses}

    @staticmethod
    def _norm(host: str) -> str:
        host = host.strip("[]").lower().rstrip(".")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return host

    def intercepts(self, host: str, port: int) -> bool:
        host = self._norm(host)
        return self._all or (host, None) in self._hosts or (host, port) in self._hosts

    def decide(self, host: str, port: int) -> Tuple[Optional[str], str]:
        """
        (INTERCEPT | TUNNEL | LOCAL | None, reason); None means refuse with 403.
        """
        norm = self._norm(host)
        if norm == LOCAL_HOST:
            return LOCAL, "the proxy itself"
        if (norm, port) in self._own:
            return None, "CONNECT to the proxy's own address (a loop)"
        if self.intercepts(norm, port):
            return INTERCEPT, "ACME server"
        if port in self._tunnelPorts:
            return TUNNEL, "not an ACME server"
        return None, f"port {port} is not allowed for tunnels (see --connect-port)"
