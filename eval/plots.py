"""Report figures as PNG bytes (matplotlib's object API with the Agg canvas: no pyplot global state).

Each function returns None when it has nothing to draw, so the report can say so instead of embedding an
empty axis. The scaling and loss-curve plots are built by `*_figure` functions (tests inspect their artists).

Titles promise only what is drawn (issue 24): a scaling plot names its bootstrap band only when a band was drawn
(fits with bootstrap draws), and a fit that is not estimated (no dofs, no interval) is drawn as points without a
curve. Loss curves use a log y axis clipped to the later part of the runs, where the kinds differ; the EBT's
first-step losses (30+) would otherwise flatten the final differences. Log x axes label at most a few ticks so
labels (long on the FLOPs axis) do not overlap.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter

from eval.isoflop import IsoFlopResult
from eval.scaling import PowerLawFit
from eval.sweep_data import RunRecord

KIND_COLORS = {"ebt": "tab:red", "transformer": "tab:blue"}
KIND_LABELS = {"ebt": "EBT", "transformer": "Transformer++"}
AXIS_LABELS = {"N": "parameters N", "D": "training tokens D", "C": "training FLOPs C (EBT-aware)"}
# The loss-curve y axis starts at the losses after this share of each run's tokens.
CLIP_EARLY_FRACTION = 0.1
CAPTIONS = {
    "loss_curves": f"Training (lines) and validation (dots) loss against tokens. Log y axis, clipped above at the "
                   f"highest loss after the first {CLIP_EARLY_FRACTION:.0%} of each run's tokens: the first "
                   "steps (EBT losses of 30+) are off the top so the final differences can be read.",
    "scaling_N": "L(N): runs as points; a curve for each estimated fit, its shaded bootstrap band where drawn.",
    "scaling_D": "L(D): runs as points; a curve for each estimated fit, its shaded bootstrap band where drawn.",
    "scaling_C": "L(C): runs as points; a curve for each estimated fit, its shaded bootstrap band where drawn.",
}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def loss_curves(curves: dict[str, tuple[RunRecord, list[dict[str, Any]]]]) -> bytes | None:
    fig = loss_curves_figure(curves)
    return None if fig is None else _png(fig)


def _late_losses(train: list[tuple[float, float]], val: list[tuple[float, float]]) -> list[float]:
    """Losses after the first CLIP_EARLY_FRACTION of a run's tokens (all of them for a one-point run)."""
    points = train + val
    last = max(t for t, _ in points)
    late = [v for t, v in points if t >= CLIP_EARLY_FRACTION * last]
    return late or [v for _, v in points]


def loss_curves_figure(curves: dict[str, tuple[RunRecord, list[dict[str, Any]]]]) -> Figure | None:
    """Training loss (lines) and validation loss (markers) against tokens, one colour per kind."""
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    late_losses: list[float] = []
    all_losses: list[float] = []
    sizes = sorted({rec.n_params for rec, _ in curves.values()})
    for name, (rec, rows) in sorted(curves.items()):
        train = [(r.get("tokens"), r.get("loss")) for r in rows if not r.get("final") and "loss" in r]
        train = [(float(t), float(v)) for t, v in train if t and _finite(v)]
        val = [(float(r["tokens"]), float(r["val_loss"])) for r in rows if "val_loss" in r and r.get("tokens")
               and _finite(r["val_loss"])]
        if not train and not val:
            continue
        shade = 0.35 + 0.65 * (sizes.index(rec.n_params) + 1) / len(sizes) if rec.n_params in sizes else 1.0
        color = KIND_COLORS.get(rec.kind, "gray")
        late_losses += _late_losses(train, val)
        all_losses += [v for _, v in train + val]
        if train:
            t, v = zip(*train, strict=True)
            ax.plot(t, v, color=color, alpha=shade, lw=1.2, label=f"{name}")
        if val:
            t, v = zip(*val, strict=True)
            ax.plot(t, v, "o", color=color, alpha=shade, ms=4)
        drawn = True
    if not drawn:
        return None
    ax.set_xscale("log")
    _few_log_ticks(ax.xaxis)
    positive = [v for v in all_losses if v > 0]
    if positive:
        # Log y spreads the final losses; the early steps are clipped off the top (the caption says so).
        ax.set_yscale("log")
        low, high = min(positive), max(v for v in late_losses if v > 0) if any(v > 0 for v in late_losses) else 1.0
        ax.set_ylim(low / 1.03, high * 1.03)
        ax.yaxis.set_major_formatter("{x:.3g}")
        ax.yaxis.set_minor_formatter("{x:.3g}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss, log scale (lines: train, dots: validation)")
    ax.set_title(f"Loss curves (log y; first {CLIP_EARLY_FRACTION:.0%} of each run's tokens clipped off the top)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, which="both")
    return fig


def _few_log_ticks(axis: Any) -> None:
    """Label decades only (at most a handful of ticks); minor ticks stay as unlabelled marks.

    Matplotlib labels minor ticks on a log axis spanning under about a decade, and FLOPs labels such as
    "6x10^13" are wide enough to overlap there."""
    axis.set_major_locator(LogLocator(base=10, numticks=6))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 1.0, numticks=12))
    axis.set_minor_formatter(NullFormatter())


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def scaling_fit(axis: str, points: dict[str, tuple[np.ndarray, np.ndarray]], fits: dict[str, PowerLawFit],
                loss_column: str) -> bytes | None:
    fig = scaling_fit_figure(axis, points, fits, loss_column)
    return None if fig is None else _png(fig)


