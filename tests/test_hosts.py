"""Servers sharing one machine's CPU in the simulator: a busy peer slows a server by its measured factor."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chimera.perfmodel.batching import Engine, Seq
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import ClusterError, cluster_from_dict
from chimera.sched.registry import make_policy
from chimera.sim.experiment import prepare
from chimera.sim.simulator import Simulator
from chimera.workload.synthetic import generate

FITTED = {"fixed_s": 0.002, "weights_s": 0.001, "per_token_s": 2e-5, "per_seq_s": 4e-4,
          "per_context_token_s": 5e-8, "kv_capacity_tokens": 100000, "max_model_len": 2048}


def _cluster(tmp_path: Path, speed: float = 1.0, **entry: object):
    fitted = {k: (v / speed if k.endswith("_s") else v) for k, v in FITTED.items()}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"chimera_profile": 1, "name": "p", "max_num_seqs": 64,
                                                     "max_num_batched_tokens": 2048, "fitted": fitted}))
    models = [{"profile_file": "p.yaml", "name": n, "workload_model": w, **entry}
              for n, w in (("a", "qwen2.5-7b"), ("b", "qwen2.5-7b"))]  # same lengths on both
    return cluster_from_dict({"models": models}, base_dir=tmp_path)


def _mean_latency(cluster, n: int = 2) -> float:
    prep = prepare(generate(20, seed=2), cluster, seed=2)
    wfs = prep.workflows(n, 0)
    wfs = [(w, wfs[0][1], prompt) for w, _, prompt in wfs]  # the same plan twice: both servers equally busy
    return Simulator(prep.runtimes, make_policy("vllm"), wfs, arrivals=[0.0] * n).run()["latency_s"]["mean"]


def test_a_busy_peer_on_the_same_host_slows_a_server(tmp_path: Path) -> None:
    alone = _mean_latency(_cluster(tmp_path))
    apart = _mean_latency(_cluster(tmp_path, peer_busy_slowdown=2.0))  # no host: nothing shared
    shared = _mean_latency(_cluster(tmp_path, host="box", peer_busy_slowdown=2.0))
    half_speed = _mean_latency(_cluster(tmp_path, speed=0.5))
    assert apart == alone
    # round-robin puts one workflow on each server; same plan, same arrival: they are busy at the same times,
    # so every step runs at half speed (tool time between stages is not slowed)
    assert shared > alone * 1.05
    assert shared == pytest.approx(half_speed, rel=0.01)  # a step under way keeps its speed


def test_speed_returns_when_the_peer_goes_idle() -> None:
    cl = cluster_from_dict({"models": [{"profile": "qwen2.5-7b@a6000"}]})
    perf = StepTimeModel(cl.models[0])
    eng = Engine("e", perf)
    eng.add(Seq(None, 100, 1000), 0.0)
    eng.advance()  # the prefill step
    t0, end0 = eng.t, eng.next_event_time()
    tau = eng._seg_tau
    eng.set_slowdown(3.0, t0 + 2.5 * tau)  # mid-step: that step ends at the old speed, then the segment stops
    assert eng.next_event_time() == pytest.approx(t0 + 3 * tau) and eng.next_event_time() < end0
    eng.advance()
    assert eng._seg_tau == pytest.approx(3 * tau, rel=0.01)
    eng.set_slowdown(1.0, eng.t)  # at a boundary: the new speed applies at once
    eng.advance()
    assert eng._seg_tau == pytest.approx(tau, rel=0.01)


def test_peer_busy_slowdown_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="peer_busy_slowdown"):
        _cluster(tmp_path, host="box", peer_busy_slowdown=0.5)


def test_fewer_running_on_the_peer_steal_proportionally_less() -> None:
    """Measured with the peer running `peer_busy_batch` requests: one running request there costs a quarter of the
    extra time at batch 4; a full batch or more costs all of it."""
    from chimera.sim.hosts import SharedHosts

    cl = cluster_from_dict({"models": [{"profile": "qwen2.5-7b@a6000"}]})
    perf = StepTimeModel(cl.models[0])
    a, b = Engine("a", perf), Engine("b", perf)
    hosts = SharedHosts([(a, "box", 3.0, 4), (b, "box", 1.0, 4)])
    changed: list[str] = []
    a.add(Seq(None, 10, 100), 0.0)
    hosts.update(0.0, lambda e: changed.append(e.name))
    assert a.slowdown == 1.0 and not changed  # the peer is idle
    b.add(Seq(None, 10, 100), 0.0)
    hosts.update(0.0, lambda e: changed.append(e.name))
    assert a.slowdown == pytest.approx(1.5) and changed == ["a"]  # 1 of 4: 1 + 2 × 1/4
    for _ in range(5):
        b.add(Seq(None, 10, 100), 0.0)
    hosts.update(0.0, lambda e: None)
    assert a.slowdown == pytest.approx(3.0) and b.slowdown == 1.0  # b's own factor is 1: never slowed
