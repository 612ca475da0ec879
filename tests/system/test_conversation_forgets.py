"""Preset conversations forget end to end: after their idle expiry, after their turn limit, and
on `/reset`, for bridge-kept history (chat) and chained `previous_response_id` (Responses).

Real Mosquitto, the bridge in a thread with its SQLite journal, the stand-in model. Idle time
passes on the conversation store's wall clock (its seam), set forward by the test: no waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import BridgeThread, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import RecordedRequest, Reply, Standin
from test_presets import ask, echo_history

PRESETS = """
[presets.idle]
method = "createChatCompletion"
request = { model = "gpt-test" }
conversation = true
idle_expiry = 60.0

[presets.short]
method = "createChatCompletion"
request = { model = "gpt-test" }
conversation = true
max_turns = 2

[presets.chain]
method = "createResponse"
request = { model = "gpt-test", store = true }
conversation = true
max_turns = 3
idle_expiry = 60.0
"""


class Clock:
    """Wall-clock time, `offset` seconds ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def preset_bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str, clock: Clock
) -> Iterator[BridgeThread]:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    path.write_text(path.read_text(encoding="utf-8") + PRESETS, encoding="utf-8")
    with BridgeThread.from_file(path, env) as running:
        dispatcher = running.bridge.dispatcher
        assert dispatcher is not None
        running.call(setattr, dispatcher.conversations, "wall_clock", clock)
        yield running


def sent_messages(record: RecordedRequest) -> list[str]:
    """The contents of a chat request's messages, in order."""
    return [str(m["content"]) for m in record.json()["messages"]]


def response_answer(record: RecordedRequest) -> Reply:
    """A Responses answer `answer <n>` with the id `resp_<n>` (n: the request's number)."""
    text = f"answer {record.index}"
    message = {
        "type": "message",
        "id": f"msg_{record.index}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    body = {
        "id": f"resp_{record.index}",
        "object": "response",
        "status": "completed",
        "output": [message],
    }
    return Reply(json=body)


def test_a_chat_conversation_forgets_after_its_idle_expiry(
    preset_bridge: BridgeThread, client: TestClient, standin: Standin, clock: Clock
) -> None:
    standin.script("POST", "/chat/completions", echo_history)
    assert ask(client, "idle", "desk", "one") == "one"
    clock.offset += 59.0  # just within idle_expiry (60 s)
    assert ask(client, "idle", "desk", "two") == "one | two"
    clock.offset += 61.0  # idle longer than idle_expiry since "two"
    assert ask(client, "idle", "desk", "three") == "three"
    assert sent_messages(standin.requests[2]) == ["three"]
    # The forgotten conversation starts again from that turn.
    assert ask(client, "idle", "desk", "four") == "three | four"
    assert sent_messages(standin.requests[3]) == ["three", "three", "four"]


def test_a_chat_conversation_forgets_after_its_turn_limit(
    preset_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    standin.script("POST", "/chat/completions", echo_history)
    answers = [ask(client, "short", "desk", q) for q in ("one", "two", "three", "four", "five")]
    # max_turns = 2: the third turn starts a new conversation, and so does the fifth.
    assert answers == ["one", "one | two", "three", "three | four", "five"]
    assert sent_messages(standin.requests[2]) == ["three"]
    assert sent_messages(standin.requests[4]) == ["five"]


def test_a_responses_conversation_forgets_after_expiry_turn_limit_and_reset(
    preset_bridge: BridgeThread, client: TestClient, standin: Standin, clock: Clock
) -> None:
    standin.script("POST", "/responses", response_answer)

    def turn(question: str) -> Any:
        """Ask; the previous_response_id the request went out with (None: a new conversation)."""
        expected = f"answer {len(standin.requests) + 1}"
        assert ask(client, "chain", "car", question) == expected
        return standin.requests[-1].json().get("previous_response_id")

    assert [turn("a"), turn("b"), turn("c")] == [None, "resp_1", "resp_2"]
    # max_turns = 3: the fourth turn goes out without the chain.
    assert [turn("d"), turn("e")] == [None, "resp_4"]
    clock.offset += 61.0  # idle longer than idle_expiry
    assert [turn("f"), turn("g")] == [None, "resp_6"]
    assert ask(client, "chain", "car", "/reset") == "conversation reset"
    assert [turn("h"), turn("i")] == [None, "resp_8"]
    # Each forgotten turn still carries the preset's own request, only the chain is gone.
    assert all(r.json()["input"] and r.json()["store"] is True for r in standin.requests)
