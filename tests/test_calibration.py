"""Calibration (temperature scaling, ECE, reliability), regression metrics, and their figures.

The classification data are drawn from a known model: labels sampled from
softmax(z), so the logits z are calibrated by construction, z × 3 over-confident
(true temperature 3) and z / 2 under-confident (0.5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ops.ml.calibration import (
    Calibration,
    calibrate,
    cross_fit_halves,
    expected_calibration_error,
    fit_temperature,
    reliability,
    softmax,
)
from ops.ml.regression_metrics import regression_metrics


def draw(n: int, k: int = 5, scale: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated logits (n, k), labels drawn from their softmax, and 40 cells as groups."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, k))
    y = (softmax(z).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y, rng.integers(0, 40, n)


# --- temperature -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_t", [3.0, 1.0, 0.5])
def test_fit_temperature_recovers_the_true_temperature(true_t):
    z, y, _ = draw(20_000)
    t = fit_temperature(z * true_t, y)
    assert t == pytest.approx(true_t, rel=0.06)


def test_fit_temperature_is_the_nll_minimum_on_a_grid():
    z, y, _ = draw(3_000, seed=4)
    logits = z * 2.2

    def nll(t: float) -> float:
        p = softmax(logits, t)
        return float(-np.mean(np.log(p[np.arange(len(y)), y])))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([nll(t) for t in grid])]
    t = fit_temperature(logits, y)
    assert t == pytest.approx(best, rel=2e-3)
    assert nll(t) <= nll(best) + 1e-9


def test_fit_temperature_edges():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
    assert fit_temperature(np.zeros((0, 0)), []) == 1.0  # what predict_logits returns for no chips
    assert fit_temperature(np.ones((7, 3)), np.arange(7) % 3) == 1.0  # nothing to scale
    # every sample right with a margin: the likelihood wants ever sharper scores, T stops at the bound
    z = np.eye(3)[np.arange(30) % 3] * 5
    assert fit_temperature(z, np.arange(30) % 3) == pytest.approx(0.05, rel=1e-3)
    # everything wrong: ever flatter scores, the upper bound
    assert fit_temperature(z, (np.arange(30) + 1) % 3) == pytest.approx(20.0, rel=1e-3)
    z, y, _ = draw(1_000)
    assert fit_temperature(z * 3, y) == fit_temperature(z * 3, y)  # deterministic
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(ValueError, match="index"):
        fit_temperature(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((2, 3)), [0])


def test_binary_logits_in_one_column_are_sigmoid_logits():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, 20_000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(int)
    assert fit_temperature(z * 3, y) == pytest.approx(3.0, rel=0.08)
    p = softmax(z)
    assert np.allclose(p[:, 1], 1 / (1 + np.exp(-z)))
    assert expected_calibration_error(p[:, 1], y) == pytest.approx(expected_calibration_error(p, y))


def test_temperature_keeps_the_predicted_class():
    z, _, _ = draw(5_000, k=7)
    for t in (0.05, 0.3, 1.0, 2.9, 20.0):
        assert (softmax(z, t).argmax(axis=1) == z.argmax(axis=1)).all()
    with pytest.raises(ValueError):
        softmax(z, 0.0)


# --- ECE and reliability -----------------------------------------------------------------------------------------


def test_ece_by_hand():
    # confidence 1.0 and right half the time: ECE 0.5
    probs = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(probs, np.arange(10) % 2) == pytest.approx(0.5)
    # two bins: 0.95 right 3/4 (gap 0.2, weight 4/6), 0.65 right 1/2 (gap 0.15, weight 2/6)
    probs = np.array([[0.95, 0.05]] * 4 + [[0.35, 0.65]] * 2)
    y = np.array([0, 0, 0, 1, 1, 0])
    assert expected_calibration_error(probs, y) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.15)
    assert expected_calibration_error(np.zeros((0, 2)), []) == 0.0
    table = reliability(probs, y)
    assert table["count"][9] == 4 and table["count"][6] == 2
    assert table["confidence"][9] == pytest.approx(0.95) and table["accuracy"][9] == pytest.approx(0.75)
    assert table["accuracy"][0] is None and table["confidence"][0] is None
    assert table["lower"][9] == pytest.approx(0.9) and table["upper"][9] == pytest.approx(1.0)


def test_ece_is_small_for_calibrated_and_large_for_overconfident_scores():
    z, y, _ = draw(20_000)
    assert expected_calibration_error(softmax(z), y) < 0.015
    assert expected_calibration_error(softmax(z * 3), y) > 0.1


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_reliability_counts_sum_to_n_and_the_table_gives_the_ece(n_bins):
    z, y, _ = draw(2_345, seed=7)
    p = softmax(z * 2)
    table = reliability(p, y, n_bins)
    assert all(len(v) == n_bins for v in table.values())
    assert sum(table["count"]) == len(y)
    implied = sum(
        c * abs(a - f) for c, a, f in zip(table["count"], table["accuracy"], table["confidence"], strict=True) if c
    ) / len(y)
    assert implied == pytest.approx(expected_calibration_error(p, y, n_bins))
    json.dumps(table, allow_nan=False)


# --- calibrate: cross-fitted -------------------------------------------------------------------------------------


def right_count(table: dict) -> float:
    return sum(c * a for c, a in zip(table["count"], table["accuracy"], strict=True) if c)


def test_calibrate_overconfident_logits():
    z, y, g = draw(20_000)
    cal = calibrate(z * 3, y, g)
    assert isinstance(cal, Calibration)
    assert cal.temperature > 2.5
    assert cal.ece_before > 0.1
    assert cal.ece_after < 0.03 and cal.ece_after < cal.ece_before / 4
    assert cal.n == len(y) and cal.cross_fit == "by group"
    assert len(cal.fold_temperatures) == 2 and all(t > 2.5 for t in cal.fold_temperatures)
    assert sum(cal.reliability_before["count"]) == sum(cal.reliability_after["count"]) == len(y)
    # scaling moves scores, never the predicted class: as many right before as after
    assert right_count(cal.reliability_after) == pytest.approx(right_count(cal.reliability_before))
    assert right_count(cal.reliability_before) == pytest.approx(float((z.argmax(1) == y).sum()))


def test_calibrate_calibrated_logits_changes_little():
    z, y, g = draw(20_000, seed=1)
    cal = calibrate(z, y, g)
    assert cal.temperature == pytest.approx(1.0, abs=0.06)
    assert cal.ece_after <= cal.ece_before + 0.01


def test_calibrate_underconfident_logits():
    z, y, g = draw(20_000, seed=2)
    cal = calibrate(z / 2, y, g)
    assert cal.temperature < 0.6
    assert cal.ece_after < cal.ece_before


def test_ece_after_is_out_of_fold():
    """The cross-fitted ECE is that of each half scored with the other half's temperature."""
    z, y, g = draw(4_000, seed=5)
    cal = calibrate(z * 3, y, g, seed=3)
    first = cross_fit_halves(g, len(y), seed=3)
    probs = np.zeros_like(z)
    for half in (first, ~first):
        probs[half] = softmax(z[half] * 3, fit_temperature(z[~half] * 3, y[~half]))
    assert cal.ece_after == pytest.approx(expected_calibration_error(probs, y))
    in_sample = expected_calibration_error(softmax(z * 3, cal.temperature), y)
    assert cal.ece_after != pytest.approx(in_sample, abs=1e-9)


