"""Registry of real-data workload sources; each loader reads the data directory at run time (nothing is bundled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chimera.workload.datadir import resolve_data_dir
from chimera.workload.loaders import fireact_hotpotqa, mmlu_pro_math, routellm_gsm8k, routerdc, tora_gsm8k
from chimera.workload.schema import Task

Loader = Callable[..., list[Task]]  # (data_dir: Path, limit: int | None = None) -> list[Task]


class UnknownSourceError(KeyError):
    """A source name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class SourceInfo:
    """What a source is and how to load it."""

    name: str
    description: str
    kind: str
    models: tuple[str, ...]
    loader: Loader


SOURCES: dict[str, SourceInfo] = {
    s.name: s
    for s in (
        SourceInfo(
            "mmlu-pro-math",
            "MMLU-Pro math (1351 MC questions) x 29 models; score = correct; output = tokens of the 5-shot CoT text",
            mmlu_pro_math.KIND, mmlu_pro_math.MODELS, mmlu_pro_math.load,
        ),
        SourceInfo(
            "routerdc-gsm8k",
            "RouterDC GSM8K test+train (2319) x 7 open 7-8B models; score = fraction of 10 samples; lengths filled",
            "math", routerdc.MODELS, routerdc.load_gsm8k,
        ),
        SourceInfo(
            "routerdc-math-prealgebra",
            "RouterDC MATH prealgebra (871) x 7 open 7-8B models; score 0/1; lengths filled",
            "math", routerdc.MODELS, routerdc.load_math_prealgebra,
        ),
        SourceInfo(
            "routerdc-humaneval",
            "RouterDC HumanEval train+test (164) x 7 open 7-8B models; score = pass fraction of 10; lengths filled",
            "code", routerdc.MODELS, routerdc.load_humaneval,
        ),
        SourceInfo(
            "routerdc-mbpp",
            "RouterDC MBPP (500) x 7 open 7-8B models; score = pass fraction of 10; lengths filled",
            "code", routerdc.MODELS, routerdc.load_mbpp,
        ),
        SourceInfo(
            "routellm-gsm8k",
            "RouteLLM GSM8K test (1319) x {Mixtral-8x7B-Instruct, GPT-4-1106}; score 0/1; output = response tokens",
            routellm_gsm8k.KIND, routellm_gsm8k.MODELS, routellm_gsm8k.load,
        ),
        SourceInfo(
            "fireact-hotpotqa",
            "FireAct HotpotQA ReAct runs (464 questions in all 3 files) x {Llama-2-7B/13B LoRA, GPT-3.5 ft}; "
            "score = EM; per-call stages",
            fireact_hotpotqa.KIND, fireact_hotpotqa.MODELS, fireact_hotpotqa.load,
        ),
        SourceInfo(
            "tora-gsm8k",
            "ToRA GSM8K test (1319) x {ToRA-70B, ToRA-Code-34B}; score = numeric match; stages = tool rounds",
            tora_gsm8k.KIND, tora_gsm8k.MODELS, tora_gsm8k.load,
        ),
    )
}


def load_source(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Task]:
    """Load a registered source from the data directory (resolved as in resolve_data_dir)."""
    try:
        info = SOURCES[name]
    except KeyError:
        raise UnknownSourceError(f"unknown workload source {name!r}; known sources: {', '.join(SOURCES)}") from None
    return info.loader(resolve_data_dir(data_dir), limit)


__all__ = ["SOURCES", "SourceInfo", "UnknownSourceError", "load_source"]
