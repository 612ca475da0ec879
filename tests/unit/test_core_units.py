"""Pure modules without sockets: config, topics, envelope, errors, backoff, dedup, access, JSON."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.backoff import Backoff, retry_after_seconds
from bridge.config import BridgeConfig, load_config
from bridge.errors import (
    ERROR_CODES,
    EX_CONFIG,
    BadJson,
    ConfigError,
    InternalError,
    MissingParameter,
    UpstreamError,
    UpstreamTimeout,
)
from bridge.jsoncodec import dumps, loads, loads_text
from bridge.pipeline import render
from bridge.pipeline.access import AccessRules
from bridge.pipeline.dedup import ReplyCache, request_key
from bridge.pipeline.model import MISSING
from bridge.redact import Redactor
from bridge.runtime import logs
from bridge.runtime.process import pin_mmap_threshold
from bridge.runtime.systemd import notify, watchdog_interval
from bridge.topics import Topics

# --- config ----------


def test_defaults_match_the_documented_example(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "bridge.toml"
    from_file, built_in = load_config(example, environ={}), load_config(None, environ={})
    # The journal's default file is per config (issue 23): the one thing that differs.
    assert from_file.journal.path != built_in.journal.path
    same = {"journal": built_in.journal}
    assert from_file.model_copy(update=same) == built_in
    defaults = BridgeConfig()
    assert defaults.service.api_base == "https://api.openai.com/v1"
    assert defaults.limits.max_concurrency == 256
    assert defaults.service.max_connections >= defaults.limits.max_concurrency
    assert defaults.mqtt.session_expiry == 86400


def test_every_problem_is_reported_with_its_dotted_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[mqtt]\nhots = "x"\nport = 70000\n[service]\napi_base = "ftp://x"\n'
        "[limits]\nmax_concurrency = 0\n[nonsense]\na = 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = "\n".join(info.value.problems)
    for where in (
        "mqtt.hots",
        "mqtt.port",
        "service.api_base",
        "limits.max_concurrency",
        "nonsense",
    ):
        assert where in text
    assert EX_CONFIG == 78


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "OMB_MQTT__INSTANCE": "pi2",
        "OMB_MQTT__PORT": "1884",
        "OMB_MQTT__PROTOCOL": "5",
        "OMB_LIMITS__MAX_CONCURRENCY": "8",
        "OMB_ACCESS__ALLOW_METHODS": '["createChat*"]',
        "OPENAI_API_KEY": "sk-env",
    }
    config = load_config(None, environ=env)
    assert config.mqtt.instance_name == "pi2"
    assert config.mqtt.effective_client_id == "openai-mqtt-bridge-pi2"
    assert config.mqtt.port == 1884 and config.mqtt.protocol == "5"
    assert config.limits.max_concurrency == 8
    assert config.access.allow_methods == ["createChat*"]
    assert config.service.api_key.get_secret_value() == "sk-env"


def test_secrets_from_file_and_systemd_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "openai_api_key").write_text("sk-cred\n")
    (creds / "mqtt_password").write_text("pw-cred\n")
    for f in creds.iterdir():
        f.chmod(0o600)
    config = load_config(None, environ={"CREDENTIALS_DIRECTORY": str(creds), "OPENAI_API_KEY": "x"})
    assert config.service.api_key.get_secret_value() == "sk-cred"
    assert config.mqtt.password.get_secret_value() == "pw-cred"
    assert "sk-cred" not in repr(config) and "pw-cred" not in json.dumps(config.redacted())
    assert sorted(config.secrets()) == ["pw-cred", "sk-cred"]


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[service]\napi_key_file = "{tmp_path / "nope"}"\n')
    with pytest.raises(ConfigError, match=r"service\.api_key_file"):
        load_config(path, environ={})


def test_unreadable_tls_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[mqtt.tls]\nca_file = "{tmp_path / "nope.pem"}"\n')
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file"):
        load_config(path, environ={})


def test_key_in_config_file_is_accepted_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[service]\napi_key = "sk-inline"\n')
    warnings: list[str] = []
    config = load_config(path, environ={}, warnings=warnings)
    assert config.service.api_key.get_secret_value() == "sk-inline"
    assert warnings and "sk-inline" not in warnings[0]


@pytest.mark.parametrize("prefix", ["", "a/+/b", "a/#", "$SYS"])
def test_bad_topic_prefix(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.topic_prefix"):
        load_config(None, environ={"OMB_MQTT__TOPIC_PREFIX": f'"{prefix}"'})


# --- topics ----------


def test_topic_parsing_and_mirroring() -> None:
    topics = Topics("home/openai", "pi")
    parsed = topics.parse("home/openai/request/getThread/kitchen/1")
    assert parsed is not None
    assert (parsed.method, parsed.suffix) == ("getThread", "kitchen/1")
    assert parsed.reply == "home/openai/response/getThread/kitchen/1"
    assert parsed.stream == "home/openai/stream/getThread/kitchen/1"
    bare = topics.parse("home/openai/request")
    assert bare is not None and bare.method == "" and bare.reply == "home/openai/response"
    assert topics.parse("home/openai/requestX/a") is None
    assert topics.parse("other/request/a") is None
    assert topics.state == "home/openai/bridge/pi/state"
    assert topics.subscription == "home/openai/request/#"
    assert Topics("o", "pi", "grp").subscription == "$share/grp/o/request/#"


# --- envelope and errors ----------


def test_envelopes() -> None:
    ok = json.loads(render.ok_raw("listModels", 7, b'{"a":[1,2]}'))
    assert ok == {"status": "ok", "method": "listModels", "transaction": 7, "data": {"a": [1, 2]}}
    assert list(ok) == ["status", "method", "transaction", "data"]
    no_tx = json.loads(render.ok("m", MISSING, None))
    assert no_tx == {"status": "ok", "method": "m", "data": None}
    err = json.loads(render.error("m", None, MissingParameter("thread_id")))
    assert err == {
        "status": "error",
        "method": "m",
        "transaction": None,
        "error": {
            "code": "missing_parameter",
            "message": "missing required parameter 'thread_id'",
            "retryable": False,
        },
    }
    upstream = UpstreamError("x", http_status=429, upstream={"type": "rate"}).to_dict()
    assert upstream["retryable"] is True and upstream["http_status"] == 429
    assert UpstreamError("x", http_status=400).to_dict()["retryable"] is False
    assert UpstreamTimeout("t").to_dict()["retryable"] is True


def test_error_codes_are_unique_snake_case() -> None:
    assert {"bad_json", "not_an_object", "unknown_method", "missing_parameter"} <= set(ERROR_CODES)
    assert {"upstream_error", "upstream_unavailable", "upstream_timeout"} <= set(ERROR_CODES)
    for code in ERROR_CODES:
        assert code == code.lower() and " " not in code
    assert ERROR_CODES["bad_json"] is BadJson
    assert ERROR_CODES["internal_error"] is InternalError
    assert ERROR_CODES["internal_error"]("x").to_dict()["retryable"] is True


# --- JSON ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b"[Infinity]",
        b"{'a': 1}",
        b"\xff",
        b"[1,]",
        b"",
        b'{"a": 1} x',
        b"[" * 100_000,
        b'{"t": 1e400}',
        b"[-2.5e999]",
    ],
)
def test_strict_json_refusals(raw: bytes) -> None:
    with pytest.raises(ValueError):
        loads(raw)
    if raw != b"\xff":
        with pytest.raises(ValueError):
            loads_text(raw.decode())


@pytest.mark.parametrize(
    "text", ['"\\ud800"', '["ok", {"k\\udfff": 1}]', '"\\ude00\\ud83d"', '{"a": "x\\uDBFF"}']
)
def test_text_parser_refuses_lone_surrogates_like_orjson(text: str) -> None:
    with pytest.raises(ValueError):
        orjson.loads(text)
    with pytest.raises(ValueError, match="surrogate"):
        loads_text(text)
    with pytest.raises(ValueError, match="surrogate"):  # a 20-digit number takes the same path
        loads(f"[{text}, 12345678901234567890]".encode())


def test_text_parser_accepts_what_only_looks_like_a_surrogate() -> None:
    assert loads_text('"\\ud83d\\ude00"') == "\U0001f600"
    assert loads_text('"\\\\ud800"') == "\\ud800"  # an escaped backslash, then plain text


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    )
)
def test_text_parser_agrees_with_orjson(value: Any) -> None:
    text = json.dumps(value)
    assert loads_text(text) == orjson.loads(text)


def test_big_integers_survive_exactly() -> None:
    big = 2**80 + 1
    assert loads(str(big).encode()) == big
    assert dumps(loads(b'{"t": 123456789012345678901234567890}')) == (
        b'{"t":123456789012345678901234567890}'
    )


# --- backoff ----------


def test_backoff_is_capped_exponential_with_jitter() -> None:
    lows = Backoff(0.5, 8.0, rand=lambda: 0.0)
    assert [lows.next_delay() for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    highs = Backoff(0.5, 8.0, rand=lambda: 1.0)
    assert [highs.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    highs.reset()
    assert highs.next_delay() == 0.5
    assert Backoff(0.5, 60, rand=lambda: 1.0).give_up_delay() == 60
    many = Backoff(1, 30)
    assert all(0 < many.next_delay() <= 30 for _ in range(200))


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert (
        retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480) == 10
    )
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after-ms": "x", "retry-after": "2"}) == 2.0


# --- dedup ----------


def test_reply_cache_bounds() -> None:
    now = [0.0]
    cache = ReplyCache(entries=2, seconds=10, max_bytes=100, clock=lambda: now[0])
    k1, k2, k3 = (request_key("t", bytes([i])) for i in range(3))
    cache.put(k1, "r", b"1")
    cache.put(k2, "r", b"2")
    cache.put(k3, "r", b"3")
    assert cache.get(k1) is None and cache.get(k3) == ("r", b"3", None) and len(cache) == 2
    now[0] = 11
    assert cache.get(k3) is None
    cache.put(k1, "r", b"x" * 30)  # over a quarter of the byte budget: not kept
    assert cache.get(k1) is None
    assert request_key("a", b"b") != request_key("ab", b"")


# --- access ----------


def test_access_rules() -> None:
    edge = AccessRules(["createChatCompletion", "createSpeech", "createTranscription"], [])
    assert edge.allows("createchatcompletion") and not edge.allows("deleteFile")
    rules = AccessRules(["*"], ["delete*", "*Assistant*"])
    assert rules.allows("listModels")
    assert not rules.allows("deleteFile") and not rules.allows("createAssistant")


# --- logs and systemd ----------


def test_redactor() -> None:
    red = Redactor(["sk-abcdef", "pw"])  # too-short secrets are ignored, not matched everywhere
    assert red.text("key sk-abcdef!") == "key **********!"
    assert red.data(b'{"k":"sk-abcdef"}') == b'{"k":"**********"}'
    assert red.any({"a": ["x sk-abcdef"], "b": 1}) == {"a": ["x **********"], "b": 1}
    assert red.text("pw stays") == "pw stays"


def test_json_log_lines_are_redacted_and_render_whatever_they_carry() -> None:
    out = io.StringIO()
    logs.configure("info", "json", secrets=["sk-abcdef"], stream=out)
    try:
        log = logs.get_logger()
        log.info("request", method="m", transaction="t sk-abcdef é", attempts=2, latency=1.5)
        log.info("odd", nested={"k": ["sk-abcdef"]}, big=1 << 70, keys={1: "a"}, obj=Path("p"))
    finally:
        logs.configure("warning", "json", stream=sys.stderr)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["transaction"] == "t ********** é" and first["attempts"] == 2
    assert (first["event"], first["level"], first["latency"]) == ("request", "info", 1.5)
    assert second["nested"] == {"k": ["**********"]} and second["big"] == 1 << 70
    assert second["keys"] == {"1": "a"} and second["obj"] == repr(Path("p"))
    assert "sk-abcdef" not in out.getvalue()


def test_sd_notify_and_watchdog_interval(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(100) == b"READY=1"
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


# --- allocator ----------


def test_mmap_threshold_is_pinned_on_glibc_unless_the_operator_chose() -> None:
    assert pin_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
    glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    assert pin_mmap_threshold({}) is glibc
