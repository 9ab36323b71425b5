import os
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
# Worker scripts (a test file run by torchrun) and subprocesses find the helpers the same way.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HELPERS, os.environ.get("PYTHONPATH")) if p)

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
