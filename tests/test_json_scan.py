"""services.json_scan: the same documents as ``json.loads``, with long base64 values left in the body."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from services.json_scan import loads_with_views


def plain(value: Any) -> Any:
    """``value`` with every memoryview turned back into the str it stands for."""
    if isinstance(value, memoryview):
        return bytes(value).decode()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return [plain(item) for item in value] if isinstance(value, list) else value


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
