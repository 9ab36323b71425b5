"""`ModelConfig`: every knob of the EBT energy model, its thinking loop and the Transformer++ baseline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ebt.sizes import SIZES

KINDS = ("ebt", "transformer")
VARIANTS = ("default", "time_embed", "adaln")
INIT_SCHEMES = ("reference", "scaled_normal")
UPDATE_SPACES = ("probs", "logits")
NORMALIZE_MODES = ("every_step", "first_step", "none")
LANGEVIN_PLACEMENTS = ("input", "after_update")
GRAD_CLAMP_MODES = ("max_change", "absolute")
CONTRASTIVE_FORMS = ("softmax", "margin")
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
    # Weight init: "reference" = the authors' (xavier-normal on every linear, N(0, 1) embeddings, norms at one;
    # reference flag weight_initialization_method=xavier); "scaled_normal" = GPT-2/Llama style N(0, init_std)
    # with residual outputs scaled by 1/sqrt(2 n_layers).
    init_scheme: str = "reference"
    # ---- EBT energy model ----
    variant: str = "default"  # default | time_embed | adaln  [ebt_type]
    # Candidate projection: untied Linear(V, D) as in the reference (vocab_to_embed), which also gives EBT and
    # Transformer++ equal parameter counts; True ties it to the token embedding
    # [vocab_to_embed_uses_prob_dist].
    tie_candidate_embedding: bool = False
    use_context_cache: bool = True  # share the real stream across steps where the variant allows (same math)
    # adaln: the reference modulates every position (both streams) with gated adaLN plus a modulated final
    # layer; False modulates only the candidate stream, so the real stream is step-free and cached (this
    # project's variant, same parameters).
    adaln_real_stream: bool = True
    # Rows of the time_embed/adaln step tables; None: mcmc_steps, as in the reference. Steps beyond the trained
    # ones (System-2 inference) reuse the last trained landscape, never an untrained row.
    max_step_embeddings: int | None = None
    # ---- Thinking loop (MCMC over candidates); the reference flag each option reproduces is in brackets ----
    mcmc_steps: int = 2  # energy landscapes (steps before repeats)  [mcmc_num_steps]
    alpha_init: float = 500.0  # [mcmc_step_size]
    alpha_min: float = 1e-4  # alpha is clamped below at this value (the reference's 0.0001)
    alpha_lr_mult: float = 1500.0  # [mcmc_step_size_lr_multiplier]
    # What a step descends: "probs" = y <- phi(y) - alpha * dE/dphi(y), the result reused as logits (reference,
    # ebt.py: the gradient w.r.t. the softmaxed candidate); "logits" = y <- y - alpha * dE/dy through phi.
    update_space: str = "probs"
    # phi, the map from the chain's state to the candidate the energy reads: softmax at every step
    # ("every_step"), at the first step only ("first_step"), or never ("none", the raw state is embedded)
    # [normalize_initial_condition, normalize_initial_condition_only_first_step].
    normalize: str = "every_step"
    # Detach the chain before every step, so each step's second-order terms stay within that step (reference
    # default; S2 passes --no_mcmc_detach, i.e. False).
    detach_steps: bool = True
    # Start of the chains: y_0 ~ N(0, init_logit_std^2); 0 gives zeros [denoising_initial_condition
    # random_noise | zeros, gaussian_random_noise_scaling].
    init_logit_std: float = 1.0
    # Langevin noise std [langevin_dynamics_noise]; "input" adds it to each step's input before phi and the
    # energy (reference); "after_update" adds it to each step's output (this project's earlier choice, whose
    # last draw reaches the loss unseen by the energy).
    langevin_noise_std: float = 0.0
    langevin_placement: str = "input"
    # The reference adds the noise in validation too (its noise is not gated by the phase); by default this
    # project validates noise-free, so val_loss is deterministic.
    langevin_in_eval: bool = False
    # A learnable noise std (a parameter with the base LR) [langevin_dynamics_noise_learnable]; the reference
    # turns learning on only after warm-up, here it learns from the first step.
    langevin_learnable: bool = False
    # Inner-gradient clamp [clamp_futures_grad, clamp_futures_grad_max_change]: "max_change" clamps dE/dy at
    # grad_clamp / alpha (so alpha * grad moves a candidate by at most grad_clamp, reference); "absolute"
    # clamps at grad_clamp itself.
    grad_clamp: float | None = None
    grad_clamp_mode: str = "max_change"
    candidate_clamp: float = 0.0  # clamp the chain's state to [-c, c] after each step (0: off)  [absolute_clamp]
    # Per-token alpha ~ U[alpha / s, alpha * s] in training, s = alpha_random_scale (1: off)
    # [randomize_mcmc_step_size_scale]; alpha_jitter j: alpha * U(1 - j, 1 + j) (this project's form).
    alpha_random_scale: float = 1.0
    alpha_jitter: float = 0.0
    # Repeated landscapes [randomize_mcmc_num_steps R, randomize_mcmc_num_steps_min m,
    # randomize_mcmc_num_steps_final_landscape]: in training each landscape (or only the last) runs
    # r ~ U{max(m, 1)..R + 1} steps; in evaluation the last landscape runs R + 1 steps. 0: off.
    landscape_repeats: int = 0
    landscape_repeats_min: int = 0
    landscape_repeats_final_only: bool = False
    random_steps_min: int | None = None  # this project's form: K ~ U{random_steps_min..mcmc_steps} per batch
    # Second-order graph only on the last step, and the loss on the last step only [truncate_mcmc]. Earlier
    # steps still pass gradient to alpha and the chain unless detach_steps.
    truncate: bool = False
    # ---- Losses ----
    ignore_index: int = -100
    label_smoothing_start: float = 0.0  # per-step label smoothing, linear from the first step to the last
    label_smoothing_end: float = 0.0  # (the reference's soften_target_prob_dist s is start=s, end=0)
    # Contrastive energy term [contrastive_loss, contrastive_loss_coeff]: "softmax" = CE over
    # -[E(true one-hot), E(last step's candidate)] (reference); "margin" = a hinge with contrastive_margin.
    contrastive_weight: float = 0.0
    contrastive_form: str = "softmax"
    contrastive_margin: float = 1.0
    # Replay buffer [mcmc_replay_buffer, mcmc_replay_buffer_size, mcmc_replay_buffer_sample_bs_percent]: each
    # training batch is extended by int(replay_fraction * batch) buffered sequences that continue from their
    # stored final candidates; only fresh sequences are pushed.
    replay_capacity: int = 0  # sequences kept (0 disables it; the reference keeps 192)
    replay_fraction: float = 0.0
    # Memory (ebt.checkpointing): none | block | mcmc_step | block+mcmc_step | auto. Gradients are identical
    # under every policy; auto asks planning/ (resolved by launch before the model is built) for the fastest one
    # whose predicted peak fits memory_budget_gb
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
        step_free = self.variant == "default" or (self.variant == "adaln" and not self.adaln_real_stream)
        return self.kind == "ebt" and self.use_context_cache and step_free

    @property
    def step_table_rows(self) -> int:
        return self.mcmc_steps if self.max_step_embeddings is None else self.max_step_embeddings

    @property
    def eval_steps(self) -> int:
        """Steps an evaluation forward runs (the System-1 setting): the last landscape runs landscape_repeats + 1."""
        return self.mcmc_steps + self.landscape_repeats

    @property
    def max_executed_steps(self) -> int:
        """Steps a training forward can run: every landscape repeated up to landscape_repeats + 1 times."""
        if self.landscape_repeats == 0:
            return self.mcmc_steps
        repeated = 1 if self.landscape_repeats_final_only else self.mcmc_steps
        return self.mcmc_steps + repeated * self.landscape_repeats

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: unknown EBT variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size: unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        for name in ("vocab_size", "context_length", "dim", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name, value, choices in (
            ("init_scheme", self.init_scheme, INIT_SCHEMES),
            ("update_space", self.update_space, UPDATE_SPACES),
            ("normalize", self.normalize, NORMALIZE_MODES),
            ("langevin_placement", self.langevin_placement, LANGEVIN_PLACEMENTS),
            ("grad_clamp_mode", self.grad_clamp_mode, GRAD_CLAMP_MODES),
            ("contrastive_form", self.contrastive_form, CONTRASTIVE_FORMS),
        ):
            if value not in choices:
                raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(choices)}")
        if self.mcmc_steps < 1:
            raise ValueError(f"mcmc_steps: must be >= 1, got {self.mcmc_steps}")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"dim: {self.dim} must split into {self.n_heads} heads of even width")
        if self.max_step_embeddings is not None and self.max_step_embeddings < self.mcmc_steps:
            raise ValueError(f"max_step_embeddings: must be >= mcmc_steps={self.mcmc_steps} (or null), got "
                             f"{self.max_step_embeddings}")
        if self.alpha_random_scale < 1.0:
            raise ValueError(f"alpha_random_scale: must be >= 1 (1: off), got {self.alpha_random_scale}")
        if self.landscape_repeats < 0 or self.landscape_repeats_min < 0:
            raise ValueError("landscape_repeats: must be >= 0 (landscape_repeats_min too)")
        if self.landscape_repeats and self.landscape_repeats_min > self.landscape_repeats + 1:
            raise ValueError(f"landscape_repeats_min: must be <= landscape_repeats + 1 = {self.landscape_repeats + 1}")
        if self.landscape_repeats and self.random_steps_min is not None:
            raise ValueError("random_steps_min: cannot be combined with landscape_repeats (two step-count schemes)")
        if self.langevin_noise_std < 0 or (self.langevin_learnable and self.langevin_noise_std <= 0):
            raise ValueError(f"langevin_noise_std: must be >= 0 (> 0 when learnable), got {self.langevin_noise_std}")
        if self.grad_clamp is not None and not self.grad_clamp > 0:
            raise ValueError(f"grad_clamp: must be > 0 (or null), got {self.grad_clamp}")
        if self.candidate_clamp < 0:
            raise ValueError(f"candidate_clamp: must be >= 0 (0: off), got {self.candidate_clamp}")
        if self.init_logit_std < 0:
            raise ValueError(f"init_logit_std: must be >= 0, got {self.init_logit_std}")
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
