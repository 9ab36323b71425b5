"""Parity with the authors' code: the S1/S2 recipes and the Transformer++ baseline against the reference, fp64.

The project's model is loaded with the reference model's weights (ebt.convert) and fed the same batch and the
same random draws (recorded from the reference as it runs: starts, per-token step sizes, repeated landscapes,
Langevin noise, replay picks). Then:
- the loss matches within 1e-9 relative and every parameter gradient within 1e-7 (relative to the tensor's
  largest entry);
- three AdamW steps with gradient clipping, the reference's optimizer groups on its side (alpha at LR x its
  multiplier, no decay; every other parameter decayed) and ours built from the recipe file, give the same
  weights within 1e-6 (see assert_parity). The LR is held at its peak (schedules are not compared: the
  reference's warm-up starts at LR 0 and is scheduled by Lightning).
A mutation test flips one option at a time on this project's side and requires the comparison to fail. (The
ranges of the shared draws are not mutated here: RecordedDraws checks each injected value against the range the
model asks for, and tests/ebt/test_ebt_loss_options.py checks the model's own draws.)

What cannot be matched is stated where it applies: the reference evaluates with Langevin noise (this project's
validation is noise-free), and it turns a learnable noise std on only after warm-up (here it learns from the
start; the test turns the reference's on by hand).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_harness import (
    RecordedDraws,
    complex128_rotary,
    fp64_reference,
    load_reference,
    recording_draws,
    reference_available,
    reference_imports_undone,
)

from ebt import build_model
from ebt.convert import from_reference, key_map
from launch.config import load_config
from launch.optim import build_optimizer

pytestmark = pytest.mark.skipif(reference_available() is not None, reason=str(reference_available()))

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
VOCAB, DIM, LAYERS, HEADS, CONTEXT, BATCH, LR = 32, 16, 2, 2, 8, 4, 1e-3


@pytest.fixture(autouse=True, scope="module")
def reference_modules_removed_afterwards():
    with reference_imports_undone():
        yield


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference creates its noise and masks in the default dtype
    yield
    torch.set_default_dtype(previous)


def build_pair(recipe: str, variant: str | None, reference_flags: dict, ours: list[str]):
    """(reference model, our model with its weights, our TrainConfig)."""
    kind = "transformer" if recipe == "transformer" else "ebt"
    overrides = [f"model.architecture.vocab_size={VOCAB}", f"model.architecture.dim={DIM}",
                 f"model.architecture.n_layers={LAYERS}", f"model.architecture.n_heads={HEADS}",
                 f"model.architecture.context_length={CONTEXT}",
                 f"optim.lr={LR}", *([f"model.architecture.variant={variant}"] if variant else []), *ours]
    cfg = load_config(RECIPES / f"{recipe}.yaml", overrides)
    ref_module = load_reference()
    hp = ref_module.reference_hparams(
        None if kind == "transformer" else recipe.removeprefix("ebt_"), vocab_size=VOCAB, embedding_dim=DIM,
        num_transformer_blocks=LAYERS, multiheaded_attention_heads=HEADS, context_length=CONTEXT,
        batch_size_per_device=BATCH, peak_learning_rate=LR, **({"ebt_type": variant} if variant else {}),
        **reference_flags)
    torch.manual_seed(0)
    reference = ref_module.build_reference("ebt" if kind == "ebt" else "baseline_transformer", hp).double()
    complex128_rotary(reference)
    if reference_flags.get("langevin_dynamics_noise_learnable"):
        reference.langevin_dynamics_noise_std.requires_grad_(True)  # the reference's warm_up_finished()
    model = build_model(cfg.model).double()
    model.load_state_dict(from_reference(reference.state_dict(), cfg.model), strict=True)
    model.train()
    return reference, model, cfg, hp


def reference_optimizer(reference, hp, kind: str) -> torch.optim.Optimizer:
    """base_model_trainer.configure_optimizers_nlp's groups, with AdamW(betas=(beta1, beta2))."""
    betas = (0.9, 0.999)  # train_model.py's --beta1/--beta2 defaults
    weight_decay = 0.01  # --weight_decay 0.01 in every NLP pretraining job script
    if kind == "transformer":
        groups = [{"params": list(reference.parameters()), "weight_decay": weight_decay, "lr": LR}]
    else:
        others = [p for n, p in reference.named_parameters() if "alpha" not in n]
        groups = [{"params": [reference.alpha], "weight_decay": 0.0, "lr": hp.mcmc_step_size_lr_multiplier * LR},
                  {"params": others, "weight_decay": weight_decay, "lr": LR}]
    return torch.optim.AdamW(groups, betas=betas)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp(min=1e-300)
    return float((a - b).abs().max() / scale)


