"""Prediction and policy search on the device this process runs on (CPU RSS, or one CUDA device).

`tensor_peak_bytes` replays the tiny replica's rescaled timeline plus the untraced state (parameters and AdamW's
moments; sharded under fsdp, see `state_bytes`); `predict_peak_bytes` adds the host's calibration
(planning/host.py). `choose` takes the fastest (policy, remat_chunk) whose prediction fits the budget, `plan`
also the largest micro-batch; `resolve_checkpointing` turns a config's checkpointing="auto" into a concrete
policy before a model is built (the model never plans: ebt.checkpointing refuses an unresolved "auto" in a
training forward).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from ebt.config import ModelConfig
from ebt.flops import parameter_count
from fsutil import atomic_write_json
from planning import host
from planning.dims import _rescaled_bytes
from planning.host import Calibration, calibration_for, calibration_key, default_budget_bytes
from planning.tracer import _chunks, _numel, _replay_peak, _trace, trace_step

# Fastest first. Relative cost per MCMC step in linear-layer units (ebt.flops): a plain second-order step costs
# 6; "block" recomputes each block's forward in the inner and again in the outer backward (+2); "mcmc_step"
# recomputes the step's forward and inner gradient once (+2); both: the recomputed step recomputes its blocks.
POLICY_COST = {"none": 6.0, "mcmc_step": 8.0, "block": 8.0, "block+mcmc_step": 10.0}
STATE_COPIES = 3  # parameters and AdamW's two moments live through every step (gradients are traced)


def replay_buffer_bytes(cfg: ModelConfig, dtype_bytes: int = 4) -> float:
    """The EBT replay buffer at capacity (ebt/replay.py), alive for the whole run on every rank and never sharded:
    capacity x (S+1) int64 tokens plus capacity x S x V candidate logits. It grows with the vocabulary: at the
    quickstart's 512 x 64 x 2048 that is 268 MB, at the ladder's 32,768-word vocabulary and context 256 ~17 GB.
    With replay.top_k = k the logits are k + 1 values and k int32 indices per position instead of V.
    Not in the trace (the traced replica runs without a buffer), so it is added here."""
    if cfg.kind != "ebt" or cfg.replay.capacity == 0:
        return 0.0
    length, k = cfg.architecture.context_length, cfg.replay.top_k
    per_position = (k + 1) * dtype_bytes + k * 4 if k else cfg.architecture.vocab_size * dtype_bytes
    return float(cfg.replay.capacity * ((length + 1) * 8 + length * per_position))


def state_bytes(cfg: ModelConfig, dtype_bytes: int = 4, shard_world: int | None = None) -> float:
    """The untraced state alive through a step: parameters and AdamW's two moments; with `shard_world` (fsdp
    over that many ranks) this rank's 1/world of them plus the gathered full parameters of the step. The replay
    buffer (`replay_buffer_bytes`) is added whole: every rank keeps its own."""
    params = parameter_count(cfg) * dtype_bytes
    replay = replay_buffer_bytes(cfg, dtype_bytes)
    if shard_world is None:
        return STATE_COPIES * params + replay
    return STATE_COPIES * params / shard_world + params + replay


def traced_tensor_peak_bytes(cfg: ModelConfig, batch: int, policy: str = "none", remat_chunk: int = 0) -> float:
    """The tensor peak of `cfg` itself (no replica, no rescaling): what `tensor_peak_bytes` predicts."""
    dims = {"B": batch, "S": cfg.architecture.context_length}
    trace = _trace(cfg, dims, False, policy, remat_chunk)
    return _replay_peak(trace, {i: float(_numel(shape)) * trace.element_size[i] for i, shape in trace.shapes.items()},
                        ) + state_bytes(cfg, next(iter(trace.element_size.values()), 4))


def tensor_peak_bytes(cfg: ModelConfig, policy: str, batch: int, dtype_bytes: int = 4,
                      heap_threshold: float | None = None, shard_world: int | None = None,
                      remat_chunk: int = 0) -> float:
    """Peak bytes of live tensors during one (non-first) training step at the target size, per rank (with
    `heap_threshold`: heap-resident allocations at their high-water mark, see _replay_peak; with `shard_world`:
    parameters and optimizer state sharded by fsdp, see state_bytes; `remat_chunk`: sequences per recompute chunk
    of an "mcmc_step" policy, 0: the whole batch)."""
    chunks = _chunks(policy, batch, remat_chunk)
    trace = trace_step(cfg, policy, chunks=chunks)
    sizes = _rescaled_bytes(trace, cfg, batch, chunks, remat_chunk,
                            lambda size: dtype_bytes if size >= 4 else size)
    return _replay_peak(trace, sizes, heap_threshold) + state_bytes(cfg, dtype_bytes, shard_world)


# ---------------------------------------------------------------------------------------------- prediction


def predict_peak_bytes(cfg: ModelConfig, policy: str, batch: int, device: torch.device | str = "cpu",
                       calibration: Calibration | None = None, dtype_bytes: int = 4,
                       shard_world: int | None = None, remat_chunk: int = 0) -> float:
    """Peak memory of one rank's training step (see tensor_peak_bytes for `shard_world`)."""
    device = torch.device(device)
    cal = calibration or calibration_for(device)
    return cal.base_bytes + cal.factor * tensor_peak_bytes(cfg, policy, batch, dtype_bytes,
                                                           shard_world=shard_world, remat_chunk=remat_chunk)


