"""Topic names: parse a request topic, derive its reply, stream and bridge-state topics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestTopic:
    """A parsed `<prefix>/request/<method>[/<suffix>]` topic."""

    method: str
    """The method level as published (any case); empty when the topic has none."""
    suffix: str
    """Everything after the method level, without the leading '/'; empty when absent."""
    reply: str
    """`<prefix>/response/<method>[/<suffix>]`: the request topic with `request` swapped."""
    stream: str
    """`<prefix>/stream/<method>[/<suffix>]`: where streamed events go."""
    preset: str | None = None
    """`<prefix>/ask/<preset>[/<suffix>]`: the preset named (method is then empty)."""


class Topics:
    """All topic names of one bridge instance, built once from the prefix and instance name."""

    def __init__(self, prefix: str, instance: str, shared_group: str = "") -> None:
        self.prefix = prefix
        self.instance = instance
        self._request_root = f"{prefix}/request"
        self._request_head = f"{prefix}/request/"
        self.request_filter = f"{prefix}/request/#"
        self.subscription = (
            f"$share/{shared_group}/{self.request_filter}" if shared_group else self.request_filter
        )
        self.response_filter = f"{prefix}/response/#"
        self._ask_head = f"{prefix}/ask/"
        self.ask_filter = f"{prefix}/ask/#"
        """Plain-text questions to presets (docs/tools.md#presets)."""
        self.ask_subscription = (
            f"$share/{shared_group}/{self.ask_filter}" if shared_group else self.ask_filter
        )
        base = f"{prefix}/bridge/{instance}"
        self._base = base
        self.state = f"{base}/state"
        self.info = f"{base}/info"
        self.stats = f"{base}/stats"
        self.audit = f"{base}/audit"
        """Where every executed tool call is reported (docs/tools.md)."""

    def probe(self, client_id: str) -> str:
        """The topic a client with this id checks a shared subscription with (never a request)."""
        return f"{self._base}/probe/{client_id}"

    def parse(self, topic: str) -> RequestTopic | None:
        """The parts of a request topic, or None when `topic` is not under `<prefix>/request` or
        `<prefix>/ask` (a preset question, answered on `<prefix>/answer/<preset>[/<suffix>]`)."""
        if topic.startswith(self._ask_head):
            preset, _, suffix = topic[len(self._ask_head) :].partition("/")
            tail = f"{preset}/{suffix}" if suffix else preset
            return RequestTopic(
                method="",
                suffix=suffix,
                reply=f"{self.prefix}/answer/{tail}",
                stream=f"{self.prefix}/stream/ask/{tail}",
                preset=preset,
            )
        if topic == self._request_root:
            rest = ""
        elif topic.startswith(self._request_head):
            rest = topic[len(self._request_head) :]
        else:
            return None
        method, _, suffix = rest.partition("/")
        tail = f"/{rest}" if topic != self._request_root else ""
        return RequestTopic(
            method=method,
            suffix=suffix,
            reply=f"{self.prefix}/response{tail}",
            stream=f"{self.prefix}/stream{tail}",
        )


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT filter `topic_filter` (`+` one level, `#` the rest).

    As brokers match: a filter starting with a wildcard never matches a `$` topic.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels, wanted = topic.split("/"), topic_filter.split("/")
    for i, part in enumerate(wanted):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(levels) == len(wanted)


def valid_filter(topic_filter: str) -> bool:
    """Whether `topic_filter` is a valid MQTT filter (`#` only last, wildcards whole levels)."""
    if not topic_filter or "\0" in topic_filter or len(topic_filter) > 65535:
        return False
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if "#" in part and (part != "#" or i != len(parts) - 1):
            return False
        if "+" in part and part != "+":
            return False
    return True
