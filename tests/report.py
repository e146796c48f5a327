"""The fault report: each fault test adds a row; tests/conftest.py prints the table after the run.

"duplicate upstream calls" is measured from the simulator's own call log, never assumed: calls beyond
one per task (paid ones: refusals and errors are the retries the row expects). A row that does not
measure it says "not measured"."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultRow:
    fault: str
    accepted: int
    as_expected: int
    lost: int
    stuck: int
    duplicate_calls: int | None
    recovery: str
    note: str = ""


ROWS: list[FaultRow] = []


def record(row: FaultRow) -> None:
    ROWS.append(row)


def table() -> str:
    lines = [
        "| fault | accepted | ended as expected | lost | stuck | duplicate upstream calls | recovery "
        "| note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        duplicates = "not measured" if row.duplicate_calls is None else str(row.duplicate_calls)
        lines.append(
            f"| {row.fault} | {row.accepted} | {row.as_expected} | {row.lost} | {row.stuck} | {duplicates} "
            f"| {row.recovery} | {row.note} |"
        )
    return "\n".join(lines)
