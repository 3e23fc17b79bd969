"""CPU time of benchmark processes, read from /proc (Linux): per process group, per process, and the whole machine
(and a process's resident memory, for the soak).

`chimera bench live --engine vllm` runs model servers, a gateway and the agent driver on the same few cores; what
each of them spent is part of the result (the simulator models none of it). A snapshot before and after a run gives
each role's CPU seconds over the run:

    before = snapshot({"tiny": pgid, "gateway": gw_pid})
    ...
    used = cpu_delta(before, snapshot(...))   # {"tiny": {"cpu_s": 41.2, "procs": {"VLLM::EngineCore": 38.0, ...}}}
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int | str) -> tuple[str, list[str]] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    return comm, raw[raw.rindex(")") + 2:].split()


def proc_cpu_s(fields: list[str]) -> float:
    """utime + stime (+ waited-for children's) of one /proc/PID/stat, in seconds (fields after `(comm)`)."""
    # after "(comm)": 0 state, 1 ppid, 2 pgrp, ... 11 utime, 12 stime, 13 cutime, 14 cstime
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


def group_cpu(pgid: int) -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU s)} of the live processes whose process group is `pgid`."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        st = _stat(p.name)
        if st is None:
            continue
        comm, fields = st
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out[int(p.name)] = (comm, proc_cpu_s(fields))
    return out


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat (idle and iowait count as not busy)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0, 0
    vals = [int(x) for x in first[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def self_cpu_s() -> float:
    """This process's own CPU seconds (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Snapshot:
    t: float
    groups: dict[str, dict[int, tuple[str, float]]]
    self_s: float
    busy: int
    total: int
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)


def snapshot(groups: Mapping[str, int]) -> Snapshot:
    """CPU time of every named process group (role -> pgid), of this process, and of the machine, now."""
    busy, total = machine_jiffies()
    return Snapshot(time.monotonic(), {role: group_cpu(pgid) for role, pgid in groups.items()}, self_cpu_s(),
                    busy, total)


def cpu_delta(a: Snapshot, b: Snapshot, self_role: str = "driver") -> dict:
    """CPU seconds each role used between two snapshots (a process absent from `a` started in between: counted
    from 0), this process as `self_role`, and the machine's busy share of all its cores."""
    wall = b.t - a.t
    roles: dict[str, dict] = {}
    for role, procs in b.groups.items():
        before = a.groups.get(role, {})
        per: dict[str, float] = {}
        for pid, (name, cpu) in procs.items():
            d = cpu - before.get(pid, (name, 0.0))[1]
            per[name] = per.get(name, 0.0) + max(0.0, d)
        roles[role] = {"cpu_s": round(sum(per.values()), 2), "procs": {k: round(v, 2) for k, v in per.items()},
                       "cores": round(sum(per.values()) / wall, 3) if wall > 0 else None}
    drv = b.self_s - a.self_s
    roles[self_role] = {"cpu_s": round(drv, 2), "procs": {"this process": round(drv, 2)},
                        "cores": round(drv / wall, 3) if wall > 0 else None}
    dt = b.total - a.total
    machine = (b.busy - a.busy) / TICK
    return {"wall_s": round(wall, 2), "cpus": b.cpus, "roles": roles,
            "machine_busy_pct": round(100.0 * (b.busy - a.busy) / dt, 1) if dt > 0 else None,
            "machine_cpu_s": round(machine, 2),
            # everything else the machine ran meanwhile (other jobs, the kernel's own work): contention from outside
            "other_cpu_s": round(max(0.0, machine - sum(r["cpu_s"] for r in roles.values())), 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (its own, not its children's; NaN if it cannot be read)."""
    st = _stat(pid)
    if st is None:
        return float("nan")
    try:
        return (int(st[1][11]) + int(st[1][12])) / TICK
    except (ValueError, IndexError):
        return float("nan")


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS of /proc/PID/status; NaN if it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a stopped child has been waited for by `procs`)."""
    st = _stat(pid)
    return st is not None and bool(st[1]) and st[1][0] not in ("Z", "X")
