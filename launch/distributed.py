"""Process setup: the Accelerate `Accelerator` (DDP over gloo/nccl, DeepSpeed ZeRO-1/2, or the process group
and device that launch/fsdp.py shards over) and small collectives.

Works under `torchrun`, `accelerate launch --multi_gpu` and srun-exported torch env vars; a plain `python` run is
one process. Collective timeouts come from `distributed.timeout_s`: when a rank dies, the survivors' next
collective fails within that bound (gloo also notices a closed socket sooner) instead of hanging. A rank that stops
without dying is found sooner by the Heartbeat (`distributed.stall_timeout_s`).

Accelerate creates the process group and wraps the model; ranks, collectives, seeding and RNG state are taken from
torch.distributed and torch directly, for reasons measured with Accelerate 1.15.0, DeepSpeed 0.19.8 and torch 2.13
on CPU (2 ranks under torchrun, gloo, OMP_NUM_THREADS=1) and written next to each helper. The root of most of
them: Accelerate's utilities consult its PartialState singleton, not the process group, and that singleton is
wrong on one path and can outlive the group:
- distributed.strategy=deepspeed on CPU: Accelerator.process_index is 0 on BOTH ranks and num_processes is 1
  (distributed_type DEEPSPEED) while torch.distributed has the real 2-rank gloo group (ddp and fsdp report 0/1 of 2,
  MULTI_CPU).
- after Trainer.close destroys the group, a later Accelerator in the same process (tests build several) keeps the
  old state: a 1-rank fsdp run, destroy_process_group, then a ddp Accelerator: PartialState still says MULTI_CPU
  with no group, and wait_for_everyone() and reduce() raise "Default process group has not been initialized".
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launch.config import TrainConfig

if TYPE_CHECKING:
    from launch.strategies import Strategy


def configure_threads() -> None:
    """One intra-op thread per process when several share a machine's cores (OpenMP spinning costs 10-40x);
    `OMP_NUM_THREADS` wins when set. Flush denormals: EBT candidate distributions sharpen into denormal
    territory, which slowed CPU steps 3-5x when measured here without changing results that matter."""
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.set_flush_denormal(True)


def resolve_precision(precision: str, use_cuda: bool) -> str:
    """Accelerate's mixed_precision value: "bf16" only where the device runs it natively."""
    if precision == "fp32":
        return "no"
    supported = use_cuda and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if not supported:
            raise ValueError("config key 'trainer.precision': bf16 needs a CUDA device with bf16 support; "
                             "use fp32 (or auto) on this machine")
        return "bf16"
    return "bf16" if supported else "no"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The JSON file with the batch arithmetic and clipping filled in by us, not left "auto" for Accelerate.

    Measured (2 CPU ranks, micro-batch 2, 3 accumulation steps): with train_batch_size "auto" Accelerate fills
    2 x 3 x num_processes with its num_processes of 1, and DeepSpeed refuses: "train_batch_size is not equal to
    micro_batch_per_gpu * gradient_acc_step * world_size 6 != 2 * 3 * 2" (one process: 6, right). With
    gradient_clipping "auto" and no plugin value Accelerate writes 1.0, DeepSpeed's own default
    (GRADIENT_CLIPPING_DEFAULT), whatever optim.clip_grad_norm says. The plugin's gradient_accumulation_steps and
    gradient_clipping arguments would fill two of the four keys correctly, but not train_batch_size, so all four
    come from our config here, in one place. `world_size` is the process group's (the torch variables).
    """
    path = Path(cfg.distributed.deepspeed_config or "")
    ds = json.loads(path.read_text())
    t = cfg.trainer
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optim.clip_grad_norm
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def make_accelerator(cfg: TrainConfig, strategy: type[Strategy]):
    """The Accelerator for `strategy` (a launch.strategies class, asked before any Strategy exists: the
    Accelerate plugin that selects its back end, and whether it needs a process group for a single process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    use_cuda = torch.cuda.is_available()
    mixed = resolve_precision(cfg.trainer.precision, use_cuda)
    handlers = [
        InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s)),
        DistributedDataParallelKwargs(find_unused_parameters=cfg.distributed.find_unused_parameters),
    ]
    if strategy.needs_process_group and "WORLD_SIZE" not in os.environ:
        # Accelerate (or DeepSpeed under it) sets up the group once the torch variables are there.
        _single_process_rendezvous()
    backend_kwargs = strategy.accelerator_kwargs(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    # Accelerate only switches to a plugin's back end (DeepSpeed) when cpu=False (on a CPU-only machine DeepSpeed
    # then picks gloo itself); for DDP, cpu=True is what makes it set up a gloo process group on CPU.
    cpu = not use_cuda and not backend_kwargs
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers,
                              step_scheduler_with_optimizer=False, **backend_kwargs)
    if strategy.needs_process_group and not torch.distributed.is_initialized():
        # Accelerate leaves a single GPU without a process group; the sharded model needs one. (Under DeepSpeed
        # the group is up by now: deepspeed.init_distributed ran inside Accelerator, measured for one CPU process.)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo",
                                             timeout=timedelta(seconds=cfg.distributed.timeout_s))
    return accelerator


