"""Workflow identity for agents that send no Chimera hints: the prefix-hash table on its own (chaining, tasks that
share a system prompt, handoffs, the LRU bound, idle and final-answer ends, its memory per entry), then a live
gateway in front of an emulated tool-calling upstream driven by the `openai` client as a plain agent loop."""

from __future__ import annotations

import gc
import itertools
import json
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chimera.serve import build_gateway
from chimera.serve.config import IdentityConfig, gateway_config_from_dict
from chimera.serve.edge import WorkflowHints
from chimera.serve.identity import Identity, IdentitySource, WorkflowIdentity, canonical, prefix_hashes
from chimera.serve.relay import SseRelay
from upstreams import Served

SYSTEM = "You are a careful research agent. Use the lookup tool, then answer."
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look something up",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
NO_HINTS = WorkflowHints()


# ---- the table on its own ----------------------------------------------------------------------------------------
def _gateway(tmp_path, **identity):
    """A gateway object (not served): its pool and identity table are the real ones."""
    cfg = gateway_config_from_dict({"trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False},
                                    "identity": identity,
                                    "backends": [{"name": "a", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]})
    return build_gateway(cfg).state.gateway


@pytest.fixture
def table(tmp_path):
    gw = _gateway(tmp_path)
    yield gw.identity
    gw.trace.close()


def _reply(text: str, call_id: str | None = None) -> dict:
    msg = {"role": "assistant", "content": text if call_id is None else None, "refusal": None, "annotations": []}
    if call_id is not None:
        msg["tool_calls"] = [{"id": call_id, "type": "function",
                              "function": {"name": "lookup", "arguments": json.dumps({"q": text})}}]
    return msg


def _turn(table: WorkflowIdentity, msgs: list, reply: dict, now: float, **body) -> Identity:
    """One call: resolved, answered with `reply`, and the conversation extended as the client resends it."""
    ident = table.resolve({"messages": list(msgs), **body}, {}, NO_HINTS, now)
    table.answered(ident, [reply], f"chatcmpl-{now}", bool(body.get("tools")), now)
    resent = {k: v for k, v in reply.items() if k not in ("refusal", "annotations")}  # what clients drop
    msgs.append(resent)
    if reply.get("tool_calls"):
        msgs.append({"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": f"observed {now}"})
    return ident


def test_each_answered_prefix_names_the_next_stage(table):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "task one"}]
    idents = [_turn(table, msgs, _reply(f"step {i}", f"call_{i}"), float(i)) for i in range(4)]
    assert [i.source for i in idents] == [IdentitySource.NEW] + [IdentitySource.CONVERSATION] * 3
    assert [i.stage for i in idents] == [0, 1, 2, 3]
    assert len({i.workflow_id for i in idents}) == 1


def test_two_tasks_sharing_a_system_prompt_stay_two_workflows_even_with_equal_replies(table):
    a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "task A"}]
    b = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "task B"}]
    ids_a, ids_b = [], []
    for i in range(3):  # interleaved, and both get the very same reply text every time
        ids_a.append(_turn(table, a, _reply("same words"), 2.0 * i))
        ids_b.append(_turn(table, b, _reply("same words"), 2.0 * i + 1))
    assert len({i.workflow_id for i in ids_a}) == 1 and len({i.workflow_id for i in ids_b}) == 1
    assert ids_a[0].workflow_id != ids_b[0].workflow_id
    assert [i.stage for i in ids_a] == [i.stage for i in ids_b] == [0, 1, 2]


def test_a_prefix_without_a_served_reply_joins_nothing(table):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "same task"}]
    first = _turn(table, list(msgs), _reply("done"), 0.0)
    again = table.resolve({"messages": msgs}, {}, NO_HINTS, 1.0)  # the same opening, sent again: a new task
    assert again.source is IdentitySource.NEW and again.workflow_id != first.workflow_id


