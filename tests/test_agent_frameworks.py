"""Agents that were never written for Chimera, in front of the gateway. A real agent framework, unmodified: the OpenAI Agents SDK (installed from its pin into
`.venv-agents` by the Makefile) runs a tool-using agent on 20 tasks at once, through the Responses API (the SDK's
default) and through chat completions, against the Chimera gateway in front of three emulated backends, all on
127.0.0.1. The agent sends no Chimera hints; the gateway must still file every call of a task under one workflow,
stages 0, 1, 2, ... in order, and never join two tasks. The benchmarks' own agent driver without hints
(`AgentConfig(hints=False)`, what `--no-hints` runs) must be followed the same way, its feedback by response id
reaching the right workflow.

The agent runs in a subprocess (tests/agents_sdk_agent.py with `.venv-agents/bin/python`): the SDK pins its own
`openai`, which need not match this venv's. The emulators replay the tasks' plans: with `tools` in a request they
answer with a tool call on every stage but the last, so each task makes exactly its plan's number of LLM calls."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from chimera.agents.driver import AgentConfig, make_workflows, run_agents_sync
from chimera.emulate import EmulatorServer
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.workload.synthetic import generate
from upstreams import Served

ROOT = Path(__file__).resolve().parent.parent
AGENTS_PY = ROOT / ".venv-agents" / "bin" / "python"
SCRIPT = Path(__file__).resolve().parent / "agents_sdk_agent.py"
MODELS = {"qwen2.5-1.5b": "qwen2.5-1.5b@a6000", "qwen2.5-7b": "qwen2.5-7b@a6000", "qwen2.5-14b": "qwen2.5-14b@a6000"}
SCALE = 50.0
KEY = "x"
N_TASKS = 20

needs_sdk = pytest.mark.skipif(not AGENTS_PY.exists(),
                               reason=f"{AGENTS_PY} missing: `make test` builds .venv-agents (openai-agents pinned)")


def framework_tasks(n: int = N_TASKS):
    """n synthetic tasks whose plans take 3 to 6 LLM calls, no prompt a prefix of another's (the emulator finds a
    task by its prompt), with their plans."""
    picked: list = []
    for _, plan, task in make_workflows(generate(200)):
        if 3 <= plan.n_stages <= 6 and not any(task.prompt.startswith(t.prompt) or t.prompt.startswith(task.prompt)
                                               for t, _ in picked):
            picked.append((task, plan))
        if len(picked) == n:
            return picked
    raise AssertionError(f"only {len(picked)} synthetic tasks fit")


@pytest.fixture(scope="module")
def backends():
    """Three emulated backends that replay the framework tasks; yields (tasks with plans, {model: emulator})."""
    picked = framework_tasks()
    tasks = [t for t, _ in picked]
    with contextlib.ExitStack() as stack:
        emus = {m: stack.enter_context(EmulatorServer(profile=p, served_model_name=m, time_scale=SCALE,
                                                      workload=tasks))
                for m, p in MODELS.items()}
        yield picked, emus


@contextlib.contextmanager
def gateway(tmp_path, emus):
    """A fresh gateway (policy chimera, auth on, no identity settings: the defaults) in front of `emus`."""
    cfg = gateway_config_from_dict({
        "auth": {"api_keys": [KEY]},
        "policy": {"name": "chimera", "lam": 0.02},
        "trace_store": str(tmp_path / "traces.sqlite"),
        "backends": [{"name": f"{m}-0", "model": m, "base_url": e.base_url, "max_inflight": 8, "profile": MODELS[m]}
                     for m, e in emus.items()],
        "limits": {"request_timeout_s": 60},
    })
    gw = Served(build_gateway(cfg))
    try:
        yield gw
    finally:
        gw.stop()


def run_sdk_agent(base_url: str, api: str, prompts: list[str], tmp_path: Path, stream: bool = False) -> dict:
    """tests/agents_sdk_agent.py in .venv-agents against `base_url`; its JSON report."""
    tasks_file = tmp_path / "prompts.json"
    tasks_file.write_text(json.dumps(prompts))
    cmd = [str(AGENTS_PY), str(SCRIPT), "--base-url", base_url, "--api", api, "--tasks", str(tasks_file),
           "--api-key", KEY] + (["--stream"] if stream else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def traced_calls(gw, expected: int) -> list[dict]:
    """The gateway's call rows, once the trace store's writer has caught up with `expected` calls (5 s at most)."""
    deadline = time.time() + 5
    rows: list[dict] = []
    while time.time() < deadline:
        rows = gw.gw.trace.query("SELECT * FROM calls")
        if len(rows) >= expected:
            break
        time.sleep(0.05)
    return rows


@needs_sdk
@pytest.mark.parametrize("api,stream", [("responses", False), ("chat", False), ("responses", True),
                                        ("chat", True)],
                         ids=["responses", "chat", "responses-stream", "chat-stream"])
def test_openai_agents_sdk_tasks_are_one_workflow_each(backends, tmp_path, api: str, stream: bool) -> None:
    picked, emus = backends
    with gateway(tmp_path, emus) as gw:
        report = run_sdk_agent(gw.url + "/v1", api, [t.prompt for t, _ in picked], tmp_path, stream)
        results = report["tasks"]
        assert [r.get("error") for r in results] == [None] * len(picked), results
        # the emulator's tool calls keep the SDK's loop going for each task's planned number of calls
        assert [r["calls"] for r in results] == [plan.n_stages for _, plan in picked]
        total = sum(r["calls"] for r in results)
        rows = traced_calls(gw, total)
    assert len(rows) == total and all(r["status"] == "ok" for r in rows), {r["status"] for r in rows}
    assert_one_workflow_per_task(rows, picked)


def assert_one_workflow_per_task(rows: list[dict], picked) -> dict[str, list[dict]]:
    """The trace rows hold one workflow per task; returns them by workflow id."""
    by_wf: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_wf[r["workflow_id"]].append(r)
    # every call of a task in one workflow, no two tasks in one: as many workflows as tasks, each with one task's
    # prompt (the router's prompt: the first user message / input) and that task's calls as stages 0, 1, 2, ...
    assert len(by_wf) == len(picked), sorted((w, len(v)) for w, v in by_wf.items())
    stages_of = {t.prompt: plan.n_stages for t, plan in picked}
    seen = set()
    for wid, calls in by_wf.items():
        prompts = {c["prompt"] for c in calls}
        assert len(prompts) == 1 and prompts <= set(stages_of), (wid, prompts)
        prompt = prompts.pop()
        assert prompt not in seen, f"two workflows for one task: {prompt[:60]!r}"
        seen.add(prompt)
        assert sorted(c["stage"] for c in calls) == list(range(stages_of[prompt])), (wid, calls)
        if "identity" in calls[0]:  # the source of each call's identity: inferred, never a hint (none were sent)
            assert all(c["identity"] != "hint" for c in calls) and all(
                c["identity"] != "new" for c in calls if c["stage"] > 0), [(c["stage"], c["identity"]) for c in calls]
    return by_wf


def test_the_drivers_agents_without_hints_are_followed_too(backends, tmp_path) -> None:
    picked, emus = backends
    tasks = [t for t, _ in picked]
    with gateway(tmp_path, emus) as gw:
        run = run_agents_sync(tasks, AgentConfig(base_url=gw.url, api_key=KEY, rate=20, time_scale=SCALE,
                                                 hints=False))
        assert run.summary["failed"] == 0 and run.summary["feedback_sent"] == len(tasks)
        total = sum(plan.n_stages for _, plan in picked)
        rows = traced_calls(gw, total)
        deadline = time.time() + 5
        while len(gw.gw.trace.query("SELECT * FROM feedback")) < len(tasks) and time.time() < deadline:
            time.sleep(0.05)
        feedback = gw.gw.trace.query("SELECT workflow_id, score FROM feedback")
    by_wf = assert_one_workflow_per_task(rows, picked)
    # feedback named each task's last response; the gateway filed it under that task's workflow
    assert sorted(f["workflow_id"] for f in feedback) == sorted(by_wf)
    scores = {r.task_id: r.score for r in run.records}
    by_prompt = {t.prompt: t.id for t in tasks}
    assert {f["workflow_id"]: f["score"] for f in feedback} == {
        w: scores[by_prompt[calls[0]["prompt"]]] for w, calls in by_wf.items()}
