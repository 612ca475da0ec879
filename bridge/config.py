"""Configuration: a TOML file plus environment overrides, validated into frozen pydantic models.

Secrets (the API key, the MQTT password) come from the environment, a file, or a systemd
credential, and are held as `SecretStr` so that printing a config never shows them.
"""

from __future__ import annotations

import os
import socket
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from bridge.errors import ConfigError
from bridge.journal import default_path as default_journal_path

ENV_PREFIX = "OMB_"
"""Environment overrides: `OMB_<SECTION>__<KEY>=value`, e.g. `OMB_MQTT__INSTANCE=pi2`."""


class _Section(BaseModel):
    # Numbers become strings where a string is expected (env overrides like OMB_MQTT__INSTANCE=2).
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class TlsConfig(_Section):
    """Broker TLS: on when `enabled` or any file is set; the host name is always checked."""

    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def active(self) -> bool:
        """Whether the broker connection uses TLS."""
        return self.enabled or bool(self.ca_file or self.cert_file)


class MqttConfig(_Section):
    """The broker connection; an empty `host` starts the embedded broker."""

    host: str = ""
    port: Annotated[int, Field(ge=0, le=65535)] = 1883
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    instance: str = ""
    client_id: str = ""
    topic_prefix: str = "openai"
    username: str = ""
    password: SecretStr = SecretStr("")
    password_file: str = ""
    keepalive: Annotated[int, Field(ge=5, le=65535)] = 60
    session_expiry: Annotated[int, Field(ge=0)] = 86400
    shared_group: str = ""
    max_packet_size: Annotated[int, Field(ge=1024)] = 268_435_455
    reconnect_min: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max: Annotated[float, Field(gt=0)] = 60.0
    tls: TlsConfig = TlsConfig()

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("$"):
            raise ValueError("must be a non-empty topic without wildcards, NUL or a leading '$'")
        return value.strip("/")

    @field_validator("instance", "client_id", "shared_group")
    @classmethod
    def _no_topic_chars(cls, value: str) -> str:
        if any(c in value for c in "/+#\0"):
            raise ValueError("must not contain '/', '+', '#' or NUL")
        return value

    @property
    def instance_name(self) -> str:
        """This bridge's name in topics: `instance`, else the host name."""
        name = self.instance or socket.gethostname() or "bridge"
        return "".join("_" if c in "/+#\0" else c for c in name)

    @property
    def effective_client_id(self) -> str:
        """The MQTT client id: `client_id`, else `openai-mqtt-bridge-<instance>`."""
        return self.client_id or f"openai-mqtt-bridge-{self.instance_name}"

    @property
    def embedded(self) -> bool:
        """Whether the bridge runs its own (trial) broker."""
        return not self.host


