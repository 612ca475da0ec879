"""A flood of `_bridge` `wait` requests on jobs that never end cannot stop the bridge serving.

Waits are bounded in total (`[jobs] max_waiting`) and per caller (`max_waiting_per_caller`); a
wait that finds its place taken is refused with `too_many_waits` before any job is created,
instead of queueing while its request holds a place in the broker's in-flight window.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

from support.bridge_runner import BridgeThread, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import RecordedRequest, Reply, Standin

FLOOD = 60
VIDEO = {"prompt": "a cat", "model": "sora-2", "_bridge": {"wait": {"timeout": 600}}}


def test_a_flood_of_waits_is_refused_beyond_its_bounds_and_others_are_still_served(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    ids = itertools.count()

    def create(record: RecordedRequest) -> Reply:
        return Reply(json={"id": f"video_{next(ids)}", "object": "video", "status": "queued"})

    standin.script("POST", "/videos", create)
    standin.script(
        "GET", "/videos/.*", Reply(json={"id": "v", "object": "video", "status": "in_progress"})
    )
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        # Receive Maximum 8 + 6 = 14: on main, 14 queued waits stopped all delivery.
        limits={"max_concurrency": 8},
        extra={
            "jobs": {"max_waiting": 6, "max_waiting_per_caller": 2, "poll_min": 5, "poll_max": 5}
        },
    )
    with (
        BridgeThread.from_file(path, env),
        TestClient.for_broker(mosquitto, prefix=topic_prefix) as client,
    ):
        client.subscribe(f"{topic_prefix}/response/#")
        for i in range(FLOOD):
            caller = "solo" if i < 3 else f"dev{i % 4}"  # one caller asks thrice, then four
            client.publish(client.topic("request", "createVideo", f"{caller}/{i}"), VIDEO)
        refused = client.wait_for(f"{topic_prefix}/response/createVideo/#", FLOOD - 6, timeout=30)
        codes = Counter(m.json()["error"]["code"] for m in refused)
        assert codes == {"too_many_waits": FLOOD - 6}
        assert all(m.json()["error"]["retryable"] is True for m in refused)
        # Six jobs created (the pool), none for the other 54 requests. The refusals can all be
        # out before the six creations reach the stand-in (one read hands the bridge every
        # request at once), so wait for those; the next polls come 5 s later.
        posts = [r for r in standin.wait_for_requests(6) if r.method == "POST"]
        assert len(posts) == 6
        bounds = Counter("max_waiting_per_caller" in m.json()["error"]["message"] for m in refused)
        assert bounds[True] == 1  # solo's third
        assert bounds[False] == FLOOD - 7  # the pool was full
        # Everyone else is still served at once.
        reply = client.request("listModels", {"transaction": "after"}, suffix="kitchen", timeout=5)
        assert reply["status"] == "ok" and reply["transaction"] == "after"