def _has_band(fit: PowerLawFit) -> bool:
    return fit.not_estimated_reason() is None and fit.boot is not None and len(fit.boot) > 0


def _draw_fit(ax: Any, kind: str, x: np.ndarray, fit: PowerLawFit, color: str) -> bool:
    """The fitted curve, and its bootstrap band when there are draws; True when a band was drawn.
    A fit that is not estimated gets no curve: through 3 points any curve is an interpolation, not a fit."""
    label = KIND_LABELS.get(kind, kind)
    why = fit.not_estimated_reason()
    if why:
        ax.plot([], [], " ", label=f"{label}: alpha {why}")
        return False
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
    banded = _has_band(fit)
    if banded:
        lo, hi = fit.band(grid)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.18, lw=0)
    lo_a, hi_a = fit.alpha_ci
    ax.plot(grid, fit.predict(grid), color=color,
            label=f"{label} fit: E={fit.E:.3f}, alpha={fit.alpha:.3f} [{lo_a:.3f}, {hi_a:.3f}]")
    return banded


def _scaling_title(axis: str, fits: dict[str, PowerLawFit], banded: bool) -> str:
    if banded:
        return f"L({axis}) = E + A {axis}^-alpha, {int(round(100 * _level(fits)))}% bootstrap band"
    if any(f.not_estimated_reason() is None for f in fits.values()):
        return f"L({axis}) = E + A {axis}^-alpha (no bootstrap band)"
    return f"L({axis}): runs only (no fit estimated)"


def scaling_fit_figure(axis: str, points: dict[str, tuple[np.ndarray, np.ndarray]], fits: dict[str, PowerLawFit],
                       loss_column: str) -> Figure | None:
    """Points, the fitted E + A X^-alpha and its bootstrap band per kind; None without a fit."""
    if not fits:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    banded = False
    for kind, (x, y) in sorted(points.items()):
        color = KIND_COLORS.get(kind, "gray")
        ax.plot(x, y, "o", color=color, label=f"{KIND_LABELS.get(kind, kind)} runs")
        fit = fits.get(kind)
        if fit is not None:
            banded = _draw_fit(ax, kind, x, fit, color) or banded
    # Log x, linear y: losses span well under a decade, where a log y axis has no labelled ticks, and with
    # the offset E the curve is not a straight line on either scale.
    ax.set_xscale("log")
    _few_log_ticks(ax.xaxis)
    # Frame the measured losses: a wide band beyond the smallest run (few points, loose A) would otherwise
    # stretch the y axis until the points and fits are flat lines at the bottom.
    ys = np.concatenate([y for _, y in points.values()])
    ys = ys[np.isfinite(ys)]
    if ys.size:
        low, high = float(ys.min()), float(ys.max())
        pad = max(0.5 * (high - low), 0.05 * abs(high), 1e-3)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    ax.set_ylabel(loss_column)
    ax.set_title(_scaling_title(axis, fits, banded))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return fig