def run(recipe: str, variant: str | None = None, reference_flags: dict | None = None, ours: list[str] = (),
        steps: int = 3) -> dict:
    """Relative differences: the first step's loss and worst parameter gradient, and the worst weight after
    `steps` optimizer steps (later gradients drift apart by fp64 rounding, amplified by Adam's normalisation of
    tiny components: ~1e-7 after 3 steps with clamping, so they are not held to the first step's bound)."""
    reference_flags = dict(reference_flags or {})
    kind = "transformer" if recipe == "transformer" else "ebt"
    reference, model, cfg, hp = build_pair(recipe, variant, reference_flags, list(ours))
    ref_opt, our_opt = reference_optimizer(reference, hp, kind), build_optimizer(model, cfg)
    names = key_map(cfg.model)
    generator = torch.Generator().manual_seed(1)
    # The reference's replay buffer picks chains with Python's `random.sample` (our side replays the recorded
    # picks); tests/conftest.py seeds it per test. Unseeded, the picks depended on whatever ran before in the
    # process: measured over picks seeded 0-11 (s2-jitter-no-truncate), the worst weight after 3 steps was 1.1e-9
    # to 4.8e-7 for eleven and 1.0e-4 for one, always on alpha, whose LR is 1500x the others' in S2, so one
    # pick's trajectory amplifies fp64 rounding by ~1e8.
    worst: dict[str, float] = {}
    for step in range(steps):
        tokens = torch.randint(1, VOCAB, (BATCH, CONTEXT + 1), generator=generator)  # id 0 is the reference's pad
        with fp64_reference(), recording_draws() as record:
            out = reference.forward_loss_wrapper({"input_ids": tokens}, "train")
        out["loss"].backward()
        if kind == "ebt":
            starts = record["randn"][0][:BATCH] if record["randn"] else torch.zeros(BATCH, CONTEXT, VOCAB)
            draws = RecordedDraws({k: v for k, v in record.items() if k != "randn"})
            loss, _ = model.loss(tokens, init_logits=starts * cfg.model.thinking.init_logit_std, draws=draws)
            assert not draws.unused(), f"draws the model never used: {draws.unused()}"
        else:
            loss, _ = model.loss(tokens)
        loss.backward()
        mine_loss, ref_loss = float(loss.detach()), float(out["loss"].detach())
        if step == 0:
            worst["loss"] = abs(mine_loss - ref_loss) / abs(ref_loss)
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None and n in names}
        assert set(ref_grads) == set(names), f"no gradient for {set(names) - set(ref_grads)}"
        theirs = from_reference(ref_grads, cfg.model)
        mine = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(mine) == set(theirs), set(mine) ^ set(theirs)
        if step == 0:
            worst["grad"] = max(relative(mine[n], theirs[n]) for n in mine)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        ref_opt.step()
        our_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        our_opt.zero_grad(set_to_none=True)
    theirs = from_reference(reference.state_dict(), cfg.model)
    mine = model.state_dict()
    worst["weight"] = max(relative(mine[n], theirs[n]) for n in theirs)
    return worst


def assert_parity(worst: dict) -> None:
    assert worst["loss"] < 1e-9, worst
    assert worst["grad"] < 1e-7, worst
    # Weights after 3 steps: 1e-6. Later steps' gradients are taken at weights that already differ in their last
    # bits, and Adam's normalisation of tiny gradient components amplifies that; how much depends on the
    # trajectory (see the replay picks in run()). This bound is measured, not derived: with the picks seeded
    # the worst case here, s2-jitter-no-truncate, is 1.9e-9 on this machine.
    assert worst["weight"] < 1e-6, worst


@pytest.mark.parametrize("variant", ["default", "time_embed", "adaln"])
@pytest.mark.parametrize("recipe", ["ebt_s1", "ebt_s2"])
def test_recipe_matches_the_reference(recipe, variant):
    assert_parity(run(recipe, variant))


def test_transformer_baseline_matches_the_reference():
    assert_parity(run("transformer"))


