"""bridge.pipeline.multipart: payload fields -> multipart parts, base64, file names and types."""

from __future__ import annotations

import base64
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import InvalidBase64, InvalidFile, InvalidParameter, MissingParameter
from bridge.methods.model import Operation
from bridge.pipeline.multipart import (
    decode_base64,
    encode_form,
    extension_for,
    guess_content_type,
    sniff_file_type,
)
from bridge.service.models import FormPart


def make_op(
    name: str = "createTranscription",
    file_fields: tuple[str, ...] = ("file",),
    required: tuple[str, ...] = ("file", "model"),
    body_fields: tuple[str, ...] = ("file", "model", "language", "timestamp_granularities"),
    multi_file_fields: tuple[str, ...] = (),
) -> Operation:
    return Operation(
        name=name,
        verb="POST",
        path="/x",
        group="audio",
        path_params=(),
        query_params=(),
        request_kind="multipart",
        required_fields=required,
        body_fields=body_fields,
        file_fields=file_fields,
        response_kind="json",
        streams=False,
        beta=None,
        deprecated=False,
        retired=False,
        multi_file_fields=multi_file_fields,
    )


TRANSCRIBE = make_op()
IMAGE_EDIT = make_op(
    "createImageEdit",
    file_fields=("image", "mask"),
    required=("prompt", "image"),
    body_fields=("image", "prompt", "mask", "n", "size"),
    multi_file_fields=("image",),
)
VIDEO_EDIT = make_op(
    "CreateVideoEdit", file_fields=("video",), required=("video", "prompt"), body_fields=()
)
REALTIME_CALL = make_op(
    "create-realtime-call", file_fields=(), required=("sdp",), body_fields=("sdp", "session")
)

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(32))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(16)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def text_parts(parts: tuple[FormPart, ...]) -> list[tuple[str, str]]:
    return [(p.name, p.value.decode()) for p in parts if p.filename is None]


def only_file(parts: tuple[FormPart, ...]) -> FormPart:
    files = [p for p in parts if p.filename is not None]
    assert len(files) == 1
    return files[0]


# --- file forms --------------------------------------------------------------------------------


def test_object_form_with_filename_and_type() -> None:
    parts = encode_form(
        TRANSCRIBE,
        {
            "file": {"base64": b64(WAV), "filename": "clip.wav", "content_type": "audio/x-wav"},
            "model": "whisper-1",
        },
    )
    assert parts == (
        FormPart("file", WAV, "clip.wav", "audio/x-wav"),
        FormPart("model", b"whisper-1"),
    )


def test_object_form_defaults_come_from_magic_numbers() -> None:
    part = only_file(encode_form(TRANSCRIBE, {"file": {"base64": b64(WAV)}, "model": "m"}))
    assert (part.filename, part.content_type) == ("file.wav", "audio/wav")


def test_object_form_null_filename_and_type_mean_absent() -> None:
    value = {"base64": b64(PNG), "filename": None, "content_type": None}
    part = only_file(encode_form(IMAGE_EDIT, {"image": value, "prompt": "p"}))
    assert (part.filename, part.content_type) == ("image.png", "image/png")


def test_data_url_gives_type_and_name() -> None:
    part = only_file(
        encode_form(TRANSCRIBE, {"file": "data:audio/wav;base64," + b64(WAV), "model": "m"})
    )
    assert part == FormPart("file", WAV, "file.wav", "audio/wav")


def test_data_url_type_wins_over_magic_for_name_and_type() -> None:
    part = only_file(
        encode_form(TRANSCRIBE, {"file": "data:audio/mpeg;base64," + b64(WAV), "model": "m"})
    )
    assert (part.filename, part.content_type) == ("file.mp3", "audio/mpeg")


def test_data_url_name_parameter() -> None:
    url = "data:audio/wav;name=my%20clip.wav;base64," + b64(WAV)
    part = only_file(encode_form(TRANSCRIBE, {"file": url, "model": "m"}))
    assert (part.filename, part.content_type) == ("my clip.wav", "audio/wav")


