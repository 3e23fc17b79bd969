"""The messages the agent driver sends: the hinted layouts (`stage_messages`: the transcript rebuilt each stage and
padded in its newest message; `plan_messages`: the plan's token stream in a real server's tokens) and the hintless
`Conversation`, append-only as an unmodified agent's is, so a gateway can follow a workflow from its messages."""

from __future__ import annotations

import hashlib

import numpy as np

from chimera.workload.plan import WorkflowPlan
from chimera.workload.schema import Task

FILLER = " the"  # one Qwen BPE token per repeat


def observation(plan: WorkflowPlan, stage: int) -> str:
    """The user message that follows stage-1's output: a tool observation and what the next step is."""
    role = plan.stage_roles[stage] if stage < len(plan.stage_roles) else "continue"
    return f"Observation after step {stage}. Next step ({role})."


def stage_messages(task: Task, stage: int, outputs: list[str], plan: WorkflowPlan,
                   pad_to: int | None = None) -> list[dict]:
    """The task prompt, then each earlier output and an observation. With `pad_to`, filler tokens stand in for the
    context the plan counts but the text lacks (instructions, tool observations), so the backend prefills the
    planned prompt length; they go in the stage's newest user message."""
    msgs: list[dict] = [{"role": "user", "content": task_text(task)}]
    for i, text in enumerate(outputs):
        msgs.append({"role": "assistant", "content": text})
        msgs.append({"role": "user", "content": observation(plan, i + 1)})
    if pad_to is not None:
        have = _count_text(msgs)
        if pad_to > have:
            msgs[-1]["content"] += FILLER * (pad_to - have)
    return msgs


def task_text(task: Task) -> str:
    return task.prompt or f"Task {task.id}"


def _count_text(msgs: list[dict]) -> int:
    from chimera.workload.tokens import count_tokens

    return count_tokens("\n".join(m.get("content") or "" for m in msgs))


CHATML_OPEN, CHATML_CLOSE = "<|im_start|>", "<|im_end|>"


class ServerTokens:
    """Counts a chat prompt in a server's tokens: ChatML rendering (the random-weight models' chat template, what
    vLLM applies before tokenizing) encoded with the server's tokenizer.json (`tokenizers`, no special tokens
    added)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.path = str(path)
        self.tok = Tokenizer.from_file(self.path)
        self._words: list[str] | None = None
        self._markers: dict[str | None, int] = {}

    @staticmethod
    def render(msgs: list[dict]) -> str:
        return "".join(f"{CHATML_OPEN}{m['role']}\n{m.get('content') or ''}{CHATML_CLOSE}\n" for m in msgs) + \
            f"{CHATML_OPEN}assistant\n"

    def count(self, msgs: list[dict]) -> int:
        return len(self.tok.encode(self.render(msgs), add_special_tokens=False).ids)

    def markers(self, role: str | None) -> int:
        """Tokens a message of `role` adds around its content (None: the generation prompt that ends a prompt)."""
        got = self._markers.get(role)
        if got is None:
            text = f"{CHATML_OPEN}assistant\n" if role is None else f"{CHATML_OPEN}{role}\n{CHATML_CLOSE}\n"
            got = self._markers[role] = len(self.tok.encode(text, add_special_tokens=False).ids)
        return got

    def trim(self, text: str, n: int) -> str:
        """`text` cut to its first n tokens (a decoded random-token output re-tokenizes longer than it was made)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return text if len(ids) <= n else self.tok.decode(ids[:max(0, n)])

    def words(self) -> list[str]:
        """Words that are one token each in this vocabulary with a leading space (so any run of them counts exactly
        one token per word): the filler alphabet of `filler`."""
        ws = self._words
        if ws is None:
            ws = sorted(w for w in (self.tok.decode([i]) for i in sorted(self.tok.get_vocab().values()))
                        if len(w) > 3 and w[0] == " " and w[1:].isalpha())
            ws = [w for w in ws if len(self.tok.encode(w + w, add_special_tokens=False).ids) == 2]
            if not ws:
                raise ValueError(f"{self.path}: no single-token words to build prompts from")
            self._words = ws
        return ws

    def filler(self, key: object, n: int) -> str:
        """n tokens of text that depend only on `key`: the same segment (a system prompt, a stage's instructions)
        renders to the same tokens in every prompt that holds it, and different segments do not share a prefix."""
        if n <= 0:
            return ""
        ws = self.words()
        seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
        idx = np.random.default_rng(seed).integers(0, len(ws), n)
        return "".join(ws[i] for i in idx)


