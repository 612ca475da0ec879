"""JSON payload -> multipart/form-data parts, the way the OpenAI API's form parser expects them.

Pure: no I/O. Files arrive base64 (an object, a data URL or a plain string); other values become
text parts. Arrays go as repeated `name[]` parts and objects as bracketed `name[key]` parts, the
"brackets" convention of the official SDKs (openai-python's `_serialize_multipartform`, openai-node,
openai-ruby since its PR #348, which reports that the API rejects an object sent as one JSON part:
"Additional properties are not allowed ('expires_after' was unexpected)"). The spec's own examples
agree: `-F "image[]=@a.png"`, `-F "timestamp_granularities[]=word"`,
`-F expires_after[anchor]="created_at"`. Where the spec's Encoding Object names a part's content
type (only `create-realtime-call`), that part is sent whole with that type instead.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import json
import math
import mimetypes
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bridge.errors import InvalidBase64, InvalidFile, InvalidParameter, MissingParameter
from bridge.methods.model import Operation
from bridge.service.models import FormPart

__all__ = [
    "decode_base64",
    "encode_form",
    "extension_for",
    "guess_content_type",
    "sniff_file_type",
]


# The spec's multipart Encoding Objects (operationId -> field -> contentType). Only
# create-realtime-call declares one; its curl example sends `session={...};type=application/json`.
PART_CONTENT_TYPES: dict[str, dict[str, str]] = {
    "create-realtime-call": {"sdp": "application/sdp", "session": "application/json"},
}

_FORMS_HINT = (
    "a base64 string, a data URL ('data:<type>;base64,...') or an object "
    '{"base64": "...", "filename": "...", "content_type": "..."}'
)
_OBJECT_KEYS = frozenset({"base64", "filename", "content_type"})
_SEED_FILENAME_KEY = "filename"

# --- base64 ------------------------------------------------------------------------------------

_B64_WHITESPACE = b" \t\n\r\f\v"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=\-_ \t\n\r\f\v]")
_DATA_AFTER_PAD = re.compile(r"=[ \t\n\r\f\v=]*[^ \t\n\r\f\v=]")


def decode_base64(field: str, text: str, *, offset: int = 0) -> bytes:
    """Standard or URL-safe base64, padding optional, whitespace ignored; InvalidBase64 if bad."""
    # Fast path without copies: canonical base64 decodes straight from the str (an upload's
    # text is tens of MiB, and the payload still holds it). Strict mode still accepts excess
    # '=' after a complete group, hence the guard; anything else takes the slow path.
    if len(text) % 4 == 0 and not text.endswith("==="):
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except ValueError:  # binascii.Error, or a non-ASCII str
            pass
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise InvalidBase64(
            field,
            f"field {field!r}: invalid base64 at index {offset + exc.start}: "
            f"{text[exc.start]!r} is not in the base64 alphabet",
        ) from None
    # One pass maps the URL-safe alphabet onto the standard one and drops whitespace, so the
    # decoder below can run in strict mode; `raw` is released before padding makes a new copy.
    buf = raw.translate(_URLSAFE_TO_STANDARD, _B64_WHITESPACE)
    del raw
    n = len(buf)
    pads = 0
    while pads < 3 and pads < n and buf[n - 1 - pads] == 0x3D:
        pads += 1
    data_len = n - pads
    needed = -data_len % 4
    if data_len % 4 == 1 or pads > needed:
        raise InvalidBase64(field, _describe_b64_error(field, text, offset))
    if pads < needed:
        buf += b"=" * (needed - pads)
    try:
        return binascii.a2b_base64(buf, strict_mode=True)
    except binascii.Error:
        raise InvalidBase64(field, _describe_b64_error(field, text, offset)) from None


def _describe_b64_error(field: str, text: str, offset: int) -> str:
    prefix = f"field {field!r}: invalid base64 at index"
    bad = _NOT_B64.search(text)
    if bad is not None:
        return f"{prefix} {offset + bad.start()}: {bad.group()!r} is not in the base64 alphabet"
    early = _DATA_AFTER_PAD.search(text)
    if early is not None:
        return f"{prefix} {offset + early.start()}: padding '=' before the end of the data"
    body = text.rstrip("= \t\n\r\f\v")
    chars = len(body) - sum(body.count(c) for c in " \t\n\r\f\v")
    if chars % 4 == 1:
        return (
            f"{prefix} {offset + len(body) - 1}: the data is truncated "
            "(a lone character after the last complete 4-character group)"
        )
    return f"{prefix} {offset + len(body)}: too much '=' padding"


# --- file types --------------------------------------------------------------------------------

# Extensions whose content type the OpenAI audio/file endpoints care about, which Python's built-in
# table lacks or names differently (`audio/x-wav`); (audio/other, video) pairs depend on whether
# the operation is about video.
_EXT_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "mpga": "audio/mpeg",
    "m4a": "audio/mp4",
    "ogg": "audio/ogg",
    "oga": "audio/ogg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "jsonl": "application/jsonl",
    "json": "application/json",
    "md": "text/markdown",
    "webp": "image/webp",
}
_EXT_AV_TYPES: dict[str, tuple[str, str]] = {
    "mp4": ("audio/mp4", "video/mp4"),
    "webm": ("audio/webm", "video/webm"),
    "mpeg": ("audio/mpeg", "video/mpeg"),
}


# A private table built from Python's defaults only: `mimetypes.guess_type` also reads
# /etc/mime.types, which would make the answer depend on the machine.
@functools.cache
def _mime() -> mimetypes.MimeTypes:
    """The private MIME table (Python's defaults), built on first use: it costs ~10 ms at start."""
    return mimetypes.MimeTypes()


# Content type -> extension where the inverse of the tables above is ambiguous or missing.
_TYPE_EXT: dict[str, str] = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mp4": "m4a",
    "audio/x-m4a": "m4a",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/webm": "webm",
    "video/webm": "webm",
    "video/mp4": "mp4",
    "video/mpeg": "mpeg",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "text/plain": "txt",
    "text/markdown": "md",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/json": "json",
}
_TEXT_PROBE = 4096
_JSONL_PROBE = 65536
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def guess_content_type(filename: str, *, video: bool = False) -> str | None:
    """Content type for `filename`'s extension, or None when the extension is unknown."""
    dot = filename.rfind(".")
    if dot < 0 or "/" in filename[dot:]:
        return None
    ext = filename[dot + 1 :].lower()
    if ext in _EXT_TYPES:
        return _EXT_TYPES[ext]
    if ext in _EXT_AV_TYPES:
        return _EXT_AV_TYPES[ext][1 if video else 0]
    return _mime().guess_type("x." + ext, strict=False)[0]


