"""The EBT language model: an energy transformer plus the thinking loop and its losses."""

from __future__ import annotations

import torch
from torch import nn

from ebt.checkpointing import Policy, RebindableEnergy, check_resolved
from ebt.config import ModelConfig
from ebt.draws import Draws
from ebt.energy import EnergyTransformer, RealContext
from ebt.inference import think
from ebt.losses import contrastive_energy_loss, contrastive_softmax_loss, smoothing_schedule, token_cross_entropy
from ebt.mcmc import (
    NonFiniteEnergyGradientError,
    NonFiniteMonitor,
    StepRunner,
    ThinkingLoop,
    Trajectory,
    candidate,
    run_mcmc,
)
from ebt.parametrization import widths
from ebt.replay import ReplayBuffer
from ebt.validation import check_candidates, check_positive_int, check_tokens


class ContextEnergy(RebindableEnergy):
    """E(candidates, landscape) over the real context of `tokens`: cached, or computed per step (time_embed)."""

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


def _finite_chains(final: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The final candidates to store in the replay buffer, with any sequence whose chain went non-finite put back
    at its start: a NaN chain in the buffer would make every later batch that replays it non-finite. A device
    select rather than a host decision (the step that produced it is skipped, which the host learns later)."""
    finite = torch.isfinite(final).flatten(1).all(dim=1)
    return torch.where(finite[:, None, None], final, starts.to(final.dtype))


class EnergyBasedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        think = cfg.thinking
        super().__init__()
        self.cfg = cfg
        self.energy_model = EnergyTransformer(cfg)
        # The MCMC step size; the optimizer gives parameters named *alpha* their own LR multiplier.
        # μP's optional width exponent c: alpha_init * m^c (c = 0 by default: ebt/parametrization.py derives why).
        alpha_init = float(think.alpha_init)
        if cfg.parametrization == "mup" and cfg.mup.alpha_width_exponent:
            alpha_init *= widths(cfg).width_mult ** cfg.mup.alpha_width_exponent
        self.alpha_raw = nn.Parameter(torch.tensor(alpha_init))
        # The reference's learnable Langevin std (langevin_dynamics_noise_learnable); a plain float otherwise.
        self.langevin_std_raw = (
            nn.Parameter(torch.tensor(float(think.langevin_noise_std))) if think.langevin_learnable else None
        )
        self.replay_buffer = (
            ReplayBuffer(cfg.replay.capacity, cfg.replay.fraction, top_k=cfg.replay.top_k)
            if cfg.replay.capacity > 0 else None
        )
        self.thinking_loop = ThinkingLoop.from_config(cfg)
        # Activation checkpointing, set once from outside by ebt.checkpointing.apply_checkpointing (the trainer
        # applies trainer.checkpointing); runtime switches, not weights. checkpoint_policy None is an unresolved
        # "auto": the model never plans, a training forward refuses it (ebt.checkpointing.check_resolved).
        self.checkpoint_policy: Policy | None = Policy(block=False, step=False)
        self.remat_chunk = 0  # sequences per "mcmc_step" recompute chunk (0: the whole batch)
        self.step_runner: StepRunner | None = None  # runs each second-order step (None: plain mcmc_step)

    @property
    def alpha(self) -> torch.Tensor:
        return self.alpha_raw.clamp(min=self.cfg.thinking.alpha_min)

    @property
    def langevin_std(self) -> float | torch.Tensor:
        if self.langevin_std_raw is None:
            return self.cfg.thinking.langevin_noise_std
        return self.langevin_std_raw.clamp(min=1e-6)  # the reference's floor

    def grad_bound(self) -> float | torch.Tensor | None:
        """The inner-gradient clamp: grad_clamp, or grad_clamp / alpha (the reference's max change per step)."""
        cfg = self.cfg
        if cfg.thinking.grad_clamp is None:
            return None
        if cfg.thinking.grad_clamp_mode == "absolute":
            return cfg.thinking.grad_clamp
        return cfg.thinking.grad_clamp / self.alpha_raw  # the raw parameter, as the reference (not the per-token alpha)

    # ---- energies ------------------------------------------------------------------------------------------
    def energies(self, tokens: torch.Tensor, candidate_probs: torch.Tensor, step: int = 0) -> torch.Tensor:
        """E [B, S] of candidate distributions [B, S, V]; candidate i is a guess for token i+1."""
        check_tokens("tokens", tokens, self.cfg.architecture.vocab_size, self.cfg.architecture.context_length)
        check_candidates("candidate_probs", candidate_probs, *tokens.shape, self.cfg.architecture.vocab_size)
        check_positive_int("step", step, minimum=0)
        return self.energy_model.candidate_energies(self.energy_model.context(tokens, step), candidate_probs, step)

    def energy_fn(self, tokens: torch.Tensor, context: RealContext | None = None) -> ContextEnergy:
        """E(candidates, landscape) for a fixed context; the real stream is shared by every step where the
        variant allows."""
        if context is None and self.cfg.caches_context:
            context = self.energy_model.context(tokens)
        return ContextEnergy(self.energy_model, tokens, context, self.remat_chunk)

    def landscape_plan(self, training: bool, draws: Draws) -> list[int]:
        """The landscape of every step one forward runs (see ModelConfig.landscape_repeats)."""
        cfg = self.cfg
        last = cfg.thinking.mcmc_steps - 1
        if cfg.thinking.landscape_repeats:
            most = cfg.thinking.landscape_repeats + 1
            plan: list[int] = []
            for landscape in range(cfg.thinking.mcmc_steps):
                if not training:
                    repeats = most if landscape == last else 1
                elif cfg.thinking.landscape_repeats_final_only and landscape != last:
                    repeats = 1
                else:
                    repeats = draws.repeats(landscape, max(cfg.thinking.landscape_repeats_min, 1), most)
                plan.extend([landscape] * repeats)
            return plan
        steps = cfg.thinking.mcmc_steps
        if training and cfg.thinking.random_steps_min is not None:
            steps = draws.step_count(cfg.thinking.random_steps_min, cfg.thinking.mcmc_steps)
        return list(range(steps))

    def step_size(self, shape: tuple[int, ...], training: bool, draws: Draws) -> torch.Tensor:
        """alpha, or per-token alpha [B, S, 1] under the training-time randomisations."""
        cfg = self.cfg
        alpha = self.alpha
        if training and cfg.thinking.alpha_random_scale != 1.0:
            scale = cfg.thinking.alpha_random_scale
            low, high = alpha / scale, alpha * scale
            return low + draws.alpha_uniform(shape, alpha) * (high - low)
        if training and cfg.thinking.alpha_jitter > 0:
            jitter = draws.alpha_uniform(shape, alpha)
            return alpha * (1 - cfg.thinking.alpha_jitter + 2 * cfg.thinking.alpha_jitter * jitter)
        return alpha

    # ---- training loss -------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, init_logits: torch.Tensor | None = None, draws: Draws | None = None):
        """The training entry point (what DDP and FSDP call): `loss` without its host-side finiteness check.

        A non-finite inner gradient does not raise here: metrics["nonfinite"] is a 0-d bool on the device, which
        the trainer reads with its one host read per optimizer step. An inner-gradient error raised inside the
        forward anyway (a step runner that checks on the host, benchmarks.experimental's) becomes a zero loss over every
        parameter with that flag set, so this rank's backward still runs every hook and collective (DDP's
        all-reduce, FSDP's reduce-scatter) that the other ranks' backwards run; the step is then skipped."""
        try:
            return self.loss(tokens, init_logits, draws, check_finite=False)
        except NonFiniteEnergyGradientError:
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return zero, {"nonfinite": torch.ones((), dtype=torch.bool, device=zero.device)}

    def loss(self, tokens: torch.Tensor, init_logits: torch.Tensor | None = None, draws: Draws | None = None, *,
             check_finite: bool = True):
        """Mean CE over the thinking steps for tokens [B, S+1]; returns (loss, metrics).

        init_logits [B, S, V]: the chains' starts (default: draws.starts, N(0, init_logit_std^2) from the global
        RNG as the reference draws them; the trainer passes ebt.starts' keyed ones).
        draws: the source of every random number the forward draws itself (ebt.draws.Draws).
        metrics: 0-d detached tensors on the model's device (loss, ce, ppl, ce_step_<k>, alpha, energy_gap),
        converted by whoever reports them, plus the host counts replayed and mcmc_steps (floats).
        check_finite: raise NonFiniteEnergyGradientError if an inner gradient was NaN/inf (one host read after
        the loop); False (what `forward` passes) reports it as metrics["nonfinite"] instead.
        """
        cfg = self.cfg
        check_tokens("tokens", tokens, cfg.architecture.vocab_size, cfg.architecture.context_length + 1)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens: need at least 2 positions (inputs + targets), got {tokens.shape[1]}")
        draws = Draws() if draws is None else draws
        training = self.training
        fresh = tokens.shape[0]
        length = tokens.shape[1] - 1
        if init_logits is None:
            init_logits = draws.starts((fresh, length, cfg.architecture.vocab_size), self.alpha_raw,
                                       cfg.thinking.init_logit_std)
        else:
            check_candidates("init_logits", init_logits, fresh, length, cfg.architecture.vocab_size)
        fresh_tokens, replayed = tokens, 0
        if training and self.replay_buffer is not None:
            count = min(int(cfg.replay.fraction * fresh), len(self.replay_buffer))
            indices = draws.replay_indices(len(self.replay_buffer), count) if count else None
            tokens, init_logits, replayed = self.replay_buffer.mix(tokens, init_logits, indices)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        plan = self.landscape_plan(training, draws)
        step_size = self.step_size((tokens.shape[0], length, 1), training, draws)

        check_resolved(self)  # an unresolved "auto" is planned before building (planning), never here
        energy = self.energy_fn(inputs)
        noise_std = self.langevin_std if training or cfg.thinking.langevin_in_eval else 0.0
        monitor = NonFiniteMonitor()
        trajectory = run_mcmc(
            energy,
            init_logits,
            plan,
            step_size,
            create_graph=torch.is_grad_enabled(),
            loop=self.thinking_loop,
            noise_std=noise_std,
            noise=draws.langevin,
            bound=self.grad_bound(),
            step_runner=self.step_runner,
            monitor=monitor,
        )
        if check_finite:
            monitor.raise_if_nonfinite()
        loss, metrics = self._trajectory_loss(trajectory, targets)
        if cfg.loss.contrastive_weight > 0:
            loss = loss + cfg.loss.contrastive_weight * self._contrastive(energy, trajectory, targets)
        if training and self.replay_buffer is not None:
            self.replay_buffer.push(fresh_tokens, _finite_chains(trajectory.logits[-1][:fresh], init_logits[:fresh]))
        metrics.update(alpha=self.alpha.detach(), replayed=float(replayed), mcmc_steps=float(len(plan)))
        metrics["energy_gap"] = trajectory.energies[0].mean() - trajectory.energies[-1].mean()
        if not check_finite:
            metrics["nonfinite"] = monitor.any_nonfinite
        return loss, metrics

    def _trajectory_loss(self, trajectory: Trajectory, targets: torch.Tensor):
        cfg = self.cfg
        steps = len(trajectory.logits)
        smoothing = smoothing_schedule(cfg.loss.label_smoothing_start, cfg.loss.label_smoothing_end, steps)
        metrics: dict[str, torch.Tensor | float] = {}
        step_losses = []
        for step, logits in enumerate(trajectory.logits):
            ce = token_cross_entropy(logits, targets, cfg.loss.ignore_index, smoothing[step])
            step_losses.append(ce)
            if smoothing[step] > 0:
                with torch.no_grad():
                    ce = token_cross_entropy(logits, targets, cfg.loss.ignore_index)
            metrics[f"ce_step_{step}"] = ce.detach()
        loss = step_losses[-1] if cfg.thinking.truncate else torch.stack(step_losses).mean()
        final_ce = metrics[f"ce_step_{steps - 1}"]
        metrics.update(loss=loss.detach(), ce=final_ce, ppl=final_ce.exp())
        return loss, metrics

    def _contrastive(self, energy, trajectory: Trajectory, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        dtype = self.alpha_raw.dtype
        mask = targets != cfg.loss.ignore_index
        true_probs = torch.nn.functional.one_hot(targets.clamp(min=0), cfg.architecture.vocab_size).to(dtype)
        last = len(trajectory.logits) - 1
        true_energy = energy(true_probs, cfg.thinking.mcmc_steps - 1)
        if cfg.loss.contrastive_form == "margin":
            final_probs = torch.softmax(trajectory.logits[-1].detach(), dim=-1)
            predicted_energy = energy(final_probs, trajectory.landscapes[-1])
            return contrastive_energy_loss(true_energy, predicted_energy, mask.to(dtype), cfg.loss.contrastive_margin)
        # The reference: E of the last step's candidate, with its graph (recomputed here, so any step runner
        # works), against E of the true one-hot, as a 2-way CE over negative energies.
        last_candidate = candidate(trajectory.last_input, self.thinking_loop.rule(last))
        predicted_energy = energy(last_candidate, trajectory.landscapes[-1])
        return contrastive_softmax_loss(true_energy, predicted_energy, mask)

    # ---- System-2 inference ----------------------------------------------------------------------------------
    def think(self, tokens: torch.Tensor, steps: int, samples: int = 1, selection: str = "min",
              accept_lower: bool = False, noise: float = 0.0, generator: torch.Generator | None = None,
              starts: torch.Tensor | None = None, alpha_override: float = 0.0,
              noise_first_step_only: bool = False, *, seed: int = 0):
        return think(self, tokens, steps, samples, selection, accept_lower, noise, generator, starts,
                     alpha_override, noise_first_step_only, seed=seed)
