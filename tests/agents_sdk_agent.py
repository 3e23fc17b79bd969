"""An unmodified OpenAI Agents SDK agent, run by tests/test_agent_frameworks.py with `.venv-agents/bin/python`.

A tool-using agent (instructions and one function tool) runs every task of a JSON file at once (asyncio.gather of
`Runner.run`) against BASE_URL, through the Responses API (the SDK's default model, `OpenAIResponsesModel`) or chat
completions (`OpenAIChatCompletionsModel`). Nothing Chimera-specific is sent. Prints one JSON object: per task its
final output, the number of LLM calls and their response ids, or the error that ended it.

    .venv-agents/bin/python tests/agents_sdk_agent.py --base-url http://127.0.0.1:8000/v1 --api responses \
        --tasks prompts.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                    set_default_openai_client, set_tracing_disabled)
from openai import AsyncOpenAI

INSTRUCTIONS = ("You are a careful research assistant. Look facts up with the `lookup` tool, as often as you need, "
                "before you give the final answer.")


@function_tool
def lookup(query: str) -> str:
    """Look up notes about a query in the knowledge base."""
    return f"Notes on {query!r}: the knowledge base has three short entries that agree on the answer."


def build_agent(api: str, model: str, client: AsyncOpenAI) -> Agent:
    llm = (OpenAIResponsesModel(model=model, openai_client=client) if api == "responses"
           else OpenAIChatCompletionsModel(model=model, openai_client=client))
    return Agent(name="researcher", instructions=INSTRUCTIONS, tools=[lookup], model=llm)


async def run_one(agent: Agent, prompt: str, max_turns: int, stream: bool) -> dict:
    try:
        if stream:
            result = Runner.run_streamed(agent, prompt, max_turns=max_turns)
            async for _ in result.stream_events():
                pass
        else:
            result = await Runner.run(agent, prompt, max_turns=max_turns)
    except Exception as e:  # noqa: BLE001 - reported per task; the test reads it
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    return {"final_output": str(result.final_output), "calls": len(result.raw_responses),
            "response_ids": [r.response_id for r in result.raw_responses]}


async def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="the OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--api", choices=("responses", "chat"), default="responses")
    ap.add_argument("--tasks", required=True, help="a JSON file: a list of task prompts (the agents' user inputs)")
    ap.add_argument("--model", default="chimera")
    ap.add_argument("--api-key", default="x")
    ap.add_argument("--max-turns", type=int, default=30)
    ap.add_argument("--stream", action="store_true", help="Runner.run_streamed instead of Runner.run")
    args = ap.parse_args(argv)
    prompts = json.loads(open(args.tasks).read())
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    set_default_openai_client(client, use_for_tracing=False)
    agent = build_agent(args.api, args.model, client)
    tasks = await asyncio.gather(*(run_one(agent, p, args.max_turns, args.stream) for p in prompts))
    await client.close()
    return {"api": args.api, "stream": args.stream, "tasks": tasks}


if __name__ == "__main__":
    out = asyncio.run(main())
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
