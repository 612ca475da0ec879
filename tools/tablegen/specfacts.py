"""Facts the table generator needs, read from an official OpenAPI document (3.0 or 3.1).

Development-time only: `tools/tablegen/generate.py` imports it, the daemon never does, and PyYAML
(the `test` extra) is imported when a YAML file is read. Only local `#/...` references are resolved.
For every operation it records: operationId, verb, path, tags, x-oaiMeta group, deprecated flag,
path/query/header parameters, the `OpenAI-Beta` header its curl examples show (the specs do not
declare that header on most operations), request contents (kind, required and known top-level
fields, file fields, file fields that also take an array of files) and success responses.

The seed (the 50 methods of @inductiv/node-red-openai-api 0.3.9, the node this project descends
from) is written out below: its groups in the node's order and a minimal example per method.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

BETA_RE = re.compile(r"OpenAI-Beta: ([A-Za-z0-9_.=-]+)")
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
MAX_DEPTH = 20

Spec = dict[str, Any]
OpFacts = dict[str, Any]

# The seed's method <option>s, by optgroup, in the node's order (node.html of 0.3.9).
SEED_GROUPS: tuple[tuple[str, str], ...] = (
    (
        "Assistants (Beta)",
        "createAssistant getAssistant modifyAssistant deleteAssistant listAssistants "
        "listAssistantFiles createAssistantFile getAssistantFile deleteAssistantFile",
    ),
    ("Audio", "createSpeech createTranscription createTranslation"),
    ("Chat", "createChatCompletion"),
    ("Embeddings", "createEmbedding"),
    (
        "Fine-tuning",
        "createFineTuningJob listPaginatedFineTuningJobs retrieveFineTuningJob "
        "listFineTuningEvents cancelFineTuningJob",
    ),
    ("Files", "listFiles createFile deleteFile retrieveFile downloadFile"),
    ("Images", "createImage createImageEdit createImageVariation"),
    (
        "Messages (Beta)",
        "listMessages createMessage getMessage modifyMessage listMessageFiles getMessageFile",
    ),
    ("Models", "listModels retrieveModel deleteModel"),
    ("Moderations", "createModeration"),
    (
        "Runs (Beta)",
        "createThreadAndRun listRuns createRun getRun modifyRun submitToolOuputsToRun "
        "cancelRun listRunSteps getRunStep",
    ),
    ("Threads (Beta)", "createThread getThread modifyThread deleteThread"),
)

# A minimal request each seed method accepts: JSON body, query and form values, file fields.
SEED_EXAMPLES: dict[str, dict[str, Any]] = {
    "createAssistant": {"json": {"model": "gpt-4"}},
    "modifyAssistant": {"json": {"name": "x"}},
    "listAssistants": {"query": {"limit": 2, "order": "desc"}},
    "createAssistantFile": {"json": {"file_id": "file-1"}},
    "createSpeech": {"json": {"model": "tts-1", "input": "hi", "voice": "alloy"}},
    "createTranscription": {"form": {"model": "whisper-1"}, "files": ["file"]},
    "createTranslation": {"form": {"model": "whisper-1"}, "files": ["file"]},
    "createChatCompletion": {
        "json": {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    },
    "createEmbedding": {"json": {"model": "text-embedding-3-small", "input": "hi"}},
    "createFineTuningJob": {"json": {"model": "gpt-3.5-turbo", "training_file": "file-1"}},
    "listPaginatedFineTuningJobs": {"query": {"limit": 2}},
    "listFineTuningEvents": {"query": {"limit": 2}},
    "listFiles": {"query": {"purpose": "fine-tune"}},
    "createFile": {"form": {"purpose": "fine-tune"}, "files": ["file"]},
    "createImage": {"json": {"prompt": "a cat"}},
    "createImageEdit": {"form": {"prompt": "a hat"}, "files": ["image"]},
    "createImageVariation": {"form": {"n": "1"}, "files": ["image"]},
    "createMessage": {"json": {"role": "user", "content": "hi"}},
    "modifyMessage": {"json": {"metadata": {"k": "v"}}},
    "createModeration": {"json": {"input": "hi"}},
    "createThreadAndRun": {
        "json": {
            "assistant_id": "asst_1",
            "thread": {"messages": [{"role": "user", "content": "hi"}]},
        }
    },
    "createRun": {"json": {"assistant_id": "asst_1"}},
    "modifyRun": {"json": {"metadata": {"k": "v"}}},
    "submitToolOuputsToRun": {
        "json": {"tool_outputs": [{"tool_call_id": "call_1", "output": "42"}]}
    },
    "createThread": {"json": {}},
    "modifyThread": {"json": {"metadata": {"k": "v"}}},
}


def seed_methods() -> dict[str, dict[str, Any]]:
    """Seed method name -> {"seed_group", "example"}, in the seed's order."""
    return {
        name: {"seed_group": group, "example": SEED_EXAMPLES.get(name)}
        for group, names in SEED_GROUPS
        for name in names.split()
    }


