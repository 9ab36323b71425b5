"""Exact per-token perplexity: the summed token NLL over the token count, never a mean of batch means.

A mean of batch means weights the short last batch like a full one; with a 2-window tail on a 100-window
split that is a visible bias. Sums are kept in float64 so a long split does not lose the low digits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class TokenNLL:
    """Summed NLL and count over the targets that are not `ignore_index` (the models' own loss definition,
    so this agrees with the trainer's token-weighted val_loss)."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.nll_sum = 0.0
        self.tokens = 0
        self.ignore_index = ignore_index

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [B, S, V] (unnormalised), targets [B, S]."""
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
                              ignore_index=self.ignore_index, reduction="sum")
        self.nll_sum += float(nll)
        self.tokens += int((targets != self.ignore_index).sum())

    @property
    def loss(self) -> float:
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated (the data split yielded no full window)")
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))


class EnergySums:
    """Per-step energy sums of the chosen chains over all tokens (exact per-token means, like TokenNLL)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.tokens = 0

    def add(self, mean_per_step: torch.Tensor, tokens: int) -> None:
        values = mean_per_step.detach().double() * tokens
        self.sums = values if self.sums is None else self.sums + values
        self.tokens += tokens

    def means(self) -> list[float]:
        return [] if self.sums is None else (self.sums / max(self.tokens, 1)).tolist()
