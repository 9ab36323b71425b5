"""A rank that stops responding makes the others fail within distributed.timeout_s, never hang.

Launched the way srun does it (one plain process per rank with the torch.distributed variables set, no torchrun
agent that would clean up for us), then rank 1 is frozen with SIGSTOP mid-training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from train_support import env, free_port, read_rows, tiny_raw, write_config

pytestmark = pytest.mark.slow

TIMEOUT_S = 10


def test_a_frozen_rank_makes_the_other_exit_with_an_error_in_bounded_time(tmp_path):
    config = write_config(tmp_path, tiny_raw(trainer={"max_steps": 10_000}, checkpoint={"every": 0}))
    port = free_port()
    procs = []
    for rank in range(2):
        rank_env = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", str(config), f"distributed.timeout_s={TIMEOUT_S}"],
            cwd=tmp_path, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 180
        while not read_rows(tmp_path / "runs" / "tiny") and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-2000:]
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        out, _ = procs[0].communicate(timeout=TIMEOUT_S + 90)
        waited = time.monotonic() - frozen_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode not in (0, None)
    assert "Timed out" in out or "timed out" in out, out[-2000:]
    assert waited < TIMEOUT_S + 90
