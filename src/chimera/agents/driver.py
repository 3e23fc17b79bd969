"""ReAct-style agents that execute each task's workflow plan, stage by stage, through the official `openai` client.

Works against any OpenAI-compatible endpoint (the Chimera gateway, LiteLLM, one vLLM backend). Each stage's prompt is
the task prompt plus every earlier stage's output (the context grows), padded with filler tokens up to the plan's
prompt length (the instructions and tool observations the text lacks); `max_tokens` is the plan's output length for
the stage, so a plain backend also produces the planned length. Between stages the agent really sleeps for the plan's
tool time (divided by `time_scale`). After the last stage the task's score (plan.score over the models that answered)
is POSTed to `{base_url}/chimera/feedback` (a 404 from a non-Chimera endpoint is ignored).

The summary is `chimera.sim.metrics.summarize(...)`, the same JSON as `chimera simulate`, with `"simulated": false`.
Queue time is not observable from the client: `queue_s` is reported as 0 (see `queue_s_note`).

For real engines (`chimera bench live --engine vllm`): `extra_body` adds request fields (`ignore_eos: true`, so a
vLLM server returns exactly `max_tokens`); with `tokenizer` (the server's tokenizer.json, ChatML chat template) each
prompt is laid out as the plan's token stream, segment by segment in the server's tokens (`messages.plan_messages`: the
kind's system prompt, the task text, each stage's instructions as text that depends only on the segment, earlier
outputs as assistant messages trimmed to the tokens they were generated as), so the servers' prefix caches see the
sharing the simulator models, and the prompt is the plan's length, ChatML markers included. `max_model_len` caps
`max_tokens` so that prompt + output fit. The summary then carries `length_check` (planned vs sent prompt tokens,
calls shorter than asked).

`hints=False` drives the endpoint as an unmodified agent would: only what an OpenAI client sends (no X-Chimera-*
headers, no `chimera` body object), each call's messages the previous call's exactly as sent plus the reply as
received plus one new observation (`messages.Conversation`), and feedback by the id of the task's last response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import httpx

from chimera.agents.messages import Conversation, ServerTokens, plan_messages, stage_messages
from chimera.sim.metrics import WorkflowRecord, summarize
from chimera.workload.arrivals import LIVE_STREAM, poisson_arrivals
from chimera.workload.plan import WorkflowPlan, plan_workflow, task_rng
from chimera.workload.schema import Task
from chimera.workload.templates import load_templates, template_for
from chimera.workload.workflows import repeat_ids

DEFAULT_MODEL = "chimera"
CLIENT_SHARDS = 16  # HTTP clients the workflows are spread over (see run_agents)
QUEUE_NOTE = "unknown in live runs (the client cannot see backend queueing); reported as 0"


@dataclass
class AgentConfig:
    """How to drive the endpoint. Exactly one of `concurrency` (closed loop) / `rate` (open loop, Poisson)."""

    base_url: str
    models: Sequence[str] = (DEFAULT_MODEL,)
    api_key: str = "EMPTY"
    concurrency: int | None = None
    rate: float | None = None
    time_scale: float = 1.0
    seed: int = 0
    timeout_s: float = 600.0
    feedback: bool = True
    pad_prompts: bool = True  # pad each request to the plan's prompt length (see messages.stage_messages)
    extra_body: dict = field(default_factory=dict)  # extra request fields, e.g. {"ignore_eos": True} for vLLM
    tokenizer: str | None = None  # the server's tokenizer.json: pad and count in its tokens (ChatML template)
    max_model_len: int | None = None  # cap max_tokens so that prompt + output fit the server's context
    hints: bool = True  # False: an unmodified agent (no Chimera headers or body, append-only messages)
    # Append-only conversations (as an unmodified agent's) also with hints: None follows `hints` (append-only exactly
    # when there are none); True lets a hinted run send the same messages as a hintless one, to compare like with like.
    append_only: bool | None = None
    # Further replicas of the same gateway: calls are spread over `base_url` and these, per call ("call": workflow i's
    # k-th call to endpoint (i + k) mod n, as a round-robin load balancer) or per workflow ("workflow": sticky)
    replica_urls: Sequence[str] = ()
    spread: Literal["call", "workflow"] = "call"

    def __post_init__(self) -> None:
        self.base_url = normalize_base_url(self.base_url)
        self.replica_urls = tuple(normalize_base_url(u) for u in self.replica_urls)
        if self.spread not in ("call", "workflow"):
            raise ValueError(f"spread must be 'call' or 'workflow', got {self.spread!r}")
        self.models = tuple(self.models) or (DEFAULT_MODEL,)
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("give either concurrency (closed loop) or rate (open loop), not both")
        if self.concurrency is None and self.rate is None:
            self.concurrency = 4
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")


    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every base URL the calls go to (`base_url` first)."""
        return (self.base_url, *self.replica_urls)

    def endpoint(self, workflow: int, stage: int) -> int:
        """Which endpoint workflow `workflow`'s call at `stage` goes to (an index into `endpoints`)."""
        k = workflow + stage if self.spread == "call" else workflow
        return k % (1 + len(self.replica_urls))


