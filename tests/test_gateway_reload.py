"""Predictors reloaded without a restart: the admin endpoint and SIGHUP, a bad folder refused with the old predictors
kept, calls in flight unaffected under load, every trace row naming the predictor version it was decided with."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time

import httpx
import pytest

from chimera.bench.gateway_process import gateway_process
from chimera.serve.config import gateway_config_from_dict
from chimera.util.threaded import free_port
from upstreams import Served, fake_upstream, gateway_over

ADMIN = {"authorization": "Bearer admin-key"}
CLIENT = {"authorization": "Bearer client-key"}
MODELS = ("qwen2.5-1.5b", "qwen2.5-14b")  # names the synthetic predictors were trained on
MSG = [{"role": "user", "content": "What is 17 * 23? Show the steps."}]


@pytest.fixture
def folder(tmp_path, synthetic_predictors):
    """A copy of the trained predictors the gateway reloads from (a test may spoil and restore it)."""
    return shutil.copytree(synthetic_predictors, tmp_path / "predictors")


def _raw(tmp_path, folder, up_url: str, max_inflight: int = 8, **cfg) -> dict:
    return {"trace_store": str(tmp_path / "t.sqlite"), "predictors": str(folder), "health": {"enabled": False},
            "auth": {"api_keys": ["client-key"], "admin_keys": ["admin-key"]},
            "limits": {"max_queue": 1000},
            "backends": [{"name": f"b{i}", "model": m, "base_url": up_url + "/v1", "max_inflight": max_inflight}
                         for i, m in enumerate(MODELS)], **cfg}


def gateway(tmp_path, folder, delay: float = 0.0, max_inflight: int = 8, **cfg):
    return gateway_over([fake_upstream("up", delay=delay, words=5)],
                        lambda urls: _raw(tmp_path, folder, urls[0], max_inflight, **cfg))


def spoil(folder) -> bytes:
    """Truncate the router's file (its checksum no longer matches the manifest); returns the bytes to restore."""
    f = folder / "router.joblib"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    return good


def reload(url: str, headers=ADMIN) -> httpx.Response:
    return httpx.post(url + "/v1/chimera/admin/reload", headers=headers, timeout=60)


def test_reload_endpoint_swaps_or_refuses_and_keeps_the_old_predictors(tmp_path, folder):
    with gateway(tmp_path, folder) as (url, gw):
        v1 = gw.pool.predictor_version
        assert v1.startswith("1:") and len(v1) > 4
        before = (gw.policy.confidence, gw.policy.length)
        assert reload(url, headers={}).status_code == 401
        assert reload(url, headers=CLIENT).status_code == 401  # admin keys are set: a client key is not enough
        r = reload(url)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] and body["previous"] == v1 and body["version"].startswith("2:")
        assert body["version"].split(":")[1] == v1.split(":")[1]  # the same content: the same digest
        assert gw.policy.confidence is not before[0] and gw.policy.length is not before[1]
        in_use = (gw.policy.confidence, gw.policy.length)

        good = spoil(folder)
        r = reload(url)
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload_refused"
        assert "router.joblib" in r.json()["error"]["message"] and "checksum" in r.json()["error"]["message"]
        assert (gw.policy.confidence, gw.policy.length) == in_use and gw.pool.predictor_version == body["version"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "chimera", "messages": MSG}, headers=CLIENT)
        assert r.status_code == 200  # still routing, with the predictors kept

        (folder / "router.joblib").write_bytes(good)
        r = reload(url)
        assert r.status_code == 200 and r.json()["version"].startswith("3:")
        text = httpx.get(url + "/metrics", headers=ADMIN).text
        assert 'chimera_reloads_total{result="ok"} 2.0' in text
        assert 'chimera_reloads_total{result="refused"} 1.0' in text
        assert f'chimera_predictors_info{{version="{r.json()["version"]}"}} 1.0' in text


def test_a_gateway_without_a_predictors_folder_has_nothing_to_reload(tmp_path):
    with gateway_over([fake_upstream("up")], lambda urls: {
            "trace_store": str(tmp_path / "t.sqlite"), "health": {"enabled": False},
            "backends": [{"name": "a", "model": "m", "base_url": urls[0] + "/v1"}]}) as (url, gw):
        r = reload(url, headers={})  # no keys configured: open, as /metrics is
        assert r.status_code == 409 and "predictors" in r.json()["error"]["message"]
        assert gw.pool.predictor_version == "1"


def test_reload_keeps_what_the_online_learner_learnt_and_replaces_its_prior(tmp_path, folder):
    with gateway(tmp_path, folder, learning={"online": True}) as (url, gw):
        learner = gw.policy.confidence
        old_prior = learner.prior
        r = httpx.post(url + "/v1/chat/completions", headers=CLIENT,
                       json={"model": "chimera", "messages": MSG, "chimera": {"workflow_id": "wf-1"}})
        assert r.status_code == 200
        r = httpx.post(url + "/v1/chimera/feedback", headers=CLIENT, json={"workflow_id": "wf-1", "score": 1.0})
        assert r.json()["outcome"] == "learnt"
        coef = learner.coef_.copy()
        assert reload(url).status_code == 200
        assert gw.policy.confidence is learner and learner.prior is not old_prior
        assert learner.stats()["learnt"] == 1 and (learner.coef_ == coef).all()
        assert learner.version_ == gw.pool.predictor_version and learner.version_.startswith("2:")
        r = httpx.post(url + "/v1/chimera/feedback", headers=CLIENT, json={"workflow_id": "wf-1", "score": 0.0})
        assert r.status_code == 409  # learnt once, before and after the reload


