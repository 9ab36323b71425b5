"""Checkpoints written in the background: training goes on once the state is staged in host memory.

`stage` copies every tensor of the state to fresh host memory (a snapshot the next optimizer step cannot change),
and `BackgroundSaver` runs the write (launch/checkpoint.py's save: serialize, hash, manifest, rename) in one
worker thread. At most one save is in flight: the next one, the preemption path, Ctrl-C and the end of training
wait for it (`wait`), and an error it raised (a full disk) surfaces there, on the training thread.

Its collectives (the save's barriers and its agreement on a full disk) run on a process group of their own
(gloo), created by every rank at setup, so they never interleave with the training step's all-reduces on the
default group (the idea of torchtitan's async checkpointing). A kill -9 while a write is in flight leaves the
half-written `.tmp-step_N` that every save leaves until its rename, so the previous checkpoint stays the newest
valid one.

fsdp's shards are staged by DCP's own stager (launch/fsdp.py `stage_sharded`: DTensor shards, this rank's part
only) and written by `dcp.save` inside the background write, on the same gloo group, before the rank files, the
hashes and the rename (CheckpointManager.save's `sharded_stage`). DeepSpeed stays synchronous: its engine gathers
and writes its state itself (see Strategy.save_parts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


def stage(obj: Any) -> Any:
    """A copy of `obj` whose tensors live in fresh host memory; containers are rebuilt, other leaves shared
    (they are immutable or rebuilt by whoever made the state: ints, strings, RNG tuples)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((key, stage(value)) for key, value in obj.items())
    if isinstance(obj, list):
        return [stage(value) for value in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(stage(value) for value in obj)
    return obj


class BackgroundSaver:
    """One worker thread, one save at a time."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], Any]) -> None:
        """Run `write` in the background, after the previous write has finished (its error raised here)."""
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as error:  # noqa: BLE001 - handed to the training thread at wait()
                self._error = error

        self._thread = threading.Thread(target=run, name="ebt-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until no write is in flight; re-raise the error of the last one, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
