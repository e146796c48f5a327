"""services.json_scan: the same documents as ``json.loads``, with long base64 values left in the body."""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.json_scan import BASE64_KEYS, LONG_VALUE, loads_with_views

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
# Inserted into long values: what json.dumps escapes, what it may leave raw, and text that looks like JSON.
INSERTS = ['"', "\\", "\\\\", '\\"', "é", "\n", "\x00", "/", '"data": "', "\\u00e9", "💥"]
THRESHOLDS = [0, 1, 16, 100, LONG_VALUE]
QUICK = settings(max_examples=150, deadline=None, database=None)


def plain(value: Any) -> Any:
    """``value`` with every memoryview turned back into the str it stands for."""
    if isinstance(value, memoryview):
        return bytes(value).decode()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return [plain(item) for item in value] if isinstance(value, list) else value


def assert_like_json_loads(body: bytes | bytearray, min_length: int = LONG_VALUE) -> Any:
    """``loads_with_views(body)`` gives what ``json.loads(body)`` gives, or raises the same kind of error."""
    try:
        expected = json.loads(body)
    except ValueError as exc:
        with pytest.raises(ValueError) as caught:
            loads_with_views(body, min_length=min_length)
        assert type(caught.value) is type(exc)
        return None
    result = loads_with_views(body, min_length=min_length)
    assert plain(result) == expected
    return result


def assert_views_where_expected(
    result: Any, expected: Any, body: bytes | bytearray, ensure_ascii: bool, min_length: int
) -> None:
    """A value of a base64 key is a view of ``body`` exactly when it is a string written without a
    backslash and at least ``min_length`` bytes long; nothing else is a view."""
    if isinstance(expected, dict):
        assert isinstance(result, dict) and result.keys() == expected.keys()
        for key, value in expected.items():
            if key in BASE64_KEYS and isinstance(value, str):
                written = json.dumps(value, ensure_ascii=ensure_ascii)
                long = len(written.encode()) - 2 >= min_length and "\\" not in written
                assert isinstance(result[key], memoryview) is long, (key, written[:80])
                if long:
                    assert result[key].obj is body
            else:
                assert_views_where_expected(result[key], value, body, ensure_ascii, min_length)
    elif isinstance(expected, list):
        assert isinstance(result, list) and len(result) == len(expected)
        for item, value in zip(result, expected, strict=True):
            assert_views_where_expected(item, value, body, ensure_ascii, min_length)
    else:
        assert not isinstance(result, memoryview)


# ---------------------------------------------------------------- strategies


@st.composite
def long_b64(draw: st.DrawFn, min_length: int) -> str:
    """Base64 text at least ``min_length`` characters long (a short chunk repeated), sometimes with
    characters that json.dumps escapes, or not, inserted."""
    chunk = draw(st.text(alphabet=B64_ALPHABET, min_size=1, max_size=8))
    text = chunk * (min_length // len(chunk) + draw(st.integers(1, 3)))
    for insert, where in draw(st.lists(st.tuples(st.sampled_from(INSERTS), st.floats(0, 1)), max_size=2)):
        at = int(where * len(text))
        text = text[:at] + insert + text[at:]
    return text


def b64_value(min_length: int) -> st.SearchStrategy[Any]:
    """What a base64 key holds: mostly long base64, else short base64, any text or not a string at all."""
    return st.one_of(
        long_b64(min_length),
        long_b64(min_length),
        long_b64(min_length),
        st.text(alphabet=B64_ALPHABET, max_size=20),
        st.text(max_size=10),
        st.none(),
        st.integers(),
        st.lists(st.text(alphabet=B64_ALPHABET, max_size=5), max_size=2),
    )


def documents(min_length: int) -> st.SearchStrategy[Any]:
    """Lists and objects, nested; half the objects hold base64 keys."""
    keys = st.text(max_size=6) | st.sampled_from([*BASE64_KEYS, "text", '"data": "', "data\\"])
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=10),
        st.sampled_from([*BASE64_KEYS, '{"data": "', '\\"', "\\"]),  # key names and quotes as values
        long_b64(min_length),  # long base64, but not under a base64 key
    )
    b64 = b64_value(min_length)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(keys, children, max_size=4),
            st.fixed_dictionaries({"data": b64}, optional={"b64_json": b64, "x": children, "text": leaves}),
            st.fixed_dictionaries({"b64_json": b64}, optional={"data\\": children, "url": leaves}),
        )

    return containers(st.recursive(leaves, containers, max_leaves=8))


DOCUMENTS = {min_length: documents(min_length) for min_length in THRESHOLDS}
whitespace = st.text(alphabet=" \t\r\n", max_size=2)


