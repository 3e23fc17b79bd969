"""Prefix caching in the engine model (perfmodel/prefix.py, perfmodel/batching.py) and its simulator plumbing."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest

from chimera.perfmodel.batching import Engine, Seq
from chimera.perfmodel.prefix import PrefixCache, block_keys
from chimera.perfmodel.profiles import ClusterError, cluster_from_dict, default_cluster
from chimera.sim.experiment import prepare, run_policy
from chimera.workload.plan import plan_workflow
from chimera.workload.synthetic import generate
from chimera.workload.templates import load_templates, template_for
from test_perfmodel_batching import FlatModel as _FlatModel

VOLATILE = {"wall_s", "calls_per_wall_s", "scheduler_s", "scheduler_share_of_latency"}


class FlatModel(_FlatModel):
    """Step time grows with batch, context and prefill tokens."""

    def step_time(self, n_decode, decode_context_tokens, prefill_tokens):
        return 0.010 + 0.001 * n_decode + 1e-6 * decode_context_tokens + 0.0001 * prefill_tokens


def drive(eng: Engine, jobs, streams=None) -> dict:
    """jobs: (arrival, prompt, out); streams[i]: the prefix of job i (or None). Returns {i: (end, ttft, preempt)}."""
    ends = {}
    pending = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    k = 0
    while k < len(pending) or eng.next_event_time() < math.inf:
        t_arr = jobs[pending[k]][0] if k < len(pending) else math.inf
        if k < len(pending) and t_arr <= eng.next_event_time():
            i = pending[k]
            k += 1
            prefix = streams[i] if streams is not None else None
            for s in eng.add(Seq(i, jobs[i][1], jobs[i][2], key=jobs[i][0], prefix=prefix), t_arr):
                ends[s.call] = s.end_s
        else:
            t = eng.next_event_time()
            for s in eng.advance():
                ends[s.call] = (t, s.first_token_s, s.preemptions)
    return ends


def _digest(ends: dict) -> str:
    return hashlib.sha256(repr(sorted(ends.items())).encode()).hexdigest()[:16]


def _stream(name: str, prompt: int, out: int) -> tuple:
    return ((name, "prompt"), prompt), ((name, "out"), out)


# ---- block keys and the cache itself -------------------------------------------------------------------------
def test_block_keys_are_whole_blocks_of_the_shared_stream():
    a = (("sys", 100), ("task", 300), ("out-a", 50))
    b = (("sys", 100), ("task", 300), ("out-b", 50))
    ka, kb = block_keys(a, 1 << 62, 128), block_keys(b, 1 << 62, 128)
    assert len(ka) == len(kb) == 450 // 128 == 3
    assert ka[:3] == kb[:3]  # blocks 0..2 end at 128, 256, 384 <= 400: inside the shared part
    c = (("sys", 100), ("task", 300), ("out-a", 400))
    kc, kd = block_keys(c, 1 << 62, 128), block_keys((("sys", 100), ("task", 300), ("out-b", 400)), 1 << 62, 128)
    assert kc[:3] == kd[:3] and kc[3] != kd[3]  # block 3 (384..512) holds different outputs
    assert block_keys((("x", 99),), 1 << 62, 128) == []  # a partial block is no key
    assert block_keys((("task", 300), ("sys", 100)), 1 << 62, 128)[0] != ka[0]  # order matters


def test_cache_shares_referenced_blocks_and_evicts_least_recently_freed():
    pc = PrefixCache(16)
    ka = block_keys((("a", 64),), 1 << 62, 16)
    kb = block_keys((("b", 64),), 1 << 62, 16)
    assert pc.admit(ka, 64) == 0 and pc.hold(ka, 0, 4) == 4
    assert pc.admit(ka, 64) == 3  # at most (64-1)//16 blocks: one token is always computed
    assert pc.shared == 3 * 16
    pc.release(ka, 3, 3)
    pc.release(ka, 4, 4)
    assert pc.shared == 0 and not pc.refs and len(pc.free) == 4
    pc.release(kb, 0, 4)  # b's blocks freed later: evicted after a's
    pc.trim(5 * 16)
    assert pc.evicted_blocks == 3 and list(pc.free)[0] == ka[0] and all(k in pc.free for k in kb)
    assert list(pc.free)[:1] == [ka[0]]  # a's tail blocks went first, its head block is left


# ---- the engine --------------------------------------------------------------------------------------------
def test_repeated_prefix_on_the_same_replica_prefills_only_the_uncached_tail():
    model = FlatModel(budget=2048)
    eng = Engine("e", model, prefix_block_tokens=128)
    first = eng.add(Seq("a", 1400, 4, prefix=_stream("p", 1400, 4)), 0.0)
    assert first == []
    done = []
    while eng.next_event_time() < math.inf:
        done += eng.advance()
    a = done[0]
    probe = ((("p", "prompt"), 1400), ("z", 4))
    assert eng.cached_prompt_tokens(probe, 1400) == 1280 and eng.cached_prompt_tokens(probe, 300) == 256
    assert eng.prefix_cache.queried_tokens == 1400  # a query counts nothing
    eng.add(Seq("b", 1400, 4, prefix=((("p", "prompt"), 1400), ("q", 4))), 10.0)
    while eng.next_event_time() < math.inf:
        done += eng.advance()
    b = done[1]
    st = eng.prefix_stats()["prefix_cache"]
    assert st["queried_tokens"] == 2800 and st["hit_tokens"] == 1280  # 10 whole blocks; the partial 11th is not
    assert a.first_token_s == pytest.approx(model.step_time(0, 0, 1400))
    assert b.first_token_s - 10.0 == pytest.approx(model.step_time(0, 0, 120))


def test_another_replica_prefills_everything():
    e1, e2 = Engine("e#0", FlatModel(budget=2048), prefix_block_tokens=128), Engine("e#1", FlatModel(budget=2048),
                                                                                  prefix_block_tokens=128)
    e1.add(Seq("a", 1400, 4, prefix=_stream("p", 1400, 4)), 0.0)
    while e1.next_event_time() < math.inf:
        e1.advance()
    e2.add(Seq("b", 1400, 4, prefix=_stream("p", 1400, 4)), 10.0)
    done = []
    while e2.next_event_time() < math.inf:
        done += e2.advance()
    (b,) = done
    assert b.first_token_s - 10.0 == pytest.approx(FlatModel().step_time(0, 0, 1400))
    assert e2.prefix_stats()["prefix_cache"]["hit_tokens"] == 0
    assert Engine("off", FlatModel()).cached_prompt_tokens(_stream("p", 1400, 4), 1400) == 0


def test_cached_outputs_are_hit_by_a_longer_prompt_that_carries_them():
    """An agent's next call: prompt = earlier prompt + its output + new text; the output's full blocks hit too."""
    eng = Engine("e", FlatModel(budget=4096), prefix_block_tokens=16)
    s0 = (("sys", 100), (("w", "out", 0), 60))
    eng.add(Seq(0, 100, 60, prefix=s0), 0.0)
    while eng.next_event_time() < math.inf:
        eng.advance()
    s1 = (("sys", 100), (("w", "out", 0), 60), ("obs", 40), (("w", "out", 1), 5))
    eng.add(Seq(1, 200, 5, prefix=s1), 100.0)
    while eng.next_event_time() < math.inf:
        eng.advance()
    # 100 + 60 - 1 tokens had KV after the first call: 9 whole blocks of 16 (144 tokens) stay cached
    assert eng.prefix_cache.hit_tokens == 144


def test_cache_off_is_bit_identical_to_the_engine_before_prefix_caching():
    """Golden digest of this job mix on the engine of commit 7a77d8c (before prefix caching), 44 preemptions."""
    rng = random.Random(7)
    jobs = [(rng.uniform(0, 20), rng.randint(50, 1500), rng.randint(1, 300)) for _ in range(300)]
    eng = Engine("e", FlatModel(kv=6000, max_seqs=16, budget=512))
    ends = drive(eng, jobs)
    assert eng.preemptions == 44
    assert _digest(ends) == "acc3ba6bf96f2c4d"
    assert eng.prefix_stats() == {}


def test_lru_eviction_under_kv_pressure_never_delays_admission():
    """Unique streams on a small cache: blocks pile up in free KV and are evicted, and every admission, prefill
    and completion happens exactly when it does without caching."""
    rng = random.Random(3)
    jobs = [(i * 0.4 + rng.uniform(0, 0.3), rng.randint(200, 1800), rng.randint(1, 40)) for i in range(200)]
    streams = [_stream(f"u{i}", p, o) for i, (_, p, o) in enumerate(jobs)]
    off = Engine("e", FlatModel(kv=4096, max_seqs=8, budget=512))
    on = Engine("e", FlatModel(kv=4096, max_seqs=8, budget=512), prefix_block_tokens=16)
    ends_off, ends_on = drive(off, jobs), drive(on, jobs, streams)
    assert off.preemptions == 0
    assert ends_on == ends_off
    pc = on.prefix_cache
    assert pc.evicted_blocks > 0 and pc.hit_tokens == 0
    assert pc.free_tokens <= on.cap  # what is left fits in the idle cache
    assert not pc.refs and pc.shared == 0


def test_preempted_sequences_recompute_from_their_own_cached_blocks():
    rng = random.Random(7)
    jobs = [(rng.uniform(0, 20), rng.randint(50, 1500), rng.randint(1, 300)) for _ in range(300)]
    streams = [_stream(f"u{i}", p, o) for i, (_, p, o) in enumerate(jobs)]
    off = Engine("e", FlatModel(kv=6000, max_seqs=16, budget=512))
    on = Engine("e", FlatModel(kv=6000, max_seqs=16, budget=512), prefix_block_tokens=16)
    ends_off, ends_on = drive(off, jobs), drive(on, jobs, streams)
    assert len(ends_on) == len(jobs) and all(isinstance(v, tuple) for v in ends_on.values())
    assert on.prefix_cache.hit_tokens > 0  # only recomputation can hit: every stream is unique
    assert max(v[0] for v in ends_on.values()) <= max(v[0] for v in ends_off.values())
    assert not on.prefix_cache.refs and on.prefix_cache.shared == 0


def test_shared_blocks_of_running_sequences_count_once_in_kv():
    eng = Engine("e", FlatModel(budget=4096, max_seqs=8), prefix_block_tokens=16)
    common = ("sys", 320)
    eng.add(Seq(0, 330, 50, prefix=(common, ("a", 60))), 0.0)
    eng.advance()  # prefilled: its 20 prompt blocks are cached
    used0 = eng.kv_used()
    eng.add(Seq(1, 330, 50, prefix=(common, ("b", 60))), eng.t)
    eng.advance()
    assert eng.prefix_cache.shared == 320
    assert eng.kv_used() - used0 == 330 - 320 + 2  # b's own tail, plus one decode step of each
    while eng.next_event_time() < math.inf:
        eng.advance()
    assert eng.prefix_cache.shared == 0 and not eng.prefix_cache.refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prefixes_under_kv_pressure_keep_the_books(seed):
    """Random calls on a few shared system prompts, some repeating an earlier call's prompt + output: after every
    event the cached free blocks fit beside what the running calls use, and at the end nothing is referenced."""
    rng = random.Random(seed)
    eng = Engine("e", FlatModel(kv=8000, max_seqs=12, budget=512), prefix_block_tokens=16)
    pc = eng.prefix_cache
    jobs, streams = [], []
    for i in range(150):
        if streams and rng.random() < 0.4:  # a follow-up: an earlier call's prompt and output, then new text
            base = streams[rng.randrange(len(streams))]
            st = base + ((f"new{i}", rng.randint(1, 200)), (f"o{i}", rng.randint(1, 400)))
        else:
            st = ((f"sys{rng.randrange(4)}", rng.randint(100, 400)), (f"u{i}", rng.randint(1, 600)),
                  (f"o{i}", rng.randint(1, 400)))
        prompt = sum(n for _, n in st[:-1])
        if prompt > 3000:
            st = st[:2] + st[-1:]
            prompt = sum(n for _, n in st[:-1])
        jobs.append((i * 0.02 + rng.uniform(0, 0.02), prompt, st[-1][1]))
        streams.append(st)
    done = {}
    k = 0
    while k < len(jobs) or eng.next_event_time() < math.inf:
        if k < len(jobs) and jobs[k][0] <= eng.next_event_time():
            t, p, o = jobs[k]
            eng.add(Seq(k, p, o, prefix=streams[k]), t)
            k += 1
        else:
            for s in eng.advance():
                done[s.call] = s
        assert pc.free_tokens + eng.kv_used() <= eng.cap
        assert eng.kv_used() >= 0 and pc.shared >= 0
    assert len(done) == len(jobs) and not any(s.error for s in done.values())
    assert pc.hit_tokens > 0 and pc.evicted_blocks > 0 and eng.preemptions > 0
    assert not pc.refs and pc.shared == 0


def test_preemptive_engine_with_cache_finishes_everything():
    rng = random.Random(5)
    jobs = [(rng.uniform(0, 5), rng.randint(50, 800), rng.randint(1, 200)) for _ in range(80)]
    streams = [(("sys", 200), (f"u{i}", p - 200), (f"o{i}", o)) for i, (_, p, o) in enumerate(jobs)]
    eng = Engine("e", FlatModel(kv=5000, max_seqs=8, budget=512), key_fn=lambda s, g, w, now: -g,
                 prefix_block_tokens=16)
    ends = drive(eng, jobs, streams)
    assert len(ends) == len(jobs)
    assert eng.prefix_cache.hit_tokens > 0 and not eng.prefix_cache.refs and eng.prefix_cache.shared == 0


# ---- plans: a stage's stream starts with the earlier stage's --------------------------------------------------
def _multi_stage_plan(kind: str):
    """A plan of the first generated task of `kind` with at least three stages (qa: whole transcript; code:
    windowed)."""
    task = generate(60, seed=1, kinds=(kind,))[0]
    template = template_for(kind, load_templates())
    return next(p for k in range(40)
                if (p := plan_workflow(task, template, np.random.default_rng([0, k]))).n_stages >= 3)


def test_whole_transcript_stage_streams_extend_the_previous_call():
    plan = _multi_stage_plan("qa")
    model = plan.models[0]
    outs: list[int] = []
    prev = None
    for s in range(plan.n_stages):
        out = plan.output_tokens(s, model)
        st = plan.token_stream(s, outs, "wf-1", out)
        assert sum(n for _, n in st) == plan.prompt_tokens(s, outs) + out
        if prev is not None:
            assert st[:len(prev)] == prev  # the earlier call's prompt and output lead this prompt
        prev = st
        outs.append(out)
    other = plan.token_stream(1, outs[:1], "wf-2", 7)
    assert other[:3] == prev[:3] and other[3] != prev[3]  # another run shares system + task prompt only


def test_windowed_stage_shares_system_and_task_prompt():
    plan = _multi_stage_plan("code")
    outs = [plan.output_tokens(s, plan.models[0]) for s in range(plan.n_stages)]
    for s in range(plan.n_stages):
        st = plan.token_stream(s, outs[:s], "w", outs[s])
        assert sum(n for _, n in st) == plan.prompt_tokens(s, outs[:s]) + outs[s]


# ---- the simulator ------------------------------------------------------------------------------------------
def _cluster(**extra):
    raw = {"models": [{"profile": "qwen2.5-1.5b@a6000", "name": "qwen2.5-1.5b", "replicas": 2, **extra},
                      {"profile": "qwen2.5-7b@a6000", "name": "qwen2.5-7b", **extra},
                      {"profile": "qwen2.5-14b@a6000", "name": "qwen2.5-14b", **extra}]}
    return cluster_from_dict(raw)


@pytest.fixture(scope="module")
def tasks():
    return generate(200, seed=3, kinds=("qa", "math"))


def _stable(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in VOLATILE}


def test_simulator_off_matches_a_spec_without_the_fields(tasks):
    absent = run_policy(prepare(tasks, _cluster(), seed=3), "chimera", rate=2.0, n_tasks=80, seed=5)
    off = run_policy(prepare(tasks, _cluster(prefix_caching=False, kv_block_tokens=128), seed=3), "chimera",
                     rate=2.0, n_tasks=80, seed=5)
    assert _stable(absent) == _stable(off)
    assert all("prefix_cache" not in e for e in off["engines"].values())


def test_simulator_later_stages_hit_what_the_earlier_stage_left():
    """One replica, ReAct workflows (each prompt is the whole transcript): every later call hits the whole blocks of
    the previous call's prompt and output; stage 0 can hit at most the system and task prompt."""
    cl = cluster_from_dict({"models": [{"profile": "qwen2.5-7b@a6000", "name": "qwen2.5-7b", "prefix_caching": True}]})
    prep = prepare(generate(200, seed=3, kinds=("qa",)), cl, seed=3)
    wfs = prep.workflows(60, 5)
    on = run_policy(prep, "vllm", rate=0.2, workflows=wfs, seed=5)
    block, carried, first = 16, 0, 0
    for _, plan, _ in wfs:
        outs: list[int] = []
        for s in range(plan.n_stages):
            p = plan.prompt_tokens(s, outs)
            if s:
                kv = plan.prompt_tokens(s - 1, outs[:-1]) + outs[-1] - 1  # the last sampled token has no KV
                carried += min(kv // block, (p - 1) // block) * block
            else:
                first += min(sum(plan._pbase) // block, (p - 1) // block) * block
            outs.append(plan.output_tokens(s, "qwen2.5-7b"))
    st = on["engines"]["qwen2.5-7b#0"]["prefix_cache"]
    assert st["evicted_blocks"] == 0
    assert carried <= st["hit_tokens"] <= carried + first
    assert st["hit_rate"] > 0.5
    off = run_policy(prepare(generate(200, seed=3, kinds=("qa",)), _single(), seed=3), "vllm", rate=0.2,
                     workflows=wfs, seed=5)
    assert on["latency_s"]["mean"] < off["latency_s"]["mean"]
    assert on["per_model"] == off["per_model"] and on["accuracy"] == off["accuracy"]


def _single(**extra):
    return cluster_from_dict({"models": [{"profile": "qwen2.5-7b@a6000", "name": "qwen2.5-7b", **extra}]})


def test_simulator_reports_hit_rates_per_replica(tasks):
    on = run_policy(prepare(tasks, _cluster(prefix_caching=True), seed=3), "chimera", rate=2.0, n_tasks=80, seed=5)
    stats = {name: e["prefix_cache"] for name, e in on["engines"].items()}
    assert set(stats) == {"qwen2.5-1.5b#0", "qwen2.5-1.5b#1", "qwen2.5-7b#0", "qwen2.5-14b#0"}
    assert all(s["block_tokens"] == 16 and 0 <= s["hit_tokens"] <= s["queried_tokens"] for s in stats.values())
    assert sum(s["hit_tokens"] for s in stats.values()) > 0


def test_spec_fields_are_validated():
    spec = _cluster(prefix_caching=True, kv_block_tokens=128).models[0]
    assert spec.prefix_caching and spec.kv_block_tokens == 128
    assert default_cluster().models[0].prefix_caching is False
    with pytest.raises(ClusterError, match="kv_block_tokens"):
        _cluster(kv_block_tokens=0)


# ---- the real check: a vLLM CPU server against the engine model -------------------------------------------------
REAL_PROMPT_TOKENS = 1400
VLLM_BLOCK_TOKENS = 128  # vLLM's CPU build


def modelled_repeat(perf, prompt_tokens: int = REAL_PROMPT_TOKENS, block: int = VLLM_BLOCK_TOKENS) -> list[dict]:
    """The engine model's view of one prompt sent twice to an idle replica (one output token each)."""
    eng = Engine("m", perf, prefix_block_tokens=block)
    out = []
    for k, t in enumerate((0.0, 100.0)):
        pc = eng.prefix_cache
        q0, h0 = pc.queried_tokens, pc.hit_tokens
        eng.add(Seq(k, prompt_tokens, 1, prefix=(("prompt", prompt_tokens), ((k, "out"), 1))), t)
        done = []
        while eng.next_event_time() < math.inf:
            done += eng.advance()
        out.append({"queries": pc.queried_tokens - q0, "hits": pc.hit_tokens - h0,
                    "ttft_s": done[0].first_token_s - t})
    return out


def test_modelled_repeat_hits_whole_blocks_of_the_shared_prompt():
    first, second = modelled_repeat(FlatModel(budget=2048))
    assert (first["queries"], first["hits"], second["queries"], second["hits"]) == (1400, 0, 1400, 1280)
    assert second["ttft_s"] < first["ttft_s"]


# ---- the free-context what-if bound (bench sim --free-context) ------------------------------------------------
def test_new_prompt_tokens_are_what_no_earlier_stage_computed():
    plan = _multi_stage_plan("qa")
    model = plan.models[0]
    outs = [plan.output_tokens(s, model) for s in range(plan.n_stages)]
    assert plan.new_prompt_tokens(0, []) == plan.prompt_tokens(0, [])  # nothing before the first call
    for s in range(1, plan.n_stages):
        earlier = plan.token_stream(s - 1, outs[:s - 1], "w", outs[s - 1])
        # a whole-transcript stage: its prompt is the previous call's stream, then the new text
        assert plan.new_prompt_tokens(s, outs[:s]) == plan.prompt_tokens(s, outs[:s]) - sum(n for _, n in earlier)
    win = _multi_stage_plan("code")
    wouts = [win.output_tokens(s, win.models[0]) for s in range(win.n_stages)]
    for s in range(1, win.n_stages):  # a windowed stage: carried outputs and the shared prompts are not new
        assert 1 <= win.new_prompt_tokens(s, wouts[:s]) <= win.prompt_tokens(s, wouts[:s]) - sum(win._pbase)


def test_seq_prefill_tokens_shorten_the_prefill_but_not_the_kv():
    model = FlatModel(budget=2048)
    short = Seq("s", 1400, 4, prefill_tokens=120)
    assert (short.prefill_left, short.kv_prompt) == (120, 1400)
    assert Seq(0, 10, 5, prefill_tokens=0).prefill_left == 1 and Seq(0, 10, 5, prefill_tokens=99).prefill_left == 10
    eng = Engine("e", model)
    eng.add(short, 0.0)
    assert eng.kv_used() >= 1400  # the whole prompt holds KV
    done = []
    while eng.next_event_time() < math.inf:
        done += eng.advance()
    assert done[0].first_token_s == pytest.approx(model.step_time(0, 0, 120))  # as a 1,280-token cache hit would


def test_free_context_bounds_what_affinity_can_save(tasks):
    """With every workflow's earlier context free on every replica, prefill can only shrink: mean latency is at or
    below what caching alone gives."""
    prep = prepare(generate(200, seed=3, kinds=("qa",)), _cluster(prefix_caching=True), seed=3)
    wfs = prep.workflows(80, 5)
    cached = run_policy(prep, "vllm", rate=2.0, workflows=wfs, seed=5)
    free = run_policy(prep, "vllm", rate=2.0, workflows=wfs, seed=5, free_context=True)
    assert free["free_context"] is True and cached["free_context"] is False
    assert free["latency_s"]["mean"] < cached["latency_s"]["mean"]
    assert {m: v["calls"] for m, v in free["per_model"].items()} == {m: v["calls"] for m, v in
                                                                     cached["per_model"].items()}  # round-robin
