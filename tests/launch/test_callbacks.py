"""The training-loop callbacks (launch/callbacks/) on a stand-in trainer: checkpoint cadence and preemption,
evaluation cadence, which rows metrics.jsonl and wandb get, progress lines, and the default order."""

from __future__ import annotations

import io
import json
import signal
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.callbacks import (
    PREEMPTED,
    CheckpointCallback,
    EvaluationCallback,
    MetricsCallback,
    ProgressCallback,
    WandbCallback,
    default_callbacks,
)
from launch.config import LoggingConfig, build_config
from launch.signals import PreemptionFlag

VAL = {"val_loss": 2.0, "val_ppl": 7.389, "val_tokens": 64}


class FakeTrainer:
    """What the callbacks read from a Trainer, with the expensive parts (evaluate, save_checkpoint) recorded."""

    def __init__(self, run_dir: Path, step: int = 0, is_main: bool = True) -> None:
        self.run_dir = run_dir
        self.step = step
        self.tokens = 0
        self.is_main = is_main
        self.tokens_per_step = 128
        self.flops_per_token = 1e6
        self.peak_flops = 1e12
        self.peak_flops_source = "config (trainer.peak_flops)"
        self.world = 1
        self.device = torch.device("cpu")
        self.preempt = PreemptionFlag()
        self.preempt_agreed = False
        self.stop_reason: str | None = None
        self.saved: list[int] = []
        self.waits: list[int] = []  # the steps at which a callback waited for a background write to end
        self.evaluated: list[int] = []
        self.logs: list[str] = []
        self.wandb_id = "abc123"
        self.user_cfg = build_config({"name": "fake", "model": {"kind": "ebt", "architecture": {"vocab_size": 64}}})
        self.cfg = self.user_cfg
        self.memory_plan = None
        self.step_time = self.data_time = 0.0

    def save_checkpoint(self, wait: bool = True) -> None:
        self.saved.append(self.step)
        if wait:
            self.waits.append(self.step)

    def wait_for_checkpoint(self) -> None:
        self.waits.append(self.step)

    def evaluate(self) -> dict[str, float]:
        self.evaluated.append(self.step)
        return dict(VAL)

    def log(self, message: str) -> None:
        self.logs.append(message)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def take_step_times(self) -> tuple[float, float]:
        times = (self.step_time, self.data_time)
        self.step_time = self.data_time = 0.0
        return times


def run_steps(trainer: FakeTrainer, callbacks: list, steps: int, preempt_at: int | None = None) -> list[dict]:
    """The hooks in Trainer.fit's order for `steps` steps (or until a callback stops the loop); the rows."""
    rows = []
    for cb in callbacks:
        cb.on_fit_start(trainer)
    for cb in callbacks:
        cb.on_loop_start(trainer)
    while trainer.step < steps and trainer.stop_reason is None:
        trainer.step += 1
        trainer.tokens += trainer.tokens_per_step
        trainer.step_time += 0.01
        trainer.preempt_agreed = trainer.step == preempt_at
        row: dict[str, Any] = {"step": trainer.step, "tokens": trainer.tokens, "loss": 5.0 - trainer.step / 10}
        for cb in callbacks:
            cb.on_step_end(trainer, row)
        rows.append(row)
    for cb in callbacks:
        cb.on_loop_end(trainer)
    if trainer.stop_reason is None:
        final: dict[str, Any] = {"step": trainer.step, "tokens": trainer.tokens, "final": True}
        for cb in callbacks:
            cb.on_train_end(trainer, final)
        rows.append(final)
    for cb in reversed(callbacks):
        cb.on_fit_end(trainer, None)
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_every_n_steps_and_at_the_end(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [CheckpointCallback(every=4, save_final=True)], steps=10)
    assert trainer.saved == [4, 8, 10] and trainer.stop_reason is None


def test_no_second_final_checkpoint_when_the_last_step_was_saved_and_none_without_save_final(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [CheckpointCallback(every=4, save_final=True)], steps=8)
    assert trainer.saved == [4, 8]
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [CheckpointCallback(every=0, save_final=False)], steps=5)
    assert trainer.saved == []


def test_a_resumed_run_already_at_its_last_step_saves_nothing_again(tmp_path):
    trainer = FakeTrainer(tmp_path, step=6)  # resumed from the checkpoint at step 6 of 6
    run_steps(trainer, [CheckpointCallback(every=4, save_final=True)], steps=6)
    assert trainer.saved == []


