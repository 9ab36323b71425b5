"""Process setup: the Accelerate `Accelerator` (DDP over gloo/nccl, or DeepSpeed ZeRO-1/2) and small collectives.

Works under `torchrun`, `accelerate launch --multi_gpu` and srun-exported torch env vars; a plain `python` run is
one process. Collective timeouts come from `distributed.timeout_s`: when a rank dies, the survivors' next
collective fails within that bound (gloo also notices a closed socket sooner) instead of hanging.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from launch.config import TrainConfig


def configure_threads() -> None:
    """One intra-op thread per process when several share a machine's cores (OpenMP spinning costs 10-40x);
    `OMP_NUM_THREADS` wins when set. Flush denormals: EBT candidate distributions sharpen into denormal
    territory, which slows CPU steps 3-5x (FACTS.md) without changing results that matter."""
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
    """The JSON file with the batch arithmetic and clipping filled in by us.

    Accelerate's plugin assumes one process when it derives train_batch_size, and DeepSpeed 0.19.8 silently
    defaults gradient_clipping to 1.0 (FACTS.md), so both come from our config explicitly.
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


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    use_cuda = torch.cuda.is_available()
    mixed = resolve_precision(cfg.trainer.precision, use_cuda)
    handlers = [
        InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s)),
        DistributedDataParallelKwargs(find_unused_parameters=cfg.distributed.find_unused_parameters),
    ]
    plugin = None
    if cfg.distributed.strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        if "WORLD_SIZE" not in os.environ:
            _single_process_rendezvous()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world))
    # Accelerate only switches to DeepSpeed when cpu=False (on a CPU-only machine DeepSpeed then picks gloo
    # itself); for DDP, cpu=True is what makes it set up a gloo process group on CPU.
    cpu = not use_cuda and plugin is None
    return Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers,
                       deepspeed_plugin=plugin, step_scheduler_with_optimizer=False)


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


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj
