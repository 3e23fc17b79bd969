"""`POST /v1/responses` and `GET /v1/responses/{id}` as vLLM serves them: input items, instructions, function tools,
`previous_response_id` chains over stored responses, and the Responses API's streamed events."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chimera.emulate.api import ApiError, content_text, json_body, opt_bool, opt_int, opt_str, sse
from chimera.emulate.conversation import Turns, hints, plan_stage
from chimera.emulate.serving import Job, plan_answer, run
from chimera.emulate.state import EmulatorState, StoredResponse
from chimera.emulate.tools import offered_tool
from chimera.workload.tokens import count_tokens


def _input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    inp = body.get("input")
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp or not all(isinstance(i, dict) for i in inp):
        raise ApiError(400, "field 'input' is required: a string or a non-empty list of input items (objects)",
                       param="input")
    return inp


def _item_text(item: dict[str, Any]) -> str:
    """An input item's text for token counting (items without text, such as reasoning, count nothing)."""
    typ = item.get("type", "message")
    if typ == "message":
        if not isinstance(item.get("role"), str):
            raise ApiError(400, "each message item in 'input' needs a 'role'", param="input")
        return content_text(item.get("content"), "input")
    if typ == "function_call":
        name, args = item.get("name"), item.get("arguments")
        if not isinstance(name, str) or not isinstance(args, str) or not isinstance(item.get("call_id"), str):
            raise ApiError(400, "a function_call item in 'input' needs string 'call_id', 'name' and 'arguments'",
                           param="input")
        return name + args
    if typ == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise ApiError(400, "a function_call_output item in 'input' needs a string 'call_id'", param="input")
        return content_text(item.get("output"), "input")
    return ""


def _turns(items: list[dict[str, Any]]) -> Turns:
    """First user message, and assistant turns: assistant message items and function_call items."""
    first = next((content_text(i.get("content"), "input") for i in items
                  if i.get("type", "message") == "message" and i.get("role") == "user"), "")
    turns = sum(1 for i in items if i.get("type") == "function_call" or
                (i.get("type", "message") == "message" and i.get("role") == "assistant"))
    return Turns(first, turns)


class ResponsesJob(Job):
    """One /v1/responses call; stored on completion unless `store` is false."""

    id_prefix = "resp"

    def __init__(self, st: EmulatorState, body: dict[str, Any], request: Request) -> None:
        items = _input_items(body)
        self.instructions = opt_str(body, "instructions")
        self.previous_id = opt_str(body, "previous_response_id")
        prev = st.responses.get(self.previous_id) if self.previous_id else None
        if self.previous_id and prev is None:
            raise ApiError(404, f"Response with id '{self.previous_id}' not found.", "NotFoundError",
                           "previous_response_id")
        self.cap = opt_int(body, "max_output_tokens", 1)
        self.store = opt_bool(body, "store", True)
        self.body = body
        prompt = "\n".join([self.instructions or "", *(_item_text(i) for i in items)])
        turns = _turns(items)
        task_id, stage = hints(body, request)
        if prev is not None:  # the chain: the previous response's conversation, one turn on
            turns = Turns(prev.first_user, prev.stage + 1 + turns.assistant)
            task_id = task_id if task_id is not None else prev.task_id
        self.turns = turns
        plan = plan_stage(st.lengths, st.seed, (task_id, stage), turns, prompt)
        ptoks = count_tokens(prompt) + (prev.context_tokens if prev is not None else 0)
        super().__init__(st, body, ptoks, plan, plan_answer(plan, self.cap, offered_tool(body, chat=False)))
        self.item_id = f"{'fc' if self.answer.call else 'msg'}_{uuid.uuid4().hex}"
        self._full: dict[str, Any] | None = None

    def new_id(self) -> str:
        return f"resp_{uuid.uuid4().hex}"

    @property
    def _incomplete(self) -> bool:
        return self.answer.finish_reason == "length"

    def _item(self, done: bool) -> dict[str, Any]:
        """The output item: a function_call or an assistant message (empty until `done`)."""
        status = ("incomplete" if self._incomplete else "completed") if done else "in_progress"
        call = self.answer.call
        if call is not None:
            return {"id": self.item_id, "type": "function_call", "call_id": call.call_id, "name": call.name,
                    "arguments": call.arguments if done else "", "status": status}
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status,
                "content": [self._part(self.answer.text)] if done else []}

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _response(self, done: bool) -> dict[str, Any]:
        b = self.body
        status = ("incomplete" if self._incomplete else "completed") if done else "in_progress"
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                 "total_tokens": self.prompt_tokens + self.output_tokens,
                 "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.st.model,
            "status": status, "completed_at": int(time.time()) if done and not self._incomplete else None,
            "output": [self._item(True)] if done else [], "usage": usage if done else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if done and self._incomplete else None,
            "instructions": self.instructions, "metadata": b.get("metadata") or {},
            "parallel_tool_calls": b.get("parallel_tool_calls", True), "temperature": b.get("temperature", 1.0),
            "top_p": b.get("top_p", 1.0), "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
            "max_output_tokens": self.cap, "previous_response_id": self.previous_id, "store": self.store,
            "text": b.get("text") or {"format": {"type": "text"}}, "truncation": b.get("truncation", "disabled"),
            "reasoning": b.get("reasoning"), "user": b.get("user"), "background": False,
        }

    def full(self) -> dict[str, Any]:
        if self._full is None:  # built once: the streamed final event, the stored copy and GET agree
            self._full = self._response(True)
        return self._full

    async def chunks(self, tokens: AsyncIterator[str]) -> AsyncIterator[bytes]:
        seq = itertools.count()
        where = {"item_id": self.item_id, "output_index": 0}
        text = {**where, "content_index": 0}

        def event(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        yield event("response.created", response=self._response(False))
        yield event("response.in_progress", response=self._response(False))
        yield event("response.output_item.added", output_index=0, item=self._item(False))
        call = self.answer.call
        if call is not None:
            async for piece in tokens:
                yield event("response.function_call_arguments.delta", **where, delta=piece)
            yield event("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments)
        else:
            yield event("response.content_part.added", **text, part=self._part(""))
            async for piece in tokens:
                yield event("response.output_text.delta", **text, delta=piece, logprobs=[])
            yield event("response.output_text.done", **text, text=self.answer.text, logprobs=[])
            yield event("response.content_part.done", **text, part=self._part(self.answer.text))
        yield event("response.output_item.done", output_index=0, item=self._item(True))
        yield event("response.incomplete" if self._incomplete else "response.completed", response=self.full())

    def completed(self) -> None:
        if self.store:
            self.st.responses.put(self.id, StoredResponse(self.full(), self.plan.task_id, self.plan.stage,
                                                          self.turns.first_user,
                                                          self.prompt_tokens + self.output_tokens))


async def create_response(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    try:
        job = ResponsesJob(st, await json_body(request), request)
    except ApiError as e:
        return e.response()
    return await run(job, request)


async def get_response(request: Request) -> Response:
    st: EmulatorState = request.app.state.emulator
    rid = request.path_params["response_id"]
    stored = st.responses.get(rid)
    if stored is None:
        return ApiError(404, f"Response with id '{rid}' not found.", "NotFoundError", "response_id").response()
    return JSONResponse(stored.body)
