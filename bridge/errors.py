"""One typed error tree: every failure a request can meet, each with a stable wire code.

Every exception here carries the snake_case `code` that appears in the reply envelope, whether the
caller may retry, and optionally the upstream HTTP status and the API's own error object. The table
in docs/protocol.md lists the same codes; `ERROR_CODES` is that table in code.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BridgeError(Exception):
    """Base of every error that becomes an error reply; `code` is the wire code."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        upstream: Any = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.upstream = upstream
        self._retryable = retryable
        self.attempts = 0
        """How many HTTP attempts were made before giving up (0: none was sent)."""

    @property
    def is_retryable(self) -> bool:
        """Whether the same request may succeed if sent again later."""
        return self.retryable if self._retryable is None else self._retryable

    def to_dict(self) -> dict[str, Any]:
        """The `error` object of the reply envelope."""
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "retryable": self.is_retryable,
        }
        if self.http_status is not None:
            out["http_status"] = self.http_status
        if self.upstream is not None:
            out["upstream"] = self.upstream
        return out


class InternalError(BridgeError):
    """A bug in the bridge; the request may succeed if retried."""

    code = "internal_error"
    retryable = True


# --- the request itself is unusable (never retryable) -------------------------------------------


class RequestError(BridgeError):
    """The request as published cannot be turned into an API call."""


class BadJson(RequestError):
    """The payload is not UTF-8 JSON."""

    code = "bad_json"


class NotAnObject(RequestError):
    """The payload is JSON but not an object."""

    code = "not_an_object"


class UnknownMethod(RequestError):
    """The topic names no operation in the method table."""

    code = "unknown_method"


class MethodNotAllowed(RequestError):
    """The operation exists but the bridge's access rules forbid it."""

    code = "method_not_allowed"


class MissingParameter(RequestError):
    """A path parameter, required query parameter or required body field is absent."""

    code = "missing_parameter"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"missing required parameter {name!r}")
        self.parameter = name


class InvalidParameter(RequestError):
    """A parameter is present but of a type or value the operation cannot take."""

    code = "invalid_parameter"

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.parameter = name


class InvalidMethod(InvalidParameter):
    """callEndpoint: `method` is not one of GET, POST, PUT, PATCH, DELETE."""

    code = "invalid_method"


class InvalidPath(InvalidParameter):
    """callEndpoint: `path` is not a clean path relative to api_base."""

    code = "invalid_path"


class InvalidQuery(InvalidParameter):
    """callEndpoint: `query` is not an object of names and scalar or array values."""

    code = "invalid_query"


class InvalidHeader(InvalidParameter):
    """callEndpoint: a header name is not a token or a value holds CR, LF or a control character."""

    code = "invalid_header"


class ForbiddenHeader(InvalidParameter):
    """callEndpoint: a header the bridge sets itself (Authorization, Host, the key's header...)."""

    code = "forbidden_header"


class InvalidBody(InvalidParameter):
    """callEndpoint: `body` and `form` together, a body on GET, or `form` not an object."""

    code = "invalid_body"


class ReplyTopicNotAllowed(RequestError):
    """The request's MQTT 5 Response Topic is outside the topics replies may go to."""

    code = "reply_topic_refused"


class UnknownParameter(RequestError):
    """An operation without a body got keys that are neither path nor query parameters."""

    code = "unknown_parameter"


class InvalidBase64(RequestError):
    """A file field's base64 text does not decode."""

    code = "invalid_base64"

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.parameter = name


class InvalidFile(RequestError):
    """A file field is not one of the accepted forms (object, data URL, base64 string)."""

    code = "invalid_file"

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.parameter = name


class PayloadTooLarge(RequestError):
    """The request payload exceeds `[limits] max_request_bytes`."""

    code = "payload_too_large"

    @classmethod
    def of(cls, size: int, limit: int) -> PayloadTooLarge:
        """The error for a payload of `size` bytes over `limit`, in bytes and MiB."""
        mib = 1024 * 1024
        return cls(
            f"payload of {size} bytes ({size / mib:.1f} MiB) exceeds [limits] max_request_bytes "
            f"= {limit} ({limit / mib:.3g} MiB)"
        )