def test_cross_fit_halves_keep_groups_whole_and_balanced():
    rng = np.random.default_rng(0)
    g = np.array([f"cell{c}" for c in rng.integers(0, 30, 5_000)])
    first = cross_fit_halves(g, len(g), seed=0)
    for cell in set(g.tolist()):
        assert len(set(first[g == cell].tolist())) == 1, f"{cell} is split across the halves"
    assert 0.4 < first.mean() < 0.6
    assert (cross_fit_halves(g, len(g), seed=0) == first).all()
    assert not (cross_fit_halves(g, len(g), seed=1) == first).all()
    # too few groups: a per-sample split, both halves non-empty
    few = cross_fit_halves(np.array([1, 2, 3] * 10), 30, seed=0)
    assert few.sum() == 15
    assert len(set(few[np.array([1, 2, 3] * 10) == 1].tolist())) == 2
    assert cross_fit_halves(None, 5, seed=0).sum() == 3
    z, y, _ = draw(300)
    assert calibrate(z, y, np.zeros(300)).cross_fit == "per sample"
    with pytest.raises(ValueError):
        cross_fit_halves(np.arange(3), 4)


def test_calibrate_small_and_empty_inputs_are_json():
    empty = calibrate(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))
    assert empty.temperature == 1.0 and empty.ece_before == 0.0 and empty.ece_after == 0.0 and empty.n == 0
    one = calibrate(np.array([[2.0, 0.0, -1.0]]), [0], ["a"])
    assert one.n == 1 and one.ece_after == pytest.approx(one.ece_before)  # nothing to cross-fit against
    z, y, g = draw(500)
    for cal in (empty, one, calibrate(z * 3, y, g)):
        card = json.loads(json.dumps(cal.to_card(), allow_nan=False))
        assert {"temperature", "ece_before", "ece_after", "n", "reliability_before", "reliability_after"} <= set(card)
        assert sum(card["reliability_after"]["count"]) == cal.n


def test_calibrate_is_fast_enough_for_100k_by_10():
    z, y, g = draw(100_000, k=10, seed=6)
    cal = calibrate(z * 3, y, g)
    assert cal.temperature == pytest.approx(3.0, rel=0.03)


# --- regression --------------------------------------------------------------------------------------------------


