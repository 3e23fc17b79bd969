"""Workflow templates per task kind: how many LLM calls a task makes, how its output splits over them, and the
prompt growth and tool gaps between calls. Numbers live in templates.yaml; `derive_template_parameters`
recomputes the data-derived ones from the public traces (see docs/templates.md)."""

from __future__ import annotations

import bisect
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PATH = Path(__file__).with_name("templates.yaml")
DEFAULT_KIND = "default"


class Lognormal(BaseModel):
    """A positive quantity drawn as median · exp(sigma · N(0,1)), capped at `max`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)
    max: float | None = Field(default=None, gt=0)

    def draw(self, rng: np.random.Generator, size: int) -> list[float]:
        """`size` independent draws (always consumes `size` normals, so rng use does not depend on values)."""
        z = rng.standard_normal(size)
        vals = np.exp(math.log(self.median) + self.sigma * z)
        if self.max is not None:
            np.minimum(vals, self.max, out=vals)
        return vals.tolist()


class StageRole(BaseModel):
    """What one kind of LLM call in the workflow looks like (e.g. a ReAct step, a final answer, a reflection)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean_output_tokens: float = Field(gt=0)  # relative size: shares are these, normalised over the stages
    tool: bool = False  # a tool runs after this call: tool time, and its observation is appended to the context
    prompt_tokens: int = Field(default=0, ge=0)  # fixed instruction/few-shot tokens this call's own prompt adds
    window: int | None = Field(default=None, ge=0)  # this call's context window (last k stages); None: template's


class StageLayout(BaseModel):
    """Per-n precomputed layout of a template: role name, output share, tool flag, role prompt per stage."""

    model_config = ConfigDict(frozen=True)
    roles: tuple[str, ...]
    shares: tuple[float, ...]
    cum_shares: tuple[float, ...]  # cum_shares[i] = sum(shares[: i + 1]); last is exactly 1.0
    tool: tuple[bool, ...]  # tool after stage i (always False for the last stage)
    role_prompt: tuple[int, ...]
    window: tuple[int | None, ...]  # per stage: None = every earlier stage, k = the last k stages


