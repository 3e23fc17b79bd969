"""Real vLLM CPU servers (the `vllm` marker): two random-weight models, one core each, started once for the module.

Needs `.venv-vllm` and `out/models/{tiny,wide}` (both built by `make test`); skipped, naming the missing piece, where
either is absent. Start-up is ~45-100 s (both servers in parallel); requests are kept short. The first tests (no
marker) check the process handling, command line and gateway YAML without vLLM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from chimera.backends.vllm_cpu import (ROOT, EngineSetupError, ServerSpec, VLLMCluster, VLLMServer, group_members,
                                      model_dir, release_shm, shm_files, stop_group, vllm_cluster, vllm_python)
from upstreams import vllm_missing

vllm = pytest.mark.vllm

OUT = ROOT / "out"
TMP_ROOTS = sorted({"/tmp", os.path.realpath(tempfile.gettempdir())})
VLLM_NAMES = ("vllm", "zmq", "ipc", "torchinductor", "inductor", "triton", "outlines", "xgrammar")


def _tmp_entries() -> set[str]:
    out = set()
    for root in TMP_ROOTS:
        with contextlib.suppress(OSError):
            out |= {os.path.join(root, n) for n in os.listdir(root)}
    return out


def _under_tmp(path: str) -> bool:
    p = os.path.realpath(path)
    return any(p == r or p.startswith(r + "/") for r in TMP_ROOTS) and not p.startswith(str(OUT.resolve()) + "/")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _socket_paths(pids: list[int]) -> list[str]:
    """Paths of the unix sockets these processes hold (from /proc/net/unix, matched by inode)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[6] in inodes:
            paths.append(parts[7])
    return paths


def _open_files(pids: list[int]) -> list[str]:
    files = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("/"):
                        files.append(link)
    return files


# --- without vLLM -------------------------------------------------------------------------------------------------

def _group(script: str) -> subprocess.Popen:
    """A process group like a server's: a leader with children, in its own session."""
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_members(proc.pid)) >= 3
    return proc


def test_stop_group_stops_the_whole_group():
    proc = _group("sleep 300 & sleep 300 & wait")
    stop_group(proc, term_timeout_s=5)
    assert proc.poll() is not None and not group_members(proc.pid)


def test_stop_group_kills_a_group_that_ignores_sigterm():
    proc = _group("trap '' TERM; sleep 300 & sleep 300 & wait")  # children inherit the ignored SIGTERM
    t0 = time.monotonic()
    stop_group(proc, term_timeout_s=1, kill_timeout_s=5)
    assert not group_members(proc.pid) and proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_release_shm_removes_only_unmapped_files(tmp_path):
    p = Path("/dev/shm") / f"chimera-test-{os.getpid()}"
    if not p.parent.is_dir():
        pytest.skip("no /dev/shm")
    p.write_bytes(b"x" * 4096)
    import mmap

    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert str(p) in shm_files([os.getpid()])
        assert release_shm({str(p)}) == []  # still mapped by this process
        assert p.exists()
    assert release_shm({str(p)}) == [str(p)] and not p.exists()


def _fake_setup(tmp_path: Path) -> tuple[Path, Path]:
    venv, models = tmp_path / "venv", tmp_path / "models"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".installed").touch()
    for m in ("tiny", "wide"):
        (models / m).mkdir(parents=True)
        (models / m / "config.json").write_text("{}")
    (models / "wide" / "chimera-model.json").write_text('{"recipe": {"serve_dtype": "float32"}}')
    return venv, models