def extension_for(content_type: str) -> str | None:
    """A file extension (without dot) for `content_type`, or None when there is no usual one."""
    base = content_type.partition(";")[0].strip().lower()
    if base in _TYPE_EXT:
        return _TYPE_EXT[base]
    ext = _mime().guess_extension(base, strict=False)
    return ext[1:] if ext else None


def sniff_file_type(data: bytes, *, video: bool = False) -> tuple[str, str] | None:
    """(extension, content type) recognised from the bytes' magic numbers, or None."""
    head = data[:64]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav", "audio/wav"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", "image/webp"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] in _MP3_SYNC):
        return "mp3", "audio/mpeg"
    if head[:4] == b"OggS":
        return "ogg", "audio/ogg"
    if head[:4] == b"fLaC":
        return "flac", "audio/flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm", "video/webm" if video else "audio/webm"
    if head[4:8] == b"ftyp":
        if head[8:11] in (b"M4A", b"M4B"):
            return "m4a", "audio/mp4"
        return "mp4", "video/mp4" if video else "audio/mp4"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", "image/png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpg", "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif", "image/gif"
    if head[:5] == b"%PDF-":
        return "pdf", "application/pdf"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip", "application/zip"
    return _sniff_text(data)


# MPEG audio frame sync: 0xFF then 111x x01x (Layer III) for MPEG-1, MPEG-2 and MPEG-2.5.
_MP3_SYNC = frozenset({0xFB, 0xFA, 0xF3, 0xF2, 0xE3, 0xE2})


