"""What differs per model kind: the loss call, the metrics it reports, extra state, and what it can't run on.

The Trainer owns the loop and bookkeeping, its Strategy (launch/strategies.py) the parallelism; a TrainModule
only knows its model. For both kinds one call of the (possibly DDP/DeepSpeed-wrapped) module computes the whole
loss: for an EBT that call runs every MCMC step, with the inner `autograd.grad(create_graph=True)` w.r.t. the
candidates inside it, so the trainer's single backward afterwards carries the second-order terms and DDP reduces
each gradient exactly once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ebt import ModelConfig
from ebt.flops import train_flops_per_token

# The keyed starts live below the launcher (ebt/starts.py), shared with System 2 and `ebt eval`.
from ebt.starts import EVAL_START_SEED, eval_starts, sequence_keyed_starts


class TrainModule:
    kind = "base"
    # Per-step training values that exact resume must reproduce bit for bit.
    metric_keys: tuple[str, ...] = ("loss", "ppl")

    def __init__(self, model_cfg: ModelConfig, seed: int = 0) -> None:
        self.model_cfg = model_cfg
        self.seed = seed

    def loss(self, wrapped: nn.Module, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        kwargs.pop("step", None)  # the training step: only kinds with per-sequence noise use it
        loss, metrics = wrapped(tokens, **kwargs)
        return loss, metrics

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, tokens: torch.Tensor) -> tuple[float, int]:
        """(summed NLL, token count) of tokens [B, S+1] over the targets that are not ignore_index.

        A sum and a count, so that validation can be token-weighted across batches and ranks (a mean of
        batch means weighs a short tail batch like a full one). The model's mean CE is over the same
        targets, so mean x count is the sum."""
        count = self._targets(tokens)
        if count == 0:
            return 0.0, 0
        loss, _ = model.loss(tokens)
        return float(loss) * count, count

    def _targets(self, tokens: torch.Tensor) -> int:
        return int((tokens[:, 1:] != self.model_cfg.loss.ignore_index).sum())

    def flops_per_token(self) -> float:
        return train_flops_per_token(self.model_cfg)

    def state_dict(self, model: nn.Module) -> dict:
        return {}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        return None


class TransformerTrainModule(TrainModule):
    kind = "transformer"


class EBTTrainModule(TrainModule):
    kind = "ebt"

    def loss(self, wrapped: nn.Module, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        step = kwargs.pop("step", None)
        cfg = self.model_cfg
        if step is not None and "init_logits" not in kwargs and cfg.thinking.init_logit_std > 0:
            kwargs["init_logits"] = sequence_keyed_starts(tokens, self.seed, step, cfg.architecture.vocab_size,
                                                          cfg.thinking.init_logit_std, torch.float32)
        return super().loss(wrapped, tokens, **kwargs)

    @property
    def metric_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        # Every step a forward can run (repeated landscapes add steps); rows omit those no micro-batch ran.
        steps = tuple(f"ce_step_{k}" for k in range(self.model_cfg.thinking.max_executed_steps))
        return ("loss", "ppl", "alpha", "energy_gap") + steps

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, tokens: torch.Tensor) -> tuple[float, int]:
        # Validation reports the final-step CE (what generation would use), not the mean over steps. The MCMC
        # loop turns gradients on for the candidates itself; no_grad only drops the parameter graph. Starts
        # are keyed by sequence (eval_starts), so a sequence's loss does not depend on its rank or batch.
        cfg = self.model_cfg
        count = self._targets(tokens)
        if count == 0:
            return 0.0, 0
        dtype = model.alpha_raw.dtype
        if cfg.thinking.init_logit_std > 0:
            starts = eval_starts(tokens, EVAL_START_SEED, 0, cfg.architecture.vocab_size, cfg.thinking.init_logit_std,
                                 dtype)
        else:  # zeros, as the model would draw them, without touching any RNG stream (CUDA's included)
            starts = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, cfg.architecture.vocab_size, dtype=dtype,
                                 device=tokens.device)
        _, metrics = model.loss(tokens, init_logits=starts)
        return float(metrics.get("ce", metrics["loss"])) * count, count

    def state_dict(self, model: nn.Module) -> dict:
        buffer = getattr(model, "replay_buffer", None)
        return {"replay_buffer": buffer.state_dict() if buffer is not None else None}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        buffer = getattr(model, "replay_buffer", None)
        saved = state.get("replay_buffer")
        if buffer is not None and saved is not None:
            buffer.load_state_dict(saved)


def make_train_module(model_cfg: ModelConfig, seed: int = 0) -> TrainModule:
    if model_cfg.kind == "ebt":
        return EBTTrainModule(model_cfg, seed)
    return TransformerTrainModule(model_cfg, seed)
