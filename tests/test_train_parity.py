"""2-rank data parallelism must give the 1-process gradient on the same global batch.

For an EBT the parameters learn only through second-order terms (the MCMC inner gradient is taken with
create_graph=True), and FACTS.md lists DDP setups that silently get them wrong, so this parity test is the guard.
The trainer's own code path runs under torchrun (this file is also the worker script); rank 0 compares the
reduced gradients with an unwrapped copy of the model run on the whole batch in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GLOBAL_BATCH = 4


# (kind, recipe): the EBT and Transformer++ defaults, and the paper's S1 and S2 presets (configs/recipes).
CASES = [("ebt", None), ("transformer", None), ("ebt", "ebt_s1"), ("ebt", "ebt_s2")]


def parity_raw(kind: str, strategy: str, zero_stage: int | None, recipe: str | None = None) -> dict:
    import yaml

    model = {"kind": kind, "mcmc_steps": 2, "alpha_init": 5.0}
    if recipe is not None:
        model = yaml.safe_load((REPO / "configs" / "recipes" / f"{recipe}.yaml").read_text())["model"]
    raw = {
        "name": f"parity-{recipe or kind}-{strategy}",
        "model": {**model, "dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 16, "vocab_size": 64},
        "trainer": {"micro_batch_size": GLOBAL_BATCH // 2, "max_steps": 1},
        "optim": {"lr": 1e-3, "clip_grad_norm": 0.0},
        "logging": {"wandb": False, "progress": False},
        "distributed": {"strategy": strategy},
    }
    if zero_stage is not None:
        raw["distributed"]["deepspeed_config"] = str(REPO / "configs" / "deepspeed" / f"zero{zero_stage}.json")
    return raw


def worker(strategy: str, zero_stage: int | None, out: str) -> None:
    import torch

    from ebt import build_model
    from ebt.draws import Draws
    from launch.config import build_config
    from launch.trainer import Trainer, seed_everything

    class BatchDraws(Draws):
        """Draws made for the whole global batch; each rank takes its rows (so 2 ranks see 1 process's)."""

        def __init__(self, uniform, noise, rows):
            self.uniform, self.noise, self.rows = uniform, noise, rows

        def alpha_uniform(self, shape, like):
            return self.uniform[self.rows].to(like.dtype)

        def langevin(self, executed_step, like):
            return self.noise[executed_step][self.rows].to(like.dtype)

        def repeats(self, landscape, low, high):
            return high

    results = {}
    for kind, recipe in CASES:
        cfg = build_config(parity_raw(kind, strategy, zero_stage, recipe))
        trainer = Trainer(cfg)
        trainer.setup_model()
        rank, world = trainer.rank, trainer.world
        assert world == 2, world
        gen = torch.Generator().manual_seed(123)
        m = cfg.model
        tokens = torch.randint(0, m.vocab_size, (GLOBAL_BATCH, m.context_length + 1), generator=gen)
        init = torch.randn(GLOBAL_BATCH, m.context_length, m.vocab_size, generator=gen)
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        uniform = torch.rand(GLOBAL_BATCH, m.context_length, 1, generator=gen)
        noise = torch.randn(m.max_executed_steps, GLOBAL_BATCH, m.context_length, m.vocab_size, generator=gen)
        kwargs = {"init_logits": init[share], "draws": BatchDraws(uniform, noise, share)} if kind == "ebt" else {}
        _, finite = trainer.forward_backward(tokens[share], last_micro=True, **kwargs)
        assert finite
        grads = trainer.full_gradients()  # collective under DeepSpeed
        if rank == 0:
            seed_everything(cfg.trainer.seed)
            reference = build_model(cfg.model)
            everything = BatchDraws(uniform, noise, slice(None))
            ref_kwargs = {"init_logits": init, "draws": everything} if kind == "ebt" else {}
            loss, _ = reference.loss(tokens, **ref_kwargs)
            loss.backward()
            diffs, scales = {}, {}
            for name, param in reference.named_parameters():
                assert grads[name] is not None, f"{kind}: {name} got no gradient under {strategy}"
                diffs[name] = float((grads[name] - param.grad).abs().max())
                scales[name] = float(param.grad.abs().max())
            results[recipe or kind] = {"diffs": diffs, "scales": scales}
        trainer.accelerator.wait_for_everyone()
        if trainer.is_deepspeed:
            # Accelerate keeps one DeepSpeed plugin per process; reset its singletons for the next engine.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(results))
    trainer.close(finished=True)  # as run_training does: no gloo teardown after Python has finalised


def run_parity(tmp_path: Path, strategy: str, zero_stage: int | None) -> dict:
    out = tmp_path / "parity.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           strategy, str(zero_stage or 0), str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def assert_parity(result: dict, kind: str) -> None:
    diffs, scales = result[kind]["diffs"], result[kind]["scales"]
    # Every weight matrix learns (a zero gradient everywhere would "match" trivially).
    assert sum(scale > 0 for scale in scales.values()) >= len(scales) - 1, scales
    for name, diff in diffs.items():
        assert diff <= 1e-5 * max(1.0, scales[name]), f"{kind} {name}: |2-rank - 1-rank| = {diff:.3g}"


pytestmark = pytest.mark.slow


def test_ddp_two_ranks_match_one_process(tmp_path):
    result = run_parity(tmp_path, "ddp", None)
    for case in ("ebt", "transformer", "ebt_s1", "ebt_s2"):  # the EBTs are second-order
        assert_parity(result, case)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_two_ranks_match_one_process(tmp_path, stage):
    result = run_parity(tmp_path, "deepspeed", stage)
    for case in ("ebt", "transformer", "ebt_s1", "ebt_s2"):
        assert_parity(result, case)


if __name__ == "__main__":
    strategy_arg, stage_arg, out_arg = sys.argv[1:4]
    worker(strategy_arg, int(stage_arg) or None, out_arg)
