"""The paper's presets (configs/recipes) through `ebt train` on the embedded corpus: each trains and learns, and
the EBT presets resume bit for bit after losing their newest checkpoint (S2 carries the most state: the replay
buffer, the RNG behind its noise, step sizes and repeats, and a fast-moving learnable alpha)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from model_configs import nested
from train_support import VOCAB, env, read_rows, tiny_raw, training_rows, write_config

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def recipe_run(tmp_path: Path, recipe: str, steps: int, name: str) -> subprocess.CompletedProcess:
    raw = tiny_raw(trainer={"max_steps": steps, "micro_batch_size": 8}, checkpoint={"every": 4, "keep_last": 3},
                   optim={"lr": 3e-3, "warmup_steps": 3})
    # Only sizes here: the recipe (the first file) supplies every training semantic.
    raw["model"] = nested(dim=32, n_layers=1, n_heads=2, context_length=16)
    config = write_config(tmp_path, raw)
    cmd = [sys.executable, "-m", "launch.cli", "train", str(RECIPES / f"{recipe}.yaml"), str(config), f"name={name}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("recipe", ["ebt_s1", "transformer"])
def test_recipe_trains_and_learns(tmp_path, recipe):
    done = recipe_run(tmp_path, recipe, 100, recipe)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [r for r in read_rows(tmp_path / "runs" / recipe) if "loss" in r]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    final = [r for r in read_rows(tmp_path / "runs" / recipe) if r.get("final")][-1]
    # Below uniform guessing: it learned the corpus (S1 starts near 1e3 nats: its first step makes ~1e3 logits).
    assert final["val_loss"] < math.log(VOCAB) - 0.3, final


@pytest.mark.parametrize("recipe", ["ebt_s1", "ebt_s2"])
def test_recipe_resumes_bit_for_bit(tmp_path, recipe):
    done = recipe_run(tmp_path, recipe, 8, recipe)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = tmp_path / "runs" / recipe
    expected = training_rows(run_dir)
    assert [r["step"] for r in expected] == list(range(1, 9))
    # As if it had crashed after step 8's row and before its checkpoint: no final row, no step_8.
    shutil.rmtree(run_dir / "checkpoints" / "step_8")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(True) if '"final": true' not in line))
    again = recipe_run(tmp_path, recipe, 8, recipe)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resumed from" in again.stdout and "step_4 (step 4)" in again.stdout
    assert training_rows(run_dir) == expected
