"""Host syncs per optimizer step, counted without a GPU.

On CUDA every read of a device value by the host (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, a blocking copy
to the CPU, ...) waits for the device to drain its queue, so a step that reads values in every micro-step (or
every MCMC step) leaves the GPU idle between them. Each of those reads dispatches through `__torch_function__`,
so a TorchFunctionMode sees them on CPU tensors too: this file counts them while a tiny CPU Trainer runs
several optimizer steps (log_every larger than those steps, so no metrics row is written) and holds the trainer
to at most ONE per optimizer step, for DDP-style and (one-rank) fsdp training.

`Tensor.to` counts when it names the CPU ("cpu"): a device-relative move (`.to(x.device)` inside torch's
clip_grad_norm_, the trainer's `.to(self.device)` of each loader batch) is a no-op on a CPU run and stays on the
GPU (or is a host-to-device copy) on CUDA. Not counted either: reads of AdamW's `step` counters, which torch.optim
keeps on the host unless capturable/fused (their `.item()` is no device sync on CUDA either).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[2]
READS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy",
                   "cpu", "__array__"})
STEPS = 3


def _names_cpu(args: tuple, kwargs: dict) -> bool:
    """Whether a Tensor.to(...) call names the CPU as its target (a dtype-only .to is not a transfer)."""
    return any(isinstance(value, str) and torch.device(value).type == "cpu"
               for value in (kwargs.get("device"), *args[1:]))


def _where() -> str:
    """file:line of the innermost frame in this repository (outside torch and this file)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(str(REPO)) and not name.endswith("test_step_syncs.py"):
            return f"{os.path.relpath(name, REPO)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class SyncCounter(TorchFunctionMode):
    """Records every host read of a tensor value (see the module docstring), with where it happened."""

    def __init__(self, host_tensors=lambda: ()) -> None:
        super().__init__()
        self.host_tensors = host_tensors  # tensors that live on the host on CUDA too (AdamW's step counts)
        self.events: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        read = name in READS or (name == "to" and _names_cpu(args, kwargs))
        if read and args and isinstance(args[0], torch.Tensor):
            if not any(args[0] is t for t in self.host_tensors()):
                self.events.append((name, _where()))
        return func(*args, **kwargs)


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [state["step"] for state in optimizer.state.values() if torch.is_tensor(state.get("step"))]


def count_syncs(trainer, steps: int = STEPS) -> list[list[tuple[str, str]]]:
    """Per optimizer step, the host reads train_step made."""
    trainer.train_step()  # the first step creates AdamW's state (and any lazy init): not counted
    per_step = []
    for _ in range(steps):
        counter = SyncCounter(lambda: _optimizer_steps(trainer.optimizer))
        with counter:
            trainer.train_step()
        per_step.append(counter.events)
    return per_step


def _trainer(tmp_path, monkeypatch, **sections):
    from train_support import tiny_raw

    from launch.config import build_config
    from launch.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)  # fsdp's one-process rendezvous sets them; undone afterwards
    raw = tiny_raw(trainer={"max_steps": 50, "log_every": 100, "grad_accum_steps": 2}, checkpoint={"every": 0},
                   **sections)
    trainer = Trainer(build_config(raw), log=lambda msg: None)
    trainer.setup()
    return trainer


def test_the_counter_sees_every_kind_of_host_read():
    counter = SyncCounter()
    x = torch.ones(3)
    with counter:
        x.sum().item()
        bool(x.all())
        float(x[0])
        int(x[1])
        x.tolist()
        x.numpy()
        x.cpu()
        x.to("cpu")
        x.to(torch.float64)  # not a transfer
        x.to(x.device)  # device-relative: a no-op here, on the GPU under CUDA
    assert [name for name, _ in counter.events] == ["item", "__bool__", "__float__", "__int__", "tolist", "numpy",
                                                    "cpu", "to"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_at_most_one_host_sync_per_optimizer_step(tmp_path, monkeypatch, strategy):
    trainer = _trainer(tmp_path, monkeypatch, distributed={"strategy": strategy})
    try:
        per_step = count_syncs(trainer)
    finally:
        trainer.close()
    for events in per_step:
        assert len(events) <= 1, f"{strategy}: {len(events)} host syncs in one optimizer step:\n" + "\n".join(
            f"  {name} at {where}" for name, where in events)


# ---- the pieces the trainer's hot path relies on ------------------------------------------------------------


def test_the_training_forward_flags_a_nonfinite_inner_gradient_without_a_host_read():
    from ebt_factories import tiny_model

    from ebt import NonFiniteEnergyGradientError

    model = tiny_model()
    with torch.no_grad():
        model.energy_model.energy_head.weight.fill_(float("nan"))
    tokens = torch.randint(0, 11, (2, 5))
    counter = SyncCounter()
    with counter:
        _, metrics = model(tokens, init_logits=torch.zeros(2, 4, 11, dtype=torch.float64))
    assert counter.events == [] and metrics["nonfinite"].dtype == torch.bool and bool(metrics["nonfinite"])
    with pytest.raises(NonFiniteEnergyGradientError, match="MCMC step 0"):  # the direct API's explicit check
        model.loss(tokens)


def test_an_inner_gradient_error_raised_inside_the_forward_becomes_a_flagged_zero_loss():
    from ebt_factories import tiny_model

    from benchmarks.experimental.step_runners import use_step_runner
    from ebt import NonFiniteEnergyGradientError

    def raising(*args, **kwargs):
        raise NonFiniteEnergyGradientError("non-finite dE/dlogits at MCMC step 0")

    model = tiny_model()
    use_step_runner(model, raising)
    loss, metrics = model(torch.randint(0, 11, (2, 5)))
    assert bool(metrics["nonfinite"]) and loss.item() == 0.0
    loss.backward()  # touches every parameter, so DDP's and FSDP's backward collectives all run
    assert all(p.grad is not None for p in model.parameters())


def test_the_loader_refuses_an_id_outside_the_vocabulary_and_the_model_keeps_its_message():
    import numpy as np
    from ebt_factories import tiny_model

    from data_pipeline.loader import check_token_batch

    good = np.array([[0, 5, 10]])
    assert check_token_batch(good, 11, "shards") is good
    with pytest.raises(ValueError, match=r"token id 11 in shards is outside the vocabulary \[0, 11\)"):
        check_token_batch(np.array([[0, 11]]), 11, "shards")
    with pytest.raises(ValueError, match=r"^tokens: token id -2 is outside the vocabulary \[0, 11\)"):
        tiny_model().loss(torch.tensor([[1, -2, 3]]))


def test_sequence_keyed_starts_read_nothing_back_and_do_not_depend_on_chunking(monkeypatch):
    import ebt.starts as starts

    tokens = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    counter = SyncCounter()
    with counter:
        whole = starts.sequence_keyed_starts(tokens, 7, 3, 51, 1.0, torch.float32)  # odd S x V: 408
    assert counter.events == []
    monkeypatch.setitem(starts._CHUNK, "cpu", 7)  # many row and counter chunks, a ragged last one
    assert torch.equal(starts.sequence_keyed_starts(tokens, 7, 3, 51, 1.0, torch.float32), whole)
    wide = starts.sequence_keyed_starts(tokens, 7, 3, 51, 1.0, torch.float64)
    assert torch.equal(wide.float(), whole)  # float64 math throughout: the dtype only rounds the result
    assert not torch.equal(starts.sequence_keyed_starts(tokens, 7, -1, 51, 1.0, torch.float32), whole)
