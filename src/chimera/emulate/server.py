"""The emulated OpenAI-compatible backend: vLLM's HTTP surface on top of `EngineClock` (simulated, not a model)."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from chimera.emulate.chat import completions_endpoint
from chimera.emulate.clock import EngineClock
from chimera.emulate.lengths import WorkloadLengths
from chimera.emulate.responses import create_response, get_response
from chimera.emulate.state import LAT_BUCKETS, EmulatorState, Hist
from chimera.perfmodel.batching import Engine
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import profile as get_profile
from chimera.predict.cache import LRUCache
from chimera.workload.schema import Task

POLICIES = ("fcfs", "priority")


class _EngineCollector(Collector):
    """vLLM metric names, read from the engine at scrape time."""

    def __init__(self, st: EmulatorState) -> None:
        self.st = st

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        st, eng, lab = self.st, self.st.engine, [self.st.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(lab, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(lab, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch (prefill or decode).", eng.n_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", eng.n_waiting)
        yield gauge("chimera_emulator_requests", "Requests the engine holds now (running + waiting).",
                    len(st.clock.active))
        yield gauge("chimera_emulator_peak_requests", "The most requests the engine held at once (running + waiting), "
                    "since start or the last POST /emulator/peak.", st.clock.peak)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1.", min(1.0, eng.kv_used() / max(1, eng.cap)))
        yield counter("vllm:num_preemptions", "Recompute preemptions.", eng.preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens accepted.", st.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Tokens generated.", st.generation_tokens_total)
        ok = CounterMetricFamily("vllm:request_success", "Finished requests by reason.",
                                 labels=["model_name", "finished_reason"])
        for reason, n in st.success.items():
            ok.add_metric([st.model, reason], n)
        yield ok
        yield _histogram("vllm:time_to_first_token_seconds", "TTFT (wall seconds).", lab, st.ttft)
        yield _histogram("vllm:e2e_request_latency_seconds", "End-to-end latency (wall seconds).", lab, st.e2e)


def _histogram(name: str, doc: str, lab: list[str], hist: Hist) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["model_name"])
    buckets = [(repr(b), c) for b, c in zip(LAT_BUCKETS, hist.counts)] + [("+Inf", hist.n)]
    h.add_metric(lab, buckets, hist.total)
    return h


async def _models(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    return JSONResponse({"object": "list", "data": [
        {"id": st.model, "object": "model", "created": 0, "owned_by": "chimera-emulator", "root": st.model,
         "parent": None, "max_model_len": int(st.engine.cap)}]})


async def _health(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    return Response(status_code=503 if st.failed else 200)


async def _peak(request: Request) -> Response:
    """GET: requests held now and the peak; POST: the same, then the peak counts again from now (a test's phase)."""
    clock = request.app.state.emulator.clock
    peak = clock.reset_peak() if request.method == "POST" else clock.peak
    return JSONResponse({"requests": len(clock.active), "peak": peak})


async def _metrics(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    return PlainTextResponse(generate_latest(st.registry), media_type=CONTENT_TYPE_LATEST)


def build_emulator_app(
    profile: str,
    served_model_name: str,
    time_scale: float = 1.0,
    scheduling_policy: str = "fcfs",
    workload: Sequence[Task] | None = None,
    workload_model: str | None = None,
    seed: int = 0,
    fail_after: int | None = None,
    max_num_seqs: int | None = None,
    segment_steps: int = 4,
    max_stored_responses: int = 10_000,
) -> Starlette:
    """An OpenAI-compatible app emulating vLLM serving `profile` (a catalogue `MODEL@GPU`) in scaled real time.

    `fail_after`: the (N+1)-th completion request kills the backend (see EmulatorState.fail).
    `max_num_seqs` overrides the profile's batch limit (tests use 1 to make queueing visible).
    `max_stored_responses` bounds the /v1/responses store (least recently used dropped first).
    """
    if scheduling_policy not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {scheduling_policy!r}")
    spec = get_profile(profile)
    if max_num_seqs is not None:
        spec = spec.model_copy(update={"max_num_seqs": int(max_num_seqs)})
    engine = Engine(served_model_name, StepTimeModel(spec), max_segment_steps=max(1, int(segment_steps)))
    lengths = (WorkloadLengths(workload, workload_model or served_model_name, seed)
               if workload else None)
    clock = EngineClock(engine, time_scale)
    st = EmulatorState(served_model_name, clock, scheduling_policy, lengths, seed, fail_after,
                       responses=LRUCache(max_stored_responses))

    def on_tokens(n: int) -> None:
        st.generation_tokens_total += n

    clock.on_tokens = on_tokens
    st.registry.register(_EngineCollector(st))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clock.start()
        yield
        await clock.stop()

    app = Starlette(routes=[
        Route("/v1/chat/completions", completions_endpoint(chat=True), methods=["POST"]),
        Route("/v1/completions", completions_endpoint(chat=False), methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/emulator/peak", _peak, methods=["GET", "POST"]),
    ], lifespan=lifespan)
    app.state.emulator = st
    return app
