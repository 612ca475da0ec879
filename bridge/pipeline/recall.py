"""The recall stage: answer a repeated or redelivered request from the reply cache or the journal.

A redelivery (DUP) is answered from the cache, else from the journal whatever its age (the
answer was paid for before a crash). A repeat of a request that carries a `transaction` is
answered within the dedup window: from the cache, or from the journal when it was answered in
that window before this start. Nothing here calls the service host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge.messages import InboundMessage
from bridge.pipeline.dedup import ReplyCache, request_key
from bridge.pipeline.model import MISSING, JournalLike


@dataclass(frozen=True, slots=True)
class Recalled:
    """A reply given before: its payload, its content type, and where it came from."""

    payload: bytes
    content_type: str | None
    source: str
    """`cache` or `journal`."""


class Recall:
    """Finds the reply a request already had; keeps the journal's answers in the cache."""

    def __init__(
        self,
        cache: ReplyCache,
        journal: JournalLike | None,
        dedup_seconds: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.journal = journal
        self._dedup_seconds = dedup_seconds
        self._wall_clock = wall_clock

    def key(self, message: InboundMessage) -> bytes | None:
        """The request's key, or None when nothing is remembered (no cache, no journal)."""
        if self.cache.entries > 0 or self.journal is not None:
            return request_key(message.topic, message.payload)
        return None

    def redelivered(self, key: bytes | None, message: InboundMessage) -> Recalled | None:
        """The cached reply of a redelivered request (before it is even decided)."""
        if key is None or not message.dup:
            return None
        return self._cached(key)

    async def repeated(
        self,
        key: bytes | None,
        message: InboundMessage,
        reply_topic: str,
        transaction: object,
        *,
        journaled: bool,
    ) -> Recalled | None:
        """The reply a repeat (same `transaction`) or a redelivery already had; the journal is
        asked only when `journaled` (a call, not a rejection)."""
        if key is None:
            return None
        if transaction is not MISSING and (cached := self._cached(key)) is not None:
            return cached
        if not journaled or not (
            message.dup or (transaction is not MISSING and self._maybe_journaled(key))
        ):
            return None
        found = await self._journaled(key, message.dup)
        if found is not None:
            self.cache.put(key, reply_topic, found.payload, found.content_type)
        return found

    def _cached(self, key: bytes) -> Recalled | None:
        cached = self.cache.get(key)
        return None if cached is None else Recalled(cached[1], cached[2], "cache")

    def _maybe_journaled(self, key: bytes) -> bool:
        """Whether a repeat (not a redelivery) may have its answer in the journal but not the cache.

        A repeat consults the journal only when its key was answered in the dedup window before
        this start: anything answered since is in the reply cache, and a disk lookup for every
        request that carries a transaction would cost a thread round trip each. A journal
        shared by a group (`recent` None) is always consulted: another member may have answered.
        """
        recent = self.journal.recent if self.journal is not None else frozenset()
        return recent is None or key in recent

    async def _journaled(self, key: bytes, dup: bool) -> Recalled | None:
        """The journaled reply for a redelivered (any age) or repeated (dedup window) request."""
        if self.journal is None:
            return None
        entry = await self.journal.lookup(key)
        if entry is None or entry.answer is None:
            return None
        if not dup and entry.created < self._wall_clock() - self._dedup_seconds:
            return None  # a repeat, not a redelivery: the reply cache's window applies
        return Recalled(entry.answer, entry.content_type, "journal")
