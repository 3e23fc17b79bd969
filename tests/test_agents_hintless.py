"""The agent driver without workflow hints (`AgentConfig(hints=False)`): what reaches the server is what an unmodified
OpenAI-client agent sends. A real Starlette server on 127.0.0.1 records every request (headers and body) and answers
with a distinct reply and id per call; the tests read the recorded traffic."""

from __future__ import annotations

import itertools

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chimera.agents.driver import AgentConfig, make_workflows, run_agents_sync
from chimera.agents.messages import Conversation, stage_messages
from chimera.emulate import EmulatorServer
from chimera.workload.tokens import count_tokens
from chimera.workload.synthetic import generate
from upstreams import Served, tiny_server_tokens

SCALE = 1000.0


def recording_upstream() -> Starlette:
    """An OpenAI-compatible server that keeps (headers, body) of every chat call and every feedback post; each reply
    has its own text and id, and a field the client must hand back untouched (`refusal: null`)."""
    calls: list[tuple[dict, dict]] = []
    feedback: list[tuple[dict, dict]] = []
    ids = itertools.count()

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        calls.append((dict(request.headers), body))
        n = next(ids)
        return JSONResponse({
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer {n}: " + "w " * (n % 5),
                                     "refusal": None}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

    async def fb(request: Request) -> JSONResponse:
        feedback.append((dict(request.headers), await request.json()))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/chimera/feedback", fb, methods=["POST"])])
    app.state.calls, app.state.feedback = calls, feedback
    return app


def _run(hints: bool, n: int = 6, **kw):
    tasks = generate(n)
    srv = Served(recording_upstream())
    try:
        run = run_agents_sync(tasks, AgentConfig(base_url=srv.url, models=["qwen2.5-7b"], concurrency=3, time_scale=SCALE,
                                                 hints=hints, **kw))
    finally:
        srv.stop()
    return tasks, run, srv.app.state.calls, srv.app.state.feedback


def _by_task(tasks, calls) -> dict[str, list[int]]:
    """Indices of the recorded calls per task (found by the first user message), in stage order (assistant turns so
    far). Call k was answered with id `chatcmpl-k` and `_reply(k)`."""
    out: dict[str, list[int]] = {t.id: [] for t in tasks}
    prompts = {t.prompt: t.id for t in tasks}
    assert len(prompts) == len(tasks)
    for k, (_, body) in enumerate(calls):
        out[prompts[body["messages"][0]["content"]]].append(k)
    for ks in out.values():
        ks.sort(key=lambda k: sum(m["role"] == "assistant" for m in calls[k][1]["messages"]))
    return out


def _reply(k: int) -> dict:
    return {"role": "assistant", "content": f"answer {k}: " + "w " * (k % 5), "refusal": None}


def test_hintless_calls_extend_the_previous_call_and_carry_no_chimera_fields() -> None:
    tasks, run, calls, feedback = _run(hints=False)
    assert run.summary["failed"] == 0
    plans = {t.id: p for _, p, t in make_workflows(tasks)}
    assert len(calls) == sum(p.n_stages for p in plans.values())
    for headers, body in calls:
        assert not [h for h in headers if h.lower().startswith("x-chimera")], headers
        assert "chimera" not in body and set(body) <= {"model", "messages", "max_tokens"}, body
    last_ids = []
    for t in tasks:
        ks = _by_task(tasks, calls)[t.id]
        assert len(ks) == plans[t.id].n_stages
        first = calls[ks[0]][1]["messages"]
        assert first[0] == {"role": "user", "content": t.prompt}  # exactly the task prompt
        assert all(m["role"] == "user" for m in first)  # the planned length's filler follows in a message of its own
        for stage, (a, b) in enumerate(zip(ks, ks[1:]), start=1):
            p, m = calls[a][1]["messages"], calls[b][1]["messages"]
            assert m[:len(p)] == p  # everything sent before, exactly as sent
            assert m[len(p)] == _reply(a)  # then the reply exactly as received (refusal: null kept)
            assert len(m) == len(p) + 2 and m[-1]["role"] == "user"  # then one new observation
            assert m[-1]["content"].startswith(f"Observation after step {stage}.")
        last_ids.append(f"chatcmpl-{ks[-1]}")
    # feedback names each task's last response, not a workflow the client made up
    assert len(feedback) == len(tasks) == run.summary["feedback_sent"]
    assert all(set(b) == {"response_id", "score"} for _, b in feedback)
    assert sorted(b["response_id"] for _, b in feedback) == sorted(last_ids)


def test_hintless_padding_reaches_the_planned_length_in_the_new_message_only() -> None:
    """Each call's new messages carry the filler for the plan's prompt length; nothing sent before changes."""
    wid, plan, task = next(w for w in make_workflows(generate(8)) if w[1].n_stages >= 3)
    convo = Conversation(task, plan)
    sent: list[list[dict]] = []
    outs: list[int] = []
    for stage in range(plan.n_stages):
        want = plan.prompt_tokens(stage, outs)
        msgs, counted = convo.next_call(stage, want)
        assert counted is None
        assert stage_messages(task, 0, [], plan)[0] == msgs[0]  # the same first message as the hinted layout
        if sent:
            assert msgs[:len(sent[-1]) + 1] == sent[-1] + [{"role": "assistant", "content": f"out {stage - 1}"}]
        assert count_tokens("\n".join(m["content"] for m in msgs)) >= want - 2, (stage, want)
        sent.append([dict(m) for m in msgs])
        convo.reply({"role": "assistant", "content": f"out {stage}"})
        outs.append(3)
    assert sent[0][0] == {"role": "user", "content": task.prompt} and len(sent[0]) == 2


def test_hintless_padding_in_a_servers_tokens(tmp_path) -> None:
    """With a real server's tokenizer (engine vllm) the conversation is counted and padded in that server's tokens:
    each call holds the one before it and reaches the planned prompt length (ChatML markers included)."""
    counter = tiny_server_tokens(tmp_path)
    seen = 0
    for wid, plan, task in make_workflows(generate(12)):
        convo = Conversation(task, plan, counter, wid)
        prev: list[dict] = []
        outs: list[int] = []
        for stage in range(plan.n_stages):
            want = plan.prompt_tokens(stage, outs)
            msgs, sent = convo.next_call(stage, want)
            assert msgs[:len(prev)] == prev and msgs[0] == {"role": "user", "content": task.prompt}
            assert sent == counter.count(msgs) and sent >= want - 1, (wid, stage, want, sent)
            seen += sent <= want + 8  # padded to the plan (not just longer already)
            convo.reply({"role": "assistant", "content": " cat dog" * 5})
            prev = msgs + [{"role": "assistant", "content": " cat dog" * 5}]
            outs.append(10)
    assert seen > 0


def test_hinted_mode_still_sends_hints_and_rebuilds_each_stage() -> None:
    """The default (hints on) is unchanged: Chimera headers and body on every call, the transcript rebuilt with the
    stage's padding in its newest message, feedback by workflow id."""
    tasks, run, calls, feedback = _run(hints=True, n=4)
    assert run.summary["failed"] == 0
    wfs = {t.id: (wid, p) for wid, p, t in make_workflows(tasks)}
    for headers, body in calls:
        wid = headers["x-chimera-workflow-id"]
        assert body["chimera"]["workflow_id"] == wid and body["chimera"]["stage"] == int(headers["x-chimera-stage"])
        task = next(t for t in tasks if t.id == body["chimera"]["task_id"])
        assert body["messages"][0]["content"].startswith(task.prompt)
    assert sorted(b["workflow_id"] for _, b in feedback) == sorted(wid for wid, _ in wfs.values())


def test_hintless_agents_run_against_the_emulator() -> None:
    """Without hints the emulator (given the workload) still serves every stage of every task."""
    tasks = generate(6)
    with EmulatorServer(profile="qwen2.5-7b@a6000", served_model_name="qwen2.5-7b", time_scale=SCALE,
                        workload=tasks) as emu:
        run = run_agents_sync(tasks, AgentConfig(base_url=emu.base_url, models=["qwen2.5-7b"], concurrency=3,
                                                 time_scale=SCALE, hints=False))
    s = run.summary
    assert s["failed"] == 0 and s["tasks"] == len(tasks)
    assert s["per_model"]["qwen2.5-7b"]["calls"] == sum(p.n_stages for _, p, _ in make_workflows(tasks))


def test_append_only_with_hints_sends_the_hintless_messages_and_the_hints() -> None:
    """`append_only=True` with hints: the same messages as a hintless run (so the two compare like with like), plus
    the Chimera headers and body, and feedback by workflow id."""
    tasks, _, plain, _ = _run(hints=False, n=4)
    _, run, hinted, feedback = _run(hints=True, n=4, append_only=True)
    assert run.summary["failed"] == 0

    def conversations(calls):  # each call's turns and its observations' openings (the padding after them depends
        return sorted(str([(m["role"], m["content"][:40] if m["role"] == "user" else "")  # on the replies' lengths)
                           for m in body["messages"]]) for _, body in calls)

    assert conversations(hinted) == conversations(plain)  # the same conversations, call for call
    for headers, body in hinted:
        assert "x-chimera-workflow-id" in headers and body["chimera"]["workflow_id"] == headers["x-chimera-workflow-id"]
    for t in tasks:
        ks = _by_task(tasks, hinted)[t.id]
        for a, b in zip(ks, ks[1:]):
            p, m = hinted[a][1]["messages"], hinted[b][1]["messages"]
            assert m[:len(p)] == p  # append-only
    assert all(set(b) == {"workflow_id", "score"} for _, b in feedback)
