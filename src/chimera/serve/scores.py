"""What a workflow's score does at the gateway (POST /v1/chimera/feedback): the admission core's learners learn from it
once, the trace store keeps it as the workflow's one label, and the answer says which happened.

A score is stored (and answered 200) when it taught the online learner (`learnt`) or when no predictor learns from
scores (`ignored`: stored for `chimera train --traces`, as before learning existed). Everything else is refused and
neither learnt nor stored: a workflow scored already (409 `repeated`: the gateway remembers the last
`SCORED_KEPT` scored workflows itself, so a repeat is refused with or without a learner, whether it names the
workflow or one of its responses), one the learner has no decision of (404 `unknown`), one decided longer ago than the
learner's `max_age_s` (410 `late`). A score that is not a finite number in [0, 1] never gets here: the edge refuses it
(400 `invalid`). Every outcome is counted in `chimera_feedback_total{outcome}`. With replicas sharing state, learnt,
repeated, unknown and late are decided for the whole replica set (serve/shared/learning.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chimera.predict.cache import LRUCache
from chimera.sched.predictors import FeedbackOutcome
from chimera.serve.edge import EdgeError
from chimera.serve.metrics import GatewayMetrics
from chimera.serve.pool import BackendPool
from chimera.serve.trace import TraceStore

if TYPE_CHECKING:  # Redis is imported only where state is shared
    from chimera.serve.shared.learning import SharedLearning

SCORED_KEPT = 100_000  # workflows whose score the gateway remembers taking (the oldest are forgotten first)
STORED = (FeedbackOutcome.LEARNT, FeedbackOutcome.IGNORED)
# A refused outcome's answer: (HTTP status, error code, what to tell the client after the workflow's name)
REFUSALS = {
    FeedbackOutcome.REPEATED: (409, "feedback_repeated", "was scored already; a workflow's score is taken once (this "
                                                         "one is neither learnt nor stored)"),
    FeedbackOutcome.UNKNOWN: (404, "unknown_workflow", "has no routing decision awaiting a score here (never routed "
                                                       "by this gateway, or forgotten)"),
    FeedbackOutcome.LATE: (410, "feedback_late", "was decided longer ago than the learner keeps decisions "
                                                 "(learning.max_age_s); the score is neither learnt nor stored"),
    FeedbackOutcome.INVALID: (400, "invalid_feedback", "score must be a finite number in [0, 1]"),
}


class WorkflowScores:
    """Hands each workflow's score to the admission core once and keeps it in the trace store once; with `shared`
    (replicas sharing state), the score is judged and learnt once for the whole replica set."""

    def __init__(self, pool: BackendPool, trace: TraceStore, metrics: GatewayMetrics, kept: int = SCORED_KEPT) -> None:
        self.pool, self.trace, self.metrics = pool, trace, metrics
        self._scored = LRUCache(kept)
        self.shared: SharedLearning | None = None

    async def take(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome:
        """What the score did: learnt or ignored (stored), or why it was refused (nothing stored, nothing learnt)."""
        if self._scored.get(workflow_id):
            outcome = FeedbackOutcome.REPEATED
        elif self.shared is None:
            outcome = self.pool.core.feedback(workflow_id, score, now)
        else:
            outcome = await self.shared.feedback(workflow_id, score, now)
        if outcome in STORED:
            self._scored.put(workflow_id, True)
            self.trace.log_feedback(workflow_id, score)
        self.metrics.feedback.labels(outcome.value).inc()
        return outcome


def refusal(outcome: FeedbackOutcome, workflow_id: str) -> EdgeError:
    """The answer to a score that was refused (an outcome not in STORED), naming the workflow."""
    status, code, what = REFUSALS[outcome]
    return EdgeError(status, f"workflow_id: {workflow_id[:100]!r} {what}", code, outcome.value)
