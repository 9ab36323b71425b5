"""The thinking loop: gradient descent on the energy over the candidates of every position.

`run_mcmc` is the ONE descent loop: training runs it with its graph (second order), System 2
(ebt.inference.descend: `think`, `generate`, `ebt eval`) without one, with per-step landscapes, first-step-only
noise and accept-lower; no other module implements a step.

A chain's state y [B, S, V] is mapped to the candidate the energy reads, x = phi(y) (a softmax, or the identity
when normalisation is off for that step), and moved against the energy of its landscape l (the step
conditioning of time_embed/adaln; one landscape may run several steps):

    update_space "probs"  (the reference):  y <- x - alpha * dE_l/dx     (the result is reused as logits)
    update_space "logits":                  y <- y - alpha * dE_l/dy     (dE/dy through phi)

Optional pieces, each a named option of ModelConfig: the chain is detached before every step (the reference's
default), Langevin noise is added to a step's input before phi (reference) or to its output, the inner gradient
is clamped (at a bound that may depend on alpha), and the state is clamped after the step. In training a
step keeps its graph (`create_graph=True`): the energy model's parameters receive gradient ONLY through these
second-order terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

EnergyFn = Callable[[torch.Tensor, int], torch.Tensor]
Bound = float | torch.Tensor | None  # a clamp on dE/dcandidates: constant, or grad_clamp / alpha with its graph


class NonFiniteEnergyGradientError(FloatingPointError):
    """The inner gradient dE/dcandidates contained NaN or inf; the trainer skips such a step."""


class NonFiniteMonitor:
    """Whether any inner gradient of one forward was non-finite, kept on the device.

    Checking each step's gradient on the host (`bool(isfinite(grad).all())`) stalls a GPU once per MCMC step
    until everything queued so far has run. Instead each step ANDs its finiteness into a device flag, and the
    caller reads it once, where it decides anyway (the trainer: with its one host read per optimizer step), or
    calls `raise_if_nonfinite()` as an explicit check outside the hot path (the model's direct `loss()`).
    """

    def __init__(self, record: bool = True) -> None:
        self.record = record  # False: the recompute of a step whose forward was already checked
        self.flags: list[tuple[int, torch.Tensor]] = []  # (landscape, 0-d bool: that step's gradient was bad)

    def observe(self, grad: torch.Tensor, landscape: int) -> None:
        if self.record:  # detached: isfinite's abs() would otherwise join the second-order graph
            self.flags.append((landscape, ~torch.isfinite(grad.detach()).all()))

    @property
    def any_nonfinite(self) -> torch.Tensor | None:
        """A 0-d bool tensor (True: some step's gradient had NaN/inf); None when no step was observed."""
        if not self.flags:
            return None
        return torch.stack([flag for _, flag in self.flags]).any()

    def raise_if_nonfinite(self) -> None:
        """The explicit check (one host read): raise NonFiniteEnergyGradientError naming the first bad step."""
        bad = self.any_nonfinite
        if bad is not None and bool(bad):
            landscape = next(step for step, flag in self.flags if bool(flag))
            raise NonFiniteEnergyGradientError(f"non-finite dE/dcandidates at MCMC step {landscape}")


# The recompute of a step in the outer backward: same values as its checked forward, nothing to record.
UNCHECKED = NonFiniteMonitor(record=False)


@dataclass(frozen=True)
class StepRule:
    """What one step does besides evaluating the energy: phi, what it differentiates, the state clamp."""

    normalize: bool = True  # phi = softmax at this step (else the identity)
    probs_update: bool = True  # differentiate w.r.t. phi(y) and step from it (only differs when normalize)
    candidate_clamp: float = 0.0  # clamp the new state to [-c, c] (0: off)

    @property
    def steps_from_candidate(self) -> bool:
        return self.normalize and self.probs_update


# (energy_fn, state, step_size, landscape, rule, bound, monitor) -> (new state, energy); must equal
# mcmc_step(..., create_graph=True, monitor=monitor). ebt.checkpointing's runner rematerialises the step in the
# outer backward; benchmarks.experimental holds measured alternatives.
StepRunner = Callable[
    [EnergyFn, torch.Tensor, torch.Tensor, int, StepRule, Bound, "NonFiniteMonitor | None"],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class ThinkingLoop:
    """The static options of the loop (ModelConfig's thinking-loop fields; see there for the reference flags)."""

    update_space: str = "probs"
    normalize: str = "every_step"
    detach_steps: bool = True
    truncate: bool = False
    langevin_placement: str = "input"
    candidate_clamp: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> ThinkingLoop:
        think = cfg.thinking
        return cls(think.update_space, think.normalize, think.detach_steps, think.truncate, think.langevin_placement,
                   think.candidate_clamp)

    def rule(self, executed_step: int) -> StepRule:
        normalize = self.normalize == "every_step" or (self.normalize == "first_step" and executed_step == 0)
        return StepRule(normalize, self.update_space == "probs", self.candidate_clamp)


@dataclass
class Trajectory:
    logits: list[torch.Tensor] = field(default_factory=list)  # the state after each executed step
    energies: list[torch.Tensor] = field(default_factory=list)  # at each step's input, detached [B, S]
    landscapes: list[int] = field(default_factory=list)  # the landscape of each executed step
    last_input: torch.Tensor | None = None  # the last step's input state (noise included), with its graph


def candidate(state: torch.Tensor, rule: StepRule) -> torch.Tensor:
    """phi(y): what the energy reads."""
    return torch.softmax(state, dim=-1) if rule.normalize else state


def inner_gradient(
    energy_fn: EnergyFn,
    state: torch.Tensor,
    landscape: int,
    rule: StepRule = StepRule(),
    bound: Bound = None,
    *,
    create_graph: bool,
    monitor: NonFiniteMonitor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, dE/dbase clamped to +-bound, E) at `state`; the step is base - alpha * grad.

    base is phi(state) under the probs update (the reference differentiates w.r.t. the softmaxed candidate),
    else the state itself. A non-finite gradient (before the clamp, which would hide an inf) is recorded in
    `monitor` on the device; without a monitor it raises NonFiniteEnergyGradientError at once (a host read:
    fine for a direct call, not for a training step).
    """
    with torch.enable_grad():
        if rule.steps_from_candidate and not state.requires_grad:
            # Nothing can flow back to the state, so phi(state) is a leaf: no softmax graph to keep alive.
            x = candidate(state.detach(), rule).requires_grad_(True)
        else:
            if not state.requires_grad:
                state = state.detach().requires_grad_(True)
            x = candidate(state, rule)
        base = x if rule.steps_from_candidate else state
        energy = energy_fn(x, landscape)
        (grad,) = torch.autograd.grad(energy.sum(), base, create_graph=create_graph)
    if monitor is not None:
        monitor.observe(grad, landscape)
    elif not bool(torch.isfinite(grad).all()):
        raise NonFiniteEnergyGradientError(f"non-finite dE/dcandidates at MCMC step {landscape}")
    if bound is not None:
        grad = torch.clamp(grad, -bound, bound)
    # E is returned detached: nothing differentiates it (the second-order terms flow through grad), and its
    # graph would otherwise keep phi's saved output alive after a first-order step.
    return base, grad, energy.detach()


def mcmc_step(
    energy_fn: EnergyFn,
    state: torch.Tensor,
    step_size: torch.Tensor,
    landscape: int,
    rule: StepRule = StepRule(),
    bound: Bound = None,
    *,
    create_graph: bool,
    monitor: NonFiniteMonitor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One descent step: (base - step_size * grad, E)."""
    base, grad, energy = inner_gradient(energy_fn, state, landscape, rule, bound, create_graph=create_graph,
                                        monitor=monitor)
    new = base - step_size * grad
    if rule.candidate_clamp > 0:
        new = new.clamp(-rule.candidate_clamp, rule.candidate_clamp)
    return new, energy


NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]  # (executed step, like) -> N(0, 1) of like's shape


def run_mcmc(
    energy_fn: EnergyFn,
    init_state: torch.Tensor,
    landscapes: int | Sequence[int],
    step_size: torch.Tensor,
    *,
    create_graph: bool,
    loop: ThinkingLoop = ThinkingLoop(),
    noise_std: float | torch.Tensor = 0.0,
    noise: NoiseFn | None = None,
    noise_first_step_only: bool = False,
    bound: Bound = None,
    accept_lower: bool = False,
    keep_states: bool = True,
    step_runner: StepRunner | None = None,
    monitor: NonFiniteMonitor | None = None,
) -> Trajectory:
    """Run one step per entry of `landscapes` (an int n: landscapes 0..n-1) from `init_state` [B, S, V].

    The one descent loop: training's (second-order, every option of the reference) and System 2's
    (ebt.inference.descend: no graph, per-step landscapes, accept-lower) are this loop with different options.
    create_graph: keep the steps differentiable (second-order training); with loop.truncate only the last one
    is, while earlier steps still pass first-order gradient to alpha and the chain unless loop.detach_steps.
    `step_size` is alpha, or alpha per token [B, S, 1]; `noise` draws the Langevin noise of each step (at every
    step, or only the first with noise_first_step_only, the reference's infer_langevin_first_step).
    accept_lower (no graph only): a token keeps its step's input unless the proposal's energy, on the same
    landscape, is strictly lower (one more energy per step), so its energy never rises along the chain.
    keep_states: False keeps only the final state in trajectory.logits (System 2 reads nothing else).
    step_runner: runs each second-order step in place of `mcmc_step` (same result); ebt.checkpointing uses it
    to rematerialise a step's graph during the outer backward.
    monitor: collects the inner gradients' finiteness on the device (None: a non-finite one raises at once).
    """
    plan = list(range(landscapes)) if isinstance(landscapes, int) else list(landscapes)
    if not plan:
        raise ValueError("steps: must be >= 1, got 0")
    if accept_lower and create_graph:
        raise ValueError("accept_lower: only for a descent without a graph (System 2), not for training")
    noisy = noise is not None and (torch.is_tensor(noise_std) or noise_std > 0)
    trajectory = Trajectory(landscapes=plan)
    state = init_state
    for index, landscape in enumerate(plan):
        rule = loop.rule(index)
        second_order = create_graph and (not loop.truncate or index == len(plan) - 1)
        noisy_step = noisy and (index == 0 or not noise_first_step_only)
        if loop.detach_steps:
            state = state.detach()
        if noisy_step and loop.langevin_placement == "input":
            state = state + noise_std * noise(index, state)
        trajectory.last_input = state
        if second_order and step_runner is not None:
            new, energy = step_runner(energy_fn, state, step_size, landscape, rule, bound, monitor)
        else:
            new, energy = mcmc_step(energy_fn, state, step_size, landscape, rule, bound,
                                    create_graph=second_order, monitor=monitor)
        if noisy_step and loop.langevin_placement == "after_update":
            new = new + noise_std * noise(index, new)
        if accept_lower:
            with torch.no_grad():
                accept = energy_fn(candidate(new, rule), landscape) < energy  # [B, S]
                new = torch.where(accept[..., None], new, state)
        state = new
        if keep_states or index == len(plan) - 1:
            trajectory.logits.append(state)
        trajectory.energies.append(energy.detach())
    return trajectory
