"""
What the ACME servers have told us about their URLs, so that exchanges are
classified from the server's own words rather than from one CA's URL layout.

Two kinds of knowledge, both per origin (scheme://host[:port]) and both
bounded, so a busy proxy does not grow without end:

  - directory endpoints (newNonce, newAccount, newOrder, ...; renewalInfo is a
    prefix), learned from directory responses;
  - object URLs (accounts, orders, authorizations, challenges, finalize and
    certificate URLs), learned from Location headers, kid, and the URLs named
    in order, authorization and challenge bodies, each with the account that
    was seen owning it.

Object URLs live in an LRU per origin: an evicted entry only means a later
exchange on it is classified by its shape instead.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Tuple, Any, Dict, Generic, Mapping, Optional, TypeVar

from .message import splitURL

__all__ = [
    "DIRECTORY_ENDPOINTS",
    "AcmeKnowledge",
    "Known",
    "LRU",
]

K = TypeVar("K")
V = TypeVar("V")

#: Directory members (RFC 8555 §7.1.1, RFC 9773) and the event type of a
#: request to each. renewalInfo is a prefix: requests go to renewalInfo/<certID>.
DIRECTORY_ENDPOINTS: Mapping[str, str] = {
    "newNonce": "new-nonce",
    "newAccount": "new-acct",
    "newOrder": "new-order",
    "newAuthz": "new-authz",
    "revokeCert": "revoke-cert",
    "keyChange": "key-change",
    "renewalInfo": "renewal-info",
}

_PREFIX_KINDS = frozenset({"renewal-info"})


class LRU(Generic[K, V]):
    """
    A dict that forgets its least recently used entry beyond C{size} entries.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._data: "OrderedDict[K, V]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> Optional[V]:
        """The value of C{key} (now the most recently used), or None."""
        try:
            self._data.move_to_end(key)
        except KeyError:
            return None
        return self._data[key]

    def set(self, key: K, value: V) -> None:
        """Store C{key}, evicting the least recently used entry if full."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def items(self):  # type: ignore[no-untyped-def]
        """The entries, least recently used first."""
        return self._data.items()


@dataclass(frozen=True)
class Known:
    """
    One remembered URL: the event type of a request to it, and the account
    path that was seen owning it ('' when unknown).
    """

    kind: str
    account: str = ""


class _OriginMemory:
    """
    Everything known about one origin.
    """

    def __init__(self, maxEndpoints: int, maxObjects: int) -> None:
        self.endpoints: LRU[str, str] = LRU(maxEndpoints)
        self.prefixes: LRU[str, str] = LRU(maxEndpoints)
        self.objects: LRU[str, Known] = LRU(maxObjects)
        #: the directories learned here, as (url, endpoint members): clients
        #: fetch the directory on every run, and an unchanged one needs no
        #: second parse of its URLs
        self.learned: LRU[str, Tuple[str, ...]] = LRU(maxEndpoints)

    def lookup(self, path: str) -> Optional[Known]:
        kind = self.endpoints.get(path)
        if kind is not None:
            return Known(kind)
        known = self.objects.get(path)
        if known is not None:
            return known
        bare = path.split("?", 1)[0]
        for prefix, kind in list(self.prefixes.items()):
            if bare == prefix or bare.startswith(prefix.rstrip("/") + "/"):
                self.prefixes.get(prefix)
                return Known(kind)
        return None


class AcmeKnowledge:
    """
    Bounded memory of directories and object URLs, per origin.

    @param maxOrigins: origins remembered (least recently used forgotten).
    @param maxObjects: object URLs remembered per origin.
    @param maxEndpoints: directory endpoints remembered per origin (several
        directories can share a host, e.g. step-ca's provisioners).
    """

    def __init__(self, maxOrigins: int = 128, maxObjects: int = 4096, maxEndpoints: int = 256) -> None:
        self._origins: LRU[str, _OriginMemory] = LRU(maxOrigins)
        self._maxObjects = maxObjects
        self._maxEndpoints = maxEndpoints

    def _memory(self, origin: str, create: bool) -> Optional[_OriginMemory]:
        memory = self._origins.get(origin)
        if memory is None and create:
            memory = _OriginMemory(self._maxEndpoints, self._maxObjects)
            self._origins.set(origin, memory)
        return memory

    def learnDirectory(self, url: str, directory: Dict[str, Any]) -> None:
        """
        Remember a directory fetched from C{url}: the directory URL itself and
        each endpoint it names (under the endpoint's own origin).
        """
        here = splitURL(url)
        members = tuple(repr(directory.get(member)) for member in DIRECTORY_ENDPOINTS)
        home = None
        if here is not None:
            home = self._memory(here[0], True)
            assert home is not None
            if home.learned.get(here[1]) == members and here[1] in home.endpoints:
                return
            home.endpoints.set(here[1], "directory")
        for member, kind in DIRECTORY_ENDPOINTS.items():
            where = splitURL(directory.get(member), url)
            if where is None:
                continue
            memory = self._memory(where[0], True)
            assert memory is not None
            if kind in _PREFIX_KINDS:
                prefix = where[1].split("?", 1)[0]
                if prefix.strip("/"):  # a prefix of "/" would claim every URL
                    memory.prefixes.set(prefix, kind)
            else:
                memory.endpoints.set(where[1], kind)
        if home is not None and here is not None:
            home.learned.set(here[1], members)

    def learn(self, url: Any, kind: str, account: str = "", base: Optional[str] = None) -> None:
        """
        Remember that a request to C{url} is of type C{kind}, owned by
        C{account} (a path). A URL that is a directory endpoint stays one.
        Relative URLs are resolved against C{base}.
        """
        where = splitURL(url, base)
        if where is None:
            return
        memory = self._memory(where[0], True)
        assert memory is not None
        if where[1] in memory.endpoints:
            return
        if not account:
            previous = memory.objects.get(where[1])
            if previous is not None and previous.kind == kind:
                account = previous.account
        memory.objects.set(where[1], Known(kind, account))

    def lookup(self, url: Any) -> Optional[Known]:
        """
        What is known about C{url}: directory endpoints first, then object
        URLs, then endpoint prefixes (renewalInfo); None when nothing is.
        """
        where = splitURL(url)
        if where is None:
            return None
        memory = self._memory(where[0], False)
        if memory is None:
            return None
        return memory.lookup(where[1])
