"""The model/tool loop for createChatCompletion and createResponse.

The bridge adds the offered tools' function definitions, sends the request, runs the function
calls of each answer (in parallel), feeds their outputs back and sends again, until the model
answers without calls or `[tool_loop] max_steps` answers were read. Each model answer is
journaled per step, so a replay after a restart follows the same calls with the same ids (and
gets their recorded results) instead of asking the model anew.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.errors import InvalidParameter, ToolLoopLimit, UpstreamBadResponse
from bridge.jsoncodec import dumps, loads
from bridge.tools.runner import CallContext, ToolRunner, step_key

LOOP_METHODS = frozenset({"createChatCompletion", "createResponse"})

Send = Callable[[dict[str, Any]], Awaitable[bytes]]
"""Sends one request body upstream and returns the answer's JSON bytes."""


async def run_loop(
    method: str,
    body: dict[str, Any],
    send: Send,
    runner: ToolRunner,
    ctx: CallContext,
    max_steps: int,
    max_calls_per_step: int = 8,
) -> bytes:
    """The model's final answer (JSON bytes) after running its tool calls."""
    if method not in LOOP_METHODS:
        raise InvalidParameter(
            "_bridge.tools", "_bridge.tools applies to createChatCompletion and createResponse"
        )
    body.pop("stream", None)  # progress goes out as tool events; the answer comes whole
    body.pop("stream_options", None)
    chat = method == "createChatCompletion"
    functions = [tool.function() for tool in ctx.tools.values()]
    if chat:
        body["tools"] = [
            *body.get("tools", []),
            *({"type": "function", "function": f} for f in functions),
        ]
    else:
        body["tools"] = [
            *body.get("tools", []),
            *({"type": "function", "strict": False, **f} for f in functions),
        ]
        if isinstance(body.get("input"), str):
            body["input"] = [{"role": "user", "content": body["input"]}]
    for step in range(max_steps):
        answer_bytes = await _step(send, body, runner, ctx, step)
        answer = _object(answer_bytes)
        calls = _chat_calls(answer) if chat else response_calls(answer)
        if not calls:
            return answer_bytes
        calls = calls[:max_calls_per_step]
        outputs = await asyncio.gather(
            *(runner.execute(ctx, call_id, name, args) for call_id, name, args in calls)
        )
        if chat:
            message = answer["choices"][0]["message"]
            body["messages"] = [*body.get("messages", []), message]
            body["messages"].extend(
                {"role": "tool", "tool_call_id": call_id, "content": output}
                for (call_id, _, _), output in zip(calls, outputs, strict=True)
            )
        else:
            body["input"] = [*body.get("input", []), *answer.get("output", [])]
            body["input"].extend(
                {"type": "function_call_output", "call_id": call_id, "output": output}
                for (call_id, _, _), output in zip(calls, outputs, strict=True)
            )
    raise ToolLoopLimit(
        f"the model still called tools after {max_steps} answers ([tool_loop] max_steps)"
    )


async def _step(
    send: Send, body: dict[str, Any], runner: ToolRunner, ctx: CallContext, step: int
) -> bytes:
    """The model's answer at `step`: journaled from an earlier run, or asked for and journaled."""
    key = step_key(ctx.key, step)
    journal = runner.journal
    if key is not None and journal is not None and ctx.replay:
        entry = await journal.lookup(key)
        if entry is not None and entry.answer is not None:
            return entry.answer
    answer = await send(body)
    if key is not None and journal is not None:
        await journal.record_answer(key, f"step:{step}", answer)
    return answer


def _object(answer: bytes) -> dict[str, Any]:
    try:
        value = loads(answer)
    except ValueError:
        raise UpstreamBadResponse("the model's answer is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamBadResponse("the model's answer is not a JSON object")
    return value


def _chat_calls(answer: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(call id, function name, arguments) of a chat completion's `tool_calls`."""
    try:
        message = answer["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return []
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    out = []
    for call in calls or []:
        function = call.get("function") if isinstance(call, dict) else None
        if call.get("type", "function") == "function" and isinstance(function, dict):
            out.append(
                (
                    str(call.get("id", "")),
                    str(function.get("name", "")),
                    str(function.get("arguments", "")),
                )
            )
    return out


def response_calls(answer: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(call id, function name, arguments) of a response's `function_call` output items."""
    out = []
    for item in answer.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "function_call":
            out.append(
                (
                    str(item.get("call_id", "")),
                    str(item.get("name", "")),
                    str(item.get("arguments", "")),
                )
            )
    return out


def encode(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes."""
    return dumps(body)
