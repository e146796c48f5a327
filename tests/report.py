"""The fault report: each fault test adds a row; tests/conftest.py prints the table after the run."""

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
        duplicates = "n/a" if row.duplicate_calls is None else str(row.duplicate_calls)
        lines.append(
            f"| {row.fault} | {row.accepted} | {row.as_expected} | {row.lost} | {row.stuck} | {duplicates} "
            f"| {row.recovery} | {row.note} |"
        )
    return "\n".join(lines)
