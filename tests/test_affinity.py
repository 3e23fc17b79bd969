"""Workflow affinity: the brain sees where a workflow's context is cached; expected latency counts
the prefill a stay saves; replica choice follows it, and load still overrides beyond a margin."""

from __future__ import annotations

import numpy as np
import pytest

from chimera.perfmodel.profiles import cluster_from_dict
from chimera.sched.affinity import pick_replica
from chimera.sched.registry import make_policy
from chimera.sched.types import Call, ModelInfo
from chimera.serve.config import Backend
from chimera.serve.pool import BackendPool
from chimera.serve.workflows import Workflows
from chimera.sim.experiment import prepare, run_policy
from chimera.sim.simulator import Simulator
from test_prefix_cache import _stable, tasks  # noqa: F401  (the module's fixture)

TWIN = [ModelInfo(name=n, tokens_per_s=1000.0, tpot_s=0.02, max_inflight=8, prefill_tokens_per_s=2000.0)
        for n in ("a", "b")]


def _call(i: int = 0, wid: str = "w", stage: int = 1, prompt: int = 2000, **kw) -> Call:
    return Call(call_id=i, workflow_id=wid, kind="qa", prompt="p", stage=stage, prompt_tokens=prompt,
                arrival_s=0.0, workflow_arrival_s=0.0, **kw)


# ---- the brain: replica choice and the prefill term ------------------------------------------------------------
def test_pick_replica_prefers_the_holder_unless_load_exceeds_the_margin():
    assert pick_replica([3, 3], None, 4) == 0  # no context anywhere: least-loaded, first on ties
    assert pick_replica([3, 3], [0, 0], 4) == 0
    assert pick_replica([3, 3], [0, 800], 4) == 1  # equal loads: the replica holding the context
    assert pick_replica([3, 7], [0, 800], 4) == 1  # busier, but within the margin
    assert pick_replica([3, 8], [0, 800], 4) == 0  # beyond the margin: load overrides
    assert pick_replica([5, 3], [800, 800], 4) == 1  # both hold it: the less loaded
    assert pick_replica([3, 3, 3], [100, 800, 400], 0) == 1  # the one holding the most


def test_policy_places_by_load_unless_affinity_is_on():
    off, on = make_policy("chimera"), make_policy("chimera", affinity=True, affinity_margin=2)
    for p in (off, on):
        p.bind(TWIN)
    assert not off.affinity and off.pick_replica([1, 1], [0, 900]) == 0
    assert on.pick_replica([1, 1], [0, 900]) == 1 and on.pick_replica([1, 4], [0, 900]) == 0


def _routed(policy, call: Call) -> str:
    policy.bind(TWIN)
    return policy.admit(call, 0.0).model


def test_later_stage_routes_to_the_model_holding_its_context_when_loads_are_equal():
    # Same confidence, speed and load on both: without affinity the tie goes to the first model; with it the
    # prefill b saves (1,900 of 2,000 prompt tokens cached: 0.95 s at 2,000 tokens/s) decides.
    held = {"b": 1900}
    assert _routed(make_policy("chimera", lam=1.0), _call(cached_tokens=held)) == "a"
    assert _routed(make_policy("chimera", lam=1.0, affinity=True), _call(cached_tokens=held)) == "b"
    p = make_policy("chimera", lam=1.0, affinity=True)
    p.bind(TWIN)
    lat = p._latency.score(_call(cached_tokens=held), 0.0, p.predict(_call()), np.ones(2, bool), p)
    assert lat == pytest.approx([1.0, 0.05])  # (2000 − cached) / 2000 tokens/s


def test_load_overrides_the_stay_at_model_level():
    p = make_policy("chimera", lam=1.0, affinity=True)
    p.bind(TWIN)
    p.monitor.pred_tokens["b"] = 2000.0  # two seconds of predicted work queued on b: more than the 0.95 s saved
    assert p.admit(_call(cached_tokens={"b": 1900}), 0.0).model == "a"


