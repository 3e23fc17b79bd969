"""Gateway configuration: one YAML file, validated at start so a typo fails loudly with the key's name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from chimera.backends.kinds import BackendKind, make_backend_kind
from chimera.predict.registry import confidence_factory
from chimera.serve.live_config import LiveLearningConfig
from chimera.serve.refusals import live_refusal
from chimera.util.yamlfile import read_yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class GatewayConfigError(ValueError):
    """A gateway config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class Auth(_Strict):
    """Bearer keys; an empty list leaves that surface open."""

    api_keys: list[str] = Field(default_factory=list)
    admin_keys: list[str] = Field(default_factory=list)


class PolicyConfig(BaseModel):
    """`name` picks a registered policy; every other key (and `lam`) is one of its parameters, checked against the
    policy's Params at load time so a typo fails here, naming the key, the policy and what it takes."""

    model_config = ConfigDict(extra="allow")
    name: str = "chimera"
    lam: float | None = None  # only for policies that take λ (chimera's default applies when absent)

    @model_validator(mode="after")
    def _check_params(self) -> "PolicyConfig":
        # Unknown names and parameters raise here (ValueError naming the policy and the key); then what the gateway
        # cannot run: oracle presets, preemptive policies, a calibration (routellm's threshold) not given.
        refusal = live_refusal(self.name, lam=self.lam, **self.params)
        if refusal:
            raise ValueError(refusal)
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Backend(BaseModel):
    """One OpenAI-compatible server; several backends with the same `model` are replicas. `kind` says how the gateway
    talks to it (chimera.backends.kinds: `vllm`, the default, or `openai`); any other key is a parameter of that kind
    (vllm: `priority`), checked against the kind's Params so a typo fails here, naming the kind and the key."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    model: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    api_key: str | None = None
    max_inflight: int = Field(default=64, ge=1)
    profile: str | None = None
    workload_model: str | None = None  # the name trained predictors know this model by (default: profile's, or `model`)
    kind: str = "vllm"

    @model_validator(mode="after")
    def _check_kind(self) -> "Backend":
        self.make_kind()  # BackendKindError (a ValueError) names an unknown kind or parameter
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The kind's parameters (every key that is not a Backend field)."""
        return dict(self.model_extra or {})

    def make_kind(self) -> BackendKind:
        return make_backend_kind(self.kind, **self.params)


class Limits(_Strict):
    """Backpressure and bounds: a call is refused (429) only when no model it may go to can take it."""

    max_queue: int = Field(default=1000, ge=0)
    max_queue_per_model: int | None = Field(default=None, ge=0)  # default: max_queue
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    body_timeout_s: float = Field(default=30.0, gt=0)  # the whole body must arrive within this (else 408)
    request_timeout_s: float = Field(default=600.0, gt=0)


class Health(_Strict):
    """Background probes of each backend's `/health` and (vLLM) `/metrics`; see serve/health.py."""

    enabled: bool = True
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    scrape_metrics: bool = True


SESSION_HEADERS = ["x-session-affinity", "session-id", "x-claude-code-session-id", "x-dynamo-session-id",
                   "x-session-id"]
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # an HTTP token (RFC 9110), lower case