@st.composite
def serialized(draw: st.DrawFn) -> tuple[bytes | bytearray, bool, int]:
    """A document as json.dumps writes it with random separators, indent and ensure_ascii."""
    min_length = draw(st.sampled_from(THRESHOLDS))
    document = draw(DOCUMENTS[min_length])
    ensure_ascii = draw(st.booleans())
    separators = draw(st.tuples(whitespace, whitespace, whitespace, whitespace))
    text = json.dumps(
        document,
        ensure_ascii=ensure_ascii,
        indent=draw(st.none() | st.integers(0, 2) | st.just("\t")),
        separators=(f"{separators[0]},{separators[1]}", f"{separators[2]}:{separators[3]}"),
    )
    container = draw(st.sampled_from([bytes, bytearray]))
    return container(text.encode()), ensure_ascii, min_length


# ---------------------------------------------------------------- properties


@QUICK
@given(serialized())
def test_any_document_parses_like_json_loads(case: tuple[bytes | bytearray, bool, int]) -> None:
    body, ensure_ascii, min_length = case
    result = loads_with_views(body, min_length=min_length)
    expected = json.loads(body)
    assert plain(result) == expected
    assert_views_where_expected(result, expected, body, ensure_ascii, min_length)


@QUICK
@given(serialized(), st.data())
def test_a_broken_document_fails_like_json_loads(
    case: tuple[bytes | bytearray, bool, int], data: Any
) -> None:
    body, _, min_length = case
    # Written in ASCII: a byte cut out of a character in a long value would be left in its view (see below).
    body = re.sub(
        r"[^\x00-\x7f]", lambda match: json.dumps(match.group())[1:-1], bytes(body).decode()
    ).encode()
    at = data.draw(st.integers(0, len(body)))
    edit = data.draw(st.sampled_from(["truncate", "delete", "insert", "append"]))
    if edit == "truncate":
        broken = body[:at]
    elif edit == "delete":
        broken = body[:at] + body[at + 1 :]
    else:
        insert = data.draw(
            st.sampled_from([b'"', b"\\", b"{", b"}", b"[", b"]", b":", b",", b" ", b"x", b"0"])
        )
        broken = body[:at] + insert + body[at:] if edit == "insert" else body + insert
    assert_like_json_loads(broken, min_length)


# ---------------------------------------------------------------- edge cases

LONG = "QUFB" * 5_000  # 20,000 bytes: above LONG_VALUE


def test_long_base64_is_left_in_the_body_not_copied() -> None:
    image = os.urandom(150_000)
    body = bytearray(
        json.dumps(
            {
                "candidates": [
                    {
                        "content": {
                            "parts": [
                                {
                                    "inlineData": {
                                        "mimeType": "image/png",
                                        "data": base64.b64encode(image).decode(),
                                    }
                                }
                            ]
                        }
                    }
                ]
            }
        ).encode()
    )
    value = loads_with_views(body)["candidates"][0]["content"]["parts"][0]["inlineData"]["data"]
    assert isinstance(value, memoryview) and value.obj is body
    assert base64.b64decode(value) == image
    assert loads_with_views(b'{"data": "short"}' + b" " * 20_000) == {"data": "short"}


@pytest.mark.parametrize(
    "template",
    [
        '{"note": "data", "data": "LONG"}',
        '{"a": "\\"data\\": \\"", "data" : "LONG", "b": "\\\\"}',
        '{"data": 5, "list": ["data", "b64_json"], "b64_json":\n"LONG"}',
        '{"data": {"data": "LONG"}, "b64_json": "LONG", "text": "LONG"}',
        '{"data": "LONG\\/x"}',
    ],
)
def test_long_values_are_found_only_where_json_loads_finds_them(template: str) -> None:
    body = template.replace("LONG", "QUFB" * 5_000).encode()
    assert plain(loads_with_views(body)) == json.loads(body)


def test_the_threshold_is_inclusive() -> None:
    for length, is_view in [(LONG_VALUE - 1, False), (LONG_VALUE, True)]:
        body = json.dumps({"data": "A" * length, "b64_json": "A" * length}).encode()
        result = loads_with_views(body)
        assert {type(value) for value in result.values()} == {memoryview if is_view else str}
    assert isinstance(loads_with_views(b'{"data": "QUFB"}', min_length=4)["data"], memoryview)
    assert loads_with_views(b'{"data": "QUFB"}', min_length=5) == {"data": "QUFB"}


def test_other_keys_can_be_asked_for() -> None:
    body = json.dumps({"data": LONG, "blob": LONG}).encode()
    result = loads_with_views(body, keys=("blob",))
    assert isinstance(result["blob"], memoryview) and result["data"] == LONG


