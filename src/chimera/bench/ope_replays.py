"""The replays behind the replayed DR (chimera.train.ope_replay): the candidate run again on the logged traffic in a
simulated world built from the trace store alone and the cluster's engine model.

The workflows, their arrivals, calls, lengths and tool times come from the store (chimera.train.ope_world). Quality
per (prompt, model) is a reward model fit on the logged scores, its prior the logged run's learner refit on the logs
(every logged call and score through the learner's own credit rule). Each replay draws a plausible world from it (a
0/1 outcome per prompt and model, P = the reward model's value), runs the candidate on the logged arrivals, and is
read back from its own trace store as the gateway's is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from chimera.bench.sim_trace import SimTraceWriter
from chimera.perfmodel.profiles import ClusterConfig
from chimera.predict.assembly import PredictorsSpec, resolve_predictions
from chimera.sched.decision import Decision
from chimera.sched.predictors import RewardLearner
from chimera.sched.types import Call
from chimera.sim.experiment import Prepared, prepare, run_policy, workload_names
from chimera.train.ope import LoggedCalls
from chimera.train.ope_replay import ReplayedEstimate, RewardTables, replay_probabilities, replayed_dr, reward_tables
from chimera.train.ope_traces import logged_calls_from_traces
from chimera.train.ope_world import LoggedWorld, world_from_traces
from chimera.workload.templates import load_templates


def _call(logged: LoggedCalls, i: int, stage: int) -> Call:
    kind, prompt = logged.prompts[i] if logged.prompts is not None else ("", "")
    return Call(call_id=i, workflow_id=logged.workflow_ids[int(logged.workflow[i])], kind=kind, prompt=prompt,
                stage=stage, prompt_tokens=0, arrival_s=0.0, workflow_arrival_s=0.0)


def refit_prior(prep: Prepared, predictors: PredictorsSpec, logged: LoggedCalls) -> tuple[list[str], np.ndarray]:
    """(prompt key, prior row in `logged.models` order) per workflow: the runs' confidence predictor, taught every
    logged score when it learns (a predictor that does not learn gives its fixed rows)."""
    if logged.prompts is None:
        raise ValueError("the logs carry no prompts: the reward model is fit per prompt")
    conf, _ = prep.predictors_for(predictors)
    first = np.flatnonzero(np.r_[True, logged.workflow[1:] != logged.workflow[:-1]])
    if isinstance(conf, RewardLearner):
        stage = np.arange(len(logged.chosen)) - first[logged.workflow]
        for i in range(len(logged.chosen)):
            conf.decided(_call(logged, i, int(stage[i])), Decision(logged.models[logged.chosen[i]], 0.0), 0.0)
            if i + 1 == len(logged.chosen) or logged.workflow[i + 1] != logged.workflow[i]:
                conf.reward(logged.workflow_ids[int(logged.workflow[i])], float(logged.reward[logged.workflow[i]]),
                            0.0)
    rows = conf.predict_confidence([_call(logged, int(i), 0) for i in first])
    cols = [list(conf.models_).index(m) for m in logged.models]
    keys = ["\x00".join(logged.prompts[int(i)]) for i in first]
    return keys, rows[:, cols]


def draw_world(wfs: list, logged: LoggedCalls, keys: list[str], tables: RewardTables,
               rng: np.random.Generator) -> list:
    """The workflows with quality drawn from the reward model: one 0/1 outcome per (prompt, model)."""
    index = {w: i for i, w in enumerate(logged.workflow_ids)}
    draws: dict[str, np.ndarray] = {}
    out = []
    for wid, plan, prompt in wfs:
        i = index.get(wid)
        if i is None:
            raise ValueError(f"workflow {wid!r} ran but is not in the logs: the replay needs every workflow logged")
        u = draws.setdefault(keys[i], rng.random(len(logged.models)))
        scores = {m: float(u[j] < tables.full[i, j]) for j, m in enumerate(logged.models)}
        out.append((wid, plan.with_scores(scores), prompt))
    return out


def replay_candidate(prep: Prepared, logged: LoggedCalls, keys: list[str], tables: RewardTables,
                     traffic: LoggedWorld, lam: float, seed: int, predictors: PredictorsSpec, replays: int,
                     progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """`replays` runs of chimera at `lam` on the logged traffic in drawn worlds; each one's (c, M) probabilities at
    the logged calls."""
    out = []
    with tempfile.TemporaryDirectory(prefix="chimera-replay-") as tmp:
        for k in range(replays):
            rng = np.random.default_rng([seed, k, int(lam * 1e6)])
            world = draw_world(traffic.workflows, logged, keys, tables, rng)
            db = Path(tmp) / f"replay-{k}.sqlite"
            writer = SimTraceWriter(db, "chimera")
            try:
                run_policy(prep, "chimera", arrivals=traffic.arrivals, seed=seed, lam=lam, workflows=world,
                           predictions=predictors, record=writer)
            finally:
                writer.close()
            replayed, _ = logged_calls_from_traces(db)
            out.append(replay_probabilities(logged, replayed))
            if progress:
                progress(1)
    return out


def fit_reward_tables(prep: Prepared, predictors: PredictorsSpec, logged: LoggedCalls,
                      kappa: float = 0.2) -> tuple[list[str], RewardTables, dict[str, Any]]:
    """Prompt keys and reward tables of the logs, and how many prompts and (prompt, model) pairs the logs saw."""
    keys, prior = refit_prior(prep, predictors, logged)
    tables = reward_tables(logged, keys, prior, kappa)
    seen = {(keys[int(w)], int(m)) for w, m in zip(logged.workflow, logged.chosen)}
    return keys, tables, {"prompts": len(set(keys)), "pairs_seen": len(seen),
                          "pairs": len(set(keys)) * len(logged.models)}


def replay_predictors(predictions: str, learner: Mapping[str, Any] | None = None) -> PredictorsSpec:
    """The replays' predictors: `predictions` (a named set or CONFIDENCE/LENGTH) with `learner` over its confidence
    predictor's parameters (an unknown key is refused when the predictor is built, naming it)."""
    spec, _ = resolve_predictions(predictions)
    if not learner:
        return spec
    conf = spec.confidence
    return PredictorsSpec(confidence={"name": conf.name, "params": {**conf.params, **dict(learner)}},
                          length=spec.length)


