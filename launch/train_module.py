"""What differs per model kind: the loss call, the metrics it reports, extra state, and what it can't run on.

The Trainer owns the loop, parallelism and bookkeeping; a TrainModule only knows its model. For both kinds one
call of the (possibly DDP/DeepSpeed-wrapped) module computes the whole loss: for an EBT that call runs every
MCMC step, with the inner `autograd.grad(create_graph=True)` w.r.t. the candidates inside it, so the trainer's
single backward afterwards carries the second-order terms and DDP reduces each gradient exactly once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ebt import ModelConfig
from ebt.flops import train_flops_per_token


class TrainModule:
    kind = "base"
    # Per-step training values that exact resume must reproduce bit for bit.
    metric_keys: tuple[str, ...] = ("loss", "ppl")

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.model_cfg = model_cfg

    def loss(self, wrapped: nn.Module, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        loss, metrics = wrapped(tokens, **kwargs)
        return loss, metrics

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, tokens: torch.Tensor) -> float:
        loss, _ = model.loss(tokens)
        return float(loss)

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

    @property
    def metric_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        steps = tuple(f"ce_step_{k}" for k in range(self.model_cfg.mcmc_steps))
        return ("loss", "ppl", "alpha", "energy_gap") + steps

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, tokens: torch.Tensor) -> float:
        # Validation reports the final-step CE (what generation would use), not the mean over steps. The MCMC
        # loop turns gradients on for the candidates itself; no_grad only drops the parameter graph.
        _, metrics = model.loss(tokens)
        return float(metrics.get("ce", metrics["loss"]))

    def state_dict(self, model: nn.Module) -> dict:
        buffer = getattr(model, "replay_buffer", None)
        return {"replay_buffer": buffer.state_dict() if buffer is not None else None}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        buffer = getattr(model, "replay_buffer", None)
        saved = state.get("replay_buffer")
        if buffer is not None and saved is not None:
            buffer.load_state_dict(saved)


def make_train_module(model_cfg: ModelConfig) -> TrainModule:
    if model_cfg.kind == "ebt":
        return EBTTrainModule(model_cfg)
    return TransformerTrainModule(model_cfg)