def test_preemption_saves_at_the_agreed_step_logs_and_stops_without_a_final_checkpoint(tmp_path):
    trainer = FakeTrainer(tmp_path)
    rows = run_steps(trainer, [CheckpointCallback(every=4, save_final=True)], steps=10, preempt_at=6)
    assert trainer.saved == [4, 6] and trainer.stop_reason == PREEMPTED
    assert [r["step"] for r in rows] == list(range(1, 7))  # no final row after a preemption
    assert trainer.logs == ["preemption signal: saved checkpoint at step 6; exiting"]


def test_periodic_saves_do_not_wait_for_the_write_but_preemption_and_the_end_do(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [CheckpointCallback(every=2, save_final=True)], steps=10, preempt_at=7)
    assert trainer.saved == [2, 4, 6, 7] and trainer.waits and set(trainer.waits) == {7}
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [CheckpointCallback(every=4, save_final=True)], steps=10)
    assert trainer.saved == [4, 8, 10] and set(trainer.waits) == {10}


def test_preemption_at_a_checkpoint_step_saves_once(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [CheckpointCallback(every=4, save_final=True)], steps=10, preempt_at=4)
    assert trainer.saved == [4]


def test_the_preemption_handler_is_installed_for_the_fit_only(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    trainer = FakeTrainer(tmp_path)
    callback = CheckpointCallback(every=0, save_final=False)
    callback.on_fit_start(trainer)
    try:
        signal.raise_signal(signal.SIGUSR2)
        assert trainer.preempt.requested  # flagged, not fatal: train_step's all-reduce carries it
    finally:
        callback.on_fit_end(trainer, None)
    assert signal.getsignal(signal.SIGUSR2) == before


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_every_n_steps_adds_val_fields_and_eval_time(tmp_path):
    trainer = FakeTrainer(tmp_path)
    rows = run_steps(trainer, [EvaluationCallback(every=3)], steps=7)
    assert trainer.evaluated == [3, 6, 7]  # the last is the final evaluation
    for row in rows[:-1]:
        assert ("val_loss" in row) == (row["step"] % 3 == 0)
        assert ("eval_s" in row) == (row["step"] % 3 == 0)
    assert rows[-1] == {"step": 7, "tokens": 7 * 128, "final": True, **VAL}  # no eval_s in the final row


def test_evaluation_every_0_evaluates_only_at_the_end_and_not_after_a_preemption(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [EvaluationCallback(every=0)], steps=5)
    assert trainer.evaluated == [5]
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [EvaluationCallback(every=0), CheckpointCallback(every=0, save_final=True)], steps=5,
              preempt_at=2)
    assert trainer.evaluated == []


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_rows_at_log_every_or_with_val_fields_and_the_final_row(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [EvaluationCallback(every=5), MetricsCallback(log_every=3)], steps=10)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 5, 6, 9, 10, 10]
    for row in rows[:-1]:
        assert {"tokens_per_s", "mfu", "compute_frac", "data_frac", "peak_mem_mb", "time"} <= row.keys()
    assert [r.get("peak_flops_source") for r in rows] == ["config (trainer.peak_flops)"] + [None] * 5
    assert rows[-1] == {"step": 10, "tokens": 10 * 128, "final": True, **VAL}


def test_metrics_timing_covers_the_steps_since_the_last_row(tmp_path):
    trainer = FakeTrainer(tmp_path)
    run_steps(trainer, [MetricsCallback(log_every=2)], steps=4)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if not r.get("final")]
    assert trainer.step_time == 0.0  # taken (and reset) by each logged row
    for row in rows:
        assert row["compute_frac"] > 0 and row["data_frac"] == 0.0
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * 1e6 / 1e12)


def test_metrics_cut_the_file_back_to_the_step_a_run_resumes_from(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 3, "final": True}]))
    trainer = FakeTrainer(tmp_path, step=2)
    run_steps(trainer, [MetricsCallback(log_every=1)], steps=3)
    assert [(r["step"], bool(r.get("final"))) for r in read_jsonl(path)] == [(1, False), (2, False), (3, False),
                                                                          (3, True)]


