"""Which operations devices may call: allow/deny glob patterns from `[access]`."""

from __future__ import annotations

import fnmatch


class AccessRules:
    """Allow/deny glob patterns over operationIds (case-insensitive)."""

    def __init__(self, allow: list[str], deny: list[str]) -> None:
        self.allow = [p.lower() for p in allow]
        self.deny = [p.lower() for p in deny]
        self._verdicts: dict[str, bool] = {}  # per operation name: at most a few hundred

    def allows(self, name: str) -> bool:
        """Whether devices may call the operation `name`."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            key = name.lower()
            verdict = not any(fnmatch.fnmatchcase(key, p) for p in self.deny) and any(
                fnmatch.fnmatchcase(key, p) for p in self.allow
            )
            self._verdicts[name] = verdict
        return verdict
