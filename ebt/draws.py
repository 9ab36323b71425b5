"""Every random number a training forward of the EBT consumes, by name.

The default draws from torch's global RNG, as the reference does. Because each draw is named, a parity test can
hand the model exactly the numbers another implementation drew (tests/ebt/test_reference_parity.py records the
reference's), and a caller can make them deterministic without seeding the process. The keyed starts that training,
evaluation and generation use are ebt/starts.py's.
"""

from __future__ import annotations

import torch


class Draws:
    def starts(self, shape: tuple[int, ...], like: torch.Tensor, std: float) -> torch.Tensor:
        """The chains' initial logits, N(0, std^2), when the caller passes none (the reference's draw; what the
        project runs passes ebt.starts' keyed ones)."""
        return torch.randn(shape, dtype=like.dtype, device=like.device) * std

    def alpha_uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """U[0, 1) per token, for the randomised step size."""
        return torch.rand(shape, dtype=like.dtype, device=like.device)

    def langevin(self, executed_step: int, like: torch.Tensor) -> torch.Tensor:
        """N(0, 1) noise of a step's state's shape."""
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)

    def repeats(self, landscape: int, low: int, high: int) -> int:
        """Steps on one landscape, uniform on low..high (inclusive)."""
        return int(torch.randint(low, high + 1, ()).item())

    def step_count(self, low: int, high: int) -> int:
        """The project's random step count K, uniform on low..high (inclusive)."""
        return int(torch.randint(low, high + 1, ()).item())

    def replay_indices(self, size: int, count: int) -> list[int] | None:
        """Which buffered sequences to replay (0 = oldest); None: the buffer's own checkpointed generator."""
        return None
