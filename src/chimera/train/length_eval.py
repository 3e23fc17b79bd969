"""Held-out metrics for length predictors: token error, ranking quality (what shortest-job-first needs), and
calibration of the predicted quantiles (what congestion estimates need)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau

from chimera.predict.length_features import LengthRow

INTERVAL = (0.1, 0.9)


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error in tokens."""
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(y, float))))


def median_relative_error(y: np.ndarray, pred: np.ndarray) -> float:
    """Median of |pred - y| / y (robust to the few huge workflows that dominate MAPE)."""
    y = np.asarray(y, float)
    return float(np.median(np.abs(np.asarray(pred, float) - y) / np.maximum(y, 1.0)))


def mape(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean of |pred - y| / y."""
    y = np.asarray(y, float)
    return float(np.mean(np.abs(np.asarray(pred, float) - y) / np.maximum(y, 1.0)))


def kendall_tau(y: np.ndarray, pred: np.ndarray) -> float:
    """Kendall's tau-b; 0 when either side is constant (a constant predictor cannot order anything)."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return 0.0
    return float(kendalltau(y, pred).statistic)


def grouped_tau(y: np.ndarray, pred: np.ndarray, groups: Sequence[Hashable]) -> float:
    """Size-weighted mean Kendall tau within groups (e.g. stage): orders among calls the scheduler compares."""
    idx: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        idx[g].append(i)
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    num = den = 0.0
    for members in idx.values():
        if len(members) < 2:
            continue
        m = np.asarray(members)
        num += kendall_tau(y[m], pred[m]) * len(m)
        den += len(m)
    return num / den if den else 0.0


def coverage(y: np.ndarray, upper: np.ndarray, lower: np.ndarray | None = None) -> float:
    """Share of true values <= upper (and >= lower when given)."""
    y = np.asarray(y, float)
    ok = y <= np.asarray(upper, float)
    if lower is not None:
        ok &= y >= np.asarray(lower, float)
    return float(np.mean(ok))


def evaluate_length_models(models: Mapping[str, Any], rows: Sequence[LengthRow], targets: Sequence[float],
                           interval: tuple[float, float] = INTERVAL) -> dict[str, dict[str, float | None]]:
    """Per model: mae, median_rel_err, tau, tau_within_stage, tau_stage0 (at arrival, before any output: the
    honest hard case; later stages partly follow from generated_so_far), cov_hi (share <= the interval's upper
    quantile) and cov_interval. Rank-only models (`rank_only = True`) get None for token metrics; models whose `predict` takes
    no quantiles get None for coverage. JSON-friendly."""
    y = np.asarray(targets, float)
    stages = [r.stage for r in rows]
    first = np.array([s == 0 for s in stages], bool)
    out: dict[str, dict[str, float | None]] = {}
    for name, model in models.items():
        pred = np.asarray(model.predict(rows), float)
        rank_only = bool(getattr(model, "rank_only", False))
        res: dict[str, float | None] = {
            "mae": None if rank_only else mae(y, pred),
            "median_rel_err": None if rank_only else median_relative_error(y, pred),
            "tau": kendall_tau(y, pred),
            "tau_within_stage": grouped_tau(y, pred, stages),
            "tau_stage0": kendall_tau(y[first], pred[first]),
            "cov_hi": None,
            "cov_interval": None,
        }
        if not rank_only:
            try:
                lohi = np.asarray(model.predict(rows, quantiles=list(interval)), float)
            except TypeError:  # predict without a quantiles argument
                lohi = None
            if lohi is not None:
                res["cov_hi"] = coverage(y, lohi[:, 1])
                res["cov_interval"] = coverage(y, lohi[:, 1], lohi[:, 0])
        out[name] = res
    return out


def format_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """Markdown table of `evaluate_length_models` output."""
    cols = ["mae", "median_rel_err", "tau", "tau_within_stage", "tau_stage0", "cov_hi", "cov_interval"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        cells = ["—" if res.get(c) is None else (f"{res[c]:.1f}" if c == "mae" else f"{res[c]:.3f}") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
