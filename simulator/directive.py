"""The `[sim ...]` directive that scripts the simulator from inside a request's text parts.

Grammar: `[sim key=<k> script=<a,b,c> shape=<s> format=<png|jpeg> delay_ms=<n> hang_s=<n>
retry_delay=<n>s download_fails=<n>]`, every field optional, values without spaces or `]`. The first
directive found wins. ``download_fails``: with ``shape=openai_url``, the first n downloads of the image
URLs of this key's answers fail with 503.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from simulator.config import IMAGE_FORMATS

SCRIPT_ITEMS = (
    "ok", "400", "401", "403", "404", "429", "429day", "500", "500list", "502", "503", "504",
    "timeout", "safety", "blocked", "textonly", "malformed", "html", "empty",
)  # fmt: skip
SHAPES = ("camel", "snake", "thought", "two", "openai", "openai_url", "mislabeled")

_DIRECTIVE = re.compile(r"\[sim(?:\s+([^\]]*))?\]")
_FIELD = re.compile(r"([a-z_]+)=([^\s\]]+)")
_DURATION = re.compile(r"\d+(\.\d+)?s")


class DirectiveError(ValueError):
    """The directive is malformed."""


@dataclass(frozen=True)
class Directive:
    """Parsed directive. The key defaults to the script text so identical scripts share a position."""

    key: str | None = None
    script: tuple[str, ...] = ()
    shape: str = "camel"
    image_format: str | None = None
    delay_ms: float | None = None
    hang_s: float | None = None
    retry_delay: str | None = None
    download_fails: int = 0


def find_directive(texts: list[str]) -> Directive | None:
    """Parse the first `[sim ...]` directive in texts, if any; raise DirectiveError if malformed."""
    for text in texts:
        match = _DIRECTIVE.search(text)
        if match:
            return parse_fields(match.group(1) or "")
    return None


def parse_fields(body: str) -> Directive:
    """Parse the `name=value` fields of a directive."""
    fields: dict[str, str] = {}
    for token in body.split():
        match = _FIELD.fullmatch(token)
        if not match:
            raise DirectiveError(f"bad sim directive field {token!r}")
        fields[match.group(1)] = match.group(2)
    unknown = set(fields) - {
        "key",
        "script",
        "shape",
        "format",
        "delay_ms",
        "hang_s",
        "retry_delay",
        "download_fails",
    }
    if unknown:
        raise DirectiveError(f"unknown sim directive fields: {', '.join(sorted(unknown))}")
    script = tuple(fields["script"].split(",")) if "script" in fields else ()
    _check_choice("script item", script, SCRIPT_ITEMS)
    shape = fields.get("shape", "camel")
    _check_choice("shape", (shape,), SHAPES)
    image_format = fields.get("format")
    _check_choice("format", (image_format,) if image_format else (), IMAGE_FORMATS)
    retry_delay = fields.get("retry_delay")
    if retry_delay is not None and not _DURATION.fullmatch(retry_delay):
        raise DirectiveError(f"retry_delay must look like 0.2s, got {retry_delay!r}")
    return Directive(
        key=fields.get("key", fields.get("script")),
        script=script,
        shape=shape,
        image_format=image_format,
        delay_ms=_number(fields, "delay_ms"),
        hang_s=_number(fields, "hang_s"),
        retry_delay=retry_delay,
        download_fails=int(_number(fields, "download_fails") or 0),
    )


def _check_choice(what: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    for value in values:
        if value not in allowed:
            raise DirectiveError(f"unknown sim {what} {value!r}; expected one of {', '.join(allowed)}")


def _number(fields: dict[str, str], name: str) -> float | None:
    if name not in fields:
        return None
    try:
        value = float(fields[name])
    except ValueError:
        raise DirectiveError(f"{name} must be a number, got {fields[name]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise DirectiveError(f"{name} must be a finite, non-negative number")
    return value