def _options_fastest_first(cfg: ModelConfig, batch: int) -> list[tuple[str, int]]:
    """(policy, remat_chunk) candidates, fastest first. Chunking the recompute costs little (smaller matmuls
    over the same FLOPs), so each halving of the chunk adds a small penalty to the policy's cost."""
    if cfg.kind != "ebt":
        return [("none", 0)]
    options: list[tuple[float, str, int]] = []
    for policy, cost in POLICY_COST.items():
        options.append((cost, policy, 0))
        if "mcmc_step" in policy:
            # 2, 4 and 8 chunks: beyond that the second-order graph is no longer what dominates the peak.
            for chunks, penalty in ((2, 0.1), (4, 0.2), (8, 0.3)):
                if batch >= chunks:
                    options.append((cost + penalty, policy, -(-batch // chunks)))
    options.sort(key=lambda o: (o[0], o[1] != "mcmc_step", -o[2] if o[2] else -batch))
    return [(policy, chunk) for _, policy, chunk in options]


def _predict(cfg: ModelConfig, policy: str, chunk: int, batch: int, device: torch.device,
             shard_world: int | None = None) -> float:
    return predict_peak_bytes(cfg, policy, batch, device, shard_world=shard_world, remat_chunk=chunk)


def choose(cfg: ModelConfig, batch: int, device: torch.device | str = "cpu",
           budget_gb: float | None = None, shard_world: int | None = None) -> tuple[str, int]:
    """The fastest (policy, remat_chunk) whose predicted peak fits the budget; the leanest when none does."""
    device = torch.device(device)
    budget = budget_gb * 1e9 if budget_gb is not None else default_budget_bytes(device)
    options = _options_fastest_first(cfg, batch)
    for policy, chunk in options:
        if _predict(cfg, policy, chunk, batch, device, shard_world) <= budget:
            return policy, chunk
    return min(options, key=lambda o: _predict(cfg, o[0], o[1], batch, device, shard_world))


def choose_policy(cfg: ModelConfig, batch: int, device: torch.device | str = "cpu",
                  budget_gb: float | None = None) -> str:
    return choose(cfg, batch, device, budget_gb)[0]


@dataclass
class Plan:
    policy: str
    remat_chunk: int
    micro_batch_size: int
    predicted_peak_gb: float
    budget_gb: float


def plan(cfg: ModelConfig, max_micro_batch: int, device: torch.device | str = "cpu",
         budget_gb: float | None = None, divides: int | None = None, shard_world: int | None = None) -> Plan:
    """Largest micro-batch (<= max_micro_batch; with `divides`, only divisors of it, so that accumulating
    micro-batches keeps a fixed per-rank batch) that fits with some policy, with the fastest such policy.
    `shard_world`: fsdp over that many ranks (see state_bytes)."""
    device = torch.device(device)
    budget = budget_gb * 1e9 if budget_gb is not None else default_budget_bytes(device)
    for batch in range(max_micro_batch, 0, -1):
        if divides is not None and divides % batch:
            continue
        for policy, chunk in _options_fastest_first(cfg, batch):
            peak = _predict(cfg, policy, chunk, batch, device, shard_world)
            if peak <= budget:
                return Plan(policy, chunk, batch, peak / 1e9, budget / 1e9)
    raise ValueError(f"memory_budget_gb: {budget / 1e9:.2f} GB does not fit even micro-batch 1 under any policy")


def calibrate(measured_peak_bytes: float, base_bytes: float, cfg: ModelConfig, policy: str, batch: int,
              device: torch.device | str = "cpu", save: bool = False) -> Calibration:
    """Fit the overhead factor from ONE measured run (its peak and the process's size before the step)."""
    device = torch.device(device)
    tensors = tensor_peak_bytes(cfg, policy, batch)
    cal = Calibration(base_bytes=base_bytes, factor=(measured_peak_bytes - base_bytes) / tensors)
    if save:
        host.CALIBRATION_FILE.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(host.CALIBRATION_FILE.read_text()) if host.CALIBRATION_FILE.is_file() else {}
        data[calibration_key(device)] = dataclasses.asdict(cal)
        atomic_write_json(host.CALIBRATION_FILE, data, indent=2)
    return cal


def resolve_checkpointing(cfg: ModelConfig, policy: str, batch: int, device: torch.device | str = "cpu",
                          budget_gb: float | None = None, remat_chunk: int = 0) -> tuple[str, int]:
    """(policy, remat_chunk) a model is built with: "auto" replaced by the fastest pair whose predicted peak for
    `batch` fits `budget_gb` (default: the device's capacity minus a margin), as `choose`; any other policy is
    returned with `remat_chunk` unchanged. `ebt train` plans the micro-batch too (launch/memory_plan.py); this is
    for a model used directly (tests, benchmarks, notebooks)."""
    if policy != "auto" or cfg.kind != "ebt":
        return (policy if cfg.kind == "ebt" else "none"), remat_chunk
    return choose(cfg, batch, device, budget_gb)
