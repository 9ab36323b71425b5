"""Nothing lost, nobody collides (issue 21): `ebt export` never replaces a user's files, one trainer per run dir
(launch/run_lock.py), and a run dir whose checkpoints cannot be verified is refused, not overwritten, until
`--restart` moves it aside. Each refusal: a non-zero exit, one stderr line, and the file tree unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from model_configs import model_config
from train_support import file_tree, kill_group, read_rows, run_cli, start_train, tiny_raw, write_config

from launch.cli import main
from launch.run_lock import RunLockedError, holder, lock_paths, run_lock

# ---------------------------------------------------------------------------------------------- ebt export


def _source(path: Path) -> Path:
    """A tiny model as an export directory, written by hand (no training needed)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from ebt import build_model

    cfg = model_config(kind="ebt", vocab_size=64, context_length=16, dim=32, n_layers=1, n_heads=2)
    path.mkdir(parents=True)
    save_model(build_model(cfg), str(path / "model.safetensors"))
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)})))
    return path


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_export_onto_a_directory_of_the_users_files_is_refused_and_keeps_them(tmp_path, capfd, force):
    source = _source(tmp_path / "src")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "important.txt").write_text("do not lose me\n")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = file_tree(tmp_path)
    run_cli(capfd, ["export", str(source), str(out), *force], "ebt export: error: ", str(out), "important.txt")
    assert file_tree(tmp_path) == before
    assert (out / "important.txt").read_text() == "do not lose me\n"


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_export_onto_a_regular_file_is_refused_and_keeps_it(tmp_path, capfd, force):
    source = _source(tmp_path / "src")
    out = tmp_path / "weights"
    out.write_text("the user's file\n")
    before = file_tree(tmp_path)
    run_cli(capfd, ["export", str(source), str(out), *force], "ebt export: error: ", str(out),
             "not a directory")
    assert file_tree(tmp_path) == before  # no hidden `.weights.old.*` beside it either


def test_a_previous_export_is_replaced_only_with_force_and_only_when_it_holds_nothing_else(tmp_path, capfd):
    source = _source(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["export", str(source), str(out)]) == 0
    capfd.readouterr()
    marker = json.loads((out / ".ebt-export").read_text())
    assert marker["source"] == str(source.resolve()) and marker["exported"]

    before = file_tree(tmp_path)
    run_cli(capfd, ["export", str(source), str(out)], "ebt export: error: ", str(out), "--force")
    assert file_tree(tmp_path) == before

    assert main(["export", str(source), str(out), "--force"]) == 0
    capfd.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [".ebt-export", "config.yaml", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing left aside

    (out / "notes.txt").write_text("mine\n")  # a file the export did not write: --force does not take it
    before = file_tree(tmp_path)
    run_cli(capfd, ["export", str(source), str(out), "--force"], "ebt export: error: ", str(out), "notes.txt")
    assert file_tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- the run-dir lock


def test_the_lock_excludes_a_second_holder_names_the_first_and_leaves_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    with run_lock(run_dir):
        lock, record = lock_paths(run_dir)
        info = json.loads(record.read_text())
        assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
        assert holder(run_dir)["pid"] == os.getpid()  # another descriptor: flock excludes it in this process too
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"), \
                run_lock(run_dir):
            pass
        assert record.is_file() and lock.is_file()  # the refused one took nothing away
    assert not (tmp_path / "runs").exists()  # made for the lock, removed with it
    assert holder(run_dir) is None


def test_another_hosts_record_counts_until_slurm_says_its_job_has_ended(tmp_path, monkeypatch, capfd):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    lock, record = lock_paths(run_dir)
    lock.touch()  # as a holder on another node leaves them, with a flock this node cannot see
    left = {"host": "elsewhere.invalid", "pid": 1, "started": time.time(), "slurm_job_id": "4242"}
    record.write_text(json.dumps(left))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no squeue, no sacct: nobody can say it ended
    assert holder(run_dir)["host"] == "elsewhere.invalid"
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho '4242|RUNNING'\n")
    squeue.chmod(0o755)
    assert holder(run_dir) is not None
    before = file_tree(tmp_path)
    with pytest.raises(RunLockedError, match=rf"Slurm job 4242.*remove {record}"), run_lock(run_dir):
        pass
    assert file_tree(tmp_path) == before  # its lock file stays: on its node it may still be held

    squeue.write_text("#!/bin/sh\nexit 0\n")  # the controller no longer knows the job: it ended
    assert holder(run_dir) is None
    capfd.readouterr()
    with run_lock(run_dir):
        assert json.loads(record.read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ebt train: note: taking over" in err[0] and "Slurm job 4242 has ended" in err[0], err

    record.write_text(json.dumps(left))  # a requeued job finds its own id: its dead predecessor
    lock.touch()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with run_lock(run_dir):
        pass
    assert "this Slurm job (4242) before its requeue" in capfd.readouterr().err


def _tiny_config(tmp_path: Path, **trainer) -> Path:
    return write_config(tmp_path, tiny_raw(runs_dir=str(tmp_path / "runs"),
                                           trainer={"max_steps": 4, "eval_batches": 1, **trainer},
                                           checkpoint={"every": 2, "keep_last": 2}))


def test_a_second_trainer_on_a_running_run_dir_is_refused_in_one_line_naming_the_holder(tmp_path, monkeypatch,
                                                                                        capfd):
    monkeypatch.chdir(tmp_path)
    config = _tiny_config(tmp_path, max_steps=100_000)
    run_dir = tmp_path / "runs" / "tiny"
    proc = start_train(tmp_path, config)
    try:
        record = lock_paths(run_dir)[1]
        deadline = time.monotonic() + 120
        while not record.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the first trainer took no lock"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen: the tree then shows only what the second one writes
        try:
            before = file_tree(tmp_path)
            # Plain, --restart (which must not move a running run aside) and the --nproc launcher (refused before
            # it starts ranks that would wait for a refused rank 0).
            for extra in ([], ["--restart"], ["--nproc", "2"]):
                run_cli(capfd, ["train", str(config), *extra], "ebt train: error: ", str(run_dir),
                         f"pid {proc.pid} on host {socket.gethostname()}")
                assert file_tree(tmp_path) == before
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
    finally:
        kill_group(proc)
        proc.wait()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_with_a_note(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = _tiny_config(tmp_path, max_steps=2)
    run_dir = tmp_path / "runs" / "tiny"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock, record = lock_paths(run_dir)
    lock.parent.mkdir(parents=True)
    lock.touch()  # as kill -9 leaves them: the kernel dropped the flock, the files stay
    record.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time() - 60,
                                  "slurm_job_id": None}))
    assert holder(run_dir) is None
    assert main(["train", str(config)]) == 0
    err = capfd.readouterr().err
    notes = [line for line in err.splitlines() if "taking over" in line]
    assert len(notes) == 1 and notes[0].startswith("ebt train: note: "), err
    assert f"pid {dead.pid} on host {socket.gethostname()}" in notes[0] and "no longer running" in notes[0]
    assert read_rows(run_dir)[-1]["final"] and not lock.exists() and not record.exists()


