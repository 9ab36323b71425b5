"""Bad input through the real `ebt` entry point: ONE line on stderr naming the key, file or value, a non-zero exit
code, and nothing left behind (the directory trees of the run and data cache dirs are compared before and after:
no lock, no half-written file, no empty directory)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_support import tiny  # noqa: F401 - session fixture
from model_configs import model_config
from train_support import (
    data_section,
    env,
    file_tree,
    free_port,
    read_rows,
    run_cli,
    tiny_model_raw,
    tiny_raw,
    write_config,
)

from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"








# ---------------------------------------------------------------------------------------------- ebt train


def test_a_context_length_beyond_memory_is_refused_before_any_file_is_written(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    before = file_tree(tmp_path)
    line = run_cli(capfd, ["train", str(QUICKSTART), "model.architecture.context_length=1000000",
                           f"runs_dir={tmp_path}/runs",
                           f"data.cache_dir={tmp_path}/cache"],
                   "ebt train: error: ", "model.architecture.context_length", "trainer.micro_batch_size", "GB")
    assert "available" in line and "predicted" in line
    assert file_tree(tmp_path) == before


@pytest.mark.parametrize("content, fragment", [(b"", "is empty (0 bytes)"), (b"\xff\xfe\xfa bad\n" * 20, "not UTF-8")],
                         ids=["empty", "non-utf8"])
def test_an_empty_or_non_utf8_data_file_is_named_and_leaves_no_lock(tmp_path, monkeypatch, capfd, content, fragment):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_bytes(content)
    config = write_config(data, tiny_model_raw(tmp_path, {"source": str(data / "corpus.txt")}))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", str(data / "corpus.txt"), fragment)
    assert file_tree(tmp_path) == before  # no cache dir, no .lock, no runs dir


@pytest.mark.parametrize("override, key", [("model.architecture.vocab_size=1", "model.architecture.vocab_size"),
                                           ("data.vocab_size=1", "data.vocab_size")])
def test_a_bad_vocab_size_names_the_key_and_leaves_no_lock(tmp_path, monkeypatch, capfd, override, key):
    monkeypatch.chdir(tmp_path)
    # The session's tiny corpus, but a fresh cache: nothing may be prepared for a run that cannot start.
    config = write_config(tmp_path, tiny_raw(runs_dir=str(tmp_path / "runs"),
                                             data={"cache_dir": str(tmp_path / "cache")}))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config), override], "ebt train: error: ", key)
    assert file_tree(tmp_path) == before


def test_a_truncated_shard_is_named_with_its_expected_and_actual_size(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(data_section()["cache_dir"], cache)
    shard = sorted(cache.glob("shards/*/train_00001.npy"))[0]
    full = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(full // 2)
    config = write_config(tmp_path, tiny_raw(runs_dir=str(tmp_path / "runs"), data={"cache_dir": str(cache)}))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", str(shard), str(full), str(full // 2))
    assert file_tree(tmp_path) == before


@pytest.mark.parametrize("where", ["file", "proc"])
def test_a_runs_dir_that_cannot_hold_runs_is_one_line(tmp_path, monkeypatch, capfd, where):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "a-file" if where == "file" else Path("/proc/ebt-test-runs")
    (tmp_path / "a-file").write_text("not a directory\n")
    config = write_config(tmp_path, tiny_raw(runs_dir=str(runs)))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", "runs_dir", str(runs))
    assert file_tree(tmp_path) == before


def test_nproc_zero_is_refused(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_raw(runs_dir=str(tmp_path / "runs")))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config), "--nproc", "0"], "ebt train: error: --nproc: must be >= 1")
    assert file_tree(tmp_path) == before


def test_a_config_path_that_is_a_directory_says_so(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    before = file_tree(tmp_path)
    line = run_cli(capfd, ["train", str(REPO / "configs" / "train")], "ebt train: error: ",
                   str(REPO / "configs" / "train"), "is a directory")
    assert "not found" not in line
    assert file_tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- ebt data


def test_shards_made_with_another_tokenizer_say_what_differs_and_where(tmp_path, tiny, capfd):  # noqa: F811
    shards = tmp_path / "shards"
    common = ["data", "prepare", "--source", "embedded", "--max-bytes", str(tiny.cfg.max_bytes), "--no-docs",
              "--max-sentences", str(tiny.cfg.tokenizer_max_sentences), "--val-fraction", "0.25", "--out",
              str(shards), "--num-proc", "1", "--no-progress"]
    assert main([*common, "--tokenizer", tiny.tokenizer]) == 0
    capfd.readouterr()
    before = file_tree(tmp_path)
    line = run_cli(capfd, [*common, "--cache-dir", str(tmp_path / "cache"), "--vocab-size", "400"],
                   "ebt data: error: ", str(shards), "512", "400")
    assert "--force" not in line
    assert file_tree(tmp_path) == before  # no tokenizer trained for shards that could not be written


def test_symlinked_directories_do_not_repeat_documents(tmp_path, tiny, capfd):  # noqa: F811
    docs = tmp_path / "docs"
    (docs / "real" / "sub").mkdir(parents=True)
    for i in range(6):
        (docs / "real" / ("sub" if i % 2 else "") / f"d{i}.txt").write_text(f"document {i}\n" * (10 + i))
    os.symlink(docs / "real", docs / "alias")  # as python3-doc's html dirs: the same files under two names
    os.symlink(docs / "real" / "d0.txt", docs / "link.txt")
    from data_pipeline.sources import LocalFiles

    files = LocalFiles(f"{docs}/**/*.txt").files
    assert len(files) == 6 and len({os.path.realpath(f) for f in files}) == 6
    out = tmp_path / "shards"
    assert main(["data", "prepare", "--source", f"{docs}/**/*.txt", "--tokenizer", tiny.tokenizer, "--out",
                 str(out), "--val-fraction", "0", "--num-proc", "1", "--no-progress"]) == 0
    assert json.loads(capfd.readouterr().out)["splits"]["train"]["documents"] == 6


# ---------------------------------------------------------------------------------------------- weights


def _export_dir(path: Path, cfg) -> Path:
    """An `ebt export`-style directory written by hand (no training needed)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from ebt import build_model

    path.mkdir(parents=True)
    save_model(build_model(cfg), str(path / "model.safetensors"))
    import dataclasses

    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)})))
    return path