def test_data_url_without_media_type_sniffs() -> None:
    part = only_file(encode_form(TRANSCRIBE, {"file": "data:;base64," + b64(WAV), "model": "m"}))
    assert (part.filename, part.content_type) == ("file.wav", "audio/wav")


def test_percent_encoded_data_url() -> None:
    part = only_file(encode_form(TRANSCRIBE, {"file": "data:text/plain,hi%20there", "model": "m"}))
    assert part == FormPart("file", b"hi there", "file.txt", "text/plain")


def test_data_url_error_offsets_count_from_the_string_start() -> None:
    url = "data:audio/wav;base64,AAAA!AAA"
    with pytest.raises(InvalidBase64, match=r"index 26"):
        encode_form(TRANSCRIBE, {"file": url, "model": "m"})


def test_plain_base64_with_seed_sibling_filename() -> None:
    parts = encode_form(TRANSCRIBE, {"filename": "a.m4a", "file": b64(WAV), "model": "m"})
    assert parts == (FormPart("file", WAV, "a.m4a", "audio/mp4"), FormPart("model", b"m"))


def test_seed_sibling_filename_kept_when_file_is_an_object() -> None:
    fields = {"file": {"base64": b64(WAV)}, "filename": "a.wav", "model": "m"}
    parts = encode_form(TRANSCRIBE, fields)
    assert only_file(parts).filename == "file.wav"
    assert text_parts(parts) == [("filename", "a.wav"), ("model", "m")]


def test_seed_sibling_filename_must_be_a_string() -> None:
    with pytest.raises(InvalidParameter) as info:
        encode_form(TRANSCRIBE, {"file": b64(WAV), "filename": 7, "model": "m"})
    assert info.value.parameter == "filename"
    assert info.value.code == "invalid_parameter"


def test_seed_sibling_not_special_when_operation_has_a_filename_field() -> None:
    op = make_op(body_fields=("file", "model", "filename"))
    parts = encode_form(op, {"file": b64(WAV), "filename": "x.wav", "model": "m"})
    assert only_file(parts).filename == "file.wav"
    assert ("filename", "x.wav") in text_parts(parts)


def test_array_of_files_goes_as_repeated_bracketed_parts() -> None:
    images = [
        {"base64": b64(PNG), "filename": "a.png"},
        "data:image/png;base64," + b64(PNG),
        b64(PNG),
    ]
    parts = encode_form(IMAGE_EDIT, {"image": images, "prompt": "basket"})
    assert parts == (
        FormPart("image[]", PNG, "a.png", "image/png"),
        FormPart("image[]", PNG, "image.png", "image/png"),
        FormPart("image[]", PNG, "image.png", "image/png"),
        FormPart("prompt", b"basket"),
    )


@pytest.mark.parametrize(
    ("op", "fields", "field"),
    [
        (TRANSCRIBE, {"file": [b64(WAV), b64(WAV)], "model": "m"}, "file"),
        (TRANSCRIBE, {"file[]": [b64(WAV)], "model": "m"}, "file"),
        (TRANSCRIBE, {"file[]": b64(WAV), "model": "m"}, "file"),
        (IMAGE_EDIT, {"image": b64(PNG), "mask": [b64(PNG)], "prompt": "p"}, "mask"),
    ],
)
def test_array_for_a_one_file_field_is_invalid_file(
    op: Operation, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidFile, match="takes one file, not an array") as caught:
        encode_form(op, fields)
    assert caught.value.parameter == field


def test_single_file_keeps_the_plain_field_name() -> None:
    parts = encode_form(IMAGE_EDIT, {"image": b64(PNG), "mask": b64(PNG), "prompt": "p"})
    assert [p.name for p in parts] == ["image", "mask", "prompt"]


def test_parts_follow_payload_order() -> None:
    fields = {"model": "m", "language": "en", "file": b64(WAV), "temperature": 0.2}
    parts = encode_form(TRANSCRIBE, fields)
    assert [p.name for p in parts] == ["model", "language", "file", "temperature"]


