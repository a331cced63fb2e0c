# -*- test-case-name: tests.test_admin_options -*-
"""
--admin checks at parse time, before anything listens: a parseable server
endpoint, not the proxy's own port, and no address reachable from other
machines unless the operator named the networks that may use it.

Kept free of twisted.web and prometheus_client so that parsing options
stays cheap.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Sequence

from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)

LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


class AdminEndpointError(ValueError):
    """
    --admin is unusable; the message is the one line the operator sees.
    """


def _address(interface: str) -> Optional[Any]:
    try:
        return ipaddress.ip_address(interface.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def checkAdminEndpoint(description: str, explicitAllow: Sequence[Any], proxyPort: Optional[int] = None) -> None:
    """
    Refuse an --admin endpoint that cannot work or would be exposed.

    @param explicitAllow: the networks given with --allow; empty when the
        default (loopback and private ranges) applies.
    @param proxyPort: --port; the admin listener never shares it.
    @raise AdminEndpointError: with a one-line reason.
    """
    try:
        endpoint = serverFromString(None, description)
    except Exception as e:
        raise AdminEndpointError(
            f"--admin: {description!r} is not a server endpoint ({e}); "
            "e.g. tcp:8444:interface=127.0.0.1"
        ) from None
    if isinstance(endpoint, UNIXServerEndpoint):
        return  # a local socket: its file mode is the access control
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
        if not explicitAllow:
            raise AdminEndpointError(
                f"--admin: cannot tell which address {description!r} listens on; "
                "give --allow with the networks that may use it"
            )
        return
    port, interface = getattr(endpoint, "_port", None), str(getattr(endpoint, "_interface", "") or "")
    if proxyPort and port == proxyPort:
        raise AdminEndpointError(
            f"--admin: port {port} is the proxy's own port (--port); the admin listener needs its own"
        )
    address = _address(interface) if interface else None
    if interface.lower() in LOOPBACK_NAMES or (address is not None and address.is_loopback):
        return
    if not interface or (address is not None and address.is_unspecified):
        if not explicitAllow:
            raise AdminEndpointError(
                f"--admin: {description!r} listens on all interfaces; add :interface=127.0.0.1 "
                "or give --allow with the networks that may use it"
            )
        return
    if address is None:
        if not explicitAllow:
            raise AdminEndpointError(
                f"--admin: {interface!r} is not a loopback address; give --allow with the networks "
                "that may use it"
            )
        return
    mapped = getattr(address, "ipv4_mapped", None) or address
    if not any(mapped in net for net in explicitAllow if net.version == mapped.version):
        prefix = 32 if mapped.version == 4 else 128
        raise AdminEndpointError(
            f"--admin: {interface} is not a loopback address and no --allow network covers it; "
            f"add e.g. --allow {mapped}/{prefix}"
        )
