import atexit
import os
import random
import shutil
import sys
import tempfile

import pytest
import torch

# Tests mirror the package tree (tests/ebt/, tests/launch/, ...); helpers that are not tests live in tests/helpers/.
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
sys.path.insert(0, HELPERS)  # lets tests import shared helpers such as ebt_oracle
# The CPU peak-FLOPs calibration (launch/metrics.py) persists per machine; tests keep it out of the user's cache.
PEAK_CACHE = os.path.join(tempfile.gettempdir(), f"ebt-test-peak-flops-{os.getuid()}.json")
os.environ.setdefault("EBT_PEAK_FLOPS_CACHE", PEAK_CACHE)
# GPU memory plans (planning/cache.py) are cached on disk; tests plan into a directory of their own, new each session,
# so a stale entry can never stand in for what the planner computes now.
PLAN_CACHE = tempfile.mkdtemp(prefix="ebt-test-plans-")
atexit.register(shutil.rmtree, PLAN_CACHE, ignore_errors=True)
os.environ.setdefault("EBT_PLAN_CACHE", PLAN_CACHE)
# Worker scripts (a test file run by torchrun) and subprocesses find the helpers the same way.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HELPERS, os.environ.get("PYTHONPATH")) if p)

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Every test starts from the same RNG states, whatever ran before it in the process: torch's and Python's
    # (the reference's replay buffer picks chains with random.sample; unseeded, a parity case ran a different
    # trajectory from run to run).
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    yield


# A Trainer built inside the test process sets the torch.distributed variables for its world of one
# (launch.distributed._single_process_rendezvous), MASTER_PORT included; left in os.environ, every later `ebt train`
# subprocess inherited that port and failed with EADDRINUSE. Each test gets them back as they were.
RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _rendezvous_env_restored():
    saved = {key: os.environ.get(key) for key in RENDEZVOUS_KEYS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
