"""Held-out metrics for routers: per-model AUC / Brier / ECE and RouteLLM's strong-vs-weak routing curve."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def ece(probs: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: bin-weighted |mean prediction - mean score| over equal-width bins."""
    p, s = np.asarray(probs, float), np.asarray(scores, float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(p[sel].mean() - s[sel].mean())
    return float(total / max(len(p), 1))


def model_metrics(probs: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC (labels binarised at 0.5; None with one class), Brier and ECE on the rows that have a label."""
    p, s = np.asarray(probs, float), np.asarray(scores, float)
    has = np.isfinite(s)
    p, s = p[has], s[has]
    y = (s >= 0.5).astype(int)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
    return {
        "auc": auc,
        "brier": float(np.mean((p - s) ** 2)) if len(s) else None,
        "ece": ece(p, s) if len(s) else None,
        "n": int(len(s)),
    }


def routing_curve(
    probs: np.ndarray, scores: np.ndarray, strong: int, weak: int, points: int = 21
) -> list[tuple[float, float]]:
    """(share of calls sent to the strong model, mean score) as the threshold on p_strong - p_weak sweeps.

    Shares are exact quantiles 0..1 (the calls with the largest gap go strong first); calls tied on the gap are
    split evenly in expectation, so a text-blind router traces the random-assignment diagonal.
    """
    p, s = np.asarray(probs, float), np.asarray(scores, float)
    rows = np.isfinite(s[:, strong]) & np.isfinite(s[:, weak])
    gap = p[rows, strong] - p[rows, weak]
    ss, sw = s[rows, strong], s[rows, weak]
    n = len(gap)
    if n == 0:
        return []
    order = np.argsort(-gap, kind="stable")
    gain = (ss - sw)[order]
    g_sorted = gap[order]
    # Replace each tied group's gains by their mean: expected value under random tie-breaking.
    _, start, counts = np.unique(-g_sorted, return_index=True, return_counts=True)
    for a, c in zip(start, counts):
        if c > 1:
            gain[a : a + c] = gain[a : a + c].mean()
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    base = sw.sum()
    curve = []
    for q in np.linspace(0.0, 1.0, points):
        k = int(round(q * n))
        curve.append((k / n, float((base + cum[k]) / n)))
    return curve


def oracle_curve(scores: np.ndarray, strong: int, weak: int, points: int = 21) -> list[tuple[float, float]]:
    """The routing curve of a router that knows the labels (an upper bound)."""
    s = np.asarray(scores, float)
    return routing_curve(np.nan_to_num(s), s, strong, weak, points)


def area_under_routing_curve(curve: Sequence[tuple[float, float]]) -> float:
    """Mean accuracy over strong-call shares (trapezoid over the share axis, normalised by its span)."""
    x = np.array([c[0] for c in curve])
    y = np.array([c[1] for c in curve])
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean()) if len(y) else float("nan")
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def _col(models: Sequence[str], m: int | str) -> int:
    return m if isinstance(m, (int, np.integer)) else list(models).index(m)


def evaluate_routers(
    routers: Mapping[str, Any],
    texts: Sequence[str],
    kinds: Sequence[str] | None,
    scores: np.ndarray,
    models: Sequence[str],
    strong: int | str,
    weak: int | str,
    points: int = 21,
) -> dict[str, Any]:
    """Per-router per-model metrics plus routing curve, its area and APGR (share of the weak->strong gap recovered)."""
    scores = np.asarray(scores, float)
    si, wi = _col(models, strong), _col(models, weak)
    both = np.isfinite(scores[:, si]) & np.isfinite(scores[:, wi])
    acc_s, acc_w = float(scores[both, si].mean()), float(scores[both, wi].mean())
    oracle_area = area_under_routing_curve(oracle_curve(scores, si, wi, points))
    table: dict[str, Any] = {
        "models": list(models), "strong": models[si], "weak": models[wi], "n": int(len(texts)),
        "n_pair": int(both.sum()), "strong_acc": acc_s, "weak_acc": acc_w, "oracle_area": oracle_area,
        "routers": {},
    }
    for name, router in routers.items():
        probs = router.predict_proba(list(texts), kinds=kinds, models=list(models))
        curve = routing_curve(probs, scores, si, wi, points)
        area = area_under_routing_curve(curve)
        table["routers"][name] = {
            "per_model": {m: model_metrics(probs[:, j], scores[:, j]) for j, m in enumerate(models)},
            "routing_curve": curve,
            "area": area,
            "apgr": float((area - acc_w) / (acc_s - acc_w)) if acc_s != acc_w else None,
            "lift_over_random": float(area - (acc_s + acc_w) / 2),  # the random diagonal's area
        }
    return table


def to_markdown(table: Mapping[str, Any], models: Sequence[str] | None = None) -> str:
    """The evaluate_routers result as two markdown tables (per-model metrics; routing area)."""
    models = list(models or table["models"])
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| router | model | AUC | Brier | ECE | n |", "|---|---|---|---|---|---|"]
    for name, r in table["routers"].items():
        for m in models:
            pm = r["per_model"][m]
            lines.append(f"| {name} | {m} | {f(pm['auc'])} | {f(pm['brier'])} | {f(pm['ece'])} | {pm['n']} |")
    lines += ["", f"routing {table['strong']} (strong, {table['strong_acc']:.3f}) vs {table['weak']} "
              f"(weak, {table['weak_acc']:.3f}); oracle area {table['oracle_area']:.3f}", "",
              "| router | area | APGR |", "|---|---|---|"]
    for name, r in table["routers"].items():
        lines.append(f"| {name} | {r['area']:.4f} | {f(r['apgr'])} |")
    return "\n".join(lines)


__all__ = [
    "area_under_routing_curve", "ece", "evaluate_routers", "model_metrics", "oracle_curve", "routing_curve",
    "to_markdown",
]
