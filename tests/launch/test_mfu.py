"""MFU's peak: the data-sheet figure for the device and the precision actually trained in, a CPU calibration that
load cannot pull down, and trainer.peak_flops overriding both; the first metrics row says where it came from."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from launch import metrics
from launch.metrics import PeakFlops, best_rate, cpu_peak_flops, cuda_table_peak, peak_flops, training_dtype


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),
    ("NVIDIA H100 80GB HBM3", torch.float16, 989.5e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),  # the longer fragment wins over "H100"
    ("NVIDIA H200", torch.bfloat16, 989.5e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),  # not A100's
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362.05e12),  # not L4's
    ("Tesla V100-SXM2-32GB", torch.float16, 125e12),
])
def test_table_lookup_by_device_name_and_dtype(name, dtype, expected):
    flops, _ = cuda_table_peak(name, dtype)
    assert flops == expected


def test_fp32_uses_tensor_cores_only_when_torch_does():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert cuda_table_peak("NVIDIA H100 80GB HBM3", torch.float32) == (494.5e12, "H100 tf32")
        torch.set_float32_matmul_precision("highest")
        assert cuda_table_peak("NVIDIA H100 80GB HBM3", torch.float32) == (67e12, "H100 fp32")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert cuda_table_peak("Some Future GPU", torch.bfloat16) is None
    assert cuda_table_peak("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # Volta has no bf16 column


def test_a_faked_cuda_device_gets_its_table_peak_in_the_trained_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    bf16 = peak_flops(cuda, training_dtype("bf16", torch.float32))
    assert bf16.flops == 989.5e12 and "H100" in bf16.source and "bf16" in bf16.source
    # The old default (the fp32 call answered half the bf16 figure) read a bf16 run's MFU ~2x too high.
    assert peak_flops(cuda, training_dtype("no", torch.float32)).flops in (67e12, 494.5e12)  # fp32 / tf32 column
    assert peak_flops(cuda, torch.bfloat16, override=1e12) == PeakFlops(1e12, "config (trainer.peak_flops)")


def test_precision_is_picked_from_the_mixed_precision_setting():
    assert training_dtype("bf16", torch.float32) == torch.bfloat16
    assert training_dtype("fp16", torch.float32) == torch.float16
    assert training_dtype("no", torch.float32) == torch.float32
    assert training_dtype("no", torch.float64) == torch.float64


def test_best_of_n_is_not_lowered_by_a_slow_round():
    ticks = itertools.accumulate([0.0, 5.0, 0.0, 0.01, 0.0, 0.01, 0.0, 0.01])  # one 5 s round, three of 10 ms
    clock = iter(ticks).__next__
    assert best_rate(lambda: None, 1e9, rounds=4, clock=clock) == pytest.approx(1e11)


def test_the_kept_calibration_is_not_lowered_by_a_start_under_load(tmp_path):
    cache = tmp_path / "peak_flops.json"
    quiet = cpu_peak_flops(torch.float32, threads=2, cache_path=cache, measure=lambda *a: 50e9)
    assert quiet.flops == 50e9 and "approximate" in quiet.source and str(cache) in quiet.source
    loaded = cpu_peak_flops(torch.float32, threads=2, cache_path=cache, measure=lambda *a: 5e9)
    assert loaded.flops == 50e9  # the loaded start reuses the quiet measurement
    faster = cpu_peak_flops(torch.float32, threads=2, cache_path=cache, measure=lambda *a: 60e9)
    assert faster.flops == 60e9
    other_threads = cpu_peak_flops(torch.float32, threads=1, cache_path=cache, measure=lambda *a: 30e9)
    assert other_threads.flops == 30e9  # one entry per machine, thread count and dtype
    assert len(json.loads(cache.read_text())) == 2


def test_a_real_cpu_calibration_and_the_override(tmp_path):
    measured = peak_flops(torch.device("cpu"), torch.float32, cache_path=tmp_path / "cache.json")
    assert measured.flops > 1e8 and measured.source.startswith("cpu calibration")
    assert peak_flops(torch.device("cpu"), torch.float32, override=3e9).flops == 3e9


def test_the_first_row_says_where_the_peak_came_from(tmp_path, monkeypatch):
    from train_support import read_rows, tiny_raw

    from launch.config import build_config
    from launch.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EBT_PEAK_FLOPS_CACHE", str(tmp_path / "cache.json"))
    raw = tiny_raw(trainer={"max_steps": 2, "log_every": 1, "peak_flops": 2.0e10}, checkpoint={"every": 0})
    trainer = Trainer(build_config(raw), log=lambda msg: None)
    trainer.setup()
    assert (trainer.peak_flops, trainer.peak_flops_source) == (2.0e10, "config (trainer.peak_flops)")
    trainer.fit()
    rows = [r for r in read_rows(trainer.run_dir) if not r.get("final")]
    assert rows[0]["peak_flops_source"] == "config (trainer.peak_flops)" and "peak_flops_source" not in rows[1]
    assert rows[0]["mfu"] == pytest.approx(rows[0]["tokens_per_s"] * trainer.flops_per_token / 2.0e10)
    assert "peak_flops_source" in metrics.TIMING_FIELDS  # a machine fact: resume comparisons skip it
