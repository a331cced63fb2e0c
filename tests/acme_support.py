"""
Test support for the ACME classifier: load the recorded-shape exchanges in
tests/fixtures/acme/, turn them into L{Exchange} records (encoding JWS bodies
and minting real certificate chains), and record the events logged.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import ipaddress
import json
from typing import Any, Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, succeed
from twisted.python.filepath import FilePath
from zope.interface import implementer

from keychestamp.acme import IEventLogger
from keychestamp.exchange import Exchange

FIXTURES = FilePath(__file__).sibling("fixtures").child("acme")

#: The dummy signature of every fixture JWS; it must never reach an event.
SIGNATURE = b"SECRET-signature-bytes-never-logged"
SIGNATURE_B64 = base64.urlsafe_b64encode(SIGNATURE).rstrip(b"=").decode("ascii")

_NAME_OIDS = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME, "CN": NameOID.COMMON_NAME}


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encodeJWS(spec: Dict[str, Any]) -> Dict[str, str]:
    """
    A flattened JWS from {protected, payload}: the payload "" stays empty
    (POST-as-GET), anything else is JSON with inner {"$jws": ...} encoded too.
    """
    payload = spec["payload"]
    encodedPayload = "" if payload == "" else b64url(json.dumps(_encodeInner(payload)).encode())
    return {
        "protected": b64url(json.dumps(spec["protected"]).encode()),
        "payload": encodedPayload,
        "signature": SIGNATURE_B64,
    }


def _encodeInner(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$jws"}:
            return encodeJWS(value["$jws"])
        return {key: _encodeInner(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodeInner(item) for item in value]
    return value


def rfc7638(jwk: Dict[str, str]) -> str:
    """An independent RFC 7638 thumbprint, to check the classifier's."""
    required = {"EC": ["crv", "kty", "x", "y"], "RSA": ["e", "kty", "n"]}[jwk["kty"]]
    text = "{" + ",".join(f'"{name}":"{jwk[name]}"' for name in required) + "}"
    return b64url(hashlib.sha256(text.encode()).digest())


def _parseTime(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def makeChain(
    serial: int,
    dns: List[str],
    ips: List[str],
    notBefore: datetime.datetime,
    notAfter: datetime.datetime,
    issuer: List[Tuple[str, str]],
) -> bytes:
    """
    A real PEM chain (leaf, then its issuer) with the given leaf fields.
    """
    issuerKey = ec.generate_private_key(ec.SECP256R1())
    leafKey = ec.generate_private_key(ec.SECP256R1())
    issuerName = x509.Name([x509.NameAttribute(_NAME_OIDS[kind], value) for kind, value in issuer])
    issuerCert = (
        x509.CertificateBuilder()
        .subject_name(issuerName)
        .issuer_name(issuerName)
        .public_key(issuerKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore - datetime.timedelta(days=365))
        .not_valid_after(notAfter + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuerKey, hashes.SHA256())
    )
    names: List[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuerName)
        .public_key(leafKey.public_key())
        .serial_number(serial)
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    leaf = builder.sign(issuerKey, hashes.SHA256())
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in (leaf, issuerCert))


def loadFlow(name: str) -> Dict[str, Any]:
    """One fixture file, parsed."""
    return json.loads(FIXTURES.child(name + ".json").getContent())


def flowNames() -> List[str]:
    """The names of every fixture flow."""
    return sorted(path.basename()[:-5] for path in FIXTURES.globChildren("*.json"))


def _responseBody(response: Dict[str, Any]) -> bytes:
    if "json" in response:
        return json.dumps(response["json"], indent=2).encode()
    if "text" in response:
        return response["text"].encode()
    if "pem" in response:
        spec = response["pem"]
        return makeChain(
            int(spec["serial"], 16),
            spec["dns"],
            spec["ip"],
            _parseTime(spec["not_before"]),
            _parseTime(spec["not_after"]),
            [tuple(pair) for pair in spec["issuer"]],  # type: ignore[misc]
        )
    return b""


def makeExchange(flow: Dict[str, Any], entry: Dict[str, Any]) -> Exchange:
    """The L{Exchange} the proxy would have recorded for a fixture entry."""
    headers = [("Host", flow["host"]), ("Accept", "*/*")]
    if flow.get("agent"):
        headers.append(("User-Agent", flow["agent"]))
    body = b""
    if "request" in entry:
        headers.append(("Content-Type", "application/jose+json"))
        body = json.dumps(encodeJWS(entry["request"])).encode()
    response = entry["response"]
    return Exchange(
        client=flow["client"],
        clientPort=50123,
        method=entry["method"],
        scheme=flow["scheme"],
        host=flow["host"],
        port=flow["port"],
        path=entry["path"],
        requestHeaders=headers,
        requestBody=body,
        status=response["status"],
        responseHeaders=[tuple(pair) for pair in response["headers"]],  # type: ignore[misc]
        responseBody=_responseBody(response),
        started=entry["started"],
        finished=entry["started"] + 0.08,
    )


def _jwks(value: Any) -> Dict[str, Dict[str, str]]:
    """Every JWK in a fixture, by its x (EC) or n (RSA) member."""
    found: Dict[str, Dict[str, str]] = {}
    if isinstance(value, dict):
        if value.get("kty") in ("EC", "RSA"):
            found[value.get("x") or value["n"]] = value
        for item in value.values():
            found.update(_jwks(item))
    elif isinstance(value, list):
        for item in value:
            found.update(_jwks(item))
    return found


def _resolve(value: Any, keys: Dict[str, Dict[str, str]]) -> Any:
    if isinstance(value, str) and value.startswith("@thumbprint:"):
        return rfc7638(keys[value[len("@thumbprint:") :]])
    if isinstance(value, dict):
        return {key: _resolve(item, keys) for key, item in value.items()}
    return value


def expectedEvent(
    flow: Dict[str, Any], entry: Dict[str, Any], cold: bool = False
) -> Optional[Tuple[str, Dict[str, Any]]]:
    """
    (msg, params) the entry must produce, with the common params filled in;
    C{cold}: classified alone, without what earlier exchanges taught.
    """
    expect = entry["expect"]
    if cold and "expect_cold" in entry:
        if entry["expect_cold"] is None:
            return None
        expect = copy.deepcopy(expect)
        expect["params"].update(entry["expect_cold"]["params"])
    if expect is None:
        return None
    params = {"epoch": int(entry["started"]), "client": flow["client"], "agent": flow.get("agent", "")}
    params.update(_resolve(expect["params"], _jwks(flow)))
    return expect["msg"], params


@implementer(IEventLogger)
class RecordingEventLogger:
    """
    A fake event log: records every call and answers with an already-fired
    Deferred (or, with C{fail} set, raises or fails as a broken log might).
    """

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.result: Optional[Deferred[Any]] = None
        self.exception: Optional[Exception] = None

    def log(
        self, msg: str, params: Dict[str, Any], server: str, path: str, code: int, when: float
    ) -> "Deferred[Any]":
        self.calls.append(
            {"msg": msg, "params": params, "server": server, "path": path, "code": code, "when": when}
        )
        if self.exception is not None:
            raise self.exception
        if self.result is not None:
            return self.result
        return succeed(None)
