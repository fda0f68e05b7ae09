"""Held-out metrics of a regression model (e.g. roof slope in degrees), against a naive baseline.

A mean absolute error means little on its own: 6° is good if slopes vary by
30°, useless if they are all 35 ± 5°. So every figure comes with the same
figure for the baseline that always predicts the training mean, and R² says
which share of the held-out variance the model explains.

Framework-free (numpy only).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def regression_metrics(y_true: Any, y_pred: Any, train_mean: float) -> dict[str, float | int]:
    """MAE, RMSE and R² of ``y_pred`` against ``y_true`` on the held-out split, and the mean baseline's MAE, RMSE.

    - ``mae``, ``rmse``: mean absolute and root mean squared error, in the unit of the target;
    - ``r2``: 1 − SSE / SST with SST the spread of the held-out values around
      their own mean (so predicting the held-out mean scores 0, anything worse
      is negative, a perfect predictor 1);
    - ``baseline_mae``, ``baseline_rmse``: the same errors for always predicting
      ``train_mean`` (the mean of the training targets: what a model that learnt
      nothing from the chips would say);
    - ``n_val``: the number of pairs measured; ``n_nonfinite``: pairs dropped
      because the truth or the prediction is NaN or infinite.

    All plain Python floats and ints, JSON-serialisable. Where a value is
    undefined it is 0.0, never NaN: every error with no samples, ``r2`` when the
    held-out values are all equal (SST = 0), and the baseline's errors when
    ``train_mean`` is not finite (e.g. no training samples).
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true values but {len(p)} predictions")
    keep = np.isfinite(t) & np.isfinite(p)
    t, p = t[keep], p[keep]
    n = len(t)
    out: dict[str, float | int] = {
        "mae": 0.0,
        "rmse": 0.0,
        "r2": 0.0,
        "baseline_mae": 0.0,
        "baseline_rmse": 0.0,
        "n_val": int(n),
        "n_nonfinite": int((~keep).sum()),
    }
    if n == 0:
        return out
    err = p - t
    sse = float(np.sum(err**2))
    sst = float(np.sum((t - t.mean()) ** 2))
    out["mae"] = float(np.mean(np.abs(err)))
    out["rmse"] = math.sqrt(sse / n)
    out["r2"] = 1.0 - sse / sst if np.ptp(t) > 0 and sst > 0 else 0.0  # equal values: round-off SST
    if train_mean is not None and math.isfinite(train_mean):
        base = t - float(train_mean)
        out["baseline_mae"] = float(np.mean(np.abs(base)))
        out["baseline_rmse"] = math.sqrt(float(np.mean(base**2)))
    return out
