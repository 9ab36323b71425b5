"""Alternative "mcmc_step" implementations, handed to a model through ebt.checkpointing.apply_checkpointing."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ebt.checkpointing import apply_checkpointing, rematerialised_step_runner
from ebt.mcmc import UNCHECKED, EnergyFn, NonFiniteMonitor, StepRule, StepRunner, mcmc_step


def generic_step_runner(
    energy_fn: EnergyFn, state: torch.Tensor, step_size: torch.Tensor, landscape: int, rule: StepRule, bound,
    monitor: NonFiniteMonitor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward recipe: the whole step inside one non-reentrant torch.utils.checkpoint.

    Kept as the benchmark's comparison point for RematerialisedStep; exact as well. The inner gradient's
    finiteness is recorded by the forward run only: the recompute in the backward sees the same values."""
    runs = 0

    def run(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal runs
        check = monitor if runs == 0 else UNCHECKED
        runs += 1
        new, energy = mcmc_step(energy_fn, x, size, landscape, rule, bound, create_graph=True, monitor=check)
        return new, energy.detach()

    return checkpoint(run, state, step_size, use_reentrant=False)


# "mcmc_step" implementations by name (benchmarks/second_order.py's ":impl" suffix).
STEP_RUNNERS: dict[str, StepRunner] = {"function": rematerialised_step_runner, "generic": generic_step_runner}


def use_step_runner(model: torch.nn.Module, runner: StepRunner) -> None:
    """Run every second-order step of `model` with `runner`, keeping its policy and recompute chunk (under an
    unresolved "auto" the runner replaces whatever policy it resolves to)."""
    policy = model.checkpoint_policy
    apply_checkpointing(model, "auto" if policy is None else policy.name, model.remat_chunk, step_runner=runner)


def use_step_impl(model: torch.nn.Module, impl: str) -> None:
    """The "mcmc_step" recompute by name (STEP_RUNNERS); a policy without "mcmc_step" keeps its plain steps."""
    policy = model.checkpoint_policy
    if impl not in STEP_RUNNERS:
        raise ValueError(f"step impl: unknown {impl!r}; expected one of {', '.join(STEP_RUNNERS)}")
    if policy is not None and not policy.step:
        return
    use_step_runner(model, STEP_RUNNERS[impl])
