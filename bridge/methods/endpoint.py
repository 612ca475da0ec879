"""`callEndpoint`: any endpoint of the service host, for what the generated table does not know yet.

Pure validation of the generic payload `{"method", "path", "query", "headers", "body" | "form"}`.
`RequestBuilder` turns the result into the same `HttpRequest` the table's methods produce, so
sending, retries, streaming, limits and replies are shared. The path stays relative to
`api_base` and no header can carry or replace the key, so the key reaches only the service host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from bridge.errors import (
    ForbiddenHeader,
    InvalidBody,
    InvalidHeader,
    InvalidMethod,
    InvalidPath,
    InvalidQuery,
    MissingParameter,
    UnknownParameter,
)
from bridge.methods.model import Operation

CALL_ENDPOINT_NAME = "callEndpoint"
VERBS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PAYLOAD_KEYS = ("method", "path", "query", "headers", "body", "form")
MAX_PATH = 2048

# Headers the bridge owns: the key's, the framing ones, and hop-by-hop ones.
RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "expect",
        "cookie",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but TAB
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Path characters sent as they are: RFC 3986 pchar and '/', plus '%' of valid triplets.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"

CALL_ENDPOINT = Operation(
    name=CALL_ENDPOINT_NAME,
    verb="POST",
    path="<path>",
    group="any-endpoint",
    path_params=(),
    query_params=(),
    request_kind="json",
    required_fields=("method", "path"),
    body_fields=PAYLOAD_KEYS,
    file_fields=(),
    response_kind="text",
    streams=True,
    beta=None,
    deprecated=False,
    retired=False,
    example='{"method":"GET","path":"/models","query":{"limit":2}}',
    generic=True,
)
"""The table entry of the generic method: JSON, text or bytes decided by the answer's type."""


@dataclass(frozen=True, slots=True)
class EndpointCall:
    """A validated generic call: verb, encoded path, query object, headers, JSON body or form."""

    method: str
    path: str
    """Percent-encoded, starts with `/`, relative to `api_base`."""
    query: dict[str, Any]
    headers: dict[str, str]
    body: Any
    has_body: bool
    form: dict[str, Any] | None


def parse_call(
    params: dict[str, Any], *, key_header: str | None, key_query: str | None
) -> EndpointCall:
    """Validate a `callEndpoint` payload; each bad field raises its own error code."""
    unknown = sorted(set(params) - set(PAYLOAD_KEYS))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise UnknownParameter(
            f"{CALL_ENDPOINT_NAME} takes only {', '.join(PAYLOAD_KEYS)}; unknown key(s) {names}"
        )
    method = _method(params.get("method"))
    path = _path(params.get("path"))
    query = _query(params.get("query"), key_query)
    headers = _headers(params.get("headers"), key_header)
    has_body = params.get("body") is not None
    form = params.get("form")
    if form is not None and not isinstance(form, dict):
        raise InvalidBody("form", "'form' must be an object of form fields")
    if has_body and form is not None:
        raise InvalidBody("body", "give either 'body' (JSON) or 'form' (multipart), not both")
    if method == "GET" and (has_body or form is not None):
        raise InvalidBody("body", "a GET request carries no body; put parameters in 'query'")
    if form is not None and "content-type" in {name.lower() for name in headers}:
        raise InvalidHeader(
            "Content-Type", "with 'form' the bridge sets Content-Type (multipart and its boundary)"
        )
    return EndpointCall(method, path, query, headers, params.get("body"), has_body, form)


def _method(value: Any) -> str:
    if value is None:
        raise MissingParameter("method")
    if not isinstance(value, str) or value.upper() not in VERBS:
        raise InvalidMethod("method", f"'method' must be one of {', '.join(VERBS)}")
    return value.upper()


