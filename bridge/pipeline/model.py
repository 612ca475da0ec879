"""Values and ports the pipeline's stages share: what a journal offers the pipeline.

The journal itself (bridge/journal/) implements `JournalLike`; the pipeline never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

MISSING: Any = object()
"""Marks a request without a `transaction` key (null is a valid transaction)."""

Scope = Literal["off", "jobs", "answers"]
"""What the journal records: nothing, waited jobs only, or answers too."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What the journal holds for one request key."""

    key: bytes
    created: float
    """Wall-clock time (Unix seconds) of the first record for this key."""
    reply_topic: str
    answer: bytes | None
    """The reply payload as published, once the answer arrived."""
    content_type: str | None
    """The reply's MQTT 5 Content Type (plain and raw formats), None for the JSON envelope."""
    job: dict[str, Any] | None
    """A waited job: at least `operation` and `id`, once the job was created."""
    waiting: bool = False
    """A detached wait (its request acknowledged) whose reply is not out yet."""


class JournalLike(Protocol):
    """What the pipeline uses of a journal: SQLite (`Journal`) or PostgreSQL (`PgJournal`)."""

    scope: Scope
    max_answer_bytes: int
    recent: frozenset[bytes] | None
    """Keys answered within the dedup window before this start (a repeat of anything newer is
    in the reply cache); None: any repeat may be in the journal (one shared by a group)."""

    async def lookup(self, key: bytes) -> JournalEntry | None:
        """The journaled entry for `key` (None when absent, too old, or on a read error)."""

    async def record_answer(
        self, key: bytes, reply_topic: str, answer: bytes, content_type: str | None = None
    ) -> bool:
        """Commit an answer before its reply goes out; False when it was not journaled."""

    async def record_job(
        self,
        key: bytes,
        reply_topic: str,
        job: Mapping[str, Any],
        owner: str | None = None,
        lease_until: float = 0.0,
    ) -> bool:
        """Commit a waited job's state; False when not journaled. With `owner`, the entry becomes
        a detached wait held by `owner` until `lease_until` (wall clock)."""

    async def claim_waits(
        self, owner: str, lease_until: float, key: bytes | None = None, limit: int | None = None
    ) -> list[JournalEntry] | None:
        """Take the detached waits (only `key`'s when given) that nobody holds, `owner` holds,
        or whose holder's lease ran out, `owner`'s own first, at most `limit`; those taken
        (None on a journal error)."""

    async def renew_waits(self, owner: str, lease_until: float) -> frozenset[bytes] | None:
        """Extend `owner`'s leases; the keys it still holds (None on a journal error)."""

    async def end_wait(self, key: bytes, owner: str, *, delivered: bool) -> bool:
        """Mark `key`'s detached wait answered (`delivered`), or only give it up for another
        process or a later scan to finish."""

    async def begin_attempt(
        self, key: bytes, reply_topic: str, *, redelivered: bool = False
    ) -> int | None:
        """Commit one more start of `key`'s upstream call before it is made; the number of
        starts not yet settled, this one included, those of any process sharing the journal
        counted at least for a `redelivered` request (None when not journaled)."""

    async def settle_attempt(self, key: bytes) -> bool:
        """Record that `key`'s request was answered (its starts no longer count)."""

    async def close(self) -> None:
        """Finish and close; later calls answer as if there were no journal."""


@dataclass(frozen=True, slots=True)
class Observed:
    """One answered request, for an observer such as the web console (payloads as published)."""

    method: str
    suffix: str
    transaction: Any
    """The request's `transaction`, None when it had none."""
    code: str | None
    """The error code of an error reply, None for a success."""
    http_status: int | None
    duration_ms: float
    request_head: bytes
    """The request payload's first bytes, as the device sent them."""
    request_size: int
    reply: bytes
    """The reply payload as published (redacted), or its first bytes (`reply_size` says all)."""
    reply_type: str | None
    reply_size: int | None = None
    """The whole reply's size when `reply` holds only its first bytes."""