def _tiny_model_cfg(**changes):

    return model_config(**{"kind": "ebt", "vocab_size": 64, "context_length": 16, "dim": 32, "n_layers": 1,
                          "n_heads": 2, **changes})


def test_export_files_follow_the_umask(tmp_path, capfd):
    source = _export_dir(tmp_path / "src", _tiny_model_cfg())
    old = os.umask(0o022)
    try:
        assert main(["export", str(source), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.yaml": 0o644, ".ebt-export": 0o644}


def test_weights_that_do_not_match_their_config_name_the_checkpoint_and_key(tmp_path, capfd):
    from launch.checkpoint import CheckpointManager
    from launch.run_dir import load_model

    export = _export_dir(tmp_path / "export", _tiny_model_cfg())
    config = export / "config.yaml"
    config.write_text(config.read_text().replace("dim: 32", "dim: 48"))
    with pytest.raises(ValueError, match=r"^checkpoint .*export.*: .* shape") as error:
        load_model(export)
    assert len(str(error.value).splitlines()) == 1
    before = file_tree(tmp_path)
    run_cli(capfd, ["export", str(export), str(tmp_path / "out")], "ebt export: error: ", str(export), "shape")
    assert file_tree(tmp_path) == before

    # A training checkpoint (model.pt) whose config has an extra layer: the first missing key is named.
    from ebt import build_model

    ckpt = CheckpointManager(tmp_path / "checkpoints", keep_last=1).save(
        1, {"model": build_model(_tiny_model_cfg()).state_dict()}, {},
        "model:\n  kind: ebt\n  architecture:\n    vocab_size: 64\n    context_length: 16\n    dim: 32\n"
        "    n_layers: 2\n    n_heads: 2\n")
    with pytest.raises(ValueError, match=r"^checkpoint .*step_1: weight '.*blocks\.1\..*' .*is missing") as error:
        load_model(ckpt)
    assert len(str(error.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_a_killed_rank_is_named_by_the_survivor_in_one_line(tmp_path):
    config = write_config(tmp_path, tiny_raw(trainer={"max_steps": 10_000}, checkpoint={"every": 0}))
    port = free_port()
    procs = []
    for rank in range(2):
        rank_env = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", EBT_ALLOCATOR_NOTED="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config)], cwd=tmp_path,
                                      env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 180
        while not read_rows(tmp_path / "runs" / "tiny") and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGKILL)
        _out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("ebt train: error: ") and "rank 1" in lines[0], lines[0]
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob(".*tmp*"))



def _count_under_lock(path: str, rounds: int) -> None:
    from data_pipeline.prepare import dir_lock

    for _ in range(rounds):
        with dir_lock(path):
            counter = Path(path + ".count")
            value = int(counter.read_text()) if counter.exists() else 0
            time.sleep(0.001)  # widen the window a lost lock would need
            counter.write_text(str(value + 1))


def test_the_data_lock_excludes_and_leaves_no_file(tmp_path):
    """The lock file is deleted by its holder; waiters that got the deleted file must lock the new one."""
    import multiprocessing as mp

    target = str(tmp_path / "deep" / "out")
    ctx = mp.get_context("fork")
    children = [ctx.Process(target=_count_under_lock, args=(target, 40)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert (tmp_path / "deep" / "out.count").read_text() == "120"
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out.count"]
