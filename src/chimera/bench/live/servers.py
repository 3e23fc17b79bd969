"""The real vLLM CPU servers of `chimera bench live --engine vllm`: their settings (the same for every contender and
for profiling), where they keep their state, the tokenizer they use, and the counters read from them."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from chimera.bench.live.config import REAL_MAX_MODEL_LEN, REAL_MAX_NUM_BATCHED_TOKENS, LiveBenchConfig


def real_server_specs(cfg: LiveBenchConfig) -> list:
    """The servers every contender (and the profiling) gets: one model and one core each."""
    from chimera.backends.vllm_cpu import ServerSpec

    return [ServerSpec(m, priority=cfg.priority, max_num_seqs=cfg.max_inflight, kv_cache_gib=cfg.kv_cache_gib,
                       max_model_len=REAL_MAX_MODEL_LEN,
                       extra_args=["--max-num-batched-tokens", str(REAL_MAX_NUM_BATCHED_TOKENS)])
            for m in cfg.real_models]


IPC_PATH_MAX = 107  # bytes of a unix socket path (sockaddr_un.sun_path): vLLM's ZMQ sockets live in the state dir


def server_workdir(workdir: Path, names: Sequence[str]) -> Path:
    """Where the servers keep their state (temp dirs, ZMQ sockets, caches, logs): `workdir/srv`, unless a socket
    path there would pass the unix limit (deep or non-ASCII folders, e.g. pytest's): then a short folder under
    chimera.backends.vllm_cpu.DEFAULT_WORKDIR (out/engines/live-HASH), never /tmp."""
    import hashlib

    from chimera.backends.vllm_cpu import DEFAULT_WORKDIR

    wd = (Path(workdir) / "srv").resolve()
    longest = max(len(os.fsencode(f"/servers/{i}-{n}/rpc/")) for i, n in enumerate(names)) + 36  # + a uuid4
    if len(os.fsencode(str(wd))) + longest <= IPC_PATH_MAX:
        return wd
    return Path(DEFAULT_WORKDIR).resolve() / f"live-{hashlib.sha1(os.fsencode(str(wd))).hexdigest()[:10]}"


def cluster_kwargs(cfg: LiveBenchConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"start_timeout_s": 300.0}
    if cfg.models_dir:
        kw["models_dir"] = Path(cfg.models_dir)
    if cfg.venv:
        kw["venv"] = Path(cfg.venv)
    return kw


def check_real_setup(cfg: LiveBenchConfig) -> dict[str, Path]:
    """Fail before anything starts: the vLLM venv and every model folder exist. Returns {name: model folder}."""
    from chimera.backends.vllm_cpu import DEFAULT_MODELS, DEFAULT_VENV, model_dir, vllm_python

    vllm_python(Path(cfg.venv) if cfg.venv else DEFAULT_VENV)
    return {m: model_dir(m, Path(cfg.models_dir) if cfg.models_dir else DEFAULT_MODELS) for m in cfg.real_models}


def params_b(model_folder: Path) -> float | None:
    """Parameters (billions) of a model built by chimera.backends.random_models (ranks model sizes for the policies)."""
    try:
        return json.loads((model_folder / "chimera-model.json").read_text())["parameters"] / 1e9
    except (OSError, ValueError, KeyError, TypeError):
        return None


EXPORT_TOKENIZER = ("import sys\nfrom transformers import AutoTokenizer\n"
                    "AutoTokenizer.from_pretrained(sys.argv[1]).backend_tokenizer.save(sys.argv[2])\n")


def server_tokenizer(folders: dict[str, Path], out: Path, venv: str | None = None) -> tuple[Path, str]:
    """The tokenizer the servers really use, as a tokenizers JSON the driver pads prompts with: exported by the vLLM
    venv's transformers (which gives a `qwen2` model Qwen2's pre-tokenizer and NFC, not the plain byte-level one
    saved in tokenizer.json: digits and punctuation split differently). Every server must use the same one.
    Falls back to the folder's tokenizer.json (noted) where the export fails. Returns (path, how)."""
    import subprocess

    from chimera.backends.vllm_cpu import DEFAULT_VENV, vllm_python

    py = vllm_python(Path(venv) if venv else DEFAULT_VENV)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out.mkdir(parents=True, exist_ok=True)
    paths, how = [], "exported by the vLLM venv's transformers (what the servers tokenize with)"
    first: Path | None = None

    def same_files(a: Path, b: Path) -> bool:  # the tokenizer files and the model type (it picks the pre-tokenizer)
        def model_type(d: Path) -> Any:
            with contextlib.suppress(OSError, ValueError):
                return json.loads((d / "config.json").read_text()).get("model_type")
            return None

        return model_type(a) == model_type(b) is not None and all(
            (a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()
            for f in ("tokenizer.json", "tokenizer_config.json"))

    for name, folder in folders.items():
        if first is not None and paths and same_files(first, folder):  # same files: the same export
            paths.append(paths[0])
            continue
        first = first or folder
        dest = out / f"server-tokenizer-{name}.json"
        r = subprocess.run([str(py), "-c", EXPORT_TOKENIZER, str(folder), str(dest)], env=env, capture_output=True,
                           timeout=300)
        if r.returncode != 0 or not dest.is_file():
            dest, how = folder / "tokenizer.json", (f"{folder}/tokenizer.json (export failed: "
                                                    f"{r.stderr.decode(errors='replace').strip()[-200:]})")
            if not dest.is_file():
                raise FileNotFoundError(f"no tokenizer.json in {folder}")
        paths.append(dest)
    for q in paths[1:]:
        if q.read_bytes() != paths[0].read_bytes():
            raise ValueError(f"the servers' tokenizers differ ({paths[0]} vs {q}); prompt padding needs one")
    return paths[0], how


def scrape_servers(servers) -> dict[str, dict[str, float]]:
    """A few vLLM counters per server (prompt/generation tokens, preemptions, prefix-cache queries and hits)."""
    import httpx

    from chimera.profiling.metrics import parse_prometheus

    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
             "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
             # the engine's own times (sum and count of its histograms): how fast it really stepped in the run
             "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count",
             "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
             "vllm:request_decode_time_seconds_sum", "vllm:e2e_request_latency_seconds_sum",
             "vllm:e2e_request_latency_seconds_count")
    out = {}
    for s in servers:
        vals = {n: 0.0 for n in names}
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(s.url + "/metrics", timeout=10).text
            for n, lab, v in parse_prometheus(text):
                if n in vals and lab.get("model_name") in (None, s.served_model_name):
                    vals[n] += v
        out[s.served_model_name] = vals
    return out