class IdentityConfig(_Strict):
    """How the gateway finds a call's workflow when the client sends no Chimera hints (serve/identity.py)."""

    conversation: bool = True  # infer workflows from conversations (content hashes of message prefixes)
    session_headers: list[str] = Field(default_factory=lambda: list(SESSION_HEADERS))  # first present wins
    session_fields: list[str] = Field(default_factory=lambda: ["prompt_cache_key", "user"])  # body fields
    max_entries: int = Field(default=100_000, ge=1)  # bounded table (LRU) of conversation prefixes and response ids
    idle_timeout_s: float | None = Field(default=600.0, gt=0)  # a workflow idle this long ends (null: never)
    end_on_final_answer: bool = True  # a reply without tool calls to a request that offered tools ends the workflow

    @field_validator("session_headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        out = [h.strip().lower() for h in v]
        bad = [h for h in out if not _HEADER_NAME.fullmatch(h) or h.startswith("x-chimera-")]
        if bad:
            raise ValueError(f"not usable as session header names: {bad} (HTTP tokens, not X-Chimera-*)")
        return out


class LearningConfig(BaseModel):
    """Online learning from workflow scores (POST /v1/chimera/feedback). `online: true` routes with the `online`
    confidence predictor (chimera.predict.plugins.online), warm-started from the trained router when `predictors` is
    set, else from model size; every other key is one of that predictor's parameters (`explore_start`, `budget`,
    `max_age_s`, ...), checked by the plugin so a typo fails here, naming the key and what it takes."""

    model_config = ConfigDict(extra="allow")
    online: bool = False

    @model_validator(mode="after")
    def _check_params(self) -> "LearningConfig":
        if self.params and not self.online:
            raise ValueError(f"{sorted(self.params)} are parameters of the online learner; set `online: true` too")
        if self.online:
            confidence_factory("online", **self.params)  # PredictorParamsError (a ValueError) names the key
            if self.params.get("warm") == "priors":
                raise ValueError("warm: 'priors' fits per-kind accuracy on labelled tasks, which the gateway does not "
                                 "have; use 'size' or (with `predictors`) 'router'")
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The online learner's parameters (every key but `online`)."""
        return dict(self.model_extra or {})


class StateConfig(_Strict):
    """State shared by several gateway replicas on Redis (serve/shared/): leases on backend slots with a TTL, global
    caps, workflow state, congestion and the online learner's feedback. Every replica of a set names the same
    `redis_url`, `key_prefix` and backends."""

    redis_url: str = Field(min_length=1)
    replicas: int = Field(default=2, ge=1)  # replicas in the set: with Redis gone, each serves on cap // replicas
    lease_ttl_s: float = Field(default=10.0, gt=0, le=3600)  # a crashed replica's slots free after this (renewed every third)
    timeout_s: float = Field(default=0.05, gt=0, le=5)  # one Redis command; slower counts as Redis gone (degraded)
    sync_interval_s: float = Field(default=0.1, gt=0, le=60)  # how often a replica reads the others' load
    retry_s: float = Field(default=1.0, gt=0, le=60)  # how often a degraded replica tries Redis again
    key_prefix: str = Field(default="chimera", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    replica_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{v[:60]!r} is not a Redis URL (redis://HOST:PORT/DB, rediss://..., unix://PATH)")
        return v


class GatewayConfig(_Strict):
    listen: Listen = Field(default_factory=Listen)
    auth: Auth = Field(default_factory=Auth)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    predictors: str | None = None
    length_stat: Literal["mean", "median"] = "mean"  # how the policy reads the trained length forest
    trace_store: str = "chimera-traces.sqlite"
    backends: list[Backend] = Field(min_length=1)
    limits: Limits = Field(default_factory=Limits)
    health: Health = Field(default_factory=Health)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    learning: LearningConfig = Field(default_factory=LearningConfig)
    live: LiveLearningConfig | None = None  # learn speeds and lengths from the traffic (serve/live_learning.py)
    state: StateConfig | None = None  # shared with other replicas on Redis (serve/shared/); absent: this process alone

    @model_validator(mode="after")
    def _unique(self) -> "GatewayConfig":
        names = [b.name for b in self.backends]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"backends: duplicate backend name(s) {dup}")
        if "chimera" in {b.model for b in self.backends}:
            raise ValueError("backends: model name 'chimera' is reserved (it asks the policy to choose)")
        if "length_stat" in self.model_fields_set and not self.predictors:
            raise ValueError("length_stat: it says how to read the trained length forest; set `predictors` too "
                             "(the online priors have no length distribution to read)")
        if self.learning.params.get("warm") == "router" and not self.predictors:
            raise ValueError("learning.warm: 'router' starts from the trained router; set `predictors` too")
        return self

    @property
    def models(self) -> list[str]:
        """Served model names in first-seen order (the policy's model order)."""
        return list(dict.fromkeys(b.model for b in self.backends))


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"key '{key}': {msg}" if key else msg)  # no key: the object's own check says what is wrong
    return "; ".join(parts)


def gateway_config_from_dict(raw: Any, source: str = "<config>") -> GatewayConfig:
    """Validate an already-parsed config document."""
    if not isinstance(raw, dict):
        raise GatewayConfigError(f"{source}: expected a mapping at the top level")
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as e:
        raise GatewayConfigError(f"{source}: {_describe(e)}") from None


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway YAML; errors name the file and the offending key."""
    return gateway_config_from_dict(read_yaml(path, GatewayConfigError, "gateway config"), source=str(Path(path)))


# ---- building a config in code (benchmarks, `chimera engines up`) ----------------------------------------------------
def backends_for_cluster(servers: Iterable[Mapping[str, Any]]) -> list[Backend]:
    """One Backend per running server, named `{model}-{i}` (i: its replica index among the servers of that model).

    Each mapping gives `model` and `base_url` and any other Backend field (profile, max_inflight, priority,
    workload_model); a wrong or unknown field fails here, naming it."""
    seen: dict[str, int] = {}
    out = []
    for s in servers:
        model = str(s.get("model", ""))
        i = seen[model] = seen.get(model, -1) + 1
        try:
            out.append(Backend.model_validate({"name": f"{model}-{i}", **s}))
        except ValidationError as e:
            raise GatewayConfigError(f"backend {model or '?'}-{i}: {_describe(e)}") from None
    return out


def build_gateway_config(backends: Sequence[Backend], *, policy: str = "chimera", lam: float | None = None,
                         host: str = "127.0.0.1", port: int | None = None, trace_store: str | Path | None = None,
                         predictors: str | Path | None = None, limits: Mapping[str, Any] | None = None,
                         identity: Mapping[str, Any] | None = None, learning: Mapping[str, Any] | None = None,
                         **policy_params: Any) -> GatewayConfig:
    """A validated GatewayConfig for `backends`; only what is given is set (the rest keeps its default), so
    `write_gateway_config` writes just those keys. `policy_params` are the policy's other parameters."""
    doc: dict[str, Any] = {"policy": {"name": policy, **({"lam": lam} if lam is not None else {}), **policy_params},
                           "backends": list(backends)}
    if port is not None:
        doc["listen"] = {"host": host, "port": port}
    if trace_store is not None:
        doc["trace_store"] = str(trace_store)
    if predictors is not None:
        doc["predictors"] = str(predictors)
    if limits is not None:
        doc["limits"] = dict(limits)
    if identity is not None:
        doc["identity"] = dict(identity)
    if learning is not None:
        doc["learning"] = dict(learning)
    return gateway_config_from_dict(doc, source="gateway config")


def gateway_config_document(cfg: GatewayConfig) -> dict[str, Any]:
    """The keys of `cfg` that were set (defaults left out), as plain data: what a YAML file needs to say."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def override_gateway_config(cfg: GatewayConfig, *, port: int | None = None, trace_store: str | Path | None = None,
                            replica_id: str | None = None) -> GatewayConfig:
    """`cfg` with what differs between the replicas of one set changed, validated again: the listen port, the trace
    store, `state.replica_id` (refused, naming it, when the config has no `state` block)."""
    doc = gateway_config_document(cfg)
    if port is not None:
        doc["listen"] = {**doc.get("listen", {}), "port": port}
    if trace_store is not None:
        doc["trace_store"] = str(trace_store)
    if replica_id is not None:
        if not doc.get("state"):
            raise GatewayConfigError("replica_id: the config has no `state` block (no Redis shared with replicas)")
        doc["state"] = {**doc["state"], "replica_id": replica_id}
    return gateway_config_from_dict(doc, source="gateway config")


def write_gateway_config(cfg: GatewayConfig, path: str | Path, header: str | None = None) -> Path:
    """Write `cfg` as YAML (the keys that were set, `header` as comment lines above); `load_gateway_config` reads
    it back to the same config."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lead = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    p.write_text(lead + yaml.safe_dump(gateway_config_document(cfg), sort_keys=False, default_flow_style=False),
                 encoding="utf-8")
    return p
