"""`ebt report`: from a finished sweep (or run dirs) to report.md, report.html, PNGs and fits.json.

The report is assembled as a list of blocks rendered twice (Markdown and self-contained HTML with the PNGs
inlined as base64), so both always say the same thing. All files are produced in memory first and then
moved into place one by one with atomic renames: a failure leaves no half-written report behind.

Honesty rules (issue 24): an exponent or scaling-rate difference is printed only with its interval; a fit with
no degrees of freedom left (3 points for L = E + A X^-alpha) or without an interval is printed as "not
estimated" with the reason, and no scaling-rate difference is derived from it. `summary_lines` gives the CLI
the same wording. A "Scope" section says what a sweep of this size can and cannot show.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval import plots
from eval.isoflop import IsoFlopResult, isoflop
from eval.scaling import (
    ALPHA_FLOOR,
    LogLogSlope,
    NotEstimable,
    PowerLawFit,
    RateComparison,
    compare_rates,
    compare_slopes,
    fit_loglog_slope,
    fit_power_law,
)
from eval.sweep_data import EVAL_SCHEMA, KINDS, Exclusion, RunRecord, gather, read_metrics, screen
from fsutil import atomic_write_files
from fsutil.progress import Progress

AXES = {"N": "n_params", "D": "tokens", "C": "flops"}
AXIS_NAMES = {"N": "parameters", "D": "tokens", "C": "FLOPs"}


@dataclass
class Block:
    kind: str  # h1 | h2 | p | list | table | img
    content: Any


@dataclass
class ReportResult:
    out_dir: Path
    files: list[Path]
    fits: dict[str, dict[str, PowerLawFit]]
    comparisons: dict[str, RateComparison]
    excluded: list[Exclusion]
    warnings: list[str]
    figures: list[str] = field(default_factory=list)
    slopes: dict[str, dict[str, LogLogSlope]] = field(default_factory=dict)
    slope_comparisons: dict[str, RateComparison] = field(default_factory=dict)
    # axis -> why no scaling-rate difference was derived (a fit without degrees of freedom)
    rate_refusals: dict[str, str] = field(default_factory=dict)
    slope_refusals: dict[str, str] = field(default_factory=dict)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _ci(ci: tuple[float, float], digits: int = 4) -> str:
    return "n/a" if not math.isfinite(ci[0]) else f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _jsonable(obj: Any) -> Any:
    """NaN/inf become null: JSON has no spelling for them and strict parsers reject Python's."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _load_evals(files: list[Path], warnings: list[str]) -> list[dict[str, Any]]:
    evals = []
    for file in files:
        data = json.loads(file.read_text())
        if data.get("schema") != EVAL_SCHEMA or not isinstance(data.get("sources"), list):
            warnings.append(f"{file}: not an `ebt eval` result; skipped")
            continue
        data["file"] = str(file)
        evals.append(data)
    return evals


def _fit_all(kept: list[RunRecord], loss_column: str, n_boot: int, seed: int, ci_level: float,
             notes: list[str], progress: bool):
    fits: dict[str, dict[str, PowerLawFit]] = {a: {} for a in AXES}
    points: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {a: {} for a in AXES}
    jobs = []
    for axis, attr in AXES.items():
        for kind in KINDS:
            rows = [r for r in kept if r.kind == kind and math.isfinite(getattr(r, attr)) and getattr(r, attr) > 0]
            if not rows:
                continue
            x = np.array([getattr(r, attr) for r in rows])
            y = np.array([r.loss(loss_column) for r in rows])
            points[axis][kind] = (x, y)
            distinct = len(np.unique(x))
            if distinct < 3:
                notes.append(f"L({axis}) for {kind} not fitted: {distinct} distinct {AXIS_NAMES[axis]} value(s) "
                             f"among {len(rows)} runs (needs 3; add budgets/sizes to the sweep grid)")
                continue
            jobs.append((axis, kind, x, y))
    with Progress(enabled=progress, prefix="ebt report: ", transient=True) as bar:
        task = bar.add(f"fitting ({n_boot} bootstrap draws each)", len(jobs), unit="fits")
        for i, (axis, kind, x, y) in enumerate(jobs):
            fit = fits[axis][kind] = fit_power_law(x, y, n_boot=n_boot, seed=seed + i, ci_level=ci_level,
                                                   label=f"{kind}/L({axis})")
            if fit.alpha <= ALPHA_FLOOR:
                notes.append(f"{kind}/L({axis}): alpha fell to its lower bound ({fit.alpha:.0e}): the loss does not "
                             f"decrease with {AXIS_NAMES[axis]} in these runs, so the fit is degenerate "
                             "(train longer, or check the runs)")
            bar.advance(task)
        bar.finish(task)
    return fits, points