def _sniff_text(data: bytes) -> tuple[str, str] | None:
    # The files endpoint checks extensions (fine-tune and batch need .jsonl, assistants reject
    # .bin), so UTF-8 text without a name gets one the API accepts.
    try:
        head = codecs.getincrementaldecoder("utf-8")().decode(data[:_TEXT_PROBE], final=False)
    except UnicodeDecodeError:
        return None
    if not head or _CONTROL.search(head):
        return None
    if head.lstrip().startswith("{"):
        end = data.find(b"\n", 0, _JSONL_PROBE)
        if end < 0 and len(data) <= _JSONL_PROBE:
            end = len(data)
        if end >= 0:
            try:
                first = json.loads(data[:end])
            except ValueError:
                first = None
            if isinstance(first, dict):
                return "jsonl", "application/jsonl"
    return "txt", "text/plain"


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[^\x00-\x1f\x7f]*)?")
_FILENAME_BAD = re.compile(r"[\x00-\x1f\x7f]")
_NAME_BAD = re.compile(r'[\x00-\x1f\x7f"]')

# --- encoding ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _FileSpec:
    data: bytes
    filename: str | None
    content_type: str | None


def encode_form(op: Operation, fields: dict[str, Any]) -> tuple[FormPart, ...]:
    """The multipart parts for `fields`, in payload order, with files decoded from base64."""
    file_fields = set(op.file_fields)
    for name in op.file_fields:
        absent = fields.get(name) is None and fields.get(f"{name}[]") is None
        if name in op.required_fields and absent:
            raise MissingParameter(name)
    seed_name_target = _seed_filename_target(op, fields)
    typed = PART_CONTENT_TYPES.get(op.name, {})
    video = "video" in op.name.lower()
    parts: list[FormPart] = []
    for name, value in fields.items():
        if value is None:
            continue
        if _NAME_BAD.search(name) is not None:
            # A control character or quote would end the part's header early (or be rewritten
            # by the HTTP library): the device's mistake, refused as such.
            raise InvalidParameter(
                name[:60], f"form field name {name[:60]!r} holds a control character or a quote"
            )
        if name in file_fields:
            if isinstance(value, list):
                _check_takes_several(op, name)
            parts.extend(_file_parts(name, value, fields, seed_name_target == name, video))
        elif name.endswith("[]") and name[:-2] in file_fields:
            # The curl spelling `image[]` of an array file field.
            _check_takes_several(op, name[:-2])
            items = value if isinstance(value, list) else [value]
            parts.extend(_file_parts(name[:-2], items, fields, False, video))
        elif name == _SEED_FILENAME_KEY and seed_name_target is not None:
            continue
        elif name in typed:
            parts.append(_typed_part(name, value, typed[name]))
        elif isinstance(value, list) and name.endswith("[]"):
            # A payload key already spelled `name[]` must not become `name[][]`.
            parts.extend(_text_parts(name[:-2], value))
        else:
            parts.extend(_text_parts(name, value))
    return tuple(parts)


def _check_takes_several(op: Operation, name: str) -> None:
    if name not in op.multi_file_fields:
        raise InvalidFile(
            name, f"field {name!r} of {op.name} takes one file, not an array; send {_FORMS_HINT}"
        )


def _seed_filename_target(op: Operation, fields: dict[str, Any]) -> str | None:
    # Seed 0.3.9 sent {"file": "<b64>", "filename": "a.wav"}: a top-level `filename` names the
    # first file given as a bare string, unless the operation has a real field of that name.
    if _SEED_FILENAME_KEY not in fields or _SEED_FILENAME_KEY in op.body_fields:
        return None
    if _SEED_FILENAME_KEY in op.file_fields:
        return None
    for name, value in fields.items():
        if name in op.file_fields and isinstance(value, str) and value:
            return name
    return None


