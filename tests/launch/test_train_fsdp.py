"""`distributed.strategy=fsdp` through `ebt train`: exact resume after kill -9 (2 ranks), also inside a DCP write
in the background (checkpoint.async_save, whose shards match a synchronous save's byte for byte), a corrupt shard is
skipped, a 2-rank sharded checkpoint resumed on 1 rank continues the run, and load_model reads sharded
checkpoints. Gradient and weight parity with one process is tests/launch/test_train_parity.py."""

from __future__ import annotations

import math
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from train_support import (
    read_rows,
    run_train,
    start_train,
    tiny_raw,
    training_rows,
    wait_for_step,
    write_config,
)

from launch.checkpoint import verify
from launch.run_dir import load_model

pytestmark = pytest.mark.slow


def kill_tree(proc) -> None:
    """SIGKILL torchrun and every rank at once, as a node failure would. torchrun starts each worker in its own
    session, so signalling torchrun's process group alone leaves the ranks running (and finishing the run)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass

MAX_STEPS = 24
CONTEXT = 32


def fsdp_raw(trainer: dict | None = None, **model: object) -> dict:
    # Two layers: the blocks are their own FSDP units, the root holds the rest. Width 64 and context 32 make a
    # step slow enough (~0.1 s) that kill -9 lands mid-run rather than after the last step.
    return tiny_raw(model={"n_layers": 2, "dim": 64, "context_length": CONTEXT, **model},
                    trainer={"max_steps": MAX_STEPS, "micro_batch_size": 2, **(trainer or {})},
                    checkpoint={"every": 4, "keep_last": 3, "async_save": True}, distributed={"strategy": "fsdp"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank fsdp run with the replay buffer and gradient accumulation on (per-rank state and
    a reduce-scatter per micro-batch): (work dir, config, rows)."""
    work = tmp_path_factory.mktemp("fsdp")
    raw = fsdp_raw(replay_capacity=8, replay_fraction=0.25)
    raw["trainer"]["grad_accum_steps"] = 2
    config = write_config(work, raw)
    done = run_train(work, config, "name=ref", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = training_rows(work / "runs" / "ref")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert all(not r["skipped"] for r in rows)
    return work, config, rows


def test_sigkill_at_a_random_step_then_restart_is_bit_exact(reference):
    work, config, expected = reference
    kill_at = random.SystemRandom().randint(5, MAX_STEPS - 8)
    proc = start_train(work, config, "name=killed", nproc=2)
    try:
        seen = wait_for_step(proc, work / "runs" / "killed", kill_at)
    finally:
        kill_tree(proc)  # torchrun and both ranks at once, possibly inside a DCP save
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoints = work / "runs" / "killed" / "checkpoints"
    assert checkpoints.is_dir(), f"killed at step {seen} before any checkpoint"
    done = run_train(work, config, "name=killed", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout, f"killed at step {seen}: did not resume\n{done.stdout}"
    assert training_rows(work / "runs" / "killed") == expected, f"killed at step {seen} (asked {kill_at})"
    assert sum(bool(r.get("final")) for r in read_rows(work / "runs" / "killed")) == 1
    # Sharded: each rank wrote its own DCP file, no consolidated model.pt, and the manifest covers the shards.
    newest = sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    shards = sorted(p.name for p in (newest / "dcp").iterdir())
    assert len([name for name in shards if name.endswith(".distcp")]) == 2 and ".metadata" in shards, shards
    assert not (newest / "model.pt").exists() and not (newest / "optimizer.pt").exists()


def test_a_corrupt_shard_is_reported_and_the_run_continues_exactly_from_the_one_before(reference):
    work, config, expected = reference
    run_dir = work / "runs" / "corrupt"
    shutil.copytree(work / "runs" / "ref", run_dir)
    # As if killed in the final evaluation, after the last checkpoint: the run is not finished.
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True) if '"final"' not in line))
    newest = run_dir / "checkpoints" / f"step_{MAX_STEPS}"
    shard = sorted((newest / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert "fails its checksum" in verify(newest, world_size=2)
    done = run_train(work, config, "name=corrupt", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"step_{MAX_STEPS} is unusable (dcp/{shard.name} fails its checksum" in done.stdout
    assert f"step_{MAX_STEPS - 4} (step {MAX_STEPS - 4})" in done.stdout
    assert training_rows(run_dir) == expected


def drop_final_row(run_dir: Path) -> None:
    """As if killed in the final evaluation, after the last checkpoint: the run is not finished."""
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True) if '"final"' not in line))


