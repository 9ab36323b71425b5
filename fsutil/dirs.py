"""Durable directory writes: build a directory (or a set of files) under a hidden temporary name, fsync it,
rename it into place and fsync the parent, so a reader sees the old contents or the new ones, never a mix."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fsutil.durable import fsync_dir, fsync_tree, temp_sibling


def replace_dir(staged: Path | str, final: Path | str, *, sync: bool = True) -> None:
    """Move the finished directory `staged` to `final` (same filesystem), replacing a directory there.

    `sync`: fsync everything in `staged` first (pass False when the caller already did). An existing `final` is
    renamed aside first and deleted after the swap: the window without a `final` is one rename, not a whole
    rmtree, and a crash in it leaves a hidden `.<name>.old.*` directory, never a half-deleted `final`."""
    staged, final = Path(staged), Path(final)
    if sync:
        fsync_tree(staged)
    old = None
    if final.exists():
        old = temp_sibling(final, "old")
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path | str, *, staging: str | None = None) -> Iterator[Path]:
    """Yield an empty staging directory beside `final`; on a clean exit it replaces `final` (see replace_dir),
    on an exception it is removed and `final` is untouched.

    `staging`: a fixed name for the staging directory (any leftover of a killed run under that name is removed
    first, so large partial outputs do not pile up); only safe when the caller excludes concurrent writers of
    `final` (a lock). Default: a unique hidden name."""
    final = Path(final)
    staged = final.parent / staging if staging is not None else temp_sibling(final)
    if staging is not None:
        shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
        replace_dir(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def atomic_write_files(out_dir: Path | str, contents: dict[str, bytes]) -> list[Path]:
    """Write several files into `out_dir` (which may hold other files, kept as they are): all are written and
    fsynced under a hidden staging directory first, then each is renamed into place, so an interrupted write
    leaves the previous versions. Returns the written paths, in the order of `contents`."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = temp_sibling(out)
    staged.mkdir()
    try:
        for name, data in contents.items():
            (staged / name).write_bytes(data)
        fsync_tree(staged)
        out.mkdir(exist_ok=True)
        written = []
        for name in contents:
            os.replace(staged / name, out / name)
            written.append(out / name)
        fsync_dir(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return written
