"""GPU plans without a GPU: the per-GPU peak of a bf16-autocast training step (`cuda_peak`, the tiny replica
traced under CPU bf16 autocast and rescaled at its recorded element sizes) and the micro-batch / policy search
against a GPU's capacity (`plan_cuda`). `ebt sweep submit` calls these through planning/cache.py, which keeps
each plan on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebt.config import ModelConfig
from ebt.flops import parameter_count
from planning.dims import _rescaled_bytes
from planning.host import DEFAULT_CUDA, DEFAULT_MARGIN
from planning.search import STATE_COPIES, _options_fastest_first, replay_buffer_bytes
from planning.tracer import _chunks, _numel, _replay_peak, _trace, trace_step

# Per-GPU capacity as torch reports it (total_memory): an H100 SXM 80GB shows 79.6 GiB, an H200 141GB 139.8 GiB.
GPU_CAPACITY_BYTES = {"H100-80GB": 79.6 * 2**30, "H200-141GB": 139.8 * 2**30}
# Outside the caching allocator's tensors: CUDA context, cuBLAS workspaces, NCCL buffers (measured ~0.5-1 GiB).
CUDA_RESERVED_BYTES = 1.5 * 2**30


@dataclass(frozen=True)
class CudaPeak:
    """One rank's predicted peak on a GPU, in bytes, by part (see cuda_peak)."""

    traced: float  # the bf16-autocast step's live tensors, rescaled: activations, fp32 gradients, bf16 weight casts
    extras: float  # what one traced process lacks: DDP's gradient buckets, fsdp's fp32 gradient shard
    state: float  # fp32 master weights and AdamW's two moments (1/world of them under fsdp)
    reserved: float  # CUDA context, workspaces, NCCL

    @property
    def tensors(self) -> float:
        return self.traced + self.extras + self.state

    @property
    def total(self) -> float:
        return DEFAULT_CUDA.factor * self.tensors + self.reserved


def cuda_peak(cfg: ModelConfig, policy: str, batch: int, strategy: str = "ddp", world: int = 1,
              remat_chunk: int = 0) -> CudaPeak:
    """Analytic per-GPU peak of a bf16-autocast training step with fp32 master weights and fp32 AdamW. The tiny
    replica is traced under bf16 autocast (on the CPU: the same autocast op lists decide which activations are
    bf16 and which stay fp32, e.g. softmax and norms) and every tensor is rescaled to the target dims at its
    recorded element size, as for the CPU prediction. Added per parameter:
    - state: fp32 weights and AdamW's two moments, 12 bytes, /world under fsdp; plus the replay buffer;
    - ddp over several ranks: the reducer's fp32 gradient buckets (+4);
    - fsdp: the reduce-scattered fp32 gradient shard (+4/world). The gathered bf16 parameters stand where the
      trace has autocast's bf16 weight copies, and its fp32 full gradients (bf16 under fsdp's mixed precision)
      are kept: conservative by 2 bytes per parameter."""
    params = float(parameter_count(cfg))
    chunks = _chunks(policy, batch, remat_chunk)
    trace = trace_step(cfg, policy, chunks=chunks, autocast_bf16=True)
    sizes = _rescaled_bytes(trace, cfg, batch, chunks, remat_chunk, lambda size: size)
    traced = _replay_peak(trace, sizes)
    if strategy == "fsdp":
        extras, state = params * 4 / world, STATE_COPIES * 4 * params / world
    else:
        extras, state = (params * 4 if world > 1 else 0.0), STATE_COPIES * 4 * params
    state += replay_buffer_bytes(cfg)  # fp32 logits on every rank, whatever the strategy
    return CudaPeak(traced, extras, state, CUDA_RESERVED_BYTES)


@dataclass
class GpuPlan:
    gpu: str
    capacity_gb: float
    budget_gb: float
    policy: str
    remat_chunk: int
    micro_batch_size: int
    grad_accum_steps: int
    predicted_peak_gb: float

    def describe(self) -> str:
        chunk = f" chunk {self.remat_chunk}" if self.remat_chunk else ""
        return (f"{self.gpu}: micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accumulation, "
                f"checkpointing {self.policy}{chunk}, predicted peak {self.predicted_peak_gb:.1f} GB of "
                f"{self.capacity_gb:.1f} GB")


def plan_cuda(cfg: ModelConfig, per_rank_batch: int, capacity_bytes: float, gpu: str = "gpu",
              strategy: str = "ddp", world: int = 1, margin: float = DEFAULT_MARGIN, policy: str = "auto",
              remat_chunk: int = 0) -> GpuPlan:
    """The largest micro-batch dividing `per_rank_batch` (the rest by accumulation) whose predicted per-GPU peak
    fits capacity x (1 - margin) under some policy, with the fastest such policy. With a `policy` other
    than "auto" only that policy (and its chunk) is considered. Raises ValueError (with the smallest peak) when
    not even micro-batch 1 fits."""
    budget = capacity_bytes * (1 - margin)
    best = None
    for batch in range(per_rank_batch, 0, -1):
        if per_rank_batch % batch:
            continue
        if policy == "auto":
            options = _options_fastest_first(cfg, batch)
        else:
            options = [(policy if cfg.kind == "ebt" else "none", remat_chunk)]
        for option, chunk in options:
            peak = cuda_peak(cfg, option, batch, strategy, world, remat_chunk=chunk).total
            if best is None or peak < best[0]:
                best = (peak, option, chunk, batch)
            if peak <= budget:
                return GpuPlan(gpu, capacity_bytes / 1e9, budget / 1e9, option, chunk, batch, per_rank_batch // batch,
                               peak / 1e9)
    peak, policy, chunk, batch = best if best is not None else (float("nan"), "none", 0, 1)
    raise ValueError(f"{gpu}: needs {peak / 1e9:.1f} GB per GPU even at micro-batch {batch} with checkpointing "
                     f"{policy} ({strategy} over {world} ranks); the budget is {budget / 1e9:.1f} GB")


def traced_autocast_peak_bytes(cfg: ModelConfig, batch: int, policy: str = "none", remat_chunk: int = 0) -> float:
    """The tensor peak of `cfg` itself under bf16 autocast (CPU), fp32 parameters and AdamW: the quantity
    `cuda_peak` predicts without its reserve (activations + parameter extras + state, single process)."""
    dims = {"B": batch, "S": cfg.architecture.context_length}
    trace = _trace(cfg, dims, True, policy, remat_chunk)
    sizes = {i: float(_numel(shape)) * trace.element_size[i] for i, shape in trace.shapes.items()}
    return _replay_peak(trace, sizes) + STATE_COPIES * 4 * parameter_count(cfg)
