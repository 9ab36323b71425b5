"""μP (ebt/parametrization.py, issue 24): at the base width it is SP bit for bit, away from it each role scales as
the table says, and the coordinate check tells μP from SP."""

from __future__ import annotations

import math

import pytest
import torch
from model_configs import model_config, nested

from benchmarks.coord_check import Setting, sweep
from ebt import build_model
from ebt.parametrization import MATRIX, READOUT, VECTOR, parameter_role
from launch.config import build_config
from launch.optim import build_optimizer

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, context_length=16)


def _raw(kind: str, parametrization: str, base_dim: int, scheme: str) -> dict:
    model = nested(kind=kind, parametrization=parametrization, base_dim=base_dim, init_scheme=scheme, **TINY)
    model["architecture"]["vocab_size"] = 320  # the smallest vocabulary a byte-level tokenizer config accepts
    return {"model": model, "data": {"vocab_size": 320}, "optim": {"lr": 1e-2, "weight_decay": 0.1},
            "trainer": {"max_steps": 4, "micro_batch_size": 2}}


def _one_step(raw: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial state, state after one AdamW step on a fixed batch) from seed 0."""
    cfg = build_config(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, cfg)
    tokens = torch.randint(320, (2, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss, _ = model.loss(tokens)
    loss.backward()
    optimizer.step()
    return init, dict(model.state_dict())


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
@pytest.mark.parametrize("scheme", ["reference", "scaled_normal"])
def test_mup_at_the_base_width_is_sp_bit_for_bit(kind, scheme):
    sp_init, sp_after = _one_step(_raw(kind, "sp", 64, scheme))
    mu_init, mu_after = _one_step(_raw(kind, "mup", 64, scheme))
    for name in sp_init:
        assert torch.equal(sp_init[name], mu_init[name]), name
        assert torch.equal(sp_after[name], mu_after[name]), name


@pytest.mark.parametrize("scheme", ["reference", "scaled_normal"])
def test_mup_init_std_by_role_away_from_the_base(scheme):
    """At m = 4 (dim 64 against base 16): matrices SP(base) / sqrt(m) (xavier's SP already is, so they equal
    SP there), vectors and readouts keep the base width's std. Stds are compared in expectation: the ratio of
    sample stds of n >= 1024 normal draws has relative sd ~ 1/sqrt(2n) <= 2.2%, so 10% is > 4 sd."""
    torch.manual_seed(0)
    sp = build_model(model_config(init_scheme=scheme, **TINY))
    torch.manual_seed(0)
    mu = build_model(model_config(init_scheme=scheme, parametrization="mup", base_dim=16, **TINY))
    m = 4.0
    for (name, p_sp), (_, p_mu) in zip(sp.named_parameters(), mu.named_parameters(), strict=True):
        if p_sp.ndim < 2 or p_sp.numel() < 64:
            continue
        role = parameter_role(name, p_sp.ndim)
        fan_out, fan_in = p_sp.shape
        ratio = float(p_mu.detach().std() / p_sp.detach().std())
        if role == MATRIX:
            want = 1.0 if scheme == "reference" else 1 / math.sqrt(m)
        elif scheme == "reference" and name.endswith(("cand_proj.weight", "head.weight")):
            # xavier's std at the base fans over the std at these fans: fans (fan_out, fan_in) with dim / m
            base = (fan_out / m, fan_in) if "cand_proj" in name else (fan_out, fan_in / m)
            want = math.sqrt((fan_out + fan_in) / sum(base))
        else:
            assert role in (VECTOR, READOUT), name
            want = 1.0
        assert ratio == pytest.approx(want, rel=0.1), (name, role, ratio, want)


def test_mup_learning_rates_and_readout():
    cfg = build_config(_raw("ebt", "mup", 16, "reference"))  # m = 4
    torch.manual_seed(0)
    model = build_model(cfg.model)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["hidden"]["lr"] == pytest.approx(1e-2 / 4) and groups["hidden"]["weight_decay"] == pytest.approx(0.4)
    assert groups["decay"]["lr"] == pytest.approx(1e-2)
    hidden = {id(p) for p in groups["hidden"]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in hidden) == (parameter_role(name, p.ndim) == MATRIX and p.ndim >= 2), name
    assert model.energy_model.readout_mult == pytest.approx(1 / 4)


# The coordinate check on a tiny sweep. Widths 64..256 (4x) with one batch of 8 tokens trained on for 3 Adam steps,
# so the gradient's rank (<= 8) stays below every width: the regime μP's scaling is about. Theory for the change of
# a block's linear output after the steps: slope 0 in log-log under μP; under SP at least +0.5 (Adam's
# Theta(lr) entries summed over d inputs: +1 when aligned with the input, +0.5 when not). The threshold 0.25 is the
# midpoint, and the mean over a model's 14 block linears is asserted, so no single layer's noise decides it.
COORD = dict(batch=1, context_length=8, steps=3, lr=3e-3, base_dim=64)
WIDTHS = [64, 128, 256]


def _block_update_slope(kind: str, parametrization: str) -> float:
    result = sweep(Setting(kind=kind, parametrization=parametrization, **COORD), WIDTHS)
    slopes = [v["update"] for name, v in result["slopes"].items() if ".blocks." in f".{name}"]
    assert len(slopes) == 14
    return sum(slopes) / len(slopes)


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_coordinate_check_is_flat_under_mup(kind):
    assert abs(_block_update_slope(kind, "mup")) < 0.25


def test_coordinate_check_sees_sp_grow():
    """The same check fails SP (else the flatness above would prove nothing)."""
    assert _block_update_slope("transformer", "sp") > 0.25