def test_async_saves_write_what_synchronous_saves_write_and_resume_exactly(reference):
    """checkpoint.async_save under fsdp (the reference runs with it): every checkpoint's DCP shards and rank files
    are byte for byte those of a run that saves synchronously, though training went on while they were written;
    and a run resumed from an async checkpoint reproduces the uninterrupted rows."""
    work, config, expected = reference
    sync = run_train(work, config, "name=sync", "checkpoint.async_save=false", nproc=2)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert training_rows(work / "runs" / "sync") == expected
    for step in range(MAX_STEPS - 8, MAX_STEPS + 1, 4):  # the checkpoints kept (keep_last 3)
        ours, theirs = (work / "runs" / name / "checkpoints" / f"step_{step}" for name in ("ref", "sync"))
        assert verify(ours, world_size=2) is None
        for rel in ("dcp/__0_0.distcp", "dcp/__1_0.distcp", "rank_0.pt", "rank_1.pt"):
            assert (ours / rel).read_bytes() == (theirs / rel).read_bytes(), (step, rel)
    run_dir = work / "runs" / "resumed"
    shutil.copytree(work / "runs" / "ref", run_dir)
    for step in (MAX_STEPS - 4, MAX_STEPS):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step}")
    drop_final_row(run_dir)
    done = run_train(work, config, "name=resumed", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"step_{MAX_STEPS - 8} (step {MAX_STEPS - 8})" in done.stdout, done.stdout
    assert training_rows(run_dir) == expected


# Run by torchrun as every rank of `ebt train` (see __main__): the DCP write of step 8's checkpoint writes its
# shards, says WRITING, then hangs before DCP's metadata, in the background writer's thread.
SLOW_DCP_STEP = 8


def slow_dcp_worker(argv: list[str]) -> int:
    import threading
    import time

    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    from launch.cli import main

    real = _FileSystemWriter.write_data

    def slow(self, plan, planner):
        result = real(self, plan, planner)
        if f".tmp-step_{SLOW_DCP_STEP}" in str(self.path):
            print(f"WRITING in {threading.current_thread().name}", flush=True)
            time.sleep(120)
        return result

    _FileSystemWriter.write_data = slow
    return main(argv)


def test_kill_9_during_a_background_dcp_write_leaves_the_previous_checkpoint_newest(reference):
    """Both ranks hang inside the DCP write of step 8's checkpoint, in the background writer, while training goes
    on past it; kill -9 then leaves step_4 the newest valid checkpoint, and the rerun reproduces every row."""
    import subprocess
    import sys

    from train_support import env

    from launch.checkpoint import CheckpointManager

    work, config, expected = reference
    run_dir = work / "runs" / "killed-dcp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             __file__, "slow_dcp", "train", str(config), f"name={run_dir.name}"], cwd=work, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "WRITING" in line:
                assert "ebt-checkpoint-writer" in line, line  # the background writer's thread, not training's
                break
        else:
            raise AssertionError(f"never reached step {SLOW_DCP_STEP}'s DCP write ({proc.wait()})")
        wait_for_step(proc, run_dir, SLOW_DCP_STEP + 2)  # training goes on while the shards are being written
    finally:
        kill_tree(proc)
        proc.wait()
    checkpoints = run_dir / "checkpoints"
    tmp = checkpoints / f".tmp-step_{SLOW_DCP_STEP}"
    assert sorted((tmp / "dcp").glob("*.distcp")) and not (tmp / "dcp" / ".metadata").exists()  # mid-write
    assert not (checkpoints / f"step_{SLOW_DCP_STEP}").exists()
    assert CheckpointManager(checkpoints, keep_last=3, world_size=2).latest_valid() == checkpoints / "step_4"
    done = run_train(work, config, f"name={run_dir.name}", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step_4 (step 4)" in done.stdout, done.stdout
    assert training_rows(run_dir) == expected
    assert not list(checkpoints.glob(".tmp-step_*"))


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    """World 2 -> world 1. With the global batch kept (grad_accum_steps doubled) and no per-rank randomness the
    continuation is the 2-rank run up to the order of the gradient sums; with the config unchanged the run goes
    on at half the global batch. Either way weights, optimizer, schedule and data position carry over."""
    config = write_config(tmp_path, fsdp_raw())
    done = run_train(tmp_path, config, "name=two", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    two = training_rows(tmp_path / "runs" / "two")
    resume_at = MAX_STEPS - 8  # the oldest checkpoint kept (keep_last 3)
    for name, overrides in (("same_batch", ["trainer.grad_accum_steps=2"]), ("half_batch", [])):
        run_dir = tmp_path / "runs" / name
        shutil.copytree(tmp_path / "runs" / "two", run_dir)
        for step in range(resume_at + 4, MAX_STEPS + 1, 4):  # as if the 2-rank run had stopped at resume_at
            shutil.rmtree(run_dir / "checkpoints" / f"step_{step}")
        metrics = run_dir / "metrics.jsonl"
        metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                                   if '"final"' not in line))
        one = run_train(tmp_path, config, f"name={name}", *overrides, nproc=1)
        assert one.returncode == 0, one.stdout + one.stderr
        assert f"step_{resume_at} (step {resume_at})" in one.stdout, one.stdout
        assert "resharded a 2-rank checkpoint onto 1 ranks" in one.stdout, one.stdout
        rows = training_rows(run_dir)
        assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
        assert rows[:resume_at] == two[:resume_at]  # the rows before the checkpoint are kept as they were
        after, before = rows[resume_at:], two[resume_at:]
        assert all(not r["skipped"] and math.isfinite(r["loss"]) for r in after)
        assert [r["lr"] for r in after] == [r["lr"] for r in before]  # the schedule carried over exactly
        if name == "same_batch":
            assert "global batch 4 -> 4" in one.stdout
            assert [r["tokens"] for r in after] == [r["tokens"] for r in before]
            for got, want in zip(after, before, strict=True):  # fp32 sums in another order, over 8 more steps
                for key in ("loss", "grad_norm", "alpha", "ce_step_0", "ce_step_1"):
                    assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)
        else:
            assert "global batch 4 -> 2" in one.stdout
            assert after[0]["tokens"] == before[0]["tokens"] - 2 * CONTEXT  # half the sequences per step from here
    # The finished 1-rank runs checkpointed at world 1 and load without a process group.
    model, cfg = load_model(tmp_path / "runs" / "same_batch")
    assert cfg.architecture.n_layers == 2 and model.alpha_raw.shape == torch.Size([])


