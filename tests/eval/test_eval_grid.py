"""`ebt eval` core: exact per-token perplexity, the System-2 grid, determinism and the steps=0 identity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_configs import model_config

from ebt import ModelConfig, build_model
from ebt.starts import eval_starts
from eval.evaluate import EvalSettings, evaluate_batches, grid_cells
from eval.perplexity import TokenNLL

torch.set_num_threads(1)
VOCAB, CTX = 64, 12


def tiny(kind: str, **kw) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    cfg = model_config(kind=kind, vocab_size=VOCAB, context_length=CTX, dim=32, n_layers=1, n_heads=2,
                      alpha_init=5.0, **kw)
    return build_model(cfg).eval(), cfg


def batches(n: int = 3, batch: int = 2, last: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """n batches of `batch` windows, the last one shorter (the case a mean of batch means gets wrong)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [batch] * (n - 1) + [last]
    return [torch.randint(0, VOCAB, (b, CTX + 1), generator=gen) for b in sizes]


def test_token_nll_is_exact_per_token_average_not_mean_of_batch_means():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(b, 5, 7, generator=gen) for b in (4, 4, 1)]
    targets = [torch.randint(0, 7, (b, 5), generator=gen) for b in (4, 4, 1)]
    acc = TokenNLL()
    for lg, tg in zip(logits, targets, strict=True):
        acc.add(lg, tg)
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    exact = F.cross_entropy(all_logits.reshape(-1, 7).double(), all_targets.reshape(-1)).item()
    batch_means = sum(F.cross_entropy(lg.reshape(-1, 7), tg.reshape(-1)).item()
                      for lg, tg in zip(logits, targets, strict=True)) / 3
    assert acc.tokens == 45
    assert acc.loss == pytest.approx(exact, rel=1e-12)
    assert abs(batch_means - exact) > 1e-3  # the two really differ on this data, so the test can fail
    assert acc.ppl == pytest.approx(math.exp(exact), rel=1e-12)


def test_token_nll_without_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="no tokens were evaluated"):
        _ = TokenNLL().loss


def test_transformer_perplexity_matches_model_loss():
    model, cfg = tiny("transformer")
    data = batches(n=1, last=3)
    res = evaluate_batches(model, cfg, data, EvalSettings())
    with torch.no_grad():
        loss, _ = model.loss(data[0])
    assert res["grid"] == [] and res["tokens"] == 3 * CTX
    assert res["plain"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert res["plain"]["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_grid_cells_are_deduplicated_and_include_the_system1_baseline():
    cells = grid_cells(EvalSettings(), trained_steps=2)
    keys = [c.key() for c in cells]
    assert len(keys) == len(set(keys)) == 4 * (2 + 2 * 2 * 2)  # steps x (1 sample x accept + 2 x sel x accept)
    assert (2, 1, "none", False) in keys
    assert not any(s == 1 and sel != "none" for _, s, sel, _ in keys)
    odd = grid_cells(EvalSettings(steps=[0, 4], samples=[2], accept_lower=[True]), trained_steps=3)
    assert [c.key() for c in odd] == [(0, 2, "max_gap", False), (0, 2, "min", False), (3, 1, "none", False),
                                      (4, 2, "max_gap", True), (4, 2, "min", True)]


def test_ebt_grid_is_deterministic_for_a_seed_and_depends_on_it():
    model, cfg = tiny("ebt")
    settings = EvalSettings(steps=[0, 1, 3], samples=[1, 2], seed=5)
    first = evaluate_batches(model, cfg, batches(), settings)
    second = evaluate_batches(model, cfg, batches(), settings)
    assert first == second
    other = evaluate_batches(model, cfg, batches(), EvalSettings(steps=[0, 1, 3], samples=[1, 2], seed=6))
    assert [g["ppl"] for g in other["grid"]] != [g["ppl"] for g in first["grid"]]
    assert first["tokens"] == 5 * CTX
    for g in first["grid"]:
        assert len(g["mean_energy_per_step"]) == g["steps"] + 1
        assert math.isfinite(g["ppl"])
    base = first["base"]
    assert (base["steps"], base["samples"], base["selection"], base["accept_lower"]) == (2, 1, "none", False)
    assert base["gain_pct"] == 0.0
    assert first["best"]["ppl"] == min(g["ppl"] for g in first["grid"])
    assert first["gain_pct"] == pytest.approx(100 * (base["ppl"] - first["best"]["ppl"]) / base["ppl"])


def test_ebt_grid_does_not_depend_on_the_batch_size():
    """Starts are keyed by sequence: the same windows in batches of 2 or one at a time give the same grid."""
    model, cfg = tiny("ebt")
    data = batches()
    settings = EvalSettings(steps=[0, 2], samples=[1, 2], seed=1)
    batched = evaluate_batches(model, cfg, data, settings)
    single = evaluate_batches(model, cfg, [row[None] for batch in data for row in batch], settings)
    for a, b in zip(batched["grid"], single["grid"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_token_nll_skips_ignored_targets():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 5, 7, generator=gen), torch.randint(0, 7, (2, 5), generator=gen)
    targets[0, :3] = -100
    acc = TokenNLL()
    acc.add(logits, targets)
    keep = targets != -100
    assert acc.tokens == 7
    assert acc.loss == pytest.approx(F.cross_entropy(logits[keep].double(), targets[keep]).item(), rel=1e-12)


def test_steps_zero_perplexity_is_the_perplexity_of_the_initial_candidates():
    model, cfg = tiny("ebt")
    data = batches()
    settings = EvalSettings(steps=[0], samples=[1], seed=3)
    res = evaluate_batches(model, cfg, data, settings)
    cell = next(g for g in res["grid"] if g["steps"] == 0)
    nll, count = 0.0, 0
    for batch in data:
        init = eval_starts(batch, settings.seed, 0, VOCAB, cfg.thinking.init_logit_std, torch.float32)
        nll += F.cross_entropy(init.reshape(-1, VOCAB).double(), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    assert cell["loss"] == pytest.approx(nll / count, rel=1e-12)
    # and thinking moved away from it: the trained-steps cell is a different perplexity
    assert res["base"]["ppl"] != pytest.approx(cell["ppl"], rel=1e-6)


def test_accept_lower_energy_never_rises_along_the_chain():
    model, cfg = tiny("ebt")
    res = evaluate_batches(model, cfg, batches(), EvalSettings(steps=[4], samples=[1, 2], accept_lower=[True]))
    for g in res["grid"]:
        if g["accept_lower"]:
            e = g["mean_energy_per_step"]
            assert all(b <= a + 1e-9 for a, b in zip(e, e[1:], strict=False)), e


def test_max_batches_limits_the_tokens():
    model, cfg = tiny("transformer")
    res = evaluate_batches(model, cfg, batches(n=4, batch=2, last=2), EvalSettings(max_batches=2))
    assert res["batches"] == 2 and res["tokens"] == 4 * CTX


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (EvalSettings(selections=["best"]), "unknown selection 'best'"),
        (EvalSettings(samples=[0]), "--samples: need counts >= 1"),
        (EvalSettings(steps=[-1]), "--steps: need non-negative"),
        (EvalSettings(noise=-1.0), "--noise must be >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    model, cfg = tiny("ebt")
    with pytest.raises(ValueError, match=message):
        evaluate_batches(model, cfg, batches(), settings)


def test_empty_data_is_a_clear_error():
    model, cfg = tiny("ebt")
    with pytest.raises(ValueError, match="yielded no batch"):
        evaluate_batches(model, cfg, [], EvalSettings(steps=[1], samples=[1]))
