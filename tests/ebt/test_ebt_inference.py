"""System-2 thinking and cached generation."""

import pytest
import torch
from ebt_factories import tiny_model

from ebt import generate


def test_more_samples_with_min_selection_never_raise_the_final_energy():
    model = tiny_model(mcmc_steps=2)
    tokens = torch.randint(0, 11, (3, 7))
    one = model.think(tokens, steps=4, samples=1, generator=torch.Generator().manual_seed(5))
    four = model.think(tokens, steps=4, samples=4, selection="min", generator=torch.Generator().manual_seed(5))
    # Sample 0 of the 4 is the same chain as the single sample.
    assert (four.energies[:, 0] - one.energies[:, 0]).abs().max() < 1e-10
    assert bool((four.final_energy <= one.final_energy + 1e-12).all())
    assert bool((four.final_energy < one.final_energy - 1e-9).any()), "extra samples should sometimes help"


def test_accept_lower_never_raises_a_tokens_energy():
    model = tiny_model(mcmc_steps=2, alpha_init=40.0)  # big steps overshoot, so plain descent does go up
    tokens = torch.randint(0, 11, (4, 7))
    plain = model.think(tokens, steps=6, samples=2, generator=torch.Generator().manual_seed(2))
    assert bool((plain.energies[:, :, 1:] > plain.energies[:, :, :-1]).any())
    guarded = model.think(tokens, steps=6, samples=2, accept_lower=True, generator=torch.Generator().manual_seed(2))
    assert bool((guarded.energies[:, :, 1:] <= guarded.energies[:, :, :-1]).all())


@pytest.mark.parametrize("selection", ["min", "max", "max_gap"])
def test_selection_picks_the_named_sample(selection):
    model = tiny_model()
    result = model.think(torch.randint(0, 11, (2, 6)), steps=2, samples=3, selection=selection,
                         generator=torch.Generator().manual_seed(0))
    final, first = result.energies[:, :, -1], result.energies[:, :, 0]
    score = {"min": -final, "max": final, "max_gap": first - final}[selection]
    assert torch.equal(result.chosen, score.argmax(dim=1))


def test_think_with_zero_steps_returns_the_starting_logits():
    from ebt.starts import prefix_keyed_starts

    model = tiny_model()
    tokens = torch.randint(0, 11, (2, 6))
    result = model.think(tokens, steps=0, generator=torch.Generator().manual_seed(3), seed=3)
    start = prefix_keyed_starts(tokens, 3, 1, 11, model.cfg.thinking.init_logit_std, model.alpha_raw.dtype)[:, 0]
    assert torch.equal(result.logits, start)


@pytest.mark.parametrize("variant", ["default", "time_embed", "adaln"])
def test_cached_generation_matches_full_recompute(variant):
    model = tiny_model(variant=variant, init_logit_std=0.0, context_length=12)  # zero starts: deterministic
    prompt = torch.randint(0, 11, (2, 3))
    fast = generate(model, prompt, max_new_tokens=5, steps=3)
    slow = prompt
    for _ in range(5):
        logits = model.think(slow, steps=3).logits[:, -1]
        slow = torch.cat((slow, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(fast, slow)


def test_transformer_generation_matches_full_recompute():
    model = tiny_model(kind="transformer", context_length=12)
    prompt = torch.randint(0, 11, (2, 3))
    fast = generate(model, prompt, max_new_tokens=5)
    slow = prompt
    for _ in range(5):
        logits, _ = model.logits(slow)
        slow = torch.cat((slow, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(fast, slow)


def test_top_p_sampling_only_draws_from_the_nucleus():
    from ebt.inference import sample_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_token(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("variant", ["time_embed", "adaln"])
def test_thinking_past_the_trained_steps_reuses_the_last_trained_landscape(variant):
    """Rows of the step table past mcmc_steps - 1 never get a gradient: thinking longer, the final score and the
    accept-lower comparison must all use the last trained landscape, never those rows (poisoned with NaN here)."""
    model = tiny_model(variant=variant, mcmc_steps=2, max_step_embeddings=4)
    table = model.energy_model.step_tokens if variant == "time_embed" else model.energy_model.step_emb.weight
    with torch.no_grad():
        table[2:] = float("nan")
    tokens = torch.randint(0, 11, (2, 6))
    for accept_lower in (False, True):
        result = model.think(tokens, steps=5, samples=2, accept_lower=accept_lower,
                             generator=torch.Generator().manual_seed(1))
        assert bool(torch.isfinite(result.energies).all())
        final = model.energies(tokens, torch.softmax(result.logits, -1), step=1)
        assert (final - result.final_energy).abs().max() < 1e-10
        if accept_lower:  # from step 1 on every point is scored on landscape 1, so energies never rise
            assert bool((result.energies[:, :, 2:] <= result.energies[:, :, 1:-1] + 1e-12).all())
