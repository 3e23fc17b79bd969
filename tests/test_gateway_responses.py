"""The OpenAI Responses API through the live gateway, driven by the `openai` client against small upstreams that serve
/v1/responses in OpenAI's format (tests/upstreams.py): scheduled and traced like chat calls, the stream's events
passed through in order, stored responses read back from the backend that made them, bad bodies refused at the edge."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from chimera.backends.kinds import make_backend_kind
from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.serve.edge import RESPONSES, prompts
from chimera.serve.responses import ResponseHomes, ResponsesRelay
from upstreams import Served, fake_upstream

KEY = "client-key"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Model 'small' on a failing and a healthy replica, 'big' on one, 'broken' only on a failing one, 'cut' on one
    that breaks its streams after two deltas, 'pair' on two healthy ones."""
    apps = {"bad": fake_upstream("bad", fail=True), "small": fake_upstream("up-small"),
            "big": fake_upstream("up-big"), "cut": fake_upstream("up-cut", drop_after=2),
            "pair-a": fake_upstream("up-pair-a"), "pair-b": fake_upstream("up-pair-b")}
    ups = {k: Served(a) for k, a in apps.items()}
    backends = [("small-bad", "small", "bad"), ("small-ok", "small", "small"), ("big-0", "big", "big"),
                ("broken-0", "broken", "bad"), ("cut-0", "cut", "cut"), ("pair-a", "pair", "pair-a"),
                ("pair-b", "pair", "pair-b")]
    cfg = gateway_config_from_dict({
        "auth": {"api_keys": [KEY]}, "policy": {"name": "chimera", "lam": 0.02},
        "trace_store": str(tmp_path_factory.mktemp("gw") / "traces.sqlite"), "health": {"enabled": False},
        "backends": [{"name": n, "model": m, "base_url": ups[u].url + "/v1", "max_inflight": 4}
                     for n, m, u in backends],
    })
    gw = Served(build_gateway(cfg))
    yield {"url": gw.url, "gw": gw.gw, "apps": apps}
    gw.stop()
    for u in ups.values():
        u.stop()


def _client(cluster, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=key, max_retries=0, timeout=20)


def _rows(cluster, wid: str) -> list[dict]:
    return cluster["gw"].trace.query(f"SELECT * FROM calls WHERE workflow_id='{wid}' ORDER BY rowid")


def _wf(wid: str) -> dict:
    return {"extra_headers": {"X-Chimera-Workflow-Id": wid}}


# ---- through the gateway -------------------------------------------------------------------------------------
def test_a_failing_replica_is_retried_elsewhere(cluster):
    """The first 'small' call lands on the failing replica (config order) and is answered by the other one."""
    out = _client(cluster).responses.create(model="small", input="What is 2 + 2?", **_wf("wf-r-retry"))
    assert out.model == "small" and out.output_text == "w0 w1 w2 w3 w4 "
    assert [(r["backend"], r["status"]) for r in _rows(cluster, "wf-r-retry")] == [("small-bad", "error"),
                                                                                    ("small-ok", "ok")]


def test_a_backend_that_only_fails_gives_502_in_openais_shape(cluster):
    with pytest.raises(openai.InternalServerError) as e:
        _client(cluster).responses.create(model="broken", input="hi", **_wf("wf-r-broken"))
    assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unavailable"
    assert {r["status"] for r in _rows(cluster, "wf-r-broken")} == {"error"}


def test_plain_answer_names_the_served_model_and_is_traced(cluster):
    hits = cluster["apps"]["big"].state.hits
    out = _client(cluster).responses.create(model="big", instructions="Be brief.", input=[
        {"role": "user", "content": "What is 2 + 2?"}], **_wf("wf-r-plain"))
    assert out.model == "big" and out.output_text == "w0 w1 w2 w3 w4 " and out.id.startswith("resp_up-big_")
    sent = hits[-1]
    assert sent["model"] == "big" and "chimera" not in sent and "stream_options" not in sent
    [row] = _rows(cluster, "wf-r-plain")
    assert row["status"] == "ok" and row["model"] == "big" and row["backend"] == "big-0"
    assert row["completion_tokens"] == 5 and row["prompt_tokens"] == 3  # the engine's usage (output/input tokens)
    assert row["prompt"] == "What is 2 + 2?" and row["stage"] == 0


def test_stream_passes_every_event_through_in_order(cluster):
    hits = cluster["apps"]["big"].state.hits
    events = list(_client(cluster).responses.create(model="big", input="What is 2 + 2?", stream=True,
                                                    **_wf("wf-r-stream")))
    assert hits[-1]["stream"] is True and "stream_options" not in hits[-1]
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 5, "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "w0 w1 w2 w3 w4 "
    assert {e.response.model for e in events if hasattr(e, "response")} == {"big"}
    assert events[-1].response.usage.output_tokens == 5
    [row] = _rows(cluster, "wf-r-stream")
    assert row["status"] == "ok" and row["completion_tokens"] == 5 and row["first_token_at"] is not None
    assert row["queued_at"] <= row["dispatched_at"] <= row["first_token_at"] <= row["ended_at"]