def test_optional_file_field_null_is_skipped() -> None:
    parts = encode_form(IMAGE_EDIT, {"image": b64(PNG), "mask": None, "prompt": "p"})
    assert [p.name for p in parts] == ["image", "prompt"]


def test_video_operation_types_mp4_as_video() -> None:
    mp4 = b"\x00\x00\x00\x18ftypisom" + bytes(16)
    part = only_file(encode_form(VIDEO_EDIT, {"video": b64(mp4), "prompt": "p"}))
    assert (part.filename, part.content_type) == ("video.mp4", "video/mp4")
    part = only_file(encode_form(TRANSCRIBE, {"file": b64(mp4), "model": "m"}))
    assert (part.filename, part.content_type) == ("file.mp4", "audio/mp4")


# --- naming and typing ---------------------------------------------------------------------------

MAGIC_CASES = [
    (WAV, "wav", "audio/wav"),
    (b"ID3\x04\x00\x00" + bytes(20), "mp3", "audio/mpeg"),
    (b"\xff\xfb\x90\x64" + bytes(20), "mp3", "audio/mpeg"),
    (b"OggS\x00\x02" + bytes(20), "ogg", "audio/ogg"),
    (b"fLaC\x00\x00\x00\x22" + bytes(20), "flac", "audio/flac"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm" + bytes(10), "webm", "audio/webm"),
    (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00" + bytes(10), "mp4", "audio/mp4"),
    (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(10), "m4a", "audio/mp4"),
    (PNG, "png", "image/png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(10), "jpg", "image/jpeg"),
    (b"GIF89a\x01\x00\x01\x00" + bytes(10), "gif", "image/gif"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(10), "webp", "image/webp"),
    (b"%PDF-1.7\n" + bytes(10), "pdf", "application/pdf"),
    (b"PK\x03\x04\x14\x00" + bytes(20), "zip", "application/zip"),
    (b'{"messages": []}\n{"messages": []}\n', "jsonl", "application/jsonl"),
    (b"plain words\nand more\n", "txt", "text/plain"),
]


@pytest.mark.parametrize(("data", "ext", "content_type"), MAGIC_CASES)
def test_magic_numbers_name_and_type_the_file(data: bytes, ext: str, content_type: str) -> None:
    assert sniff_file_type(data) == (ext, content_type)
    part = only_file(encode_form(TRANSCRIBE, {"file": b64(data), "model": "m"}))
    assert (part.filename, part.content_type) == (f"file.{ext}", content_type)


def test_unknown_bytes_are_field_bin_octet_stream() -> None:
    data = bytes([0, 1, 2, 3, 250, 251, 7, 0]) * 8
    assert sniff_file_type(data) is None
    part = only_file(encode_form(TRANSCRIBE, {"file": b64(data), "model": "m"}))
    assert (part.filename, part.content_type) == ("file.bin", "application/octet-stream")


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("a.m4a", "audio/mp4"),
        ("a.webm", "audio/webm"),
        ("a.ogg", "audio/ogg"),
        ("a.flac", "audio/flac"),
        ("a.mp3", "audio/mpeg"),
        ("a.WAV", "audio/wav"),
        ("train.jsonl", "application/jsonl"),
        ("notes.md", "text/markdown"),
        ("pic.webp", "image/webp"),
        ("doc.pdf", "application/pdf"),
        ("sheet.csv", "text/csv"),
        ("skill/SKILL.txt", "text/plain"),
    ],
)
def test_filename_extension_gives_type(filename: str, content_type: str) -> None:
    assert guess_content_type(filename) == content_type
    part = only_file(
        encode_form(TRANSCRIBE, {"file": {"base64": b64(b"\x00\x01"), "filename": filename}})
    )
    assert (part.filename, part.content_type) == (filename, content_type)


def test_unknown_extension_falls_back_to_magic_then_octet_stream() -> None:
    assert guess_content_type("clip.zzz") is None
    assert guess_content_type("noext") is None
    part = only_file(encode_form(TRANSCRIBE, {"file": {"base64": b64(WAV), "filename": "c.zzz"}}))
    assert (part.filename, part.content_type) == ("c.zzz", "audio/wav")
    blob = {"base64": b64(b"\x00\x01\x02"), "filename": "c.zzz"}
    part = only_file(encode_form(TRANSCRIBE, {"file": blob}))
    assert part.content_type == "application/octet-stream"


def test_given_content_type_wins_and_names_the_file() -> None:
    blob = {"base64": b64(WAV), "content_type": "audio/mpeg"}
    part = only_file(encode_form(TRANSCRIBE, {"file": blob, "model": "m"}))
    assert (part.filename, part.content_type) == ("file.mp3", "audio/mpeg")
    blob = {"base64": b64(WAV), "filename": "x.png", "content_type": "audio/flac"}
    part = only_file(encode_form(TRANSCRIBE, {"file": blob, "model": "m"}))
    assert (part.filename, part.content_type) == ("x.png", "audio/flac")


def test_given_content_type_without_known_extension_uses_magic_for_the_name() -> None:
    blob = {"base64": b64(WAV), "content_type": "application/x-whatever"}
    part = only_file(encode_form(TRANSCRIBE, {"file": blob, "model": "m"}))
    assert (part.filename, part.content_type) == ("file.wav", "application/x-whatever")


def test_extension_for() -> None:
    assert extension_for("audio/wav") == "wav"
    assert extension_for("Audio/MPEG; charset=x") == "mp3"
    assert extension_for("image/png") == "png"
    assert extension_for("application/x-nothing-known") is None


# --- base64 --------------------------------------------------------------------------------------

SAMPLE = bytes(range(256)) * 3 + b"\xfb\xff\xfe"


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(SAMPLE).decode(),
        base64.urlsafe_b64encode(SAMPLE).decode(),
        base64.b64encode(SAMPLE).decode().rstrip("="),
        base64.urlsafe_b64encode(SAMPLE).decode().rstrip("="),
        base64.encodebytes(SAMPLE).decode(),
        "  " + base64.b64encode(SAMPLE).decode().replace("A", "A\r\n\t ") + " \n",
    ],
    ids=["standard", "urlsafe", "unpadded", "urlsafe-unpadded", "mime-lines", "whitespace"],
)
def test_base64_alphabets_padding_and_whitespace(text: str) -> None:
    assert decode_base64("file", text) == SAMPLE


