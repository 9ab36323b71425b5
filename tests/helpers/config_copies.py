"""A private copy of the repo's training and model configs for tests whose results depend on config bytes.

A sweep's run names and hashes include its base config files, so a test that plans or runs a sweep must not
see an edit made to the repo's configs while it runs. Used by the sweep-spec and Slurm-cluster tests, which
each point their module's BASE at the copy."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"


def frozen_quickstart(root: Path) -> Path:
    """Copy configs/train, configs/model and configs/recipes (the base includes a size file and a recipe) under
    `root`; return the copied quickstart.yaml."""
    for folder in ("train", "model", "recipes"):
        shutil.copytree(REPO / "configs" / folder, root / folder)
    return root / "train" / QUICKSTART.name
