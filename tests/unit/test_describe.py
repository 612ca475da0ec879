"""`describe` shows the facts of an operation: topics, HTTP call, parameters, body, answer."""

from __future__ import annotations

import json

from bridge.methods.catalog import default_table
from bridge.methods.describe import describe, example_payload, summary
from bridge.methods.model import Operation, QueryParam


def op_named(name: str) -> Operation:
    op = default_table().find(name)
    assert op is not None, name
    return op


def test_create_chat_completion() -> None:
    text = describe(op_named("createChatCompletion"))
    assert text.startswith("createChatCompletion: Create chat completion.")
    assert "`openai/request/createChatCompletion[/<suffix>]`" in text
    assert "`openai/response/createChatCompletion[/<suffix>]`" in text
    assert "`POST /chat/completions`" in text
    assert "`model` (required)" in text
    assert "`messages` (required)" in text
    assert "`temperature`" in text
    assert "openai/stream/createChatCompletion" in text
    assert '"stream": true' in text
    assert "https://platform.openai.com/docs/api-reference/chat" in text


def test_get_thread_uses_the_topic_prefix() -> None:
    text = describe(op_named("getThread"), topic_prefix="home/ai")
    assert "`home/ai/request/getThread[/<suffix>]`" in text
    assert "`GET /threads/{thread_id}`" in text
    assert "Path parameters (required): `thread_id`" in text
    assert "Body: none" in text
    assert "Streams: no" in text
    assert "assistants=<version>" in text
    assert '"thread_id": "thread_abc123"' in text


def test_create_transcription_is_multipart_with_a_file() -> None:
    op = op_named("createTranscription")
    text = describe(op)
    assert "`POST /audio/transcriptions`" in text
    assert "Body: multipart/form-data" in text
    assert "`file` (required, file)" in text
    assert "File fields: `file`, sent as base64" in text
    assert "Response: text, or JSON" in text
    payload = example_payload(op)
    assert payload["model"] == "whisper-1"
    assert payload["file"] == {"base64": "<base64 bytes>", "filename": "audio.mp3"}


def test_submit_tool_outputs_keeps_openai_spelling_and_streams() -> None:
    text = describe(op_named("submitToolOutputsToRun"))
    assert text.startswith("submitToolOuputsToRun: Submit tool ouputs to run.")
    assert "`POST /threads/{thread_id}/runs/{run_id}/submit_tool_outputs`" in text
    assert "Path parameters (required): `thread_id`, `run_id`" in text
    assert "`tool_outputs` (required)" in text
    assert "openai/stream/submitToolOuputsToRun" in text
    assert "Also accepted as: `submittooloutputstorun`" in text


def test_retired_and_query_params() -> None:
    text = describe(op_named("listMessageFiles"))
    assert "Retired:" in text
    assert "`limit` (integer)" in text
    usage = describe(op_named("usage-costs"))
    assert "`start_time` (integer, required)" in usage


def test_summaries_from_kebab_snake_and_beta_names() -> None:
    assert summary(op_named("list-audit-logs")) == "List audit logs"
    assert summary(op_named("admin-api-keys-list")) == "Admin API keys list"
    assert summary(op_named("beta_createResponse")) == "Create response (beta variant)"
    assert summary(op_named("Getprojectspendlimit")) == "Get projectspendlimit"


def test_example_defaults_to_an_empty_object() -> None:
    op = Operation(
        name="listThings",
        verb="GET",
        path="/things",
        group="things",
        path_params=(),
        query_params=(QueryParam("limit", "integer"),),
        request_kind="none",
        required_fields=(),
        body_fields=(),
        file_fields=(),
        response_kind="json",
        streams=False,
        beta=None,
        deprecated=False,
        retired=False,
    )
    assert example_payload(op) == {}
    text = describe(op)
    assert text.startswith("listThings: List things.")
    assert json.dumps({}) in text
