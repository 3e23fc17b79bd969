"""The `live:` block of a gateway config: what the gateway learns from its own traffic while it runs (backend speeds,
per-stage lengths). A module of its own, importing nothing of the gateway, so the config and the learners that read
it stay apart."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Part(BaseModel):
    """A sub-block that may also be written as a bare `true` / `false` (on with its defaults / off)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _bare_bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


class SpeedsConfig(_Part):
    """Each backend's decode speed and prefill rate measured on the calls it serves (serve/live_speeds.py)."""

    window: int = Field(default=128, ge=8)  # samples kept per backend and kind (decode, prefill, engine)
    min_decode_tokens: int = Field(default=16, ge=2)  # shorter answers say nothing of the decode speed
    min_prompt_tokens: int = Field(default=256, ge=1)  # shorter prompts: the first token's time is mostly overhead
    min_samples: int = Field(default=8, ge=1)  # a model's figures move only after this many samples
    blend_calls: int = Field(default=64, ge=1)  # ... and are wholly the measured ones after this many
    refresh_s: float = Field(default=5.0, gt=0)  # how often the policy's figures are recomputed
    engine_metrics: bool = True  # vLLM's own inter-token latency counters, read from the health checks' scrapes


class LengthsConfig(_Part):
    """The length predictor refit from the trace store's real per-stage lengths (serve/live_lengths.py)."""

    refresh_s: float = Field(default=30.0, gt=0)  # seconds between refits
    max_rows: int = Field(default=20_000, ge=1)  # the most recent successful calls read per refit
    shrink_rows: float = Field(default=20.0, ge=0)  # pseudo-rows pulling a cell's ratio to its model's, a model's to 1
    max_ratio: float = Field(default=4.0, gt=1)  # a ratio actual / predicted is kept within [1/max_ratio, max_ratio]
    warm_weight: float = Field(default=20.0, ge=0)  # most completions one cell of earlier runs counts for
    max_cells: int = Field(default=4096, ge=1)  # (kind, stage, model) cells kept (calibration or warm start), the
    # most populated first


class LiveLearningConfig(BaseModel):
    """`live:` — absent: nothing is learnt live (the figures stay the catalogue's, lengths the configured predictor's);
    `live: {}` turns both parts on with their defaults."""

    model_config = ConfigDict(extra="forbid")
    speeds: SpeedsConfig = Field(default_factory=SpeedsConfig)
    lengths: LengthsConfig = Field(default_factory=LengthsConfig)
