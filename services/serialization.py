"""The one way we write JSON that we store or send: compact, keys in the order they were built."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def dumps_bytes(value: Any) -> bytes:
    return dumps(value).encode()