@pytest.mark.parametrize(
    "document",
    [
        {"note": "data", "data": LONG},  # the key's name as a value
        ["data", LONG, {"b64_json": LONG}],
        {"text": json.dumps({"data": LONG}), "data": LONG},  # a key "data" inside a string
        {"text": '{"data": "' + LONG, "b64_json": LONG},
        {"data": 5, "b64_json": None},  # not strings
        {"data": [LONG], "b64_json": {"data": LONG}},
        {"data": True, "b64_json": 1.5, "x": {"data": LONG}},
        {LONG: "data", "data": {LONG: LONG}},  # long keys
        {"data": LONG + '"' + LONG},  # escaped: parsed as usual
    ],
)
def test_key_names_in_strings_and_values_that_are_not_strings(document: Any) -> None:
    for separators in [(",", ":"), (", ", ": "), (" ,\n", "\t:\r\n ")]:
        body = json.dumps(document, separators=separators).encode()
        result = assert_like_json_loads(body)
        assert_views_where_expected(result, json.loads(body), body, True, LONG_VALUE)


@pytest.mark.parametrize("backslashes", range(6))
def test_backslashes_before_quotes(backslashes: int) -> None:
    run = "\\" * backslashes
    document = {
        "a": run,  # written as 2n backslashes before the closing quote: even
        "b": run + '"data": "' + LONG,  # 2n + 1 before the quote inside: odd
        "data": LONG,
        "c": '"' + run,
        "b64_json": LONG + run,
    }
    body = json.dumps(document).encode()
    result = assert_like_json_loads(body)
    assert isinstance(result["data"], memoryview)
    assert isinstance(result["b64_json"], memoryview) is (backslashes == 0)
    assert_views_where_expected(result, json.loads(body), body, True, LONG_VALUE)


@pytest.mark.parametrize("backslashes", range(6))
def test_a_quote_after_a_run_of_backslashes_written_by_hand(backslashes: int) -> None:
    """Even runs end the string, odd runs escape the quote; the text may be broken either way."""
    run = "\\" * backslashes
    for template in [
        '{"a": "RUN", "data": "LONG"}',
        '{"a": "RUN"", "data": "LONG"}',
        '["RUN", "data": "LONG"]',
    ]:
        body = template.replace("RUN", run).replace("LONG", LONG).encode()
        assert_like_json_loads(body)


@pytest.mark.parametrize(
    "text",
    [
        '{"data"   :   "LONG"}',
        '{"data"\n:\n"LONG"}',
        '{\r\n\t"data"\t\r\n:\t\r\n"LONG"\r\n}',
        '[{"b64_json":"LONG"} , {"data" :"LONG"}]',
        '{"data": "LONG", "data": "LONG2"}',  # a repeated key: the last one wins, as in json.loads
    ],
)
def test_whitespace_around_colons(text: str) -> None:
    body = text.replace("LONG2", "QkJC" * 5_000).replace("LONG", LONG).encode()
    result = assert_like_json_loads(body)
    values = [item for entry in (result if isinstance(result, list) else [result]) for item in entry.values()]
    assert values and all(isinstance(value, memoryview) for value in values)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '{"data": "LONG"',  # no closing brace
        '{"data": "LONG',  # the long value never ends
        '{"data" "LONG"}',  # no colon
        '["data": "LONG"]',  # a key in an array
        '{"data": "LONG" "b64_json": "LONG"}',  # no comma
        '{"data": "LONG"} x',  # trailing text
        '{"data": "LONG", }',
        '{"data": LONG}',  # not quoted
        '{"data": "LONG", "x": "a\nb"}',  # a raw newline outside the long value
        '{"data": "LONG", "x": "\\q"}',  # a bad escape
        '{"data": "LONG", "x": "\\u12"}',
        "{'data': 'LONG'}",
        '{"data": "LONG"}\x00',
    ],
)
def test_malformed_json_fails_like_json_loads(text: str) -> None:
    body = text.replace("LONG", LONG).encode()
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    assert_like_json_loads(body)


def test_bytes_that_are_not_utf8_outside_a_long_value_fail_like_json_loads() -> None:
    body = b'{"data": "' + LONG.encode() + b'", "x": "\xff"}'
    with pytest.raises(UnicodeDecodeError):
        json.loads(body)
    assert_like_json_loads(body)


def test_a_long_value_is_handed_over_as_it_is() -> None:
    """The bytes of a view are not checked as JSON string content (the module docstring says so):
    a raw control character or a byte that is not UTF-8 in it is for whoever reads the view."""
    for raw in [b"\n", b"\x01", b"\xff"]:
        body = b'{"data": "' + LONG.encode() + raw + b'"}'
        with pytest.raises(ValueError):
            json.loads(body)
        assert bytes(loads_with_views(body)["data"]) == LONG.encode() + raw
