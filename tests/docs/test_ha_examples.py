"""The Home Assistant examples' rules, checked on their YAML (fast; no Home Assistant here).

The proof that the examples work is tools/ha_real/run.py, which runs them in a real Home
Assistant. An imitation of Home Assistant's script engine used to live here; it defined
`context` where Home Assistant does not and subscribed its waits in time, so it passed while
every script failed in the real thing. What is left checks the rules learnt there, on the YAML.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "homeassistant"
STORE = "sensor.openai_last_reply"


def load(name: str) -> dict[str, Any]:
    """One example package."""
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return document


def all_scripts() -> list[tuple[str, dict[str, Any]]]:
    """(name, script) of every example script."""
    return [
        (name, script)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for name, script in (load(path.name).get("script") or {}).items()
    ]


def walk(node: Any) -> Any:
    """Every mapping in a YAML tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_there_are_five_scripts() -> None:
    names = {name for name, _ in all_scripts()}
    assert names == {
        "openai_ask",
        "openai_say",
        "openai_transcribe",
        "openai_describe_camera",
        "openai_generate_image",
    }


@pytest.mark.parametrize(("name", "script"), all_scripts(), ids=[n for n, _ in all_scripts()])
def test_script_level_variables_do_not_use_context(name: str, script: dict[str, Any]) -> None:
    # Home Assistant renders a script's own `variables:` before `context` exists.
    assert "context" not in str(script.get("variables", ""))


@pytest.mark.parametrize(("name", "script"), all_scripts(), ids=[n for n, _ in all_scripts()])
def test_scripts_run_in_parallel_mode(name: str, script: dict[str, Any]) -> None:
    # `mode: queued` scripts return no response before Home Assistant 2025.4.
    assert script["mode"] == "parallel"


@pytest.mark.parametrize(("name", "script"), all_scripts(), ids=[n for n, _ in all_scripts()])
def test_replies_are_awaited_in_the_store_not_with_a_late_trigger(
    name: str, script: dict[str, Any]
) -> None:
    steps = list(walk(script["sequence"]))
    # wait_for_trigger subscribes only when it starts: a reply before that is lost.
    assert not [step for step in steps if "wait_for_trigger" in step]
    publishes = [s for s in steps if s.get("action") == "mqtt.publish"]
    requests = [s for s in publishes if "/request/" in s["data"]["topic"]]
    assert len(requests) == 1 and '"transaction": txid' in requests[0]["data"]["payload"]
    [wait] = [step for step in steps if "wait_template" in step]
    assert f"txid in (state_attr('{STORE}', 'replies') or {{}}) }}}}" in wait["wait_template"]
    assert wait["continue_on_timeout"] is True
    # The transaction is made inside the sequence, where `context` exists.
    first = script["sequence"][0]
    assert "context.id" in first["variables"]["txid"]
    assert script["sequence"][-1]["response_variable"] == "result"


def test_the_store_listens_on_every_reply_to_home_assistant() -> None:
    [store] = load("openai_bridge.yaml")["template"]
    topics = [t["topic"] for t in store["trigger"] if t["trigger"] == "mqtt"]
    assert topics == ["openai/response/+/ha/#"]
    [sensor] = store["sensor"]
    assert sensor["name"] == "OpenAI last reply"  # gives the entity id the scripts read
    assert "replies" in sensor["attributes"]


def test_every_reply_topic_a_script_waits_for_is_under_the_store() -> None:
    pattern = re.compile(r"^openai/response/[^/]+/ha(/.*)?$")
    for _, script in all_scripts():
        for step in walk(script["sequence"]):
            if step.get("action") == "mqtt.publish" and "/request/" in step["data"]["topic"]:
                reply_topic = step["data"]["topic"].replace("/request/", "/response/", 1)
                assert pattern.match(reply_topic), reply_topic


def test_the_image_entity_never_sees_an_error_reply() -> None:
    package = load("openai_generate_image.yaml")
    [image] = package["mqtt"]["image"]
    assert "/response/" not in image["url_topic"]
    publishes = [
        s
        for s in walk(package["script"]["openai_generate_image"]["sequence"])
        if s.get("action") == "mqtt.publish" and s["data"]["topic"] == image["url_topic"]
    ]
    [publish] = publishes
    assert publish["data"]["payload"] == "{{ result.url }}"


def test_speech_audio_is_saved_by_an_always_subscribed_automation() -> None:
    package = load("openai_speech.yaml")
    [saver] = package["automation"]
    assert saver["triggers"] == [{"trigger": "mqtt", "topic": "openai/response/createSpeech/ha"}]
    events = [s for s in walk(saver["actions"]) if "event" in s]
    [event] = events
    assert event["event"] == "openai_file_saved"
    [store] = load("openai_bridge.yaml")["template"]
    assert {"trigger": "event", "event_type": "openai_file_saved"} in store["trigger"]


def test_the_custom_integration_has_the_hacs_layout() -> None:
    root = EXAMPLES.parents[2]
    folder = root / "custom_components" / "openai_mqtt"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["domain"] == folder.name == "openai_mqtt"
    assert manifest["version"] and manifest["dependencies"] == ["mqtt"]
    hacs = json.loads((root / "hacs.json").read_text())
    assert hacs["homeassistant"] == "2024.11.0"
    services = yaml.safe_load((folder / "services.yaml").read_text())
    assert set(services) == {"call"} and set(services["call"]["fields"]) == {
        "method",
        "request",
        "timeout",
    }
