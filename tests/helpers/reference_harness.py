"""Run the authors' EBT (../shared/reference, alexiglad/EBT at 0ad3628) next to this project's, on shared draws.

- `reference_available()` says why the reference cannot run here, or None.
- `fp64_reference()`: the reference casts to float32 in its rotary embedding (complex64 tables and `.float()`),
  RMSNorm and attention softmax. For an fp64 comparison those casts are lifted while it runs: `Tensor.float()`
  leaves float64 tensors as they are and the rotary tables are rebuilt in complex128. The math is unchanged.
- `recording_draws()`: records every random number the reference draws (torch.randn for the starts,
  torch.rand_like for the per-token step size, torch.randint for repeated landscapes, torch.randn_like for
  Langevin noise, random.sample for the replay buffer), to hand to this project's model as `ebt.draws.Draws`.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path

import torch

from ebt.draws import Draws

REFERENCE_DIR = Path(os.environ.get("EBT_REFERENCE_DIR", Path(__file__).resolve().parents[3] / "shared" / "reference"))


def reference_available() -> str | None:
    if not (REFERENCE_DIR / "load_reference.py").exists():
        return f"the reference code is not at {REFERENCE_DIR} (set EBT_REFERENCE_DIR)"
    for module in ("pytorch_lightning", "torchmetrics", "PIL"):
        try:
            __import__(module)
        except ImportError:
            return f"the reference needs {module} (pip install -e '.[dev]')"
    return None


# load_reference.py installs stand-ins for packages the reference imports but the NLP path never uses; the stand-in
# `transformers` would break every later user of the real one in the same process (datasets' fingerprinting, the
# lm-eval adapter), so the parity tests put sys.modules and sys.path back when they are done.
STUBBED_PACKAGES = ("transformers", "torchvision", "diffusers")


@contextlib.contextmanager
def reference_imports_undone():
    """Run a block that loads the reference, then remove what it put into sys.modules and sys.path: the stand-in
    packages and every module imported from REFERENCE_DIR, restoring any real module they replaced."""
    modules_before = dict(sys.modules)
    path_before = list(sys.path)
    try:
        yield
    finally:
        root = str(REFERENCE_DIR)
        for name, module in list(sys.modules.items()):
            if modules_before.get(name) is module:
                continue
            from_reference = str(getattr(module, "__file__", "") or "").startswith(root)
            stand_in = name.split(".")[0] in STUBBED_PACKAGES and getattr(module, "__file__", None) is None
            if from_reference or stand_in:
                del sys.modules[name]
                if name in modules_before:
                    sys.modules[name] = modules_before[name]
        sys.path[:] = path_before


def load_reference():
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    import load_reference

    return load_reference


def complex128_rotary(reference_model) -> None:
    """Rebuild the reference transformer's rotary table in complex128 (it precomputes complex64)."""
    transformer = reference_model.transformer
    table = transformer.freqs_cis
    dim, end = 2 * table.shape[1], table.shape[0]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float64), freqs)
    transformer.freqs_cis = torch.polar(torch.ones_like(angles), angles)


@contextlib.contextmanager
def fp64_reference():
    original = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


class RecordedDraws(Draws):
    """Draws taken, in order, from what the reference drew in one forward."""

    def __init__(self, record: dict[str, list]) -> None:
        self.record = {key: list(values) for key, values in record.items()}

    def _pop(self, key: str):
        if not self.record.get(key):
            raise AssertionError(f"the model asked for a {key} draw the reference never made")
        return self.record[key].pop(0)

    def alpha_uniform(self, shape, like):
        value = self._pop("rand_like")
        assert tuple(value.shape) == tuple(shape), f"step-size draw of shape {value.shape}, asked {shape}"
        return value.to(like.dtype)

    def langevin(self, executed_step, like):
        value = self._pop("randn_like")
        assert value.shape == like.shape, f"Langevin draw of shape {value.shape}, asked {like.shape}"
        return value.to(like.dtype)

    def repeats(self, landscape, low, high):
        value = int(self._pop("randint"))
        assert low <= value <= high, f"repeats draw {value} outside the asked {low}..{high}"
        return value

    def replay_indices(self, size, count):
        indices = self._pop("sample")
        assert len(indices) == count, f"replay draw of {len(indices)} sequences, asked {count}"
        return indices

    def unused(self) -> dict[str, int]:
        return {key: len(values) for key, values in self.record.items() if values}


@contextlib.contextmanager
def recording_draws(replay_buffer=None):
    """Record the reference's random draws into a dict of lists (see the module docstring)."""
    record: dict[str, list] = {"randn": [], "rand_like": [], "randint": [], "randn_like": [], "sample": []}
    originals = (torch.randn, torch.rand_like, torch.randint, torch.randn_like, random.sample)

    def wrap(key, fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            record[key].append(out.detach().clone() if torch.is_tensor(out) else out)
            return out

        return recorded

    def sample(population, k):
        picked = originals[4](population, k)
        record["sample"].append([next(i for i, item in enumerate(population) if item is p) for p in picked])
        return picked

    torch.randn, torch.rand_like, torch.randint, torch.randn_like = (
        wrap("randn", originals[0]), wrap("rand_like", originals[1]), wrap("randint", originals[2]),
        wrap("randn_like", originals[3]),
    )
    random.sample = sample
    try:
        yield record
    finally:
        torch.randn, torch.rand_like, torch.randint, torch.randn_like, random.sample = originals
