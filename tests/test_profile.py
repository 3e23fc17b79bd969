"""`chimera profile`: the fit (pure), the wave analysis, profile files in cluster files, and a live profile of an
emulated backend (a subprocess on 127.0.0.1, stopped at the end) whose fitted TPOT must match the emulator's own
engine model within 15% at concurrency 1, 8 and 32."""

from __future__ import annotations

import asyncio
import math
import random
import re
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from chimera.util.procs import chimera_cmd, spawned
from chimera.cli import app
from chimera.profiling.fit import (
    DecodePoint,
    PrefillPoint,
    SeqTrace,
    analyze_wave,
    decode_point,
    estimate_max_num_seqs,
    fit_rows,
    fit_step_model,
    poorly_fitted,
    with_engine_tpot,
)
from chimera.perfmodel.perf import StepTimeModel
from chimera.perfmodel.profiles import (
    ClusterError,
    FittedModelSpec,
    cluster_from_dict,
    load_cluster,
    load_profile_file,
    profile,
)
from chimera.profiling.client import ProfileConfig, Profiler
from chimera.profiling.metrics import engine_tpot, read_scrape
from chimera.util.threaded import free_port
from chimera.sim.cluster import build_runtimes

EMU_PROFILE = "qwen2.5-7b@a6000"
TOL = 0.15
runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ---- the fit (pure) --------------------------------------------------------------------------------------------
def _points(m: StepTimeModel, noise: float = 0.0, seed: int = 0) -> tuple[list[DecodePoint], list[PrefillPoint]]:
    rng = random.Random(seed)
    dec = []
    for label, prompt, levels in (("decode", 32, (1, 2, 4, 8, 16, 32)), ("decode-long", 1024, (1, 8))):
        for c in levels:
            ctx = c * (prompt + 32)
            t = m.step_time(c, ctx, 0) * (1 + rng.gauss(0, noise))
            dec.append(DecodePoint(label, c, c, ctx, t, t, t, c / t, 0.0, 2, False, prompt, 64))
    pre = [PrefillPoint(p, 0.004 + m.prefill_time(p), 0, 0, 2) for p in (16, 64, 256, 512, 1024, 1536)]
    return dec, pre


@pytest.mark.parametrize("key", ["qwen2.5-7b@a6000", "llama-3.1-8b@h100", "qwen2.5-1.5b@a100-80gb"])
def test_fit_recovers_a_roofline_engine(key: str) -> None:
    m = StepTimeModel(profile(key))
    dec, pre = _points(m, noise=0.02)
    fit = fit_step_model(dec, pre, m.max_num_batched_tokens)
    rows = fit_rows(fit, dec, pre)
    assert not poorly_fitted(rows, 0.06)
    assert all(abs(r.error) < 0.06 for r in rows)
    assert fit.per_token_s == pytest.approx(m._t_flop_tok, rel=0.1)  # the prefill slope is the FLOP cost
    assert fit.request_overhead_s == pytest.approx(0.004, abs=0.002)


def test_fit_of_a_cpu_like_server_needs_the_per_sequence_term() -> None:
    """Steps that grow by a fixed cost per sequence while prefill tokens are cheap (a CPU server)."""
    def step(n: float, ctx: float, p: float) -> float:
        return 2e-3 + 0.45e-3 * n + 20e-6 * p + 5e-8 * ctx
    dec = [DecodePoint("decode", c, c, c * 64, step(c, c * 64, 0), 0, 0, 0, 0, 1, False, 32, 64)
           for c in (1, 2, 4, 8, 16, 32)]
    dec.append(DecodePoint("decode-long", 8, 8, 8 * 1050, step(8, 8 * 1050, 0), 0, 0, 0, 0, 1, False, 1024, 64))
    pre = [PrefillPoint(p, 0.003 + step(0, 0, p), 0, 0, 1) for p in (16, 256, 1024, 1536)]
    fit = fit_step_model(dec, pre, 2048)
    assert all(abs(r.error) < 0.02 for r in fit_rows(fit, dec, pre))
    assert fit.per_seq_s == pytest.approx(0.45e-3 - fit.per_token_s, rel=0.05)


def test_fit_needs_decode_points() -> None:
    with pytest.raises(ValueError, match="decode point"):
        fit_step_model([], [PrefillPoint(16, 0.01, 0, 0, 1)])


