"""Memory planner: predict a training step's peak memory per checkpointing policy, and pick one that fits.

The model. A step's tensor memory is a timeline of allocations and frees whose ORDER does not depend on the
sizes (same code path for any batch, context, vocab or width), only each tensor's bytes do. So:
1. `trace_step` runs two real training steps of a tiny replica (same layers, heads, K, variant, policy, FFN
   ratio; small batch, context, vocab and width chosen so that every dimension value is unambiguous) under a
   TorchDispatchMode that records every storage's allocation, shape and release.
2. `predict` rescales every recorded tensor analytically (each dimension maps to batch, context, context+1,
   vocab, width, FFN width, head width or a product of them; anything else is a constant) and replays the
   timeline: the peak of the rescaled live bytes, plus the parameters, is the step's tensor peak.
3. One short measured run (`calibrate`) fits the device's constant and overhead: peak RSS = base + factor x
   tensor peak on CPU (base = the interpreter and libraries; factor = allocator overhead). On CUDA the
   caching allocator's peak is close to the tensor peak, so base = 0 and factor = 1 unless calibrated.

`choose` (cfg.checkpointing="auto") takes the fastest policy and recompute chunk whose prediction fits the
budget; `plan` also picks the largest micro-batch that fits.

Sharded training (distributed.strategy=fsdp, `shard_world`=W ranks): each rank keeps 1/W of the parameters and
of AdamW's moments, and inside the step the gathered full parameters (launch/fsdp.py keeps every block gathered
for the step). Gradients are traced as in one process: they are whole until FSDP reduce-scatters them at the end
of the backward, and only the 1/W shard lives on to the optimizer step (`state_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebt.config import ModelConfig
from ebt.flops import parameter_count
from fsutil import atomic_write_json

# Fastest first. Relative cost per MCMC step in linear-layer units (ebt.flops): a plain second-order step costs
# 6; "block" recomputes each block's forward in the inner and again in the outer backward (+2); "mcmc_step"
# recomputes the step's forward and inner gradient once (+2); both: the recomputed step recomputes its blocks.
POLICY_COST = {"none": 6.0, "mcmc_step": 8.0, "block": 8.0, "block+mcmc_step": 10.0}
STATE_COPIES = 3  # parameters and AdamW's two moments live through every step (gradients are traced)
DEFAULT_MARGIN = 0.10  # of device capacity, kept free by the default budget
CALIBRATION_FILE = Path(os.environ.get("EBT_PLANNER_CALIBRATION", Path.home() / ".cache/ebt/planner.json"))


@dataclass(frozen=True)
class Calibration:
    base_bytes: float  # constant: interpreter, libraries, allocator arenas (0 on CUDA)
    factor: float  # measured / predicted tensor bytes


# Measured here (benchmarks/planner.py, settled peaks; a saved calibration wins): the CPU overhead over the
# live tensors depends on the host allocator. glibc's heap fragments (2.1-2.4x for none, less for the
# recompute policies: the larger, safe value is kept); tcmalloc and jemalloc stay at 1.2-1.5x for every policy
# (launch/allocator.py).
DEFAULT_CPU = {"system": Calibration(base_bytes=221 * 2**20, factor=2.22),
               "tcmalloc": Calibration(base_bytes=226 * 2**20, factor=1.37),
               "jemalloc": Calibration(base_bytes=223 * 2**20, factor=1.35)}
DEFAULT_CUDA = Calibration(base_bytes=0.0, factor=1.05)
ALLOCATOR_LIBRARIES = ("tcmalloc", "jemalloc")


# ---------------------------------------------------------------------------------------------- tracing


@dataclass
class Trace:
    """Allocation timeline of a tiny replica: events (+1 alloc / -1 free, storage id) and each storage's shape."""

    dims: dict[str, int]
    shapes: dict[int, tuple[int, ...]]
    element_size: dict[int, int]
    events: list[tuple[int, int]]
    start: int
    ops: dict[int, str]  # index of the first event of the measured (second) step


