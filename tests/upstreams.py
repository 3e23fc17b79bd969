"""Test servers shared by the test files: an ASGI app served by uvicorn in a thread, a fake OpenAI upstream, and
whether the real vLLM servers can run."""

from __future__ import annotations

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

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
                            Route("/v1/completions", completions, methods=["POST"])])
    app.state.hits = hits
    app.state.live = live
    return app