def load_spec(path: Path) -> Spec:
    """The parsed OpenAPI document at `path` (YAML, or JSON when it ends in .json)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        loaded: Any = json.loads(text)
    else:
        import yaml  # development-only dependency (the `test` extra)

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        loaded = yaml.load(text, Loader=loader)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("paths"), dict):
        raise ValueError(f"{path}: not an OpenAPI document (no `paths` object)")
    return loaded


class Resolver:
    """Follows local `$ref`s and reads top-level facts of (possibly composed) schemas."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    def lookup(self, ref: str) -> Any:
        """The node a local reference such as `#/components/schemas/X` points at."""
        if not ref.startswith("#/"):
            raise ValueError(f"only local refs are supported: {ref!r}")
        node: Any = self.spec
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def deref(self, node: Any) -> Any:
        """Follow a chain of `$ref` until a node without one (stops on a cycle)."""
        seen: set[str] = set()
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            if ref in seen:
                break
            seen.add(ref)
            node = self.lookup(ref)
        return node

    def required(self, schema: Any, depth: int = 0) -> list[str]:
        """Required top-level properties: allOf parts united, oneOf/anyOf alternatives shared."""
        schema = self.deref(schema)
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return []
        names = list(schema.get("required") or [])
        for part in schema.get("allOf") or []:
            for name in self.required(part, depth + 1):
                if name not in names:
                    names.append(name)
        alternatives = schema.get("oneOf") or schema.get("anyOf")
        if alternatives:
            sets = [set(self.required(alt, depth + 1)) for alt in alternatives]
            for name in sorted(set.intersection(*sets)):
                if name not in names:
                    names.append(name)
        return names

    def properties(self, schema: Any, depth: int = 0) -> list[str]:
        """Top-level property names, including those of allOf/oneOf/anyOf parts."""
        schema = self.deref(schema)
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return []
        names = list((schema.get("properties") or {}).keys())
        for key in ("allOf", "oneOf", "anyOf"):
            for part in schema.get(key) or []:
                for name in self.properties(part, depth + 1):
                    if name not in names:
                        names.append(name)
        return names

    def binary_fields(self, schema: Any, depth: int = 0) -> list[str]:
        """Top-level properties that carry files (format binary), for multipart bodies."""
        schema = self.deref(schema)
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return []
        names = [
            name
            for name, prop in (schema.get("properties") or {}).items()
            if self.is_binary(prop, depth + 1)
        ]
        for key in ("allOf", "oneOf", "anyOf"):
            for part in schema.get(key) or []:
                for name in self.binary_fields(part, depth + 1):
                    if name not in names:
                        names.append(name)
        return names

    def is_binary(self, prop: Any, depth: int) -> bool:
        """A file, an array of files, or a composition with such a variant."""
        prop = self.deref(prop)
        if not isinstance(prop, dict) or depth > MAX_DEPTH:
            return False
        if prop.get("format") == "binary":
            return True
        if prop.get("contentMediaType") == "application/octet-stream":
            return True
        if prop.get("type") == "array" and "items" in prop:
            return self.is_binary(prop["items"], depth + 1)
        return any(
            self.is_binary(part, depth + 1)
            for key in ("allOf", "oneOf", "anyOf")
            for part in prop.get(key) or []
        )

    def array_file_fields(self, schema: Any) -> list[str]:
        """Top-level properties with an array-of-files variant (send several files)."""
        schema = self.deref(schema)
        if not isinstance(schema, dict):
            return []
        names = []
        for name, prop in (schema.get("properties") or {}).items():
            prop = self.deref(prop)
            alternatives = prop.get("anyOf", []) + prop.get("oneOf", [])
            variants = [prop, *(self.deref(p) for p in alternatives)]
            if any(
                isinstance(v, dict)
                and v.get("type") == "array"
                and self.deref(v.get("items", {})).get("format") == "binary"
                for v in variants
            ):
                names.append(name)
        return names


def classify_request(content_type: str) -> str:
    """json, multipart, form or binary for a request content type (else the type itself)."""
    ct = content_type.lower()
    if ct == "application/json" or ct.endswith("+json"):
        return "json"
    if ct.startswith("multipart/form-data"):
        return "multipart"
    if ct == "application/x-www-form-urlencoded":
        return "form"
    if ct == "application/octet-stream":
        return "binary"
    return ct


