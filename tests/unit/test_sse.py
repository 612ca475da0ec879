"""bridge.service.sse: the event-stream parser and the assemblers of non-streamed answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import StreamInterrupted, UpstreamBadResponse
from bridge.service.sse import (
    ChatCompletionAssembler,
    CompletionAssembler,
    GenericAssembler,
    ResponsesAssembler,
    SseEvent,
    SseParser,
    assembler_for,
    is_done,
)


def parse_all(*chunks: bytes) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


def ev(data: str, event: str | None = None, id: str | None = None) -> SseEvent:
    return SseEvent(event=event, data=data, id=id)


# --- parser --------------------------------------------------------------------------------------


def test_fields_and_dispatch() -> None:
    stream = b"event: delta\nid: 7\ndata: hello\n\ndata: {}\n\n"
    assert parse_all(stream) == [ev("hello", "delta", "7"), ev("{}", None, "7")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = eol.join([b"data: a", b"data: b", b"", b"event: x", b"data: c", b"", b""])
    assert parse_all(stream) == [ev("a\nb"), ev("c", "x")]


def test_mixed_line_endings() -> None:
    assert parse_all(b"data: a\r\ndata: b\rdata: c\n\r\n") == [ev("a\nb\nc")]


def test_optional_single_space_after_colon() -> None:
    stream = b"data:tight\ndata:  two spaces\ndata\ndata:\n\n"
    assert parse_all(stream) == [ev("tight\n two spaces\n\n")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    stream = b": keep-alive\n:another\nfoo: bar\ndata: x\n: mid\n\n: after\n\n"
    assert parse_all(stream) == [ev("x")]


def test_event_without_data_is_not_dispatched_and_type_resets() -> None:
    stream = b"event: lonely\n\ndata: next\n\n"
    assert parse_all(stream) == [ev("next")]


def test_id_persists_and_nul_ids_are_ignored() -> None:
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n"
    assert parse_all(stream) == [ev("a", id="1"), ev("b", id="1"), ev("c", id="1"), ev("d", id="")]


def test_retry_field() -> None:
    parser = SseParser()
    parser.feed(b"retry: 1500\nretry: soon\ndata: x\n\n")
    assert parser.retry == 1500


def test_leading_bom_is_dropped() -> None:
    assert parse_all(b"\xef\xbb\xbfdata: x\n\n") == [ev("x")]
    assert parse_all(b"\xef\xbb", b"\xbfdata: x\n\n") == [ev("x")]


def test_utf8_split_inside_a_character() -> None:
    text = "data: snow ☃ and 🎉\n\n".encode()
    assert parse_all(*[text[i : i + 1] for i in range(len(text))]) == [ev("snow ☃ and 🎉")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert parse_all(b"data: a\xffb\n\n") == [ev("a\ufffdb")]


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    assert parse_all(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [ev("a\nb")]
    # Here the CR ends the line and the next chunk is only the LF; no empty line must appear.
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [ev("a")]


def test_cr_then_empty_chunk_then_lf() -> None:
    assert parse_all(b"data: a\r", b"", b"\n", b"\n") == [ev("a")]


def test_close_drops_an_unterminated_event_and_reports_it() -> None:
    parser = SseParser()
    assert parser.feed(b"data: one\n\ndata: cut") == [ev("one")]
    assert parser.pending
    assert parser.close() == []
    assert parser.truncated


def test_close_reports_fields_without_blank_line() -> None:
    parser = SseParser()
    parser.feed(b"data: [DONE]\n")
    assert parser.pending
    assert parser.close() == []
    assert parser.truncated


def test_close_with_flush_dispatches_the_cut_event() -> None:
    parser = SseParser()
    parser.feed(b"event: x\ndata: [DONE]")
    assert parser.close(flush=True) == [ev("[DONE]", "x")]
    assert parser.truncated


def test_clean_end_and_trailing_comment_are_not_truncated() -> None:
    parser = SseParser()
    parser.feed(b"data: x\n\n: bye")
    assert not parser.pending
    assert parser.close() == []
    assert not parser.truncated


def test_feed_after_close_is_an_error() -> None:
    parser = SseParser()
    parser.close()
    with pytest.raises(ValueError):
        parser.feed(b"data: x\n\n")
    assert parser.close() == []


def test_is_done() -> None:
    assert is_done(ev("[DONE]"))
    assert is_done(ev("[DONE]", "done"))
    assert not is_done(ev('{"x": "[DONE]"}'))


_lines = st.lists(
    st.one_of(
        st.builds(
            lambda s: "data: " + s,
            st.text(
                alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"])
            ),
        ),
        st.sampled_from(["", "", "event: delta", "id: 5", ": ping", "data", "retry: 10", "data:x"]),
        st.text(alphabet="ab:☃é \t", max_size=8),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(
    lines=_lines,
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40),
)
def test_random_splits_equal_one_feed(lines: list[str], eol: str, cuts: list[int]) -> None:
    stream = (eol.join(lines) + eol + eol).encode()
    whole = parse_all(stream)
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse_all(*pieces) == whole
    assert parse_all(*[stream[i : i + 1] for i in range(len(stream))]) == whole


# --- chat completions ----------------------------------------------------------------------------

BASE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_1",
    "service_tier": "default",
}


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**BASE, "choices": choices, "obfuscation": "pad", **extra}


def delta(index: int, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish}


def two_choice_stream() -> list[dict[str, Any]]:
    usage = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    call = {"index": 0, "id": "call_a", "type": "function"}
    return [
        chunk(
            [
                delta(0, role="assistant", content="", refusal=None),
                delta(1, role="assistant", content=None, refusal=None),
            ],
            usage=None,
        ),
        chunk([delta(0, content="Hel")], usage=None),
        chunk(
            [
                delta(
                    1,
                    tool_calls=[{**call, "function": {"name": "get_weather", "arguments": ""}}],
                )
            ],
            usage=None,
        ),
        chunk([delta(0, content="lo")], usage=None),
        chunk(
            [delta(1, tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}])],
            usage=None,
        ),
        chunk(
            [
                delta(
                    1,
                    tool_calls=[
                        {"index": 0, "function": {"arguments": '"Oslo"}'}},
                        {
                            "index": 1,
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        },
                    ],
                )
            ],
            usage=None,
        ),
        chunk([delta(0, finish="stop"), delta(1, finish="tool_calls")], usage=None),
        chunk([], usage=usage),
    ]


EXPECTED_TWO_CHOICES = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    "system_fingerprint": "fp_1",
    "service_tier": "default",
}


def test_chat_two_choices_with_tool_calls_and_usage() -> None:
    asm = ChatCompletionAssembler()
    for c in two_choice_stream():
        asm.add(c)
    assert asm.complete
    assert asm.result() == EXPECTED_TWO_CHOICES


def test_chat_through_the_parser_with_done() -> None:
    wire = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in two_choice_stream())
    wire += b"data: [DONE]\n\n"
    parser = SseParser()
    asm = ChatCompletionAssembler()
    for i in range(0, len(wire), 7):
        for event in parser.feed(wire[i : i + 7]):
            asm.feed(event)
    assert not parser.close()
    assert not parser.truncated
    assert asm.result() == EXPECTED_TWO_CHOICES


def test_chat_choices_out_of_order_are_sorted() -> None:
    asm = ChatCompletionAssembler()
    asm.add(chunk([delta(1, content="b", finish="stop")]))
    asm.add(chunk([delta(0, content="a", finish="stop")]))
    assert [c["message"]["content"] for c in asm.result()["choices"]] == ["a", "b"]


def test_chat_without_usage_chunk_has_no_usage_key() -> None:
    asm = ChatCompletionAssembler()
    asm.add({**BASE, "choices": [delta(0, role="assistant", content="x")]})
    asm.add({**BASE, "choices": [delta(0, finish="stop")]})
    result = asm.result()
    assert "usage" not in result
    assert "obfuscation" not in result
    assert result["object"] == "chat.completion"


def test_chat_absent_optional_keys_are_not_invented() -> None:
    asm = ChatCompletionAssembler()
    asm.add(
        {"id": "c", "created": 1, "model": "m", "choices": [delta(0, content="x", finish="stop")]}
    )
    assert asm.result() == {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }


def test_chat_refusal_is_concatenated() -> None:
    asm = ChatCompletionAssembler()
    asm.add(chunk([delta(0, role="assistant", content=None, refusal="I can")]))
    asm.add(chunk([delta(0, refusal="not help.")]))
    asm.add(chunk([delta(0, finish="stop")]))
    message = asm.result()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": "I cannot help."}


def test_chat_logprobs_are_concatenated() -> None:
    def lp(token: str) -> dict[str, Any]:
        return {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": []}

    asm = ChatCompletionAssembler()
    first = delta(0, role="assistant", content="Hi")
    first["logprobs"] = {"content": [lp("Hi")], "refusal": None}
    second = delta(0, content="!")
    second["logprobs"] = {"content": [lp("!")], "refusal": None}
    last = delta(0, finish="stop")
    asm.add(chunk([first]))
    asm.add(chunk([second]))
    asm.add(chunk([last]))
    choice = asm.result()["choices"][0]
    assert choice["logprobs"] == {"content": [lp("Hi"), lp("!")], "refusal": None}


def test_chat_legacy_function_call() -> None:
    asm = ChatCompletionAssembler()
    asm.add(chunk([delta(0, role="assistant", content=None, function_call={"name": "f"})]))
    asm.add(chunk([delta(0, function_call={"arguments": '{"a"'})]))
    asm.add(chunk([delta(0, function_call={"arguments": ":1}"})]))
    asm.add(chunk([delta(0, finish="function_call")]))
    message = asm.result()["choices"][0]["message"]
    assert message["function_call"] == {"name": "f", "arguments": '{"a":1}'}


def test_chat_repeated_function_name_is_kept_once() -> None:
    asm = ChatCompletionAssembler()
    first = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "go", "arguments": ""},
    }
    again = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "go", "arguments": "{}"},
    }
    asm.add(chunk([delta(0, tool_calls=[first])]))
    asm.add(chunk([delta(0, tool_calls=[again], finish="tool_calls")]))
    calls = asm.result()["choices"][0]["message"]["tool_calls"]
    assert calls == [
        {"id": "c1", "type": "function", "function": {"name": "go", "arguments": "{}"}}
    ]


def test_chat_extra_delta_fields_are_assembled() -> None:
    asm = ChatCompletionAssembler()
    asm.add(chunk([delta(0, role="assistant", reasoning_content="think ")]))
    asm.add(chunk([delta(0, reasoning_content="hard", content="ok")]))
    asm.add(chunk([delta(0, audio={"id": "a1", "data": "AAA", "transcript": "he"})]))
    asm.add(chunk([delta(0, audio={"data": "BBB", "transcript": "llo", "expires_at": 5})]))
    asm.add(chunk([delta(0, annotations=[{"type": "url_citation"}], finish="stop")]))
    message = asm.result()["choices"][0]["message"]
    assert message["reasoning_content"] == "think hard"
    assert message["audio"] == {
        "id": "a1",
        "data": "AAABBB",
        "transcript": "hello",
        "expires_at": 5,
    }
    assert message["annotations"] == [{"type": "url_citation"}]


def test_chat_error_chunk_raises_with_upstream() -> None:
    asm = ChatCompletionAssembler()
    asm.add(chunk([delta(0, content="x")]))
    error = {"message": "The server had an error", "type": "server_error", "code": None}
    with pytest.raises(StreamInterrupted, match="The server had an error") as info:
        asm.feed(ev(json.dumps({"error": error})))
    assert info.value.upstream == error
    assert info.value.code == "stream_interrupted"
    with pytest.raises(StreamInterrupted):
        ChatCompletionAssembler().add({"error": error})


def test_chat_cut_off_stream_is_interrupted() -> None:
    asm = ChatCompletionAssembler()
    with pytest.raises(StreamInterrupted, match="before any chunk"):
        asm.result()
    asm.add(chunk([delta(0, role="assistant", content="Hel")]))
    assert not asm.complete
    with pytest.raises(StreamInterrupted, match="before its end marker"):
        asm.result()
    assert asm.result(allow_incomplete=True)["choices"][0]["message"]["content"] == "Hel"


def test_chat_done_without_finish_reason_is_complete() -> None:
    asm = ChatCompletionAssembler()
    asm.feed(ev(json.dumps(chunk([delta(0, content="x")]))))
    asm.feed(ev("[DONE]"))
    assert asm.complete
    assert asm.result()["choices"][0]["finish_reason"] is None


def test_chat_non_json_and_non_object_chunks_are_bad_responses() -> None:
    with pytest.raises(UpstreamBadResponse):
        ChatCompletionAssembler().feed(ev("{not json"))
    with pytest.raises(UpstreamBadResponse):
        ChatCompletionAssembler().feed(ev("[1, 2]"))


# --- legacy completions --------------------------------------------------------------------------


def test_text_completion_stream() -> None:
    asm = CompletionAssembler()
    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "davinci-002"}
    lp1 = {"tokens": ["He"], "token_logprobs": [-0.1], "top_logprobs": None, "text_offset": [0]}
    lp2 = {"tokens": ["y"], "token_logprobs": [-0.2], "top_logprobs": None, "text_offset": [2]}
    asm.add(
        {**head, "choices": [{"text": "He", "index": 0, "logprobs": lp1, "finish_reason": None}]}
    )
    asm.add(
        {**head, "choices": [{"text": "y", "index": 0, "logprobs": lp2, "finish_reason": "length"}]}
    )
    asm.feed(ev("[DONE]"))
    assert asm.result() == {
        **head,
        "choices": [
            {
                "text": "Hey",
                "index": 0,
                "logprobs": {
                    "tokens": ["He", "y"],
                    "token_logprobs": [-0.1, -0.2],
                    "top_logprobs": None,
                    "text_offset": [0, 2],
                },
                "finish_reason": "length",
            }
        ],
    }


# --- Responses -----------------------------------------------------------------------------------


def responses_events(terminal: str = "response.completed") -> list[tuple[str, dict[str, Any]]]:
    base = {"id": "resp_1", "object": "response", "model": "gpt-4.1"}
    final = {**base, "status": "completed", "output": [{"type": "message"}], "usage": {"x": 1}}
    return [
        (
            "response.created",
            {"type": "response.created", "response": {**base, "status": "queued"}},
        ),
        ("response.in_progress", {"type": "response.in_progress", "response": base}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        (terminal, {"type": terminal, "sequence_number": 9, "response": final}),
    ]


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.failed", "response.incomplete"]
)
def test_responses_result_is_the_terminal_response(terminal: str) -> None:
    asm = ResponsesAssembler()
    for name, data in responses_events(terminal):
        asm.add(name, data)
    assert asm.complete
    assert asm.result() == responses_events(terminal)[-1][1]["response"]


def test_responses_event_name_falls_back_to_type() -> None:
    asm = ResponsesAssembler()
    for _, data in responses_events():
        asm.feed(ev(json.dumps(data)))
    assert asm.result()["status"] == "completed"


def test_responses_error_event_raises_with_upstream() -> None:
    asm = ResponsesAssembler()
    error = {
        "type": "error",
        "code": "ERR_SOMETHING",
        "message": "Something went wrong",
        "param": None,
        "sequence_number": 1,
    }
    with pytest.raises(StreamInterrupted, match="Something went wrong") as info:
        asm.feed(ev(json.dumps(error), "error"))
    assert info.value.upstream == error
    nested = {"type": "error", "error": {"message": "nested", "code": "x"}}
    with pytest.raises(StreamInterrupted, match="nested") as info:
        ResponsesAssembler().add("error", nested)
    assert info.value.upstream == {"message": "nested", "code": "x"}


def test_responses_cut_off_stream() -> None:
    asm = ResponsesAssembler()
    for name, data in responses_events()[:3]:
        asm.add(name, data)
    assert not asm.complete
    with pytest.raises(StreamInterrupted, match=r"before response\.completed"):
        asm.result()
    assert asm.result(allow_incomplete=True)["id"] == "resp_1"


def test_responses_terminal_without_response_is_bad() -> None:
    with pytest.raises(UpstreamBadResponse):
        ResponsesAssembler().add("response.completed", {"type": "response.completed"})


# --- other streams -------------------------------------------------------------------------------


def test_generic_keeps_the_last_event() -> None:
    asm = GenericAssembler()
    asm.feed(ev('{"type": "transcript.text.delta", "delta": "hi"}', "transcript.text.delta"))
    assert not asm.complete
    asm.feed(ev('{"type": "transcript.text.done", "text": "hi"}'))
    assert asm.complete
    assert asm.result() == {"type": "transcript.text.done", "text": "hi"}


def test_generic_done_marker_and_plain_text() -> None:
    asm = GenericAssembler()
    asm.feed(ev("not json", "thread.message.delta"))
    asm.feed(ev("[DONE]", "done"))
    assert asm.result() == "not json"


def test_generic_incomplete_and_error() -> None:
    asm = GenericAssembler()
    with pytest.raises(StreamInterrupted):
        asm.result()
    asm.feed(ev('{"type": "image_generation.partial_image", "b64_json": "AA"}'))
    with pytest.raises(StreamInterrupted):
        asm.result()
    assert asm.result(allow_incomplete=True)["b64_json"] == "AA"
    with pytest.raises(StreamInterrupted) as info:
        asm.feed(ev('{"message": "run failed"}', "error"))
    assert info.value.upstream == {"message": "run failed"}
    with pytest.raises(StreamInterrupted) as info:
        asm.feed(ev("boom", "error"))
    assert info.value.upstream == "boom"


def test_assembler_for() -> None:
    assert isinstance(assembler_for("createChatCompletion"), ChatCompletionAssembler)
    assert isinstance(assembler_for("createCompletion"), CompletionAssembler)
    assert isinstance(assembler_for("createResponse"), ResponsesAssembler)
    assert isinstance(assembler_for("createImageEdit"), GenericAssembler)