def build_report(paths: list[str | Path], out_dir: str | Path, *, loss_column: str = "val_loss", n_boot: int = 400,
                 seed: int = 0, ci_level: float = 0.95, progress: bool = True) -> ReportResult:
    if not 0 < ci_level < 1:
        raise ValueError(f"--ci must lie in (0, 1), got {ci_level}")
    _check_out_dir(Path(out_dir))
    inputs = gather(paths)
    warnings = list(inputs.warnings)
    if not inputs.records and not inputs.eval_files:
        raise ValueError(f"no runs found in {', '.join(map(str, paths))}")
    kept, excluded = screen(inputs.records, loss_column)
    for ex in excluded:
        warnings.append(f"excluded run '{ex.run}': {ex.reason}")
    notes: list[str] = []
    fits, points = _fit_all(kept, loss_column, n_boot, seed, ci_level, notes, progress)
    warnings += notes
    comparisons, rate_refusals = _compare_axes(fits, compare_rates)
    # The slope's bootstrap is closed form, so it affords the many draws that far-tail percentiles need.
    slope_boot = max(n_boot, 4000) if n_boot > 0 else 0
    slopes = {axis: {kind: fit_loglog_slope(*points[axis][kind], n_boot=slope_boot, seed=seed + 100 + i,
                                            ci_level=ci_level, label=f"{kind}/log-log L({axis})")
                     for i, kind in enumerate(by_kind)} for axis, by_kind in fits.items()}
    slope_comparisons, slope_refusals = _compare_axes(slopes, compare_slopes)
    iso = [isoflop(kept, kind, loss_column) for kind in KINDS if any(r.kind == kind for r in kept)]
    evals = _load_evals(inputs.eval_files, warnings)

    curves = {r.run: (r, read_metrics(r.run_dir)) for r in inputs.records if r.run_dir is not None}
    missing_dirs = [r.run for r in inputs.records if r.run_dir is None]
    if missing_dirs:
        warnings.append(f"no run dir (metrics.jsonl) found for {len(missing_dirs)} run(s): "
                        f"{', '.join(missing_dirs[:5])}{' ...' if len(missing_dirs) > 5 else ''}; no loss curves")

    figures: dict[str, bytes | None] = {"loss_curves.png": plots.loss_curves(curves)}
    for axis in AXES:
        figures[f"scaling_{axis}.png"] = plots.scaling_fit(axis, points[axis], fits[axis], loss_column)
    figures["isoflop.png"] = plots.isoflop_plot(iso)
    figures["system2_gain.png"] = plots.system2_curves(evals)
    figures["ood_gain.png"] = plots.ood_gains(evals)
    figures = {k: v for k, v in figures.items() if v is not None}

    blocks = _blocks(inputs.records, kept, excluded, warnings, fits, comparisons, iso, evals, figures, loss_column,
                     n_boot, ci_level, slopes, slope_comparisons, rate_refusals, slope_refusals)
    fits_json = {
        "schema": "ebt-report/1", "loss_column": loss_column, "ci_level": ci_level, "n_boot": n_boot, "seed": seed,
        "fits": {a: {k: f.to_dict() for k, f in by_kind.items()} for a, by_kind in fits.items()},
        "comparisons": {a: c.to_dict() for a, c in comparisons.items()},
        "comparisons_not_derived": rate_refusals,
        "loglog_slopes": {a: {k: f.to_dict() for k, f in by_kind.items()} for a, by_kind in slopes.items()},
        "loglog_comparisons": {a: c.to_dict() for a, c in slope_comparisons.items()},
        "loglog_comparisons_not_derived": slope_refusals,
        "isoflop": [r.to_dict() for r in iso],
        "system2": [_system2_summary(e) for e in evals if e["sources"]],
        "downstream": [{k: v for k, v in d.items() if k != "examples"} for d in _downstream(evals)],
        "runs_used": [r.run for r in kept],
        "excluded": [{"run": e.run, "reason": e.reason} for e in excluded],
        "warnings": warnings,
    }
    contents: dict[str, bytes] = dict(figures)
    contents["report.md"] = _markdown(blocks).encode()
    contents["report.html"] = _html(blocks, figures).encode()
    contents["fits.json"] = json.dumps(_jsonable(fits_json), indent=1, allow_nan=False).encode()
    # Every file is written in full before the first replaces its old version: an interrupted write keeps the
    # previous report.
    files = atomic_write_files(Path(out_dir), contents)
    return ReportResult(Path(out_dir), files, fits, comparisons, excluded, warnings, sorted(figures), slopes,
                        slope_comparisons, rate_refusals, slope_refusals)


