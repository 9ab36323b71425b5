import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import shared helpers such as ebt_oracle

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
