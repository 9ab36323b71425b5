"""The one descent loop (ebt.mcmc.run_mcmc) as System 2 runs it (ebt.inference.descend), against a naive loop.

The naive loop below is written from descend's documented semantics only (landscape of step n is
min(n, trained - 1); Langevin noise at the input or after the update, at every step or the first only; the
update on phi(y) or on y; the gradient and state clamps; accept-lower; the final point scored on the last
trained landscape), so it is an oracle independent of the code under test.
"""

import pytest
import torch
from ebt_factories import tiny_model

from ebt import generate
from ebt.inference import descend
from ebt.mcmc import NonFiniteEnergyGradientError, ThinkingLoop

VOCAB = 7


def quadratic_energy(weights: torch.Tensor):
    """E_l(x) [B, S] = sum_v w_l,v * (x_v - 0.1 v)^2 + sin(x_v): a landscape per row of weights [L, V]."""
    target = 0.1 * torch.arange(VOCAB, dtype=torch.float64)

    def energy(x: torch.Tensor, landscape: int) -> torch.Tensor:
        return (weights[landscape] * (x - target) ** 2 + torch.sin(x)).sum(-1)

    return energy


def naive_descend(energy, starts, steps, alpha, trained, loop, accept_lower, noise, first_only, bound, noises):
    state, energies = starts.clone(), []
    draws = iter(noises)
    for n in range(steps):
        landscape = min(n, trained - 1)
        normalize = loop.normalize == "every_step" or (loop.normalize == "first_step" and n == 0)
        noisy = noise > 0 and (n == 0 or not first_only)
        if noisy and loop.langevin_placement == "input":
            state = state + noise * next(draws)
        y = state.clone().requires_grad_(True)
        x = torch.softmax(y, -1) if normalize else y
        if normalize and loop.update_space == "probs":
            x = x.detach().requires_grad_(True)
            wrt = x
        else:
            wrt = y
        e = energy(x, landscape)
        (grad,) = torch.autograd.grad(e.sum(), wrt)
        if bound is not None:
            grad = grad.clamp(-bound, bound)
        proposal = wrt.detach() - alpha * grad
        if loop.candidate_clamp > 0:
            proposal = proposal.clamp(-loop.candidate_clamp, loop.candidate_clamp)
        if noisy and loop.langevin_placement == "after_update":
            proposal = proposal + noise * next(draws)
        if accept_lower:
            px = torch.softmax(proposal, -1) if normalize else proposal
            keep = energy(px, landscape) < e.detach()
            proposal = torch.where(keep[..., None], proposal, state)
        state = proposal
        energies.append(e.detach())
    normalize = loop.normalize == "every_step" or (loop.normalize == "first_step" and steps == 0)
    energies.append(energy(torch.softmax(state, -1) if normalize else state, trained - 1))
    return state, torch.stack(energies)


LOOPS = [
    ThinkingLoop(),
    ThinkingLoop(update_space="logits", langevin_placement="after_update", candidate_clamp=0.8),
    ThinkingLoop(normalize="first_step", candidate_clamp=2.0),
    ThinkingLoop(normalize="never"),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("accept_lower, noise, first_only, bound", [
    (False, 0.0, False, None), (True, 0.0, False, 0.3), (False, 0.5, False, None), (True, 0.5, True, 0.3)])
def test_descend_is_the_naive_descent(loop, accept_lower, noise, first_only, bound):
    weights = torch.tensor([[1.0] * VOCAB, [3.0] * VOCAB, [0.5] * VOCAB], dtype=torch.float64)
    weights = weights * torch.linspace(0.5, 1.5, VOCAB, dtype=torch.float64)
    energy = quadratic_energy(weights)
    starts = torch.randn(2, 3, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps, trained, alpha = 5, 2, torch.tensor(2.5, dtype=torch.float64)
    got_state, got_energies = descend(energy, starts, steps, alpha, trained_landscapes=trained, loop=loop,
                                      accept_lower=accept_lower, noise=noise, noise_first_step_only=first_only,
                                      bound=bound, generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    noises = [torch.randn(starts.shape, generator=generator, dtype=torch.float64) for _ in range(steps)]
    state, energies = naive_descend(energy, starts, steps, alpha, trained, loop, accept_lower, noise, first_only,
                                    bound, noises)
    assert got_energies.shape == (steps + 1, 2, 3)
    torch.testing.assert_close(got_state, state, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_energies, energies, rtol=0, atol=1e-12)
    assert not got_state.requires_grad
    if accept_lower:  # the guard itself: from step 1 on every point is scored on landscape 1
        assert bool((got_energies[2:] <= got_energies[1:-1] + 1e-12).all())


def test_descend_without_the_final_score_returns_the_steps_energies_only():
    energy = quadratic_energy(torch.ones(2, VOCAB, dtype=torch.float64))
    starts = torch.randn(1, 2, VOCAB, dtype=torch.float64)
    scored_state, scored = descend(energy, starts, 3, torch.tensor(1.0, dtype=torch.float64), trained_landscapes=2)
    state, unscored = descend(energy, starts, 3, torch.tensor(1.0, dtype=torch.float64), trained_landscapes=2,
                              score_final=False)
    assert torch.equal(state, scored_state) and torch.equal(unscored, scored[:-1])


def test_a_non_finite_inner_gradient_still_raises_after_the_descent():
    def energy(x, landscape):
        return (x * float("nan")).sum(-1)

    with pytest.raises(NonFiniteEnergyGradientError, match="MCMC step 0"):
        descend(energy, torch.zeros(1, 2, VOCAB), 2, torch.tensor(1.0))


@pytest.mark.parametrize("variant", ["default", "time_embed"])
@pytest.mark.parametrize("samples", [1, 3])
def test_generation_starts_each_position_where_think_over_the_whole_text_does(variant, samples):
    """Generation's cached, incremental path (prefix keys extended per token, one candidate position per step)
    against thinking over the whole text again for every token, with random (keyed) starts."""
    model = tiny_model(variant=variant, mcmc_steps=2, context_length=12)
    assert model.cfg.thinking.init_logit_std > 0
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(4))
    fast = generate(model, prompt, max_new_tokens=5, steps=3, samples=samples, seed=8)
    slow = prompt
    for _ in range(5):
        logits = model.think(slow, steps=3, samples=samples, seed=8).logits[:, -1]
        slow = torch.cat((slow, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(fast, slow)
    assert not torch.equal(generate(model, prompt, max_new_tokens=5, steps=3, samples=samples, seed=9), fast) or \
        samples == 1  # (a different seed usually changes some token; not required of one chain)


def test_generate_thinks_for_the_eval_steps_by_default():
    """One definition of "the trained steps" (ModelConfig.eval_steps, what `ebt generate` and `ebt eval` use):
    with landscape repeats it differs from mcmc_steps."""
    model = tiny_model(mcmc_steps=2, landscape_repeats=2, context_length=12, alpha_init=20.0)
    assert model.cfg.thinking.eval_steps == 4
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(0))
    by_steps = {steps: generate(model, prompt, 6, steps=steps) for steps in (2, 4)}
    assert not torch.equal(by_steps[2], by_steps[4])  # the check below can tell them apart
    assert torch.equal(generate(model, prompt, 6), by_steps[4])
