"""`chimera eval predictors`: the router against RouteLLM-style baselines, the forest against length baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from chimera.train.predictors import TrainingData, length_rows, score_matrix, strong_weak  # noqa: E402
from chimera.util.figures import save_figure

Progress = Callable[[str], None]


def evaluate_predictors(
    data: TrainingData,
    encoders: Sequence[str] = ("hashing", "minilm"),
    strong: str | None = None,
    weak: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Fit every router and length model on the training split; measure all on the held-out split."""
    from chimera.predict.length import WorkflowLengthForest
    from chimera.train.length_baselines import PairwiseRanker, StageMeanBaseline
    from chimera.train.length_eval import evaluate_length_models
    from chimera.predict.router import SemanticRouter
    from chimera.train.router_baselines import KnnRouter, MatrixFactorizationRouter, PriorRouter, RandomRouter
    from chimera.train.router_eval import evaluate_routers

    say = progress or (lambda _m: None)
    train_scores = score_matrix(data.train, data.models)
    s_default, w_default = strong_weak(train_scores, data.models)
    strong, weak = strong or s_default, weak or w_default
    for m in (strong, weak):
        if m not in data.models:
            raise ValueError(f"model {m!r} is not in the workload; it has {data.models}")
    routers = {}
    for enc in encoders:
        routers[f"chimera-router ({enc})"] = SemanticRouter(encoder=enc, random_state=seed)
    routers["knn (hashing)"] = KnnRouter(encoder="hashing")
    routers["mf (hashing)"] = MatrixFactorizationRouter(encoder="hashing")
    routers["per-kind prior"] = PriorRouter()
    routers["random"] = RandomRouter(seed=seed)
    texts = [t.prompt for t in data.train]
    kinds = [t.kind for t in data.train]
    for name, r in routers.items():
        say(f"fitting {name}")
        r.fit(texts, train_scores, data.models, kinds)
    say("scoring routers on held-out tasks")
    router_table = evaluate_routers(routers, [t.prompt for t in data.test], [t.kind for t in data.test],
                                    score_matrix(data.test, data.models), data.models, strong=strong, weak=weak)
    say("building length rows")
    rows, call_t, rem_t = length_rows(data.train, seed)
    trows, _, trem = length_rows(data.test, seed + 1)
    lengths = {
        "forest (text)": WorkflowLengthForest(random_state=seed),
        "forest (no text)": WorkflowLengthForest(text_dim=0, random_state=seed),
        "per-stage mean": StageMeanBaseline(),
        "pairwise ranker (LTR-style)": PairwiseRanker(random_state=seed),
    }
    for name, m in lengths.items():
        say(f"fitting {name}")
        m.fit(rows, call_t, rem_t)
    length_table = evaluate_length_models(lengths, trows, trem)
    return {"workloads": data.workloads, "train_tasks": len(data.train), "test_tasks": len(data.test),
            "router": router_table, "length": length_table}


def routing_curve_plot(result: dict, out: str | Path) -> Path:
    """Accuracy vs share of calls sent to the strong model, one line per router (RouteLLM's plot)."""
    table = result["router"]
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for name, r in table["routers"].items():
        xs, ys = zip(*r["routing_curve"]) if r["routing_curve"] else ((), ())
        ax.plot([100 * x for x in xs], [100 * y for y in ys], marker=".", label=f"{name} (area {r['area']:.3f})",
                linewidth=2 if name.startswith("chimera") else 1)
    ax.set_xlabel(f"share of calls to {table['strong']} (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{', '.join(result['workloads'])}: {table['strong']} vs {table['weak']} "
                 f"(held-out, {table['n_pair']} tasks)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def evaluation_markdown(result: dict) -> str:
    """The report of `evaluate_predictors`: the split, then the router table and the remaining-tokens table."""
    from chimera.train.length_eval import format_table
    from chimera.train.router_eval import to_markdown

    return (f"{', '.join(result['workloads'])}: {result['train_tasks']} training / {result['test_tasks']} held-out "
            f"tasks\n\n### Router\n\n{to_markdown(result['router'])}\n\n### Remaining workflow tokens\n\n"
            f"{format_table(result['length'])}\n")


def write_evaluation(result: dict, out: str | Path) -> tuple[str, Path]:
    """results.md, results.json and routing.png in `out`; returns the markdown and the plot's path."""
    import json

    from chimera.util.jsonable import jsonable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = evaluation_markdown(result)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(jsonable(result), indent=1))
    return md, routing_curve_plot(result, out / "routing.png")
