"""Backend kinds are plugins: a new kind is one file with one registration line, its parameters typed and checked when
the gateway config is loaded, and the gateway sends its servers the body the kind builds."""

from __future__ import annotations

import importlib
import sys
import textwrap

import httpx
import pytest

from chimera.backends.kinds import BACKEND_KINDS
from chimera.serve import build_gateway
from chimera.serve.config import GatewayConfigError, gateway_config_from_dict
from upstreams import Served, fake_upstream

TOY = textwrap.dedent('''
    """A toy server that reads the policy's order from `x_rank`, scaled."""
    from chimera.backends.kinds import BackendKind, register_backend_kind


    @register_backend_kind("toy")
    class ToyBackend(BackendKind):
        class Params(BackendKind.Params):
            scale: float = 1.0

        def request_body(self, body, model, priority):
            out = super().request_body(body, model, priority)
            out["x_rank"] = priority * self.params.scale
            return out
''')


@pytest.fixture
def toy_kind(tmp_path, monkeypatch):
    (tmp_path / "toy_kind.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_kind")
    yield "toy"
    BACKEND_KINDS.unregister("toy")
    sys.modules.pop("toy_kind", None)


def _config(tmp_path, backend: dict) -> dict:
    return {"trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False}, "policy": {"name": "vllm"},
            "backends": [{"name": "b0", "model": "m", "base_url": "http://127.0.0.1:9/v1", **backend}]}


def test_a_new_backend_kind_is_one_file_and_one_registration_line(tmp_path, toy_kind):
    up = Served(fake_upstream("up"))
    try:
        cfg = gateway_config_from_dict(_config(tmp_path, {"base_url": up.url + "/v1", "kind": "toy", "scale": 2.0}))
        gw = Served(build_gateway(cfg))
        try:
            r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": 7})
            assert r.status_code == 200, r.text
        finally:
            gw.stop()
        sent = up.app.state.hits[-1]
        assert sent["model"] == "m" and "x_rank" in sent and "priority" not in sent  # the kind's body, not the client's
    finally:
        up.stop()


@pytest.mark.parametrize(("backend", "message"), [
    ({"kind": "toy", "bogus": 1}, "backend kind 'toy' has no parameter 'bogus' (it takes: scale)"),
    ({"kind": "toy", "scale": "fast"}, "backend kind 'toy' parameter 'scale'"),
    ({"kind": "openai", "priority": True}, "backend kind 'openai' has no parameter 'priority' (it takes: none)"),
    ({"kind": "sglang"}, "unknown backend kind 'sglang'; choose one of: openai, vllm, toy"),
])
def test_kind_parameters_are_checked_at_load_naming_the_key(tmp_path, toy_kind, backend, message):
    with pytest.raises(GatewayConfigError, match="key 'backends.0'") as e:
        gateway_config_from_dict(_config(tmp_path, backend))
    assert message in str(e.value)


def test_vllm_is_the_default_kind_and_forwards_priority_only_when_asked():
    from chimera.backends.kinds import make_backend_kind

    plain, prio = make_backend_kind("vllm"), make_backend_kind("vllm", priority=True)
    body = {"model": "chimera", "messages": [], "stream": True, "priority": 3, "chimera": {"stage": 1}}
    assert plain.request_body(body, "m", 41.6) == {"model": "m", "messages": [], "stream": True,
                                                  "stream_options": {"include_usage": True}}
    assert prio.request_body(body, "m", 41.6)["priority"] == 42
    assert make_backend_kind("openai").load_gauges("vllm:num_requests_waiting 3\n") == {}
    assert gateway_config_from_dict({"backends": [{"name": "a", "model": "m", "base_url": "http://x"}]}
                                    ).backends[0].kind == "vllm"
