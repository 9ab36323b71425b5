"""Exact resume: after kill -9, preemption (SIGUSR2) or a truncated checkpoint, every later metrics row's training
values equal an uninterrupted run's bit for bit (JSON floats round-trip exactly), with 1 and 2 ranks."""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from train_support import (
    cached_reference_runs,
    kill_group,
    read_rows,
    run_train,
    start_train,
    tiny_raw,
    training_rows,
    wait_for_step,
    write_config,
)

from launch.cli import main as cli_main
from launch.signals import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

MAX_STEPS = 20
REPO_ROOT = Path(__file__).resolve().parents[2]


def resume_raw(nproc: int) -> dict:
    # The replay buffer and gradient accumulation are on, so their state and the no_sync path are covered too.
    model = {"replay_capacity": 8, "replay_fraction": 0.25}
    trainer = {"max_steps": MAX_STEPS, "grad_accum_steps": 2 if nproc == 2 else 1}
    return tiny_raw(model=model, trainer=trainer, checkpoint={"every": 4, "keep_last": 3})


def no_step_skipped(rows: list[dict]) -> None:
    assert all(not r["skipped"] for r in rows)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, per rank count, computed once: (work dir, config path, rows)."""
    return cached_reference_runs(
        tmp_path_factory, resume_raw, lambda work, config, name, nproc: run_train(work, config, name, nproc=nproc),
        MAX_STEPS, check_rows=no_step_skipped)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_at_a_random_step_then_restart_is_bit_exact(reference, nproc):
    work, config, expected = reference(nproc)
    kill_at = random.SystemRandom().randint(5, MAX_STEPS - 4)
    proc = start_train(work, config, "name=killed", nproc=nproc)
    try:
        seen = wait_for_step(proc, work / "runs" / "killed", kill_at)
    finally:
        kill_group(proc, signal.SIGKILL)  # the whole group: torchrun and every rank die at once
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (work / "runs" / "killed" / "checkpoints").is_dir(), f"killed at step {seen} before any checkpoint"
    done = run_train(work, config, "name=killed", nproc=nproc)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout, f"killed at step {seen}: did not resume\n{done.stdout}"
    got = training_rows(work / "runs" / "killed")
    assert got == expected, f"killed at step {seen} (asked {kill_at})"
    assert sum(bool(r.get("final")) for r in read_rows(work / "runs" / "killed")) == 1


def test_sigusr2_checkpoints_exits_with_the_preemption_code_and_continues_exactly(reference):
    work, config, expected = reference(1)
    run_dir = work / "runs" / "preempted"
    proc = start_train(work, config, "name=preempted")
    try:
        wait_for_step(proc, run_dir, random.SystemRandom().randint(5, MAX_STEPS - 6))
        os.kill(proc.pid, signal.SIGUSR2)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    stopped = training_rows(run_dir)[-1]["step"]
    assert stopped < MAX_STEPS
    assert f"saved checkpoint at step {stopped}" in out
    assert (run_dir / "checkpoints" / f"step_{stopped}" / "manifest.json").is_file()
    done = run_train(work, config, "name=preempted")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"step_{stopped} (step {stopped})" in done.stdout
    assert training_rows(run_dir) == expected


def test_truncated_newest_checkpoint_falls_back_says_so_and_continues_exactly(reference):
    work, config, expected = reference(1)
    shutil.copytree(work / "runs" / "ref", work / "runs" / "truncated")
    checkpoints = work / "runs" / "truncated" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_12", "step_16", "step_20"]
    model = checkpoints / "step_20" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    done = run_train(work, config, "name=truncated")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step_20 is unusable (model.pt is truncated" in done.stdout
    assert "resumed from" in done.stdout and "step_16 (step 16)" in done.stdout
    assert training_rows(work / "runs" / "truncated") == expected


def test_resuming_with_a_different_model_names_the_key(reference, monkeypatch, capsys):
    work, config, _ = reference(1)
    monkeypatch.chdir(work)  # in-process: the check runs before any training, so no subprocess is needed
    for override, fragment in (("model.architecture.dim=64", "config key 'model.architecture.dim'"),
                               ("trainer.micro_batch_size=2", "config key 'trainer.micro_batch_size'"),
                               ("checkpoint.resume=false", "config key 'checkpoint.resume'")):
        assert cli_main(["train", str(config), "name=ref", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ebt train: error: {fragment}"), err
        if override == "model.architecture.dim=64":
            assert "trained with 32" in err[0] and "64" in err[0]


def test_deepspeed_zero2_resume_is_bit_exact(tmp_path):
    """DeepSpeed owns the optimizer state and its own checkpoint files: losing the last checkpoint and running
    again continues from the one before and reproduces the uninterrupted rows bit for bit. A plain single
    process works too: the trainer supplies the rendezvous DeepSpeed would otherwise look for through MPI."""
    raw = tiny_raw(trainer={"max_steps": 8}, checkpoint={"every": 4, "keep_last": 3},
                   model={"replay_capacity": 8, "replay_fraction": 0.25},
                   distributed={"strategy": "deepspeed",
                                "deepspeed_config": str(REPO_ROOT / "configs" / "deepspeed" / "zero2.json")})
    config = write_config(tmp_path, raw)
    done = run_train(tmp_path, config, "name=ds")
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "ds"
    expected = training_rows(run_dir)
    assert [r["step"] for r in expected] == list(range(1, 9))
    shutil.rmtree(run_dir / "checkpoints" / "step_8")
    again = run_train(tmp_path, config, "name=ds")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout and "step_4 (step 4)" in again.stdout
    assert training_rows(run_dir) == expected
