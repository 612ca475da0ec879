"""Human-readable description of one `Operation`: topics, HTTP call, parameters, body, answer.

Pure functions, no I/O: everything comes from the `Operation` value (the example payload is baked
into the generated table by `tools/tablegen/generate.py`). The same text makes up docs/methods.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bridge.methods.model import ALIASES, Operation

REQUEST_LEVEL = "request"
REPLY_LEVEL = "response"
STREAM_LEVEL = "stream"
BETA_NAME_PREFIX = "beta_"

# Verbs that start operationIds; a glued "Getprojectspendlimit" is split after the verb.
_LEADING_VERBS = (
    "activate",
    "archive",
    "cancel",
    "compact",
    "create",
    "deactivate",
    "delete",
    "get",
    "list",
    "modify",
    "retrieve",
    "update",
)
# Words of a camelCase chunk: "API", other acronyms, capitalised or lower-case words, numbers.
_WORD = re.compile(r"API|[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# Words shown in capitals wherever they appear.
_ACRONYMS = {"api": "API"}

_RESPONSE_TEXT = {
    "json": "JSON",
    "binary": "binary (the raw bytes, base64 in the reply; see docs/protocol.md)",
    "text": "text, or JSON when the service answers JSON (decided by its Content-Type)",
    "empty": "empty (no body; the reply reports the HTTP status)",
}


def summary(op: Operation) -> str:
    """A summary in our words, from the name: "createChatCompletion" -> "Create chat completion"."""
    if op.generic:
        return "Call any endpoint of the service host, also one newer than this table"
    name = op.name
    beta_variant = name.startswith(BETA_NAME_PREFIX)
    if beta_variant:
        name = name[len(BETA_NAME_PREFIX) :]
    words: list[str] = []
    for chunk in re.split(r"[-_]+", name):
        words.extend(_WORD.findall(chunk))
    if not words:
        return name
    first = words[0].lower()
    for verb in _LEADING_VERBS:
        if first.startswith(verb) and len(first) > len(verb) and words[0][1:].islower():
            words[0:1] = [first[: len(verb)], first[len(verb) :]]
            break
    shown = [_ACRONYMS.get(word.lower(), word.lower()) for word in words]
    text = " ".join(shown)
    text = text[:1].upper() + text[1:]
    return f"{text} (beta variant)" if beta_variant else text


def request_topic(op: Operation, topic_prefix: str = "openai") -> str:
    """The topic a request for `op` is published to (without the optional suffix levels)."""
    return f"{topic_prefix}/{REQUEST_LEVEL}/{op.name}"


def reply_topic(op: Operation, topic_prefix: str = "openai") -> str:
    """The topic the reply to `op` goes to (without the optional suffix levels)."""
    return f"{topic_prefix}/{REPLY_LEVEL}/{op.name}"


def stream_topic(op: Operation, topic_prefix: str = "openai") -> str:
    """The topic streamed events of `op` go to (without the optional suffix levels)."""
    return f"{topic_prefix}/{STREAM_LEVEL}/{op.name}"


def example_payload(op: Operation) -> dict[str, Any]:
    """The minimal example payload of `op` as a dict (parsed from `op.example`)."""
    payload = json.loads(op.example)
    if not isinstance(payload, dict):
        raise ValueError(f"{op.name}: example is not a JSON object")
    return payload


def _code_list(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names) if names else "none"


def _query_text(op: Operation) -> str:
    if not op.query_params:
        return "none"
    parts = []
    for param in op.query_params:
        marks = param.type + (", required" if param.required else "")
        if param.type == "array":
            marks += f", sent as `{param.name.removesuffix('[]')}[]=`"
        parts.append(f"`{param.name}` ({marks})")
    return ", ".join(parts)


def _header_lines(op: Operation) -> list[str]:
    lines = []
    for param in op.header_params:
        keys = " or ".join(f"`{key}`" for key in param.keys)
        joined = ", an array is sent comma-joined" if param.type == "array" else ""
        lines.append(
            f"- Header parameter: {keys} ({param.type}) -> `{param.header}` header{joined}"
        )
    return lines


def _body_lines(op: Operation) -> list[str]:
    if op.request_kind == "none":
        return ["- Body: none"]
    if op.request_kind == "multipart":
        kind = "multipart/form-data"
        if op.json_alternative:
            kind += " (sent as JSON when no file is given)"
    else:
        kind = "JSON (fields not listed here are passed on too)"
    ordered = list(op.required_fields) + [f for f in op.body_fields if f not in op.required_fields]
    fields = []
    for field in ordered:
        marks = ["required"] if field in op.required_fields else []
        if field in op.multi_file_fields:
            marks.append("file or array of files")
        elif field in op.file_fields:
            marks.append("file")
        fields.append(f"`{field}`" + (f" ({', '.join(marks)})" if marks else ""))
    lines = [f"- Body: {kind}", f"- Body fields: {', '.join(fields) if fields else 'none'}"]
    if op.file_fields:
        lines.append(
            f"- File fields: {_code_list(op.file_fields)}, sent as base64 in the payload"
            " (see docs/protocol.md)"
        )
    return lines


def _stream_text(op: Operation, topic_prefix: str) -> str:
    if not op.streams:
        return "no"
    if "stream" in op.body_fields:
        trigger = 'with `"stream": true` in the payload'
    elif "stream_format" in op.body_fields:
        trigger = 'with `"stream_format": "sse"` in the payload'
    else:
        trigger = "when the service answers server-sent events"
    return f"yes, {trigger}; events go to `{stream_topic(op, topic_prefix)}[/<suffix>]`"


def _generic_details(op: Operation, topic_prefix: str) -> list[str]:
    """The description of callEndpoint, whose payload names the HTTP call itself."""
    suffix = "[/<suffix>]"
    example = json.dumps(example_payload(op), ensure_ascii=False)
    return [
        f"- Request topic: `{request_topic(op, topic_prefix)}{suffix}`",
        f"- Reply topic: `{reply_topic(op, topic_prefix)}{suffix}`",
        "- For endpoints newer than this table: any path of the service host"
        " (`[service] api_base`)",
        "- `method` (required): `GET`, `POST`, `PUT`, `PATCH` or `DELETE`",
        "- `path` (required): relative to `api_base`, starting with `/` (`/beta/agents`); no scheme"
        " or host, no `.`/`..` segments, no `?` or `#` (parameters go in `query`)",
        "- `query`: object; arrays are sent as `name[]=` repeats, objects as `name[key]=`",
        "- `headers`: object of header names and text values (arrays comma-joined); never"
        " `Authorization`, `Host`, `Content-Length`, hop-by-hop headers or the key's header",
        "- `body`: any JSON value, sent as `application/json` (not with `GET`)",
        '- `form`: instead of `body`, multipart fields; a file is `{"base64", "filename",'
        ' "content_type"}` (or an array of them, sent as `name[]` parts)',
        f"- Response: {_RESPONSE_TEXT['text']}; bytes for any other type",
        f'- Streams: yes, with `"stream": true` in `body`; events go to'
        f" `{stream_topic(op, topic_prefix)}{suffix}`",
        "- Errors: `invalid_method`, `invalid_path`, `invalid_query`, `invalid_header`,"
        " `forbidden_header`, `invalid_body`, `unknown_parameter` (see docs/protocol.md)",
        '- Access: an ordinary method name for `[access]`; `deny_methods = ["callEndpoint"]`'
        " turns it off",
        "",
        "Example payload:",
        "",
        "```json",
        example,
        "```",
    ]


def describe_details(op: Operation, *, topic_prefix: str = "openai") -> list[str]:
    """The description of `op` without its title line, as markdown list lines."""
    if op.generic:
        return _generic_details(op, topic_prefix)
    suffix = "[/<suffix>]"
    lines = [
        f"- Request topic: `{request_topic(op, topic_prefix)}{suffix}`",
        f"- Reply topic: `{reply_topic(op, topic_prefix)}{suffix}`",
        f"- HTTP: `{op.verb} {op.path}`",
        f"- Path parameters (required): {_code_list(op.path_params)}",
        f"- Query parameters: {_query_text(op)}",
        *_header_lines(op),
        *_body_lines(op),
        f"- Response: {_RESPONSE_TEXT[op.response_kind]}",
        f"- Streams: {_stream_text(op, topic_prefix)}",
    ]
    if op.beta == "assistants":
        lines.append("- OpenAI-Beta header: `assistants=<version>` (version from the config)")
    elif op.beta is not None:
        lines.append(f"- OpenAI-Beta header: `{op.beta}`")
    if op.deprecated:
        lines.append("- Deprecated by OpenAI: still served, but may be removed")
    if op.retired:
        lines.append(
            "- Retired: gone from the current API (Assistants v1); works only with a service"
            " that still serves it"
        )
    aliases = sorted(alias for alias, target in ALIASES.items() if target == op.name)
    if aliases:
        lines.append(f"- Also accepted as: {_code_list(aliases)}")
    lines.append(f"- Reference: {op.reference_url}")
    example = json.dumps(example_payload(op), ensure_ascii=False)
    lines += ["", "Example payload:", "", "```json", example, "```"]
    return lines


def describe(op: Operation, *, topic_prefix: str = "openai") -> str:
    """Plain-text (markdown) description of `op`: summary line, facts, example payload."""
    title = f"{op.name}: {summary(op)}."
    return "\n".join([title, "", *describe_details(op, topic_prefix=topic_prefix)]) + "\n"
