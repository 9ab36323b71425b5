"""Power-law fits: recovery, calibrated bootstrap intervals, robustness and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from eval.scaling import compare_rates, compare_slopes, fit_loglog_slope, fit_power_law

E_TRUE, A_TRUE, ALPHA_TRUE = 1.8, 400.0, 0.34


def synthetic(n: int, seed: int, sigma: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Losses from known (E, A, alpha) with multiplicative log-normal noise, 1e6..1e9 parameters."""
    x = np.geomspace(1e6, 1e9, n)
    rng = np.random.default_rng(1000 + seed)
    return x, (E_TRUE + A_TRUE * x**-ALPHA_TRUE) * np.exp(rng.normal(0.0, sigma, n))


def test_noise_free_fit_recovers_all_parameters():
    x, _ = synthetic(8, 0)
    y = E_TRUE + A_TRUE * x**-ALPHA_TRUE
    fit = fit_power_law(x, y, n_boot=0)
    assert fit.alpha == pytest.approx(ALPHA_TRUE, rel=1e-3)
    assert fit.E == pytest.approx(E_TRUE, rel=1e-3)
    assert fit.A == pytest.approx(A_TRUE, rel=2e-2)
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-4)


def test_alpha_within_reported_ci_in_at_least_90_percent_of_50_trials():
    hits = 0
    for seed in range(50):
        x, y = synthetic(8, seed)
        fit = fit_power_law(x, y, n_boot=120, seed=seed)
        lo, hi = fit.alpha_ci
        assert lo < fit.alpha < hi
        hits += lo <= ALPHA_TRUE <= hi
    assert hits >= 45, f"alpha inside its 95% CI in only {hits}/50 trials"


def test_ci_width_shrinks_as_points_are_added():
    def median_width(n: int) -> float:
        widths = []
        for seed in range(5):
            x, y = synthetic(n, seed)
            lo, hi = fit_power_law(x, y, n_boot=100, seed=seed).alpha_ci
            widths.append(hi - lo)
        return float(np.median(widths))

    w5, w8, w16 = median_width(5), median_width(8), median_width(16)
    assert w5 > w8 > w16, (w5, w8, w16)


def test_fit_is_deterministic_for_a_seed():
    x, y = synthetic(6, 3)
    a, b = fit_power_law(x, y, n_boot=50, seed=7), fit_power_law(x, y, n_boot=50, seed=7)
    assert a.alpha_ci == b.alpha_ci and a.E_ci == b.E_ci
    np.testing.assert_array_equal(a.boot, b.boot)


def test_huber_loss_shrugs_off_one_diverged_run():
    x, y = synthetic(8, 1, sigma=0.002)
    y_bad = y.copy()
    y_bad[5] *= 1.3  # one run that partly diverged
    robust = fit_power_law(x, y_bad, n_boot=0)
    least_squares = fit_power_law(x, y_bad, n_boot=0, delta=10.0)
    assert abs(robust.alpha - ALPHA_TRUE) < 0.02
    assert abs(least_squares.alpha - ALPHA_TRUE) > 2 * abs(robust.alpha - ALPHA_TRUE)


def test_three_points_fit_without_interval():
    x, y = synthetic(3, 0)
    fit = fit_power_law(x, y, n_boot=50)
    assert fit.n_boot == 0 and np.isnan(fit.alpha_ci[0])


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([1e6, 1e7], [3.0, 2.5], "need at least 3 distinct x values"),
        ([1e6, 1e6, 1e6, 1e7], [3.0, 3.1, 2.9, 2.5], "need at least 3 distinct x values"),
        ([1e6, 1e7, 1e8], [3.0, float("nan"), 2.2], "point 1 is not finite and positive"),
        ([1e6, 1e7, 1e8], [3.0, float("inf"), 2.2], "point 1 is not finite and positive"),
        ([1e6, 0.0, 1e8], [3.0, 2.5, 2.2], "point 1 is not finite and positive"),
    ],
)
def test_bad_points_raise_one_line_errors_naming_the_fit(x, y, message):
    with pytest.raises(ValueError, match=f"ebt/N: {message}"):
        fit_power_law(np.array(x), np.array(y), label="ebt/N")


def test_rate_comparison_reports_relative_difference_with_ci():
    x = np.geomspace(1e6, 1e9, 8)
    rng = np.random.default_rng(0)
    fast = fit_power_law(x, (1.5 + 900 * x**-0.40) * np.exp(rng.normal(0, 0.005, 8)), n_boot=100, seed=1)
    slow = fit_power_law(x, (1.5 + 300 * x**-0.30) * np.exp(rng.normal(0, 0.005, 8)), n_boot=100, seed=2)
    cmp = compare_rates(fast, slow, "N")
    assert cmp.rel_diff == pytest.approx(fast.alpha / slow.alpha - 1)
    assert cmp.ci[0] < cmp.rel_diff < cmp.ci[1]
    assert cmp.ci[0] < 0.4 / 0.3 - 1 < cmp.ci[1]
    assert cmp.prob_ebt_faster > 0.9


def test_loglog_slope_is_exact_on_a_pure_power_law_and_calibrated_with_noise():
    x = np.geomspace(1e6, 1e9, 6)
    exact = fit_loglog_slope(x, 50.0 * x**-0.2, n_boot=0)
    assert exact.slope == pytest.approx(0.2, rel=1e-12)
    hits = 0
    for seed in range(100):  # closed form: cheap enough for 100 trials
        rng = np.random.default_rng(seed)
        fit = fit_loglog_slope(x, 50.0 * x**-0.2 * np.exp(rng.normal(0, 0.02, 6)), n_boot=2000, seed=seed)
        hits += fit.slope_ci[0] <= 0.2 <= fit.slope_ci[1]
    assert hits >= 90, hits
    fast = fit_loglog_slope(x, 50.0 * x**-0.3, n_boot=50)
    cmp = compare_slopes(fast, exact_with_boot := fit_loglog_slope(x, 50.0 * x**-0.2, n_boot=50), "N")
    assert cmp.rel_diff == pytest.approx(0.5, rel=1e-9) and exact_with_boot.n_boot == 50
