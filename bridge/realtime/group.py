"""Realtime sessions in a group of bridge processes: which member owns which session.

A `$share` group hands each message to any member, but a session's upstream socket lives in one
process. So in a group (docs/scaling.md#realtime-sessions): an open reaches one member through
the shared subscription; that member claims the session name on `<prefix>/claim/<kind>/<session>`,
which every member reads plain; the broker hands every member the claims (and the sessions'
retained states) in one order, so every member sees the same first claim, and only its author
opens the session. The owner names itself (`member`) and the session's input topic
(`<prefix>/pinned/<member>/<kind>/<session>`, read by the owner alone) in the retained state. A
member that dies is seen by the others (its last will); the first of them whose reap claim
arrives publishes the session's `closed`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge.errors import BadSessionName
from bridge.realtime import model

PINNED_VERBS = ("event", "audio", "close")
"""What a device publishes on a grouped session's input topic (the open goes to the group)."""

MAX_KNOWN = 10_000
"""Sessions a member keeps track of (claims and states of the whole group); more are ignored."""


def member_name(instance: str, worker: int | None) -> str:
    """A member's name in topics: the instance, or `<instance>.<n>` for worker n."""
    return instance if worker is None else f"{instance}.{worker}"


def pinned_input(prefix: str, member: str, kind: str, session: str) -> str:
    """Where a device publishes a grouped session's event, audio and close (`<input>/<verb>`)."""
    return f"{prefix}/pinned/{member}/{kind}/{session}"


def classic_input(prefix: str, kind: str, session: str) -> str:
    """Where a device publishes a single bridge's session messages (`<input>/<verb>`)."""
    return f"{prefix}/request/{kind}/{session}"


def worker_will_topic(prefix: str, instance: str, worker: int) -> str:
    """Where worker `worker`'s last will (not retained) says it is gone."""
    return f"{prefix}/bridge/{instance}/workers/{worker}"


def subscriptions(prefix: str, member: str) -> list[tuple[str, int]]:
    """What a member reads beside the requests and the sessions' states."""
    return [
        (f"{prefix}/claim/+/+", 1),
        (f"{prefix}/pinned/{member}/#", 1),
        (f"{prefix}/bridge/+/state", 1),
        (f"{prefix}/bridge/+/workers/+", 1),
    ]


@dataclass(slots=True)
class Owner:
    """Who holds a session, as the group's messages say."""

    member: str
    instance: str
    state: dict[str, Any] | None = None
    """The latest retained state naming this owner (None while only claimed)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """One message on a claim topic: an open's claim, or a reap of a dead owner's session."""

    member: str
    instance: str
    nonce: str = ""
    reap: str = ""
    """The owner being reaped; empty for an open's claim."""
    reason: str = ""

    def encode(self) -> bytes:
        """The claim as JSON."""
        body = {"member": self.member, "instance": self.instance}
        if self.reap:
            body |= {"reap": self.reap, "reason": self.reason}
        else:
            body["nonce"] = self.nonce
        return json.dumps(body).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> Claim | None:
        """The claim in `payload`, None when it is none."""
        try:
            body = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        fields = {k: body.get(k, "") for k in ("member", "instance", "nonce", "reap", "reason")}
        if not all(isinstance(v, str) for v in fields.values()) or not fields["member"]:
            return None
        return cls(**fields)


class Group:
    """One member's view of the group's sessions: owners, dead members and instances."""

    def __init__(self, prefix: str, member: str, instance: str) -> None:
        self.prefix, self.member, self.instance = prefix, member, instance
        self.owners: dict[tuple[str, str], Owner] = {}
        self.dead_members: set[str] = set()
        self.dead_instances: set[str] = set()
        self._claims = f"{prefix}/claim/"
        self._pinned = f"{prefix}/pinned/{member}/"
        self._bridge = f"{prefix}/bridge/"

    def input_topic(self, kind: str, session: str) -> str:
        """This member's input topic for a session."""
        return pinned_input(self.prefix, self.member, kind, session)

    def claim_topic(self, kind: str, session: str) -> str:
        """Where the claims of a session go."""
        return f"{self._claims}{kind}/{session}"

    def kind_of(self, topic: str) -> str:
        """`claim`, `pinned`, `instance` (a bridge's state), `worker` (a worker's will) or ``."""
        if topic.startswith(self._claims):
            return "claim"
        if topic.startswith(self._pinned):
            return "pinned"
        if topic.startswith(self._bridge):
            parts = topic[len(self._bridge) :].split("/")
            if len(parts) == 2 and parts[1] == "state":
                return "instance"
            if len(parts) == 3 and parts[1] == "workers":
                return "worker"
        return ""

    def parse_claim_topic(self, topic: str) -> tuple[str, str] | None:
        """The (kind, session) a claim topic names, None when it names none."""
        kind, _, session = topic[len(self._claims) :].partition("/")
        if kind in model.KINDS and model.valid_session(session):
            return kind, session
        return None

    def parse_pinned(self, topic: str) -> model.RealtimeTopic:
        """The parts of one of this member's input topics; raises BadSessionName."""
        parts = topic[len(self._pinned) :].split("/")
        if len(parts) != 3 or parts[0] not in model.KINDS or parts[2] not in PINNED_VERBS:
            raise BadSessionName(
                f"a session's input topics are {self._pinned}<kind>/<session>/"
                f"{{{'|'.join(PINNED_VERBS)}}}: got {topic[:200]!r}"
            )
        if not model.valid_session(parts[1]):
            raise BadSessionName(f"session name {parts[1][:80]!r} is not a session name")
        return model.RealtimeTopic(*parts)

    def kind_in(self, topic: str) -> str:
        """The kind level of a request or input topic that names no usable session."""
        for head in (f"{self.prefix}/request/", self._pinned):
            if topic.startswith(head):
                kind = topic[len(head) :].partition("/")[0]
                return kind if kind in model.KINDS else "realtime"
        return "realtime"

    def owned_by(self, member: str = "", instance: str = "") -> list[tuple[tuple[str, str], Owner]]:
        """The sessions held by `member`, or by any member of `instance`."""
        return [
            (key, owner)
            for key, owner in self.owners.items()
            if owner.member == member or (instance and owner.instance == instance)
        ]

    def own(self, key: tuple[str, str], owner: Owner) -> None:
        """Record `owner` for `key` (within MAX_KNOWN sessions)."""
        if key in self.owners or len(self.owners) < MAX_KNOWN:
            self.owners[key] = owner
