"""Speeds learnt live: per-backend decode and prefill estimates from the calls a backend serves (and vLLM's own
inter-token latency counters), blended into the policy's speed figures; checked against the emulated backend's
known speeds, through the real gateway."""

from __future__ import annotations

import math
import threading

import httpx
import pytest

from chimera.backends.kinds.vllm import parse_vllm_gauges
from chimera.emulate import EmulatorServer
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import profile
from chimera.sched.registry import make_policy
from chimera.sched.types import ModelInfo
from chimera.serve import build_gateway
from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
from chimera.serve.live_config import LiveLearningConfig, SpeedsConfig
from chimera.serve.live_speeds import CallTiming, SpeedLearner, figures_moved
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from upstreams import Served

PROFILE = "qwen2.5-7b@a6000"


def _info(name: str = "m", tpot: float = 0.02, tps: float = 2000.0, prefill: float = math.inf,
          curve: tuple = ()) -> ModelInfo:
    return ModelInfo(name=name, tokens_per_s=tps, tpot_s=tpot, max_inflight=8, prefill_tokens_per_s=prefill,
                     speed_curve=curve)


def _timing(backend: str = "b", tokens: int = 101, tpot: float = 0.01, prompt: int = 1000, prefill_s: float = 0.1,
            stream: bool = True, batch: float = 1.0, stage0: bool = True, waiting: bool = False) -> CallTiming:
    first = 1.0 + prefill_s
    return CallTiming(backend, prompt, tokens, 1.0, first if stream else None, first + tpot * (tokens - 1), batch,
                      stage0, waiting)


# ---- the learner, pure -------------------------------------------------------------------------------------------
def test_figures_move_only_after_min_samples_and_blend_to_the_measured():
    cfg = SpeedsConfig(min_samples=4, blend_calls=10)
    learner = SpeedLearner(cfg, [_info()], {"b": "m"})
    for _ in range(3):
        learner.observe(_timing(tpot=0.01))
    assert learner.model_infos()[0] == _info()  # 3 < min_samples: the prior as it was
    learner.observe(_timing(tpot=0.01))
    half = learner.model_infos()[0]  # 4 of 10 samples: 40% of the way from 0.02 to 0.01
    assert half.tpot_s == pytest.approx(0.02 * (1 + 0.4 * (0.5 - 1)))
    for _ in range(10):
        learner.observe(_timing(tpot=0.01))
    full = learner.model_infos()[0]
    assert full.tpot_s == pytest.approx(0.01) and full.tokens_per_s == pytest.approx(4000.0)
    assert learner.backend_speeds()["b"].decode_tokens_per_s == pytest.approx(100.0)
    # prefill: 1000 prompt tokens in 0.1 s per call, blended from an infinite prior (0 s per token)
    assert full.prefill_tokens_per_s == pytest.approx(10_000.0)
    assert figures_moved([_info()], [full]) and not figures_moved([full], [full])


def test_samples_that_say_nothing_are_skipped():
    learner = SpeedLearner(SpeedsConfig(min_decode_tokens=16, min_prompt_tokens=256), [_info()], {"b": "m"})
    learner.observe(_timing(tokens=10))  # too short to time the decode
    learner.observe(_timing(prompt=100))  # prompt too short: the first token's time is mostly overhead
    learner.observe(_timing(stage0=False))  # a later stage: the prompt is mostly the engine's prefix cache
    learner.observe(_timing(waiting=True))  # the engine had a queue: its time to the first token includes it
    learner.observe(_timing(backend="other"))  # a backend it does not know
    seen = learner.backends["b"].seen
    # decode from the three long answers; prefill only from the short answer's long, new, unqueued prompt
    assert seen == {"decode": 3, "engine": 0, "prefill": 1}


