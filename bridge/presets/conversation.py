"""Conversations that remember: per preset and caller suffix, in the journal.

createResponse with `history = "server"` chains `previous_response_id` (the Responses API keeps
the turns; the bridge stores one id). Chosen over the Conversations API because it needs no
extra call to create a conversation, works on every server implementing /responses with
`store`, and a reset is simply not sending the id. createChatCompletion (and `history =
"bridge"`) keeps the newest `max_history_messages` messages in the bridge, for servers without
server-side state (Ollama, llama.cpp). A conversation ends after `max_turns` turns, after
`idle_expiry` seconds without one, or on a `/reset` question; the journal's own `max_age`
(counted from the first turn) and size bound it too.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.config import PresetConfig
from bridge.jsoncodec import dumps, loads
from bridge.pipeline.model import JournalLike

RESET_STATE = b'{"reset":true}'


@dataclass(frozen=True, slots=True)
class AskTurn:
    """One question to a preset: where its conversation is kept, and whether it is a reset."""

    preset_name: str
    preset: PresetConfig
    key: bytes
    """The conversation's journal key (preset and caller suffix)."""
    label: str
    """`ask:<preset>/<suffix>`, the journal's topic column."""
    question: str
    reset: bool = False

    @property
    def remembers(self) -> bool:
        """Whether this preset keeps a conversation."""
        return self.preset.conversation


@dataclass(slots=True)
class ConversationStore:
    """Loads and saves conversation states in the journal (nothing remembered without one)."""

    journal: JournalLike | None
    wall_clock: Callable[[], float] = time.time

    async def load(self, turn: AskTurn) -> dict[str, Any] | None:
        """The conversation's state, None when there is none, it was reset, idle or full."""
        if self.journal is None:
            return None
        entry = await self.journal.lookup(turn.key)
        if entry is None or entry.answer is None or entry.answer == RESET_STATE:
            return None
        try:
            state = loads(entry.answer)
        except ValueError:
            return None
        if not isinstance(state, dict):
            return None
        if self.wall_clock() - float(state.get("updated", 0)) > turn.preset.idle_expiry:
            return None
        if int(state.get("turns", 0)) >= turn.preset.max_turns:
            return None
        return state

    async def save(self, turn: AskTurn, state: dict[str, Any]) -> None:
        """Store the state after a turn."""
        if self.journal is not None:
            state["updated"] = self.wall_clock()
            await self.journal.record_answer(turn.key, turn.label, dumps(state))

    async def reset(self, turn: AskTurn) -> None:
        """Forget the conversation."""
        if self.journal is not None:
            await self.journal.record_answer(turn.key, turn.label, RESET_STATE)


def turn_key(turn: AskTurn, state: dict[str, Any] | None) -> bytes:
    """The journal key of this turn's tool loop: the same for a redelivery of the question (the
    state is saved only after the answer), another for the same text asked as a later turn."""
    digest = hashlib.blake2b(b"turn\0" + turn.key, digest_size=16)
    where = (state or {}).get("turns", 0), (state or {}).get("updated", 0)
    digest.update(dumps([*where, turn.question]))
    return digest.digest()


def _server_side(turn: AskTurn) -> bool:
    return turn.preset.method == "createResponse" and turn.preset.history == "server"


def apply(body: dict[str, Any], state: dict[str, Any] | None, turn: AskTurn) -> None:
    """Put the earlier turns into the request body."""
    if state is None:
        return
    if _server_side(turn):
        if isinstance(state.get("previous_response_id"), str):
            body["previous_response_id"] = state["previous_response_id"]
        return
    history = [m for m in state.get("messages", []) if isinstance(m, dict)]
    if turn.preset.method == "createChatCompletion":
        messages = body.get("messages", [])
        body["messages"] = [*messages[:-1], *history, *messages[-1:]]
    else:
        body["input"] = [*history, {"role": "user", "content": turn.question}]


def advance(state: dict[str, Any] | None, answer: dict[str, Any], turn: AskTurn) -> dict[str, Any]:
    """The state after `answer` to this turn's question."""
    turns = int((state or {}).get("turns", 0)) + 1
    if _server_side(turn):
        return {"turns": turns, "previous_response_id": answer.get("id")}
    history = list((state or {}).get("messages", []))
    history.append({"role": "user", "content": turn.question})
    history.append({"role": "assistant", "content": answer_text(answer)})
    return {"turns": turns, "messages": history[-turn.preset.max_history_messages :]}


def answer_text(answer: dict[str, Any]) -> str:
    """The text of a chat completion or a response."""
    choices = answer.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        return str(message.get("content") or "")
    if isinstance(answer.get("output_text"), str):
        return str(answer["output_text"])
    parts = []
    for item in answer.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for content in item.get("content") or []:
                if isinstance(content, dict) and content.get("type") == "output_text":
                    parts.append(str(content.get("text", "")))
    return "".join(parts)