def _path(value: Any) -> str:
    """The path, checked and percent-encoded where needed (see docs/protocol.md)."""
    if value is None:
        raise MissingParameter("path")
    if not isinstance(value, str) or not value:
        raise InvalidPath("path", "'path' must be a non-empty string such as \"/models\"")
    if len(value) > MAX_PATH:
        raise InvalidPath("path", f"'path' is longer than {MAX_PATH} characters")
    if not value.startswith("/"):
        raise InvalidPath(
            "path", "'path' must start with '/' and be relative to api_base (no scheme or host)"
        )
    if "?" in value or "#" in value:
        raise InvalidPath("path", "'path' must not hold '?' or '#'; put parameters in 'query'")
    if "\\" in value or _CONTROL.search(value) or "\t" in value:
        raise InvalidPath("path", "'path' must not hold backslashes or control characters")
    if _PCT.search(value):
        raise InvalidPath("path", "'path' has a '%' that is not followed by two hex digits")
    segments = value[1:].split("/")
    for index, segment in enumerate(segments):
        decoded = unquote(segment)
        if not segment and index < len(segments) - 1:
            raise InvalidPath("path", "'path' must not hold empty segments ('//')")
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise InvalidPath(
                "path", "'path' must not hold '.' or '..' segments or encoded slashes"
            )
        if _CONTROL.search(decoded) or "\t" in decoded:
            raise InvalidPath("path", "'path' must not hold encoded control characters")
    return quote(value, safe=_PATH_SAFE)


def _query(value: Any, key_query: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidQuery("query", "'query' must be an object of parameter names and values")
    for name, item in value.items():
        if not name or _CONTROL.search(name):
            raise InvalidQuery(
                "query", "query parameter names must be non-empty, without control characters"
            )
        if key_query is not None and name.removesuffix("[]") == key_query:
            raise InvalidQuery(
                "query", f"query parameter {name!r} is where the bridge sends the key"
            )
        items = (
            item
            if isinstance(item, list)
            else list(item.values())
            if isinstance(item, dict)
            else [item]
        )
        if any(isinstance(v, dict | list) for v in items):
            raise InvalidQuery(
                "query", f"query parameter {name!r}: arrays and objects hold only scalar values"
            )
    return value


def _headers(value: Any, key_header: str | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidHeader("headers", "'headers' must be an object of header names and values")
    headers: dict[str, str] = {}
    for name, item in value.items():
        if not _TOKEN.fullmatch(name):
            raise InvalidHeader(name[:100], f"header name {name[:100]!r} is not a valid token")
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or (
            key_header is not None and lowered == key_header.lower()
        ):
            raise ForbiddenHeader(name, f"header {name!r} is set by the bridge, not by a request")
        items = item if isinstance(item, list) else [item]
        texts = []
        for part in items:
            if isinstance(part, bool):
                texts.append("true" if part else "false")
            elif isinstance(part, str | int | float) and not isinstance(part, bool):
                texts.append(str(part))
            else:
                raise InvalidHeader(
                    name, f"header {name!r} takes text, a number or an array of them"
                )
        text = ",".join(texts)
        if _CONTROL.search(text):
            raise InvalidHeader(
                name, f"header {name!r} must not hold CR, LF or other control characters"
            )
        if any(existing.lower() == lowered for existing in headers):
            raise InvalidHeader(name, f"header {name!r} is given twice (names ignore case)")
        headers[name] = text
    return headers


def wants_stream(params: dict[str, Any]) -> bool:
    """Whether a `callEndpoint` payload asks for server-sent events (`"stream": true` in body)."""
    body = params.get("body")
    return isinstance(body, dict) and body.get("stream") is True


def form_operation(form: dict[str, Any]) -> Operation:
    """A multipart `Operation` whose file fields are the form's file-shaped values.

    A file is an object with `base64` (as everywhere else), or an array of such objects (sent
    as repeated `name[]` parts); every other value is a text field.
    """
    files = tuple(name.removesuffix("[]") for name, value in form.items() if _is_file_value(value))
    return Operation(
        name=CALL_ENDPOINT_NAME,
        verb="POST",
        path="<path>",
        group="any-endpoint",
        path_params=(),
        query_params=(),
        request_kind="multipart",
        required_fields=(),
        body_fields=tuple(form),
        file_fields=files,
        multi_file_fields=files,
        response_kind="text",
        streams=True,
        beta=None,
        deprecated=False,
        retired=False,
    )


def _is_file_value(value: Any) -> bool:
    if isinstance(value, dict):
        return "base64" in value
    return isinstance(value, list) and bool(value) and all(_is_file_value(v) for v in value)
