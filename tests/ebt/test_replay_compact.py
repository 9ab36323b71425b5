"""replay.top_k (ebt/replay.py, issue 22): the compact buffer keeps what a replayed chain's candidate distribution
needs, its size does not grow with the vocabulary, and what it stores is what it replays (exact resume)."""

from __future__ import annotations

import pytest
import torch
from ebt_factories import tiny_model
from model_configs import model_config

from ebt.replay import ReplayBuffer


def _filled(vocab: int, top_k: int, capacity: int = 6, length: int = 5) -> tuple[ReplayBuffer, torch.Tensor]:
    buffer = ReplayBuffer(capacity, 0.5, top_k=top_k)
    logits = 3.0 * torch.randn(capacity, length, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    buffer.push(torch.randint(0, vocab, (capacity, length + 1)), logits)
    return buffer, logits


def test_a_replayed_chain_keeps_its_top_k_probabilities_and_tail_mass():
    buffer, logits = _filled(vocab=50, top_k=5)
    tokens, replayed, count = buffer.mix(torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, 5, 50,
                                         dtype=torch.float64), indices=[0, 1])
    assert count == 2
    want, got = torch.softmax(logits[:2], -1), torch.softmax(replayed[4:], -1)
    top, index = want.topk(5, dim=-1)
    # fp64 logsumexp/log1p/exp round trip: a few ulps of values of size ~10, far below 1e-12.
    torch.testing.assert_close(got.gather(-1, index), top, rtol=0, atol=1e-12)
    torch.testing.assert_close(1 - got.gather(-1, index).sum(-1), 1 - top.sum(-1), rtol=0, atol=1e-12)
    # The rest of the mass is spread evenly over the other 45 entries.
    rest = got.scatter(-1, index, 0.0)
    assert torch.allclose(rest.amax(-1) * 45, rest.sum(-1), rtol=1e-12, atol=0)


def test_the_compact_buffer_does_not_grow_with_the_vocabulary():
    sizes = {}
    for vocab in (64, 4096):
        state = _filled(vocab=vocab, top_k=8)[0].state_dict()
        sizes[vocab] = sum(v.nbytes for v in state.values() if torch.is_tensor(v) and v.dtype != torch.uint8)
    assert sizes[64] == sizes[4096]
    assert ReplayBuffer(2, 0.5).state_dict().get("top_k") is None  # whole logits: the state reads as before


def test_a_tail_with_no_mass_stays_finite():
    buffer = ReplayBuffer(1, 1.0, top_k=2)
    logits = torch.full((1, 1, 6), -1e4, dtype=torch.float64)
    logits[..., :2] = 0.0
    buffer.push(torch.zeros(1, 2, dtype=torch.long), logits)
    _, replayed, _ = buffer.mix(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 6, dtype=torch.float64), [0])
    assert torch.isfinite(replayed).all()


def test_compact_state_holds_k_values_and_refuses_a_whole_logits_model():
    """What the compact state holds; that it resumes exactly is tests/ebt/test_ebt_inputs_and_config.py's
    round-trip test, run for top_k 0 and 3."""
    model = tiny_model(replay_capacity=4, replay_fraction=0.5, replay_top_k=3)
    model.train()
    model.loss(torch.randint(0, 11, (2, 6)))
    state = model.replay_buffer.state_dict()
    assert state["logits"].shape[-1] == 4 and state["indices"].shape[-1] == 3
    whole = tiny_model(replay_capacity=4, replay_fraction=0.5)
    with pytest.raises(ValueError, match="top_k=3.*replay.top_k=0"):
        whole.replay_buffer.load_state_dict(state)


def test_peaked_fp32_logits_compact_to_finite_values():
    """All the mass in the top k in fp32: the top's logsumexp can round above the total's, which once made the
    tail NaN and every replaying step non-finite (seen in the quickstart with top_k=64)."""
    logits = 40.0 * torch.randn(16, 64, 2048, generator=torch.Generator().manual_seed(0))
    top = logits.topk(64, dim=-1).values
    assert (torch.logsumexp(top, -1) > torch.logsumexp(logits, -1)).any()  # the case is present in this batch
    buffer = ReplayBuffer(16, 1.0, top_k=64)
    buffer.push(torch.zeros(16, 65, dtype=torch.long), logits)
    assert torch.isfinite(buffer.logits).all()


def test_a_top_k_of_the_whole_vocabulary_is_refused_with_the_config():
    """Refused when the config is read, not at the first replay push mid-training."""
    with pytest.raises(ValueError, match=r"^replay.top_k: must be below architecture.vocab_size=11"):
        model_config(vocab_size=11, replay_capacity=4, replay_fraction=0.5, replay_top_k=11)
