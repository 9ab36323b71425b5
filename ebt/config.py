"""`ModelConfig`: the EBT energy model and the Transformer++ baseline, in sections.

    model:
      kind: ebt            # ebt | transformer
      size: 4xs            # the size table's n_layers / n_heads / dim (explicit architecture keys win)
      architecture: {...}  # ArchitectureConfig: the network both kinds share, plus the EBT's energy variant
      thinking: {...}      # ThinkingConfig: the MCMC loop over candidates (EBT only)
      loss: {...}          # LossConfig: what training minimises
      replay: {...}        # ReplayConfig: the replay buffer of finished chains (EBT only)
      parametrization: sp  # sp | mup: how initialisation, LRs and multipliers scale with width
      mup: {...}           # MupConfig: mup's base width and readout multiplier

How a step is computed in memory (activation checkpointing, its recompute chunk, the memory budget) is not the
model's business: those knobs live in the trainer's config (launch/config.py TrainerConfig) and are applied from
outside (ebt.checkpointing.apply_checkpointing). A flat key of the earlier single-level config (`mcmc_steps`) is
refused with one line naming its new place (`model.thinking.mcmc_steps`): MOVED_KEYS.

The reference flag each option reproduces is in brackets (docs/reference-differences.md has the table).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
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
PARAMETRIZATIONS = ("sp", "mup")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(choices)}")


@dataclass
class ArchitectureConfig:
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
    # ---- the EBT's energy network ----
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
    # Rows of the time_embed/adaln step tables; None: thinking.mcmc_steps, as in the reference. Steps beyond the
    # trained ones (System-2 inference) reuse the last trained landscape, never an untrained row.
    max_step_embeddings: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(round(self.dim * self.ffn_mult))

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "dim", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("init_scheme", self.init_scheme, INIT_SCHEMES)
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"dim: {self.dim} must split into {self.n_heads} heads of even width")


@dataclass
class ThinkingConfig:
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
        for name, value, choices in (
            ("update_space", self.update_space, UPDATE_SPACES),
            ("normalize", self.normalize, NORMALIZE_MODES),
            ("langevin_placement", self.langevin_placement, LANGEVIN_PLACEMENTS),
            ("grad_clamp_mode", self.grad_clamp_mode, GRAD_CLAMP_MODES),
        ):
            _check_choice(name, value, choices)
        if self.mcmc_steps < 1:
            raise ValueError(f"mcmc_steps: must be >= 1, got {self.mcmc_steps}")
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


@dataclass
class LossConfig:
    ignore_index: int = -100
    label_smoothing_start: float = 0.0  # per-step label smoothing, linear from the first step to the last
    label_smoothing_end: float = 0.0  # (the reference's soften_target_prob_dist s is start=s, end=0)
    # Contrastive energy term [contrastive_loss, contrastive_loss_coeff]: "softmax" = CE over
    # -[E(true one-hot), E(last step's candidate)] (reference); "margin" = a hinge with contrastive_margin.
    contrastive_weight: float = 0.0
    contrastive_form: str = "softmax"
    contrastive_margin: float = 1.0

    def validate(self) -> None:
        _check_choice("contrastive_form", self.contrastive_form, CONTRASTIVE_FORMS)


@dataclass
class ReplayConfig:
    """[mcmc_replay_buffer, mcmc_replay_buffer_size, mcmc_replay_buffer_sample_bs_percent]: each training batch is
    extended by int(fraction * batch) buffered sequences that continue from their stored final candidates; only
    fresh sequences are pushed."""

    capacity: int = 0  # sequences kept (0 disables it; the reference keeps 192)
    fraction: float = 0.0
    # 0: keep each chain's whole final logits [S, V] (reference); k > 0: its top-k logits, their indices and the
    # tail's level, so the buffer (and every checkpoint) does not grow with the vocabulary (ebt/replay.py).
    # Measured on the quickstart (1 thread, 300 steps): k = 64 gives checkpoints of 26 MB instead of 265 MB but val
    # ppl 258.8 instead of 213.2 (early chains are flat, and the tail's shape is what they carry), so whole
    # logits stay the default; k pays where the buffer would not fit (the ladder's vocabulary: 17 GB per rank).
    top_k: int = 0

    def validate(self) -> None:
        if self.capacity < 0:
            raise ValueError(f"capacity: must be >= 0 (0: off), got {self.capacity}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0: whole logits), got {self.top_k}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction: must lie in [0, 1], got {self.fraction}")


@dataclass
class MupConfig:
    """The base shapes of `parametrization: mup` (ebt/parametrization.py says what scales with what, and why).

    At dim == base_dim (and head_dim == base_head_dim) μP is SP: same initialisation, same updates."""

    base_dim: int = 128  # the width whose tuned hyperparameters transfer (the small proxy model's dim)
    base_head_dim: int | None = None  # None: the model's own head_dim (widths grow by adding heads)
    output_mult: float = 1.0  # the readout's multiplier at the base width (energy head, Transformer++ logits)
    # alpha (the MCMC step size) x (dim / base_dim) ** alpha_width_exponent at init. 0 is what the derivation
    # in ebt/parametrization.py gives; the knob exists to test it (benchmarks/coord_check.py).
    alpha_width_exponent: float = 0.0

    def validate(self) -> None:
        if self.base_dim < 1:
            raise ValueError(f"base_dim: must be >= 1, got {self.base_dim}")
        if self.base_head_dim is not None and (self.base_head_dim < 2 or self.base_head_dim % 2
                                               or self.base_dim % self.base_head_dim):
            raise ValueError(f"base_head_dim: must be even and divide base_dim={self.base_dim}, "
                             f"got {self.base_head_dim}")
        if not self.output_mult > 0:
            raise ValueError(f"output_mult: must be > 0, got {self.output_mult}")


# The sections of the earlier flat config (MOVED_KEYS maps their keys), then the ones added since.
FLAT_ERA_SECTIONS: dict[str, type] = {"architecture": ArchitectureConfig, "thinking": ThinkingConfig,
                                      "loss": LossConfig, "replay": ReplayConfig}
SECTIONS: dict[str, type] = {**FLAT_ERA_SECTIONS, "mup": MupConfig}

# Where each key of the earlier flat `model:` section lives now (dotted from the top of a training config), so a
# flat key is refused with one line naming its new place. The memory knobs left the model for the trainer.
MOVED_KEYS: dict[str, str] = {
    **{f.name: f"model.{section}.{f.name}" for section, cls in FLAT_ERA_SECTIONS.items()
       for f in dataclasses.fields(cls)},
    "replay_capacity": "model.replay.capacity",
    "replay_fraction": "model.replay.fraction",
    "checkpointing": "trainer.checkpointing",
    "remat_chunk": "trainer.remat_chunk",
    "memory_budget_gb": "trainer.memory_budget_gb",
}
del MOVED_KEYS["capacity"], MOVED_KEYS["fraction"], MOVED_KEYS["top_k"]  # never flat keys


def moved_key_message(key: str, prefix: str = "model.") -> str | None:
    """One line for a flat key of the earlier config (None when `key` never was one)."""
    new = MOVED_KEYS.get(key)
    return None if new is None else f"config key '{prefix}{key}' has moved: it is now '{new}'"


@dataclass
class ModelConfig:
    kind: str = "ebt"
    size: str | None = None
    # "sp": the standard parametrization (the reference's); "mup": μP relative to the `mup` section's base
    # width (ebt/parametrization.py), so hyperparameters tuned at the base width transfer to wider models.
    parametrization: str = "sp"
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    thinking: ThinkingConfig = field(default_factory=ThinkingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    mup: MupConfig = field(default_factory=MupConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def caches_context(self) -> bool:
        """Whether the real stream can be computed once and shared by every MCMC step."""
        arch = self.architecture
        step_free = arch.variant == "default" or (arch.variant == "adaln" and not arch.adaln_real_stream)
        return self.kind == "ebt" and arch.use_context_cache and step_free

    @property
    def step_table_rows(self) -> int:
        rows = self.architecture.max_step_embeddings
        return self.thinking.mcmc_steps if rows is None else rows

    def validate(self) -> None:
        """Every section's checks; a failure is one `ValueError` line naming the key (`thinking.mcmc_steps: ...`)."""
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size: unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise ValueError(f"{name}: expected a {cls.__name__}, got {type(section).__name__}")
            try:
                section.validate()
            except ValueError as error:
                raise ValueError(f"{name}.{error}") from None
        _check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        if self.parametrization == "mup":
            base_head = self.mup.base_head_dim or self.architecture.head_dim
            if self.mup.base_dim % base_head:
                raise ValueError(f"mup.base_dim: {self.mup.base_dim} must split into heads of base_head_dim="
                                 f"{base_head}")
        if self.replay.top_k >= self.architecture.vocab_size:
            raise ValueError(f"replay.top_k: must be below architecture.vocab_size={self.architecture.vocab_size} "
                             f"(0: whole logits), got {self.replay.top_k}")
        rows, steps = self.architecture.max_step_embeddings, self.thinking.mcmc_steps
        if rows is not None and rows < steps:
            raise ValueError(f"architecture.max_step_embeddings: must be >= thinking.mcmc_steps={steps} (or null), "
                             f"got {rows}")

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """A `model:` mapping (nested sections; `size` fills the architecture's n_layers / n_heads / dim unless
        given) to a validated config. A flat key of the earlier config, or an unknown one, is one line."""
        raw = dict(raw)
        top = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in top:
                raise ValueError(moved_key_message(key) or _unknown_key(key, top, ""))
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            values = raw.pop(name, None) or {}
            if isinstance(values, section_cls):
                values = dataclasses.asdict(values)
            if not isinstance(values, Mapping):
                raise ValueError(f"config key 'model.{name}': expected a mapping, got {type(values).__name__}")
            names = {f.name for f in dataclasses.fields(section_cls)}
            for key in values:
                if key not in names:
                    raise ValueError(_unknown_key(key, names, f"{name}."))
            sections[name] = dict(values)
        size = raw.get("size")
        if size is not None:
            if size not in SIZES:
                close = difflib.get_close_matches(str(size), list(SIZES), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(SIZES)}"
                raise ValueError(f"size: unknown size {size!r}{hint}")
            spec = SIZES[size]
            sections["architecture"] = {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "dim": spec.dim,
                                        **sections["architecture"]}
        built = {name: SECTIONS[name](**values) for name, values in sections.items()}
        return cls(**raw, **built)

    @classmethod
    def from_size(cls, size: str, kind: str = "ebt", **sections: Mapping[str, Any]) -> ModelConfig:
        """`ModelConfig.from_size("4xs", architecture={"vocab_size": 2048}, thinking={"mcmc_steps": 3})`."""
        return cls.from_dict({"kind": kind, "size": size, **sections})

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `kind`/`size` replaced and sections updated key by key:
        `cfg.replace(thinking={"mcmc_steps": 3})` keeps every other thinking key. A new `size` brings its own
        n_layers / n_heads / dim unless `architecture` names them."""
        raw = self.to_dict()
        if changes.get("size") is not None:
            for key in ("n_layers", "n_heads", "dim"):
                del raw["architecture"][key]
        for key, value in changes.items():
            if key in SECTIONS and isinstance(value, Mapping):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return ModelConfig.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown_key(key: str, names: set[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.5)
    elsewhere = [new for old, new in MOVED_KEYS.items() if old == key]
    hint = f"; did you mean '{elsewhere[0]}'?" if elsewhere else (
        f"; did you mean 'model.{prefix}{close[0]}'?" if close else "")
    return f"unknown config key 'model.{prefix}{key}'{hint}"
