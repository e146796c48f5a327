"""The ``Prefer`` request header (RFC 7240): the ``wait`` preference.

``Prefer: wait=10`` asks the server to hold its answer up to 10 s for a result; ``Prefer: wait`` alone (as
Replicate accepts it) asks for the longest the server allows. Preferences are hints: one that is not
understood, or not a whole number of seconds, is ignored (RFC 7240 §2), never an error, and one longer
than the server allows is honoured up to its limit; ``Preference-Applied`` tells the client which.
``wait=0`` asks for no wait, which is the usual answer: it is ignored too (no ``Preference-Applied``).
"""

from __future__ import annotations

from collections.abc import Iterable


def wait_preference(headers: Iterable[str], *, maximum: int) -> int | None:
    """Seconds to wait, from every ``Prefer`` header's values (the first ``wait`` counts), at most
    ``maximum``; None when no usable ``wait`` is asked for, or ``wait=0``."""
    for header in headers:
        for preference in header.split(","):
            token, equals, value = preference.split(";", 1)[0].partition("=")
            if token.strip().lower() != "wait":
                continue
            if not equals:
                return maximum
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if not (value.isascii() and value.isdigit()):
                return None
            digits = value.lstrip("0")  # and no int() of thousands of digits: Python refuses it (4,300)
            if not digits:
                return None  # wait=0
            return maximum if len(digits) > len(str(maximum)) else min(int(digits), maximum)
    return None
