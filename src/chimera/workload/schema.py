"""The workload format: one task per JSONL line, with what each model achieves when it runs the task alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class StageOutcome(BaseModel):
    """One LLM call of a real multi-step run (e.g. a ReAct step) by one model."""

    model_config = ConfigDict(extra="allow")
    output_tokens: int = Field(ge=0)
    prompt_tokens: int | None = Field(default=None, ge=0)
    tool_s: float | None = Field(default=None, ge=0)


class Outcome(BaseModel):
    """What one model achieves on the whole task when it runs every stage."""

    model_config = ConfigDict(extra="allow")
    score: float = Field(ge=0.0, le=1.0)
    output_tokens: int = Field(ge=0)


class Task(BaseModel):
    """A task (one workflow) with per-model outcomes; extra fields are kept."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1)
    kind: str = Field(min_length=1)
    prompt: str
    outcomes: dict[str, Outcome]
    prompt_tokens: int | None = Field(default=None, ge=0)
    arrival_s: float | None = Field(default=None, ge=0)
    # Per-model real per-call detail where the data has it (FireAct ReAct steps, ToRA rounds).
    stages: dict[str, list[StageOutcome]] | None = None
    # How much the task counts in training (None: 1); a traced workflow's clipped inverse propensity.
    weight: float | None = Field(default=None, gt=0)

    @field_validator("outcomes")
    @classmethod
    def _non_empty(cls, v: dict[str, Outcome]) -> dict[str, Outcome]:
        if not v:
            raise ValueError("must name at least one model")
        return v

    @property
    def models(self) -> list[str]:
        return list(self.outcomes)


class WorkloadError(ValueError):
    """A workload file that cannot be read; names the file, line and field."""


@dataclass
class LoadReport:
    """What reading a workload file accepted and skipped (nothing is dropped silently)."""

    path: str
    accepted: int = 0
    skipped_blank: int = 0
    duplicate_ids: list[str] = field(default_factory=list)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(line)"
        parts.append(f"field '{loc}': {e['msg']}")
    return "; ".join(parts)


def iter_tasks(path: str | Path) -> Iterator[tuple[int, Task]]:
    """Yield (line number, task); raise WorkloadError naming the line and field on the first bad line."""
    p = Path(path)
    if not p.exists():
        raise WorkloadError(f"{p}: workload file not found")
    with p.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise WorkloadError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            try:
                yield lineno, Task.model_validate(obj)
            except ValidationError as e:
                raise WorkloadError(f"{p}:{lineno}: {_describe(e)}") from None


def load_tasks(path: str | Path) -> tuple[list[Task], LoadReport]:
    """Read a whole workload file; duplicate ids are an error (they would merge two workflows)."""
    report = LoadReport(path=str(path))
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    with Path(path).open("r", encoding="utf-8") if Path(path).exists() else _missing(path) as fh:
        report.skipped_blank = sum(1 for line in fh if not line.strip())
    for lineno, task in iter_tasks(path):
        if task.id in seen:
            raise WorkloadError(f"{path}:{lineno}: field 'id': duplicate id {task.id!r} (first on line {seen[task.id]})")
        seen[task.id] = lineno
        tasks.append(task)
    if not tasks:
        raise WorkloadError(f"{path}: no tasks in file")
    report.accepted = len(tasks)
    return tasks, report


def _missing(path: str | Path):
    raise WorkloadError(f"{path}: workload file not found")


def write_tasks(tasks: Iterable[Task], path: str | Path) -> int:
    """Write tasks as JSONL (omitting unset optional fields); returns the count written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as fh:
        for t in tasks:
            fh.write(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
            n += 1
    return n
