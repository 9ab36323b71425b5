"""Functional inner gradients: torch.compile where it is correct, and forward-over-reverse (measured, not default).

torch.compile refuses a region that autograd differentiates twice (aot_autograd has no double backward,
pytorch/pytorch#91469), so the energy model itself cannot be compiled for EBT training. What does compile is
the inner gradient as a FUNCTION: g(logits; params, context) = torch.func.grad of sum(E) over a functional_call.
Its output stays differentiable with respect to the parameters and the context by ordinary autograd, and
aot_autograd compiles that (first-order) backward, which is the second-order term of the training loss.

- `compiled_step_runner`: a StepRunner for plain (un-checkpointed) steps using the compiled g. The first call
  compiles (tens of seconds on CPU); any compile error falls back, once and with a warning, to the eager
  functional g, which is exact (tests/ebt/test_second_order_compiled.py).
- `jvp_step_runner`: the "mcmc_step" recompute, but the outer VJP is taken by forward-over-reverse: a JVP of
  the full gradient (d/dlogits, d/dparams, d/dcontext of sum E) along the cotangent, instead of a double
  backward through a retained graph. benchmarks/second_order.py measures it against RematerialisedStep.

Both are handed to a model with benchmarks.experimental.step_runners.use_step_runner (apply_checkpointing
underneath).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from benchmarks.experimental.step_runners import use_step_runner
from ebt.energy import EnergyTransformer, RealContext
from ebt.mcmc import NonFiniteEnergyGradientError, NonFiniteMonitor, StepRule, mcmc_step


def _logits_rule(rule: StepRule, bound) -> bool:
    """Whether a step is the one these functional paths implement: y - alpha * dE(softmax(y))/dy."""
    return rule.normalize and not rule.probs_update and rule.candidate_clamp == 0 and not torch.is_tensor(bound)


class _CandidateEnergy(nn.Module):
    """forward == EnergyTransformer.candidate_energies, so functional_call can swap its parameters."""

    def __init__(self, model: EnergyTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, keys, values, offset: int, probs: torch.Tensor, step: int) -> torch.Tensor:
        return self.model.candidate_energies(RealContext(list(keys), list(values), offset), probs, step)


def _energy_sum(wrapper: _CandidateEnergy, logits, params, keys, values, offset: int, step: int):
    energy = functional_call(wrapper, params, (keys, values, offset, torch.softmax(logits, dim=-1), step))
    return energy.sum(), energy.detach()


def functional_inner_gradient(wrapper, logits, params, keys, values, offset: int, step: int):
    """(dE/dlogits, E): differentiable w.r.t. params, keys and values by ordinary autograd."""
    grad_fn = torch.func.grad(_energy_sum, argnums=1, has_aux=True)
    return grad_fn(wrapper, logits, params, keys, values, offset, step)


class InnerGradient:
    """The inner gradient of one model, compiled on first use (eager functional fallback on any failure)."""

    def __init__(self, model: EnergyTransformer, compile: bool = True) -> None:
        self.wrapper = _CandidateEnergy(model)
        self.compiled: Callable | None = None
        self.use_compile = compile
        self.failed = False

    def __call__(self, logits, params, keys, values, offset: int, step: int):
        if self.use_compile and not self.failed:
            if self.compiled is None:
                # dynamic=False: one graph per (shape, step); steps are few and shapes fixed in training.
                self.compiled = torch.compile(functional_inner_gradient, dynamic=False)
            try:
                return self.compiled(self.wrapper, logits, params, keys, values, offset, step)
            except Exception as error:  # noqa: BLE001 - any compiler failure must not stop training
                warnings.warn(f"compiled inner gradient failed ({type(error).__name__}: {str(error)[:200]}); "
                              "using the eager functional gradient", stacklevel=2)
                self.failed = True
        return functional_inner_gradient(self.wrapper, logits, params, keys, values, offset, step)


def _check(grad: torch.Tensor, step: int, monitor: NonFiniteMonitor | None) -> None:
    """Record the gradient's finiteness on the device, or (no monitor: a direct call) raise at once."""
    if monitor is not None:
        monitor.observe(grad, step)
    elif not bool(torch.isfinite(grad).all()):
        raise NonFiniteEnergyGradientError(f"non-finite dE/dlogits at MCMC step {step}")


