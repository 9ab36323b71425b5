"""Tiny fp64 models with non-trivial weights, for exact tests."""

from __future__ import annotations

import math

import torch
from model_configs import model_config

from ebt import build_model
from ebt.checkpointing import apply_checkpointing


def tiny_model(seed: int = 0, checkpointing: str = "none", remat_chunk: int = 0, **overrides) -> torch.nn.Module:
    """`overrides`: flat model keys (model_configs.model_config); the memory policy is applied from outside, as
    the trainer does."""
    fields = dict(vocab_size=11, context_length=8, dim=8, n_layers=2, n_heads=2, alpha_init=3.0, max_step_embeddings=4)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = build_model(model_config(**fields)).double()
    if model.cfg.kind == "ebt":
        apply_checkpointing(model, checkpointing, remat_chunk)
    # Break the default init's symmetries (unit norms, zero adaLN) so every parameter matters in the checks.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "alpha" not in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf
