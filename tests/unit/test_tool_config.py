"""`[tools]` checked at load, the argument schema subset, and the templates (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import BridgeConfig
from bridge.errors import InvalidParameter
from bridge.pipeline.options import parse_options
from bridge.tools.config import build_tools
from bridge.tools.schema import argument_problems, schema_problems
from bridge.tools.template import fill_payload

STATE = {
    "type": "object",
    "required": ["state"],
    "properties": {"state": {"type": "string", "enum": ["ON", "OFF"]}},
}
ROOMS = {
    "type": "object",
    "properties": {
        "room": {"type": "string", "enum": ["kitchen", "hall"]},
        "level": {"type": "integer", "minimum": 0, "maximum": 254},
    },
}


def problems_of(**tool: Any) -> list[str]:
    base = {"description": "d", "kind": "publish", "topic": "z2m/lamp/set"}
    config = BridgeConfig.model_validate({"tools": {"lamp": {**base, **tool}}})
    return build_tools(config)[1]


def test_a_plain_tool_is_accepted_and_expands_to_its_topics() -> None:
    config = BridgeConfig.model_validate(
        {
            "tools": {
                "lamp": {
                    "description": "d",
                    "kind": "publish",
                    "topic": "z2m/${room}/set",
                    "parameters": ROOMS,
                }
            }
        }
    )
    tools, problems = build_tools(config)
    assert problems == []
    assert tools["lamp"].topics == {"z2m/kitchen/set", "z2m/hall/set"}
    assert tools["lamp"].function()["parameters"]["additionalProperties"] is False


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        ({"topic": "openai/request/createChatCompletion"}, "the bridge's own"),
        ({"topic": "openai/bridge/x/state"}, "the bridge's own"),
        ({"topic": "homeassistant/light/x/config"}, "the bridge's own"),
        ({"topic": "z2m/+/set"}, "without wildcards"),
        ({"topic": "z2m/#"}, "without wildcards"),
        (
            {
                "topic": "z2m/${free}/set",
                "parameters": {"type": "object", "properties": {"free": {"type": "string"}}},
            },
            "listed values",
        ),
        ({"topic": "z2m/lamp_${room}/set", "parameters": ROOMS}, "whole topic level"),
        (
            {
                "topic": "z2m/${room}",
                "parameters": {
                    "type": "object",
                    "properties": {"room": {"type": "string", "enum": ["a/#"]}},
                },
            },
            "wildcards",
        ),
        ({"payload": "${nope}"}, "not a declared parameter"),
        ({"kind": "request"}, "reply_topic"),
        ({"parameters": {"type": "object", "properties": {"x": {"type": "array"}}}}, "type"),
        (
            {
                "parameters": {
                    "type": "object",
                    "properties": {"x": {"type": "string", "pattern": ".*"}},
                }
            },
            "unsupported keyword 'pattern'",
        ),
        ({"select": "state |"}, "select"),
    ],
)
def test_config_problems(tool: dict[str, Any], expected: str) -> None:
    problems = problems_of(**tool)
    assert problems and expected in " ".join(problems), problems


def test_access_tools_must_name_declared_tools() -> None:
    config = BridgeConfig.model_validate({"access": {"tools": {"ghost": ["*"]}}})
    assert build_tools(config)[1] == ["access.tools.ghost: no such tool"]


def test_schema_subset_and_arguments() -> None:
    assert schema_problems(STATE) == []
    assert argument_problems(STATE, {"state": "OFF"}) == []
    assert argument_problems(STATE, {"state": "off"}) == ["state: must be one of ['ON', 'OFF']"]
    assert argument_problems(STATE, {}) == ["missing argument 'state'"]
    assert argument_problems(STATE, {"state": "ON", "x": 1}) == ["unknown argument 'x'"]
    assert argument_problems(STATE, []) == ["arguments must be a JSON object"]
    assert argument_problems(ROOMS, {"level": 255}) == ["level: above the maximum 254"]
    assert argument_problems(ROOMS, {"level": True}) == ["level: must be a integer"]
    assert argument_problems(ROOMS, {"level": 3.0}) == []
    long = {"type": "object", "properties": {"t": {"type": "string"}}}
    assert argument_problems(long, {"t": "x" * 257}) == ["t: longer than 256 characters"]


def test_payload_templates_keep_types_and_never_parse_arguments() -> None:
    assert fill_payload({"state": "${state}"}, {"state": "OFF"}) == b'{"state":"OFF"}'
    assert fill_payload({"brightness": "${level}"}, {"level": 12}) == b'{"brightness":12}'
    assert fill_payload("Power ${state}", {"state": "ON"}) == b"Power ON"
    quoted = fill_payload({"say": "hello ${t}"}, {"t": '", "state": "ON'})
    assert quoted == b'{"say":"hello \\", \\"state\\": \\"ON"}'


def test_bridge_option_parsing() -> None:
    options = parse_options({"tools": ["a", "a", "b"], "allow_dangerous": ["b"], "dry_run": True})
    assert options.tools == ("a", "b") and options.allow_dangerous == {"b"} and options.dry_run
    with pytest.raises(InvalidParameter, match="tool names"):
        parse_options({"tools": "a"})
    with pytest.raises(InvalidParameter, match="must name the tools"):
        parse_options({"dry_run": True})
