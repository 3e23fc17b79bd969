"""`chimera train` end to end on a small generated workload: fit, save, load, simulate with the artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from chimera.cli import app
from chimera.perfmodel.profiles import default_cluster
from chimera.predict.artifacts import load_predictors
from chimera.train.predictors import gather, train_predictors
from chimera.sim.experiment import prepare, run_policy
from chimera.workload.schema import write_tasks
from chimera.workload.synthetic import generate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tasks = generate(240, seed=11)
    data = gather([("synthetic", tasks)], train_frac=0.7)
    pred = train_predictors(data, encoder="hashing", train_frac=0.7, seed=0, n_estimators=30)
    out = pred.save(tmp_path_factory.mktemp("pred") / "p")
    return tasks, data, pred, out


def test_split_is_by_task_and_metrics_are_held_out(trained):
    _, data, pred, _ = trained
    assert not {t.id for t in data.train} & {t.id for t in data.test}
    assert pred.metrics["train_tasks"] == len(data.train) and pred.metrics["test_tasks"] == len(data.test)
    per_model = pred.metrics["router"]["routers"]["router"]["per_model"]
    assert set(per_model) == set(pred.models)
    assert 0.0 <= pred.metrics["length"]["forest"]["cov_hi"] <= 1.0


def test_round_trip_gives_identical_predictions(trained):
    tasks, data, pred, out = trained
    back = load_predictors(out)
    texts = [t.prompt for t in data.test[:20]]
    kinds = [t.kind for t in data.test[:20]]
    assert (back.router.predict_proba(texts, kinds, pred.models) == pred.router.predict_proba(texts, kinds, pred.models)).all()
    assert sorted(back.train_ids) == sorted(pred.train_ids)


def test_simulation_with_trained_predictors_never_tests_on_training_tasks(trained):
    tasks, data, pred, out = trained
    prep = prepare(tasks, default_cluster(), predictors=load_predictors(out))
    assert not {t.id for t in prep.test} & set(pred.train_ids)
    res = run_policy(prep, "chimera", rate=1.0, n_tasks=60, lam=0.02)
    assert res["tasks"] == 60 and res["predictors"] == "trained"
    assert res["failed"] == 0
    # the forest is read at its mean unless told otherwise, as the gateway reads it
    assert prep.trained[1].quantile == "mean"
    assert prepare(tasks, default_cluster(), predictors=load_predictors(out),
                   length_stat="median").trained[1].quantile is None
    with pytest.raises(ValueError, match="length_stat"):
        prepare(tasks, default_cluster(), predictors=load_predictors(out), length_stat="p90")


def test_cli_train_then_simulate_and_bad_artifact_errors(tmp_path):
    wl = tmp_path / "wl.jsonl"
    write_tasks(generate(150, seed=2), wl)
    runner = CliRunner()
    out = tmp_path / "pred"
    r = runner.invoke(app, ["train", "-w", str(wl), "--out", str(out), "--trees", "20"])
    assert r.exit_code == 0, r.output
    assert "held-out" in r.output and (out / "manifest.json").exists()
    js = tmp_path / "res.json"
    r = runner.invoke(app, ["simulate", "-w", str(wl), "--policy", "chimera", "--rate", "1", "--tasks", "30",
                            "--predictors", str(out), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["predictors"] == "trained"
    (out / "router.joblib").write_bytes(b"broken")
    r = runner.invoke(app, ["simulate", "-w", str(wl), "--policy", "chimera", "--predictors", str(out)])
    assert r.exit_code == 2 and "router.joblib" in r.output


def test_router_falls_back_to_prior_for_an_unknown_cluster_model(trained, recwarn):
    _, data, pred, _ = trained
    from chimera.predict.router import RouterConfidence
    from chimera.sched.types import Call

    conf = RouterConfidence(pred.router, {"new-model": "never-trained", "qwen2.5-7b": "qwen2.5-7b"})
    t = data.test[0]
    c = Call(call_id=0, workflow_id="w", kind=t.kind, prompt=t.prompt, stage=0, prompt_tokens=10, arrival_s=0.0,
             workflow_arrival_s=0.0)
    p = conf.predict_confidence([c, c])
    assert p.shape == (2, 2) and ((p >= 0) & (p <= 1)).all()
    assert sum("never-trained" in str(w.message) for w in recwarn) == 1


def test_cli_train_length_target_raw_fits_tokens_not_their_log(tmp_path):
    """--length-target raw: the forest splits on tokens (its spec says so, and it predicts otherwise than the log
    forest); an unknown value is refused by name."""
    wl = tmp_path / "wl.jsonl"
    write_tasks(generate(120, seed=4), wl)
    runner = CliRunner()
    for target in ("raw", "log"):
        r = runner.invoke(app, ["train", "-w", str(wl), "--out", str(tmp_path / target), "--trees", "10",
                                "--length-target", target])
        assert r.exit_code == 0, r.output
    raw, log = load_predictors(tmp_path / "raw").length, load_predictors(tmp_path / "log").length
    assert raw.log_target is False and raw.spec()["targets"]["transform"] == "none"
    assert log.log_target is True
    from chimera.train.predictors import length_rows

    rows, _, _ = length_rows(generate(20, seed=9), 0)
    assert not np.allclose(raw.predict(rows), log.predict(rows))
    r = runner.invoke(app, ["train", "-w", str(wl), "--out", str(tmp_path / "x"), "--length-target", "cube"])
    assert r.exit_code == 2 and "--length-target" in r.output
