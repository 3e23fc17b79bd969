"""Turn measurements into a fit and a profile YAML that cluster files (`profile_file:`) and `chimera emulate` load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chimera.profiling.fit import FitRow, StepFit, fit_rows, fit_step_model, poorly_fitted
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import MIN_KV_TOKENS, PROFILE_FORMAT, FittedModelSpec, ModelSpec, profile_from_dict
from chimera.profiling.client import MeasureError, Measurements, measurements_from_dict

_DEFAULTS = ModelSpec.model_fields


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


@dataclass
class ProfileResult:
    """A fitted profile: the spec the simulator runs, the document written, the fit's rows and notes."""

    spec: FittedModelSpec
    fit: StepFit
    rows: list[FitRow]
    document: dict[str, Any]
    notes: list[str]

    @property
    def poor(self) -> list[FitRow]:
        return poorly_fitted(self.rows)


@dataclass(frozen=True)
class ProfileOverrides:
    """What is known of the server beyond its measurements (the command's flags); None: measured or defaulted."""

    name: str | None = None
    gpu: str = "measured"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_capacity_tokens: int | None = None
    params_b: float | None = None

    def filled_from(self, stored: dict[str, Any]) -> ProfileOverrides:
        """These, blanks taken from a stored profile document (a refit keeps its name, machine and limits; the KV
        capacity comes from the stored measurements unless given)."""
        return dataclasses.replace(
            self, name=self.name or stored.get("name"),
            gpu=self.gpu if self.gpu != "measured" else stored.get("gpu", self.gpu),
            max_num_seqs=self.max_num_seqs or stored.get("max_num_seqs"),
            max_num_batched_tokens=self.max_num_batched_tokens or stored.get("max_num_batched_tokens"),
            params_b=self.params_b or stored.get("params_b"))


class ProfileBuildError(ValueError):
    """Measurements no valid profile can be built from; the message says why."""


def build_profile(
    meas: Measurements,
    name: str | None = None,
    gpu: str = "measured",
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    kv_capacity_tokens: int | None = None,
    params_b: float | None = None,
) -> ProfileResult:
    """Fit the step-time model to `meas` and assemble the profile (explicit arguments override what was measured)."""
    notes: list[str] = []
    mnbt = max_num_batched_tokens or int(_DEFAULTS["max_num_batched_tokens"].default)
    fit = fit_step_model(meas.decode, meas.prefill, mnbt)
    rows = fit_rows(fit, meas.decode, meas.prefill)
    top_c = max((p.concurrency for p in meas.decode), default=0)

    if max_num_seqs is not None:
        mns, mns_src = int(max_num_seqs), "given (--max-num-seqs)"
    elif meas.max_num_seqs_estimate is not None:
        mns, mns_src = meas.max_num_seqs_estimate, "measured: requests queued beyond this batch"
    else:
        mns = int(_DEFAULTS["max_num_seqs"].default)
        mns_src = f"default: no queueing up to concurrency {top_c} (give --max-num-seqs)"
    if max_num_batched_tokens is None:
        notes.append(f"max_num_batched_tokens {mnbt} is the default (give --max-num-batched-tokens; vLLM's CPU "
                     "server uses 2048)")

    mml = meas.max_model_len
    if kv_capacity_tokens is not None:
        kv, kv_src = int(kv_capacity_tokens), "given (--kv-capacity-tokens)"
    elif meas.kv_capacity_tokens:
        kv, kv_src = int(meas.kv_capacity_tokens), meas.kv_capacity_source
    else:
        kv = max(MIN_KV_TOKENS, mns * (mml or 2048))
        kv_src = "default: max_num_seqs × max_model_len (no KV metric; give --kv-capacity-tokens)"
    kv = max(kv, MIN_KV_TOKENS)
    if not meas.exact_lengths:
        notes.append(f"the server did not honour ignore_eos: {meas.inexact_requests} of {meas.decode_requests} decode "
                     "requests returned fewer tokens than max_tokens; the reported usage was used")
    for p in meas.decode:
        if not p.steady:
            notes.append(f"{p.label} c={p.concurrency}: unsteady ({p.note})")
    if meas.extra_waves:
        notes.append(f"{meas.extra_waves} extra waves for levels whose waves disagreed by more than 35% (medians)")
    if meas.longer_waves:
        notes.append(f"{meas.longer_waves} waves were sent again with longer outputs (staggered arrivals)")
    if not meas.metrics_exposed:
        notes.append("no vLLM /metrics: queueing judged from the streams alone")
    if meas.engine_tpot:
        notes.append("decode TPOTs are the engine's own inter-token latencies (vllm:inter_token_latency_seconds); "
                     "the streams' timing is kept per wave as client_tpot_s")

    source = f"chimera profile of {meas.model} at {meas.base_url}, {meas.started_at}"
    fitted: dict[str, Any] = {k: _sig(v) for k, v in fit.coefficients().items()}
    fitted["kv_capacity_tokens"] = kv
    if mml is not None:
        fitted["max_model_len"] = int(mml)
    fitted["source"] = source
    doc: dict[str, Any] = {"chimera_profile": PROFILE_FORMAT, "name": name or meas.model, "gpu": gpu}
    if params_b is not None:
        doc["params_b"] = float(params_b)
    doc.update({"max_num_seqs": mns, "max_num_batched_tokens": mnbt, "fitted": fitted})
    doc["fit_report"] = {
        "form": fit.form,
        "rms_relative_error": _sig(fit.rms_rel_error, 4),
        "max_num_seqs_source": mns_src,
        "kv_capacity_source": kv_src,
        "notes": notes,
        "points": [{"kind": r.kind, "x": r.x, "n": round(r.n, 2), "ctx_tokens": round(r.ctx_tokens),
                    "measured_ms": _sig(r.measured_s * 1e3, 5), "fitted_ms": _sig(r.fitted_s * 1e3, 5),
                    "error_pct": round(100 * r.error, 2), "steady": r.steady} for r in rows],
    }
    doc["measurements"] = _plain(meas.as_dict())
    spec = profile_from_dict(doc, source="<new profile>")  # what a cluster file will load: validated before writing
    return ProfileResult(spec=spec, fit=fit, rows=rows, document=doc, notes=[f"max_num_seqs {mns}: {mns_src}",
                                                                          f"KV capacity {kv:,} tokens: {kv_src}",
                                                                          *notes])


