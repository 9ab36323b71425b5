"""The submitit job that runs one sweep run: one instance per task (rank), the trainer in a child process.

Why a child process instead of calling `run_training` in the submitit process: submitit's process owns the
requeue signal (USR2: its handler calls `checkpoint()` below and then `scontrol requeue`), while the trainer
owns the preemption checkpoint (it traps SIGTERM/USR1/USR2, finishes the step, saves and exits with
PREEMPTED_EXIT_CODE). In one process the trainer's handlers would replace submitit's and nobody would requeue.
A fresh process per attempt also gives every resume a clean torch.distributed / Accelerate state.

Signals: Slurm delivers the USR2 to every process of the step (children included); the local executor only to
our process, so `checkpoint()` forwards it too, repeatedly, until the trainer exits. The child starts with
USR1/USR2 ignored (inherited SIG_IGN) until the trainer installs its handler, so a signal during start-up
(Slurm may send the time-limit signal up to one scheduler tick early) cannot kill a rank half-way through
joining the process group; the repeated forward reaches it once the handler is in place.

Cancellation wins over requeue: a SIGTERM that reaches the wrapper (scancel, or the time limit's kill) at any
time, also while `checkpoint()` is waiting for the trainer after a USR2, means the job ends without a requeue.
Multi-node: every rank records its trainer's exit (`state/<run>.ranks/<job>-<restart>/<rank>`); rank 0
requeues only once every rank's trainer has exited (or RANK_WAIT_S passed), and the other ranks then wait for
the requeue's SIGTERM and exit 0, so no trainer is killed mid-save and no step ends FAILED.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit

from fsutil import atomic_write_json, atomic_write_text, read_metrics_rows

# launch.signals.PREEMPTED_EXIT_CODE, read without importing torch into the wrapper process.
PREEMPTED_EXIT_CODE = 75
RANK_WAIT_S = 90.0  # how long rank 0 waits for the other ranks' trainers to exit before requeueing anyway
# How long rank 0 waits, after its requeue, for Slurm's SIGTERM before exiting anyway: within Slurm's default
# KillWait (30 s), after which SIGKILL would follow.
REQUEUE_TERM_WAIT_S = 25.0


def attempt_key(job_id: str | None) -> str:
    """One attempt of a job: its id and Slurm's restart count (the same job id is kept across requeues)."""
    return f"{job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def append_event(path: Path, event: dict[str, Any]) -> None:
    """One JSON line per attempt event (start / preempted / finished / failed); O_APPEND keeps lines whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"time": time.time(), **event}) + "\n")


def final_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The trainer's final row (`"final": true`) of metrics.jsonl plus the last training loss, or None."""
    final: dict[str, Any] | None = None
    last_train: dict[str, Any] | None = None
    for row in read_metrics_rows(run_dir):
        if row.get("final"):
            final = row
        elif "loss" in row:
            last_train = row
    if final is None:
        return None
    out = dict(final)
    if last_train is not None:
        out["train_loss"] = last_train.get("loss")
    return out