# Reference flags beyond the job scripts, each against the option that reproduces it (S1 base unless named).
OPTION_CASES = {
    "contrastive": ({"contrastive_loss": True, "contrastive_loss_coeff": 0.05},
                    ["model.loss.contrastive_weight=0.05", "model.loss.contrastive_form=softmax"]),
    "clamp-max-change": ({"clamp_futures_grad": True, "clamp_futures_grad_max_change": 2.0},
                         ["model.thinking.grad_clamp=2.0", "model.thinking.grad_clamp_mode=max_change"]),
    "normalize-first-step": ({"normalize_initial_condition_only_first_step": True},
                             ["model.thinking.normalize=first_step"]),
    "no-normalize": ({"normalize_initial_condition": False, "mcmc_step_size": 0.05},
                     ["model.thinking.normalize=none", "model.thinking.alpha_init=0.05"]),
    "absolute-clamp": ({"absolute_clamp": 0.5}, ["model.thinking.candidate_clamp=0.5"]),
    "soften-targets": ({"soften_target_prob_dist": 0.2}, ["model.loss.label_smoothing_start=0.2"]),
    "final-landscape-repeats": ({"randomize_mcmc_num_steps": 2, "randomize_mcmc_num_steps_final_landscape": True},
                                ["model.thinking.landscape_repeats=2",
                                 "model.thinking.landscape_repeats_final_only=true"]),
    "zeros-start": ({"denoising_initial_condition": "zeros"}, ["model.thinking.init_logit_std=0"]),
    "tied-projection": ({"vocab_to_embed_uses_prob_dist": True}, ["model.architecture.tie_candidate_embedding=true"]),
    "learnable-langevin": ({"langevin_dynamics_noise": 0.5, "langevin_dynamics_noise_learnable": True},
                           ["model.thinking.langevin_noise_std=0.5", "model.thinking.langevin_learnable=true"]),
    "s2-jitter-no-truncate": ({"truncate_mcmc": False, "mcmc_num_steps": 2},
                              ["model.thinking.truncate=false", "model.thinking.mcmc_steps=2"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_each_reference_option_matches(case):
    flags, ours = OPTION_CASES[case]
    recipe = "ebt_s2" if case.startswith("s2") else "ebt_s1"
    variant = "adaln" if case in ("contrastive", "learnable-langevin") else "time_embed"
    assert_parity(run(recipe, variant, flags, ours))


# One option flipped on this project's side: the comparison must fail (it is not blind to that option).
MUTATIONS = [
    ("ebt_s1", "model.thinking.update_space=logits"),
    ("ebt_s1", "model.thinking.normalize=first_step"),
    ("ebt_s1", "model.thinking.detach_steps=false"),
    ("ebt_s1", "model.thinking.truncate=true"),
    ("ebt_s1", "model.thinking.init_logit_std=0.5"),
    ("ebt_s1", "model.thinking.alpha_lr_mult=100"),
    ("ebt_s1", "optim.decay_norms_and_biases=false"),
    ("ebt_s1", "optim.betas=[0.9,0.95]"),
    ("ebt_s2", "model.thinking.detach_steps=true"),
    ("ebt_s2", "model.thinking.truncate=false"),
    ("ebt_s2", "model.thinking.langevin_placement=after_update"),
    ("ebt_s2", "model.thinking.langevin_noise_std=2.0"),
    ("ebt_s2", "model.thinking.alpha_random_scale=1.5"),
    ("ebt_s2", "model.replay.fraction=0.25"),
    ("ebt_s2", "model.replay.capacity=3"),
]


@pytest.mark.parametrize(("recipe", "flip"), MUTATIONS, ids=[f"{r}:{f}" for r, f in MUTATIONS])
def test_flipping_one_option_breaks_parity(recipe, flip):
    try:
        worst = run(recipe, "time_embed", ours=[flip])
    except (AssertionError, ValueError) as error:  # e.g. the model asked for draws the reference never made
        assert "draw" in str(error) or "gradient" in str(error) or "replay" in str(error), error
        return
    assert max(worst["loss"] / 1e-9, worst["grad"] / 1e-7, worst["weight"] / 1e-7) > 10, worst


def test_adaln_real_stream_flip_breaks_parity():
    worst = run("ebt_s1", "adaln", ours=["model.architecture.adaln_real_stream=false"], steps=1)
    assert worst["loss"] > 1e-8, worst


@pytest.mark.parametrize("recipe", ["ebt_s1", "ebt_s2"])
def test_validation_loss_matches_the_reference(recipe):
    """The reference's val phase: no randomised step sizes or repeats (the last landscape runs R + 1 steps), no
    replay, but Langevin noise (model.thinking.langevin_in_eval=true restores it; this project's default is
    noise-free)."""
    reference, model, cfg, _ = build_pair(recipe, "time_embed", {}, ["model.thinking.langevin_in_eval=true"])
    model.eval()
    tokens = torch.randint(1, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(2))
    with fp64_reference(), recording_draws() as record:
        expected = float(reference.forward_loss_wrapper({"input_ids": tokens}, "val")["loss"].detach())
    draws = RecordedDraws({k: v for k, v in record.items() if k != "randn"})
    with torch.no_grad():
        loss, metrics = model.loss(tokens, init_logits=record["randn"][0] * cfg.model.thinking.init_logit_std,
                                   draws=draws)
    assert not draws.unused()
    assert abs(float(loss) - expected) / abs(expected) < 1e-9
    assert metrics["mcmc_steps"] == (3 if recipe == "ebt_s2" else 2)