def plan_messages(task: Task, stage: int, outputs: list[str], out_tokens: list[int], plan: WorkflowPlan, wid: str,
                   counter: ServerTokens) -> tuple[list[dict], int]:
    """The stage's prompt laid out as the plan's token stream (`WorkflowPlan.token_stream`, what the simulator's
    prefix cache models), in the server's tokens: text segments in user messages, earlier outputs as assistant
    messages (trimmed to the tokens they were generated as). The system prompt is the same text for every task of
    the kind, the task prompt for every stage of the task, a carried transcript the same as the earlier call's, so
    the servers' prefix caches see what the plans say they share.

    Each message's ChatML markers are taken out of its own last segments (an output: its tail; what a short output
    cannot hold, out of the message after it), and the generation prompt out of the first message; a message holds
    the same segments at every stage that carries it, so the prompt is the plan's length and a carried transcript
    still renders to the same tokens. Returns (messages, prompt tokens as the server counts them)."""
    groups: list[tuple[str, list[tuple[tuple, int]]]] = []  # (role, [(identity, tokens)])
    for ident, n in plan.token_stream(stage, out_tokens, wid, 0)[:-1]:  # the prompt's segments (not the output)
        if n <= 0:
            continue
        role = "assistant" if ident[1] == "out" else "user"
        if role == "user" and groups and groups[-1][0] == "user":
            groups[-1][1].append((ident, n))
        else:
            groups.append((role, [(ident, n)]))
    if not groups:
        groups.append(("user", []))
    sizes = [[n for _, n in segs] for _, segs in groups]

    def absorb(k: int, take: int) -> int:  # out of message k's last segments; what did not fit
        for i in range(len(sizes[k]) - 1, -1, -1):
            cut = min(take, sizes[k][i])
            sizes[k][i] -= cut
            take -= cut
        return take

    left = 0
    for k, (role, _) in enumerate(groups):  # what a short message cannot hold goes on to the next one
        left = absorb(k, left + counter.markers(role) + (counter.markers(None) if k == 0 else 0))
    if left and groups[-1][0] == "assistant":  # trailing short outputs (a windowed stage): out of the first message,
        absorb(0, left)  # which ends with this stage's own instructions; else (a carried transcript) a few extra tokens
    msgs = []
    for (role, segs), ns in zip(groups, sizes):
        parts = []
        for (ident, _), n in zip(segs, ns):
            if ident[1] == "out":  # an earlier stage's output, carried
                parts.append(counter.trim(outputs[ident[2]], n))
            elif ident[1] == "task":  # the task's own text, cut or filled to its planned tokens
                body = counter.trim(" " + task_text(task), n)
                have = len(counter.tok.encode(body, add_special_tokens=False).ids)
                parts.append(body + counter.filler((ident, "rest"), n - have))
            else:
                parts.append(counter.filler(ident, n))
        msgs.append({"role": role, "content": "".join(parts)})
    return msgs, counter.count(msgs)


class Conversation:
    """One task's conversation as an unmodified agent holds it: each call sends the previous call's messages exactly
    as sent, the reply exactly as received, and one new observation. Padding (filler for the plan's prompt length)
    only ever goes into the new message, so every call extends the one before it; at stage 0 it follows the task
    prompt in a message of its own, so the first user message is exactly the task prompt."""

    def __init__(self, task: Task, plan: WorkflowPlan, counter: ServerTokens | None = None, key: object = None):
        self.task, self.plan, self.counter, self.key = task, plan, counter, key
        self.messages: list[dict] = []

    def next_call(self, stage: int, pad_to: int | None) -> tuple[list[dict], int | None]:
        """This call's messages (a copy) and, with a server tokenizer, its prompt tokens as the server counts them."""
        text = task_text(self.task) if stage == 0 else observation(self.plan, stage)
        new = [{"role": "user", "content": text}]
        if pad_to is not None:
            pad = new[-1] if stage else {"role": "user", "content": ""}  # stage 0: the task prompt stays as it is
            n = pad_to - self._count(self.messages + new + ([] if stage else [pad]))
            if n > 0:
                pad["content"] += self.counter.filler((self.key, stage, "pad"), n) if self.counter is not None \
                    else FILLER * n
                if not stage:
                    new.append(pad)
        self.messages.extend(new)
        return list(self.messages), (self.counter.count(self.messages) if self.counter is not None else None)

    def reply(self, message: dict) -> None:
        """The assistant's answer exactly as received (the next call sends it back)."""
        self.messages.append(message)

    def _count(self, msgs: list[dict]) -> int:
        return self.counter.count(msgs) if self.counter is not None else _count_text(msgs)
