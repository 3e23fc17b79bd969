"""`chimera engines build-models|up|speed`: real vLLM CPU servers on random-weight models (docs/real-engines.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from chimera.cli.common import console, err, fail, failing_on, names

MODELS_HELP = "Comma-separated models: recipe names under --models-dir (tiny, wide) or model folders; one server each."
VENV_HELP = "The vLLM venv (default: .venv-vllm in the checkout, or $CHIMERA_VLLM_VENV)."
MODELS_DIR_HELP = "Default: out/models in the checkout, or $CHIMERA_VLLM_MODELS."


def engines_build_models(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for one sub-folder per model. " + MODELS_DIR_HELP),
    models: str = typer.Option("tiny,wide", "--models", help="Comma-separated recipes (tiny, wide)."),
    force: bool = typer.Option(False, "--force", help="Rebuild folders that are already up to date."),
    venv: Optional[Path] = typer.Option(None, "--venv", help=VENV_HELP),
) -> None:
    """Build the random-weight models (Qwen2, BPE tokenizer on local text) with the vLLM venv's python.

    Example: chimera engines build-models --out out/models
    """
    from chimera.backends.vllm_cpu import EngineSetupError, build_models

    with failing_on(EngineSetupError, strip=False):
        rc = build_models(out, names(models), force=force, venv=venv)
    if rc:
        fail(f"model builder exited with {rc}")


def engines_up(
    models: str = typer.Option("tiny,wide", "--models", help=MODELS_HELP),
    priority: bool = typer.Option(False, "--priority", help="Run every server with --scheduling-policy priority "
                                  "(the gateway YAML then sets priority: true)."),
    out: Path = typer.Option(Path("out/engines"), "--out", help="Work folder: logs, temp/cache dirs, gateway.yaml."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
    venv: Optional[Path] = typer.Option(None, "--venv", help=VENV_HELP),
    gateway_port: int = typer.Option(8000, "--gateway-port", help="The port written into gateway.yaml."),
    max_inflight: int = typer.Option(32, "--max-inflight", help="max_inflight per backend in gateway.yaml."),
) -> None:
    """Start real vLLM CPU servers until Ctrl-C: prints their URLs and the gateway YAML to serve in front.

    One model and one core per server; Ctrl-C (or SIGTERM) stops them all, whole process groups.

    Example: chimera engines up --models tiny,wide --priority   (then: chimera serve --config out/engines/gateway.yaml)
    """
    from chimera.backends.vllm_cpu import EngineSetupError, ServerSpec, vllm_cluster, wait_until_signalled
    from chimera.serve.config import backends_for_cluster, build_gateway_config, write_gateway_config

    specs = [ServerSpec(m, priority=priority) for m in names(models)]
    err.print(f"starting {len(specs)} vLLM server(s) ({', '.join(s.name for s in specs)}); ~40-120 s ...")
    try:
        with vllm_cluster(specs, workdir=out, models_dir=models_dir, venv=venv) as cluster:
            gw_cfg = build_gateway_config(backends_for_cluster({**s, "max_inflight": max_inflight}
                                                               for s in cluster.served()),
                                          lam=0.02, port=gateway_port, trace_store=cluster.workdir / "trace.sqlite")
            gateway_yaml = write_gateway_config(gw_cfg, cluster.workdir / "gateway.yaml", header=(
                "Written by `chimera engines up` for real vLLM CPU servers (random-weight models, one core each).\n"
                "Start the gateway in front of them: chimera serve --config THIS_FILE"))
            t = Table(title="vLLM CPU servers (random weights: output text is noise)")
            for col in ("model", "base_url", "dtype", "core", "priority", "pid", "start-up (s)", "log"):
                t.add_column(col)
            for s in cluster:
                d = s.describe()
                t.add_row(d["name"], d["base_url"], d["dtype"], str(d["core"]), "yes" if d["priority"] else "no",
                          str(d["pid"]), f"{d['startup_s']:.0f}", d["log"])
            console.print(t)
            console.print(f"gateway config: {gateway_yaml}")
            console.print(f"  chimera serve --config {gateway_yaml}")
            console.print("Ctrl-C stops the servers.")
            why = wait_until_signalled(cluster)
    except (EngineSetupError, RuntimeError, ValueError) as e:
        fail(str(e))
    if why != "signal":
        fail(f"{why}; the other servers were stopped")
    console.print("stopped")


def engines_speed(
    models: str = typer.Option("tiny,wide", "--models", help=MODELS_HELP + " The ratio is first over last."),
    levels: str = typer.Option("1,8,32", "--levels", help="Concurrency levels."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Output tokens per request (exact: ignore_eos)."),
    rounds: int = typer.Option(3, "--rounds", help="Repeat every (model, level) this many times, interleaved; "
                               "the table shows medians."),
    min_s: float = typer.Option(8.0, "--min-s", help="Each measurement runs at least this long."),
    together: bool = typer.Option(False, "--together", help="Load all servers at once per level (else in turn)."),
    out: Path = typer.Option(Path("out/engines-speed"), "--out", help="Work folder; results.json and results.md."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
    venv: Optional[Path] = typer.Option(None, "--venv", help=VENV_HELP),
) -> None:
    """Measure real vLLM servers' aggregate output tok/s per model and concurrency, and their speed ratio.

    Starts the servers, runs streaming chat requests of exactly --max-tokens (ignore_eos), prints medians, stops them.

    Example: chimera engines speed --models tiny,wide --levels 1,8,32 --rounds 3
    """
    from chimera.backends import speed
    from chimera.backends.vllm_cpu import EngineSetupError, ServerSpec, vllm_cluster

    with failing_on(EngineSetupError, RuntimeError, strip=False):
        with vllm_cluster([ServerSpec(m) for m in names(models)], workdir=out, models_dir=models_dir,
                          venv=venv) as cl:
            err.print(f"servers up (start-up s: {[(s.served_model_name, round(s.startup_s or 0)) for s in cl]}); "
                      "measuring ...")
            res = speed.measure([(s.base_url, s.served_model_name) for s in cl],
                                levels=tuple(int(c) for c in names(levels)), max_tokens=max_tokens,
                                together=together, rounds=rounds, min_s=min_s)
            servers = [s.describe() for s in cl]
    md = speed.markdown_table(res, servers[0]["name"], servers[-1]["name"])
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"servers": servers, "max_tokens": max_tokens, "rounds": rounds,
                                                  "together": together, "results": speed.to_json(res)}, indent=1))
    console.print(md)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'} (aggregate output tok/s, medians of "
                  f"{rounds} rounds; client on the same cores)")
