"""Topic and payload templates: `${name}` filled with validated arguments only.

A placeholder in a topic must be a whole level and its property must list its values (`enum`):
the model can only pick one of the topics the config spells out, never a wildcard or a level
of its own. A payload is text (`Power ${state}`) or a table whose string `"${name}"` becomes the
argument's JSON value (`{state = "${state}"}` -> `{"state": "OFF"}`).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_TOPICS = 4096
"""Most topics one tool's template may expand to (the enum values' product)."""


def placeholders(text: str) -> list[str]:
    """The argument names a template uses, in order."""
    return PLACEHOLDER.findall(text)


def topic_problems(template: str, properties: dict[str, Any]) -> list[str]:
    """Why a topic template is unusable (wildcards, partial-level or free placeholders)."""
    if not template or template.startswith("$") or any(c in template for c in "+#\0"):
        return ["must be a topic without wildcards, NUL or a leading '$'"]
    problems = []
    for level in template.split("/"):
        names = placeholders(level)
        if names and level != f"${{{names[0]}}}":
            problems.append(f"placeholder in {level!r} must be a whole topic level")
        for name in names:
            spec = properties.get(name)
            if spec is None:
                problems.append(f"${{{name}}} is not a declared parameter")
            elif spec.get("type") != "string" or "enum" not in spec:
                problems.append(f"${{{name}}} must be a string parameter with listed values (enum)")
            elif any(not v or any(c in v for c in "+#\0") for v in spec["enum"]):
                problems.append(f"${{{name}}}: enum values must not be empty or hold wildcards")
    return problems


def expand_topics(template: str, properties: dict[str, Any]) -> list[str]:
    """Every topic the template can become (bounded by MAX_TOPICS; checked templates only)."""
    names = list(dict.fromkeys(placeholders(template)))
    choices = [properties[n]["enum"] for n in names]
    topics = []
    for values in itertools.islice(itertools.product(*choices), MAX_TOPICS):
        topics.append(fill_text(template, dict(zip(names, values, strict=True))))
    return topics


def fill_text(template: str, arguments: dict[str, Any]) -> str:
    """`template` with each `${name}` replaced by its argument as text (JSON for non-strings)."""

    def one(match: re.Match[str]) -> str:
        value = arguments.get(match.group(1), "")
        return value if isinstance(value, str) else json.dumps(value)

    return PLACEHOLDER.sub(one, template)


def fill_payload(template: str | dict[str, Any], arguments: dict[str, Any]) -> bytes:
    """The payload bytes for validated `arguments`."""
    if isinstance(template, str):
        return fill_text(template, arguments).encode()
    return json.dumps(_fill_value(template, arguments), separators=(",", ":")).encode()


def _fill_value(value: Any, arguments: dict[str, Any]) -> Any:
    if isinstance(value, str):
        names = placeholders(value)
        if len(names) == 1 and value == f"${{{names[0]}}}":
            return arguments.get(names[0])
        return fill_text(value, arguments)
    if isinstance(value, dict):
        return {k: _fill_value(v, arguments) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_value(v, arguments) for v in value]
    return value
