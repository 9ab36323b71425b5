"""One trainer per run dir: rank 0 holds an exclusive lock on the run's name for the whole run.

Two `ebt train` on one run dir interleave their checkpoints and metrics.jsonl rows. `run_training` (rank 0 only;
the other ranks of the same job share its lock) therefore holds `<runs_dir>/.<name>.lock`, and a second trainer
is refused in one line naming the holder. The lock sits *beside* the run dir, not in it, so that `--restart` can
move the run dir aside while the lock is held, and a run that cannot start leaves no run dir behind.

Correctness rests on flock(2) (filelock, through fsutil.exclusive_lock): the kernel releases it when its holder
dies, kill -9 included, so a dead trainer never blocks its successor. `<runs_dir>/.<name>.lock.json` records the
holder (host, pid, start time, Slurm job id) for the refusal's message. When the flock is free but the record is
still there (its holder died), the record is taken over with a note, except in one case: a holder on another host
that Slurm does not say has ended (or no Slurm to ask). On filesystems whose locks are node-local (Lustre's
localflock) the free flock proves nothing about another node, so such a record still refuses; its message says
which file to remove if that holder is gone. On the same host the flock is authoritative.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launch.cli import UserError
from launch.slurm_jobs import is_active, slurm_job_id, slurm_states


class RunLockedError(UserError):
    """Another trainer holds the run dir: one line naming it."""


def lock_paths(run_dir: Path | str) -> tuple[Path, Path]:
    """(lock file, holder record), beside the run dir."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock"), run_dir.with_name(f".{run_dir.name}.lock.json")


def describe(info: dict[str, Any] | None) -> str:
    """`pid 123 on host h, Slurm job 45, since 2026-01-02 03:04:05` (what the record says)."""
    if not info:
        return "a process that has not yet recorded itself"
    parts = [f"pid {info.get('pid')} on host {info.get('host')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if isinstance(info.get("started"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])))
    return ", ".join(parts)


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or torn by hand: only the message is poorer
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _why_gone(info: dict[str, Any]) -> str | None:
    """Why the recorded holder, whose flock is free, no longer runs; None when it may still run (see module)."""
    pid = info.get("pid")
    if info.get("host") == socket.gethostname():
        # Same host: the kernel's flock is the truth; a live pid is another process that reuses the number.
        return f"pid {pid} is no longer running" if not _pid_alive(pid) else f"pid {pid} no longer holds it"
    job = info.get("slurm_job_id")
    if not job:
        return None
    if job == slurm_job_id():
        return f"it was this Slurm job ({job}) before its requeue"
    state = slurm_states([str(job)]).get(str(job), "UNKNOWN")
    return None if is_active(state) else f"Slurm job {job} has ended ({state})"


def _refusal(run_dir: Path, info: dict[str, Any] | None, record: Path | None = None) -> RunLockedError:
    hint = f"; if it is no longer running, remove {record}" if record is not None else ""
    return RunLockedError(f"{run_dir} is being trained by another process ({describe(info)}): two trainers would "
                          f"overwrite each other's checkpoints and metrics; wait for it to end or stop it, or pick a "
                          f"new name={hint}")


def _probe(run_dir: Path | str) -> tuple[bool, dict[str, Any] | None]:
    """(whether a process holds the flock now, the holder record if any), writing nothing."""
    import fcntl

    lock, record = lock_paths(run_dir)
    try:  # never O_CREAT: a holder keeps its lock file, so a missing one means nobody holds it
        fd = os.open(lock, os.O_RDWR)
    except PermissionError:
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return False, _read_info(record)
    except OSError:  # missing, or runs_dir is no directory (preflight says so in one line)
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = False
    except BlockingIOError:
        held = True
    except OSError:  # e.g. an NFS flock on a read-only descriptor: the record is all there is to go by
        held = False
    finally:
        os.close(fd)  # releases a flock it won
    return held, _read_info(record)


def holder(run_dir: Path | str) -> dict[str, Any] | None:
    """The record of the trainer that holds `run_dir` now ({} when it has not written one yet), else None.
    Writes nothing (`ebt sweep submit` asks it of every run it would submit)."""
    held, info = _probe(run_dir)
    if held:
        return info or {}
    return info if info is not None and _why_gone(info) is None else None


def check_not_running(run_dir: Path | str) -> None:
    """Raise RunLockedError when another trainer holds `run_dir`; writes nothing (`ebt train` asks before it
    reads the run dir's checkpoints, so a running run is refused as such and not for its state)."""
    held, info = _probe(run_dir)
    if held:
        raise _refusal(Path(run_dir), info)
    if info is not None and _why_gone(info) is None:
        raise _refusal(Path(run_dir), info, lock_paths(run_dir)[1])


@contextlib.contextmanager
def run_lock(run_dir: Path | str, command: str = "ebt train") -> Iterator[None]:
    """Hold the run dir's lock while the block runs (rank 0 of a run); raise RunLockedError, having changed
    nothing, when another trainer holds it. The lock file and its record are removed on the way out, and with
    them `runs_dir` when this call made it and it is still empty, so a run that cannot start leaves nothing.

    Not fsutil.exclusive_lock(leave_nothing=True): a refusal for another host's record (module docstring) holds
    the flock too, and must leave that holder's lock file where it is."""
    from filelock import FileLock

    from fsutil import atomic_write_json
    from fsutil.lock import _make_parents, _remove_if_empty

    run_dir = Path(run_dir)
    lock, record = lock_paths(run_dir)
    made = _make_parents(lock.parent)
    flock = FileLock(lock, timeout=0, fallback_to_soft=False)  # no soft fallback: see fsutil/lock.py
    try:
        try:
            flock.acquire()
        except TimeoutError:
            raise _refusal(run_dir, _read_info(record)) from None
        try:
            left = _read_info(record)
            if left is not None:
                why = _why_gone(left)
                if why is None:  # another host's holder, alive as far as anyone can tell (module docstring)
                    raise _refusal(run_dir, left, record)
                print(f"{command}: note: taking over the lock of {run_dir} left by {describe(left)}: {why}",
                      file=sys.stderr)
            atomic_write_json(record, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                       "slurm_job_id": slurm_job_id(), "run_dir": str(run_dir)}, indent=1)
        except BaseException:
            flock.release()
            raise
        try:
            yield
        finally:
            # The record, then the lock file, then the flock: a record never outlives its holder's lock, and a
            # trainer that opened the file just before the unlink finds it nameless (filelock checks st_nlink).
            record.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            flock.release()
    finally:
        _remove_if_empty(made)


__all__ = ["RunLockedError", "check_not_running", "describe", "holder", "lock_paths", "run_lock"]
