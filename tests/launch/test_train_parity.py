"""2-rank data parallelism must give the 1-process gradient on the same global batch.

For an EBT the parameters learn only through second-order terms (the MCMC inner gradient is taken with
create_graph=True), and two common DDP setups silently get them wrong (measured here with 2 gloo ranks: a parameter
that never gets a gradient under default settings, and a DDP-wrapped energy called several times per backward with
static_graph=True), so this parity test is the guard.
The trainer's own code path runs under torchrun (this file is also the worker script); rank 0 compares the
reduced gradients with an unwrapped copy of the model run on the whole batch in one process.

fsdp (sharded parameters, launch/fsdp.py) is held to more: the gradients after one step AND the weights after
three optimizer steps (clipping on, so the norm over every rank's shards counts), in fp64 to 1e-12 and in fp32
to a stated tolerance, for every EBT variant, with mcmc_step and block checkpointing, the S1/S2 presets and
Transformer++; and each rank's live bytes of
parameters + gradients + AdamW state are its 1/world shard. Mutated routes (the manual reshard or the blocks'
unshard skipped) must fail these checks: tests/launch/test_train_parity.py::test_fsdp_parity_fails_when_*.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from model_configs import nested
from parity_tolerance import fp32_ratio_check, rank_threads

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GLOBAL_BATCH = 4


# (kind, recipe): the EBT and Transformer++ defaults, and the paper's S1 and S2 presets (configs/recipes).
CASES = [("ebt", None), ("transformer", None), ("ebt", "ebt_s1"), ("ebt", "ebt_s2")]


def parity_raw(kind: str, strategy: str, zero_stage: int | None, recipe: str | None = None) -> dict:
    import yaml

    model = nested(kind=kind, mcmc_steps=2, alpha_init=5.0)
    if recipe is not None:
        model = yaml.safe_load((REPO / "configs" / "recipes" / f"{recipe}.yaml").read_text())["model"]
    dims = {"dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 16, "vocab_size": 64}
    raw = {
        "name": f"parity-{recipe or kind}-{strategy}",
        "model": {**model, "architecture": {**model.get("architecture", {}), **dims}},
        "trainer": {"micro_batch_size": GLOBAL_BATCH // 2, "max_steps": 1},
        "optim": {"lr": 1e-3, "clip_grad_norm": 0.0},
        "logging": {"wandb": False, "progress": False},
        "distributed": {"strategy": strategy},
    }
    if zero_stage is not None:
        raw["distributed"]["deepspeed_config"] = str(REPO / "configs" / "deepspeed" / f"zero{zero_stage}.json")
    return raw


def batch_draws_class():
    from ebt.draws import Draws

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

    return BatchDraws


def worker(strategy: str, zero_stage: int | None, out: str) -> None:
    import torch

    from ebt import build_model
    from launch.config import build_config
    from launch.strategies import DeepSpeedStrategy
    from launch.trainer import Trainer, seed_everything

    BatchDraws = batch_draws_class()
    results = {}
    for kind, recipe in CASES:
        cfg = build_config(parity_raw(kind, strategy, zero_stage, recipe))
        trainer = Trainer(cfg)
        trainer.setup_model()
        rank, world = trainer.rank, trainer.world
        assert world == 2, world
        gen = torch.Generator().manual_seed(123)
        m = cfg.model
        tokens = torch.randint(0, m.architecture.vocab_size, (GLOBAL_BATCH, m.architecture.context_length + 1),
                               generator=gen)
        init = torch.randn(GLOBAL_BATCH, m.architecture.context_length, m.architecture.vocab_size, generator=gen)
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        uniform = torch.rand(GLOBAL_BATCH, m.architecture.context_length, 1, generator=gen)
        noise = torch.randn(m.thinking.max_executed_steps, GLOBAL_BATCH, m.architecture.context_length,
                            m.architecture.vocab_size, generator=gen)
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
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # Accelerate keeps one DeepSpeed plugin per process; reset its singletons for the next engine.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(results))
    trainer.close(finished=True)  # as run_training does: no gloo teardown after Python has finalised


# ------------------------------------------------------------------------------------------------ fsdp

# (name, kind, recipe, model overrides): every EBT variant, the S1/S2 presets and Transformer++.
FSDP_CASES = [
    ("ebt", "ebt", None, {}),
    ("ebt_time_embed", "ebt", None, {"variant": "time_embed"}),
    ("ebt_adaln", "ebt", None, {"variant": "adaln"}),
    ("transformer", "transformer", None, {}),
    # Activation checkpointing recomputes each MCMC step (or each block) inside the outer backward, with the
    # gathered parameters: both must stay exact under sharding.
    ("ebt_mcmc_step", "ebt", None, {"trainer.checkpointing": "mcmc_step", "trainer.remat_chunk": 1}),
    ("ebt_time_embed_block", "ebt", None, {"variant": "time_embed", "trainer.checkpointing": "block"}),
    ("ebt_s1", "ebt", "ebt_s1", {}),
    # The replay buffer is per rank (each rank replays its own sequences), so from step 2 on it cannot match
    # one process's buffer over the whole batch: off for the three-step comparison. Its checkpointing is covered
    # by the resume tests.
    ("ebt_s2", "ebt", "ebt_s2", {"replay_capacity": 0}),
]
FSDP_STEPS = 3


def fsdp_raw(kind: str, recipe: str | None, overrides: dict) -> dict:
    raw = parity_raw(kind, "fsdp", None, recipe)
    model = nested(**{k: v for k, v in overrides.items() if not k.startswith("trainer.")})
    for section, values in model.items():
        raw["model"][section] = {**raw["model"].get(section, {}), **values} if isinstance(values, dict) else values
    raw["trainer"].update({k.removeprefix("trainer."): v for k, v in overrides.items() if k.startswith("trainer.")})
    # Clipping on: the gradient norm is then a collective over every rank's shards, and it is active (EBT
    # gradients at init are far above 1), so a wrong norm changes the weights.
    raw["optim"] = {"lr": 1e-3, "clip_grad_norm": 1.0, "warmup_steps": 0}
    raw["trainer"]["max_steps"] = 100
    return raw


def expected_shard_bytes(shape: tuple[int, ...], element_size: int, rank: int, world: int) -> int:
    """Bytes of rank's dim-0 chunk of a tensor of `shape`, as FSDP2 shards it (torch.chunk)."""
    import torch

    chunks = torch.empty(shape, device="meta").chunk(world, dim=0)
    return (chunks[rank].numel() if rank < len(chunks) else 0) * element_size


