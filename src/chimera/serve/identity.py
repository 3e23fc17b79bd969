"""Who a call belongs to, for clients that say so and for agents that were never written for Chimera.

A call's workflow comes, in this order, from the client's Chimera hints, a session it names (a standard session
header, `previous_response_id`, or the `prompt_cache_key` / `user` body fields), the conversation it continues, or
else it starts a new one. A conversation is recognised by content hashes: after a call is answered, the hash of
its messages plus the reply (as the client will send it back) names the workflow and stage; a later call whose
messages start with such a prefix is that workflow's next stage. Only prefixes that end in a reply the gateway served
are keys, so tasks sharing a system prompt stay apart; no message text is kept, only 16-byte hashes, in one bounded
LRU. The backend pool is told when a workflow ends (idle timeout, a final answer to a tool-using request).
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from chimera.serve.config import IdentityConfig
from chimera.serve.edge import WorkflowHints
from chimera.serve.pool import BackendPool

DIGEST_BYTES = 16
_SYSTEM_ROLES = frozenset({"system", "developer"})  # instructions: a handoff to another agent replaces them
_CALL_ITEMS = frozenset({"function_call", "custom_tool_call"})  # Responses items the client must act on


class IdentitySource(str, enum.Enum):
    """How a call's workflow was found (the `x-chimera-identity` header and the trace store's `identity` column)."""

    HINT = "hint"  # X-Chimera-Workflow-Id / the body's `chimera.workflow_id`
    SESSION = "session"  # a session header or body field
    PREVIOUS_RESPONSE = "previous_response"  # `previous_response_id` names an answer the gateway served
    CONVERSATION = "conversation"  # the messages continue a conversation the gateway answered
    NEW = "new"  # none of the above: a new workflow


@dataclass(frozen=True)
class Identity:
    """A call's workflow, its stage in it, and how they were found. `chain` (the running hash of the request's
    conversation, extended only on a copy) lets the    answer be recorded without hashing the conversation again."""

    workflow_id: str
    stage: int
    source: IdentitySource
    chain: Any = field(default=None, compare=False, repr=False)


# ---- content hashes ----------------------------------------------------------------------------------------------
def _text(content: Any) -> str:
    """The text of a message's content: a string, or the `text` of its parts (clients switch between the two)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _s(v: Any) -> str:
    return v if type(v) is str else ""


def _fields(m: Any) -> tuple[str, list[str]] | None:
    """(role, the fields that say what a message is) of a chat message or Responses input item; None for items
    that are not part of the conversation as both sides repeat it (reasoning, unknown types, non-objects). Fields
    clients add or drop (`refusal: null`, `annotations`, item ids, `status`) are left out."""
    if type(m) is not dict:
        return None
    kind = m.get("type")
    if kind is None or kind == "message":
        role = _s(m.get("role"))
        content = m.get("content")
        out = [role, content if type(content) is str else _text(content), _s(m.get("tool_call_id"))]
        calls = m.get("tool_calls")
        if type(calls) is list:
            for tc in calls:
                fn = tc.get("function") if type(tc) is dict else None
                if type(fn) is not dict:
                    out += ("", "", "") if type(tc) is not dict else (_s(tc.get("id")), "", "")
                    continue
                out += (_s(tc.get("id")), _s(fn.get("name")), _s(fn.get("arguments")))
        return role, out
    if kind in _CALL_ITEMS:
        return "assistant", ["assistant", "", "", _s(m.get("call_id")), _s(m.get("name")),
                             _s(m.get("arguments")) or _s(m.get("input"))]
    if kind in ("function_call_output", "custom_tool_call_output"):
        return "tool", ["tool", _text(m.get("output")), _s(m.get("call_id"))]
    return None


