"""Synthetic workloads for machines without the public data, with distributions calibrated to it (docs/workloads.md).

Correctness is IRT (1PL): P(correct | model m, task q) = sigmoid(a_kind * (ability[m, bench] - difficulty[q])),
difficulty ~ N(0, 1); each ability is solved so that the expected accuracy equals a published Qwen2.5-Instruct
score on that benchmark. Lengths follow the length model fitted on real outputs (chimera.workload.lengthfill) or,
for ReAct QA, FireAct's per-step statistics. Prompts are template text whose topic words depend on the difficulty
band, and whose length correlates with difficulty as in the real data, so text features carry signal.
Everything is a pure function of (seed, task index, model name): generate(n)[:k] == generate(k), and adding a
model does not change the others' outcomes.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
from scipy.special import expit, logit

from chimera.workload.lengthfill import MAX_OUTPUT_TOKENS, PARAMS, stable_normal
from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.tokens import count_tokens, count_tokens_batch

DEFAULT_MODELS = ("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b")

# Target accuracies: Qwen2.5 Technical Report (arXiv:2412.15115), instruction-tuned model tables
# (GSM8K, MATH, HumanEval, MBPP). HotpotQA (ReAct agent, exact match) has no official Qwen2.5 figure: ASSUMED values
# bracketed by FireAct's fine-tuned ReAct agents in the data (Llama-2-7B 0.26, 13B 0.35, GPT-3.5 0.43 EM).
ACCURACY: dict[str, dict[str, float]] = {
    "qwen2.5-1.5b": {"gsm8k": 0.732, "math": 0.552, "humaneval": 0.616, "mbpp": 0.632, "hotpotqa": 0.20},
    "qwen2.5-7b": {"gsm8k": 0.916, "math": 0.755, "humaneval": 0.848, "mbpp": 0.792, "hotpotqa": 0.32},
    "qwen2.5-14b": {"gsm8k": 0.948, "math": 0.800, "humaneval": 0.835, "mbpp": 0.820, "hotpotqa": 0.38},
}
SIZES_B = {"qwen2.5-1.5b": 1.5, "qwen2.5-7b": 7.0, "qwen2.5-14b": 14.0}

BENCHMARKS = {"math": ("gsm8k", "math"), "code": ("humaneval", "mbpp"), "qa": ("hotpotqa",)}

# IRT discrimination per kind: marginal-likelihood 1PL fits (difficulty ~ N(0,1)) on the real sources gave
# routellm-gsm8k 0.92, mmlu-pro-math 1.62, routerdc-math-prealgebra 1.87, routerdc-gsm8k 2.43 (score>=0.5),
# tora-gsm8k 3.60 -> math 1.9 (median); routerdc-humaneval 3.01, routerdc-mbpp 3.88 (score>=0.5) -> code 3.0;
# fireact-hotpotqa 3.23 -> qa 3.2.
DISCRIMINATION = {"math": 1.9, "code": 3.0, "qa": 3.2}

# Prompt tokens (Qwen BPE), lognormal (mu, sigma) of log tokens, and corr(log prompt, difficulty) rho, measured on:
# gsm8k = routellm GSM8K test questions, math = RouterDC MATH prealgebra, humaneval/mbpp = RouterDC prompts,
# hotpotqa = FireAct questions; rho = Pearson corr with -logit(mean accuracy of the source's models).
PROMPT_LOGNORMAL = {
    "gsm8k": (4.054, 0.349, 0.38),
    "math": (3.770, 0.825, 0.42),
    "humaneval": (4.791, 0.463, 0.40),
    "mbpp": (3.777, 0.435, 0.06),
    "hotpotqa": (2.965, 0.338, 0.13),
}
PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX = 8, 2048

# Output length, math/code: lengthfill.PARAMS (log_a, b, dataset offset, sigma_shared, sigma_indiv, sigma_model).
# Part of the shared per-task factor is tied to difficulty: slope per SD of difficulty of the task-mean log length
# (after prompt length) was 0.07 (routellm) and 0.02 (tora) on GSM8K -> 0.05, used for code as well.
LENGTH_DIFFICULTY_SLOPE = 0.05
LENGTH_DATASET = {"gsm8k": "gsm8k", "math": None, "humaneval": "humaneval", "mbpp": "mbpp"}

# ReAct QA (FireAct, 464 questions x 3 models, Qwen tokens): per-call output lognormal mu 3.60-3.69, sigma 0.31-0.41;
# per-task shared part of mean step log-length: cross-model covariance ~0.024 (sigma 0.15); model means differ by
# ~0.05. Non-final observations lognormal mu 3.41, sigma 0.79; the final one ("Episode finished, ...") is 9 tokens.
# Calls per question: 2.9-3.0 when correct, 3.4-3.7 when wrong -> steps = clip(2 + Poisson(0.9 + 0.6*wrong), 2, 6).
QA_STEP_MU, QA_STEP_SHARED, QA_STEP_SIGMA, QA_MODEL_SIGMA = 3.62, 0.15, 0.29, 0.05
QA_OBS_MU, QA_OBS_SIGMA, QA_FINAL_OBS = 3.41, 0.79, 9
QA_STEPS_BASE, QA_STEPS_WRONG, QA_STEPS_MIN, QA_STEPS_MAX = 0.9, 0.6, 2, 6
QA_PROMPT_OVERHEAD = 24  # instruction header around the question in FireAct's llama prompt (tokens)

# Topic words per difficulty band (easy < -0.43 <= medium <= 0.43 < hard, the N(0,1) terciles). Each sentence
# takes its band's words with probability BAND_FIDELITY, else a random band's: informative, not a give-away.
BAND_FIDELITY = 0.8
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "gsm8k": (
        ("apples", "marbles", "cookies", "stickers", "pencils", "eggs", "books"),
        ("percent discount", "ratio", "average speed", "hourly wage", "fraction of the total", "tip"),
        ("compound interest", "combined work rate", "remaining fraction", "profit margin", "unit conversion",
         "consecutive discounts"),
    ),
    "math": (
        ("sum of integers", "perimeter", "least common multiple", "remainder", "place value"),
        ("quadratic equation", "probability", "arithmetic sequence", "area of a triangle", "exponent rules"),
        ("modular inverse", "complex roots", "binomial coefficient identity", "logarithmic equation",
         "polynomial remainder theorem", "AM-GM inequality"),
    ),
    "humaneval": (
        ("sum of a list", "reverse a string", "count vowels", "maximum element", "filter even numbers"),
        ("sort by key", "dictionary lookup", "prime check", "palindrome test", "longest substring"),
        ("dynamic programming", "parse nested parentheses", "matrix path", "recursive enumeration",
         "merge intervals"),
    ),
    "mbpp": (
        ("add two numbers", "find the minimum", "square each element", "join strings", "check parity"),
        ("remove duplicates", "count word frequencies", "rotate a list", "find common elements", "gcd"),
        ("longest increasing subsequence", "regex extraction", "bit manipulation", "heap queue",
         "permutations with constraints"),
    ),
    "hotpotqa": (
        ("film director", "capital city", "band member", "birth year", "home country"),
        ("record label", "university founder", "river source", "album release", "sports team"),
        ("which was founded earlier", "both nationalities", "award before the merger", "the older of the two",
         "the shared occupation"),
    ),
}
_NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")


def _key(name: str) -> int:
    """A stable non-negative integer for a model name (seeds its random stream)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def _band(d: float) -> int:
    return 0 if d < -0.43 else (2 if d > 0.43 else 1)