def _level(fits: dict[str, PowerLawFit]) -> float:
    return next((f.ci_level for f in fits.values()), 0.95)


def isoflop_plot(results: list[IsoFlopResult]) -> bytes | None:
    with_budgets = [r for r in results if r.budgets]
    if not with_budgets:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for res in with_budgets:
        color = KIND_COLORS.get(res.kind, "gray")
        for b in res.budgets:
            n = np.array(b.n_params)
            ax.plot(n, b.losses, "o", color=color, alpha=0.7)
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.plot(grid, np.polyval(b.coeffs, np.log(grid)), color=color, alpha=0.6, lw=1)
            if b.n_opt is not None:
                ax.plot([b.n_opt], [b.loss_opt], "*", color=color, ms=11)
        # No exponent in the legend: it has no interval (see the report's IsoFLOP section).
        ax.plot([], [], color=color, label=KIND_LABELS.get(res.kind, res.kind))
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles (stars: compute-optimal size per budget)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def system2_curves(evals: list[dict[str, Any]]) -> bytes | None:
    """Perplexity against thinking steps per source (samples as line styles); Transformer++ as flat lines."""
    sources = sorted({s["name"] for e in evals for s in e["sources"]})
    if not sources:
        return None
    fig = Figure(figsize=(4.2 * len(sources), 4.0), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for i, source in enumerate(sources):
        ax = fig.add_subplot(1, len(sources), i + 1)
        for e in evals:
            src = next((s for s in e["sources"] if s["name"] == source), None)
            if src is None:
                continue
            label = e.get("run") or e.get("checkpoint", "?")
            if src.get("plain"):
                ax.axhline(src["plain"]["ppl"], color=KIND_COLORS["transformer"], lw=1, label=f"{label} (plain)")
                continue
            cells = [c for c in src["grid"] if not c["accept_lower"] and c["selection"] in ("min", "none")]
            for j, samples in enumerate(sorted({c["samples"] for c in cells})):
                line = sorted((c["steps"], c["ppl"]) for c in cells if c["samples"] == samples)
                ax.plot(*zip(*line, strict=True), styles[j % len(styles)], marker="o", ms=3,
                        color=KIND_COLORS["ebt"], label=f"{label}, {samples} sample(s)")
        steps = sorted({c["steps"] for e in evals for s in e["sources"] if s["name"] == source for c in s["grid"]})
        if steps:
            ax.set_xticks(steps)
        ax.set_xlabel("thinking steps")
        ax.set_ylabel("perplexity")
        ax.set_title(f"System-2 thinking: {source}")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    return _png(fig)


def ood_gains(evals: list[dict[str, Any]]) -> bytes | None:
    """Best thinking gain (% perplexity reduction vs. the trained step count) per source and model."""
    bars = [(e.get("run") or e.get("checkpoint", "?"), s["name"], s.get("gain_pct"), s.get("ood", False))
            for e in evals for s in e["sources"] if s.get("gain_pct") is not None]
    if not bars:
        return None
    models = sorted({b[0] for b in bars})
    sources = list(dict.fromkeys(b[1] for b in sorted(bars, key=lambda b: b[3])))
    fig = Figure(figsize=(max(5.0, 1.3 * len(sources) * len(models)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for j, model in enumerate(models):
        vals = [next((b[2] for b in bars if b[0] == model and b[1] == s), 0.0) for s in sources]
        ax.bar(np.arange(len(sources)) + j * width, vals, width, label=model)
    ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}\n({'OOD' if any(b[3] for b in bars if b[1] == s) else 'in-dist.'})" for s in sources])
    ax.set_ylabel("thinking gain (% lower perplexity)")
    ax.set_title("System-2 gain per data source")
    ax.axhline(0, color="black", lw=0.8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)
