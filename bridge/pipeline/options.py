"""The reserved `_bridge` request key: reply options, parsed and checked before anything is sent.

A request may carry `"_bridge": {...}`. The key is removed from the payload like `transaction`
(never sent upstream; no API field starts with an underscore) and turned into a frozen
`ReplyOptions`. Every problem is `invalid_parameter`, raised before any HTTP request.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bridge.errors import InvalidParameter, SelectTooCostly, SelectTooLarge

if TYPE_CHECKING:
    import jmespath.parser

OPTIONS_KEY = "_bridge"
"""The reserved payload key holding the options."""

ReplyFormat = Literal["json", "plain", "raw"]
FORMATS: tuple[ReplyFormat, ...] = ("json", "plain", "raw")

MAX_SELECT_CHARS = 1024
"""Longest accepted `select` expression (bounds the parser's recursion)."""
MAX_SELECT_RESULT_BYTES = 4 << 20
"""What a `select` may produce (its JSON size, counted before anything is built); more is
`select_too_large`: a short expression can otherwise double its output at every level."""
MAX_SELECT_STEPS = 100_000
"""Default `[limits] max_select_steps`: AST nodes a `select` may evaluate on one answer (a node
inside a projection counts once per element), which bounds its time and what it builds."""
BOOLEAN_FUNCTIONS = frozenset({"contains", "starts_with", "ends_with"})
"""Functions whose result is true or false, so that a literal argument never reaches the reply."""
MIN_MAX_BYTES = 32
"""Smallest `max_bytes`: the longest `ERROR <code>: ` plus the cut marker still fits."""
MIN_CHUNK_BYTES = 128
"""Smallest `chunk_bytes`: bounds the messages one answer becomes (1 MiB -> at most 8192)."""
MAX_PACKET_BYTES = 268_435_455
"""MQTT's largest packet; no payload limit can usefully be larger."""
MAX_WAIT_SECONDS = 7 * 86400.0
"""Longest `wait.timeout` accepted (a batch may take 24 h; a fine-tuning job longer)."""


@dataclass(frozen=True, slots=True)
class WaitOptions:
    """`wait`: follow the job the call starts to its end; None fields take the config's values."""

    timeout: float | None = None
    """Seconds from the call to giving up with `job_timeout` (the job goes on upstream)."""


@dataclass(frozen=True, slots=True)
class Selection:
    """A compiled JMESPath expression and its source text."""

    expression: str
    compiled: jmespath.parser.ParsedResult
    max_steps: int = MAX_SELECT_STEPS
    """Evaluation steps allowed on one answer; more is SelectTooCostly."""

    def search(self, data: Any) -> Any:
        """The selected value; `None` when nothing matches or the expression fails on `data`.

        Raises SelectTooLarge when the value would be larger than MAX_SELECT_RESULT_BYTES, and
        SelectTooCostly when evaluating it takes more than `max_steps` steps.
        """
        import jmespath.exceptions  # here, not at the top: only a `select` needs it (start-up)

        try:
            interpreter = _counting_interpreter()(_bounded_options(), self.max_steps)
            found = interpreter.visit(self.compiled.parsed, data)
        except (jmespath.exceptions.JMESPathError, RecursionError, ArithmeticError, TypeError):
            # A type error on this answer's data must not hide a paid answer behind an error;
            # jmespath lets some escape as Python's own (`max_by` over mixed types: TypeError,
            # `floor` of an infinite sum: OverflowError).
            return None
        _check_size(found, MAX_SELECT_RESULT_BYTES)
        return found


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """What the request asked the bridge to do with the reply (defaults: the JSON envelope)."""

    select: Selection | None = None
    format: ReplyFormat = "json"
    max_bytes: int | None = None
    """`plain` only: the largest payload; longer text is cut on a UTF-8 boundary and marked."""
    chunk_bytes: int | None = None
    """`raw` only: send the bytes as numbered chunks of at most this size, then an end message."""
    wait: WaitOptions | None = None
    """Job operations only: poll the job to its end, progress on the stream topic, one reply."""
    tools: tuple[str, ...] = ()
    """Names of `[tools.<name>]` the model may call (createChatCompletion, createResponse)."""
    allow_dangerous: frozenset[str] = frozenset()
    """Tools marked `dangerous` this request allows."""
    dry_run: bool = False
    """Run the tool loop without publishing: calls report what they would have sent."""

    @property
    def is_default(self) -> bool:
        """Whether the reply is the plain JSON envelope with nothing changed."""
        return self == DEFAULT_OPTIONS


DEFAULT_OPTIONS = ReplyOptions()


def pop_options(params: dict[str, Any]) -> ReplyOptions:
    """Remove `_bridge` from `params` and return the options it holds (defaults when absent)."""
    if OPTIONS_KEY not in params:
        return DEFAULT_OPTIONS
    return parse_options(params.pop(OPTIONS_KEY))


def parse_options(value: Any, max_select_steps: int = MAX_SELECT_STEPS) -> ReplyOptions:
    """The options in a `_bridge` value; raise InvalidParameter for anything not accepted."""
    if value is None:
        return DEFAULT_OPTIONS
    if not isinstance(value, dict):
        raise _invalid("", f"must be a JSON object, got {_json_type(value)}")
    unknown = sorted(k for k in value if k not in _KNOWN_KEYS)
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise _invalid(
            "",
            f"unknown option(s) {names}{_did_you_mean(unknown[0], _KNOWN_KEYS)}; "
            f"known: {', '.join(sorted(_KNOWN_KEYS))}",
        )
    select = _parse_select(value.get("select"), max_select_steps)
    fmt = _parse_format(value.get("format"))
    max_bytes = _parse_size("max_bytes", value.get("max_bytes"), MIN_MAX_BYTES)
    chunk_bytes = _parse_size("chunk_bytes", value.get("chunk_bytes"), MIN_CHUNK_BYTES)
    if max_bytes is not None and fmt != "plain":
        raise _invalid("max_bytes", 'applies to "format": "plain" only')
    if chunk_bytes is not None and fmt != "raw":
        raise _invalid("chunk_bytes", 'applies to "format": "raw" only')
    wait = _parse_wait(value.get("wait"))
    tools = _parse_names("tools", value.get("tools"))
    allow_dangerous = _parse_names("allow_dangerous", value.get("allow_dangerous"))
    dry_run = value.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _invalid("dry_run", f"must be true or false, got {_json_type(dry_run)}")
    if (allow_dangerous or dry_run) and not tools:
        raise _invalid("tools", "must name the tools that allow_dangerous and dry_run apply to")
    return ReplyOptions(
        select=select,
        format=fmt,
        max_bytes=max_bytes,
        chunk_bytes=chunk_bytes,
        wait=wait,
        tools=tools,
        allow_dangerous=frozenset(allow_dangerous),
        dry_run=dry_run,
    )


MAX_TOOLS = 32
"""Most tools one request may offer the model."""


def _parse_names(option: str, value: Any) -> tuple[str, ...]:
    """A list of tool names (strings, no repeats, at most MAX_TOOLS)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _invalid(option, "must be a list of tool names")
    if len(value) > MAX_TOOLS:
        raise _invalid(option, f"may name at most {MAX_TOOLS} tools")
    return tuple(dict.fromkeys(value))


_KNOWN_KEYS = frozenset(
    {"select", "format", "max_bytes", "chunk_bytes", "wait", "tools", "allow_dangerous", "dry_run"}
)


def _did_you_mean(name: str, known: frozenset[str]) -> str:
    """ " (did you mean X?)" for a misspelt option `name`, or ""."""
    import difflib

    close = difflib.get_close_matches(name[:40].lower(), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


_WAIT_KEYS = frozenset({"timeout"})


def _parse_wait(value: Any) -> WaitOptions | None:
    """`wait`: true, false/null, or an object with `timeout` (seconds)."""
    if value is None or value is False:
        return None
    if value is True:
        return WaitOptions()
    if not isinstance(value, dict):
        raise _invalid(
            "wait", f'must be true or an object like {{"timeout": 600}}, got {_json_type(value)}'
        )
    unknown = sorted(k for k in value if k not in _WAIT_KEYS)
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise _invalid("wait", f"has unknown key(s) {names}; known: timeout")
    timeout = value.get("timeout")
    if timeout is None:
        return WaitOptions()
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise _invalid("wait.timeout", f"must be a number of seconds, got {_json_type(timeout)}")
    if not 0 < timeout <= MAX_WAIT_SECONDS:
        raise _invalid("wait.timeout", f"must be more than 0 and at most {MAX_WAIT_SECONDS:.0f} s")
    return WaitOptions(timeout=float(timeout))


def error_options(value: Any) -> ReplyOptions:
    """The options to render the error about a refused `_bridge` value in: its valid parts.

    A device that asked for plain text gets the error as plain text even when, say, its
    `select` did not compile; anything unusable falls back to the JSON envelope.
    """
    if not isinstance(value, dict):
        return DEFAULT_OPTIONS
    try:
        fmt = _parse_format(value.get("format"))
    except InvalidParameter:
        return DEFAULT_OPTIONS
    try:
        max_bytes = _parse_size("max_bytes", value.get("max_bytes"), MIN_MAX_BYTES)
    except InvalidParameter:
        max_bytes = None
    return ReplyOptions(format=fmt, max_bytes=max_bytes if fmt == "plain" else None)


def compile_select(expression: str, max_steps: int = MAX_SELECT_STEPS) -> Selection:
    """Compile a JMESPath expression; raise InvalidParameter when it is not one we can run."""
    if not expression:
        raise _invalid("select", "must not be empty")
    if len(expression) > MAX_SELECT_CHARS:
        raise _invalid("select", f"is longer than {MAX_SELECT_CHARS} characters")
    import jmespath  # here, not at the top: only a `select` needs it (start-up)
    import jmespath.exceptions

    try:
        with warnings.catch_warnings():
            # jmespath only warns about the deprecated unquoted `literal`; refuse it instead.
            warnings.simplefilter("error", PendingDeprecationWarning)
            compiled = jmespath.compile(expression)
    except PendingDeprecationWarning:
        raise _invalid("select", 'uses the deprecated `literal` form; quote it: `"text"`') from None
    except jmespath.exceptions.JMESPathError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise _invalid("select", f"is not a JMESPath expression: {detail}") from None
    except RecursionError:
        raise _invalid("select", "is nested too deeply") from None
    unknown = _unknown_functions(compiled.parsed)
    if unknown:
        raise _invalid("select", f"calls unknown JMESPath function(s) {', '.join(unknown)}")
    if _literal_in_output(compiled.parsed):
        raise _invalid(
            "select",
            "may not put a literal ('text' or `json`) into the reply: select from the answer; "
            "literals are allowed in comparisons and in contains/starts_with/ends_with",
        )
    return Selection(expression, compiled, max_steps)


def _literal_in_output(node: Any) -> bool:
    """Whether a literal can reach the result: anywhere but under a comparison or a function
    whose result is a boolean (a reply of the requester's own text, under the bridge's name)."""
    pending = [node]
    while pending:
        item = pending.pop()
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "literal":
            return True
        if kind == "comparator" or (
            kind == "function_expression" and item.get("value") in BOOLEAN_FUNCTIONS
        ):
            continue
        pending.extend(item.get("children", ()))
    return False


def _check_size(value: Any, limit: int) -> None:
    """Raise SelectTooLarge when `value` as JSON would exceed `limit` bytes (a bounded walk:
    shared references count at each place, as they would once serialized)."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            total += 2 + len(item)
            pending.extend(item)
        else:
            total += 8
        if total > limit:
            raise SelectTooLarge(
                f"select would produce more than {limit} bytes; select less of the answer"
            )


@functools.cache
def _counting_interpreter() -> Any:
    """jmespath's interpreter counting every node it visits, stopping at a budget.

    A projection visits its right side once per element, so the budget bounds the elements a
    select can make as well as its time: `[@,@] | [*].[@,@] | []`, repeated, doubles a list at
    every stage (20 stages: a million elements, 128 MiB and seconds of CPU from a 2-byte answer).
    """
    import jmespath.visitor

    class CountingInterpreter(jmespath.visitor.TreeInterpreter):
        def __init__(self, options: Any, budget: int) -> None:
            super().__init__(options)
            self._budget = budget
            self._left = budget

        def visit(self, node: Any, *args: Any, **kwargs: Any) -> Any:
            self._left -= 1
            if self._left < 0:
                raise SelectTooCostly(
                    f"select needs more than [limits] max_select_steps = {self._budget} steps "
                    "on this answer; select less of it"
                )
            return super().visit(node, *args, **kwargs)

    return CountingInterpreter


@functools.cache
def _bounded_options() -> Any:
    """jmespath options whose string-building functions check their output size first."""
    import jmespath
    import jmespath.functions

    class BoundedFunctions(jmespath.functions.Functions):
        @jmespath.functions.signature({"types": []})
        def _func_to_string(self, arg: Any) -> Any:
            _check_size(arg, MAX_SELECT_RESULT_BYTES)
            # As jmespath's own to_string writes it.
            return (
                arg if isinstance(arg, str) else json.dumps(arg, separators=(",", ":"), default=str)
            )

        @jmespath.functions.signature({"types": ["string"]}, {"types": ["array-string"]})
        def _func_join(self, separator: str, array: list[str]) -> str:
            size = len(separator) * max(len(array) - 1, 0) + sum(map(len, array))
            if size > MAX_SELECT_RESULT_BYTES:
                raise SelectTooLarge(
                    f"select would produce more than {MAX_SELECT_RESULT_BYTES} bytes; "
                    "select less of the answer"
                )
            return separator.join(array)

    return jmespath.Options(custom_functions=BoundedFunctions())


def _parse_select(value: Any, max_steps: int) -> Selection | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid("select", f"must be a JMESPath expression string, got {_json_type(value)}")
    return compile_select(value, max_steps)


def _parse_format(value: Any) -> ReplyFormat:
    if value is None:
        return "json"
    for fmt in FORMATS:
        if value == fmt and isinstance(value, str):
            return fmt
    shown = repr(value[:40]) if isinstance(value, str) else _json_type(value)
    raise _invalid("format", f'must be "json", "plain" or "raw", got {shown}')


def _parse_size(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"must be an integer number of bytes, got {_json_type(value)}")
    if not minimum <= value <= MAX_PACKET_BYTES:
        raise _invalid(name, f"must be from {minimum} to {MAX_PACKET_BYTES} bytes")
    return value


def _unknown_functions(node: Any) -> list[str]:
    """Names of the functions an expression's AST calls that jmespath does not provide."""
    import jmespath.functions  # here, not at the top: only a `select` needs it (start-up)

    known = jmespath.functions.Functions.FUNCTION_TABLE
    unknown: list[str] = []
    pending = [node]
    while pending:
        item = pending.pop()
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_expression":
            name = str(item.get("value"))
            if name not in known and name not in unknown:
                unknown.append(name[:40])
        pending.extend(item.get("children", ()))
    return sorted(unknown)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid(option: str, problem: str) -> InvalidParameter:
    name = f"{OPTIONS_KEY}.{option}" if option else OPTIONS_KEY
    return InvalidParameter(name, f"{name} {problem}")
