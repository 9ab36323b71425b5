"""Learning-rate schedule: linear warm-up, then cosine decay to peak * min_lr_scale."""

from __future__ import annotations

import math


class WarmupCosine:
    """Multiplier of each group's peak LR at optimizer step `step` (0-based), for torch's LambdaLR.

    A class rather than a closure so LambdaLR can put it in its state_dict, and so tests can call it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_scale: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_scale = min_lr_scale

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_scale + (1.0 - self.min_lr_scale) * cosine