def test_a_whole_answer_times_its_decode_net_of_the_prefill():
    learner = SpeedLearner(SpeedsConfig(min_samples=1, blend_calls=1), [_info()], {"b": "m"})
    for _ in range(3):  # streamed: the prefill rate is learnt (1000 tokens / 0.1 s)
        learner.observe(_timing(tpot=0.01, prefill_s=0.1))
    learner.backends["b"].calls.clear()
    learner.observe(_timing(tpot=0.01, prefill_s=0.1, stream=False, tokens=100))
    # dispatch to end = 0.1 + 99 × 0.01; less 1000 × 1e-4 s of prefill, over 100 tokens
    assert learner.backends["b"].calls[0][0] == pytest.approx(0.99 / 100)


def test_decode_ratio_is_taken_at_the_batch_the_call_ran_in():
    """A call at batch 16 as slow as the prior's curve says at 16 is a backend exactly as fast as the prior."""
    curve = ((1, 0.01), (16, 0.02))
    learner = SpeedLearner(SpeedsConfig(min_samples=1, blend_calls=1), [_info(tpot=0.015, curve=curve)], {"b": "m"})
    learner.observe(_timing(tpot=0.02, batch=16))
    learner.observe(_timing(tpot=0.015, batch=8.5))  # halfway along the curve
    learner.observe(_timing(tpot=0.02, batch=40))  # past its end: its last point
    assert [round(r, 9) for _, r in learner.backends["b"].calls] == [1.0, 1.0, 1.0]
    info = learner.model_infos()[0]
    assert info.tpot_s == pytest.approx(0.015) and info.speed_curve == curve


def test_engine_counters_are_preferred_and_survive_resets():
    learner = SpeedLearner(SpeedsConfig(min_samples=1, blend_calls=1, min_decode_tokens=16), [_info()], {"b": "m"})
    learner.observe(_timing(tpot=0.05))  # the client-side sample (network and relay included)
    learner.observe_engine("b", 0.0, 0.0, 1.0)  # the baseline
    learner.observe_engine("b", 0.05, 10.0, 1.0)  # too few tokens: keep counting from the baseline
    assert not learner.backends["b"].engine
    learner.observe_engine("b", 0.2, 20.0, 1.0)  # 20 tokens in 0.2 s since the baseline
    assert learner.backend_speeds()["b"].decode_tokens_per_s == pytest.approx(100.0)
    assert learner.model_infos()[0].tpot_s == pytest.approx(0.01)
    learner.observe_engine("b", 0.01, 1.0, 1.0)  # counters went back (engine restarted): a new baseline
    learner.observe_engine("b", 0.41, 21.0, 1.0)
    assert [round(s[0], 6) for s in learner.backends["b"].engine] == [0.01, 0.02]


def test_vllm_latency_counters_are_parsed_beside_the_gauges():
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge", 'vllm:num_requests_running{model_name="m"} 3.0',
        "# TYPE vllm:inter_token_latency_seconds histogram",
        'vllm:inter_token_latency_seconds_bucket{le="+Inf",model_name="m"} 50.0',
        'vllm:inter_token_latency_seconds_count{model_name="m"} 50.0',
        'vllm:inter_token_latency_seconds_sum{model_name="m"} 1.5', ""])
    assert parse_vllm_gauges(text) == {"running": 3.0, "itl_count": 50.0, "itl_sum_s": 1.5}


def test_update_speeds_rebinds_the_scorer_and_keeps_the_rest():
    infos = [_info("a", tpot=0.02), _info("b", tpot=0.04)]
    policy = make_policy("chimera", lam=0.05)
    policy.bind(infos)
    before = policy.expected_latency([100.0, 100.0]).tolist()
    policy.update_speeds([_info("a", tpot=0.01, tps=4000.0), _info("b", tpot=0.04)])
    after = policy.expected_latency([100.0, 100.0]).tolist()
    assert after[0] == pytest.approx(before[0] / 2) and after[1] == before[1]
    assert [m.max_inflight for m in policy.models] == [8, 8] and policy.models[0].tpot_s == 0.01
    with pytest.raises(ValueError, match="not the bound"):
        policy.update_speeds([_info("b"), _info("a")])


