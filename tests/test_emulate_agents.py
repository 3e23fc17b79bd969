"""The emulated backend as agent frameworks see it: no Chimera hints, tool calls until the replayed workflow's last
stage, and the Responses API (plain, streamed, chained), through the official openai client (127.0.0.1 only)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from chimera.emulate import EmulatorServer
from chimera.emulate.lengths import WorkloadLengths, default_n_stages
from chimera.emulate.tools import Tool, placeholder, tool_call
from chimera.workload.schema import Outcome, StageOutcome, Task

PROFILE = "qwen2.5-7b@a6000"
MODEL = "emu-7b"
PROMPT = "Find the capital of the country north of Spain."
STAGES = [40, 30, 20, 25]
PARAMS = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1},
                                           "mode": {"enum": ["fast", "deep"]}},
          "required": ["query", "limit", "mode"], "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search.", "parameters": PARAMS}}]
RESP_TOOLS = [{"type": "function", "name": "search", "description": "Search.", "parameters": PARAMS, "strict": True}]
UNKNOWN = "A task that is not in the workload at all."
EVENTS: TypeAdapter = TypeAdapter(ResponseStreamEvent)


def _tasks() -> list[Task]:
    def task(tid: str, prompt: str, stages: list[int]) -> Task:
        return Task(id=tid, kind="qa", prompt=prompt, outcomes={MODEL: Outcome(score=1.0, output_tokens=sum(stages))},
                    stages={MODEL: [StageOutcome(output_tokens=n) for n in stages]})

    # "Find the capital" is a prefix of PROMPT: the longer prompt must win; "Hi" is shorter than the index key
    return [task("t4", PROMPT, STAGES), task("t2", "Find the capital", [7, 9]), task("hi", "Hi", [5, 6, 4])]


@pytest.fixture(scope="module")
def emu():
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50, workload=_tasks()) as srv:
        yield srv


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20)


def _valid_arguments(arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    assert jsonschema_rs.is_valid(PARAMS, args), args
    return args


def _chat_stream(c: openai.OpenAI, msgs: list[dict]) -> tuple[dict, str, int]:
    """(assistant message assembled from the deltas, finish reason, pieces received)."""
    content, calls, finish, pieces = "", {}, None, 0
    for ch in c.chat.completions.create(model=MODEL, messages=msgs, tools=CHAT_TOOLS, stream=True):
        for choice in ch.choices:
            d = choice.delta
            finish = choice.finish_reason or finish
            if d.content:
                content, pieces = content + d.content, pieces + 1
            for tc in d.tool_calls or []:
                got = calls.setdefault(tc.index, {"id": None, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
                got["id"] = tc.id or got["id"]
                if tc.function and tc.function.name:
                    got["function"]["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    got["function"]["arguments"] += tc.function.arguments
                    pieces += 1
    msg: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, finish, pieces


def _chat_loop(url: str, prompt: str, stream: bool) -> list[int]:
    """A plain tool-using agent loop (no hints): per call, its output tokens, until an answer without tool calls."""
    c = _client(url)
    msgs: list[dict] = [{"role": "system", "content": "You are a careful agent."},
                        {"role": "user", "content": prompt + "\n\n(padding the agent appends)"}]
    lengths: list[int] = []
    for _ in range(15):
        if stream:
            msg, finish, n = _chat_stream(c, msgs)
        else:
            r = c.chat.completions.create(model=MODEL, messages=msgs, tools=CHAT_TOOLS)
            msg, finish, n = r.choices[0].message.model_dump(exclude_none=True), r.choices[0].finish_reason, \
                r.usage.completion_tokens
        lengths.append(n)
        msgs.append(msg)
        if finish != "tool_calls":
            assert finish == "stop" and msg["content"] and not msg.get("tool_calls")
            return lengths
        (call,) = msg["tool_calls"]
        assert call["function"]["name"] == "search" and call["id"].startswith("call_")
        _valid_arguments(call["function"]["arguments"])
        msgs.append({"role": "tool", "tool_call_id": call["id"], "content": "Paris is the capital of France."})
    raise AssertionError("the loop never ended")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_loop_runs_the_planned_stages(emu: EmulatorServer, stream: bool) -> None:
    assert _chat_loop(emu.base_url, PROMPT, stream) == STAGES  # three tool calls, then the answer


def test_unhinted_lengths_match_hinted_ones(emu: EmulatorServer) -> None:
    c = _client(emu.base_url)
    hinted = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                        extra_headers={"X-Chimera-Task-Id": "t4", "X-Chimera-Stage": str(s)}
                                        ).usage.completion_tokens for s in range(len(STAGES))]
    assert hinted == STAGES == _chat_loop(emu.base_url, PROMPT, stream=False)
    assert _chat_loop(emu.base_url, "Find the capital", stream=False) == [7, 9]
    assert _chat_loop(emu.base_url, "Hi there", stream=False) == [5, 6, 4]


def test_unknown_task_gets_a_deterministic_plan(emu: EmulatorServer) -> None:
    first = _chat_loop(emu.base_url, UNKNOWN, stream=False)
    assert len(first) == default_n_stages(UNKNOWN + "\n\n(padding the agent appends)")
    assert _chat_loop(emu.base_url, UNKNOWN, stream=True) == first


def test_tool_choice_none_answers_in_text(emu: EmulatorServer) -> None:
    r = _client(emu.base_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], tools=CHAT_TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.usage.completion_tokens == STAGES[0]


def test_tool_choice_required_or_named_calls_on_the_last_stage_too(emu: EmulatorServer) -> None:
    c = _client(emu.base_url)
    last = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"}]  # stage 2 of 3: the final answer unless a call is forced
    assert c.chat.completions.create(model=MODEL, messages=last, tools=CHAT_TOOLS).choices[0].finish_reason == "stop"
    for choice in ("required", {"type": "function", "function": {"name": "search"}}):
        r = c.chat.completions.create(model=MODEL, messages=last, tools=CHAT_TOOLS, tool_choice=choice)
        assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens == 4
        _valid_arguments(r.choices[0].message.tool_calls[0].function.arguments)


def test_capped_stream_ends_incomplete(emu: EmulatorServer) -> None:
    body = {"model": MODEL, "input": "Hi", "stream": True, "max_output_tokens": 2, "tools": RESP_TOOLS}
    with httpx.stream("POST", emu.base_url + "/responses", json=body, timeout=20) as r:
        events = [EVENTS.validate_python(json.loads(ln[6:])) for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["the", " model"]


def _responses_loop(url: str, stream: bool, chain: bool) -> list[int]:
    """The same loop on /v1/responses: the whole input resent each call, or only the tool output with
    previous_response_id. Every answer is checked against the openai SDK's Response / ResponseStreamEvent models."""
    items: list[dict] = [{"role": "user", "content": [{"type": "input_text", "text": PROMPT + " (padding)"}]}]
    lengths: list[int] = []
    prev: str | None = None
    for _ in range(15):
        body = {"model": MODEL, "instructions": "You are a careful agent.", "tools": RESP_TOOLS, "stream": stream,
                "input": items if prev is None else items[-1:], "previous_response_id": prev}
        if stream:
            with httpx.stream("POST", url + "/responses", json=body, timeout=20) as r:
                datas = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
            events = [EVENTS.validate_python(d) for d in datas]
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert [e.type for e in events[:3]] == ["response.created", "response.in_progress",
                                                    "response.output_item.added"]
            assert events[-1].type == "response.completed"
            resp = events[-1].response
            deltas = [e.delta for e in events if e.type in ("response.output_text.delta",
                                                            "response.function_call_arguments.delta")]
            assert len(deltas) == resp.usage.output_tokens
        else:
            resp = Response.model_validate(httpx.post(url + "/responses", json=body, timeout=20).json())
            deltas = None
        assert resp.status == "completed" and resp.id.startswith("resp_") and resp.previous_response_id == prev
        (item,) = resp.output
        lengths.append(resp.usage.output_tokens)
        if item.type == "message":
            assert resp.output_text and (deltas is None or "".join(deltas) == resp.output_text)
            return lengths
        assert item.type == "function_call" and item.name == "search"
        assert deltas is None or "".join(deltas) == item.arguments
        _valid_arguments(item.arguments)
        items += [{"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
                  {"type": "function_call_output", "call_id": item.call_id, "output": "Paris."}]
        prev = resp.id if chain else None
    raise AssertionError("the loop never ended")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chain", [False, True])
def test_responses_tool_loop_runs_the_planned_stages(emu: EmulatorServer, stream: bool, chain: bool) -> None:
    assert _responses_loop(emu.base_url, stream, chain) == STAGES


def test_responses_with_the_openai_client(emu: EmulatorServer) -> None:
    c = _client(emu.base_url)
    r = c.responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.usage.input_tokens_details.cached_tokens == 0
    r = c.responses.create(model=MODEL, input="Hi")
    assert r.status == "completed" and r.usage.output_tokens == 5 and len(r.output_text.split()) == 5
    assert c.responses.retrieve(r.id).model_dump() == r.model_dump()
    follow = c.responses.create(model=MODEL, input="go on", previous_response_id=r.id)
    assert follow.usage.output_tokens == 6  # stage 1 of the task the chain started
    assert follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens  # the chain's context is carried
    unstored = c.responses.create(model=MODEL, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_get_unknown_response_is_404(emu: EmulatorServer) -> None:
    r = httpx.get(emu.base_url + "/responses/resp_nope")
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "Response with id 'resp_nope' not found.", "type": "NotFoundError",
                                 "param": "response_id", "code": 404}


def test_stored_responses_are_bounded() -> None:
    with EmulatorServer(profile=PROFILE, served_model_name=MODEL, time_scale=50, max_stored_responses=2) as srv:
        c = _client(srv.base_url)
        ids = [c.responses.create(model=MODEL, input=f"q{i}", max_output_tokens=2).id for i in range(3)]
        assert len(srv.state.responses) == 2
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(ids[0])
        assert c.responses.retrieve(ids[2]).id == ids[2]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/responses", {"model": MODEL}, "input"),
    ("/responses", {"model": MODEL, "input": [1]}, "input"),
    ("/responses", {"model": MODEL, "input": [{"type": "function_call", "name": "f"}]}, "input"),
    ("/responses", {"model": MODEL, "input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
    ("/responses", {"model": MODEL, "input": "x", "store": "yes"}, "store"),
    ("/responses", {"model": MODEL, "input": "x", "instructions": 3}, "instructions"),
    ("/responses", {"model": MODEL, "input": "x", "tools": {"name": "f"}}, "tools"),
    ("/responses", {"model": MODEL, "input": "x", "tools": [{"type": "function"}]}, "tools"),
    ("/responses", {"model": MODEL, "input": "x", "tools": RESP_TOOLS,
                    "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                           "tools": [{"type": "function", "name": "f"}]}, "tools"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": CHAT_TOOLS,
                           "tool_choice": 7}, "tool_choice"),
])
def test_bad_input_names_the_field(emu: EmulatorServer, path: str, body: dict, field: str) -> None:
    r = httpx.post(emu.base_url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_unknown_previous_response_is_404(emu: EmulatorServer) -> None:
    r = httpx.post(emu.base_url + "/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_placeholder_arguments_fit_their_schema() -> None:
    schema = {"type": "object", "$defs": {"Point": {"type": "object", "properties": {
        "x": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2}},
        "required": ["x", "tags"]}},
        "properties": {"p": {"$ref": "#/$defs/Point"}, "name": {"type": ["string", "null"], "minLength": 20},
                       "flag": {"type": "boolean"}, "opt": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
                       "unused": {"type": "string"}},
        "required": ["p", "name", "flag", "opt"]}
    value = placeholder(schema)
    assert jsonschema_rs.is_valid(schema, value), value
    assert set(value) == {"p", "name", "flag", "opt"}
    call = tool_call(Tool("f", schema, required=False), 500)
    assert len(call.arguments) >= 500 and json.loads(call.arguments) == value
    assert json.loads(tool_call(Tool("g", {}, required=False), 3).arguments) == {}


def test_prompt_index_prefers_the_longest_prompt() -> None:
    wl = WorkloadLengths(_tasks() + [Task(id="long", kind="qa", prompt=PROMPT + " " + "x" * 80,
                                          outcomes={MODEL: Outcome(score=1.0, output_tokens=9)})], MODEL)
    assert wl.match(PROMPT + " and more") == "t4"
    assert wl.match(PROMPT + " " + "x" * 80 + " padding") == "long"
    assert wl.match("Find the capital city") == "t2"
    assert wl.match("Hi") == "hi" and wl.match("H") is None and wl.match("") is None
