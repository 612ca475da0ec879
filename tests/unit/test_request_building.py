"""Pure request building: every operation in the table, each auth variant, injection attempts."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from pydantic import SecretStr
from support import openapi_spec

from bridge.config import ServiceConfig
from bridge.errors import InvalidParameter, MissingParameter, UnknownParameter
from bridge.methods.catalog import default_table
from bridge.methods.model import Operation
from bridge.pipeline.build import RequestBuilder, path_segment
from bridge.pipeline.decide import wants_stream
from tools.tablegen.generate import BETA_OVERRIDES
from tools.tablegen.specfacts import SEED_GROUPS

KEY = "sk-unit-KEY-0123456789"
TABLE = default_table()
SEED_NAMES = sorted(name for _, names in SEED_GROUPS for name in names.split())


def builder(**overrides: Any) -> RequestBuilder:
    options: dict[str, Any] = {"api_base": "https://api.example.test/v1", "api_key": SecretStr(KEY)}
    options.update(overrides)
    return RequestBuilder(ServiceConfig(**options))


def sample_payload(op: Operation) -> dict[str, Any]:
    """The table's example payload with every path parameter and required field present."""
    payload: dict[str, Any] = json.loads(op.example)
    for name in op.path_params:
        payload.setdefault(name, f"{name}_abc123")
    for name in op.file_fields:
        if name in payload:
            payload[name] = {"base64": "UklGRgAAAABXQVZF", "filename": f"{name}.wav"}
    return payload


@pytest.mark.parametrize("op", TABLE.operations, ids=lambda op: op.name)
def test_every_operation_builds_the_request_the_spec_describes(op: Operation) -> None:
    spec = openapi_spec.operation(op.name)
    payload = sample_payload(op)
    request = builder().build(op, dict(payload))

    assert request.method == spec["method"]
    url = urlsplit(request.url)
    assert f"{url.scheme}://{url.netloc}" == "https://api.example.test"
    spec_path, _, fixed_query = spec["path"].partition("?")
    expected = "/v1" + re.sub(
        r"\{([^}]+)\}", lambda m: path_segment(m.group(1), payload[m.group(1)]), spec_path
    )
    assert url.path == expected
    query = parse_qsl(url.query, keep_blank_values=True)
    declared = set(spec["query_params"])
    fixed = parse_qsl(fixed_query)
    for key, _ in query:
        assert key in declared or (key, "true") in fixed or key.split("[")[0] in declared
    for name in declared & payload.keys():
        assert any(k == name or k.startswith(name + "[") for k, _ in query), name

    assert request.headers["Authorization"] == f"Bearer {KEY}"
    # The spec shows the beta header only in curl examples; tablegen fills the few it omits.
    beta = ", ".join(spec["beta_header"]) or BETA_OVERRIDES.get(op.name)
    if beta and "assistants=" in beta:
        assert request.headers["OpenAI-Beta"] == "assistants=v2"
    elif beta:
        assert request.headers["OpenAI-Beta"] == beta
    else:
        assert "OpenAI-Beta" not in request.headers

    body_keys = set(payload) - set(op.path_params) - declared
    if op.request_kind == "none":
        assert request.json_body is None and request.form is None
    elif request.form is not None:
        assert op.request_kind == "multipart"
        sent = {p.name.removesuffix("[]") for p in request.form}
        assert body_keys - {"filename"} <= sent
        for name in op.file_fields:
            if name in payload:
                assert any(p.name.removesuffix("[]") == name and p.filename for p in request.form)
    else:
        assert request.headers["Content-Type"] == "application/json"
        assert request.json_body is not None
        assert json.loads(request.json_body) == {k: payload[k] for k in body_keys}


@pytest.mark.parametrize("name", SEED_NAMES, ids=str)
def test_every_seed_method_maps_to_its_operation(name: str) -> None:
    target = openapi_spec.operation(name)
    op = TABLE.find(name)
    assert op is not None
    assert (op.verb, op.path) == (target["method"], target["path"])
    assert op.retired is openapi_spec.is_retired(name)


def test_auth_variants() -> None:
    op = TABLE.find("listModels")
    assert op is not None
    azure = builder(api_key_name="api-key").build(op, {})
    assert azure.headers["api-key"] == KEY and "Authorization" not in azure.headers

    in_query = builder(api_key_name="key", api_key_in_query=True).build(op, {})
    assert parse_qsl(urlsplit(in_query.url).query) == [("key", KEY)]
    assert "Authorization" not in in_query.headers and "key" not in in_query.headers

    keyless = builder(api_key=SecretStr("")).build(op, {})
    assert "Authorization" not in keyless.headers and "?" not in keyless.url

    org = builder(organization="org-1", project="proj-1", extra_headers={"X-A": "b"}).build(op, {})
    assert org.headers["OpenAI-Organization"] == "org-1"
    assert org.headers["OpenAI-Project"] == "proj-1"
    assert org.headers["X-A"] == "b"
    assert "OpenAI-Organization" not in builder().build(op, {}).headers


