"""The per-task workflow plan the simulator executes: stage count, per-stage tokens per model, prompts, tool gaps,
and the task's quality for a mixed assignment of models to stages. Built once per task; hot methods are plain
tuple/dict lookups (no pydantic)."""

from __future__ import annotations

import copy
import hashlib
from enum import Enum
from typing import Sequence

import numpy as np

from chimera.workload.schema import StageOutcome, Task
from chimera.workload.templates import WorkflowTemplate

CHARS_PER_TOKEN = 4  # prompt length fallback when a task has no prompt_tokens (rough English/code average)


class QualityRule(str, Enum):
    """How per-model scores combine when stages ran on different models (see docs/templates.md)."""

    WEIGHTED = "weighted"  # sum_i share_i * score(m_i): expected score, fractional credit for 0/1 data
    LAST = "last"  # the final stage's model decides (it writes the answer)
    MIN = "min"  # the weakest model used bounds the task


_RULE_CODE = {QualityRule.WEIGHTED: 0, QualityRule.LAST: 1, QualityRule.MIN: 2}


class UnknownModelError(KeyError):
    """A model the task has no outcome for; the message names the model and the task."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class WorkflowPlan:
    """One task's executable workflow. Stages are 0..n_stages-1; tool_s[i] is the tool time after stage i."""

    __slots__ = ("task_id", "kind", "n_stages", "tool_s", "stage_shares", "stage_roles", "observation_tokens",
                 "rule", "_rule", "_scores", "_totals", "_real", "_cum", "_outs", "_pfixed", "_plo", "_pbase", "_pfull")

    def __init__(self, task_id: str, kind: str, tool_s: tuple[float, ...], stage_shares: tuple[float, ...],
                 cum_shares: tuple[float, ...], stage_roles: tuple[str, ...], observation_tokens: tuple[int, ...],
                 prompt_fixed: tuple[int, ...], prompt_lo: tuple[int, ...], scores: dict[str, float],
                 totals: dict[str, int], real: dict[str, tuple[int, ...]], rule: QualityRule,
                 prompt_base: tuple[int, int] = (0, 0), prompt_full: tuple[bool, ...] | None = None) -> None:
        self.task_id = task_id
        self.kind = kind
        self.n_stages = len(stage_shares)
        self.tool_s = tool_s
        self.stage_shares = stage_shares  # quality weights of the weighted rule; sum to 1
        self.stage_roles = stage_roles
        self.observation_tokens = observation_tokens  # tool output appended after stage i (0 if none)
        self.rule = rule
        self._rule = _RULE_CODE[rule]
        self._scores = scores
        self._totals = totals
        self._real = real
        self._cum = cum_shares
        self._outs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._pfixed = prompt_fixed
        self._plo = prompt_lo
        self._pbase = prompt_base  # (system prompt, task prompt) tokens every stage's prompt starts with
        self._pfull = prompt_full  # per stage: the prompt is the whole transcript so far (None: unknown)

    def __repr__(self) -> str:
        return (f"WorkflowPlan(task_id={self.task_id!r}, kind={self.kind!r}, n_stages={self.n_stages}, "
                f"roles={self.stage_roles}, tool_s={tuple(round(t, 3) for t in self.tool_s)})")

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._scores)

    def _unknown(self, model: object) -> UnknownModelError:
        return UnknownModelError(f"model {model!r} has no outcome for task {self.task_id!r} "
                                 f"(known: {', '.join(sorted(self._scores))})")

    def _build(self, model: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-stage outputs and suffix sums for one model (computed on first use, then cached)."""
        outs = self._real.get(model)
        if outs is None:
            total = self._totals.get(model)
            if total is None:
                raise self._unknown(model)
            outs = _split(total, self._cum)
        suffix, acc = [0] * len(outs), 0
        for i in range(len(outs) - 1, -1, -1):
            acc += outs[i]
            suffix[i] = acc
        entry = (outs, tuple(suffix))
        self._outs[model] = entry
        return entry

    def output_tokens(self, stage: int, model: str) -> int:
        """Tokens `model` generates at `stage` (>= 1)."""
        entry = self._outs.get(model) or self._build(model)
        if stage < 0:
            raise IndexError(f"stage {stage} out of range 0..{self.n_stages - 1}")
        return entry[0][stage]

    def remaining_tokens(self, stage: int, model: str) -> int:
        """Oracle: tokens `model` would generate from `stage` to the end (0 past the last stage)."""
        entry = self._outs.get(model) or self._build(model)
        if stage >= self.n_stages:
            return 0
        if stage < 0:
            raise IndexError(f"stage {stage} out of range 0..{self.n_stages - 1}")
        return entry[1][stage]

    def prompt_tokens(self, stage: int, prev_outputs: Sequence[int]) -> int:
        """Prompt of `stage`: fixed part (task prompt, instructions, observations) + carried earlier outputs."""
        if stage < 0 or stage >= self.n_stages:
            raise IndexError(f"stage {stage} out of range 0..{self.n_stages - 1}")
        lo = self._plo[stage]
        if lo == stage:
            return self._pfixed[stage]
        if len(prev_outputs) < stage:
            raise ValueError(f"prompt_tokens({stage}) needs the outputs of the {stage} earlier stages, "
                             f"got {len(prev_outputs)}")
        return self._pfixed[stage] + int(sum(prev_outputs[lo:stage]))

    def token_stream(self, stage: int, prev_outputs: Sequence[int], run: object,
                     output_tokens: int) -> tuple[tuple[object, int], ...]:
        """The tokens of `stage`'s call as (identity, tokens) segments, prompt then output, for prefix caching
        (perfmodel/prefix.py). Sums to prompt_tokens(stage, prev_outputs) + output_tokens.

        The system prompt is shared by every task of the kind, the task prompt by every run of the task; outputs
        belong to the run (`run`, e.g. the workflow id). A whole-transcript stage following another extends that
        stage's prompt with its output and the new text (observation, instructions), so it starts with the blocks
        the earlier call left; a windowed stage shares only the system and task prompt."""
        fixed, lo, full = self._pfixed, self._plo, self._pfull
        c = stage
        if full is not None:
            while c > 0 and full[c] and full[c - 1]:
                c -= 1
        sys_t, task_t = self._pbase
        tid = self.task_id
        segs: list[tuple[object, int]] = []
        head = fixed[c] - sys_t - task_t
        if head >= 0:
            if sys_t:
                segs.append(((self.kind, "system"), sys_t))
            if task_t:
                segs.append(((tid, "task"), task_t))
            segs.append(((tid, "fixed", c), head))
        else:  # a recorded prompt shorter than the base: nothing known to share
            segs.append(((tid, "prompt", c), fixed[c]))
        if lo[c] != c:
            segs.extend(((run, "out", j), int(prev_outputs[j])) for j in range(lo[c], c))
        for k in range(c + 1, stage + 1):
            segs.append(((run, "out", k - 1), int(prev_outputs[k - 1])))
            segs.append(((tid, "fixed", k), fixed[k] - fixed[k - 1]))
        segs.append(((run, "out", stage), int(output_tokens)))
        return tuple(segs)

    def new_prompt_tokens(self, stage: int, prev_outputs: Sequence[int]) -> int:
        """Tokens of `stage`'s prompt that no earlier stage of the run computed (its newest text, >= 1): what it
        would prefill if everything its workflow computed before were cached wherever it runs (a what-if bound)."""
        seen: set[object] = set()
        for j in range(stage):
            seen.update(sid for sid, _ in self.token_stream(j, prev_outputs, None, int(prev_outputs[j])))
        prompt = self.token_stream(stage, prev_outputs, None, 0)[:-1]
        return max(1, sum(n for sid, n in prompt if sid not in seen))

    def with_scores(self, scores: dict[str, float]) -> "WorkflowPlan":
        """The same workflow (stages, tokens, tools) with other per-model quality: a world model's guess of it, for
        replaying a policy where the true scores are unknown."""
        if set(scores) != set(self._scores):
            raise ValueError(f"task {self.task_id!r}: scores must name the models {sorted(self._scores)}, got "
                             f"{sorted(scores)}")
        twin = copy.copy(self)
        twin._scores = dict(scores)
        return twin

    def score(self, stage_models: Sequence[str]) -> float:
        """Task quality when stage i ran on stage_models[i], by this plan's quality rule."""
        if len(stage_models) != self.n_stages:
            raise ValueError(f"task {self.task_id!r} has {self.n_stages} stages, got {len(stage_models)} models")
        sc = self._scores
        try:
            if self._rule == 0:
                # s0 + sum w_i (s_i - s0) == sum w_i s_i (weights sum to 1), and exactly s0 when homogeneous
                s0 = sc[stage_models[0]]
                acc = s0
                for w, m in zip(self.stage_shares, stage_models):
                    acc += w * (sc[m] - s0)
                return 0.0 if acc < 0.0 else (1.0 if acc > 1.0 else acc)
            if self._rule == 1:
                return sc[stage_models[-1]]
            return min(sc[m] for m in stage_models)
        except KeyError as e:
            raise self._unknown(e.args[0]) from None


def _split_round(total: int, cum: tuple[float, ...]) -> list[int]:
    prev, parts = 0, []
    for c in cum:  # cumulative rounding: parts sum to total exactly
        cur = int(total * c + 0.5)
        parts.append(cur - prev)
        prev = cur
    return parts


def _split(total: int, cum: tuple[float, ...]) -> tuple[int, ...]:
    """Split total by cumulative shares; every stage gets >= 1 and the sum is max(total, n_stages)."""
    n = len(cum)
    parts = _split_round(total, cum)
    if min(parts) >= 1:
        return tuple(parts)
    if total <= n:
        return (1,) * n
    return tuple(1 + p for p in _split_round(total - n, cum))


def _lower_median(values: list[int]) -> int:
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def _extra_int(stage: StageOutcome, name: str) -> int | None:
    v = (stage.model_extra or {}).get(name)
    return None if v is None else max(0, int(v))


def plan_workflow(task: Task, template: WorkflowTemplate, rng: np.random.Generator,
                  rule: QualityRule | str = QualityRule.WEIGHTED) -> WorkflowPlan:
    """Build a task's plan. Same task + template + rng state -> same plan.

    Stage count: with real per-call detail (task.stages), the lower median of the real counts of the models that
    have outcomes; otherwise a draw from template.calls_pmf. A model whose real count equals n_stages keeps its
    real per-stage outputs; any other model's outcomes[m].output_tokens is split by the template's shares.
    Tool times and observation sizes come from the reference model (the first by name with the median count)
    where it recorded them, else from the template's distributions.
    """
    rule = QualityRule(rule)
    outcomes = task.outcomes
    real_stages = {m: st for m, st in (task.stages or {}).items() if st and m in outcomes}
    ref: list[StageOutcome] | None = None
    if real_stages:
        n = _lower_median([len(st) for st in real_stages.values()])
        ref = real_stages[min(m for m, st in real_stages.items() if len(st) == n)]
    else:
        n = template.sample_n_stages(rng)
    lay = template.layout(n)

    # Draw a fixed number of variates whatever the real detail, so rng use depends only on n.
    tool_draw = template.tool_s.draw(rng, n)
    obs_draw = template.observation_tokens.draw(rng, n) if template.observation_tokens is not None else [0.0] * n
    tool_s, obs = [0.0] * n, [0] * n
    for i in range(n - 1):
        real_t = ref[i].tool_s if ref is not None else None
        real_o = _extra_int(ref[i], "observation_tokens") if ref is not None else None
        tool_s[i] = real_t if real_t is not None else (tool_draw[i] if lay.tool[i] else 0.0)
        obs[i] = real_o if real_o is not None else (max(1, int(obs_draw[i] + 0.5)) if lay.tool[i] else 0)

    task_prompt = task.prompt_tokens if task.prompt_tokens is not None else max(1, len(task.prompt) // CHARS_PER_TOKEN)
    base = task_prompt + template.system_prompt_tokens
    fixed, lo, full = [0] * n, [0] * n, [False] * n
    role_cum = 0
    obs_prefix = [0] * (n + 1)
    for i in range(n):
        obs_prefix[i + 1] = obs_prefix[i] + obs[i]
    for i in range(n):
        role_cum += lay.role_prompt[i]
        w = lay.window[i]
        if w is None:  # the whole transcript: every instruction, output and observation so far
            fixed[i], lo[i], full[i] = base + role_cum + obs_prefix[i], 0, True
        else:
            start = max(0, i - w)
            fixed[i], lo[i] = base + lay.role_prompt[i] + obs_prefix[i] - obs_prefix[start], start
            real_p = ref[i].prompt_tokens if ref is not None else None
            if real_p is not None:  # a windowed call with a recorded prompt: use it as is
                fixed[i], lo[i] = real_p, i

    real = {m: tuple(max(1, s.output_tokens) for s in st) for m, st in real_stages.items() if len(st) == n}
    return WorkflowPlan(
        task_id=task.id, kind=task.kind, tool_s=tuple(tool_s), stage_shares=lay.shares, cum_shares=lay.cum_shares,
        stage_roles=lay.roles, observation_tokens=tuple(obs), prompt_fixed=tuple(fixed), prompt_lo=tuple(lo),
        scores={m: o.score for m, o in outcomes.items()}, totals={m: o.output_tokens for m, o in outcomes.items()},
        real=real, rule=rule, prompt_base=(template.system_prompt_tokens, task_prompt), prompt_full=tuple(full),
    )


def task_rng(task_id: str, seed: int = 0) -> np.random.Generator:
    """A per-task generator that depends only on (seed, task id): plans do not depend on planning order."""
    h = int.from_bytes(hashlib.blake2b(task_id.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h])
