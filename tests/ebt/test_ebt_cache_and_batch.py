"""The context cache is exact, and sequences in a batch never influence each other."""

import pytest
import torch
from ebt_factories import tiny_model


def loss_and_grads(model, tokens, init_logits):
    model.zero_grad()
    loss, _ = model.loss(tokens, init_logits=init_logits)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["default", "adaln"])
@pytest.mark.parametrize("steps", [2, 3])
def test_context_cache_gives_identical_loss_and_gradients(variant, steps):
    # adaln caches its real stream only when that stream is not modulated (adaln_real_stream=False).
    cached = tiny_model(variant=variant, mcmc_steps=steps, use_context_cache=True, adaln_real_stream=False)
    recomputed = tiny_model(variant=variant, mcmc_steps=steps, use_context_cache=False, adaln_real_stream=False)
    recomputed.load_state_dict(cached.state_dict())
    assert cached.cfg.caches_context and not recomputed.cfg.caches_context
    tokens = torch.randint(0, 11, (3, 7))
    init_logits = torch.randn(3, 6, 11, dtype=torch.float64)
    loss_a, grads_a = loss_and_grads(cached, tokens, init_logits)
    loss_b, grads_b = loss_and_grads(recomputed, tokens, init_logits)
    assert abs(loss_a - loss_b) < 1e-10
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() < 1e-10, name


def test_cache_computes_real_stream_once_per_forward(monkeypatch):
    model = tiny_model(mcmc_steps=3)
    calls = []
    original = model.energy_model.context
    monkeypatch.setattr(model.energy_model, "context", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.loss(torch.randint(0, 11, (2, 6)))
    assert len(calls) == 1


@pytest.mark.parametrize("variant", ["default", "time_embed", "adaln"])
def test_sequences_do_not_influence_each_other(variant):
    model = tiny_model(variant=variant, mcmc_steps=2)
    tokens = torch.randint(0, 11, (3, 7))
    init_logits = torch.randn(3, 6, 11, dtype=torch.float64)
    probs = torch.softmax(init_logits, -1)
    together = model.energies(tokens[:, :-1], probs)
    for row in range(3):
        alone = model.energies(tokens[row : row + 1, :-1], probs[row : row + 1])
        assert (together[row] - alone[0]).abs().max() < 1e-12
    # Refined logits of a sequence depend only on that sequence.
    starts = init_logits[:, None]
    batch_think = model.think(tokens[:, :-1], steps=3, starts=starts)
    for row in range(3):
        single = model.think(tokens[row : row + 1, :-1], steps=3, starts=starts[row : row + 1])
        assert (batch_think.logits[row] - single.logits[0]).abs().max() < 1e-10
    # Gradient contributions add up: mean loss over 3 equal-length sequences = mean of the three alone.
    _, grads_all = loss_and_grads(model, tokens, init_logits)
    summed = None
    for row in range(3):
        _, grads = loss_and_grads(model, tokens[row : row + 1], init_logits[row : row + 1])
        summed = grads if summed is None else {n: summed[n] + grads[n] for n in grads}
    for name in grads_all:
        # Reduction order differs between one batch and three, so allow fp64 round-off (sums of ~1e2 terms).
        assert torch.allclose(grads_all[name], summed[name] / 3, rtol=1e-8, atol=1e-8), name