def test_assistants_version_v1_reproduces_the_seed() -> None:
    op = TABLE.find("listAssistantFiles")
    assert op is not None and op.retired
    request = builder(assistants_version="v1").build(op, {"assistant_id": "asst_1"})
    assert request.headers["OpenAI-Beta"] == "assistants=v1"
    assert request.url == "https://api.example.test/v1/assistants/asst_1/files"


def test_trailing_slash_on_api_base_is_harmless() -> None:
    op = TABLE.find("listModels")
    assert op is not None
    assert builder(api_base="http://h:1/v1/").build(op, {}).url == "http://h:1/v1/models"


@pytest.mark.parametrize(
    "evil",
    [
        "../../admin",
        "..",
        ".",
        "a/b",
        "%2F",
        "x?y=1",
        "x#frag",
        "a\r\nX-Evil: 1",
        "a b",
        "é/ü",
        "x" * 1000,
    ],
)
def test_ids_are_one_path_segment(evil: str) -> None:
    op = TABLE.find("getThread")
    assert op is not None
    request = builder().build(op, {"thread_id": evil})
    url = urlsplit(request.url)
    assert url.netloc == "api.example.test"
    assert url.query == "" and url.fragment == ""
    segments = url.path.split("/")
    assert segments[:3] == ["", "v1", "threads"] and len(segments) == 4
    assert segments[3] not in (".", "..")
    assert unquote(segments[3]) == evil
    assert all(c not in request.url for c in "\r\n ")
    assert set(request.headers) == set(builder().build(op, {"thread_id": "t"}).headers)


def test_fine_tuned_model_ids_keep_their_colons() -> None:
    op = TABLE.find("retrieveModel")
    assert op is not None
    url = builder().build(op, {"model": "ft:gpt-4o-mini:org::abc"}).url
    assert url.endswith("/models/ft:gpt-4o-mini:org::abc")


@pytest.mark.parametrize("value", [None, ""])
def test_absent_or_empty_id_is_refused(value: Any) -> None:
    op = TABLE.find("getThread")
    assert op is not None
    with pytest.raises((MissingParameter, InvalidParameter)) as info:
        builder().build(op, {} if value is None else {"thread_id": value})
    assert "thread_id" in str(info.value)


@pytest.mark.parametrize("value", [{"a": 1}, [1], True, 1.5])
def test_non_scalar_id_is_refused(value: Any) -> None:
    op = TABLE.find("getThread")
    assert op is not None
    with pytest.raises(InvalidParameter, match="thread_id"):
        builder().build(op, {"thread_id": value})


def test_missing_required_body_field_is_named() -> None:
    op = TABLE.find("createChatCompletion")
    assert op is not None
    with pytest.raises(MissingParameter, match="messages"):
        builder().build(op, {"model": "m"})


def test_unknown_keys_on_a_bodyless_operation_are_an_error_not_dropped() -> None:
    op = TABLE.find("listFiles")
    assert op is not None
    with pytest.raises(UnknownParameter, match="purpos"):
        builder().build(op, {"purpos": "typo"})


def test_query_encoding_of_arrays_objects_and_booleans() -> None:
    op = TABLE.find("listChatCompletions")
    assert op is not None
    url = builder().build(op, {"metadata": {"room": "kitchen"}, "limit": 5, "order": "asc"}).url
    assert parse_qsl(urlsplit(url).query) == [
        ("metadata[room]", "kitchen"),
        ("limit", "5"),
        ("order", "asc"),
    ]


def test_json_body_passes_unknown_fields_through() -> None:
    op = TABLE.find("createChatCompletion")
    assert op is not None
    body = {"model": "m", "messages": [], "a_field_from_the_future": {"x": [1, 2]}}
    request = builder().build(op, {**body, "stream": False})
    assert request.json_body is not None
    assert json.loads(request.json_body) == {**body, "stream": False}
    assert not wants_stream({**body, "stream": False})
    assert wants_stream({**body, "stream": True})
    assert wants_stream({"stream_format": "sse"}) and not wants_stream({"stream": "true"})


def test_image_edit_without_files_goes_as_json_with_the_json_requirements() -> None:
    op = TABLE.find("createImageEdit")
    assert op is not None and op.json_alternative
    payload = {"prompt": "a hat", "images": [{"image_url": "https://x/y.png"}]}
    request = builder().build(op, payload)
    assert request.form is None and request.json_body is not None
    assert json.loads(request.json_body) == payload


def test_header_parameter_joins_a_configured_header_of_the_same_name_ignoring_case() -> None:
    op = TABLE.find("beta_getResponse")
    assert op is not None
    b = builder(extra_headers={"openai-beta": "from_config=v1"})
    request = b.build(op, {"response_id": "r", "betas": ["responses_multi_agent=v1"]})
    beta = [(k, v) for k, v in request.headers.items() if k.lower() == "openai-beta"]
    assert beta == [("OpenAI-Beta", "from_config=v1,responses_multi_agent=v1")]
    assert request.json_body is None and "betas" not in request.url
