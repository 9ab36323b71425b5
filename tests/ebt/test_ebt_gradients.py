"""Second-order correctness: the K-step loss gradient matches central finite differences in fp64."""

import pytest
import torch
from ebt_factories import tiny_model

from ebt.mcmc import run_mcmc


def loss_of(model, tokens, init_logits):
    loss, _ = model.loss(tokens, init_logits=init_logits)
    return loss


def finite_difference_check(model, tokens, init_logits, eps=1e-6, tol=1e-6, per_tensor=None):
    """Central differences for every parameter tensor: all elements, or `per_tensor` random ones of each."""
    model.zero_grad()
    loss_of(model, tokens, init_logits).backward()
    analytic = {name: p.grad.clone() for name, p in model.named_parameters()}
    worst = 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            indices = torch.arange(flat.numel())
            if per_tensor is not None and flat.numel() > per_tensor:
                indices = torch.randperm(flat.numel())[:per_tensor]
            numeric = torch.empty(len(indices), dtype=flat.dtype)
            for slot, index in enumerate(indices.tolist()):
                original = flat[index].item()
                flat[index] = original + eps
                up = loss_of(model, tokens, init_logits).item()
                flat[index] = original - eps
                down = loss_of(model, tokens, init_logits).item()
                flat[index] = original
                numeric[slot] = (up - down) / (2 * eps)
            error = (numeric - analytic[name].view(-1)[indices]).abs().max().item()
            scale = max(1.0, numeric.abs().max().item())
            assert error < tol * scale, f"{name}: finite differences disagree by {error:.3e}"
            worst = max(worst, error)
    return worst


