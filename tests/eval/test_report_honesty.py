"""`ebt report` does not overclaim (issue 24): an exact fit (3 points, 3 parameters) and a number without an
interval are "not estimated", in the report and on the CLI; plot titles promise only what is drawn; loss curves
are readable where the runs differ; the report says what a small rehearsal can and cannot show."""

from __future__ import annotations

import csv
import html as html_lib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from test_report import BUDGETS, COLUMNS, TRUTH, write_sweep

from eval import plots
from eval.scaling import NotEstimable, compare_rates, fit_power_law
from eval.sweep_data import RunRecord
from launch.cli import main

EXACT = "not estimated: 3 points for 3 parameters (needs >= 4)"
SIZE_ORDER = ["4xs", "3xs", "xxs", "xs"]


def _sweep_with_sizes(root: Path, n_sizes: int, noise: float = 0.004) -> Path:
    """One budget, `n_sizes` sizes per kind, loss = E + A / N^alpha with seeded multiplicative noise."""
    sweep = write_sweep(root, evals=False)
    rows = [r for r in csv.DictReader(open(sweep / "results.csv")) if float(r["budget_flops"]) == BUDGETS[-1]]
    rows = [r for r in rows if r["size"] in SIZE_ORDER[:n_sizes]]
    rng = np.random.default_rng(1)
    for r in rows:
        e, a, alpha, *_ = TRUTH[r["kind"]]
        r["val_loss"] = (e + a / float(r["params"]) ** alpha) * (1 + noise * rng.standard_normal())
        r["tokens"] = 1e6  # one token budget, as in the cpu-micro sweep
    with open(sweep / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return sweep


def _report_cli(sweep: Path, out: Path, capsys, n_boot: int = 40) -> str:
    assert main(["report", str(sweep), "-o", str(out), "--n-boot", str(n_boot), "--no-progress"]) == 0
    return capsys.readouterr().out


def test_three_sizes_give_no_exponent_and_no_rate_difference(tmp_path, capsys):
    sweep = _sweep_with_sizes(tmp_path, 3)
    out = tmp_path / "r"
    stdout = _report_cli(sweep, out, capsys)
    fits = json.loads((out / "fits.json").read_text())
    md, html = (out / "report.md").read_text(), html_lib.unescape((out / "report.html").read_text())
    # Before issue 24 the CLI printed "L(N): alpha EBT 0.977 ...; EBT scaling rate +212.1%" here.
    assert f"L(N) ebt: alpha_N {EXACT}" in stdout and f"L(N) transformer: alpha_N {EXACT}" in stdout
    assert not re.search(r"scaling rate \(alpha\) [+-]\d", stdout)
    assert "no EBT vs. Transformer++ scaling rate (alpha) difference" in stdout
    for kind in ("ebt", "transformer"):
        alpha = fits["fits"]["N"][kind]["alpha"]
        assert fits["fits"]["N"][kind]["not_estimated"] == EXACT
        row = next(line for line in md.splitlines() if line.startswith(f"| L(N) | {kind} |"))
        assert EXACT in row and f"{alpha:.4g}" not in row
        assert f"{alpha:.4f}" not in stdout
    assert "N" not in fits["comparisons"] and "needs >= 4" in fits["comparisons_not_derived"]["N"]
    rate_row = next(line for line in md.splitlines() if line.startswith("| L(N) | - | - | not derived"))
    assert "%" not in rate_row
    assert EXACT in html and "not derived: alpha_N (EBT)" in html
    # The straight-line slope has 2 parameters, so 3 points leave it a dof and an interval: printed with it.
    assert re.search(r"L\(N\): EBT log-log slope [+-]\d+\.\d% vs\. Transformer\+\+ \(95% CI", stdout)


def test_four_sizes_print_exponents_and_rates_with_intervals(tmp_path, capsys):
    sweep = _sweep_with_sizes(tmp_path, 4)
    out = tmp_path / "r"
    stdout = _report_cli(sweep, out, capsys)
    md = (out / "report.md").read_text()
    assert "not estimated" not in stdout
    for kind in ("ebt", "transformer"):
        assert re.search(rf"L\(N\) {kind}: alpha_N \d+\.\d{{4}} \(95% CI \d+\.\d{{4}} \.\. \d+\.\d{{4}}\)", stdout)
        row = next(line for line in md.splitlines() if line.startswith(f"| L(N) | {kind} | 4 |"))
        assert re.search(r"\| \[[-\d.e+]+, [-\d.e+]+\] \|$", row), row  # the alpha interval
    assert re.search(r"L\(N\): EBT scaling rate \(alpha\) [+-]\d+\.\d% vs\. Transformer\+\+ \(95% CI [+-]\d", stdout)
    rate_row = next(line for line in md.splitlines() if line.startswith("| L(N) |") and "%" in line)
    assert re.search(r"\[[+-]\d+\.\d%, [+-]\d+\.\d%\]", rate_row)
    assert "This is a small rehearsal" in md and "1 residual degree(s) of freedom" in md


def test_without_bootstrap_no_number_is_printed_as_a_result(tmp_path, capsys):
    stdout = _report_cli(_sweep_with_sizes(tmp_path, 4), tmp_path / "r", capsys, n_boot=0)
    assert "L(N) ebt: alpha_N not estimated: no interval (bootstrap off: --n-boot 0)" in stdout
    assert not re.search(r"scaling rate \(alpha\) [+-]\d", stdout)


def test_rate_comparison_refuses_exact_fits():
    x = np.array([1e5, 3e5, 1e6])
    exact = fit_power_law(x, 2 + 30 * x**-0.3, n_boot=20)
    assert exact.not_estimated_reason() == EXACT
    with pytest.raises(NotEstimable, match="needs >= 4"):
        compare_rates(exact, exact, "N")


def test_small_rehearsal_says_what_it_cannot_show(tmp_path, capsys):
    _report_cli(_sweep_with_sizes(tmp_path, 3), tmp_path / "r", capsys)
    md = (tmp_path / "r" / "report.md").read_text()
    scope = md[md.index("## Scope"):md.index("## Scaling fits")]
    assert "distinct sizes per kind: ebt 3, transformer 3; seeds: 1" in scope
    assert "What it cannot show" in scope
    assert "a scaling exponent: with 3 sizes" in scope and "seed-to-seed variation" in scope
    assert "L(D) per size and IsoFLOP" in scope and "extrapolation" in scope


# ------------------------------------------------------------------------------------------------- figures
def _points_and_fits(n: int, n_boot: int):
    x = np.geomspace(1e5, 3e6, n)
    points = {"ebt": (x, 2.0 + 40 * x**-0.3), "transformer": (x, 1.8 + 30 * x**-0.3)}
    fits = {k: fit_power_law(px, py * (1 + 0.003 * np.sin(np.arange(n))), n_boot=n_boot)
            for k, (px, py) in points.items()}
    return points, fits


def test_scaling_plot_draws_the_band_its_title_names():
    points, fits = _points_and_fits(5, 40)
    fig = plots.scaling_fit_figure("N", points, fits, "val_loss")
    ax = fig.axes[0]
    assert "95% bootstrap band" in ax.get_title()
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    assert all(np.ptp(b.get_paths()[0].vertices[:, 1]) > 0 for b in bands)  # not a zero-width band


def test_scaling_plot_without_draws_or_dofs_claims_no_band():
    points, fits = _points_and_fits(3, 40)  # exact fits: no dofs, no curve, no band
    ax = plots.scaling_fit_figure("N", points, fits, "val_loss").axes[0]
    assert "band" not in ax.get_title() and "no fit estimated" in ax.get_title()
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(ax.lines) == 2 + 2  # the runs' points, and an empty legend entry per kind naming the reason
    assert any("not estimated" in t.get_text() for t in ax.get_legend().get_texts())
    points, fits = _points_and_fits(5, 0)  # estimated point fits, bootstrap off: curves, no band
    ax = plots.scaling_fit_figure("N", points, fits, "val_loss").axes[0]
    assert "band" not in ax.get_title()
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def _overlapping_labels(fig) -> list[tuple[str, str]]:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    frame = ax.get_window_extent(renderer)
    # Labels of ticks outside the view are not drawn: keep those whose centre lies over the axes.
    boxes = [(s, b) for s, b in boxes if frame.x0 - 1 <= 0.5 * (b.x0 + b.x1) <= frame.x1 + 1]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def test_flops_axis_labels_do_not_overlap():
    # cpu-micro-like L(C): 3 widths spanning under a decade of FLOPs each, the EBTs at about twice the FLOPs.
    # Matplotlib then labels minor ticks ("2x10^11", "3x10^11" ...), which overlapped before issue 24.
    x = np.geomspace(3e11, 2.4e12, 3)
    points = {"ebt": (2 * x, 5.5 - 0.1 * np.arange(3)), "transformer": (x, 4.7 - 0.4 * np.arange(3))}
    fits = {k: fit_power_law(px, py, n_boot=0) for k, (px, py) in points.items()}
    fig = plots.scaling_fit_figure("C", points, fits, "val_loss")
    assert _overlapping_labels(fig) == []


def _curve_rows(first: float, final: float, steps: int = 40) -> list[dict]:
    rows = [{"step": s, "tokens": 1000 * s, "loss": final + (first - final) * np.exp(-s / 3)}
            for s in range(1, steps + 1)]
    return rows + [{"step": steps, "tokens": 1000 * steps, "final": True, "val_loss": final}]


def test_loss_curves_use_a_log_axis_clipped_to_where_the_runs_differ():
    def record(run: str, kind: str, n: float) -> RunRecord:
        return RunRecord(run=run, kind=kind, size="s", n_params=n, tokens=4e4, flops=1e12, train_loss=4.0,
                         val_loss=4.0, finished=True)

    curves = {"ebt-s": (record("ebt-s", "ebt", 1e5), _curve_rows(38.0, 5.5)),
              "tpp-s": (record("tpp-s", "transformer", 1e5), _curve_rows(9.0, 4.0))}
    ax = plots.loss_curves_figure(curves).axes[0]
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log"
    assert high < 30 and low <= 4.0 and high >= 5.5  # first EBT steps clipped; every final loss in view
    # Final losses 4 and 5.5 are a visible fraction of the axis (they were ~4% of a linear 0-38 axis).
    assert (np.log(5.5) - np.log(4.0)) / (np.log(high) - np.log(low)) > 0.2
    assert "clipped" in ax.get_title() and "clipped" in plots.CAPTIONS["loss_curves"]


def _record(n_params: float, seed: int, val_loss: float) -> RunRecord:
    return RunRecord(run=f"ebt-{n_params:g}-s{seed}", kind="ebt", size="", n_params=n_params, tokens=1e6, flops=1.0,
                     train_loss=val_loss, val_loss=val_loss, finished=True, seed=str(seed), budget_tokens=1e6)


def test_falls_with_size_averages_the_seeds_of_a_size():
    from eval.report import _falls_with_size

    # Two sizes x two seeds: each seed falls with size, but seed 1 of the small size is below seed 0 of the large
    # one. Comparing single runs in size order (as before) read this as "does not fall".
    falls = [_record(1e5, 0, 5.0), _record(1e5, 1, 5.3), _record(2e5, 0, 4.9), _record(2e5, 1, 5.2)]
    assert _falls_with_size(falls, "ebt", "val_loss") is True
    # The larger size's mean above the smaller one's: it does not fall, whichever seeds are compared.
    rises = [_record(1e5, 0, 5.0), _record(1e5, 1, 5.3), _record(2e5, 0, 4.95), _record(2e5, 1, 5.4)]
    assert _falls_with_size(rises, "ebt", "val_loss") is False
    assert _falls_with_size(falls[:2], "ebt", "val_loss") is None  # one size: nothing to order
