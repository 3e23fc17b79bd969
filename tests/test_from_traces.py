"""The learning loop: gateway trace store (written through TraceStore) -> Tasks -> `chimera train --traces`."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from chimera.cli import app
from chimera.predict.artifacts import load_predictors
from chimera.train.from_traces import MAX_IPS_WEIGHT, TraceStoreError, tasks_from_traces
from chimera.serve.trace import CALL_COLUMNS, TraceStore

N_WF = 120  # enough for a router head per model (SemanticRouter.min_labels = 30 training rows)
NO_FEEDBACK = {f"wf-{i:03d}" for i in range(0, N_WF, 10)}  # 12 workflows the client never scored
MIXED = {f"wf-{i:03d}" for i in range(3, N_WF, 10)}  # stage 1 ran on the other model (most tokens there)
TOPICS = ("algebra proof", "poem about rivers", "sql query tuning", "translate french")


def _plan(i: int) -> tuple[str, list[tuple[str, int, int]], float]:
    """(kind, [(model, prompt_tokens, completion_tokens) per stage], score) of workflow i."""
    big = i % 2 == 0
    model, other = ("big", "small") if big else ("small", "big")
    n = 2 + i % 2  # 2 or 3 stages
    stages = []
    for s in range(n):
        m = other if (f"wf-{i:03d}" in MIXED and s == 1) else model
        out = 400 if m != model else (50 + 10 * s + i)  # the mixed stage produces most of the tokens
        stages.append((m, 100 + 30 * s, out))
    topic = (i // 2) % 4
    score = (0.9, 0.6, 0.9, 0.7)[topic] if big else (0.1, 0.8, 0.3, 0.7)[topic]
    return ("math" if i % 3 == 0 else "chat"), stages, score


@pytest.fixture(scope="module")
def trace_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "trace.sqlite"
    store = TraceStore(path)
    t = 1_700_000_000.0
    for i in range(N_WF):
        wid = f"wf-{i:03d}"
        kind, stages, score = _plan(i)
        for s, (m, pt, ct) in enumerate(stages):
            base = {"workflow_id": wid, "stage": s, "model": m, "backend": f"{m}-0", "prompt_tokens": pt,
                    "policy": "chimera", "kind": kind, "prompt": f"{TOPICS[(i // 2) % 4]} task {i}",
                    "confidences": {"big": 0.8, "small": 0.5}}
            if i % 7 == 0 and s == 0:  # a failed attempt, retried: must not count
                store.log_call({**base, "call_id": f"r-{i}-{s}-x", "status": "error", "error": "502",
                                "queued_at": t, "ended_at": t + 0.1})
            store.log_call({**base, "call_id": f"r-{i}-{s}", "completion_tokens": ct, "status": "ok",
                            "queued_at": t + 0.2, "dispatched_at": t + 0.2, "ended_at": t + 1.0})
            t += 1.5  # 0.5 s of client-side time between calls
        if wid not in NO_FEEDBACK:
            store.log_feedback(wid, 0.0, at=t)  # superseded by the later score
            store.log_feedback(wid, score, at=t + 1)
    store.log_feedback("wf-never-traced", 1.0, at=t + 2)
    store.close()
    return path


def test_tasks_from_traces_counts_outcomes_and_stages(trace_db):
    tasks, st = tasks_from_traces(trace_db)
    assert st["workflows"] == N_WF and st["tasks"] == len(tasks) == N_WF - len(NO_FEEDBACK)
    assert st["skipped_no_feedback"] == len(NO_FEEDBACK) and st["feedback_without_calls"] == 1
    assert st["mixed_models"] == len(MIXED) and st["missing_prompt"] == 0 and st["skipped_no_ok_calls"] == 0
    assert sum(st["tasks_per_model"].values()) == len(tasks) and set(st["tasks_per_model"]) == {"big", "small"}
    by_id = {t.id: t for t in tasks}
    assert not NO_FEEDBACK & set(by_id)
    for wid, task in by_id.items():
        i = int(wid[3:])
        kind, stages, score = _plan(i)
        [model] = task.outcomes
        served = "big" if i % 2 == 0 else "small"
        expect = ("small" if served == "big" else "big") if wid in MIXED else served
        assert model == expect, wid
        assert task.outcomes[model].score == pytest.approx(score)  # the latest feedback wins
        assert task.outcomes[model].output_tokens == sum(ct for _, _, ct in stages)
        assert [s.output_tokens for s in task.stages[model]] == [ct for _, _, ct in stages]
        assert [s.prompt_tokens for s in task.stages[model]] == [pt for _, pt, _ in stages]
        assert task.stages[model][0].tool_s == pytest.approx(0.7)  # ended 1.0, next queued at +1.5+0.2
        assert task.stages[model][-1].tool_s is None
        assert task.kind == kind and task.prompt == f"{TOPICS[(i // 2) % 4]} task {i}" and task.prompt_tokens == 100


def test_old_trace_file_gets_new_columns_and_defaults(tmp_path):
    path = tmp_path / "old.sqlite"
    cols = [c for c in CALL_COLUMNS if c not in ("kind", "prompt", "identity")]
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE calls ({', '.join(cols)})")
    db.execute("CREATE TABLE feedback (workflow_id TEXT, score REAL, at REAL)")
    db.execute("INSERT INTO calls (workflow_id, stage, model, prompt_tokens, completion_tokens, status) "
               "VALUES ('w', 0, 'm', 10, 20, 'ok')")
    db.execute("INSERT INTO feedback VALUES ('w', 1.0, 0)")
    db.commit()
    db.close()
    tasks, st = tasks_from_traces(path)  # read-only: works on the old schema
    assert [t.kind for t in tasks] == ["default"] and tasks[0].prompt == "" and st["missing_prompt"] == 1
    store = TraceStore(path)  # opening with the gateway's store adds the columns
    store.log_call({"workflow_id": "w2", "stage": 0, "model": "m", "status": "ok", "completion_tokens": 5,
                    "kind": "math", "prompt": "hi", "identity": "conversation"})
    rows = store.query("SELECT workflow_id, kind, prompt, identity FROM calls ORDER BY rowid")
    store.close()
    assert rows == [{"workflow_id": "w", "kind": None, "prompt": None, "identity": None},
                    {"workflow_id": "w2", "kind": "math", "prompt": "hi", "identity": "conversation"}]


def test_not_a_trace_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.sqlite"):
        tasks_from_traces(tmp_path / "nope.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not sqlite at all " * 100)
    with pytest.raises(TraceStoreError, match="junk.sqlite: not a trace store"):
        tasks_from_traces(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(TraceStoreError, match="other.sqlite: not a trace store .no calls or feedback table"):
        tasks_from_traces(other)


def _flat(out: str) -> str:
    return " ".join(out.split()).replace("\n", "")


def test_cli_train_from_traces(trace_db, tmp_path):
    runner = CliRunner()
    out = tmp_path / "pred"
    r = runner.invoke(app, ["train", "--traces", str(trace_db), "--out", str(out), "--trees", "10"])
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["big", "small"]
    assert f"{N_WF - len(NO_FEEDBACK)} tasks from {N_WF} traced workflows" in _flat(r.output)
    assert manifest["workloads"] == [f"traces:{trace_db}"]
    pred = load_predictors(out)
    assert all(pred.router.heads_[m] is not None for m in ("big", "small")), pred.router.skipped_
    assert pred.metrics["train_tasks"] + pred.metrics["test_tasks"] == N_WF - len(NO_FEEDBACK)


def test_cli_train_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "--workload or --traces" in _flat(r.output)
    r = runner.invoke(app, ["train", "--traces", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "missing.sqlite" in r.output.replace("\n", "") and "not found" in r.output
    bad = tmp_path / "bad.sqlite"
    bad.write_text("garbage " * 100)
    r = runner.invoke(app, ["train", "--traces", str(bad), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "not a trace store" in _flat(r.output)
    assert not (tmp_path / "p").exists()


# The synthetic workload's models and the traced ones are disjoint, so the routing-curve eval has no task labelled
# for both its strong and weak model (numpy warns on the empty mean); the training itself is what is tested here.
@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_cli_train_traces_together_with_a_workload(trace_db, tmp_path):
    from chimera.workload.schema import write_tasks
    from chimera.workload.synthetic import generate

    wl = tmp_path / "wl.jsonl"
    write_tasks(generate(60, seed=3), wl)
    out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["train", "-w", str(wl), "--traces", str(trace_db), "--out", str(out),
                                 "--trees", "10"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["workloads"] == [str(wl), f"traces:{trace_db}"]
    assert {"big", "small"} <= set(manifest["models"])


@pytest.fixture(scope="module")
def logged_db(tmp_path_factory):
    """Workflows routed between 'big' and 'small' with logged propensities; 'tiny' is served (it has a confidence)
    but never chosen. Workflow i: 2 calls; an explored call has propensity 0.05, a greedy one 0.9."""
    path = tmp_path_factory.mktemp("logged") / "trace.sqlite"
    store = TraceStore(path)
    for i in range(N_WF):
        wid = f"lg-{i:03d}"
        model = "big" if i % 3 else "small"
        explored = [i % 10 == 0, i % 40 == 0]  # 12 workflows with one explored call, 3 with two
        for s in range(2):
            store.log_call({"workflow_id": wid, "stage": s, "call_id": f"lg-{i}-{s}", "model": model,
                            "status": "ok", "prompt_tokens": 50, "completion_tokens": 20 + s, "kind": "chat",
                            "prompt": f"{TOPICS[i % 4]} question {i}", "policy": "chimera",
                            "confidences": {"big": 0.7, "small": 0.4, "tiny": 0.2},
                            "propensity": 0.05 if explored[s] else 0.9, "explored": explored[s], "epsilon": 0.1})
        store.log_feedback(wid, (0.9, 0.2, 0.7, 0.4)[i % 4] if model == "big" else (0.3, 0.6, 0.1, 0.5)[i % 4])
    store.close()
    return path


def test_traced_workflows_are_weighted_by_inverse_propensity(logged_db):
    tasks, st = tasks_from_traces(logged_db)
    weights = {t.id: t.weight for t in tasks}
    assert weights["lg-001"] == pytest.approx(1 / 0.81)  # two greedy calls
    assert weights["lg-010"] == pytest.approx(1 / (0.05 * 0.9))  # one explored call
    assert weights["lg-000"] == MAX_IPS_WEIGHT  # both explored: 400, clipped
    assert st["ips_weighted"] == N_WF and st["unweighted"] == 0 and st["clipped"] == 3
    assert st["served_models"] == ["big", "small", "tiny"]
    assert st["unlabelled"] == {"tiny": "never chosen"}
    assert st["tasks_per_model"] == {"big": 80, "small": 40}
    _, old = tasks_from_traces(trace_db_path_without_propensities(logged_db))
    assert old["ips_weighted"] == 0 and old["unweighted"] == old["tasks"]


def trace_db_path_without_propensities(path):
    """A copy of the store as an older gateway wrote it: the propensity column dropped."""
    copy = path.with_name("no-propensity.sqlite")
    db = sqlite3.connect(path)
    db.execute(f"VACUUM INTO '{copy}'")
    db.close()
    db = sqlite3.connect(copy)
    db.execute("ALTER TABLE calls DROP COLUMN propensity")
    db.commit()
    db.close()
    return copy


@pytest.mark.filterwarnings("ignore:router has no learned head for model 'tiny'")  # the held-out evaluation's
def test_cli_train_from_logged_traces_reports_a_model_never_chosen(logged_db, tmp_path):
    out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["train", "--traces", str(logged_db), "--out", str(out), "--trees", "10"])
    assert r.exit_code == 0, r.output
    text = _flat(r.output)
    assert "120 weighted by inverse propensity (3 clipped at 100)" in text
    assert "workflows per model: big 80, small 40" in text
    assert "model 'tiny' was served but has no labels (never chosen); its router head falls back to the prior" in text
    pred = load_predictors(out)
    assert pred.models == ["big", "small", "tiny"] and pred.router.heads_["tiny"] is None
    assert pred.metrics["router_weighted"] is True and "tiny" in pred.metrics["router_skipped"]
    with pytest.warns(UserWarning, match="no learned head for model 'tiny'"):
        pred.router.predict_proba(["a question"], ["chat"], models=["tiny"])
