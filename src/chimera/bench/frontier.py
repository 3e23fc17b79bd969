"""Frontier metrics of a λ sweep: per (workload, load), what a λ-taking policy buys over `vllm` on each side.

For each family of runs (one policy label swept over λ: `chimera`, `chimera+oracle`, `chimera+oracle-scores`, …):
- accuracy side: the best accuracy gain (points) among its λ with mean latency ≤ vllm's;
- latency side: the best speed-up (vllm mean latency / its mean latency) among its λ with accuracy ≥ vllm's;
- latency end: its fastest λ, with that run's speed against vllm and against least-loaded.
The oracle family (`chimera+oracle` swept over λ, else the `chimera-oracle` preset) bounds what perfect predictions
would buy; `captured` is the share of the oracle's headroom the honest family reaches on each side
((gain) / (oracle gain), (speed-up − 1) / (oracle speed-up − 1)). The partial oracles (`+oracle-scores`: true scores,
predicted lengths; `+oracle-lengths`: predicted scores, true lengths) show which predictor limits which side.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

BASE = "vllm"
LEAST_LOADED = "least-loaded"
HONEST = "chimera"
ORACLES = ("chimera+oracle", "chimera-oracle")  # first present wins: the swept oracle, else the preset


def _lat(r: dict) -> float:
    return float(r["latency_s"]["mean"])


def pick(rows: Sequence[dict], base: dict, target: str) -> dict | None:
    """The best row for a target against the `vllm` row `base`: "latency", fastest with accuracy ≥ base's;
    "accuracy", most accurate with mean latency ≤ base's; "fastest", fastest of all (ties: the first row); None when
    no row qualifies. The frontier figures and `chimera tune` both pick with it."""
    acc = lambda r: float(r["accuracy"])  # noqa: E731
    if target == "fastest":
        return min(rows, key=_lat, default=None)
    if target == "latency":
        ok = [r for r in rows if acc(r) >= acc(base) and _lat(r) > 0]
        return min(ok, key=_lat, default=None)
    if target == "accuracy":
        ok = [r for r in rows if _lat(r) <= _lat(base)]
        return max(ok, key=acc, default=None)
    raise ValueError(f"target must be latency, accuracy or fastest, got {target!r}")


def family_metrics(runs: Sequence[dict], base: dict, least_loaded: dict | None = None) -> dict:
    """The frontier figures of one family of runs against the `vllm` run `base` (and `least_loaded`, if any)."""
    b_lat, b_acc = _lat(base), float(base["accuracy"])
    best_acc, best_speed, fastest = (pick(runs, base, t) for t in ("accuracy", "latency", "fastest"))
    out: dict = {
        "runs": len(runs),
        "best_acc_gain_pts": None if best_acc is None else 100 * (float(best_acc["accuracy"]) - b_acc),
        "best_acc_gain_lam": None if best_acc is None else best_acc.get("lam"),
        "best_speedup": None if best_speed is None else b_lat / _lat(best_speed),
        "best_speedup_lam": None if best_speed is None else best_speed.get("lam"),
        "fastest_lam": None, "fastest_speedup": None, "fastest_vs_least_loaded": None, "fastest_acc_gain_pts": None,
    }
    if fastest is not None and _lat(fastest) > 0:
        out.update(fastest_lam=fastest.get("lam"), fastest_speedup=b_lat / _lat(fastest),
                   fastest_acc_gain_pts=100 * (float(fastest["accuracy"]) - b_acc))
        if least_loaded is not None:
            out["fastest_vs_least_loaded"] = _lat(least_loaded) / _lat(fastest)
    return out


def _share(part: float | None, whole: float | None) -> float | None:
    if part is None or whole is None or whole <= 0:
        return None
    return part / whole


def frontier(rows: Sequence[dict]) -> list[dict]:
    """One entry per (workload, load, family) that has a `vllm` run to compare with; the honest family carries
    `captured_acc` / `captured_speed`, its share of the oracle's headroom."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["workload"], r["load"])][r["policy"]].append(r)
    out: list[dict] = []
    for (workload, load), by_policy in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if not by_policy.get(BASE):
            continue
        base = by_policy[BASE][0]
        ll = by_policy[LEAST_LOADED][0] if by_policy.get(LEAST_LOADED) else None
        oracle_name = next((n for n in ORACLES if by_policy.get(n)), None)
        families = [n for n in by_policy if n == HONEST or n.startswith(HONEST + "+")]
        if oracle_name is not None and oracle_name not in families:
            families.append(oracle_name)
        metrics = {n: family_metrics(by_policy[n], base, ll) for n in families}
        oracle = metrics.get(oracle_name) if oracle_name else None
        for name in families:
            m = metrics[name]
            entry = {"workload": workload, "load": load, "family": name,
                     "role": "oracle" if name == oracle_name else "honest" if name == HONEST else "partial-oracle",
                     **m, "captured_acc": None, "captured_speed": None}
            if oracle is not None and name != oracle_name:
                entry["captured_acc"] = _share(m["best_acc_gain_pts"], oracle["best_acc_gain_pts"])
                sp, osp = m["best_speedup"], oracle["best_speedup"]
                entry["captured_speed"] = _share(None if sp is None else sp - 1, None if osp is None else osp - 1)
            out.append(entry)
    return out


def _fmt(x: float | None, f: str) -> str:
    return "-" if x is None else format(x, f)


def frontier_markdown(entries: Sequence[dict]) -> str:
    """The frontier table: one line per (workload, load, family)."""
    head = ("| workload | load | family | best Δacc at lat ≤ vllm (pts, λ) | best speed-up at acc ≥ vllm (λ) "
            "| fastest λ: speed-up vs vllm / vs least-loaded (Δacc pts) | oracle headroom captured: acc / speed |")
    lines = [head, "|" + "|".join(["---"] * 7) + "|"]
    for e in entries:
        lam = lambda k: "" if e[k] is None else f", λ={e[k]:g}"  # noqa: E731
        acc = f"{_fmt(e['best_acc_gain_pts'], '+.1f')}{lam('best_acc_gain_lam')}"
        speed = f"{_fmt(e['best_speedup'], '.2f')}×{lam('best_speedup_lam')}" if e["best_speedup"] else "-"
        fast = "-"
        if e["fastest_speedup"] is not None:
            at = "" if e["fastest_lam"] is None else f"λ={e['fastest_lam']:g}: "
            fast = (f"{at}{e['fastest_speedup']:.2f}× / {_fmt(e['fastest_vs_least_loaded'], '.2f')}× "
                    f"({e['fastest_acc_gain_pts']:+.1f})")
        cap = "-" if e["role"] == "oracle" else f"{_fmt(e['captured_acc'], '.0%')} / {_fmt(e['captured_speed'], '.0%')}"
        lines.append(f"| {e['workload']} | {e['load']:g} | {e['family']} | {acc} | {speed} | {fast} | {cap} |")
    return "\n".join(lines) + "\n"