def test_config_block_is_typed_and_refuses_unknown_keys():
    base = {"backends": [{"name": "b", "model": "m", "base_url": "http://x/v1"}]}
    assert gateway_config_from_dict(base).live is None  # off unless asked for
    cfg = gateway_config_from_dict({**base, "live": {"speeds": False, "lengths": {"refresh_s": 5}}}).live
    assert isinstance(cfg, LiveLearningConfig) and not cfg.speeds.enabled and cfg.lengths.refresh_s == 5
    with pytest.raises(GatewayConfigError, match=r"key 'live.speeds.windw': unknown key"):
        gateway_config_from_dict({**base, "live": {"speeds": {"windw": 3}}})
    with pytest.raises(GatewayConfigError, match=r"live.lengths.max_ratio"):
        gateway_config_from_dict({**base, "live": {"lengths": {"max_ratio": 0.5}}})


# ---- through the gateway -----------------------------------------------------------------------------------------
def _stream(url: str, i: int, words: int, max_tokens: int) -> None:
    body = {"model": "chimera", "messages": [{"role": "user", "content": f"{i} " + "word " * words}],
            "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for _ in r.iter_lines():
            pass


def test_estimates_converge_to_the_emulated_backends_speeds(tmp_path):
    """An emulated 7B on an A6000 run 4× faster than real time, behind a gateway told the catalogue's figures: the
    gateway measures the backend 4× faster than the catalogue, and its policy's figures follow."""
    scale = 4.0
    perf = StepTimeModel(profile(PROFILE))
    with EmulatorServer(profile=PROFILE, served_model_name="m7", time_scale=scale) as emu:
        cfg = gateway_config_from_dict({
            "trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False},
            "live": {"speeds": {"min_samples": 4, "blend_calls": 8, "refresh_s": 0.1}, "lengths": False},
            "backends": [{"name": "b0", "model": "m7", "base_url": emu.base_url, "profile": PROFILE}]})
        gw = Served(build_gateway(cfg))
        try:
            prior = gw.gw.policy.models[0]
            _stream(gw.url, -1, 10, 4)  # too short to count: warms the emulator and the tokenizer
            for i in range(8):  # one at a time: nothing queues inside the engine
                _stream(gw.url, i, 3000, 64)
            live = gw.gw.live
            est = live.speeds.backend_speeds()["b0"]
            assert est.samples == {"decode": 8, "engine": 0, "prefill": 8}
            want_decode = scale / perf.decode_tpot(1, 3000)
            assert est.decode_tokens_per_s == pytest.approx(want_decode, rel=0.15)
            # the first token after the prefill and a decode step (the emulator's), plus HTTP: within 20%
            want_prefill = scale * 3000 / perf.prefill_time(3000)
            assert est.prefill_tokens_per_s == pytest.approx(want_prefill, rel=0.2)
            live.push_speeds()
            now = gw.gw.policy.models[0]
            assert now.tpot_s == pytest.approx(prior.tpot_s / scale, rel=0.15)
            assert now.tokens_per_s == pytest.approx(prior.tokens_per_s * scale, rel=0.15)
            assert now.prefill_tokens_per_s == pytest.approx(want_prefill, rel=0.2)
            assert now.max_inflight == prior.max_inflight
            metrics = httpx.get(gw.url + "/metrics").text
            for name in ('chimera_backend_decode_tokens_per_s{backend="b0",model="m7"}',
                         'chimera_backend_prefill_tokens_per_s{backend="b0",model="m7"}',
                         f'chimera_policy_tpot_seconds{{model="m7"}} {now.tpot_s}',
                         'chimera_policy_speed_measured_share{model="m7",part="decode"} 1.0',
                         'chimera_backend_speed_samples_total{backend="b0",kind="decode",model="m7"} 8.0'):
                assert name in metrics, name
        finally:
            gw.stop()
    assert not live._speed_loop.running  # stopped with the gateway


def _routed_to(gw: Served, i: int) -> str:
    _stream(gw.url, i, 10, 20)
    return gw.gw.trace.query("SELECT model FROM calls ORDER BY rowid DESC LIMIT 1")[0]["model"]


def test_the_policy_learns_which_model_is_faster_and_routes_by_it(tmp_path):
    """Two models the catalogue calls equally fast; `fast` is 3× faster in fact, `slow` has the higher size-prior
    confidence (config order). Before any measurement the policy picks `slow`; once both are measured its expected
    latency says `fast` is quicker by more than λ prices the confidence gap, and it picks `fast`."""
    fast, slow = (EmulatorServer(profile=PROFILE, served_model_name=n, time_scale=s) for n, s in
                  (("fast", 12.0), ("slow", 4.0)))
    with fast, slow:
        cfg = gateway_config_from_dict({
            "trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False},
            "policy": {"name": "chimera", "lam": 5.0},
            "live": {"speeds": {"min_samples": 4, "blend_calls": 4, "refresh_s": 0.1}, "lengths": False},
            "backends": [{"name": "f0", "model": "fast", "base_url": fast.base_url, "profile": PROFILE},
                         {"name": "s0", "model": "slow", "base_url": slow.base_url, "profile": PROFILE}]})
        gw = Served(build_gateway(cfg))
        try:
            policy = gw.gw.policy
            assert policy.models[0].tpot_s == policy.models[1].tpot_s
            assert _routed_to(gw, -1) == "slow"
            for i in range(5):  # pinned to each model in turn, so both get measured
                for model in ("slow", "fast"):
                    body = {"model": model, "messages": [{"role": "user", "content": f"{i} go"}],
                            "max_tokens": 48, "stream": True}
                    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as r:
                        for _ in r.iter_lines():
                            pass
            gw.gw.live.push_speeds()
            fast_info, slow_info = policy.models
            assert slow_info.tpot_s / fast_info.tpot_s == pytest.approx(3.0, rel=0.25)
            assert _routed_to(gw, 99) == "fast"
        finally:
            gw.stop()


def test_vllm_latency_counters_feed_the_estimate_through_the_health_checks(tmp_path):
    """A backend whose /metrics exports the inter-token latency histogram: each health round's scrape is a sample
    (the engine's own clock), and the backend's estimate is taken from those."""
    state = {"count": 0.0}

    async def metrics(request):
        state["count"] += 100.0  # 100 more tokens at 5 ms each per scrape
        return PlainTextResponse(
            "# TYPE vllm:inter_token_latency_seconds histogram\n"
            f'vllm:inter_token_latency_seconds_count{{model_name="m"}} {state["count"]}\n'
            f'vllm:inter_token_latency_seconds_sum{{model_name="m"}} {state["count"] * 0.005}\n'
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 1.0\n")

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def health(request):
        return Response()

    up = Served(Starlette(routes=[Route("/metrics", metrics), Route("/v1/models", models), Route("/health", health)]))
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path / "t.sqlite"), "health": {"interval_s": 0.05},
        "live": {"speeds": {"min_samples": 2, "blend_calls": 2}, "lengths": False},
        "backends": [{"name": "b0", "model": "m", "base_url": up.url + "/v1"}]})
    gw = Served(build_gateway(cfg))
    try:
        learner = gw.gw.live.speeds
        deadline = threading.Event()
        for _ in range(100):
            if learner.backends["b0"].seen["engine"] >= 3:
                break
            deadline.wait(0.05)
        assert learner.backend_speeds()["b0"].decode_tokens_per_s == pytest.approx(200.0)
        gw.gw.live.push_speeds()
        assert gw.gw.policy.models[0].tpot_s == pytest.approx(0.005)  # no profile: the default TPOT, replaced
    finally:
        gw.stop()
        up.stop()
