"""`chimera tune`: choose chimera's parameters for one workload on one cluster in the simulator.

The held-out tasks (those the predictors never saw) are cut in two halves: every candidate (a grid of chimera
parameters × λ) runs on the *tuning* half, the pick is made there against `vllm`, and the pick is then run on the
*check* half beside `vllm`, `least-loaded` and chimera's defaults picked the same way, so the figure reported for
it comes from tasks that chose nothing. The pick is written as a gateway `policy:` block.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chimera.bench.frontier import pick
from chimera.bench.sweep import capacity_workflows_per_s
from chimera.perfmodel.profiles import ClusterConfig
from chimera.sim.experiment import Prepared, prepare, run_policy
from chimera.workload.schema import Task

POLICY = "chimera"
BASELINES = ("vllm", "least-loaded")


class TuneSpec(BaseModel):
    """What `chimera tune` searches; checked against the policy's own parameters before anything runs."""

    model_config = ConfigDict(extra="forbid")

    # latency: fastest at accuracy ≥ vllm's | accuracy: most accurate at latency ≤ vllm's | fastest: the latency end,
    # accuracy unconstrained (reported)
    target: Literal["latency", "accuracy", "fastest"] = "latency"
    load: float = Field(default=0.8, gt=0)  # fraction of the throughput round-robin sustains when saturated
    lams: list[float] = Field(default_factory=lambda: [0.5, 2.0, 10.0, 20.0], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # chimera parameter -> the values to try
    fixed: dict[str, Any] = Field(default_factory=dict)  # chimera parameters every candidate has
    tasks: int = Field(default=1500, ge=10)  # workflows per run, on each half
    seed: int = 0
    length_stat: Literal["mean", "median"] = "mean"  # how the policy reads the trained length forest

    @field_validator("grid")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if key == "lam":
                raise ValueError("grid: set λ with lams, not grid.lam")
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
        return v


def candidates(spec: TuneSpec) -> list[dict[str, Any]]:
    """Every combination of the grid's values with the fixed parameters, at every λ (grid order, λ innermost)."""
    keys = list(spec.grid)
    out = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        for lam in spec.lams:
            out.append({**spec.fixed, **dict(zip(keys, combo)), "lam": lam})
    return out


def check_spec(spec: TuneSpec) -> None:
    """Build the policy once per candidate, so an unknown key or a bad value fails before any run (named)."""
    from chimera.sched.registry import make_policy

    if "lam" in spec.fixed:
        raise ValueError("fixed: set λ with lams, not fixed.lam")
    for params in candidates(spec) + [{"lam": lam} for lam in spec.lams]:
        make_policy(POLICY, **params)


def build_spec(grid: Iterable[str] = (), fixed: Iterable[str] = (), **fields: Any) -> TuneSpec:
    """A checked spec from command-line values: `grid` as KEY=V1,V2,… (`--grid`) and `fixed` as KEY=VALUE (`--set`)
    strings; a bad pair, key or value fails here, naming it, before anything runs."""
    from chimera.util.keyvalue import parse_pairs, parse_value_lists

    spec = TuneSpec(grid=parse_value_lists(grid, "--grid"), fixed=parse_pairs(fixed, "--set"), **fields)
    check_spec(spec)
    return spec


def halves(prep: Prepared) -> tuple[Prepared, Prepared]:
    """(tuning, check): the held-out tasks alternately, so both halves span the workload's task order."""
    if len(prep.test) < 2:
        raise ValueError(f"tune needs at least 2 held-out tasks to cut in halves, got {len(prep.test)}")
    return dataclasses.replace(prep, test=prep.test[::2]), dataclasses.replace(prep, test=prep.test[1::2])


def count_runs(spec: TuneSpec) -> int:
    """Runs `run_tune` makes: baselines and defaults on the tuning half, the candidates, then four checks."""
    return len(BASELINES) + len(spec.lams) + len(candidates(spec)) + len(BASELINES) + 2


def run_tune(workload_name: str, tasks: Sequence[Task], cluster: ClusterConfig, spec: TuneSpec, predictors=None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Search on the tuning half, check on the other; returns {"spec", "rate", "tuning", "check", "pick",
    "default_pick", "policy", "length_stat"} (rows are `run_policy` summaries with their `params`; `length_stat`
    is the forest reading the pick was made under, None without trained predictors)."""
    check_spec(spec)
    prep = prepare(tasks, cluster, seed=spec.seed, predictors=predictors, length_stat=spec.length_stat)
    cap = capacity_workflows_per_s(prep)
    rate = spec.load * cap
    tune_prep, check_prep = halves(prep)
    tune_wfs, check_wfs = tune_prep.workflows(spec.tasks, spec.seed), check_prep.workflows(spec.tasks, spec.seed)

    def run(p: Prepared, wfs: list, policy: str, params: dict[str, Any]) -> dict:
        res = run_policy(p, policy, rate=rate, seed=spec.seed, workflows=wfs, **params)
        res["params"] = {k: v for k, v in params.items() if k != "lam"}
        if progress:
            progress(1)
        return res

    base_tune = {b: run(tune_prep, tune_wfs, b, {}) for b in BASELINES}
    defaults = [run(tune_prep, tune_wfs, POLICY, {"lam": lam}) for lam in spec.lams]
    tried = [run(tune_prep, tune_wfs, POLICY, c) for c in candidates(spec)]
    chosen = pick(tried, base_tune["vllm"], spec.target)
    default_chosen = pick(defaults, base_tune["vllm"], spec.target)
    check = {b: run(check_prep, check_wfs, b, {}) for b in BASELINES}
    for label, row in (("tuned", chosen), ("defaults", default_chosen)):
        if row is not None:
            check[label] = run(check_prep, check_wfs, POLICY, {**row["params"], "lam": row["lam"]})
        elif progress:
            progress(1)
    policy = None if chosen is None else {"name": POLICY, "lam": chosen["lam"], **chosen["params"]}
    for r in [*base_tune.values(), *defaults, *tried, *check.values()]:
        r.update(workload=workload_name, load=spec.load, capacity_wps=cap)
    return {"spec": spec.model_dump(), "rate": rate, "tuning": {"baselines": base_tune, "defaults": defaults,
                                                                "candidates": tried},
            "check": check, "pick": chosen, "default_pick": default_chosen, "policy": policy,
            "length_stat": spec.length_stat if predictors is not None else None}


def _cell(r: dict | None, base: dict | None = None) -> str:
    if r is None:
        return "-"
    lat, acc = float(r["latency_s"]["mean"]), 100 * float(r["accuracy"])
    if base is None:
        return f"{lat:.2f} s / {acc:.1f}%"
    b_lat, b_acc = float(base["latency_s"]["mean"]), 100 * float(base["accuracy"])
    return f"{lat:.2f} s / {acc:.1f}% ({b_lat / lat:.2f}×, {acc - b_acc:+.1f} pts)"


def _params(r: dict) -> str:
    items = {"lam": r["lam"], **r["params"]}
    return ", ".join(f"{k}={v}" for k, v in items.items())


def markdown(res: dict[str, Any]) -> str:
    """The tuning half's candidates (pick marked), then the check half: the pick against the baselines and defaults."""
    spec, tun, chk = res["spec"], res["tuning"], res["check"]
    goal = {"latency": "fastest at accuracy ≥ vllm's", "accuracy": "most accurate at latency ≤ vllm's",
            "fastest": "fastest, accuracy unconstrained"}[spec["target"]]
    lines = [f"Target: {goal}; load {spec['load']:g} ({res['rate']:.2f} workflows/s), {spec['tasks']} workflows per "
             f"run, seed {spec['seed']} (simulated).", "",
             "**Tuning half** (mean latency / accuracy; vs vllm on the same half):", "",
             "| candidate | result | picked |", "|---|---|---|"]
    base = tun["baselines"]["vllm"]
    for name, r in tun["baselines"].items():
        lines.append(f"| {name} | {_cell(r)} | |")
    for label, rows, chosen in (("defaults", tun["defaults"], res["default_pick"]),
                                ("", tun["candidates"], res["pick"])):
        for r in rows:
            mark = "**pick**" if r is chosen else ""
            lines.append(f"| chimera {label + ' ' if label else ''}{_params(r)} | {_cell(r, base)} | {mark} |")
    lines += ["", "**Check half** (tasks the tuning did not see; ratios against vllm and least-loaded):", "",
              "| run | parameters | result vs vllm | speed vs least-loaded |", "|---|---|---|---|"]
    cb, ll = chk["vllm"], chk["least-loaded"]
    for label in ("vllm", "least-loaded", "defaults", "tuned"):
        r = chk.get(label)
        if r is None:
            lines.append(f"| {label} | no candidate met the target on the tuning half | - | - |")
            continue
        params = _params(r) if label in ("defaults", "tuned") else ""
        speed = float(ll["latency_s"]["mean"]) / float(r["latency_s"]["mean"])
        lines.append(f"| {label} | {params} | {_cell(r, cb)} | {speed:.2f}× |")
    return "\n".join(lines) + "\n"


def policy_yaml(policy: dict[str, Any] | None, length_stat: str | None = None) -> str:
    """The pick as a gateway config's `policy:` block; tuned with trained predictors, also the `length_stat:` it
    was tuned under, so the gateway reads its forest the same way (docs/gateway.md)."""
    import yaml

    if policy is None:
        return "# no candidate met the target on the tuning half\n"
    doc = {"length_stat": length_stat} if length_stat else {}
    return yaml.safe_dump({**doc, "policy": policy}, sort_keys=False)


def write_results(res: dict[str, Any], out: Path) -> tuple[str, str]:
    """results.md, results.json and policy.yaml (the pick as a gateway `policy:` block) in `out`; returns the
    markdown and the block."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    block = policy_yaml(res["policy"], res["length_stat"])
    (out / "policy.yaml").write_text(block)
    return md, block