# ---- wave analysis (pure) --------------------------------------------------------------------------------------
def _trace(sent: float, first: float, tau: float, n: int, prompt: int = 30, burst: int = 1) -> SeqTrace:
    times, toks = [], []
    for k in range(1, n + 1):  # token k made at first + (k-1)·tau, seen at the end of its burst
        made = first + (k - 1) * tau
        seen = made if k == 1 or burst == 1 else first + (min(n, math.ceil((k - 1) / burst) * burst)) * tau
        times.append(seen)
        toks.append(k)
    return SeqTrace(sent, times, toks, prompt, n)


def test_wave_steady_window_ignores_staggered_starts_and_bursts() -> None:
    tau = 0.02
    seqs = [_trace(0.0, 0.03 + 0.01 * i, tau, 64, burst=4) for i in range(8)]
    w = analyze_wave(seqs, 8)
    assert w.tpot_s == pytest.approx(tau, rel=0.01)
    assert w.n == pytest.approx(8) and not w.queued and w.first_batch == 8
    assert 8 * 30 < w.ctx_tokens < 8 * (30 + 64)


def test_wave_with_a_short_request_keeps_its_window() -> None:
    """A server that ignores ignore_eos stops one request early: the window is not cut, the batch shrinks."""
    seqs = [_trace(0.0, 0.03, 0.02, 64) for _ in range(3)] + [_trace(0.0, 0.03, 0.02, 16)]
    w = analyze_wave(seqs, 4)
    assert w.tpot_s == pytest.approx(0.02, rel=0.01)
    assert 3.0 < w.n < 3.5


def test_wave_detects_queueing() -> None:
    """Batch limit 4, 8 requests: the second four start only when the first four finish."""
    first = [_trace(0.0, 0.03, 0.02, 32) for _ in range(4)]
    end = first[0].times[-1]
    later = [_trace(0.0, end + 0.03, 0.02, 32) for _ in range(4)]
    w = analyze_wave(first + later, 8)
    assert w.queued and w.first_batch == 4 and w.n == pytest.approx(4)
    assert estimate_max_num_seqs([w]) == 4
    assert estimate_max_num_seqs([analyze_wave(first, 4)]) is None


def test_wave_flags_buffered_streams() -> None:
    """A starved server delivers a whole response at once: no TPOT can be read from it, the wave is unsteady."""
    seqs = [SeqTrace(0.0, [0.32 + 1e-5 * k for k in range(64)], list(range(1, 65)), 30, 64) for _ in range(4)]
    w = analyze_wave(seqs, 4, prefill_s=0.005)
    assert not w.steady and "one burst" in w.unsteady_reason
    assert w.method == "makespan" and w.n == 4 and w.tpot_s == pytest.approx((0.32 + 63e-5 - 0.005) / 63)


def test_metrics_parse_vllm_names() -> None:
    text = """# HELP vllm:num_requests_running x
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="8192",kv_cache_size_tokens="None"} 1.0
"""
    s = read_scrape(text, "m", 1.0)
    assert (s.running, s.waiting, s.kv_usage, s.kv_capacity_tokens) == (3.0, 1.0, 0.25, 8192 * 128)


def test_metrics_engine_tpot_from_the_inter_token_histogram() -> None:
    """The engine's own TPOT over a wave: Δsum / Δcount of vllm:inter_token_latency_seconds; None when the scrape
    raced the last outputs (too few intervals) or the server does not export it."""
    def scrape(total: float, count: float) -> str:
        return (f'vllm:inter_token_latency_seconds_sum{{engine="0",model_name="m"}} {total}\n'
                f'vllm:inter_token_latency_seconds_count{{engine="0",model_name="m"}} {count}\n'
                f'vllm:inter_token_latency_seconds_sum{{engine="0",model_name="other"}} 99.0\n')
    a, b = read_scrape(scrape(1.0, 100), "m"), read_scrape(scrape(1.0 + 8 * 63 * 0.005, 100 + 8 * 63), "m")
    assert (a.itl_sum_s, a.itl_count) == (1.0, 100)
    assert engine_tpot(a, b, 8 * 63 * 0.98) == pytest.approx(0.005)
    assert engine_tpot(a, b, 8 * 63 + 10) is None  # the scrape ran ahead of the engine's stats
    assert engine_tpot(read_scrape("vllm:num_requests_running 1\n", "m"), b, 1) is None


