"""`distributed.strategy=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) under second-order EBT training.

Parallelism is applied from outside the model, as torchtitan's parallelize.py does; the model code is unchanged.

Why FSDP2 is driven here and not through Accelerate: Accelerate 1.15's FSDP2 plugin silently gives DDP when
`Accelerator(cpu=True)` (so nothing is sharded on CPU, and a CPU test would not test sharding), and it has no
switch for reshard-after-backward (pytorch/pytorch#172543 is the
mid-step reshard it would need to avoid). The Accelerator still sets up the process group, the device and
autocast; it never wraps the model.

The route, measured exact against one process (tests/launch/test_train_parity.py, fp64 to 1e-12):

1. `fully_shard` on every block and then on the root, which keeps the rest (embeddings, candidate projection,
   step tables, adaLN, final norm, heads, alpha) as one unit.
2. A forward pre-hook on the root unshards every block. `Block` has no forward: both EBT streams call its
   norms, projections and MLP directly, so FSDP's per-block hooks would never fire and the block would compute
   with its sharded DTensors ("aten.mul.Tensor got mixed torch.Tensor and DTensor"). And one step touches every
   block 1 + K times forward (real stream, then each MCMC step's candidate stream), again inside each inner
   `autograd.grad(create_graph=True)` and in the outer backward, so per-block gather/free would re-gather many
   times per step. The blocks therefore stay gathered for the whole step.
3. `set_reshard_after_backward(False)` on every FSDP module. With the default, an FSDP module whose forward ran
   inside the MCMC loop is resharded by the end-of-backward that an inner `autograd.grad` fires, freeing
   parameters the outer backward still needs (pytorch/pytorch#172543; its maintainers point to this switch).
   On this route no FSDP forward runs inside the loop, so the default happens to survive today; the switch
   keeps the route from depending on that.
4. `reshard()` on every FSDP module after the outer backward, from launch/strategies.py's FSDPStrategy. This
   frees the gathered copies, and the next forward all-gathers the updated shards. Without it the next step
   computes with the previous step's weights: `unshard()` on a module that is still unsharded does nothing.

Gradients are reduce-scattered at the end of every backward (also of each accumulated micro-batch, as ZeRO-2
does): `set_requires_gradient_sync(False)` would keep a full unsharded gradient per rank, which is what
sharding is for avoiding.

What is sharded: parameters, gradients and AdamW's moments live as 1/world shards between steps
(`state_bytes` measures them on the live tensors). No rank holds the whole model at build either: FSDPStrategy
builds it on the meta device, `shard_model` shards the meta model, and each rank then materialises its own shards
with a CPU build's exact values (launch/meta_init.py). Inside a step the gathered parameters are whole on every
rank, so a step's peak is activations + the full parameters + full gradients until the reduce-scatter + the
shards (planning/ counts it so).

`distributed.fsdp_regather` (RegatheredModel, below) is the functional alternative that keeps parameters
sharded inside the step too: no FSDP modules, every parameter a Shard(0) DTensor gathered where it is read,
saved gathered weights dropped and re-gathered by saved-tensor hooks. Also exact (same tests). Measured at 2
CPU ranks on an EBT of 193M parameters (benchmarks/README.md, sharding): peak RSS of the steps 0.67x DDP's
against 0.79x for the route above, but steps 3.2x DDP's against 1.18x (many more collectives), so it is off by
default; it pays where the gathered parameters, not the activations, decide what fits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from launch.checkpoint import DCP_DIR  # noqa: F401  (the checkpoint's sharded model + optimizer, DCP files)


def model_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an EBT (`energy_model.blocks`) or a Transformer++ (`blocks`)."""
    energy = getattr(model, "energy_model", None)
    return energy.blocks if energy is not None else model.blocks


def mixed_precision_policy(bf16: bool):
    """On GPU with bf16: parameters all-gathered and computed in bf16, gradients reduced in fp32.

    Forward inputs are not cast (cast_forward_inputs=False): the candidates and the MCMC update stay in the
    dtype autocast gives them, so the numerics match DDP's bf16 autocast, with half the all-gather bytes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


@dataclass
class ShardedModel:
    """The FSDP modules of one model (blocks first, root last) and the root hook that gathers the blocks."""

    root: nn.Module
    blocks: list[nn.Module]
    hook: Any = field(repr=False, default=None)

    @property
    def modules(self) -> list[nn.Module]:
        return [*self.blocks, self.root]

    def reshard(self) -> None:
        """Free every gathered copy (step 4 of the module docstring); call after the outer backward."""
        for module in self.modules:
            module.reshard()

    def abort_step(self) -> None:
        """After a forward or backward that did not finish (a non-finite inner gradient raises mid-loop): reset
        FSDP's per-step state and drop the step's gathered parameters; its gradients are discarded."""
        for param in self.root.parameters():  # the gathered (unsharded) parameters while gathered
            param.grad = None
        self.root.reset_iter_state()  # also reshards every group
        self.reshard()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every parameter gathered, for code that calls the model other than through its forward (validation
        calls model.loss directly, so no FSDP hook runs); resharded on exit."""
        for module in self.modules:
            module.unshard()
        try:
            yield
        finally:
            self.reshard()


