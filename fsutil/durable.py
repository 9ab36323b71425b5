"""Durable file writes: write to a hidden temporary name beside the target, fsync, rename, fsync the directory.

A crash (kill -9, node loss) at any point leaves either the old file or the new one, never a torn one. The
temporary name starts with a dot, so readers' globs (`*.json`, `step_*`) never see it; an exception while
writing removes it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(root: Path | str) -> None:
    """fsync every file below `root`, then every directory (root included), so a rename of `root` publishes
    contents that are already on disk."""
    root = Path(root)
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            directories.append(path)
        elif path.is_file() and not path.is_symlink():
            fsync_file(path)
    for directory in directories:
        fsync_dir(directory)


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `path` that no other writer uses: the pid and a random token (two threads or two
    hosts on a shared filesystem may write the same target at once)."""
    return path.with_name(f".{path.name}.{kind}.{os.getpid()}.{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    # O_EXCL with mode 0666: the umask applies, as for open(path, "w"); mkstemp would make every file 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, data: Any, **dumps: Any) -> None:
    """`json.dumps(data, **dumps)`, written atomically (no trailing newline is added)."""
    atomic_write_text(path, json.dumps(data, **dumps))
