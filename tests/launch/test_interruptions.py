"""Interruptions of `ebt train` (issue 21): Ctrl-C once checkpoints the step it was in and exits 130 in one line,
Ctrl-C twice aborts at once, a full disk while checkpointing is one line that leaves the previous checkpoint the
newest valid one. Each is resumed and, where the run could go on exactly, compared with an uninterrupted run."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_support import (
    cached_reference_runs,
    env,
    run_train,
    tiny_raw,
    training_rows,
    wait_for_step,
    write_config,
)

from launch import checkpoint, signals
from launch.checkpoint import CheckpointManager, verify
from launch.cli import main
from launch.signals import INTERRUPTED_EXIT_CODE, SAME_CTRL_C_S, PreemptionFlag

MAX_STEPS = 12
NPROC_NOTE = "ebt train: --nproc 2: "  # the launcher's global-batch note, printed before any rank starts


def quiet_env() -> dict:
    return dict(env(), EBT_ALLOCATOR_NOTED="1")  # no allocator note: stderr holds only what is tested


def start(work: Path, *args: str) -> subprocess.Popen:
    """`ebt train` in its own session (the test signals its whole process group, as a terminal does), with
    stdout and stderr apart."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", *args], cwd=work, env=quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if not line.startswith(NPROC_NOTE)]


def train_quietly(work: Path, config: Path, name: str, nproc: int) -> subprocess.CompletedProcess:
    """`ebt train --nproc N` to the end, under quiet_env."""
    args = [sys.executable, "-m", "launch.cli", "train", str(config), name, "--nproc", str(nproc)]
    return subprocess.run(args, cwd=work, env=quiet_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs per rank count, computed once: (work dir, config, rows)."""
    return cached_reference_runs(
        tmp_path_factory, lambda nproc: tiny_raw(trainer={"max_steps": MAX_STEPS}, checkpoint={"every": 4}),
        train_quietly, MAX_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_checkpoints_the_step_it_was_in_exits_130_in_one_line_and_resumes_exactly(reference, nproc):
    """With --nproc 2 the Ctrl-C reaches the launcher and both ranks, as at a terminal, and the launcher forwards
    its copy too: each rank sees two SIGINTs milliseconds apart, which must count as one."""
    work, config, expected = reference(nproc)
    run_dir = work / "runs" / f"ctrl-c-{nproc}"
    proc = start(work, str(config), f"name={run_dir.name}", "--nproc", str(nproc))
    try:
        wait_for_step(proc, run_dir, 3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, out + err
    lines = error_lines(err)
    assert len(lines) == 1, err
    step = training_rows(run_dir)[-1]["step"]
    assert step < MAX_STEPS, "the run ended before the Ctrl-C"
    assert lines[0] == (f"ebt train: interrupted (Ctrl-C): checkpoint saved at step {step} in "
                        f"{Path('runs') / run_dir.name}; run the same command to resume")
    assert "Ctrl-C: finishing this step, then saving a checkpoint" in out  # said at once, on stdout
    assert verify(run_dir / "checkpoints" / f"step_{step}") is None

    done = run_train(work, config, f"name={run_dir.name}", "--nproc", str(nproc))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"step_{step} (step {step})" in done.stdout
    assert training_rows(run_dir) == expected


def test_the_flag_counts_copies_of_one_ctrl_c_once_and_a_later_press_as_the_second(monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)  # the abort, recorded instead of taken
    flag = PreemptionFlag().install()
    try:
        signal.raise_signal(signal.SIGTERM)  # a preemption first: not a Ctrl-C, so no press is counted
        assert flag.requested and not flag.interrupted
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the launcher's forwarded copy, milliseconds later
        assert flag.interrupted and exits == []
        flag._first_ctrl_c -= SAME_CTRL_C_S + 0.1  # as if the first press was over a second ago
        signal.raise_signal(signal.SIGINT)
        assert exits == [INTERRUPTED_EXIT_CODE]
    finally:
        flag.restore()


@pytest.mark.slow
def test_ctrl_c_before_training_starts_is_one_line_too(tmp_path):
    """1 s in, `ebt train` is still importing or loading its config: KeyboardInterrupt, caught by launch/cli.py."""
    config = write_config(tmp_path, tiny_raw())
    proc = start(tmp_path, str(config))
    try:
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, out + err
    assert err.strip().splitlines() == ["ebt train: interrupted (Ctrl-C)"], err


# What launch/allocator.py does when it re-executes `ebt train` onto another allocator, with a Ctrl-C pressed in
# the window: SIGINT blocked (pending) across execve.
CTRL_C_ACROSS_EXEC = textwrap.dedent("""
    import os, signal, sys
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    os.kill(os.getpid(), signal.SIGINT)  # pressed now: pending, as if between execve and the new handler
    env = dict(os.environ, EBT_ALLOCATOR_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "launch.cli", "train", *sys.argv[1:]], env)
