"""Generate `bridge/methods/table.py` and `docs/methods.md` from the official OpenAPI documents.

The documents are in spec/.

Run `python -m tools.tablegen [--spec FILE] [--check]` (needs PyYAML, the `test` extra). It reads
`spec/openapi-latest.yaml` and `spec/openapi-2024-02.yaml` (vendored, unmodified; see
spec/README.md) through `tools/tablegen/specfacts.py`; no network, nothing outside the repository,
and the output is byte-for-byte deterministic. `--spec FILE` refreshes the table from a newer
official document: FILE is copied unmodified over spec/openapi-latest.yaml first. With `--check`
nothing is written: the exit status is 1 when a committed file differs from what would be generated
(each such file is named on stderr), 0 otherwise.

Rules, applied per operation (the seed is the 50 methods of the node this project descends from):

- Table: every operation of openapi-latest.yaml sorted by path then verb, then the six seed
  methods retired since (Assistants v1 assistant files and message files) from
  openapi-2024-02.yaml with `retired=True`. Names (operationIds) must not collide
  case-insensitively.
- group: seed methods take the slug of their seed group ("Runs (Beta)" -> "runs"); others the
  spec's x-oaiMeta group, else the slug of their first tag; underscores become '-'.
- request_kind: "none" without a request body; "multipart" when any content is
  multipart/form-data (`json_alternative` when application/json is offered too); else "json".
  Required, known and file fields come from the chosen content; file fields with an array-of-files
  variant in their schema also take an array of files (`multi_file_fields`).
- response_kind: "binary" when a success response is octet-stream, zip, audio, image or video;
  "text" for application/sdp; "empty" when no success response has a body; else "json".
  Overrides from observed behaviour are in `RESPONSE_KIND_OVERRIDES`.
- streams: a success response is text/event-stream, or the chosen request content knows a
  `stream` field. The second half covers operations whose spec lists only a JSON answer although
  they answer server-sent events for `"stream": true` (createRun, createThreadAndRun,
  submitToolOuputsToRun, createCompletion).
- beta: "assistants" for `OpenAI-Beta: assistants=...` (the version comes from the config, also
  for the retired v1 methods), else the fixed header value such as "chatkit_beta=v1", else None;
  the header is read from the spec's examples, gaps are filled by `BETA_OVERRIDES`.
- example: the seed's example values (json, query and form merged into one flat payload, one
  placeholder file object per listed file field), completed with placeholders for every path
  parameter, required query parameter and required body field.

No prose (summaries, descriptions) is copied from the spec: only ids, paths, names and kinds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bridge.methods.describe import describe_details, example_payload, summary
from bridge.methods.endpoint import CALL_ENDPOINT
from bridge.methods.model import (
    HeaderParam,
    Operation,
    QueryParam,
    QueryType,
    RequestKind,
    ResponseKind,
)
from tools.tablegen import specfacts

REPO_ROOT = Path(__file__).resolve().parents[2]
LATEST_SPEC_PATH = "spec/openapi-latest.yaml"
RETIRED_SPEC_PATH = "spec/openapi-2024-02.yaml"
OPTABLE_PATH = "bridge/methods/table.py"
METHODS_DOC_PATH = "docs/methods.md"
GENERATOR_COMMAND = "python -m tools.tablegen"

# Seed methods that no longer exist in the current API, in the seed's order.
RETIRED_SEED_METHODS = (
    "listAssistantFiles",
    "createAssistantFile",
    "getAssistantFile",
    "deleteAssistantFile",
    "listMessageFiles",
    "getMessageFile",
)

# Where the spec's declared answer is not what the API sends.
RESPONSE_KIND_OVERRIDES: dict[str, ResponseKind] = {
    # The spec declares a JSON string; the API sends the file's raw bytes.
    "downloadFile": "binary",
    # JSON, or text/plain for response_format text|srt|vtt; decided by Content-Type at runtime.
    "createTranscription": "text",
    "createTranslation": "text",
    # The spec declares no body; the endpoint exists to send the container file's bytes.
    "RetrieveContainerFileContent": "binary",
}

# Where the spec's examples show no OpenAI-Beta header although the operation needs one.
BETA_OVERRIDES: dict[str, str] = {
    # No curl example in the spec; its five ChatKit siblings all send chatkit_beta=v1.
    "DeleteThreadMethod": "chatkit_beta=v1",
}

BINARY_CONTENT_TYPES = ("application/octet-stream", "application/zip")
BINARY_CONTENT_PREFIXES = ("audio/", "image/", "video/")
TEXT_CONTENT_TYPES = ("application/sdp",)
EVENT_STREAM = "text/event-stream"
STREAM_BODY_FIELD = "stream"
ASSISTANTS_BETA_PREFIX = "assistants="
BETA_HEADER_PREFIX = "OpenAI-Beta: "
QUERY_TYPES: frozenset[str] = frozenset(
    {"string", "integer", "number", "boolean", "array", "object"}
)
VERBS = ("GET", "POST", "DELETE")

# Placeholder ids in the style of the API's own ids, for path parameters and *_id fields.
ID_PLACEHOLDERS = {
    "assistant_id": "asst_abc123",
    "completion_id": "chatcmpl-abc123",
    "conversation_id": "conv_abc123",
    "file_id": "file-abc123",
    "fine_tuning_job_id": "ftjob-abc123",
    "message_id": "msg_abc123",
    "response_id": "resp_abc123",
    "vector_store_id": "vs_abc123",
}
# Placeholder file names for file fields; "file" depends on the group.
FILENAME_BY_FIELD = {
    "audio_sample": "sample.mp3",
    "data": "part.bin",
    "files": "skill.zip",
    "image": "image.png",
    "input_reference": "reference.png",
    "mask": "mask.png",
    "recording": "consent.mp3",
    "video": "video.mp4",
}
FILENAME_BY_GROUP = {
    "audio": "audio.mp3",
    "content-provenance-checks": "image.png",
    "files": "data.jsonl",
}
BASE64_PLACEHOLDER = "<base64 bytes>"

# Longest line of the generated Python source (ruff's line-length).
LINE_LIMIT = 100


@dataclass(frozen=True)
class SpecFacts:
    """What the generator reads: operations of both official documents and the seed."""

    latest_ops: list[dict[str, Any]]
    ops_2024: list[dict[str, Any]]
    seed_methods: dict[str, dict[str, Any]]
    """Seed method name -> {"seed_group", "example"}, in the seed's order."""


