"""A group member's realtime topics and claims (bridge/realtime/group.py), pure."""

from __future__ import annotations

import pytest

from bridge.errors import BadSessionName
from bridge.realtime import group, model


def test_a_members_topics_and_names() -> None:
    g = group.Group("p", "pool.2", "pool")
    assert group.member_name("pool", 2) == "pool.2" and group.member_name("east", None) == "east"
    assert g.input_topic("realtime", "s") == "p/pinned/pool.2/realtime/s"
    assert g.claim_topic("realtime", "s") == "p/claim/realtime/s"
    assert group.worker_will_topic("p", "pool", 2) == "p/bridge/pool/workers/2"
    kinds = {
        "p/claim/realtime/s": "claim",
        "p/pinned/pool.2/realtime/s/audio": "pinned",
        "p/pinned/pool.1/realtime/s/audio": "",  # another member's input: never ours
        "p/bridge/east/state": "instance",
        "p/bridge/pool/workers/1": "worker",
        "p/bridge/east/info": "",
        "p/request/realtime/s/open": "",
    }
    assert {t: g.kind_of(t) for t in kinds} == kinds
    subscribed = [f for f, _ in group.subscriptions("p", "pool.2")]
    assert "p/pinned/pool.2/#" in subscribed and "p/claim/+/+" in subscribed


def test_input_topics_parse_and_hostile_ones_are_refused() -> None:
    g = group.Group("p", "m", "m")
    assert g.parse_pinned("p/pinned/m/realtime/kitchen/audio") == model.RealtimeTopic(
        "realtime", "kitchen", "audio"
    )
    for bad in ("realtime/../audio", "realtime/s/open", "video/s/audio", "realtime/s", "a/b/c/d"):
        with pytest.raises(BadSessionName):
            g.parse_pinned(f"p/pinned/m/{bad}")
    assert g.parse_claim_topic("p/claim/realtime/s") == ("realtime", "s")
    assert g.parse_claim_topic("p/claim/realtime/..") is None
    assert g.kind_in("p/pinned/m/realtimeTranscription/x/y/z") == "realtimeTranscription"


def test_claims_round_trip_and_garbage_is_no_claim() -> None:
    claim = group.Claim("east", "east", nonce="n1")
    assert group.Claim.decode(claim.encode()) == claim
    reap = group.Claim("west", "west", reap="east", reason="bridge_lost")
    assert group.Claim.decode(reap.encode()) == reap
    for garbage in (b"", b"[]", b"{", b'{"member": 1}', b'{"nonce": "x"}', b"\xff"):
        assert group.Claim.decode(garbage) is None


def test_the_owner_table_is_bounded() -> None:
    g = group.Group("p", "m", "m")
    for n in range(group.MAX_KNOWN + 5):
        g.own(("realtime", f"s{n}"), group.Owner("x", "x"))
    assert len(g.owners) == group.MAX_KNOWN
    assert [k for k, _ in g.owned_by(member="x")][:1] == [("realtime", "s0")]
    assert g.owned_by(member="y") == []
