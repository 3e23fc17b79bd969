"""`chimera tune` (chimera.bench.tune): candidates, the pick rule, the halves it tunes and checks on, the CLI."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from chimera.bench.tune import TuneSpec, candidates, check_spec, count_runs, halves, pick, policy_yaml, run_tune
from chimera.cli import app
from chimera.perfmodel.profiles import default_cluster
from chimera.serve.config import gateway_config_from_dict
from chimera.sim.experiment import prepare
from chimera.workload.synthetic import generate


def row(lat: float, acc: float, lam: float = 1.0) -> dict:
    return {"latency_s": {"mean": lat}, "accuracy": acc, "lam": lam, "params": {}}


def test_candidates_are_the_grid_times_the_lams_with_the_fixed_keys():
    spec = TuneSpec(lams=[1, 10], grid={"externality": [0, 1], "congestion": ["throughput", "batch"]},
                    fixed={"affinity": True})
    cands = candidates(spec)
    assert len(cands) == 8 and all(c["affinity"] is True for c in cands)
    assert cands[0] == {"affinity": True, "externality": 0, "congestion": "throughput", "lam": 1}
    assert cands[1]["lam"] == 10 and cands[-1] == {"affinity": True, "externality": 1, "congestion": "batch",
                                                   "lam": 10}
    assert count_runs(spec) == 2 + 2 + 8 + 2 + 2


def test_bad_parameters_are_refused_by_name_before_any_run():
    with pytest.raises(ValueError, match="externalty"):
        check_spec(TuneSpec(grid={"externalty": [1]}))
    with pytest.raises(ValueError, match="congestion"):
        check_spec(TuneSpec(grid={"congestion": ["fast"]}))
    with pytest.raises(ValueError, match="lams"):
        TuneSpec(grid={"lam": [1]})
    with pytest.raises(ValueError, match="grid.externality"):
        TuneSpec(grid={"externality": []})
    with pytest.raises(ValueError, match="fixed.lam"):
        check_spec(TuneSpec(fixed={"lam": 2}))


def test_pick_is_the_targets_best_among_the_rows_that_qualify():
    base = row(5.0, 0.50)
    rows = [row(3.0, 0.49, 1), row(3.5, 0.50, 2), row(4.0, 0.55, 3), row(6.0, 0.60, 4)]
    assert pick(rows, base, "latency")["lam"] == 2  # fastest among accuracy ≥ 0.50 (3.0 s is less accurate)
    assert pick(rows, base, "accuracy")["lam"] == 3  # most accurate among latency ≤ 5 s (6.0 s is slower)
    assert pick(rows, base, "fastest")["lam"] == 1  # the latency end, whatever its accuracy
    assert pick([row(3.0, 0.4)], base, "latency") is None and pick([row(9.0, 0.9)], base, "accuracy") is None


def test_the_halves_share_no_task():
    prep = prepare(generate(200), default_cluster(), seed=0)
    tune_half, check_half = halves(prep)
    a, b = {t.id for t in tune_half.test}, {t.id for t in check_half.test}
    assert a and b and not a & b and a | b == {t.id for t in prep.test}
    assert tune_half.train is prep.train  # the same fitted priors on both


def test_run_tune_checks_its_pick_on_the_other_half_and_writes_a_gateway_policy():
    spec = TuneSpec(target="accuracy", load=0.5, lams=[0.02, 1.0], grid={"externality": [0, 1]},
                    fixed={"congestion": "batch"}, tasks=60)
    res = run_tune("synthetic", generate(300), default_cluster(), spec)
    tun, chk = res["tuning"], res["check"]
    assert len(tun["candidates"]) == 4 and len(tun["defaults"]) == 2 and set(tun["baselines"]) == {"vllm",
                                                                                                     "least-loaded"}
    base = tun["baselines"]["vllm"]
    chosen = res["pick"]
    assert chosen is not None and chosen in tun["candidates"]  # chimera at small λ beats round-robin on accuracy
    assert chosen["latency_s"]["mean"] <= base["latency_s"]["mean"]
    assert all(r["accuracy"] <= chosen["accuracy"] for r in tun["candidates"]
               if r["latency_s"]["mean"] <= base["latency_s"]["mean"])
    assert set(chk) >= {"vllm", "least-loaded", "tuned"} and chk["tuned"]["params"] == chosen["params"]
    assert chk["tuned"]["lam"] == chosen["lam"] and chk["vllm"]["tasks"] == 60
    policy = yaml.safe_load(policy_yaml(res["policy"]))["policy"]
    assert policy["name"] == "chimera" and policy["congestion"] == "batch" and policy["lam"] == chosen["lam"]
    cfg = gateway_config_from_dict({"policy": policy, "backends": [
        {"name": "a", "model": "m", "base_url": "http://127.0.0.1:9/v1", "profile": "qwen2.5-7b@a6000"}]})
    assert cfg.policy.name == "chimera"  # the written block is a valid gateway policy
    assert res["length_stat"] is None and "length_stat" not in policy_yaml(res["policy"], res["length_stat"])


def test_a_pick_tuned_with_trained_predictors_carries_its_length_reading(synthetic_predictors):
    """The gateway must read the forest the way the pick was tuned, or it runs another policy than the one tuned."""
    from chimera.predict.artifacts import load_predictors

    spec = TuneSpec(target="fastest", load=0.5, lams=[1.0], grid={"externality": [0, 1]}, tasks=40,
                    length_stat="median")
    res = run_tune("synthetic", generate(240, seed=11), default_cluster(), spec,
                   predictors=load_predictors(synthetic_predictors))
    assert res["length_stat"] == "median" and res["check"]["tuned"]["predictors"] == "trained"
    block = yaml.safe_load(policy_yaml(res["policy"], res["length_stat"]))
    assert block["length_stat"] == "median"
    cfg = gateway_config_from_dict({**block, "predictors": str(synthetic_predictors), "backends": [
        {"name": "a", "model": "qwen2.5-7b", "base_url": "http://127.0.0.1:9/v1"}]})
    assert cfg.length_stat == "median" and cfg.policy.lam == res["policy"]["lam"]


def test_tune_cli_errors_name_the_bad_part(tmp_path):
    r = CliRunner().invoke(app, ["tune", "--grid", "externalty=0,1", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "externalty" in r.output
    r = CliRunner().invoke(app, ["tune", "--grid", "externality", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "KEY=V1,V2" in r.output
    r = CliRunner().invoke(app, ["tune", "--target", "speed", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "target" in r.output
    r = CliRunner().invoke(app, ["tune", "--help"])
    assert r.exit_code == 0 and "Example: chimera tune" in r.output
