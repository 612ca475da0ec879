"""The generated method table and docs/methods.md match the spec facts and the generator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import tablegen
from bridge.describe import example_payload
from bridge.operations import Operation, default_table
from bridge.optable import OPERATIONS

SEED_FILE = tablegen.DEFAULT_SPEC_DIR / tablegen.SEED_FILE
MULTIPART_SEED_FILE_FIELDS = {
    "createFile": ("file",),
    "createTranscription": ("file",),
    "createTranslation": ("file",),
    "createImageEdit": ("image", "mask"),
    "createImageVariation": ("image",),
}
SEED_SECTION_ORDER = [
    "assistants",
    "audio",
    "chat",
    "embeddings",
    "fine-tuning",
    "files",
    "images",
    "messages",
    "models",
    "moderations",
    "runs",
    "threads",
]


@pytest.fixture(scope="module")
def seed_methods() -> dict[str, dict[str, Any]]:
    with SEED_FILE.open(encoding="utf-8") as handle:
        methods: dict[str, dict[str, Any]] = json.load(handle)["methods"]
    return methods


@pytest.fixture(scope="module")
def by_name() -> dict[str, Operation]:
    return {op.name: op for op in OPERATIONS}


def test_committed_files_equal_generator_output() -> None:
    generated = tablegen.generate(tablegen.DEFAULT_SPEC_DIR)
    assert set(generated) == {"bridge/optable.py", "docs/methods.md"}
    assert tablegen.stale_files(generated) == [], "run `python -m bridge.tablegen`"


def test_check_mode_reports_a_differing_file(tmp_path: Path) -> None:
    generated = tablegen.generate(tablegen.DEFAULT_SPEC_DIR)
    tablegen.write_files(generated, tmp_path)
    assert tablegen.stale_files(generated, tmp_path) == []
    doc = tmp_path / "docs" / "methods.md"
    doc.write_text(doc.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    assert tablegen.stale_files(generated, tmp_path) == ["docs/methods.md"]
    (tmp_path / "bridge" / "optable.py").unlink()
    assert tablegen.stale_files(generated, tmp_path) == ["bridge/optable.py", "docs/methods.md"]


def test_check_mode_exit_status_on_committed_files() -> None:
    assert tablegen.main(["--check"]) == 0


def test_table_has_every_current_operation_and_the_retired_seed_methods() -> None:
    assert len(OPERATIONS) == 294
    retired = [op.name for op in OPERATIONS if op.retired]
    assert retired == list(tablegen.RETIRED_SEED_METHODS)
    assert all(op.beta == "assistants" for op in OPERATIONS if op.retired)
    assert len(default_table()) == 294


def test_no_case_insensitive_name_collisions() -> None:
    names = [op.name.lower() for op in OPERATIONS]
    assert len(names) == len(set(names))


def test_seed_methods_match_the_seed_facts(
    seed_methods: dict[str, dict[str, Any]], by_name: dict[str, Operation]
) -> None:
    assert len(seed_methods) == 50
    for name, seed in seed_methods.items():
        op = by_name[name]
        expected = seed["latest"] if seed["latest"]["exists"] else seed
        assert (op.verb, op.path) == (expected["method"], expected["path"]), name
        assert op.retired is not seed["latest"]["exists"], name
        if seed["multipart"]:
            assert op.request_kind == "multipart", name
        elif seed["request_content_type"] == "application/json":
            assert op.request_kind == "json", name
        else:
            assert op.request_kind == "none", name
        assert op.group == tablegen.slug(seed["seed_group"]), name


def test_multipart_seed_methods_file_fields(by_name: dict[str, Operation]) -> None:
    for name, file_fields in MULTIPART_SEED_FILE_FIELDS.items():
        assert by_name[name].request_kind == "multipart"
        assert by_name[name].file_fields == file_fields, name


def array_file_fields_in_the_spec() -> dict[str, tuple[str, ...]]:
    """operationId -> multipart fields whose schema has an array-of-binary variant (from YAML)."""
    with (tablegen.DEFAULT_SPEC_DIR / "openapi-latest.yaml").open(encoding="utf-8") as handle:
        spec = yaml.load(handle, Loader=yaml.CSafeLoader)

    def deref(node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            target: Any = spec
            for key in node["$ref"].removeprefix("#/").split("/"):
                target = target[key]
            node = target
        return node

    found: dict[str, tuple[str, ...]] = {}
    for item in spec["paths"].values():
        for op in item.values():
            if not isinstance(op, dict) or "requestBody" not in op:
                continue
            content = deref(op["requestBody"]).get("content", {})
            if "multipart/form-data" not in content:
                continue
            schema = deref(content["multipart/form-data"]["schema"])
            several = []
            for name, prop in schema.get("properties", {}).items():
                prop = deref(prop)
                variants = [prop, *map(deref, prop.get("anyOf", []) + prop.get("oneOf", []))]
                if any(
                    v.get("type") == "array" and deref(v.get("items", {})).get("format") == "binary"
                    for v in variants
                ):
                    several.append(name)
            if several:
                found[op["operationId"]] = tuple(several)
    return found


def test_multi_file_fields_are_the_specs_array_file_fields(by_name: dict[str, Operation]) -> None:
    expected = array_file_fields_in_the_spec()
    assert expected == tablegen.MULTI_FILE_FIELDS
    assert {op.name: op.multi_file_fields for op in OPERATIONS if op.multi_file_fields} == expected
    assert by_name["createImageEdit"].multi_file_fields == ("image",)
    assert by_name["createTranscription"].multi_file_fields == ()


def test_response_kinds_follow_observed_behaviour(by_name: dict[str, Operation]) -> None:
    assert by_name["downloadFile"].response_kind == "binary"
    assert by_name["createSpeech"].response_kind == "binary"
    assert by_name["createTranscription"].response_kind == "text"
    assert by_name["createTranslation"].response_kind == "text"
    assert by_name["create-realtime-call"].response_kind == "text"
    assert by_name["createChatCompletion"].response_kind == "json"
    assert by_name["deleteResponse"].response_kind == "empty"


def test_streaming_operations(by_name: dict[str, Operation]) -> None:
    for name in (
        "createChatCompletion",
        "createRun",
        "createThreadAndRun",
        "submitToolOuputsToRun",
    ):
        assert by_name[name].streams, name
    for name in ("getThread", "createEmbedding", "createTranslation"):
        assert not by_name[name].streams, name


def test_request_kinds_of_mixed_content(by_name: dict[str, Operation]) -> None:
    image_edit = by_name["createImageEdit"]
    assert (image_edit.request_kind, image_edit.json_alternative) == ("multipart", True)
    realtime_call = by_name["create-realtime-call"]
    assert (realtime_call.request_kind, realtime_call.json_alternative) == ("multipart", False)
    assert by_name["CreateContainerFile"].json_alternative


def test_groups_beta_and_paths(by_name: dict[str, Operation]) -> None:
    assert by_name["createVectorStore"].group == "vector-stores"
    assert by_name["ListSkills"].group == "skills"
    assert by_name["createChatCompletion"].beta is None
    assert by_name["getThread"].beta == "assistants"
    assert by_name["CreateChatSessionMethod"].beta == "chatkit_beta=v1"
    assert by_name["beta_createResponse"].path == "/responses?beta=true"
    assert by_name["listAssistants"].deprecated
    groups = {op.group for op in OPERATIONS}
    assert all("_" not in group and group == group.lower() for group in groups)


def test_path_params_are_the_path_placeholders() -> None:
    for op in OPERATIONS:
        assert op.path_params == tablegen.path_params_in(op.path), op.name


def test_every_example_has_path_params_and_required_fields() -> None:
    for op in OPERATIONS:
        payload = example_payload(op)
        required = [q.name for q in op.query_params if q.required]
        for key in (*op.path_params, *op.required_fields, *required):
            assert key in payload, (op.name, key)
        for field in op.file_fields:
            if field in payload:
                assert set(payload[field]) == {"base64", "filename"}, (op.name, field)


def test_seed_examples_are_baked_in(
    seed_methods: dict[str, dict[str, Any]], by_name: dict[str, Operation]
) -> None:
    for name, seed in seed_methods.items():
        payload = example_payload(by_name[name])
        for section in ("json", "query", "form"):
            for key, value in ((seed["example"] or {}).get(section) or {}).items():
                assert payload[key] == value, (name, key)


def test_docs_sections_follow_the_seed_order_then_alphabetical() -> None:
    doc = (tablegen.REPO_ROOT / tablegen.METHODS_DOC_PATH).read_text(encoding="utf-8")
    titles = [line[3:] for line in doc.splitlines() if line.startswith("## ")]
    assert titles[0] == "Contents"
    seed_titles = titles[1 : 1 + len(SEED_SECTION_ORDER)]
    assert [tablegen.slug(title) for title in seed_titles] == SEED_SECTION_ORDER
    newer = titles[1 + len(SEED_SECTION_ORDER) :]
    assert newer == sorted(newer)
    for op in OPERATIONS:
        assert f"### `{op.name}`" in doc