""")


def test_a_ctrl_c_during_the_allocator_reexec_is_one_line_not_a_silent_death(tmp_path):
    config = write_config(tmp_path, tiny_raw())
    done = subprocess.run([sys.executable, "-c", CTRL_C_ACROSS_EXEC, str(config)], cwd=tmp_path, env=quiet_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == INTERRUPTED_EXIT_CODE, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == ["ebt train: interrupted (Ctrl-C)"], done.stderr


# Slows the save that a Ctrl-C asks for (any save after step 4's), and says on stdout when it is in it, so that
# the second Ctrl-C surely comes while the first is being served.
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import launch.checkpoint as checkpoint
    save = checkpoint.CheckpointManager.save
    def slow_save(self, step, *args, **kwargs):
        if step > 4:
            print("SAVING", flush=True)
            time.sleep(60)
        return save(self, step, *args, **kwargs)
    checkpoint.CheckpointManager.save = slow_save
    from launch.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_in_one_line_and_the_run_resumes_from_its_last_checkpoint(reference):
    work, config, expected = reference(1)
    run_dir = work / "runs" / "abort"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", str(config), "name=abort"], cwd=work,
                            env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_step(proc, run_dir, 5)
        first = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        while "SAVING" not in proc.stdout.readline():
            assert proc.poll() is None
        time.sleep(max(0.0, SAME_CTRL_C_S + 0.2 - (time.monotonic() - first)))  # a second press, not a copy
        second = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - second
    finally:
        stop(proc)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, out + err
    assert took < 5, f"the second Ctrl-C took {took:.1f} s to end the run"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ebt train: interrupted again (Ctrl-C): aborted without saving") and \
        str(Path("runs") / "abort") in lines[0], lines[0]
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=3)
    assert manager.list_steps() == [4] and manager.latest_valid() == run_dir / "checkpoints" / "step_4"

    done = run_train(work, config, "name=abort")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step_4 (step 4)" in done.stdout
    assert training_rows(run_dir) == expected


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_with_the_bytes_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, capfd):
    """ENOSPC simulated in the writer (the real thing, on a tmpfs, is the next test): step 8's model.pt gets 1000
    bytes, then the disk is full."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_raw(trainer={"max_steps": MAX_STEPS}, checkpoint={"every": 4}))
    write = checkpoint._save_pt

    def fill_up(obj, path: Path) -> dict:
        if path.parent.name == ".tmp-step_8" and path.name == "model.pt":
            path.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(obj, path)  # the writer's manifest entry (sha256 and bytes, computed as written)

    monkeypatch.setattr(checkpoint, "_save_pt", fill_up)
    code = main(["train", str(config), "name=full"])
    _out, err = capfd.readouterr()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    run_dir = Path("runs") / "full"
    checkpoints = tmp_path / run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_4"]  # no .tmp-step_8 left
    assert verify(checkpoints / "step_4") is None
    saved = sum(p.stat().st_size for p in (checkpoints / "step_4").iterdir() if p.name != "manifest.json")
    needed = int(lines[0].split(": it needs ")[1].split(" bytes")[0].replace(",", ""))
    assert abs(needed - saved) < 0.01 * saved, (needed, saved)  # step 8's state is the size of step 4's
    assert lines[0].startswith(f"ebt train: error: no space left on the device to save checkpoint step_8 of the "
                               f"run in {run_dir}: it needs "), lines[0]
    assert "step_4 is still the newest checkpoint" in lines[0]

    monkeypatch.setattr(checkpoint, "_save_pt", write)
    assert main(["train", str(config), "name=full"]) == 0
    out, _err = capfd.readouterr()
    assert "step_4 (step 4)" in out
    assert [r["step"] for r in training_rows(tmp_path / run_dir)] == list(range(1, MAX_STEPS + 1))


