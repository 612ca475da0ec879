"""Shared fixtures: a session Mosquitto, a fresh OpenAI stand-in, a connected MQTT client.

Import the helpers as `from support import ...` (pytest puts `tests/` on sys.path).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from support.bridge_runner import (
    TEST_API_KEY,
    TEST_MQTT_PASSWORD,
    BridgeProcess,
    BridgeThread,
    make_config,
)
from support.bridges import HTTP_PATHS, StartBridge
from support.broker import MosquittoBroker, MosquittoNotInstalled
from support.mqtt_client import TestClient
from support.standin import Standin

_LOG_TAIL_LINES = 40
_LAYERS = ("unit", "system", "docs")


def _broker(workdir: Path, **kwargs: object) -> MosquittoBroker:
    try:
        return MosquittoBroker(workdir, **kwargs)  # type: ignore[arg-type]
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Bridges started by tests never journal into the state directory of the user running them."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
    patch.delenv("STATE_DIRECTORY", raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One private Mosquitto for the whole session (never the system one on 1883).

    Do not stop or restart it; use `own_mosquitto` for that."""
    broker = _broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto for this test alone, with persistence on: stop, kill, restart it freely."""
    broker = _broker(tmp_path / "mosquitto", persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix unique to this test, so tests sharing the broker never cross-talk."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def standin() -> Iterator[Standin]:
    """A fresh OpenAI stand-in (base URL `standin.url`), stopped after the test."""
    server = Standin().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=sorted(HTTP_PATHS))
def http_path(request: pytest.FixtureRequest) -> str:
    """Each HTTP path in turn (`[service] lean_http` on and off), for a whole module."""
    return str(request.param)


@pytest.fixture
def client(mosquitto: MosquittoBroker, topic_prefix: str) -> Iterator[TestClient]:
    """A connected MQTT 5 client on the session broker, `request()`s under `topic_prefix`."""
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as test_client:
        yield test_client


@pytest.fixture
def start_bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> Iterator[StartBridge]:
    """Start real bridges (in threads) on the session broker against the stand-in.

    They are stopped after the test, and every log line is checked for the API key.
    """
    started: list[BridgeThread] = []

    def start(**overrides: object) -> BridgeThread:
        path, env = make_config(
            tmp_path,
            broker_port=overrides.pop("broker_port", mosquitto.port),  # type: ignore[arg-type]
            api_base=overrides.pop("api_base", standin.url),  # type: ignore[arg-type]
            prefix=overrides.pop("prefix", topic_prefix),  # type: ignore[arg-type]
            **overrides,  # type: ignore[arg-type]
        )
        bridge = BridgeThread.from_file(path, env).start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()
        assert TEST_API_KEY not in bridge.log_text()


@pytest.fixture
def bridge(start_bridge: StartBridge) -> BridgeThread:
    """A bridge with the default test config."""
    return start_bridge()


@pytest.fixture
def processes() -> Iterator[list[BridgeProcess]]:
    """Bridge subprocesses started by a test; closed after it, logs scanned for both secrets."""
    started: list[BridgeProcess] = []
    yield started
    for proc in started:
        proc.close()
        text = proc.log_text()
        assert TEST_API_KEY not in text
        assert TEST_MQTT_PASSWORD not in text


# ----------------------------------------------------------- leaked asyncio tasks
def _test_loop_scope(item: pytest.Item) -> str | None:
    """The loop scope of an async test, None for a sync test."""
    marker = item.get_closest_marker("asyncio")
    if marker is None:
        return None
    scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope:
        return str(scope)
    with contextlib.suppress(ValueError):
        default = item.config.getini("asyncio_default_test_loop_scope")
        if default:
            return str(default)
    return "function"


@pytest.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """After the test and its other fixtures: fail if tasks are still pending in its loop."""
    yield
    me = asyncio.current_task()
    leaked: set[asyncio.Task[object]] = set()
    for _ in range(20):  # let just-cancelled tasks finish (a few loop iterations)
        leaked = {task for task in asyncio.all_tasks() if task is not me}
        if not leaked:
            return
        await asyncio.sleep(0)
    names = sorted(f"{task.get_name()}: {task.get_coro()!r}" for task in leaked)
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    pytest.fail(f"test left {len(leaked)} asyncio task(s) running: {names}", pytrace=False)


@pytest.fixture(autouse=True)
def _asyncio_task_leak_check(request: pytest.FixtureRequest) -> None:
    """Arm `_no_leaked_tasks` for async tests running in a function-scoped loop.

    Requested first (autouse), it is torn down after the test's own fixtures, so a
    bridge fixture that stops its tasks in teardown does not count as a leak.
    """
    if _test_loop_scope(request.node) == "function":
        request.getfixturevalue("_no_leaked_tasks")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its layer, the folder it lives in (tests/unit, system, docs)."""
    for item in items:
        layer = item.path.parent.name
        if layer in _LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


# ------------------------------------------------------------ diagnostics on failure
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of the broker log and the stand-in's requests to failures."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in ("own_mosquitto", "mosquitto"):
            broker = funcargs.get(name)
            if isinstance(broker, MosquittoBroker):
                tail = broker.log_text().splitlines()[-_LOG_TAIL_LINES:]
                report.sections.append((f"{name} log (tail)", "\n".join(tail)))
        server = funcargs.get("standin")
        if isinstance(server, Standin):
            lines = [f"{r.method} {r.raw_path} {r.body[:200]!r}" for r in server.requests]
            report.sections.append(("stand-in requests", "\n".join(lines) or "(none)"))
    return report
