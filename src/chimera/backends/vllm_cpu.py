"""A local cluster of real vLLM CPU servers: one model and one core each, started, health-checked and always stopped.

    with vllm_cluster([ServerSpec("tiny"), ServerSpec("wide", priority=True)], workdir=Path("out/engines")) as c:
        c[0].base_url          # http://127.0.0.1:PORT/v1
        c.served()             # [{"model", "base_url", "priority"}]: what a gateway config needs
        c[1].restart(hard=True)  # SIGKILL its whole process group, start it again, wait for /health

Each server is `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server` (`vllm serve` does not work in the CPU
build) in its own session, so its engine core, worker and resource tracker share its process group and the group is
killed by the pgid the handle holds, never by name; a server also stops when the process that started it dies.
Everything a server writes (TMPDIR, ZMQ sockets, caches, a HOME for tools that
look there) stays inside `workdir/servers/NAME/`. Measured facts behind the settings: ../shared/real-engines/README.md
and docs/real-engines.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from chimera.util.procs import Spawned, wait_ready
from chimera.util.threaded import free_port


def project_root() -> Path:
    """The checkout this package runs from (an editable install), else the current directory."""
    here = Path(__file__).resolve().parents[3]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


ROOT = project_root()
# Overridable for a venv or models kept elsewhere (CI caches, a shared machine).
DEFAULT_VENV = Path(os.environ.get("CHIMERA_VLLM_VENV") or ROOT / ".venv-vllm")
DEFAULT_MODELS = Path(os.environ.get("CHIMERA_VLLM_MODELS") or ROOT / "out" / "models")
DEFAULT_WORKDIR = ROOT / "out" / "engines"


class EngineSetupError(RuntimeError):
    """A missing piece (vLLM venv, model folder): the message names it and the make target that builds it."""


def vllm_python(venv: Path = DEFAULT_VENV) -> Path:
    py = Path(os.path.abspath(Path(venv) / "bin" / "python"))  # absolute, symlink kept (it is the venv's)
    if not py.is_file() or not (Path(venv) / ".installed").is_file():
        raise EngineSetupError(f"no vLLM venv at {venv} (missing {py} or its .installed stamp); build it with "
                               "`make vllm-venv` (see docs/real-engines.md)")
    return py


def model_dir(model: str, models_dir: Path = DEFAULT_MODELS) -> Path:
    """A model folder: a path as given, else `models_dir/NAME` (built by `make models`)."""
    p = Path(model)
    d = p if (p.is_absolute() or len(p.parts) > 1) else Path(models_dir) / model
    if not (d / "config.json").is_file():
        raise EngineSetupError(f"no model at {d} (missing config.json); build the random-weight models with "
                               "`make models` or `chimera engines build-models`")
    return d


def serve_dtype(path: Path) -> str:
    """The dtype a model built by `chimera.backends.random_models` is meant to be served in (bfloat16 otherwise)."""
    try:
        return json.loads((Path(path) / "chimera-model.json").read_text())["recipe"]["serve_dtype"]
    except (OSError, ValueError, KeyError, TypeError):
        return "bfloat16"


def build_models(out: Path | None = None, names: Sequence[str] | None = None, force: bool = False,
                 venv: Path | None = None) -> int:
    """Build the random-weight models with the vLLM venv's interpreter (its torch/transformers write the files
    vLLM reads); output goes to this process's stdout/stderr. Returns the builder's exit code."""
    py = vllm_python(venv or DEFAULT_VENV)
    cmd = [str(py), "-m", "chimera.backends.random_models", "--out", str(out or DEFAULT_MODELS)]
    if names:
        cmd += ["--models", ",".join(names)]
    if force:
        cmd.append("--force")
    src = Path(__file__).resolve().parents[2]  # the folder holding the `chimera` package
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(src)
    return subprocess.call(cmd, env=env)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order (a server's default core is picked from them)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


@dataclass
class ServerSpec:
    """One vLLM server. `model` is a recipe name under the models folder (`tiny`, `wide`) or a model folder path."""

    model: str
    served_model_name: str | None = None  # default: the folder's name
    priority: bool = False  # --scheduling-policy priority (the gateway then forwards `priority`)
    core: int | None = None  # VLLM_CPU_OMP_THREADS_BIND; default: the usable CPUs in turn by server index
    port: int | None = None  # default: a free port
    max_model_len: int = 2048
    dtype: str | None = None  # --dtype; default: the model's `serve_dtype` (chimera-model.json), else bfloat16
    kv_cache_gib: int = 1
    enforce_eager: bool = True  # compiled mode starts in ~1-2 min (no compile cache in 0.32); eager in ~35 s
    max_num_seqs: int | None = None  # vLLM's default (256) when None
    extra_args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name


def server_env(base: dict[str, str], state: Path, core: int, kv_gib: int) -> dict[str, str]:
    """Offline, one core, and every temp/cache/home path inside `state`."""
    dirs = {k: state / sub for k, sub in (
        ("TMPDIR", "tmp"), ("VLLM_RPC_BASE_PATH", "rpc"), ("VLLM_CACHE_ROOT", "cache/vllm"),
        ("VLLM_CONFIG_ROOT", "config/vllm"), ("TORCHINDUCTOR_CACHE_DIR", "cache/inductor"),
        ("TRITON_CACHE_DIR", "cache/triton"), ("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"),
        ("HF_HOME", "cache/huggingface"), ("TORCH_HOME", "cache/torch"), ("HOME", "home"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({k: str(v) for k, v in dirs.items()})
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_KVCACHE_SPACE=str(kv_gib), VLLM_CPU_OMP_THREADS_BIND=str(core), PYTHONUNBUFFERED="1")
    return env


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`, read from /proc."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)": state ppid pgrp ...
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(int(p.name))
    return out


# Runs first in the server's process, then execs the real command: SIGTERM the server when the process that started
# it dies (a crashed test run must not leave two servers on the cores). Linux prctl(PR_SET_PDEATHSIG); it fires when
# the starting *thread* ends, so start clusters from a thread that outlives them (the main thread, as tests and CLI).
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit('chimera: parent gone before start'); "
                    "os.execv(sys.argv[2], sys.argv[2:])")


def shm_files(pids: Sequence[int]) -> set[str]:
    """The /dev/shm files (vLLM's shared-memory message queues, multiprocessing semaphores) these processes map."""
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(None, 5)  # address perms offset dev inode [path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith("/dev/shm/"):
                    out.add(path.removesuffix(" (deleted)"))
    return out


def release_shm(paths: set[str]) -> list[str]:
    """Unlink those of `paths` that still exist and no live process maps (a SIGKILLed group cannot clean up its
    shared memory: ~400 MB per server would stay in RAM). Returns what was removed."""
    if not paths:
        return []
    live = shm_files([int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()])
    removed = []
    for path in sorted(paths - live):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _crash(pgid: int, tracker_wait_s: float = 5.0) -> None:
    """SIGKILL the group's server processes, as a crash would, but give Python's resource tracker (a helper in the
    same group) a few seconds to release the semaphores and shared memory it registered, as it does in a real crash;
    the caller then SIGKILLs whatever is left of the group."""
    members = group_members(pgid)
    for pid in members:
        if not _is_resource_tracker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + tracker_wait_s
    while time.monotonic() < deadline and any(_is_resource_tracker(p) for p in group_members(pgid)):
        time.sleep(0.1)


def stop_group(proc: subprocess.Popen, term_timeout_s: float = 30.0, kill_timeout_s: float = 10.0,
               hard: bool = False) -> None:
    """SIGTERM the process group `proc` leads (with `hard`: SIGKILL, a crash), SIGKILL it after `term_timeout_s`,
    then make sure no process of the group is left (raises if one is) and release the shared memory it mapped."""
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    try:
        shm = shm_files(group_members(pgid))
    except Exception:  # bookkeeping must never keep the group from being stopped
        shm = set()
    if hard:
        _crash(pgid)
    steps = ((signal.SIGKILL, kill_timeout_s),) if hard else (
        (signal.SIGTERM, term_timeout_s), (signal.SIGKILL, kill_timeout_s))
    for sig, timeout in steps:
        if proc.poll() is not None and not group_members(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(pgid):
                break
            time.sleep(0.1)
    if proc.poll() is None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"process {proc.pid} did not exit after SIGKILL") from None
    left = group_members(pgid)
    if left:
        raise RuntimeError(f"process group {pgid} still has processes {left} after SIGKILL")
    with contextlib.suppress(Exception):
        release_shm(shm)


class VLLMServer:
    """A handle on one server: `.base_url` (…/v1), `.served_model_name`, `.port`, `.proc`, `.pgid`, `.log_path`."""

    def __init__(self, spec: ServerSpec, index: int, workdir: Path, models_dir: Path, venv: Path,
                 start_timeout_s: float, die_with_parent: bool = True) -> None:
        self.spec = spec
        self.index = index
        self.served_model_name = spec.name
        self.model_path = model_dir(spec.model, models_dir).resolve()
        self.dtype = spec.dtype or serve_dtype(self.model_path)
        self.python = vllm_python(venv)
        self.port = spec.port or free_port()
        self.core = spec.core if spec.core is not None else usable_cpus()[index % len(usable_cpus())]
        self.state_dir = (Path(workdir) / "servers" / f"{index}-{self.served_model_name}").resolve()
        self.log_path = self.state_dir / "server.log"
        self.start_timeout_s = start_timeout_s
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.startup_s: float | None = None  # Popen to /health 200, the last start
        self._t_start = 0.0
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def env(self) -> dict[str, str]:
        return server_env(dict(os.environ), self.state_dir, self.core, self.spec.kv_cache_gib)

    def command(self) -> list[str]:
        s = self.spec
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_path),
               "--served-model-name", self.served_model_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(s.max_model_len)]
        if s.enforce_eager:
            cmd.append("--enforce-eager")
        if s.priority:
            cmd += ["--scheduling-policy", "priority"]
        if s.max_num_seqs:
            cmd += ["--max-num-seqs", str(s.max_num_seqs)]
        return cmd + list(s.extra_args)

    def start(self, wait: bool = True) -> None:
        """Start the server (a fresh TMPDIR and socket folder); with `wait`, block until /health answers 200."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.served_model_name} is already running (pid {self.proc.pid})")
        for sub in ("tmp", "rpc"):
            shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        env = self.env
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== chimera: start {self.starts + 1}: {' '.join(self.command())}\n".encode())
        self._log.flush()
        self._t_start = time.monotonic()
        cmd = self.command()
        if self.die_with_parent:
            cmd = [str(self.python), "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.state_dir, start_new_session=True, stdin=subprocess.DEVNULL)
        self.starts += 1
        self.startup_s = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> float:
        """Block until /health is 200; returns (and records) the start-up time. A server that dies or stays
        unready past the timeout is stopped and the error names its log."""
        assert self.proc is not None, "start() first"
        try:
            wait_ready(Spawned(self.served_model_name, self.url, self.proc.pid, self.log_path, "/health",
                               self.start_timeout_s, self.proc))
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"vLLM server {e}; last lines:\n{self.log_tail()}") from None
        self.startup_s = time.monotonic() - self._t_start
        return self.startup_s

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, hard: bool = False, term_timeout_s: float = 30.0) -> None:
        """SIGTERM (or SIGKILL with `hard`) the server's process group, SIGKILL after the timeout, check it is gone."""
        try:
            if self.proc is not None:
                stop_group(self.proc, term_timeout_s=term_timeout_s, hard=hard)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def kill_hard(self) -> None:
        """SIGKILL the whole process group at once (a crash, for fault tests)."""
        self.stop(hard=True)

    def restart(self, hard: bool = True, wait: bool = True) -> None:
        """Stop the server (SIGKILL by default: a crash), start it again on the same port, wait for /health."""
        self.stop(hard=hard)
        self.start(wait=wait)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        return f"VLLMServer({self.served_model_name!r}, {self.base_url}, core {self.core}, pid {self.pgid})"

    def describe(self) -> dict:
        return {"name": self.served_model_name, "base_url": self.base_url, "model": str(self.model_path),
                "dtype": self.dtype, "core": self.core, "priority": self.spec.priority, "pid": self.pgid,
                "startup_s": None if self.startup_s is None else round(self.startup_s, 1), "log": str(self.log_path)}