# ---------------------------------------------------------------------------------------------- --restart


def test_a_run_dir_with_no_checkpoint_that_verifies_is_refused_until_restart_moves_it_aside(tmp_path, monkeypatch,
                                                                                           capfd):
    monkeypatch.chdir(tmp_path)
    config = _tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    assert main(["train", str(config)]) == 0
    for manifest in run_dir.glob("checkpoints/step_*/manifest.json"):
        manifest.unlink()  # as a copy that drops small files would: the checkpoints themselves are intact
    capfd.readouterr()
    before = file_tree(tmp_path)
    run_tree = file_tree(run_dir)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", str(run_dir), "no manifest", "--restart")
    assert file_tree(tmp_path) == before

    assert main(["train", str(config), "--restart"]) == 0
    err = capfd.readouterr().err
    moved = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("tiny.old-")]
    assert len(moved) == 1 and f"moved {run_dir} to {moved[0]}" in err, err
    assert file_tree(moved[0]) == run_tree  # every old file, as it was
    rows = read_rows(run_dir)
    assert rows[0]["step"] == 1 and rows[-1]["final"] and rows[-1]["step"] == 4
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(["tiny", moved[0].name])  # no lock left


def test_metrics_without_any_checkpoint_are_refused_too(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = _tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "tokens": 192, "loss": 6.0}) + "\n")
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", "metrics.jsonl up to step 3", "--restart")
    assert file_tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- ebt sweep submit


def test_sweep_submit_skips_a_run_whose_run_dir_is_held(tmp_path, monkeypatch, capsys):
    from slurm.spec import load_spec
    from slurm.state import SweepState

    monkeypatch.chdir(tmp_path)
    base = _tiny_config(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "held", "base": str(base), "runs_dir": str(tmp_path / "runs"),
                                    "sweep_dir": str(tmp_path / "sweep"), "grid": {"steps": [2]}}))
    plan = load_spec(str(spec)).plan()[0]
    with run_lock(plan.run_dir):
        assert main(["sweep", "submit", str(spec), "--local"]) == 0
    out = capsys.readouterr().out
    assert f"skip {plan.name}: already running: {plan.run_dir} is held by pid {os.getpid()}" in out, out
    assert SweepState(tmp_path / "sweep").read_jobs() == {}  # nothing submitted
