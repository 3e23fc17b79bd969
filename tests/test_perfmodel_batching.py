"""The skip-ahead batching engine must agree step-for-step with a naive per-step engine, and preempt correctly."""

from __future__ import annotations

import math
import random

import pytest

from chimera.perfmodel.batching import Engine, Seq


class FlatModel:
    """Step time depends on batch and prefill only (so skip-ahead is exact)."""

    def __init__(self, kv=10**9, max_seqs=8, budget=64):
        self.kv_capacity_tokens = kv
        self.max_num_seqs = max_seqs
        self.max_num_batched_tokens = budget

    def step_time(self, n_decode, decode_context_tokens, prefill_tokens):
        return 0.010 + 0.001 * n_decode + 0.0001 * prefill_tokens


def run_fast(model, jobs):
    """jobs: list of (arrival, prompt, out). Returns {index: end time} via the event-driven engine."""
    eng = Engine("e", model)
    ends = {}
    pending = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    k = 0
    while k < len(pending) or eng.next_event_time() < math.inf:
        t_arr = jobs[pending[k]][0] if k < len(pending) else math.inf
        if t_arr <= eng.next_event_time() and k < len(pending):
            i = pending[k]
            k += 1
            for s in eng.add(Seq(i, jobs[i][1], jobs[i][2], key=jobs[i][0]), t_arr):
                ends[s.call] = s.end_s
        else:
            t = eng.next_event_time()
            for s in eng.advance():
                ends[s.call] = t
    return ends, eng


def run_naive(model, jobs):
    """Reference: one loop iteration per engine step, FCFS admission, chunked prefill."""
    t = 0.0
    waiting, prefilling, decoding = [], [], {}
    ends = {}
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    k = 0
    while k < len(order) or waiting or prefilling or decoding:
        if not (waiting or prefilling or decoding):
            t = max(t, jobs[order[k]][0])
        while k < len(order) and jobs[order[k]][0] <= t + 1e-12:
            waiting.append(order[k])
            k += 1
        while waiting and len(prefilling) + len(decoding) < model.max_num_seqs:
            i = waiting.pop(0)
            prefilling.append([i, jobs[i][1]])
        budget = max(1, model.max_num_batched_tokens - len(decoding))
        chunks = []
        for p in prefilling:
            if budget <= 0:
                break
            c = min(p[1], budget)
            chunks.append((p, c))
            budget -= c
        tau = model.step_time(len(decoding), 0, sum(c for _, c in chunks))
        t += tau
        for i in list(decoding):
            decoding[i] -= 1
            if decoding[i] == 0:
                ends[i] = t
                del decoding[i]
        for p, c in chunks:
            p[1] -= c
            if p[1] == 0:
                prefilling.remove(p)
                left = jobs[p[0]][2] - 1
                if left <= 0:
                    ends[p[0]] = t
                else:
                    decoding[p[0]] = left
    return ends


@pytest.mark.parametrize("seed", range(6))
def test_skip_ahead_matches_naive_engine(seed):
    rng = random.Random(seed)
    model = FlatModel(max_seqs=rng.choice([2, 4, 16]), budget=rng.choice([16, 64, 512]))
    jobs, t = [], 0.0
    for _ in range(60):
        t += rng.expovariate(20.0)
        jobs.append((t, rng.randint(1, 200), rng.randint(1, 120)))
    fast, _ = run_fast(model, jobs)
    slow = run_naive(model, jobs)
    assert set(fast) == set(slow) == set(range(len(jobs)))
    for i in range(len(jobs)):
        assert fast[i] == pytest.approx(slow[i], abs=1e-9), f"job {i}"


def test_single_request_timing_is_prefill_plus_decode_steps():
    ends, _ = run_fast(FlatModel(budget=512), [(1.0, 100, 5)])
    # one prefill step (n_dec=0, 100 tokens, also samples token 1) then 4 decode steps with one sequence
    assert ends[0] == pytest.approx(1.0 + (0.010 + 0.01) + 4 * 0.011)
    chunked, _ = run_fast(FlatModel(budget=64), [(1.0, 100, 5)])
    # a 64-token budget splits the prompt over two steps (64 + 36 tokens)
    assert chunked[0] == pytest.approx(1.0 + (0.010 + 0.0064) + (0.010 + 0.0036) + 4 * 0.011)


def test_fcfs_order_under_full_batch():
    model = FlatModel(max_seqs=1)
    ends, _ = run_fast(model, [(0.0, 10, 50), (0.001, 10, 5), (0.002, 10, 5)])
    assert ends[0] < ends[1] < ends[2]


def test_priority_key_orders_waiting_queue():
    model = FlatModel(max_seqs=1)
    eng = Engine("e", model)
    eng.add(Seq("running", 10, 50, key=0), 0.0)
    eng.add(Seq("late-but-urgent", 10, 5, key=-5), 0.01)
    eng.add(Seq("early-but-lazy", 10, 5, key=5), 0.005)
    done = []
    while eng.next_event_time() < math.inf:
        done += [s.call for s in eng.advance()]
    assert done == ["running", "late-but-urgent", "early-but-lazy"]


def test_kv_full_preempts_newest_and_recomputes_but_finishes_everything():
    model = FlatModel(kv=400, max_seqs=8, budget=1000)
    eng = Engine("e", model, kv_watermark=0.0)
    for i in range(3):
        eng.add(Seq(i, 100, 150, key=float(i)), 0.0)
    finished = []
    while eng.next_event_time() < math.inf:
        finished += eng.advance()
        assert eng.kv_used() <= 400
    assert sorted(s.call for s in finished) == [0, 1, 2]
    assert eng.preemptions >= 1
    victims = [s for s in finished if s.preemptions]
    assert all(s.call != 0 for s in victims)  # the oldest / highest priority is never the victim
    assert all(s.generated == s.output_tokens for s in finished)


def test_prompt_larger_than_kv_is_rejected_with_reason():
    eng = Engine("e", FlatModel(kv=100))
    out = eng.add(Seq("big", 500, 5), 0.0)
    assert out and "exceeds the KV cache" in out[0].error


def test_preemptive_engine_swaps_in_better_ranked_sequence():
    model = FlatModel(max_seqs=1)
    eng = Engine("e", model, key_fn=lambda s, gen, waited, now: s.key, tick_steps=4)
    eng.add(Seq("long", 10, 400, key=10), 0.0)
    eng.add(Seq("short", 10, 5, key=1), 0.1)
    done = []
    while eng.next_event_time() < math.inf:
        done += [s for s in eng.advance()]
    assert [s.call for s in done] == ["short", "long"]
    assert done[1].generated == 400
