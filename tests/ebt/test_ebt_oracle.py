"""Contract: E_i equals the last-position energy of a plain causal transformer on [x_0..x_i, p_i]."""

import pytest
import torch
from ebt_factories import tiny_model
from ebt_oracle import oracle_energies


@pytest.mark.parametrize("variant", ["default", "time_embed", "adaln", "adaln-candidates"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_energies_match_naive_causal_lm(variant, seed):
    # adaln modulates both streams as the reference does; adaln-candidates only the candidate stream.
    variant, _, scope = variant.partition("-")
    generator = torch.Generator().manual_seed(seed)
    dims = [(8, 2), (12, 3), (16, 2)][seed]
    length = int(torch.randint(1, 7, (), generator=generator))
    batch = int(torch.randint(1, 4, (), generator=generator))
    model = tiny_model(
        seed, variant=variant, dim=dims[0], n_heads=dims[1], n_layers=1 + seed % 3,
        tie_candidate_embedding=seed != 1, adaln_real_stream=scope != "candidates",
    )
    tokens = torch.randint(0, model.cfg.architecture.vocab_size, (batch, length), generator=generator)
    logits = torch.randn(batch, length, model.cfg.architecture.vocab_size, generator=generator, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    for step in (0, 1, 5):  # past the trained landscapes (and the table): both reuse the last trained one
        got = model.energies(tokens, probs, step=step)
        want = oracle_energies(model, tokens, probs, step)
        assert (got - want).abs().max().item() < 1e-9, (variant, step)


def test_step_conditioning_changes_energy_only_for_conditioned_variants():
    tokens = torch.randint(0, 11, (2, 5))
    probs = torch.softmax(torch.randn(2, 5, 11, dtype=torch.float64), -1)
    for variant, conditioned in (("default", False), ("time_embed", True), ("adaln", True)):
        model = tiny_model(variant=variant)
        differs = (model.energies(tokens, probs, 0) - model.energies(tokens, probs, 1)).abs().max() > 1e-6
        assert bool(differs) == conditioned, variant
