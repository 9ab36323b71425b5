"""Report figures as PNG bytes (matplotlib's object API with the Agg canvas: no pyplot global state).

Each function returns None when it has nothing to draw, so the report can say so instead of embedding an
empty axis.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval.isoflop import IsoFlopResult
from eval.scaling import PowerLawFit
from eval.sweep_data import RunRecord

KIND_COLORS = {"ebt": "tab:red", "transformer": "tab:blue"}
KIND_LABELS = {"ebt": "EBT", "transformer": "Transformer++"}
AXIS_LABELS = {"N": "parameters N", "D": "training tokens D", "C": "training FLOPs C (EBT-aware)"}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def loss_curves(curves: dict[str, tuple[RunRecord, list[dict[str, Any]]]]) -> bytes | None:
    """Training loss (lines) and validation loss (markers) against tokens, one colour per kind."""
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
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
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (lines: train, dots: validation)")
    ax.set_title("Loss curves")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _png(fig)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def scaling_fit(axis: str, points: dict[str, tuple[np.ndarray, np.ndarray]], fits: dict[str, PowerLawFit],
                loss_column: str) -> bytes | None:
    """Points, the fitted E + A X^-alpha and its bootstrap band per kind; None without a fit."""
    if not fits:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for kind, (x, y) in sorted(points.items()):
        color = KIND_COLORS.get(kind, "gray")
        ax.plot(x, y, "o", color=color, label=f"{KIND_LABELS.get(kind, kind)} runs")
        fit = fits.get(kind)
        if fit is None:
            continue
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        lo, hi = fit.band(grid)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.18, lw=0)
        lo_a, hi_a = fit.alpha_ci
        ci = f" [{lo_a:.3f}, {hi_a:.3f}]" if math.isfinite(lo_a) else ""
        ax.plot(grid, fit.predict(grid), color=color,
                label=f"{KIND_LABELS.get(kind, kind)} fit: E={fit.E:.3f}, alpha={fit.alpha:.3f}{ci}")
    # Log x, linear y: losses span well under a decade, where a log y axis has no labelled ticks, and with
    # the offset E the curve is not a straight line on either scale.
    ax.set_xscale("log")
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
    ax.set_title(f"L({axis}) = E + A {axis}^-alpha, {int(round(100 * _level(fits)))}% bootstrap band")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


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
        ax.plot([], [], color=color, label=f"{KIND_LABELS.get(res.kind, res.kind)}"
                + (f": N_opt ~ C^{res.exponent:.2f}" if res.exponent is not None else ""))
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