def _topic(bench: str, band: int, rng: np.random.Generator) -> str:
    if rng.random() >= BAND_FIDELITY:
        band = int(rng.integers(3))
    words = TOPICS[bench][band]
    return words[int(rng.integers(len(words)))]


def _sentence(bench: str, band: int, rng: np.random.Generator, first: bool) -> str:
    """One template sentence; topic words follow the difficulty band."""
    t = _topic(bench, band, rng)
    n, k = int(rng.integers(2, 60)), int(rng.integers(2, 12))
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    if bench == "gsm8k":
        return (f"{name} is working on a problem about {t}." if first
                else f"{name} has {n} items and uses {k} of them each day, thinking about the {t}.")
    if bench == "math":
        return (f"Consider a problem on {t}." if first
                else f"Let x be an integer with x between {k} and {n}; use the {t} where needed.")
    if bench == "humaneval":
        return (f"def solve_{k}(values: list, n: int):\n    \"\"\"Task: {t}." if first
                else f"    Handle the {t} for inputs such as {[k, n, k + n]}.")
    if bench == "mbpp":
        return (f"Write a python function for the task: {t}." if first
                else f"assert solve_{k}({[k, n]}) is not None  # {t}")
    return (f"Question: which answer involves the {t}?" if first
            else f"It concerns {name} and the {t} mentioned in article {n}.")


