"""The memory planner counts the EBT replay buffer (issue 22): it is untraced state, alive on every rank for the
whole run, and at a real vocabulary it outweighs the model."""

from __future__ import annotations

import pytest
import torch
from model_configs import model_config

from ebt import ModelConfig
from ebt.replay import ReplayBuffer
from planning import cuda_peak, replay_buffer_bytes, state_bytes


def buffer_at_capacity(cfg: ModelConfig) -> ReplayBuffer:
    """A buffer filled the way training fills it: fresh tokens [B, S+1] and their final fp32 logits [B, S, V]."""
    buffer = ReplayBuffer(cfg.replay.capacity, cfg.replay.fraction, top_k=cfg.replay.top_k)
    length = cfg.architecture.context_length
    for _ in range(3):
        tokens = torch.randint(0, cfg.architecture.vocab_size, (4, length + 1))
        buffer.push(tokens, torch.randn(4, length, cfg.architecture.vocab_size))
    return buffer


@pytest.mark.parametrize("capacity,length,vocab,top_k", [(6, 8, 64, 0), (16, 16, 128, 0), (16, 16, 128, 5)])
def test_the_predicted_buffer_is_the_bytes_the_buffer_holds(capacity, length, vocab, top_k):
    cfg = model_config(vocab_size=vocab, context_length=length, dim=32, n_layers=1, n_heads=2,
                      replay_capacity=capacity, replay_fraction=0.5, replay_top_k=top_k)
    state = buffer_at_capacity(cfg).state_dict()
    held = state["tokens"].nbytes + state["logits"].nbytes + (state["indices"].nbytes if top_k else 0)
    assert replay_buffer_bytes(cfg) == held
    without = model_config(vocab_size=vocab, context_length=length, dim=32, n_layers=1, n_heads=2)
    assert state_bytes(cfg) - state_bytes(without) == held
    assert state_bytes(cfg, shard_world=4) - state_bytes(without, shard_world=4) == held  # never sharded


def test_the_gpu_plan_counts_it_and_a_transformer_has_none():
    cfg = model_config(vocab_size=64, context_length=8, dim=32, n_layers=1, n_heads=2, replay_capacity=8,
                      replay_fraction=0.5)
    plain = model_config(vocab_size=64, context_length=8, dim=32, n_layers=1, n_heads=2)
    assert cuda_peak(cfg, "none", 2).state - cuda_peak(plain, "none", 2).state == replay_buffer_bytes(cfg)
    assert replay_buffer_bytes(model_config(kind="transformer", replay_capacity=8, replay_fraction=0.5)) == 0
