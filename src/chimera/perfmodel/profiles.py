"""Model/backend specs, the built-in `MODEL@GPU` catalogue, and the cluster-file loader (validated at the edge)."""

from __future__ import annotations

import difflib
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chimera.perfmodel.gpus import GPUS, GPU
from chimera.util.yamlfile import read_yaml

GIB = 1 << 30
FIXED_RESERVE_BYTES = 1 * GIB  # per GPU: CUDA context, cuBLAS/NCCL workspaces, CUDA-graph pool
# Peak activation bytes per batched token ≈ 18 × hidden × dtype (MLP gate_up + SiLU outputs, qkv, residual).
ACTIVATION_FACTOR = 18
MIN_KV_TOKENS = 1024  # below this a replica cannot hold even one modest request


class ClusterError(ValueError):
    """A cluster file or profile that cannot be used; the message names the file, entry and key."""


class ModelSpec(BaseModel):
    """One served model on one GPU type (tp GPUs per replica); memory arithmetic lives here so it is checked on load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    gpu: str
    params_b: float = Field(gt=0)
    layers: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    hidden: int | None = Field(default=None, ge=1)
    active_params_b: float | None = Field(default=None, gt=0)
    tp: int = Field(default=1, ge=1)
    replicas: int = Field(default=1, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    dtype_bytes: int = Field(default=2, ge=1, le=4)
    workload_model: str | None = Field(default=None, min_length=1)
    # Servers that share one machine's CPU (e.g. vLLM CPU servers, or GPU servers whose API processes share
    # cores): every server with the same `host` slows the others while it has requests, by `peer_busy_slowdown`
    # (a step-time factor measured by `chimera bench live --engine vllm` with the peers running
    # `peer_busy_batch` requests each; fewer running requests on the peers slow it proportionally less).
    host: str | None = Field(default=None, min_length=1)
    peer_busy_slowdown: float = Field(default=1.0, ge=1.0, le=10.0)
    peer_busy_batch: int = Field(default=1, ge=1)
    # Automatic prefix caching (vLLM's --enable-prefix-caching, on by default in its V1 engine): each replica keeps
    # the KV blocks of prompts and outputs it computed and a later prompt that starts with them prefills only the
    # rest, whole blocks of `kv_block_tokens` (vLLM's --block-size: 16 on GPUs, 128 on the CPU build). Off here so
    # that existing figures stay as they were; see perfmodel/prefix.py and docs/perfmodel.md.
    prefix_caching: bool = False
    kv_block_tokens: int = Field(default=16, ge=1, le=4096)

    @model_validator(mode="before")
    @classmethod
    def _default_workload_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("workload_model") is None and "name" in data:
            data = {**data, "workload_model": data["name"]}
        return data

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        if v not in GPUS:
            raise ValueError(f"unknown gpu {v!r}; known: {', '.join(sorted(GPUS))}")
        return v

    @model_validator(mode="after")
    def _consistent_and_fits(self) -> "ModelSpec":
        # Pydantic also runs this on instances of subclasses placed in a ModelSpec field: dispatch to their check.
        return self._check()

    def _check(self) -> "ModelSpec":
        if self.active_params_b is not None and self.active_params_b > self.params_b:
            raise ValueError(f"key 'active_params_b': {self.active_params_b} exceeds params_b {self.params_b}")
        if self.kv_heads % self.tp and self.tp % self.kv_heads:
            raise ValueError(f"key 'tp': {self.tp} must divide kv_heads {self.kv_heads} (or be a multiple of it)")
        g = self.gpu_spec
        budget = g.memory_bytes * self.gpu_memory_utilization
        weights = self.weight_bytes / self.tp
        reserve = self.reserve_bytes_per_gpu
        kv = self.kv_capacity_tokens
        if kv < MIN_KV_TOKENS:
            left = budget - weights - reserve
            rest = (
                f"{left / 1e9:.2f} GB left for KV = {kv} tokens (need ≥ {MIN_KV_TOKENS})"
                if left > 0
                else f"over by {-left / 1e9:.1f} GB"
            )
            raise ValueError(
                f"does not fit in GPU memory: per GPU {weights / 1e9:.1f} GB weights (tp {self.tp}) + "
                f"{reserve / 1e9:.1f} GB activation reserve vs {budget / 1e9:.1f} GB usable "
                f"({g.usable_mib} MiB × gpu_memory_utilization {self.gpu_memory_utilization}) on {g.name}: "
                f"{rest}; raise tp or use a larger GPU"
            )
        return self

    # ---- memory arithmetic (per replica unless said otherwise) ---------------------------------------------
    @property
    def gpu_spec(self) -> GPU:
        return GPUS[self.gpu]

    @property
    def active_params(self) -> float:
        return (self.active_params_b if self.active_params_b is not None else self.params_b) * 1e9

    @property
    def size_b(self) -> float | None:
        """Parameters (billions) for ranking model sizes: active parameters for MoE."""
        return self.active_params_b if self.active_params_b is not None else self.params_b

    @property
    def hidden_size(self) -> int:
        """config.json hidden size; without it, the dense estimate params ≈ 12 · layers · hidden²."""
        if self.hidden is not None:
            return self.hidden
        return int(math.sqrt(self.params_b * 1e9 / (12 * self.layers)))

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 × layers × kv_heads × head_dim × dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_stored_bytes_per_token(self) -> int:
        """Bytes the replica stores per token: KV heads are replicated when tp exceeds kv_heads (vLLM)."""
        return self.kv_bytes_per_token * max(1, self.tp // self.kv_heads)

    @property
    def reserve_bytes_per_gpu(self) -> float:
        """Fixed runtime memory plus the peak activations of one max_num_batched_tokens step (vLLM profiles this)."""
        act = self.max_num_batched_tokens * self.hidden_size * self.dtype_bytes * ACTIVATION_FACTOR / self.tp
        return FIXED_RESERVE_BYTES + act

    @property
    def kv_capacity_tokens(self) -> int:
        """(gpu_mem × tp × util − weights − reserve × tp) / KV bytes per token, per replica."""
        room = (self.gpu_spec.memory_bytes * self.gpu_memory_utilization - self.reserve_bytes_per_gpu) * self.tp
        room -= self.weight_bytes
        return int(room // self.kv_stored_bytes_per_token)


class FittedStep(BaseModel):
    """Step-time coefficients fitted to a measured server (`chimera profile`, profiling/fit.py), in seconds:

        t(n_decode, C, P) = fixed + hypot(weights, per_token × (n_decode + P)) + per_seq × n_decode^e
                            + per_context_token × C

    the roofline's form with free constants plus a per-sequence term (sampling/output processing, large on CPUs;
    the exponent e ≤ 1 lets per-sequence costs amortise over a batch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_s: float = Field(ge=0)
    weights_s: float = Field(ge=0)
    per_token_s: float = Field(ge=0)
    per_seq_s: float = Field(default=0.0, ge=0)
    per_seq_exponent: float = Field(default=1.0, ge=0.3, le=1.0)
    per_context_token_s: float = Field(default=0.0, ge=0)
    kv_capacity_tokens: int = Field(ge=MIN_KV_TOKENS)
    max_model_len: int | None = Field(default=None, ge=1)
    # What a client sees on top of the prefill step (HTTP, tokenising, scheduling); the simulator adds it per call.
    request_overhead_s: float = Field(default=0.0, ge=0)
    source: str | None = None  # where and when it was measured


