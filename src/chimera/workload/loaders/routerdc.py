"""RouterDC per-query scores of 7 open 7-8B models (GSM8K, MATH-prealgebra, HumanEval, MBPP).

The files have no outputs, so output_tokens come from the fitted length model in chimera.workload.lengthfill
(marked on each outcome with length_from="lengthfill").
"""

from __future__ import annotations

from pathlib import Path

from chimera.workload import lengthfill
from chimera.workload.loaders._common import read_json, take
from chimera.workload.schema import Outcome, Task
from chimera.workload.tokens import count_tokens_batch

FOLDER = "routerdc/split2_model7"
# short name -> key in the files' "scores"
MODEL_KEYS = {
    "Mistral-7B-v0.1": "mistralai/Mistral-7B-v0.1",
    "MetaMath-Mistral-7B": "meta-math/MetaMath-Mistral-7B",
    "Chinese-Mistral-7B-v0.1": "itpossible/Chinese-Mistral-7B-v0.1",
    "zephyr-7b-beta": "HuggingFaceH4/zephyr-7b-beta",
    "dolphin-2.6-mistral-7b": "cognitivecomputations/dolphin-2.6-mistral-7b",
    "Meta-Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
    "dolphin-2.9-llama3-8b": "cognitivecomputations/dolphin-2.9-llama3-8b",
}
MODELS = tuple(MODEL_KEYS)

# source name -> (kind, length-model dataset, [(split label or "", file)]). MATH has no length data of its own:
# it uses the math curve with no dataset offset (GSM8K's, the only math dataset fitted).
SPLITS: dict[str, tuple[str, str | None, list[tuple[str, str]]]] = {
    "routerdc-gsm8k": ("math", "gsm8k", [("test", "gsm8k-test.json.xz"), ("train", "gsm8k-train.json.xz")]),
    "routerdc-math-prealgebra": ("math", None, [("", "MATH_prealgebra.json.xz")]),
    "routerdc-humaneval": (
        "code", "humaneval", [("train", "humaneval_train.json.xz"), ("test", "humaneval_test.json.xz")]
    ),
    "routerdc-mbpp": ("code", "mbpp", [("", "mbpp.json.xz")]),
}


def load_split(source: str, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Task]:
    """Load one RouterDC source; ids are <source>/<split>/<row> (or <source>/<row> for single-file sources)."""
    kind, dataset, files = SPLITS[source]
    rows: list[tuple[str, int, dict]] = []
    for split, fname in files:
        for i, rec in enumerate(read_json(data_dir, f"{FOLDER}/{fname}")):
            rows.append((split, i, rec))
    rows = take(rows, limit)
    prompt_tokens = count_tokens_batch([rec["question"] for _, _, rec in rows])
    tasks: list[Task] = []
    for (split, i, rec), ptok in zip(rows, prompt_tokens):
        tid = f"{source}/{split}/{i}" if split else f"{source}/{i}"
        scores = rec["scores"]
        missing = [k for k in MODEL_KEYS.values() if k not in scores]
        if missing:
            raise ValueError(f"{source} {split or ''} row {i}: field 'scores' lacks {missing}")
        outcomes = {
            m: Outcome(
                score=float(scores[key]),
                output_tokens=lengthfill.fill_output_tokens(kind, ptok, m, tid, dataset=dataset, seed=seed),
                length_from="lengthfill",
            )
            for m, key in MODEL_KEYS.items()
        }
        extra: dict = {"source": source}
        if split:
            extra["split"] = split
        if source == "routerdc-gsm8k" and split == "test":
            extra["gsm8k_index"] = i  # same order as routellm-gsm8k and tora-gsm8k
        tasks.append(Task(id=tid, kind=kind, prompt=rec["question"], prompt_tokens=ptok, outcomes=outcomes, **extra))
    return tasks


def load_gsm8k(data_dir: Path, limit: int | None = None) -> list[Task]:
    """GSM8K test (1319, first) + train (1000); score = fraction of 10 samples correct."""
    return load_split("routerdc-gsm8k", data_dir, limit)


def load_math_prealgebra(data_dir: Path, limit: int | None = None) -> list[Task]:
    """MATH prealgebra (871); score 0/1."""
    return load_split("routerdc-math-prealgebra", data_dir, limit)


def load_humaneval(data_dir: Path, limit: int | None = None) -> list[Task]:
    """HumanEval train (115) + test (49); score = pass fraction of 10 samples."""
    return load_split("routerdc-humaneval", data_dir, limit)


def load_mbpp(data_dir: Path, limit: int | None = None) -> list[Task]:
    """MBPP (500); score = pass fraction of 10 samples."""
    return load_split("routerdc-mbpp", data_dir, limit)
