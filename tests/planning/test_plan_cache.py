"""GPU memory plans are cached on disk by what determines them (planning/cache.py): a second `ebt sweep submit
--dry-run` traces nothing and prints the same plans; a changed input plans again; a plan that does not fit is
cached as its error; a damaged entry is planned again. Counted in traces, not timed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from model_configs import sized_config

from launch.cli import main
from planning import cache, cached_plan_cuda, plan_cuda, tracer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def plan_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "plans"))
    return tmp_path / "plans"


def traces_run(action) -> int:
    """Traces `action` runs, with this process's in-memory trace cache emptied first (a fresh process)."""
    tracer._trace_cached.cache_clear()
    before = tracer.TRACE_COUNT[0]
    action()
    return tracer.TRACE_COUNT[0] - before


def test_a_second_dry_run_plans_from_the_cache(tmp_path, capsys, plan_cache):
    spec = {"name": "c", "base": str(REPO / "configs" / "train" / "quickstart.yaml"),
            "runs_dir": str(tmp_path / "runs"), "sweep_dir": str(tmp_path / "sweep"),
            "grid": {"size": ["4xs"], "kind": ["ebt", "transformer"], "steps": [5, 7]},
            "overrides": {"trainer.checkpointing": "auto", "model.architecture.context_length": 32,
                          "trainer.precision": "bf16"},
            "resources": {"default": {"tasks_per_node": 2, "gpus_per_node": 2}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    outputs, errors = [], []

    def dry_run():
        assert main(["sweep", "submit", str(path), "--dry-run"]) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        errors.append(captured.err)

    assert traces_run(dry_run) > 0
    assert "H100-80GB: micro-batch" in outputs[0] and errors[0] == ""
    # Progress while planning (plain lines: stdout is not a terminal here), one plan per kind and GPU.
    progress = [line for line in outputs[0].splitlines() if line.startswith("planning memory: 4xs ")]
    assert len(progress) == 2 * 2 * 2  # a start and an end line, 2 kinds x 2 GPUs
    entries = sorted(plan_cache.glob("*.json"))
    assert len(entries) == 2 * 2  # the two step budgets share their plans
    assert traces_run(dry_run) == 0
    assert outputs[1].splitlines() == [line for line in outputs[0].splitlines() if line not in progress]
    assert errors[1] == ""
    assert sorted(plan_cache.glob("*.json")) == entries


def test_the_key_holds_what_determines_a_plan_and_errors_are_cached(plan_cache):
    cfg = sized_config("4xs", vocab_size=2048, context_length=32, mcmc_steps=2)
    first = cached_plan_cuda(cfg, 8, 80e9, "H100")
    assert first == plan_cuda(cfg, 8, 80e9, "H100")
    assert traces_run(lambda: cached_plan_cuda(cfg, 8, 80e9, "H100")) == 0
    # Another world size, model field, policy or GPU is another plan; the size's name is not.
    assert traces_run(lambda: cached_plan_cuda(cfg, 8, 80e9, "H100", "ddp", 8)) > 0
    assert traces_run(lambda: cached_plan_cuda(cfg.replace(thinking={"mcmc_steps": 3}), 8, 80e9, "H100")) > 0
    assert traces_run(lambda: cached_plan_cuda(cfg, 8, 80e9, "H100", policy="mcmc_step")) > 0
    renamed = cfg.replace(size=None)
    assert traces_run(lambda: cached_plan_cuda(renamed, 8, 80e9, "H100")) == 0
    # A GPU too small for micro-batch 1: the same one-line error, from the cache the second time.
    with pytest.raises(ValueError, match=r"^tiny: needs .* GB per GPU even at micro-batch \d+ with") as cold:
        cached_plan_cuda(cfg, 8, 1e9, "tiny")

    def warm():
        with pytest.raises(ValueError) as again:
            cached_plan_cuda(cfg, 8, 1e9, "tiny")
        assert str(again.value) == str(cold.value)

    assert traces_run(warm) == 0
    # A damaged entry (a crash cannot leave one: writes are atomic; a full disk or a hand edit can) is re-planned.
    for entry in plan_cache.glob("*.json"):
        entry.write_text("{not json")
    assert cached_plan_cuda(cfg, 8, 80e9, "H100") == first
