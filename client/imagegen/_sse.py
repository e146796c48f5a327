"""Server-Sent Events, decoded line by line (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None


class EventDecoder:
    """Feed it a stream's lines; it returns each event as its blank line completes it."""

    def __init__(self) -> None:
        self.last_id: str | None = None  # sent back as Last-Event-ID to resume
        self.count = 0  # events decoded so far
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = Event(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            self.count += 1
            return event
        if line.startswith(":"):  # a comment: the server's heartbeat
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None