def canonical(m: Any) -> tuple[str, bytes] | None:
    """(role, the message's canonical bytes: its fields' lengths, then the fields), or None for an item that is not
    hashed. The lengths say where each message ends, and moving text from one field to the next changes the bytes.
    Chat messages with text and at most one tool call, most of an agent's, take a shortcut to the same bytes."""
    if type(m) is dict and "type" not in m:
        role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
        content = "" if content is None else content
        if type(role) is str and type(content) is str:
            if not calls:
                tcid = m.get("tool_call_id")
                tcid = tcid if type(tcid) is str else ""
                return role, f"{len(role)},{len(content)},{len(tcid)}\0{role}\0{content}\0{tcid}".encode(
                    "utf-8", "surrogatepass")
            tc = calls[0] if type(calls) is list and len(calls) == 1 else None
            fn = tc.get("function") if type(tc) is dict and "tool_call_id" not in m else None
            if type(fn) is dict:
                i, n, a = tc.get("id"), fn.get("name"), fn.get("arguments")
                if type(i) is str and type(n) is str and type(a) is str:
                    return role, (f"{len(role)},{len(content)},0,{len(i)},{len(n)},{len(a)}"
                                  f"\0{role}\0{content}\0\0{i}\0{n}\0{a}").encode("utf-8", "surrogatepass")
    f = _fields(m)
    if f is None:
        return None
    role, parts = f
    return role, (",".join(map(str, map(len, parts))) + "\0" + "\0".join(parts)).encode("utf-8", "surrogatepass")


def _digest(h: Any) -> bytes:
    """A table key: the running hash's digest, cut to DIGEST_BYTES."""
    return h.digest()[:DIGEST_BYTES]


def prefix_hashes(items: Iterable[Any], start: Any = None) -> tuple[list[bytes], Any]:
    """The keys of a conversation's prefixes that end in an assistant turn (only those can name a workflow):
    prefix i = H(prefix i-1, message i), one running hash over the messages' canonical bytes, each message hashed
    once; and the running hash, which `start` continues (on a copy). SHA-256, cut to 16 bytes
    (hardware-accelerated on CPUs with SHA instructions). Instructions (`system`, `developer`) are not
    part of it: a handoff to another agent swaps them but keeps the conversation."""
    run = start.copy() if start is not None else hashlib.sha256()
    keys: list[bytes] = []
    for m in items:
        c = canonical(m)
        if c is None or c[0] in _SYSTEM_ROLES:
            continue
        run.update(c[1])
        if c[0] == "assistant":
            keys.append(_digest(run.copy()))
    return keys, run


def conversation_items(body: Mapping[str, Any]) -> list[Any] | None:
    """The conversation a request carries: chat `messages`, or the Responses `input` (a string is one user turn)."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        return msgs
    inp = body.get("input")
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    return inp if isinstance(inp, list) else None


def calls_tools(reply: Sequence[Any]) -> bool:
    """The reply asks the client to run a tool (chat `tool_calls`, or a Responses function call item)."""
    for m in reply:
        if isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call") or m.get("type") in _CALL_ITEMS):
            return True
    return False


def offers_tools(body: Mapping[str, Any]) -> bool:
    return bool(body.get("tools") or body.get("functions"))


def _response_key(response_id: str) -> bytes:
    return _digest(hashlib.sha256(b"response\0" + response_id.encode("utf-8", "surrogatepass")))


def session_workflow_id(namespace: str, value: str) -> str:
    """The workflow id a session value names: derived, never the client's text itself."""
    return "session-" + hashlib.sha256(f"{namespace}\0{value}".encode("utf-8", "surrogatepass")).hexdigest()[:24]


