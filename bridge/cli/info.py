"""`check-config`, `methods` and `describe`: what the bridge would do, without running it."""

from __future__ import annotations

import sys

import orjson

from bridge.cli.common import EX_USAGE, load, load_said, print_problems, unknown_method
from bridge.errors import EX_CONFIG, ConfigError


def cmd_check_config(path: str | None, how: str = "--config") -> int:
    """Validate the config; print the effective (redacted) config or every problem."""
    loaded = load_said(path, how)
    if isinstance(loaded, int):
        return loaded
    config, warnings = loaded
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(orjson.dumps(config.redacted(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_methods(group: str | None, path: str | None) -> int:
    """Print one line per method: name, group, verb, path (the config is checked, not used)."""
    from bridge.methods.catalog import default_table

    try:
        load(path)
    except ConfigError as exc:
        print_problems(exc, path)
        return EX_CONFIG
    table = default_table()
    every = (*table.operations, *table.extra)
    rows = [op for op in every if group is None or op.group == group.lower()]
    if not rows:
        groups = sorted({op.group for op in every})
        print(f"no methods in group {group!r}; groups: {', '.join(groups)}", file=sys.stderr)
        return EX_USAGE
    # callEndpoint takes its verb and path from the payload.
    lines = [
        (op, "ANY", "/<path from the payload>") if op.generic else (op, op.verb, op.path)
        for op in rows
    ]
    name_width = max(len(op.name) for op in rows)
    group_width = max(len(op.group) for op in rows)
    verb_width = max(len(verb) for _, verb, _ in lines)
    for op, verb, op_path in lines:
        flags = " (retired)" if op.retired else (" (deprecated)" if op.deprecated else "")
        print(
            f"{op.name:<{name_width}}  {op.group:<{group_width}}  {verb:<{verb_width}}  "
            f"{op_path}{flags}"
        )
    return 0


def cmd_describe(name: str, path: str | None) -> int:
    """Print what to put in the payload of one method."""
    from bridge.methods.catalog import default_table
    from bridge.methods.describe import describe

    op = default_table().find(name)
    if op is None:
        print(unknown_method(name), file=sys.stderr)
        return EX_USAGE
    try:
        prefix = load(path)[0].mqtt.topic_prefix
    except ConfigError as exc:
        print_problems(exc, path)
        return EX_CONFIG
    print(describe(op, topic_prefix=prefix))
    return 0
