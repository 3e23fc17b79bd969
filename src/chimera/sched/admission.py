"""The one admission core both bodies run: submit → dispatch while a model has room → progress → complete / fail.

Pure: time comes in as `now`, and what is the body's own comes in as hooks — `place(model, call, now)` chooses the
replica a dispatched call runs on (an engine of the simulator, a backend of the gateway), `start(call, replica, now)`
hands it over, `release(call, replica, now)` (optional) frees what the body held for it. The core owns the rest:
per-model capacity and in-flight counts, the policy's queue, which replica each running call holds, the progress
granularity, online learning of the predictors, and an optional record of every event as a value (the replay test
runs a simulator's record through the gateway's side). So the same policy makes the same decisions in both bodies
for the same event sequence, by construction.

Progress granularity: the policy sees a call's tokens when the call ends, in both bodies. The simulator learns
a call's tokens only then; the gateway's stream relay reports chunks as they come, and the core holds them until the
call ends (they are forwarded with the completion), so the congestion term moves the same way in both.

Preemptive policies rank running work inside the engine (`Policy.engine_key`): admission lets every call through
(capacity unlimited) and the engine ranks them. Only the simulator's engine can do that; a body without in-engine
control reads the capability (`Policy.preemptive`) and refuses them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Generic, Mapping, NamedTuple, Sequence, TypeVar, Union

from chimera.sched.decision import Decision
from chimera.sched.policy import Policy
from chimera.sched.predictors import FeedbackOutcome, OnlineLearner, RewardLearner
from chimera.sched.types import Call, ModelInfo, Prediction

R = TypeVar("R")  # the body's replica handle
_ABSENT: Any = object()

# The fields of a Call a body sets at submit time (what a replay needs to rebuild it; not `ctx`).
CALL_FIELDS = ("call_id", "workflow_id", "kind", "prompt", "stage", "prompt_tokens", "arrival_s",
               "workflow_arrival_s", "generated_so_far", "pinned_model", "cached_tokens")


class Submitted(NamedTuple):
    now: float
    call: Mapping[str, Any]  # CALL_FIELDS
    prediction: Prediction | None
    allowed: tuple[str, ...] | None
    decision: Decision


class Dispatched(NamedTuple):
    now: float
    call_id: int
    model: str


class Progressed(NamedTuple):
    now: float
    call_id: int
    tokens: int


class Completed(NamedTuple):
    now: float
    call_id: int
    tokens: int  # tokens reported with the completion (not those reported by `progress` before)


class Failed(NamedTuple):
    now: float
    call_id: int


class Withdrawn(NamedTuple):
    now: float
    call_id: int


class WorkflowEnded(NamedTuple):
    now: float
    workflow_id: str


class Scored(NamedTuple):
    now: float
    workflow_id: str
    score: float


Event = Union[Submitted, Dispatched, Progressed, Completed, Failed, Withdrawn, WorkflowEnded, Scored]


class Admission(Generic[R]):
    """Admission control per model in front of one Policy, driven the same way by the simulator and the gateway."""

    def __init__(
        self,
        policy: Policy,
        models: Sequence[ModelInfo],
        place: Callable[[str, Call, float], R],
        start: Callable[[Call, R, float], None] | None = None,
        release: Callable[[Call, R, float], None] | None = None,
        capacity: Mapping[str, float] | None = None,
        learners: Sequence[OnlineLearner] | None = None,
        record: Callable[[Event], None] | None = None,
    ) -> None:
        self.policy = policy
        policy.bind(list(models))
        self.models = [m.name for m in models]
        if policy.preemptive:  # the engine ranks everything it holds: let every call through
            self.capacity = {m: math.inf for m in self.models}
        else:
            self.capacity = {m.name: m.max_inflight for m in models} if capacity is None else {
                m: capacity[m] for m in self.models}
        self.inflight = {m: 0 for m in self.models}
        self.waiting_total = 0
        self._place, self._start, self._release = place, start, release
        self._given_learners = None if learners is None else list(learners)
        self.record = record
        # The policy's predictors `_learning` was read from: a reload swaps them, and the learners follow.
        self._learners_of: tuple[object, object] = (_ABSENT, _ABSENT)
        self._learning: tuple[list[OnlineLearner], list[RewardLearner]] = ([], [])
        self._placed: dict[int, R] = {}  # call_id -> replica, while the call runs
        self._held: dict[int, int] = {}  # call_id -> tokens reported by `progress`, forwarded when the call ends
        self._dispatching: set[str] = set()

    # ---- set-up --------------------------------------------------------------------------------------------
    def prepare(self, train_calls: Sequence[Call]) -> None:
        """Calibrate the policy on calls of training tasks (RouteLLM's threshold)."""
        self.policy.prepare(train_calls)

    # ---- reading -------------------------------------------------------------------------------------------
    def waiting(self, model: str) -> int:
        return self.policy.waiting(model)

    def has_room(self, model: str) -> bool:
        return self.inflight[model] < self.capacity[model]

    def can_dispatch(self, model: str) -> bool:
        """`dispatch(model)` would start a call now: the model has room and a call waits for it."""
        return self.inflight[model] < self.capacity[model] and self.policy.waiting(model) > 0

    def replica(self, call: Call) -> R | None:
        """Where the call runs (None: not dispatched, or ended)."""
        return self._placed.get(call.call_id)

    def running(self, call: Call) -> bool:
        return call.call_id in self._placed

    def n_running(self) -> int:
        """Calls dispatched and not yet ended (a leak check reads this)."""
        return len(self._placed)

    # ---- the protocol ----------------------------------------------------------------------------------------
    def submit(self, call: Call, now: float, prediction: Prediction | None = None,
               allowed: Sequence[str] | None = None) -> Decision:
        """Route (unless pinned) among `allowed` (default: all models), enqueue, and dispatch what fits.
        The body passes the Prediction it obtained (else it is computed here, when the policy uses one)."""
        policy = self.policy
        if prediction is None and policy.needs_predictions:
            prediction = policy.predict(call)
        decision = policy.admit(call, now, prediction, allowed)
        self.waiting_total += 1
        if self.record is not None:
            self.record(Submitted(now, {f: getattr(call, f) for f in CALL_FIELDS}, prediction,
                                  None if allowed is None else tuple(allowed), decision))
        for learner in self.reward_learners:
            learner.decided(call, decision, now)
        self.dispatch(decision.model, now)
        return decision

    def dispatch(self, model: str, now: float) -> int:
        """Move calls from the model's queue to its replicas while it has room; the number started.
        A call made from a body hook while this model is being dispatched is a no-op: the running loop sees the room."""
        if self.inflight[model] >= self.capacity[model] or model in self._dispatching:
            return 0
        self._dispatching.add(model)
        n = 0
        try:
            while self.inflight[model] < self.capacity[model]:
                call = self.policy.next_call(model, now)
                if call is None:
                    break
                self.waiting_total -= 1
                try:
                    replica = self._place(model, call, now)
                except BaseException:  # the body's hook failed: the call goes back to its queue, nothing is lost
                    self.policy.requeue(call)
                    self.waiting_total += 1
                    raise
                self.inflight[model] += 1
                self._placed[call.call_id] = replica
                n += 1
                if self.record is not None:
                    self.record(Dispatched(now, call.call_id, model))
                if self._start is not None:
                    self._start(call, replica, now)
        finally:
            self._dispatching.discard(model)
        return n

    def progress(self, call: Call, new_tokens: int, now: float) -> None:
        """Tokens streamed back; the policy sees them when the call ends (the one granularity of both bodies)."""
        if new_tokens <= 0 or call.call_id not in self._placed:
            return
        self._held[call.call_id] = self._held.get(call.call_id, 0) + new_tokens
        if self.record is not None:
            self.record(Progressed(now, call.call_id, new_tokens))

    def complete(self, call: Call, now: float, new_tokens: int = 0) -> None:
        """The call finished: its tokens (held progress + `new_tokens`) and completion reach the policy, the
        learners observe it, its slot is freed and the model's queue dispatched."""
        if self.record is not None:
            self.record(Completed(now, call.call_id, new_tokens))
        tokens = self._held.pop(call.call_id, 0) + new_tokens
        try:
            if tokens:
                self.policy.on_progress(call, tokens, now)
            self.policy.on_complete(call, now)
            for learner in self.learners:
                learner.learn(call, call.tokens_seen)
        except BaseException:
            self.policy.monitor.remove(call)  # a policy that failed half-way must not keep the call's load
            raise
        finally:  # whatever the policy does, the slot is freed
            self._free(call, now)

    def fail(self, call: Call, now: float) -> None:
        """The call failed on its replica (or was cancelled after dispatch): free the slot, dispatch the next."""
        if self.record is not None:
            self.record(Failed(now, call.call_id))
        self._held.pop(call.call_id, None)
        try:
            self.policy.on_fail(call, now)
        except BaseException:
            self.policy.monitor.remove(call)
            raise
        finally:
            self._free(call, now)

    def withdraw(self, call: Call, now: float) -> bool:
        """Take a call that was never dispatched out of its queue and the load monitor; True if it was waiting."""
        waited = self.policy.withdraw(call, now)
        if waited:
            self.waiting_total -= 1
            if self.record is not None:
                self.record(Withdrawn(now, call.call_id))
        return waited

    def abandon(self, call: Call, now: float) -> None:
        """The call's life ended without completing, wherever it was: running (fail: free the slot), waiting
        (withdraw) or half-submitted (forget its predicted load). Safe to call more than once."""
        if call.call_id in self._placed:
            self.fail(call, now)
        else:
            self.withdraw(call, now)

    def _predictors_that_learn(self) -> tuple[list[OnlineLearner], list[RewardLearner]]:
        """The policy's predictors that learn from completions and from workflow scores, re-read whenever the policy's
        predictors were swapped (a reload), so no body has to tell the core."""
        pair = (self.policy.confidence, self.policy.length)
        if pair[0] is not self._learners_of[0] or pair[1] is not self._learners_of[1]:
            self._learners_of = pair
            online = [p for p in pair if isinstance(p, OnlineLearner)]
            self._learning = (online if self._given_learners is None else self._given_learners,
                              [pair[0]] if isinstance(pair[0], RewardLearner) else [])
        return self._learning

    @property
    def learners(self) -> list[OnlineLearner]:
        """What the core feeds each completed call: the given learners, else the policy's online learners (the
        gateway's running per-stage means)."""
        return self._predictors_that_learn()[0]

    @property
    def reward_learners(self) -> list[RewardLearner]:
        """The policy's predictors that learn from workflow scores."""
        return self._predictors_that_learn()[1]

    def feedback(self, workflow_id: str, score: float, now: float) -> FeedbackOutcome:
        """A workflow's score (bandit feedback: the outcome of the models it ran on) reaches the learners that learn
        from scores; what it did, or why not (a score teaches once, and only a finite score in [0, 1])."""
        if self.record is not None:
            self.record(Scored(now, workflow_id, score))
        learners = self.reward_learners
        if not learners:
            return FeedbackOutcome.IGNORED
        if not (isinstance(score, (int, float)) and 0.0 <= score <= 1.0):  # NaN fails too
            return FeedbackOutcome.INVALID
        outcomes = [learner.reward(workflow_id, float(score), now) for learner in learners]
        return outcomes[0]  # the policy has one confidence predictor: one learner at most

    def end_workflow(self, workflow_id: str, now: float = 0.0) -> None:
        if self.record is not None:
            self.record(WorkflowEnded(now, workflow_id))
        self.policy.on_workflow_end(workflow_id)

    def _free(self, call: Call, now: float) -> None:
        replica = self._placed.pop(call.call_id, _ABSENT)
        if replica is _ABSENT:
            return  # never dispatched, or freed already: nothing to free
        model = call.model
        assert model is not None
        self.inflight[model] -= 1
        if self._release is not None:
            self._release(call, replica, now)
        self.dispatch(model, now)