def _closing(bench: str, rng: np.random.Generator) -> str:
    return {
        "gsm8k": "How many are left at the end?",
        "math": "Find the value of x.",
        "humaneval": '    """',
        "mbpp": "",
        "hotpotqa": "Answer with a short phrase.",
    }[bench]


def _prompt_text(bench: str, band: int, target_tokens: int, rng: np.random.Generator) -> str:
    """Template sentences up to target_tokens; the last one is cut at a word boundary to land on the target."""
    closing = _closing(bench, rng)
    sep = "\n" if bench in ("humaneval", "mbpp") else " "

    def render(parts: list[str]) -> str:
        return sep.join(parts + ([closing] if closing else []))

    parts = [_sentence(bench, band, rng, first=True)]
    used = count_tokens(render(parts))
    while used < target_tokens and len(parts) < 400:
        parts.append(_sentence(bench, band, rng, first=False))
        used = count_tokens(render(parts))
    if used > target_tokens and len(parts) > 1:
        words = parts[-1].split(" ")
        lo, hi = 0, len(words)  # largest word prefix of the last sentence that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(render(parts[:-1] + [" ".join(words[:mid])])) <= target_tokens:
                lo = mid
            else:
                hi = mid - 1
        parts = parts[:-1] + ([" ".join(words[:lo])] if lo else [])
    return render(parts)


def _expected_accuracy(theta: float, a: float) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(61)
    return float((expit(a * (theta - x)) * w).sum() / w.sum())


def ability(accuracy: float, a: float) -> float:
    """Ability whose expected accuracy over difficulty ~ N(0,1) equals `accuracy` (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if _expected_accuracy(mid, a) < accuracy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def model_accuracy(model: str) -> dict[str, float]:
    """Target accuracy per benchmark: the table, else interpolated in logit vs log(size) from the name's '<N>b'."""
    if model in ACCURACY:
        return ACCURACY[model]
    m = re.search(r"(\d+(?:\.\d+)?)\s*b(?![a-z])", model.lower())
    if not m:
        raise ValueError(
            f"synthetic: unknown model {model!r}; use one of {sorted(ACCURACY)} or a name with a size like '3b'"
        )
    size = math.log(float(m.group(1)))
    known = sorted((math.log(SIZES_B[k]), ACCURACY[k]) for k in SIZES_B)
    out = {}
    for bench in known[0][1]:
        xs = [x for x, _ in known]
        ys = [float(logit(acc[bench])) for _, acc in known]
        i = 0 if size <= xs[1] else len(xs) - 2  # nearest segment (extrapolates with its slope)
        for j in range(len(xs) - 1):
            if xs[j] <= size <= xs[j + 1]:
                i = j
        y = ys[i] + (ys[i + 1] - ys[i]) * (size - xs[i]) / (xs[i + 1] - xs[i])
        out[bench] = float(np.clip(expit(y), 0.02, 0.98))
    return out


def _qa_stages(rng, q_tokens: int, verbosity: float, shared: float, correct: bool) -> list[StageOutcome]:
    extra = rng.poisson(QA_STEPS_BASE + QA_STEPS_WRONG * (not correct))
    n = int(np.clip(QA_STEPS_MIN + extra, QA_STEPS_MIN, QA_STEPS_MAX))
    stages: list[StageOutcome] = []
    prompt = q_tokens + QA_PROMPT_OVERHEAD
    for k in range(n):
        out = max(1, round(math.exp(QA_STEP_MU + verbosity + shared + QA_STEP_SIGMA * rng.normal())))
        obs = QA_FINAL_OBS if k == n - 1 else max(1, round(math.exp(QA_OBS_MU + QA_OBS_SIGMA * rng.normal())))
        stages.append(StageOutcome(output_tokens=out, prompt_tokens=prompt, observation_tokens=obs))
        prompt += out + obs
    return stages


