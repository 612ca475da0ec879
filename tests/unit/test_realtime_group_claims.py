"""A group member's claim rules (bridge/realtime/manager.py in a group), with the broker's one
order of claims played by hand: who opens, who answers, who publishes a dead owner's `closed`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog

from bridge.config import BridgeConfig
from bridge.messages import InboundMessage
from bridge.realtime import group
from bridge.realtime.manager import RealtimeManager

P = "p"


class Recorder:
    """A publisher that keeps what was published and acknowledges at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, **kw: Any) -> asyncio.Future[None]:
        self.sent.append((topic, payload, bool(kw.get("retain"))))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def ack(self, message: InboundMessage) -> None:
        """Nothing to acknowledge."""

    def claims(self) -> list[group.Claim]:
        return [
            c
            for t, b, _ in self.sent
            if t.startswith(f"{P}/claim/") and (c := group.Claim.decode(b)) is not None
        ]


class Noting(RealtimeManager):
    """A member whose won sessions are only noted (no upstream socket)."""

    started: list[str]

    def _start(self, parsed: Any, options: Any, offered: Any) -> None:
        self.started.append(parsed.session)


def member(name: str) -> tuple[RealtimeManager, Recorder, list[str]]:
    """A member, what it publishes, and the sessions it opened."""
    config = BridgeConfig.model_validate({"mqtt": {"topic_prefix": P, "instance": name}})
    sent = Recorder()
    manager = Noting(
        config=config,
        publisher=sent,  # type: ignore[arg-type]
        connector=None,  # type: ignore[arg-type]
        log=structlog.get_logger(),
        member=name,
    )
    manager.started = []
    return manager, sent, manager.started


def message(topic: str, payload: Any = b"", retain: bool = False) -> InboundMessage:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return InboundMessage(topic, body, 1, retain, False, 1, 1)


def deliver(claims: list[group.Claim], *members: RealtimeManager) -> None:
    """Hand every member the same claims in the same order (what the broker does)."""
    for claim in claims:
        for m in members:
            m.submit(message(f"{P}/claim/realtime/s", claim.encode()))


async def test_of_two_opens_of_one_name_the_first_claim_opens_and_the_other_is_refused() -> None:
    east, east_sent, east_started = member("east")
    west, west_sent, west_started = member("west")
    east.submit(message(f"{P}/request/realtime/s/open"))
    west.submit(message(f"{P}/request/realtime/s/open"))
    deliver(east_sent.claims() + west_sent.claims(), east, west)
    assert (east_started, west_started) == (["s"], [])
    errors = [json.loads(b)["code"] for t, b, _ in west_sent.sent if t.endswith("/s/error")]
    assert errors == ["session_exists"]
    assert not any(t.endswith("/error") for t, _, _ in east_sent.sent)
    # Both now know the owner: a third open is refused at once, without a claim.
    west.submit(message(f"{P}/request/realtime/s/open"))
    assert len(west_sent.claims()) == 1
    # Old-topic audio names the owner's input topic.
    west.submit(message(f"{P}/request/realtime/s/audio", b"\0\0"))
    refused = json.loads(west_sent.sent[-1][1])
    assert (
        refused["code"] == "use_input_topic" and f"{P}/pinned/east/realtime/s" in refused["message"]
    )


async def test_a_dead_owner_is_reaped_once_and_a_late_reap_spares_the_next_owner() -> None:
    east, east_sent, _ = member("east")
    west, west_sent, west_started = member("west")
    north, north_sent, _ = member("north")
    east.submit(message(f"{P}/request/realtime/s/open"))
    deliver(east_sent.claims(), east, west, north)
    state = {"state": "open", "kind": "realtime", "instance": "east", "member": "east"}
    for m in (west, north):
        m.submit(message(f"{P}/response/realtime/s/state", state))
    # east dies: west and north both ask to reap; the first reap claim wins.
    for m in (west, north):
        m.submit(message(f"{P}/bridge/east/state", {"state": "offline"}))
    reaps = west_sent.claims() + north_sent.claims()
    assert [c.reap for c in reaps] == ["east", "east"]
    deliver(reaps[:1], west, north)
    closed = [json.loads(b) for t, b, r in west_sent.sent if t.endswith("/s/state") and r]
    assert [(c["state"], c["reason"], c["member"]) for c in closed] == [
        ("closed", "bridge_lost", "east")
    ]
    # The name is free: west claims it; north's late reap arrives after and changes nothing.
    west.submit(message(f"{P}/request/realtime/s/open"))
    deliver([*west_sent.claims()[1:], reaps[1]], west, north)
    assert west_started == ["s"]
    assert not any(t.endswith("/s/state") for t, _, _ in north_sent.sent)
    assert north.group is not None and north.group.owners[("realtime", "s")].member == "west"


async def test_a_restarted_member_releases_what_its_earlier_run_left_open() -> None:
    east, east_sent, _ = member("east")
    left = {"state": "open", "kind": "realtime", "instance": "east", "member": "east"}
    east.submit(message(f"{P}/response/realtime/s/state", left, retain=True))
    reap = east_sent.claims()
    assert [(c.reap, c.reason) for c in reap] == [("east", "bridge_restarted")]
    deliver(reap, east)
    assert json.loads(east_sent.sent[-1][1])["reason"] == "bridge_restarted"
    # Garbage on the group's topics is ignored.
    for topic in (f"{P}/claim/realtime/s", f"{P}/bridge/x/state", f"{P}/bridge/x/workers/1"):
        east.submit(message(topic, b"\xff{"))
    east.submit(message(f"{P}/response/realtime/s/state", b"[1]"))
    assert len(east_sent.sent) == 2
