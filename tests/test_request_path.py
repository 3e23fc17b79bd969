"""A call's life is one path that only goes down: one streaming call through a live gateway, traced function by
function, climbs back up (a function called from a module that the callee's own module imports: a callback) only
through the hooks the design hands down as values — the admission core's place/start/release hooks into the
backend pool, the HTTP stream's close hook into the director, and a policy's own overrides. Run with `-s` to print
the files the call enters (docs/architecture.md quotes them)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import httpx

from chimera.serve import build_gateway
from chimera.serve.config import gateway_config_from_dict
from upstreams import Served, fake_upstream

SRC = Path(__file__).resolve().parents[1] / "src" / "chimera"
ALLOWED_UP = {  # (caller module, callee module): hooks handed down as values, and overrides
    ("sched/admission.py", "serve/pool.py"),  # the core's replica-choice, start and release hooks
    ("serve/proxy.py", "serve/director.py"),  # the HTTP stream's close hook (the body iterator may never start)
    ("sched/policy.py", "sched/policies/chimera.py"),  # a policy's overrides of choose/key
}


def _module_imports() -> dict[str, set[str]]:
    """chimera module file -> the chimera module files it imports (a package import counts its __init__)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chimera"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("chimera")]
            for name in names:
                base = name.removeprefix("chimera").lstrip(".").replace(".", "/")
                out |= {c for c in (f"{base}.py", f"{base}/__init__.py") if (SRC / c).is_file()}
        graph[str(path.relative_to(SRC))] = out
    return graph


def _above(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """module -> every module it imports, directly or not (those it sits above)."""
    out = {}
    for m in graph:
        seen, todo = set(), [m]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        out[m] = seen
    return out


def _rel(filename: str) -> str | None:
    return filename.split("/src/chimera/", 1)[1] if "/src/chimera/" in filename else None


def test_a_streaming_call_climbs_back_up_only_through_the_hooks_handed_down(tmp_path):
    above = _above(_module_imports())
    entered: list[str] = []
    from_below: list[str] = []  # entries into serve/app.py from another chimera module
    upward: set[tuple[str, str, str]] = set()
    tracing = threading.Event()

    def tracer(frame, event, arg):
        if event != "call" or not tracing.is_set():
            return None
        callee = _rel(frame.f_code.co_filename)
        if callee is None:
            return None
        entered.append(callee)
        caller = _rel(frame.f_back.f_code.co_filename) if frame.f_back else None
        if caller and caller != callee and caller in above.get(callee, ()):
            upward.add((caller, callee, frame.f_code.co_name))
        if caller and caller != callee and callee == "serve/app.py":
            from_below.append(f"{caller} -> {frame.f_code.co_name}")
        return None

    threading.settrace(tracer)  # the servers' threads start after this: they are traced too
    try:
        up = Served(fake_upstream("up"))
        cfg = gateway_config_from_dict({
            "trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False}, "policy": {"name": "chimera"},
            "backends": [{"name": "a", "model": "m", "base_url": up.url + "/v1"},
                         {"name": "b", "model": "n", "base_url": up.url + "/v1"}]})
        gw = Served(build_gateway(cfg))
        body = {"model": "chimera", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        try:
            assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200  # warm
            tracing.set()
            r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
            tracing.clear()
        finally:
            gw.stop()
            up.stop()
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
    assert r.status_code == 200 and "[DONE]" in r.text
    files = sorted(set(entered))
    print(f"\n{len(files)} files entered by one streaming call:", ", ".join(files))
    print("calls that climb back up:", sorted(upward))
    assert {"serve/app.py", "serve/director.py", "serve/pool.py", "sched/admission.py", "serve/relay.py"} <= set(files)
    assert {(a, b) for a, b, _ in upward} <= ALLOWED_UP, sorted(upward)
    assert from_below == [], from_below  # nothing below the endpoints calls back into them
