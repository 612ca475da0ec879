"""A bounded, time-limited cache of recent replies, for answering redelivered requests."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable


def request_key(topic: str, payload: bytes) -> bytes:
    """The identity of a request: a 128-bit BLAKE2b digest of its topic and exact payload bytes.

    Stable across processes and hosts (Python's own `hash` is salted per process), because the
    on-disk journal and other instances of a shared group look requests up by it.
    """
    digest = hashlib.blake2b(topic.encode("utf-8", "surrogatepass"), digest_size=16)
    digest.update(b"\0")
    digest.update(payload)
    return digest.digest()


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
        self._items: OrderedDict[bytes, tuple[float, str, bytes, str | None]] = OrderedDict()

    def get(self, key: bytes) -> tuple[str, bytes, str | None] | None:
        """The (reply topic, reply payload, MQTT 5 content type) stored for `key`, if fresh."""
        item = self._items.get(key)
        if item is None:
            return None
        expires, topic, payload, content_type = item
        if expires < self._clock():
            self._drop(key)
            return None
        return topic, payload, content_type

    def put(self, key: bytes, topic: str, payload: bytes, content_type: str | None = None) -> None:
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

    def _drop(self, key: bytes) -> None:
        _, _, payload, _ = self._items.pop(key)
        self._size -= len(payload)

    def __len__(self) -> int:
        return len(self._items)
