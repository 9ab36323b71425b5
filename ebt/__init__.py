"""Energy-Based Transformers (arXiv:2507.02092) and a Transformer++ baseline.

Public API (kept stable; outside checks use it):
    from ebt import ModelConfig, build_model
    model = build_model(cfg)            # cfg.kind == "ebt" or "transformer"
    loss, metrics = model.loss(tokens)  # tokens [B, S+1]; inputs tokens[:, :-1], targets tokens[:, 1:]
    model.energies(tokens, candidate_probs, step=0)  # EBT only: [B, S] energies of [B, S, V] candidates

EBT `loss` also accepts `init_logits` [B, S, V] (the thinking loop's start); by default it draws N(0,
init_logit_std) noise from the global torch RNG. Pass explicit starts when comparing runs that split a batch
differently (2-rank parity), and `draws` (ebt.draws.Draws) for every other random number (Langevin noise,
per-token step sizes, repeated landscapes, replay picks). Metrics are 0-d tensors on the model's device (no
host sync inside a step; `float()` them to report). Under DDP call the wrapped module once per backward:
forward == loss, except that a non-finite inner gradient is reported as metrics["nonfinite"] (a device flag)
instead of raising NonFiniteEnergyGradientError, so a training step needs no host read to decide.
Activation checkpointing is applied from outside, after `build_model`: `apply_checkpointing(model, policy,
remat_chunk)` (ebt.checkpointing; `ebt train` takes the policy from trainer.checkpointing). benchmarks.experimental
holds the measured alternatives (compiled inner gradient, attention implementations, step runners), not the default.
The options of the thinking loop reproduce the authors' code flag by flag (ebt.config;
docs/reference-differences.md; ebt.convert loads their weights).
"""

from __future__ import annotations

from torch import nn

from ebt.config import ModelConfig
from ebt.inference import ThinkResult, generate, think
from ebt.mcmc import NonFiniteEnergyGradientError
from ebt.model import EnergyBasedTransformer
from ebt.sizes import SIZES
from ebt.transformer import TransformerPlusPlus


def build_model(cfg: ModelConfig) -> nn.Module:
    cfg.validate()
    if cfg.kind == "ebt":
        return EnergyBasedTransformer(cfg)
    return TransformerPlusPlus(cfg)


__all__ = [
    "SIZES",
    "EnergyBasedTransformer",
    "ModelConfig",
    "NonFiniteEnergyGradientError",
    "ThinkResult",
    "TransformerPlusPlus",
    "build_model",
    "generate",
    "think",
]