def test_metrics_are_written_on_rank_0_only(tmp_path):
    run_steps(FakeTrainer(tmp_path, is_main=False), [MetricsCallback(log_every=1)], steps=3)
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self, **kwargs: Any) -> None:
        self.init = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, row: dict, step: int) -> None:
        self.logged.append((row, step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return runs


def test_wandb_resumes_by_id_logs_the_metrics_rows_and_sums_up_the_final_one(tmp_path, fake_wandb):
    trainer = FakeTrainer(tmp_path)
    callbacks = [EvaluationCallback(every=4), MetricsCallback(log_every=3), WandbCallback(LoggingConfig(), 3)]
    run_steps(trainer, callbacks, steps=6)
    (run,) = fake_wandb
    assert run.init["id"] == "abc123" and run.init["resume"] == "allow" and run.init["name"] == "fake"
    assert run.init["dir"] == str(tmp_path) and run.init["config"]["name"] == "fake"
    assert (tmp_path / "wandb_id").read_text() == "abc123"
    assert [step for _, step in run.logged] == [3, 4, 6]  # the metrics.jsonl rows, by the same rule
    assert all("step" not in row and "tokens_per_s" in row for row, _ in run.logged)
    assert run.summary == VAL and run.finished


def test_wandb_starts_nothing_off_rank_0(tmp_path, fake_wandb):
    run_steps(FakeTrainer(tmp_path, is_main=False), [WandbCallback(LoggingConfig(), 1)], steps=2)
    assert fake_wandb == [] and not (tmp_path / "wandb_id").exists()


# ---------------------------------------------------------------------------------------------- progress


def test_progress_writes_plain_lines_off_a_terminal_and_closes_when_the_loop_ends(tmp_path):
    stream = io.StringIO()
    progress = ProgressCallback(enabled=True, total=20, stream=stream)
    run_steps(FakeTrainer(tmp_path), [EvaluationCallback(every=10), progress], steps=20)
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [f"{s}/20" for s in range(2, 21, 2)]
    assert "val_ppl" not in lines[3] and "val_ppl 7.4" in lines[4]
    assert progress.progress is None


def test_progress_is_silent_when_disabled_or_off_rank_0(tmp_path):
    for enabled, is_main in ((False, True), (True, False)):
        stream = io.StringIO()
        run_steps(FakeTrainer(tmp_path, is_main=is_main), [ProgressCallback(enabled, 4, stream=stream)], steps=4)
        assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------------------- defaults


def test_default_callbacks_follow_the_config_in_the_order_the_logs_need():
    raw = {"name": "x", "model": {"kind": "ebt", "architecture": {"vocab_size": 64}},
           "trainer": {"eval_every": 7, "log_every": 3, "max_steps": 50},
           "checkpoint": {"every": 9, "save_final": False}, "logging": {"wandb": True, "progress": False}}
    callbacks = default_callbacks(build_config(raw))
    assert [type(c) for c in callbacks] == [EvaluationCallback, MetricsCallback, WandbCallback, ProgressCallback,
                                            CheckpointCallback]
    evaluation, metrics, wandb, progress, checkpoint = callbacks
    assert (evaluation.every, metrics.log_every, wandb.log_every) == (7, 3, 3)
    assert (progress.enabled, progress.total, checkpoint.every, checkpoint.save_final) == (False, 50, 9, False)
    raw["logging"]["wandb"] = False
    assert WandbCallback not in [type(c) for c in default_callbacks(build_config(raw))]


# ---------------------------------------------------------------------------------------------- Trainer.fit


def stub_trainer(tmp_path: Path, callbacks: list, steps: int, fail_at: int | None = None):
    """Trainer.fit's real loop over a stand-in step (nothing is built: train_step only counts)."""
    from launch.trainer import Trainer

    class StubTrainer(FakeTrainer, Trainer):
        request_stop = Trainer.request_stop  # the trainer's own, not the stand-in's
        take_step_times = Trainer.take_step_times

        def __init__(self) -> None:
            FakeTrainer.__init__(self, tmp_path)
            self.cfg = build_config({"name": "fake", "model": {"kind": "ebt", "architecture": {"vocab_size": 64}},
                                     "trainer": {"max_steps": steps}})
            self.callbacks = callbacks
            self.nonfinite_total = 0
            self.last_eval: dict = {}

        def train_step(self) -> dict[str, Any]:
            if self.step + 1 == fail_at:
                raise RuntimeError("step failed")
            self.step += 1
            self.tokens += self.tokens_per_step
            return {"step": self.step, "tokens": self.tokens}

        def evaluate(self) -> dict[str, float]:
            self.last_eval = FakeTrainer.evaluate(self)
            return self.last_eval

    return StubTrainer()


class Recorder(CheckpointCallback):
    """Records every hook (and stops like the checkpoint callback would on preemption, at `stop_at`)."""

    def __init__(self, name: str, calls: list, stop_at: int | None = None, fail_start: bool = False) -> None:
        self.name, self.calls, self.stop_at, self.fail_start = name, calls, stop_at, fail_start

    def on_fit_start(self, trainer):
        self.calls.append((self.name, "fit_start"))
        if self.fail_start:
            raise RuntimeError("start failed")

    def on_loop_start(self, trainer):
        self.calls.append((self.name, "loop_start"))

    def on_step_end(self, trainer, row):
        self.calls.append((self.name, f"step {row['step']}"))
        if trainer.step == self.stop_at:
            trainer.request_stop(PREEMPTED)

    def on_loop_end(self, trainer):
        self.calls.append((self.name, "loop_end"))

    def on_train_end(self, trainer, row):
        self.calls.append((self.name, f"train_end {sorted(row)}"))

    def on_fit_end(self, trainer, result):
        self.calls.append((self.name, f"fit_end {None if result is None else result['step']}"))


def test_fit_calls_the_hooks_in_order_and_unwinds_in_reverse(tmp_path):
    calls: list = []
    trainer = stub_trainer(tmp_path, [EvaluationCallback(0), Recorder("a", calls), Recorder("b", calls)], steps=2)
    result = trainer.fit()
    assert calls == [("a", "fit_start"), ("b", "fit_start"), ("a", "loop_start"), ("b", "loop_start"),
                     ("a", "step 1"), ("b", "step 1"), ("a", "step 2"), ("b", "step 2"),
                     ("a", "loop_end"), ("b", "loop_end"),
                     ("a", "train_end ['final', 'step', 'tokens', 'val_loss', 'val_ppl', 'val_tokens']"),
                     ("b", "train_end ['final', 'step', 'tokens', 'val_loss', 'val_ppl', 'val_tokens']"),
                     ("b", "fit_end 2"), ("a", "fit_end 2")]
    assert result == {"step": 2, "tokens": 256, "run_dir": str(tmp_path), "preempted": False,
                      "nonfinite_steps": 0, **VAL}


def test_a_stop_request_ends_the_loop_after_that_step_without_the_final_part(tmp_path):
    calls: list = []
    trainer = stub_trainer(tmp_path, [Recorder("a", calls, stop_at=2), Recorder("b", calls)], steps=5)
    result = trainer.fit()
    assert ("b", "step 2") in calls and ("a", "step 3") not in calls  # the rest of the list still saw step 2
    assert not any("train_end" in call for _, call in calls)
    assert result["preempted"] and result["step"] == 2 and "val_loss" not in result


def test_fit_tears_down_what_started_when_something_raises(tmp_path):
    calls: list = []
    trainer = stub_trainer(tmp_path, [Recorder("a", calls), Recorder("b", calls)], steps=5, fail_at=2)
    with pytest.raises(RuntimeError, match="step failed"):
        trainer.fit()
    assert calls[-2:] == [("b", "fit_end None"), ("a", "fit_end None")]
    calls.clear()
    trainer = stub_trainer(tmp_path, [Recorder("a", calls), Recorder("b", calls, fail_start=True),
                                      Recorder("c", calls)], steps=5)
    with pytest.raises(RuntimeError, match="start failed"):
        trainer.fit()
    assert calls == [("a", "fit_start"), ("b", "fit_start"), ("a", "fit_end None")]


def test_the_default_callbacks_on_the_real_loop_write_rows_checkpoint_and_stop_on_preemption(tmp_path):
    cfg = build_config({"name": "fake", "model": {"kind": "ebt", "architecture": {"vocab_size": 64}},
                        "trainer": {"max_steps": 6, "log_every": 2, "eval_every": 3},
                        "checkpoint": {"every": 4}, "logging": {"wandb": False, "progress": False}})
    trainer = stub_trainer(tmp_path, default_callbacks(cfg), steps=6)
    assert trainer.fit()["val_loss"] == VAL["val_loss"]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], "val_loss" in r, bool(r.get("final"))) for r in rows] == \
        [(2, False, False), (3, True, False), (4, False, False), (6, True, False), (6, True, True)]
    assert trainer.saved == [4, 6] and trainer.evaluated == [3, 6, 6]