def shard_model(model: nn.Module, mesh, bf16: bool = False) -> ShardedModel:
    """Apply the route of the module docstring to `model` in place and return its FSDP modules.

    0-d parameters must already be 1-d (fully_shard shards dim 0: launch.strategies._scalar_params_as_1d)."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(bf16)
    blocks = list(model_blocks(model))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in [*blocks, model]:
        module.set_reshard_after_backward(False)

    def gather_blocks(_module: nn.Module, _args: Any, _kwargs: Any) -> None:
        for block in blocks:
            block.unshard()

    # Registered after fully_shard's own pre-hook (which runs first: prepend=True) so FSDP's lazy init and the
    # root's own unshard have happened when the blocks are gathered.
    hook = model.register_forward_pre_hook(gather_blocks, with_kwargs=True)
    return ShardedModel(root=model, blocks=blocks, hook=hook)


# ---------------------------------------------------------------------------------------------- regather


class _Gather(torch.autograd.Function):
    """The whole weight from its Shard(0) DTensor parameter (all-gather); backward reduce-scatters the whole
    weight's gradient into the shard's, averaged over the ranks as DDP averages."""

    @staticmethod
    def forward(ctx, param: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mesh, ctx.placements = param.device_mesh, param.placements
        ctx.shape, ctx.stride = param.shape, param.stride()
        full = param.full_tensor().contiguous()
        _Regather.register(full, param)
        return full

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from torch.distributed.tensor import DTensor, Partial

        world = ctx.mesh.size()
        partial = DTensor.from_local(grad.contiguous() / world, ctx.mesh, [Partial()], run_check=False,
                                     shape=ctx.shape, stride=ctx.stride)
        return partial.redistribute(ctx.mesh, ctx.placements)


@dataclass(frozen=True)
class _Regather:
    """What a saved-tensor hook keeps instead of a gathered weight (or a view of it, such as the W.t() that a
    linear layer saves): the parameter and the view's size, stride and offset in the gathered storage. Matching
    by storage alone would hand back W for a saved W.t() (measured here: gradients 1.83 relative off)."""

    param: torch.Tensor
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # relative to the gathered tensor's own storage offset

    # storage data_ptr -> (parameter, storage offset of the gathered tensor), while that gathered tensor lives
    live: ClassVar[dict[int, tuple[torch.Tensor, int]]] = {}

    @classmethod
    def register(cls, full: torch.Tensor, param: torch.Tensor) -> None:
        import weakref

        ptr = full.untyped_storage().data_ptr()
        cls.live[ptr] = (param, full.storage_offset())
        weakref.finalize(full, cls.live.pop, ptr, None)  # views keep `full` (their _base) and its storage alive

    @classmethod
    def pack(cls, tensor: torch.Tensor) -> Any:
        entry = cls.live.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if entry is None:
            return tensor
        param, base_offset = entry
        return cls(param, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset() - base_offset)

    @classmethod
    def unpack(cls, saved: Any) -> torch.Tensor:
        if not isinstance(saved, cls):
            return saved
        with torch.no_grad():
            full = saved.param.full_tensor().contiguous()
        return full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)


class _RegatherAccess:
    """Mixed into each module that owns sharded parameters: while a RegatheredModel is active, reading such a
    parameter as an attribute (what every forward does: `self.weight`) returns the whole weight through _Gather;
    otherwise it is the Shard(0) DTensor parameter. parameters(), names and state dicts are unchanged."""

    _regather_on: ClassVar[bool] = False

    def __getattr__(self, name: str) -> Any:
        names = self.__dict__.get("_regather_names")
        if names is not None and name in names and _RegatherAccess._regather_on:
            return _Gather.apply(self.__dict__["_parameters"][name])
        return super().__getattr__(name)


@dataclass
class RegatheredModel:
    """distributed.fsdp_regather: parameters stay sharded inside the step too (launch/fsdp.py's docstring).

    Every parameter is a Shard(0) DTensor. Inside `step()` each read of a parameter all-gathers it (_Gather),
    and a saved-tensor hook replaces every saved gathered weight by a _Regather record, so the weight is freed
    after the op that read it and gathered again when a backward (the inner create_graph one, or the outer one)
    needs it. Gradients are reduce-scattered per read, in the backward. What stays gathered at any time is the
    weight of the op at hand: true ZeRO-3 memory, for more collectives (1 + K reads of each block weight per
    forward, one re-gather per saved use in each backward)."""

    root: nn.Module

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Forward and backward of one micro-batch (also validation): gather on read, re-gather on unpack."""
        _RegatherAccess._regather_on = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(_Regather.pack, _Regather.unpack):
                yield
        finally:
            _RegatherAccess._regather_on = False

    gathered = step

    def reshard(self) -> None:
        return None  # nothing stays gathered

    def abort_step(self) -> None:
        return None


def regather_model(model: nn.Module, mesh) -> RegatheredModel:
    """Turn every parameter of `model` into a Shard(0) DTensor over `mesh` (no communication: every rank built
    the same weights and keeps its own chunk) and let the modules gather them on read (RegatheredModel)."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    swapped: dict[type, type] = {}
    for module in model.modules():
        names = [name for name, param in module.named_parameters(recurse=False)]
        if not names:
            continue
        for name in names:
            param = module._parameters[name]
            chunks = param.detach().chunk(world, dim=0)
            local = chunks[rank].clone() if rank < len(chunks) else param.new_empty((0, *param.shape[1:]))
            sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                         stride=param.stride())
            module._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)
        cls = type(module)
        if cls not in swapped:
            swapped[cls] = type(f"Regather{cls.__name__}", (_RegatherAccess, cls), {})
        module.__class__ = swapped[cls]
        module.__dict__["_regather_names"] = frozenset(names)
    return RegatheredModel(root=model)


# ---------------------------------------------------------------------------------------------- measuring


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def state_bytes(parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of `parameters`, their gradients and the optimizer's state, measured on the live
    tensors (the local shard of each DTensor; unsharded tensors count whole)."""
    params = sum(local_tensor(p).numel() * p.element_size() for p in parameters)
    grads = sum(local_tensor(p.grad).numel() * p.grad.element_size() for p in parameters if p.grad is not None)
    moments = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # AdamW's scalar `step` is not a moment
                moments += local_tensor(value).numel() * value.element_size()
    return {"params": params, "grads": grads, "optimizer": moments, "total": params + grads + moments}


def gathered_bytes(sharded: ShardedModel) -> int:
    """Bytes of all-gathered (unsharded) parameter storage this rank holds now: 0 between steps when every
    module was resharded. Reads FSDP2's per-parameter all-gather outputs (torch internals, measurement only)."""
    total = 0
    for module in sharded.modules:
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:
            for param in group.fsdp_params:
                total += sum(t.untyped_storage().nbytes() for t in param.all_gather_outputs)
    return total


def all_finite(parameters: list[torch.Tensor]) -> bool:
    """Whether every parameter is finite on every rank (each rank checks its own shards; collective)."""
    local = all(bool(torch.isfinite(local_tensor(p.detach())).all()) for p in parameters)
    flag = torch.tensor([0.0 if local else 1.0])
    if torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flag = flag.to(device)
        torch.distributed.all_reduce(flag)
    return float(flag.item()) == 0.0


# ---------------------------------------------------------------------------------------------- checkpoints


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of the model and the optimizer to `directory` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))


def stage_sharded(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and the optimizer, copied into fresh host memory (a snapshot the next
    optimizer step cannot change) by DCP's own stager: the DefaultStager that `dcp.async_save` stages with.
    Not dcp.async_save itself: its worker thread would run DCP's collectives beside the background writer's own
    on the same group, and write into `.tmp-step_N` before that writer has made it (launch/checkpoint.py), so the
    staged state is written by `write_staged`, in the writer's thread, at the point where the synchronous save
    writes."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    # As dcp.async_save's default: staged synchronously, in pageable memory, copied blocking.
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
                                          use_non_blocking_copy=False))
    try:
        return stager.stage({"model": model_state, "optimizer": optim_state})
    finally:
        stager.close()  # drops the stager's storage cache; the staged copies live on in what it returned


def write_staged(directory: Path, staged: dict[str, Any], process_group: Any = None) -> None:
    """Collective over `process_group` (None: the default group): every rank writes its staged shards to
    `directory` (DCP). The background writer passes its own gloo group, so DCP's planning gathers never interleave
    with the training step's collectives on the default group."""
    import torch.distributed.checkpoint as dcp

    dcp.save(staged, checkpoint_id=str(directory), process_group=process_group)


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load a DCP checkpoint saved at any world size into this rank's shards (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
