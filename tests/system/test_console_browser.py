"""The web console in a real browser (Debian's Chromium, driven by Selenium) against a real bridge.

The bridge runs on a real Mosquitto with the HTTP stand-in upstream; the browser loads the
console, watches counters, the journal's entries and the live list move while requests flow
through the broker, sends a chat call, a streamed chat call (held by the stand-in between its
chunks, so each delta is seen in the page before the next one is sent) and a file upload from
the try page, and saves a screenshot of every page for the docs (docs/console/*.png).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support.bridge_runner import TEST_API_KEY, BridgeThread
from support.bridges import StartBridge
from support.mqtt_client import TestClient
from support.standin import Gate, Reply, Standin

from bridge.runtime.roles import Standalone

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "docs" / "console"
CHAT = {"object": "chat.completion", "choices": [{"message": {"content": "Hello from upstream"}}]}
DELTAS = ["Streamed ", "hello ", "from upstream"]


def chunk(n: int, finish: bool = False) -> tuple[None, str]:
    """Chat completion chunk `n` (a DELTAS piece, or the end with `finish`)."""
    choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": "stop"}
    if not finish:
        choice = {"index": 0, "delta": {"content": DELTAS[n]}, "finish_reason": None}
    data = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [choice]}  # fmt: skip
    return None, json.dumps(data)


def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver (./test.sh installs both)."""
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        pytest.fail(
            "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        )
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1200,900",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def console_bridge(
    start_bridge: StartBridge, standin: Standin
) -> Iterator[tuple[BridgeThread, str]]:
    standin.script("POST", "/chat/completions", Reply(json=CHAT))
    standin.script("POST", "/audio/transcriptions", Reply(json={"text": "heard"}))
    bridge = start_bridge(extra={"console": {"enabled": True, "port": 0}})
    role = bridge.bridge.role
    assert isinstance(role, Standalone) and role.console is not None
    url = role.console.url
    assert url is not None
    yield bridge, url


def wait(driver: webdriver.Chrome, condition: Any, timeout: float = 15) -> Any:
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition)


def text_of(driver: webdriver.Chrome, css: str) -> str:
    """The element's rendered text, read in one script: the status list is rebuilt every
    second, so an element found first and read after may be gone (stale) in between."""
    text = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null", css
    )
    if text is None:
        raise NoSuchElementException(css)
    return str(text)


def test_the_console_in_a_real_browser(
    console_bridge: tuple[BridgeThread, str],
    browser: webdriver.Chrome,
    client: TestClient,
    standin: Standin,
    tmp_path: Path,
) -> None:
    _, url = console_bridge
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(url)
    wait(browser, lambda d: text_of(d, "#state") == "online")
    counter = 'dd[data-key="requests_total"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, counter))
    entries = 'dd[data-key="journal_entries"]'
    wait(browser, lambda d: text_of(d, entries).isdigit())
    before, journaled = int(text_of(browser, counter)), int(text_of(browser, entries))
    for n in range(3):
        client.request("listModels", {"transaction": n})
    wait(browser, lambda d: int(text_of(d, counter)) >= before + 3)  # moves without a reload
    wait(browser, lambda d: int(text_of(d, entries)) >= journaled + 3)  # each answer journaled
    assert text_of(browser, 'dd[data-key="journal_size"]').split()[0] != "0"
    browser.save_screenshot(str(SHOTS / "status.png"))

    browser.get(url + "#requests")
    client.request_raw("createSpech", {"transaction": "typo"})  # an unknown method
    wait(browser, lambda d: "unknown_method" in text_of(d, "#request-rows"))
    row = browser.find_element(By.XPATH, "//tbody/tr[td[text()='unknown_method']]")
    row.click()
    wait(browser, lambda d: "unknown method" in text_of(d, "#detail-reply"))
    browser.save_screenshot(str(SHOTS / "requests.png"))

    browser.get(url + "#try")
    search = browser.find_element(By.ID, "method-search")
    search.send_keys("createChatCompletion")
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    box = browser.find_element(By.ID, "payload")
    box.clear()
    box.send_keys(json.dumps(payload))
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: "Hello from upstream" in text_of(d, "#try-reply"))
    assert standin.last.json() == payload
    browser.save_screenshot(str(SHOTS / "try.png"))

    # A streamed call: the stand-in holds its answer after each delta until the test has seen
    # that delta in the page (and not the next one, nor the reply), then lets the next go.
    gates = {1: Gate(), 2: Gate(), 3: Gate()}
    stream = [chunk(0), chunk(1), chunk(2), chunk(0, finish=True)]
    standin.script("POST", "/chat/completions", Reply(sse=stream, sse_gates=gates))
    streamed = {**payload, "stream": True}
    box.clear()
    box.send_keys(json.dumps(streamed))
    browser.find_element(By.ID, "send").click()
    try:
        for n in range(3):
            shown = "".join(DELTAS[: n + 1])
            wait(browser, lambda d, shown=shown: text_of(d, "#try-text") == shown)
            assert len(browser.find_elements(By.CSS_SELECTOR, "#try-events li")) == n + 1
            assert "streaming" in text_of(browser, "#try-reply")  # no final reply yet
            if n == 1:
                browser.save_screenshot(str(SHOTS / "try-stream.png"))
            gates[n + 1].open()
    finally:
        for gate in gates.values():
            gate.open()
    wait(browser, lambda d: text_of(d, "#try-reply").startswith("{"))
    final = json.loads(text_of(browser, "#try-reply"))
    assert final["status"] == "ok", final
    assert final["data"]["choices"][0]["message"]["content"] == "".join(DELTAS)
    assert "4 events" in text_of(browser, "#try-topic")
    assert standin.last.json() == streamed

    audio = bytes(range(256)) * 40 + b"\x00\xff end"
    wav = tmp_path / "hello.wav"
    wav.write_bytes(audio)
    search.clear()
    search.send_keys("createTranscription")
    box.clear()
    box.send_keys(json.dumps({"model": "whisper-1"}))
    browser.find_element(By.ID, "file").send_keys(str(wav))
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: "heard" in text_of(d, "#try-reply"))
    parts = {p.name: p for p in standin.last.parts or []}
    assert parts["file"].data == audio and parts["file"].filename == "hello.wav"

    browser.get(url + "#config")
    wait(browser, lambda d: "service" in text_of(d, "#config-text"))
    browser.save_screenshot(str(SHOTS / "config.png"))
    assert TEST_API_KEY not in browser.page_source
    logs: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    severe = [e for e in logs if e["level"] == "SEVERE"]
    assert severe == []


def test_a_streamed_try_obeys_access_like_any_device(
    start_bridge: StartBridge, standin: Standin
) -> None:
    bridge = start_bridge(
        extra={
            "console": {"enabled": True, "port": 0},
            "access": {"deny_methods": ["createChatCompletion"]},
        }
    )
    role = bridge.bridge.role
    assert isinstance(role, Standalone) and role.console is not None and role.console.url
    origin = role.console.url.rstrip("/")
    payload = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    request = urllib.request.Request(
        origin + "/api/try/stream",
        data=json.dumps({"method": "createChatCompletion", "payload": payload}).encode(),
        headers={"Origin": origin, "X-OMB-Console": "1", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        frames = [f for f in response.read().decode().split("\n\n") if f]
    names = [frame.split("\n")[0] for frame in frames]
    assert names == ["event: published", "event: reply"]
    reply = json.loads(frames[-1].split("\n")[1].removeprefix("data: "))
    assert reply["code"] == "method_not_allowed"
    assert standin.requests == []
