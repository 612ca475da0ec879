"""`[presets.<name>]`: a plain-text question on `<prefix>/ask/<name>/<suffix>` becomes a request.

The preset's `request` table is the body; the question becomes the user message (chat) or the
`input` (Responses); its tools and reply options become the request's `_bridge`. The answer goes
to `<prefix>/answer/<name>/<suffix>` as plain text by default.
"""

from __future__ import annotations

import hashlib
from typing import Any

from bridge.config import BridgeConfig, PresetConfig
from bridge.errors import BridgeError, InvalidParameter, UnknownPreset

ANSWER_TEXT = {
    "createChatCompletion": "choices[0].message.content",
    "createResponse": "output[?type=='message'] | [-1].content[?type=='output_text'] | [0].text",
}
"""The default `select` of each method: the answer's text."""
RESET = "/reset"
"""A question of exactly this text forgets the conversation instead of asking."""
MAX_QUESTION_BYTES = 16 * 1024


class PresetBook:
    """The configured presets, turning a question into request parameters."""

    def __init__(self, presets: dict[str, PresetConfig]) -> None:
        self.presets = presets

    def get(self, name: str) -> PresetConfig:
        """The preset `name`; raise UnknownPreset."""
        preset = self.presets.get(name)
        if preset is None:
            known = ", ".join(sorted(self.presets)) or "none configured"
            raise UnknownPreset(f"no preset named {name[:64]!r} (known: {known})")
        return preset

    def params(self, name: str, question: str) -> dict[str, Any]:
        """The request parameters (with `_bridge`) for `question` asked of preset `name`."""
        preset = self.get(name)
        body = dict(preset.request)
        if preset.method == "createChatCompletion":
            body["messages"] = [*body.get("messages", []), {"role": "user", "content": question}]
        else:
            body["input"] = question
        options: dict[str, Any] = {"format": preset.format}
        select = preset.select or ANSWER_TEXT[preset.method]
        options["select"] = select
        if preset.max_bytes and preset.format == "plain":
            options["max_bytes"] = preset.max_bytes
        if preset.tools:
            options["tools"] = list(preset.tools)
        if preset.allow_dangerous:
            options["allow_dangerous"] = list(preset.allow_dangerous)
        body["_bridge"] = options
        return body


def question_text(payload: bytes) -> str:
    """The question in a preset payload (UTF-8 text); raise InvalidParameter."""
    if len(payload) > MAX_QUESTION_BYTES:
        raise InvalidParameter("payload", f"a question is at most {MAX_QUESTION_BYTES} bytes")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidParameter("payload", "a question is UTF-8 text") from None
    if not text:
        raise InvalidParameter("payload", "empty question: publish the question as plain text")
    return text


def conversation_key(preset: str, suffix: str) -> bytes:
    """The journal key of the conversation of `preset` with the caller `suffix`."""
    digest = hashlib.blake2b(b"conversation\0", digest_size=16)
    digest.update(f"{preset}\0{suffix}".encode("utf-8", "surrogatepass"))
    return digest.digest()


def preset_problems(config: BridgeConfig) -> list[str]:
    """What is wrong in `[presets]` (config errors: exit 78)."""
    from bridge.pipeline.options import parse_options

    problems = []
    for name, preset in config.presets.items():
        where = f"presets.{name}"
        if not name or any(c in name for c in "/+#\0"):
            problems.append(f"{where}: a preset name has no '/', '+', '#' or NUL")
        for key in ("stream", "_bridge", "transaction", "input", "previous_response_id"):
            if key in preset.request:
                problems.append(f"{where}.request: {key!r} is set by the bridge")
        problems.extend(
            f"{where}.tools: no tool named {t!r}" for t in preset.tools if t not in config.tools
        )
        if preset.max_bytes and preset.max_bytes < 32:
            problems.append(f"{where}.max_bytes: at least 32 (or 0: no limit)")
        try:
            parse_options(PresetBook({name: preset}).params(name, "?")["_bridge"])
        except BridgeError as exc:
            problems.append(f"{where}: {exc.message}")
    return problems
