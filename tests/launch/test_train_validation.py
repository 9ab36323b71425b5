"""Validation in `ebt train` is honest: token-weighted (summed NLL over the token count, all-reduced as sums), on
the first trainer.eval_batches global batches of the val split whatever the world size or micro-batch split,
and `ebt eval` on the checkpoint reports the same loss on the same sequences."""

from __future__ import annotations

import json
import math

import pytest
from train_support import read_rows, run_train, tiny_raw, write_config

import data_pipeline
from launch.cli import main
from launch.config import build_config
from launch.trainer import Trainer

EVAL_BATCHES = 2
GLOBAL_BATCH = 4


def manual_val_loss(trainer: Trainer, n_sequences: int) -> tuple[float, int]:
    """Token-weighted loss over the first n_sequences val windows (0: all), one sequence at a time."""
    cfg = trainer.cfg
    loader = data_pipeline.build_eval_loader(cfg.data, split="val",
                                             context_length=cfg.model.architecture.context_length,
                                             micro_batch_size=1)
    nll, count, seen = 0.0, 0, 0
    for batch in loader:
        if n_sequences and seen >= n_sequences:
            break
        total, tokens = trainer.module.eval_loss(trainer.raw_model, batch)
        nll, count, seen = nll + total, count + tokens, seen + 1
    return nll / count, count


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = []

    def make(**trainer_keys) -> Trainer:
        raw = tiny_raw(model={"init_logit_std": 0.5}, trainer={"max_steps": 1, **trainer_keys})
        trainer = Trainer(build_config(raw), log=lambda msg: None)
        trainer.setup()
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.loader.close()


def test_validation_is_token_weighted_over_the_whole_split(make_trainer):
    """eval_batches=0: every val window once; 5 does not divide the window count, so the last batch is short."""
    trainer = make_trainer(micro_batch_size=5, eval_batches=0)
    n_windows = len(data_pipeline.build_eval_loader(trainer.cfg.data, split="val", context_length=16,
                                                    micro_batch_size=1))
    assert n_windows % 5, "the tail batch must be short for this test to tell the two averages apart"
    result = trainer.evaluate()
    expected, tokens = manual_val_loss(trainer, 0)
    assert result["val_tokens"] == tokens == n_windows * 16
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert result["val_ppl"] == pytest.approx(math.exp(min(expected, 700.0)), rel=1e-6)
    assert trainer.evaluate() == result  # same windows, same starts every time


def test_eval_batches_counts_global_batches(make_trainer):
    """eval_batches=2 with micro-batch 2 x 3 accumulation steps: the first 2 x 6 windows, whatever the split."""
    trainer = make_trainer(micro_batch_size=2, grad_accum_steps=3, eval_batches=2)
    result = trainer.evaluate()
    expected, tokens = manual_val_loss(trainer, 12)
    assert result["val_tokens"] == tokens == 12 * 16
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    other = make_trainer(micro_batch_size=6, grad_accum_steps=1, eval_batches=2)
    assert other.evaluate()["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """A 1-rank EBT run (global batch 4 as 1 x 4) with random starts, validated at the end on 2 global batches."""
    root = tmp_path_factory.mktemp("val-one-rank")
    raw = tiny_raw(model={"init_logit_std": 0.5},
                   trainer={"max_steps": 3, "micro_batch_size": GLOBAL_BATCH, "eval_batches": EVAL_BATCHES},
                   checkpoint={"every": 0}, optim={"lr": 1e-3, "warmup_steps": 1})
    config = write_config(root, raw)
    done = run_train(root, config, "name=one")
    assert done.returncode == 0, done.stdout + done.stderr
    return root, config


def final_row(run_dir) -> dict:
    return next(r for r in read_rows(run_dir) if r.get("final"))


@pytest.mark.slow
def test_one_and_two_ranks_report_the_same_val_loss(one_rank_run):
    """Same global batch of 4, as 1 rank x 4 and as 2 ranks x 1 sequence x 2 accumulation steps."""
    root, config = one_rank_run
    two = run_train(root, config, "name=two", "trainer.micro_batch_size=1", "trainer.grad_accum_steps=2", nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    one_row, two_row = final_row(root / "runs" / "one"), final_row(root / "runs" / "two")
    assert two_row["val_loss"] == pytest.approx(one_row["val_loss"], rel=1e-6)
    assert two_row["val_tokens"] == one_row["val_tokens"] == EVAL_BATCHES * GLOBAL_BATCH * 16


def test_ebt_eval_reports_the_trainers_final_val_loss(one_rank_run, tmp_path, capsys):
    """`ebt eval` of the final checkpoint on the same 8 val windows: its System-1 cell is the trainer's val_loss."""
    root, _ = one_rank_run
    run_dir = root / "runs" / "one"
    out = tmp_path / "eval.json"
    n_windows = EVAL_BATCHES * GLOBAL_BATCH
    argv = ["eval", "--checkpoint", str(run_dir), "--steps", "2", "--samples", "1", "--accept-lower", "false",
            "--batch-size", "4", "--max-batches", str(n_windows // 4), "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    source = json.loads(out.read_text())["sources"][0]
    assert source["tokens"] == n_windows * 16
    assert source["base"]["loss"] == pytest.approx(final_row(run_dir)["val_loss"], rel=1e-5)


def test_eval_loss_is_a_token_sum_and_count(make_trainer):
    trainer = make_trainer()
    batch = next(iter(data_pipeline.build_eval_loader(trainer.cfg.data, split="val", context_length=16,
                                                      micro_batch_size=3)))
    total, tokens = trainer.module.eval_loss(trainer.raw_model, batch)
    assert tokens == 3 * 16 and math.isfinite(total) and total > 0
    parts = [trainer.module.eval_loss(trainer.raw_model, batch[i:i + 1]) for i in range(3)]
    assert sum(p[0] for p in parts) == pytest.approx(total, rel=1e-5)  # starts keyed by sequence, not by batch