def test_load_model_reads_a_sharded_checkpoint_exactly(tmp_path):
    """The weights load_model reads from a 2-rank DCP checkpoint (no process group) are the run's weights: a
    1-rank fsdp resume of the same checkpoint holds the same values (compared inside that run)."""
    config = write_config(tmp_path, fsdp_raw())
    done = run_train(tmp_path, config, "name=run", "trainer.max_steps=4", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    path = tmp_path / "runs" / "run" / "checkpoints" / "step_4"
    model, _ = load_model(path)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert weights["alpha_raw"].dim() == 0
    script = (
        "import sys, torch\n"
        "from launch.config import load_config\n"
        "from launch.trainer import Trainer\n"
        f"cfg = load_config([{str(config)!r}], ['name=run', 'trainer.max_steps=4'])\n"
        "tr = Trainer(cfg, log=lambda m: None)\n"
        "tr.setup()\n"
        f"torch.save(tr.full_parameters(), {str(tmp_path / 'full.pt')!r})\n"
        "tr.close(finished=True)\n"
    )
    import subprocess
    import sys

    from train_support import env

    check = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=240)
    assert check.returncode == 0, check.stdout + check.stderr
    full = torch.load(tmp_path / "full.pt")
    assert set(full) == set(weights)
    for key, value in weights.items():
        assert torch.equal(full[key], value), key


def test_checkpointing_auto_plans_per_rank_and_trains_under_fsdp(tmp_path):
    """trainer.checkpointing=auto under fsdp: the plan is made (per rank, sharded state), saved and trained with."""
    raw = fsdp_raw(trainer={"checkpointing": "auto"})
    raw["trainer"].update(max_steps=3, memory_budget_gb=64.0)
    config = write_config(tmp_path, raw)
    done = run_train(tmp_path, config, "name=auto", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "memory plan: checkpointing" in done.stdout
    assert (tmp_path / "runs" / "auto" / "memory_plan.json").is_file()
    rows = training_rows(tmp_path / "runs" / "auto")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(not r["skipped"] for r in rows)


def test_regather_resumes_bit_exact_and_its_checkpoint_loads(tmp_path):
    """distributed.fsdp_regather (plain DTensor parameters, no FSDP modules) checkpoints through DCP too: losing
    the newest checkpoint and running again reproduces the rows bit for bit; load_model reads the shards."""
    raw = fsdp_raw()
    raw["trainer"]["max_steps"] = 8
    raw["distributed"]["fsdp_regather"] = True
    config = write_config(tmp_path, raw)
    done = run_train(tmp_path, config, "name=regather", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "regather"
    expected = training_rows(run_dir)
    assert [r["step"] for r in expected] == list(range(1, 9))
    shutil.rmtree(run_dir / "checkpoints" / "step_8")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True) if '"final"' not in line))
    again = run_train(tmp_path, config, "name=regather", nproc=2)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "step_4 (step 4)" in again.stdout
    assert training_rows(run_dir) == expected
    model, _ = load_model(run_dir)
    # The trained step size (a row logs the alpha its step ran with, before that step's update).
    alpha = float(model.alpha_raw.detach())
    assert model.alpha_raw.dim() == 0 and alpha != expected[0]["alpha"] and abs(alpha - expected[-1]["alpha"]) < 5