def test_a_handoff_that_swaps_the_system_prompt_stays_one_workflow(table):
    msgs = [{"role": "system", "content": "You triage."}, {"role": "user", "content": "refund my order"}]
    first = _turn(table, msgs, _reply("transfer", "call_t"), 0.0)
    msgs[0] = {"role": "system", "content": "You handle refunds."}  # the next agent's instructions
    second = table.resolve({"messages": msgs}, {}, NO_HINTS, 1.0)
    assert (second.workflow_id, second.stage, second.source) == (first.workflow_id, 1, IdentitySource.CONVERSATION)


def test_canonical_form_ignores_what_clients_add_or_drop():
    plain = {"role": "assistant", "content": "hi"}
    assert canonical(plain) == canonical({**plain, "refusal": None, "annotations": [], "audio": None})
    assert canonical(plain) == canonical({"role": "assistant", "content": [{"type": "text", "text": "hi"}]})
    assert canonical(plain) != canonical({"role": "user", "content": "hi"})
    tc = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = {"role": "assistant", "content": None, "tool_calls": [tc]}
    assert canonical(with_call) == canonical({**with_call, "content": ""})
    assert canonical(with_call) != canonical({**with_call, "tool_calls": [{**tc, "id": "c2"}]})
    # length-prefixed fields: moving text between fields changes the hash
    assert canonical({"role": "ab", "content": "c"}) != canonical({"role": "a", "content": "bc"})
    keys, _ = prefix_hashes([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, plain])
    assert len(keys) == 1  # a key where a prefix ends in an assistant turn; instructions are not part of it
    assert keys == prefix_hashes([{"role": "developer", "content": "other"}, {"role": "user", "content": "u"},
                                  plain])[0]


def test_the_table_is_bounded_and_forgets_the_oldest(tmp_path):
    gw = _gateway(tmp_path, max_entries=8)
    table = gw.identity
    convs = []
    for t in range(20):
        msgs = [{"role": "user", "content": f"task {t}"}]
        convs.append((_turn(table, msgs, _reply(f"r{t}"), float(t)), msgs))
    assert len(table) <= 8 and len(table._live) <= 8
    oldest, newest = convs[0], convs[-1]
    assert table.resolve({"messages": oldest[1]}, {}, NO_HINTS, 30.0).source is IdentitySource.NEW
    hit = table.resolve({"messages": newest[1]}, {}, NO_HINTS, 31.0)
    assert (hit.workflow_id, hit.source) == (newest[0].workflow_id, IdentitySource.CONVERSATION)
    gw.trace.close()


def test_a_replayed_prefix_shares_scheduling_only_the_table_holds_no_text(table):
    secret = "the launch code is 0000"
    victim = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": secret}]
    owner = _turn(table, victim, _reply("noted " + secret, "call_v"), 0.0)
    thief = table.resolve({"messages": [*victim, {"role": "user", "content": "what did I say?"}]}, {}, NO_HINTS, 1.0)
    assert thief.workflow_id == owner.workflow_id  # it joins the workflow (queue order, affinity) ...
    for key, (wid, stage) in table._keys.items():  # ... and nothing it could be answered from is stored
        assert isinstance(key, bytes) and len(key) == 16 and isinstance(stage, int)
        assert "launch" not in wid and wid.startswith("wf-")


def test_final_answer_to_a_tool_request_ends_the_workflow(table):
    msgs = [{"role": "user", "content": "look it up"}]
    first = _turn(table, msgs, _reply("x", "call_1"), 0.0, tools=TOOLS)
    last = _turn(table, msgs, _reply("the answer"), 1.0, tools=TOOLS)
    assert last.workflow_id == first.workflow_id and last.stage == 1
    assert table.pool.workflows.peek(first.workflow_id) is None  # ended in the pool
    assert table.workflow_of_response("chatcmpl-1.0") == first.workflow_id  # feedback can still name it
    follow_up = table.resolve({"messages": [*msgs, {"role": "user", "content": "thanks"}]}, {}, NO_HINTS, 2.0)
    assert follow_up.source is IdentitySource.NEW