def test_live_length_calibration_wraps_the_reloaded_forest(tmp_path, folder):
    """With `live.lengths` the forest in use is wrapped for calibration; a reload installs the new forest, and the
    next refit wraps that one (calibration starts afresh), never the old."""
    from chimera.predict.calibrated import CalibratedLengths

    def wrapped(gw, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while not isinstance(gw.policy.length, CalibratedLengths) and time.monotonic() < deadline:
            time.sleep(0.05)
        return gw.policy.length

    with gateway(tmp_path, folder, live={"speeds": False, "lengths": {"refresh_s": 0.2}}) as (url, gw):
        first = wrapped(gw)
        assert isinstance(first, CalibratedLengths)
        assert reload(url).status_code == 200
        second = wrapped(gw)
        assert isinstance(second, CalibratedLengths) and second is not first and second.base is not first.base
        r = httpx.post(url + "/v1/chat/completions", json={"model": "chimera", "messages": MSG}, headers=CLIENT)
        assert r.status_code == 200


def test_reloads_under_load_fail_no_request_and_rows_name_their_version(tmp_path, folder):
    """200 concurrent streaming calls (most of them queued) while the predictors are reloaded 5 times, the third time
    from a spoiled folder: every call answers 200 with its whole stream, the refused reload changes nothing, and
    the trace rows carry the versions they were decided with."""
    with gateway(tmp_path, folder, delay=0.05, max_inflight=2) as (url, gw):  # 4 at a time: a queue builds up
        recorded: list[str | None] = []  # each settled attempt's version, as the trace writer is handed it
        record = gw.director.recorder.record
        gw.director.recorder.record = lambda ctx, now: (recorded.append(ctx.predictor_version), record(ctx, now))

        async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str]:
            await asyncio.sleep(0.01 * i)  # arrivals spread over the reloads
            body = {"model": "chimera", "messages": MSG, "stream": True, "chimera": {"workflow_id": f"wf-{i}"}}
            async with c.stream("POST", url + "/v1/chat/completions", json=body, headers=CLIENT) as r:
                return r.status_code, "".join([line async for line in r.aiter_lines()])

        async def reloads(c: httpx.AsyncClient) -> list[httpx.Response]:
            out = []
            for k in range(5):
                await asyncio.sleep(0.3)
                held.append((gw.pool.waiting_total, sum(gw.pool.inflight.values())))  # read across threads: ints
                good = spoil(folder) if k == 2 else None
                out.append(await c.post(url + "/v1/chimera/admin/reload", headers=ADMIN, timeout=60))
                if good is not None:
                    (folder / "router.joblib").write_bytes(good)
            return out

        async def run():
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                return await asyncio.gather(asyncio.gather(*[one(c, i) for i in range(200)]), reloads(c))

        held: list[tuple[int, int]] = []  # (queued, running) calls as each reload was asked for
        answers, reloaded = asyncio.run(run())
        assert any(q > 0 and r > 0 for q, r in held), held
        assert [r.status_code for r in reloaded] == [200, 200, 409, 200, 200]
        assert all(status == 200 for status, _ in answers), [s for s, _ in answers if s != 200]
        assert all(text.endswith("data: [DONE]") and '"error"' not in text for _, text in answers)
        rows = gw.trace.query("SELECT * FROM calls")
        assert len(rows) == len(recorded) == 200 and {r["status"] for r in rows} == {"ok"}
        loaded = {reloaded[0].json()["previous"]} | {reloaded[k].json()["version"] for k in (0, 1, 3, 4)}
        assert len(set(recorded)) >= 3 and set(recorded) <= loaded, (set(recorded), loaded)
        assert sorted(r["predictor_version"] for r in rows) == sorted(recorded)  # the trace column says the same
        assert gw.pool.holds_nothing()


def test_sighup_reloads_a_gateway_process(tmp_path, folder):
    up = Served(fake_upstream("up"))
    try:
        cfg = gateway_config_from_dict({**_raw(tmp_path, folder, up.url), "listen": {"port": free_port()}})
        with gateway_process(cfg, tmp_path / "gw", timeout_s=60) as sp:
            def metrics() -> str:
                return httpx.get(sp.url + "/metrics", headers=ADMIN, timeout=5).text

            assert 'chimera_predictors_info{version="1:' in metrics()
            os.kill(sp.pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            while 'chimera_reloads_total{result="ok"} 1.0' not in metrics() and time.monotonic() < deadline:
                time.sleep(0.1)
            text = metrics()
            assert 'chimera_reloads_total{result="ok"} 1.0' in text and 'chimera_predictors_info{version="2:' in text
            r = httpx.post(sp.url + "/v1/chat/completions", json={"model": "chimera", "messages": MSG},
                           headers=CLIENT, timeout=20)
            assert r.status_code == 200  # still serving
        log = (tmp_path / "gw" / "gateway.log").read_text()
        assert '"event": "reload", "source": "SIGHUP", "ok": true' in log
    finally:
        up.stop()
