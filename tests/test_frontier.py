"""Frontier metrics of a λ sweep (chimera.bench.frontier) on a synthetic table."""

import pytest

from chimera.bench.frontier import family_metrics, frontier, frontier_markdown


def row(policy, acc, lat, lam=None, load=0.8, workload="w"):
    return {"workload": workload, "load": load, "policy": policy, "lam": lam, "accuracy": acc,
            "latency_s": {"mean": lat}}


TABLE = [
    row("vllm", 0.40, 10.0),
    row("least-loaded", 0.38, 8.0),
    # honest: λ small = accurate and slow, λ large = fast
    row("chimera", 0.55, 14.0, 0.01),
    row("chimera", 0.50, 9.5, 0.05),   # best accuracy at latency <= vllm's: +10 pts
    row("chimera", 0.42, 6.0, 0.2),    # best speed-up at accuracy >= vllm's: 10/6
    row("chimera", 0.35, 5.0, 0.5),    # fastest: 2x vllm, 1.6x least-loaded, but less accurate
    row("chimera+oracle", 0.70, 5.0, 0.05),
    row("chimera+oracle", 0.60, 4.0, 0.5),
    row("chimera-oracle", 0.99, 1.0, 0.05),  # the preset: ignored when the swept oracle is there
    row("chimera+oracle-scores", 0.65, 12.0, 0.05),
    row("chimera+oracle-scores", 0.39, 7.0, 0.5),
    row("chimera-no-load", 0.9, 1.0, 0.05),  # an ablation: not a family
]


def by_family(entries):
    return {e["family"]: e for e in entries}


def test_honest_family_sides_and_latency_end():
    e = by_family(frontier(TABLE))["chimera"]
    assert e["role"] == "honest" and e["runs"] == 4
    assert e["best_acc_gain_pts"] == pytest.approx(10.0) and e["best_acc_gain_lam"] == 0.05
    assert e["best_speedup"] == pytest.approx(10 / 6) and e["best_speedup_lam"] == 0.2
    assert e["fastest_lam"] == 0.5
    assert e["fastest_speedup"] == pytest.approx(2.0)
    assert e["fastest_vs_least_loaded"] == pytest.approx(1.6)
    assert e["fastest_acc_gain_pts"] == pytest.approx(-5.0)


def test_oracle_headroom_captured():
    fam = by_family(frontier(TABLE))
    assert "chimera-oracle" not in fam  # the swept oracle wins over the preset
    o = fam["chimera+oracle"]
    assert o["role"] == "oracle" and o["captured_acc"] is None
    assert o["best_acc_gain_pts"] == pytest.approx(30.0) and o["best_speedup"] == pytest.approx(2.5)
    h = fam["chimera"]
    assert h["captured_acc"] == pytest.approx(10 / 30)
    assert h["captured_speed"] == pytest.approx((10 / 6 - 1) / 1.5)
    p = fam["chimera+oracle-scores"]
    assert p["role"] == "partial-oracle"
    assert p["best_acc_gain_pts"] == pytest.approx(-1.0)  # the only λ at latency <= vllm's loses a point
    assert p["best_speedup"] == pytest.approx(10 / 12)  # the only λ at accuracy >= vllm's is slower
    assert "chimera-no-load" not in fam


def test_preset_oracle_used_when_no_sweep_and_missing_sides():
    rows = [row("vllm", 0.5, 10.0), row("chimera", 0.4, 12.0, 0.1), row("chimera-oracle", 0.8, 5.0, 0.05)]
    fam = by_family(frontier(rows))
    assert fam["chimera-oracle"]["role"] == "oracle"
    h = fam["chimera"]
    assert h["best_acc_gain_pts"] is None and h["best_speedup"] is None
    assert h["fastest_vs_least_loaded"] is None  # no least-loaded run
    assert h["captured_acc"] is None
    md = frontier_markdown(frontier(rows))
    assert "| w | 0.8 | chimera | - | - |" in md


def test_groups_by_workload_and_load_and_needs_vllm():
    rows = TABLE + [row("vllm", 0.4, 10.0, load=0.5), row("chimera", 0.45, 9.0, 0.1, load=0.5),
                    row("chimera", 0.45, 9.0, 0.1, workload="other")]  # no vllm for "other": skipped
    entries = frontier(rows)
    assert {(e["workload"], e["load"]) for e in entries} == {("w", 0.8), ("w", 0.5)}
    e = next(e for e in entries if e["load"] == 0.5)
    assert e["best_acc_gain_pts"] == pytest.approx(5.0) and e["best_speedup"] == pytest.approx(10 / 9)


def test_family_metrics_ties_at_the_baseline_count():
    base = row("vllm", 0.4, 10.0)
    m = family_metrics([row("chimera", 0.4, 10.0, 0.1)], base)
    assert m["best_acc_gain_pts"] == pytest.approx(0.0) and m["best_speedup"] == pytest.approx(1.0)
