"""What devices may make the bridge do (`[access]`): which operations, which reply topics."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from bridge.methods.model import MethodTable
from bridge.topics import Topics, filter_matches


def pattern_problems(allow: Sequence[str], deny: Sequence[str], table: MethodTable) -> list[str]:
    """One config problem per `[access]` pattern that matches no method (a typo would otherwise
    allow or deny nothing, silently), with the closest method names."""
    names = [op.name.lower() for op in (*table.operations, *table.extra)]
    problems = []
    for option, patterns in (("allow_methods", allow), ("deny_methods", deny)):
        for pattern in patterns:
            if any(fnmatch.fnmatchcase(name, pattern.lower()) for name in names):
                continue
            close = table.suggest(pattern.strip("*?"))
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            problems.append(f"access.{option}: {pattern!r} matches no method{hint}")
    return problems


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


class ReplyTopicRules:
    """Where an MQTT 5 Response Topic may send a reply.

    By default only to the requester's own reply topics: under `<prefix>/response/<method>/`
    followed by the request topic's suffix (the levels a broker ACL ties to a device, e.g.
    `edge/response/+/%u/#`), so no device can have the bridge forge another's answer. Filters in
    `[access] reply_topics` add more. Never the bridge's request, state or discovery topics, nor a
    `$` topic, whatever the filters say.
    """

    def __init__(
        self, topics: Topics, extra: Sequence[str] = (), protected: Sequence[str] = ()
    ) -> None:
        self.response_head = f"{topics.prefix}/response/"
        self.extra = tuple(extra)
        self.protected = (
            topics.request_filter,
            topics.ask_filter,
            f"{topics.prefix}/bridge/#",
            *protected,
        )

    def allows(self, topic: str, suffix: str) -> bool:
        """Whether the bridge may publish the reply to a request with `suffix` on `topic`."""
        if topic.startswith("$") or any(filter_matches(f, topic) for f in self.protected):
            return False
        if any(filter_matches(f, topic) for f in self.extra):
            return True
        if not topic.startswith(self.response_head):
            return False
        own = suffix.split("/") if suffix else []
        return topic[len(self.response_head) :].split("/")[1 : 1 + len(own)] == own
