"""FireAct HotpotQA ReAct runs of three models: per-model EM plus per-LLM-call (stage) token counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chimera.workload.loaders._common import read_json, take
from chimera.workload.schema import Outcome, StageOutcome, Task
from chimera.workload.tokens import count_tokens_batch

SOURCE = "fireact-hotpotqa"
KIND = "qa"
TRAJ_DIR = "fireact/trajs"
FILES = {
    "Llama-2-7b-lora": "hotpotqa_dev_0_500_llama_models_lora_llama-2-7b-d_1000_0.7_2023-09-19-00-49-36.json.xz",
    "Llama-2-13b-lora": "hotpotqa_dev_0_500_llama_models_lora_llama-2-13b-d_1000_0.7_2023-09-18-13-40-08.json.xz",
    "gpt-3.5-turbo-0613-ft": (
        "hotpotqa_dev_0_500_ft_gpt-3.5-turbo-0613_princeton-nlp__7woQRsdi_0.0_2023-09-21-16-19-51.json.xz"
    ),
}
MODELS = tuple(FILES)
RESPONSE_MARK = "### Response:\n"
# ChatML overhead for the GPT-3.5 chat format: <|im_start|>role\n ... <|im_end|>\n per message, and the
# <|im_start|>assistant\n header that opens each generated reply.
CHAT_MSG_OVERHEAD = 5
CHAT_REPLY_HEADER = 3


@dataclass
class _Step:
    """One LLM call: its generated text, the observation fed back after it, and the prompt it was given."""

    text: str
    observation: str = ""
    prompt_text: str = ""  # llama: exact text prompt; chat: unused
    chat_prefix: list[str] = field(default_factory=list)  # chat: contents of all earlier messages


def parse_text_traj(traj: str) -> list[_Step]:
    """Split an Alpaca-format llama trajectory into calls: each maximal run of non-Observation lines is one call.

    Generation stops at "Observation", so a call is "Thought: ...\\nAction: ..." (rarely a longer run, e.g. a
    "reflect" line followed by a new Thought); the Observation line(s) after it are tool output.
    """
    head, sep, body = traj.partition(RESPONSE_MARK)
    if not sep:
        raise ValueError("trajectory has no '### Response:' marker")
    prefix = head + sep
    steps: list[_Step] = []
    in_obs = True  # the response starts with a generated segment
    gen: list[str] = []
    obs: list[str] = []

    def flush() -> None:
        nonlocal prefix
        if gen:
            text = "\n".join(gen)
            steps.append(_Step(text=text, observation="\n".join(obs), prompt_text=prefix))
            prefix = prefix + text + "\n" + ("\n".join(obs) + "\n" if obs else "")

    for line in body.split("\n"):
        if not line.strip():
            continue
        if line.startswith("Observation"):
            obs.append(line)
            in_obs = True
        else:
            if in_obs and gen:
                flush()
                gen, obs = [], []
            elif in_obs and obs:  # observation before any call: fold into the prompt
                prefix += "\n".join(obs) + "\n"
                obs = []
            gen.append(line)
            in_obs = False
    flush()
    return steps


def parse_chat_traj(traj: list[dict]) -> list[_Step]:
    """Split a chat trajectory: each assistant message is one call, the next user message its observation."""
    steps: list[_Step] = []
    history: list[str] = []
    for i, msg in enumerate(traj):
        if msg["role"] == "assistant":
            nxt = traj[i + 1] if i + 1 < len(traj) and traj[i + 1]["role"] == "user" else None
            obs = nxt["content"] if nxt else ""
            steps.append(_Step(text=msg["content"], observation=obs, chat_prefix=list(history)))
        history.append(msg["content"])
    return steps


def _prompt_tokens(step: _Step, counts: dict[str, int]) -> int:
    if step.prompt_text:
        return counts[step.prompt_text]
    return sum(counts[c] + CHAT_MSG_OVERHEAD for c in step.chat_prefix) + CHAT_REPLY_HEADER


def load(data_dir: Path, limit: int | None = None) -> list[Task]:
    """Questions present in all three trajectory files (sorted by HotpotQA dev index); score = exact match."""
    runs = {m: read_json(data_dir, f"{TRAJ_DIR}/{f}") for m, f in FILES.items()}
    dev = read_json(data_dir, "fireact/hotpotqa_dev.json.xz")
    common = sorted(set.intersection(*(set(r) for r in runs.values())), key=int)
    common = take(common, limit)

    steps: dict[tuple[str, str], list[_Step]] = {}
    for qid in common:
        for m, run in runs.items():
            traj = run[qid]["traj"]
            steps[(qid, m)] = parse_text_traj(traj) if isinstance(traj, str) else parse_chat_traj(traj)

    texts: set[str] = set()
    for ss in steps.values():
        for s in ss:
            texts.update((s.text, s.observation, s.prompt_text, *s.chat_prefix))
    ordered = sorted(texts)
    counts = dict(zip(ordered, count_tokens_batch(ordered)))

    questions = [dev[int(qid)]["question"] for qid in common]
    q_tokens = count_tokens_batch(questions)
    tasks: list[Task] = []
    for qid, question, qtok in zip(common, questions, q_tokens):
        outcomes: dict[str, Outcome] = {}
        stages: dict[str, list[StageOutcome]] = {}
        for m, run in runs.items():
            rec = run[qid]
            st = [
                StageOutcome(
                    output_tokens=counts[s.text],
                    prompt_tokens=_prompt_tokens(s, counts),
                    observation_tokens=counts[s.observation],
                )
                for s in steps[(qid, m)]
            ]
            stages[m] = st
            outcomes[m] = Outcome(
                score=1.0 if rec["em"] else 0.0,
                output_tokens=sum(s.output_tokens for s in st),
                f1=float(rec.get("f1", 0.0)),
            )
        tasks.append(
            Task(
                id=f"{SOURCE}/{qid}",
                kind=KIND,
                prompt=question,
                prompt_tokens=qtok,
                outcomes=outcomes,
                stages=stages,
                source=SOURCE,
                answer=dev[int(qid)]["answer"],
            )
        )
    return tasks
