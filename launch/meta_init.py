"""Build a model on the meta device and keep only this rank's Shard(0) piece of each parameter (issue 22).

Under `distributed.strategy=fsdp` every rank used to build the whole model on CPU and then shard it, so every
rank held the full model once. Here the model is constructed on the meta device (no memory) while a
TorchDispatchMode replays every op that touches a meta tensor ALSO on CPU "shadow" tensors:

- the CPU generator is consumed exactly as a CPU build consumes it (the same ops, in the same order, on tensors
  of the same layout), so the values are bitwise a CPU build's and the global RNG is left in the same state;
- only the storages touched most recently keep a full shadow (an LRU under a byte budget). An older one is
  evicted to this rank's piece, FSDP2's layout: `torch.chunk(full, world, dim=0)[rank]`, empty past the last
  chunk, a 0-d parameter taken as [1] (launch.strategies._scalar_params_as_1d does the same before sharding);
- an op that needs the whole value of an evicted storage (a read, or a write into part of it) raises
  MetaInitError, so a model change that init would silently change cannot go unnoticed; an op that overwrites
  the whole storage without reading it (normal_, uniform_, fill_, zero_, copy_ ...) starts a fresh shadow;
- buffers are not sharded by FSDP2: a storage registered as a buffer keeps its full value.

`torch.tensor(0.5)` under the meta device dispatches nothing a TorchDispatchMode sees (the EBT's alpha_raw is
made so), so a TorchFunctionMode records those too. Storages are told apart by `untyped_storage()._cdata`, which
aliases (nn.Parameter(t), views) share; the recorder keeps one meta tensor per storage so that no key is reused.

`record_build` returns the meta model and a MetaInit (the pieces and buffers); launch.strategies.FSDPStrategy
shards the meta model (fully_shard) and then `materialise` allocates each rank's shards and copies the pieces in.
tests/launch/test_meta_init.py checks the pieces against CPU builds at worlds 1 to 3.
"""

from __future__ import annotations

import ctypes
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# Ops that overwrite every element of their first argument without reading it: on an evicted storage they start
# a fresh full shadow instead of raising.
_OVERWRITES = frozenset(
    getattr(torch.ops.aten, name)
    for name in ("normal_", "uniform_", "fill_", "zero_", "random_", "exponential_", "log_normal_", "cauchy_",
                 "geometric_", "bernoulli_", "copy_")
)
# Python-level constructors that make a meta tensor from host data without an aten op the dispatch mode sees.
_HOST_DATA = (torch.tensor, torch.as_tensor, torch.asarray)
# Full shadows kept: the RoPE tables and a few recent tensors (init touches one parameter at a time, and the
# op at hand's storages are always whole), well under one block of the sizes that need sharding.
DEFAULT_BUDGET_BYTES = 16 * 2**20


# The allocator keeps the pages of freed shadows (and, in materialise, of copied pieces) resident, and the
# long-lived pieces cut between them leave holes: glibc's dynamic mmap threshold rises to the size of the first
# freed shadow, so later ones come from its heap. Measured at medium, 2 ranks (benchmarks/README.md,
# checkpoint_scale_build_system): peak 810 MiB on glibc without releasing, more than the 719 MiB of a whole CPU
# build. So the free pages go back to the kernel after every this many bytes freed: glibc's malloc_trim(0) and
# gperftools' MallocExtension_ReleaseFreeMemory (tcmalloc, `ebt train`'s default); each is a no-op for the other.
_RELEASE_BYTES = 2**23


def release_free_pages() -> None:
    """Hand the allocator's free pages back to the kernel (what the build's peak RSS counts)."""
    for release in _releasers():
        release()


@functools.cache
def _releasers() -> list[Callable[[], Any]]:
    found: list[Callable[[], Any]] = []
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return found
    trim = getattr(process, "malloc_trim", None)  # glibc
    if trim is not None:
        found.append(lambda: trim(0))
    tcmalloc = getattr(process, "MallocExtension_ReleaseFreeMemory", None)  # gperftools, when preloaded
    if tcmalloc is not None:
        found.append(tcmalloc)
    return found


class MetaInitError(RuntimeError):
    """An init op the meta build cannot replay exactly (it needs a value the recorder no longer holds)."""


Layout = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, storage offset


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _layout(tensor: torch.Tensor) -> Layout:
    return tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset()