def _mount_tmpfs(directory: Path, size: int) -> bool:
    if os.geteuid() != 0:
        return False
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_real_full_disk_while_checkpointing_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, nproc):
    """runs_dir on a tmpfs that holds the run and its first checkpoint but not a second one: torch.save then
    fails with its own RuntimeError ("unexpected pos"), whose context is the ENOSPC. With 2 ranks, whichever
    runs out of space, both give up together and rank 0 says so."""
    probe = tmp_path / "probe"
    probe.mkdir()
    raw = tiny_raw(trainer={"max_steps": MAX_STEPS}, checkpoint={"every": 4, "keep_last": 3})
    config = write_config(probe, {**raw, "trainer": {**raw["trainer"], "max_steps": 4}})
    train = [sys.executable, "-m", "launch.cli", "train", "--nproc", str(nproc)]
    first = subprocess.run([*train, str(config)], cwd=probe, env=quiet_env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in (probe / "runs").rglob("*") if p.is_file())
    ckpt = sum(p.stat().st_size for p in (probe / "runs" / "tiny" / "checkpoints" / "step_4").iterdir())
    mounted = tmp_path / "tmpfs"
    if not _mount_tmpfs(mounted, used + ckpt // 2 + 64 * 1024):
        pytest.skip("needs root to mount a tmpfs")
    try:
        config = write_config(tmp_path, {**raw, "runs_dir": str(mounted)})
        done = subprocess.run([*train, str(config)], cwd=tmp_path, env=quiet_env(), capture_output=True, text=True,
                              timeout=300)
        checkpoints = mounted / "tiny" / "checkpoints"
        names = sorted(p.name for p in checkpoints.iterdir())
        valid = verify(checkpoints / "step_4")
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("ebt train: error: no space left on the device to save checkpoint step_8 of the "
                               f"run in {mounted / 'tiny'}: it needs "), lines[0]
    assert names == ["step_4"] and valid is None


# Stops `ebt train` inside a checkpoint's hashing (issue 22): while the background writer digests a checkpoint
# after step 4's ("save"), or while a resume verifies this rank's files ("verify"); it says so on stdout first.
SLOW_HASH = textwrap.dedent("""
    import os, sys, time
    import launch.checkpoint as checkpoint
    phase = os.environ["EBT_TEST_SLOW_HASH"]
    real = checkpoint.sha256_file
    def slow(path, *args, **kwargs):
        writing = ".tmp-step_" in str(path)
        if (phase == "save" and writing and ".tmp-step_4" not in str(path)) or (phase == "verify" and not writing):
            print("HASHING", flush=True)
            time.sleep(60)
        return real(path, *args, **kwargs)
    checkpoint.sha256_file = slow
    from launch.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def kill_while_hashing(work: Path, config: Path, name: str, phase: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_HASH, "train", str(config), f"name={name}"], cwd=work,
                            env=dict(quiet_env(), EBT_TEST_SLOW_HASH=phase), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.strip() == "HASHING":
                break
        else:
            raise AssertionError(f"never reached the {phase} hashing: {proc.stderr.read()}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_hashed_or_verified_then_the_rerun_is_exact(reference):
    work, config, expected = reference(1)
    run_dir = work / "runs" / "killed-hashing"
    checkpoints = run_dir / "checkpoints"
    kill_while_hashing(work, config, run_dir.name, "save")  # in the background write after step 4's
    assert CheckpointManager(checkpoints, keep_last=3).latest_valid() == checkpoints / "step_4"
    assert list(checkpoints.glob(".tmp-step_*"))  # the write it was in, never renamed into place
    kill_while_hashing(work, config, run_dir.name, "verify")  # the rerun, while it verifies step_4's files
    assert verify(checkpoints / "step_4") is None  # verification only reads
    done = run_train(work, config, f"name={run_dir.name}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step_4 (step 4)" in done.stdout
    assert training_rows(run_dir) == expected
