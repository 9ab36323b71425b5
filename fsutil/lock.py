"""An exclusive inter-process lock on a file, built on `filelock.FileLock` (flock(2) on Unix).

Two uses: a lock file that stays (a sweep dir's `.lock`), and one that leaves nothing behind (`leave_nothing`:
data preparation locks `<output>.lock` next to an output that may never be made, after a bad input say).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def _make_parents(path: Path) -> list[Path]:
    """path.mkdir(parents=True), returning the directories it created (outermost first)."""
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_if_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:  # not empty (it holds an output now, or another process's lock): keep it and its parents
            break


@contextlib.contextmanager
def exclusive_lock(path: Path | str, *, timeout: float | None = None, leave_nothing: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) while the block runs; other processes (and
    other threads) wait. `timeout`: seconds to wait before raising `TimeoutError` (filelock.Timeout); None waits
    for as long as it takes. A holder that dies (kill -9 included) releases the lock with its descriptor.

    `leave_nothing`: the holder deletes the lock file before it unlocks, and removes directories it made only to
    hold the lock when they are still empty. A waiter that then wins the deleted file sees that it no longer has
    a name (filelock checks st_nlink) and locks the file now at that name, so exclusion holds throughout."""
    from filelock import FileLock

    path = Path(os.path.abspath(path))
    created = _make_parents(path.parent) if leave_nothing else []
    if not leave_nothing:
        path.parent.mkdir(parents=True, exist_ok=True)
    # No soft-lock fallback: on a filesystem without flock a marker file's existence would be the lock, and
    # deleting it (leave_nothing) would hand the lock to a waiter while this process still releases it.
    lock = FileLock(path, timeout=-1 if timeout is None else timeout, fallback_to_soft=False)
    try:
        while True:
            try:
                lock.acquire()
                break
            except FileNotFoundError:
                if not leave_nothing:
                    raise
                # Another holder removed the empty parents it had made while this process waited: make them again.
                created += [d for d in _make_parents(path.parent) if d not in created]
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        yield
    finally:
        if leave_nothing:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        lock.release()
        _remove_if_empty(created)
