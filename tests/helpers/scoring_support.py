"""Tiny trained runs (EBT and Transformer++) with real run dirs and tokenizers, made once per test session, for
the generate, downstream-task and lm-eval adapter tests."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from train_support import tiny_raw

from launch.config import build_config
from launch.train import run_training

STEPS = 4


@functools.lru_cache(maxsize=1)
def trained_runs() -> dict[str, Path]:
    """{"ebt": run dir, "transformer": run dir}, each trained STEPS steps by `run_training` (context 16)."""
    root = Path(tempfile.mkdtemp(prefix="ebt-scoring-tests-"))
    atexit.register(shutil.rmtree, root, True)
    runs = {}
    for kind in ("ebt", "transformer"):
        raw = tiny_raw(kind, name=f"tiny-{kind}", runs_dir=str(root / "runs"),
                       trainer={"max_steps": STEPS, "eval_batches": 1}, checkpoint={"every": 0})
        result = run_training(build_config(raw), log=lambda message: None)
        runs[kind] = Path(result["run_dir"])
    return runs
