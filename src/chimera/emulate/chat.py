"""`POST /v1/chat/completions` and `POST /v1/completions`: vLLM's request fields and answer shapes, tool calls
included (streamed as OpenAI's tool_calls deltas)."""

from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from chimera.emulate.api import ApiError, content_text, json_body, opt_int, sse
from chimera.emulate.conversation import Turns, chat_turns, hints, plan_stage
from chimera.emulate.serving import Job, plan_answer, run
from chimera.emulate.state import EmulatorState
from chimera.emulate.tools import offered_tool
from chimera.workload.tokens import count_tokens


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "field 'messages' is required and must be a non-empty list", param="messages")
    if not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise ApiError(400, "each message must be an object with a 'role'", param="messages")
    return msgs


def _message_text(m: dict[str, Any]) -> str:
    """A message's text for token counting: its content, and the name and arguments of any tool calls."""
    text = content_text(m.get("content"), "messages")
    calls = m.get("tool_calls")
    if isinstance(calls, list):
        fns = [c.get("function") for c in calls if isinstance(c, dict)]
        text += "".join(f"{f.get('name', '')}{f.get('arguments', '')}" for f in fns if isinstance(f, dict))
    return text


def _completion_prompt(body: dict[str, Any]) -> tuple[str, int | None]:
    """(prompt text, token count when given as token ids)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if isinstance(p, str):
        return p, None
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return " ".join(map(str, p)), len(p)
    if p is None:
        raise ApiError(400, "field 'prompt' is required", param="prompt")
    raise ApiError(400, "field 'prompt' must be a string, a list of one string, or a list of token ids "
                        "(batched prompts are not emulated)", param="prompt")


class CompletionJob(Job):
    """A chat (`chat=True`) or text completion."""

    def __init__(self, st: EmulatorState, body: dict[str, Any], request: Request, chat: bool) -> None:
        if chat:
            msgs = _messages(body)
            prompt, ptoks, turns = "\n".join(_message_text(m) for m in msgs), None, chat_turns(msgs)
            cap = opt_int(body, "max_completion_tokens", 1)
            cap = cap if cap is not None else opt_int(body, "max_tokens", 1)
            tool = offered_tool(body, chat=True)
        else:
            prompt, ptoks = _completion_prompt(body)
            turns, cap, tool = Turns(prompt, 0), opt_int(body, "max_tokens", 1), None
        if opt_int(body, "n", 1) not in (None, 1):
            raise ApiError(400, "the emulator serves n=1 only", param="n")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "field 'stream_options' must be an object", param="stream_options")
        self.chat, self.include_usage = chat, bool(opts.get("include_usage"))
        self.id_prefix = "chatcmpl" if chat else "cmpl"
        plan = plan_stage(st.lengths, st.seed, hints(body, request), turns, prompt)
        super().__init__(st, body, ptoks if ptoks is not None else count_tokens(prompt), plan,
                         plan_answer(plan, cap, tool))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.output_tokens,
                "total_tokens": self.prompt_tokens + self.output_tokens}

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.st.model, "choices": choices}

    def _tool_calls(self, arguments: str, index: bool) -> list[dict[str, Any]]:
        call = self.answer.call
        assert call is not None
        one = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
        return [{"index": 0, **one} if index else one]

    def full(self) -> dict[str, Any]:
        a = self.answer
        if not self.chat:
            choice = {"index": 0, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": a.text if a.call is None else None}
            if a.call is not None:
                msg["tool_calls"] = self._tool_calls(a.call.arguments, index=False)
            choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": a.finish_reason}
        return {**self._envelope(self.object, [choice]), "usage": self._usage()}

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None = None) -> bytes:
        """A chat chunk carrying `delta`, or a text chunk carrying the text `delta`."""
        ch = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if self.chat else
              {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
        return sse(self._envelope(self.chunk_object, [ch]))

    async def chunks(self, tokens: AsyncIterator[str]) -> AsyncIterator[bytes]:
        call = self.answer.call if self.chat else None
        if call is not None:  # OpenAI's shape: the call's id, type and name first, then the arguments in pieces
            yield self._chunk({"role": "assistant", "content": None, "tool_calls": self._tool_calls("", True)})
        elif self.chat:
            yield self._chunk({"role": "assistant", "content": ""})
        async for piece in tokens:
            if call is not None:
                yield self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            else:
                yield self._chunk({"content": piece} if self.chat else piece)
        yield self._chunk({} if self.chat else "", self.answer.finish_reason)
        if self.include_usage:
            yield sse({**self._envelope(self.chunk_object, []), "usage": self._usage()})
        yield b"data: [DONE]\n\n"


def completions_endpoint(chat: bool):  # noqa: ANN201 - a Starlette endpoint
    """The handler of /v1/chat/completions (`chat`) or /v1/completions."""

    async def handler(request: Request) -> Response:
        st: EmulatorState = request.app.state.emulator
        try:
            job = CompletionJob(st, await json_body(request), request, chat)
        except ApiError as e:
            return e.response()
        return await run(job, request)

    handler.__name__ = "chat_completions" if chat else "completions"
    return handler