# ---- the table ---------------------------------------------------------------------------------------------------
class WorkflowIdentity:
    """Resolves each call's workflow and records each answer; bounded by `max_entries` keys (prefix hashes and
    response ids, one LRU) plus `max_entries` live workflows (last seen, for the idle timeout), O(1) amortised per
    call beyond hashing the request once."""

    def __init__(self, cfg: IdentityConfig, pool: BackendPool, run_id: str) -> None:
        self.cfg, self.pool, self.run_id = cfg, pool, run_id
        self._keys: OrderedDict[bytes, tuple[str, int]] = OrderedDict()  # prefix / response key -> (workflow, stage)
        self._live: OrderedDict[str, float] = OrderedDict()  # workflow -> when it was last seen, oldest first
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._keys)

    # ---- who is calling ----------------------------------------------------------------------------------------
    def resolve(self, body: Mapping[str, Any], headers: Mapping[str, str], hints: WorkflowHints,
                now: float) -> Identity:
        """The call's workflow and stage: hints > session > previous_response_id > conversation > new. `body` and
        `headers` passed the edge (edge.check_session)."""
        self._expire(now)
        ident = self._explicit(body, headers, hints)
        if ident is None:
            ident = self._inferred(body)
        self._touch(ident.workflow_id, now)
        return ident

    def _stages(self, wid: str) -> int:
        st = self.pool.workflows.peek(wid)
        return st.stages if st is not None else 0

    def _explicit(self, body: Mapping[str, Any], headers: Mapping[str, str],
                  hints: WorkflowHints) -> Identity | None:
        if hints.workflow_id:
            return Identity(hints.workflow_id, self._stages(hints.workflow_id), IdentitySource.HINT)
        for name in self.cfg.session_headers:
            value = headers.get(name)
            if value:
                wid = session_workflow_id("header", value)
                return Identity(wid, self._stages(wid), IdentitySource.SESSION)
        prev = body.get("previous_response_id")
        if isinstance(prev, str) and prev:
            hit = self._live_hit(_response_key(prev))
            if hit is not None:
                return Identity(hit[0], hit[1] + 1, IdentitySource.PREVIOUS_RESPONSE)
        for name in self.cfg.session_fields:
            value = body.get(name)
            if isinstance(value, str) and value:
                wid = session_workflow_id(name, value)
                return Identity(wid, self._stages(wid), IdentitySource.SESSION)
        return None

    def _inferred(self, body: Mapping[str, Any]) -> Identity:
        items = conversation_items(body) if self.cfg.conversation else None
        if not items:
            return Identity(self._new_id(), 0, IdentitySource.NEW)
        keys, chain = prefix_hashes(items)
        for key in reversed(keys):  # the longest recorded prefix names the workflow
            if key in self._keys:
                hit = self._live_hit(key)
                if hit is None:  # that workflow ended: this conversation starts a new one
                    break
                return Identity(hit[0], hit[1] + 1, IdentitySource.CONVERSATION, chain)
        return Identity(self._new_id(), 0, IdentitySource.NEW, chain)

    def _new_id(self) -> str:
        return f"wf-{self.run_id}-{next(self._ids)}"

    def _live_hit(self, key: bytes) -> tuple[str, int] | None:
        """The (workflow, stage) a key names, refreshed in the LRU, if that workflow has not ended."""
        hit = self._keys.get(key)
        if hit is None:
            return None
        self._keys.move_to_end(key)
        return hit if hit[0] in self._live else None

    # ---- what was answered -------------------------------------------------------------------------------------
    def answered(self, identity: Identity, reply: list[dict[str, Any]] | None, response_id: str | None,
                 offered_tools: bool, now: float) -> None:
        """Record an answered call: its response id, and (for an inferred workflow) the conversation it now is,
        request + reply, as the key its next stage will carry. With `end_on_final_answer`, a reply without tool
        calls to a request that offered tools ends an inferred workflow (a session or hinted one goes on)."""
        wid, stage = identity.workflow_id, identity.stage
        if isinstance(response_id, str) and response_id:
            self._put(_response_key(response_id), (wid, stage))
        if reply is None:
            return
        inferred = identity.source not in (IdentitySource.HINT, IdentitySource.SESSION)
        if inferred and offered_tools and self.cfg.end_on_final_answer and not calls_tools(reply):
            self.end(wid, now)
            return
        if identity.chain is not None and wid in self._live:
            _, chain = prefix_hashes(reply, identity.chain)
            self._put(_digest(chain), (wid, stage))
        if wid in self._live:
            self._touch(wid, now)

    def workflow_of_response(self, response_id: str) -> str | None:
        """The workflow an answer the gateway served belongs to (ended or not), while the table remembers it."""
        hit = self._keys.get(_response_key(response_id))
        return hit[0] if hit is not None else None

    def end(self, wid: str, now: float) -> None:
        """The workflow is over: the pool forgets it, and a conversation continuing it starts a new one."""
        self._live.pop(wid, None)
        self.pool.end_workflow(wid, now)

    # ---- bounds ------------------------------------------------------------------------------------------------
    def _put(self, key: bytes, value: tuple[str, int]) -> None:
        self._keys[key] = value
        self._keys.move_to_end(key)
        if len(self._keys) > self.cfg.max_entries:
            self._keys.popitem(last=False)

    def _touch(self, wid: str, now: float) -> None:
        self._live[wid] = now
        self._live.move_to_end(wid)
        if len(self._live) > self.cfg.max_entries:
            old, _ = self._live.popitem(last=False)
            self.pool.end_workflow(old, now)

    def _expire(self, now: float) -> None:
        """End the workflows idle for `idle_timeout_s`: the oldest first, each once (O(1) amortised)."""
        idle = self.cfg.idle_timeout_s
        if idle is None:
            return
        while self._live:
            wid, seen = next(iter(self._live.items()))
            if now - seen < idle:
                return
            self.end(wid, now)
