"""Test servers shared by the test files: an ASGI app served by uvicorn in a thread, a fake OpenAI upstream, and
whether the real vLLM servers can run."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Callable, Iterator, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from chimera.util.threaded import ThreadedServer


class Served(ThreadedServer):
    """An ASGI app run by uvicorn in a thread from construction on; `stop()` shuts it down (and runs its lifespan
    shutdown)."""

    def __init__(self, app) -> None:
        super().__init__(app, name="test-server")
        self.start(15)

    @property
    def gw(self):
        """The Gateway object when `app` is a Chimera gateway."""
        return self.app.state.gateway


@contextlib.contextmanager
def gateway_over(upstreams: Sequence[Starlette], config: Callable[[list[str]], dict]) -> Iterator[tuple[str, Any]]:
    """The `upstreams` served, and in front of them a gateway built from the config document `config(their URLs)`;
    yields (the gateway's URL, its Gateway object) and stops them all."""
    ups = [Served(a) for a in upstreams]
    try:
        app = build_gateway(gateway_config_from_dict(config([u.url for u in ups])))
        gw = Served(app)
        try:
            yield gw.url, app.state.gateway
        finally:
            gw.stop()
    finally:
        for u in ups:
            u.stop()


def vllm_missing() -> str | None:
    """Why the real vLLM CPU servers cannot run here (no `.venv-vllm`, a model not built), or None when they can."""
    from chimera.backends.vllm_cpu import DEFAULT_MODELS, DEFAULT_VENV, EngineSetupError, model_dir, vllm_python

    try:
        vllm_python(DEFAULT_VENV)
        for m in ("tiny", "wide"):
            model_dir(m, DEFAULT_MODELS)
    except EngineSetupError as e:
        return str(e)
    return None


def tiny_server_tokens(folder):
    """A server tokenizer for prompt-layout tests: a 400-token byte-level BPE with the ChatML markers, trained on a
    toy sentence and saved as `folder`/tokenizer.json, wrapped in `ServerTokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from chimera.agents.messages import ServerTokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" the cat sat on the mat and the dog ran"] * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return ServerTokens(str(folder / "tokenizer.json"))


def fake_upstream(name: str, delay: float = 0.05, fail: bool = False, words: int = 5,
                  drop_after: int | None = None) -> Starlette:
    """An OpenAI-compatible server that answers after `delay` (or 500s when `fail`), naming itself `name`;
    `drop_after` chunks into a stream it breaks the connection."""
    hits: list[dict] = []

    live = {"now": 0, "max": 0}

    async def chat(request: Request) -> Response:
        body = await request.json()
        hits.append(body)
        live["now"] += 1
        live["max"] = max(live["max"], live["now"])
        try:
            await asyncio.sleep(delay)
        finally:
            live["now"] -= 1
        if fail:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        text = [f"w{i} " for i in range(words)]
        if body.get("stream"):
            async def gen():
                for i, t in enumerate(text):
                    if drop_after is not None and i == drop_after:
                        raise RuntimeError("upstream dies mid-stream")
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": name,
                             "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.005)
                end = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": name,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": words, "total_tokens": words + 3}}
                yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({
            "id": "c1", "object": "chat.completion", "created": 1, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": words, "total_tokens": words + 3},
        })

    async def completions(request: Request) -> Response:
        body = await request.json()
        hits.append(body)
        await asyncio.sleep(delay)
        return JSONResponse({"id": "c2", "object": "text_completion", "created": 1, "model": name,
                             "choices": [{"index": 0, "text": " four", "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            *responses_routes(name, hits, delay, fail, words, drop_after)])
    app.state.hits = hits
    app.state.live = live
    return app


def _response(name: str, rid: str, status: str, output: list[dict], words: int) -> dict:
    usage = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": words,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": words + 3}
    return {"id": rid, "object": "response", "created_at": 1, "status": status, "model": name, "output": output,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
            "incomplete_details": None, "usage": usage if status == "completed" else None}


def _response_events(name: str, rid: str, body: dict, words: int, drop_after: int | None):
    """OpenAI's Responses event stream for one answer: a text message, or (with `tools`) one function call; with
    `metadata: {"outcome": "failed"}` the engine fails at the end (`response.failed`)."""
    parts = [f"w{i} " for i in range(words)]
    tool = body.get("tools") and isinstance(body["tools"][0], dict) and body["tools"][0].get("name")
    if tool:
        item = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": tool, "status": "completed",
                "arguments": "".join(parts)}
        added = {**item, "arguments": "", "status": "in_progress"}
        delta_type, opened, done = "response.function_call_arguments.delta", [], [
            {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0,
             "arguments": item["arguments"]}]
    else:
        text = {"type": "output_text", "text": "".join(parts), "annotations": []}
        item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [text]}
        added = {**item, "status": "in_progress", "content": []}
        delta_type, opened = "response.output_text.delta", [
            {"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "part": {**text, "text": ""}}]
        done = [
            {"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "text": text["text"]},
            {"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "part": text}]
    yield {"type": "response.created", "response": _response(name, rid, "in_progress", [], words)}
    yield {"type": "response.in_progress", "response": _response(name, rid, "in_progress", [], words)}
    yield {"type": "response.output_item.added", "output_index": 0, "item": added}
    yield from opened
    for i, p in enumerate(parts):
        if drop_after is not None and i == drop_after:
            raise RuntimeError("upstream dies mid-stream")
        yield {"type": delta_type, "item_id": item["id"], "output_index": 0, "content_index": 0, "delta": p}
    yield from done
    yield {"type": "response.output_item.done", "output_index": 0, "item": item}
    if (body.get("metadata") or {}).get("outcome") == "failed":
        failed = _response(name, rid, "failed", [item], words)
        yield {"type": "response.failed", "response": {**failed, "error": {"code": "server_error",
                                                                              "message": "engine died"}}}
        return
    yield {"type": "response.completed", "response": _response(name, rid, "completed", [item], words)}


def responses_routes(name: str, hits: list[dict], delay: float = 0.05, fail: bool = False, words: int = 5,
                     drop_after: int | None = None) -> list[Route]:
    """POST /v1/responses (plain and streamed, in OpenAI's event format) and GET /v1/responses/{id} of the
    responses this server made (it keeps them, as vLLM does, and continues only those: `previous_response_id`)."""
    kept: dict[str, dict] = {}

    async def create(request: Request) -> Response:
        body = await request.json()
        hits.append(body)
        await asyncio.sleep(delay)
        if fail:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        prev = body.get("previous_response_id")
        if prev is not None and prev not in kept:  # a server continues only the responses it keeps
            return JSONResponse({"error": {"message": f"Response with id '{prev}' not found.",
                                           "type": "invalid_request_error", "code": None}}, 404)
        rid = f"resp_{name}_{len(kept)}"
        events = list(_response_events(name, rid, body, words, None))
        kept[rid] = events[-1]["response"]
        if not body.get("stream"):
            return JSONResponse(kept[rid])

        async def gen():
            for seq, ev in enumerate(_response_events(name, rid, body, words, drop_after)):
                ev = {**ev, "sequence_number": seq}
                yield f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n"
                await asyncio.sleep(0.002)
        return StreamingResponse(gen(), media_type="text/event-stream")

    async def stored(request: Request) -> Response:
        rid = request.path_params["rid"]
        if rid not in kept:
            return JSONResponse({"error": {"message": f"Response with id '{rid}' not found.",
                                           "type": "invalid_request_error", "code": None}}, 404)
        return JSONResponse(kept[rid])

    return [Route("/v1/responses", create, methods=["POST"]), Route("/v1/responses/{rid}", stored, methods=["GET"])]
