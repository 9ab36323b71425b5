"""benchmarks.coord_check's "candidate update" is the logit change a real MCMC step makes (issue 24).

The candidate-update benchmark reads alpha * dE/dx off one energy gradient; the claim it supports (the step keeps
its size across widths under μP) is only about the model's thinking if that number IS the model's step. The oracle
is ebt.inference.descend running one step of ebt.mcmc's loop, noise off, in both update spaces.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.coord_check import _energy_gradients
from ebt import build_model
from ebt.inference import descend
from ebt.mcmc import ThinkingLoop
from tests.helpers.model_configs import model_config


@pytest.mark.parametrize("update_space", ["probs", "logits"])
def test_candidate_update_is_one_mcmc_step(update_space: str) -> None:
    torch.manual_seed(0)
    cfg = model_config(kind="ebt", dim=32, n_layers=2, n_heads=2, vocab_size=24, context_length=8,
                       alpha_init=5.0, update_space=update_space)
    model = build_model(cfg).eval().double()
    tokens = torch.randint(24, (2, 8))
    logits = torch.randn(2, 8, 24, dtype=torch.float64)

    _, _, measured = _energy_gradients(model, tokens, logits)

    state, _ = descend(model.energy_fn(tokens), logits, 1, model.alpha.detach(),
                       loop=ThinkingLoop.from_config(cfg), score_final=False)
    # descend's step: y1 = x - alpha dE/dx with x = softmax(y0) (probs) or x = y0 (logits).
    start = torch.softmax(logits, dim=-1) if update_space == "probs" else logits
    change = start - state
    expected = change - change.mean(-1, keepdim=True)
    # float64 and the same ops on both sides: only summation order differs (~1e-16 relative per op).
    torch.testing.assert_close(measured, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 1e-3  # a step that moves nothing would make the comparison empty