def test_regression_metrics_match_numpy():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 60, 1_000)
    p = t + rng.normal(0, 5, t.size)
    m = regression_metrics(t, p, train_mean=31.0)
    assert m["mae"] == pytest.approx(np.mean(np.abs(p - t)))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)))
    assert m["r2"] == pytest.approx(1 - np.sum((p - t) ** 2) / np.sum((t - t.mean()) ** 2))
    assert m["baseline_mae"] == pytest.approx(np.mean(np.abs(t - 31.0)))
    assert m["baseline_rmse"] == pytest.approx(np.sqrt(np.mean((t - 31.0) ** 2)))
    assert m["n_val"] == 1_000 and m["n_nonfinite"] == 0
    assert m["mae"] < m["baseline_mae"] and 0.8 < m["r2"] < 1
    assert all(type(v) in (float, int) for v in m.values())


def test_regression_metrics_perfect_and_mean_predictors():
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 60, 500)
    perfect = regression_metrics(t, t.copy(), train_mean=float(t.mean()))
    assert perfect["r2"] == 1.0 and perfect["mae"] == 0.0 and perfect["rmse"] == 0.0
    mean = regression_metrics(t, np.full_like(t, t.mean()), train_mean=float(t.mean()))
    assert mean["r2"] == pytest.approx(0.0, abs=1e-12)
    assert mean["mae"] == pytest.approx(mean["baseline_mae"])
    assert mean["rmse"] == pytest.approx(mean["baseline_rmse"])


def test_regression_metrics_undefined_values_are_zero_not_nan():
    empty = regression_metrics([], [], train_mean=10.0)
    assert empty == {
        "mae": 0.0,
        "rmse": 0.0,
        "r2": 0.0,
        "baseline_mae": 0.0,
        "baseline_rmse": 0.0,
        "n_val": 0,
        "n_nonfinite": 0,
    }
    const = regression_metrics([0.1] * 5, [0.3] * 5, train_mean=0.2)
    assert const["r2"] == 0.0 and const["mae"] == pytest.approx(0.2) and const["baseline_mae"] == pytest.approx(0.1)
    no_train = regression_metrics([1.0, 2.0], [1.0, 3.0], train_mean=float("nan"))
    assert no_train["baseline_mae"] == 0.0 and no_train["mae"] == pytest.approx(0.5)
    bad = regression_metrics([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, np.inf, 5.0], train_mean=2.0)
    assert bad["n_val"] == 2 and bad["n_nonfinite"] == 2 and bad["mae"] == pytest.approx(0.5)
    for m in (empty, const, no_train, bad):
        json.dumps(m, allow_nan=False)
    with pytest.raises(ValueError):
        regression_metrics([1.0, 2.0], [1.0], train_mean=0.0)


# --- figures -----------------------------------------------------------------------------------------------------


def is_png_markdown(value) -> bool:
    return value.value.startswith("![preview](data:image/png;base64,") and len(value.value) > 500


def test_reliability_figure_renders():
    from assets.metadata import png_markdown, reliability_figure

    z, y, g = draw(3_000)
    cal = calibrate(z * 3, y, g)
    fig = reliability_figure(
        cal.reliability_before, cal.reliability_after, "roof_type", ece_before=cal.ece_before, ece_after=cal.ece_after
    )
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(f"{cal.ece_before:.3f}" in s for s in labels) and any(f"{cal.ece_after:.3f}" in s for s in labels)
    assert is_png_markdown(png_markdown(fig))
    # ECEs implied by the tables when not given
    fig = reliability_figure(cal.reliability_before, cal.reliability_after, "roof_type")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(f"{cal.ece_before:.3f}" in s for s in labels)
    assert is_png_markdown(png_markdown(fig))
    for small in (calibrate(np.zeros((0, 3)), [], []), calibrate(np.array([[1.0, 0.0]]), [1], [0])):
        assert is_png_markdown(png_markdown(reliability_figure(small.reliability_before, small.reliability_after, "")))
    assert is_png_markdown(png_markdown(reliability_figure({}, {}, "nothing")))


def test_predicted_vs_true_figure_renders():
    from assets.metadata import png_markdown, predicted_vs_true_figure

    rng = np.random.default_rng(0)
    t = rng.uniform(0, 60, 12_000)
    p = t + rng.normal(0, 4, t.size)
    fig = predicted_vs_true_figure(t, p, "°", "roof slope")
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 5_000
    assert "°" in ax.get_xlabel() and "°" in ax.get_ylabel()
    labels = " ".join(x.get_text() for x in ax.get_legend().get_texts())
    m = regression_metrics(t, p, 0.0)
    assert f"{m['r2']:.3f}" in labels and "MAE" in labels
    assert is_png_markdown(png_markdown(fig))
    for tt, pp in (([], []), ([35.0], [30.0]), ([np.nan, 2.0], [1.0, 2.0])):
        assert is_png_markdown(png_markdown(predicted_vs_true_figure(tt, pp, "°", "slope")))
