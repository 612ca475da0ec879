"""Waiting for jobs over MQTT: every job kind walked through its statuses by the stand-in."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeProcess, BridgeThread, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient, durable_client
from support.standin import RecordedRequest, Reply, Standin

from bridge.errors import InvalidParameter
from bridge.methods.jobs import JOBS
from bridge.pipeline.options import parse_options
from bridge.pipeline.waiting import JobState, Poller

FAST_POLLING = {"poll_min": 0.05, "poll_max": 0.2}


def script_video_job(standin: Standin, job_id: str) -> threading.Event:
    """Scripts createVideo to start `job_id`, in progress at every poll until the event is set."""
    done = threading.Event()
    job = {"id": job_id, "object": "video"}

    def state(record: RecordedRequest) -> Reply:
        return Reply(json={**job, "status": "completed" if done.is_set() else "in_progress"})

    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script("GET", f"/videos/{job_id}", state)
    return done


@pytest.fixture
def waiting_bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> Iterator[BridgeThread]:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        extra={"jobs": FAST_POLLING},
    )
    with BridgeThread.from_file(path, env) as running:
        yield running
    assert TEST_API_KEY not in running.log_text()


# (operation, request payload, create path, retrieve path, job fields, statuses, final status)
KINDS: list[tuple[str, dict[str, Any], str, str, dict[str, Any], list[str], str]] = [
    (
        "createVideo",
        {"prompt": "a cat", "model": "sora-2"},
        "/videos",
        "/videos/video_1",
        {"id": "video_1", "object": "video"},
        ["queued", "in_progress", "in_progress"],
        "completed",
    ),
    (
        "createBatch",
        {"input_file_id": "file-1", "endpoint": "/v1/responses", "completion_window": "24h"},
        "/batches",
        "/batches/batch_1",
        {"id": "batch_1", "object": "batch"},
        ["validating", "in_progress", "finalizing"],
        "completed",
    ),
    (
        "createFineTuningJob",
        {"model": "gpt-4o-mini", "training_file": "file-1"},
        "/fine_tuning/jobs",
        "/fine_tuning/jobs/ftjob_1",
        {"id": "ftjob_1", "object": "fine_tuning.job"},
        ["validating_files", "queued", "running"],
        "succeeded",
    ),
    (
        "createVectorStoreFileBatch",
        {"vector_store_id": "vs_1", "file_ids": ["file-1"]},
        "/vector_stores/vs_1/file_batches",
        "/vector_stores/vs_1/file_batches/vsfb_1",
        {"id": "vsfb_1", "object": "vector_store.files_batch", "vector_store_id": "vs_1"},
        ["in_progress", "in_progress"],
        "completed",
    ),
    (
        "createResponse",
        {"model": "gpt-4o-mini", "input": "hi", "background": True},
        "/responses",
        "/responses/resp_1",
        {"id": "resp_1", "object": "response"},
        ["queued", "in_progress"],
        "completed",
    ),
    (
        "createRun",
        {"thread_id": "thread_1", "assistant_id": "asst_1"},
        "/threads/thread_1/runs",
        "/threads/thread_1/runs/run_1",
        {"id": "run_1", "object": "thread.run", "thread_id": "thread_1"},
        ["queued", "in_progress"],
        "requires_action",
    ),
    (
        "createThreadAndRun",
        {"assistant_id": "asst_1", "thread": {"messages": [{"role": "user", "content": "hi"}]}},
        "/threads/runs",
        "/threads/thread_2/runs/run_2",
        {"id": "run_2", "object": "thread.run", "thread_id": "thread_2"},
        ["queued", "in_progress"],
        "completed",
    ),
    (
        "submitToolOuputsToRun",
        {
            "thread_id": "thread_1",
            "run_id": "run_1",
            "tool_outputs": [{"tool_call_id": "call_1", "output": "42"}],
        },
        "/threads/thread_1/runs/run_1/submit_tool_outputs",
        "/threads/thread_1/runs/run_1",
        {"id": "run_1", "object": "thread.run", "thread_id": "thread_1"},
        ["queued", "in_progress"],
        "completed",
    ),
]


def progress_of(operation: str, status: str, step: int) -> dict[str, Any]:
    """Fields that make each job kind report a progress percentage, where the API has one."""
    if operation == "createVideo":
        return {"progress": 100 if status == "completed" else 30 * step}
    if operation == "createBatch":
        done = 10 if status == "completed" else 3 * step
        return {"request_counts": {"total": 10, "completed": done, "failed": 0}}
    if operation == "createVectorStoreFileBatch":
        done = 4 if status == "completed" else step
        counts = {"total": 4, "completed": done, "failed": 0, "cancelled": 0, "in_progress": 0}
        return {"file_counts": counts}
    return {}


def test_the_table_covers_what_the_issue_lists() -> None:
    assert {kind[0] for kind in KINDS} <= set(JOBS)
    assert JOBS["createRun"].succeeded >= {"requires_action", "completed"}
    assert JOBS["createResponse"].needs == "background"


@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_each_job_kind_is_followed_to_its_end(
    waiting_bridge: BridgeThread,
    client: TestClient,
    standin: Standin,
    topic_prefix: str,
    kind: tuple[str, dict[str, Any], str, str, dict[str, Any], list[str], str],
) -> None:
    operation, payload, create_path, retrieve_path, fields, statuses, final = kind
    walk = [
        Reply(json={**fields, "status": s, **progress_of(operation, s, i)})
        for i, s in enumerate([*statuses, final])
    ]
    standin.script("POST", create_path, walk[0])
    standin.script("GET", retrieve_path, *walk[1:])
    stream = f"{topic_prefix}/stream/{operation}/k"
    client.subscribe(stream)
    reply = client.request(
        operation, {**payload, "transaction": 5, "_bridge": {"wait": True}}, suffix="k"
    )
    assert reply["status"] == "ok" and reply["transaction"] == 5
    assert reply["data"]["id"] == fields["id"] and reply["data"]["status"] == final

    calls = [(r.method, r.path) for r in standin.requests]
    assert calls[0] == ("POST", create_path)  # created once ...
    assert calls[1:] == [("GET", retrieve_path)] * len(statuses)  # ... then polled to the end
    assert "_bridge" not in (standin.requests[0].json() or {})

    states = [(w.json["status"], JOBS[operation].progress(w.json)) for w in walk]
    changes = [now for before, now in itertools.pairwise([(None, None), *states]) if now != before]
    events = [m.json() for m in client.wait_for(stream, len(changes))]
    assert [(e["data"]["status"], e["data"].get("progress")) for e in events] == changes
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert all(e["event"] == "job.progress" and e["transaction"] == 5 for e in events)
    seen = [e["data"]["status"] for e in events]
    assert seen[0] == statuses[0] and seen[-1] == final
    # One message per change: repeated identical states are not re-announced.
    assert all(a != b for a, b in itertools.pairwise(events))
    if progress_of(operation, final, 0):
        assert events[-1]["data"]["progress"] == 100
        assert [e["data"]["progress"] for e in events] == sorted(
            e["data"]["progress"] for e in events
        )


def test_a_failed_job_is_an_error_carrying_its_id(
    waiting_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    job = {"id": "video_9", "object": "video"}
    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    failed = {**job, "status": "failed", "error": {"code": "moderation", "message": "no"}}
    standin.script("GET", "/videos/video_9", Reply(json=failed))
    reply = client.request("createVideo", {"prompt": "x", "_bridge": {"wait": True}})
    error = reply["error"]
    assert error["code"] == "job_failed" and error["retryable"] is False
    assert error["job_id"] == "video_9" and error["job_status"] == "failed"
    assert error["upstream"]["error"]["code"] == "moderation"


def test_timeout_gives_job_timeout_with_the_id_and_the_job_goes_on(
    waiting_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    job = {"id": "video_7", "object": "video"}
    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script("GET", "/videos/video_7", Reply(json={**job, "status": "in_progress"}))
    reply = client.request(
        "createVideo", {"prompt": "x", "_bridge": {"wait": {"timeout": 0.5}}}, timeout=10
    )
    error = reply["error"]
    assert error["code"] == "job_timeout" and error["job_id"] == "video_7"
    assert error["job_status"] == "in_progress"
    assert "GetVideo" in error["message"]
    assert [r.method for r in standin.requests].count("POST") == 1
    assert not any(r.path.endswith("/cancel") for r in standin.requests)


def test_poll_after_header_is_honoured(
    waiting_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    job = {"id": "video_3", "object": "video"}
    hint = {"openai-poll-after-ms": "400"}
    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}, headers=hint))
    standin.script(
        "GET",
        "/videos/video_3",
        Reply(json={**job, "status": "in_progress"}, headers=hint),
        Reply(json={**job, "status": "completed"}),
    )
    assert (
        client.request("createVideo", {"prompt": "x", "_bridge": {"wait": True}})["data"]["status"]
        == "completed"
    )
    create, first, second = standin.requests
    # poll_max is 0.2 s in this bridge: only the header makes it wait 0.4 s.
    assert first.received_at - create.received_at >= 0.4
    assert second.received_at - first.received_at >= 0.4


def test_wait_is_refused_where_there_is_no_job(
    waiting_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    chat = client.request(
        "createChatCompletion", {"model": "m", "messages": [], "_bridge": {"wait": True}}
    )
    assert chat["error"]["code"] == "invalid_parameter"
    assert "job operations" in chat["error"]["message"]
    response = client.request(
        "createResponse", {"model": "m", "input": "hi", "_bridge": {"wait": True}}
    )
    assert response["error"]["code"] == "invalid_parameter"
    assert '"background": true' in response["error"]["message"]
    bad = client.request("createVideo", {"prompt": "x", "_bridge": {"wait": {"timeout": -1}}})
    assert bad["error"]["code"] == "invalid_parameter"
    assert standin.requests == []


def test_waiting_jobs_do_not_hold_request_slots(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        limits={"max_concurrency": 1},
        extra={"jobs": FAST_POLLING},
    )
    done = script_video_job(standin, "video_5")
    with (
        BridgeThread.from_file(path, env),
        TestClient.for_broker(mosquitto, prefix=topic_prefix) as client,
    ):
        client.subscribe(f"{topic_prefix}/response/#")
        client.publish(
            client.topic("request", "createVideo", "job"),
            {"prompt": "x", "_bridge": {"wait": True}},
        )
        standin.wait_for_requests(2)  # created and polled: now waiting
        # The one request slot is free: another request is answered while the job runs.
        assert client.request("listModels", {})["status"] == "ok"
        done.set()
        final = client.wait_for_one(f"{topic_prefix}/response/createVideo/job")
        assert final.json()["data"]["status"] == "completed"


def test_kill_9_while_waiting_resumes_the_job_created_once(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=own_mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"session_expiry": 600},
        extra={"jobs": FAST_POLLING},
    )
    done = script_video_job(standin, "video_8")
    client = durable_client(own_mosquitto, topic_prefix)
    client.subscribe(f"{topic_prefix}/stream/#")
    bridges = [BridgeProcess(path, env, tmp_path / f"bridge-{n}.log") for n in range(2)]
    try:
        bridges[0].start()
        client.publish(
            client.topic("request", "createVideo", "v"),
            {"prompt": "x", "transaction": 1, "_bridge": {"wait": True}},
        )
        standin.wait_for_requests(3)  # created, then polled twice
        bridges[0].kill()
        assert client.messages(f"{topic_prefix}/response/#") == []
        done.set()
        bridges[1].start()
        reply = client.wait_for_one(f"{topic_prefix}/response/createVideo/v").json()
        assert reply["status"] == "ok" and reply["data"]["status"] == "completed"
        posts = [r for r in standin.requests if r.method == "POST"]
        assert len(posts) == 1  # resumed by its journaled id, never created again
        assert '"event": "job resumed"' in bridges[1].log_text()
        # Progress goes on counting across the restart: queued 0, in_progress 1, completed 2.
        progress = [m.json() for m in client.messages(f"{topic_prefix}/stream/#")]
        assert [(p["seq"], p["data"]["status"]) for p in progress] == [
            (0, "queued"),
            (1, "in_progress"),
            (2, "completed"),
        ]
    finally:
        for bridge in bridges:
            bridge.close()
        client.disconnect()
    for bridge in bridges:
        assert TEST_API_KEY not in bridge.log_text()


# --- the pure parts ----------


def test_wait_option_forms() -> None:
    assert parse_options({"wait": True}).wait is not None
    assert parse_options({"wait": False}).wait is None
    waited = parse_options({"wait": {"timeout": 90}}).wait
    assert waited is not None and waited.timeout == 90.0
    for bad in ("yes", 1, {"timeout": 0}, {"timeout": "1"}, {"timout": 5}):
        with pytest.raises(InvalidParameter, match=r"_bridge\.wait"):
            parse_options({"wait": bad})


def test_poller_backs_off_and_takes_the_hint() -> None:
    from bridge.config import JobsConfig

    poller = Poller(JobsConfig(poll_min=1.0, poll_max=3.0))
    assert [poller.delay(None) for _ in range(5)] == [1.0, 1.5, 2.25, 3.0, 3.0]
    assert poller.delay(0.25) == 0.25
    assert poller.delay(60.0) == 60.0  # the service host's hint is honoured as it is


def test_job_state_round_trips_through_the_journal_record() -> None:
    state = JobState("createRun", "run_1", {"thread_id": "t", "run_id": "run_1"})
    assert JobState.from_record(state.record()) == state
    assert JobState.from_record({"operation": "createRun"}) is None


def test_sigterm_stops_a_wait_at_once_and_the_next_start_resumes_it(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=own_mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"session_expiry": 600},
        # A grace far longer than the test: only stopping the wait at once lets it end.
        limits={"shutdown_grace": 600.0},
        extra={"jobs": FAST_POLLING, "logging": {"level": "info"}},
    )
    done = script_video_job(standin, "video_6")
    client = durable_client(own_mosquitto, topic_prefix)
    client.subscribe(f"{topic_prefix}/stream/#")
    bridges = [BridgeProcess(path, env, tmp_path / f"bridge-{n}.log") for n in range(2)]
    try:
        bridges[0].start()
        client.publish(
            client.topic("request", "createVideo", "v"),
            {"prompt": "x", "_bridge": {"wait": True}},
        )
        standin.wait_for_requests(2)
        assert bridges[0].terminate(timeout=20) == 0
        assert '"event": "job waits stopped; resumed after restart"' in bridges[0].log_text()
        assert client.messages(f"{topic_prefix}/response/#") == []
        done.set()
        bridges[1].start()
        reply = client.wait_for_one(f"{topic_prefix}/response/createVideo/v").json()
        assert reply["data"]["status"] == "completed"
        assert [r.method for r in standin.requests].count("POST") == 1
    finally:
        for bridge in bridges:
            bridge.close()
        client.disconnect()


def test_a_service_host_down_while_polling_does_not_end_the_wait(
    waiting_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    job = {"id": "video_4", "object": "video"}
    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script(
        "GET",
        "/videos/video_4",
        *[Reply.error(503, "overloaded")] * 3,  # one poll's three attempts, all refused
        Reply(json={**job, "status": "completed"}),
    )
    reply = client.request("createVideo", {"prompt": "x", "_bridge": {"wait": True}}, timeout=20)
    assert reply["status"] == "ok" and reply["data"]["status"] == "completed"
    assert [r.method for r in standin.requests] == ["POST", "GET", "GET", "GET", "GET"]
    assert '"event": "job poll failed; polling on"' in waiting_bridge.log_text()
