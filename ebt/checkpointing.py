"""Activation checkpointing built for second-order EBT training (trainer.checkpointing in a training config).

Why not the standard recipes: EBT training differentiates through dE/dlogits, so every MCMC step leaves a
second-order graph (the step's forward plus its create_graph=True inner backward) alive until the outer
backward, and the K graphs dominate memory. Per-block checkpointing only drops the forward's share of one
block at a time (measured here: 0-12% saved); reentrant checkpointing raises under autograd.grad; selective
checkpointing raises on the second backward.

Policies (gradients are identical under all of them; tests/ebt/test_second_order_policies.py checks it in fp64):
- "none": keep every step's graph.
- "block": non-reentrant torch.utils.checkpoint around each candidate-stream block.
- "mcmc_step": each second-order MCMC step is one `RematerialisedStep` (a custom autograd.Function). Its
  forward computes the step FIRST-ORDER (no create_graph, so nothing of the step survives it) and saves only
  the step's inputs: the state and the step size (the real stream's keys/values and the parameters are
  shared by every step and alive anyway). Its backward recomputes the step with create_graph=True and runs
  the outer vector-Jacobian product through it, so one step's second-order graph is live at a time.
  Compared with wrapping the step in torch.utils.checkpoint (benchmarks.experimental's `generic_step_runner`, kept
  for the benchmark), the forward builds no double-backward graph at all and no saved-tensor hooks run.
  With remat_chunk = n > 0 both passes run n sequences at a time (sequences never interact in the
  candidate stream), so only one chunk's second-order graph is ever live: at xxs, context 256, batch 8,
  V 8192, K=2 this is what brings the peak from 2.6x to 1.3-1.5x Transformer++'s (benchmarks/README.md).
- "block+mcmc_step": both (the recomputed step checkpoints its blocks too).
- "auto": the memory planner (the top-level `planning` package, a layer above this one) picks the fastest
  (policy, remat_chunk) whose predicted peak fits trainer.memory_budget_gb, BEFORE the model is built: `ebt
  train` plans it for the micro-batch it then trains with (launch/memory_plan.py), and a model used directly takes
  the pair `planning.resolve_checkpointing(cfg, "auto", batch)` returns. The model never plans: one given an
  unresolved "auto" refuses a training forward (UnresolvedCheckpointingError); without gradients there is no
  second-order graph to checkpoint, and it runs plain steps (every policy computes the same values).

The policy is applied once, from outside the model, as torchtitan applies activation checkpointing:
`apply_checkpointing(model, policy, remat_chunk)`, which the trainer calls with trainer.checkpointing. It
sets the model's explicit attributes (checkpoint_policy, remat_chunk, step_runner and the energy model's
checkpoint_blocks); nothing is configured inside `forward`.

MFU: the trainer logs MFU from ebt.flops.train_flops_per_token, i.e. MODEL FLOPs; recompute added by a policy
is not counted (the usual convention for activation checkpointing), so a recomputing policy shows a lower MFU
for the same model work. `hardware_flops_per_token` adds the recompute, for hardware-utilisation figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ebt.mcmc import UNCHECKED, EnergyFn, NonFiniteMonitor, StepRule, StepRunner, inner_gradient

POLICIES = ("none", "block", "mcmc_step", "block+mcmc_step")


@dataclass(frozen=True)
class Policy:
    block: bool
    step: bool

    @property
    def name(self) -> str:
        parts = [p for p, on in (("block", self.block), ("mcmc_step", self.step)) if on]
        return "+".join(parts) or "none"


def parse_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"checkpointing: unknown policy {name!r}; expected one of {', '.join(POLICIES)} or auto")
    return Policy(block="block" in name, step="mcmc_step" in name)


class RebindableEnergy:
    """What RematerialisedStep needs from an energy function besides E(probs, step).

    captured(): the non-parameter tensors it closes over that may carry gradient (the real stream's per-layer
    keys and values); rebind(tensors): the same energy over replacements for them; parameters(): the weights.
    remat_chunk: sequences per recompute chunk (0: the whole batch at once).
    """

    remat_chunk: int = 0

    def __call__(self, probs: torch.Tensor, step: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def captured(self) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def rebind(self, tensors: Sequence[torch.Tensor], rows: slice | None = None) -> RebindableEnergy:
        """The energy over replacement captured tensors; with `rows`, of those sequences of the batch only."""
        raise NotImplementedError  # pragma: no cover - interface

    def parameters(self) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class _StepSpec:
    energy_fn: RebindableEnergy
    landscape: int
    rule: StepRule
    bound: float | None  # a constant clamp bound; a tensor bound travels as an input of the Function
    n_captured: int
    n_params: int
    autocast: tuple[str, bool, torch.dtype] | None
    chunk: int  # sequences per recompute chunk (>= the batch: one chunk)
    monitor: NonFiniteMonitor | None  # where the forward records the inner gradient's finiteness


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype] | None:
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return kind, True, torch.get_autocast_dtype(kind)


def _rows(batch: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, batch)) for i in range(0, batch, chunk)]


def _batch_slice(tensor: torch.Tensor, rows: slice, batch: int) -> torch.Tensor:
    """The rows of a per-sequence tensor; step sizes without a batch dimension (scalar alpha) pass whole."""
    return tensor[rows] if tensor.dim() > 0 and tensor.shape[0] == batch else tensor


class RematerialisedStep(torch.autograd.Function):
    """One MCMC step whose second-order graph exists only inside the outer backward (see module docstring).

    Sequences never interact in the candidate stream, so both passes run in chunks of `spec.chunk` sequences:
    the recomputed second-order graph then exists for one chunk at a time, and the parameter gradients are
    summed over chunks (exact up to floating-point reassociation).
    """

    @staticmethod
    def forward(ctx, spec: _StepSpec, state, step_size, bound, *tensors):  # type: ignore[override]
        captured = tensors[: spec.n_captured]
        batch = state.shape[0]
        limit = spec.bound if bound is None else bound.detach()
        news, energies = [], []
        for rows in _rows(batch, spec.chunk):
            start = state[rows].detach()
            energy_fn = spec.energy_fn.rebind([t[rows].detach() for t in captured], rows)
            base, grad, energy = inner_gradient(energy_fn, start, spec.landscape, spec.rule, limit,
                                                create_graph=False, monitor=spec.monitor)
            new = base.detach() - _batch_slice(step_size, rows, batch).detach() * grad
            if spec.rule.candidate_clamp > 0:
                new = new.clamp(-spec.rule.candidate_clamp, spec.rule.candidate_clamp)
            news.append(new)
            energies.append(energy.detach())
        ctx.spec = spec
        ctx.has_bound = bound is not None
        ctx.save_for_backward(state, step_size, *(() if bound is None else (bound,)), *captured)
        ctx.params = tensors[spec.n_captured :]
        energy = torch.cat(energies) if len(energies) > 1 else energies[0]
        ctx.mark_non_differentiable(energy)
        return (torch.cat(news) if len(news) > 1 else news[0]), energy

    @staticmethod
    def backward(ctx, grad_new, _grad_energy):  # type: ignore[override]
        # new = b(x) - s * g(x, theta, context), b = phi(x) (probs update) or x, g = dE/db, so for the
        # incoming cotangent y:  x_bar = VJP_x(b, y) + VJP_x(g, -s*y),  theta_bar = VJP_theta(g, -s*y),
        # s_bar = -sum(g * y). Differentiating b and g (not `new`) keeps s*g and new out of the graph; when b
        # is x itself, VJP_x(b, y) = y is added directly.
        spec: _StepSpec = ctx.spec
        state, step_size, *rest = ctx.saved_tensors
        bound = rest.pop(0) if ctx.has_bound else None
        captured = rest
        params = ctx.params
        needs = ctx.needs_input_grad[1:]
        need_state, need_size, need_bound = needs[0], needs[1], needs[2] and bound is not None
        offset = 3
        need_captured = [n and t.requires_grad
                         for n, t in zip(needs[offset : offset + len(captured)], captured, strict=True)]
        need_params = [n and p.requires_grad
                       for n, p in zip(needs[offset + len(captured) :], params, strict=True)]
        batch = state.shape[0]
        state_grad = torch.zeros_like(state) if need_state else None
        captured_grads = [torch.zeros_like(t) if n else None for t, n in zip(captured, need_captured, strict=True)]
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        size_grad = torch.zeros_like(step_size) if need_size else None
        bound_grad = torch.zeros_like(bound) if need_bound else None
        rule = spec.rule
        for rows in _rows(batch, spec.chunk):
            with torch.enable_grad(), _maybe_autocast(spec.autocast):
                start = state[rows].detach().requires_grad_(True)
                leaves = [t[rows].detach().requires_grad_(t.requires_grad) for t in captured]
                limit = spec.bound if bound is None else bound.detach().requires_grad_(need_bound)
                base, grad, _ = inner_gradient(spec.energy_fn.rebind(leaves, rows), start, spec.landscape, rule,
                                               limit, create_graph=True, monitor=UNCHECKED)
                size = _batch_slice(step_size, rows, batch).detach()
                incoming = grad_new[rows]
                if rule.candidate_clamp > 0:  # clamp passes gradient only inside [-c, c]
                    pre = base.detach() - size * grad.detach()
                    incoming = incoming * (pre.abs() <= rule.candidate_clamp).to(incoming.dtype)
                inputs = [start, *leaves, *params, *([limit] if need_bound else [])]
                need = [need_state, *need_captured, *need_params, *([True] if need_bound else [])]
                wanted = [i for i, n in enumerate(need) if n]
                outputs, cotangents = [grad], [-size * incoming]
                if rule.steps_from_candidate and need_state:
                    outputs.append(base)
                    cotangents.append(incoming)
                grads = torch.autograd.grad(outputs, [inputs[i] for i in wanted], cotangents, allow_unused=True)
            if need_state and not rule.steps_from_candidate:
                state_grad[rows] += incoming
            for i, value in zip(wanted, grads, strict=True):
                if value is None:
                    continue
                if i == 0:
                    state_grad[rows] += value
                elif i <= len(captured):
                    captured_grads[i - 1][rows] = value
                elif i <= len(captured) + len(params):
                    j = i - 1 - len(captured)
                    param_grads[j] = value if param_grads[j] is None else param_grads[j] + value
                else:
                    bound_grad += value
            if need_size:
                chunk_size_grad = -(grad.detach() * incoming)
                if size_grad.dim() > 0 and size_grad.shape[0] == batch:
                    size_grad[rows] = chunk_size_grad.sum_to_size(size_grad[rows].shape)
                else:
                    size_grad += chunk_size_grad.sum_to_size(step_size.shape)
        return (None, state_grad, size_grad, bound_grad, *captured_grads, *param_grads)


class _maybe_autocast:
    """Re-enter the forward's autocast state in the backward (which autograd runs with autocast off)."""

    def __init__(self, state: tuple[str, bool, torch.dtype] | None) -> None:
        self.ctx = None if state is None else torch.autocast(state[0], dtype=state[2], enabled=state[1])

    def __enter__(self):
        return None if self.ctx is None else self.ctx.__enter__()

    def __exit__(self, *exc):
        return None if self.ctx is None else self.ctx.__exit__(*exc)