class _AllocationTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.element_size: dict[int, int] = {}
        self.ops: dict[int, str] = {}  # producing op, for inspecting what is alive at the peak
        self.events: list[tuple[int, int]] = []
        self.live: dict[int, int] = {}  # storage data_ptr -> tracked id
        self.next_id = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.live or storage.nbytes() == 0:
                continue
            ident = self.next_id
            self.next_id += 1
            self.live[ptr] = ident
            # The shape of the tensor that owns a fresh storage is (almost always) the storage's full shape.
            self.shapes[ident] = tuple(tensor.shape) if tensor.numel() * tensor.element_size() == storage.nbytes() \
                else (storage.nbytes() // tensor.element_size(),)
            self.element_size[ident] = tensor.element_size()
            self.ops[ident] = func.__name__
            self.events.append((1, ident))
            weakref.finalize(storage_owner(tensor), self._free, ptr, ident)
        return out

    def _free(self, ptr: int, ident: int) -> None:
        if self.live.get(ptr) == ident:
            del self.live[ptr]
            self.events.append((-1, ident))


def storage_owner(tensor: torch.Tensor) -> object:
    """An object that lives exactly as long as the tensor's storage: the storage's own Python wrapper is
    recreated on every access, so hold the first tensor instead (views of it keep its storage, and PyTorch keeps
    a tensor's Python object alive as long as any C++ reference to it, e.g. in the autograd graph)."""
    return tensor if tensor._base is None else tensor._base


def _tensors(out) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for item in out:
            yield from _tensors(item)


def _tiny_dims(cfg: ModelConfig, chunks: int = 1) -> dict[str, int]:
    """Small dimensions whose values, and the products of them that occur in shapes, are unambiguous: no two
    products with different meanings share a value, and none equals a dimension that does not scale (heads,
    K, small constants). With `chunks` > 1 the batch is chunks x C, C standing for cfg.remat_chunk."""
    fixed = {1, 2, 3, 4} | {m * cfg.n_heads for m in (1, 2, 3, 4)} | {cfg.mcmc_steps, cfg.n_layers, chunks}
    batches = [(b, None) for b in (5, 7, 3)] if chunks == 1 else [(chunks * c, c) for c in (5, 7, 3, 11)]
    for head, (batch, chunk), seq, vocab in itertools.product((26, 10, 14, 22), batches, (13, 11, 17, 19),
                                                                (41, 37, 43)):
        dim = cfg.n_heads * head
        dims = {"B": batch, "S": seq, "V": vocab, "D": dim, "F": max(1, int(round(dim * cfg.ffn_mult))), "hd": head}
        if chunk is not None:
            dims["C"] = chunk
        table = _product_table(dims, cfg.n_heads)
        if all(len(meanings) == 1 for meanings in table.values()) and not fixed & set(table):
            return dims
    raise ValueError(f"planner: found no unambiguous tiny replica for n_heads={cfg.n_heads}")


def _atoms(dims: dict[str, int], heads: int) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Dimension atoms as (constant, base symbols). The base is the HALF head width r (rotary embedding works
    on halves), so the head width is (2, (r,)) and the width D = heads x head width is (2H, (r,)): products such
    as (batch x heads) x head width and batch x D are then recognised as the same quantity. F is its own
    symbol unless ffn_mult is 1."""
    h = heads
    if dims["F"] == dims["D"]:
        f, fc = "r", 2 * h
    else:
        f, fc = "F", 1
    # Chunked recompute: the batch is (chunks x C) so that batch-sized and chunk-sized dims are told apart.
    n = dims["B"] // dims["C"] if "C" in dims else 1
    b = "C" if "C" in dims else "B"
    d = 2 * h
    return {"B": (n, (b,)), "S": (1, ("S",)), "S1": (1, ("S1",)), "V": (1, ("V",)), "D": (d, ("r",)),
            "F": (fc, (f,)), "hd": (2, ("r",)), "hd2": (1, ("r",)), "2D": (2 * d, ("r",)), "3D": (3 * d, ("r",)),
            "4D": (4 * d, ("r",)), "2F": (2 * fc, (f,)), "BH": (n * h, (b,)), "BSD": (n * d, (b, "S", "r")),
            **({"C": (1, ("C",)), "CH": (h, ("C",))} if "C" in dims else {})}


def _base_values(dims: dict[str, int]) -> dict[str, int]:
    return {"B": dims["B"], "S": dims["S"], "S1": dims["S"] + 1, "V": dims["V"], "D": dims["D"], "F": dims["F"],
            "r": dims["hd"] // 2, "C": dims.get("C", dims["B"])}


def _product_table(dims: dict[str, int], heads: int) -> dict[int, set[tuple[int, tuple[str, ...]]]]:
    """Value at these dims -> the canonical meanings (constant, sorted base symbols) of products of <= 2 atoms
    (shapes hold single atoms, and flattened pairs such as batch x positions)."""
    atoms = _atoms(dims, heads)
    base = _base_values(dims)
    table: dict[int, set[tuple[int, tuple[str, ...]]]] = {}
    for r in (1, 2):
        for combo in itertools.combinations_with_replacement(sorted(atoms), r):
            const, symbols = 1, []
            for name in combo:
                const *= atoms[name][0]
                symbols.extend(atoms[name][1])
            value = const
            for symbol in symbols:
                value *= base[symbol]
            table.setdefault(value, set()).add((const, tuple(sorted(symbols))))
    return table


def _tiny_config(cfg: ModelConfig, policy: str, steps: int, dims: dict[str, int]) -> ModelConfig:
    return dataclasses.replace(cfg, vocab_size=dims["V"], context_length=dims["S"], dim=dims["D"],
                               checkpointing=policy, mcmc_steps=steps, size=None, memory_budget_gb=None,
                               replay_capacity=0, replay_fraction=0.0, remat_chunk=dims.get("C", 0))


@lru_cache(maxsize=64)
def _trace_cached(cfg_json: str, policy: str, steps: int, chunks: int, autocast_bf16: bool = False) -> Trace:
    cfg = ModelConfig(**json.loads(cfg_json))
    dims = _tiny_dims(cfg, chunks)
    return _trace(_tiny_config(cfg, policy, steps, dims), dims, autocast_bf16)


def _trace(tiny: ModelConfig, dims: dict[str, int], autocast_bf16: bool = False) -> Trace:
    """Two training steps of `tiny` on a [dims B, dims S + 1] batch under the allocation tracker (with
    `autocast_bf16`: the forward under CPU bf16 autocast, parameters and optimizer in fp32)."""
    from ebt import build_model

    generator_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add spinning on a shared machine
    torch.manual_seed(0)
    try:
        model = build_model(tiny).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, tiny.vocab_size, (dims["B"], dims["S"] + 1))
        tracker = _AllocationTracker()
        start = 0
        for step in range(2):
            # Only the second step is traced (tracking costs a Python call per op). Adam's state, allocated
            # untraced in the first step and alive throughout, is added analytically (STATE_COPIES).
            if step == 1:
                # Deterministic timeline: tensors caught in reference cycles would otherwise be freed whenever
                # the cyclic collector happens to run; here they stay live until the step ends (conservative).
                gc.collect()
                gc.disable()
            with tracker if step == 1 else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                    loss = model.loss(tokens)[0]
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        gc.enable()
        torch.random.set_rng_state(generator_state)
        torch.set_num_threads(threads)
    return Trace(dims, tracker.shapes, tracker.element_size, tracker.events, start, tracker.ops)


def _chunks(cfg: ModelConfig, policy: str, batch: int) -> int:
    if "mcmc_step" not in policy or not 0 < cfg.remat_chunk < batch:
        return 1
    return -(-batch // cfg.remat_chunk)


def state_bytes(cfg: ModelConfig, dtype_bytes: int = 4, shard_world: int | None = None) -> float:
    """The untraced state alive through a step: parameters and AdamW's two moments; with `shard_world` (fsdp
    over that many ranks) this rank's 1/world of them plus the gathered full parameters of the step."""
    params = parameter_count(cfg) * dtype_bytes
    if shard_world is None:
        return STATE_COPIES * params
    return STATE_COPIES * params / shard_world + params