class WorkflowTemplate(BaseModel):
    """The shape of one task kind's workflow: call count distribution, stage roles, context and tool model.

    Stage roles for an n-call task: the first n (or n-1 when `last` is set) entries of `pattern`, continuing by
    repeating `pattern[repeat_from:]`, then `last`. A 1-call task is just `last` (or pattern[0]).
    """

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    calls_pmf: dict[int, float]
    roles: dict[str, StageRole]
    pattern: list[str] = Field(min_length=1)
    repeat_from: int = Field(default=0, ge=0)
    last: str | None = None
    system_prompt_tokens: int = Field(default=0, ge=0)  # added to the task prompt at stage 0 (chat/format header)
    context_window: int | None = Field(default=None, ge=0)  # None: all earlier stages carried; k: the last k
    observation_tokens: Lognormal | None = None  # tool output appended after a tool stage (None: nothing)
    tool_s: Lognormal

    @model_validator(mode="after")
    def _check(self) -> WorkflowTemplate:
        if not self.calls_pmf or min(self.calls_pmf) < 1:
            raise ValueError("calls_pmf needs call counts >= 1")
        if any(p < 0 for p in self.calls_pmf.values()) or abs(sum(self.calls_pmf.values()) - 1.0) > 1e-3:
            raise ValueError(f"calls_pmf must be non-negative and sum to 1 (sums to {sum(self.calls_pmf.values())})")
        names = [*self.pattern, *([self.last] if self.last else [])]
        unknown = sorted({r for r in names if r not in self.roles})
        if unknown:
            raise ValueError(f"pattern/last name roles not in roles: {unknown}")
        if self.repeat_from >= len(self.pattern):
            raise ValueError("repeat_from must index into pattern")
        return self

    @property
    def carry_context(self) -> bool:
        """Whether later prompts include earlier outputs and observations at all."""
        return self.context_window != 0

    @property
    def max_stages(self) -> int:
        return max(self.calls_pmf)

    # Caches read once per planned workflow: cached properties, since a pydantic private attribute costs microseconds
    # per read (its __getattr__ fallback) and planning reads them ~2 times per workflow.
    @cached_property
    def _sampler(self) -> tuple[list[float], list[int]]:
        """calls_pmf as (cumulative probabilities, call counts), counts ascending."""
        ns = sorted(self.calls_pmf)
        total = sum(self.calls_pmf[n] for n in ns)
        cum, acc = [], 0.0
        for n in ns:
            acc += self.calls_pmf[n] / total
            cum.append(acc)
        cum[-1] = 1.0
        return cum, ns

    @cached_property
    def _layouts(self) -> dict[int, StageLayout]:
        """Per-n layouts computed so far (see `layout`)."""
        return {}

    def sample_n_stages(self, rng: np.random.Generator) -> int:
        """One draw from calls_pmf (one uniform; cheaper than rng.choice with p)."""
        cum, ns = self._sampler
        return ns[min(bisect.bisect_right(cum, rng.random()), len(ns) - 1)]

    def role_sequence(self, n: int) -> tuple[str, ...]:
        """Role name of each of n stages (pattern, then its repeating tail, then `last`)."""
        if n < 1:
            raise ValueError(f"a workflow needs at least one stage, got {n}")
        body_n = n - 1 if self.last else n
        cycle = self.pattern[self.repeat_from :]
        body = [self.pattern[i] if i < len(self.pattern) else cycle[(i - len(self.pattern)) % len(cycle)]
                for i in range(body_n)]
        return tuple(body + ([self.last] if self.last else []))

    def layout(self, n: int) -> StageLayout:
        """Cached per-n layout; shares are role output means normalised to sum to 1."""
        lay = self._layouts.get(n)
        if lay is None:
            names = self.role_sequence(n)
            roles = [self.roles[r] for r in names]
            weights = [r.mean_output_tokens for r in roles]
            total = sum(weights)
            shares = tuple(w / total for w in weights)
            cum, acc = [], 0.0
            for s in shares:
                acc += s
                cum.append(acc)
            cum[-1] = 1.0
            tool = tuple(r.tool and i < n - 1 for i, r in enumerate(roles))
            lay = StageLayout(roles=names, shares=shares, cum_shares=tuple(cum), tool=tool,
                              role_prompt=tuple(r.prompt_tokens for r in roles),
                              window=tuple(self.context_window if r.window is None else r.window for r in roles))
            self._layouts[n] = lay
        return lay

    def shares(self, n: int) -> tuple[float, ...]:
        """Each stage's share of the task's output tokens in an n-call workflow."""
        return self.layout(n).shares


# ---------------------------------------------------------------------------------------------------- loading


