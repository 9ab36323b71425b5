"""Shared helpers for the trainer tests: a tiny prepared corpus, tiny configs, and launching `ebt train`.

A module (not conftest.py) so the trainer tests own their helpers; the data is prepared once per session.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from model_configs import nested

from data_pipeline import DataConfig, prepare_if_needed
from fsutil import read_metrics_rows

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512  # sentencepiece needs ~350 pieces for the byte fallback plus the corpus's required chars

# Training values that exact resume must reproduce bit for bit (timing fields may differ).
TRAIN_KEYS = ("step", "tokens", "loss", "ppl", "alpha", "energy_gap", "lr", "grad_norm", "skipped",
              "nonfinite_steps")


@functools.lru_cache(maxsize=1)
def data_section() -> dict:
    """A DataConfig (as YAML-ready dict) over a 300 kB slice of the embedded corpus, prepared once."""
    root = tempfile.mkdtemp(prefix="ebt-train-tests-")
    atexit.register(shutil.rmtree, root, True)
    section = dict(source="embedded", max_bytes=300_000, include_docs=False, cache_dir=root, vocab_size=VOCAB,
                   tokenizer_max_sentences=20_000, val_fraction=0.25, num_proc=1, shard_tokens=30_000,
                   progress=False)
    prepare_if_needed(DataConfig(**section))
    return section


def tiny_raw(kind: str = "ebt", **sections: dict) -> dict:
    """A complete raw training config for a tiny model; `sections` update the named sections (`model` with flat
    keys, model_configs.nested's shorthand, nested here)."""
    raw = {
        "name": "tiny",
        "model": {"kind": kind, "dim": 32, "n_layers": 1, "n_heads": 2, "context_length": 16, "mcmc_steps": 2},
        "data": dict(data_section()),
        "optim": {"lr": 1.0e-3, "warmup_steps": 3},
        "trainer": {"max_steps": 24, "micro_batch_size": 4, "eval_batches": 2, "log_every": 1},
        "checkpoint": {"every": 4, "keep_last": 3},
        "logging": {"wandb": False, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    raw["model"] = nested(**raw["model"])
    return raw


def write_config(directory: Path, raw: dict, name: str = "config.yaml") -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict:
    out = dict(os.environ)
    out["OMP_NUM_THREADS"] = "1"
    out["PYTHONPATH"] = f"{REPO}{os.pathsep}{out.get('PYTHONPATH', '')}"
    out.pop("WANDB_MODE", None)
    return out


def train_cmd(config: Path, *overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "launch.cli", "train", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "launch.cli", "train", str(config), *overrides]


def run_train(cwd: Path, config: Path, *overrides: str, nproc: int = 1,
              timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, *overrides, nproc=nproc), cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def start_train(cwd: Path, config: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    """In its own session so the whole process group (torchrun and its workers) can be signalled at once."""
    return subprocess.Popen(train_cmd(config, *overrides, nproc=nproc), cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


read_rows = read_metrics_rows


def training_rows(run_dir: Path) -> list[dict]:
    """Per-step rows (not the final eval row) reduced to the keys exact resume must reproduce."""
    out = []
    for row in read_rows(run_dir):
        if row.get("final"):
            continue
        out.append({k: v for k, v in row.items() if k in TRAIN_KEYS or k.startswith("ce_step_")})
    return out


def cached_reference_runs(
    tmp_path_factory,
    raw_for: Callable[[int], dict],
    train: Callable[[Path, Path, str, int], subprocess.CompletedProcess],
    max_steps: int,
    check_rows: Callable[[list[dict]], None] | None = None,
) -> Callable[[int], tuple[Path, Path, list[dict]]]:
    """What a module-scoped `reference` fixture returns: get(nproc) -> (work dir, config path, training rows) of an
    uninterrupted run with that many ranks, trained once per rank count and cached.

    `raw_for(nproc)` is the run's raw config; `train(work, config, "name=ref", nproc)` runs it to the end in
    `work`. Every run must succeed with one row per step up to `max_steps` (and pass `check_rows`)."""
    cache: dict[int, tuple[Path, Path, list[dict]]] = {}

    def get(nproc: int) -> tuple[Path, Path, list[dict]]:
        if nproc not in cache:
            work = tmp_path_factory.mktemp(f"ref{nproc}")
            config = write_config(work, raw_for(nproc))
            done = train(work, config, "name=ref", nproc)
            assert done.returncode == 0, done.stdout + done.stderr
            rows = training_rows(work / "runs" / "ref")
            assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
            if check_rows is not None:
                check_rows(rows)
            cache[nproc] = (work, config, rows)
        return cache[nproc]

    return get


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> int:
    """Poll metrics.jsonl until a row with step >= `step` appears; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in read_rows(run_dir) if not r.get("final")]
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group; a SIGKILL also goes to every descendant, as a node failure would kill them:
    torchrun starts each worker in its own session, so its group alone leaves the ranks running, and they
    finish the run before the test restarts it."""
    if sig == signal.SIGKILL:
        import psutil

        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for process in descendants:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    os.killpg(proc.pid, sig)


def file_tree(root: Path | str) -> dict[str, object]:
    """Every directory and file under `root` (with size and mtime), so any leftover or change shows."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def free_port() -> int:
    """A TCP port free on localhost now (for a hand-started 2-rank run's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- CLI errors


def one_error_line(capfd, code: int, *fragments: str) -> str:
    """The single stderr line of a failed command; it must contain every fragment."""
    _out, err = capfd.readouterr()
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_cli(capfd, argv: list[str], *fragments: str) -> str:
    """`ebt ARGV` in this process, which must fail with one stderr line holding every fragment."""
    from launch.cli import main

    return one_error_line(capfd, main(argv), *fragments)


def tiny_model_raw(tmp_path: Path, data: dict) -> dict:
    """A tiny training config over `data` (no session corpus needed), with runs under tmp_path."""
    return {
        "name": "tiny", "runs_dir": str(tmp_path / "runs"),
        "model": nested(kind="ebt", dim=32, n_layers=1, n_heads=2, context_length=16, mcmc_steps=2),
        "data": {"cache_dir": str(tmp_path / "cache"), "vocab_size": 512, "tokenizer_max_sentences": 2000,
                 "num_proc": 1, "progress": False, **data},
        "trainer": {"max_steps": 2, "micro_batch_size": 2, "eval_batches": 1},
        "checkpoint": {"every": 0},
        "logging": {"wandb": False, "progress": False},
    }
