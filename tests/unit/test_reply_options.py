"""bridge.pipeline.options and .replyformat: the `_bridge` key and the reply forms it asks for."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.cli.callreply import CallOutcome, ReplyCollector, options_from_flags
from bridge.errors import (
    ERROR_CODES,
    InvalidParameter,
    SelectTooCostly,
    SelectTooLarge,
    UpstreamError,
)
from bridge.methods.catalog import default_table
from bridge.methods.model import Operation
from bridge.pipeline import render
from bridge.pipeline.model import MISSING
from bridge.pipeline.options import (
    DEFAULT_OPTIONS,
    MAX_SELECT_RESULT_BYTES,
    MIN_MAX_BYTES,
    OPTIONS_KEY,
    ReplyOptions,
    compile_select,
    error_options,
    parse_options,
    pop_options,
)
from bridge.pipeline.replyformat import (
    CUT_MARKER,
    JSON_TYPE,
    PLAIN_TYPE,
    chunk_count,
    chunk_topic,
    cut_utf8,
    end_message,
    plain_bytes,
    plain_error,
    plain_stream_payloads,
    split_utf8,
    text_delta,
    utf8_boundary,
)
from bridge.service.client import ServiceResult

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Grüße, 世界 🌍"}}],
    "usage": {"total_tokens": 12},
}


def opts(**kwargs: Any) -> ReplyOptions:
    return parse_options(kwargs)


# --- parsing ------------------------------------------------------------------------------------


def test_absent_and_null_options_are_the_defaults() -> None:
    params: dict[str, Any] = {"model": "m"}
    assert pop_options(params) is DEFAULT_OPTIONS
    assert parse_options(None) is DEFAULT_OPTIONS
    assert DEFAULT_OPTIONS.is_default
    assert DEFAULT_OPTIONS.format == "json"


def test_pop_removes_the_reserved_key() -> None:
    params: dict[str, Any] = {"model": "m", OPTIONS_KEY: {"format": "plain", "max_bytes": 200}}
    options = pop_options(params)
    assert params == {"model": "m"}
    assert options.format == "plain"
    assert options.max_bytes == 200
    assert not options.is_default


def test_a_full_set_of_options() -> None:
    options = opts(select="choices[0].message.content", format="raw", chunk_bytes=4096)
    assert options.select is not None
    assert options.select.expression == "choices[0].message.content"
    assert options.select.search(CHAT) == "Grüße, 世界 🌍"
    assert (options.format, options.chunk_bytes, options.max_bytes) == ("raw", 4096, None)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([], "_bridge must be a JSON object, got an array"),
        ("plain", "_bridge must be a JSON object, got a string"),
        ({"fromat": "plain"}, "unknown option(s) 'fromat' (did you mean format?)"),
        ({"select": ""}, "_bridge.select must not be empty"),
        ({"select": "choices[0"}, "_bridge.select is not a JMESPath expression"),
        ({"select": "a.."}, "_bridge.select is not a JMESPath expression"),
        ({"select": 3}, "_bridge.select must be a JMESPath expression string, got a number"),
        ({"select": "nope(a)"}, "unknown JMESPath function(s) nope"),
        ({"select": "x" * 1025}, "longer than 1024"),
        ({"select": "`foo`"}, "deprecated `literal` form"),
        ({"select": "[" * 1000}, "_bridge.select"),
        ({"format": "text"}, '_bridge.format must be "json", "plain" or "raw", got \'text\''),
        ({"format": True}, "got a boolean"),
        ({"format": "plain", "max_bytes": 31}, "_bridge.max_bytes must be from 32"),
        ({"format": "plain", "max_bytes": "200"}, "_bridge.max_bytes must be an integer"),
        ({"format": "plain", "max_bytes": 200.0}, "got a number"),
        ({"format": "plain", "max_bytes": True}, "got a boolean"),
        ({"format": "plain", "max_bytes": 1 << 28}, "must be from"),
        ({"max_bytes": 200}, '_bridge.max_bytes applies to "format": "plain" only'),
        ({"format": "raw", "max_bytes": 200}, 'applies to "format": "plain" only'),
        ({"format": "raw", "chunk_bytes": 127}, "_bridge.chunk_bytes must be from 128"),
        ({"format": "plain", "chunk_bytes": 4096}, 'applies to "format": "raw" only'),
    ],
)
def test_bad_options_are_invalid_parameter(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_options(value)
    assert info.value.code == "invalid_parameter"
    assert fragment in info.value.message
    assert info.value.parameter.startswith(OPTIONS_KEY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["select", "format", "max_bytes", "chunk_bytes", "other"]) | st.text(),
        json_values | st.text(alphabet="ab[]().|*@`'0123456789,:{}&!<>=?-", max_size=30),
        max_size=4,
    )
    | json_values
)
def test_any_json_value_parses_or_is_invalid_parameter(value: Any) -> None:
    try:
        options = parse_options(value)
    except InvalidParameter as exc:
        assert exc.message.startswith(OPTIONS_KEY)
    else:
        assert options.format in ("json", "plain", "raw")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab[]().|*@`'0123456789,:{}&!<>=?-", max_size=40), json_values)
def test_a_compiled_selection_never_raises_on_any_data(expression: str, data: Any) -> None:
    try:
        selection = compile_select(expression)
    except InvalidParameter:
        return
    selection.search(data)  # a value or None, never an exception


def test_a_selection_that_matches_nothing_or_fails_is_null() -> None:
    assert compile_select("choices[5].message").search(CHAT) is None
    assert compile_select("abs(id)").search(CHAT) is None  # a type error on this data


# --- UTF-8 cutting ------------------------------------------------------------------------------


def test_cut_marks_a_cut_payload_and_keeps_whole_characters() -> None:
    text = "Grüße 🌍!".encode()  # 🌍 is 4 bytes
    assert cut_utf8(text, None) == text
    assert cut_utf8(text, len(text)) == text
    assert len(text) == 13
    assert cut_utf8(text, 12) == "Grüße ...".encode()  # 9 bytes would split the globe
    assert cut_utf8(text, 10) == "Grüße...".encode()
    assert cut_utf8(text, 8) == "Grü...".encode()  # 5 bytes would split the ß


@settings(max_examples=500, deadline=None)
@given(st.text(), st.integers(min_value=MIN_MAX_BYTES, max_value=400))
def test_cut_never_splits_a_code_point_and_fits(text: str, limit: int) -> None:
    data = text.encode("utf-8", "replace")
    out = cut_utf8(data, limit)
    assert len(out) <= limit
    out.decode("utf-8")  # whole characters only
    if len(data) <= limit:
        assert out == data
    else:
        kept = out[: -len(CUT_MARKER)]
        assert out.endswith(CUT_MARKER)
        assert data.startswith(kept)
        # Nothing more would have fitted: the next whole character is too long.
        assert len(kept) > limit - len(CUT_MARKER) - 4


@settings(max_examples=500, deadline=None)
@given(st.text(), st.integers(min_value=4, max_value=64))
def test_split_pieces_fit_decode_and_reassemble(text: str, limit: int) -> None:
    data = text.encode("utf-8", "replace")
    pieces = split_utf8(data, limit)
    assert b"".join(pieces) == data
    for piece in pieces:
        assert len(piece) <= limit
        piece.decode("utf-8")
    assert all(pieces) or pieces == [b""]


def test_boundary_backs_off_continuation_bytes_only() -> None:
    data = "a€b".encode()  # € is 3 bytes: index 1..3
    assert [utf8_boundary(data, i) for i in range(6)] == [0, 1, 1, 1, 4, 5]


# --- plain ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("héllo", "héllo".encode()),
        ("", b""),
        (None, b"null"),
        (True, b"true"),
        (42, b"42"),
        (1.5, b"1.5"),
        ({"a": [1, "x"]}, b'{"a":[1,"x"]}'),
    ],
)
def test_plain_renders_strings_as_they_are_and_the_rest_as_compact_json(
    value: Any, expected: bytes
) -> None:
    assert plain_bytes(value) == expected


def test_plain_error_form_and_every_code_survives_the_smallest_limit() -> None:
    exc = UpstreamError("service host answered HTTP 404 Not Found: no such model", http_status=404)
    assert (
        plain_error(exc)
        == b"ERROR upstream_error: service host answered HTTP 404 Not Found: no such model"
    )
    for code, cls in ERROR_CODES.items():
        err = cls.__new__(cls)
        err.message = "x" * 500
        out = plain_error(err, MIN_MAX_BYTES)
        assert out.startswith(f"ERROR {code}: ".encode())
        assert out.endswith(CUT_MARKER)
        assert len(out) <= MIN_MAX_BYTES


# --- whole replies (the render stage with options) ---------------------------------------------

TABLE = default_table()
CHAT_OP = TABLE.find("createChatCompletion")
SPEECH_OP = TABLE.find("createSpeech")
TRANSCRIBE_OP = TABLE.find("createTranscription")


def result(body: bytes, content_type: str = "application/json") -> ServiceResult:
    return ServiceResult(body, content_type, 200, "req_1")


def answer(
    options: ReplyOptions,
    body: bytes,
    content_type: str = "application/json",
    op: Operation | None = None,
    transaction: Any = 7,
) -> render.Outcome:
    chosen = op or CHAT_OP
    assert chosen is not None
    return render.answer(chosen, transaction, result(body, content_type), None, options)


def test_json_format_without_select_is_the_envelope_unchanged() -> None:
    data = orjson.dumps(CHAT)
    outcome = answer(DEFAULT_OPTIONS, data)
    assert outcome.payload == render.ok_raw("createChatCompletion", 7, data)
    assert (outcome.content_type, outcome.chunks) == (None, ())


def test_json_format_with_select_puts_the_selection_in_data() -> None:
    options = opts(select="choices[0].message.content")
    outcome = answer(options, orjson.dumps(CHAT), transaction=MISSING)
    assert json.loads(outcome.payload) == {
        "status": "ok",
        "method": "createChatCompletion",
        "data": "Grüße, 世界 🌍",
    }
    none = answer(opts(select="nothing"), orjson.dumps(CHAT))
    assert json.loads(none.payload)["data"] is None


def test_plain_format_select_and_cut() -> None:
    options = opts(select="choices[0].message.content", format="plain")
    outcome = answer(options, orjson.dumps(CHAT))
    assert (outcome.payload, outcome.content_type) == ("Grüße, 世界 🌍".encode(), PLAIN_TYPE)
    short = opts(select="choices[0].message.content", format="plain", max_bytes=32)
    long_chat = {"choices": [{"message": {"content": "ä" * 40}}]}
    assert answer(short, orjson.dumps(long_chat)).payload == ("ä" * 14 + "...").encode()
    whole = answer(opts(format="plain"), orjson.dumps(CHAT))
    assert json.loads(whole.payload) == CHAT
    null = answer(opts(format="plain", select="missing"), orjson.dumps(CHAT))
    assert null.payload == b"null"


def test_plain_format_selects_from_binary_data() -> None:
    outcome = answer(opts(format="plain", select="size"), b"\x00\x01", "audio/mpeg", SPEECH_OP)
    assert outcome.payload == b"2"


def test_raw_format_sends_the_bytes_with_their_type() -> None:
    audio = bytes(range(256)) * 3
    outcome = answer(opts(format="raw"), audio, "audio/mpeg", SPEECH_OP)
    assert (outcome.payload, outcome.content_type, outcome.chunks) == (audio, "audio/mpeg", ())
    text = answer(opts(format="raw"), b"hi\n", "text/plain; charset=utf-8", TRANSCRIBE_OP)
    assert (text.payload, text.content_type) == (b"hi\n", "text/plain; charset=utf-8")
    js = answer(opts(format="raw"), b'{"a": 1}')
    assert (js.payload, js.content_type) == (b'{"a": 1}', JSON_TYPE)
    sel = answer(opts(format="raw", select="a"), b'{"a": "x"}')
    assert (sel.payload, sel.content_type) == (b"x", PLAIN_TYPE)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=128, max_value=1100))
def test_chunks_reassemble_and_the_end_message_describes_them(body: bytes, size: int) -> None:
    options = opts(format="raw", chunk_bytes=size)
    outcome = answer(options, body, "audio/wav", SPEECH_OP, transaction="t1")
    assert b"".join(outcome.chunks) == body
    assert all(0 < len(chunk) <= size for chunk in outcome.chunks)
    assert outcome.chunk_type == "audio/wav"
    assert len(outcome.chunks) == chunk_count(len(body), size)
    assert outcome.content_type == JSON_TYPE
    assert json.loads(outcome.payload) == {
        "transaction": "t1",
        "chunks": len(outcome.chunks),
        "size": len(body),
        "content_type": "audio/wav",
    }
    assert chunk_topic("a/b", 3) == "a/b/3"


def test_end_message_without_transaction() -> None:
    assert end_message(0, 0, "audio/mpeg") == b'{"chunks":0,"size":0,"content_type":"audio/mpeg"}'


def test_errors_in_each_format() -> None:
    exc = UpstreamError("service host answered HTTP 429: slow down", http_status=429)
    assert render.failure("m", 3, exc).payload == render.error("m", 3, exc)
    plain = render.failure("m", 3, exc, opts(format="plain", max_bytes=40))
    assert (plain.payload, plain.content_type) == (
        b"ERROR upstream_error: service host an...",
        PLAIN_TYPE,
    )
    raw = render.failure("m", 3, exc, opts(format="raw", chunk_bytes=4096))
    assert raw.payload == b"ERROR upstream_error: service host answered HTTP 429: slow down"
    assert raw.chunks == ()


def test_error_options_keep_the_readable_format() -> None:
    assert error_options({"format": "plain", "select": "a[", "max_bytes": 64}) == ReplyOptions(
        format="plain", max_bytes=64
    )
    assert error_options({"format": "plain", "max_bytes": "x"}).max_bytes is None
    assert error_options({"format": "raw", "chunk_bytes": 1}) == ReplyOptions(format="raw")
    assert error_options({"format": "nope"}) is DEFAULT_OPTIONS
    assert error_options(["plain"]) is DEFAULT_OPTIONS


# --- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "data", "expected"),
    [
        (None, {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}, "Hel"),
        (None, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, None),
        (None, {"choices": [{"index": 0, "delta": {"content": ""}}]}, None),
        (None, {"choices": [{"index": 1, "delta": {"content": "no"}}]}, None),
        (None, {"choices": [], "usage": {"total_tokens": 3}}, None),
        (None, {"choices": [{"index": 0, "text": "lo"}]}, "lo"),
        ("response.output_text.delta", {"delta": "Wor"}, "Wor"),
        ("response.created", {"response": {}}, None),
        ("transcript.text.delta", {"delta": "door"}, "door"),
        ("speech.audio.delta", {"audio": "AAAA"}, None),
        (
            "thread.message.delta",
            {"delta": {"content": [{"type": "text", "text": {"value": "ld"}}]}},
            "ld",
        ),
        (None, "not json", None),
        ("error", {"error": {"message": "boom"}}, None),
    ],
)
def test_text_delta_per_event_kind(event: str | None, data: Any, expected: str | None) -> None:
    assert text_delta(event, data) == expected


def test_long_deltas_are_split_to_the_limit() -> None:
    data = {"choices": [{"index": 0, "delta": {"content": "€" * 20}}]}
    pieces = plain_stream_payloads(None, data, 32)
    assert b"".join(pieces) == ("€" * 20).encode()
    assert [len(p) for p in pieces] == [30, 30]
    assert plain_stream_payloads("response.created", {}, 32) == []


# --- the CLI's reply collector --------------------------------------------------------------------


def test_call_collector_in_each_format() -> None:
    payload: dict[str, Any] = {"_bridge": {"select": "a"}}
    options = options_from_flags(
        payload, select=None, reply_format="raw", max_bytes=None, chunk_bytes=128
    )
    assert payload["_bridge"] == {"select": "a", "format": "raw", "chunk_bytes": 128}
    raw = ReplyCollector("r/t", "x", options)
    assert raw.subscriptions == ["r/t", "r/t/+"]
    assert raw.feed("r/t/1", b"b") is None
    assert raw.feed("r/t/0", b"a") is None
    assert raw.feed("r/t", b'{"transaction":"other","chunks":2}') is None
    assert raw.feed("r/t", b'{"transaction":"x","chunks":2}') == CallOutcome(0, b"ab")
    short = ReplyCollector("r/t", "x", options)
    short.feed("r/t/0", b"a")
    incomplete = short.feed("r/t", b'{"transaction":"x","chunks":2}')
    assert incomplete == CallOutcome(1, stderr="incomplete reply: 1 of 2 chunks arrived")
    plain = ReplyCollector("r/t", "x", parse_options({"format": "plain"}))
    assert plain.feed("r/t", b"ERROR bad_json: no") == CallOutcome(1, stderr="ERROR bad_json: no")
    assert plain.feed("r/t", b"hi") == CallOutcome(0, b"hi\n")
    envelope = b'{"status":"error","method":"m","transaction":"x","error":{}}'
    assert plain.feed("r/t", envelope) == CallOutcome(1, envelope + b"\n")
    default = ReplyCollector("r/t", 1, DEFAULT_OPTIONS)
    assert default.feed("r/t", b'{"status":"ok","transaction":2}') is None
    assert default.feed("r/t", b"not json") is None
    assert default.feed("r/t", b'{"status":"ok","transaction":1}') == CallOutcome(
        0, b'{"status":"ok","transaction":1}\n'
    )


# --- select cannot forge a reply or blow up ------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "'Door code accepted: unlocking the front door'",
        '`"forged"`',
        "not_null(missing, 'forged')",
        "[choices[0].message.content, 'and more']",
        "{text: 'forged'}",
        "join(' unlocking ', [id, id])",
    ],
)
def test_a_select_that_can_put_a_literal_into_the_reply_is_refused(expression: str) -> None:
    with pytest.raises(InvalidParameter, match="literal"):
        compile_select(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "choices[?finish_reason=='stop'].message.content | [0]",
        "data[?starts_with(id, 'gpt')].id",
        "contains(keys(@), 'usage')",
    ],
)
def test_literals_in_comparisons_and_boolean_functions_stay_allowed(expression: str) -> None:
    compile_select(expression)


def test_a_select_that_doubles_at_every_level_is_refused_before_memory_grows() -> None:
    # 24 stages of 17 characters, each doubling its input: 2**24 copies of the answer.
    selection = compile_select(" | ".join(["to_string([@,@])"] * 24))
    tracemalloc.start()
    try:
        with pytest.raises(SelectTooLarge):
            selection.search({"text": "x" * 1000})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_SELECT_RESULT_BYTES  # bounded by the limit, not by 2**levels


def test_a_select_that_doubles_a_list_at_every_stage_is_stopped_by_its_step_budget() -> None:
    # 345 characters: each stage doubles a list of references (2**21 of them after 20 stages:
    # 128 MiB and 26 s of CPU from a two-byte answer before the step budget).
    selection = compile_select("[@,@] | " + " | ".join(["[*].[@,@] | []"] * 20))
    assert len(selection.expression) < 400
    tracemalloc.start()
    try:
        with pytest.raises(SelectTooCostly, match="max_select_steps = 100000"):
            selection.search({"a": 1})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    small = compile_select("[@,@] | [*].[@,@] | []", max_steps=100)
    assert small.search({"a": 1}) == [{"a": 1}] * 4
    with pytest.raises(SelectTooCostly):
        compile_select("data[*].id", max_steps=100).search(
            {"data": [{"id": i} for i in range(200)]}
        )


def test_a_select_of_shared_references_is_measured_as_it_would_be_sent() -> None:
    wide = "[" + ",".join(["@"] * 40) + "]"
    selection = compile_select(f"[{wide}, {wide}, {wide}]")
    with pytest.raises(SelectTooLarge):
        selection.search({"blob": "y" * 60_000})  # 120 references to 60 KB: 7 MB as JSON


@pytest.mark.parametrize(
    "expression",
    [
        "max_by(mixed, &@)",
        "min_by(mixed, &@)",
        "sort_by(mixed, &@)",
        "floor(sum(huge))",
        "ceil(sum(huge))",
    ],
)
def test_a_select_that_jmespath_fails_with_a_python_error_gives_null(expression: str) -> None:
    # Errors of the answer's data (the device's select, the service host's data), never a bug:
    # null as for any other failing select, not internal_error.
    data = {"mixed": ["x", 1, None], "huge": [1e308, 1e308]}
    assert compile_select(expression).search(data) is None