def spec_facts(latest: specfacts.Spec, retired: specfacts.Spec) -> SpecFacts:
    """The facts of two parsed documents: the current one and the 2024-02 one."""
    return SpecFacts(
        latest_ops=specfacts.extract_operations(latest),
        ops_2024=specfacts.extract_operations(retired),
        seed_methods=specfacts.seed_methods(),
    )


# --- building the table -----------------------------------------------------------------------


def slug(text: str) -> str:
    """Lower case, ' (Beta)' dropped, spaces and underscores to '-': "Runs (Beta)" -> "runs"."""
    text = re.sub(r"\s*\(beta\)\s*$", "", text.strip(), flags=re.IGNORECASE)
    return re.sub(r"[\s_]+", "-", text.lower())


def seed_section_titles(facts: SpecFacts) -> dict[str, str]:
    """Seed group slug -> section title ("Runs (Beta)" -> "runs" -> "Runs"), in the seed's order."""
    titles: dict[str, str] = {}
    for entry in facts.seed_methods.values():
        title = re.sub(r"\s*\(beta\)\s*$", "", entry["seed_group"], flags=re.IGNORECASE)
        titles.setdefault(slug(entry["seed_group"]), title)
    return titles


def group_of(spec_op: Mapping[str, Any], seed_entry: Mapping[str, Any] | None) -> str:
    """The operation's section: seed group, else spec group, else first tag, as a slug."""
    if seed_entry is not None:
        return slug(seed_entry["seed_group"])
    if spec_op.get("group"):
        return slug(spec_op["group"])
    tags = spec_op.get("tags") or []
    if not tags:
        raise ValueError(f"{spec_op['operationId']}: neither group nor tag")
    return slug(tags[0])


