"""The batch congestion model (expected_latency with congestion="batch"), the speed curve it reads, and the
forest's mean-length reading."""

import numpy as np
import pytest

from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import profile
from chimera.perfmodel.speeds import speed_curve, speed_summary
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


def _inflight(p, model, call_id, pred, dispatched):
    """Admit a call of `pred` predicted tokens to `model` (pinned) and mark it dispatched at `dispatched` (None:
    still queued)."""
    from chimera.sched.types import Call, Prediction

    c = Call(call_id=call_id, workflow_id=f"w{call_id}", kind="qa", prompt="x", stage=0, prompt_tokens=0,
             arrival_s=0.0, workflow_arrival_s=0.0, pinned_model=model)
    tok = np.full(len(p.names), float(pred))
    p.admit(c, 0.0, Prediction(np.full(len(p.names), 0.5), tok, tok))
    c.dispatched_s = dispatched
    return c


def test_overrun_makes_in_flight_tokens_conditional_on_run_time():
    """overrun: a running call owes its prediction less what its time has produced at the model's TPOT, and past its
    prediction overrun × what it produced; a queued call owes all of it. Off (the default): the whole prediction."""
    on = make_policy("chimera", lam=1.0, congestion="batch", overrun=1.0)
    off = make_policy("chimera", lam=1.0, congestion="batch")
    for p in (on, off):
        p.bind(models())
        _inflight(p, "a", 1, 100.0, dispatched=0.0)    # 10 s at batch 2 (10 ms): 1,000 made, past its 100
        _inflight(p, "a", 2, 100.0, dispatched=9.5)    # 0.5 s: 50 made, 50 left
        _inflight(p, "b", 3, 100.0, dispatched=None)   # queued: all 100
    got = on._latency.owed_tokens(on.monitor, 10.0)
    assert got[0] == pytest.approx(1.0 * 1000 + 50) and got[1] == pytest.approx(100.0)
    # model b has no curve: the throughput model reads the conditional tokens too (at its tpot_s)
    tok = np.array([10.0, 10.0])
    a_off, b_off = off._latency.score(_probe(), 10.0, (None, tok, tok), None, off)
    a_on, b_on = on._latency.score(_probe(), 10.0, (None, tok, tok), None, on)
    assert b_on == pytest.approx(b_off)  # a queued call: the same either way
    assert a_on == a_off  # batch model without externality: in-flight tokens only matter beyond the batch limit
    ext = make_policy("chimera", lam=1.0, congestion="throughput", overrun=1.0)
    ext.bind(models(curve=()))
    _inflight(ext, "a", 1, 100.0, dispatched=0.0)  # 10 s at 12 ms: 833 made, past its 100
    assert ext._latency.owed_tokens(ext.monitor, 10.0)[0] == pytest.approx(10.0 / 0.012)
    assert ext._latency.score(_probe(), 10.0, (None, tok, tok), None, ext)[0] == pytest.approx(
        (10.0 / 0.012) / 500.0 + 10 * 0.012)
    ext.on_complete(ext.monitor._on["a"][1], 11.0)
    assert ext._latency.owed_tokens(ext.monitor, 11.0)[0] == 0.0 and not ext.monitor._on["a"]


def test_requeued_call_is_not_running():
    """A call the body could not place goes back to its queue undispatched (its run time does not count)."""
    p = make_policy("chimera", lam=1.0, congestion="batch", overrun=1.0)
    p.bind(models())
    c = _inflight(p, "a", 1, 100.0, dispatched=None)
    got = p.next_call("a", 5.0)
    assert got is c and c.dispatched_s == 5.0
    p.requeue(c)
    assert c.dispatched_s is None
    assert p._latency.owed_tokens(p.monitor, 50.0)[0] == pytest.approx(100.0)


def _probe():
    from chimera.sched.types import Call

    return Call(call_id=99, workflow_id="probe", kind="qa", prompt="x", stage=0, prompt_tokens=0, arrival_s=0.0,
                workflow_arrival_s=0.0)