def test_prefill_externality_charges_the_calls_a_switch_stalls():
    p = make_policy("chimera", lam=1.0, affinity=True, prefill_externality=1.0)
    p.bind(TWIN)
    p.monitor.calls.update(a=3, b=3)
    lat = p._latency.score(_call(cached_tokens={"b": 1900}), 0.0, p.predict(_call()), np.ones(2, bool), p)
    assert lat == pytest.approx([1.0 * (1 + 3), 0.05 * (1 + 3)])


# ---- the simulator ------------------------------------------------------------------------------------------
def _cluster(prefix: bool, replicas: int = 1):
    raw = {"models": [{"profile": "qwen2.5-1.5b@a6000", "name": "qwen2.5-1.5b", "replicas": replicas,
                       "prefix_caching": prefix},
                      {"profile": "qwen2.5-7b@a6000", "name": "qwen2.5-7b", "prefix_caching": prefix}]}
    return cluster_from_dict(raw)


def test_affinity_off_by_default_gives_identical_simulator_results(tasks):
    prep = prepare(tasks, _cluster(prefix=True, replicas=2), seed=3)
    wfs = prep.workflows(120, 5)
    default = run_policy(prep, "chimera", rate=3.0, workflows=wfs, seed=5)
    off = run_policy(prep, "chimera", rate=3.0, workflows=wfs, seed=5, affinity=False, affinity_margin=0.0)
    assert _stable(default) == _stable(off)
    # and without prefix caching there is nothing to be affine to: affinity on changes nothing
    plain = prepare(tasks, _cluster(prefix=False, replicas=2), seed=3)
    assert _stable(run_policy(plain, "chimera", rate=3.0, workflows=wfs, seed=5)) == _stable(
        run_policy(plain, "chimera", rate=3.0, workflows=wfs, seed=5, affinity=True))


def test_simulator_fills_cached_tokens_only_with_affinity(tasks):
    prep = prepare(tasks, _cluster(prefix=True), seed=3)
    seen = {}
    for on in (False, True):
        pol = make_policy("chimera", confidence=prep.router, length=prep.lengths, affinity=on)
        sim = Simulator(prep.runtimes, pol, prep.workflows(40, 5), rate=0.5, seed=5)
        calls = []
        submit = sim.admission.submit
        sim.admission.submit = lambda call, now, *a, **k: (calls.append(call), submit(call, now, *a, **k))[1]
        sim.run()
        seen[on] = calls
    assert all(not c.cached_tokens for c in seen[False])
    later = [c for c in seen[True] if c.stage > 0]
    assert later and all(set(c.cached_tokens) == {"qwen2.5-1.5b", "qwen2.5-7b"} for c in later)
    assert all(0 <= v < c.prompt_tokens for c in seen[True] for v in c.cached_tokens.values())
    assert sum(max(c.cached_tokens.values()) for c in later) > 0  # light load: later stages find their context


class _FakeEngine:
    def __init__(self, name: str, load: int, cached: int) -> None:
        self.name, self.n_running, self.n_waiting, self._cached = name, load, 0, cached

    def cached_prompt_tokens(self, stream, prompt_tokens: int) -> int:
        return min(self._cached, prompt_tokens - 1)


