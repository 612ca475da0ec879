"""The vendored official OpenAPI documents (spec/), read directly, independent of the generator."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = REPO_ROOT / "spec"
LATEST = "openapi-latest.yaml"
RETIRED = "openapi-2024-02.yaml"
VERBS = ("get", "post", "delete", "put", "patch")
_BETA_IN_EXAMPLES = re.compile(r"OpenAI-Beta: ([A-Za-z0-9_.=-]+)")


@functools.cache
def document(name: str) -> dict[str, Any]:
    """One vendored document, parsed once per test process."""
    text = (SPEC_DIR / name).read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return loaded


def deref(spec: dict[str, Any], node: Any) -> Any:
    """`node` with its local `$ref` chain followed."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = spec
        for key in node["$ref"].removeprefix("#/").split("/"):
            target = target[key.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


@functools.cache
def operations(name: str) -> dict[str, dict[str, Any]]:
    """operationId -> method, path, parameters by location, example beta header, request types."""
    spec = document(name)
    found: dict[str, dict[str, Any]] = {}
    for path, item in spec["paths"].items():
        for verb in VERBS:
            op = item.get(verb)
            if not isinstance(op, dict):
                continue
            params: dict[str, dict[str, dict[str, Any]]] = {"path": {}, "query": {}, "header": {}}
            for param in [*item.get("parameters", []), *op.get("parameters", [])]:
                param = deref(spec, param)
                params.setdefault(param["in"], {})[param["name"]] = param
            examples = (op.get("x-oaiMeta") or {}).get("examples", "")
            betas = _BETA_IN_EXAMPLES.findall(json.dumps(examples, default=str))
            body = deref(spec, op.get("requestBody")) or {}
            found[op["operationId"]] = {
                "method": verb.upper(),
                "path": path,
                "path_params": list(params["path"]),
                "query_params": params["query"],
                "header_params": params["header"],
                "beta_header": sorted(set(betas)),
                "request_content_types": list(body.get("content", {})),
                "body": body,
            }
    return found


def operation(op_id: str) -> dict[str, Any]:
    """An operation of the current document, else of the 2024-02 one (retired seed methods)."""
    return operations(LATEST).get(op_id) or operations(RETIRED)[op_id]


def is_retired(op_id: str) -> bool:
    """Whether `op_id` exists only in the 2024-02 document."""
    return op_id not in operations(LATEST)
