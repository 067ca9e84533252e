"""Errors and skip reasons of data preparation, each naming the file, row and field."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input that cannot be recovered from: an unreadable file, a missing column, a wrong type.

    `row` is the 1-based record number inside `path` (the line number for JSONL), or None for
    file-level problems.
    """

    def __init__(self, path: str, message: str, *, row: int | None = None, field: str | None = None):
        self.path, self.row, self.field, self.reason = str(path), row, field, message
        where = self.path
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


class SkippedRow(Exception):
    """A row that is well formed but cannot be scored (e.g. no `####` in a GSM8K answer).

    Raised by the row converters and counted by `prepare_dataset` under its `reason`, unless
    the caller asked for strict mode, where it becomes a `DataError`.
    """

    def __init__(self, reason: str, field: str):
        super().__init__(reason)
        self.reason, self.field = reason, field
