"""ToRA-70B and ToRA-Code-34B on GSM8K test: correctness plus tool-integrated rounds split into stages."""

from __future__ import annotations

import math
import re
from pathlib import Path

from chimera.workload.loaders._common import iter_jsonl, take
from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.tokens import count_tokens_batch

SOURCE = "tora-gsm8k"
KIND = "math"
FILES = {
    "ToRA-70B": "tora/tora-70b-v1.0_gsm8k_test.jsonl.xz",
    "ToRA-Code-34B": "tora/tora-code-34b-v1.0_gsm8k_test.jsonl.xz",
}
MODELS = tuple(FILES)
# ToRA stops generating at "```output"; the executor appends the program's output block, then generation resumes.
_OUTPUT_BLOCK = re.compile(r"```output\n.*?```\n?", re.DOTALL)


def _number(s: str) -> float | None:
    t = str(s).strip().replace(",", "").replace("$", "").rstrip(".")
    if t.endswith("%"):
        t = t[:-1]
    t = re.sub(r"^\\boxed\{(.*)\}$", r"\1", t)
    frac = re.fullmatch(r"\\?d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", t) or re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", t)
    try:
        if frac:
            return float(frac.group(1)) / float(frac.group(2))
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(pred: str | None, gold: str) -> bool:
    """Numeric match with a relative tolerance of 1e-4 (ToRA's reported math_equal is a bit more lenient)."""
    if pred is None:
        return False
    a, b = _number(pred), _number(gold)
    if a is None or b is None:
        return str(pred).strip() == str(gold).strip()
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def split_rounds(output: str) -> list[tuple[str, str]]:
    """(generated text, tool-output block that follows it) per round; the last round has no tool output."""
    rounds: list[tuple[str, str]] = []
    pos = 0
    for m in _OUTPUT_BLOCK.finditer(output):
        rounds.append((output[pos : m.start()], m.group(0)))
        pos = m.end()
    tail = output[pos:]
    if tail.strip() or not rounds:
        rounds.append((tail, ""))
    return rounds


def load(data_dir: Path, limit: int | None = None) -> list[Task]:
    """One task per GSM8K test question (id = tora-gsm8k/<GSM8K test index>), a stage per generation round."""
    rows = {m: take(list(iter_jsonl(data_dir, f)), limit) for m, f in FILES.items()}
    base = rows[MODELS[0]]
    for m in MODELS[1:]:
        if [r["idx"] for r in rows[m]] != [r["idx"] for r in base]:
            raise ValueError(f"{SOURCE}: {FILES[m]} is not aligned with {FILES[MODELS[0]]} by idx")

    rounds = {m: [split_rounds(r["code"][0] if r["code"] else "") for r in rows[m]] for m in MODELS}
    texts = sorted({t for m in MODELS for rr in rounds[m] for pair in rr for t in pair} | {r["question"] for r in base})
    counts = dict(zip(texts, count_tokens_batch(texts)))

    tasks: list[Task] = []
    for i, row in enumerate(base):
        q_tok = counts[row["question"]]
        outcomes: dict[str, Outcome] = {}
        stages: dict[str, list[StageOutcome]] = {}
        for m in MODELS:
            r = rows[m][i]
            prompt_tokens = q_tok
            st: list[StageOutcome] = []
            for gen, obs in rounds[m][i]:
                st.append(
                    StageOutcome(output_tokens=counts[gen], prompt_tokens=prompt_tokens, observation_tokens=counts[obs])
                )
                prompt_tokens += counts[gen] + counts[obs]
            stages[m] = st
            pred = r["pred"][0] if r.get("pred") else None
            score = 1.0 if is_correct(pred, r["gt"]) else 0.0
            outcomes[m] = Outcome(score=score, output_tokens=sum(s.output_tokens for s in st))
        tasks.append(
            Task(
                id=f"{SOURCE}/{row['idx']}",
                kind=KIND,
                prompt=row["question"],
                prompt_tokens=q_tok,
                outcomes=outcomes,
                stages=stages,
                source=SOURCE,
                gsm8k_index=int(row["idx"]),
            )
        )
    return tasks
