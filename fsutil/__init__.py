"""File helpers every layer shares: durable atomic writes (files and directories), sha256 of files, JSON-lines
readers, file modes and an inter-process lock.

The bottom layer: it imports only the standard library (and `filelock` inside `exclusive_lock`), never torch or
another package of this repository, so ebt/, data_pipeline/, launch/, eval/ and slurm/ (and torch-free processes
such as the Slurm job wrapper) can all use it.
"""

from fsutil.dirs import atomic_dir, atomic_write_files, replace_dir
from fsutil.durable import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir, fsync_file, fsync_tree
from fsutil.hashing import HashingWriter, sha256_file
from fsutil.jsonl import JsonlLine, iter_jsonl_lines, read_jsonl, read_metrics_rows
from fsutil.lock import exclusive_lock
from fsutil.modes import chmod_like_open, current_umask

__all__ = [
    "HashingWriter",
    "JsonlLine",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_json",
    "atomic_write_text",
    "chmod_like_open",
    "current_umask",
    "exclusive_lock",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "iter_jsonl_lines",
    "read_jsonl",
    "read_metrics_rows",
    "replace_dir",
    "sha256_file",
]
