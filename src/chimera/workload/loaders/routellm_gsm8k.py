"""RouteLLM GSM8K test set x {Mixtral-8x7B-Instruct, GPT-4-1106}: binary correctness and tokenized responses."""

from __future__ import annotations

import json
from pathlib import Path

from chimera.workload.loaders._common import iter_csv, open_text, take
from chimera.workload.schema import Outcome, Task
from chimera.workload.tokens import count_tokens_batch

SOURCE = "routellm-gsm8k"
KIND = "math"
# short name -> column in gsm8k_responses.csv
COLUMNS = {
    "Mixtral-8x7B-Instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "GPT-4-1106": "gpt-4-1106-preview",
}
MODELS = tuple(COLUMNS)


def _flag(value: str, where: str) -> float:
    v = value.strip().lower()
    if v in ("true", "1"):
        return 1.0
    if v in ("false", "0"):
        return 0.0
    raise ValueError(f"{where}: expected True/False, got {value!r}")


def contaminated_indices(data_dir: Path) -> set[int]:
    """GSM8K test indices RouteLLM flagged as overlapping its router training data."""
    with open_text(data_dir, "routellm/gsm8k_contaminated_prompts.jsonl") as fh:
        return {int(json.loads(line)["eval_idx"]) for line in fh if line.strip()}


def load(data_dir: Path, limit: int | None = None) -> list[Task]:
    """One task per GSM8K test question, id = routellm-gsm8k/<GSM8K test index> (row order = GSM8K order)."""
    rows = take(list(iter_csv(data_dir, "routellm/gsm8k_responses.csv.xz")), limit)
    flagged = contaminated_indices(data_dir)
    prompt_tokens = count_tokens_batch([r["prompt"] for r in rows])
    out_tokens = {m: count_tokens_batch([r[f"{col}_response"] for r in rows]) for m, col in COLUMNS.items()}
    tasks: list[Task] = []
    for i, (row, ptok) in enumerate(zip(rows, prompt_tokens)):
        outcomes = {
            m: Outcome(score=_flag(row[col], f"{SOURCE} row {i} column {col}"), output_tokens=out_tokens[m][i])
            for m, col in COLUMNS.items()
        }
        tasks.append(
            Task(
                id=f"{SOURCE}/{i}",
                kind=KIND,
                prompt=row["prompt"],
                prompt_tokens=ptok,
                outcomes=outcomes,
                source=SOURCE,
                gsm8k_index=i,
                contaminated=i in flagged,
            )
        )
    return tasks