class SelectTooLarge(RequestError):
    """`_bridge.select` would produce more than the bridge builds for one reply."""

    code = "select_too_large"


class SelectTooCostly(RequestError):
    """`_bridge.select` needs more evaluation steps than `[limits] max_select_steps` allows."""

    code = "select_too_costly"


class AnswerTooLarge(BridgeError):
    """The service host's answer is larger than `[limits] max_answer_bytes`; not read further."""

    code = "answer_too_large"


class PoisonRequest(BridgeError):
    """The request was being executed when the bridge stopped `[journal] poison_after` times."""

    code = "poison_request"


class TooManyWaits(BridgeError):
    """`_bridge` `wait` refused: `[jobs] max_waiting` in total or `max_waiting_per_caller` for
    this caller are being followed already; nothing was sent."""

    code = "too_many_waits"
    retryable = True


class ReplyTooLarge(BridgeError):
    """The reply would exceed the largest packet the broker accepts."""

    code = "reply_too_large"


# --- the service host ----------------------------------------------------------------------------


class UpstreamError(BridgeError):
    """The service host answered with a status other than 2xx (after any redirects)."""

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        http_status: int,
        upstream: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status, upstream=upstream)
        self.retry_after = retry_after
        """Seconds the service host asked us to wait before retrying, when it said."""

    @property
    def is_retryable(self) -> bool:
        if self._retryable is not None:
            return self._retryable
        return self.http_status in RETRYABLE_STATUSES


class UpstreamUnavailable(BridgeError):
    """The service host could not be reached (refused, DNS, TLS, connection reset)."""

    code = "upstream_unavailable"
    retryable = True


class UpstreamTimeout(BridgeError):
    """The service host did not answer within the configured timeouts."""

    code = "upstream_timeout"
    retryable = True


class UpstreamBadResponse(BridgeError):
    """The service host answered 2xx with a body the bridge cannot read (e.g. broken JSON)."""

    code = "upstream_bad_response"
    retryable = True


class BadRedirect(BridgeError):
    """The service host redirected to a location that cannot be followed (not an http(s) URL
    with a host); asking again gets the same redirect."""

    code = "bad_redirect"


class StreamInterrupted(BridgeError):
    """A server-sent event stream ended before its end marker or carried an error event."""

    code = "stream_interrupted"
    retryable = True


# --- waited jobs ---------------------------------------------------------------------------------


class JobError(BridgeError):
    """A job waited on (`_bridge` `wait`) did not end well; carries the job's id and status."""

    def __init__(
        self, message: str, *, job_id: str, job_status: str | None, upstream: Any = None
    ) -> None:
        super().__init__(message, upstream=upstream)
        self.job_id = job_id
        self.job_status = job_status

    def to_dict(self) -> dict[str, Any]:
        """The `error` object, with `job_id` and `job_status` so the caller can go on."""
        out = super().to_dict()
        out["job_id"] = getattr(self, "job_id", None)
        out["job_status"] = getattr(self, "job_status", None)
        return out


class JobTimeout(JobError):
    """The job did not end within the wait's timeout; it goes on upstream (see `job_id`)."""

    code = "job_timeout"


class JobFailed(JobError):
    """The job ended failed, cancelled or expired; `upstream` holds its final object."""

    code = "job_failed"


# --- tools (docs/tools.md): refusals of a request, or of one call fed back to the model ---------


class ToolError(RequestError):
    """A tool cannot be offered or a tool call is refused."""


class UnknownTool(ToolError):
    """The request (or the model) names a tool the config does not declare."""

    code = "unknown_tool"


class ToolNotAllowed(ToolError):
    """`[access] tools` does not let this caller (request-topic suffix) use the tool."""

    code = "tool_not_allowed"