def traced_tensor_peak_bytes(cfg: ModelConfig, batch: int) -> float:
    """The tensor peak of `cfg` itself (no replica, no rescaling): what `tensor_peak_bytes` predicts."""
    dims = {"B": batch, "S": cfg.context_length}
    trace = _trace(cfg, dims)
    return _replay_peak(trace, {i: float(_numel(shape)) * trace.element_size[i] for i, shape in trace.shapes.items()},
                        ) + state_bytes(cfg, next(iter(trace.element_size.values()), 4))


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _replay_peak(trace: Trace, sizes: dict[int, float], heap_threshold: float | None = None) -> float:
    """Peak of the replayed live bytes. With `heap_threshold` (CPU), allocations below it count at the heap's
    high-water mark so far instead of their live bytes: glibc serves them from a heap that fragments and is
    rarely returned, while larger ones are mmapped and returned on free (they count while live)."""
    live = 0.0
    small = 0.0
    small_high = 0.0
    peak = 0.0
    alive: set[int] = set()
    for index, (kind, ident) in enumerate(trace.events):
        size = sizes[ident]
        on_heap = heap_threshold is not None and size < heap_threshold
        if kind > 0:
            alive.add(ident)
            if on_heap:
                small += size
                small_high = max(small_high, small)
            else:
                live += size
        elif ident in alive:
            alive.discard(ident)
            if on_heap:
                small -= size
            else:
                live -= size
        if index >= trace.start:
            peak = max(peak, live + (small_high if heap_threshold is not None else small))
    return peak


