"""Memory planning: predict a training step's peak memory per checkpointing policy, and pick one that fits.

Where it sits. Planning is resolved BEFORE a model is built, by whoever builds it: `ebt train`
(launch/memory_plan.py, launch/train.py's memory check) and `ebt sweep submit` (slurm/spec.py's GPU plans). The
model never plans: ebt.checkpointing takes a concrete policy, and a model handed an unresolved "auto" refuses to
train (`resolve_checkpointing` here resolves it). So this package is a layer of its own above the model
package: it imports ebt (configs, build_model for the traced replica, the FLOP model's parameter count) and
fsutil, and is imported by launch/ and slurm/ (and benchmarks/); ebt/ never imports it.

The model. A step's tensor memory is a timeline of allocations and frees whose ORDER does not depend on the
sizes (same code path for any batch, context, vocab or width), only each tensor's bytes do. So:
1. `trace_step` (tracer.py) runs two real training steps of a tiny replica (same layers, heads, K, variant,
   policy, FFN ratio; small batch, context, vocab and width chosen so that every dimension value is
   unambiguous, dims.py) under a TorchDispatchMode that records every storage's allocation, shape and release.
2. `tensor_peak_bytes` (search.py) rescales every recorded tensor analytically (dims.py: each dimension maps to
   batch, context, context+1, vocab, width, FFN width, head width or a product of them; anything else is a
   constant) and replays the timeline: the peak of the rescaled live bytes, plus the parameters, is the step's
   tensor peak.
3. One short measured run (`calibrate`) fits the device's constant and overhead: peak RSS = base + factor x
   tensor peak on CPU (base = the interpreter and libraries; factor = allocator overhead; host.py probes the
   allocator and keeps the calibration file). On CUDA the caching allocator's peak is close to the tensor
   peak, so base = 0 and factor = 1 unless calibrated.

`choose` (cfg.checkpointing="auto") takes the fastest policy and recompute chunk whose prediction fits the
budget; `plan` also picks the largest micro-batch that fits. `cuda_peak` / `plan_cuda` (gpu.py) predict and
plan a bf16-autocast step on a GPU without one; `cached_plan_cuda` (cache.py) keeps those plans on disk, keyed
by what determines them, so a sweep's dry-run traces each one once per machine.

Sharded training (distributed.strategy=fsdp, `shard_world`=W ranks): each rank keeps 1/W of the parameters and
of AdamW's moments, and inside the step the gathered full parameters (launch/fsdp.py keeps every block gathered
for the step). Gradients are traced as in one process: they are whole until FSDP reduce-scatters them at the end
of the backward, and only the 1/W shard lives on to the optimizer step (`state_bytes`).
"""

from planning.cache import PLANNER_VERSION, cache_dir, cached_plan_cuda
from planning.gpu import (
    CUDA_RESERVED_BYTES,
    GPU_CAPACITY_BYTES,
    CudaPeak,
    GpuPlan,
    cuda_peak,
    plan_cuda,
    traced_autocast_peak_bytes,
)
from planning.host import (
    DEFAULT_CPU,
    DEFAULT_CUDA,
    DEFAULT_MARGIN,
    Calibration,
    calibration_for,
    default_budget_bytes,
    device_capacity_bytes,
    host_allocator,
)
from planning.search import (
    POLICY_COST,
    STATE_COPIES,
    Plan,
    calibrate,
    choose,
    choose_policy,
    plan,
    predict_peak_bytes,
    replay_buffer_bytes,
    resolve_checkpointing,
    state_bytes,
    tensor_peak_bytes,
    traced_tensor_peak_bytes,
)
from planning.tracer import Trace, trace_step

__all__ = [
    "CUDA_RESERVED_BYTES", "DEFAULT_CPU", "DEFAULT_CUDA", "DEFAULT_MARGIN", "GPU_CAPACITY_BYTES", "PLANNER_VERSION",
    "POLICY_COST", "STATE_COPIES", "Calibration", "CudaPeak", "GpuPlan", "Plan", "Trace", "cache_dir",
    "cached_plan_cuda", "calibrate", "calibration_for", "choose", "choose_policy", "cuda_peak",
    "default_budget_bytes", "device_capacity_bytes", "host_allocator", "plan", "plan_cuda", "predict_peak_bytes",
    "replay_buffer_bytes", "resolve_checkpointing", "state_bytes", "tensor_peak_bytes", "trace_step",
    "traced_autocast_peak_bytes", "traced_tensor_peak_bytes",
]