def _split_bound(bound) -> tuple[float | None, torch.Tensor | None]:
    return (None, bound) if torch.is_tensor(bound) else (bound, None)


def rematerialised_step_runner(
    energy_fn: EnergyFn, state: torch.Tensor, step_size: torch.Tensor, landscape: int, rule: StepRule, bound,
    monitor: NonFiniteMonitor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """StepRunner for "mcmc_step": the custom-Function implementation (the default)."""
    if not isinstance(energy_fn, RebindableEnergy):
        raise TypeError("checkpointing=mcmc_step needs an energy function with captured()/rebind()/parameters()")
    captured = energy_fn.captured()
    params = energy_fn.parameters()
    chunk = energy_fn.remat_chunk or state.shape[0]
    constant, tensor = _split_bound(bound)
    spec = _StepSpec(energy_fn, landscape, rule, constant, len(captured), len(params),
                     _autocast_state(state.device), chunk, monitor)
    return RematerialisedStep.apply(spec, state, step_size, tensor, *captured, *params)


def apply_checkpointing(
    model: torch.nn.Module, policy_name: str, remat_chunk: int = 0, step_runner: StepRunner | None = None
) -> None:
    """Set an EnergyBasedTransformer's activation checkpointing, once, from outside the model.

    policy_name: one of POLICIES, or "auto" (left unresolved: the model then refuses a training forward, see
    the module docstring; resolve it before building with `planning.resolve_checkpointing`). remat_chunk:
    sequences per "mcmc_step" recompute chunk (0: the whole micro-batch). step_runner: runs every second-order
    MCMC step in place of the policy's (None: RematerialisedStep under "mcmc_step" policies, plain steps
    otherwise); benchmarks.experimental passes its measured alternatives here.
    """
    if policy_name == "auto":
        model.checkpoint_policy = None
        model.remat_chunk = remat_chunk
        model.step_runner = step_runner  # an explicit runner is kept (a training forward refuses "auto")
        model.energy_model.checkpoint_blocks = False
        return
    policy = parse_policy(policy_name)
    model.checkpoint_policy = policy
    model.remat_chunk = remat_chunk
    model.energy_model.checkpoint_blocks = policy.block
    if step_runner is None and policy.step:
        step_runner = rematerialised_step_runner
    model.step_runner = step_runner


class UnresolvedCheckpointingError(ValueError):
    """A training forward of a model built with checkpointing="auto" that nobody resolved."""


def check_resolved(model: torch.nn.Module) -> None:
    """Refuse a training forward (gradients on) of a model whose "auto" policy was never resolved."""
    if model.checkpoint_policy is None and torch.is_grad_enabled():
        raise UnresolvedCheckpointingError(
            "trainer.checkpointing: 'auto' is resolved before it is applied, not by the model: apply the policy that "
            "planning.resolve_checkpointing(cfg, 'auto', batch_size) returns (`ebt train` plans it itself, "
            f"launch/memory_plan.py) or one of {', '.join(POLICIES)}")


def hardware_flops_per_token(cfg, policy: str) -> float:
    """Model FLOPs (ebt.flops) plus what `policy` recomputes: "mcmc_step" reruns each second-order step's
    forward and inner gradient (2 of its 6 units); "block" reruns each candidate block's forward in the inner
    and in the outer backward (2 units)."""
    arch = cfg.architecture
    from ebt.flops import expected_training_steps, forward_flops_per_token, train_flops_per_token

    model = train_flops_per_token(cfg)
    if cfg.kind != "ebt" or policy in ("none", "auto"):
        return model
    parsed = parse_policy(policy)
    causal_keys = (arch.context_length + 1) / 2
    candidate = forward_flops_per_token(cfg, causal_keys + 1) + 2 * arch.vocab_size * arch.dim + 2 * arch.dim
    second_order_steps = 1 if cfg.thinking.truncate else expected_training_steps(cfg)
    extra = 2 * parsed.step + 2 * parsed.block
    return model + extra * second_order_steps * candidate
