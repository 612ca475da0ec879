"""Secret redaction: every configured secret becomes `**********` in text, bytes and values.

A secret is hidden in each form a service host or a transformation could show it in: as it is,
JSON-escaped (`\\/`, or every character as `\\uXXXX`; each form also as it stands inside a JSON
string), percent-encoded (query, path and encodeURIComponent forms, either hex case) and base64
(each of the three alignments, standard and URL-safe alphabets). A
cut piece of a secret (its first or its last `MIN_PIECE` or more characters) is hidden too,
wherever it stands.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import MutableMapping
from typing import Any, AnyStr
from urllib.parse import quote, quote_plus

REDACTED = "**********"
MIN_SECRET = 4
"""Shorter values are not treated as secrets (they would redact ordinary text)."""
MIN_PIECE = 8
"""A piece this long of a secret's start or end counts as a leak and is redacted too (shorter
pieces, like `sk-proj`, are ordinary text in answers)."""


def secret_forms(secret: str) -> set[str]:
    """Every form of `secret` the bridge hides (see the module's docstring)."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret)[1:-1].replace("/", "\\/")}
    forms |= {
        "".join(f"\\u{ord(c):04x}" for c in secret),
        "".join(f"\\u{ord(c):04X}" for c in secret),
    }
    for safe in _URL_SAFE_SETS:
        for encoded in (quote(secret, safe=safe), quote_plus(secret, safe=safe)):
            forms |= {encoded, re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded)}
    raw = secret.encode("utf-8")
    for pad in range(3):
        # The characters that depend on the secret's bytes alone at this alignment.
        encoded_bytes = base64.b64encode(b"\0" * pad + raw)
        start, end = (0, 2, 3)[pad], ((pad + len(raw)) // 3) * 4
        core = encoded_bytes[start:end].decode("ascii")
        if len(core) >= MIN_PIECE:
            forms |= {core, core.replace("+", "-").replace("/", "_")}
    # Each form once more as it stands inside a JSON string (a `\\u` form shown as text).
    forms |= {json.dumps(form)[1:-1] for form in forms}
    return {form for form in forms if len(form) >= MIN_SECRET}


_URL_SAFE_SETS = ("", "/", "!'()*")
"""What URL encoders leave as is besides letters, digits and `-._~`: nothing (a query value),
`/` (a path, Python's default), `!'()*` (JavaScript's encodeURIComponent)."""


class Redactor:
    """Replaces every form of the configured secrets in strings, bytes and nested values."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self.secrets: list[str] = []
        self.set(secrets or [])

    def set(self, secrets: list[str]) -> None:
        """Replace the secrets to hide (longest form first, so a form containing another is
        replaced whole)."""
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)
        forms: set[str] = set()
        for secret in self.secrets:
            forms |= secret_forms(secret)
        self._forms = sorted(forms, key=len, reverse=True)
        self._cut = [s for s in self.secrets if len(s) > MIN_PIECE]
        """Secrets whose cut pieces (their start or end, MIN_PIECE characters or more) are
        looked for; a whole one is such a piece, so their raw form needs no scan of its own."""
        self._cut_bytes = [s.encode("utf-8") for s in self._cut]
        self._scanned = [form for form in self._forms if form not in self._cut]
        self._bytes = [form.encode("utf-8") for form in self._scanned]
        self.reach = max((len(form) for form in self._forms), default=1) - 1
        """Characters of earlier text that a form overlapping later text can start in."""
        marks = {f[:MIN_PIECE] for f in self._forms} | {s[-MIN_PIECE:] for s in self._cut}
        self._marks = re.compile("|".join(sorted(map(re.escape, marks)))) if marks else None
        """Any form's first and any secret's last MIN_PIECE characters: a text without one
        holds no secret nor a piece of one `text` or `spans` would find."""

    def marked(self, text: str, start: int = 0) -> bool:
        """Whether `text[start:]` may hold a secret or a piece of one (one regex search)."""
        return self._marks is not None and self._marks.search(text, start) is not None

    def spans(self, text: str, start: int) -> list[tuple[int, int]]:
        """Where `text` holds a form of a secret, or ends with a form's first MIN_PIECE or more
        characters, as (begin, end) pairs that end after `start`."""
        if not self.marked(text, max(start - self.reach, 0)):
            return []
        found = []
        size = len(text)
        for form in self._forms:
            at = text.find(form, max(start - len(form) + 1, 0))
            while at != -1:
                found.append((at, at + len(form)))
                at = text.find(form, at + 1)
            head = form[:MIN_PIECE]
            at = text.find(head, max(size - len(form) + 1, 0))
            while at != -1:
                if form.startswith(text[at:]):
                    found.append((at, size))
                    break
                at = text.find(head, at + 1)
        return [(begin, end) for begin, end in found if end > start]

    def text(self, value: str) -> str:
        """`value` with every secret replaced."""
        for form in self._scanned:
            if form in value:
                value = value.replace(form, REDACTED)
        for secret in self._cut:
            value = _cut_pieces(value, secret, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        """`value` (e.g. a reply payload) with every secret replaced."""
        for form in self._bytes:
            if form in value:
                value = value.replace(form, _REDACTED_BYTES)
        for secret_bytes in self._cut_bytes:
            value = _cut_pieces(value, secret_bytes, _REDACTED_BYTES)
        return value

    def any(self, value: Any) -> Any:
        """Redact strings inside dicts, lists and tuples; other values unchanged."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.any(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.any(v) for v in value]
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """structlog processor: redact every value of the event."""
        if self.secrets:
            # Values replaced in place (the keys stay); numbers and None need no look, and a
            # string without a mark (one regex search) none of `text`'s scans.
            marked = self.marked
            for key, val in event_dict.items():
                if type(val) is str:
                    if marked(val):
                        event_dict[key] = self.text(val)
                elif isinstance(val, dict | list | tuple | str):
                    event_dict[key] = self.any(val)
        return event_dict


_REDACTED_BYTES = REDACTED.encode()


class StreamScrubber:
    """Scrubs a stream's events one after the other, each string read on from what earlier
    events held at the same place (e.g. `choices.0.delta.content`): a secret split over events
    is masked from the event that brings its `MIN_PIECE`th character on, never passed whole in
    pieces. Nothing is held back (an event is published as soon as it is scrubbed)."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._tails: dict[tuple[Any, ...], str] = {}
        """The last `reach` characters shown at each place, as the service host sent them."""

    def any(self, value: Any, place: tuple[Any, ...] = ()) -> Any:
        """`value` (an event's data) with every secret and every continued piece of one masked."""
        if isinstance(value, str):
            return self._text(place, value)
        if isinstance(value, dict):
            return {k: self.any(v, (*place, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.any(v, (*place, i)) for i, v in enumerate(value)]
        return value

    def _text(self, place: tuple[Any, ...], text: str) -> str:
        redactor = self.redactor
        if not redactor.secrets:
            return text
        earlier = self._tails.get(place, "")
        joined = earlier + text
        if len(self._tails) < _MAX_PLACES or place in self._tails:
            self._tails[place] = joined[-redactor.reach :]
        if not redactor.marked(joined):
            return text  # the common case: one regex search over a few hundred characters
        start = len(earlier)
        masked = sorted(
            (max(b, start) - start, e - start) for b, e in redactor.spans(joined, start)
        )
        if not masked:
            return redactor.text(text)
        pieces, done = [], 0
        for begin, end in masked:
            if end <= done:
                continue
            if begin > done:
                pieces.append(text[done:begin])
            if begin >= done:
                pieces.append(REDACTED)
            done = end
        pieces.append(text[done:])
        return redactor.text("".join(pieces))


_MAX_PLACES = 256
"""Places in an event a stream scrubber remembers (an event's shape repeats; a hostile one
that does not cannot grow it without bound)."""


def _cut_pieces(value: AnyStr, secret: AnyStr, mask: AnyStr) -> AnyStr:
    """`value` with every cut piece of `secret` replaced by `mask`: a run of MIN_PIECE or more
    characters that is the secret's start, or its end, wherever it stands (at a value's end, or
    inside a JSON document or a sentence).

    Two `find`s over `value` when nothing is there; `value` is copied only on a hit.
    """
    first, last = secret[:MIN_PIECE], secret[-MIN_PIECE:]
    spans: list[tuple[int, int]] = []
    size, length = len(value), len(secret)
    at = value.find(first)
    while at != -1:
        end = at + MIN_PIECE
        while end < size and end - at < length and value[end] == secret[end - at]:
            end += 1
        spans.append((at, end))
        at = value.find(first, end)
    at = value.find(last)
    while at != -1:
        begin, known = at, length - MIN_PIECE
        while begin > 0 and known > 0 and value[begin - 1] == secret[known - 1]:
            begin, known = begin - 1, known - 1
        spans.append((begin, at + MIN_PIECE))
        at = value.find(last, at + MIN_PIECE)
    if not spans:
        return value
    pieces, done = [], 0
    for begin, end in sorted(spans):
        if end <= done:
            continue
        if begin > done:
            pieces.append(value[done:begin])
        pieces.append(mask)
        done = end
    pieces.append(value[done:])
    return value[:0].join(pieces)
