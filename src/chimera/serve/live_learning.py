"""What the gateway learns from its own traffic while it runs (`live:` in its config): each backend's speeds, pushed
into the policy's speed figures (serve/live_speeds.py), and per-stage lengths refit from the trace store
(serve/live_lengths.py); both on /metrics. The brain stays pure: this body measures and pushes figures in
(`Policy.update_speeds`, `Policy.use_length`); the policy never reads a clock or a file for them."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chimera.sched.policy import Policy
from chimera.sched.types import ModelInfo
from chimera.serve.call import Outcome
from chimera.serve.clock import GatewayClock
from chimera.serve.live_config import LiveLearningConfig
from chimera.serve.live_lengths import LiveLengths
from chimera.serve.live_speeds import CallTiming, SpeedLearner, figures_moved
from chimera.util.periodic import Periodic

if TYPE_CHECKING:
    from chimera.serve.call import CallContext
    from chimera.serve.health import HealthChecker
    from chimera.serve.pool import BackendState

log = logging.getLogger("chimera.serve.live")


def engine_counters(vals: Mapping[str, float]) -> tuple[float, float] | None:
    """(sum, count) of the engine's inter-token latencies in a scrape: vLLM's `inter_token_latency_seconds`, else
    its older `time_per_output_token_seconds` (never both: newer servers export both, of the same tokens)."""
    for s, c in (("itl_sum_s", "itl_count"), ("tpot_sum_s", "tpot_count")):
        if s in vals and c in vals:
            return vals[s], vals[c]
    return None


class LiveLearning:
    """Owns the live learners of one gateway: observes every settled call and every backend scrape, runs the
    background tasks (speed figures every `speeds.refresh_s`, length refits every `lengths.refresh_s`), and is
    stopped by the gateway's lifespan."""

    def __init__(self, cfg: LiveLearningConfig, policy: Policy, priors: Sequence[ModelInfo],
                 backends: Sequence["BackendState"], trace_path: str, run_id: str, clock: GatewayClock) -> None:
        self.cfg, self.policy, self.clock = cfg, policy, clock
        self.speeds = SpeedLearner(cfg.speeds, priors, {be.name: be.cfg.model for be in backends}) \
            if cfg.speeds.enabled else None
        self.speed_updates = 0
        self.lengths: LiveLengths | None = None
        if cfg.lengths.enabled:
            if trace_path == ":memory:":
                log.warning("live.lengths: the trace store is in memory, which another connection cannot read; "
                            "lengths are not refit (give trace_store a file)")
            else:
                self.lengths = LiveLengths(cfg.lengths, policy, trace_path, run_id, self._wall_now)
        self._speed_loop = Periodic(self._push_speeds, cfg.speeds.refresh_s, "updating the policy's speed figures",
                                    logger=log)

    def _wall_now(self) -> float:
        """Wall time on the trace rows' clock (their `queued_at` is the gateway clock's wall reading)."""
        wall = self.clock.wall(self.clock.now())
        assert wall is not None
        return wall

    # ---- hooks ---------------------------------------------------------------------------------------------
    def observe(self, ctx: "CallContext", now: float) -> None:
        """A settled attempt (the call recorder's observer): a successful one is a speed sample of its backend."""
        call, be = ctx.call, ctx.backend
        if self.speeds is None or be is None or ctx.outcome is not Outcome.OK or call.dispatched_s is None \
                or not ctx.completion_tokens:
            return
        self.speeds.observe(CallTiming(
            backend=be.name, prompt_tokens=call.prompt_tokens, completion_tokens=ctx.completion_tokens,
            dispatched_s=call.dispatched_s, first_token_s=ctx.first_token_at, ended_s=now,
            batch=be.inflight + be.remote_inflight + 1 + be.external_calls, first_stage=call.stage == 0,
            engine_waiting=bool(be.scraped_waiting)))

    def on_scrape(self, be: "BackendState", vals: Mapping[str, float]) -> None:
        """A backend's metrics page was read (the health checker): vLLM's latency counters are speed samples."""
        if self.speeds is None or not self.cfg.speeds.engine_metrics:
            return
        counters = engine_counters(vals)
        if counters is not None:
            self.speeds.observe_engine(be.name, counters[0], counters[1], vals.get("running"))

    def push_speeds(self) -> bool:
        """Recompute the figures; push them into the policy when they moved (True then)."""
        if self.speeds is None:
            return False
        new = self.speeds.model_infos()
        if not figures_moved(self.policy.models, new):
            return False
        self.policy.update_speeds(new)
        self.speed_updates += 1
        return True

    # ---- lifespan ------------------------------------------------------------------------------------------
    def start(self, health: "HealthChecker | None" = None) -> None:
        if health is not None:
            health.on_scrape = self.on_scrape
        if self.speeds is not None:
            self._speed_loop.start()
        if self.lengths is not None:
            self.lengths.start()

    async def stop(self) -> None:
        await self._speed_loop.stop()
        if self.lengths is not None:
            await self.lengths.stop()

    async def _push_speeds(self) -> None:
        self.push_speeds()

    def collector(self) -> Collector:
        return _LiveCollector(self)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _LiveCollector(Collector):
    """The learners' state at scrape time: per-backend estimates, the policy's figures, the length refits."""

    def __init__(self, live: LiveLearning) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        yield from self._speeds()
        yield from self._lengths()

    def _speeds(self) -> Iterator[Metric]:
        live = self.live
        tpot = _gauge("chimera_policy_tpot_seconds", "Seconds per output token of one sequence the policy uses",
                      ["model"])
        tps = _gauge("chimera_policy_decode_tokens_per_s",
                     "Decode throughput at a busy batch (all replicas) the policy uses", ["model"])
        pre = _gauge("chimera_policy_prefill_tokens_per_s", "Prefill rate (all replicas) the policy uses",
                     ["model"])
        share = _gauge("chimera_policy_speed_measured_share",
                       "Share of the measured figures in the policy's (0: the prior, 1: measured)", ["model", "part"])
        for m in live.policy.models:
            tpot.add_metric([m.name], m.tpot_s)
            tps.add_metric([m.name], m.tokens_per_s)
            pre.add_metric([m.name], m.prefill_tokens_per_s)
            if live.speeds is not None:
                w_decode, w_prefill = live.speeds.model_weights(m.name)
                share.add_metric([m.name, "decode"], w_decode)
                share.add_metric([m.name, "prefill"], w_prefill)
        yield from (tpot, tps, pre, share)
        if live.speeds is None:
            return
        dec = _gauge("chimera_backend_decode_tokens_per_s",
                     "Output tokens per second of one sequence, measured (median of recent samples)",
                     ["backend", "model"])
        pf = _gauge("chimera_backend_prefill_tokens_per_s",
                    "Prompt tokens per second of one replica until the first token, measured", ["backend", "model"])
        n = CounterMetricFamily("chimera_backend_speed_samples", "Speed samples taken, by kind",
                                labels=["backend", "model", "kind"])
        for name, est in live.speeds.backend_speeds().items():
            model = live.speeds.backends[name].model
            if est.decode_tokens_per_s is not None:
                dec.add_metric([name, model], est.decode_tokens_per_s)
            if est.prefill_tokens_per_s is not None:
                pf.add_metric([name, model], est.prefill_tokens_per_s)
            for kind, count in est.samples.items():
                n.add_metric([name, model, kind], count)
        yield from (dec, pf, n)
        yield CounterMetricFamily("chimera_policy_speed_updates", "Times new speed figures were pushed into the "
                                  "policy", live.speed_updates)

    def _lengths(self) -> Iterator[Metric]:
        lengths = self.live.lengths
        if lengths is None:
            return
        yield CounterMetricFamily("chimera_length_refits", "Length refits from the trace store", lengths.refits)
        yield CounterMetricFamily("chimera_length_refit_failures", "Length refits that failed (logged)",
                                  lengths.failures)
        mode = _gauge("chimera_length_learning", "How refits reach the length predictor (1 for the mode in use)",
                      ["mode"])
        mode.add_metric([lengths.mode], 1.0)
        yield mode
        read = lengths.last
        if read is None or lengths.last_at is None:
            return
        yield _value("chimera_length_refit_rows", "Trace rows the last refit read", read.rows)
        yield _value("chimera_length_refit_seconds", "Seconds the last refit's pass took (on its thread)",
                     read.seconds)
        yield _value("chimera_length_refit_age_seconds", "Seconds since the last refit",
                     time.monotonic() - lengths.last_at)
        cells = len(lengths.wrapper.ratios.cells) if lengths.mode == "calibrate" and lengths.wrapper else \
            len(read.earlier)
        yield _value("chimera_length_cells", "(kind, stage, model) cells in the table in use", cells)
        pred = _gauge("chimera_length_predicted_tokens_mean",
                      "Mean predicted output tokens of this run's calls (as the policy used them) in the window",
                      ["model"])
        actual = _gauge("chimera_length_actual_tokens_mean", "Mean real output tokens of the same calls", ["model"])
        for model, c in sorted(read.per_model.items()):
            if c.n_pred:
                pred.add_metric([model], c.pred / c.n_pred)
                actual.add_metric([model], c.tokens_pred / c.n_pred)
        yield from (pred, actual)


def _value(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    v = float(value)
    return GaugeMetricFamily(name, doc, value=v if math.isfinite(v) else math.nan)
