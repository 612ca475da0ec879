"""What secret scrubbing costs per reply and per stream event: `python bench/redact.py [TREE]`.

TREE (default: this checkout) is a folder holding a `bridge/redact.py`, e.g. a worktree of an
older commit, so two versions can be compared on the same machine (best of 15 rounds each).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

SECRETS = ["sk-test-SECRET-4f7c2a9e8b1d", "gw-token-0b7d3e19aa"]
REPLY_1KB = json.dumps({"choices": [{"message": {"content": "The answer is 42. " * 50}}]}).encode()
REPLY_1MIB = base64.b64encode(os.urandom(786432))
EVENT: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion.chunk",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}],
}


def load(tree: Path) -> ModuleType:
    """`bridge/redact.py` of `tree`, imported on its own."""
    spec = importlib.util.spec_from_file_location("redact_under_test", tree / "bridge/redact.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best(run: Any, number: int) -> float:
    """Seconds per call, the best of 15 rounds."""
    return min(timeit.repeat(run, number=number, repeat=15)) / number


def main() -> None:
    tree = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    redact = load(tree)
    redactor = redact.Redactor(SECRETS)
    print(f"{tree}: two secrets")
    print(f"  1 KB JSON reply     {best(lambda: redactor.data(REPLY_1KB), 2000) * 1e6:8.2f} us")
    print(f"  1 MiB base64 reply  {best(lambda: redactor.data(REPLY_1MIB), 5) * 1e3:8.2f} ms")
    print(f"  chat delta event    {best(lambda: redactor.any(EVENT), 2000) * 1e6:8.2f} us (any)")
    if hasattr(redact, "StreamScrubber"):
        scrubber = redact.StreamScrubber(redactor)
        per_event = best(lambda: scrubber.any(EVENT), 2000)
        print(f"  chat delta event    {per_event * 1e6:8.2f} us (stream)")


if __name__ == "__main__":
    main()