def _file_parts(
    name: str, value: Any, fields: dict[str, Any], use_seed_name: bool, video: bool
) -> Iterator[FormPart]:
    if isinstance(value, list):
        if not value:
            raise InvalidFile(name, f"field {name!r}: the array holds no files; send {_FORMS_HINT}")
        for i, item in enumerate(value):
            spec = _read_file(name, f"{name}[{i}]", item)
            yield _file_part(f"{name}[]", name, spec, video)
        return
    spec = _read_file(name, name, value)
    if use_seed_name and spec.filename is None:
        given = fields[_SEED_FILENAME_KEY]
        if not isinstance(given, str) or not given or _FILENAME_BAD.search(given):
            raise InvalidParameter(
                _SEED_FILENAME_KEY,
                f"{_SEED_FILENAME_KEY!r} names the file in field {name!r} and must be a "
                "non-empty string without control characters",
            )
        spec.filename = given
    yield _file_part(name, name, spec, video)


def _file_part(part_name: str, field: str, spec: _FileSpec, video: bool) -> FormPart:
    # Precedence for each of name and type: what the caller gave, then what the other given value
    # implies, then the bytes' magic numbers, then a neutral default.
    filename = spec.filename
    content_type = spec.content_type
    if content_type is None and filename is not None:
        content_type = guess_content_type(filename, video=video)
    if filename is None and content_type is not None:
        ext = extension_for(content_type)
        filename = f"{field}.{ext}" if ext else None
    if filename is None or content_type is None:
        sniffed = sniff_file_type(spec.data, video=video)
        if filename is None:
            filename = f"{field}.{sniffed[0] if sniffed else 'bin'}"
        if content_type is None:
            content_type = sniffed[1] if sniffed else "application/octet-stream"
    return FormPart(part_name, spec.data, filename, content_type)


def _read_file(field: str, label: str, value: Any) -> _FileSpec:
    if isinstance(value, str):
        return _read_file_string(field, label, value, None, None)
    if isinstance(value, dict):
        b64 = value.get("base64")
        if not isinstance(b64, str) or not b64:
            raise InvalidFile(
                field,
                f"field {label!r}: an object needs a non-empty string 'base64'; send {_FORMS_HINT}",
            )
        unknown = sorted(set(value) - _OBJECT_KEYS)
        if unknown:
            raise InvalidFile(
                field,
                f"field {label!r}: unknown keys {unknown} in the file object; send {_FORMS_HINT}",
            )
        filename = _optional_text(field, label, value, "filename")
        content_type = _optional_text(field, label, value, "content_type")
        if filename is not None and _FILENAME_BAD.search(filename):
            raise InvalidFile(field, f"field {label!r}: filename contains control characters")
        if content_type is not None and not _MEDIA_TYPE.fullmatch(content_type):
            raise InvalidFile(
                field, f"field {label!r}: content_type {content_type!r} is not a media type"
            )
        return _read_file_string(field, label, b64, filename, content_type)
    kind = "an array" if isinstance(value, list) else type(value).__name__
    raise InvalidFile(field, f"field {label!r}: got {kind}; send {_FORMS_HINT}")


