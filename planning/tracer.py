"""The dispatch tracer: two real training steps of a tiny replica under a TorchDispatchMode that records every
storage's allocation, shape and release (`trace_step`), and the replay of that timeline at rescaled sizes
(`_replay_peak`).

A step's tensor memory is a timeline of allocations and frees whose ORDER does not depend on the sizes (same
code path for any batch, context, vocab or width), only each tensor's bytes do; planning/dims.py rescales them.
Traces are cached in this process (`_trace_cached`); plans built from them are cached on disk (planning/cache.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebt.config import ModelConfig
from planning.dims import _tiny_dims

TRACE_COUNT = [0]  # traces run in this process (tests check that a cached plan runs none)


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


def _tiny_config(cfg: ModelConfig, steps: int, dims: dict[str, int]) -> ModelConfig:
    return cfg.replace(size=None, architecture={"vocab_size": dims["V"], "context_length": dims["S"], "dim": dims["D"]},
                       thinking={"mcmc_steps": steps}, replay={"capacity": 0, "fraction": 0.0})


@lru_cache(maxsize=64)
def _trace_cached(cfg_json: str, policy: str, steps: int, chunks: int, autocast_bf16: bool = False) -> Trace:
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    dims = _tiny_dims(cfg, chunks)
    return _trace(_tiny_config(cfg, steps, dims), dims, autocast_bf16, policy, dims.get("C", 0))


def _trace(tiny: ModelConfig, dims: dict[str, int], autocast_bf16: bool = False, policy: str = "none",
           remat_chunk: int = 0) -> Trace:
    """Two training steps of `tiny` on a [dims B, dims S + 1] batch under the allocation tracker (with
    `autocast_bf16`: the forward under CPU bf16 autocast, parameters and optimizer in fp32)."""
    from ebt import build_model
    from ebt.checkpointing import apply_checkpointing

    TRACE_COUNT[0] += 1
    generator_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add spinning on a shared machine
    torch.manual_seed(0)
    try:
        model = build_model(tiny).train()
        if tiny.kind == "ebt":
            apply_checkpointing(model, policy, remat_chunk)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, tiny.architecture.vocab_size, (dims["B"], dims["S"] + 1))
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


def _chunks(policy: str, batch: int, remat_chunk: int) -> int:
    if "mcmc_step" not in policy or not 0 < remat_chunk < batch:
        return 1
    return -(-batch // remat_chunk)


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
    return _trace_cached(json.dumps(cfg.to_dict(), sort_keys=True), policy,
                         cfg.thinking.mcmc_steps if steps is None else steps, chunks, autocast_bf16)
