"""MMLU-Pro `math` category x 29 models: per-model correctness and CoT output tokens (from mmlu_pro/)."""

from __future__ import annotations

from pathlib import Path

from chimera.workload.loaders._common import iter_csv, iter_jsonl, take
from chimera.workload.schema import Outcome, Task
from chimera.workload.tokens import count_tokens_batch

SOURCE = "mmlu-pro-math"
KIND = "math"
MODELS = (
    "DeepSeek-Coder-V2", "Llama-2-7b-hf", "Llama-2-13b-hf", "Llama-2-70b-hf", "Meta-Llama-3-8B", "Meta-Llama-3-70B",
    "Meta-Llama-3_1-8B", "Meta-Llama-3_1-70B", "Meta-Llama-3_1-8B-Instruct", "Meta-Llama-3_1-70B-Instruct",
    "Mistral-7B-v0.1", "Mistral-7B-v0.2-hf", "Mistral-7B-Instruct-v0.1", "Mistral-7B-Instruct-v0.2",
    "Mixtral-8x7B-v0.1", "Mixtral-8x7B-Instruct-v0.1", "Phi-3-mini-4k-instruct", "Qwen1.5-7B-Chat",
    "Qwen1.5-72B-Chat", "Qwen1.5-110B", "Yi-6B", "Yi-6b-Chat", "Yi-34B", "c4ai-command-r-v01", "gemma-7b",
    "mathstral-7B", "jamba-1.5-large", "gemini-1.5-flash-002", "gemini-1.5-pro-002",
)
LETTERS = "ABCDEFGHIJ"
# MMLU-Pro's own harness stops generation at "Question:"; some base-model files (Llama-3 8B/70B) ran on and
# wrote the next few-shot example. We cut there, as the harness's stop sequence would have.
STOP = "\nQuestion:"
# Fallback when a model has no CoT text: tokens = round(words * ratio). Ratio fitted at load time on rows having
# both text and gen_words (sum of full-text tokens / sum of words); on the full data it is 2.21
# (math CoT: digits are single tokens in Qwen BPE).
DEFAULT_TOKENS_PER_WORD = 2.21


def format_prompt(question: str, options: list[str]) -> str:
    """Question plus lettered options, in MMLU-Pro's layout (the 5-shot CoT prefix is not included)."""
    lines = [question.strip(), "Options:"]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def _cot(text: str) -> str:
    cut = text.find(STOP)
    return text if cut < 0 else text[:cut]


def load(data_dir: Path, limit: int | None = None) -> list[Task]:
    """One task per math question (sorted by question_id); outcomes for every model with a result row."""
    questions = sorted(
        (q for q in iter_jsonl(data_dir, "mmlu_pro/questions.jsonl.xz") if q["category"] == "math"),
        key=lambda q: q["question_id"],
    )
    questions = take(questions, limit)
    wanted = {str(q["question_id"]) for q in questions}

    results: dict[tuple[str, str], tuple[int, int]] = {}  # (qid, model) -> (correct, gen_words)
    for row in iter_csv(data_dir, "mmlu_pro/results.csv.xz"):
        if row["question_id"] in wanted:
            words = int(row["gen_words"]) if row["gen_words"] else -1
            results[(row["question_id"], row["model"])] = (int(row["correct"]), words)

    texts: dict[tuple[str, str], str] = {}
    for g in iter_jsonl(data_dir, "mmlu_pro/generations_math.jsonl.xz"):
        key = (str(g["question_id"]), g["model"])
        if key[0] in wanted and isinstance(g.get("text"), str):
            texts[key] = g["text"]

    keys = [k for k in results if k in texts]
    cot_tokens = dict(zip(keys, count_tokens_batch([_cot(texts[k]) for k in keys])))
    cut_keys = [k for k in keys if STOP in texts[k]]
    full_tokens = dict(cot_tokens)
    full_tokens.update(zip(cut_keys, count_tokens_batch([texts[k] for k in cut_keys])))

    fit = [(full_tokens[k], results[k][1]) for k in keys if results[k][1] > 0]
    ratio = sum(t for t, _ in fit) / sum(w for _, w in fit) if fit else DEFAULT_TOKENS_PER_WORD

    prompts = [format_prompt(q["question"], q["options"]) for q in questions]
    prompt_tokens = count_tokens_batch(prompts)
    tasks: list[Task] = []
    for q, prompt, ptok in zip(questions, prompts, prompt_tokens):
        qid = str(q["question_id"])
        outcomes: dict[str, Outcome] = {}
        for model in MODELS:
            res = results.get((qid, model))
            if res is None:
                continue  # e.g. DeepSeek-Coder-V2 has no row for 58 math questions
            correct, words = res
            if (qid, model) in cot_tokens:
                extra = {}
                if full_tokens[(qid, model)] != cot_tokens[(qid, model)]:
                    extra["untruncated_output_tokens"] = full_tokens[(qid, model)]
                outcomes[model] = Outcome(score=float(correct), output_tokens=cot_tokens[(qid, model)], **extra)
            else:
                est = max(0, round(max(words, 0) * ratio))
                outcomes[model] = Outcome(score=float(correct), output_tokens=est, length_from="gen_words")
        if not outcomes:
            continue
        tasks.append(
            Task(
                id=f"{SOURCE}/{qid}",
                kind=KIND,
                prompt=prompt,
                prompt_tokens=ptok,
                outcomes=outcomes,
                source=SOURCE,
                answer=q["answer"],
                subset=q.get("src", ""),
            )
        )
    return tasks