class TrainJob(submitit.helpers.Checkpointable):
    """Run `ebt train <config>` for one run on every task; rank 0 records attempts and the result."""

    def __init__(self, run_name: str, config_path: str, state_dir: str, run_dir: str, cwd: str,
                 config_hash: str, python: str | None = None) -> None:
        self.run_name = run_name
        self.config_path = config_path
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.cwd = cwd
        self.config_hash = config_hash
        self.python = python  # None: the job's own interpreter (resolved on the compute node)
        self._proc: subprocess.Popen | None = None
        self._exited = threading.Event()
        self._rc: int | None = None
        self._signalled = False
        self._terminated = False  # a SIGTERM reached this wrapper: cancelled, never requeue

    # The live child and its watcher are not picklable and mean nothing after a requeue.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_proc=None, _exited=None, _rc=None, _signalled=False, _terminated=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._exited = threading.Event()

    @property
    def events_path(self) -> Path:
        return Path(self.state_dir) / f"{self.run_name}.attempts.jsonl"

    @property
    def result_path(self) -> Path:
        return Path(self.state_dir) / f"{self.run_name}.result.json"

    @property
    def ranks_dir(self) -> Path:
        return Path(self.state_dir) / f"{self.run_name}.ranks"

    # ------------------------------------------------------------------------------------------ ranks
    def record_rank_exit(self, job_id: str | None, rank: int, rc: int) -> None:
        path = self.ranks_dir / attempt_key(job_id) / str(rank)
        atomic_write_text(path, str(rc))

    def wait_for_ranks(self, job_id: str | None, world_size: int, known: dict[int, int | None] | None = None,
                       timeout_s: float = RANK_WAIT_S, poll_s: float = 0.2) -> dict[int, int | None]:
        """Each rank's trainer exit code for this attempt, waiting up to `timeout_s` for all of them (None: a
        rank that had not exited by then). `known`: ranks whose exit this process saw itself (rank 0's own)."""
        folder = self.ranks_dir / attempt_key(job_id)
        deadline = time.time() + timeout_s
        while True:
            found = dict(known or {})
            for rank in range(world_size):
                if rank in found:
                    continue
                try:
                    found[rank] = int((folder / str(rank)).read_text())
                except (OSError, ValueError):
                    found[rank] = None
            if all(v is not None for v in found.values()) or time.time() >= deadline or self._terminated:
                return found
            time.sleep(poll_s)

    def _clear_old_attempts(self, job_id: str | None) -> None:
        import shutil

        keep = attempt_key(job_id)
        if self.ranks_dir.is_dir():
            for old in self.ranks_dir.iterdir():
                if old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)

    def _trap_termination(self) -> None:
        """Remember a SIGTERM (scancel, time limit) and keep submitit's own handling of it."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self._terminated = True
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (tests calling the job body directly)
            pass

    # ------------------------------------------------------------------------------------------ environment
    def _child_env(self, job_env: Any) -> dict[str, str]:
        env = dict(os.environ)
        if job_env.num_tasks > 1:
            # torch.distributed's env:// rendezvous, from submitit's view of the allocation: MASTER_ADDR is the
            # first node of the job, the port derives from the job id (same on every rank and every requeue).
            dist = submitit.helpers.TorchDistributedEnvironment()
            env.update(MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port), RANK=str(dist.rank),
                       WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(dist.local_rank),
                       LOCAL_WORLD_SIZE=str(dist.local_world_size), GROUP_RANK=str(job_env.node))
        # Several ranks may share a node's cores: one OpenMP thread per allocated CPU unless the user chose.
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start_child(self, env: dict[str, str]) -> None:
        cmd = [self.python or sys.executable, "-m", "launch.cli", "train", self.config_path]

        def ignore_preemption_until_trainer_handles_it() -> None:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

        self._exited = threading.Event()
        self._proc = subprocess.Popen(cmd, cwd=self.cwd, env=env,
                                      preexec_fn=ignore_preemption_until_trainer_handles_it)
        proc = self._proc

        # Waiting happens in a thread: a signal handler that waits on the Popen object while the main thread
        # is inside Popen.wait() would deadlock on Popen's internal lock.
        def watch() -> None:
            self._rc = proc.wait()
            self._exited.set()

        threading.Thread(target=watch, name=f"watch-{self.run_name}", daemon=True).start()

    def _wait_child(self) -> int:
        while not self._exited.wait(0.5):
            pass
        assert self._rc is not None
        return self._rc

    def _record_result(self, job_id: str | None) -> dict[str, Any]:
        result = final_metrics(Path(self.run_dir))
        if result is None:
            append_event(self.events_path, {"event": "failed", "job_id": job_id, "rc": 0})
            raise RuntimeError(f"run '{self.run_name}': trainer exited 0 but wrote no final metrics row in "
                               f"{self.run_dir}/metrics.jsonl")
        result.update(run=self.run_name, job_id=job_id, config_hash=self.config_hash)
        atomic_write_json(self.result_path, result, indent=1, default=str)
        append_event(self.events_path, {"event": "finished", "job_id": job_id, "step": result.get("step")})
        return result

    # ------------------------------------------------------------------------------------------ job body
    def __call__(self) -> dict[str, Any]:
        job_env = submitit.JobEnvironment()
        rank = job_env.global_rank
        self._trap_termination()
        if rank == 0:
            self._clear_old_attempts(job_env.job_id)
            append_event(self.events_path, {"event": "start", "job_id": job_env.job_id, "host": socket.gethostname(),
                                            "world_size": job_env.num_tasks, "config_hash": self.config_hash})
        self._start_child(self._child_env(job_env))
        rc = self._wait_child()
        if job_env.num_tasks > 1:
            self.record_rank_exit(job_env.job_id, rank, rc)
        if rc == 0:
            return self._record_result(job_env.job_id) if rank == 0 else {"rank": rank}
        if rc == PREEMPTED_EXIT_CODE and (rank != 0 or self._signalled):
            # Rank 0 requeues from its signal handler once every rank has exited; the other ranks end without a
            # result file (SystemExit is not caught by submitit, so no "success" pickle claims the run is done).
            if rank != 0 and "SLURM_JOB_ID" in os.environ:
                # Under Slurm, wait for the requeue (or a cancel) to end the job: exiting now with an error code
                # would mark the step FAILED before rank 0 has requeued.
                deadline = time.time() + RANK_WAIT_S + 60
                while not self._terminated and time.time() < deadline:
                    time.sleep(0.2)
                if self._terminated:
                    sys.exit(0)
            sys.exit(PREEMPTED_EXIT_CODE)
        if rank == 0:
            append_event(self.events_path, {"event": "failed", "job_id": job_env.job_id, "rc": rc})
        if rc == PREEMPTED_EXIT_CODE:
            # A SIGTERM/USR1 that was not submitit's requeue signal (scancel, node shutdown): the checkpoint is
            # saved; `ebt sweep submit` again resumes from it.
            raise RuntimeError(f"run '{self.run_name}': trainer checkpointed after a termination signal and exited "
                               f"{rc}; resubmit to resume")
        raise RuntimeError(f"run '{self.run_name}': trainer exited with code {rc} (log: the job's stderr)")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 when the requeue signal arrives: let the trainer checkpoint, wait for every
        rank's trainer to exit, then requeue. None (no requeue) when the job was cancelled meanwhile."""
        self._signalled = True
        proc = self._proc
        if proc is not None:
            sig = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}", signal.SIGUSR2)
            while not self._exited.wait(2.0):
                try:  # until the trainer's own handler is installed the child ignores it; keep asking
                    proc.send_signal(sig)
                except ProcessLookupError:
                    break
            self._exited.wait()
        try:
            job_env = submitit.JobEnvironment()
            job_id, world_size = job_env.job_id, job_env.num_tasks
        except Exception:  # noqa: BLE001 - only for the record
            job_id, world_size = None, 1
        ranks: dict[int, int | None] = {0: self._rc}
        if world_size > 1:
            ranks = self.wait_for_ranks(job_id, world_size, known={0: self._rc})
        if self._terminated or (self._rc is not None and self._rc < 0 and not self._exited_after_signal_ok()):
            # scancel (SIGTERM) came during the preemption, e.g. while the trainer was still starting: a cancelled
            # job stays cancelled. Returning None makes submitit end the job instead of requeueing it.
            append_event(self.events_path, {"event": "cancelled", "job_id": job_id, "rc": self._rc})
            return None
        if self._rc == 0:
            # The trainer finished just as the signal came: record it and end the job instead of requeueing
            # a finished run (SystemExit(0) leaves the task, and so the job, COMPLETED).
            if not self.result_path.is_file() or json.loads(self.result_path.read_text()).get("job_id") != job_id:
                self._record_result(job_id)
            sys.exit(0)
        # Also when the signal came before the trainer started: the attempt still ends in a requeue.
        append_event(self.events_path, {"event": "preempted", "job_id": job_id, "rc": self._rc,
                                        "ranks": {str(k): v for k, v in ranks.items()}})
        if "SLURM_JOB_ID" in os.environ:
            self._exit_cleanly_once_requeued()
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _exit_cleanly_once_requeued(self) -> None:
        """submitit runs `scontrol requeue` after checkpoint() returns and then exits -1 at once. A task that
        exits non-zero before the requeue's SIGTERM reaches it marks the step FAILED (seen on the dev cluster:
        `8.0|FAILED` beside `8|REQUEUED` in tests/slurm/test_slurm_cluster.py, issue 20's baseline run). Rank 0
        then waits for that SIGTERM, as the other ranks do, and exits 0; without it, after REQUEUE_TERM_WAIT_S,
        it exits -1 as submitit would."""
        from submitit.core.job_environment import SignalHandler

        def exit_after_requeue_signal(handler: SignalHandler) -> None:
            deadline = time.time() + REQUEUE_TERM_WAIT_S
            while not self._terminated and time.time() < deadline:
                time.sleep(0.1)
            sys.exit(0 if self._terminated else -1)

        SignalHandler._exit = exit_after_requeue_signal  # type: ignore[method-assign]

    def _exited_after_signal_ok(self) -> bool:
        """A trainer killed by a signal (rc < 0) was not stopped by our USR2 forwarding (the child ignores USR2
        until its handler is in place, and then exits 75): something terminated it; only a SIGUSR2 death (the
        signal raced the handler) still counts as a preemption."""
        return self._rc == -int(signal.SIGUSR2)
