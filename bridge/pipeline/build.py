"""Pure request building: (operation, payload parameters, service config) -> one `HttpRequest`.

Nothing here touches a socket; `bridge/service/client.py` turns the value into an aiohttp call. Ids
go into the path as exactly one percent-encoded segment each, so no payload value can change the
host, the path, the query or the headers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from bridge import __version__
from bridge.config import ServiceConfig
from bridge.errors import InvalidParameter, MissingParameter, UnknownParameter
from bridge.jsoncodec import dumps
from bridge.methods.endpoint import form_operation, parse_call
from bridge.methods.model import Operation, QueryParam
from bridge.pipeline.multipart import encode_form
from bridge.service.models import HttpRequest

# RFC 3986 pchar minus the sub-delims: ':' and '@' stay readable (fine-tuned ids are `ft:...`).
_SEGMENT_SAFE = ":@"
_MAX_SEGMENT = 1024


def path_segment(name: str, value: Any) -> str:
    """`value` as one percent-encoded path segment; raise for absent, empty or non-scalar ids."""
    if value is None:
        raise MissingParameter(name)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidParameter(name, f"path parameter {name!r} must be a string or an integer")
    text = str(value)
    if not text:
        raise InvalidParameter(name, f"path parameter {name!r} must not be empty")
    if len(text) > _MAX_SEGMENT:
        raise InvalidParameter(name, f"path parameter {name!r} is longer than {_MAX_SEGMENT}")
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return quote(text, safe=_SEGMENT_SAFE)


def _scalar_text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    return dumps(value).decode("utf-8")


def _query_pairs(param: QueryParam, value: Any) -> list[tuple[str, str]]:
    """The (name, text) pairs one query parameter contributes, as the official SDKs send them.

    Arrays repeat the name with brackets (`include[]=a&include[]=b`; a lone value of an array
    parameter is a one-item array), objects go deep (`metadata[k]=v`).
    """
    if value is None:
        return []
    base = param.name.removesuffix("[]")
    if param.type == "array" and not isinstance(value, list | dict):
        value = [value]
    if isinstance(value, list):
        return [(f"{base}[]", _scalar_text(v)) for v in value if v is not None]
    if isinstance(value, dict):
        return [(f"{base}[{k}]", _scalar_text(v)) for k, v in value.items() if v is not None]
    return [(param.name, _scalar_text(value))]


def _pop_spelling(rest: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """(key, value) of the one spelling of a parameter present in `rest`, popped; None if none."""
    present = [key for key in keys if key in rest]
    if len(present) > 1:
        raise InvalidParameter(
            present[0], f"give only one of {', '.join(repr(k) for k in present)}: same parameter"
        )
    return (present[0], rest.pop(present[0])) if present else None


def _query_keys(param: QueryParam) -> tuple[str, ...]:
    """The payload keys of a query parameter: its name, with and without `[]` for arrays."""
    base = param.name.removesuffix("[]")
    return (base, f"{base}[]") if param.type == "array" or base != param.name else (param.name,)


def _header_text(key: str, value: Any) -> str:
    """A header parameter's value: text, numbers and booleans as text, arrays comma-joined."""
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict | list) or item is None:
            raise InvalidParameter(key, f"header parameter {key!r} takes text or an array of text")
        texts.append(_scalar_text(item))
    text = ",".join(texts)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidParameter(key, f"header parameter {key!r} must not hold control characters")
    return text


def _encode_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='[]')}={quote(v, safe='')}" for k, v in pairs)


