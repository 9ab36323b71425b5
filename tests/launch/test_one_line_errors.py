"""Issue 21, "One line, not a traceback": each failure below is ONE stderr line `ebt <cmd>: error: ...` naming the
file, key or value, a non-zero exit, and nothing left behind (the file trees before and after are compared). A
read-only data cache that holds the prepared data trains from it."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from model_configs import model_config
from train_support import data_section, env, file_tree, run_cli, tiny_model_raw, tiny_raw, write_config

from launch.cli import main


def session_tokenizer() -> str:
    """The tokenizer the session's tiny corpus was prepared with (train_support.data_section)."""
    return str(next(Path(data_section()["cache_dir"]).glob("tokenizers/spm*")))


# ---------------------------------------------------------------------------------------------- read-only cache


def read_only(directory: Path, argv: list[str]) -> list[str]:
    """`argv` run with `directory` mounted read-only for it alone. Tests run as root, whom `chmod -R a-w` does not
    stop, so the directory is bind-mounted over itself read-only in a private user and mount namespace
    (`unshare -rm`: no root needed, nothing to unmount afterwards, the test process still sees it writable)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(directory), *argv]


@pytest.fixture(scope="module")
def read_only_mounts(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("ro-probe")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a read-only bind mount")
    result = subprocess.run(read_only(probe, ["sh", "-c", f"! touch {probe}/x 2>/dev/null"]), capture_output=True)
    if result.returncode != 0 or (probe / "x").exists():
        pytest.skip(f"no read-only bind mount in a user namespace here: {result.stderr.decode().strip()}")


def read_only_config(tmp_path: Path, cache: Path) -> Path:
    """Two steps of the tiny model on the session's corpus, prepared (or not) in `cache`."""
    return write_config(tmp_path, tiny_raw(runs_dir=str(tmp_path / "runs"), data={"cache_dir": str(cache)},
                                           trainer={"max_steps": 2, "eval_batches": 1}, checkpoint={"every": 0}))


def train_read_only(tmp_path: Path, cache: Path, config: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "launch.cli", "train", str(config)]
    return subprocess.run(read_only(cache, argv), cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)