@pytest.mark.parametrize(
    ("text", "expected"),
    [("QQ", b"A"), ("QQ=", b"A"), ("QQ==", b"A"), ("QUI", b"AB"), ("QUI=", b"AB")],
)
def test_base64_partial_padding(text: str, expected: bytes) -> None:
    assert decode_base64("file", text) == expected


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("QUJD!EVG", r"index 4: '!' is not in the base64 alphabet"),
        ("QUJDREVG.", r"index 8: '.'"),
        ("QUJDé", r"index 4: 'é'"),
        ("QUJDR", r"index 4: the data is truncated"),
        ("QUJD====", r"index 4: too much '=' padding"),
        ("QUJD===", r"index 4: too much '=' padding"),
        ("QQ==QUJD", r"index 2: padding '=' before the end"),
        ("=QUJD", r"index 0: padding '='"),
    ],
)
def test_invalid_base64_names_field_and_index(text: str, where: str) -> None:
    with pytest.raises(InvalidBase64, match=r"^field 'file': invalid base64 at " + where) as info:
        encode_form(TRANSCRIBE, {"file": text, "model": "m"})
    assert info.value.code == "invalid_base64"
    assert info.value.parameter == "file"


def test_invalid_base64_in_object_and_array_name_the_field() -> None:
    with pytest.raises(InvalidBase64) as info:
        encode_form(IMAGE_EDIT, {"image": [b64(PNG), {"base64": "AB$C"}], "prompt": "p"})
    assert info.value.parameter == "image"
    assert "'image'" in info.value.message