def normalize_base_url(url: str) -> str:
    """`http://h:p`, `http://h:p/` or `http://h:p/v1` -> `http://h:p/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class StageResult:
    stage: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    planned_prompt_tokens: int | None = None  # what the plan asked for (None: no padding)
    sent_prompt_tokens: int | None = None  # counted with the server's tokenizer before sending (real engines)
    max_tokens: int | None = None
    capped: bool = False  # max_tokens cut so that prompt + output fit max_model_len


@dataclass
class AgentRun:
    """What a run produced: the summary JSON plus per-workflow detail."""

    summary: dict
    records: list[WorkflowRecord]
    stages: dict[str, list[StageResult]] = field(default_factory=dict)  # workflow id -> stages that completed
    feedback_sent: int = 0


def make_workflows(tasks: Sequence[Task], n: int | None = None, seed: int = 0
                   ) -> list[tuple[str, WorkflowPlan, Task]]:
    """(workflow id, plan, task): plans as the emulator plans them (`task_rng(task.id, seed)`), so emulated backends
    fed the same workload replay the same per-stage lengths. Beyond one pass, tasks repeat as `id~k`."""
    templates = load_templates()
    plans: dict[str, WorkflowPlan] = {}
    out = []
    for wid, t in repeat_ids(tasks, [t.id for t in tasks], n):
        plan = plans.get(t.id)
        if plan is None:
            plan = plans[t.id] = plan_workflow(t, template_for(t.kind, templates), task_rng(t.id, seed))
        out.append((wid, plan, t))
    return out


def _max_tokens(plan: WorkflowPlan, stage: int, model: str) -> int:
    """The plan's output length for this stage; for a model the plan does not know ("chimera"), the longest."""
    if model in plan.models:
        return plan.output_tokens(stage, model)
    return max(plan.output_tokens(stage, m) for m in plan.models) if plan.models else 256


def served_model(body_model: str | None, headers, requested: str) -> str:
    """The model that answered: LiteLLM names the deployment in `x-litellm-model-name` (`openai/NAME`) and puts
    the model group in the body; Chimera and vLLM put the served model in the body."""
    name = headers.get("x-litellm-model-name") if headers is not None else None
    if name:
        return name.split("/", 1)[1] if "/" in name else name
    return body_model or requested


def _received_message(raw) -> dict:
    """The first choice's message as the server sent it (every field, none added), from the raw response."""
    choices = raw.http_response.json().get("choices") or [{}]
    return choices[0].get("message") or {"role": "assistant", "content": ""}


def _reason(e: BaseException, stage: int) -> str:
    msg = str(e).strip() or type(e).__name__
    return f"stage {stage}: {type(e).__name__}: {msg}"[:500]


