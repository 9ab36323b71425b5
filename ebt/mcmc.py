"""The thinking loop: gradient descent on the energy over candidate logits.

Each step maps logits to candidates with a softmax (the reference's normalisation), evaluates their energy,
and moves the logits against dE/dlogits:  logits <- logits - alpha * dE/dlogits  (+ optional Langevin noise).
In training the step keeps its graph (`create_graph=True`): the energy model's parameters receive gradient ONLY
through these second-order terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

EnergyFn = Callable[[torch.Tensor, int], torch.Tensor]
# (energy_fn, logits, step_size, step, grad_clamp) -> (new logits, energy); must equal mcmc_step(create_graph=True).
StepRunner = Callable[
    [EnergyFn, torch.Tensor, torch.Tensor, int, "float | None"], tuple[torch.Tensor, torch.Tensor]
]


class NonFiniteEnergyGradientError(FloatingPointError):
    """The inner gradient dE/dlogits contained NaN or inf; the trainer skips such a step."""


@dataclass
class Trajectory:
    logits: list[torch.Tensor] = field(default_factory=list)  # after each step, K entries
    energies: list[torch.Tensor] = field(default_factory=list)  # at each step's start, detached [B, S]


def mcmc_step(
    energy_fn: EnergyFn,
    logits: torch.Tensor,
    step_size: torch.Tensor,
    step: int,
    *,
    create_graph: bool,
    grad_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One descent step: (logits - step_size * dE/dlogits, E). `logits` must require grad."""
    grad, energy = inner_gradient(energy_fn, logits, step, create_graph=create_graph, grad_clamp=grad_clamp)
    return logits - step_size * grad, energy


def inner_gradient(
    energy_fn: EnergyFn, logits: torch.Tensor, step: int, *, create_graph: bool, grad_clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dE/dlogits, clamped if asked; E) at `logits`, which must require grad."""
    with torch.enable_grad():
        energy = energy_fn(torch.softmax(logits, dim=-1), step)
        (grad,) = torch.autograd.grad(energy.sum(), logits, create_graph=create_graph)
    if not bool(torch.isfinite(grad).all()):
        raise NonFiniteEnergyGradientError(f"non-finite dE/dlogits at MCMC step {step}")
    if grad_clamp is not None:
        grad = grad.clamp(-grad_clamp, grad_clamp)
    return grad, energy


def run_mcmc(
    energy_fn: EnergyFn,
    init_logits: torch.Tensor,
    steps: int,
    alpha: torch.Tensor,
    *,
    create_graph: bool,
    truncate: bool = False,
    langevin_noise_std: float = 0.0,
    grad_clamp: float | None = None,
    alpha_scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    step_runner: StepRunner | None = None,
) -> Trajectory:
    """Run `steps` energy-descent steps from `init_logits` [B, S, V].

    create_graph: keep every step differentiable (second-order training). With `truncate`, only the last step
    is; earlier steps run detached. `alpha_scale` [B, S, 1] scales the step size per token.
    step_runner: runs each second-order step in place of `mcmc_step` (same result); ebt.checkpointing uses it
    to rematerialise a step's graph during the outer backward.
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    trajectory = Trajectory()
    logits = init_logits
    step_size = alpha if alpha_scale is None else alpha * alpha_scale
    for step in range(steps):
        second_order = create_graph and (not truncate or step == steps - 1)
        if not second_order or not logits.requires_grad:
            logits = logits.detach().requires_grad_(True)
        if second_order and step_runner is not None:
            logits, energy = step_runner(energy_fn, logits, step_size, step, grad_clamp)
        else:
            logits, energy = mcmc_step(energy_fn, logits, step_size if second_order else step_size.detach(), step,
                                       create_graph=second_order, grad_clamp=grad_clamp)
        if langevin_noise_std > 0:
            noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits + langevin_noise_std * noise
        if not second_order:
            logits = logits.detach()
        trajectory.logits.append(logits)
        trajectory.energies.append(energy.detach())
    return trajectory