def test_a_read_only_cache_that_holds_the_prepared_data_trains_from_it(tmp_path, read_only_mounts):
    cache = tmp_path / "cache"
    shutil.copytree(data_section()["cache_dir"], cache)
    config = read_only_config(tmp_path, cache)
    before = file_tree(cache)
    result = train_read_only(tmp_path, cache, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation perplexity" in result.stdout, result.stdout
    assert file_tree(cache) == before  # read without a lock file: nothing written, nothing left


@pytest.mark.parametrize("holds", ["nothing", "tokenizer"])
def test_a_read_only_cache_that_must_be_written_says_where_in_one_line(tmp_path, read_only_mounts, holds):
    cache = tmp_path / "cache"
    cache.mkdir()
    if holds == "tokenizer":  # read as it is; the shards are what must be written
        shutil.copytree(Path(data_section()["cache_dir"]) / "tokenizers", cache / "tokenizers")
    config = read_only_config(tmp_path, cache)
    before = file_tree(tmp_path)
    result = train_read_only(tmp_path, cache, config)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    what = "tokenizer directory" if holds == "nothing" else "shard directory"
    assert lines[0].startswith(f"ebt train: error: {what} {cache}/"), lines[0]
    assert f"but {cache} cannot be written to (Read-only file system)" in lines[0], lines[0]
    assert file_tree(tmp_path) == before  # no lock, no runs dir


# ---------------------------------------------------------------------------------------------- truncated weights


def truncated_export(path: Path) -> tuple[Path, int, int]:
    """An `ebt export`-style directory (no training) whose model.safetensors lost its second half."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from ebt import build_model

    cfg = model_config(kind="ebt", vocab_size=64, context_length=16, dim=32, n_layers=1, n_heads=2)
    path.mkdir(parents=True)
    weights = path / "model.safetensors"
    save_model(build_model(cfg), str(weights))
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)})))
    full = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(full // 2)
    return weights, full, full // 2


@pytest.mark.parametrize("command", [["generate", "--prompt", "def f():"], ["eval"]], ids=["generate", "eval"])
def test_a_truncated_safetensors_file_is_named_with_both_sizes(tmp_path, capfd, command):
    weights, full, now = truncated_export(tmp_path / "export")
    before = file_tree(tmp_path)
    line = run_cli(capfd, [command[0], "--checkpoint", str(tmp_path / "export"), *command[1:]],
                   f"ebt {command[0]}: error: ", str(weights), "truncated or corrupt safetensors file",
                   f"header says {full} bytes, file has {now}")
    assert "Traceback" not in line
    assert file_tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- empty val split


def test_a_single_text_file_is_refused_before_anything_is_prepared(tmp_path, monkeypatch, capfd):
    """One .txt file is one document, so one split is empty: refused before a tokenizer is trained, not after the
    last step, when validation first reads the val split (as it was: the file is large enough for the tokenizer)."""
    import argparse
    import textwrap

    from data_pipeline.sources import document_is_val

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(argparse.__file__).read_text() + Path(textwrap.__file__).read_text())
    empty = "train" if document_is_val(corpus.read_text(), 0.02) else "val"  # by content hash: val 2% of the time
    config = write_config(tmp_path, tiny_model_raw(tmp_path, {"source": str(corpus), "val_fraction": 0.02}))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", f"data.source '{corpus}'",
            f"leaves the {empty!r} split empty", "data.val_fraction")
    assert file_tree(tmp_path) == before  # no cache dir, no runs dir


def test_a_zero_val_fraction_is_refused_before_anything_is_prepared(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_raw(runs_dir=str(tmp_path / "runs"),
                                             data={"cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0}))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", "data.val_fraction=0", "'val' split", "embedded")
    assert file_tree(tmp_path) == before


def test_prepared_shards_with_an_empty_val_split_are_refused_before_the_first_step(tmp_path, monkeypatch, capfd):
    """Shards already prepared (`ebt data prepare` of one .txt file) are checked from their manifest."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(200)))
    shards, tokenizer = tmp_path / "shards", session_tokenizer()
    assert main(["data", "prepare", "--source", str(corpus), "--tokenizer", tokenizer, "--out", str(shards),
                 "--num-proc", "1", "--no-progress"]) == 0
    capfd.readouterr()
    data = {"source": str(corpus), "tokenizer": tokenizer, "shards_dir": str(shards)}
    config = write_config(tmp_path, tiny_model_raw(tmp_path, data))
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", "split 'val'", str(shards), str(corpus),
            "has no tokens", "data.val_fraction")
    assert file_tree(tmp_path) == before  # no runs dir: nothing trained


# ---------------------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("text, fragments", [
    ("model:\n  architecture:\n    dim: 32\n    n_layers: 1\n    dim: 48\n",
     ["not valid YAML at line 5", "duplicate key 'model.architecture.dim'", "first at line 3"]),
    ("model:\n  dim: 32\ntrainer: {max_steps: 2\n", ["not valid YAML at line 4", "flow mapping at line 3"]),
], ids=["duplicate-key", "syntax"])
def test_a_yaml_error_names_the_file_line_and_key(tmp_path, monkeypatch, capfd, text, fragments):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    before = file_tree(tmp_path)
    run_cli(capfd, ["train", str(config)], "ebt train: error: ", f"{config}: ", *fragments)
    assert file_tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- ebt report


@pytest.mark.parametrize("under", [False, True], ids=["file", "below-a-file"])
def test_report_onto_an_existing_file_is_one_line_and_keeps_the_file(tmp_path, capfd, under):
    existing = tmp_path / "notes.txt"
    existing.write_text("the user's notes\n")
    out = existing / "report" if under else existing
    before = file_tree(tmp_path)
    run_cli(capfd, ["report", str(tmp_path / "sweep"), "-o", str(out), "--no-progress"], "ebt report: error: ",
            f"-o/--out {out}", "not a directory")
    assert file_tree(tmp_path) == before and existing.read_text() == "the user's notes\n"
