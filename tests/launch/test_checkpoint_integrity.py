"""Checkpoint integrity at scale (issue 22): each rank hashes only the files it wrote, a resume hashes only each
rank's own files and the ranks agree, `ebt checkpoint verify` hashes everything, and a pickle that would run code
is refused.

Two ranks are two threads here, each with its own CheckpointManager, meeting at a threading.Barrier: the manager
only needs a barrier, a sum and a gather, so the collectives are stood in for without processes; which files each
rank hashes is recorded by wrapping the manager's sha256."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

import launch.checkpoint as checkpoint
from launch.checkpoint import CheckpointManager, CheckpointUnsafeError, load_pt, owner, verify
from launch.cli import main as cli_main


class ThreadRanks:
    """Collectives for `world` threads: barrier, all_sum and all_gather over Python values."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def all_gather(self, rank: int, value):
        self.barrier.wait()
        self.slots[rank] = value
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()
        return gathered

    def run(self, body) -> list:
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = body(rank)
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,), name=f"rank{rank}") for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def hashed_by(monkeypatch) -> dict[str, list[str]]:
    """Thread name -> the files the checkpoint module hashed by reading them back."""
    seen: dict[str, list[str]] = {}
    real = checkpoint.sha256_file

    def recording(path, *args, **kwargs):
        seen.setdefault(threading.current_thread().name, []).append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "sha256_file", recording)
    return seen


def managers(root: Path, ranks: ThreadRanks, logs: list[str]) -> list[CheckpointManager]:
    def all_sum(rank):
        return lambda values: [sum(v) for v in zip(*ranks.all_gather(rank, values), strict=True)]

    return [CheckpointManager(root, keep_last=5, rank=rank, world_size=ranks.world, barrier=ranks.barrier.wait,
                              log=logs.append, all_sum=all_sum(rank)) for rank in range(ranks.world)]


def save_two_ranks(root: Path, step: int, ranks: ThreadRanks, logs: list[str]) -> None:
    """A DCP-shaped checkpoint: every rank writes its shard __<r>_0.distcp (1 MB of its own bytes) and its
    rank_<r>.pt; rank 0 also the coordinator's .metadata and the shared trainer.pt."""
    mgrs = managers(root, ranks, logs)

    def body(rank: int) -> None:
        def sharded_save(directory: Path) -> None:
            directory.mkdir(exist_ok=True)
            (directory / f"__{rank}_0.distcp").write_bytes(bytes([rank + step]) * (1 << 20))
            if rank == 0:
                (directory / ".metadata").write_bytes(b"metadata of step %d" % step)

        shared = {"trainer": {"step": step}} if rank == 0 else {}
        mgrs[rank].save(step, shared, {"rng": torch.get_rng_state(), "rank": rank}, "model: {}\n",
                        sharded_save=sharded_save)

    ranks.run(body)


