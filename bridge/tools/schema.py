"""The JSON-schema subset a tool's `parameters` may use, and the check of a model's arguments.

A tight validator instead of PyPI `jsonschema`: that package pulls `rpds-py`, a Rust extension
without wheels for every Raspberry Pi, and the full language (`$ref`, `pattern`, `format`) is
more than a switch needs. The subset: an object of string, integer, number and boolean
properties, with `enum`, `minimum`/`maximum`, `minLength`/`maxLength`, `required`, and no other
properties, ever. Both the schema (at config load) and the arguments (per call) are checked.
"""

from __future__ import annotations

from typing import Any

SCALAR_TYPES = frozenset({"string", "integer", "number", "boolean"})
PROPERTY_KEYS = frozenset(
    {"type", "description", "enum", "minimum", "maximum", "minLength", "maxLength"}
)
OBJECT_KEYS = frozenset({"type", "properties", "required", "additionalProperties", "description"})
DEFAULT_MAX_LENGTH = 256
"""The longest string argument when the schema sets no `maxLength`."""


def schema_problems(schema: Any) -> list[str]:
    """What in `schema` is outside the accepted subset (empty when it is usable)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return ['must be {"type": "object", "properties": {...}}']
    problems = [f"unsupported keyword {k!r}" for k in sorted(set(schema) - OBJECT_KEYS)]
    if schema.get("additionalProperties", False) is not False:
        problems.append("additionalProperties must be false (it always is)")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return [*problems, "properties must be a table"]
    for name, spec in properties.items():
        if not isinstance(spec, dict) or spec.get("type") not in SCALAR_TYPES:
            problems.append(f"property {name!r}: type must be one of {sorted(SCALAR_TYPES)}")
            continue
        problems.extend(
            f"property {name!r}: unsupported keyword {k!r}"
            for k in sorted(set(spec) - PROPERTY_KEYS)
        )
        enum = spec.get("enum")
        if enum is not None and (
            not isinstance(enum, list) or not enum or not all(_is(v, spec["type"]) for v in enum)
        ):
            problems.append(f"property {name!r}: enum must list values of its type")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(r not in properties for r in required):
        problems.append("required must list declared properties")
    return problems


def argument_problems(schema: dict[str, Any], arguments: Any) -> list[str]:
    """Why `arguments` (decoded JSON) do not satisfy `schema` (empty when they do)."""
    if not isinstance(arguments, dict):
        return ["arguments must be a JSON object"]
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    problems = [f"unknown argument {k[:40]!r}" for k in sorted(set(arguments) - set(properties))]
    problems.extend(
        f"missing argument {r!r}" for r in schema.get("required", []) if r not in arguments
    )
    for name, value in arguments.items():
        spec = properties.get(name)
        if spec is not None:
            problems.extend(f"{name}: {p}" for p in _value_problems(spec, value))
    return problems


def _value_problems(spec: dict[str, Any], value: Any) -> list[str]:
    kind = spec["type"]
    if not _is(value, kind):
        return [f"must be a {kind}"]
    if "enum" in spec and value not in spec["enum"]:
        return [f"must be one of {spec['enum']}"]
    problems = []
    if isinstance(value, str):
        if len(value) > spec.get("maxLength", DEFAULT_MAX_LENGTH):
            problems.append(f"longer than {spec.get('maxLength', DEFAULT_MAX_LENGTH)} characters")
        if len(value) < spec.get("minLength", 0):
            problems.append(f"shorter than {spec['minLength']} characters")
    elif not isinstance(value, bool):
        if "minimum" in spec and value < spec["minimum"]:
            problems.append(f"below the minimum {spec['minimum']}")
        if "maximum" in spec and value > spec["maximum"]:
            problems.append(f"above the maximum {spec['maximum']}")
    return problems


def _is(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)