def test_decode_25_mib() -> None:
    data = random.Random(7).randbytes(25 * 1024 * 1024)
    assert decode_base64("file", base64.encodebytes(data).decode()) == data
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    part = only_file(encode_form(TRANSCRIBE, {"file": urlsafe, "model": "m"}))
    assert part.value == data


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300),
    urlsafe=st.booleans(),
    strip_padding=st.booleans(),
    wrap=st.integers(min_value=0, max_value=80),
)
def test_base64_roundtrip_property(
    data: bytes, urlsafe: bool, strip_padding: bool, wrap: int
) -> None:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    if strip_padding:
        text = text.rstrip("=")
    if wrap:
        text = "\n".join(text[i : i + wrap] for i in range(0, len(text), wrap))
    assert decode_base64("f", text) == data


# --- bad file values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (42, "got int"),
        (1.5, "got float"),
        (True, "got bool"),
        ({"filename": "a.wav"}, "needs a non-empty string 'base64'"),
        ({"base64": ""}, "needs a non-empty string 'base64'"),
        ({"base64": 5}, "needs a non-empty string 'base64'"),
        ({"base64": b64(WAV), "file_name": "a.wav"}, "unknown keys ['file_name']"),
        ({"base64": b64(WAV), "filename": 3}, "'filename' must be a non-empty string"),
        ({"base64": b64(WAV), "filename": "a\r\n.wav"}, "control characters"),
        ({"base64": b64(WAV), "content_type": "audio wav"}, "is not a media type"),
        ({"base64": b64(WAV), "content_type": "audio/wav\r\nX-Evil: 1"}, "is not a media type"),
        ("", "the string is empty"),
        ("  \n ", "the file is empty"),
        ("data:audio/wav;base64", "needs a ','"),
        ("data:audio/wav;base64,", "the file is empty"),
        ("https://example.com/a.wav", "URLs are not fetched"),
    ],
)
def test_bad_file_values_are_invalid_file(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidFile) as info:
        encode_form(TRANSCRIBE, {"file": value, "model": "m"})
    err = info.value
    assert err.code == "invalid_file"
    assert err.parameter == "file"
    assert fragment in err.message
    assert "'file" in err.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [([], "the array holds no files"), ([b64(PNG), 3], "field 'image[1]': got int")],
)
def test_bad_file_arrays_are_invalid_file(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidFile) as info:
        encode_form(IMAGE_EDIT, {"image": value, "prompt": "p"})
    assert info.value.parameter == "image"
    assert fragment in info.value.message


def test_invalid_file_message_lists_the_accepted_forms() -> None:
    with pytest.raises(InvalidFile) as info:
        encode_form(TRANSCRIBE, {"file": 42, "model": "m"})
    message = info.value.message
    assert "base64 string" in message
    assert "data URL" in message
    assert '"base64"' in message


@pytest.mark.parametrize("fields", [{"model": "m"}, {"file": None, "model": "m"}])
def test_required_file_absent_is_missing_parameter(fields: dict[str, Any]) -> None:
    with pytest.raises(MissingParameter) as info:
        encode_form(TRANSCRIBE, fields)
    assert info.value.parameter == "file"
    assert info.value.code == "missing_parameter"


def test_optional_file_absent_is_fine() -> None:
    assert encode_form(IMAGE_EDIT, {"image": b64(PNG), "prompt": "p"})[-1].name == "prompt"


# --- other fields --------------------------------------------------------------------------------


def test_scalars() -> None:
    fields = {
        "file": b64(WAV),
        "model": "whisper-1",
        "prompt": "naïve ☃",
        "n": 2,
        "big": 12345678901234567890,
        "temperature": 0.1,
        "tiny": 1e-05,
        "whole": 2.0,
        "stream": True,
        "echo": False,
        "language": None,
        "empty": "",
    }
    assert text_parts(encode_form(TRANSCRIBE, fields)) == [
        ("model", "whisper-1"),
        ("prompt", "naïve ☃"),
        ("n", "2"),
        ("big", "12345678901234567890"),
        ("temperature", "0.1"),
        ("tiny", "1e-05"),
        ("whole", "2.0"),
        ("stream", "true"),
        ("echo", "false"),
        ("empty", ""),
    ]