def _compare_axes(by_axis: dict[str, dict[str, Any]], compare) -> tuple[dict[str, RateComparison], dict[str, str]]:
    """EBT vs. Transformer++ per axis where both kinds were fitted; a fit without dofs gives a reason instead."""
    done: dict[str, RateComparison] = {}
    refused: dict[str, str] = {}
    for axis, by_kind in by_axis.items():
        if "ebt" not in by_kind or "transformer" not in by_kind:
            continue
        try:
            done[axis] = compare(by_kind["ebt"], by_kind["transformer"], axis)
        except NotEstimable as why:
            refused[axis] = str(why)
    return done, refused


def _pct_ci(ci: tuple[float, float], ci_level: float) -> str:
    return f"{100 * ci_level:.0f}% CI {100 * ci[0]:+.1f}% .. {100 * ci[1]:+.1f}%"


def summary_lines(result: ReportResult) -> list[str]:
    """The CLI's summary: every exponent with its interval, or "not estimated" with the reason; a scaling-rate
    difference only where both fits have dofs and the difference has an interval."""
    lines = []
    for axis in AXES:
        for kind, fit in sorted(result.fits.get(axis, {}).items()):
            why = fit.not_estimated_reason()
            value = why if why else f"{fit.alpha:.4f} ({_pct_ci_plain(fit.alpha_ci, fit.ci_level)})"
            lines.append(f"L({axis}) {kind}: alpha_{axis} {value}")
        lines += _rate_summary(axis, "scaling rate (alpha)", result.comparisons, result.rate_refusals)
        lines += _rate_summary(axis, "log-log slope", result.slope_comparisons, result.slope_refusals)
    return lines


def _pct_ci_plain(ci: tuple[float, float], ci_level: float) -> str:
    return f"{100 * ci_level:.0f}% CI {ci[0]:.4f} .. {ci[1]:.4f}"


def _rate_summary(axis: str, what: str, comparisons: dict[str, RateComparison], refusals: dict[str, str]) -> list[str]:
    if axis in refusals:
        return [f"L({axis}): no EBT vs. Transformer++ {what} difference: {refusals[axis]}"]
    cmp = comparisons.get(axis)
    if cmp is None:
        return []
    why = cmp.not_estimated_reason()
    if why:
        return [f"L({axis}): EBT vs. Transformer++ {what} difference {why}"]
    return [f"L({axis}): EBT {what} {100 * cmp.rel_diff:+.1f}% vs. Transformer++ ({_pct_ci(cmp.ci, cmp.ci_level)})"]


def _check_out_dir(out: Path) -> None:
    """The output must be a directory or become one: a file there (or in its place above it) would otherwise
    surface as a FileExistsError traceback once every fit is done. Checked before any work, and nothing of the
    user's is replaced."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "exists and is not a directory" if probe == out else f"cannot be made: {probe} is not a directory"
        raise ValueError(f"-o/--out {out} {what}; give a directory (the report writes report.md, report.html, "
                         "fits.json and its figures into it)")


def _system2_summary(e: dict[str, Any]) -> dict[str, Any]:
    return {"run": e.get("run"), "kind": e.get("kind"), "checkpoint": e.get("checkpoint"),
            "sources": [{k: s.get(k) for k in ("name", "ood", "tokens", "base", "best", "gain_pct", "plain")}
                        for s in e["sources"]]}


def _downstream(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per task cell of every eval JSON that holds downstream results."""
    return [{"run": e.get("run"), "kind": e.get("kind"), "task": t["task"], "data": t.get("data"), **cell}
            for e in evals for t in e.get("tasks") or [] for cell in t.get("cells", [])]


def _downstream_rows(evals: list[dict[str, Any]]) -> list[list[str]]:
    from eval.tasks.runner import format_metric

    return [[str(d["run"]), str(d["kind"]), d["task"], "-" if d.get("steps") is None else str(d["steps"]),
             str(d.get("samples", 1)), str(d.get("selection", "none")), str(d.get("n")),
             ", ".join(f"{name} {format_metric(name, value)}" for name, value in d.get("metrics", {}).items())]
            for d in _downstream(evals)]