def test_server_command_env_and_gateway_yaml(tmp_path):
    from chimera.serve.config import (backends_for_cluster, build_gateway_config, load_gateway_config,
                                      write_gateway_config)

    venv, models = _fake_setup(tmp_path)
    work = tmp_path / "work"
    servers = [VLLMServer(ServerSpec("tiny"), 0, work, models, venv, 60),
               VLLMServer(ServerSpec("wide", priority=True, core=1, port=8123), 1, work, models, venv, 60)]
    cmd = servers[1].command()
    assert cmd[:3] == [str(venv.absolute() / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    for flag in (["--served-model-name", "wide"], ["--host", "127.0.0.1"], ["--port", "8123"],
                 ["--dtype", "float32"], ["--max-model-len", "2048"], ["--scheduling-policy", "priority"]):
        i = cmd.index(flag[0])
        assert cmd[i:i + 2] == flag
    assert "--enforce-eager" in cmd and "--scheduling-policy" not in servers[0].command()
    assert servers[0].dtype == "bfloat16"
    env = servers[1].env
    for key in ("TMPDIR", "VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "HOME", "HF_HOME"):
        assert env[key].startswith(str(servers[1].state_dir) + "/") and Path(env[key]).is_dir()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["VLLM_NO_USAGE_STATS"] == "1"
    # what a gateway in front needs (`chimera engines up` writes it): served names, base URLs, priority
    built = build_gateway_config(backends_for_cluster(VLLMCluster(servers, work).served()), port=9000)
    cfg = load_gateway_config(write_gateway_config(built, tmp_path / "gateway.yaml"))
    assert [(b.model, b.base_url, b.priority) for b in cfg.backends] == [
        ("tiny", servers[0].base_url, False), ("wide", "http://127.0.0.1:8123/v1", True)]
    assert cfg.listen.port == 9000


def test_missing_pieces_are_named(tmp_path):
    venv, models = _fake_setup(tmp_path)
    with pytest.raises(EngineSetupError, match="make vllm-venv"):
        vllm_python(tmp_path / "nope")
    with pytest.raises(EngineSetupError, match="make models"):
        model_dir("huge", models)
    with pytest.raises(ValueError, match="unique"):
        with vllm_cluster([ServerSpec("tiny"), ServerSpec("tiny")], workdir=tmp_path, models_dir=models, venv=venv):
            pass


# --- real servers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """tiny (fcfs, core 0) and wide (priority, core 1); the last test stops it and checks what is left behind."""
    missing = vllm_missing()
    if missing:
        pytest.skip(f"real vLLM tests skipped: {missing}")
    state = {"tmp_before": _tmp_entries()}
    workdir = OUT / "test-real-vllm"
    stack = contextlib.ExitStack()
    state["cluster"] = stack.enter_context(vllm_cluster([ServerSpec("tiny"), ServerSpec("wide", priority=True)],
                                                        workdir=workdir, start_timeout_s=300))
    state["stack"] = stack
    state["pgids"] = [s.pgid for s in state["cluster"]]
    yield state
    stack.close()


@vllm
def test_chat_returns_exactly_max_tokens(cluster):
    from openai import OpenAI

    for s in cluster["cluster"]:
        client = OpenAI(base_url=s.base_url, api_key="EMPTY", timeout=120)
        r = client.chat.completions.create(model=s.served_model_name, max_tokens=12, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "def fib(n):"}])
        assert r.usage.completion_tokens == 12, (s, r.usage)
        assert r.choices[0].finish_reason == "length"
        assert isinstance(r.choices[0].message.content, str)
        chunks = list(client.chat.completions.create(
            model=s.served_model_name, max_tokens=7, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": "import os"}]))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


@vllm
def test_real_vllm_prefix_cache_matches_the_model(cluster):
    """The engine model's prefix caching (tests/test_prefix_cache.py) against one of the module's real servers
    (CHIMERA_PREFIX_CHECK_MODEL, default `wide`: its prefill dominates TTFT, so the hit shows in time; on `tiny` TTFT
    is mostly per-request overhead). A warm-up prompt, then one 1,400-token prompt (token ids)
    twice, one output token each; the prefix-cache counters and the engine's TTFT histogram around each request are
    compared with the engine model at block size 128 (step times from out/prof/MODEL.yaml, `chimera profile`, when
    present). `pytest -s` prints the figures (docs/perfmodel.md, "Prefix caching")."""
    import random

    from chimera.backends.vllm_cpu import DEFAULT_MODELS
    from chimera.perfmodel.perf import StepTimeModel
    from chimera.perfmodel.profiles import load_profile_file
    from chimera.profiling.metrics import parse_prometheus
    from test_prefix_cache import REAL_PROMPT_TOKENS, VLLM_BLOCK_TOKENS, modelled_repeat

    model = os.environ.get("CHIMERA_PREFIX_CHECK_MODEL", "wide")
    rng = random.Random(12)
    warm, prompt = ([rng.randrange(16, 4000) for _ in range(REAL_PROMPT_TOKENS)] for _ in range(2))
    names = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits",
             "vllm:time_to_first_token_seconds_sum": "ttft_s"}
    measured = []
    srv = cluster["cluster"].by_name(model)  # the module's server: no start-up of its own

    def scrape() -> dict:
        vals = dict.fromkeys(names.values(), 0.0)
        for n, lab, v in parse_prometheus(httpx.get(srv.url + "/metrics", timeout=30).text):
            if n in names and lab.get("model_name") in (None, srv.served_model_name):
                vals[names[n]] += v
        return vals

    def ask(ids: list[int]) -> float:
        t0 = time.perf_counter()
        r = httpx.post(srv.base_url + "/completions", timeout=120, json={
            "model": srv.served_model_name, "prompt": ids, "max_tokens": 1, "temperature": 0})
        r.raise_for_status()
        assert r.json()["usage"]["prompt_tokens"] == REAL_PROMPT_TOKENS
        return time.perf_counter() - t0

    ask(warm)
    for _ in range(2):
        before = scrape()
        latency = ask(prompt)
        after = scrape()
        measured.append({k: after[k] - before[k] for k in after} | {"latency_s": latency})
    prof = Path(DEFAULT_MODELS).parent / "prof" / f"{model}.yaml"
    modelled = None
    if prof.is_file():
        spec = load_profile_file(prof)
        modelled = modelled_repeat(StepTimeModel(spec))
        for m in modelled:
            m["latency_s"] = m["ttft_s"] + spec.fitted.request_overhead_s
    print(f"\nprefix caching, {model}, {REAL_PROMPT_TOKENS}-token prompt twice, block {VLLM_BLOCK_TOKENS}:")
    for i, m in enumerate(measured):
        line = (f"  request {i + 1}: measured queries {m['queries']:.0f} hits {m['hits']:.0f} "
                f"TTFT {1e3 * m['ttft_s']:.1f} ms (client {1e3 * m['latency_s']:.1f} ms)")
        if modelled:
            mm = modelled[i]
            line += (f"; modelled hits {mm['hits']} TTFT {1e3 * mm['ttft_s']:.1f} ms "
                     f"(client {1e3 * mm['latency_s']:.1f} ms)")
        print(line)
    assert [(m["queries"], m["hits"]) for m in measured] == [(1400, 0), (1400, 1280)]
    if modelled:
        assert [(m["queries"], m["hits"]) for m in modelled] == [(1400, 0), (1400, 1280)]
    assert measured[1]["ttft_s"] < measured[0]["ttft_s"]


@vllm
def test_models_lists_the_served_name(cluster):
    for s in cluster["cluster"]:
        data = httpx.get(s.base_url + "/models", timeout=10).json()["data"]
        assert [m["id"] for m in data] == [s.served_model_name]
        assert data[0]["max_model_len"] == 2048


@vllm
def test_servers_are_pinned_and_keep_temp_files_in_out(cluster):
    """Each server's group (API server + engine core) runs with TMPDIR, the RPC socket folder and the caches in
    out/, holds no file or unix socket under /tmp, and really uses its own folder for its sockets."""
    out = str(OUT.resolve())
    for s in cluster["cluster"]:
        pids = group_members(s.pgid)
        assert len(pids) >= 2, f"{s}: expected the API server and its engine core in group {s.pgid}, got {pids}"
        # vLLM renames its engine-core and worker processes (setproctitle), which overwrites what
        # /proc/PID/environ shows for them: read the environment where the command line is still the interpreter's.
        readable = [pid for pid in pids if _cmdline(pid).startswith(str(s.python))]
        assert s.pgid in readable, (s, [(p, _cmdline(p)[:60]) for p in pids])
        for pid in readable:
            env = _environ(pid)
            for key in ("TMPDIR", "VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "HOME",
                        "XDG_CACHE_HOME"):
                assert env[key].startswith(out + "/"), (s, pid, key, env.get(key))
            assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(s.core)
            assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
        assert not [p for p in _open_files(pids) if _under_tmp(p)], _open_files(pids)
        socks = [p for p in _socket_paths(pids) if p.startswith("/")]
        assert not [p for p in socks if _under_tmp(p)], socks
        used = [p for p in s.state_dir.rglob("*") if p.is_socket()]
        assert used or [p for p in socks if p.startswith(str(s.state_dir))], f"no sockets under {s.state_dir}"
    assert {s.core for s in cluster["cluster"]} == {0, 1} or (os.cpu_count() or 1) < 2


@vllm
def test_gateway_yaml_points_at_the_servers(cluster):
    from chimera.serve.config import backends_for_cluster, build_gateway_config

    cl = cluster["cluster"]
    cfg = build_gateway_config(backends_for_cluster(cl.served()))
    assert {b.model: b.base_url for b in cfg.backends} == {s.served_model_name: s.base_url for s in cl}
    assert {b.model: b.priority for b in cfg.backends} == {"tiny": False, "wide": True}


@vllm
@pytest.mark.slow
def test_kill_hard_and_restart(cluster):
    """SIGKILL the whole group (a crash), restart on the same port, answer again (slow: a second start-up)."""
    s = cluster["cluster"].by_name("tiny")
    old = s.pgid
    shm = shm_files(group_members(old))
    assert shm, "expected vLLM's shared-memory queues under /dev/shm"
    s.kill_hard()
    assert not group_members(old)
    assert not [p for p in shm if os.path.exists(p)], "shared memory of the killed server left in /dev/shm"
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/health", timeout=2)
    s.restart()
    assert s.pgid != old and s.starts == 2
    r = httpx.post(s.base_url + "/chat/completions", timeout=60, json={
        "model": s.served_model_name, "max_tokens": 5, "ignore_eos": True,
        "messages": [{"role": "user", "content": "x"}]})
    assert r.json()["usage"]["completion_tokens"] == 5


@vllm
def test_stop_leaves_no_process_and_nothing_in_tmp(cluster):
    """Runs last: stopping the cluster (SIGTERM to each group) leaves no process of either group, none of their
    /dev/shm segments, and no new vLLM-like entry in /tmp (sockets, caches) appeared while the servers ran."""
    servers = list(cluster["cluster"])
    shm = set().union(*(shm_files(group_members(s.pgid)) for s in servers))
    cluster["stack"].close()
    assert not [p for p in shm if os.path.exists(p)], "shared memory of the servers left in /dev/shm"
    for s in servers:
        assert s.proc.poll() is not None
        assert not group_members(s.pgid), f"{s}: group {s.pgid} has {group_members(s.pgid)}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/health", timeout=2)
    new = sorted(_tmp_entries() - cluster["tmp_before"])
    suspicious = [p for p in new if any(k in os.path.basename(p).lower() for k in VLLM_NAMES)
                  or (os.path.exists(p) and Path(p).is_socket())]
    assert not suspicious, f"new entries in /tmp while the vLLM servers ran: {suspicious}"