def _parameters(wrapper: _CandidateEnergy) -> dict[str, torch.Tensor]:
    return {name: p for name, p in wrapper.named_parameters()}


def make_functional_step_runner(model: EnergyTransformer, compile: bool = True):
    """A StepRunner computing each second-order step through `InnerGradient` (policy "none" only)."""
    inner = InnerGradient(model, compile=compile)

    def runner(energy_fn, logits, step_size, step, rule, bound, monitor=None):
        context = getattr(energy_fn, "context", None)
        if context is None or not _logits_rule(rule, bound):
            # time_embed / no cache: the real stream is inside the step; other update rules: stay eager
            return mcmc_step(energy_fn, logits, step_size, step, rule, bound, create_graph=True, monitor=monitor)
        grad, energy = inner(logits, _parameters(inner.wrapper), tuple(context.keys), tuple(context.values),
                             context.offset, step)
        _check(grad, step, monitor)
        if bound is not None:
            grad = grad.clamp(-bound, bound)
        return logits - step_size * grad, energy

    runner.inner = inner  # type: ignore[attr-defined]
    return runner


def enable_compiled_inner_gradient(ebt_model: nn.Module, compile: bool = True) -> None:
    """Route an EnergyBasedTransformer's plain second-order steps through the (compiled) functional gradient."""
    use_step_runner(ebt_model, make_functional_step_runner(ebt_model.energy_model, compile=compile))


# ---------------------------------------------------------------------------------------------- forward-over-reverse


class _JvpStep(torch.autograd.Function):
    """Like RematerialisedStep, but the backward is a JVP of the full gradient (forward-over-reverse)."""

    @staticmethod
    def forward(ctx, wrapper, step, logits, step_size, offset, n_layers, monitor,  # type: ignore[override]
                *tensors):
        keys, values = tensors[:n_layers], tensors[n_layers : 2 * n_layers]
        params = dict(zip([n for n, _ in wrapper.named_parameters()], tensors[2 * n_layers :], strict=True))
        with torch.no_grad():
            grad, energy = functional_inner_gradient(wrapper, logits, params, keys, values, offset, step)
        _check(grad, step, monitor)
        ctx.wrapper, ctx.step, ctx.offset, ctx.n_layers = wrapper, step, offset, n_layers
        ctx.save_for_backward(logits, step_size, *tensors)
        ctx.mark_non_differentiable(energy)
        return logits - step_size * grad, energy

    @staticmethod
    def backward(ctx, grad_new, _grad_energy):  # type: ignore[override]
        logits, step_size, *tensors = ctx.saved_tensors
        n = ctx.n_layers
        keys, values, flat = tuple(tensors[:n]), tuple(tensors[n : 2 * n]), tensors[2 * n :]
        names = [name for name, _ in ctx.wrapper.named_parameters()]
        params = dict(zip(names, flat, strict=True))

        def full_gradient(x):
            def total(x_, p_, k_, v_):
                return _energy_sum(ctx.wrapper, x_, p_, k_, v_, ctx.offset, ctx.step)[0]

            return torch.func.grad(total, argnums=(0, 1, 2, 3))(x, params, keys, values)

        direction = -step_size * grad_new
        with torch.no_grad():
            (grad, *_), (t_x, t_params, t_keys, t_values) = torch.func.jvp(full_gradient, (logits,), (direction,))
        size_grad = -(grad * grad_new).sum_to_size(step_size.shape)
        return (None, None, grad_new + t_x, size_grad, None, None, None, *t_keys, *t_values,
                *[t_params[name] for name in names])


def make_jvp_step_runner(model: EnergyTransformer):
    """StepRunner for "mcmc_step" via forward-over-reverse (cached context, no grad_clamp); measured only."""
    wrapper = _CandidateEnergy(model)

    def runner(energy_fn, logits, step_size, step, rule, bound, monitor=None):
        context = getattr(energy_fn, "context", None)
        if context is None or bound is not None or not _logits_rule(rule, None):
            raise ValueError("the forward-over-reverse step needs a cached context, the logits update and no clamp")
        params = [p for _, p in wrapper.named_parameters()]
        return _JvpStep.apply(wrapper, step, logits, step_size, context.offset, len(context.keys), monitor,
                              *context.keys, *context.values, *params)

    return runner
