"""Lengths learnt live: the trace store's real per-stage lengths refit in the background (never blocking the event
loop), warming the running means or calibrating the trained forest, with what they did on /metrics."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from chimera.predict.calibrated import CalibratedLengths, LengthRatios
from chimera.predict.priors import DEFAULT_CALL_TOKENS
from chimera.sched.types import Call
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.serve.live_lengths import CellSums, connect_read_only, fit_ratios, read_lengths, warm_table
from chimera.serve.trace import CALL_COLUMNS, TraceStore
from upstreams import Served, fake_upstream


def _row(call_id: str, tokens: int, pred: float | None = None, kind: str = "qa", stage: int = 0, model: str = "a",
         t: float = 0.0, status: str = "ok") -> dict:
    return {"workflow_id": call_id, "stage": stage, "call_id": call_id, "model": model, "backend": "b",
            "prompt_tokens": 10, "completion_tokens": tokens, "queued_at": t, "status": status, "kind": kind,
            "pred_call_tokens": pred}


def _fill(path: Path, rows: list[dict]) -> None:
    store = TraceStore(path)
    for r in rows:
        store.log_call(r)
    store.close()


def _call(kind: str = "qa", stage: int = 0, i: int = 0) -> Call:
    return Call(call_id=i, workflow_id=f"w{i}", kind=kind, prompt="What is 17*23?", stage=stage, prompt_tokens=9,
                arrival_s=0.0, workflow_arrival_s=0.0)


def _gateway(db: Path, upstream: Served, **lengths) -> Served:
    """A gateway on one backend of model `a` at `upstream`, its lengths refit from `db` with these settings."""
    cfg = gateway_config_from_dict({
        "trace_store": str(db), "health": {"enabled": False}, "live": {"speeds": False, "lengths": lengths},
        "backends": [{"name": "b0", "model": "a", "base_url": upstream.url + "/v1"}]})
    return Served(build_gateway(cfg))


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- the refit, pure ---------------------------------------------------------------------------------------------
def test_calibration_divides_out_the_ratio_each_row_was_predicted_under(tmp_path):
    """The forest says 100 for a cell whose calls produce 200. Rows queued before t=200 were predicted under ratio 1
    (logged 100), later ones under ratio 2 (logged 200): the refit sees raw predictions of 100 throughout and keeps
    2, instead of drifting back towards 1 as it would if it fitted the logged (already scaled) predictions."""
    db = tmp_path / "t.sqlite"
    second = LengthRatios(["a"], {("qa", 0, "a"): 2.0})
    rows = [_row(f"run-{i}", 200, 100.0, t=100.0 + i) for i in range(20)]
    rows += [_row(f"run-{i}", 200, 200.0, t=200.0 + i) for i in range(20, 40)]
    rows += [_row(f"old-{i}", 50, 999.0, t=50.0) for i in range(5)]  # an earlier run: never calibrates
    rows += [_row("run-x", 7, 7.0, status="error"), _row("run-y", 9, 9.0, t=10.0)]  # failed; before the first table
    _fill(db, rows)
    with connect_read_only(db) as conn:
        read = read_lengths(conn, "run-", 1000, [(100.0, LengthRatios(["a"])), (200.0, second)])
    assert read.rows == 46
    cell = read.calibration[("qa", 0, "a")]
    assert (cell.n_pred, cell.tokens_pred, cell.pred) == (40, 8000.0, 4000.0)
    assert read.earlier[("qa", 0, "a")].n == 5 and read.earlier[("qa", 0, "a")].tokens == 250.0
    assert read.per_model["a"].n_pred == 41  # the one before the first table counts for /metrics, not the fit
    ratios = fit_ratios(["a"], read.calibration, shrink=0.0, max_ratio=4.0, max_cells=10)
    assert ratios.ratio("qa", 0, "a") == pytest.approx(2.0) and ratios.per_model["a"] == pytest.approx(2.0)
    assert ratios.ratio("unseen-kind", 3, "a") == pytest.approx(2.0)  # the model's ratio where the cell has none
    assert warm_table(read.earlier, 3.0) == {("qa", 0, "a"): (150.0, 3.0)}  # the mean, counted at most 3 times
    assert warm_table({**read.earlier, ("qa", 1, "a"): CellSums(n=1, tokens=9.0)}, 3.0, max_cells=1).keys() == {
        ("qa", 0, "a")}  # the most populated cells


def test_ratios_are_shrunk_towards_the_model_and_bounded():
    cal = {("qa", 0, "a"): CellSums(n_pred=2, tokens_pred=2000.0, pred=20.0),  # 100× off, on 2 rows
           ("qa", 1, "a"): CellSums(n_pred=200, tokens_pred=200.0 * 200, pred=100.0 * 200)}  # 2× off, 200 rows
    ratios = fit_ratios(["a"], cal, shrink=20.0, max_ratio=4.0, max_cells=10)
    assert ratios.ratio("qa", 0, "a") <= 4.0  # bounded
    assert ratios.ratio("qa", 1, "a") == pytest.approx(2.0, rel=0.1)
    assert 1.0 < ratios.per_model["a"] <= 4.0
    assert fit_ratios(["a"], cal, 20.0, 4.0, max_cells=1).cells.keys() == {("qa", 1, "a")}  # most rows kept


def test_calibrated_lengths_scale_both_columns_per_model():
    class Fixed:
        models_ = ["a", "b"]

        def predict_lengths(self, calls):
            import numpy as np
            return np.full((len(calls), 2), 100.0), np.full((len(calls), 2), 300.0)

    wrapped = CalibratedLengths(Fixed(), LengthRatios(["a", "b"], {("qa", 0, "b"): 0.5}, {"a": 2.0}))
    call, rem = wrapped.predict_lengths([_call(), _call(kind="code")])
    assert call.tolist() == [[200.0, 50.0], [200.0, 100.0]] and rem.tolist() == [[600.0, 150.0], [600.0, 300.0]]


# ---- through the gateway -----------------------------------------------------------------------------------------
def test_running_means_are_warmed_by_earlier_runs_at_start(tmp_path):
    """A restarted gateway (no trained predictors) predicts the lengths its earlier runs saw, not 256 everywhere;
    what it then serves is learnt live on top."""
    db = tmp_path / "t.sqlite"
    _fill(db, [_row(f"old-{i}", 40) for i in range(30)] + [_row(f"old-s{i}", 60, stage=1) for i in range(30)])
    up = Served(fake_upstream("up", delay=0.0, words=5))
    gw = _gateway(db, up, refresh_s=0.1, warm_weight=10)
    try:
        policy, lengths = gw.gw.policy, gw.gw.live.lengths
        _wait(lambda: lengths.refits >= 1)
        pred = policy.predict(_call())
        assert pred.call_tokens.tolist() == [40.0] and pred.remaining_tokens.tolist() == [100.0]
        assert policy.predict(_call(kind="unseen")).call_tokens.tolist() == [DEFAULT_CALL_TOKENS]
        for i in range(10):  # ten live answers of 5 tokens beside ten pseudo-completions of 40
            r = httpx.post(gw.url + "/v1/chat/completions", json={
                "model": "a", "messages": [{"role": "user", "content": f"q{i}"}],
                "chimera": {"kind": "qa", "stage": 0, "workflow_id": f"new-{i}"}})
            assert r.status_code == 200
        refits = lengths.refits
        _wait(lambda: lengths.refits > refits + 1)  # a refit that saw all ten rows (this run's: not warm)
        assert policy.predict(_call()).call_tokens.tolist() == [pytest.approx((10 * 40 + 10 * 5) / 20)]
        metrics = httpx.get(gw.url + "/metrics").text
        for name in ("chimera_length_refits_total", 'chimera_length_learning{mode="warm"} 1.0',
                     "chimera_length_refit_rows 70.0", "chimera_length_refit_age_seconds",
                     'chimera_length_actual_tokens_mean{model="a"} 5.0', "chimera_length_cells 2.0"):
            assert name in metrics, name
    finally:
        gw.stop()
        up.stop()
    assert not gw.gw.live.lengths._loop.running
    assert not [t for t in threading.enumerate() if t.name.startswith("chimera-lengths")]


def test_an_in_memory_trace_store_cannot_be_refit(caplog):
    cfg = gateway_config_from_dict({"trace_store": ":memory:", "live": {},
                                    "backends": [{"name": "b0", "model": "a", "base_url": "http://x/v1"}]})
    gw = build_gateway(cfg).state.gateway
    assert gw.live.lengths is None and gw.live.speeds is not None
    assert "in memory" in caplog.text
    gw.trace.close()


def test_the_forest_is_calibrated_by_real_lengths(tmp_path, synthetic_predictors):
    """Trained predictors whose lengths are off for this traffic (every answer here is 300 tokens): after a refit
    the policy's predictions for that kind and stage are closer to 300, on every model that served it; a predictor
    replaced under the wrapper (a reload) is wrapped again and calibrated afresh."""
    up = Served(fake_upstream("up", delay=0.0, words=300))
    models = ("qwen2.5-1.5b", "qwen2.5-14b")
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"), "predictors": str(synthetic_predictors),
        "health": {"enabled": False},
        "live": {"speeds": False, "lengths": {"refresh_s": 0.1, "shrink_rows": 0}},
        "backends": [{"name": m, "model": m, "base_url": up.url + "/v1"} for m in models]})
    gw = Served(build_gateway(cfg))
    try:
        policy, lengths = gw.gw.policy, gw.gw.live.lengths
        wrapper = lengths.wrapper
        assert isinstance(policy.length, CalibratedLengths) and policy.length is wrapper
        before = wrapper.base.predict_lengths([_call("math")])[0][0]
        for i in range(24):
            r = httpx.post(gw.url + "/v1/chat/completions", json={
                "model": models[i % 2], "messages": [{"role": "user", "content": f"What is {i} * 17?"}],
                "chimera": {"kind": "math", "stage": 0, "workflow_id": f"wf-{i}"}})
            assert r.status_code == 200
        _wait(lambda: ("math", 0, models[0]) in wrapper.ratios.cells and ("math", 0, models[1]) in wrapper.ratios.cells)
        after = policy.predict(_call("math")).call_tokens
        for j in range(2):
            assert abs(after[j] - 300) < abs(before[j] - 300), (before, after)
            assert 0.25 <= wrapper.ratios.ratio("math", 0, models[j]) <= 4.0
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'chimera_length_learning{mode="calibrate"} 1.0' in metrics
        assert f'chimera_length_actual_tokens_mean{{model="{models[0]}"}} 300.0' in metrics
        base = wrapper.base
        policy.use_length(base)  # a reload puts a plain predictor back
        _wait(lambda: lengths.wrapper is not wrapper)
        assert policy.length is lengths.wrapper and lengths.wrapper.base is base and not lengths.wrapper.ratios
    finally:
        gw.stop()
        up.stop()


def test_a_large_refit_never_blocks_the_event_loop(tmp_path):
    """A refit over 100,000 rows runs on its own thread: /health answers in milliseconds while it runs."""
    db = tmp_path / "big.sqlite"
    TraceStore(db).close()
    rows = [{"workflow_id": f"w{i}", "stage": i % 5, "call_id": f"old-{i}", "model": "a", "completion_tokens": 50 + i % 7,
             "status": "ok", "kind": f"k{i % 20}", "queued_at": float(i), "pred_call_tokens": 100.0}
            for i in range(100_000)]
    with sqlite3.connect(db) as conn:
        conn.executemany(f"INSERT INTO calls ({','.join(CALL_COLUMNS)}) VALUES "
                         f"({','.join('?' * len(CALL_COLUMNS))})", [tuple(r.get(c) for c in CALL_COLUMNS) for r in rows])
    up = Served(fake_upstream("up"))
    gw = _gateway(db, up, refresh_s=0.05, max_rows=200_000)
    try:
        lengths = gw.gw.live.lengths
        pings: list[tuple[float, float]] = []  # (sent, seconds to answer)
        with httpx.Client() as client:
            client.get(gw.url + "/health")
            t_end = time.monotonic() + 3.0
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                assert client.get(gw.url + "/health").status_code == 200
                pings.append((t0, time.monotonic() - t0))
                time.sleep(0.005)
        read, done = lengths.last, lengths.last_at
        assert read is not None and read.rows == 100_000 and lengths.refits >= 2
        during = [lat for t0, lat in pings if done - read.seconds <= t0 and t0 + lat <= done]
        assert read.seconds > 0.1 and len(during) >= 5, (read.seconds, len(during))
        # blocked, every ping during the pass would wait it out; the median is immune to one slow ping on a busy machine
        assert float(np.median(during)) < min(0.1, read.seconds / 3), (read.seconds, sorted(during)[-5:])
    finally:
        gw.stop()
        up.stop()