def nonfinite_worker(out: str) -> None:
    """Run under torchrun (2 ranks): rank 1 alone gets a non-finite loss, a non-finite gradient, or an inner
    gradient error raised mid-forward; every time both ranks skip the step with matching collectives (no hang:
    distributed.timeout_s is short), nothing moves, and the next good step trains."""
    import json
    import os

    from ebt_factories import InfGrad

    from ebt import NonFiniteEnergyGradientError
    from launch.config import build_config
    from launch.trainer import Trainer

    raw = fsdp_raw()
    raw["distributed"]["timeout_s"] = 60.0
    raw["runs_dir"] = os.environ["EBT_TEST_RUNS"]
    trainer = Trainer(build_config(raw), log=lambda m: None)
    trainer.setup()
    rank = trainer.rank
    real = trainer.module.loss

    def nan_loss(wrapped, tokens, **kw):
        loss, metrics = real(wrapped, tokens, **kw)
        return (loss * math.nan if rank == 1 else loss), metrics

    def inf_grad(wrapped, tokens, **kw):
        loss, metrics = real(wrapped, tokens, **kw)
        return (InfGrad.apply(loss) if rank == 1 else loss), metrics

    def inner_error(wrapped, tokens, **kw):
        if rank != 1:
            return real(wrapped, tokens, **kw)

        def raising(*args, **kwargs):
            raise NonFiniteEnergyGradientError("inner gradient is not finite")

        # Raised inside the root's forward, after FSDP's pre-forward gathered every block: its per-step state
        # must be reset (ShardedModel.abort_step).
        wrapped.loss = raising
        try:
            return real(wrapped, tokens, **kw)
        finally:
            del wrapped.loss

    from launch.fsdp import gathered_bytes

    report = {"rank": rank, "cases": {}}
    assert not trainer.train_step()["skipped"]
    for bad in (nan_loss, inf_grad, inner_error):
        before = trainer.full_parameters()
        trainer.module.loss = bad
        row = trainer.train_step()
        moved = max(float((before[k] - v).abs().max()) for k, v in trainer.full_parameters().items())
        grads_left = sum(p.grad is not None for p in trainer.trained_parameters.values())
        gathered = gathered_bytes(trainer.sharded)
        trainer.module.loss = real
        good = trainer.train_step()
        report["cases"][bad.__name__] = {"skipped": row["skipped"], "moved": moved, "grads_left": grads_left,
                                         "gathered": gathered, "next_skipped": good["skipped"]}
    report["nonfinite_total"] = trainer.nonfinite_total
    Path(out.replace("%d", str(rank))).write_text(json.dumps(report))
    trainer.close(finished=True)


def test_a_nonfinite_micro_batch_on_one_rank_skips_the_step_on_both(tmp_path):
    import json
    import subprocess
    import sys

    from train_support import env

    out = tmp_path / "nonfinite_%d.json"
    environment = {**env(), "EBT_TEST_RUNS": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, "nonfinite", str(out)], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        report = json.loads(Path(str(out).replace("%d", str(rank))).read_text())
        assert report["nonfinite_total"] == 3, report
        for name, case in report["cases"].items():
            assert case["skipped"] and case["moved"] == 0.0, (rank, name, case)
            assert not case["next_skipped"] and case["grads_left"] == 0 and case["gathered"] == 0, (rank, name, case)


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "nonfinite":
        nonfinite_worker(sys.argv[2])
    elif sys.argv[1] == "slow_dcp":
        sys.exit(slow_dcp_worker(sys.argv[2:]))
