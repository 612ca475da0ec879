"""A large upstream answer cannot exhaust the bridge's memory: a real bridge process, its RSS."""

from __future__ import annotations

from pathlib import Path

from support.bridge_runner import BridgeProcess, make_config
from support.bridges import HTTP_PATHS
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

MIB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_download_larger_than_max_answer_bytes_is_refused_without_reading_it(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
    http_path: str,
) -> None:
    big = b"\x7f" * (100 * MIB)  # passes the systemd unit's MemoryMax=256M once held twice
    standin.script("GET", "/files/file-big/content", Reply(body=big, content_type="audio/mpeg"))
    small = b"\x01" * MIB
    standin.script("GET", "/files/file-small/content", Reply(body=small, content_type="audio/mpeg"))
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        service={"lean_http": HTTP_PATHS[http_path]},
    )
    proc = BridgeProcess(path, env, tmp_path / "bridge.log")
    processes.append(proc)
    proc.start()
    assert proc.proc is not None
    before = peak_rss_mib(proc.proc.pid)
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as client:
        refused = client.request("downloadFile", {"file_id": "file-big"}, timeout=30)
        assert refused["status"] == "error"
        assert refused["error"]["code"] == "answer_too_large"
        assert refused["error"]["retryable"] is False
        assert f"answered {100 * MIB} bytes" in refused["error"]["message"]
        assert "max_answer_bytes = 33554432" in refused["error"]["message"]
        # The bridge goes on serving, answers below the limit included.
        served = client.request("downloadFile", {"file_id": "file-small"}, timeout=30)
        assert served["status"] == "ok" and served["data"]["size"] == MIB
    grown = peak_rss_mib(proc.proc.pid) - before
    # Reading the 100 MiB answer whole made the peak grow by more than 200 MiB.
    assert grown < 24, f"peak RSS grew by {grown:.0f} MiB"