async def _run_workflow(clients: Sequence, index: int, http: httpx.AsyncClient, cfg: AgentConfig, wid: str,
                        plan: WorkflowPlan, task: Task, model: str, arrival: float, t0: float, run: AgentRun,
                        per_model: dict, counter: ServerTokens | None = None) -> WorkflowRecord:
    """Workflow number `index`, its calls sent through `clients` (one per endpoint, as `cfg.endpoint` picks)."""
    outputs: list[str] = []
    out_tokens: list[int] = []
    served: list[str] = []
    stages: list[StageResult] = []
    failed: str | None = None
    stage = 0
    appending = cfg.append_only if cfg.append_only is not None else not cfg.hints
    convo = Conversation(task, plan, counter, wid) if appending else None
    last_id: str | None = None
    at = cfg.endpoint(index, 0)
    try:
        for stage in range(plan.n_stages):
            want = plan.prompt_tokens(stage, out_tokens) if cfg.pad_prompts else None
            max_tokens = _max_tokens(plan, stage, model)
            sent, capped = None, False
            if convo is not None:
                msgs, sent = convo.next_call(stage, want)
            elif counter is not None and cfg.pad_prompts:
                msgs, sent = plan_messages(task, stage, outputs, out_tokens, plan, wid, counter)
            elif counter is not None:  # the bare text, counted as the server counts it
                msgs = stage_messages(task, stage, [counter.trim(t, n) for t, n in zip(outputs, out_tokens)], plan)
                sent = counter.count(msgs)
            else:
                msgs = stage_messages(task, stage, outputs, plan, want)
            if cfg.max_model_len is not None and sent is not None and sent + max_tokens > cfg.max_model_len:
                max_tokens, capped = max(1, cfg.max_model_len - sent), True
            if cfg.hints:
                headers = {"X-Chimera-Workflow-Id": wid, "X-Chimera-Stage": str(stage), "X-Chimera-Task-Id": task.id}
                body = {"chimera": {"workflow_id": wid, "stage": stage, "task_id": task.id}}
                body.update(cfg.extra_body)
            else:
                headers, body = None, (dict(cfg.extra_body) or None)
            at = cfg.endpoint(index, stage)
            raw = await clients[at].chat.completions.with_raw_response.create(
                model=model, messages=msgs, max_tokens=max_tokens, extra_body=body, extra_headers=headers)
            r = raw.parse()
            if convo is not None:  # the reply exactly as it came, and the id feedback will name
                convo.reply(_received_message(raw))
                last_id = r.id
            text = (r.choices[0].message.content or "") if r.choices else ""
            got = served_model(r.model, raw.headers, model)
            usage = r.usage
            pt = usage.prompt_tokens if usage else 0
            ct = usage.completion_tokens if usage else 0
            pm = per_model.setdefault(got, {"calls": 0, "tokens": 0, "prompt_tokens": 0})
            pm["calls"] += 1
            pm["tokens"] += ct
            pm["prompt_tokens"] += pt
            outputs.append(text)
            out_tokens.append(ct)
            served.append(got)
            stages.append(StageResult(stage, got, pt, ct, want, sent, max_tokens, capped))
            if stage < plan.n_stages - 1 and plan.tool_s[stage] > 0:
                await asyncio.sleep(plan.tool_s[stage] / cfg.time_scale)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - any backend/transport error fails this task only
        failed = _reason(e, stage)
    score = 0.0
    if failed is None:
        try:
            score = plan.score(served)
        except KeyError as e:  # a served model the task has no outcome for
            failed = f"unscored: {e}"
    end = time.monotonic() - t0
    run.stages[wid] = stages
    if failed is None and cfg.feedback:
        try:
            who = {"workflow_id": wid} if cfg.hints else {"response_id": last_id}
            resp = await http.post(cfg.endpoints[at] + "/chimera/feedback", json={**who, "score": score})
            if resp.status_code < 300:
                run.feedback_sent += 1
        except httpx.HTTPError:
            pass  # feedback is best effort; the record stands
    return WorkflowRecord(workflow_id=wid, task_id=task.id, kind=task.kind, arrival_s=arrival, end_s=end,
                          score=score, queue_s=0.0, calls=len(served), models=served, failed=failed)