def classify_response(content_type: str, schema: Any) -> str:
    """sse, binary, json or text for a response content type (else the type itself)."""
    ct = content_type.lower()
    if ct == "text/event-stream":
        return "sse"
    if ct.startswith(("audio/", "image/", "video/")) or ct == "application/octet-stream":
        return "binary"
    if ct == "application/json" or ct.endswith("+json"):
        if (
            isinstance(schema, dict)
            and schema.get("type") == "string"
            and schema.get("format") == "binary"
        ):
            return "binary"
        return "json"
    if ct.startswith("text/"):
        return "text"
    return ct


def parameter_facts(resolver: Resolver, param: Any) -> tuple[str, dict[str, Any]]:
    """(location, {name, required, type?, sdk_name?}) of one parameter object."""
    param = resolver.deref(param)
    schema = resolver.deref(param.get("schema") or {})
    facts: dict[str, Any] = {"name": param.get("name"), "required": bool(param.get("required"))}
    if isinstance(schema, dict):
        if schema.get("type") is not None:
            facts["type"] = schema["type"]
        if schema.get("x-stainless-param"):
            facts["sdk_name"] = schema["x-stainless-param"]
    return str(param.get("in")), facts


def request_facts(resolver: Resolver, body: Any) -> dict[str, Any] | None:
    """The request body's contents (kind, required/known/file fields), or None without a body."""
    body = resolver.deref(body) if body else None
    if not body:
        return None
    contents = []
    for content_type, media in (body.get("content") or {}).items():
        schema = (media or {}).get("schema", {})
        entry: dict[str, Any] = {
            "content_type": content_type,
            "kind": classify_request(content_type),
            "required_fields": resolver.required(schema),
            "fields": resolver.properties(schema),
        }
        if entry["kind"] == "multipart":
            entry["file_fields"] = resolver.binary_fields(schema)
            entry["array_file_fields"] = resolver.array_file_fields(schema)
        contents.append(entry)
    return {"required": bool(body.get("required")), "content": contents}


def response_facts(resolver: Resolver, responses: Any) -> list[dict[str, Any]]:
    """Status, content type and kind of each 2xx or default response."""
    found: list[dict[str, Any]] = []
    for code, response in (responses or {}).items():
        status = str(code)
        if not (status.startswith("2") or status == "default"):
            continue
        content = (resolver.deref(response) or {}).get("content") or {}
        if not content:
            found.append({"status": status, "content_type": None, "kind": "empty"})
        for content_type, media in content.items():
            schema = resolver.deref((media or {}).get("schema", {}))
            found.append(
                {
                    "status": status,
                    "content_type": content_type,
                    "kind": classify_response(content_type, schema),
                }
            )
    return found


def extract_operations(spec: Spec) -> list[OpFacts]:
    """Facts of every operation, sorted by path then HTTP method."""
    resolver = Resolver(spec)
    operations: list[OpFacts] = []
    for path, item in (spec.get("paths") or {}).items():
        item = resolver.deref(item)
        shared_params = item.get("parameters") or []
        for method in HTTP_METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            merged: dict[tuple[str, str], dict[str, Any]] = {}
            for param in [*shared_params, *(op.get("parameters") or [])]:
                where, facts = parameter_facts(resolver, param)
                merged[(where, facts["name"])] = facts  # operation level overrides path level
            by_location: dict[str, list[dict[str, Any]]] = {"path": [], "query": [], "header": []}
            for (where, _), facts in merged.items():
                by_location.setdefault(where, []).append(facts)
            meta = op.get("x-oaiMeta") or {}
            examples = json.dumps(meta.get("examples", ""), default=str)
            betas = sorted(set(BETA_RE.findall(examples)))
            operations.append(
                {
                    "operationId": op.get("operationId"),
                    "method": method.upper(),
                    "path": path,
                    "tags": op.get("tags") or [],
                    "group": meta.get("group"),
                    "deprecated": bool(op.get("deprecated") or meta.get("deprecated")),
                    "path_params": [p["name"] for p in by_location["path"]],
                    "query_params": by_location["query"],
                    "header_params": by_location["header"],
                    "beta_header": ("OpenAI-Beta: " + ", ".join(betas)) if betas else None,
                    "request": request_facts(resolver, op.get("requestBody")),
                    "responses": response_facts(resolver, op.get("responses")),
                }
            )
    operations.sort(key=lambda o: (o["path"], HTTP_METHODS.index(o["method"].lower())))
    return operations
