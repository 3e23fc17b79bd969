"""Refit lengthfill's shipped constants from the measured outputs in the data directory: a maintenance step that reads
the loaders, kept apart so the loaders can use lengthfill without an import cycle."""

from __future__ import annotations

from pathlib import Path

from chimera.workload.datadir import resolve_data_dir
from chimera.workload.lengthfill import LengthParams, Observation, fit
from chimera.workload.loaders import routellm_gsm8k, tora_gsm8k
from chimera.workload.loaders._common import iter_jsonl
from chimera.workload.tokens import count_tokens_batch


def math_observations(data_dir: Path) -> list[Observation]:
    """GSM8K test answers with text: RouteLLM (Mixtral, GPT-4) and ToRA (70B, Code-34B)."""
    obs: list[Observation] = []
    for mod in (routellm_gsm8k, tora_gsm8k):
        for t in mod.load(data_dir):
            key = str(getattr(t, "gsm8k_index"))
            for m, o in t.outcomes.items():
                obs.append((m, "gsm8k", key, t.prompt_tokens or 0, o.output_tokens))
    return obs


CODE_FILES = {  # (model, dataset) -> file
    ("gpt-4", "humaneval"): "reflexion/programming/humaneval_simple_gpt-4.jsonl.xz",
    ("text-davinci-003", "humaneval"): "reflexion/programming/humaneval_simple_text-davinci-003.jsonl.xz",
    ("gpt-3.5-turbo", "humaneval"): "reflexion/programming/humaneval_simple_gpt-3.5-turbo.jsonl.xz",
    ("gpt-4", "mbpp"): "reflexion/programming/mbpp_simple_gpt-4.jsonl.xz",
}


def code_observations(data_dir: Path) -> list[Observation]:
    """Reflexion single-shot HumanEval/MBPP solutions (generated body only)."""
    rows = []
    for (model, ds), rel in CODE_FILES.items():
        for rec in iter_jsonl(data_dir, rel):
            sol = rec.get("solution") or ""
            if not sol.strip():
                continue
            if sol.startswith(rec["prompt"]):
                sol = sol[len(rec["prompt"]) :]
            rows.append((model, ds, str(rec.get("task_id") or rec.get("name")), rec["prompt"], sol))
    p_tok = count_tokens_batch([r[3] for r in rows])
    o_tok = count_tokens_batch([r[4] for r in rows])
    return [(m, ds, k, p, o) for (m, ds, k, _, _), p, o in zip(rows, p_tok, o_tok)]


def refit(data_dir: str | Path | None = None) -> dict[str, LengthParams]:
    """Refit every kind from the data directory (to check or regenerate the shipped PARAMS)."""
    d = resolve_data_dir(data_dir)
    return {"math": fit(math_observations(d)), "code": fit(code_observations(d))}