def test_engine_tpot_replaces_a_bursty_waves_makespan() -> None:
    """A starved API server delivers in one burst: the streams give only a makespan; the engine's TPOT wins and
    the batch is the requests sent; the streams' figure is kept beside it."""
    seqs = [SeqTrace(0.0, [0.32 + 1e-5 * k for k in range(64)], list(range(1, 65)), 30, 64) for _ in range(4)]
    w = analyze_wave(seqs, 4, prefill_s=0.005)
    e = with_engine_tpot(w, 0.003)
    assert (e.tpot_s, e.method, e.steady, e.n) == (0.003, "engine", True, 4.0)
    assert e.client_tpot_s == w.tpot_s and e.unsteady_reason == ""
    assert decode_point([e, with_engine_tpot(w, 0.005), with_engine_tpot(w, 0.004)]).tpot_s == 0.004


# ---- profile files in cluster files ----------------------------------------------------------------------------
FITTED = {"fixed_s": 0.002, "weights_s": 0.001, "per_token_s": 2e-5, "per_seq_s": 4e-4,
          "per_context_token_s": 5e-8, "kv_capacity_tokens": 100000, "max_model_len": 2048}


def _write_profile(path: Path, **extra: object) -> Path:
    doc = {"chimera_profile": 1, "name": "cpu-tiny", "gpu": "xeon-1core", "max_num_seqs": 128,
           "max_num_batched_tokens": 2048, "fitted": dict(FITTED), "fit_report": {"points": []},
           "measurements": {"anything": 1}, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_profile_file_in_a_cluster(tmp_path: Path) -> None:
    _write_profile(tmp_path / "tiny.yaml")
    (tmp_path / "cluster.yaml").write_text(
        "models:\n  - {profile_file: tiny.yaml, name: a, replicas: 2, workload_model: qwen2.5-1.5b}\n"
        "  - {profile_file: tiny.yaml, name: b, fitted: {kv_capacity_tokens: 5000}}\n"
        "  - {profile: qwen2.5-7b@a6000}\n")
    cl = load_cluster(tmp_path / "cluster.yaml")
    a, b, q = cl.models
    assert isinstance(a, FittedModelSpec) and a.replicas == 2 and a.max_num_seqs == 128 and a.gpu == "xeon-1core"
    assert b.kv_capacity_tokens == 5000 and a.kv_capacity_tokens == 100000
    m = StepTimeModel(a)
    assert m.step_time(8, 8000, 0) == pytest.approx(0.002 + math.hypot(0.001, 8 * 2e-5) + 8 * 4e-4 + 8000 * 5e-8)
    assert m.prefill_time(3000) == pytest.approx(m.step_time(0, 0, 2048) + m.step_time(0, 0, 952))
    assert m.kv_capacity_tokens == 100000 and m.max_num_batched_tokens == 2048
    assert StepTimeModel(q).step_time(8, 8000, 0) == StepTimeModel(profile("qwen2.5-7b@a6000")).step_time(8, 8000, 0)
    rts = build_runtimes(cl)  # no parameter count: sizes ranked by batch-1 step time
    assert [r.info.size_rank for r in rts] == [0, 1, 2]
    assert profile(str(tmp_path / "tiny.yaml")) == load_profile_file(tmp_path / "tiny.yaml")


def test_simulator_adds_a_profiled_servers_request_overhead(tmp_path: Path) -> None:
    """A measured server's per-request overhead (HTTP, tokenising: `request_overhead_s`) is part of every call's
    latency in the simulator; alone in the cluster, each call costs exactly that much more."""
    from chimera.sched.registry import make_policy
    from chimera.sim.simulator import Simulator
    from chimera.workload.synthetic import generate
    from chimera.sim.experiment import prepare

    def run(overhead: float) -> dict:
        _write_profile(tmp_path / "p.yaml", fitted={**FITTED, "request_overhead_s": overhead})
        cl = cluster_from_dict({"models": [{"profile_file": "p.yaml", "name": "a", "workload_model": "qwen2.5-1.5b"}]},
                               base_dir=tmp_path)
        prep = prepare(generate(20, seed=1), cl, seed=1)
        sim = Simulator(prep.runtimes, make_policy("vllm"), prep.workflows(5, 0), arrivals=[100.0 * i for i in range(5)])
        return sim.run()

    base, slow = run(0.0), run(0.25)
    assert slow["calls"] == base["calls"] > 5
    extra = (slow["latency_s"]["mean"] - base["latency_s"]["mean"]) * 5
    assert extra == pytest.approx(0.25 * base["calls"], rel=1e-6)


def test_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="not found"):
        cluster_from_dict({"models": [{"profile_file": "nope.yaml"}]}, base_dir=tmp_path)
    p = _write_profile(tmp_path / "bad.yaml", fitted={**FITTED, "fixd_s": 1.0})
    with pytest.raises(ClusterError, match=r"fitted\.fixd_s.*did you mean 'fixed_s'"):
        load_profile_file(p)
    p = _write_profile(tmp_path / "neg.yaml", fitted={**FITTED, "per_seq_s": -1})
    with pytest.raises(ClusterError, match=r"fitted\.per_seq_s.*-1"):
        load_profile_file(p)
    (tmp_path / "plain.yaml").write_text("name: x\n")
    with pytest.raises(ClusterError, match="'fitted' block"):
        load_profile_file(tmp_path / "plain.yaml")
    _write_profile(tmp_path / "ok.yaml")
    with pytest.raises(ClusterError, match="not both"):
        cluster_from_dict({"models": [{"profile_file": "ok.yaml", "profile": "qwen2.5-7b@a6000"}]}, base_dir=tmp_path)


