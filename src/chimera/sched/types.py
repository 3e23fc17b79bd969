"""What the brain sees of a call and of the cluster; both bodies (simulator, gateway) build these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass(slots=True, eq=False)
class Call:
    """One LLM call (a stage of a workflow) as the scheduler sees it at request time."""

    call_id: int
    workflow_id: str
    kind: str
    prompt: str
    stage: int
    prompt_tokens: int
    arrival_s: float
    workflow_arrival_s: float
    generated_so_far: int = 0  # output tokens of earlier stages of this workflow
    pinned_model: str | None = None
    # Workflow affinity: prompt tokens of this call each model already holds in its prefix cache (its best replica),
    # as the body knows it (the simulator asks its engines, the gateway estimates from where the workflow's last
    # stage ran); filled only when the policy uses affinity, empty otherwise. A model not named holds none.
    cached_tokens: dict[str, int] = field(default_factory=dict)
    # Decisions and the inputs behind them, filled by the policy.
    model: str | None = None
    confidences: dict[str, float] = field(default_factory=dict)
    pred_call_tokens: float = 0.0  # predicted output tokens of this call on the chosen model
    pred_remaining_tokens: float = 0.0  # predicted output tokens of the rest of the workflow (this call included)
    priority: float = 0.0  # lower is served earlier
    enqueued_s: float = 0.0
    dispatched_s: float | None = None
    tokens_seen: int = 0  # output tokens reported back so far


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the cluster serves, with speed figures the policy uses to turn tokens into seconds."""

    name: str
    tokens_per_s: float  # aggregate decode throughput of all replicas at a busy batch
    tpot_s: float  # time per output token of one sequence at a typical batch
    max_inflight: int  # calls the gateway lets run on this model at once (all replicas)
    size_rank: int = 0  # 0 = smallest; used by baselines that need a notion of "strong" model
    prefill_tokens_per_s: float = float("inf")  # prompt tokens processed per second (all replicas); long agent contexts
    # The engine's batch-dependent speed, as plain numbers (the brain never imports the engine model): how many
    # replicas serve the model, how many sequences one replica runs at once at a typical context (the smaller of
    # max_num_seqs and its KV room; beyond it calls queue), and its decode speed curve: (batch per replica, seconds
    # per output token at that batch) at a typical context, batch ascending. Empty / 0: unknown (a model without a
    # profile); the batch congestion model then falls back to tokens_per_s.
    replicas: int = 1
    batch_limit: int = 0
    speed_curve: tuple[tuple[int, float], ...] = ()


class Prediction(NamedTuple):
    """What the predictors say of one call, one value per model in the policy's order; a body may compute it off the
    decision path (the gateway's prediction thread) and pass it in, so no per-call state waits in side tables."""

    confidence: np.ndarray
    call_tokens: np.ndarray
    remaining_tokens: np.ndarray