def shard_piece(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of `full` as FSDP2 shards it: torch.chunk on dim 0 (0-d as [1]), empty past the chunks.
    (FSDP2 pads each chunk to the first one's size for its collectives; `to_local()` is the unpadded piece.)"""
    full = full.reshape(1) if full.dim() == 0 else full
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        return chunks[rank].clone()
    return full.new_empty((0, *full.shape[1:]))


@dataclass
class _Storage:
    """One meta storage and what the recorder knows of its value."""

    meta: torch.Tensor  # keeps the meta storage alive, so its key is not reused while recording
    dtype: torch.dtype
    numel: int  # elements of dtype in the whole storage
    owner: Layout  # the layout pieces are cut along: the creating op's output, or the parameter's once registered
    base: torch.Tensor | None = None  # the full CPU shadow, flat over the whole storage, while resident
    piece: torch.Tensor | None = None  # this rank's chunk of the owner layout, once evicted
    buffer: bool = False  # registered as a buffer: kept whole, never evicted

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def view(self, layout: Layout) -> torch.Tensor:
        size, stride, offset = layout
        return self.base.as_strided(size, stride, offset)


@dataclass
class MetaInit:
    """What a meta build recorded for one rank: each parameter's piece and each buffer's full value, by name."""

    rank: int
    world: int
    pieces: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


class _HostData(TorchFunctionMode):
    """Records meta tensors made from host data (torch.tensor and kin), which no aten op reports."""

    def __init__(self, recorder: MetaInitRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _HOST_DATA and isinstance(out, torch.Tensor) and out.device.type == "meta":
            if _key(out) not in self.recorder.table:
                shadow = func(*args, **{**kwargs, "device": "cpu"})
                self.recorder.add(out, shadow)
                self.recorder.touch({_key(out)})
        return out


class _Replay(TorchDispatchMode):
    """Runs every op on meta tensors twice: on the meta tensors (the result) and on their CPU shadows."""

    def __init__(self, recorder: MetaInitRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        on_meta = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in flat)
        meta_device = any(isinstance(a, torch.device) and a.type == "meta" for a in flat)
        if not (on_meta or meta_device) or func.is_view:
            return func(*args, **kwargs)  # host work, or a view that aliases a storage already recorded
        return self.recorder.replay(func, args, kwargs)


class MetaInitRecorder:
    """The recording context (the module docstring): `with MetaInitRecorder(rank, world) as rec: model = ...`
    constructs on the meta device; `rec.finish(model)` then returns the MetaInit of this rank.

    budget_bytes: full shadows kept beyond those of the op at hand (least recently touched evicted first)."""

    def __init__(self, rank: int, world: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.rank, self.world, self.budget = rank, world, budget_bytes
        self.table: dict[int, _Storage] = {}
        self.resident: OrderedDict[int, None] = OrderedDict()  # evictable storages with a full shadow, LRU first
        self.unreleased = 0  # bytes of shadows freed since the allocator last handed pages back
        self._contexts: list[Any] = []
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------------------------------ context
    def __enter__(self) -> MetaInitRecorder:
        from torch.nn.modules import module as module_hooks

        # The device context first: the host-data mode's own calls then get device="meta" from it.
        self._contexts = [torch.device("meta"), _HostData(self), _Replay(self)]
        for context in self._contexts:
            context.__enter__()
        self._hooks = [module_hooks.register_module_parameter_registration_hook(self._on_parameter),
                       module_hooks.register_module_buffer_registration_hook(self._on_buffer)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        for context in reversed(self._contexts):
            context.__exit__(*exc)
        self._hooks, self._contexts = [], []

    # ------------------------------------------------------------------------------------------ recording
    def add(self, meta: torch.Tensor, shadow: torch.Tensor) -> None:
        """A new meta storage and the CPU tensor computed for it (same layout, whole storage)."""
        if _layout(meta) != _layout(shadow) or meta.dtype != shadow.dtype:
            raise MetaInitError(f"the CPU replay of a meta op laid its output out differently: meta {_layout(meta)} "
                                f"{meta.dtype}, cpu {_layout(shadow)} {shadow.dtype}")
        numel = meta.untyped_storage().nbytes() // meta.dtype.itemsize
        storage = shadow.untyped_storage()
        if storage.nbytes() != numel * meta.dtype.itemsize:
            raise MetaInitError(f"the CPU replay's storage has {storage.nbytes()} bytes, the meta one "
                                f"{numel * meta.dtype.itemsize}")
        base = shadow.new_empty(0).set_(storage, 0, (numel,), (1,))
        self.table[_key(meta)] = _Storage(meta=meta, dtype=meta.dtype, numel=numel, owner=_layout(meta), base=base)
        self.resident[_key(meta)] = None

    def touch(self, keys: set[int]) -> None:
        """Mark `keys` most recently used, then evict the oldest full shadows over the budget (never `keys`)."""
        for key in keys:
            if key in self.resident:
                self.resident.move_to_end(key)
        total = sum(self.table[key].nbytes for key in self.resident)
        for key in list(self.resident):
            if total <= self.budget:
                break
            if key in keys:
                continue
            total -= self.table[key].nbytes
            self.unreleased += self.table[key].nbytes
            self._evict(key)
        if self.unreleased >= _RELEASE_BYTES:
            release_free_pages()
            self.unreleased = 0

    def _evict(self, key: int) -> None:
        entry = self.table[key]
        entry.piece = shard_piece(entry.view(entry.owner), self.rank, self.world)
        entry.base = None
        del self.resident[key]

    def _shadow(self, func, position: int, tensor: torch.Tensor) -> torch.Tensor:
        """The CPU tensor standing for meta `tensor`, argument `position` of `func`."""
        entry = self.table.get(_key(tensor))
        if entry is None:
            raise MetaInitError(f"{func}: a meta tensor made outside the meta build (or by a constructor the "
                                "recorder does not see) reached an init op; its value is unknown")
        if tensor.dtype != entry.dtype:
            raise MetaInitError(f"{func}: a {tensor.dtype} view of a {entry.dtype} storage is not supported")
        if entry.base is None:
            whole = (tensor.storage_offset() == 0 and tensor.numel() == entry.numel
                     and tensor.is_contiguous())
            if not (position == 0 and func.overloadpacket in _OVERWRITES and whole):
                raise MetaInitError(
                    f"{func}: needs the whole value of a {entry.dtype} storage of {entry.numel} elements "
                    f"(first made as {list(entry.owner[0])}) that the meta build already cut down to this rank's "
                    "shard; construction reads or partly writes a tensor long after it was made. Raise the "
                    "recorder's budget_bytes, or build this model on CPU (launch/meta_init.py)")
            # A fresh whole overwrite: the value is the op's alone, so a new shadow starts here.
            entry.base, entry.piece = torch.empty(entry.numel, dtype=entry.dtype), None
            self.resident[_key(tensor)] = None
        return entry.view(_layout(tensor))

    def _fill_piece(self, func, target: torch.Tensor, value: float) -> bool:
        """A constant written into part of an evicted storage (adaLN's gate biases: `bias.view(6, dim)[2]`
        after zeros_ on every adaLN weight) needs no old value and no RNG: write it into this rank's piece where
        the view and the piece overlap. False where the piece's layout is not a contiguous range."""
        entry = self.table.get(_key(target))
        if entry is None or entry.base is not None or target.dtype != entry.dtype:
            return False
        size, stride, offset = entry.owner
        owner = torch.empty_strided(size, stride, device="meta")
        if not owner.is_contiguous():
            return False
        rows = size[0] if size else 1
        row = owner.numel() // max(rows, 1)
        step = -(-rows // self.world)  # torch.chunk's chunk length
        low = offset + min(rows, self.rank * step) * row
        high = offset + min(rows, (self.rank + 1) * step) * row
        # Storage positions of the view's elements, without the storage's full size.
        position = torch.full((), target.storage_offset(), dtype=torch.int64)
        for dim, (length, dim_stride) in enumerate(zip(target.size(), target.stride(), strict=True)):
            shape = [1] * target.dim()
            shape[dim] = length
            position = position + torch.arange(length).view(shape) * dim_stride
        position = position.flatten()
        inside = position[(position >= low) & (position < high)] - low
        entry.piece.view(-1)[inside] = value
        return True

    def replay(self, func, args: tuple, kwargs: dict) -> Any:
        """Run `func` on CPU shadows (for the values and the RNG) and on meta (for the result)."""
        if func in (torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default) and args[0].device.type == "meta":
            value = 0.0 if func is torch.ops.aten.zero_.default else args[1]
            if self._fill_piece(func, args[0], value):
                self.touch({_key(args[0])})
                return func(*args, **kwargs)
        touched: set[int] = set()
        position = -1

        def to_cpu(value: Any) -> Any:
            nonlocal position
            if isinstance(value, torch.Tensor):
                position += 1
                if value.device.type == "meta":
                    touched.add(_key(value))
                    return self._shadow(func, position, value)
            if isinstance(value, torch.device) and value.type == "meta":
                return torch.device("cpu")
            return value

        cpu_args, cpu_kwargs = tree_map(to_cpu, (args, kwargs))
        cpu_out = func(*cpu_args, **cpu_kwargs)
        try:
            meta_out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError):
            # A host value of a meta tensor (.item(), equal): the shadow's answer is the CPU build's.
            if any(isinstance(value, torch.Tensor) for value in tree_flatten(cpu_out)[0]):
                raise
            self.touch(touched)
            return cpu_out
        cpu_flat, _ = tree_flatten(cpu_out)
        meta_flat, _ = tree_flatten(meta_out)
        for meta, cpu in zip(meta_flat, cpu_flat, strict=True):
            if isinstance(meta, torch.Tensor) and meta.device.type == "meta":
                key = _key(meta)
                if key not in self.table:  # a new storage (in-place and out= results alias a known one)
                    self.add(meta, cpu)
                touched.add(key)
        self.touch(touched)
        return meta_out

    # ------------------------------------------------------------------------------------------ registration
    def _on_parameter(self, module: nn.Module, name: str, param: Any) -> None:
        if param is None or param.device.type != "meta":
            return
        entry = self.table.get(_key(param))
        if entry is None:
            return  # unknown value: finish() names it if it is still a parameter of the model then
        if entry.base is None and _layout(param) != entry.owner:
            raise MetaInitError(f"parameter {name!r} of {type(module).__name__} was registered with layout "
                                f"{_layout(param)} after its storage was cut down along {entry.owner}")
        entry.owner = _layout(param)

    def _on_buffer(self, module: nn.Module, name: str, buffer: Any) -> None:
        if buffer is None or buffer.device.type != "meta":
            return
        entry = self.table.get(_key(buffer))
        if entry is None or entry.base is None:
            raise MetaInitError(f"buffer {name!r} of {type(module).__name__}: its value is "
                                f"{'unknown' if entry is None else 'already cut down to a shard'} when registered; "
                                "buffers are kept whole (FSDP2 does not shard them)")
        entry.buffer = True
        self.resident.pop(_key(buffer), None)

    # ------------------------------------------------------------------------------------------ result
    def finish(self, model: nn.Module) -> MetaInit:
        """This rank's pieces of `model`'s parameters and its buffers' values; frees every shadow."""
        out = MetaInit(rank=self.rank, world=self.world)
        for name, param in model.named_parameters():
            entry = self.table.get(_key(param))
            if entry is None:
                raise MetaInitError(f"parameter {name!r}: its value was never recorded")
            if entry.base is not None:
                out.pieces[name] = shard_piece(entry.view(_layout(param)), self.rank, self.world)
            elif _layout(param) == entry.owner:
                out.pieces[name] = entry.piece
            else:
                raise MetaInitError(f"parameter {name!r}: its storage was cut down along another layout "
                                    f"({entry.owner}, the parameter {_layout(param)})")
        for name, buffer in model.named_buffers():
            entry = self.table.get(_key(buffer))
            if entry is None or entry.base is None:
                raise MetaInitError(f"buffer {name!r}: its full value was not kept")
            out.buffers[name] = entry.view(_layout(buffer)).clone()
        self.table.clear()
        self.resident.clear()
        return out


def record_build(build: Callable[[], nn.Module], rank: int, world: int,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[nn.Module, MetaInit]:
    """`build()` on the meta device; returns the meta model and this rank's MetaInit (the module docstring)."""
    with MetaInitRecorder(rank, world, budget_bytes) as recorder:
        model = build()
    return model, recorder.finish(model)


def materialise(model: nn.Module, init: MetaInit, device: torch.device) -> None:
    """Allocate `model`'s (sharded) meta parameters and buffers on `device` and copy this rank's recorded values in.

    Module by module, dropping each piece once copied, so the pieces and the shards are not both held whole.
    Parameters are FSDP2's Shard(0) DTensors (their `to_local()` takes the piece) or, with one unsharded rank,
    plain tensors (taking the piece, which is then the whole value); 0-d parameters were made [1] before sharding."""
    from launch.fsdp import local_tensor

    freed = 0
    for prefix, module in model.named_modules():
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for name, param in module.named_parameters(recurse=False):
                piece = init.pieces.pop(f"{prefix}.{name}" if prefix else name, None)
                if piece is None:  # a parameter shared with a module before it holds it under that name
                    continue
                local = local_tensor(param)
                local.copy_(piece.reshape(local.shape))
                freed += piece.numel() * piece.element_size()
                del piece
            for name, buffer in module.named_buffers(recurse=False):
                buffer.copy_(init.buffers.pop(f"{prefix}.{name}" if prefix else name))
        if freed >= _RELEASE_BYTES:
            release_free_pages()
            freed = 0
    if init.pieces or init.buffers:
        raise MetaInitError(f"recorded values with no tensor in the model: {sorted([*init.pieces, *init.buffers])}")