def device_mesh(device: torch.device):
    """The 1-D mesh over every rank that launch/fsdp.py shards parameters on."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def _single_process_rendezvous() -> None:
    """A plain `python`/`ebt train` process is a world of one. DeepSpeed, unlike DDP, has no single-process
    path: without the torch.distributed variables it falls back to MPI discovery and fails on a missing
    mpi4py. So set them, as torchrun would for --nproc_per_node 1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def _group_is_up() -> bool:
    """Asked on every call, so a collective runs exactly when a process group exists (see the module docstring
    for why Accelerate's cached state is not asked instead)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks, from the process group (0 of 1 without one).

    Not Accelerator.process_index / num_processes: on the CPU DeepSpeed path they are 0 and 1 on every rank
    (measured, module docstring): every rank would take itself for the only one (rank 0 of 1, is_main)."""
    if _group_is_up():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (also returned).

    Not accelerate.utils.reduce(values, "sum"): that one did sum right on all three CPU paths (ranks holding 1 and
    2 got 3), but it decides from PartialState, which fails after a destroyed group (module docstring); and its
    "mean" divides by PartialState's count, so on the CPU DeepSpeed path it returned 3.0 for a mean of 1.5.
    (accelerate.utils.gather, which nothing here needs, fails there outright: "ProcessGroupGloo::allgather:
    invalid output tensor list at index 0 (expected length 2, got 1)".)"""
    if _group_is_up():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def barrier() -> None:
    """Every rank waits for the others.

    Not Accelerator.wait_for_everyone(): a real barrier on all three CPU paths (rank 0 waited the 2 s rank 1 slept),
    but it raises once PartialState outlives the group (module docstring); this one is a no-op without a group."""
    if _group_is_up():
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (pickled).

    Not accelerate.utils.broadcast_object_list: right on all three CPU paths, but dispatched on PartialState like
    the others; this keeps every collective here on one rule (run exactly when a process group is up)."""
    if _group_is_up():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled); [obj] without a process group."""
    if _group_is_up():
        box = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(box, obj)
        return box
    return [obj]


STALL_EXIT_CODE = 1  # a failed run, as RankLostError's: not a preemption, so nothing requeues it


def heartbeat_period(timeout_s: float) -> float:
    """Seconds between beats (and between the watcher's looks): 6 per timeout, so a detection lands within
    timeout_s + 2 periods; at most 5 s (60 s default: 5 s), at least 0.2 s (the store's load)."""
    return min(5.0, max(0.2, timeout_s / 6))


class Heartbeat:
    """Ends the job in bounded time when a rank stops without dying (`kill -STOP`, a frozen node): one line
    naming it, exit STALL_EXIT_CODE, within about timeout_s + 2 periods. Without it the others wait in their
    next collective for distributed.timeout_s (600 s), and the stopped process never exits at all.

    Two daemon threads per rank. The beater adds 1 to this rank's counter in the rendezvous store every `period`
    and reads every peer's counter (one multi_get). The watcher calls a peer silent when its counter has not
    moved for timeout_s on this rank's clock (so clocks that differ between hosts do not matter), and blames
    the store's host (rank 0, except under torchrun, whose agent holds the store) when the store itself has not
    answered for as long: then no peer's counter can be read. Threads, not the training loop, beat: a step, an
    evaluation or a checkpoint may take longer than the timeout. (A live process whose main thread hangs in a
    collective still beats; that is distributed.timeout_s's case.)

    On a stall the lowest rank not silent prints the line, silent ranks on this host are killed (a stopped process
    never exits by itself, and `ebt train --nproc` waits for every rank), and the process exits at once: its
    main thread may be inside a collective with the stalled rank. The newest checkpoint stays the one a rerun
    resumes from (a save cut short is a .tmp-step_N directory the rerun removes)."""

    def __init__(self, timeout_s: float, rank: int, world: int, run_dir: str | Path) -> None:
        self.timeout_s, self.rank, self.world, self.run_dir = timeout_s, rank, world, run_dir
        self.period = heartbeat_period(timeout_s)
        self.peers = [r for r in range(world) if r != rank]
        self._prefix = f"ebt/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # torchrun restarts
        # env:// rendezvous: rank 0's process serves the store, unless torchrun's agent does.
        self._store_rank = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
        now = time.monotonic()
        self._answered = now  # the store's last reply
        self._moved = dict.fromkeys(self.peers, now)  # when each peer's counter last changed
        self._counts: dict[int, bytes | None] = dict.fromkeys(self.peers)
        self._where: dict[int, tuple[str, int]] = {}  # rank -> (host, pid): who to kill on a stall
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._store = _heartbeat_store(self.period)

    def start(self) -> Heartbeat:
        self._store.set(f"{self._prefix}where/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        for r in range(self.world):  # every counter exists from here on, so multi_get never waits for one
            self._store.add(f"{self._prefix}{r}", 0)
        self._threads = [threading.Thread(target=self._beat, name="ebt-heartbeat", daemon=True),
                         threading.Thread(target=self._watch, name="ebt-heartbeat-watch", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop both threads and wait for them (at most one period plus one store timeout), so that no thread is
        left inside a store call when the store or the interpreter goes away."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=self.period + max(2.0, 2 * self.period))

    def _beat(self) -> None:
        keys = [f"{self._prefix}{r}" for r in self.peers]
        while not self._stop.is_set():
            try:
                self._store.add(f"{self._prefix}{self.rank}", 1)
                counts = self._store.multi_get(keys)
                missing = [r for r in self.peers if r not in self._where]
                where_keys = [f"{self._prefix}where/{r}" for r in missing]
                if missing and self._store.check(where_keys):
                    for r, value in zip(missing, self._store.multi_get(where_keys), strict=True):
                        host, pid = value.decode().rsplit(" ", 1)
                        self._where[r] = (host, int(pid))
            except Exception:  # noqa: BLE001 - a store that stops answering is the watcher's to judge
                counts = None
            now = time.monotonic()
            if counts is not None:
                self._answered = now
                for r, count in zip(self.peers, counts, strict=True):
                    if count != self._counts[r]:
                        self._counts[r], self._moved[r] = count, now
            self._stop.wait(self.period)

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period):
            now = time.monotonic()
            if now - last > self.timeout_s / 2:
                # This process was itself stopped (its threads did not run): the gap says nothing about its peers.
                self._answered = now
                for r in self.peers:
                    self._moved[r] = now
            last = now
            if now - self._answered > self.timeout_s:
                if self._store_rank is not None and self._store_rank != self.rank:
                    self._end([self._store_rank])
                continue  # no peer can be judged while the store does not answer
            silent = [r for r in self.peers if now - self._moved[r] > self.timeout_s]
            if silent:
                self._end(silent)

    def _end(self, silent: list[int]) -> None:
        if self._stop.is_set():  # close() got there first: the run ended normally
            return
        if self.rank == min(r for r in range(self.world) if r not in silent):
            who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
            line = (f"ebt train: error: {who} sent no heartbeat for {self.timeout_s:g} s (stalled or stopped; "
                    "distributed.stall_timeout_s); the run can resume from its last checkpoint in "
                    f"{self.run_dir}\n")
            os.write(2, line.encode())
        here = socket.gethostname()
        for r in silent:
            host, pid = self._where.get(r, ("", 0))
            if host == here and pid > 0:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(STALL_EXIT_CODE)


def start_heartbeat(timeout_s: float, run_dir: str | Path) -> Heartbeat | None:
    """A started Heartbeat when several ranks run and timeout_s > 0 (distributed.stall_timeout_s), else None."""
    rank, world = rank_and_world()
    global _RUNNING_HEARTBEAT
    if _RUNNING_HEARTBEAT is not None:
        # One per process: a process that builds another Trainer without closing the last (the parity tests build
        # one per case) must not leave threads beating into a store behind it.
        _RUNNING_HEARTBEAT.stop()
    if world < 2 or timeout_s <= 0:
        return None
    _RUNNING_HEARTBEAT = Heartbeat(timeout_s, rank, world, run_dir).start()
    return _RUNNING_HEARTBEAT


_RUNNING_HEARTBEAT: Heartbeat | None = None


@atexit.register
def _stop_running_heartbeat() -> None:
    """Join the heartbeat's threads before the interpreter tears down: a daemon thread inside a TCPStore call at
    exit aborts the process ("terminate called without an active exception", seen in a 2-rank parity test)."""
    if _RUNNING_HEARTBEAT is not None:
        _RUNNING_HEARTBEAT.stop()


def _heartbeat_store(period: float):
    """A store connection of the heartbeat's own, so that its threads never share a client with the process group.
    `period`-scale timeouts keep a store that stops answering from blocking the beater for long."""
    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import _get_default_store

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return _get_default_store()  # a group set up without the env:// variables
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=max(2.0, 2 * period)), wait_for_workers=False)


class RankLostError(RuntimeError):
    """Another rank died, was killed or stopped responding mid-collective: printed as one line naming it."""


# What gloo/NCCL/c10d put in the error of a collective whose peer went away (closed socket or timeout).
_PEER_FAILURE = re.compile(r"gloo|nccl|c10d|ProcessGroup|Connection (reset|closed|refused)|[Tt]imed out|Broken pipe")


def _first_cause(message: str) -> str:
    """The informative part of a backend error: "Read error [127.0.0.1]:36272: Connection reset by peer"."""
    line = message.strip().splitlines()[0] if message.strip() else "no message"
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", line)  # the C++ source location
    return re.split(r"\. This is typically caused", line)[0].rstrip(". ")


def _absent_ranks(rank: int, world: int, grace_s: float) -> list[int] | None:
    """The ranks that do not check in at the rendezvous store within grace_s (None when the store is gone too).
    With two ranks the other one is the lost one: no store needed."""
    if world == 2:
        return [1 - rank]
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set(f"ebt/alive/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            absent = [r for r in range(world) if r != rank and not store.check([f"ebt/alive/{r}"])]
            if not absent or time.monotonic() > deadline:
                return absent
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store lives on rank 0 (or the launcher): it may be gone as well
        return None


def lost_rank_error(error: BaseException, grace_s: float = 5.0) -> RankLostError | None:
    """A one-line RankLostError when `error` is a collective that failed because a peer rank went away, naming
    that rank; None for any other error. Call it before the process group is destroyed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    dist_error = getattr(torch.distributed, "DistError", RuntimeError)
    if world < 2 or not isinstance(error, RuntimeError):
        return None
    if not (isinstance(error, dist_error) or _PEER_FAILURE.search(str(error))):
        return None
    absent = _absent_ranks(rank, world, grace_s)
    if absent:
        who = f"rank {absent[0]}" if len(absent) == 1 else f"ranks {', '.join(map(str, absent))}"
    else:
        who = "another rank"
    return RankLostError(f"rank {rank} of {world} lost {who} in a collective ({_first_cause(str(error))}): it "
                         "died, was killed or stopped responding; its own output (or the scheduler's) says why")
