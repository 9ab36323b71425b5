"""benchmarks/gpu_step.sh is the one prepared script for a lent GPU: keep it runnable. Its --tiny mode runs the
same code path on the CPU in seconds."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_step.sh"


def script_time_limit_s() -> int:
    """The limit the script puts on its own benchmark process (`timeout N` in gpu_step.sh)."""
    limits = [int(n) for n in re.findall(r"^\s*timeout\s+(\d+)\s", SCRIPT.read_text(), flags=re.MULTILINE)]
    assert limits, f"{SCRIPT} no longer bounds its benchmark with `timeout N`"
    return max(limits)


def test_gpu_step_script_runs_end_to_end_in_tiny_mode(tmp_path):
    # --tiny takes about 6 s on a quiet core. One thread per process: on a loaded machine OpenMP spinning over
    # busy cores made it 10-40x slower. The wait is the script's own bound plus its start-up, so a slow
    # machine ends with the script's own timeout message (exit 124), never with this test killing it first.
    done = subprocess.run(["bash", str(SCRIPT), "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=script_time_limit_s() + 120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    rows = {(r["kind"], r["policy"], r["remat_chunk"], r["sharding"]): r for r in result["results"]}
    assert ("transformer", "none", 0, None) in rows and ("ebt", "none", 0, None) in rows
    assert {policy for kind, policy, _, _ in rows if kind == "ebt"} >= {"none", "block", "mcmc_step", "block+mcmc_step"}
    assert ("ebt", "none", 0, "fsdp") in rows and ("ebt", "none", 0, "fsdp_regather") in rows
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
