"""JSON-lines files: one line reader for every caller, tolerant or strict as each needs.

Append-only logs (metrics.jsonl, a sweep's attempt events) are read tolerantly: a line torn by a kill (or being
written right now) is skipped and the other lines still count. Inputs a user gave (a corpus, a task's examples)
are read strictly by their callers, which turn the first bad line into an error naming FILE:LINE.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class JsonlLine:
    """One non-blank line: its 1-based number, the byte offset where it starts, and either its JSON value or the
    reason it has none (`error`: the UnicodeDecodeError or json.JSONDecodeError)."""

    number: int
    offset: int
    value: Any = None
    error: UnicodeDecodeError | json.JSONDecodeError | None = None


def iter_jsonl_lines(path: Path | str) -> Iterator[JsonlLine]:
    """Every non-blank line of a JSON-lines file, streamed (the file is never held in memory whole). Lines are
    split on b"\\n" only and decoded one at a time as UTF-8, so a bad byte spoils its own line, not the file."""
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield JsonlLine(number, start, error=error)
                continue
            if not line.strip():
                continue
            try:
                yield JsonlLine(number, start, value=json.loads(line))
            except json.JSONDecodeError as error:
                yield JsonlLine(number, start, error=error)


def read_jsonl(path: Path | str) -> list[Any]:
    """The records of an append-only JSON-lines file. A line torn by a kill (or being written now) is skipped;
    the other lines still count. Missing file: no records."""
    path = Path(path)
    if not path.is_file():
        return []
    return [line.value for line in iter_jsonl_lines(path) if line.error is None]


def read_metrics_rows(run_dir: Path | str) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows (a torn line is skipped; the trainer rewrites it on resume)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