def trace_step(cfg: ModelConfig, policy: str, steps: int | None = None, chunks: int = 1,
               autocast_bf16: bool = False) -> Trace:
    # The replica sets its own batch, chunk and budget: keep them out of the cache key.
    key = dataclasses.replace(cfg, remat_chunk=0, checkpointing="none", memory_budget_gb=None)
    return _trace_cached(json.dumps(dataclasses.asdict(key), sort_keys=True), policy,
                         cfg.mcmc_steps if steps is None else steps, chunks, autocast_bf16)


# ---------------------------------------------------------------------------------------------- scaling


def _scale_table(tiny: dict[str, int], target: dict[str, int], heads: int) -> dict[int, float]:
    """Dimension value at tiny size -> its value at target size."""
    large = _base_values(target)
    out: dict[int, float] = {}
    for value, meanings in _product_table(tiny, heads).items():
        const, symbols = next(iter(meanings))
        scaled = const
        for symbol in symbols:
            scaled *= large[symbol]
        out[value] = scaled
    return out


def _target_dims(cfg: ModelConfig, batch: int) -> dict[str, int]:
    return {"B": batch, "S": cfg.context_length, "V": cfg.vocab_size, "D": cfg.dim, "F": cfg.ffn_hidden,
            "hd": cfg.head_dim}


def _rescaled_bytes(trace: Trace, cfg: ModelConfig, batch: int, chunks: int,
                    element_bytes) -> dict[int, float]:
    """Bytes of every traced tensor at the target size: each dimension rescaled, `element_bytes(traced size)`
    per element."""
    target = _target_dims(cfg, batch)
    if chunks > 1:
        target["C"] = cfg.remat_chunk
    table = _scale_table(trace.dims, target, cfg.n_heads)
    sizes: dict[int, float] = {}
    for ident, shape in trace.shapes.items():
        numel = 1.0
        for d in shape:
            numel *= table.get(d, d)
        sizes[ident] = numel * element_bytes(trace.element_size[ident])
    return sizes


def tensor_peak_bytes(cfg: ModelConfig, policy: str, batch: int, dtype_bytes: int = 4,
                      heap_threshold: float | None = None, shard_world: int | None = None) -> float:
    """Peak bytes of live tensors during one (non-first) training step at the target size, per rank (with
    `heap_threshold`: heap-resident allocations at their high-water mark, see _replay_peak; with `shard_world`:
    parameters and optimizer state sharded by fsdp, see state_bytes)."""
    chunks = _chunks(cfg, policy, batch)
    trace = trace_step(cfg, policy, chunks=chunks)
    sizes = _rescaled_bytes(trace, cfg, batch, chunks,
                            lambda size: dtype_bytes if size >= 4 else size)
    return _replay_peak(trace, sizes, heap_threshold) + state_bytes(cfg, dtype_bytes, shard_world)


# ---------------------------------------------------------------------------------------------- prediction


def host_allocator() -> str:
    """The allocator this process runs on: jemalloc or tcmalloc when mapped into it, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ALLOCATOR_LIBRARIES if f"lib{name}" in maps), "system")


def calibration_key(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else f"cpu:{host_allocator()}"


def calibration_for(device: torch.device) -> Calibration:
    key = calibration_key(device)
    if CALIBRATION_FILE.is_file():
        try:
            data = json.loads(CALIBRATION_FILE.read_text()).get(key)
            if data:
                return Calibration(**data)
        except (ValueError, TypeError):
            pass  # a damaged cache falls back to the defaults rather than stopping a training run
    return DEFAULT_CUDA if device.type == "cuda" else DEFAULT_CPU[key.partition(":")[2]]


def predict_peak_bytes(cfg: ModelConfig, policy: str, batch: int, device: torch.device | str = "cpu",
                       calibration: Calibration | None = None, dtype_bytes: int = 4,
                       shard_world: int | None = None) -> float:
    """Peak memory of one rank's training step (see tensor_peak_bytes for `shard_world`)."""
    device = torch.device(device)
    cal = calibration or calibration_for(device)
    return cal.base_bytes + cal.factor * tensor_peak_bytes(cfg, policy, batch, dtype_bytes,
                                                           shard_world=shard_world)


