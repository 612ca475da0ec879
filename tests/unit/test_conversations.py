"""Conversation states in the real SQLite journal: idle expiry, turn limit, reset (in-process)."""

from __future__ import annotations

from pathlib import Path

from support.fakes import RecordingLog

from bridge.config import PresetConfig
from bridge.journal.sqlite import Journal
from bridge.presets.book import PresetBook, conversation_key
from bridge.presets.conversation import AskTurn, ConversationStore, advance, apply

PRESET = PresetConfig(
    method="createChatCompletion",
    request={"model": "m"},
    conversation=True,
    max_turns=3,
    idle_expiry=60.0,
    max_history_messages=4,
)


def turn(question: str) -> AskTurn:
    return AskTurn("chat", PRESET, conversation_key("chat", "desk"), "ask:chat/desk", question)


def answer(text: str) -> dict[str, object]:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


async def test_remembers_then_forgets_after_idle_expiry_turn_limit_and_reset(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    journal = Journal.open(
        tmp_path / "j.sqlite3",
        log=RecordingLog(),
        scope="answers",
        max_bytes=1 << 20,
        max_age=86400.0,
        max_answer_bytes=64 * 1024,
        synchronous="normal",
    )
    assert journal is not None
    store = ConversationStore(journal, lambda: now[0])
    try:
        state = None
        for question in ("one", "two"):
            t = turn(question)
            state = await store.load(t)
            await store.save(t, advance(state, answer(question.upper()), t))
        state = await store.load(turn("three"))
        assert state is not None and state["turns"] == 2
        body = PresetBook({"chat": PRESET}).params("chat", "three")
        apply(body, state, turn("three"))
        assert [m["content"] for m in body["messages"]] == ["one", "ONE", "two", "TWO", "three"]

        now[0] += 61.0  # idle longer than idle_expiry
        assert await store.load(turn("four")) is None

        state = None
        for question in ("a", "b", "c"):
            t = turn(question)
            await store.save(t, advance(await store.load(t), answer(question), t))
            state = await store.load(turn("next"))
        assert state is None  # three turns: the fourth starts a new conversation

        t = turn("x")
        await store.save(t, advance(None, answer("x"), t))
        assert await store.load(turn("y")) is not None
        await store.reset(turn("/reset"))
        assert await store.load(turn("y")) is None
    finally:
        await journal.close()


def test_history_keeps_the_newest_messages() -> None:
    state = None
    for question in ("1", "2", "3"):
        state = advance(state, answer(question), turn(question))
    assert state is not None
    assert [m["content"] for m in state["messages"]] == ["2", "2", "3", "3"]