def fsdp_worker(dtype_name: str, mutation: str, out: str, only: str, regather: bool = False) -> None:
    """2 ranks of fsdp against 1 process: gradients after step 1, weights after FSDP_STEPS steps, state bytes.

    `mutation` breaks the route on purpose ("skip_reshard", "skip_unshard"; with `regather`, "storage_only":
    a saved view of a gathered weight is matched by its storage and size but not its stride and offset), to
    show the checks catch it."""
    import torch

    import launch.fsdp
    from ebt import build_model
    from launch.config import build_config
    from launch.optim import build_optimizer
    from launch.schedule import apply_lr
    from launch.trainer import Trainer, seed_everything

    dtype = getattr(torch, dtype_name)
    if mutation == "skip_reshard":
        launch.fsdp.ShardedModel.reshard = lambda self: None
    elif mutation == "skip_unshard":
        real = launch.fsdp.shard_model

        def no_block_gather(*args, **kwargs):
            sharded = real(*args, **kwargs)
            sharded.hook.remove()
            return sharded

        launch.fsdp.shard_model = no_block_gather
    elif mutation == "storage_only":
        def same_storage_and_size(cls, saved):
            if not isinstance(saved, cls):
                return saved
            with torch.no_grad():  # the gathered weight's storage laid out contiguously at the saved size
                return saved.param.full_tensor().reshape(saved.size)

        launch.fsdp._Regather.unpack = classmethod(same_storage_and_size)
    BatchDraws = batch_draws_class()
    results = {}
    for name, kind, recipe, overrides in FSDP_CASES:
        if only and name != only:
            continue
        torch.set_default_dtype(dtype)  # the model is built in the default dtype
        raw = fsdp_raw(kind, recipe, overrides)
        raw["distributed"]["fsdp_regather"] = regather
        cfg = build_config(raw)
        trainer = Trainer(cfg)
        trainer.setup_model()
        rank, world = trainer.rank, trainer.world
        assert world == 2, world
        m = cfg.model
        seed_everything(cfg.trainer.seed)
        reference = build_model(m)
        ref_optimizer = build_optimizer(reference, cfg)
        initial = {k: v.detach().clone() for k, v in reference.named_parameters()}
        # fp32 runs are judged against the exact answer: an fp64 replica of the 1-process reference (the same
        # fp32 initial weights and inputs, widened exactly), stepped alongside (assert_fsdp_parity says why).
        truth = copy.deepcopy(reference).double() if dtype == torch.float32 else None
        if truth is not None:
            truth_optimizer = build_optimizer(truth, cfg)
        gen = torch.Generator().manual_seed(123)
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        case: dict = {"grad_diffs": {}, "grad_scales": {}}
        # The initial weights, whole: bitwise a CPU build's from the same seed (fsdp builds on meta and each rank
        # materialises its own shard, launch/meta_init.py; fsdp_regather cuts its shards from a CPU build).
        start = trainer.full_parameters()  # collective
        case["initial_mismatch"] = [k for k, p in reference.named_parameters() if not torch.equal(start[k], p.detach())]
        for step in range(FSDP_STEPS):
            tokens = torch.randint(0, m.architecture.vocab_size, (GLOBAL_BATCH, m.architecture.context_length + 1),
                                   generator=gen)
            init = torch.randn(GLOBAL_BATCH, m.architecture.context_length, m.architecture.vocab_size, generator=gen,
                               dtype=dtype)
            uniform = torch.rand(GLOBAL_BATCH, m.architecture.context_length, 1, generator=gen, dtype=dtype)
            noise = torch.randn(m.thinking.max_executed_steps, GLOBAL_BATCH, m.architecture.context_length,
                                m.architecture.vocab_size, generator=gen,
                                dtype=dtype)
            kwargs = {"init_logits": init[share], "draws": BatchDraws(uniform, noise, share)} if kind == "ebt" else {}
            _, finite = trainer.forward_backward(tokens[share], last_micro=True, **kwargs)
            assert finite, f"{name}: non-finite loss at step {step + 1}"
            ref_kwargs = {"init_logits": init, "draws": BatchDraws(uniform, noise, slice(None))} \
                if kind == "ebt" else {}
            ref_loss, _ = reference.loss(tokens, **ref_kwargs)
            ref_loss.backward()
            if truth is not None:
                wide = {"init_logits": init.double(), "draws": BatchDraws(uniform, noise, slice(None))} \
                    if kind == "ebt" else {}
                truth.loss(tokens, **wide)[0].backward()
            if step == 0:
                grads = trainer.full_gradients()  # collective
                for key, param in reference.named_parameters():
                    missing = grads[key] is None  # reported, not asserted here: assert_fsdp_parity judges
                    case["grad_diffs"][key] = math.inf if missing else float((grads[key] - param.grad).abs().max())
                    case["grad_scales"][key] = float(param.grad.abs().max())
                    if truth is not None and not missing:
                        exact = truth.get_parameter(key).grad
                        case.setdefault("grad_errors", {})[key] = [float((param.grad.double() - exact).abs().max()),
                                                                   float((grads[key].double() - exact).abs().max())]
                # Live bytes with gradients present; the optimizer's moments are counted after its step.
                grad_bytes = trainer.state_bytes()["grads"]
            norm, updated = trainer.optimizer_step(skip=False)
            assert updated, f"{name}: step {step + 1} not applied (grad norm {norm})"
            trainer.step += 1  # the trainer's LR follows its step (launch/schedule.py)
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.optim.clip_grad_norm)
            apply_lr(ref_optimizer.param_groups, cfg, step)
            ref_optimizer.step()
            ref_optimizer.zero_grad(set_to_none=True)
            if truth is not None:
                torch.nn.utils.clip_grad_norm_(truth.parameters(), cfg.optim.clip_grad_norm)
                apply_lr(truth_optimizer.param_groups, cfg, step)
                truth_optimizer.step()
                truth_optimizer.zero_grad(set_to_none=True)
            case.setdefault("norms", []).append([norm, float(ref_norm)])
        live = trainer.state_bytes()
        weights = trainer.full_parameters()  # collective
        expected = 0
        for param in reference.parameters():
            shape = (1,) if param.dim() == 0 else tuple(param.shape)
            expected += 4 * expected_shard_bytes(shape, param.element_size(), rank, world)  # param, grad, 2 moments
        rank_bytes = {"measured": live["params"] + grad_bytes + live["optimizer"], "expected": expected,
                      "gathered_after_step": 0 if regather else launch.fsdp.gathered_bytes(trainer.sharded)}
        all_ranks = [None] * world
        torch.distributed.all_gather_object(all_ranks, rank_bytes)
        if rank == 0:
            case["weight_diffs"] = {k: float((weights[k] - p.detach()).abs().max()) for k, p in
                                    reference.named_parameters()}
            case["weight_moves"] = {k: float((p.detach() - initial[k]).abs().max()) for k, p in
                                    reference.named_parameters()}
            if truth is not None:
                case["weight_errors"] = {k: [float((p.detach().double() - truth.get_parameter(k)).abs().max()),
                                             float((weights[k].double() - truth.get_parameter(k)).abs().max())]
                                         for k, p in reference.named_parameters()}
            case["lrs"] = {k: group["lr"] for group in ref_optimizer.param_groups for k, p in
                           reference.named_parameters() if any(p is q for q in group["params"])}
            case["bytes"] = all_ranks
            case["unsharded_bytes"] = sum(4 * p.numel() * p.element_size() for p in reference.parameters())
            results[name] = case
        torch.distributed.barrier()
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(results))
    trainer.close(finished=True)