def choose_request_content(
    spec_op: Mapping[str, Any],
) -> tuple[RequestKind, Mapping[str, Any] | None, bool]:
    """(request kind, the content whose fields apply, whether JSON is offered beside multipart)."""
    request = spec_op.get("request")
    contents: list[Mapping[str, Any]] = list(request["content"]) if request else []
    if not contents:
        return "none", None, False
    by_kind = {content["kind"]: content for content in reversed(contents)}
    if "multipart" in by_kind:
        return "multipart", by_kind["multipart"], "json" in by_kind
    if "json" in by_kind:
        return "json", by_kind["json"], False
    raise ValueError(f"{spec_op['operationId']}: no JSON or multipart request content")


def response_kind_of(spec_op: Mapping[str, Any]) -> ResponseKind:
    """What a 2xx answer carries, from the declared content types and the overrides."""
    name = spec_op["operationId"]
    if name in RESPONSE_KIND_OVERRIDES:
        return RESPONSE_KIND_OVERRIDES[name]
    successes = [r for r in spec_op["responses"] if str(r["status"]).startswith("2")]
    content_types = [str(r["content_type"]).lower() for r in successes if r["content_type"]]
    if any(
        ct in BINARY_CONTENT_TYPES or ct.startswith(BINARY_CONTENT_PREFIXES) for ct in content_types
    ):
        return "binary"
    if any(ct in TEXT_CONTENT_TYPES for ct in content_types):
        return "text"
    if not content_types:
        return "empty"
    if any(r["kind"] == "json" for r in successes):
        return "json"
    raise ValueError(f"{name}: unclassified response content types {content_types}")


def streams_of(spec_op: Mapping[str, Any], body_fields: Sequence[str]) -> bool:
    """An event-stream success response, or a `stream` body field (see the module docstring)."""
    successes = [r for r in spec_op["responses"] if str(r["status"]).startswith("2")]
    if any(r["content_type"] == EVENT_STREAM for r in successes):
        return True
    return STREAM_BODY_FIELD in body_fields


def beta_of(beta_header: str | None, name: str) -> str | None:
    """`assistants` for the assistants family, else the fixed OpenAI-Beta value, else None."""
    if name in BETA_OVERRIDES:
        return BETA_OVERRIDES[name]
    if not beta_header:
        return None
    if not beta_header.startswith(BETA_HEADER_PREFIX):
        raise ValueError(f"unexpected beta header {beta_header!r}")
    value = beta_header[len(BETA_HEADER_PREFIX) :]
    if value.startswith(ASSISTANTS_BETA_PREFIX):
        return "assistants"
    return value


def query_param_of(spec_param: Mapping[str, Any]) -> QueryParam:
    """A QueryParam with the spec's type, "any" when it declares none."""
    declared = spec_param.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), None)
    query_type = cast(QueryType, declared if declared in QUERY_TYPES else "any")
    return QueryParam(spec_param["name"], query_type, bool(spec_param.get("required", False)))


# How the SDKs spell a declared header (the spec writes header names in lower case).
HEADER_SPELLING = {"openai-beta": "OpenAI-Beta"}


def header_param_of(spec_param: Mapping[str, Any]) -> HeaderParam:
    """A HeaderParam: the SDKs' parameter name (x-stainless-param) and the header's own name."""
    name: str = spec_param["name"]
    keys = tuple(dict.fromkeys(k for k in (spec_param.get("sdk_name"), name) if k))
    declared = spec_param.get("type")
    header_type = cast(QueryType, declared if declared in QUERY_TYPES else "string")
    header = HEADER_SPELLING.get(name.lower(), "-".join(w.capitalize() for w in name.split("-")))
    return HeaderParam(header, keys, header_type)