class ServiceConfig(_Section):
    """The service host: OpenAI or any OpenAI-compatible server."""

    api_base: str = "https://api.openai.com/v1"
    api_key: SecretStr = SecretStr("")
    api_key_file: str = ""
    api_key_name: str = "Authorization"
    api_key_in_query: bool = False
    organization: str = ""
    project: str = ""
    assistants_version: str = "v2"
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    read_timeout: Annotated[float, Field(gt=0)] = 600.0
    total_timeout: Annotated[float, Field(gt=0)] = 900.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_max_delay: Annotated[float, Field(ge=0)] = 20.0
    extra_headers: dict[str, str] = {}
    max_connections: Annotated[int, Field(ge=1)] = 256
    """At least `[limits] max_concurrency`, or requests wait for a connection."""

    @field_validator("api_base")
    @classmethod
    def _valid_base(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key_name")
    @classmethod
    def _valid_key_name(cls, value: str) -> str:
        if not value or any(c in value for c in " :\r\n\t"):
            raise ValueError("must be a header or query parameter name")
        return value

    @field_validator("extra_headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not name or any(c in name for c in " :\r\n\t") or any(c in val for c in "\r\n"):
                raise ValueError(f"header {name!r} has an invalid name or value")
        return value


class LimitsConfig(_Section):
    """Concurrency and size limits."""

    max_concurrency: Annotated[int, Field(ge=1, le=65535)] = 256
    """Requests at once, also the Receive Maximum: about 30 KiB each (bench/README.md)."""
    max_request_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0
    dedup_entries: Annotated[int, Field(ge=0)] = 1024
    dedup_seconds: Annotated[float, Field(ge=0)] = 600.0


class AccessConfig(_Section):
    """Which methods devices may call (glob patterns on operationIds, case-insensitive)."""

    allow_methods: list[str] = ["*"]
    deny_methods: list[str] = []


class LoggingConfig(_Section):
    """Log level and format (`auto`: readable on a TTY, JSON otherwise)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RuntimeConfig(_Section):
    """Process-level choices."""

    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """`auto`: uvloop when installed (about a third less CPU per request), else asyncio."""


class HomeAssistantConfig(_Section):
    """Home Assistant MQTT discovery and the periodic stats topic."""

    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    stats_interval: Annotated[float, Field(ge=0)] = 60.0


class JournalConfig(_Section):
    """The on-disk journal of upstream answers and job ids (docs/reliability.md#the-journal)."""

    scope: Literal["off", "jobs", "answers"] = "answers"
    """`answers`: every upstream answer; `jobs`: job-creating operations and waited jobs only."""
    path: str = ""
    """Empty: `$STATE_DIRECTORY/journal.sqlite3` under systemd, else
    `$XDG_STATE_HOME/openai-mqtt-bridge/journal.sqlite3` (`~/.local/state/...`)."""
    max_bytes: Annotated[int, Field(ge=64 * 1024)] = 64 * 1024 * 1024
    max_age: Annotated[float, Field(gt=0)] = 86400.0
    """Seconds an entry answers a redelivered request; cover `[mqtt] session_expiry`."""
    max_answer_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024
    """Larger answers are not journaled (a crash before their reply buys them again)."""
    synchronous: Literal["normal", "full"] = "full"
    """`full`: fsync every commit (survives power loss); `normal`: survives a crash only."""
    url: SecretStr = SecretStr("")
    """`postgresql://user:password@host/db`: one journal shared by a group (needs asyncpg);
    empty: the SQLite file at `path`."""


class JobsConfig(_Section):
    """Waiting for jobs (`_bridge` `wait`): the pool, the polling, the default timeout."""

    max_waiting: Annotated[int, Field(ge=1, le=4096)] = 16
    """Jobs followed at once, besides `[limits] max_concurrency` (a bounded pool of its own)."""
    wait_timeout: Annotated[float, Field(gt=0)] = 3600.0
    """Seconds before `job_timeout` when the request names no `wait.timeout`."""
    poll_min: Annotated[float, Field(gt=0)] = 1.0
    """First polling interval (s); it grows by half each poll up to `poll_max`."""
    poll_max: Annotated[float, Field(gt=0)] = 30.0


class BridgeConfig(_Section):
    """The whole configuration."""

    mqtt: MqttConfig = MqttConfig()
    service: ServiceConfig = ServiceConfig()
    limits: LimitsConfig = LimitsConfig()
    access: AccessConfig = AccessConfig()
    logging: LoggingConfig = LoggingConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    journal: JournalConfig = JournalConfig()
    jobs: JobsConfig = JobsConfig()

    def secrets(self) -> list[str]:
        """Every secret value in force, for log and reply redaction."""
        out = [self.service.api_key.get_secret_value(), self.mqtt.password.get_secret_value()]
        out.append(_url_password(self.journal.url.get_secret_value()))
        return [s for s in out if s]

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data with secrets shown as `**********` when set."""
        data = self.model_dump(mode="json")
        data["service"]["api_key"] = "**********" if self.service.api_key.get_secret_value() else ""
        data["mqtt"]["password"] = "**********" if self.mqtt.password.get_secret_value() else ""
        return data


def _url_password(url: str) -> str:
    """The password in a URL like `postgresql://user:password@host/db` ("" when none)."""
    _scheme, sep, rest = url.partition("://")
    if not sep:
        return ""
    credentials, at, _ = rest.rpartition("@")
    return credentials.partition(":")[2] if at else ""


def _read_secret_file(path: str, what: str, warnings: list[str]) -> str:
    try:
        st = os.stat(path)
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"{what}: cannot read {path!r}: {exc.strerror}"]) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{what} {path!r} is readable by group or others; chmod 600 it")
    return text


def _credential(name: str, env: dict[str, str]) -> str | None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return str(path) if path.is_file() else None


def _set_dotted(data: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = data
    for part in dotted[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{'.'.join(dotted)}: cannot override inside a non-table value"])
        node = child
    node[dotted[-1]] = value


def _env_value(raw: str) -> Any:
    """An override's value: TOML syntax when it parses as a TOML value, else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        problems.append(f"{where}: {msg}")
    return problems


def load_config(
    path: str | os.PathLike[str] | None,
    environ: dict[str, str] | None = None,
    warnings: list[str] | None = None,
) -> BridgeConfig:
    """Read, merge and validate the configuration; raise ConfigError listing every problem."""
    env = dict(os.environ if environ is None else environ)
    warns = warnings if warnings is not None else []
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None

    if "api_key" in data.get("service", {}):
        warns.append("service.api_key is set in the config file; prefer OPENAI_API_KEY or a file")
    if "password" in data.get("mqtt", {}):
        warns.append("mqtt.password is set in the config file; prefer a file or credential")

    for key, raw in sorted(env.items()):
        if key.startswith(ENV_PREFIX) and "__" in key:
            dotted = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
            if len(dotted) >= 2:
                _set_dotted(data, dotted, _env_value(raw))

    try:
        config = BridgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None

    service_update: dict[str, Any] = {}
    if not config.service.api_key.get_secret_value():
        key_file = config.service.api_key_file or _credential("openai_api_key", env)
        if key_file:
            key = _read_secret_file(key_file, "service.api_key_file", warns)
        else:
            key = env.get("OPENAI_API_KEY", "")
        service_update["api_key"] = SecretStr(key.strip())
    mqtt_update: dict[str, Any] = {}
    if not config.mqtt.password.get_secret_value():
        pw_file = config.mqtt.password_file or _credential("mqtt_password", env)
        if pw_file:
            mqtt_update["password"] = SecretStr(
                _read_secret_file(pw_file, "mqtt.password_file", warns)
            )
        elif env.get("MQTT_PASSWORD"):
            mqtt_update["password"] = SecretStr(env["MQTT_PASSWORD"])

    problems = []
    key_value = str(service_update.get("api_key", config.service.api_key).get_secret_value())
    if any(c in key_value for c in "\r\n"):
        problems.append("service.api_key: must not contain line breaks")
    if config.mqtt.reconnect_min > config.mqtt.reconnect_max:
        problems.append("mqtt.reconnect_min: must not exceed mqtt.reconnect_max")
    if config.mqtt.tls.key_file and not config.mqtt.tls.cert_file:
        problems.append("mqtt.tls.key_file: needs mqtt.tls.cert_file")
    for name in ("ca_file", "cert_file", "key_file"):
        tls_path = getattr(config.mqtt.tls, name)
        if tls_path and not os.access(tls_path, os.R_OK):
            problems.append(f"mqtt.tls.{name}: cannot read {tls_path!r}")
    if problems:
        raise ConfigError(problems)

    journal_update: dict[str, Any] = {}
    if not config.journal.path:
        journal_update["path"] = str(default_journal_path(env))
    return config.model_copy(
        update={
            "service": config.service.model_copy(update=service_update),
            "mqtt": config.mqtt.model_copy(update=mqtt_update),
            "journal": config.journal.model_copy(update=journal_update),
        }
    )
