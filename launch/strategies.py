"""The train-module seam: one object per `distributed.strategy` owns everything that differs between them.

Trainer (launch/trainer.py) runs the loop, the bookkeeping and evaluation; it asks its Strategy, and never names
one. A Strategy owns, for its back end:

- the process setup it needs, asked of its class before the Accelerator exists (launch/distributed.py's
  make_accelerator): `accelerator_kwargs` (DeepSpeed's plugin) and `needs_process_group` (a group even for one
  process);
- building: `build_model(build)` (FSDP builds on the meta device and keeps only this rank's shard,
  launch/meta_init.py);
- wrapping: `parallelize(model)` before the optimizer is built (FSDP2 shards the parameters in place, as
  torchtitan's parallelize_fn does), then `wrap(model, optimizer)` after (Accelerate's prepare for DDP and
  DeepSpeed);
- the micro-step: `forward_backward` (DDP's no_sync off the boundary, DeepSpeed's per-micro-step host decision
  and engine backward/step, FSDP's manual reshard after the outer backward);
- the optimizer step: `optimizer_step` (clip, then skip or update with one host read; DeepSpeed updates itself);
- what tests and debugging read: `full_gradients`, `full_parameters`, `state_bytes`;
- checkpoint contents: `save_parts` (what goes into the shared file and which engine/DCP writer runs) and
  `load_state`, plus the resume-compatibility rule between strategies (`check_checkpoint_strategy`).

The split follows OLMo-core's TrainModule (the trainer calls train_batch/optim_step/state_dict and the module
owns its parallelism) and torchtitan's parallelize_fn (parallelism applied to a built model from outside it).
Model-kind specifics (the loss call, metrics, replay state) stay in launch/train_module.py's TrainModule.

Accelerate and DeepSpeed stay the stack: Accelerate creates the process group (launch/distributed.py), autocasts,
wraps DDP (prepare_model, no_sync) and builds the DeepSpeed engine (prepare). Where an Accelerate helper is not
used, the reason is next to the code: FSDP2 (launch/fsdp.py's docstring: its plugin gives DDP on CPU and has no
reshard-after-backward switch), Accelerator.clip_grad_norm_ and backward (see DDPStrategy), and the
collectives (launch/distributed.py's docstring: Accelerate's counts are wrong on the CPU DeepSpeed path).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ebt import NonFiniteEnergyGradientError
from launch.config import TrainConfig
from launch.distributed import deepspeed_config, device_mesh


def _scalar_params_as_1d(model: nn.Module) -> list[str]:
    """DeepSpeed 0.19.8 broadcasts each parameter as `p.data.view(torch.uint8)`, which fails for 0-dim tensors
    (the EBT's alpha). Give them shape [1] for the whole DeepSpeed run: they broadcast against the same tensors,
    and restoring the shape later would break DeepSpeed's gradient hooks, which record the shape they saw.
    (fully_shard shards dim 0, so FSDP needs the same.) Returns their names so checkpoints can store the model's
    own shapes."""
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    return names


class Strategy:
    """What the trainer asks of a strategy; the defaults are the unsharded, trainer-stepped case (DDP's)."""

    name: ClassVar[str] = "base"  # its distributed.strategy value
    label: ClassVar[str] = "base"  # its name in messages
    # Whether checkpoints hold sharded DCP files (which only a sharded strategy loads) instead of whole weights.
    sharded_checkpoint: ClassVar[bool] = False
    # Whether the back end fixed the micro-batch and accumulation when the accelerator was made (before the memory
    # plans of the ranks were compared), so that a different plan on rank 0 cannot be adopted any more.
    batch_fixed_at_setup: ClassVar[bool] = False
    # Whether the back end needs a torch process group even when one process runs (a plain `python`/`ebt train`):
    # make_accelerator then sets up a world of one. DDP runs a single process as a plain module.
    needs_process_group: ClassVar[bool] = False
    # Whether parameters and optimizer state live as 1/world shards between steps (the memory plan divides them).
    shards_parameters: ClassVar[bool] = False

    @classmethod
    def accelerator_kwargs(cls, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
        """Keyword arguments of Accelerator that select this back end (a plugin); asked before the Accelerator
        exists, with the process group's world size. Empty here: Accelerate's own DDP (or no wrapping by it)."""
        return {}

    def __init__(self, cfg: TrainConfig, accelerator: Any, rank: int, world: int) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank, self.world = rank, world
        self.raw_model: nn.Module | None = None
        self.model: Any = None  # what the loss is called on: the wrapper (DDP, DeepSpeed engine) or the model
        self.optimizer: Any = None
        self.sharded: Any = None  # launch.fsdp.ShardedModel / RegatheredModel under fsdp
        self.reshaped_scalars: list[str] = []
        # The parameters the optimizer updates: under fsdp the sharded DTensors, which are the module's attributes
        # only between steps (while gathered, FSDP swaps in the unsharded copies).
        self.trained_parameters: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ building
    def build_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        """The model `build()` makes, as this strategy holds it until `parallelize`: here built whole on CPU, as
        every rank trains the whole model."""
        return build()

    # ------------------------------------------------------------------------------------------ wrapping
    def parallelize(self, model: nn.Module) -> None:
        """Before the optimizer is built: apply parallelism that changes the parameters in place."""
        self.raw_model = model
        self.trained_parameters = dict(model.named_parameters())

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer is built: wrap it and the model for the back end (no LR scheduler: the trainer
        sets the LR on the optimizer's param groups before each step, launch/schedule.py)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop the wrappers (they hold the process group: Trainer.close)."""
        self.model = self.optimizer = None

    # ------------------------------------------------------------------------------------------ micro-step
    def forward_loss(self, module: Any, tokens: torch.Tensor,
                     **model_kwargs: Any) -> tuple[torch.Tensor | None, dict, torch.Tensor]:
        """One call of the wrapped module under autocast: (loss, metrics, finite), `finite` a 0-d bool on the
        device: the loss and every inner gradient finite (an EBT's forward reports the latter as
        metrics["nonfinite"] instead of raising). A NonFiniteEnergyGradientError raised on the way anyway (outside
        the model's forward, which converts its own) is (None, {}, False)."""
        try:
            with self.accelerator.autocast():
                loss, metrics = module.loss(self.model, tokens, **model_kwargs)
        except NonFiniteEnergyGradientError:
            return None, {}, torch.zeros((), dtype=torch.bool, device=self.device)
        finite = torch.isfinite(loss.detach()).all()
        inner = metrics.pop("nonfinite", None)
        if inner is not None:
            finite = finite & ~inner
        return loss, metrics, finite

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss that still touches every parameter: every rank's gradient hooks and reductions stay
        matched when a micro-batch has no loss of its own."""
        return sum(p.sum() for p in self.raw_model.parameters()) * 0.0

    def forward_backward(self, module: Any, tokens: torch.Tensor, last_micro: bool,
                         **model_kwargs: Any) -> tuple[dict, torch.Tensor]:
        """One micro-batch (Trainer.forward_backward documents the contract)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ update
    def _global_norm(self, total: torch.Tensor) -> torch.Tensor:
        """clip_grad_norm_'s total as the norm over every rank's gradients."""
        return total

    def optimizer_step(self, skip: bool | torch.Tensor, report: torch.Tensor) -> tuple[float, bool, list[float]]:
        """Clip, then decide and update with ONE host read: [skip, grad norm, *report] in a single transfer.
        Returns (grad_norm, updated, report as floats); grad_norm is nan for a skipped step.

        Not Accelerator.clip_grad_norm_: for DDP it is the same torch.nn.utils.clip_grad_norm_ over the
        parameters it is given, and the norm must come from our parameter list (the sharded DTensors under
        fsdp) and stay on the device until the single read below."""
        clip = self.cfg.optim.clip_grad_norm
        total = torch.nn.utils.clip_grad_norm_(list(self.trained_parameters.values()), clip if clip > 0 else math.inf)
        total = self._global_norm(total)
        total = total.detach().to(torch.float64).reshape(1)
        flag = skip.to(torch.float64) if torch.is_tensor(skip) else torch.full((), float(skip), dtype=torch.float64)
        # The step's one host read (on CUDA a device sync): whether to skip, the norm and the report together.
        skipping, norm, *step_report = torch.cat(
            [flag.reshape(1).to(total.device), total, report.to(total.device, torch.float64)]).tolist()
        updated = not skipping and math.isfinite(norm)
        if updated:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (float("nan") if skipping else norm), updated, step_report

    # ------------------------------------------------------------------------------------------ reading
    def _full_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        return param.grad

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's full (reduced) gradient in the model's own shapes; collective where sharded."""
        out = {}
        for name, param in self.trained_parameters.items():
            grad = self._full_grad(param)
            if grad is not None and name in self.reshaped_scalars:
                grad = grad.reshape(())
            keep = grad is not None and grad.dtype == torch.float64  # fp64 tests compare to 1e-12
            out[name] = None if grad is None else (grad.detach() if keep else grad.detach().float()).cpu().clone()
        return out

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole, in the model's own shapes (collective under fsdp)."""
        from launch.fsdp import full_tensor

        out = {}
        for name, param in self.trained_parameters.items():
            value = full_tensor(param.detach())
            value = value.reshape(()) if name in self.reshaped_scalars else value
            out[name] = (value if value.dtype == torch.float64 else value.float()).cpu().clone()
        return out

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer state, measured on the live tensors."""
        from launch.fsdp import state_bytes

        return state_bytes(list(self.trained_parameters.values()), self.optimizer)

    def gathered(self) -> contextlib.AbstractContextManager:
        """Every parameter whole, for code that calls the model other than through its forward (validation)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ checkpoints
    def all_finite(self) -> bool:
        """Whether the weights are finite; the same answer on every rank."""
        # Every rank holds the full weights (also under ZeRO-1/2), so this check is the same on every rank.
        return all(bool(torch.isfinite(p).all()) for p in self.raw_model.parameters())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights in its own shapes (see _scalar_params_as_1d)."""
        state = self.raw_model.state_dict()
        for name in self.reshaped_scalars:
            state[name] = state[name].reshape(())
        return state

    def save_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(entries of the checkpoint's shared file, keyword arguments of CheckpointManager.save: the engine or
        sharded writer that saves the rest, and the size estimate of what they write)."""
        raise NotImplementedError

    def load_state(self, ckpt: Any, path: Path) -> None:
        """Weights and optimizer state from the checkpoint at `path` (save_parts' counterpart)."""
        raise NotImplementedError

    def sharded_state_bytes(self) -> int:
        """What DeepSpeed or DCP write for this rank, estimated as its parameters and optimizer moments (asked only
        for the message of a full disk, so an estimate that cannot be made is 0)."""
        try:
            held = self.state_bytes()
        except Exception:  # noqa: BLE001 - a wrapped optimizer whose state this cannot read
            return 0
        return held["params"] + held["optimizer"]


class DDPStrategy(Strategy):
    """distributed.strategy=ddp: Accelerate's DDP wrapper (a plain module for one process).

    The backward is `loss.backward()`, not Accelerator.backward: with no gradient accumulation plugin and no
    scaler (fp32 or bf16) that is all it does, and the loss is scaled by 1/grad_accum_steps here, where the
    accumulation is decided."""

    name = "ddp"
    label = "DDP"

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = self.accelerator.prepare_model(model)
        self.optimizer = optimizer

    def forward_backward(self, module: Any, tokens: torch.Tensor, last_micro: bool,
                         **model_kwargs: Any) -> tuple[dict, torch.Tensor]:
        sync = contextlib.nullcontext()
        if not last_micro and self.world > 1:
            sync = self.accelerator.no_sync(self.model)
        with sync:
            loss, metrics, finite = self.forward_loss(module, tokens, **model_kwargs)
            if loss is None:
                loss = self._zero_loss()
            (loss / self.cfg.trainer.grad_accum_steps).backward()
        return metrics, finite

    def save_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"model": self.model_state_dict(), "optimizer": self.optimizer.state_dict()}, {}

    def load_state(self, ckpt: Any, path: Path) -> None:
        self.raw_model.load_state_dict(ckpt.load_shared(path, "model"))
        self.optimizer.load_state_dict(ckpt.load_shared(path, "optimizer"))


class DeepSpeedStrategy(Strategy):
    """distributed.strategy=deepspeed: ZeRO-1/2 through Accelerate's DeepSpeed plugin (the engine owns the
    backward, the accumulation boundary, clipping and the update; launch/distributed.py fills its config)."""

    name = "deepspeed"
    label = "DeepSpeed"
    batch_fixed_at_setup = True  # the DeepSpeed config's batch arithmetic is written when the accelerator is made
    # DeepSpeed has no single-process path: without the torch.distributed variables it falls back to MPI
    # discovery (launch/distributed.py's _single_process_rendezvous).
    needs_process_group = True

    @classmethod
    def accelerator_kwargs(cls, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world_size))}

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.reshaped_scalars = _scalar_params_as_1d(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The engine steps an LR scheduler of its own in step() when it has one (a "scheduler" section in the
        # DeepSpeed file); on top of launch/schedule.py's LR it would change every update's LR.
        if getattr(self.model, "lr_scheduler", None) is not None:
            raise ValueError(f"config key 'distributed.deepspeed_config': {self.cfg.distributed.deepspeed_config} "
                             "has a \"scheduler\" section; remove it (the LR schedule is optim.*'s)")

    def forward_backward(self, module: Any, tokens: torch.Tensor, last_micro: bool,
                         **model_kwargs: Any) -> tuple[dict, torch.Tensor]:
        loss, metrics, finite = self.forward_loss(module, tokens, **model_kwargs)
        # DeepSpeed owns its optimizer step and cannot be told to skip it, so a non-finite loss must not reach
        # its gradients: the host decides per micro-step (one sync each, on this path only).
        if loss is None or not bool(finite):
            loss = self._zero_loss()
        self.model.backward(loss)
        if not last_micro:
            self.model.step()  # DeepSpeed counts micro-steps; it updates only at the boundary
        return metrics, finite

    def optimizer_step(self, skip: bool | torch.Tensor, report: torch.Tensor) -> tuple[float, bool, list[float]]:
        # DeepSpeed owns the update (clipping per its config, set from optim.clip_grad_norm); a non-finite
        # loss was already replaced by a zero loss on its rank, so the step cannot be withheld here, and
        # its norm is a host value of its own.
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipping, *step_report = torch.cat([torch.as_tensor(skip, dtype=torch.float64).reshape(1).to(
            report.device), report.to(torch.float64)]).tolist()
        return norm, not skipping and math.isfinite(norm), step_report

    def _full_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    def save_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # The optimizer's (partitioned) state is the engine's to write.
        return {"model": self.model_state_dict()}, {"deepspeed_engine": self.model,
                                                    "other_bytes": self.sharded_state_bytes}

    def load_state(self, ckpt: Any, path: Path) -> None:
        self.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                   load_lr_scheduler_states=False)


class FSDPStrategy(Strategy):
    """distributed.strategy=fsdp: FSDP2 driven by launch/fsdp.py (the Accelerator never wraps the model; that
    module's docstring says why), or distributed.fsdp_regather's functional sharding."""

    name = "fsdp"
    label = "FSDP"
    sharded_checkpoint = True
    shards_parameters = True
    # fully_shard needs a process group even for one process (a 1-rank mesh; resuming a sharded checkpoint on one
    # machine is a supported case).
    needs_process_group = True

    def __init__(self, cfg: TrainConfig, accelerator: Any, rank: int, world: int) -> None:
        super().__init__(cfg, accelerator, rank, world)
        self.meta_init: Any = None  # launch.meta_init.MetaInit between build_model and parallelize

    def build_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        """On the meta device, recording only this rank's Shard(0) piece of each parameter (launch/meta_init.py:
        the values and the RNG state after it are a CPU build's, bitwise); parallelize shards and fills it.

        distributed.fsdp_regather still builds on CPU: regather_model cuts each rank's chunk from the whole
        weights itself (no fully_shard to shard a meta model), and it is the off-by-default route."""
        if self.cfg.distributed.fsdp_regather:
            return build()
        from launch.meta_init import record_build

        model, self.meta_init = record_build(build, self.rank, self.world)
        return model

    def parallelize(self, model: nn.Module) -> None:
        from launch import fsdp

        # fully_shard shards dim 0, so 0-d parameters (alpha) become [1] for the run, as under DeepSpeed.
        self.reshaped_scalars = _scalar_params_as_1d(model)
        mesh = device_mesh(self.device)
        if self.cfg.distributed.fsdp_regather:
            model.to(self.device)
            self.sharded = fsdp.regather_model(model, mesh)
        elif self.meta_init is None:  # a model built whole (not through build_model)
            model.to(self.device)
            self.sharded = fsdp.shard_model(model, mesh, bf16=self.accelerator.mixed_precision == "bf16")
        else:
            from launch.meta_init import materialise

            if (mesh.get_local_rank(), mesh.size()) != (self.meta_init.rank, self.meta_init.world):
                raise RuntimeError(f"the meta build recorded rank {self.meta_init.rank} of {self.meta_init.world}, "
                                   f"the mesh shards for rank {mesh.get_local_rank()} of {mesh.size()}")
            # fully_shard on the meta model lays out each rank's shards; then they are allocated and filled.
            self.sharded = fsdp.shard_model(model, mesh, bf16=self.accelerator.mixed_precision == "bf16")
            materialise(model, self.meta_init, self.device)
            self.meta_init = None
        # The optimizer must see the sharded (DTensor) parameters that fully_shard put in place.
        super().parallelize(model)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def forward_backward(self, module: Any, tokens: torch.Tensor, last_micro: bool,
                         **model_kwargs: Any) -> tuple[dict, torch.Tensor]:
        """Forward (the root hook gathers every block), backward (FSDP reduce-scatters the gradients at its end),
        then reshard every FSDP module (launch/fsdp.py, step 4).

        The loss is backwarded whatever its value, as in the other strategies: FSDP's reduce-scatter runs from a
        hook on the model's output, so every rank backwards its own output, and a NaN there only makes NaN
        gradients, which train_step's one host read then skips everywhere. A substitute loss would not carry
        that hook; the EBT's forward therefore turns an inner-gradient error raised inside it into a zero loss
        that does (EnergyBasedTransformer.forward). An error raised outside the forward leaves this rank without
        an output: with one rank the micro-batch is just dropped, with several the ranks' collectives could not
        match, so it is an error."""
        # fsdp_regather gathers each weight where it is read and re-gathers saved ones in the backward, inside
        # this context; the FSDP2 route needs none.
        step = self.sharded.step() if hasattr(self.sharded, "step") else contextlib.nullcontext()
        with step:
            loss, metrics, finite = self.forward_loss(module, tokens, **model_kwargs)
            if loss is None:
                self.sharded.abort_step()
                if self.world > 1:
                    raise RuntimeError(
                        f"rank {self.rank}: NonFiniteEnergyGradientError raised outside the model's forward under "
                        "fsdp; this rank has no output to backward, so the ranks' reduce-scatters cannot match "
                        "(raised inside the forward it becomes a skipped step)")
            else:
                (loss / self.cfg.trainer.grad_accum_steps).backward()
                self.sharded.reshard()
        return metrics, finite

    def _global_norm(self, total: torch.Tensor) -> torch.Tensor:
        from launch.fsdp import full_tensor

        return full_tensor(total)  # the norm over every rank's shards (a DTensor under fsdp)

    def _full_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        from launch.fsdp import full_tensor

        return None if param.grad is None else full_tensor(param.grad)

    def gathered(self) -> contextlib.AbstractContextManager:
        # Validation calls model.loss directly (no forward hook gathers): gather for the evaluation.
        return self.sharded.gathered()

    def all_finite(self) -> bool:
        from launch.fsdp import all_finite

        return all_finite(list(self.trained_parameters.values()))  # each rank its shards; the ranks agree

    def save_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from launch.fsdp import save_sharded, stage_sharded, write_staged

        def sharded_save(directory: Path) -> None:
            save_sharded(directory, self.raw_model, self.optimizer)

        def sharded_stage() -> Callable[[Path, Any], None]:
            # checkpoint.async_save: the shards are copied to host memory now; DCP writes the copy later, in the
            # background writer's thread and on its process group.
            staged = stage_sharded(self.raw_model, self.optimizer)
            return lambda directory, process_group: write_staged(directory, staged, process_group)

        # The sharded model and optimizer go to DCP files written by every rank.
        return {}, {"sharded_save": sharded_save, "sharded_stage": sharded_stage,
                    "other_bytes": self.sharded_state_bytes}

    def load_state(self, ckpt: Any, path: Path) -> None:
        from launch.fsdp import DCP_DIR, load_sharded

        load_sharded(path / DCP_DIR, self.raw_model, self.optimizer)  # DCP reshards to this world size


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDPStrategy, DeepSpeedStrategy, FSDPStrategy)}


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy class of a distributed.strategy value."""
    return STRATEGIES[name]


def make_strategy(cfg: TrainConfig, accelerator: Any, rank: int, world: int) -> Strategy:
    """The Strategy for cfg.distributed.strategy."""
    return strategy_class(cfg.distributed.strategy)(cfg, accelerator, rank, world)


def check_checkpoint_strategy(saved_strategy: str, strategy: Strategy, run_dir: Path) -> None:
    """Refuse to resume checkpoints whose files this strategy cannot load (sharded DCP files against whole
    weights); strategies whose files match resume each other's."""
    saved_sharded = STRATEGIES.get(saved_strategy, DDPStrategy).sharded_checkpoint
    if saved_sharded != strategy.sharded_checkpoint:
        raise ValueError(f"config key 'distributed.strategy': the checkpoints in {run_dir} were saved "
                         f"under {saved_strategy!r}, whose {'sharded ' if saved_sharded else ''}"
                         f"files {strategy.name!r} cannot load; resume with "
                         f"distributed.strategy={saved_strategy}")