class VLLMCluster(Sequence[VLLMServer]):
    """The running servers (indexable, iterable)."""

    def __init__(self, servers: list[VLLMServer], workdir: Path) -> None:
        self.servers = servers
        self.workdir = workdir

    def __getitem__(self, i):  # type: ignore[override]
        return self.servers[i]

    def __len__(self) -> int:
        return len(self.servers)

    def by_name(self, name: str) -> VLLMServer:
        for s in self.servers:
            if s.served_model_name == name:
                return s
        raise KeyError(f"no server named {name!r}; have {[s.served_model_name for s in self.servers]}")

    def served(self) -> list[dict]:
        """Per server what a gateway in front needs: its served model name, base URL and whether it runs vLLM's
        priority scheduling (the gateway then forwards `priority`); chimera.serve.config builds the config."""
        return [{"model": s.served_model_name, "base_url": s.base_url, "priority": bool(s.spec.priority)}
                for s in self.servers]


@contextlib.contextmanager
def vllm_cluster(specs: Sequence[ServerSpec], workdir: Path | None = None, models_dir: Path | None = None,
                 venv: Path | None = None, start_timeout_s: float = 300.0,
                 die_with_parent: bool = True) -> Iterator[VLLMCluster]:
    """Start the servers in parallel, wait for each /health, yield the cluster; stop every server (its whole process
    group) on exit, also when start-up fails or the block raises."""
    if not specs:
        raise ValueError("vllm_cluster needs at least one ServerSpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"served model names must be unique, got {names}")
    workdir = Path(workdir or DEFAULT_WORKDIR).resolve()
    models_dir, venv = Path(models_dir or DEFAULT_MODELS), Path(venv or DEFAULT_VENV)
    servers = [VLLMServer(s, i, workdir, models_dir, venv, start_timeout_s, die_with_parent)
               for i, s in enumerate(specs)]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.wait_ready()
        yield VLLMCluster(servers, workdir)
    finally:
        errors = []
        for s in servers:
            try:
                s.stop()
            except Exception as e:  # stop them all, then report
                errors.append(f"{s.served_model_name}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))


def wait_until_signalled(cluster: VLLMCluster, poll_s: float = 1.0) -> str:
    """Block until SIGINT/SIGTERM (returns "signal") or until a server exits by itself (returns a message naming
    it and its log); the caller's `with vllm_cluster(...)` then stops everything."""
    stop = {"why": None}

    def on_signal(signum, _frame):
        stop["why"] = "signal"

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while stop["why"] is None:
            for s in cluster:
                if not s.alive():
                    return (f"{s.served_model_name} exited with {s.proc.returncode if s.proc else '?'}; "
                            f"see {s.log_path}")
            time.sleep(poll_s)
        return "signal"
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def default_specs(models: Sequence[str] = ("tiny", "wide"), priority: bool = False) -> list[ServerSpec]:
    return [ServerSpec(m, priority=priority) for m in models]