def run_parity(tmp_path: Path, strategy: str, zero_stage: int | None, *worker_args: str,
               expect_failure: bool = False) -> dict | subprocess.CompletedProcess:
    out = tmp_path / "parity.json"
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, OMP_NUM_THREADS=rank_threads(), PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           strategy, str(zero_stage or 0), str(out), *worker_args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if expect_failure and done.returncode != 0:
        return done
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


# fp64: 1e-12 relative to max(1, the largest entry), for gradients and for weights after three steps; fp64's unit
# roundoff is 1.1e-16, so this leaves ~1e4 for the reduction lengths and the three Adam steps' amplification.
# fp32: against an fp64 replica, derived in tests/helpers/parity_tolerance.py.
FP64_TOL = 1e-12


def assert_fsdp_parity(result: dict, dtype: str) -> dict[str, tuple[float, float]]:
    """Asserts parity for every case; returns, in fp32, each case's worst (gradient, weight) error ratios."""
    ratios = {}
    for name, case in result.items():
        assert case["initial_mismatch"] == [], (name, "initial weights are not a CPU build's", case["initial_mismatch"])
        diffs, scales = case["grad_diffs"], case["grad_scales"]
        assert sum(scale > 0 for scale in scales.values()) >= len(scales) - 1, (name, scales)
        assert all(math.isfinite(diff) for diff in diffs.values()), (name, "gradient missing", diffs)
        if dtype == "float64":
            for key, diff in diffs.items():
                assert diff <= FP64_TOL * max(1.0, scales[key]), \
                    f"{name} {key}: gradient |2-rank - 1-rank| = {diff:.3g}"
        else:
            grad_ratio = fp32_ratio_check(case["grad_errors"], {k: max(1.0, v) for k, v in scales.items()},
                                          "gradient", name)
        for key, diff in case["weight_diffs"].items():
            moved = case["weight_moves"][key]
            # Every parameter moves by far more than the tolerance, or matching weights would prove nothing.
            assert moved > 1e-6 * case["lrs"][key], f"{name} {key}: weights did not move ({moved:.3g})"
            if dtype == "float64":
                assert diff <= FP64_TOL * max(1.0, moved), \
                    f"{name} {key}: weights after {FSDP_STEPS} steps |2-rank - 1-rank| = {diff:.3g}"
        if dtype == "float32":
            updates = {key: FSDP_STEPS * lr for key, lr in case["lrs"].items()}
            weight_ratio = fp32_ratio_check(case["weight_errors"], updates, f"weights after {FSDP_STEPS} steps", name)
            ratios[name] = (round(grad_ratio, 3), round(weight_ratio, 3))
        ranks = case["bytes"]
        assert sum(r["measured"] for r in ranks) == case["unsharded_bytes"], (name, ranks)
        for rank, r in enumerate(ranks):
            assert r["measured"] == r["expected"], (name, rank, r)
            # The shard is 1/world up to dim-0 padding (a [1, D] head sits on one rank).
            assert abs(r["measured"] / case["unsharded_bytes"] - 1 / len(ranks)) < 0.01, (name, rank, r)
            assert r["gathered_after_step"] == 0, (name, rank, r)
    return ratios


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fsdp_two_ranks_match_one_process_over_three_steps(tmp_path, dtype):
    result = run_parity(tmp_path, "fsdp", None, dtype, "none", "")
    assert set(result) == {name for name, *_ in FSDP_CASES}
    ratios = assert_fsdp_parity(result, dtype)
    print(f"fp32 worst error ratios, 2 ranks / 1 process (gradient, weights) at {rank_threads()} thread(s) per "
          f"rank: {ratios}")  # the margin left under FP32_ERROR_FACTOR, for the record (pytest -rP shows it)