def test_the_sdks_stream_helper_assembles_the_relayed_events(cluster):
    """`client.responses.stream` rebuilds the response from the events and checks they fit together."""
    with _client(cluster).responses.stream(model="big", input="What is 2 + 2?") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == "w0 w1 w2 w3 w4 " and final.model == "big"


def test_streamed_tool_call_arguments_are_relayed(cluster):
    tools = [{"type": "function", "name": "search", "parameters": {"type": "object", "properties": {}}}]
    events = list(_client(cluster).responses.create(model="small", input="find it", tools=tools, stream=True,
                                                    **_wf("wf-r-tool")))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == "w0 w1 w2 w3 w4 " and events[-1].response.output[0].name == "search"
    [row] = _rows(cluster, "wf-r-tool")
    assert row["status"] == "ok" and row["completion_tokens"] == 5


def test_a_stream_that_breaks_ends_with_a_responses_error_event(cluster):
    events = list(_client(cluster).responses.create(model="cut", input="hi", stream=True, **_wf("wf-r-cut")))
    assert [e.type for e in events][-3:] == ["response.output_text.delta"] * 2 + ["error"]
    assert events[-1].code == "upstream_error" and events[-1].sequence_number == events[-2].sequence_number + 1
    [row] = _rows(cluster, "wf-r-cut")
    assert row["status"] == "error" and "stream broke after 2 tokens" in row["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_the_engine_failed_is_traced_as_an_error(cluster, stream):
    wid = f"wf-r-failed-{stream}"
    out = _client(cluster).responses.create(model="big", input="hi", metadata={"outcome": "failed"}, stream=stream,
                                            **_wf(wid))
    last = list(out)[-1].response if stream else out
    assert last.status == "failed" and last.model == "big"
    [row] = _rows(cluster, wid)
    assert row["status"] == "error" and row["error"] == "backend response failed: engine died"


def test_stored_responses_are_read_from_the_backend_that_made_them(cluster):
    c = _client(cluster)
    small = c.responses.create(model="small", input="one")
    big = c.responses.create(model="big", input="two", stream=True)
    big_id = [e for e in big][-1].response.id
    assert small.id.startswith("resp_up-small_") and big_id.startswith("resp_up-big_")
    got = c.responses.retrieve(small.id)
    assert got.id == small.id and got.model == "small" and got.output_text == small.output_text
    got = c.responses.retrieve(big_id)
    assert got.id == big_id and got.model == "big"
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve("resp_never_made")
    assert e.value.body["code"] == "response_not_found" and "response_id" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(cluster, key="wrong").responses.retrieve(small.id)


def test_a_chain_goes_to_the_backend_that_keeps_its_previous_response(cluster):
    """`previous_response_id` names a response only its server keeps: every call of the chain goes there, not to the
    idle replica listed first, whatever model the client asked the policy to choose."""
    c = _client(cluster)
    with ThreadPoolExecutor(2) as pool:  # two at once: one lands on each replica of 'pair'
        firsts = list(pool.map(lambda i: c.responses.create(model="pair", input=f"start {i}"), range(2)))
    prev = next(r.id for r in firsts if r.id.startswith("resp_up-pair-b_"))
    hits_a = cluster["apps"]["pair-a"].state.hits
    n_a = len(hits_a)
    for i in range(1, 7):
        nxt = c.responses.create(model="pair" if i < 4 else "chimera", input=f"step {i}", previous_response_id=prev,
                                 stream=i % 2 == 0)
        prev = [e for e in nxt][-1].response.id if i % 2 == 0 else nxt.id
        assert prev.startswith("resp_up-pair-b_")
    assert len(hits_a) == n_a
    with pytest.raises(openai.NotFoundError):  # an unknown previous response: the policy's choice, the server's 404
        c.responses.create(model="pair", input="x", previous_response_id="resp_elsewhere")


@pytest.mark.parametrize("rid", ["x" * 257, "a%01b", "a%7Fb", ""])
def test_malformed_response_ids_are_refused_naming_the_field(cluster, rid):
    r = httpx.get(f"{cluster['url']}/v1/responses/{rid}", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("response_id:"), r.text


@pytest.mark.parametrize(("body", "field"), [
    ([], "body"), ({"input": "hi"}, "model"), ({"model": "big"}, "input"), ({"model": "big", "input": []}, "input"),
    ({"model": "big", "input": ["hi"]}, "input"), ({"model": "big", "input": 7}, "input"),
    ({"model": "big", "input": "hi", "stream": "yes"}, "stream"),
    ({"model": "big", "input": "hi", "previous_response_id": "r" * 257}, "previous_response_id"),
    ({"model": "big", "input": "hi", "previous_response_id": "a\x01b"}, "previous_response_id"),
    ({"model": "big", "input": "hi", "previous_response_id": 5}, "previous_response_id"),
    ({"model": "big", "input": "hi", "tools": {"type": "function"}}, "tools"),
    ({"model": "big", "input": "hi", "instructions": ["be brief"]}, "instructions"),
    ({"model": "big", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "big", "input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ({"model": "big", "input": "hi", "max_output_tokens": 1.5}, "max_output_tokens"),
])
def test_bad_bodies_are_refused_at_the_edge_naming_the_field(cluster, body, field):
    hits = cluster["apps"]["big"].state.hits
    n = len(hits)
    r = httpx.post(cluster["url"] + RESPONSES, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"{field}:"), r.text
    assert len(hits) == n  # refused before scheduling: nothing reached a backend


def test_openapi_lists_both_operations(cluster):
    doc = httpx.get(cluster["url"] + "/openapi.json").json()
    assert "post" in doc["paths"]["/v1/responses"] and "get" in doc["paths"]["/v1/responses/{response_id}"]
    assert doc["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ResponsesRequest"}


# ---- the pure parts ------------------------------------------------------------------------------------------
def _sse(event: dict) -> list[str]:
    return [f"event: {event['type']}", f"data: {json.dumps(event)}", ""]


def test_relay_counts_output_deltas_renames_the_model_and_keeps_the_answer():
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    lines = [*_sse({"type": "response.created", "response": {"id": "resp_1", "model": "engine-name", "output": []}}),
             *_sse({"type": "response.output_text.delta", "delta": "a", "sequence_number": 4}),
             *_sse({"type": "response.output_text.delta", "delta": ""}),  # nothing generated: not counted
             *_sse({"type": "response.function_call_arguments.delta", "delta": "{}"}),
             *_sse({"type": "response.completed", "response": {
                 "id": "resp_1", "model": "engine-name", "output": [call],
                 "usage": {"input_tokens": 11, "output_tokens": 7}}})]
    relay = ResponsesRelay("big")
    outs = [relay.feed(line) for line in lines]
    assert relay.tokens == 2 and [o.tokens for o in outs if o.tokens] == [1, 1]
    assert [o.done for o in outs].index(True) == len(lines) - 2 and sum(o.done for o in outs) == 1
    assert relay.usage_tokens == 7 and relay.prompt_tokens == 11
    assert relay.response_id == "resp_1" and relay.reply == [call]
    assert all(o.error is None for o in outs)
    sent = b"".join(o.data for o in outs).decode()
    assert "engine-name" not in sent and sent.count('"model": "big"') == 2
    assert sent.startswith("event: response.created\ndata: ") and "event: response.completed\n" in sent
    assert json.loads(relay.error_event("broke").decode().split("data: ", 1)[1])["sequence_number"] == 5


@pytest.mark.parametrize(("event", "why"), [
    ({"type": "response.failed", "response": {"id": "r", "error": {"message": "engine died"}}}, "engine died"),
    ({"type": "error", "message": "overloaded"}, "overloaded"),
])
def test_relay_reports_a_failed_answer_as_its_end(event, why):
    out = ResponsesRelay("m").feed(f"data: {json.dumps(event)}")
    assert out.done and why in out.error


def test_incomplete_is_a_normal_end():
    relay = ResponsesRelay("m")
    out = relay.feed("data: " + json.dumps({"type": "response.incomplete", "response": {
        "id": "r", "output": [], "usage": {"output_tokens": 16}}}))
    assert out.done and out.error is None and relay.usage_tokens == 16


def test_prompts_read_responses_input_items_and_instructions():
    body = {"model": "m", "instructions": "You are terse.", "input": [
        {"role": "system", "content": "sys"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "task text"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"q": 1}'},
        {"type": "function_call_output", "call_id": "c", "output": "observation"},
        {"type": "reasoning", "summary": []}]}
    first, full = prompts(body, RESPONSES)
    assert first == "task text"
    assert full.split("\n") == ["You are terse.", "sys", "task text", '{"q": 1}', "observation", ""]
    assert prompts({"model": "m", "input": "just text"}, RESPONSES) == ("just text", "just text")
    assert prompts({"model": "m", "input": "q", "instructions": "i"}, RESPONSES) == ("q", "i\nq")


def test_response_homes_are_bounded_and_forget_the_least_recent():
    homes = ResponseHomes(cap=2)
    a, b, c = (gateway_config_from_dict({"backends": [{"name": n, "model": "m", "base_url": "http://x"}]})
               .backends[0] for n in "abc")
    homes.remember("r1", a)
    homes.remember("r2", b)
    assert homes.home("r1") is a  # read: now the most recent
    homes.remember("r3", c)
    assert len(homes) == 2 and homes.home("r1") is a and homes.home("r3") is c
    with pytest.raises(Exception, match="response_id"):
        homes.home("r2")


def test_backend_kinds_ask_for_the_usage_chunk_only_where_the_api_has_it():
    kind = make_backend_kind("vllm")
    for body in ({"model": "c", "messages": [], "stream": True}, {"model": "c", "prompt": "p", "stream": True}):
        assert kind.request_body(body, "m", 0)["stream_options"] == {"include_usage": True}
    responses = {"model": "c", "input": "hi", "stream": True, "prompt": {"id": "pmpt_1"}}
    assert kind.request_body(responses, "m", 0) == {"model": "m", "input": "hi", "stream": True,
                                                   "prompt": {"id": "pmpt_1"}}