def test_emulator_runs_a_fitted_profile(tmp_path: Path) -> None:
    from chimera.emulate import build_emulator_app

    app_ = build_emulator_app(str(_write_profile(tmp_path / "tiny.yaml")), "tiny")
    perf = app_.state.emulator.engine.perf
    assert perf.fitted is not None and perf.kv_capacity_tokens == 100000


# ---- the command -----------------------------------------------------------------------------------------------
def test_help_shows_an_example() -> None:
    r = runner.invoke(app, ["profile", "--help"])
    assert r.exit_code == 0
    text = " ".join(_plain(r.output).replace("│", " ").split())
    assert "Example: chimera profile --base-url http://127.0.0.1:8000 --model my-model --out" in text


def test_unreachable_server_exits_2(tmp_path: Path) -> None:
    r = runner.invoke(app, ["profile", "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "m",
                            "--out", str(tmp_path / "p.yaml")])
    assert r.exit_code == 2
    assert "measurement failed" in _plain(r.output) and not (tmp_path / "p.yaml").exists()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("emu") / "emulator.log"
    cmd = chimera_cmd("emulate", "--profile", EMU_PROFILE, "--served-model-name", "emu-7b", "--port", str(port),
                      "--time-scale", "1")
    with spawned("emulator", cmd, port, "/health", log, timeout_s=60) as sp:
        yield sp.url


def test_wrong_model_name_exits_2(emulator: str, tmp_path: Path) -> None:
    r = runner.invoke(app, ["profile", "--base-url", emulator, "--model", "nope", "--out", str(tmp_path / "p.yaml")])
    assert r.exit_code == 2 and "emu-7b" in _plain(r.output)


def test_chat_stream_counts_tokens_not_role_chunks(emulator: str) -> None:
    async def go():
        p = Profiler(ProfileConfig(base_url=emulator, model="emu-7b", api="chat"))
        async with httpx.AsyncClient(timeout=30) as c:
            p._client = c
            return await p._stream(p._prompt(20), 12)
    tr = asyncio.run(go())
    assert tr.completion_tokens == 12 and tr.tokens[-1] == 12 and len(tr.times) == 12
    assert tr.times[0] > tr.sent_s


