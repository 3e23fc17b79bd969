"""`chimera serve` and `chimera emulate`: the gateway, and an emulated backend to put behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from chimera.cli.common import LOAD_ERRORS, WORKLOAD_HELP, failing_on


def serve(
    config: Path = typer.Option(..., "--config", "-c", help="Gateway YAML (listen, auth, policy, predictors, "
                                "trace_store, backends); see docs/gateway.md."),
    port: Optional[int] = typer.Option(None, "--port", help="Listen on this port instead of the config's listen.port "
                                       "(replicas of one config on one host)."),
    trace_store: Optional[Path] = typer.Option(None, "--trace-store", help="This trace store instead of the config's "
                                               "(each replica needs its own)."),
    replica_id: Optional[str] = typer.Option(None, "--replica-id", help="This replica's state.replica_id (the config "
                                             "needs a state block); see docs/replicas.md."),
) -> None:
    """Run the OpenAI-compatible scheduling gateway in front of your model servers.

    Example: chimera serve --config examples/gateway.yaml

    Replicas: chimera serve --config examples/gateway-replicas.yaml --port 8101 --replica-id r1 --trace-store out/r1.sqlite
    """
    from chimera.serve import load_gateway_config, run_gateway
    from chimera.serve.config import override_gateway_config

    with failing_on(*LOAD_ERRORS):
        cfg = override_gateway_config(load_gateway_config(config), port=port, trace_store=trace_store,
                                      replica_id=replica_id)
    run_gateway(cfg)


def emulate(
    profile: str = typer.Option(..., "--profile", help="Engine profile MODEL@GPU (see src/chimera/perfmodel/catalogue.yaml)."),
    served_model_name: str = typer.Option(..., "--served-model-name", help="Model name clients send."),
    port: int = typer.Option(8001, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Run the engine model this many times faster than real time."),
    scheduling_policy: str = typer.Option("fcfs", "--scheduling-policy", help="fcfs | priority (as vLLM)."),
    workload: Optional[str] = typer.Option(None, "--workload", "-w", help=WORKLOAD_HELP + " Replays its lengths/texts."),
    workload_model: Optional[str] = typer.Option(None, "--workload-model", help="Model of the workload to replay."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """An emulated vLLM-like backend in real time, driven by the engine model (simulated, not a real model).

    Example: chimera emulate --profile qwen2.5-7b@a6000 --served-model-name qwen2.5-7b --port 8001 --time-scale 10
    """
    from chimera.emulate.runner import serve_emulator
    from chimera.workload.source import load_workload

    with failing_on(*LOAD_ERRORS):
        tasks = load_workload(workload)[0] if workload else None
    serve_emulator(host=host, port=port, profile=profile, served_model_name=served_model_name,
                   time_scale=time_scale, scheduling_policy=scheduling_policy, workload=tasks,
                   workload_model=workload_model, seed=seed)