# Finite differences see the whole chain, so these run with detach_steps=False (the full second-order gradient);
# detached steps are checked against the function they define in test_detached_steps_... below.
def test_every_parameter_element_matches_finite_differences_at_k2():
    model = tiny_model(mcmc_steps=2, dim=4, n_layers=2, context_length=4, detach_steps=False)
    tokens = torch.randint(0, 11, (2, 4))
    init_logits = torch.randn(2, 3, 11, dtype=torch.float64)
    finite_difference_check(model, tokens, init_logits)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_loss_gradient_matches_finite_differences(steps):
    for update_space in ("probs", "logits"):
        model = tiny_model(mcmc_steps=steps, dim=8, n_layers=2, context_length=4, detach_steps=False,
                           update_space=update_space)
        tokens = torch.randint(0, 11, (2, 4))
        init_logits = torch.randn(2, 3, 11, dtype=torch.float64)
        # The logits update is strongly curved at alpha 3, K 3: a smaller eps keeps the O(eps^2) error small.
        finite_difference_check(model, tokens, init_logits, per_tensor=6, eps=1e-6 if update_space == "probs" else 1e-7)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_truncated_gradient_is_the_last_steps_gradient_from_a_detached_start(steps):
    """truncate=True differentiates only the last step: its gradient must equal the exact (finite-difference
    checked) gradient of a one-step loss started where the first K-1 detached steps ended."""
    truncated = tiny_model(mcmc_steps=steps, truncate=True, dim=8, n_layers=2, context_length=4)
    one_step = tiny_model(mcmc_steps=1, dim=8, n_layers=2, context_length=4)
    one_step.load_state_dict(truncated.state_dict())
    tokens = torch.randint(0, 11, (2, 4))
    init_logits = torch.randn(2, 3, 11, dtype=torch.float64)
    start = init_logits
    if steps > 1:
        trajectory = run_mcmc(truncated.energy_fn(tokens[:, :-1]), init_logits, steps - 1, truncated.alpha,
                              create_graph=False)
        start = trajectory.logits[-1].detach()
    truncated.zero_grad()
    loss_truncated = loss_of(truncated, tokens, init_logits)
    loss_truncated.backward()
    one_step.zero_grad()
    loss_one = loss_of(one_step, tokens, start)
    loss_one.backward()
    assert abs(loss_truncated.item() - loss_one.item()) < 1e-12
    for (name, a), b in zip(truncated.named_parameters(), one_step.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() < 1e-12, name
    finite_difference_check(one_step, tokens, start, per_tensor=6)


@pytest.mark.parametrize("variant", ["time_embed", "adaln"])
def test_step_conditioned_variants_match_finite_differences(variant):
    model = tiny_model(variant=variant, mcmc_steps=2, dim=8, n_layers=2, context_length=4, detach_steps=False)
    tokens = torch.randint(0, 11, (2, 4))
    init_logits = torch.randn(2, 3, 11, dtype=torch.float64)
    finite_difference_check(model, tokens, init_logits, per_tensor=6)


def test_detached_steps_give_the_gradient_of_steps_from_fixed_starts():
    """detach_steps (the reference's default): each step's loss is differentiated as if its start were a
    constant. That is the exact (finite-difference checked) gradient of the mean of one-step losses started
    where the chain was."""
    detached = tiny_model(mcmc_steps=3, dim=8, n_layers=2, context_length=4)
    tokens = torch.randint(0, 11, (2, 4))
    init_logits = torch.randn(2, 3, 11, dtype=torch.float64)
    with torch.no_grad():
        starts = [init_logits, *run_mcmc(detached.energy_fn(tokens[:, :-1]), init_logits, 2, detached.alpha,
                                         loop=detached.thinking_loop, create_graph=False).logits]

    class FixedStarts(torch.nn.Module):
        """mean over k of the one-step loss from starts[k] on landscape k."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def loss(self, tokens, init_logits):
            losses = []
            for landscape, start in enumerate(starts):
                energy = self.model.energy_fn(tokens[:, :-1])
                step = run_mcmc(energy, start, [landscape], self.model.alpha, loop=self.model.thinking_loop,
                                create_graph=True)
                losses.append(torch.nn.functional.cross_entropy(step.logits[0].flatten(0, 1), tokens[:, 1:].flatten()))
            return torch.stack(losses).mean(), {}

    detached.zero_grad()
    loss_of(detached, tokens, init_logits).backward()
    fixed = FixedStarts(detached)
    fixed_loss, _ = fixed.loss(tokens, init_logits)
    analytic = {name: p.grad.clone() for name, p in detached.named_parameters()}
    assert abs(fixed_loss.item() - loss_of(detached, tokens, init_logits).item()) < 1e-12
    worst = finite_difference_check(fixed, tokens, init_logits, per_tensor=4)
    for name, param in fixed.named_parameters():
        assert (param.grad - analytic[name.removeprefix("model.")]).abs().max() < 1e-12, name
    assert worst < 1e-6


def test_energy_parameters_learn_only_through_second_order_terms():
    """Detaching the inner gradient (truncating every step) leaves the energy model without gradient."""
    model = tiny_model(mcmc_steps=1)
    tokens = torch.randint(0, 11, (2, 5))
    logits = torch.randn(2, 4, 11, dtype=torch.float64, requires_grad=True)
    energy = model.energies(tokens[:, :-1], torch.softmax(logits, -1))
    (grad,) = torch.autograd.grad(energy.sum(), logits)  # no create_graph
    loss = torch.nn.functional.cross_entropy((logits - model.alpha * grad).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is None for p in model.energy_model.parameters())
    model.zero_grad()
    model.loss(tokens, init_logits=logits.detach())[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.energy_model.parameters())


def test_s2_semantics_match_finite_differences():
    """The S2 preset's levers together (no detach, noise at the step input, per-token step sizes, repeated
    landscapes, the reference's alpha-dependent clamp), with their random draws fixed so the loss is a
    deterministic function of the parameters. Truncation is left out: like detaching, it drops terms on purpose
    (earlier steps' inner gradients are constants), which the reference parity tests check instead."""
    from ebt.draws import Draws

    model = tiny_model(variant="time_embed", mcmc_steps=1, landscape_repeats=2, landscape_repeats_min=2,
                       truncate=False, detach_steps=False, alpha_random_scale=2.0, langevin_noise_std=0.3,
                       grad_clamp=0.8, dim=8, n_layers=2, context_length=4)
    model.train()
    generator = torch.Generator().manual_seed(5)
    uniform = torch.rand(2, 3, 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 2, 3, 11, generator=generator, dtype=torch.float64)

    class Fixed(Draws):
        def alpha_uniform(self, shape, like):
            return uniform

        def langevin(self, executed_step, like):
            return noise[executed_step]

        def repeats(self, landscape, low, high):
            return 3

    class Deterministic(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def loss(self, tokens, init_logits):
            return self.inner.loss(tokens, init_logits=init_logits, draws=Fixed())

    tokens = torch.randint(0, 11, (2, 4))
    init_logits = torch.randn(2, 3, 11, dtype=torch.float64)
    finite_difference_check(Deterministic(model), tokens, init_logits, per_tensor=5)