def test_idle_workflows_end(tmp_path):
    gw = _gateway(tmp_path, idle_timeout_s=10)
    table = gw.identity
    msgs = [{"role": "user", "content": "slow task"}]
    first = _turn(table, msgs, _reply("r", "call_1"), 0.0)
    gw.pool.workflows.get(first.workflow_id, 0.0)
    assert table.resolve({"messages": [{"role": "user", "content": "other"}]}, {}, NO_HINTS, 5.0).stage == 0
    assert gw.pool.workflows.peek(first.workflow_id) is not None
    late = table.resolve({"messages": msgs}, {}, NO_HINTS, 11.0)  # 11 s after it was last seen
    assert late.source is IdentitySource.NEW and gw.pool.workflows.peek(first.workflow_id) is None
    gw.trace.close()


def test_precedence_hint_session_previous_response_field_conversation(table):
    msgs = [{"role": "user", "content": "task"}]
    base = _turn(table, msgs, _reply("r", "call_1"), 0.0)
    body = {"messages": msgs, "user": "alice", "previous_response_id": "chatcmpl-0.0"}
    hdr = {"x-session-id": "s-1"}
    hint = table.resolve(body, hdr, WorkflowHints(workflow_id="mine"), 1.0)
    assert (hint.workflow_id, hint.source) == ("mine", IdentitySource.HINT)
    sess = table.resolve(body, hdr, NO_HINTS, 2.0)
    assert sess.source is IdentitySource.SESSION and sess.workflow_id.startswith("session-")
    assert "s-1" not in sess.workflow_id
    prev = table.resolve(body, {}, NO_HINTS, 3.0)
    assert (prev.workflow_id, prev.stage, prev.source) == (base.workflow_id, 1, IdentitySource.PREVIOUS_RESPONSE)
    field = table.resolve({**body, "previous_response_id": "resp_unknown"}, {}, NO_HINTS, 4.0)
    assert field.source is IdentitySource.SESSION and field.workflow_id != sess.workflow_id
    conv = table.resolve({"messages": msgs}, {}, NO_HINTS, 5.0)
    assert (conv.workflow_id, conv.source) == (base.workflow_id, IdentitySource.CONVERSATION)


def test_inference_off(tmp_path):
    gw = _gateway(tmp_path, conversation=False)
    msgs = [{"role": "user", "content": "t"}]
    first = _turn(gw.identity, msgs, _reply("r", "c"), 0.0)
    assert _turn(gw.identity, msgs, _reply("r2"), 1.0).workflow_id != first.workflow_id
    assert len(gw.identity) == 2  # the response ids only
    gw.trace.close()


def test_memory_per_table_entry(tmp_path, capsys):
    """Bounded and measured: bytes per entry of the LRU (prefix keys and response ids), by tracemalloc."""
    gw = _gateway(tmp_path)
    table, n = gw.identity, 20_000
    idents = [Identity(f"wf-x-{i // 4}", i % 4, IdentitySource.NEW) for i in range(n)]  # 4 keys per workflow
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, ident in enumerate(idents):
        table._put(hashlib_key(i), (ident.workflow_id, ident.stage))
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    with capsys.disabled():
        print(f"\nidentity table: {per_entry:.0f} bytes per entry "
              f"({per_entry * IdentityConfig().max_entries / 2**20:.1f} MiB at the default max_entries)")
    assert 16 < per_entry < 400
    gw.trace.close()