def generate(
    n: int, seed: int = 0, models: list[str] | None = None, kinds: tuple[str, ...] | list[str] = ("math", "code", "qa")
) -> list[Task]:
    """n synthetic tasks over `kinds` for `models` (default Qwen2.5 1.5B/7B/14B), deterministic for a seed."""
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    models = list(models) if models is not None else list(DEFAULT_MODELS)
    if not models or len(set(models)) != len(models):
        raise ValueError(f"models must be non-empty and distinct, got {models}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in BENCHMARKS]
    if not kinds or bad:
        raise ValueError(f"unknown kinds {bad or kinds}; choose from {sorted(BENCHMARKS)}")
    acc = {m: model_accuracy(m) for m in models}
    theta = {
        (m, b): ability(acc[m][b], DISCRIMINATION[k]) for m in models for k in kinds for b in BENCHMARKS[k]
    }
    z_model = {m: stable_normal("synthetic-verbosity", m, seed) for m in models}
    model_key = {m: _key(m) for m in models}  # per-model streams: adding a model leaves the others unchanged

    drafts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = kinds[int(rng.integers(len(kinds)))]
        bench = BENCHMARKS[kind][int(rng.integers(len(BENCHMARKS[kind])))]
        d = float(rng.normal())
        mu, sigma, rho = PROMPT_LOGNORMAL[bench]
        z = rho * d + math.sqrt(1 - rho * rho) * float(rng.normal())
        target = int(np.clip(round(math.exp(mu + sigma * z)), PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX))
        drafts.append((i, kind, bench, d, _prompt_text(bench, _band(d), target, rng)))
    prompt_tokens = count_tokens_batch([t[-1] for t in drafts])

    tasks: list[Task] = []
    for (i, kind, bench, d, text), ptok in zip(drafts, prompt_tokens):
        rng = np.random.default_rng([seed, i, 1])
        a = DISCRIMINATION[kind]
        outcomes: dict[str, Outcome] = {}
        stages: dict[str, list[StageOutcome]] = {}
        if kind == "qa":
            shared = QA_STEP_SHARED * float(rng.normal())
            for m in models:
                rm = np.random.default_rng([seed, i, 2, model_key[m]])
                correct = bool(rm.random() < expit(a * (theta[(m, bench)] - d)))
                st = _qa_stages(rm, ptok, QA_MODEL_SIGMA * z_model[m], shared, correct)
                stages[m] = st
                outcomes[m] = Outcome(score=float(correct), output_tokens=sum(s.output_tokens for s in st))
        else:
            p = PARAMS[kind]
            ds = LENGTH_DATASET[bench]
            g = min(LENGTH_DIFFICULTY_SLOPE, p.sigma_shared)
            base = p.log_a + p.b * math.log(max(ptok, 1)) + p.dataset_offsets.get(ds or "", 0.0)
            base += g * d + math.sqrt(p.sigma_shared**2 - g * g) * float(rng.normal())
            for m in models:
                rm = np.random.default_rng([seed, i, 2, model_key[m]])
                correct = bool(rm.random() < expit(a * (theta[(m, bench)] - d)))
                mu_m = base + p.sigma_model * z_model[m] + p.sigma_indiv * float(rm.normal())
                out = int(min(MAX_OUTPUT_TOKENS, max(1, round(math.exp(mu_m)))))
                outcomes[m] = Outcome(score=float(correct), output_tokens=out)
        tasks.append(
            Task(
                id=f"synthetic-{kind}/{seed}-{i}",
                kind=kind,
                prompt=text,
                prompt_tokens=ptok,
                outcomes=outcomes,
                stages=stages or None,
                source="synthetic",
                benchmark=bench,
                difficulty=round(d, 4),
            )
        )
    return tasks
