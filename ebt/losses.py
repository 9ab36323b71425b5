"""Losses on a thinking trajectory: cross-entropy after every MCMC step, averaged (or the last step only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothing_schedule(start: float, end: float, steps: int) -> list[float]:
    """Label smoothing per MCMC step, linear from `start` (first step) to `end` (last step)."""
    if steps == 1:
        return [end]
    return [start + (end - start) * k / (steps - 1) for k in range(steps)]


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean CE over the non-ignored tokens of logits [B, S, V] against targets [B, S]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # low-precision log-softmax over a large vocabulary loses the loss
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def contrastive_energy_loss(
    true_energy: torch.Tensor, predicted_energy: torch.Tensor, mask: torch.Tensor, margin: float
) -> torch.Tensor:
    """Hinge pushing the energy of the observed token below the (detached) energy of the final candidate."""
    hinge = torch.relu(margin + true_energy - predicted_energy.detach())
    return (hinge * mask).sum() / mask.sum().clamp(min=1)


def contrastive_softmax_loss(
    true_energy: torch.Tensor, predicted_energy: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The reference's contrastive term: a 2-way CE over -[E_true, E_predicted] with the true candidate as the
    class, averaged over the non-ignored tokens (mask [B, S] bool)."""
    scores = -torch.stack((true_energy, predicted_energy), dim=-1).reshape(-1, 2)
    labels = torch.where(mask.reshape(-1), 0, -100)
    return F.cross_entropy(scores, labels, ignore_index=-100)
