"""EBT initial candidates are keyed by sequence, so an EBT run depends on its global batch only: not on the
world size, the micro-batch split or a sequence's position."""

from __future__ import annotations

import pytest
import torch
from train_support import read_rows, run_train, tiny_raw, write_config

from ebt.starts import sequence_keyed_starts


def starts(tokens: torch.Tensor, seed: int = 0, step: int = 3) -> torch.Tensor:
    return sequence_keyed_starts(tokens, seed, step, vocab_size=50, std=0.5, dtype=torch.float32)


def test_a_sequence_gets_its_start_wherever_it_lands():
    tokens = torch.randint(0, 50, (6, 9), generator=torch.Generator().manual_seed(0))
    whole = starts(tokens)
    assert whole.shape == (6, 8, 50)
    assert torch.equal(torch.cat([starts(tokens[:2]), starts(tokens[2:])]), whole)  # split over ranks/micro
    assert torch.equal(starts(tokens.flip(0)), whole.flip(0))  # position in the batch
    assert not torch.equal(starts(tokens, step=4), whole) and not torch.equal(starts(tokens, seed=1), whole)
    assert not torch.equal(whole[0], whole[1])
    assert whole.std().item() == pytest.approx(0.5, rel=0.05)


@pytest.mark.slow
def test_two_ranks_train_what_one_rank_trains(tmp_path):
    """Same global batch of 4, as 1 x 4 and as 2 ranks x 2: per-step losses agree to float rounding."""
    raw = tiny_raw(model={"init_logit_std": 0.5}, trainer={"max_steps": 4, "micro_batch_size": 4},
                   checkpoint={"every": 0}, optim={"lr": 1e-3, "warmup_steps": 1})
    config = write_config(tmp_path, raw)
    one = run_train(tmp_path, config, "name=one")
    assert one.returncode == 0, one.stdout + one.stderr
    two = run_train(tmp_path, config, "name=two", "trainer.micro_batch_size=2", nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    losses = {name: [r["loss"] for r in read_rows(tmp_path / "runs" / name) if not r.get("final")]
              for name in ("one", "two")}
    assert len(losses["one"]) == 4
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5, abs=1e-6)