class InvalidToolArguments(ToolError):
    """The model's arguments are not JSON or fail the tool's parameter schema."""

    code = "bad_tool_arguments"


class ToolTopicRefused(ToolError):
    """The arguments would reach a wildcard or a topic the tool's config does not list."""

    code = "tool_topic_refused"


class DangerousToolRefused(ToolError):
    """A `dangerous` tool without `_bridge.allow_dangerous` naming it."""

    code = "dangerous_tool"


class ToolRateLimited(ToolError):
    """The tool was called more often than its `rate_limit` allows."""

    code = "tool_rate_limited"
    retryable = True


class ToolTimeout(ToolError):
    """A read or request tool got no message within its `timeout`."""

    code = "tool_timeout"
    retryable = True


class ToolLoopLimit(ToolError):
    """The model was still calling tools after `[tool_loop] max_steps` answers."""

    code = "tool_loop_limit"


# --- realtime sessions (bridge/realtime/) ---------------------------------------------------


class RealtimeError(RequestError):
    """A realtime message the bridge cannot act on (answered on the error topic)."""


class BadSessionName(RealtimeError):
    """The session level is empty, `.`/`..`, too long or holds other than [A-Za-z0-9_.-]."""

    code = "bad_session_name"


class UnknownSession(RealtimeError):
    """An event, audio or close for a session that is not open on this bridge."""

    code = "unknown_session"


class SessionExists(RealtimeError):
    """An open for a session name already open."""

    code = "session_exists"


class UnknownEvent(RealtimeError):
    """A client event whose `type` is not one of its kind's client events."""

    code = "unknown_event"


class BadOpen(RealtimeError):
    """The open message's options are not valid."""

    code = "bad_open"


class MessageTooLarge(RealtimeError):
    """A message over `[realtime] max_message_bytes`."""

    code = "message_too_large"


class TooManySessions(RealtimeError):
    """`[realtime] max_sessions` sessions are already open."""

    code = "too_many_sessions"
    retryable = True


class RateLimited(RealtimeError):
    """More messages per second on one session than `[realtime] max_events_per_second`."""

    code = "rate_limited"
    retryable = True


class NoAudio(RealtimeError):
    """Audio on a session whose kind takes none (the Responses WebSocket mode)."""

    code = "no_audio"


class AudioBudgetExhausted(RealtimeError):
    """The bridge's `[realtime] audio_budget_seconds` per window are used up."""

    code = "audio_budget_spent"
    retryable = True


class UseInputTopic(RealtimeError):
    """In a group: an event, audio or close on the request topic of a session another topic
    serves (the `input` of its state)."""

    code = "use_input_topic"


class RealtimeUnavailable(RealtimeError):
    """This bridge serves no realtime sessions: `[realtime] enabled` is off."""

    code = "realtime_unavailable"


class UnknownPreset(RequestError):
    """`<prefix>/ask/<preset>`: the config has no such preset."""

    code = "unknown_preset"


class ConfigError(Exception):
    """The configuration is invalid; the process exits with EX_CONFIG (78)."""

    def __init__(self, problems: list[str], *, from_env: bool = False) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.from_env = from_env
        """Whether some problem comes from an `OMB_` environment variable (each names its own)."""


EX_CONFIG = 78
EX_SOFTWARE = 70
"""sysexits: an internal error stopped the process (systemd restarts it)."""


class StartupError(Exception):
    """A part of the bridge cannot start for a reason the operator must fix (exit 78)."""


# HTTP statuses worth retrying: rate limits and transient server errors; other 4xx never are.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


def _all_codes() -> dict[str, type[BridgeError]]:
    """Every concrete error class by its code (abstract bases define no code of their own)."""
    seen: dict[str, type[BridgeError]] = {}
    stack: list[type[BridgeError]] = list(BridgeError.__subclasses__())
    while stack:
        cls = stack.pop()
        if "code" in cls.__dict__:
            seen[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return seen


#: wire code -> exception class, the documented table of error codes.
ERROR_CODES: dict[str, type[BridgeError]] = _all_codes()
