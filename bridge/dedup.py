"""A bounded, time-limited cache of recent replies, for answering redelivered requests."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


def request_key(topic: str, payload: bytes) -> int:
    """The identity of a request: a 64-bit hash of its topic and exact payload bytes.

    Python's own (SipHash) hash: several times cheaper than a cryptographic digest, and with at
    most a few thousand entries a collision is about as likely as a cosmic-ray bit flip.
    """
    return hash((topic, payload))


class ReplyCache:
    """Remembers at most `entries` replies (and `max_bytes` of them) for `seconds` each."""

    def __init__(
        self,
        entries: int,
        seconds: float,
        max_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.entries = entries
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._clock = clock
        self._size = 0
        self._items: OrderedDict[int, tuple[float, str, bytes, str | None]] = OrderedDict()

    def get(self, key: int) -> tuple[str, bytes, str | None] | None:
        """The (reply topic, reply payload, MQTT 5 content type) stored for `key`, if fresh."""
        item = self._items.get(key)
        if item is None:
            return None
        expires, topic, payload, content_type = item
        if expires < self._clock():
            self._drop(key)
            return None
        return topic, payload, content_type

    def put(self, key: int, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """Store a reply (unless larger than a quarter of the budget), evicting the oldest."""
        if self.entries <= 0 or self.seconds <= 0 or len(payload) > self.max_bytes // 4:
            return
        now = self._clock()
        if key in self._items:
            self._drop(key)
        self._items[key] = (now + self.seconds, topic, payload, content_type)
        self._size += len(payload)
        while self._items:
            oldest_key, (expires, _, _, _) = next(iter(self._items.items()))
            if len(self._items) > self.entries or self._size > self.max_bytes or expires < now:
                self._drop(oldest_key)
            else:
                break

    def _drop(self, key: int) -> None:
        _, _, payload, _ = self._items.pop(key)
        self._size -= len(payload)

    def __len__(self) -> int:
        return len(self._items)
