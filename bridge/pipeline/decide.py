"""The decide stage: one inbound message -> a `Call` to execute, a `Rejection`, or nothing at all.

Every local check happens here, before any HTTP request: the topic and the response topic, the
payload's size, JSON and shape, the reserved keys (`transaction`, and `_bridge` with its reply
options, both removed before the request is built), the method, the access rules
and the request building (required, path and query parameters, files). Whether the call is a
stream is decided here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.errors import (
    BadJson,
    BridgeError,
    InternalError,
    MethodNotAllowed,
    NotAnObject,
    PayloadTooLarge,
    ReplyTopicNotAllowed,
    UnknownMethod,
    UnknownPreset,
)
from bridge.jsoncodec import loads, loads_text, utf8_problem
from bridge.messages import InboundMessage
from bridge.methods import endpoint
from bridge.methods.jobs import check_wait
from bridge.methods.model import MethodTable, Operation
from bridge.pipeline.access import AccessRules, ReplyTopicRules
from bridge.pipeline.build import RequestBuilder
from bridge.pipeline.model import MISSING
from bridge.pipeline.options import (
    DEFAULT_OPTIONS,
    MAX_SELECT_STEPS,
    OPTIONS_KEY,
    ReplyOptions,
    error_options,
    parse_options,
)
from bridge.presets.book import RESET, PresetBook, conversation_key, question_text
from bridge.presets.conversation import AskTurn
from bridge.service.models import HttpRequest
from bridge.topics import RequestTopic, Topics

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

ASK_ERROR_OPTIONS = ReplyOptions(format="plain")
"""How a preset question's refusal is answered before the preset's own options are known."""
LARGE_PAYLOAD = 1 << 20
"""Requests from this many bytes on are parsed as text with the bytes dropped first."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where the answer to one request message goes."""

    topic: RequestTopic
    reply_topic: str
    """The request's MQTT 5 response topic when it names one, else `<prefix>/response/...`."""
    correlation: bytes | None
    refused_reply_topic: str | None = None
    """A response topic the request named where replies may not go (it is answered on the
    default reply topic with `reply_topic_refused`)."""


