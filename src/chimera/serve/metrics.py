"""Prometheus metrics: live scheduler state read at scrape time, plus latency histograms and outcome counters."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from chimera.serve.pool import BackendPool
    from chimera.serve.trace import TraceStore

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Live(Collector):
    """Queue depth, in-flight calls and predicted tokens, decisions: exact values straight from the scheduler."""

    def __init__(self, sched: "BackendPool") -> None:
        self.sched = sched

    def collect(self) -> Iterator[Metric]:
        s, pol = self.sched, self.sched.policy
        q = GaugeMetricFamily("chimera_queue_depth", "Calls waiting in the gateway queue", labels=["model"])
        c = GaugeMetricFamily("chimera_inflight_calls", "Calls running on the model's backends", labels=["model"])
        t = GaugeMetricFamily("chimera_inflight_predicted_tokens",
                              "Predicted output tokens still owed by the model (queued + running)", labels=["model"])
        d = CounterMetricFamily("chimera_decisions", "Calls the policy assigned to the model", labels=["model"])
        for m in s.models:
            q.add_metric([m], s.waiting(m))
            c.add_metric([m], s.inflight[m])
            t.add_metric([m], pol.monitor.pred_tokens.get(m, 0.0))
            d.add_metric([m], pol.decisions.get(m, 0))
        b = GaugeMetricFamily("chimera_backend_inflight_calls", "Calls running on one backend",
                              labels=["backend", "model"])
        up = GaugeMetricFamily("chimera_backend_up", "1 if the backend passed its last health check, else 0",
                               labels=["backend", "model"])
        scraped = {
            "scraped_running": GaugeMetricFamily("chimera_backend_running",
                                                 "Requests running, scraped from the backend's /metrics",
                                                 labels=["backend", "model"]),
            "scraped_waiting": GaugeMetricFamily("chimera_backend_waiting",
                                                 "Requests waiting, scraped from the backend's /metrics",
                                                 labels=["backend", "model"]),
            "kv_cache_usage": GaugeMetricFamily("chimera_backend_kv_cache_usage",
                                                "KV-cache usage 0-1, scraped from the backend's /metrics",
                                                labels=["backend", "model"]),
        }
        for m, bes in s.backends.items():
            for be in bes:
                b.add_metric([be.name, m], be.inflight)
                up.add_metric([be.name, m], 1.0 if be.healthy else 0.0)
                for attr, fam in scraped.items():
                    v = getattr(be, attr)
                    if v is not None:  # no sample for a backend that exposes no such gauge
                        fam.add_metric([be.name, m], v)
        yield from (q, c, t, d, b, up, *scraped.values())
        info = GaugeMetricFamily("chimera_predictors_info", "The version of the predictors new calls are decided "
                                 "with (a reload changes it), always 1", labels=["version"])
        info.add_metric([s.predictor_version or ""], 1.0)
        yield info


# The online learner's counters shown on /metrics (chimera.predict.bandit.LinearBandit.stats): name -> help.
LEARNER_STATS = {
    "decided": "Routing decisions the online learner took part in",
    "explored": "Decisions where it explored (routed away from the policy's choice to learn)",
    "explored_share": "Share of decisions explored so far",
    "epsilon": "Exploration probability in force now",
    "learnt": "Workflows whose score it learnt from",
    "learnt_calls": "Calls it learnt from (each workflow's score teaches every call of it)",
    "pending": "Workflows decided and awaiting their score",
    "evicted": "Pending workflows forgotten to keep the table bounded (a later score is unknown)",
}


class _Learners(Collector):
    """The online learner's statistics, read from it at scrape time (absent when no predictor learns from scores)."""

    def __init__(self, sched: "BackendPool") -> None:
        self.sched = sched

    def collect(self) -> Iterator[Metric]:
        learner = next((x for x in self.sched.core.reward_learners if hasattr(x, "stats")), None)
        if learner is None:
            return
        st = learner.stats()
        for key, doc in LEARNER_STATS.items():
            if isinstance(st.get(key), (int, float)):
                yield GaugeMetricFamily(f"chimera_learner_{key}", doc, float(st[key]))


class _Trace(Collector):
    """The trace writer's state, so a stalled or dropping writer shows on the dashboard, not only in the logs."""

    def __init__(self, trace: "TraceStore") -> None:
        self.trace = trace

    def collect(self) -> Iterator[Metric]:
        st = self.trace.stats()
        yield GaugeMetricFamily("chimera_trace_writer_up", "1 while the trace writer thread runs", float(st["alive"]))
        yield GaugeMetricFamily("chimera_trace_backlog", "Trace rows queued, not yet written", st["backlog"])
        yield CounterMetricFamily("chimera_trace_rows_written", "Trace rows committed", st["written"])
        yield CounterMetricFamily("chimera_trace_rows_dropped",
                                  "Trace rows lost: the queue was full or the row could not be stored", st["dropped"])


class GatewayMetrics:
    """One registry per gateway (several gateways can live in one process, e.g. in tests)."""

    def __init__(self, sched: "BackendPool", trace: "TraceStore | None" = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Live(sched))
        self.registry.register(_Learners(sched))
        if trace is not None:
            self.registry.register(_Trace(trace))
        r = self.registry
        self.latency = Histogram("chimera_request_latency_seconds", "Arrival at the gateway to last byte",
                                 ["model"], buckets=BUCKETS, registry=r)
        self.queue_wait = Histogram("chimera_queue_wait_seconds", "Arrival to dispatch to a backend",
                                    ["model"], buckets=BUCKETS, registry=r)
        self.ttft = Histogram("chimera_ttft_seconds", "Arrival to first streamed token", ["model"],
                              buckets=BUCKETS, registry=r)
        self.requests = Counter("chimera_requests", "Calls by outcome", ["model", "status"], registry=r)
        # Every call's children, looked up once per label values (labels() takes a lock and checks them each time).
        self.latency_of = functools.cache(self.latency.labels)
        self.queue_wait_of = functools.cache(self.queue_wait.labels)
        self.ttft_of = functools.cache(self.ttft.labels)
        self.requests_of = functools.cache(self.requests.labels)
        self.retries = Counter("chimera_retries", "Calls re-scheduled after a backend fault", ["model"], registry=r)
        self.rejected = Counter("chimera_rejected", "Requests refused at the edge or by backpressure",
                                ["endpoint", "reason"], registry=r)
        self.internal_errors = Counter("chimera_internal_errors", "Requests that hit a gateway bug (500)",
                                       ["endpoint"], registry=r)
        self.feedback = Counter("chimera_feedback", "Workflow scores posted, by what they did (learnt, ignored: "
                                "stored without a learner; repeated, unknown, late, invalid: refused)", ["outcome"],
                                registry=r)
        self.reloads = Counter("chimera_reloads", "Predictor reloads (admin endpoint or SIGHUP): ok, or refused "
                               "with the old predictors kept", ["result"], registry=r)
