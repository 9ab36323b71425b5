"""IsoFLOP analysis (Chinchilla approach 2): per compute budget, the model size that minimises loss.

For each budget with at least three sizes, fit a parabola of loss against log N and take its vertex as N_opt;
across budgets, fit log N_opt = a + b log C. The exponent b says how the compute-optimal size grows with
compute. Budgets come from the sweep's `budget_flops` axis when set, else runs whose training FLOPs agree
within `tolerance` are grouped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from eval.sweep_data import RunRecord


@dataclass
class BudgetFit:
    budget: float  # FLOPs (the group's geometric mean when grouped by tolerance)
    n_params: list[float]
    losses: list[float]
    coeffs: list[float]  # loss = c0 (log N)^2 + c1 log N + c2
    n_opt: float | None  # None when the parabola opens downward or its vertex lies outside the sizes tried
    loss_opt: float | None
    note: str = ""


@dataclass
class IsoFlopResult:
    kind: str
    budgets: list[BudgetFit] = field(default_factory=list)
    exponent: float | None = None  # b in N_opt ~ C^b
    log10_coeff: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def group_budgets(records: list[RunRecord], tolerance: float = 0.1) -> list[list[RunRecord]]:
    """Runs sharing a FLOP budget: the sweep's budget_flops when every run has it, else FLOPs within tolerance."""
    usable = [r for r in records if math.isfinite(r.flops) and r.flops > 0]
    if usable and all(math.isfinite(r.budget_flops) for r in usable):
        keys = sorted({r.budget_flops for r in usable})
        return [[r for r in usable if r.budget_flops == k] for k in keys]
    groups: list[list[RunRecord]] = []
    for r in sorted(usable, key=lambda r: r.flops):
        if groups and r.flops <= groups[-1][0].flops * (1 + tolerance):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def isoflop(records: list[RunRecord], kind: str, loss_column: str, tolerance: float = 0.1) -> IsoFlopResult:
    result = IsoFlopResult(kind)
    for group in group_budgets([r for r in records if r.kind == kind], tolerance):
        n = np.array([r.n_params for r in group])
        if len(np.unique(n)) < 3:
            continue
        losses = np.array([r.loss(loss_column) for r in group])
        budget = float(np.exp(np.mean(np.log([r.flops for r in group]))))
        logn = np.log(n)
        coeffs = np.polyfit(logn, losses, 2)
        fit = BudgetFit(budget, n.tolist(), losses.tolist(), coeffs.tolist(), None, None)
        if coeffs[0] <= 0:
            fit.note = "loss is not convex in log N at this budget: no interior optimum"
        else:
            vertex = -coeffs[1] / (2 * coeffs[0])
            if logn.min() <= vertex <= logn.max():
                fit.n_opt, fit.loss_opt = float(math.exp(vertex)), float(np.polyval(coeffs, vertex))
            else:
                fit.note = "optimum lies outside the sizes tried: extend the sweep"
        result.budgets.append(fit)
    optima = [(b.budget, b.n_opt) for b in result.budgets if b.n_opt is not None]
    if not result.budgets:
        result.note = "no FLOP budget with at least 3 model sizes"
    elif len(optima) < 2:
        result.note = f"{len(optima)} budget(s) with an interior optimum; the N_opt ~ C^b fit needs 2"
    else:
        slope, intercept = np.polyfit(np.log10([c for c, _ in optima]), np.log10([n for _, n in optima]), 1)
        result.exponent, result.log10_coeff = float(slope), float(intercept)
    return result