def test_simulator_places_on_the_replica_holding_the_context(tasks):
    prep = prepare(tasks, _cluster(prefix=True, replicas=2), seed=3)
    (wid, plan, prompt), = prep.workflows(1, 5)

    class Wf:
        pass

    wf = Wf()
    wf.wid, wf.plan, wf.outputs = wid, plan, [40]
    call = _call(wid=wid, stage=1, prompt=plan.prompt_tokens(1, [40]) if plan.n_stages > 1 else 300)
    placed = {}
    for margin in (0.0, 4.0):
        pol = make_policy("chimera", confidence=prep.router, length=prep.lengths, affinity=True,
                          affinity_margin=margin)
        sim = Simulator(prep.runtimes, pol, [], rate=1.0)
        sim._workflow_of[call.call_id] = wf  # the simulator's own table of its calls' workflows
        for loads in ((2, 2), (2, 5), (2, 7)):
            sim.engines["qwen2.5-1.5b"] = [_FakeEngine("r0", loads[0], 0), _FakeEngine("r1", loads[1], 200)]
            placed[margin, loads] = sim._place("qwen2.5-1.5b", call, 0.0).name
    assert placed[4.0, (2, 2)] == "r1" and placed[4.0, (2, 5)] == "r1"  # equal or within the margin: the holder
    assert placed[4.0, (2, 7)] == "r0" and placed[0.0, (2, 5)] == "r0"  # beyond it: the least-loaded
    off = Simulator(prep.runtimes, make_policy("chimera", confidence=prep.router, length=prep.lengths), [], rate=1.0)
    off.engines["qwen2.5-1.5b"] = [_FakeEngine("r0", 2, 0), _FakeEngine("r1", 2, 200)]
    assert off._place("qwen2.5-1.5b", call, 0.0).name == "r0"  # off: least-loaded, as before


# ---- the gateway ----------------------------------------------------------------------------------------------
def _gateway(affinity: bool, margin: float = 4.0) -> BackendPool:
    policy = make_policy("chimera", affinity=affinity, affinity_margin=margin)
    backends = [Backend(name=f"a-{k}", model="a", base_url="http://unused", max_inflight=8) for k in range(2)]
    backends.append(Backend(name="b-0", model="b", base_url="http://unused", max_inflight=8))
    return BackendPool(policy, TWIN, backends)


def _serve_stage(s: BackendPool, i: int, wid: str, stage: int, prompt: int, out: int, pinned: str | None = None):
    call = _call(i, wid=wid, stage=stage, prompt=prompt, pinned_model=pinned)
    s.submit(call, float(i))
    be = s.core.replica(call)
    s.complete(call, float(i) + 0.5, out)
    return call, be.name


def test_gateway_remembers_where_the_context_is_and_follows_it():
    s = _gateway(affinity=True)
    s.backends["a"][1].inflight = 0
    # stage 0 lands on a-1 (a-0 is busier), leaving 1,000 + 200 tokens there
    s.backends["a"][0].inflight = 1
    _, where = _serve_stage(s, 0, "w", 0, 1000, 200, pinned="a")
    assert where == "a-1"
    st = s.workflows.peek("w")
    assert (st.last_model, st.last_backend, st.context_tokens) == ("a", "a-1", 1200)
    s.backends["a"][0].inflight = 0
    call, where = _serve_stage(s, 1, "w", 1, 1500, 100)
    assert call.cached_tokens == {"a": 1200} and call.model == "a"  # the stay saves prefill on a
    assert where == "a-1"  # equal loads: the backend holding the context, not the first one
    s.backends["a"][1].inflight = 5  # beyond the margin (4) over a-0: load overrides
    _, where = _serve_stage(s, 2, "w", 2, 1700, 100, pinned="a")
    assert where == "a-0"


def test_gateway_without_affinity_is_least_loaded_and_fills_nothing():
    s = _gateway(affinity=False)
    s.backends["a"][0].inflight = 1
    _serve_stage(s, 0, "w", 0, 1000, 200, pinned="a")
    s.backends["a"][0].inflight = 0
    call, where = _serve_stage(s, 1, "w", 1, 1500, 100, pinned="a")
    assert call.cached_tokens == {} and where == "a-0"


def test_gateway_workflow_table_is_bounded():
    table = Workflows(cap=3)
    for k in range(10):
        table.get(f"w{k}", float(k)).last_backend = "a-0"
    assert len(table) == 3 and table.peek("w0") is None and table.peek("w9").last_backend == "a-0"
    s = _gateway(affinity=True)
    s.workflows.cap = 5
    for k in range(20):
        _serve_stage(s, k, f"w{k}", 0, 500, 50, pinned="a")
    assert len(s.workflows) == 5 and s.workflows.peek("w0") is None
    call, _ = _serve_stage(s, 99, "w0", 1, 600, 50)  # forgotten: nothing known to be cached
    assert call.cached_tokens == {}
