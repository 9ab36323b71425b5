"""Re-running `ebt train` on an existing run: a finished run is reported and left alone, a changed LR schedule is
refused (or applied, with --allow-schedule-change), another process count is refused, `--nproc` says what it
does to the global batch, and the progress bar writes plain lines when stderr is not a terminal."""

from __future__ import annotations

import io

import pytest
from train_support import file_tree, read_rows, tiny_raw, write_config

import launch.trainer
from launch.callbacks.progress import TrainingProgress
from launch.cli import main
from launch.schedule import warmup_cosine

STEPS = 4
LR = 1.0e-3


@pytest.fixture
def finished_run(tmp_path, capsys):
    raw = tiny_raw(runs_dir=str(tmp_path / "runs"), trainer={"max_steps": STEPS, "eval_batches": 1},
                   checkpoint={"every": 2, "keep_last": 2}, optim={"lr": LR, "warmup_steps": 2})
    config = write_config(tmp_path, raw)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    final = next(line for line in out.splitlines() if line.startswith("validation perplexity:"))
    return config, tmp_path / "runs" / "tiny", final


class NoTrainer:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a finished run must not build a trainer")


def test_a_finished_run_says_so_with_its_final_line_and_touches_nothing(finished_run, monkeypatch, capsys):
    config, run_dir, final = finished_run
    before = file_tree(run_dir)
    monkeypatch.setattr(launch.trainer, "Trainer", NoTrainer)  # nothing is built, so nothing is evaluated again
    assert main(["train", str(config), "trainer.eval_every=1"]) == 0  # a key the schedule does not depend on
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{run_dir} is already finished (step {STEPS}, trainer.max_steps={STEPS})")
    assert out[1] == final and out[2] == f"run dir: {run_dir}"
    assert file_tree(run_dir) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [(f"trainer.max_steps={STEPS + 2}", f"'trainer.max_steps': {STEPS} -> {STEPS + 2}"),
     ("optim.warmup_steps=3", "'optim.warmup_steps': 2 -> 3"),
     ("optim.min_lr_scale=0.5", "'optim.min_lr_scale': 0.1 -> 0.5"),
     ("optim.lr=0.002", "'optim.lr': 0.001 -> 0.002")],
)
def test_a_changed_schedule_is_refused_naming_the_key(finished_run, capsys, override, message):
    config, run_dir, _ = finished_run
    before = file_tree(run_dir)
    assert main(["train", str(config), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "--allow-schedule-change" in lines[0], lines
    assert file_tree(run_dir) == before


def test_an_accepted_schedule_change_trains_on_with_the_new_schedule(finished_run, capsys):
    config, run_dir, _ = finished_run
    more = STEPS + 4
    assert main(["train", str(config), f"trainer.max_steps={more}", "--allow-schedule-change"]) == 0
    assert f"after {more} steps" in capsys.readouterr().out
    rows = [r for r in read_rows(run_dir) if not r.get("final")]
    assert [r["step"] for r in rows] == list(range(1, more + 1))
    # A row's lr is the one its update used: step s updates with the schedule at s - 1, here the new one's.
    def new(step):
        return warmup_cosine(step, 2, more, 0.1)

    def old(step):
        return warmup_cosine(step, 2, STEPS, 0.1)

    for row in rows[STEPS:]:
        assert row["lr"] == pytest.approx(LR * new(row["step"] - 1), rel=1e-9)
    assert new(STEPS) != pytest.approx(old(STEPS))  # the old schedule would have kept the floor
    assert read_rows(run_dir)[-1]["final"] and read_rows(run_dir)[-1]["step"] == more


def test_another_process_count_is_refused_before_anything_starts(finished_run, capsys):
    config, run_dir, _ = finished_run
    before = file_tree(run_dir)
    assert main(["train", str(config), f"trainer.max_steps={STEPS + 2}", "--allow-schedule-change",
                 "--nproc", "2"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "was saved by 1 process(es) but this launch has 2" in line
    assert file_tree(run_dir) == before


def test_nproc_says_that_it_multiplies_the_global_batch():
    from launch.config import build_config
    from launch.train import _global_batch_note

    cfg = build_config(tiny_raw(trainer={"micro_batch_size": 4, "grad_accum_steps": 2}))
    note = _global_batch_note(cfg, 2)
    assert "trainer.micro_batch_size=4 is per process" in note and "2 x 4 x 2 (grad_accum_steps) = 16" in note
    assert "2x the batch of one process" in note and "set trainer.micro_batch_size=2" in note


# ---------------------------------------------------------------------------------------------- progress


def test_progress_writes_a_line_every_tenth_of_the_run_when_not_a_terminal():
    stream = io.StringIO()
    with TrainingProgress(enabled=True, total=40, start=0, stream=stream) as progress:
        for step in range(1, 41):
            progress.update(step, {"loss": 5.0 - step / 10, **({"val_ppl": 123.4} if step == 20 else {})})
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [f"{s}/40" for s in range(4, 41, 4)]
    assert lines[0].startswith("train: step 4/40 (10%), loss 4.6000,") and "ETA" in lines[0]
    assert "val_ppl" not in lines[3] and "val_ppl 123.4" in lines[4]


def test_progress_also_writes_after_a_quiet_interval_and_resumes_mid_run():
    stream = io.StringIO()
    with TrainingProgress(enabled=True, total=1000, start=500, stream=stream, interval_s=0.0) as progress:
        progress.update(501, {"loss": 1.0})
    assert stream.getvalue().startswith("train: step 501/1000 (50%)")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_silent_when_disabled():
    terminal = FakeTerminal()
    with TrainingProgress(enabled=True, total=10, start=0, stream=terminal) as progress:
        assert progress.live  # a rich bar, not plain lines
        progress.update(10, {"loss": 1.0})
    assert "train: step" not in terminal.getvalue()
    quiet = io.StringIO()
    with TrainingProgress(enabled=False, total=10, start=0, stream=quiet) as progress:
        progress.update(10, {"loss": 1.0})
    assert quiet.getvalue() == ""


def test_training_logs_progress_lines_to_a_non_terminal_stderr(tmp_path, capfd):
    raw = tiny_raw(runs_dir=str(tmp_path / "runs"), trainer={"max_steps": 10, "eval_batches": 1},
                   checkpoint={"every": 0}, logging={"wandb": False, "progress": True})
    assert main(["train", str(write_config(tmp_path, raw))]) == 0
    err = capfd.readouterr().err
    assert [line.split()[2] for line in err.splitlines() if line.startswith("train: step")] == \
        [f"{s}/10" for s in range(1, 11)]


def test_a_finished_run_whose_final_checkpoint_is_damaged_is_trained_again_from_the_one_before(finished_run, capsys):
    config, run_dir, final = finished_run
    model = run_dir / "checkpoints" / f"step_{STEPS}" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run_dir}/checkpoints/step_{STEPS - 2}" in out and final in out
    assert "already finished" not in out