@dataclass(slots=True)
class Call:
    """One accepted request: the HTTP request to send and how its answer is delivered."""

    op: Operation
    request: HttpRequest | None
    """None once execute has taken it (a large upload is freed as soon as it is sent)."""
    transaction: Any
    """The request's `transaction` value, or `MISSING` when it had none."""
    stream_topic: str | None
    """Where the events go when the call asked for a stream; None for a plain call."""
    options: ReplyOptions = DEFAULT_OPTIONS
    """The request's `_bridge` reply options."""
    ask: AskTurn | None = None
    """A preset question (`<prefix>/ask/...`): its conversation, or a reset."""
    raw_options: Any = None
    """The `_bridge` value as sent (a detached wait journals it, and parses it again on resume)."""

    def take_request(self) -> HttpRequest:
        """The HTTP request, dropping this call's reference to it."""
        request, self.request = self.request, None
        assert request is not None, "a call's request is sent once"
        return request


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request refused before any HTTP request; answered with `error`."""

    method: str
    transaction: Any
    error: BridgeError
    options: ReplyOptions = DEFAULT_OPTIONS
    """The reply options to answer in (as far as they were readable)."""


def wants_stream(params: dict[str, Any], op: Operation | None = None) -> bool:
    """Whether the payload asks for server-sent events (callEndpoint: in its `body`)."""
    if op is not None and op.generic:
        return endpoint.wants_stream(params)
    return params.get("stream") is True or params.get("stream_format") == "sse"


def valid_publish_topic(topic: str) -> bool:
    """Whether `topic` can be published to (no wildcards or NUL, within MQTT's length)."""
    return bool(topic) and not any(c in topic for c in "+#\0") and len(topic) <= 65535


def decode(message: InboundMessage, limit: int) -> dict[str, Any]:
    """The request's parameters (a JSON object of at most `limit` bytes).

    Takes the payload off `message`, so that only the parse keeps it alive.
    """
    payload, message.payload = message.payload, b""
    if len(payload) > limit:
        raise PayloadTooLarge.of(len(payload), limit)
    if not payload or payload.isspace():  # no strip(): that copies a large payload
        raise BadJson("empty payload: publish one JSON object")
    try:
        if len(payload) < LARGE_PAYLOAD:
            params = loads(payload)
        else:
            # Bytes to text, drop the bytes, then parse: two payloads' worth alive at the
            # peak instead of the three that parsing the bytes directly would hold.
            try:
                text = str(payload, "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(utf8_problem(exc)) from None
            del payload
            params = loads_text(text)
    except ValueError as exc:
        raise BadJson(f"payload is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(params, dict):
        raise NotAnObject(f"payload must be a JSON object, got {type(params).__name__}")
    return params


@dataclass(slots=True)
class Decider:
    """Routes request messages and turns their payloads into calls, or rejects them."""

    topics: Topics
    table: MethodTable
    access: AccessRules
    builder: RequestBuilder
    max_request_bytes: int
    log: FilteringBoundLogger
    max_select_steps: int = MAX_SELECT_STEPS
    """`[limits] max_select_steps`: what one `select` may evaluate on one answer."""
    reply_topics: ReplyTopicRules | None = None
    """Where Response Topics may point; None: under the response prefix only."""
    presets: PresetBook | None = None
    """`[presets]`: what a plain-text question on `<prefix>/ask/<preset>/...` becomes."""

    def __post_init__(self) -> None:
        if self.reply_topics is None:
            self.reply_topics = ReplyTopicRules(self.topics)

    def route(self, message: InboundMessage) -> Route | None:
        """Where the answer goes; None (logged) for a message that gets no answer at all."""
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            self.log.warning("message outside the request topics rejected", topic=message.topic)
            return None
        reply_topic = parsed.reply
        if message.response_topic is not None:
            if not valid_publish_topic(message.response_topic):
                self.log.warning(
                    "request rejected: unusable response topic",
                    topic=message.topic,
                    response_topic=message.response_topic[:200],
                )
                return None
            assert self.reply_topics is not None
            if not self.reply_topics.allows(message.response_topic, parsed.suffix):
                return Route(parsed, reply_topic, message.correlation_data, message.response_topic)
            reply_topic = message.response_topic
        return Route(parsed, reply_topic, message.correlation_data)

    def decide(self, message: InboundMessage, route: Route) -> Call | Rejection:
        """The call `message` asks for, or why it is refused; takes the payload off `message`."""
        method = route.topic.method
        transaction: Any = MISSING
        options = DEFAULT_OPTIONS
        ask: AskTurn | None = None
        if route.topic.preset is not None:
            options = ASK_ERROR_OPTIONS  # a device asking in plain text gets errors in plain text
        try:
            if route.topic.preset is not None:
                ask, params = self._ask(message, route)
                method = ask.preset.method
            else:
                params = decode(message, self.max_request_bytes)
            transaction = params.pop("transaction", MISSING)
            raw_options = params.pop(OPTIONS_KEY, None)
            try:
                options = parse_options(raw_options, self.max_select_steps)
            except BridgeError:
                options = error_options(raw_options)
                raise
            if route.refused_reply_topic is not None:
                raise ReplyTopicNotAllowed(
                    f"response topic {route.refused_reply_topic[:200]!r} is not one of this "
                    f"request's reply topics: use {route.reply_topic} or a topic below it (or "
                    "add a filter to [access] reply_topics)"
                )
            op = self.table.find(method)
            if op is None:
                raise UnknownMethod(
                    self.table.unknown(method[:100])
                    if method
                    else "the topic names no method: publish to <prefix>/request/<method>"
                )
            method = op.name
            if not self.access.allows(op.name):
                raise MethodNotAllowed(f"method {op.name} is not allowed on this bridge")
            stream_topic = route.topic.stream if wants_stream(params, op) else None
            if options.wait is not None:
                check_wait(op.name, params, streams=stream_topic is not None)
            request = self.builder.build(op, params)
        except BridgeError as exc:
            return Rejection(method, transaction, exc, options)
        except Exception as exc:  # a bug must still get the request its one reply
            self.log.exception("unexpected failure", topic=message.topic)
            error = InternalError(f"internal error: {type(exc).__name__}")
            return Rejection(method, transaction, error, options)
        return Call(op, request, transaction, stream_topic, options, ask, raw_options)

    def _ask(self, message: InboundMessage, route: Route) -> tuple[AskTurn, dict[str, Any]]:
        """The turn and request parameters of a plain-text question to a preset."""
        name = route.topic.preset or ""
        if self.presets is None:
            raise UnknownPreset("no presets are configured on this bridge ([presets.<name>])")
        preset = self.presets.get(name)
        payload, message.payload = message.payload, b""
        question = question_text(payload)
        turn = AskTurn(
            name,
            preset,
            conversation_key(name, route.topic.suffix),
            f"ask:{name}/{route.topic.suffix}"[:200],
            question,
            reset=question == RESET,
        )
        return turn, self.presets.params(name, question)
