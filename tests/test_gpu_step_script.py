"""benchmarks/gpu_step.sh is the one prepared script for a lent GPU: keep it runnable. Its --tiny mode runs the
same code path on the CPU in seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_step_script_runs_end_to_end_in_tiny_mode(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_step.sh", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    rows = {(r["kind"], r["policy"], r["remat_chunk"]): r for r in result["results"]}
    assert ("transformer", "none", 0) in rows and ("ebt", "none", 0) in rows
    assert {policy for kind, policy, _ in rows if kind == "ebt"} >= {"none", "block", "mcmc_step", "block+mcmc_step"}
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
