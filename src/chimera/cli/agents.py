"""`chimera agents run`: ReAct-style agents drive a workload's workflows through an OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from chimera.cli.common import (LOAD_ERRORS, WORKLOAD_HELP, console, fail, failing_on, names, progress, summary_table,
                                write_json)


def agents_run(
    gateway: str = typer.Option(..., "--gateway", help="OpenAI-compatible base URL (Chimera gateway, LiteLLM, one backend); /v1 is appended if missing."),
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Closed loop: this many agents at once (default 4)."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Open loop: Poisson arrivals, workflows per second."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="Workflows to run (default: one per task)."),
    models: str = typer.Option("chimera", "--models", help="Comma-separated model names, round-robin per workflow."),
    api_key: str = typer.Option("EMPTY", "--api-key", envvar="CHIMERA_API_KEY", help="Bearer key for the endpoint."),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Divide the plan's tool times by this (match emulators)."),
    seed: int = typer.Option(0, "--seed"),
    pad_prompts: bool = typer.Option(True, "--pad-prompts/--no-pad-prompts", help="Pad each request with filler tokens up to the plan's prompt length (the context the task text lacks)."),
    no_hints: bool = typer.Option(False, "--no-hints", help="Send no Chimera workflow hints, only what an OpenAI client sends: append-only conversations, feedback by response id."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary JSON here."),
) -> None:
    """ReAct-style agents execute each task's workflow stage by stage through the openai client (live, not simulated).

    Example: chimera agents run --gateway http://127.0.0.1:8000 --workload synthetic:50 --concurrency 8 --json out/live.json
    Unmodified agents: chimera agents run --gateway http://127.0.0.1:8000 --workload synthetic:50 --rate 2 --no-hints
    """
    from chimera.agents.driver import AgentConfig, run_agents_sync
    from chimera.workload.source import load_workload

    if concurrency is not None and rate is not None:
        fail("give either --concurrency or --rate, not both")
    with failing_on(*LOAD_ERRORS):
        task_list = load_workload(workload, seed=seed)[0]
        cfg = AgentConfig(base_url=gateway, models=names(models), api_key=api_key, concurrency=concurrency, rate=rate,
                          time_scale=time_scale, seed=seed, pad_prompts=pad_prompts, hints=not no_hints)
    n = tasks if tasks is not None else len(task_list)
    with progress() as prog:
        bar = prog.add_task("workflows", total=n)
        run = run_agents_sync(task_list, cfg, n, on_record=lambda r: prog.advance(bar))
    res = run.summary
    hints = "" if cfg.hints else ", no workflow hints"
    console.print(summary_table([res], f"{workload} via {cfg.base_url} — live{hints}"))
    console.print(f"failed: {res['failed']}; queue_s: {res['queue_s_note']}")
    for f in res["failures"][:10]:
        console.print(f"  {f['workflow_id']}: {f['reason']}")
    if json_out is not None:
        write_json(json_out, res)