def _plain(x: Any) -> Any:
    """Floats rounded for a readable YAML; NaN/inf become null."""
    if isinstance(x, float):
        return _sig(x, 6) if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def check_rows(spec: ModelSpec, meas: Measurements) -> list[FitRow]:
    """Fresh measurements against an existing profile's (or any spec's) predictions, row by row."""
    m = StepTimeModel(spec)
    overhead = spec.fitted.request_overhead_s if isinstance(spec, FittedModelSpec) else 0.0
    rows = [FitRow(p.label, p.concurrency, p.n, p.ctx_tokens, p.tpot_s, m.step_time(p.n, p.ctx_tokens, 0),
                   (p.tpot_min_s, p.tpot_max_s), p.steady) for p in meas.decode]
    rows += [FitRow("prefill", p.prompt_tokens, 0, 0.0, p.ttft_s, overhead + m.prefill_time(p.prompt_tokens),
                    (p.ttft_min_s, p.ttft_max_s)) for p in meas.prefill]
    return rows


HEADER = """\
# Engine profile written by `chimera profile` (measured, then fitted; see docs/profile.md).
# Use it in a cluster file:   models: [{profile_file: THIS_FILE, name: NAME, replicas: 1}]
# or run an emulator of it:   chimera emulate --profile THIS_FILE --served-model-name NAME
# `fitted` drives the simulator's step times; `fit_report` and `measurements` are records (ignored on load).
"""


def write_profile(result: ProfileResult, path: str | Path, json_path: str | Path | None = None) -> Path:
    """The profile YAML at `path`; with `json_path`, also its measurements, fit report and fitted values as JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(HEADER + yaml.safe_dump(result.document, sort_keys=False, allow_unicode=True, width=120),
                 encoding="utf-8")
    if json_path is not None:
        j = Path(json_path)
        j.parent.mkdir(parents=True, exist_ok=True)
        doc = result.document
        j.write_text(json.dumps({"measurements": doc["measurements"], "fit": doc["fit_report"],
                                 "fitted": doc["fitted"]}, indent=1))
    return p


def fit_and_write(meas: Measurements, out: str | Path, overrides: ProfileOverrides = ProfileOverrides(),
                  json_out: str | Path | None = None) -> tuple[ProfileResult, Path]:
    """Fit `meas`, validate the profile as a cluster file would load it, write it (and the JSON record)."""
    try:
        res = build_profile(meas, **dataclasses.asdict(overrides))
    except ValueError as e:  # ClusterError and pydantic's ValidationError among them
        raise ProfileBuildError(f"could not build a profile from the measurements: {e}") from None
    return res, write_profile(res, out, json_out)


def stored_measurements(path: str | Path) -> tuple[Measurements, dict[str, Any]]:
    """The measurements kept in a profile YAML (to fit again without the server) and the whole document."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        meas = measurements_from_dict(raw["measurements"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, MeasureError) as e:
        raise MeasureError(f"{path}: no measurements to refit ({e})") from None
    return meas, raw


def fit_formula(fit: StepFit) -> str:
    """The fitted step-time model in one line (ms, µs, ns) with its RMS error over the measured points."""
    return (f"fit: t = {1e3 * fit.fixed_s:.4g} ms + hypot({1e3 * fit.weights_s:.4g} ms, "
            f"{1e6 * fit.per_token_s:.4g} µs × tokens) + {1e6 * fit.per_seq_s:.4g} µs × decoding "
            f"seqs^{fit.per_seq_exponent:.2f} + {1e9 * fit.per_context_token_s:.4g} ns × KV tokens; request overhead "
            f"{1e3 * fit.request_overhead_s:.3g} ms; RMS error {100 * fit.rms_rel_error:.1f}%")