def _optional_text(field: str, label: str, obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidFile(field, f"field {label!r}: {key!r} must be a non-empty string")
    return value


def _read_file_string(
    field: str, label: str, text: str, filename: str | None, content_type: str | None
) -> _FileSpec:
    if not text:
        raise InvalidFile(field, f"field {label!r}: the string is empty; send {_FORMS_HINT}")
    if text[:5].lower() == "data:":
        data, url_type, url_name = _read_data_url(field, label, text)
        content_type = content_type or url_type
        filename = filename or url_name
    elif text[:8].lower().startswith(("https://", "http://")):
        raise InvalidFile(
            field,
            f"field {label!r}: URLs are not fetched; send the file's bytes as {_FORMS_HINT}",
        )
    else:
        _refuse_path(field, label, text)
        data = decode_base64(field, text)
    if not data:
        raise InvalidFile(field, f"field {label!r}: the file is empty")
    return _FileSpec(data, filename, content_type)


# A local path given where the file's base64 belongs: "/home/pi/rec/door1", "./a.wav", "~/x",
# "C:\\x". Only short strings count: real base64 of any plausible file (a JPEG's starts "/9j/")
# is far longer, and a path is not.
_PATH_LIKE = re.compile(
    r"(?:~|\.{1,2})?(?:/[\w.\- ]+)+/?"  # /home/pi/rec/door1, ./a.wav, ../x, ~/rec/a.wav
    r"|[A-Za-z]:[\\/].*"  # C:\\rec\\a.wav
    r"|[\w.-]+(?:/[\w.-]+)*\.[A-Za-z0-9]{1,5}"  # rec/a.wav, hello.wav
)
_PATH_MAX_CHARS = 256


def _refuse_path(field: str, label: str, text: str) -> None:
    """InvalidFile when `text` reads as a file path rather than base64 (it would decode to junk)."""
    if len(text) > _PATH_MAX_CHARS or not _PATH_LIKE.fullmatch(text):
        return
    raise InvalidFile(
        field,
        f"field {label!r}: {text[:80]!r} looks like a file path, but files go in as base64 (the "
        "bridge cannot read the sender's files): send the file's base64 text, e.g. from "
        f"`base64 -w0 FILE`, or use `openai-mqtt-bridge call METHOD --file {label}=FILE`",
    )


def _read_data_url(field: str, label: str, text: str) -> tuple[bytes, str | None, str | None]:
    comma = text.find(",")
    if comma < 0:
        raise InvalidFile(field, f"field {label!r}: a data URL needs a ',' before its data")
    params = [p.strip() for p in text[5:comma].split(";")]
    is_b64 = len(params) > 1 and params[-1].lower() == "base64"
    if is_b64:
        params.pop()
    filename: str | None = None
    type_params: list[str] = []
    for param in params[1:]:
        key, eq, val = param.partition("=")
        if eq and key.strip().lower() in ("name", "filename"):
            filename = urllib.parse.unquote(val.strip().strip('"')) or None
        elif param:
            type_params.append(param)
    media_type = "; ".join([params[0], *type_params]) if params[0] else None
    if media_type is not None and not _MEDIA_TYPE.fullmatch(media_type):
        raise InvalidFile(
            field, f"field {label!r}: data URL media type {media_type!r} is not a media type"
        )
    if filename is not None and _FILENAME_BAD.search(filename):
        raise InvalidFile(field, f"field {label!r}: data URL filename contains control characters")
    if is_b64:
        data = decode_base64(field, text[comma + 1 :], offset=comma + 1)
    else:
        data = urllib.parse.unquote_to_bytes(text[comma + 1 :])
    return data, media_type, filename


def _typed_part(name: str, value: Any, content_type: str) -> FormPart:
    if isinstance(value, str):
        return FormPart(name, value.encode(), None, content_type)
    if content_type == "application/json":
        return FormPart(name, _json_text(name, value).encode(), None, content_type)
    raise InvalidParameter(name, f"field {name!r} must be a string ({content_type})")


def _text_parts(name: str, value: Any) -> Iterator[FormPart]:
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            yield from _text_parts(f"{name}[]", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _text_parts(f"{name}[{key}]", item)
    else:
        yield FormPart(name, _scalar_text(name, value).encode())


def _scalar_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidParameter(name, f"field {name!r}: {value!r} is not a finite number")
        return repr(value)
    raise InvalidParameter(
        name, f"field {name!r}: a {type(value).__name__} cannot be sent as a form field"
    )


def _json_text(name: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(name, f"field {name!r} cannot be sent as JSON: {exc}") from None