def hashlib_key(i: int) -> bytes:
    import hashlib

    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def test_stream_relay_assembles_the_answer_as_the_client_resends_it():
    relay = SseRelay("m", show_usage=False)
    chunks = [{"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let "}}]},
              {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"content": "me look."}}]},
              {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "id": "call_a", "type": "function",
                   "function": {"name": "lookup", "arguments": ""}}]}}]},
              {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": '{"q": '}}]}}]},
              {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": '"x"}'}}]}}]},
              {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    for c in chunks:
        relay.feed("data: " + json.dumps(c))
    assert relay.feed("data: [DONE]").done and relay.response_id == "chatcmpl-9"
    assert relay.message() == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]}


# ---- a live gateway, a plain agent loop ----------------------------------------------------------------------------
def agent_upstream(final_after: int = 3) -> Starlette:
    """An OpenAI-compatible backend that acts like a tool-using model: with `tools`, a tool call on each of the
    first `final_after` turns of a conversation (counted by its assistant messages), then a final answer; every
    answer has its own id. It echoes nothing of the request beyond the turn count."""
    ids = itertools.count(1)

    async def chat(request: Request) -> Response:
        body = await request.json()
        turn = sum(1 for m in body["messages"] if m.get("role") == "assistant")
        n = next(ids)
        rid, call_id = f"chatcmpl-{n:06d}", f"call_{n:06d}"
        calls = bool(body.get("tools")) and turn < final_after
        args = json.dumps({"q": f"step {turn}"})
        if body.get("stream"):
            def chunk(delta: dict, finish: str | None = None) -> str:
                return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": 1,
                                              "model": "up", "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}) + "\n\n"

            def gen():
                yield chunk({"role": "assistant", "content": ""})
                if calls:
                    yield chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                 "function": {"name": "lookup", "arguments": ""}}]})
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[:5]}}]})
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[5:]}}]})
                else:
                    yield chunk({"content": "final "})
                    yield chunk({"content": f"answer after {turn} steps"})
                yield chunk({}, "tool_calls" if calls else "stop")
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        msg = {"role": "assistant", "content": None if calls else f"final answer after {turn} steps",
               "refusal": None, "annotations": []}
        if calls:
            msg["tool_calls"] = [{"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": args}}]
        finish = "tool_calls" if calls else "stop"
        return JSONResponse({"id": rid, "object": "chat.completion", "created": 1, "model": "up",
                             "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    up = Served(agent_upstream())
    cfg = gateway_config_from_dict({
        "trace_store": str(tmp_path_factory.mktemp("identity") / "t.sqlite"), "health": {"enabled": False},
        "backends": [{"name": "a-0", "model": "small", "base_url": up.url + "/v1", "max_inflight": 8},
                     {"name": "b-0", "model": "big", "base_url": up.url + "/v1", "max_inflight": 8}]})
    gw = Served(build_gateway(cfg))
    yield gw
    gw.stop()
    up.stop()


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=20)


def _agent(live, task: str, stream: bool = False, calls: int = 4) -> list[dict]:
    """A plain agent loop, as a user writes it with the `openai` client: no Chimera hints. Each call appends the
    reply and an observation. Returns what each answer's headers said."""
    client = _client(live)
    msgs: list = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
    seen = []
    for _ in range(calls):
        raw = client.chat.completions.with_raw_response.create(model="chimera", messages=msgs, tools=TOOLS,
                                                                stream=stream)
        seen.append({k: raw.headers.get(k) for k in ("x-chimera-workflow-id", "x-chimera-stage",
                                                      "x-chimera-identity", "x-chimera-model")})
        if stream:
            content, calls_by_index, rid = "", {}, None
            for ch in raw.parse():
                rid = ch.id
                d = ch.choices[0].delta if ch.choices else None
                content += (d.content or "") if d else ""
                for tc in (d.tool_calls or []) if d else []:
                    c = calls_by_index.setdefault(tc.index, {"id": "", "type": "function",
                                                             "function": {"name": "", "arguments": ""}})
                    c["id"] = tc.id or c["id"]
                    c["function"]["name"] += (tc.function.name or "") if tc.function else ""
                    c["function"]["arguments"] += (tc.function.arguments or "") if tc.function else ""
            msg = {"role": "assistant", "content": content or None}
            if calls_by_index:
                msg["tool_calls"] = [calls_by_index[i] for i in sorted(calls_by_index)]
        else:
            out = raw.parse()
            rid = out.id
            msg = out.choices[0].message.model_dump(exclude_none=True)
        seen[-1]["response_id"] = rid
        msgs.append(msg)
        call_id = msg["tool_calls"][0]["id"] if msg.get("tool_calls") else "none"
        msgs.append({"role": "tool", "tool_call_id": call_id, "content": f"observation {len(msgs)}"})
    return seen


def _rows(live, task: str) -> list[dict]:
    return live.gw.trace.query("SELECT workflow_id, stage, identity, status FROM calls WHERE prompt = ? "
                               "ORDER BY rowid", (task,))


def test_plain_agent_loops_are_workflows_with_stages(live):
    """3 tasks at once, no hints: the trace holds 3 workflows with stages 0..3 (before identity: 12 one-stage
    workflows, every call at stage 0)."""
    tasks = [f"plain task {i}: find the population of city {i}" for i in range(3)]
    with ThreadPoolExecutor(3) as ex:
        seen = list(ex.map(lambda t: _agent(live, t), tasks))
    wids = set()
    for task, headers in zip(tasks, seen):
        rows = _rows(live, task)
        assert [r["stage"] for r in rows] == [0, 1, 2, 3] and {r["status"] for r in rows} == {"ok"}
        assert [r["identity"] for r in rows] == ["new", "conversation", "conversation", "conversation"]
        assert len({r["workflow_id"] for r in rows}) == 1
        wids.add(rows[0]["workflow_id"])
        assert [h["x-chimera-workflow-id"] for h in headers] == [rows[0]["workflow_id"]] * 4
        assert [h["x-chimera-stage"] for h in headers] == ["0", "1", "2", "3"]
        assert [h["x-chimera-identity"] for h in headers] == ["new"] + ["conversation"] * 3
        assert all(h["x-chimera-model"] in ("small", "big") for h in headers)
    assert len(wids) == 3


def test_streamed_agent_loop_is_one_workflow_and_carries_the_headers(live):
    task = "streamed task: summarise the report"
    headers = _agent(live, task, stream=True)
    rows = _rows(live, task)
    assert [r["stage"] for r in rows] == [0, 1, 2, 3] and len({r["workflow_id"] for r in rows}) == 1
    assert [h["x-chimera-stage"] for h in headers] == ["0", "1", "2", "3"]
    assert {h["x-chimera-workflow-id"] for h in headers} == {rows[0]["workflow_id"]}


def test_feedback_by_response_id_lands_on_the_workflow(live):
    task = "feedback task: check the numbers"
    headers = _agent(live, task, calls=2)
    wid = _rows(live, task)[0]["workflow_id"]
    r = httpx.post(live.url + "/v1/chimera/feedback", json={"response_id": headers[0]["response_id"], "score": 0.75})
    assert r.status_code == 200 and r.json()["workflow_id"] == wid
    assert live.gw.trace.query("SELECT score FROM feedback WHERE workflow_id = ?", (wid,)) == [{"score": 0.75}]
    r = httpx.post(live.url + "/v1/chimera/feedback", json={"response_id": "chatcmpl-nope", "score": 1})
    assert r.status_code == 404 and "response_id" in r.json()["error"]["message"]
    for bad in ({"score": 1}, {"workflow_id": wid, "response_id": headers[0]["response_id"], "score": 1}):
        r = httpx.post(live.url + "/v1/chimera/feedback", json=bad)
        assert r.status_code == 400 and "response_id" in r.json()["error"]["message"]


def test_session_header_groups_calls_and_wins_over_the_conversation(live):
    c = _client(live)
    hdr = {"x-session-id": "my-session-42"}
    outs = [c.chat.completions.with_raw_response.create(
        model="chimera", messages=[{"role": "user", "content": f"session call {i}"}], extra_headers=hdr)
        for i in range(3)]
    wids = {o.headers["x-chimera-workflow-id"] for o in outs}
    assert len(wids) == 1 and next(iter(wids)).startswith("session-") and "my-session" not in next(iter(wids))
    assert [o.headers["x-chimera-stage"] for o in outs] == ["0", "1", "2"]
    assert {o.headers["x-chimera-identity"] for o in outs} == {"session"}


def test_hint_wins_over_session_over_conversation(live):
    c = _client(live)
    msgs = [{"role": "user", "content": "precedence task"}]
    first = c.chat.completions.with_raw_response.create(model="chimera", messages=msgs, tools=TOOLS)
    msgs += [first.parse().choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": first.parse().choices[0].message.tool_calls[0].id, "content": "ok"}]

    def identity(**kw) -> tuple[str, str]:
        r = c.chat.completions.with_raw_response.create(model="chimera", messages=msgs, tools=TOOLS, **kw)
        return r.headers["x-chimera-identity"], r.headers["x-chimera-workflow-id"]

    assert identity(extra_headers={"x-session-id": "s", "X-Chimera-Workflow-Id": "wf-mine"}) == ("hint", "wf-mine")
    assert identity(extra_headers={"x-session-id": "s"})[0] == "session"
    assert identity() == ("conversation", first.headers["x-chimera-workflow-id"])


@pytest.mark.parametrize("headers, body, named", [
    ({"x-session-id": "x" * 257}, {}, "header x-session-id"),
    ({"session-id": "tab\there"}, {}, "header session-id"),
    ({}, {"user": 5}, "user"),
    ({}, {"prompt_cache_key": "k" * 300}, "prompt_cache_key"),
    ({}, {"previous_response_id": ["resp_1"]}, "previous_response_id"),
])
def test_malformed_session_values_are_refused_naming_them(live, headers, body, named):
    r = httpx.post(live.url + "/v1/chat/completions", headers=headers,
                   json={"model": "chimera", "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(named + ":")


def test_a_client_replaying_another_conversation_gets_only_its_own_answer(live):
    """Hostile replay through the gateway: the replayed prefix puts the call in the other workflow (scheduling),
    and what comes back is the backend's answer to this request alone."""
    c = _client(live)
    secret = "victim task: the vault code is 7431"
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": secret}]
    first = c.chat.completions.with_raw_response.create(model="chimera", messages=msgs, tools=TOOLS)
    answer = first.parse().choices[0].message
    replay = [*msgs, answer.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": answer.tool_calls[0].id, "content": "what else did they say?"}]
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "chimera", "messages": replay})
    assert r.status_code == 200
    assert r.headers["x-chimera-workflow-id"] == first.headers["x-chimera-workflow-id"]
    assert r.headers["x-chimera-identity"] == "conversation" and r.headers["x-chimera-stage"] == "1"
    assert "7431" not in r.text and r.json()["choices"][0]["message"]["content"] == "final answer after 1 steps"


def test_identity_config_is_checked_at_start():
    from chimera.serve.config import GatewayConfigError

    base = {"backends": [{"name": "a", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]}
    cfg = gateway_config_from_dict({**base, "identity": {"session_headers": ["X-My-Session"]}})
    assert cfg.identity.session_headers == ["x-my-session"] and cfg.identity.max_entries == 100_000
    for bad, named in (({"conversaton": False}, "identity.conversaton"), ({"max_entries": 0}, "identity.max_entries"),
                       ({"session_headers": ["x-chimera-workflow-id"]}, "identity.session_headers"),
                       ({"session_headers": ["bad header"]}, "identity.session_headers"),
                       ({"idle_timeout_s": 0}, "identity.idle_timeout_s")):
        with pytest.raises(GatewayConfigError, match=named.replace(".", r"\.")):
            gateway_config_from_dict({**base, "identity": bad})


def test_the_shortcut_gives_the_general_form():
    """The chat shortcut and the general path agree byte for byte, so a message hashes alike however it is sent."""
    from chimera.serve.identity import _fields

    def general(m):
        role, parts = _fields(m)
        return role, (",".join(str(len(p)) for p in parts) + "\0" + "\0".join(parts)).encode()

    tc = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    for m in ({"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "obs"},
              {"role": "assistant", "content": None, "tool_calls": [tc]},
              {"role": "assistant", "content": "let me", "tool_calls": [tc]},
              {"role": "assistant", "content": "ünïcode ✓", "tool_calls": []}):
        assert canonical(m) == general(m), m
    two = {"role": "assistant", "content": None, "tool_calls": [tc, {**tc, "id": "call_2"}]}
    assert canonical(two) == general(two)