def device_capacity_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget_bytes(device: torch.device) -> float:
    return device_capacity_bytes(device) * (1 - DEFAULT_MARGIN)


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
    return predict_peak_bytes(dataclasses.replace(cfg, remat_chunk=chunk), policy, batch, device,
                              shard_world=shard_world)


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
        CALIBRATION_FILE.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.is_file() else {}
        data[calibration_key(device)] = dataclasses.asdict(cal)
        atomic_write_json(CALIBRATION_FILE, data, indent=2)
    return cal


# ---------------------------------------------------------------------------------------------- CUDA (analytic)
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


def cuda_peak(cfg: ModelConfig, policy: str, batch: int, strategy: str = "ddp", world: int = 1) -> CudaPeak:
    """Analytic per-GPU peak of a bf16-autocast training step with fp32 master weights and fp32 AdamW. The tiny
    replica is traced under bf16 autocast (on the CPU: the same autocast op lists decide which activations are
    bf16 and which stay fp32, e.g. softmax and norms) and every tensor is rescaled to the target dims at its
    recorded element size, as for the CPU prediction. Added per parameter:
    - state: fp32 weights and AdamW's two moments, 12 bytes, /world under fsdp;
    - ddp over several ranks: the reducer's fp32 gradient buckets (+4);
    - fsdp: the reduce-scattered fp32 gradient shard (+4/world). The gathered bf16 parameters stand where the
      trace has autocast's bf16 weight copies, and its fp32 full gradients (bf16 under fsdp's mixed precision)
      are kept: conservative by 2 bytes per parameter."""
    params = float(parameter_count(cfg))
    chunks = _chunks(cfg, policy, batch)
    trace = trace_step(cfg, policy, chunks=chunks, autocast_bf16=True)
    sizes = _rescaled_bytes(trace, cfg, batch, chunks, lambda size: size)
    traced = _replay_peak(trace, sizes)
    if strategy == "fsdp":
        extras, state = params * 4 / world, STATE_COPIES * 4 * params / world
    else:
        extras, state = (params * 4 if world > 1 else 0.0), STATE_COPIES * 4 * params
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
              strategy: str = "ddp", world: int = 1, margin: float = DEFAULT_MARGIN) -> GpuPlan:
    """The largest micro-batch dividing `per_rank_batch` (the rest by accumulation) whose predicted per-GPU peak
    fits capacity x (1 - margin) under some policy, with the fastest such policy. With cfg.checkpointing other
    than "auto" only that policy (and its chunk) is considered. Raises ValueError (with the smallest peak) when
    not even micro-batch 1 fits."""
    budget = capacity_bytes * (1 - margin)
    best = None
    for batch in range(per_rank_batch, 0, -1):
        if per_rank_batch % batch:
            continue
        if cfg.checkpointing == "auto":
            options = _options_fastest_first(cfg, batch)
        else:
            options = [(cfg.checkpointing, cfg.remat_chunk)]
        for policy, chunk in options:
            peak = cuda_peak(dataclasses.replace(cfg, remat_chunk=chunk), policy, batch, strategy, world).total
            if best is None or peak < best[0]:
                best = (peak, policy, chunk, batch)
            if peak <= budget:
                return GpuPlan(gpu, capacity_bytes / 1e9, budget / 1e9, policy, chunk, batch, per_rank_batch // batch,
                               peak / 1e9)
    peak, policy, chunk, batch = best if best is not None else (float("nan"), "none", 0, 1)
    raise ValueError(f"{gpu}: needs {peak / 1e9:.1f} GB per GPU even at micro-batch {batch} with checkpointing "
                     f"{policy} ({strategy} over {world} ranks); the budget is {budget / 1e9:.1f} GB")


def traced_autocast_peak_bytes(cfg: ModelConfig, batch: int) -> float:
    """The tensor peak of `cfg` itself under bf16 autocast (CPU), fp32 parameters and AdamW: the quantity
    `cuda_peak` predicts without its reserve (activations + parameter extras + state, single process)."""
    dims = {"B": batch, "S": cfg.context_length}
    trace = _trace(cfg, dims, autocast_bf16=True)
    sizes = {i: float(_numel(shape)) * trace.element_size[i] for i, shape in trace.shapes.items()}
    return _replay_peak(trace, sizes) + STATE_COPIES * 4 * parameter_count(cfg)