def test_profile_an_emulator_end_to_end(emulator: str, tmp_path: Path) -> None:
    """Profile → YAML → cluster file → `chimera simulate`; fitted TPOT within 15% of the emulator's engine model."""
    out = tmp_path / "emu.yaml"
    r = runner.invoke(app, ["profile", "--base-url", emulator, "--model", "emu-7b", "--out", str(out),
                            "--concurrency", "1,4,8,32", "--decode-tokens", "48", "--rounds", "2",
                            "--prefill-lengths", "16,256,1024", "--long-concurrency", "1,8",
                            "--json", str(tmp_path / "emu.json")])
    text = _plain(r.output)
    assert r.exit_code == 0, text
    assert "measured vs fitted" in text and "TPOT c=32" in text and "TTFT" in text and "ignore_eos" in text
    spec = load_profile_file(out)
    fitted, truth = StepTimeModel(spec), StepTimeModel(profile(EMU_PROFILE))
    doc = yaml.safe_load(out.read_text())
    points = {(p["kind"], p["x"]): p for p in doc["fit_report"]["points"]}
    for c in (1, 8, 32):
        p = points[("decode", c)]
        want = truth.step_time(p["n"], p["ctx_tokens"], 0)
        got = fitted.step_time(p["n"], p["ctx_tokens"], 0)
        assert abs(got / want - 1) < TOL, (c, got, want)
        assert abs(p["measured_ms"] / 1e3 / want - 1) < TOL, (c, p, want)  # the measurement itself
        assert abs(fitted.decode_tpot(c, 100) / truth.decode_tpot(c, 100) - 1) < TOL
    assert abs(fitted.prefill_time(1024) / truth.prefill_time(1024) - 1) < TOL
    assert spec.kv_capacity_tokens == pytest.approx(truth.kv_capacity_tokens, rel=0.1)  # from kv_cache_usage_perc
    (tmp_path / "cluster.yaml").write_text(
        "models:\n  - {profile_file: emu.yaml, name: emu-7b, workload_model: qwen2.5-7b}\n"
        "  - {profile: qwen2.5-1.5b@a6000}\n  - {profile: qwen2.5-14b@a6000}\n")
    r = runner.invoke(app, ["simulate", "-w", "synthetic:200", "-c", str(tmp_path / "cluster.yaml"), "--policy",
                            "chimera", "--rate", "1", "--tasks", "40"])
    assert r.exit_code == 0, _plain(r.output)
    assert "emu-7b:" in _plain(r.output)


def test_refit_and_check_a_written_profile(emulator: str, tmp_path: Path) -> None:
    """--refit fits a profile's stored measurements again without the server (its name and machine kept unless
    given); --check measures afresh against a profile and writes nothing."""
    small = ["--concurrency", "1,4", "--decode-tokens", "24", "--rounds", "1", "--prefill-lengths", "16,256",
             "--long-concurrency", "1"]
    first = tmp_path / "first.yaml"
    r = runner.invoke(app, ["profile", "--base-url", emulator, "--model", "emu-7b", "--out", str(first), "--gpu",
                            "a6000-emu", "--params-b", "7", *small])
    assert r.exit_code == 0, _plain(r.output)
    doc = yaml.safe_load(first.read_text())

    again = tmp_path / "again.yaml"
    r = runner.invoke(app, ["profile", "--refit", str(first), "--out", str(again), "--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, _plain(r.output)
    assert f"(refit of {first}): measured vs fitted" in " ".join(_plain(r.output).split())
    redo = yaml.safe_load(again.read_text())
    assert (redo["name"], redo["gpu"], redo["params_b"]) == ("emu-7b", "a6000-emu", 7.0)
    # The stored measurements are rounded to 6 digits. With this few points the coefficients themselves can trade off
    # against each other (fixed cost vs per-token cost), so what must hold is the fit: the same step time at every
    # measured point.
    before = {(p["kind"], p["x"]): p["fitted_ms"] for p in doc["fit_report"]["points"]}
    after = {(p["kind"], p["x"]): p["fitted_ms"] for p in redo["fit_report"]["points"]}
    assert after.keys() == before.keys() and all(after[k] == pytest.approx(v, rel=0.02) for k, v in before.items())
    record = yaml.safe_load((tmp_path / "a.json").read_text())
    assert set(record) == {"measurements", "fit", "fitted"} and record["fitted"] == redo["fitted"]

    r = runner.invoke(app, ["profile", "--refit", str(first), "--out", str(again), "--name", "other", "--gpu", "h100"])
    assert r.exit_code == 0, _plain(r.output)
    assert (yaml.safe_load(again.read_text())["name"], yaml.safe_load(again.read_text())["gpu"]) == ("other", "h100")
    (tmp_path / "bare.yaml").write_text("name: x\n")
    r = runner.invoke(app, ["profile", "--refit", str(tmp_path / "bare.yaml"), "--out", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2 and "bare.yaml: no measurements to refit ('measurements')" in _plain(r.output)
    assert not (tmp_path / "x.yaml").exists()

    before = sorted(tmp_path.iterdir())
    r = runner.invoke(app, ["profile", "--base-url", emulator, "--model", "emu-7b", "--check", str(first), *small])
    assert r.exit_code == 0, _plain(r.output)
    text = " ".join(_plain(r.output).split())
    assert f"measured now vs {first}" in text and "s of measuring" in text and "TPOT c=4" in text
    assert sorted(tmp_path.iterdir()) == before
