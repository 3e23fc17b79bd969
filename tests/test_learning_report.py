"""The learning-curve report of a sweep: which runs learn, their last window against the trained predictors' frontier
at equal latency, and the plot."""

from __future__ import annotations

from chimera.bench.learning import learning_markdown, learning_plot, verdict


def run(policy: str, lam: float | None, windows: list[tuple[float, float, float]]) -> dict:
    return {"workload": "w", "load": 0.7, "policy": policy, "lam": lam,
            "windows": [{"start": 500 * i, "workflows": 500, "accuracy": a, "latency_mean_s": lat, "exploration": e}
                        for i, (a, lat, e) in enumerate(windows)]}


ROWS = [
    run("vllm", None, [(0.44, 5.0, 0.0), (0.45, 5.5, 0.0)]),
    # the trained predictors' λ sweep: (latency, accuracy) of the last windows 4.0→0.47, 4.5→0.50, and a dominated
    # point (slower and worse) that the frontier ignores
    run("chimera", 0.1, [(0.49, 4.2, 0.0), (0.47, 4.0, 0.0)]),
    run("chimera", 0.05, [(0.50, 4.6, 0.0), (0.50, 4.5, 0.0)]),
    run("chimera", 0.5, [(0.40, 4.3, 0.0), (0.40, 4.3, 0.0)]),
    run("chimera+online", 0.1, [(0.52, 5.0, 0.09), (0.49, 4.25, 0.06)]),
    run("chimera+online", 0.5, [(0.45, 5.0, 0.09), (0.35, 3.0, 0.06)]),
]


def test_verdict_compares_the_last_window_at_equal_latency_on_the_frontier():
    v = {r["lam"]: r for r in verdict(ROWS)}
    assert set(v) == {0.1, 0.5}  # only the runs that explore are learning runs
    # 4.25 s lies halfway between the frontier's 4.0 s (47%) and 4.5 s (50%): 48.5%, so the learner is +0.5 points
    assert abs(v[0.1]["reference_acc_at_latency"] - 0.485) < 1e-9
    assert abs(v[0.1]["delta_vs_reference"] - 0.005) < 1e-9
    assert v[0.1]["vllm_last"]["latency_mean_s"] == 5.5
    assert v[0.5]["reference_acc_at_latency"] is None  # faster than any trained run: nothing to compare with


def test_markdown_and_plot(tmp_path):
    md = learning_markdown(ROWS)
    assert "| w | 0.7 | chimera+online | 0.1 | 49.0% | 4.25 | 6.0% | 5.50 | 48.5% | +0.5 |" in md
    assert "52.0% / 5.00 / 9.0%" in md
    png = learning_plot(ROWS, tmp_path / "learning.png")
    assert png.stat().st_size > 10_000
