"""``json.loads`` that leaves long base64 values in the body, as memoryviews, instead of copying them out.

An upstream answer is mostly base64 image data. ``json.loads(body)`` first decodes the whole body into a
str of the same size, then copies each string value out of that str, so the image is held several times
over before it is even decoded (bench/README.md, "The fixes", 5; target P4). ``loads_with_views`` cuts the
long values of a few keys (``data``, ``b64_json``) out of the text it gives ``json.loads`` and puts a
memoryview of the body where each was, from which the image can be decoded with no copy.

The values are found in one pass over the body, string by string (bench/README.md, "The fixes", 9). Only
escape-free string values are cut: one with a backslash would need unescaping, and is parsed as usual.

A view's bytes are handed over as they are, not validated as JSON string content: a control character or
a byte that is not UTF-8 inside a long value, which ``json.loads`` rejects, is left for whoever reads the
view to reject. Everything outside the long values is parsed by ``json.loads``, with its errors. Bodies are
UTF-8 (RFC 8259).

A leaf module: it imports nothing of the project.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

BASE64_KEYS = ("data", "b64_json")
"""Keys whose long string values are left in the body."""

LONG_VALUE = 16 * 1024
"""Length, in bytes of the body, from which such a value is left in the body."""

_WHITESPACE = b" \t\r\n"


def loads_with_views(
    body: bytes | bytearray, keys: Collection[str] = BASE64_KEYS, min_length: int = LONG_VALUE
) -> Any:
    """``json.loads(body)``, except that each escape-free string value of one of ``keys`` that is at least
    ``min_length`` bytes long comes back as a memoryview of ``body`` (``bytes(view).decode()`` is the str
    ``json.loads`` would have given).

    Each such value (``long_value_spans``) is replaced by a short placeholder in the text given to
    ``json.loads``, and swapped back for a view of the body by the ``object_hook``. A value of one of
    ``keys`` that is itself a placeholder's text (``"\\u0000iq-long-value:0"``) would be taken for one.
    """
    if len(body) < min_length:
        return json.loads(body)
    cuts = long_value_spans(body, keys, min_length)
    if not cuts:
        return json.loads(body)
    view = memoryview(body)
    pieces: list[bytes] = []
    views: dict[str, memoryview] = {}
    copied_to = 0
    for start, end in cuts:
        placeholder = f"\x00iq-long-value:{len(views)}"  # what json.loads gives back for it
        views[placeholder] = view[start:end]
        pieces += [bytes(view[copied_to:start]), json.dumps(placeholder)[1:-1].encode()]
        copied_to = end
    pieces.append(bytes(view[copied_to:]))

    def restore(obj: dict[str, Any]) -> dict[str, Any]:
        for name in keys:
            value = obj.get(name)
            if isinstance(value, str) and value in views:
                obj[name] = views[value]
        return obj

    return json.loads(b"".join(pieces), object_hook=restore)


def long_value_spans(
    body: bytes | bytearray, keys: Collection[str] = BASE64_KEYS, min_length: int = LONG_VALUE
) -> list[tuple[int, int]]:
    """``(start, end)`` of the content (between the quotes) of each string value of one of ``keys`` that
    is at least ``min_length`` bytes long and has no backslash, in order.

    The body is walked string by string: a string ends at its first unescaped quote, found with ``find``
    (memchr, no copy), so a long value costs one pass; searching for each key's text instead scanned the
    whole body once per key. A string followed by a colon is a key (a quote inside a string is always
    escaped); anything malformed is left to ``json.loads``.
    """
    names = {name.encode() for name in keys}
    cuts: list[tuple[int, int]] = []
    position = 0
    while (start := body.find(b'"', position)) >= 0:
        end = _string_end(body, start + 1)
        if end < 0:
            break
        position = end + 1
        colon = _skip_whitespace(body, position)
        if colon >= len(body) or body[colon] != 0x3A or bytes(body[start + 1 : end]) not in names:  # ':'
            continue
        quote = _skip_whitespace(body, colon + 1)
        if quote >= len(body) or body[quote] != 0x22:  # '"': the value is not a string
            continue
        value_end = _string_end(body, quote + 1)
        if value_end < 0:
            break
        if value_end - quote - 1 >= min_length and body.find(b"\\", quote + 1, value_end) < 0:
            cuts.append((quote + 1, value_end))
        position = value_end + 1
    return cuts


def _string_end(body: bytes | bytearray, index: int) -> int:
    """The index of the quote that ends the string whose content starts at ``index`` (-1: none)."""
    while (end := body.find(b'"', index)) >= 0 and _escaped(body, end):
        index = end + 1
    return end


def _skip_whitespace(body: bytes | bytearray, index: int) -> int:
    while index < len(body) and body[index] in _WHITESPACE:
        index += 1
    return index


def _escaped(body: bytes | bytearray, index: int) -> bool:
    """Whether the quote at ``index`` is escaped (an odd number of backslashes before it)."""
    count = 0
    while index - count - 1 >= 0 and body[index - count - 1] == 0x5C:
        count += 1
    return count % 2 == 1