def load_templates(path: str | Path | None = None) -> dict[str, WorkflowTemplate]:
    """Read templates.yaml (or `path`); keys are task kinds, and "default" must be present."""
    p = Path(path) if path is not None else DEFAULT_PATH
    with p.open("r", encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    section = raw.get("templates", raw) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{p}: expected a mapping of kind -> template under 'templates'")
    out: dict[str, WorkflowTemplate] = {}
    for kind, body in section.items():
        if str(kind).startswith("_"):  # YAML anchors / shared blocks
            continue
        try:
            out[str(kind)] = WorkflowTemplate.model_validate(body)
        except ValueError as e:
            raise ValueError(f"{p}: template {kind!r}: {e}") from None
    if DEFAULT_KIND not in out:
        raise ValueError(f"{p}: no '{DEFAULT_KIND}' template")
    return out


def template_for(kind: str, templates: dict[str, WorkflowTemplate]) -> WorkflowTemplate:
    """The template of `kind`, or the "default" template for kinds without their own."""
    t = templates.get(kind)
    if t is not None:
        return t
    try:
        return templates[DEFAULT_KIND]
    except KeyError:
        raise KeyError(f"no template for kind {kind!r} and no '{DEFAULT_KIND}' template") from None


# ---------------------------------------------------------------------------------------------------- derivation
# Recomputes the data-derived numbers of templates.yaml from the public traces (read at run time, never copied).

FIREACT_HEADER_TOKENS_TEXT = (  # FireAct generation.py prepare_prompt(), minus the question
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n\n\n### Response:\n"
)
TORA_WRAPPER_TEXT = "<|user|>\n\n<|assistant|>\n"  # ToRA utils.construct_prompt with --use_train_prompt_format
REFLEXION_FEEDBACK_HEADER = "Tested passed:\n\n\nTests failed:\n"  # Reflexion py_executor feedback frame
REFLEXION_MAX_NUM_TESTS = 5  # Reflexion py_generate.internal_tests(max_num_tests=5)
REFLEXION_FEWSHOT_TESTS = 7  # asserts in Reflexion's PY_TEST_GENERATION_FEW_SHOT example (the model imitates it)
CHATDEV_SMALL_COMPLETION = 10  # calls with <= this many completion tokens: the log gap ~ pure between-call overhead


def _pmf(counts: list[int]) -> dict[int, float]:
    vals, freq = np.unique(np.asarray(counts, dtype=int), return_counts=True)
    return {int(v): round(float(f) / len(counts), 4) for v, f in zip(vals, freq)}


def _lognormal_fit(values: list[int] | list[float]) -> dict[str, float]:
    """Median, log-sd and p99 (as cap) of positive values."""
    a = np.maximum(np.asarray(values, dtype=float), 1.0)
    return {"median": round(float(np.median(a)), 1), "sigma": round(float(np.std(np.log(a))), 3),
            "max": float(math.ceil(np.percentile(a, 99))), "n": int(a.size)}


def _mean(values: list[int] | list[float]) -> float:
    return round(float(np.mean(values)), 1)


def _derive_qa(data_dir: Path) -> dict[str, Any]:
    """FireAct HotpotQA ReAct trajectories (all three files, every question)."""
    from chimera.workload.loaders._common import read_json
    from chimera.workload.loaders.fireact_hotpotqa import FILES, TRAJ_DIR, parse_chat_traj, parse_text_traj
    from chimera.workload.tokens import count_tokens, count_tokens_batch

    runs: list[tuple[list[str], list[str]]] = []
    per_model_calls: dict[str, float] = {}
    for model, fname in FILES.items():
        data = read_json(data_dir, f"{TRAJ_DIR}/{fname}")
        n_calls = []
        for rec in data.values():
            traj = rec["traj"]
            steps = parse_text_traj(traj) if isinstance(traj, str) else parse_chat_traj(traj)
            if steps:
                runs.append(([s.text for s in steps], [s.observation for s in steps]))
                n_calls.append(len(steps))
        per_model_calls[model] = round(float(np.mean(n_calls)), 3)
    flat_out = [t for outs, _ in runs for t in outs]
    flat_obs = [o for _, obs in runs for o in obs[:-1]]  # observations between calls (not the final reward line)
    out_tok = iter(count_tokens_batch(flat_out))
    tok_runs = [[next(out_tok) for _ in outs] for outs, _ in runs]
    obs_tok = count_tokens_batch(flat_obs)
    first = [r[0] for r in tok_runs if len(r) >= 2]
    middle = [t for r in tok_runs if len(r) >= 3 for t in r[1:-1]]
    last = [r[-1] for r in tok_runs if len(r) >= 2]
    return {
        "calls_pmf": _pmf([len(r) for r in tok_runs]),
        "roles": {"first_step": {"mean_output_tokens": _mean(first)}, "step": {"mean_output_tokens": _mean(middle)},
                  "finish": {"mean_output_tokens": _mean(last)}},
        "system_prompt_tokens": count_tokens(FIREACT_HEADER_TOKENS_TEXT),
        "observation_tokens": _lognormal_fit(obs_tok),
        "n_runs": len(tok_runs),
        "mean_calls_per_model": per_model_calls,
        "mean_single_call_tokens": _mean([r[0] for r in tok_runs if len(r) == 1]),
    }


def _derive_math(data_dir: Path) -> dict[str, Any]:
    """ToRA GSM8K tool-integrated outputs: rounds of rationale+program, executed output, final answer."""
    from chimera.workload.loaders._common import iter_jsonl
    from chimera.workload.loaders.tora_gsm8k import FILES, split_rounds
    from chimera.workload.tokens import count_tokens, count_tokens_batch

    runs = [split_rounds(r["code"][0] if r["code"] else "") for f in FILES.values() for r in iter_jsonl(data_dir, f)]
    gen_tok = iter(count_tokens_batch([g for rr in runs for g, _ in rr]))
    obs_tok = count_tokens_batch([o for rr in runs for _, o in rr[:-1]])
    tok_runs = [[next(gen_tok) for _ in rr] for rr in runs]
    multi = [r for r in tok_runs if len(r) >= 2]
    middle = [t for r in tok_runs if len(r) >= 3 for t in r[1:-1]]
    program = [r[0] for r in multi] + middle
    return {
        "calls_pmf": _pmf([len(r) for r in tok_runs]),
        "roles": {"program": {"mean_output_tokens": _mean(program)},
                  "answer": {"mean_output_tokens": _mean([r[-1] for r in multi])}},
        "system_prompt_tokens": count_tokens(TORA_WRAPPER_TEXT),
        "observation_tokens": _lognormal_fit(obs_tok),
        "n_runs": len(tok_runs),
    }


def _derive_code(data_dir: Path) -> dict[str, Any]:
    """Reflexion programming runs (GPT-4, HumanEval + MBPP): tests -> impl -> (reflect -> impl)*."""
    from chimera.workload.loaders._common import iter_jsonl
    from chimera.workload.tokens import count_tokens, count_tokens_batch

    def body(r: dict) -> str:  # MBPP solutions echo the prompt; HumanEval ones are the body only
        sol, prompt = r["solution"], r["prompt"]
        return sol[len(prompt):] if sol.startswith(prompt) else sol

    prog = "reflexion/programming"
    refl_rows = [r for f in ("humaneval_reflexion5_gpt-4", "mbpp_reflexion5_gpt-4")
                 for r in iter_jsonl(data_dir, f"{prog}/{f}.jsonl.xz")]
    simple_rows = [r for f in ("humaneval_simple_gpt-4", "mbpp_simple_gpt-4")
                   for r in iter_jsonl(data_dir, f"{prog}/{f}.jsonl.xz")]
    mbpp_rows = list(iter_jsonl(data_dir, f"{prog}/mbpp_simple_gpt-4.jsonl.xz"))
    calls = [2 + 2 * len(r["reflections"]) for r in refl_rows]  # tests + impl, then reflect + impl per iteration
    simple_body = count_tokens_batch([body(r) for r in simple_rows if body(r).strip()])
    refl_body = count_tokens_batch([body(r) for r in refl_rows if r["reflections"] and body(r).strip()])
    reflections = count_tokens_batch([x for r in refl_rows for x in r["reflections"]])
    per_problem_asserts = [[ln.strip() for ln in r["test"].splitlines() if ln.strip().startswith("assert")]
                           for r in mbpp_rows]
    per_problem_asserts = [a for a in per_problem_asserts if a]
    flat = count_tokens_batch([a for lines in per_problem_asserts for a in lines])
    it = iter(flat)
    mean_per_problem = [float(np.mean([next(it) for _ in lines])) for lines in per_problem_asserts]
    header = count_tokens(REFLEXION_FEEDBACK_HEADER)
    feedback = [header + REFLEXION_MAX_NUM_TESTS * m for m in mean_per_problem]
    return {
        "calls_pmf": _pmf(calls),
        "roles": {"tests": {"mean_output_tokens": _mean([REFLEXION_FEWSHOT_TESTS * float(np.mean(flat))])},
                  "impl": {"mean_output_tokens": _mean(simple_body)},
                  "reflect": {"mean_output_tokens": _mean(reflections)},
                  "impl_retry": {"mean_output_tokens": _mean(refl_body)}},
        "observation_tokens": _lognormal_fit(feedback),
        "n_runs": len(calls),
        "mean_assert_tokens": _mean(flat),
    }


def _derive_chatdev(data_dir: Path) -> dict[str, Any]:
    """ChatDev multi-agent software runs: per-call prompt/completion tokens and log timestamps."""
    from datetime import datetime

    from chimera.workload.loaders._common import iter_jsonl
    from chimera.workload.tokens import count_tokens_batch

    by_project: dict[str, list[dict]] = {}
    for r in iter_jsonl(data_dir, "chatdev/chatdev_calls.jsonl.xz"):
        by_project.setdefault(r["project"], []).append(r)
    projects = [sorted(v, key=lambda r: int(r["call_idx"])) for v in by_project.values()]
    task_tok = count_tokens_batch([p[0]["task_prompt"] for p in projects])
    first, middle, last, first_prompt, call_prompt, gaps = [], [], [], [], [], []
    for calls, tt in zip(projects, task_tok):
        comp = [int(c["completion_tokens"]) for c in calls]
        prm = [int(c["prompt_tokens"]) for c in calls]
        first.append(comp[0])
        last.append(comp[-1])
        middle += comp[1:-1]
        first_prompt.append(max(0, prm[0] - tt))
        call_prompt += [max(0, prm[i] - comp[i - 1] - tt) for i in range(1, len(calls))]
        ts = [datetime.strptime(c["timestamp"], "%Y-%d-%m %H:%M:%S") for c in calls]
        gaps += [(ts[i] - ts[i - 1]).total_seconds() for i in range(1, len(calls))
                 if comp[i] <= CHATDEV_SMALL_COMPLETION]
    return {
        "calls_pmf": _pmf([len(p) for p in projects]),
        "roles": {"first_call": {"mean_output_tokens": _mean(first), "prompt_tokens": int(np.median(first_prompt))},
                  "call": {"mean_output_tokens": _mean(middle), "prompt_tokens": int(np.median(call_prompt))},
                  "final_call": {"mean_output_tokens": _mean(last)}},
        "tool_s": {"median": float(np.median(gaps)), "n": len(gaps)},
        "n_runs": len(projects),
    }


def _derive_qa_crosscheck(data_dir: Path) -> dict[str, Any]:
    """Reflexion's ReAct HotpotQA log (text-davinci-003, Wikipedia tool), trial 1: for comparison only."""
    import re

    from chimera.workload.loaders._common import open_text
    from chimera.workload.tokens import count_tokens_batch

    with open_text(data_dir, "reflexion/hotpotqa_react_logs/react_base_100q_5trials.txt.xz") as fh:
        trial1 = fh.read().split("BEGIN TRIAL 2")[0]
    blocks = re.split(r"\n\nQuestion:", trial1)[1:]
    steps = [len(re.findall(r"(?m)^Thought \d+:", b)) for b in blocks]
    obs = [o for b in blocks
           for o in re.findall(r"(?ms)^Observation \d+:(.*?)(?=^Thought \d+:|^Correct answer|\Z)", b)[:-1]]
    fit = _lognormal_fit(count_tokens_batch(obs))
    return {"n_runs": len(blocks), "mean_calls": round(float(np.mean(steps)), 3), "calls_pmf": _pmf(steps),
            "observation_tokens": fit}


def derive_template_parameters(data_dir: Path) -> dict[str, Any]:
    """Recompute the data-derived template numbers (per kind) from the traces under data_dir.

    Kinds whose source folder is missing are left out. Keys mirror templates.yaml (calls_pmf, roles.*.
    mean_output_tokens / prompt_tokens, system_prompt_tokens, observation_tokens, tool_s.median); other keys
    (n_runs, mean_calls_per_model, ...) are context for docs/templates.md.
    """
    from chimera.workload.tokens import TOKENIZER_NAME

    data_dir = Path(data_dir)
    out: dict[str, Any] = {"token_counter": TOKENIZER_NAME}
    for kind, folder, fn in (("qa", "fireact", _derive_qa), ("math", "tora", _derive_math),
                             ("code", "reflexion", _derive_code), ("chatdev", "chatdev", _derive_chatdev),
                             ("qa_crosscheck", "reflexion", _derive_qa_crosscheck)):
        if (data_dir / folder).is_dir():
            out[kind] = fn(data_dir)
    return out