def test_each_rank_hashes_only_the_files_it_wrote_and_the_manifest_covers_all(tmp_path, hashed_by):
    ranks = ThreadRanks(2)
    save_two_ranks(tmp_path, 3, ranks, [])
    final = tmp_path / "step_3"
    manifest = json.loads((final / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [name for name in on_disk if name != "manifest.json"]
    for rel, meta in manifest["files"].items():  # digests computed independently of the module
        data = (final / rel).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, rel
    # What torch.save wrote was hashed on the way out (never read back); each shard by the rank that wrote it.
    assert sorted(hashed_by.get("rank1", [])) == ["__1_0.distcp"]
    assert sorted(hashed_by.get("rank0", [])) == [".metadata", "__0_0.distcp", "config.yaml"]
    assert not (final / ".digests").exists() and not list(tmp_path.glob(".tmp-*"))
    assert manifest["world_size"] == 2 and manifest["reshardable"]


def test_resume_hashes_own_files_and_every_rank_falls_back_past_a_flipped_shard(tmp_path, hashed_by):
    ranks = ThreadRanks(2)
    logs: list[str] = []
    for step in (2, 4):
        save_two_ranks(tmp_path, step, ranks, logs)
    shard = tmp_path / "step_4" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only rank 1's hash can tell
    shard.write_bytes(bytes(data))
    hashed_by.clear()
    mgrs = managers(tmp_path, ranks, logs)
    chosen = ranks.run(lambda rank: mgrs[rank].latest_valid(gather=lambda value: ranks.all_gather(rank, value)))
    assert chosen == [tmp_path / "step_2"] * 2
    assert any("step_4 is unusable (dcp/__1_0.distcp fails its checksum" in line for line in logs)
    # Neither rank read the other's files: rank 1 its shard and rank_1.pt, rank 0 the rest.
    rank1 = set(hashed_by["rank1"])
    assert rank1 == {"__1_0.distcp", "rank_1.pt"}
    assert not rank1 & set(hashed_by["rank0"])


def test_a_resume_at_fewer_ranks_still_hashes_every_file_once(tmp_path):
    save_two_ranks(tmp_path, 1, ThreadRanks(2), [])
    files = json.loads((tmp_path / "step_1" / "manifest.json").read_text())["files"]
    assert sorted(rel for rel in files if owner(rel, 1) == 0) == sorted(files)
    assert {owner(rel, 2) for rel in files} == {0, 1}
    assert owner("deepspeed/state/zero_pp_rank_3_mp_rank_00_optim_states.pt", 2) == 1


def test_the_cheap_check_reads_no_file_and_still_sees_a_truncation(tmp_path, hashed_by):
    save_two_ranks(tmp_path, 1, ThreadRanks(2), [])
    hashed_by.clear()
    assert verify(tmp_path / "step_1", hashed=lambda rel: False) is None and not hashed_by
    shard = tmp_path / "step_1" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert "__0_0.distcp is truncated" in verify(tmp_path / "step_1", hashed=lambda rel: False)


def test_checkpoint_verify_command_hashes_everything(tmp_path, capsys):
    ranks = ThreadRanks(2)
    for step in (2, 4):
        save_two_ranks(tmp_path / "run" / "checkpoints", step, ranks, [])
    assert cli_main(["checkpoint", "verify", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step_2: ok" in out and "step_4: ok" in out
    rank_file = tmp_path / "run" / "checkpoints" / "step_2" / "rank_1.pt"
    data = bytearray(rank_file.read_bytes())
    data[-10] ^= 0x01
    rank_file.write_bytes(bytes(data))
    assert cli_main(["checkpoint", "verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "step_2: BAD: rank_1.pt fails its checksum" in out and "step_4: ok" in out


class RunsCode:
    """Unpickling this calls os.system: what a shared checkpoint must never be able to do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "it-ran"
    crafted = tmp_path / "step_1"
    crafted.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(marker)}, crafted / "model.pt")
    with pytest.raises(CheckpointUnsafeError) as refused:
        load_pt(crafted / "model.pt")
    message = str(refused.value)
    assert "\n" not in message and str(crafted / "model.pt") in message and "system" in message
    assert not marker.exists()
    # Through a command: a checkpoint dir with a valid manifest around the crafted file.
    (crafted / "config.yaml").write_text("model:\n  architecture:\n    vocab_size: 64\n    context_length: 8\n"
                                         "    dim: 16\n    n_layers: 1\n    n_heads: 2\n")
    files = {name: {"sha256": hashlib.sha256((crafted / name).read_bytes()).hexdigest(),
                    "bytes": (crafted / name).stat().st_size} for name in ("model.pt", "config.yaml")}
    (crafted / "manifest.json").write_text(json.dumps({"step": 1, "world_size": 1, "files": files}))
    assert cli_main(["export", str(crafted), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "refusing to load it" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_projects_own_files_load_as_data(tmp_path):
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "data": {"epoch": 1, "offset": 5, "buffer": [1, 2]}}
    entry = checkpoint._save_pt(state, tmp_path / "rank_0.pt")
    assert entry["sha256"] == hashlib.sha256((tmp_path / "rank_0.pt").read_bytes()).hexdigest()
    loaded = load_pt(tmp_path / "rank_0.pt")
    assert loaded["python"] == state["python"] and loaded["data"] == state["data"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(loaded["numpy"], state["numpy"], strict=True))


# ---------------------------------------------------------------------------------------------- async saves


def test_an_async_save_writes_the_state_as_it_was_when_save_returned(tmp_path):
    from launch.async_save import BackgroundSaver

    weights = torch.arange(1000, dtype=torch.float32)
    manager = CheckpointManager(tmp_path, keep_last=3, background=BackgroundSaver())
    path = manager.save(1, {"model": {"w": weights}}, {"buffer": [weights[:10]]}, "model: {}\n")
    weights.add_(1.0)  # the next optimizer step, while the write may still be in flight
    manager.wait()
    assert verify(path) is None
    assert torch.equal(load_pt(path / "model.pt")["w"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(load_pt(path / "rank_0.pt")["buffer"][0], torch.arange(10, dtype=torch.float32))


def test_an_async_save_error_surfaces_at_the_next_wait(tmp_path, monkeypatch):
    from launch.async_save import BackgroundSaver

    manager = CheckpointManager(tmp_path, keep_last=3, background=BackgroundSaver())

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint, "_save_pt", broken)
    manager.save(1, {"trainer": {"step": 1}}, {}, "model: {}\n")  # returns: the error is the writer's
    with pytest.raises(OSError, match="Input/output error"):
        manager.wait()
    manager.wait()  # raised once


KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
import launch.checkpoint as checkpoint
from launch.async_save import BackgroundSaver

root = Path(sys.argv[1])
manager = checkpoint.CheckpointManager(root, keep_last=3, background=BackgroundSaver())
manager.save(2, {"trainer": {"step": 2}}, {"x": torch.zeros(4)}, "model: {}\\n")
manager.wait()
real = checkpoint.sha256_file

def slow(path, *args, **kwargs):  # the background writer hangs while hashing step 4's files
    print("hashing", flush=True)
    time.sleep(60)
    return real(path, *args, **kwargs)

checkpoint.sha256_file = slow
manager.save(4, {"trainer": {"step": 4}}, {"x": torch.ones(4)}, "model: {}\\n")
time.sleep(60)
"""


def test_kill_9_during_a_background_write_leaves_the_previous_checkpoint_newest(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "hashing"  # inside step 4's write, in the background thread
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / ".tmp-step_4").is_dir() and not (tmp_path / "step_4").exists()
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest_valid() == tmp_path / "step_2"
    manager.clean_partial()
    assert not (tmp_path / ".tmp-step_4").exists()


def test_two_ranks_write_in_the_background_on_their_own_collectives(tmp_path):
    from launch.async_save import BackgroundSaver

    ranks, side = ThreadRanks(2), ThreadRanks(2)  # the training group's collectives, and the writer's
    used: list[str] = []

    def body(rank: int) -> Path:
        def side_barrier() -> None:
            used.append("side")
            side.barrier.wait()

        def side_sum(values):
            return [sum(v) for v in zip(*side.all_gather(rank, values), strict=True)]

        def main_barrier() -> None:
            used.append("main")
            ranks.barrier.wait()

        manager = CheckpointManager(tmp_path, keep_last=3, rank=rank, world_size=2, barrier=main_barrier,
                                    background=BackgroundSaver(), background_collectives=(side_barrier, side_sum))
        path = manager.save(5, {"trainer": {"step": 5}} if rank == 0 else {}, {"rank": rank}, "model: {}\n")
        manager.wait()
        return path

    paths = ThreadRanks(2).run(body)
    assert paths == [tmp_path / "step_5"] * 2 and verify(tmp_path / "step_5", world_size=2) is None
    assert "main" not in used  # the write never touched the training group


def test_an_async_sharded_save_stages_now_and_writes_in_the_background_on_the_writers_group(tmp_path):
    """fsdp's path through the manager (FSDPStrategy.save_parts): `sharded_stage` runs in save() on the calling
    thread; the writer it returns runs in the background thread, with the background group, before the manifest;
    the synchronous `sharded_save` is not called."""
    from launch.async_save import BackgroundSaver

    weights = torch.arange(100, dtype=torch.float32)
    calls: list[tuple[str, str]] = []
    group = object()  # stands for the gloo group the trainer creates

    def sharded_save(directory: Path) -> None:
        raise AssertionError("the synchronous DCP save ran")

    def sharded_stage():
        calls.append(("stage", threading.current_thread().name))
        staged = weights.clone()

        def write(directory: Path, process_group) -> None:
            assert process_group is group
            assert not (directory.parent / checkpoint.MANIFEST).exists()
            calls.append(("write", threading.current_thread().name))
            directory.mkdir()
            torch.save({"w": staged}, directory / "__0_0.distcp")
        return write

    manager = CheckpointManager(tmp_path, keep_last=3, background=BackgroundSaver(), background_group=group)
    path = manager.save(1, {"trainer": {"step": 1}}, {}, "model: {}\n", sharded_save=sharded_save,
                        sharded_stage=sharded_stage)
    weights.add_(1.0)  # the next optimizer step, while the write may still be in flight
    manager.wait()
    assert calls == [("stage", threading.current_thread().name), ("write", "ebt-checkpoint-writer")]
    assert verify(path) is None and json.loads((path / checkpoint.MANIFEST).read_text())["reshardable"]
    assert torch.equal(load_pt(path / "dcp" / "__0_0.distcp")["w"], torch.arange(100, dtype=torch.float32))


def test_without_a_background_saver_a_sharded_save_stays_synchronous(tmp_path):
    calls: list[str] = []

    def sharded_save(directory: Path) -> None:
        calls.append("save")
        directory.mkdir()
        (directory / ".metadata").write_bytes(b"{}")

    def sharded_stage():
        raise AssertionError("staged without async saves")

    path = CheckpointManager(tmp_path, keep_last=3).save(1, {"trainer": {"step": 1}}, {}, "model: {}\n",
                                                        sharded_save=sharded_save, sharded_stage=sharded_stage)
    assert calls == ["save"] and verify(path) is None