def id_placeholder(name: str) -> str:
    """A plausible id for a parameter or field named `name`, e.g. "thread_abc123"."""
    if name in ID_PLACEHOLDERS:
        return ID_PLACEHOLDERS[name]
    if name.endswith("file_id"):
        return ID_PLACEHOLDERS["file_id"]
    if name.endswith("_id"):
        return f"{name[: -len('_id')]}_abc123"
    return f"<{name}>"


def file_placeholder(field: str, group: str) -> dict[str, str]:
    """The payload form of a file field: base64 text and a file name."""
    if field in FILENAME_BY_FIELD:
        filename = FILENAME_BY_FIELD[field]
    elif field == "file":
        filename = FILENAME_BY_GROUP.get(group, "notes.txt")
    else:
        filename = f"{field}.bin"
    return {"base64": BASE64_PLACEHOLDER, "filename": filename}


def query_placeholder(param: QueryParam) -> Any:
    """A value of the declared type for a required query parameter."""
    if param.type in ("integer", "number"):
        return 1730419200 if param.name.endswith("_time") else 1
    if param.type == "boolean":
        return True
    if param.type == "array":
        return [f"<{param.name}>"]
    if param.type == "object":
        return {}
    return f"<{param.name}>"


def build_example(
    *,
    group: str,
    path_params: Sequence[str],
    query_params: Sequence[QueryParam],
    required_fields: Sequence[str],
    file_fields: Sequence[str],
    seed_example: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A minimal flat payload: path parameters, seed values, then required query and body keys."""
    payload: dict[str, Any] = {name: id_placeholder(name) for name in path_params}
    if seed_example:
        for section in ("json", "query", "form"):
            payload.update(seed_example.get(section) or {})
        for field in seed_example.get("files") or []:
            payload[field] = file_placeholder(field, group)
    for param in query_params:
        if param.required and param.name not in payload:
            payload[param.name] = query_placeholder(param)
    for field in required_fields:
        if field in payload:
            continue
        if field in file_fields:
            payload[field] = file_placeholder(field, group)
        else:
            payload[field] = id_placeholder(field)
    return payload


def path_params_in(path: str) -> tuple[str, ...]:
    """The `{name}` placeholders of a path template, in order."""
    return tuple(re.findall(r"\{([^}]+)\}", path))


def build_operation(
    spec_op: Mapping[str, Any], seed_entry: Mapping[str, Any] | None, *, retired: bool
) -> Operation:
    """One table entry from an ops-*.json operation (and its seed entry, for seed methods)."""
    name: str = spec_op["operationId"]
    verb = spec_op["method"]
    if verb not in VERBS:
        raise ValueError(f"{name}: unsupported verb {verb}")
    path: str = spec_op["path"]
    path_params = tuple(spec_op["path_params"])
    if set(path_params) != set(path_params_in(path)):
        raise ValueError(f"{name}: path params {path_params} do not match {path}")
    group = group_of(spec_op, seed_entry)
    request_kind, content, json_alternative = choose_request_content(spec_op)
    json_required: tuple[str, ...] = ()
    if json_alternative:
        json_content = next(c for c in spec_op["request"]["content"] if c["kind"] == "json")
        json_required = tuple(json_content["required_fields"])
    required_fields = tuple(content["required_fields"]) if content else ()
    body_fields = tuple(content["fields"]) if content else ()
    file_fields = tuple(content.get("file_fields") or ()) if content else ()
    array_file_fields = tuple(content.get("array_file_fields") or ()) if content else ()
    multi_file_fields = () if retired else array_file_fields
    if not set(multi_file_fields) <= set(file_fields):
        raise ValueError(f"{name}: array file fields {multi_file_fields} are not file fields")
    query_params = tuple(query_param_of(p) for p in spec_op["query_params"])
    header_params = tuple(header_param_of(p) for p in spec_op.get("header_params") or ())
    example = build_example(
        group=group,
        path_params=path_params,
        query_params=query_params,
        required_fields=required_fields,
        file_fields=file_fields,
        seed_example=seed_entry.get("example") if seed_entry else None,
    )
    return Operation(
        name=name,
        verb=verb,
        path=path,
        group=group,
        path_params=path_params,
        query_params=query_params,
        request_kind=request_kind,
        required_fields=required_fields,
        body_fields=body_fields,
        file_fields=file_fields,
        multi_file_fields=multi_file_fields,
        response_kind=response_kind_of(spec_op),
        streams=streams_of(spec_op, body_fields),
        beta=beta_of(spec_op.get("beta_header"), name),
        deprecated=bool(spec_op.get("deprecated", False)),
        retired=retired,
        json_alternative=json_alternative,
        json_required_fields=json_required,
        example=json.dumps(example, separators=(",", ":"), ensure_ascii=True),
        header_params=header_params,
    )


def build_operations(facts: SpecFacts) -> tuple[Operation, ...]:
    """Every current operation in spec order, then the retired seed methods."""
    operations = [
        build_operation(op, facts.seed_methods.get(op["operationId"]), retired=False)
        for op in facts.latest_ops
    ]
    ops_2024 = {op["operationId"]: op for op in facts.ops_2024}
    current_names = {op.name for op in operations}
    for name in RETIRED_SEED_METHODS:
        if name in current_names:
            raise ValueError(f"{name} is listed as retired but exists in the current spec")
        operations.append(build_operation(ops_2024[name], facts.seed_methods[name], retired=True))
    missing = set(facts.seed_methods) - {op.name for op in operations}
    if missing:
        raise ValueError(f"seed methods missing from the table: {sorted(missing)}")
    assert_no_collisions(operations)
    return tuple(operations)


def assert_no_collisions(operations: Iterable[Operation]) -> None:
    """Raise ValueError when two operation names are equal ignoring case."""
    seen: dict[str, str] = {}
    for op in operations:
        key = op.name.lower()
        if key in seen:
            raise ValueError(f"operation names collide case-insensitively: {seen[key]}, {op.name}")
        seen[key] = op.name


# --- rendering bridge/methods/table.py ---------------------------------------------------------


def py_str(text: str) -> str:
    """A Python string literal as ruff format writes it (double quotes unless that escapes)."""
    if '"' in text and "'" in text:
        raise ValueError(f"cannot render a string holding both quote kinds: {text!r}")
    literal = repr(text)
    if literal.startswith("'") and '"' not in text:
        literal = '"' + literal[1:-1] + '"'
    return literal


def py_value(value: object) -> str:
    """Source text of a scalar, QueryParam or tuple value in the generated table."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return py_str(value)
    if isinstance(value, QueryParam):
        required = ", required=True" if value.required else ""
        return f"QueryParam({py_str(value.name)}, {py_str(value.type)}{required})"
    if isinstance(value, HeaderParam):
        keys = (
            "("
            + ", ".join(py_str(k) for k in value.keys)
            + ("," if len(value.keys) == 1 else "")
            + ")"
        )
        return f"HeaderParam({py_str(value.header)}, {keys}, {py_str(value.type)})"
    raise TypeError(f"cannot render {value!r}")


def render_keyword(key: str, value: object, indent: int) -> list[str]:
    """Lines of `key=value,` in a call, exploded one item per line when too long."""
    pad = " " * indent
    inner = " " * (indent + 4)
    if isinstance(value, tuple):
        items = [py_value(item) for item in value]
        if not items:
            inline = "()"
        elif len(items) == 1:
            inline = f"({items[0]},)"
        else:
            inline = "(" + ", ".join(items) + ")"
        if len(pad) + len(key) + len(inline) + 2 <= LINE_LIMIT:
            return [f"{pad}{key}={inline},"]
        return [f"{pad}{key}=(", *(f"{inner}{item}," for item in items), f"{pad}),"]
    literal = py_value(value)
    if len(pad) + len(key) + len(literal) + 2 <= LINE_LIMIT or not isinstance(value, str):
        return [f"{pad}{key}={literal},"]
    chunks = split_string(value, LINE_LIMIT - len(inner) - 2)
    return [f"{pad}{key}=(", *(f"{inner}{py_str(chunk)}" for chunk in chunks), f"{pad}),"]


def split_string(text: str, width: int) -> list[str]:
    """Cut `text` into pieces of at most `width` characters, preferring cuts after a comma."""
    pieces: list[str] = []
    while len(text) > width:
        cut = text.rfind(",", 0, width) + 1
        if cut <= 0:
            cut = width
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


OPERATION_FIELDS = (
    "name",
    "verb",
    "path",
    "group",
    "path_params",
    "query_params",
    "request_kind",
    "required_fields",
    "body_fields",
    "file_fields",
    "multi_file_fields",
    "response_kind",
    "streams",
    "beta",
    "deprecated",
    "retired",
    "json_alternative",
    "json_required_fields",
    "example",
    "header_params",
)


def render_optable(operations: Sequence[Operation]) -> str:
    """The text of bridge/methods/table.py: the OPERATIONS tuple as ruff-formatted source."""
    lines = [
        f"# Generated by `{GENERATOR_COMMAND}` from {LATEST_SPEC_PATH}; do not edit.",
        f"# CI verifies it with `{GENERATOR_COMMAND} --check`.",
        '"""Every OpenAI REST operation the bridge knows, as `Operation` values (generated)."""',
        "",
        "from bridge.methods.model import HeaderParam, Operation, QueryParam",
        "",
        "OPERATIONS: tuple[Operation, ...] = (",
    ]
    for op in operations:
        lines.append("    Operation(")
        for field in OPERATION_FIELDS:
            lines.extend(render_keyword(field, getattr(op, field), 8))
        lines.append("    ),")
    lines.append(")")
    return "\n".join(lines) + "\n"


# --- rendering docs/methods.md ------------------------------------------------------------------


def section_title(group: str, seed_titles: Mapping[str, str]) -> str:
    """The seed's title for a seed group, else the slug in words ("Vector stores")."""
    if group in seed_titles:
        return seed_titles[group]
    words = group.replace("-", " ")
    return words[:1].upper() + words[1:]


def ordered_groups(operations: Sequence[Operation], seed_titles: Mapping[str, str]) -> list[str]:
    """Seed groups in the seed's order, then the others alphabetically."""
    present = {op.group for op in operations}
    seed_groups = [group for group in seed_titles if group in present]
    return seed_groups + sorted(present - set(seed_groups))


def render_methods_doc(operations: Sequence[Operation], seed_titles: Mapping[str, str]) -> str:
    """The text of docs/methods.md: intro, contents, then one section per group."""
    groups = ordered_groups(operations, seed_titles)
    by_group = {group: [op for op in operations if op.group == group] for group in groups}
    retired = sum(op.retired for op in operations)
    lines = [
        "# Methods",
        "",
        f"<!-- Generated by `{GENERATOR_COMMAND}`; do not edit by hand. -->",
        "",
        f"The bridge knows {len(operations)} methods: every operation of the current OpenAI REST",
        f"API, plus {retired} methods of the Assistants v1 API that OpenAI has since retired.",
        f"For an endpoint newer than this table, [`{CALL_ENDPOINT.name}`](#callendpoint) calls any",
        "path of the service host with the same envelope, streaming, retries and limits.",
        "",
        "A method's name is OpenAI's operationId, matched without regard to case. To call one,",
        "publish a JSON object to its request topic. Path parameters, query parameters and body",
        "fields all go at the top level of that object, file fields as base64; see",
        "[protocol.md](protocol.md) for envelopes, replies, errors and streaming. The topics",
        "below use the default prefix `openai`; `[/<suffix>]` stands for any extra topic levels",
        "you append to the request topic, which the reply and stream topics repeat.",
        "",
        "Each entry lists the HTTP call the method makes, its parameters and body fields (required",
        "ones marked), what the answer carries, and a minimal example payload with placeholder",
        "values. The methods of the node this bridge descends from come first, in its order.",
        "",
        "## Contents",
        "",
    ]
    generic_title = "Any endpoint"
    lines.append(f"- [{generic_title}](#{github_anchor(generic_title)}) (1)")
    for group in groups:
        title = section_title(group, seed_titles)
        lines.append(f"- [{title}](#{github_anchor(title)}) ({len(by_group[group])})")
    lines += ["", f"## {generic_title}", "", *operation_section(CALL_ENDPOINT)]
    for group in groups:
        lines += ["", f"## {section_title(group, seed_titles)}"]
        for op in by_group[group]:
            lines += ["", *operation_section(op)]
    return "\n".join(lines) + "\n"


def operation_section(op: Operation) -> list[str]:
    """The `### name` heading, summary and details of one method."""
    return [f"### `{op.name}`", "", summary(op) + ".", "", *describe_details(op)]


def github_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


# --- entry point --------------------------------------------------------------------------------


def generate_from(latest: specfacts.Spec, retired: specfacts.Spec) -> dict[str, str]:
    """Repo-relative path -> generated text, from the two parsed official documents."""
    facts = spec_facts(latest, retired)
    operations = build_operations(facts)
    for op in operations:
        example_payload(op)  # every example must parse as an object
    return {
        OPTABLE_PATH: render_optable(operations),
        METHODS_DOC_PATH: render_methods_doc(operations, seed_section_titles(facts)),
    }


def generate(repo_root: Path = REPO_ROOT, latest_spec: Path | None = None) -> dict[str, str]:
    """The generated texts from the documents in `repo_root`/spec/ (or `latest_spec` instead)."""
    latest = specfacts.load_spec(latest_spec or repo_root / LATEST_SPEC_PATH)
    return generate_from(latest, specfacts.load_spec(repo_root / RETIRED_SPEC_PATH))


def stale_files(generated: Mapping[str, str], repo_root: Path = REPO_ROOT) -> list[str]:
    """The generated paths whose file under `repo_root` is missing or differs."""
    stale = []
    for relative, text in generated.items():
        target = repo_root / relative
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            stale.append(relative)
    return stale


def write_files(generated: Mapping[str, str], repo_root: Path = REPO_ROOT) -> None:
    """Write each generated text to its path under `repo_root`."""
    for relative, text in generated.items():
        target = repo_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8", newline="\n")


def vendor_spec(source: Path, repo_root: Path = REPO_ROOT) -> str:
    """Copy `source` unmodified over spec/openapi-latest.yaml; return its sha256."""
    target = repo_root / LATEST_SPEC_PATH
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None, repo_root: Path = REPO_ROOT) -> int:
    """Command line: write the generated files, or with --check report the stale ones."""
    parser = argparse.ArgumentParser(
        prog=GENERATOR_COMMAND, description="Generate bridge/methods/table.py and docs/methods.md."
    )
    parser.add_argument(
        "--spec",
        type=Path,
        help=f"a newer official openapi.yaml: copied over {LATEST_SPEC_PATH}, then generated from"
        " (with --check: only compared against, nothing copied)",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.spec is not None and not args.spec.is_file():
        print(f"no such spec file: {args.spec}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(generate(repo_root, args.spec), repo_root)
        for relative in stale:
            print(f"{relative} differs from what {GENERATOR_COMMAND} generates", file=sys.stderr)
        return 1 if stale else 0
    if args.spec is not None:
        digest = vendor_spec(args.spec, repo_root)
        print(
            f"{LATEST_SPEC_PATH}: sha256 {digest}; record its commit and date in spec/README.md",
            file=sys.stderr,
        )
    write_files(generate(repo_root), repo_root)
    return 0
