"""How a checkpoint thinks when it scores or generates text, in tensors (no tokenizer): the Thinking settings,
the prompt-keyed sampling seed and the --device check. The chains' starts are ebt/starts.py's prefix-keyed draw
(what `think` and `generate` use by default).

launch/textgen.py puts the tokenizer around these for `ebt generate`, and eval/scoring.py's `Scorer` (the
log-likelihoods of `ebt eval --task` and the lm-eval adapter) builds on that; both sit above the model, so
everything here is model-side and imports nothing above ebt/.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ebt.inference import SELECTIONS


def check_device(option: str, name: str) -> str:
    """A --device value torch can use here, else a ValueError naming it (torch would raise a multi-line error
    from deep inside the model's .to())."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: no CUDA device is available here (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return name


@dataclass(frozen=True)
class Thinking:
    """How an EBT predicts: thinking steps (None: the trained ones, ModelConfig.eval_steps), chains per token,
    their selection, and the seed of their starts."""

    steps: int | None = None  # None: model_cfg.eval_steps
    samples: int = 1
    selection: str = "min"
    seed: int = 0

    def validate(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"steps: must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples: must be an integer >= 1, got {self.samples!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: unknown selection {self.selection!r}; expected one of "
                             f"{', '.join(SELECTIONS)}")

    def steps_for(self, model_cfg) -> int:
        """The thinking steps a model of model_cfg runs: these, else the trained ones; 0 for a Transformer++."""
        if model_cfg.kind != "ebt":
            return 0
        return self.steps if self.steps is not None else model_cfg.thinking.eval_steps


def prompt_seed(prompt: Sequence[int], seed: int) -> int:
    """A sampling seed keyed by (seed, the prompt's tokens), so a prompt's sampled answer does not depend on
    which requests came before it (the starts are keyed by the prefix already)."""
    key = f"ebt-generate:{seed}".encode()
    digest = hashlib.blake2b(torch.tensor(prompt).numpy().tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") >> 1
