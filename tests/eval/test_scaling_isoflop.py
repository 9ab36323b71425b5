"""IsoFLOP analysis recovers the compute-optimal size exponent of a known Chinchilla-form loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.isoflop import group_budgets, isoflop
from eval.sweep_data import RunRecord

E, A, ALPHA, B, BETA = 1.7, 400.0, 0.34, 410.0, 0.28
FLOPS_PER_PARAM_TOKEN = 6.0


def _record(n: float, budget: float, *, tagged: bool, jitter: float = 0.0) -> RunRecord:
    d = budget / (FLOPS_PER_PARAM_TOKEN * n)
    loss = E + A / n**ALPHA + B / d**BETA
    return RunRecord(run=f"n{n:.3g}-c{budget:.3g}", kind="ebt", size="", n_params=n, tokens=d,
                     flops=budget * (1 + jitter), train_loss=loss, val_loss=loss, finished=True,
                     budget_flops=budget if tagged else math.nan)


def _sweep(tagged: bool) -> list[RunRecord]:
    records = []
    for i, budget in enumerate([1e17, 1e18, 1e19]):
        n_centre = 0.6 * (budget / 6) ** 0.5
        for j, n in enumerate(n_centre * np.geomspace(1 / 16, 16, 13)):
            records.append(_record(float(n), budget, tagged=tagged, jitter=0.02 * ((i + j) % 3 - 1)))
    return records


@pytest.mark.parametrize("tagged", [True, False])
def test_isoflop_exponent_matches_the_analytic_optimum(tagged):
    # For L = E + A N^-a + B D^-b with C = 6 N D, the optimum is N_opt ~ C^(b / (a + b)).
    result = isoflop(_sweep(tagged), "ebt", "val_loss")
    assert len(result.budgets) == 3 and all(b.n_opt is not None for b in result.budgets)
    assert result.exponent == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)


def test_budgets_group_by_tolerance_when_untagged():
    groups = group_budgets(_sweep(tagged=False))
    assert [len(g) for g in groups] == [13, 13, 13]


def test_optimum_outside_the_sizes_is_reported_not_extrapolated():
    records = [_record(n, 1e18, tagged=True) for n in (1e4, 2e4, 4e4)]  # far below the optimum
    result = isoflop(records, "ebt", "val_loss")
    assert result.budgets[0].n_opt is None and "outside the sizes tried" in result.budgets[0].note
    assert result.exponent is None and "needs 2" in result.note