class FittedModelSpec(ModelSpec):
    """A served model whose step times come from a fit to measurements (`fitted`) instead of the GPU roofline.

    `gpu` is a free label (the machine is not in the catalogue); the architecture fields are optional (only
    `params_b` is used: to rank model sizes); `tp` is ignored (the fit measured the whole server). KV capacity and
    max_model_len come from `fitted`.
    """

    gpu: str = Field(default="measured", min_length=1)
    params_b: float | None = Field(default=None, gt=0)  # type: ignore[assignment]
    layers: int | None = Field(default=None, ge=1)  # type: ignore[assignment]
    kv_heads: int | None = Field(default=None, ge=1)  # type: ignore[assignment]
    head_dim: int | None = Field(default=None, ge=1)  # type: ignore[assignment]
    fitted: FittedStep

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:  # overrides ModelSpec's: any label
        return v

    def _check(self) -> "FittedModelSpec":  # overrides ModelSpec's: no memory arithmetic to check
        if self.active_params_b is not None and self.params_b is not None and self.active_params_b > self.params_b:
            raise ValueError(f"key 'active_params_b': {self.active_params_b} exceeds params_b {self.params_b}")
        return self

    @property
    def size_b(self) -> float | None:
        """Parameters (billions) for ranking model sizes, when known."""
        return self.active_params_b if self.active_params_b is not None else self.params_b

    @property
    def weight_bytes(self) -> float:
        return (self.params_b or 0.0) * 1e9 * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        if self.layers is None or self.kv_heads is None or self.head_dim is None:
            return 0
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_stored_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token

    @property
    def hidden_size(self) -> int:
        return self.hidden or 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.fitted.kv_capacity_tokens


