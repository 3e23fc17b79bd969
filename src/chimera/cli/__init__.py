"""The `chimera` command: one entry point, one subcommand per job.

The command tree is written out here; each group's commands live in a module of their own, and a command only
parses its flags into the packages' typed configs, calls the packages and prints (`chimera.cli:main` is the console
script; `from chimera.cli import app; app()` is how benchmarks spawn subcommands).
"""

from __future__ import annotations

import signal
from typing import Callable

import typer

from chimera.cli import agents, bench, bench_live, demo, engines, profile, serve, simulate, traces, train, workload

HELP = "Chimera: predictive scheduling of multi-agent LLM workflows on heterogeneous clusters."
COMMANDS: dict[str, Callable] = {
    "simulate": simulate.simulate, "policies": simulate.policies, "cluster": simulate.cluster_show,
    "tune": bench.tune, "train": train.train, "serve": serve.serve, "emulate": serve.emulate,
    "profile": profile.profile_cmd, "demo": demo.demo,
}
GROUPS: dict[str, tuple[str, dict[str, Callable]]] = {
    "workload": ("Workloads: export public benchmark data, generate synthetic tasks.",
                 {"list": workload.workload_list, "export": workload.workload_export}),
    "bench": ("Benchmarks: policy sweeps and speed.",
              {"sim": bench.bench_sim, "speed": bench.bench_speed, "predict": bench.bench_predict,
               "ope": bench.bench_ope,
               "gateway": bench_live.bench_gateway, "live": bench_live.bench_live, "soak": bench_live.bench_soak}),
    "eval": ("Evaluate predictors on held-out tasks, and policies on logged traffic.",
             {"predictors": train.eval_predictors, "traces": traces.eval_traces}),
    "agents": ("Live agents: run a workload's workflows against an OpenAI-compatible endpoint.",
               {"run": agents.agents_run}),
    "engines": ("Real engines: vLLM CPU servers on random-weight models (real serving, noise text); "
                "see docs/real-engines.md.",
                {"build-models": engines.engines_build_models, "up": engines.engines_up,
                 "speed": engines.engines_speed}),
}


def build_app() -> typer.Typer:
    """The Typer app of COMMANDS, then one sub-app per entry of GROUPS (in that order, as `--help` lists them)."""
    root = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
    for name, command in COMMANDS.items():
        root.command(name)(command)
    for name, (help_text, commands) in GROUPS.items():
        sub = typer.Typer(no_args_is_help=True, help=help_text)
        for sub_name, command in commands.items():
            sub.command(sub_name)(command)
        root.add_typer(sub, name=name)
    return root


app = build_app()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so benchmarks stop the servers they started (each runs in its own session);
    # `chimera serve` / `emulate` replace this with uvicorn's graceful handler.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()
