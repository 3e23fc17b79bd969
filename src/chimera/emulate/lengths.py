"""How long an emulated answer is, and its text: workload outcomes when the request names (or its conversation
starts with) a task, else a plausible deterministic length (lognormal, median ~150 tokens, seeded by the prompt)."""

from __future__ import annotations

import hashlib
import math
import random
from functools import cache
from typing import Sequence

from chimera.workload.plan import WorkflowPlan, plan_workflow, task_rng
from chimera.workload.schema import Task
from chimera.workload.templates import DEFAULT_KIND, WorkflowTemplate, load_templates, template_for

PLAUSIBLE_MEDIAN = 150
PLAUSIBLE_SIGMA = 0.7
PLAUSIBLE_MAX = 4096
PREFIX_CHARS = 64  # prompts are indexed by their first PREFIX_CHARS characters (shorter ones whole)
TEXT_KEYS = ("text", "output", "response", "completion")  # extra fields that may carry a recorded answer
_FILLER = ("the model considers each step of the task and writes a careful answer with reasons checks "
           "results before it reports what it found").split()


def plausible_length(prompt: str, seed: int = 0) -> int:
    """Deterministic lognormal draw (median PLAUSIBLE_MEDIAN): the same prompt always gets the same length."""
    h = hashlib.blake2b(f"{seed}\x00{prompt}".encode("utf-8"), digest_size=8).digest()
    rng = random.Random(int.from_bytes(h, "little"))
    return max(1, min(PLAUSIBLE_MAX, int(round(rng.lognormvariate(math.log(PLAUSIBLE_MEDIAN), PLAUSIBLE_SIGMA)))))


@cache
def _default_template() -> WorkflowTemplate:
    return template_for(DEFAULT_KIND, load_templates())


def default_n_stages(first_user: str, seed: int = 0) -> int:
    """Stage count of a conversation outside the workload: a draw from the default template's call counts, seeded
    by its first user message (every call of one conversation agrees)."""
    return _default_template().sample_n_stages(task_rng(first_user, seed))


def task_prompt(task: Task) -> str:
    """The text a task's conversation starts with (the agent driver sends `Task <id>` for an empty prompt)."""
    return task.prompt or f"Task {task.id}"


def token_pieces(n: int, text: str | None = None) -> list[str]:
    """Exactly n stream pieces ("tokens"): recorded text cut into n runs of characters, else filler words."""
    if text and len(text) >= n:
        step = len(text) / n
        cuts = [round(i * step) for i in range(n + 1)]
        return [text[cuts[i]:cuts[i + 1]] for i in range(n)]
    return [(" " if i else "") + _FILLER[i % len(_FILLER)] for i in range(n)]


class WorkloadLengths:
    """Per-(task, stage, model) output lengths from a workload, planned as the simulator plans them.

    Stage lengths come from `plan_workflow` with `task_rng(task.id, seed)`: real per-stage detail (task.stages)
    where the model has it, else the model's total output split by the task kind's template shares.
    """

    def __init__(self, tasks: Sequence[Task], model: str, seed: int = 0,
                 templates: dict[str, WorkflowTemplate] | None = None) -> None:
        self.model = model
        self.seed = seed
        self.tasks = {t.id: t for t in tasks}
        if self.tasks and not any(model in t.outcomes for t in self.tasks.values()):
            raise ValueError(f"workload has no outcomes for model {model!r}; pass workload_model= one of "
                             f"{sorted({m for t in self.tasks.values() for m in t.outcomes})[:8]}")
        self._templates = templates
        self._plans: dict[str, WorkflowPlan] = {}
        self._by_prefix: dict[str, list[tuple[str, str]]] = {}  # prompt[:PREFIX_CHARS] -> [(prompt, task id)]
        for t in self.tasks.values():
            p = task_prompt(t)
            self._by_prefix.setdefault(p[:PREFIX_CHARS], []).append((p, t.id))
        self._short = sorted({len(p) for p in self._by_prefix if len(p) < PREFIX_CHARS}, reverse=True)

    def match(self, text: str) -> str | None:
        """The task whose prompt `text` starts with (the longest such prompt), or None: one lookup by the first
        PREFIX_CHARS characters, plus one per distinct shorter prompt length (at most PREFIX_CHARS)."""
        best: tuple[str, str] | None = None
        for p, tid in self._by_prefix.get(text[:PREFIX_CHARS], ()):
            if text.startswith(p) and (best is None or len(p) > len(best[0])):
                best = (p, tid)
        if best is not None:
            return best[1]
        for n in self._short:  # longest first: a prompt that is a prefix of another loses to it
            if n <= len(text):
                hits = self._by_prefix.get(text[:n])
                if hits:
                    return hits[0][1]
        return None

    def plan(self, task_id: str) -> WorkflowPlan | None:
        task = self.tasks.get(task_id)
        if task is None or self.model not in task.outcomes:
            return None
        plan = self._plans.get(task_id)
        if plan is None:
            if self._templates is None:
                self._templates = load_templates()
            plan = plan_workflow(task, template_for(task.kind, self._templates), task_rng(task.id, self.seed))
            self._plans[task_id] = plan
        return plan

    def lookup(self, task_id: str, stage: int) -> tuple[int, str | None] | None:
        """(output tokens, recorded text or None) for this stage, or None when the workload cannot say."""
        plan = self.plan(task_id)
        if plan is None or not 0 <= stage < plan.n_stages:
            return None
        return plan.output_tokens(stage, self.model), self._text(self.tasks[task_id], stage, plan.n_stages)

    def _text(self, task: Task, stage: int, n_stages: int) -> str | None:
        extra: dict = {}
        stages = (task.stages or {}).get(self.model)
        if stages and len(stages) == n_stages:
            extra = stages[stage].model_extra or {}
        elif n_stages == 1:
            extra = task.outcomes[self.model].model_extra or {}
        for key in TEXT_KEYS:
            if isinstance(extra.get(key), str) and extra[key]:
                return extra[key]
        return None
