"""Configuration: a TOML file plus environment overrides, validated into frozen pydantic models.

Secrets (the API key, the MQTT password) come from the environment, a file, or a systemd
credential, and are held as `SecretStr` so that printing a config never shows them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError
from bridge.topics import valid_filter

STATE_SUBDIR = "openai-mqtt-bridge"
JOURNAL_FILE_NAME = "journal.sqlite3"


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
    shared_group_check: bool = True
    """Check on MQTT 3.1.1 brokers that a `$share` subscription delivers (a probe message)."""
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
    lean_http: bool = True
    """Plain JSON calls (http:// or https://) over the lean HTTP path (httptools); false: all
    through aiohttp. Forms, streams and redirects always go through aiohttp."""

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
    max_answer_bytes: Annotated[int, Field(ge=64 * 1024)] = 32 * 1024 * 1024
    """The largest service-host answer read into memory; larger ones get `answer_too_large`
    (streamed answers are forwarded piecewise and not bounded by it)."""
    max_select_steps: Annotated[int, Field(ge=100)] = 100_000
    """Nodes one `_bridge.select` may evaluate on one answer (per element inside a projection);
    more is `select_too_costly`."""


class AccessConfig(_Section):
    """Which methods devices may call (glob patterns on operationIds, case-insensitive)."""

    allow_methods: list[str] = ["*"]
    deny_methods: list[str] = []
    tools: dict[str, list[str]] = {}
    """Tool name -> globs of the request-topic suffixes that may use it (`["kitchen/*"]`);
    a tool not named here may be used by every caller."""
    reply_topics: list[str] = []
    """MQTT filters where a request's Response Topic may send its reply besides
    `<prefix>/response/#` (never the bridge's request, state or discovery topics)."""

    @field_validator("reply_topics")
    @classmethod
    def _valid_filters(cls, value: list[str]) -> list[str]:
        bad = [f for f in value if not valid_filter(f)]
        if bad:
            raise ValueError(f"not MQTT topic filters: {', '.join(repr(f) for f in bad)}")
        return value


class LoggingConfig(_Section):
    """Log level and format (`auto`: readable on a TTY, JSON otherwise)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    libraries: bool = False
    """With level debug, also the libraries' debug lines (amqtt, transitions, aiohttp, paho)."""


class RuntimeConfig(_Section):
    """Process-level choices."""

    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """`auto`: uvloop when installed (about a third less CPU per request), else asyncio."""
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    """Worker processes in one shared-subscription group behind one supervisor; `auto`: one per
    core this process may use, at most 8 (docs/scaling.md#workers-every-core-of-one-machine)."""
    worker_silence: Annotated[float, Field(ge=2)] = 20.0
    """Seconds a serving worker may go without reporting (each reports every second) before the
    supervisor deems it stuck, kills it and starts another."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ConsoleConfig(_Section):
    """The web console (docs/console.md): on by default, on this machine only."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Listen address; anything but loopback needs `token`."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8733
    """0: a free port, said in the log."""
    token: SecretStr = SecretStr("")
    """A bearer token the console asks for (and every API call must carry); no default."""
    history: Annotated[int, Field(ge=10, le=10_000)] = 200
    """Requests kept for the live list."""

    @model_validator(mode="after")
    def _credential_beyond_loopback(self) -> ConsoleConfig:
        if self.enabled and not is_loopback(self.host) and not self.token.get_secret_value():
            raise ValueError(
                f"listening on {self.host} needs [console] token (or OMB_CONSOLE__TOKEN): "
                "anyone who reaches it could use the bridge"
            )
        return self


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
    """Empty: `$STATE_DIRECTORY/journal.sqlite3` under systemd, else one file per config file in
    `$XDG_STATE_HOME/openai-mqtt-bridge/` (`default_journal_path`)."""
    max_bytes: Annotated[int, Field(ge=64 * 1024)] = 64 * 1024 * 1024
    max_age: Annotated[float, Field(gt=0)] = 86400.0
    """Seconds an entry answers a redelivered request; cover `[mqtt] session_expiry`."""
    max_answer_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024
    """Larger answers are not journaled (a crash before their reply buys them again)."""
    synchronous: Literal["normal", "full"] = "normal"
    """`normal`: survives a crash of the bridge (kill -9, OOM), small writes appended to a tail
    file and given to SQLite in batches; `full`: every write committed to SQLite and fsynced
    (survives power loss too, at several times the bytes written)."""
    poison_after: Annotated[int, Field(ge=1, le=100)] = 2
    """A request whose upstream call was started this many times without the bridge ever
    answering it (each start ended by a crash, a kill or a power loss) is answered
    `poison_request` instead of being executed again."""
    url: SecretStr = SecretStr("")
    """`postgresql://user:password@host/db`: one journal shared by a group (needs asyncpg);
    empty: the SQLite file at `path`."""


class JobsConfig(_Section):
    """Waiting for jobs (`_bridge` `wait`): the pool, the polling, the default timeout."""

    max_waiting: Annotated[int, Field(ge=1, le=4096)] = 16
    """Jobs followed at once, besides `[limits] max_concurrency` (a bounded pool of its own)."""
    max_waiting_per_caller: Annotated[int, Field(ge=1, le=4096)] = 4
    """Jobs followed at once for one caller (the request topic's first suffix level, the device
    in docs/security.md's ACL; requests without a suffix are one caller)."""
    wait_timeout: Annotated[float, Field(gt=0)] = 3600.0
    """Seconds before `job_timeout` when the request names no `wait.timeout`."""
    poll_min: Annotated[float, Field(gt=0)] = 1.0
    """First polling interval (s); it grows by half each poll up to `poll_max`."""
    poll_max: Annotated[float, Field(gt=0)] = 30.0
    claim_lease: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Seconds a process holds a detached wait without renewing it (renewed every third of
    it): a wait whose holder died is taken by another process sharing the journal after this."""


class ToolConfig(_Section):
    """`[tools.<name>]`: one MQTT action a model may call (docs/tools.md); checked at load by
    bridge.tools.config (parameters subset, templates, topics the bridge itself uses)."""

    description: str
    kind: Literal["publish", "read", "request"]
    topic: str
    """publish/request: where the payload goes; read: the topic whose retained message is read.
    `${arg}` only as a whole level, and only for a parameter with listed values (enum)."""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    """JSON schema of the arguments: an object of string/integer/number/boolean properties."""
    payload: str | dict[str, Any] = ""
    """Text or a table; `${arg}` is replaced by the validated argument."""
    qos: Annotated[int, Field(ge=0, le=2)] = 1
    retain: bool = False
    reply_topic: str = ""
    """request: the topic whose next message is the result (a state topic changing counts)."""
    select: str = ""
    """read/request: a JMESPath selection of the (JSON) message given to the model."""
    timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    """read/request: seconds to wait for the message before the call's result is a timeout."""
    dangerous: bool = False
    """Refused unless the request names it in `_bridge.allow_dangerous`."""
    rate_limit: Annotated[int, Field(ge=0)] = 0
    """Executed calls allowed per `rate_window` seconds (per bridge process); 0: no limit."""
    rate_window: Annotated[float, Field(gt=0)] = 60.0


class ToolLoopConfig(_Section):
    """`[tool_loop]`: bounds of the model/tool loop (docs/tools.md)."""

    max_steps: Annotated[int, Field(ge=1, le=50)] = 8
    """Model answers per request; a model still calling tools after that gets `tool_loop_limit`."""
    max_calls_per_step: Annotated[int, Field(ge=1, le=64)] = 8
    max_output_bytes: Annotated[int, Field(ge=64)] = 4096
    """A tool result longer than this is cut before it goes back to the model."""
    audit: bool = True
    """Publish every executed call on `<prefix>/bridge/<instance>/audit`."""


class RealtimeConfig(_Section):
    """Realtime sessions over MQTT (docs/protocol.md#realtime-sessions): limits per session and
    per bridge."""

    enabled: bool = True
    model: str = "gpt-realtime"
    """The model of a realtime session whose open message names none."""
    max_sessions: Annotated[int, Field(ge=0, le=10_000)] = 8
    """Sessions open at once on this bridge; one more is `too_many_sessions`."""
    idle_timeout: Annotated[float, Field(gt=0)] = 60.0
    """Seconds without a message from the device before `closed` with reason `idle`."""
    max_session_seconds: Annotated[float, Field(gt=0)] = 1800.0
    """A session's longest life; then `closed` with reason `max_duration`."""
    max_audio_seconds: Annotated[float, Field(gt=0)] = 600.0
    """Input audio one session may send (by its format's byte rate); then `audio_limit`."""
    audio_budget_seconds: Annotated[float, Field(ge=0)] = 0.0
    """Input audio all sessions of this bridge may send per `audio_budget_window`; past it each
    audio message is refused `audio_budget_spent`; 0: no budget."""
    audio_budget_window: Annotated[float, Field(gt=0)] = 3600.0
    max_events_per_second: Annotated[float, Field(gt=0)] = 100.0
    """Device messages per second on one session (bursts up to as many); more: `rate_limited`."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    """The largest event or audio message; larger: `message_too_large`."""
    max_pending_bytes: Annotated[int, Field(ge=64 * 1024)] = 4 * 1024 * 1024
    """Session output the broker has not yet acknowledged; more: `closed` `device_too_slow`."""
    heartbeat: Annotated[float, Field(gt=0)] = 15.0
    """Seconds between pings upstream; no pong in half that: `closed` `upstream_lost`."""
    qos: Literal[0, 1] = 1
    """QoS of a session's state, event, text and error messages."""
    audio_qos: Literal[0, 1] = 1
    """QoS of the audio a session publishes."""


class PresetConfig(_Section):
    """`[presets.<name>]`: a request a device makes with plain text on `<prefix>/ask/<name>/...`
    (docs/tools.md#presets); checked at load by bridge.presets.book."""

    method: Literal["createChatCompletion", "createResponse"] = "createResponse"
    request: dict[str, Any] = {}
    """The body around the question: model, instructions, temperature... (never `stream`)."""
    tools: list[str] = []
    allow_dangerous: list[str] = []
    select: str = ""
    """Empty: the answer's text (`output_text`, `choices[0].message.content`)."""
    format: Literal["plain", "json"] = "plain"
    max_bytes: Annotated[int, Field(ge=0)] = 0
    """`plain` only: the longest reply (0: no limit; else at least 32)."""
    conversation: bool = False
    """Remember earlier turns per request-topic suffix (in the journal)."""
    max_turns: Annotated[int, Field(ge=1)] = 20
    """Turns one conversation keeps; the next turn starts a new one."""
    idle_expiry: Annotated[float, Field(gt=0)] = 1800.0
    """Seconds without a turn after which a conversation is forgotten."""
    history: Literal["server", "bridge"] = "server"
    """createResponse: `server` chains `previous_response_id`; `bridge` keeps the messages itself
    (servers without stored responses). createChatCompletion always keeps them in the bridge."""
    max_history_messages: Annotated[int, Field(ge=2, le=200)] = 20
    """`bridge` history: the newest messages kept (a user question and its answer are two)."""


class BridgeConfig(_Section):
    """The whole configuration."""

    mqtt: MqttConfig = MqttConfig()
    service: ServiceConfig = ServiceConfig()
    limits: LimitsConfig = LimitsConfig()
    access: AccessConfig = AccessConfig()
    logging: LoggingConfig = LoggingConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    console: ConsoleConfig = ConsoleConfig()
    journal: JournalConfig = JournalConfig()
    jobs: JobsConfig = JobsConfig()
    tools: dict[str, ToolConfig] = {}
    tool_loop: ToolLoopConfig = ToolLoopConfig()
    realtime: RealtimeConfig = RealtimeConfig()
    presets: dict[str, PresetConfig] = {}

    def secrets(self) -> list[str]:
        """Every secret value in force, for log and reply redaction."""
        out = [self.service.api_key.get_secret_value(), self.mqtt.password.get_secret_value()]
        out.append(_url_password(self.journal.url.get_secret_value()))
        out.append(_url_password(self.service.api_base))
        # Any extra header may carry a credential (a gateway's token, an organisation id).
        out.extend(self.service.extra_headers.values())
        out.append(self.console.token.get_secret_value())
        return [s for s in out if s]

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data with secrets shown as `**********` when set."""
        data = self.model_dump(mode="json")
        data["service"]["api_key"] = "**********" if self.service.api_key.get_secret_value() else ""
        data["mqtt"]["password"] = "**********" if self.mqtt.password.get_secret_value() else ""
        data["service"]["extra_headers"] = dict.fromkeys(self.service.extra_headers, "**********")
        if _url_password(self.service.api_base):
            data["service"]["api_base"] = _url_without_password(self.service.api_base)
        return data


def _url_password(url: str) -> str:
    """The password in a URL like `postgresql://user:password@host/db` as sent (percent-decoded;
    "" when none). Only the authority is read: an `@` in the path is no password."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ""
    return unquote(password or "")


def _url_without_password(url: str) -> str:
    """`url` with the password in its authority shown as `**********`."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:**********@{host}"))


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


def _section_model(loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The model of the table at `loc` (e.g. ("mqtt", "tls") -> TlsConfig), or None."""
    model: type[BaseModel] = BridgeConfig
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(loc: tuple[str, ...]) -> str:
    """ "; did you mean X?" for a misspelt option or section at `loc`, or ""."""
    import difflib

    model = _section_model(loc[:-1])
    if model is None or not loc:
        return ""
    close = difflib.get_close_matches(loc[-1].lower(), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _env_source(loc: tuple[str, ...], env_sources: dict[tuple[str, ...], str]) -> str | None:
    """The environment variable that set the value at `loc` (or a table holding it), if any."""
    for dotted, name in env_sources.items():
        if dotted[: len(loc)] == loc or loc[: len(dotted)] == dotted:
            return name
    return None


def _format_errors(
    exc: ValidationError, env_sources: dict[tuple[str, ...], str] | None = None
) -> tuple[list[str], bool]:
    """One line per problem, naming the environment variable when one set the value."""
    problems = []
    from_env = False
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        where = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = ("unknown section" if len(loc) == 1 else "unknown option") + _did_you_mean(loc)
        source = _env_source(loc, env_sources or {})
        if source is not None:
            where = f"{where} (from environment variable {source})"
            from_env = True
        problems.append(f"{where}: {msg}")
    return problems, from_env


# OMB_ variables that are not option overrides.
_NOT_OPTIONS = frozenset({"OMB_CONFIG"})


def _unmatched_env_warning(key: str) -> str:
    """The warning for an `OMB_` variable that names no option, with the likely intended name."""
    rest = key[len(ENV_PREFIX) :].lower()
    hint = "options are set as OMB_<SECTION>__<OPTION> (two underscores), e.g. OMB_MQTT__HOST"
    for section in BridgeConfig.model_fields:
        model = _section_model((section,))
        if model is None or not rest.startswith(f"{section}_"):
            continue
        option = rest[len(section) + 1 :].strip("_")
        if option in model.model_fields:
            hint = f"did you mean {ENV_PREFIX}{section.upper()}__{option.upper()}?"
    return f"environment variable {key} matches no option and is ignored; {hint}"


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

    env_sources: dict[tuple[str, ...], str] = {}
    for key, raw in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key in _NOT_OPTIONS:
            continue
        dotted = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if "__" not in key or len(dotted) < 2:
            warns.append(_unmatched_env_warning(key))
            continue
        try:
            _set_dotted(data, dotted, _env_value(raw))
        except ConfigError as exc:
            raise ConfigError(
                [f"{p} (from environment variable {key})" for p in exc.problems], from_env=True
            ) from None
        env_sources[tuple(dotted)] = key

    try:
        config = BridgeConfig.model_validate(data)
    except ValidationError as exc:
        problems, from_env = _format_errors(exc, env_sources)
        raise ConfigError(problems, from_env=from_env) from None

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
        journal_update["path"] = str(default_journal_path(env, path))
    return config.model_copy(
        update={
            "service": config.service.model_copy(update=service_update),
            "mqtt": config.mqtt.model_copy(update=mqtt_update),
            "journal": config.journal.model_copy(update=journal_update),
        }
    )


def default_journal_path(
    environ: Mapping[str, str] | None = None, source: str | os.PathLike[str] | None = None
) -> Path:
    """Where the journal lives when `[journal] path` is empty.

    systemd's `StateDirectory=` sets `$STATE_DIRECTORY` (one per unit): `journal.sqlite3` there.
    Elsewhere `$XDG_STATE_HOME` or `~/.local/state` (the XDG default), in an `openai-mqtt-bridge`
    folder, one file per configuration: `journal-<config file's name>-<8 hex of its absolute
    path>.sqlite3` (for the built-in defaults, of the working directory), so two clones or two
    config files never share a journal.
    """
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / JOURNAL_FILE_NAME
    xdg = env.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".local" / "state"
    if source is not None:
        origin = Path(source).absolute()
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in origin.stem)[:40]
    else:
        origin, name = Path.cwd(), "defaults"
    tag = hashlib.sha256(str(origin).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return base / STATE_SUBDIR / f"journal-{name}-{tag}.sqlite3"