class ClusterConfig(BaseModel):
    """The models a cluster serves; names must be unique (they are how policies and workloads refer to models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        seen: dict[str, int] = {}
        for i, m in enumerate(v):
            if m.name in seen:
                raise ValueError(f"duplicate model name {m.name!r} (entries {seen[m.name]} and {i})")
            seen[m.name] = i
        return v

    def get(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}; cluster has: {', '.join(m.name for m in self.models)}")


# ---- catalogue -------------------------------------------------------------------------------------------------
def _read_package_yaml(filename: str) -> Any:
    return yaml.safe_load(resources.files("chimera.perfmodel").joinpath(filename).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, ModelSpec]:
    raw = _read_package_yaml("catalogue.yaml")
    archs: dict[str, dict[str, Any]] = raw["architectures"]
    out: dict[str, ModelSpec] = {}
    for key, overrides in raw["profiles"].items():
        model, _, gpu_name = key.partition("@")
        out[key] = ModelSpec(name=model, gpu=gpu_name, **archs[model], **(overrides or {}))
    return out


def catalogue() -> dict[str, ModelSpec]:
    """Named profiles `MODEL@GPU` (architecture from config.json, defaults that fit the GPU)."""
    return dict(_catalogue())


def profile(name: str) -> ModelSpec:
    """One catalogue profile, or a profile file written by `chimera profile` (a path ending in .yaml/.yml).

    The error lists the catalogue."""
    if _is_profile_path(name):
        return load_profile_file(name)
    cat = _catalogue()
    if name not in cat:
        close = difflib.get_close_matches(name, list(cat), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ClusterError(f"unknown profile {name!r}{hint}; catalogue: {', '.join(sorted(cat))}")
    return cat[name]


def default_cluster() -> ClusterConfig:
    """The packaged default: Qwen2.5 1.5B/7B/14B, one A6000 each (the paper's testbed)."""
    return cluster_from_dict(_read_package_yaml("default_cluster.yaml"), source="chimera/perfmodel/default_cluster.yaml")


# ---- profile files (`chimera profile`) -------------------------------------------------------------------------
PROFILE_FORMAT = 1
# Keys of a profile file that are records, not spec fields: format marker, raw measurements, the fit's table.
PROFILE_META_KEYS = ("chimera_profile", "measurements", "fit_report")


def _is_profile_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def load_profile_file(path: str | Path) -> FittedModelSpec:
    """Read a profile YAML written by `chimera profile`: a FittedModelSpec (its `fitted` block drives StepTimeModel)."""
    return profile_from_dict(read_yaml(path, ClusterError, "profile file"), source=str(Path(path)))


def profile_from_dict(raw: Any, source: str = "<profile>") -> FittedModelSpec:
    """Validate a parsed profile document; record keys (PROFILE_META_KEYS) are ignored."""
    if not isinstance(raw, dict) or not isinstance(raw.get("fitted"), dict):
        raise ClusterError(f"{source}: expected a mapping with a 'fitted' block (a profile written by `chimera profile`)")
    fmt = raw.get("chimera_profile", PROFILE_FORMAT)
    if fmt != PROFILE_FORMAT:
        raise ClusterError(f"{source}: profile format {fmt!r} is not supported (this Chimera reads {PROFILE_FORMAT})")
    data = {k: v for k, v in raw.items() if k not in PROFILE_META_KEYS}
    try:
        return FittedModelSpec.model_validate(data)
    except ValidationError as e:
        raise ClusterError(f"{source}: {_describe(e, data, FittedModelSpec)}") from None


# ---- cluster files ---------------------------------------------------------------------------------------------
_FIELDS = tuple(ModelSpec.model_fields)


def load_cluster(path: str | Path) -> ClusterConfig:
    """Read a cluster YAML (`models: [{name, gpu, params_b, ...} | {profile: MODEL@GPU, overrides...}]`)."""
    return cluster_from_dict(read_yaml(path, ClusterError, "cluster file"), source=str(Path(path)),
                             base_dir=Path(path).parent)


def cluster_from_dict(raw: Any, source: str = "<cluster>", base_dir: str | Path | None = None) -> ClusterConfig:
    """Validate an already-parsed cluster document; `source` names it in errors.

    Relative `profile_file:` paths (and `profile:` paths to profile files) are looked up beside the cluster file
    (`base_dir`) first, then from the working directory."""
    if not isinstance(raw, dict) or "models" not in raw:
        raise ClusterError(f"{source}: expected a mapping with a 'models' list at the top level")
    extra = sorted(set(raw) - {"models"})
    if extra:
        keys = ", ".join(map(repr, extra))
        raise ClusterError(f"{source}: unknown top-level key(s) {keys}; only 'models' is allowed")
    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise ClusterError(f"{source}: 'models' must be a non-empty list")
    specs = [_entry_spec(e, i, source, base_dir) for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.name in seen:
            raise ClusterError(
                f"{source}: models[{i}] ({s.name!r}): duplicate name {s.name!r}, already used by "
                f"models[{seen[s.name]}]; give each entry a distinct 'name'"
            )
        seen[s.name] = i
    return ClusterConfig(models=specs)


def _resolve(path: str, base_dir: str | Path | None) -> Path:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).is_file():
        return Path(base_dir) / p
    return p


def _entry_spec(entry: Any, i: int, source: str, base_dir: str | Path | None = None) -> ModelSpec:
    where = f"{source}: models[{i}]"
    if not isinstance(entry, dict):
        raise ClusterError(f"{where}: expected a mapping, got {type(entry).__name__}")
    label = entry.get("name") or entry.get("profile") or entry.get("profile_file")
    if label:
        where += f" ({label!r})"
    data = dict(entry)
    prof = data.pop("profile", None)
    pfile = data.pop("profile_file", None)
    if prof is not None and pfile is not None:
        raise ClusterError(f"{where}: give 'profile' (MODEL@GPU) or 'profile_file' (from `chimera profile`), not both")
    if prof is not None and _is_profile_path(str(prof)):
        prof, pfile = None, prof
    if prof is not None:
        try:
            base = profile(str(prof))
        except ClusterError as e:
            raise ClusterError(f"{where}: key 'profile': {e}") from None
        data = {**base.model_dump(), **data}
    if pfile is not None:
        try:
            fitted = load_profile_file(_resolve(str(pfile), base_dir))
        except ClusterError as e:
            raise ClusterError(f"{where}: key 'profile_file': {e}") from None
        base_data = fitted.model_dump(exclude_none=True)
        if isinstance(data.get("fitted"), dict):  # an entry may override single coefficients (e.g. kv capacity)
            data["fitted"] = {**base_data["fitted"], **data["fitted"]}
        data = {**base_data, **data}
    cls = FittedModelSpec if "fitted" in data else ModelSpec
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ClusterError(f"{where}: {_describe(e, data, cls)}") from None


def _describe(err: ValidationError, data: dict[str, Any], cls: type[ModelSpec] = ModelSpec) -> str:
    fields = tuple(cls.model_fields)
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and key.startswith("fitted."):
            sub = tuple(FittedStep.model_fields)
            close = difflib.get_close_matches(key.split(".")[-1], sub, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"unknown key {key!r}{hint}; allowed keys in 'fitted': {', '.join(sub)}")
        elif e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, fields + ("profile_file",), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"unknown key {key!r}{hint}; allowed keys: profile, profile_file, {', '.join(fields)}")
        elif e["type"] == "missing" and key.startswith("fitted."):
            parts.append(f"missing key {key!r} (write the profile with `chimera profile`)")
        elif e["type"] == "missing":
            parts.append(f"missing key {key!r} (or give 'profile: MODEL@GPU')")
        elif key:
            got: Any = data
            for part in e["loc"]:
                got = got.get(part) if isinstance(got, dict) else None
            parts.append(f"key {key!r}: {msg} (got {got!r})")
        else:
            parts.append(msg)
    return "; ".join(parts)
