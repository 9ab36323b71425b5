"""Rows of a task's data: a local jsonl file in the dataset's public (Hugging Face) format, or the hub itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsutil import iter_jsonl_lines


@dataclass(frozen=True)
class HubSource:
    path: str
    config: str | None
    split: str

    def describe(self) -> str:
        return f"{self.path}{f' ({self.config})' if self.config else ''}, split {self.split}"


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) per non-blank line; `where` is FILE:LINE for error messages."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a jsonl file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"--data {path}: {what}")
    lines = list(iter_jsonl_lines(path))
    # A file that is not UTF-8 at all is named as such, before any line's JSON is judged.
    for line in lines:
        if isinstance(line.error, UnicodeDecodeError):
            at = line.offset + line.error.start
            raise ValueError(f"--data {path}: not UTF-8 text ({line.error.reason} at byte {at})")
    rows = []
    for line in lines:
        if line.error is not None:
            raise ValueError(f"{path}:{line.number}: not valid JSON ({line.error.msg})")
        if not isinstance(line.value, dict):
            raise ValueError(f"{path}:{line.number}: expected a JSON object per line, got {type(line.value).__name__}")
        rows.append((f"{path}:{line.number}", line.value))
    if not rows:
        raise ValueError(f"--data {path}: holds no examples")
    return rows


def load_hub(task: str, hub: HubSource) -> list[tuple[str, dict[str, Any]]]:
    """The task's public dataset through `datasets` (needs the hub, or its cache with HF_HUB_OFFLINE=1)."""
    import logging
    import os

    offline = any(os.environ.get(name, "").lower() in ("1", "true", "yes")
                  for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    host = _hub_host()
    if not offline and not _resolves(host):
        # Without this, huggingface_hub retries for ~30 s, logging every attempt, before it gives up.
        raise ValueError(f"--task {task}: cannot load {hub.describe()}: the Hugging Face hub ({host}) is not "
                         "reachable from here; pass --data FILE.jsonl (or set HF_HUB_OFFLINE=1 to use a cached copy)")
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "fsspec")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # their retry warnings would bury the one line below
        logger.setLevel(logging.ERROR)
    try:
        import datasets

        dataset = datasets.load_dataset(hub.path, hub.config, split=hub.split)
    except Exception as error:  # noqa: BLE001 - offline, unknown split, auth: all mean "use a local file"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--task {task}: cannot load {hub.describe()} from the Hugging Face hub ({reason}); "
                         "pass --data FILE.jsonl") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return [(f"{hub.path}[{index}]", dict(row)) for index, row in enumerate(dataset)]


def _hub_host() -> str:
    import os
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _resolves(host: str) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def field(row: dict[str, Any], name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[name], checked to be present and of `kind`; errors name the file, line and field."""
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r} (has {', '.join(sorted(row)) or 'no fields'})")
    value = row[name]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}")
    return value