class RequestBuilder:
    """Builds requests for one service host; the static headers are computed once."""

    def __init__(self, service: ServiceConfig) -> None:
        self.base = service.api_base.rstrip("/")
        key = service.api_key.get_secret_value()
        headers: dict[str, str] = {"User-Agent": f"openai-mqtt-bridge/{__version__}"}
        self._key_query: tuple[str, str] | None = None
        self._key_header: str | None = None
        if key:
            if service.api_key_in_query:
                self._key_query = (service.api_key_name, key)
            elif service.api_key_name.lower() == "authorization":
                headers["Authorization"] = f"Bearer {key}"
            else:
                headers[service.api_key_name] = key
                self._key_header = service.api_key_name
        if service.organization:
            headers["OpenAI-Organization"] = service.organization
        if service.project:
            headers["OpenAI-Project"] = service.project
        headers.update(service.extra_headers)
        self._headers = headers
        self._assistants_beta = f"assistants={service.assistants_version}"

    def websocket_request(self, url: str) -> tuple[str, dict[str, str]]:
        """`url` (with the key when it goes in the query) and the headers of an upstream
        WebSocket: the key, organization, project and extra headers, as every request has."""
        if self._key_query is not None:
            sep = "&" if "?" in url else "?"
            url = f"{url}{sep}{_encode_query([self._key_query])}"
        return url, dict(self._headers)

    def headers_for(self, op: Operation) -> dict[str, str]:
        """The headers every request of `op` carries (auth, organization, beta, extras)."""
        headers = dict(self._headers)
        if op.beta == "assistants":
            headers["OpenAI-Beta"] = self._assistants_beta
        elif op.beta:
            headers["OpenAI-Beta"] = op.beta
        if op.response_kind == "json":
            headers["Accept"] = "application/json"  # as the official SDKs send
        return headers

    def build(self, op: Operation, params: dict[str, Any]) -> HttpRequest:
        """The HTTP request for `op` called with `params` (the payload without `transaction`)."""
        if op.generic:
            return self.build_endpoint(params)
        rest = dict(params)
        path_template, _, fixed_query = op.path.partition("?")
        path = path_template
        for name in op.path_params:
            path = path.replace("{" + name + "}", path_segment(name, rest.pop(name, None)))

        pairs: list[tuple[str, str]] = []
        if fixed_query:
            for item in fixed_query.split("&"):
                k, _, v = item.partition("=")
                pairs.append((k, v))
        for qp in op.query_params:
            found = _pop_spelling(rest, _query_keys(qp))
            if found is not None:
                pairs.extend(_query_pairs(qp, found[1]))
            elif qp.required:
                raise MissingParameter(qp.name)
        if self._key_query is not None:
            pairs.append(self._key_query)

        url = self.base + path
        if pairs:
            url += "?" + _encode_query(pairs)
        headers = self.headers_for(op)
        for hp in op.header_params:
            found = _pop_spelling(rest, hp.keys)
            if found is not None and found[1] is not None:
                text = _header_text(*found)
                same = [h for h in headers if h.lower() == hp.header.lower()]
                before = [headers.pop(h) for h in same]
                headers[hp.header] = ",".join([*before, text])

        if op.request_kind == "none":
            if rest:
                names = ", ".join(repr(k) for k in sorted(rest))
                raise UnknownParameter(
                    f"{op.name} takes no body; unknown parameter(s) {names} "
                    "(neither path nor query parameters of this method)"
                )
            return HttpRequest(op.verb, url, headers)

        use_form = op.request_kind == "multipart" and not (
            op.json_alternative and not any(f in rest for f in op.file_fields)
        )
        if use_form:
            for name in op.required_fields:
                if name not in op.file_fields and rest.get(name) is None:
                    raise MissingParameter(name)
            return HttpRequest(op.verb, url, headers, form=encode_form(op, rest))

        required = op.json_required_fields if op.json_alternative else op.required_fields
        for name in required:
            if rest.get(name) is None:
                raise MissingParameter(name)
        headers["Content-Type"] = "application/json"
        return HttpRequest(op.verb, url, headers, json_body=dumps(rest))

    def build_endpoint(self, params: dict[str, Any]) -> HttpRequest:
        """The HTTP request of a `callEndpoint` payload (see bridge/methods/endpoint.py)."""
        call = parse_call(
            params,
            key_header=self._key_header,
            key_query=self._key_query[0] if self._key_query else None,
        )
        pairs: list[tuple[str, str]] = []
        for name, value in call.query.items():
            pairs.extend(_query_pairs(QueryParam(name, "any"), value))
        if self._key_query is not None:
            pairs.append(self._key_query)
        url = self.base + call.path
        if pairs:
            url += "?" + _encode_query(pairs)
        headers = dict(self._headers)
        for name, value in call.headers.items():
            for existing in [h for h in headers if h.lower() == name.lower()]:
                del headers[existing]
            headers[name] = value
        if call.form is not None:
            form = encode_form(form_operation(call.form), call.form)
            return HttpRequest(call.method, url, headers, form=form)
        if not call.has_body:
            return HttpRequest(call.method, url, headers)
        if not any(h.lower() == "content-type" for h in headers):
            headers["Content-Type"] = "application/json"
        return HttpRequest(call.method, url, headers, json_body=dumps(call.body))
