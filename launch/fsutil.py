"""Durable file writes: write to a temporary name, fsync, rename, fsync the directory.

A crash (kill -9, node loss) at any point leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def chmod_like_open(path: Path) -> None:
    """Give a file the mode open() would have created it with (0666 less the umask); for writers that create
    files 0600 on their own, such as safetensors."""
    os.chmod(path, 0o666 & ~current_umask())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path | str) -> list[Any]:
    """The records of an append-only JSON-lines file. A line torn by a kill (or being written now) is skipped;
    the other lines still count. Missing file: no records."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics_rows(run_dir: Path | str) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows (a torn line is skipped; the trainer rewrites it on resume)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