def _cell_label(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "n/a"
    return (f"steps={cell['steps']}, samples={cell['samples']}, {cell['selection']}"
            + (", accept-lower" if cell["accept_lower"] else ""))


def _fit_row(axis: str, kind: str, f: PowerLawFit) -> list[str]:
    """A fit's table row; without dofs or an interval its numbers are withheld and the reason stands instead."""
    why = f.not_estimated_reason()
    if why:
        return [f"L({axis})", kind, str(f.n_points), "-", "-", "-", why, "-"]
    return [f"L({axis})", kind, str(f.n_points), _fmt(f.E), _ci(f.E_ci), f"{f.log10_A:.3f}", _fmt(f.alpha),
            _ci(f.alpha_ci)]


def _rate_rows(comparisons: dict[str, RateComparison], refusals: dict[str, str]) -> list[list[str]]:
    rows = []
    for axis in AXES:
        if axis in refusals:
            rows.append([f"L({axis})", "-", "-", f"not derived: {refusals[axis]}", "-", "-"])
            continue
        c = comparisons.get(axis)
        if c is None:
            continue
        why = c.not_estimated_reason()
        if why:
            rows.append([f"L({axis})", "-", "-", why, "-", "-"])
            continue
        rows.append([f"L({axis})", _fmt(c.alpha_ebt), _fmt(c.alpha_tpp), f"{100 * c.rel_diff:+.1f}%",
                     f"[{100 * c.ci[0]:+.1f}%, {100 * c.ci[1]:+.1f}%]", _fmt(c.prob_ebt_faster, 3)])
    return rows


SMALL_SWEEP_WIDTHS = 5  # fewer widths per kind than this leaves an L(N) fit at most 1 residual dof


def _budget(r: RunRecord) -> tuple[float, float] | float:
    """The budget a run was planned with (the sweep's budget columns), else its token count."""
    if math.isfinite(r.budget_tokens) or math.isfinite(r.budget_flops):
        return (r.budget_tokens if math.isfinite(r.budget_tokens) else -1.0,
                r.budget_flops if math.isfinite(r.budget_flops) else -1.0)
    return r.tokens


def _falls_with_size(kept: list[RunRecord], kind: str, loss_column: str) -> bool | None:
    """Whether the loss falls with every step in size at every budget (None: no budget has 2 sizes). Seeds of one
    size and budget are averaged first: they are repeats of one point, not steps in size."""
    by_point: dict[Any, dict[float, list[float]]] = {}
    for r in kept:
        if r.kind == kind:
            by_point.setdefault(_budget(r), {}).setdefault(r.n_params, []).append(r.loss(loss_column))
    verdicts = []
    for sizes in by_point.values():
        if len(sizes) >= 2:
            means = [sum(losses) / len(losses) for _, losses in sorted(sizes.items())]
            verdicts.append(all(b < a for a, b in zip(means, means[1:], strict=False)))
    return all(verdicts) if verdicts else None


def _scope_blocks(kept: list[RunRecord], loss_column: str) -> list[Block]:
    """What a sweep of this design can show and what it cannot, stated from its own counts."""
    kinds = [k for k in KINDS if any(r.kind == k for r in kept)]
    if not kinds:
        return []
    widths = {k: len({r.n_params for r in kept if r.kind == k}) for k in kinds}
    seeds = len({r.seed for r in kept})
    budgets = len({_budget(r) for r in kept})
    facts = (f"{len(kept)} usable run(s); distinct sizes per kind: "
             + ", ".join(f"{k} {n}" for k, n in widths.items())
             + f"; seeds: {seeds}{' (or not recorded)' if seeds == 1 else ''}; budgets: {budgets}.")
    b = [Block("h2", "Scope: what this sweep can and cannot show"), Block("p", facts)]
    fewest = min(widths.values())
    if fewest >= SMALL_SWEEP_WIDTHS and seeds > 1 and budgets > 1:
        return b
    ordered = {k: _falls_with_size(kept, k, loss_column) for k in kinds}
    shows = ["the pipeline (training, collection, fits, report) runs end to end on this design",
             "whether each kind's loss falls with size at these scales: " + "; ".join(
                 f"{k}: {'yes, at every budget' if v else 'no, not at every budget' if v is False else 'n/a'}"
                 for k, v in ordered.items())]
    cannot = []
    if fewest <= 3:
        cannot.append(f"a scaling exponent: with {fewest} sizes an L(N) fit of E, A and alpha passes through every "
                      "point, so alpha_N is not estimated and no scaling-rate difference is derived")
    elif fewest < SMALL_SWEEP_WIDTHS:
        cannot.append(f"a precise exponent: with {fewest} sizes an L(N) fit has {fewest - 3} residual degree(s) "
                      "of freedom; its interval is wide and leans on the bootstrap's small-sample corrections")
    if seeds == 1:
        cannot.append("seed-to-seed variation: one seed per point, so a difference between the kinds smaller than "
                      "run-to-run noise cannot be told from it")
    if budgets == 1:
        cannot.append("L(D) per size and IsoFLOP profiles (the paper's headline comparison): there is one budget")
    cannot.append("extrapolation: models this small, trained this briefly (often on CPU, with hyperparameters "
                  "tuned for other scales), are far from the paper's regime; a recipe effect cannot be told from a "
                  "scale effect, and the rates measured here do not predict large-scale behaviour")
    b += [Block("p", "This is a small rehearsal. What it shows:"), Block("list", shows),
          Block("p", "What it cannot show:"), Block("list", cannot)]
    return b


def _blocks(records, kept, excluded, warnings, fits, comparisons, iso: list[IsoFlopResult], evals, figures,
            loss_column, n_boot, ci_level, slopes, slope_comparisons, rate_refusals, slope_refusals) -> list[Block]:
    pct = int(round(100 * ci_level))
    b = [Block("h1", "EBT vs. Transformer++ scaling report")]
    b.append(Block("p", f"{len(records)} run(s) read, {len(kept)} used in fits, {len(excluded)} excluded. "
                        f"Loss: `{loss_column}`. Fits: L(X) = E + A·X^(−alpha), Huber loss on log-residuals, "
                        f"multi-start L-BFGS; {pct}% intervals from {n_boot} residual-bootstrap draws."))
    if warnings:
        b += [Block("h2", "Warnings"), Block("list", warnings)]
    b += _scope_blocks(kept, loss_column)

    b.append(Block("h2", "Scaling fits"))
    rows = [_fit_row(axis, kind, f) for axis, by_kind in fits.items() for kind, f in sorted(by_kind.items())]
    if rows:
        b.append(Block("p", "A fit with no residual degrees of freedom (points <= its 3 parameters) passes through "
                            "every point exactly, so its exponent carries no information about scaling; such fits, "
                            "and any without an interval, are listed as \"not estimated\" with the reason."))
        b.append(Block("table", (["fit", "kind", "points", "E", f"E {pct}% CI", "log10 A", "alpha",
                                  f"alpha {pct}% CI"], rows)))
    else:
        b.append(Block("p", "No fit was possible (see warnings): each kind needs 3 finished runs with distinct X."))

    b.append(Block("h2", "EBT vs. Transformer++ scaling rate"))
    if comparisons or rate_refusals:
        b.append(Block("p", "Relative scaling-rate difference = alpha_EBT / alpha_Transformer++ − 1 (positive: EBT "
                            "improves faster with X). P(EBT faster) is the share of paired bootstrap draws with "
                            "alpha_EBT > alpha_Transformer++."))
        b.append(Block("table", (["axis", "alpha EBT", "alpha Transformer++", "relative difference",
                                  f"{pct}% CI", "P(EBT faster)"], _rate_rows(comparisons, rate_refusals))))
        b.append(Block("p", "The paper draws scaling rates as straight lines on log-log axes. The same comparison "
                            "for the least-squares slope s of log L = c − s·log X (no irreducible term):"))
        b.append(Block("table", (["axis", "slope EBT", "slope Transformer++", "relative difference",
                                  f"{pct}% CI", "P(EBT faster)"],
                                 _rate_rows(slope_comparisons, slope_refusals))))
    else:
        b.append(Block("p", "Not available: needs a fit for both kinds on the same axis."))

    b.append(Block("h2", "IsoFLOP analysis"))
    iso_rows = [[r.kind, _fmt(bf.budget, 3), str(len(bf.n_params)), _fmt(bf.n_opt, 4), _fmt(bf.loss_opt), bf.note]
                for r in iso for bf in r.budgets]
    if iso_rows:
        b.append(Block("table", (["kind", "FLOP budget", "sizes", "N_opt", "loss at N_opt", "note"], iso_rows)))
    for r in iso:
        if r.exponent is not None:
            # A least-squares line through the budgets' optima carries no interval: not printed as a result.
            optima = sum(bf.n_opt is not None for bf in r.budgets)
            b.append(Block("p", f"{r.kind}: the exponent b of N_opt ∝ C^b is not estimated: no interval (a line "
                                f"through {optima} budget optima; its point value is in fits.json)."))
        elif r.note:
            b.append(Block("p", f"{r.kind}: {r.note}."))

    b.append(Block("h2", "System-2 thinking and OOD gains"))
    s2_rows = []
    for e in evals:
        for s in e["sources"]:
            if s.get("plain"):
                s2_rows.append([str(e.get("run")), "transformer", s["name"], "yes" if s.get("ood") else "no",
                                _fmt(s["plain"]["ppl"]), "n/a", "n/a", "n/a"])
            else:
                s2_rows.append([str(e.get("run")), "ebt", s["name"], "yes" if s.get("ood") else "no",
                                _fmt((s.get("base") or {}).get("ppl")), _cell_label(s.get("best")),
                                _fmt((s.get("best") or {}).get("ppl")), f"{_fmt(s.get('gain_pct'), 3)}%"])
    if s2_rows:
        b.append(Block("p", "Gain = perplexity reduction of the best grid cell relative to the trained number of "
                            "steps with one sample. Compare the gain across sources to see whether thinking helps "
                            "more out of distribution."))
        b.append(Block("table", (["run", "kind", "source", "OOD", "base ppl", "best setting", "best ppl", "gain"],
                                 s2_rows)))
    else:
        b.append(Block("p", "No `ebt eval` results (eval*.json) found in the inputs; run `ebt eval --checkpoint "
                            "RUN_DIR --ood SOURCE --out RUN_DIR/eval.json` to add System-2 and OOD curves."))

    b.append(Block("h2", "Downstream tasks"))
    task_rows = _downstream_rows(evals)
    if task_rows:
        b.append(Block("p", "From `ebt eval --task` (eval-TASK.json): each task's standard metrics for every "
                            "thinking setting evaluated (steps and samples are an EBT's; '-' for Transformer++)."))
        b.append(Block("table", (["run", "kind", "task", "steps", "samples", "select", "examples", "metrics"],
                                 task_rows)))
    else:
        b.append(Block("p", "No downstream results; run `ebt eval --checkpoint RUN_DIR --task lambada --data "
                            "FILE.jsonl` (or arc_easy, arc_challenge, gsm8k, squad) to add them."))

    b.append(Block("h2", "Figures"))
    for name in figures:
        b.append(Block("img", (name, plots.CAPTIONS.get(name.removesuffix(".png"), name))))

    b.append(Block("h2", "Excluded runs"))
    if excluded:
        b.append(Block("table", (["run", "reason"], [[e.run, e.reason] for e in excluded])))
    else:
        b.append(Block("p", "None."))
    return b


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[Block]) -> str:
    out = []
    for blk in blocks:
        if blk.kind == "h1":
            out.append(f"# {blk.content}\n")
        elif blk.kind == "h2":
            out.append(f"## {blk.content}\n")
        elif blk.kind == "p":
            out.append(f"{blk.content}\n")
        elif blk.kind == "list":
            out.append("\n".join(f"- {_md_cell(item)}" for item in blk.content) + "\n")
        elif blk.kind == "table":
            header, rows = blk.content
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif blk.kind == "img":
            name, caption = blk.content
            out.append(f"![{name}]({name})\n\n*{caption}*\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escaped text with Markdown `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def _html(blocks: list[Block], figures: dict[str, bytes]) -> str:
    esc = html.escape
    body = []
    for blk in blocks:
        if blk.kind in ("h1", "h2"):
            body.append(f"<{blk.kind}>{esc(blk.content)}</{blk.kind}>")
        elif blk.kind == "p":
            body.append(f"<p>{_inline(blk.content)}</p>")
        elif blk.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in blk.content) + "</ul>")
        elif blk.kind == "table":
            header, rows = blk.content
            body.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                        + "</table>")
        elif blk.kind == "img":
            name, caption = blk.content
            data = base64.b64encode(figures[name]).decode()
            body.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(name)}: {esc(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:0.9em}th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>EBT scaling report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