def replayed_estimates(db: Path, logged: LoggedCalls, cluster: ClusterConfig, lams: Sequence[float],
                       predictors: PredictorsSpec, replays: int = 5, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95, progress: Callable[[int], None] | None = None
                       ) -> tuple[list[ReplayedEstimate], dict[str, Any]]:
    """The replayed DR of chimera at each λ on the traffic of a trace store (`logged`, read from `db`), replayed on
    `cluster` (it must serve every logged model under the logged name), and what the reward model saw."""
    missing = sorted(set(logged.models) - {m.name for m in cluster.models})
    if missing:
        raise ValueError(f"the cluster has no model {missing}: the replay runs every logged model (name each one in "
                         f"the cluster as the trace store does; it has {sorted(logged.models)})")
    templates = load_templates()
    traffic = world_from_traces(db, logged, templates)
    src = workload_names(cluster)  # the cluster maps its names to workload names (`workload_model`): key by those
    tasks = [t.model_copy(update={"outcomes": {src[m]: o for m, o in t.outcomes.items()},
                                  "stages": {src[m]: st for m, st in (t.stages or {}).items()}})
             for t in traffic.tasks]
    prep = prepare(tasks, cluster, seed=seed, train_frac=0.0, templates=templates)
    keys, tables, seen = fit_reward_tables(prep, predictors, logged)
    out = []
    for lam in lams:
        probs = replay_candidate(prep, logged, keys, tables, traffic, lam, seed, predictors, replays, progress)
        out.append(replayed_dr(logged, tables, probs, n_boot=n_boot, seed=seed, level=level))
    return out, seen
