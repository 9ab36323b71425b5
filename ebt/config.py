"""`ModelConfig`: every knob of the EBT energy model, its thinking loop and the Transformer++ baseline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ebt.sizes import SIZES

KINDS = ("ebt", "transformer")
VARIANTS = ("default", "time_embed", "adaln")
CHECKPOINTING = ("none", "block", "mcmc_step", "block+mcmc_step", "auto")


@dataclass
class ModelConfig:
    kind: str = "ebt"
    size: str | None = None
    vocab_size: int = 512
    context_length: int = 64
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: float = 1.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # EBT energy model.
    variant: str = "default"
    tie_candidate_embedding: bool = True
    use_context_cache: bool = True
    max_step_embeddings: int = 16  # time_embed/adaln tables; later steps reuse the last entry
    # Thinking loop (MCMC over candidate logits).
    mcmc_steps: int = 2
    alpha_init: float = 500.0
    alpha_min: float = 1e-4
    alpha_lr_mult: float = 1500.0
    # Start of the thinking chains. N(0, 1) starts kept the 4xs quickstart at the noise CE (~ln V + 0.5) for
    # 100+ steps; 0.1 learns like 0 (uniform) while still giving System-2 samples distinct starts.
    init_logit_std: float = 0.1
    langevin_noise_std: float = 0.0
    grad_clamp: float | None = None
    alpha_jitter: float = 0.0  # per-token alpha scale ~ U(1 - j, 1 + j) in training
    random_steps_min: int | None = None  # training draws K ~ U{random_steps_min..mcmc_steps} per batch
    truncate: bool = False  # second-order graph only on the last step; loss on the last step only
    # Losses.
    ignore_index: int = -100
    label_smoothing_start: float = 0.0
    label_smoothing_end: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_margin: float = 1.0
    replay_capacity: int = 0  # sequences kept in the replay buffer (0 disables it)
    replay_fraction: float = 0.0  # share of each training batch continued from the buffer
    # Memory (ebt.checkpointing): none | block | mcmc_step | block+mcmc_step | auto. Gradients are identical
    # under every policy; auto asks ebt.planner for the fastest one whose predicted peak fits memory_budget_gb
    # (None: the device's capacity minus a margin).
    checkpointing: str = "none"
    memory_budget_gb: float | None = None
    # "mcmc_step" recomputes each step's second-order graph for this many sequences at a time (0: the whole
    # micro-batch); smaller chunks lower the peak, results are unchanged.
    remat_chunk: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(round(self.dim * self.ffn_mult))

    @property
    def caches_context(self) -> bool:
        """Whether the real stream can be computed once and shared by every MCMC step."""
        return self.kind == "ebt" and self.use_context_cache and self.variant != "time_embed"

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: unknown EBT variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size: unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        for name in ("vocab_size", "context_length", "dim", "n_layers", "n_heads", "max_step_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.mcmc_steps < 1:
            raise ValueError(f"mcmc_steps: must be >= 1, got {self.mcmc_steps}")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"dim: {self.dim} must split into {self.n_heads} heads of even width")
        if self.random_steps_min is not None and not 1 <= self.random_steps_min <= self.mcmc_steps:
            raise ValueError(f"random_steps_min: must lie in 1..mcmc_steps={self.mcmc_steps}")
        if not 0.0 <= self.alpha_jitter < 1.0:
            raise ValueError(f"alpha_jitter: must lie in [0, 1), got {self.alpha_jitter}")
        if self.alpha_init <= self.alpha_min:
            raise ValueError(f"alpha_init: must exceed alpha_min={self.alpha_min}, got {self.alpha_init}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing: unknown policy {self.checkpointing!r}; expected one of "
                             f"{', '.join(CHECKPOINTING)}")
        if self.remat_chunk < 0:
            raise ValueError(f"remat_chunk: must be >= 0 (0: whole micro-batch), got {self.remat_chunk}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"memory_budget_gb: must be > 0, got {self.memory_budget_gb}")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction: must lie in [0, 1], got {self.replay_fraction}")

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> ModelConfig:
        if size not in SIZES:
            raise ValueError(f"size: unknown size {size!r}; expected one of {', '.join(SIZES)}")
        spec = SIZES[size]
        fields = {"size": size, "n_layers": spec.n_layers, "n_heads": spec.n_heads, "dim": spec.dim}
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
