"""Tool calls in emulated answers: which function tool a request offers, and arguments that fit its JSON schema
(required properties filled with simple placeholders by type), padded to the stage's planned length."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from chimera.emulate.api import ApiError

PLACEHOLDER = {"string": "placeholder", "integer": 0, "number": 0, "boolean": False, "null": None}
_MAX_DEPTH = 8  # recursive schemas ($ref cycles) stop here


@dataclass(frozen=True)
class Tool:
    """A function tool offered by the request, and whether the request forces a tool call."""

    name: str
    parameters: dict[str, Any]
    required: bool  # tool_choice "required" or a named function: call it even on the last stage


@dataclass(frozen=True)
class ToolCall:
    """One emulated call: `arguments` is the JSON text the answer's pieces spell."""

    name: str
    call_id: str
    arguments: str


def offered_tool(body: dict[str, Any], chat: bool) -> Tool | None:
    """The tool an answer may call: the one `tool_choice` names, else the first function tool (None when the request
    offers none or says `tool_choice: "none"`). `chat`: Chat Completions shapes ({type, function: {name, ...}}),
    else Responses shapes ({type, name, parameters})."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "field 'tools' must be a list of tool objects", param="tools")
    functions: list[tuple[str, dict[str, Any]]] = []
    for t in tools:
        if t.get("type", "function") != "function":
            continue  # hosted tools (web search, ...) are never called by the emulator
        spec = t.get("function") if chat else t
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ApiError(400, "each function tool in 'tools' needs a 'name'" + (" under 'function'" if chat else ""),
                           param="tools")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(400, f"tool {spec['name']!r}: 'parameters' must be a JSON schema object", param="tools")
        functions.append((spec["name"], params))
    choice = body.get("tool_choice", "auto")
    if choice in (None, "auto", "required", "none"):
        if choice == "none" or not functions:
            return None
        return Tool(*functions[0], required=choice == "required")
    named = (choice.get("function") if chat else choice) if isinstance(choice, dict) else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "field 'tool_choice' must be 'none', 'auto', 'required' or name a function",
                       param="tool_choice")
    for fname, params in functions:
        if fname == name:
            return Tool(fname, params, required=True)
    raise ApiError(400, f"tool_choice names {name!r}, which is not among the function tools", param="tool_choice")


def placeholder(schema: Any, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A simple value valid for `schema`: its const/enum/default, else a placeholder of its type, objects with
    every required property filled (local `$ref`s into `$defs`/`definitions` resolved)."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return placeholder(target, root, depth + 1)
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            options = [o for o in schema[key] if not (isinstance(o, dict) and o.get("type") == "null")]
            return placeholder((options or schema[key])[0], root, depth + 1)
    typ = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if typ == "object":
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        return {k: placeholder(props.get(k, {}), root, depth + 1) for k in schema.get("required") or []
                if isinstance(k, str)}
    if typ == "array":
        n = schema.get("minItems", 0)
        return [placeholder(schema.get("items", {}), root, depth + 1) for _ in range(n if isinstance(n, int) else 0)]
    lo = schema.get("minimum")
    if typ in ("integer", "number") and isinstance(lo, (int, float)) and lo > 0:
        return math.ceil(lo) if typ == "integer" else lo
    n = schema.get("minLength")
    if typ == "string" and isinstance(n, int) and n > len(PLACEHOLDER["string"]):
        return "x" * n
    return PLACEHOLDER.get(typ) if isinstance(typ, str) else None


def tool_call(tool: Tool, length: int) -> ToolCall:
    """A call of `tool` whose arguments text has at least `length` characters (JSON whitespace after the opening
    brace), so that it cuts into `length` non-empty pieces, one per planned token."""
    args = json.dumps(placeholder(tool.parameters) if tool.parameters else {}, separators=(",", ":"))
    if not args.startswith("{"):  # a schema that is not an object: the arguments are still an object
        args = "{}"
    if len(args) < length:
        args = "{" + " " * (length - len(args)) + args[1:]
    return ToolCall(tool.name, f"call_{uuid.uuid4().hex[:24]}", args)
