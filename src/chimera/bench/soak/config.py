"""What `chimera bench soak` runs: its configuration, validated before anything starts, and the command that
reruns it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


LABEL = "live, emulated backends (engine model), not real GPUs"
HELD_MODEL = "qwen2.5-1.5b"  # the model whose backend is paused in the reject phase
CLASSES = ("200", "429", "4xx", "5xx", "conn")
PHASES = ("steady", "reject")


class SoakConfig(BaseModel):
    """What `chimera bench soak` runs; validated before anything starts."""

    model_config = ConfigDict(extra="forbid")

    minutes: float = Field(default=10.0, gt=0)  # steady phase
    rate: float = Field(default=30.0, gt=0)  # requests/s in the steady phase
    reject_minutes: float = Field(default=5.0, ge=0)  # 0: no reject phase
    reject_rate: float | None = Field(default=None, gt=0)  # requests/s in the reject phase (default: rate)
    window_s: float = Field(default=60.0, gt=0)
    time_scale: float = Field(default=20.0, gt=0)  # emulators run this many times faster than real time
    predictors: str | None = None  # a `chimera train` folder; None: train on the synthetic workload into OUT
    train_tasks: int = Field(default=600, ge=20)  # synthetic tasks to train on when `predictors` is None
    train_trees: int = Field(default=100, ge=1)
    max_queue: int = Field(default=32, ge=1)  # the gateway's limits.max_queue
    held_inflight: int = Field(default=32, ge=1)  # max_inflight of the held model's backend
    inflight: int = Field(default=128, ge=1)  # max_inflight of the other backends
    max_tokens: int = Field(default=48, ge=1)  # upper end of each request's max_tokens
    request_timeout_s: float = Field(default=60.0, gt=0)  # client timeout of phase traffic
    seed: int = 0
    lam: float = 0.05  # λ of the gateway's chimera policy

    @property
    def steady_s(self) -> float:
        return 60.0 * self.minutes

    @property
    def reject_s(self) -> float:
        return 60.0 * self.reject_minutes


def command_line(cfg: SoakConfig) -> str:
    """The `chimera bench soak` command that reruns `cfg` (written above the results table)."""
    d = SoakConfig().model_dump()
    flags = {"minutes": "--minutes", "rate": "--rate", "reject_minutes": "--reject-minutes",
             "reject_rate": "--reject-rate", "window_s": "--window-s", "time_scale": "--time-scale",
             "predictors": "--predictors", "train_tasks": "--train-tasks", "train_trees": "--train-trees",
             "max_queue": "--max-queue", "seed": "--seed", "lam": "--lam"}
    parts = ["chimera bench soak", f"--minutes {cfg.minutes:g}", f"--rate {cfg.rate:g}"]
    for k, flag in flags.items():
        v = getattr(cfg, k)
        if k in ("minutes", "rate") or v == d[k]:
            continue
        parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(parts)
