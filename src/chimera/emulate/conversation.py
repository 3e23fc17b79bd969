"""Which workflow stage a request is, for clients that send no Chimera hints: the task is the workload task whose
prompt the conversation's first user message starts with, the stage the number of assistant turns already in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from chimera.emulate.api import ApiError, content_text
from chimera.emulate.lengths import WorkloadLengths, default_n_stages, plausible_length


@dataclass(frozen=True)
class Turns:
    """What the emulator reads from a conversation: its first user message and the assistant turns so far."""

    first_user: str
    assistant: int


@dataclass(frozen=True)
class StagePlan:
    """One call's place in its workflow and the answer planned for it."""

    task_id: str | None  # the workload task replayed (None: outside the workload)
    stage: int
    n_stages: int
    length: int  # planned output tokens
    text: str | None  # recorded answer text, if the workload has one

    @property
    def last(self) -> bool:
        """The workflow's final call (or past it): answer in text, call no tool."""
        return self.stage >= self.n_stages - 1


def hints(body: dict[str, Any], request: Request) -> tuple[str | None, int | None]:
    """(task id, stage) from the `chimera` body object or the X-Chimera-Task-Id / X-Chimera-Stage headers."""
    meta = body.get("chimera")
    task_id, stage = request.headers.get("x-chimera-task-id"), request.headers.get("x-chimera-stage")
    if meta is not None:
        if not isinstance(meta, dict):
            raise ApiError(400, "field 'chimera' must be an object {task_id, stage}", param="chimera")
        task_id = meta.get("task_id", task_id)
        stage = meta.get("stage", stage)
    try:
        stage_i = int(stage) if stage is not None else None
    except (TypeError, ValueError):
        raise ApiError(400, f"workflow stage must be an integer, got {stage!r}", param="chimera") from None
    return (str(task_id) if task_id is not None else None), stage_i


def chat_turns(messages: list[dict[str, Any]]) -> Turns:
    """The first user message's text and the number of assistant messages."""
    first = next((content_text(m.get("content"), "messages") for m in messages if m.get("role") == "user"), "")
    return Turns(first, sum(1 for m in messages if m.get("role") == "assistant"))


def plan_stage(lengths: WorkloadLengths | None, seed: int, hinted: tuple[str | None, int | None], turns: Turns,
               prompt: str) -> StagePlan:
    """Hints first; else the task the first user message starts with, at the stage its assistant turns say. A
    conversation outside the workload gets the default template's stage count seeded by its first user message and
    a plausible length seeded by the whole prompt."""
    task_id, stage = hinted
    if task_id is None and lengths is not None:
        task_id = lengths.match(turns.first_user)
    if stage is None:
        stage = turns.assistant
    if lengths is None or task_id is None or (plan := lengths.plan(task_id)) is None:
        n_stages = default_n_stages(turns.first_user, seed)
        return StagePlan(None, stage, n_stages, plausible_length(prompt, seed), None)
    found = lengths.lookup(task_id, stage)
    length, text = found if found is not None else (plausible_length(prompt, seed), None)
    return StagePlan(task_id, stage, plan.n_stages, length, text)