async def run_agents(tasks: Sequence[Task], cfg: AgentConfig, n: int | None = None,
                     on_record: Callable[[WorkflowRecord], None] | None = None,
                     workflows: Sequence[tuple[str, WorkflowPlan, Task]] | None = None) -> AgentRun:
    """Run n workflows (default: one per task) and summarize them. `workflows` (from `make_workflows`, possibly
    transformed, e.g. lengths scaled for a CPU engine) replaces the plans built from `tasks`."""
    from openai import AsyncOpenAI

    workflows = list(workflows) if workflows is not None else make_workflows(tasks, n, cfg.seed)
    counter = ServerTokens(cfg.tokenizer) if cfg.tokenizer else None
    run = AgentRun(summary={}, records=[])
    per_model: dict[str, dict[str, int]] = {m: {"calls": 0, "tokens": 0, "prompt_tokens": 0}
                                            for m in cfg.models if m != DEFAULT_MODEL}
    # closed loop: at most one call per agent in flight; open loop: no cap, or the pool itself would queue calls
    limits = httpx.Limits(max_connections=(cfg.concurrency + 16) if cfg.concurrency else None,
                          max_keepalive_connections=200)
    t_wall = time.perf_counter()
    rr = itertools.cycle(cfg.models)
    models = [next(rr) for _ in workflows]  # round-robin per workflow

    async with contextlib.AsyncExitStack() as stack:
        # workflows spread over CLIENT_SHARDS connection pools: httpcore's pool does O(connections²) work per request
        # (httpcore 1.0.9), which at a few hundred calls in flight costs the driver more CPU than the calls themselves
        # (CLIENT_SHARDS in all, shared among the endpoints: each gets its share of the calls)
        tls = httpx.create_ssl_context()  # one for all (building one costs ~70 ms)
        shards = min(-(-CLIENT_SHARDS // len(cfg.endpoints)), max(len(workflows), 1))
        clients = [[await stack.enter_async_context(AsyncOpenAI(
            base_url=url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout_s,
            http_client=httpx.AsyncClient(limits=limits, timeout=cfg.timeout_s, verify=tls)))
            for url in cfg.endpoints] for _ in range(shards)]
        http = await stack.enter_async_context(httpx.AsyncClient(
            timeout=30, headers={"Authorization": f"Bearer {cfg.api_key}"}, verify=tls))
        t0 = time.monotonic()

        async def one(i: int, arrival: float) -> None:
            wid, plan, task = workflows[i]
            rec = await _run_workflow(clients[i % len(clients)], i, http, cfg, wid, plan, task, models[i], arrival,
                                      t0, run, per_model, counter)
            run.records.append(rec)
            if on_record is not None:
                on_record(rec)

        if cfg.rate is not None:  # open loop: Poisson arrivals
            arrivals = poisson_arrivals(cfg.rate, len(workflows), cfg.seed, LIVE_STREAM, start_at_zero=True)
            pending = []
            for i, a in enumerate(arrivals):
                delay = float(a) - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(one(i, float(a))))
            await asyncio.gather(*pending)
        else:  # closed loop: `concurrency` agents, each takes the next workflow when it finishes one
            nxt = itertools.count()

            async def worker() -> None:
                while True:
                    i = next(nxt)
                    if i >= len(workflows):
                        return
                    await one(i, time.monotonic() - t0)

            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency or 1, len(workflows)))))

    wall = time.perf_counter() - t_wall
    order = {wid: k for k, (wid, _, _) in enumerate(workflows)}
    run.records.sort(key=lambda r: order[r.workflow_id])
    failures = [{"workflow_id": r.workflow_id, "task_id": r.task_id, "reason": r.failed}
                for r in run.records if r.failed]
    extra = {
        "simulated": False,
        "endpoint": cfg.base_url,
        **({"replica_endpoints": list(cfg.replica_urls), "spread": cfg.spread} if cfg.replica_urls else {}),
        "models": list(cfg.models),
        "mode": "open" if cfg.rate is not None else "closed",
        "rate": cfg.rate,
        "concurrency": cfg.concurrency,
        "time_scale": cfg.time_scale,
        "queue_s_note": QUEUE_NOTE,
        "failures": failures,
        "feedback_sent": run.feedback_sent,
    }
    if counter is not None or cfg.extra_body or cfg.max_model_len is not None:
        extra["length_check"] = length_check(run.stages)
    policy = cfg.models[0] if len(cfg.models) == 1 else "round-robin:" + ",".join(cfg.models)
    run.summary = summarize(policy, run.records, per_model, wall, extra)
    return run


def length_check(stages: dict[str, list[StageResult]]) -> dict:
    """Did the server get and produce what the plan asked for? Prompt tokens planned / sent (server tokenizer) /
    reported (usage), calls that returned fewer tokens than max_tokens, calls whose max_tokens was capped."""
    sts = [st for v in stages.values() for st in v]
    planned = sum(st.planned_prompt_tokens or 0 for st in sts if st.planned_prompt_tokens is not None)
    reported_p = sum(st.prompt_tokens for st in sts if st.planned_prompt_tokens is not None)
    return {
        "calls": len(sts),
        "prompt_tokens_planned": planned,
        "prompt_tokens_sent": sum(st.sent_prompt_tokens or 0 for st in sts),
        "prompt_tokens_reported": sum(st.prompt_tokens for st in sts),
        "prompt_reported_over_planned": (reported_p / planned) if planned else None,
        "output_tokens_asked": sum(st.max_tokens or 0 for st in sts),
        "output_tokens_reported": sum(st.completion_tokens for st in sts),
        "short_calls": sum(1 for st in sts if st.max_tokens is not None and st.completion_tokens < st.max_tokens),
        "capped_calls": sum(1 for st in sts if st.capped),
    }


def run_agents_sync(tasks: Sequence[Task], cfg: AgentConfig, n: int | None = None,
                    on_record: Callable[[WorkflowRecord], None] | None = None) -> AgentRun:
    return asyncio.run(run_agents(tasks, cfg, n, on_record))
