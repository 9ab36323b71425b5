"""Bad input names the argument; sizes, parameter counts and the FLOP model hold."""

import pytest
import torch
from ebt_factories import tiny_model
from model_configs import model_config, sized_config

from ebt import SIZES, build_model
from ebt.draws import Draws
from ebt.flops import parameter_count, train_flops_per_token


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m: m.loss(torch.tensor([[1, 2, 99]])), "tokens"),
        (lambda m: m.loss(torch.tensor([[1, -2, 3]])), "tokens"),
        (lambda m: m.loss(torch.tensor([1, 2, 3])), "tokens"),
        (lambda m: m.loss(torch.tensor([[1.0, 2.0]])), "tokens"),
        (lambda m: m.loss(torch.randint(0, 11, (1, 20))), "tokens"),
        (lambda m: m.energies(torch.tensor([[1, 2]]), torch.rand(1, 3, 11, dtype=torch.float64)), "candidate_probs"),
        (lambda m: m.energies(torch.tensor([[1, 2]]), torch.rand(1, 2, 11, dtype=torch.float64), step=-1), "step"),
        (lambda m: m.loss(torch.tensor([[1, 2, 3]]), init_logits=torch.zeros(1, 2, 5)), "init_logits"),
        (lambda m: m.think(torch.tensor([[1, 2]]), steps=2, selection="median"), "selection"),
        (lambda m: m.think(torch.tensor([[1, 2]]), steps=2, samples=0), "samples"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call(tiny_model())


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"mcmc_steps": 0}, "thinking.mcmc_steps"),
        ({"variant": "fancy"}, "architecture.variant"),
        ({"kind": "rnn"}, "kind"),
        ({"size": "huge"}, "size"),
        ({"dim": 10, "n_heads": 3}, "architecture.dim"),
    ],
)
def test_bad_config_raises_value_error_naming_the_key(fields, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        model_config(**fields)


def test_unknown_size_in_from_size():
    with pytest.raises(ValueError, match="^size:"):
        sized_config("gigantic")


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
@pytest.mark.parametrize("variant", ["default", "time_embed", "adaln"])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_model(kind, variant, tied):
    cfg = model_config(kind=kind, variant=variant, tie_candidate_embedding=tied, vocab_size=50, dim=16, n_heads=2)
    assert parameter_count(cfg) == sum(p.numel() for p in build_model(cfg).parameters())


def test_size_table_and_flop_model():
    assert [SIZES[s].n_layers for s in ("4xs", "xxs", "small", "xl")] == [2, 6, 12, 24]
    ebt = sized_config("xxs", vocab_size=8192, context_length=256)
    tpp = sized_config("xxs", vocab_size=8192, context_length=256, kind="transformer")
    ratio = train_flops_per_token(ebt) / train_flops_per_token(tpp)
    assert 4.5 < ratio < 6.0  # 3 + 2 * 6 units against 3 (ebt/flops.py's unit count)
    uncached = sized_config("xxs", vocab_size=8192, context_length=256, variant="time_embed")
    assert train_flops_per_token(uncached) > train_flops_per_token(ebt)
    more_steps = sized_config("xxs", vocab_size=8192, context_length=256, mcmc_steps=4)
    assert train_flops_per_token(more_steps) > 1.8 * train_flops_per_token(ebt) - 3 * 1e9


def test_non_finite_inner_gradient_raises_a_clear_error():
    from ebt import NonFiniteEnergyGradientError

    model = tiny_model()
    with torch.no_grad():
        model.energy_model.energy_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteEnergyGradientError, match="MCMC step 0"):
        model.loss(torch.randint(0, 11, (1, 5)))


@pytest.mark.parametrize("top_k", [0, 3])  # whole logits (the reference's) and the compact form (ebt/replay.py)
def test_replay_buffer_continues_trajectories_and_round_trips_its_state(top_k):
    model = tiny_model(replay_capacity=4, replay_fraction=0.5, replay_top_k=top_k)
    model.train()
    tokens = torch.randint(0, 11, (2, 6))
    model.loss(tokens)
    assert len(model.replay_buffer) == 2
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.replay_buffer.state_dict().items()}
    _, metrics = model.loss(torch.randint(0, 11, (2, 6)))
    assert metrics["replayed"] == 1.0
    twin = tiny_model(replay_capacity=4, replay_fraction=0.5, replay_top_k=top_k)
    twin.load_state_dict(model.state_dict())
    twin.replay_buffer.load_state_dict(state)
    model.replay_buffer.load_state_dict(state)
    torch.manual_seed(7)
    a = model.loss(tokens)[0]
    torch.manual_seed(7)
    b = twin.loss(tokens)[0]
    assert torch.equal(a, b)


def test_replay_appends_to_the_fresh_batch_and_pushes_only_fresh_sequences():
    """The reference's semantics: no fresh sequence is dropped, no replayed chain is pushed back (duplicated)."""
    model = tiny_model(replay_capacity=8, replay_fraction=0.5)
    model.train()
    first, second = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    init = torch.randn(2, 5, 11, dtype=torch.float64)
    model.loss(first, init_logits=init)
    stored = model.replay_buffer.logits[:2].clone()

    class PickOldest(Draws):
        def replay_indices(self, size, count):
            return [0]

    torch.manual_seed(3)
    loss, metrics = model.loss(second, init_logits=init, draws=PickOldest())
    assert metrics["replayed"] == 1.0
    # Same loss as the explicit batch [second; first[0]] started from [init; first[0]'s stored final state].
    plain = tiny_model()
    plain.load_state_dict(model.state_dict())
    plain.train()
    torch.manual_seed(3)
    expected, _ = plain.loss(torch.cat((second, first[:1])), init_logits=torch.cat((init, stored[:1])))
    assert abs(loss.item() - expected.item()) < 1e-12
    # The buffer holds the four fresh sequences once each, oldest first.
    kept = model.replay_buffer.tokens[[model.replay_buffer.slot(i) for i in range(len(model.replay_buffer))]]
    assert len(model.replay_buffer) == 4 and torch.equal(kept, torch.cat((first, second)))


def test_flops_count_the_steps_random_schemes_run_on_average():
    """Repeated landscapes (2-3 steps of one landscape) cost the mean of a 2-step and a 3-step forward; the
    truncated ones run every step but the last first-order."""
    base = dict(vocab_size=2048, context_length=64, mcmc_steps=1, landscape_repeats=2, landscape_repeats_min=2)
    for truncate in (False, True):
        cfg = sized_config("4xs", truncate=truncate, **base)
        mean = (train_flops_per_token(cfg, mcmc_steps=2) + train_flops_per_token(cfg, mcmc_steps=3)) / 2
        assert train_flops_per_token(cfg) == pytest.approx(mean)
    random_k = sized_config("4xs", vocab_size=2048, context_length=64, mcmc_steps=3, random_steps_min=1)
    assert train_flops_per_token(random_k) == pytest.approx(train_flops_per_token(random_k, mcmc_steps=2))