def test_arrays_go_as_repeated_bracketed_parts() -> None:
    fields = {
        "file": b64(WAV),
        "timestamp_granularities": ["word", "segment"],
        "include[]": ["logprobs"],
        "known_speaker_names[]": "agent",
        "ids": [1, None, 2.5, True],
        "nothing": [],
    }
    assert text_parts(encode_form(TRANSCRIBE, fields)) == [
        ("timestamp_granularities[]", "word"),
        ("timestamp_granularities[]", "segment"),
        ("include[]", "logprobs"),
        ("known_speaker_names[]", "agent"),
        ("ids[]", "1"),
        ("ids[]", "2.5"),
        ("ids[]", "true"),
    ]


def test_objects_go_as_bracketed_keys() -> None:
    fields = {
        "file": b64(WAV),
        "expires_after": {"anchor": "created_at", "seconds": 3600},
        "chunking_strategy": {"type": "server_vad", "threshold": 0.5, "extra": None},
        "items": [{"a": 1, "b": [True]}, {"a": 2}],
        "matrix": [[1, 2]],
        "empty": {},
    }
    assert text_parts(encode_form(TRANSCRIBE, fields)) == [
        ("expires_after[anchor]", "created_at"),
        ("expires_after[seconds]", "3600"),
        ("chunking_strategy[type]", "server_vad"),
        ("chunking_strategy[threshold]", "0.5"),
        ("items[][a]", "1"),
        ("items[][b][]", "true"),
        ("items[][a]", "2"),
        ("matrix[][]", "1"),
        ("matrix[][]", "2"),
    ]


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), [float("-inf")], {"x": float("nan")}]
)
def test_non_finite_numbers_are_invalid(value: Any) -> None:
    with pytest.raises(InvalidParameter) as info:
        encode_form(TRANSCRIBE, {"file": b64(WAV), "temperature": value})
    assert info.value.parameter.startswith("temperature")


def test_unsupported_value_type_is_invalid() -> None:
    with pytest.raises(InvalidParameter, match="'odd'"):
        encode_form(TRANSCRIBE, {"file": b64(WAV), "odd": {1, 2}})


def test_spec_encoded_parts_carry_their_content_type() -> None:
    session = {"type": "realtime", "model": "gpt-realtime", "x": "é"}
    parts = encode_form(REALTIME_CALL, {"sdp": "v=0\r\n", "session": session})
    assert parts == (
        FormPart("sdp", b"v=0\r\n", None, "application/sdp"),
        FormPart(
            "session",
            '{"type":"realtime","model":"gpt-realtime","x":"é"}'.encode(),
            None,
            "application/json",
        ),
    )


def test_spec_encoded_text_part_must_be_a_string() -> None:
    with pytest.raises(InvalidParameter, match="'sdp'"):
        encode_form(REALTIME_CALL, {"sdp": {"v": 0}})


def test_data_url_keeps_media_type_parameters() -> None:
    url = "data:text/plain;charset=utf-8;name=a.txt;base64," + b64(b"hello")
    part = only_file(encode_form(TRANSCRIBE, {"file": url, "model": "m"}))
    assert part == FormPart("file", b"hello", "a.txt", "text/plain; charset=utf-8")


def test_curl_spelling_of_an_array_file_field() -> None:
    parts = encode_form(IMAGE_EDIT, {"image[]": [b64(PNG), b64(PNG)], "prompt": "p"})
    assert [(p.name, p.filename) for p in parts] == [
        ("image[]", "image.png"),
        ("image[]", "image.png"),
        ("prompt", None),
    ]
    parts = encode_form(IMAGE_EDIT, {"image[]": b64(PNG), "prompt": "p"})
    assert [p.name for p in parts] == ["image[]", "prompt"]