def metrics_delta(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per server, what its counters counted from `a` to `b`, with the prefix-cache hit share and the engine's
    mean times per token and per call."""
    out = {}
    for m, vals in b.items():
        d = {k.removeprefix("vllm:").removesuffix("_total"): v - a.get(m, {}).get(k, 0.0) for k, v in vals.items()}
        q = d.get("prefix_cache_queries", 0.0)
        d["prefix_cache_hit_pct"] = 100.0 * d.get("prefix_cache_hits", 0.0) / q if q else 0.0
        n_itl, n_req = d.get("inter_token_latency_seconds_count", 0.0), d.get("e2e_request_latency_seconds_count", 0.0)
        d["engine_tpot_ms"] = 1e3 * d.get("inter_token_latency_seconds_sum", 0.0) / n_itl if n_itl else 0.0
        for k in ("queue", "prefill", "decode"):
            d[f"engine_{k}_ms_per_call"] = 1e3 * d.get(f"request_{k}_time_seconds_sum", 0.0) / n_req if n_req else 0.0
        d["engine_e2e_ms_per_call"] = 1e3 * d.get("e2e_request_latency_seconds_sum", 0.0) / n_req if n_req else 0.0
        out[m] = d
    return out


def counters_meter(servers) -> Callable[[], dict[str, dict[str, float]]]:
    """Read the servers' counters now; the function returned reads them again and gives what they counted since."""
    before = scrape_servers(servers)
    return lambda: metrics_delta(before, scrape_servers(servers))
