"""The EBT language model: an energy transformer plus the thinking loop and its losses."""

from __future__ import annotations

import torch
from torch import nn

from ebt.checkpointing import RebindableEnergy
from ebt.checkpointing import configure as configure_checkpointing
from ebt.config import ModelConfig
from ebt.energy import EnergyTransformer, RealContext
from ebt.inference import think
from ebt.losses import contrastive_energy_loss, smoothing_schedule, token_cross_entropy
from ebt.mcmc import Trajectory, run_mcmc
from ebt.replay import ReplayBuffer
from ebt.validation import check_candidates, check_positive_int, check_tokens


class ContextEnergy(RebindableEnergy):
    """E(probs, step) over the real context of `tokens`: the cached one, or one computed per step (time_embed)."""

    def __init__(self, model: EnergyTransformer, tokens: torch.Tensor, context: RealContext | None,
                 remat_chunk: int = 0) -> None:
        self.model, self.tokens, self.context = model, tokens, context
        self.remat_chunk = remat_chunk  # sequences per "mcmc_step" recompute chunk (0: the whole batch)

    def __call__(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        context = self.context if self.context is not None else self.model.context(self.tokens, step)
        return self.model.candidate_energies(context, probs, step)

    def captured(self) -> list[torch.Tensor]:
        return [] if self.context is None else [*self.context.keys, *self.context.values]

    def rebind(self, tensors, rows: slice | None = None) -> ContextEnergy:
        tokens = self.tokens if rows is None else self.tokens[rows]
        if self.context is None:
            return ContextEnergy(self.model, tokens, None, self.remat_chunk)
        layers = len(self.context.keys)
        context = RealContext(list(tensors[:layers]), list(tensors[layers:]), self.context.offset)
        return ContextEnergy(self.model, tokens, context, self.remat_chunk)

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


class EnergyBasedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.energy_model = EnergyTransformer(cfg)
        # The MCMC step size; the optimizer gives parameters named *alpha* their own LR multiplier.
        self.alpha_raw = nn.Parameter(torch.tensor(float(cfg.alpha_init)))
        self.replay_buffer = (
            ReplayBuffer(cfg.replay_capacity, cfg.replay_fraction) if cfg.replay_capacity > 0 else None
        )
        # How "mcmc_step" checkpointing runs a step: "function" (RematerialisedStep) or "generic" (benchmarks).
        self.step_impl = "function"
        # A StepRunner replacing every second-order step (ebt.compiled's functional/compiled inner gradient).
        self.step_runner_override = None

    @property
    def alpha(self) -> torch.Tensor:
        return self.alpha_raw.clamp(min=self.cfg.alpha_min)

    # ---- energies ------------------------------------------------------------------------------------------
    def energies(self, tokens: torch.Tensor, candidate_probs: torch.Tensor, step: int = 0) -> torch.Tensor:
        """E [B, S] of candidate distributions [B, S, V]; candidate i is a guess for token i+1."""
        check_tokens("tokens", tokens, self.cfg.vocab_size, self.cfg.context_length)
        check_candidates("candidate_probs", candidate_probs, *tokens.shape, self.cfg.vocab_size)
        check_positive_int("step", step, minimum=0)
        return self.energy_model.candidate_energies(self.energy_model.context(tokens, step), candidate_probs, step)

    def energy_fn(self, tokens: torch.Tensor, context: RealContext | None = None) -> ContextEnergy:
        """E(probs, step) for a fixed context; the real stream is shared by every step when the variant allows."""
        if context is None and self.cfg.caches_context:
            context = self.energy_model.context(tokens)
        return ContextEnergy(self.energy_model, tokens, context, getattr(self, "remat_chunk", self.cfg.remat_chunk))

    def initial_logits(self, shape: tuple[int, ...], like: torch.Tensor, generator=None) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
        return noise * self.cfg.init_logit_std

    # ---- training loss -------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, init_logits: torch.Tensor | None = None):
        return self.loss(tokens, init_logits)

    def loss(self, tokens: torch.Tensor, init_logits: torch.Tensor | None = None):
        """Mean CE over MCMC steps for tokens [B, S+1]; returns (loss, metrics)."""
        cfg = self.cfg
        check_tokens("tokens", tokens, cfg.vocab_size, cfg.context_length + 1)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens: need at least 2 positions (inputs + targets), got {tokens.shape[1]}")
        batch, length = tokens.shape[0], tokens.shape[1] - 1
        dtype = self.alpha_raw.dtype
        if init_logits is None:
            init_logits = self.initial_logits((batch, length, cfg.vocab_size), self.alpha_raw)
        else:
            check_candidates("init_logits", init_logits, batch, length, cfg.vocab_size)
        replayed = 0
        if self.training and self.replay_buffer is not None:
            tokens, init_logits, replayed = self.replay_buffer.mix(tokens, init_logits)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        steps = cfg.mcmc_steps
        if self.training and cfg.random_steps_min is not None:
            steps = int(torch.randint(cfg.random_steps_min, cfg.mcmc_steps + 1, ()).item())
        alpha_scale = None
        if self.training and cfg.alpha_jitter > 0:
            jitter = torch.rand(batch, length, 1, dtype=dtype, device=tokens.device)
            alpha_scale = 1 - cfg.alpha_jitter + 2 * cfg.alpha_jitter * jitter

        _, step_runner = configure_checkpointing(self, batch, self.step_impl)
        if self.step_runner_override is not None:
            step_runner = self.step_runner_override
        energy = self.energy_fn(inputs)
        trajectory = run_mcmc(
            energy,
            init_logits,
            steps,
            self.alpha,
            create_graph=torch.is_grad_enabled(),
            truncate=cfg.truncate,
            langevin_noise_std=cfg.langevin_noise_std if self.training else 0.0,
            grad_clamp=cfg.grad_clamp,
            alpha_scale=alpha_scale,
            step_runner=step_runner,
        )
        loss, metrics = self._trajectory_loss(trajectory, targets)
        if cfg.contrastive_weight > 0:
            loss = loss + cfg.contrastive_weight * self._contrastive(energy, trajectory, targets, steps)
        if self.training and self.replay_buffer is not None:
            self.replay_buffer.push(tokens, trajectory.logits[-1])
        metrics.update(alpha=float(self.alpha.detach()), replayed=float(replayed), mcmc_steps=float(steps))
        metrics["energy_gap"] = float(trajectory.energies[0].mean() - trajectory.energies[-1].mean())
        return loss, metrics

    def _trajectory_loss(self, trajectory: Trajectory, targets: torch.Tensor):
        cfg = self.cfg
        steps = len(trajectory.logits)
        smoothing = smoothing_schedule(cfg.label_smoothing_start, cfg.label_smoothing_end, steps)
        metrics: dict[str, float] = {}
        step_losses = []
        for step, logits in enumerate(trajectory.logits):
            ce = token_cross_entropy(logits, targets, cfg.ignore_index, smoothing[step])
            step_losses.append(ce)
            if smoothing[step] > 0:
                with torch.no_grad():
                    ce = token_cross_entropy(logits, targets, cfg.ignore_index)
            metrics[f"ce_step_{step}"] = float(ce.detach())
        loss = step_losses[-1] if cfg.truncate else torch.stack(step_losses).mean()
        final_ce = metrics[f"ce_step_{steps - 1}"]
        metrics.update(loss=float(loss.detach()), ce=final_ce, ppl=float(torch.tensor(final_ce).exp()))
        return loss, metrics

    def _contrastive(self, energy, trajectory: Trajectory, targets: torch.Tensor, steps: int) -> torch.Tensor:
        cfg = self.cfg
        mask = (targets != cfg.ignore_index).to(self.alpha_raw.dtype)
        safe_targets = targets.clamp(min=0)
        true_probs = torch.nn.functional.one_hot(safe_targets, cfg.vocab_size).to(self.alpha_raw.dtype)
        final_probs = torch.softmax(trajectory.logits[-1].detach(), dim=-1)
        true_energy = energy(true_probs, steps - 1)
        predicted_energy = energy(final_probs, steps - 1)
        return contrastive_energy_loss(true_energy, predicted_energy, mask, cfg.contrastive_margin)

    # ---- System-2 inference ----------------------------------------------------------------------------------
    def think(self, tokens: torch.Tensor, steps: int, samples: int = 1, selection: str = "min",
              accept_lower: bool = False, noise: float = 0.0, generator: torch.Generator | None = None,
              starts: torch.Tensor | None = None):
        return think(self, tokens, steps, samples, selection, accept_lower, noise, generator, starts)
