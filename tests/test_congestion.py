"""The batch congestion model (expected_latency with congestion="batch"), the speed curve it reads, and the
forest's mean-length reading."""

import numpy as np
import pytest

from chimera.engine.perf import StepTimeModel
from chimera.engine.profiles import profile
from chimera.engine.speeds import speed_curve, speed_summary
from chimera.sched.registry import make_policy
from chimera.sched.types import ModelInfo

CURVE = ((1, 0.010), (2, 0.010), (4, 0.011), (8, 0.014))  # TPOT grows with the batch


def models(limit=8, replicas=1, curve=CURVE):
    return [ModelInfo("a", tokens_per_s=500.0, tpot_s=0.012, max_inflight=64, replicas=replicas, batch_limit=limit,
                      speed_curve=curve),
            ModelInfo("b", tokens_per_s=500.0, tpot_s=0.012, max_inflight=64)]  # no curve: throughput model


def load(p, model, calls, tokens):
    p.monitor.calls[model] = calls
    p.monitor.pred_tokens[model] = tokens


def test_speed_curve_from_the_step_model():
    spec = profile("llama-3.1-8b@h100")
    perf = StepTimeModel(spec)
    info = speed_summary(spec, perf, 0)
    bs = [b for b, _ in info.speed_curve]
    ts = [t for _, t in info.speed_curve]
    assert bs[0] == 1 and bs[-1] == info.batch_limit and bs == sorted(bs)
    assert all(t2 >= t1 for t1, t2 in zip(ts, ts[1:]))  # slower per token at a larger batch
    assert ts[-1] == pytest.approx(perf.decode_tpot(info.batch_limit, 1500))
    assert info.replicas == spec.replicas
    assert speed_curve(perf, 1) == ((1, perf.decode_tpot(1, 1500)),)


def test_batch_model_tpot_at_the_joined_batch():
    p = make_policy("chimera", lam=1.0, congestion="batch")
    p.bind(models())
    tok = np.array([100.0, 100.0])
    assert p.expected_latency(tok)[0] == pytest.approx(100 * 0.010)  # idle: batch 1
    load(p, "a", 3, 300.0)
    assert p.expected_latency(tok)[0] == pytest.approx(100 * 0.011)  # joins a batch of 4
    load(p, "a", 5, 500.0)
    assert p.expected_latency(tok)[0] == pytest.approx(100 * np.interp(6, [4, 8], [0.011, 0.014]))
    # model b has no curve: the paper's throughput model, whatever the congestion choice
    load(p, "b", 5, 500.0)
    assert p.expected_latency(tok)[1] == pytest.approx(500 / 500.0 + 100 * 0.012)


def test_batch_model_queues_beyond_the_batch_limit_and_counts_replicas():
    p = make_policy("chimera", lam=1.0, congestion="batch")
    p.bind(models(limit=8))
    tok = np.array([100.0, 100.0])
    load(p, "a", 7, 700.0)
    full = p.expected_latency(tok)[0]
    assert full == pytest.approx(100 * 0.014)  # the 8th slot: no wait
    load(p, "a", 11, 1100.0)  # 12th call: 4 wait (this one included), 100 tokens left each, 8 slots at 14 ms
    assert p.expected_latency(tok)[0] == pytest.approx(4 * 100 * 0.014 / 8 + 100 * 0.014)
    two = make_policy("chimera", lam=1.0, congestion="batch")
    two.bind(models(limit=8, replicas=2))
    load(two, "a", 11, 1100.0)  # 12 calls over 2 replicas: a batch of 6 each, no queue
    assert two.expected_latency(tok)[0] == pytest.approx(100 * np.interp(6, [4, 8], [0.011, 0.014]))


def test_externality_charges_the_slowdown_of_running_calls():
    base = make_policy("chimera", lam=1.0, congestion="batch")
    ext = make_policy("chimera", lam=1.0, congestion="batch", externality=1.0)
    for p in (base, ext):
        p.bind(models())
        load(p, "a", 3, 300.0)  # 3 running, 100 tokens left each; joining makes the batch 4
    tok = np.array([50.0, 50.0])
    extra = 3 * (0.011 - np.interp(3, [2, 4], [0.010, 0.011])) * 50
    assert ext.expected_latency(tok)[0] - base.expected_latency(tok)[0] == pytest.approx(extra)


def test_throughput_default_is_unchanged_and_bad_choice_refused():
    p = make_policy("chimera", lam=1.0)
    p.bind(models())
    load(p, "a", 5, 500.0)
    assert p.expected_latency(np.array([100.0, 0.0]))[0] == pytest.approx(500 / 500.0 + 100 * 0.012)
    with pytest.raises(ValueError, match="congestion"):
        make_policy("chimera", congestion="fancy")


def test_forest_mean_reading_averages_quantiles():
    from chimera.predict.length import MEAN_QUANTILES, ForestLengths

    class Forest:  # predicts quantile q as 100·q² (right-skewed): mean 33.3 > median 25
        models_ = ["a"]

        def predict_both(self, rows, quantiles):
            qs = np.atleast_1d(np.asarray(quantiles, dtype=float))
            y = np.tile(100 * qs**2, (len(rows), 1))
            return (y[:, 0], y[:, 0]) if np.isscalar(quantiles) else (y, y)

    from chimera.sched.types import Call
    call = Call(call_id=1, workflow_id="w", kind="qa", prompt="x", stage=0, prompt_tokens=5, arrival_s=0.0,
                workflow_arrival_s=0.0)
    med = ForestLengths(Forest(), quantile=0.5).predict_lengths([call])[0][0, 0]
    mean = ForestLengths(Forest(), quantile="mean").predict_lengths([call])[0][0, 0]
    assert med == pytest.approx(25.0)
    assert mean == pytest.approx(np.mean(100 * np.square(MEAN_QUANTILES))) and mean > med
    with pytest.raises(ValueError, match="mean"):
        ForestLengths(Forest(), quantile="max")


def test_other_clients_calls_count_as_load_of_our_mean_length():
    """monitor.external (the gateway's scraped engine gauges beyond its own calls) joins the batch and the queue."""
    p = make_policy("chimera", lam=1.0, congestion="batch")
    p.bind(models(limit=8))
    tok = np.array([100.0, 100.0])
    load(p, "a", 3, 300.0)
    p.monitor.external["a"] = 4.0
    assert p.expected_latency(tok)[0] == pytest.approx(100 * 0.014)  # 3 ours + 4 theirs + this one: batch 8
    p.monitor.external["a"] = 6.0  # 10 in all: two wait for a slot, each with 100 tokens left at the full batch
    assert p.expected_latency(tok)[0] == pytest.approx(2 * 100 * 0.014 / 8 + 100 * 0.014)
    load(p, "b", 0, 0.0)
    p.monitor.external["b"] = 5.0  # none of ours there: theirs count as long as this call; throughput model
    assert p.expected_latency(tok)[1] == pytest.approx(5 * 100 / 500.0 + 100 * 0.012)
