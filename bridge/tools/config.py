"""`[tools.<name>]` checked at load: the schema subset, the templates, and the topics a tool may
never reach (the bridge's own request, response, stream, state and discovery topics)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from bridge.config import BridgeConfig, ToolConfig
from bridge.errors import ConfigError
from bridge.tools.schema import schema_problems
from bridge.tools.template import MAX_TOPICS, expand_topics, placeholders, topic_problems
from bridge.topics import filter_matches


@dataclass(frozen=True, slots=True)
class Tool:
    """One configured tool, checked, with every topic it can reach."""

    name: str
    config: ToolConfig
    topics: frozenset[str]
    """The concrete topics its template expands to: nothing else is ever published or read."""
    callers: tuple[str, ...] = ("*",)
    """Globs of the request suffixes allowed to use it (`[access] tools`)."""

    def function(self) -> dict[str, Any]:
        """Its definition as the model sees it (name, description, parameters)."""
        parameters = dict(self.config.parameters)
        parameters.setdefault("properties", {})
        parameters["additionalProperties"] = False
        return {"name": self.name, "description": self.config.description, "parameters": parameters}

    def allows_caller(self, suffix: str) -> bool:
        """Whether a request with topic suffix `suffix` may use this tool."""
        return any(fnmatch.fnmatchcase(suffix, p) for p in self.callers)


def protected_filters(config: BridgeConfig) -> list[str]:
    """Topic filters no tool may publish to or read: the bridge's own and Home Assistant's."""
    prefix = config.mqtt.topic_prefix
    return [
        f"{prefix}/request/#",
        f"{prefix}/ask/#",
        f"{prefix}/answer/#",
        f"{prefix}/response/#",
        f"{prefix}/stream/#",
        f"{prefix}/bridge/#",
        f"{config.homeassistant.discovery_prefix}/#",
    ]


def build_tools(config: BridgeConfig) -> tuple[dict[str, Tool], list[str]]:
    """The configured tools and every problem found in them (config errors: exit 78)."""
    tools: dict[str, Tool] = {}
    problems: list[str] = []
    protected = protected_filters(config)
    for name, tool in config.tools.items():
        where = f"tools.{name}"
        if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 64:
            problems.append(f"{where}: a tool name is letters, digits, '_' or '-' (at most 64)")
            continue
        found = [f"{where}.parameters: {p}" for p in schema_problems(tool.parameters)]
        if found:
            problems.extend(found)
            continue
        properties: dict[str, Any] = tool.parameters.get("properties", {})
        topics: set[str] = set()
        for field in ("topic", "reply_topic"):
            template = getattr(tool, field)
            if not template:
                continue
            bad = topic_problems(template, properties)
            problems.extend(f"{where}.{field}: {p}" for p in bad)
            if bad:
                continue
            expanded = expand_topics(template, properties)
            if len(expanded) >= MAX_TOPICS:
                problems.append(f"{where}.{field}: expands to more than {MAX_TOPICS} topics")
            for topic in expanded:
                hit = next((f for f in protected if filter_matches(f, topic)), None)
                if hit is not None:
                    problems.append(f"{where}.{field}: {topic!r} is the bridge's own ({hit})")
                    break
            topics.update(expanded)
        payload_text = tool.payload if isinstance(tool.payload, str) else repr(tool.payload)
        unknown = [n for n in placeholders(payload_text) if n not in properties]
        if unknown:
            problems.append(f"{where}.payload: ${{{unknown[0]}}} is not a declared parameter")
        if tool.kind == "request" and not tool.reply_topic:
            problems.append(f"{where}.reply_topic: a request tool waits on a reply or state topic")
        if tool.select:
            problems.extend(_select_problem(where, tool.select))
        callers = tuple(config.access.tools.get(name, ["*"]))
        tools[name] = Tool(name, tool, frozenset(topics), callers)
    problems.extend(
        f"access.tools.{name}: no such tool" for name in config.access.tools if name not in tools
    )
    return tools, problems


def check_tools(config: BridgeConfig) -> BridgeConfig:
    """`config` when its `[tools]` and `[presets]` are usable; raise ConfigError (exit 78)."""
    from bridge.presets.book import preset_problems

    problems = build_tools(config)[1] + preset_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def _select_problem(where: str, expression: str) -> list[str]:
    from bridge.errors import BridgeError
    from bridge.pipeline.options import compile_select

    try:
        compile_select(expression)
    except BridgeError as exc:
        return [f"{where}.select: {exc.message}"]
    return []
