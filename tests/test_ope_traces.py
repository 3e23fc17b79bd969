"""The routing columns of the trace store, read back for off-policy evaluation: round trip, old stores, the reader's
errors, `chimera eval traces`, and `chimera simulate --trace` writing a store that OPE reads."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from chimera.cli import app
from chimera.sched.decision import Decision
from chimera.serve.records import routing_columns
from chimera.serve.trace import CALL_COLUMNS, TraceStore
from chimera.train.from_traces import TraceStoreError
from chimera.train.ope_traces import logged_calls_from_traces

MODELS = ("small", "big")
NEW = ("propensity", "explored", "epsilon", "terms", "weights", "predictor_version")


def _flat(out: str) -> str:
    return " ".join(out.split())


def decision(model: str, eps: float, explored: bool, conf: dict[str, float], lat: dict[str, float],
             lam: float = 0.1) -> Decision:
    greedy = max(MODELS, key=lambda m: conf[m] - lam * lat[m])
    p = eps / 2 + (1 - eps) * (model == greedy)
    return Decision(model, 0.0, confidences=conf, propensity=p, explored=explored, epsilon=eps,
                    terms={"confidence_share": conf, "expected_latency": lat},
                    weights={"confidence_share": 1.0, "expected_latency": -lam})


def write_logged(path, n: int = 400, seed: int = 0, lam: float = 0.1, eps: float = 0.3, scored: bool = True) -> None:
    """n one-call workflows routed ε-greedily between 'small' and 'big', as the gateway writes them."""
    rng = np.random.default_rng(seed)
    store = TraceStore(path)
    for i in range(n):
        conf = {"small": float(rng.uniform(0.2, 0.6)), "big": float(rng.uniform(0.4, 0.9))}
        lat = {"small": float(rng.uniform(0.5, 1.5)), "big": float(rng.uniform(1.0, 4.0))}
        greedy = max(MODELS, key=lambda m: conf[m] - lam * lat[m])
        explored = bool(rng.random() < eps)
        model = str(rng.choice(MODELS)) if explored else greedy
        d = decision(model, eps, explored, conf, lat, lam)
        store.log_call({"workflow_id": f"wf-{i}", "stage": 0, "call_id": f"c-{i}", "model": model, "status": "ok",
                        "prompt_tokens": 10, "completion_tokens": 5 + i % 3, "confidences": conf, "policy": "chimera",
                        "kind": "qa", "prompt": f"question {i % 7}",
                        "predictor_version": "v1", **routing_columns(d)})
        if scored:
            store.log_feedback(f"wf-{i}", float(rng.random() < conf[model]), at=float(i))
    store.close()


def test_routing_columns_round_trip(tmp_path):
    path = tmp_path / "t.sqlite"
    write_logged(path, n=3)
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute(f"SELECT {', '.join(NEW)}, model, confidences FROM calls ORDER BY rowid")]
    db.close()
    for r in rows:
        assert 0 < r["propensity"] <= 1 and r["explored"] in (0, 1) and r["epsilon"] == 0.3
        terms, weights = json.loads(r["terms"]), json.loads(r["weights"])
        assert set(terms) == {"confidence_share", "expected_latency"} and set(terms["expected_latency"]) == set(MODELS)
        assert terms["confidence_share"] == json.loads(r["confidences"])
        assert weights == {"confidence_share": 1.0, "expected_latency": -0.1} and r["predictor_version"] == "v1"
    assert routing_columns(None) == {k: None for k in NEW if k != "predictor_version"}


def test_an_old_store_gets_the_routing_columns_and_the_reader_says_what_is_missing(tmp_path):
    path = tmp_path / "old.sqlite"
    cols = [c for c in CALL_COLUMNS if c not in NEW]
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE calls ({', '.join(cols)})")
    db.execute("CREATE TABLE feedback (workflow_id TEXT, score REAL, at REAL)")
    db.execute("INSERT INTO calls (workflow_id, stage, model, status) VALUES ('w', 0, 'small', 'ok')")
    db.execute("INSERT INTO feedback VALUES ('w', 1.0, 0)")
    db.commit()
    db.close()
    with pytest.raises(TraceStoreError, match=r"old.sqlite: this trace store has no propensity, .* column\(s\).*"
                                              r"chimera simulate --predictions online \.\.\. --trace DB"):
        logged_calls_from_traces(path)
    store = TraceStore(path)  # the gateway's store adds them on open; old rows keep NULL
    store.log_call({"workflow_id": "w2", "stage": 0, "model": "big", "status": "ok", "propensity": 0.9,
                    "explored": False, "epsilon": 0.1, "predictor_version": "3"})
    rows = store.query(f"SELECT workflow_id, {', '.join(NEW)} FROM calls ORDER BY rowid")
    store.close()
    assert rows == [{"workflow_id": "w", **{k: None for k in NEW}},
                    {"workflow_id": "w2", "propensity": 0.9, "explored": 0, "epsilon": 0.1, "terms": None,
                     "weights": None, "predictor_version": "3"}]
    with pytest.raises(TraceStoreError, match="none of the 1 scored workflows has logged propensities"):
        logged_calls_from_traces(path)  # w has feedback but no propensity; w2 has no feedback


def test_the_reader_builds_the_logged_calls_and_counts_skips(tmp_path):
    path = tmp_path / "t.sqlite"
    write_logged(path, n=50)
    store = TraceStore(path)
    store.log_call({"workflow_id": "bad-terms", "stage": 0, "model": "big", "status": "ok", "propensity": 0.5,
                    "terms": {"confidence_share": {"small": 0.1}}, "weights": {"confidence_share": 1.0}})
    store.log_feedback("bad-terms", 1.0)
    store.log_call({"workflow_id": "unscored", "stage": 0, "model": "big", "status": "ok", "propensity": 0.5})
    store.log_call({"workflow_id": "pinned", "stage": 0, "model": "small", "status": "ok", "propensity": 1.0})
    store.log_feedback("pinned", 2.0)  # out of range
    store.close()
    logs, st = logged_calls_from_traces(path)
    assert logs.n == st["used"] == 50 and st["skipped_bad_row"] == 1 and st["skipped_no_feedback"] == 1
    assert st["skipped_bad_score"] == 1 and st["routed_calls"] == 50 and st["forced_calls"] == 0
    assert logs.models == ["small", "big"]  # the policy's order, from the terms
    assert set(logs.terms) == {"confidence_share", "expected_latency"}
    assert np.all(logs.weights["expected_latency"] == -0.1)
    # what the replayed DR's reward model reads: each call's prompt and output tokens
    at = [logs.workflow_ids.index(f"wf-{i}") for i in range(8)]  # one call per workflow: call i is workflow i's
    assert [logs.prompts[i] for i in at] == [("qa", f"question {i % 7}") for i in range(8)]
    assert [logs.tokens[i] for i in at] == [5, 6, 7, 5, 6, 7, 5, 6]


def test_the_reader_refuses_a_store_without_feedback(tmp_path):
    path = tmp_path / "t.sqlite"
    write_logged(path, n=5, scored=False)
    with pytest.raises(TraceStoreError, match="no workflow has a feedback score: post each workflow's score"):
        logged_calls_from_traces(path)


def test_cli_eval_traces(tmp_path):
    path = tmp_path / "t.sqlite"
    write_logged(path, n=600)
    out = tmp_path / "ope.json"
    r = CliRunner().invoke(app, ["eval", "traces", str(path), "--lam", "0.1", "--lam", "1.0", "--boot", "200",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    text = _flat(r.output)
    assert "600 of 600 traced workflows used" in text and "chimera λ=0.1" in text and "chimera λ=1" in text
    assert "re-choose the logged model on 100.0%" in text
    doc = json.loads(out.read_text())
    assert doc["workflows"] == 600 and [c["label"] for c in doc["candidates"]] == ["chimera λ=0.1", "chimera λ=1"]
    same = doc["candidates"][0]
    assert same["ess"] == pytest.approx(600) and same["ips"]["value"] == pytest.approx(doc["logged"]["value"])


def test_cli_eval_traces_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "traces", str(tmp_path / "missing.sqlite")])
    assert r.exit_code == 2 and "missing.sqlite" in r.output and "not found" in _flat(r.output)
    path = tmp_path / "t.sqlite"
    write_logged(path, n=20)
    r = runner.invoke(app, ["eval", "traces", str(path), "--policy", "vllm"])
    assert r.exit_code == 2 and "--policy 'vllm' cannot be evaluated from traces; only chimera" in _flat(r.output)
    r = runner.invoke(app, ["eval", "traces", str(path), "--lam", "-1"])
    assert r.exit_code == 2 and "--lam must be >= 0" in _flat(r.output)
    plain = tmp_path / "plain.sqlite"  # a gateway store from a policy without exploration: propensity 1, no terms
    store = TraceStore(plain)
    store.log_call({"workflow_id": "w", "stage": 0, "model": "big", "status": "ok",
                    **routing_columns(Decision("big", 0.0))})
    store.log_feedback("w", 1.0)
    store.close()
    r = runner.invoke(app, ["eval", "traces", str(plain), "--lam", "0.1"])
    assert r.exit_code == 2 and "no routed call" in _flat(r.output)


def test_simulate_trace_writes_a_store_that_ope_reads(tmp_path):
    db = tmp_path / "sim.sqlite"
    cluster = tmp_path / "cluster.yaml"  # served names other than the workload's, as a deployment's often are
    cluster.write_text("models:\n" + "".join(f"  - {{profile: {m}@a6000, name: {n}, workload_model: {m}}}\n"
                                             for n, m in (("small", "qwen2.5-1.5b"), ("mid", "qwen2.5-7b"),
                                                          ("big", "qwen2.5-14b"))))
    args = ["simulate", "-w", "synthetic:80", "-c", str(cluster), "--predictions", "online", "--rate", "2",
            "--tasks", "150", "--lam", "0.05", "--trace", str(db)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "0 dropped" in _flat(r.output)
    logs, st = logged_calls_from_traces(db)
    assert st["workflows"] == st["used"] == 150 and st["explored_calls"] > 0 and st["forced_calls"] == 0
    assert np.all((logs.propensity > 0) & (logs.propensity <= 1)) and np.all(logs.epsilon > 0)
    db_ = sqlite3.connect(db)
    calls, ok = db_.execute("SELECT count(*), sum(status = 'ok') FROM calls").fetchone()
    db_.close()
    assert calls == ok == len(logs.chosen)
    r = CliRunner().invoke(app, args)  # a store holds one run
    assert r.exit_code == 2 and "the trace file exists" in _flat(r.output)
    # the replayed DR from the same store, on the cluster it ran on
    out = tmp_path / "ope.json"
    r = CliRunner().invoke(app, ["eval", "traces", str(db), "--lam", "0.02", "--cluster", str(cluster), "--replays",
                                 "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "DR replayed" in r.output and "pairs over" in _flat(r.output)
    res = json.loads(out.read_text())
    [rep] = res["replayed"]
    assert rep["replays"] == 2 and rep["low"] <= rep["value"] <= rep["high"] and 0 <= rep["direct"] <= 1
    assert res["reward_model"]["pairs_seen"] <= res["reward_model"]["pairs"]
    r = CliRunner().invoke(app, ["eval", "traces", str(db), "--cluster", str(cluster)])
    assert r.exit_code == 2 and "give at least one --lam" in _flat(r.output)
    cluster.write_text("models:\n  - {profile: qwen2.5-7b@a6000, name: mid}\n")
    r = CliRunner().invoke(app, ["eval", "traces", str(db), "--lam", "0.02", "--cluster", str(cluster)])
    assert r.exit_code == 2 and "the cluster has no model ['big', 'small']" in _flat(r.output)


def test_bench_ope_checks_estimates_against_the_candidates_runs(tmp_path):
    out = tmp_path / "ope"
    r = CliRunner().invoke(app, ["bench", "ope", "-w", "synthetic:60", "--lam", "0.02", "--candidates", "0.01,0.05",
                                 "--tasks", "150", "--seeds", "0", "--replays", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    [run] = res["runs"]
    assert run["replay"] == 1.0 and run["trace"]["dropped"] == 0 and (out / "trace-0.sqlite").exists()
    assert [row["lam"] for row in run["rows"]] == [0.01, 0.05]
    for row in run["rows"]:
        for name in ("dr_replayed", "dr", "dr_additive"):
            est = row[name]
            assert est["low"] <= est["value"] <= est["high"]
            assert est["error_pts"] == pytest.approx(100 * (est["value"] - row["accuracy"]))
            assert est["covered"] == (est["low"] <= row["accuracy"] <= est["high"])
        rep = row["dr_replayed"]
        assert rep["replays"] == 2 and rep["value"] == pytest.approx(rep["direct"] + rep["correction"])
    assert res["passed"] == run["passed"] == all(r["dr_replayed"]["covered"] and r["dr_replayed"]["within"]
                                                 for r in run["rows"])
    assert 0 < run["reward_model"]["pairs_seen"] <= run["reward_model"]["pairs"]
    assert [s["lam"] for s in res["summary"]] == [0.01, 0.05] and res["summary"][0]["runs"] == 1
    md = (out / "results.md").read_text()
    assert "| seed | logged accuracy | candidate λ | simulated accuracy | DR replayed |" in md
    assert "Logged runs whose every replayed DR is within 3 points and covers: " in md and "Check (every seed)" in md
    r = CliRunner().invoke(app, ["bench", "ope", "--candidates", "-1", "--out", str(out)])
    assert r.exit_code == 2 and "--candidates must be one or more λ ≥ 0" in _flat(r.output)
    r = CliRunner().invoke(app, ["bench", "ope", "--replays", "0", "--out", str(out)])
    assert r.exit_code == 2 and "--replays" in _flat(r.output)


def test_bench_ope_sets_the_learners_parameters(tmp_path):
    out = tmp_path / "ope"
    r = CliRunner().invoke(app, ["bench", "ope", "-w", "synthetic:60", "--lam", "0.02", "--candidates", "0.05",
                                 "--tasks", "150", "--learner", "explore_min=0.3", "--learner", "budget=0.3",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    # exploration held at its 30% floor: the logged run explored about 30% of its calls
    assert min(res["runs"][0]["logged"]["exploration"]) > 0.2
    assert "--learner explore_min=0.3 --learner budget=0.3" in (out / "results.md").read_text()
    r = CliRunner().invoke(app, ["bench", "ope", "--learner", "explore=0.1", "--out", str(out)])
    assert r.exit_code == 2 and "explore" in _flat(r.output) and "no parameter" in _flat(r.output)