def test_fsdp_regather_two_ranks_match_one_process_over_three_steps(tmp_path):
    """distributed.fsdp_regather: weights gathered on read and re-gathered for every saved use, in fp64."""
    result = run_parity(tmp_path, "fsdp", None, "float64", "none", "", "regather")
    assert set(result) == {name for name, *_ in FSDP_CASES}
    assert_fsdp_parity(result, "float64")


def test_fsdp_regather_fails_when_saved_views_are_matched_by_storage_only(tmp_path):
    """A linear layer saves W.t(): handing back W's storage at W.t()'s size, without its strides, trains on
    silently (no error), with wrong gradients. The parity check must catch it."""
    result = run_parity(tmp_path, "fsdp", None, "float64", "storage_only", "ebt", "regather")
    with pytest.raises(AssertionError, match="gradient"):
        assert_fsdp_parity(result, "float64")


def test_fsdp_parity_fails_when_the_manual_reshard_is_skipped(tmp_path):
    """Without the reshard after the backward, the next forward's unshard is a no-op: step 2 computes with
    step 1's weights. The three-step check must catch it (and the gathered copy stays alive)."""
    result = run_parity(tmp_path, "fsdp", None, "float64", "skip_reshard", "ebt")
    with pytest.raises(AssertionError, match="weights after 3 steps|gathered_after_step"):
        assert_fsdp_parity(result, "float64")


def test_fsdp_parity_fails_when_the_blocks_are_not_unsharded(tmp_path):
    """Without the root hook the blocks compute with their sharded DTensors: the step cannot run."""
    done = run_parity(tmp_path, "fsdp", None, "float64", "skip_unshard", "ebt", expect_failure=True)
    assert isinstance(done, subprocess.CompletedProcess), "the mutated route trained"
    assert "mixed torch.Tensor and DTensor" in done.stdout + done.stderr


if __name__ == "__main__":
    strategy_arg, stage_arg, out_arg = sys.argv[1:4]
    if strategy_arg == "fsdp":
        fsdp_worker(sys.argv[4], sys.argv[5], out_arg, sys.argv[6], regather=sys.argv[7:8] == ["regather"])
    else:
        worker(strategy_arg, int(stage_arg) or None, out_arg)
