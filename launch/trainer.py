"""The generic training loop: steps, accumulation, non-finite handling, and what evaluation and checkpoints save.

Model-kind specifics live in a TrainModule (launch/train_module.py); process setup in launch/distributed.py;
everything that differs between distributed strategies (wrapping, the micro-step's forward and backward, the
optimizer step, gradient norms, checkpoint contents) in a Strategy (launch/strategies.py), which the trainer asks
without naming it. What happens around the loop
(when to evaluate and checkpoint, metrics.jsonl, wandb, progress, preemption) is in launch/callbacks/: Trainer.fit
is the loop and calls their hooks.
Exact resume: everything that shapes a later step is in the checkpoint (weights, optimizer, counters,
per-rank RNG streams, data-loader position, replay buffer), evaluation runs under a forked RNG so it never
shifts the training stream, and metrics.jsonl is cut back to the checkpoint's step on restart. The LR is no
state: launch/schedule.py computes it from (cfg, step) before every optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import data_pipeline
from data_pipeline.loader import global_eval_share
from ebt import build_model
from ebt.checkpointing import apply_checkpointing
from launch import memory_plan
from launch.callbacks import PREEMPTED, Callback, default_callbacks
from launch.callbacks.checkpoint import INTERRUPTED
from launch.checkpoint import CheckpointManager
from launch.cli import RunError
from launch.config import TrainConfig, check_resume_compatible, config_to_dict, load_saved_config, save_config
from launch.distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    configure_threads,
    make_accelerator,
    rank_and_world,
    start_heartbeat,
)
from launch.metrics import peak_flops, training_dtype
from launch.optim import build_optimizer
from launch.schedule import apply_lr
from launch.signals import PreemptionFlag, TrainingInterrupted
from launch.strategies import Strategy, check_checkpoint_strategy, make_strategy, strategy_class
from launch.train_module import make_train_module


class NonFiniteAbort(RunError):
    """Training diverged (too many non-finite steps, or non-finite weights to checkpoint): one line naming the
    knobs to turn, exit 1, from rank 0 only (the other ranks stop quietly)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's seeds every CUDA device too).

    Not accelerate.utils.set_seed, though it seeds the same three and gave the same draws for seeds 0, 2000006 and
    2**32 - 1 (measured): it passes the seed to np.random.seed unreduced, which refuses >= 2**32 ("Seed must be
    between 0 and 2**32 - 1"), and setup_model's per-rank seed, trainer.seed + 1_000_003 x (rank + 1), gets there
    for large seeds or rank counts. Its device_specific=True offset is AcceleratorState().process_index, 0 on every
    rank on the CPU DeepSpeed path (launch/distributed.py), so the per-rank offset is ours too."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# rng_state/set_rng_state: the per-rank streams a checkpoint keeps for exact resume. Accelerate captures the same
# generators only inside Accelerator.save_state/load_state, next to its own model and optimizer files (our
# checkpoints are launch/checkpoint.py's manifest with DeepSpeed and DCP parts), in random_states_<process_index>.pkl:
# on the CPU DeepSpeed path both ranks wrote one random_states_0.pkl (measured, 2 ranks), losing a rank's stream.
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _planning_device() -> torch.device:
    """The device this rank will train on, known before Accelerate is set up (it takes LOCAL_RANK's GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None, callbacks: Sequence[Callback] | None = None) -> None:
        """`callbacks`: what runs around fit's loop (launch/callbacks/); None: those the config asks for."""
        configure_threads()
        self.user_cfg = cfg  # what config.yaml keeps and resume compares (checkpointing may say "auto")
        self._log = log or print
        # checkpointing=auto is planned before anything is built: DeepSpeed's batch arithmetic, the model and
        # the loader all take the planned micro-batch (launch/memory_plan.py).
        self.memory_plan = memory_plan.resolve(cfg, _planning_device(), resuming=cfg.checkpoint.resume)
        self.cfg = cfg = memory_plan.apply(cfg, self.memory_plan)
        self.accelerator = make_accelerator(cfg, strategy_class(cfg.distributed.strategy))
        # From the process group, not the Accelerator: on the CPU DeepSpeed path its counts say one process while
        # the gloo group has them all (rank_and_world says what was measured).
        self.rank, self.world = rank_and_world()
        # From the moment the group is up: a rank stopped during setup must not hang the job either.
        self.heartbeat = start_heartbeat(cfg.distributed.stall_timeout_s, cfg.run_dir)
        self.device = self.accelerator.device
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self._agree_on_memory_plan()
        # Wrapping, the micro-step, the optimizer step and checkpoint contents of distributed.strategy; made with
        # the agreed plan's config.
        self.strategy: Strategy = make_strategy(self.cfg, self.accelerator, self.rank, self.world)
        self.step = 0
        self.tokens = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.wandb_id: str | None = None  # the wandb run this run dir logs to, kept in checkpoints
        self.last_eval: dict[str, float] = {}
        self.preempt = PreemptionFlag()  # installed by the checkpoint callback; train_step shares it across ranks
        self.preempt_agreed = False  # some rank was signalled (train_step's all-reduce)
        self.stop_reason: str | None = None  # set by a callback's request_stop: the loop ends after this step
        self.data_time = 0.0  # seconds spent fetching batches since take_step_times
        self.step_time = 0.0  # seconds inside train_step (data included) since take_step_times
        self.callbacks = list(callbacks) if callbacks is not None else default_callbacks(self.cfg)

    def _agree_on_memory_plan(self) -> None:
        """Every rank computes with rank 0's plan (free memory, and so the default budget, differs by node)."""
        if self.memory_plan is None:
            return
        chosen = broadcast_object(self.memory_plan)
        if chosen != self.memory_plan:
            strategy = strategy_class(self.cfg.distributed.strategy)
            if strategy.batch_fixed_at_setup and (chosen.micro_batch_size, chosen.grad_accum_steps) != (
                    self.memory_plan.micro_batch_size, self.memory_plan.grad_accum_steps):
                raise ValueError("config key 'trainer.memory_budget_gb': ranks planned different micro-batches "
                                 f"(rank 0: {chosen.micro_batch_size}, rank {self.rank}: "
                                 f"{self.memory_plan.micro_batch_size}) and {strategy.label} has "
                                 "fixed its batch already; set trainer.memory_budget_gb so every rank plans the "
                                 "same")
            self.memory_plan = chosen
            self.cfg = memory_plan.apply(self.user_cfg, chosen)
        self.log(chosen.describe())
        if self.is_main:
            memory_plan.save_plan(self.run_dir, chosen)

    # ------------------------------------------------------------------------------------------------ strategy
    # What the strategy holds, read by the rest of the trainer, tests and benchmarks.
    @property
    def model(self) -> Any:
        """What the loss is called on: the strategy's wrapper (DDP, the DeepSpeed engine) or the model itself."""
        return self.strategy.model

    @property
    def optimizer(self) -> Any:
        return self.strategy.optimizer

    @property
    def trained_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters the optimizer updates (the sharded DTensors where the strategy shards)."""
        return self.strategy.trained_parameters

    @property
    def reshaped_scalars(self) -> list[str]:
        return self.strategy.reshaped_scalars

    @property
    def sharded(self) -> Any:
        """launch.fsdp's ShardedModel or RegatheredModel where the strategy shards, else None."""
        return self.strategy.sharded

    # ------------------------------------------------------------------------------------------------ setup
    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def setup(self) -> None:
        if self.device.type == "cpu":
            from planning.host import host_allocator

            self.log(f"host allocator: {host_allocator()}")  # launch/allocator.py: it sets CPU peak memory
        self.setup_data()
        self.setup_model()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.cfg.checkpoint.keep_last, self.rank,
                                      self.world, barrier=barrier, log=self.log, all_sum=self._all_sum,
                                      **self._background_saving())
        self._resume()
        self.train_iter = iter(self.loader)
        if self.is_main:
            save_config(self.user_cfg, self.run_dir / "config.yaml")

    def setup_model(self) -> None:
        """Model and optimizer, parallelized and wrapped by the strategy; same initial weights on every
        rank."""
        cfg = self.cfg
        seed_everything(cfg.trainer.seed)  # same seed everywhere: identical initial weights without a broadcast
        # The strategy decides where the weights are built (FSDP: on meta, keeping only this rank's shard).
        model = self.strategy.build_model(lambda: build_model(cfg.model))
        # Memory policy from outside the model, once (as torchtitan applies activation checkpointing). It is
        # concrete here: "auto" was planned for this micro-batch in __init__ (launch/memory_plan.py).
        if cfg.model.kind == "ebt":
            apply_checkpointing(model, cfg.trainer.checkpointing, cfg.trainer.remat_chunk)
        self.raw_model = model
        self.module = make_train_module(cfg.model, cfg.trainer.seed)
        # As torchtitan's parallelize_fn: parallelism that changes the parameters (sharding) goes on the built
        # model before the optimizer sees its parameters; the wrappers (DDP, the DeepSpeed engine) after.
        self.strategy.parallelize(model)
        optimizer = build_optimizer(model, cfg)
        # The torch optimizer under any wrapper, whose param groups every update reads its LR from. The object,
        # not its list: load_state_dict (a resume) replaces the list.
        self.torch_optimizer = optimizer
        self.strategy.wrap(model, optimizer)
        self.model.train()
        t = cfg.trainer
        context = cfg.model.architecture.context_length
        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.world * context
        self.flops_per_token = self.module.flops_per_token()
        # MFU's peak in the precision the step's matmuls run in (the autocast dtype of the mixed precision, else
        # the parameters'): the data sheet on known GPUs, on CPU a calibration load cannot lower; trainer.peak_flops
        # overrides. The first metrics row says which (peak_flops_source).
        peak = peak_flops(self.device, training_dtype(self.accelerator.mixed_precision,
                                                      next(model.parameters()).dtype), override=t.peak_flops)
        self.peak_flops, self.peak_flops_source = peak.flops, peak.source
        self.log(f"MFU peak: {peak.flops / 1e12:.4g} TFLOP/s per device, {peak.source}")
        # From here each rank draws its own MCMC noise and replay samples.
        seed_everything(cfg.trainer.seed + 1_000_003 * (self.rank + 1))

    def setup_data(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        # Every rank calls it: the first prepares under the data pipeline's directory lock while the others
        # wait on that lock, which has no collective timeout (a long tokenisation must not trip
        # distributed.timeout_s), and ranks on nodes without a shared filesystem prepare their own copy.
        data_pipeline.prepare_if_needed(dataclasses.replace(cfg.data, progress=cfg.data.progress and self.is_main))
        if cfg.model.architecture.vocab_size != data_pipeline.vocab_size(cfg.data):
            raise ValueError(f"config key 'model.architecture.vocab_size': {cfg.model.architecture.vocab_size} "
                             f"differs from the tokenizer's {data_pipeline.vocab_size(cfg.data)} (data.vocab_size)")
        self.loader = data_pipeline.build_loader(
            cfg.data, split="train", context_length=cfg.model.architecture.context_length,
            micro_batch_size=t.micro_batch_size,
            rank=self.rank, world_size=self.world, seed=t.seed, num_workers=t.num_workers)

    def _resume(self) -> None:
        cfg = self.cfg
        self.ckpt.clean_partial()
        barrier()
        # Every rank hashes only the files it owns; the ranks agree on the newest checkpoint none found bad.
        path = self.ckpt.latest_valid(gather=all_gather_object)
        if path is None:  # (metrics.jsonl is cut back to the starting step by the metrics callback, in fit)
            if self.is_main:
                id_file = self.run_dir / "wandb_id"
                self.wandb_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            return
        path = Path(path)
        if not cfg.checkpoint.resume:
            raise ValueError(f"config key 'checkpoint.resume': {self.run_dir} already holds checkpoints; "
                             "set checkpoint.resume=true to continue it or pick a new name=")
        saved = config_to_dict(load_saved_config(path / "config.yaml"))
        check_checkpoint_strategy(saved.get("distributed", {}).get("strategy", "ddp"), self.strategy, self.run_dir)
        saved_world = self.ckpt.saved_world_size(path)
        check_resume_compatible(saved, self.user_cfg, self.run_dir, world_changed=saved_world != self.world)
        trainer_state = self.ckpt.load_shared(path, "trainer")
        self.strategy.load_state(self.ckpt, path)  # weights and optimizer state, in the strategy's files
        # trainer_state["scheduler"] of an older checkpoint is ignored: the LR is recomputed from (cfg, step).
        self.step = trainer_state["step"]
        self.tokens = trainer_state["tokens"]
        self.nonfinite_total = trainer_state["nonfinite_total"]
        self.nonfinite_in_row = trainer_state["nonfinite_in_row"]
        self.wandb_id = trainer_state.get("wandb_id")
        if saved_world == self.world:
            per_rank = self.ckpt.load_rank(path)
            self.loader.load_state_dict(per_rank["data"])
            self.module.load_state_dict(self.raw_model, per_rank["module"])
            set_rng_state(per_rank["rng"])
        else:
            self._resume_resharded(path, saved_world, trainer_state.get("global_batch"))
        self.log(f"resumed from {path} (step {self.step})")

    def _resume_resharded(self, path: Path, saved_world: int, saved_global_batch: int | None) -> None:
        """The per-rank state of a sharded checkpoint saved with another number of ranks.

        Exact: weights, optimizer state, counters, and the data position (global: every rank saved
        the same one, and the new ranks split the rest of the same epoch permutation). Rank r < the saved world
        also keeps rank r's RNG streams and replay buffer; a new rank starts its own RNG stream (seeded in
        setup_model) with an empty buffer, and the buffers of ranks beyond the new world are dropped. With the
        same global batch and no per-rank randomness (no Langevin noise, random step counts or replay) the run
        continues as it would have at the old world size, up to the order of the gradient sums."""
        per_rank = self.ckpt.load_rank(path, rank=self.rank if self.rank < saved_world else 0)
        self.loader.load_state_dict(per_rank["data"])
        if self.rank < saved_world:
            self.module.load_state_dict(self.raw_model, per_rank["module"])
            set_rng_state(per_rank["rng"])
        batch = f"global batch {saved_global_batch} -> {self.global_batch}" if saved_global_batch else \
            f"global batch now {self.global_batch}"
        self.log(f"resharded a {saved_world}-rank checkpoint onto {self.world} ranks ({batch} sequences; "
                 "weights, optimizer, schedule and data position exact, per-rank RNG and replay buffers of "
                 f"ranks >= {min(saved_world, self.world)} start afresh)")

    # ------------------------------------------------------------------------------------------------ step
    def _next_batch(self) -> torch.Tensor:
        start = time.perf_counter()
        batch = next(self.train_iter).to(self.device, non_blocking=True)
        self.data_time += time.perf_counter() - start
        return batch

    def forward_backward(self, tokens: torch.Tensor, last_micro: bool,
                         **model_kwargs: Any) -> tuple[dict, torch.Tensor]:
        """One micro-batch: one call of the wrapped module (the whole MCMC loop for an EBT), one backward.

        Returns (metrics, finite): the metrics as device tensors, `finite` a 0-d bool on the device (False: the
        loss or an inner gradient was NaN/inf). Nothing is read on the host: the loss is backwarded whatever its
        value (a NaN loss gives NaN gradients, and every rank's hooks and gradient all-reduce stay matched), and
        train_step's one host read per optimizer step then skips the update everywhere. A forward that raised
        NonFiniteEnergyGradientError has no loss: a zero loss that still touches every parameter stands in.
        The strategy runs it (launch/strategies.py; one whose optimizer step cannot be withheld decides on the
        host per micro-step instead).
        """
        return self.strategy.forward_backward(self.module, tokens, last_micro, **model_kwargs)

    @property
    def _collective_device(self) -> torch.device:
        """Where small collective tensors live: nccl needs them on the GPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def optimizer_step(self, skip: bool | torch.Tensor,
                       report: torch.Tensor | None = None) -> tuple[float, bool]:
        """Clip, then decide and update with ONE host read: [skip, grad norm, *report] in a single transfer.

        skip: True, or a 0-d device flag (train_step's "some rank had a non-finite micro-batch"). report: device
        values to read in the same transfer (train_step's all-reduced metric sums), left in self.step_report.
        The clipped norm is computed on the device before the decision, so the update runs unless skipping or
        the norm is not finite. Returns (grad_norm, updated); grad_norm is nan for a skipped step. The update
        uses cfg's LR at self.step (launch/schedule.py), left in self.lr for the metrics row."""
        report = torch.zeros(0, dtype=torch.float64) if report is None else report
        self.lr = apply_lr(self.torch_optimizer.param_groups, self.cfg, self.step)  # the one place the LR is set
        norm, updated, self.step_report = self.strategy.optimizer_step(skip, report)
        return norm, updated

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's full (reduced) gradient in the model's own shapes; collective where the strategy
        shards or partitions gradients. For tests and debugging."""
        return self.strategy.full_gradients()

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole, in the model's own shapes (collective where sharded). For tests and
        debugging."""
        return self.strategy.full_parameters()

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer state, measured on the live tensors."""
        return self.strategy.state_bytes()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum_steps micro-batches, with one host read (optimizer_step's).

        The micro-batches' metric sums (float64, as the Python floats summed them before), their counts and the
        non-finite count stay on the device; they are all-reduced together with the preemption flag, and
        read, with the skip decision and the gradient norm, in optimizer_step's single transfer."""
        t = self.cfg.trainer
        device = self._collective_device
        keys = [k for k in self.module.metric_keys if k != "ppl"] + ["ce"]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums, counts, bad = dict.fromkeys(keys, zero), dict.fromkeys(keys, zero), zero
        for micro in range(t.grad_accum_steps):
            metrics, finite = self.forward_backward(self._next_batch(), micro == t.grad_accum_steps - 1,
                                                    step=self.step)
            finite = finite.to(device)
            weight = finite.to(torch.float64)  # a non-finite micro-batch adds to no sum and no count
            bad = bad + (1.0 - weight)
            for key in keys:
                if key in metrics:
                    value = metrics[key]
                    value = (value.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(value) else
                             torch.full((), float(value), dtype=torch.float64, device=device))
                    sums[key] = sums[key] + torch.where(finite, value, 0.0)
                    counts[key] = counts[key] + weight
        preempt = torch.full((), 1.0 if self.preempt.requested else 0.0, dtype=torch.float64, device=device)
        # Whether a stop request was a Ctrl-C (exit 130) rides in the same all-reduce: every rank then exits alike.
        ctrl_c = torch.full((), 1.0 if self.preempt.interrupted else 0.0, dtype=torch.float64, device=device)
        vec = all_reduce_sum(torch.stack([*sums.values(), *counts.values(), bad, preempt, ctrl_c]))
        n = len(keys)
        grad_norm, updated = self.optimizer_step(skip=vec[2 * n] > 0, report=vec)
        values = self.step_report  # vec, read by optimizer_step's transfer
        self.preempt_agreed = values[2 * n + 1] > 0
        self.preempt.interrupt_agreed = values[2 * n + 2] > 0
        skipped = not updated
        self.step += 1
        self.tokens += self.tokens_per_step
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        for i, key in enumerate(keys):
            count = values[n + i]
            if count or not key.startswith("ce_step_"):  # a step that ran in no micro-batch (random counts)
                row[key] = values[i] / count if count else float("nan")
        ce = row.pop("ce")
        row["ppl"] = math.exp(min(ce, 700.0)) if math.isfinite(ce) else float("nan")
        row.update(lr=self.lr, grad_norm=grad_norm, skipped=skipped)
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                raise NonFiniteAbort(f"{self.nonfinite_in_row} non-finite steps in a row (last at step {self.step});"
                                     " lower optim.lr or model.thinking.alpha_init (trainer.max_nonfinite_in_row)",
                                     quiet=not self.is_main)
        else:
            self.nonfinite_in_row = 0
        row["nonfinite_steps"] = self.nonfinite_total
        return row

    # ------------------------------------------------------------------------------------------------ eval
    def eval_sequences(self) -> int:
        """How many val windows an evaluation scores: trainer.eval_batches global batches (0: the whole split).

        A global batch is micro_batch_size x grad_accum_steps x world size sequences, the training batch, as
        Megatron's --eval-iters and torchtitan's validation.steps count it. The set is the first windows of the
        val split, so it depends on the global batch only, not on the world size or the micro-batch split."""
        t = self.cfg.trainer
        return t.eval_batches * t.micro_batch_size * t.grad_accum_steps * self.world

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss: summed NLL over the first eval_sequences() windows of the val split
        divided by their token count, both all-reduced as sums. Window i is scored on rank i mod world size
        (in micro-batches), so every world size and micro-batch scores the same windows from the same starts
        (eval_loss keys them by sequence), and every evaluation the same ones again."""
        cfg = self.cfg
        self.raw_model.eval()
        nll, count = 0.0, 0
        # Validation calls model.loss directly, so no forward hook gathers sharded parameters: the strategy does.
        with self.strategy.gathered(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.trainer.seed + 17)
            whole = data_pipeline.build_eval_loader(
                cfg.data, split="val", context_length=cfg.model.architecture.context_length,
                micro_batch_size=cfg.trainer.micro_batch_size, rank=0, world_size=1)
            share = global_eval_share(whole, limit=self.eval_sequences(), rank=self.rank, world_size=self.world,
                                      batch_size=cfg.trainer.micro_batch_size)
            for batch in share:
                with self.accelerator.autocast():
                    batch_nll, batch_tokens = self.module.eval_loss(self.raw_model, batch.to(self.device))
                nll += batch_nll
                count += batch_tokens
        self.raw_model.train()
        vec = all_reduce_sum(torch.tensor([nll, count], dtype=torch.float64))
        tokens = int(vec[1].item())
        loss = vec[0].item() / tokens if tokens else float("nan")
        self.last_eval = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": tokens}
        return self.last_eval

    # ------------------------------------------------------------------------------------------------ save
    def save_checkpoint(self, wait: bool = True) -> Path:
        """Checkpoint this step (collective: every rank calls it); the path it is written to. wait=False (the
        periodic saves of CheckpointCallback) returns once the state is staged, under checkpoint.async_save,
        while the write goes on in the background (`wait_for_checkpoint`)."""
        # The same answer on every rank (each checks what it holds; sharded ranks agree).
        if not self.strategy.all_finite():
            raise NonFiniteAbort(f"refusing to checkpoint non-finite weights at step {self.step}",
                                 quiet=not self.is_main)
        shared: dict[str, Any] = {
            "trainer": {"step": self.step, "tokens": self.tokens, "nonfinite_total": self.nonfinite_total,
                        "nonfinite_in_row": self.nonfinite_in_row,
                        "wandb_id": self.wandb_id, "global_batch": self.global_batch},
        }
        # The weights and optimizer state, as the strategy keeps them: entries of the shared file, and the
        # DeepSpeed engine or DCP writer that saves the rest (with its size estimate for a full disk's message).
        strategy_shared, strategy_save = self.strategy.save_parts()
        shared.update(strategy_shared)
        per_rank = {"rng": rng_state(), "data": self.loader.state_dict(),
                    "module": self.module.state_dict(self.raw_model)}
        from omegaconf import OmegaConf

        config_yaml = OmegaConf.to_yaml(OmegaConf.create(config_to_dict(self.user_cfg)))
        path = self.ckpt.save(self.step, shared, per_rank, config_yaml, **strategy_save)
        if wait:
            self.ckpt.wait()
        return path

    def wait_for_checkpoint(self) -> None:
        """Return once the checkpoint being written in the background (if any) is on disk; raise its error."""
        self.ckpt.wait()

    def _background_saving(self) -> dict[str, Any]:
        """The checkpoint manager's background writer and its collectives, on a gloo group of their own that
        every rank creates here, in the same order (launch/async_save.py); nothing with checkpoint.async_save off."""
        if not self.cfg.checkpoint.async_save:
            return {}
        from launch.async_save import BackgroundSaver

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"background": BackgroundSaver()}
        group = torch.distributed.new_group(backend="gloo")

        def group_barrier() -> None:
            torch.distributed.barrier(group=group)

        def group_sum(values: list[float]) -> list[float]:
            total = torch.tensor(values, dtype=torch.float64)
            torch.distributed.all_reduce(total, group=group)
            return total.tolist()

        return {"background": BackgroundSaver(), "background_collectives": (group_barrier, group_sum),
                "background_group": group}

    def _all_sum(self, values: list[float]) -> list[float]:
        """`values` summed over the ranks: the checkpoint manager's agreement on a full disk."""
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self._collective_device)).tolist()

    @property
    def global_batch(self) -> int:
        t = self.cfg.trainer
        return t.micro_batch_size * t.grad_accum_steps * self.world

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights in its own shapes (launch.strategies._scalar_params_as_1d)."""
        return self.strategy.model_state_dict()

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to trainer.max_steps or until a callback stops the loop (preemption); the run's summary. A
        Ctrl-C stop raises launch.signals.TrainingInterrupted instead, after the checkpoint.

        The loop alone: everything around it is the callbacks' (launch/callbacks/base.py lists the hooks and
        when they run). Every callback whose on_fit_start ran gets on_fit_end, in reverse order, also when
        something raised (result None then)."""
        result: dict[str, Any] | None = None
        with contextlib.ExitStack() as teardown:
            for callback in self.callbacks:
                callback.on_fit_start(self)
                # Reads `result` when the stack unwinds: the summary after a normal end, None after an error.
                teardown.callback(lambda callback=callback: callback.on_fit_end(self, result))
            for callback in self.callbacks:
                callback.on_loop_start(self)
            while self.step < self.cfg.trainer.max_steps and self.stop_reason is None:
                step_start = time.perf_counter()
                row = self.train_step()
                self.step_time += time.perf_counter() - step_start
                for callback in self.callbacks:
                    callback.on_step_end(self, row)
            for callback in self.callbacks:
                callback.on_loop_end(self)
            if self.stop_reason is None:
                final: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "final": True}
                for callback in self.callbacks:
                    callback.on_train_end(self, final)
            result = {"step": self.step, "tokens": self.tokens, "run_dir": str(self.run_dir),
                      "preempted": self.stop_reason == PREEMPTED, "nonfinite_steps": self.nonfinite_total,
                      **self.last_eval}
        if self.stop_reason == INTERRUPTED:
            # Raised, not returned: a Ctrl-C is not a preemption (exit 130, not 75, and no requeue), and a
            # KeyboardInterrupt is what a caller of fit expects from one. Every rank has saved; the barrier lets
            # close() tear the group down without a peer still inside the save's last collective.
            barrier()
            raise TrainingInterrupted(f"interrupted (Ctrl-C): checkpoint saved at step {self.step} in "
                                      f"{self.run_dir}; run the same command to resume" if self.is_main else "")
        return result

    def request_stop(self, reason: str) -> None:
        """End the loop after the current step (callbacks call this; launch.callbacks.PREEMPTED on preemption).
        A stopped run skips the final checkpoint, evaluation and row: it has not reached max_steps."""
        self.stop_reason = reason

    def take_step_times(self) -> tuple[float, float]:
        """(seconds inside train_step, seconds of those spent fetching data) since the previous call; the
        metrics callback takes them for each row it writes."""
        times = (self.step_time, self.data_time)
        self.step_time = self.data_time = 0.0
        return times

    def close(self, finished: bool = False) -> None:
        """Tear the process group down while Python is fully alive.

        The DDP/DeepSpeed wrappers hold their own reference to the gloo process group. Left to interpreter
        shutdown, the group's C++ worker threads were destroyed after Python had finalised, and about one
        2-rank run in five aborted at exit with "terminate called without an active exception" (exit 250)
        after finishing cleanly. So drop the wrappers, and after a normal finish wait until every rank is done
        before destroying the group, so that no peer is still inside a collective.
        """
        if getattr(self, "ckpt", None) is not None:
            # A checkpoint still being written is finished before anything is torn down. Its error was raised on
            # the normal path already (the callbacks wait); here another error is on its way out, so only say it.
            try:
                self.ckpt.wait()
            except Exception as error:  # noqa: BLE001 - reported, not raised over the error in flight
                self.log(f"the checkpoint being written in the background failed too: {error}")
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if finished:
            barrier()
        if self.heartbeat is not None:
            # After the barrier (a rank stopped before it is still caught), before the group and rank 0's store go.
            self.heartbeat.stop()
        self.strategy.release()
        self.strategy.accelerator = self.accelerator = None
        gc.collect()
        torch.distributed.destroy_process_group()
