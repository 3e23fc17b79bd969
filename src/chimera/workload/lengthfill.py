"""Length model for sources that have correctness but no outputs (RouterDC): output tokens from prompt tokens.

Model (per kind), fitted on public outputs that do have text, in Qwen BPE tokens:

    log(out[q, m]) = log_a + b * log(prompt[q]) + d[dataset] + u[m] + s[q] + e[q, m]

d is a per-dataset offset (e.g. MBPP answers are longer than HumanEval bodies for the same prompt size).
u[m] is a per-model verbosity offset: a fixed effect for each fit model; a model without length data gets a draw
from N(0, sigma_model^2) keyed on its name -- a random effect whose spread is measured on the fit models, not that
model's true verbosity. s[q] ~ N(0, sigma_shared^2) is shared by all models on the same task; e[q, m] ~
N(0, sigma_indiv^2). sigma_shared^2 = mean product of two different models' residuals on the same task;
sigma_indiv^2 = residual variance left over. Draws are keyed hashes, reproducible per (task, model, seed)
whatever the load order or `limit`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.special import ndtri

MAX_OUTPUT_TOKENS = 4096  # cap on filled lengths (a typical max_new_tokens); the fits stay far below it

Observation = tuple[str, str, str, int, int]  # (model, dataset, task key, prompt_tokens, output_tokens)


def stable_normal(*key: object) -> float:
    """A standard-normal draw that depends only on key (not on load order, limit or process)."""
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return float(ndtri((int.from_bytes(digest, "little") + 0.5) / 2.0**64))


@dataclass(frozen=True)
class LengthParams:
    """Fitted constants of the length model for one kind (see module docstring)."""

    log_a: float
    b: float
    sigma_model: float
    sigma_shared: float
    sigma_indiv: float
    n_obs: int
    dataset_offsets: dict[str, float]
    model_offsets: dict[str, float] = field(default_factory=dict)  # u of each fit (model, dataset) group

    @property
    def a(self) -> float:
        return math.exp(self.log_a)

    @property
    def sigma_residual(self) -> float:
        """Per-observation residual sd around a known model's curve (shared + individual)."""
        return math.sqrt(self.sigma_shared**2 + self.sigma_indiv**2)


# Shipped constants (fit() output). Regenerate with:
#   .venv/bin/python -c "from chimera.workload.lengthfill_data import refit; print(refit())"
# math: 4 x 1319 GSM8K test answers -- routellm/gsm8k_responses.csv.xz (Mixtral-8x7B-Instruct, GPT-4-1106 response
#       text) and tora/*_gsm8k_test.jsonl.xz (ToRA-70B, ToRA-Code-34B; generated text only, tool output excluded).
# code: reflexion/programming/humaneval_simple_{gpt-4,text-davinci-003,gpt-3.5-turbo}.jsonl.xz and
#       mbpp_simple_gpt-4.jsonl.xz; non-empty solutions only (upstream stores only solved ones), echoed prompt
#       stripped so the generated body is measured.
PARAMS: dict[str, LengthParams] = {
    "math": LengthParams(
        log_a=2.691996, b=0.562325, sigma_model=0.240666, sigma_shared=0.182146,
        sigma_indiv=0.24857, n_obs=5276, dataset_offsets={"gsm8k": 0.0},
        model_offsets={
            "GPT-4-1106 (gsm8k)": -0.140322, "Mixtral-8x7B-Instruct (gsm8k)": -0.266805,
            "ToRA-70B (gsm8k)": 0.201497, "ToRA-Code-34B (gsm8k)": 0.20563,
        },
    ),
    "code": LengthParams(
        log_a=0.891706, b=0.666683, sigma_model=0.211394, sigma_shared=0.436965,
        sigma_indiv=0.510058, n_obs=669, dataset_offsets={"humaneval": -0.072686, "mbpp": 0.218058},
        model_offsets={
            "gpt-3.5-turbo (humaneval)": 0.1714, "gpt-4 (humaneval)": -0.19269,
            "gpt-4 (mbpp)": 0.218058, "text-davinci-003 (humaneval)": -0.196768,
        },
    ),
}


def fill_output_tokens(
    kind: str,
    prompt_tokens: int,
    model: str,
    task_key: str,
    dataset: str | None = None,
    seed: int = 0,
    params: LengthParams | None = None,
) -> int:
    """Draw one model's output length for one task from the fitted model (deterministic per key and seed)."""
    p = params or PARAMS[kind]
    mu = p.log_a + p.b * math.log(max(prompt_tokens, 1)) + p.dataset_offsets.get(dataset or "", 0.0)
    mu += p.sigma_model * stable_normal("verbosity", kind, model, seed)
    mu += p.sigma_shared * stable_normal("shared", task_key, seed)
    mu += p.sigma_indiv * stable_normal("indiv", task_key, model, seed)
    return int(min(MAX_OUTPUT_TOKENS, max(1, round(math.exp(mu)))))


def fit(obs: list[Observation]) -> LengthParams:
    """Least-squares fit on (model, dataset, task, prompt_tokens, output_tokens); zero lengths are clipped to 1."""
    groups = sorted({(m, ds) for m, ds, _, _, _ in obs})
    datasets = sorted({ds for _, ds in groups})
    gi = np.array([groups.index((m, ds)) for m, ds, _, _, _ in obs])
    x = np.log(np.array([max(p, 1) for *_, p, _ in obs], float))
    y = np.log(np.array([max(o, 1) for *_, o in obs], float))
    # within-group slope (group fixed effects), then per-group intercepts
    xm = np.array([x[gi == k].mean() for k in range(len(groups))])
    ym = np.array([y[gi == k].mean() for k in range(len(groups))])
    dx, dy = x - xm[gi], y - ym[gi]
    b = float((dx * dy).sum() / (dx * dx).sum())
    c = ym - b * xm
    log_a = float(c.mean())
    u = c - log_a
    d = {ds: float(np.mean([u[k] for k, g in enumerate(groups) if g[1] == ds])) for ds in datasets}
    within = np.array([u[k] - d[g[1]] for k, g in enumerate(groups)])
    dof_model = len(groups) - len(datasets)
    sigma_model = float(np.sqrt((within**2).sum() / dof_model)) if dof_model > 0 else 0.0
    r = y - c[gi] - b * x
    by_task: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for (m, ds, key, _, _), k, ri in zip(obs, gi, r):
        by_task.setdefault((ds, key), []).append((k, float(ri)))
    prods = [
        ra * rb
        for items in by_task.values()
        for i, (ka, ra) in enumerate(items)
        for kb, rb in items[i + 1 :]
        if ka != kb
    ]
    total = float((r**2).sum() / (len(r) - 1 - len(groups)))
    shared = min(max(0.0, float(np.mean(prods))), total) if prods else 0.0
    return LengthParams(
        log_a=round(log_a, 6),
        b=round(b, 6),
        sigma_model=round(sigma_model, 6),
        sigma_shared=round(math.sqrt(shared), 6),
        sigma_indiv=round(math.sqrt(total - shared), 6),
        n_obs=len(obs),
        dataset_offsets={ds: round(v, 6) for ds, v in d.items()},
        model_offsets={f"{m} ({ds})": round(float(v), 6) for (m, ds), v in zip(groups, u)},
    )


def params_as_dict(params: dict[str, LengthParams]) -> dict[str, dict]:
    """Plain-dict view (for docs and comparisons)."""
    return {k: asdict(v) for k, v in params.items()}

