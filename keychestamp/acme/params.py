"""
The "params" of each event type, built from a classified exchange.

The ten original types keep the keys and meanings of keychestamp 0.3.1; the
newer types and the optional keys are documented in docs/events.rst. Every
value is copied out of the messages member by member, with its type checked:
nothing is passed through wholesale, so no signature, key or EAB MAC can end
up in an event.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from .certs import describeLeaf
from .jws import decodeJWS, jwkThumbprint
from .message import PEM_CHAIN, AcmeMessage, urlPath

__all__ = ["DEFAULT_EMAIL", "EVENT_TYPES", "buildParams", "problemParams"]

#: new-acct's "email" when the account has no mailto: contact (0.3.1 behaviour).
DEFAULT_EMAIL = "acme@keychest.net"

#: Caps on list lengths copied into an event (LE allows 100 names an order).
_MAX_ITEMS = 1000

Params = Dict[str, Any]


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _identifier(value: Any) -> Dict[str, str]:
    """{type, value} of an ACME identifier; {} when there is none."""
    if isinstance(value, dict):
        kind, name = value.get("type"), value.get("value")
        if isinstance(kind, str) and isinstance(name, str):
            return {"type": kind, "value": name}
    return {}


def _identifiers(value: Any) -> List[Dict[str, str]]:
    if not isinstance(value, list):
        return []
    result = []
    for item in value[:_MAX_ITEMS]:
        identifier = _identifier(item)
        if identifier:
            result.append(identifier)
    return result


def _strings(value: Any) -> List[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value[:_MAX_ITEMS] if isinstance(item, str)]


def _error(value: Any) -> Optional[Dict[str, str]]:
    """{type, detail} of a problem embedded in an ACME object."""
    if not isinstance(value, dict):
        return None
    return {"type": _str(value.get("type")), "detail": _str(value.get("detail"))}


def _email(contacts: List[str]) -> str:
    for contact in contacts:
        if contact[:7].lower() == "mailto:" and contact[7:]:
            return contact[7:]
    return DEFAULT_EMAIL


def problemParams(problem: Dict[str, Any], status: int) -> Params:
    """
    params.problem: {type, detail, status, subproblems when present}. The
    status is the document's own, else the HTTP status.
    """
    code = problem.get("status")
    result: Params = {
        "type": _str(problem.get("type")),
        "detail": _str(problem.get("detail")),
        "status": code if isinstance(code, int) and not isinstance(code, bool) else status,
    }
    subproblems = problem.get("subproblems")
    if isinstance(subproblems, list):
        result["subproblems"] = [
            {
                "type": _str(sub.get("type")),
                "detail": _str(sub.get("detail")),
                "identifier": _identifier(sub.get("identifier")),
            }
            for sub in subproblems[:_MAX_ITEMS]
            if isinstance(sub, dict)
        ]
    return result


def _body(message: AcmeMessage) -> Dict[str, Any]:
    """The response object, but never a problem document."""
    if message.problem is not None or message.responseJSON is None:
        return {}
    return message.responseJSON


def _requestPath(message: AcmeMessage) -> str:
    return message.path.split("?", 1)[0]


def _thumbprint(message: AcmeMessage, params: Params) -> None:
    if message.jws is not None and not message.jws.kid:
        thumbprint = jwkThumbprint(message.jws.jwk)
        if thumbprint is not None:
            params["jwk_thumbprint"] = thumbprint


def _nothing(params: Params, message: AcmeMessage, account: str) -> None:
    """directory and new-nonce carry only the common params."""


def _newAccount(params: Params, message: AcmeMessage, account: str) -> None:
    payload, body = message.payload, _body(message)
    contact = _strings(payload["contact"] if "contact" in payload else body.get("contact"))
    params.update(
        contact=contact,
        email=_email(contact),
        account=urlPath(message.location),
        source=_str(body.get("initialIp")),
        status=_str(body.get("status")),
    )
    if payload.get("onlyReturnExisting") is True:
        params["only_return_existing"] = True
    if "externalAccountBinding" in payload:
        params["eab"] = True
    _thumbprint(message, params)


def _newOrder(params: Params, message: AcmeMessage, account: str) -> None:
    payload, body = message.payload, _body(message)
    params.update(
        domains=_identifiers(payload.get("identifiers")) or _identifiers(body.get("identifiers")),
        authz=[urlPath(url) for url in _strings(body.get("authorizations"))],
        finalize=urlPath(body.get("finalize")),
        account=account,
        order=urlPath(message.location),
    )
    for member in ("profile", "replaces"):
        if isinstance(payload.get(member), str):
            params[member] = payload[member]


def _authz(params: Params, message: AcmeMessage, account: str) -> None:
    body = _body(message)
    params.update(
        account=account,
        authz=_requestPath(message),
        status=_str(body.get("status")),
        expires=_str(body.get("expires")),
        identifier=_identifier(body.get("identifier")),
    )
    challenges = body.get("challenges")
    for challenge in challenges[:_MAX_ITEMS] if isinstance(challenges, list) else ():
        error = _error(challenge.get("error")) if isinstance(challenge, dict) else None
        if error is not None:
            params["error"] = error
            break


def _challenge(params: Params, message: AcmeMessage, account: str) -> None:
    body = _body(message)
    params.update(account=account, chall=_requestPath(message), status=_str(body.get("status")))
    error = _error(body.get("error"))
    if error is not None:
        params["error"] = error


def _orderError(params: Params, body: Dict[str, Any]) -> None:
    error = _error(body.get("error"))
    if error is not None:
        params["error"] = error


def _order(params: Params, message: AcmeMessage, account: str) -> None:
    body = _body(message)
    params.update(
        account=account,
        status=_str(body.get("status")),
        identifiers=_identifiers(body.get("identifiers")),
        finalize=urlPath(body.get("finalize")),
        certificate=urlPath(body.get("certificate")),
    )
    _orderError(params, body)


def _finalize(params: Params, message: AcmeMessage, account: str) -> None:
    body = _body(message)
    params.update(
        account=account,
        status=_str(body.get("status")),
        certificate=urlPath(body.get("certificate")),
    )
    _orderError(params, body)


def _revoke(params: Params, message: AcmeMessage, account: str) -> None:
    params["account"] = account
    _thumbprint(message, params)


def _keyChange(params: Params, message: AcmeMessage, account: str) -> None:
    if not account:
        inner = decodeJWS(message.payload)
        if inner is not None:
            account = urlPath(inner.payloadObject.get("account"))
    params["account"] = account


def _account(params: Params, message: AcmeMessage, account: str) -> None:
    payload, body = message.payload, _body(message)
    if payload.get("status") == "deactivated":
        action = "deactivate"
    elif payload:
        action = "update"
    else:
        action = "lookup"
    contact = body.get("contact") if isinstance(body.get("contact"), list) else payload.get("contact")
    params.update(
        account=_requestPath(message),
        action=action,
        contact=_strings(contact),
        status=_str(body.get("status")),
    )


def _newAuthz(params: Params, message: AcmeMessage, account: str) -> None:
    payload, body = message.payload, _body(message)
    params.update(
        account=account,
        identifier=_identifier(payload.get("identifier")) or _identifier(body.get("identifier")),
        authz=urlPath(message.location),
        status=_str(body.get("status")),
    )


def _certificate(params: Params, message: AcmeMessage, account: str) -> None:
    params.update(account=account, certificate=_requestPath(message))
    body = message.exchange.responseBody
    if message.status < 300 and message.problem is None and (
        message.responseType == PEM_CHAIN or b"-----BEGIN" in body[:1024]
    ):
        params.update(describeLeaf(body))
    else:
        params.update(describeLeaf(b""))


def _renewalInfo(params: Params, message: AcmeMessage, account: str) -> None:
    body = _body(message)
    window = body.get("suggestedWindow")
    window = window if isinstance(window, dict) else {}
    params.update(
        cert_id=_requestPath(message).rstrip("/").rsplit("/", 1)[-1],
        suggested_window={"start": _str(window.get("start")), "end": _str(window.get("end"))},
        retry_after=message.retryAfter,
    )
    if isinstance(body.get("explanationURL"), str):
        params["explanation_url"] = body["explanationURL"]


_BUILDERS: Dict[str, Callable[[Params, AcmeMessage, str], None]] = {
    "directory": _nothing,
    "new-nonce": _nothing,
    "new-acct": _newAccount,
    "new-order": _newOrder,
    "auth": _authz,
    "chall": _challenge,
    "order": _order,
    "final": _finalize,
    "revoke-cert": _revoke,
    "key-change": _keyChange,
    "account": _account,
    "new-authz": _newAuthz,
    "cert": _certificate,
    "renewal-info": _renewalInfo,
}

#: Every event type an exchange can produce.
EVENT_TYPES = frozenset(_BUILDERS)


def buildParams(kind: str, message: AcmeMessage, account: str) -> Params:
    """
    The params of an event of type C{kind}: the common ones (epoch, client,
    agent), the type's own, then problem / retry_after / truncated when they
    apply.

    @param account: the path of the account the exchange belongs to ('' when
        unknown).
    """
    params: Params = {
        "epoch": int(message.exchange.started),
        "client": message.exchange.client,
        "agent": message.agent,
    }
    _BUILDERS[kind](params, message, account)
    if message.problem is not None:
        params["problem"] = problemParams(message.problem, message.status)
    if kind != "renewal-info" and message.status >= 400 and message.retryAfter is not None:
        params["retry_after"] = message.retryAfter
    if message.truncated:
        params["truncated"] = True
    return params
