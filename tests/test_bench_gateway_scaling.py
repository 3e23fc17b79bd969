"""`chimera bench gateway --replicas`: replica sets on a real Redis saturated with the load split across them, beside
the bare proxy in the same run (short blocks: the benchmark's plumbing, not its figures)."""

from __future__ import annotations

import sqlite3

from chimera.bench.gateway_scaling import Load, markdown_table, run_scaling, summary


def test_summary_is_per_answered_request_and_per_second():
    load = Load(answered=200, errors=1, seconds=2.0, lat_s=[0.01] * 200, cpu_s={"gateway": 0.3, "client": 0.1})
    row = summary(load, "gateway")
    assert row["rps"] == 100 and row["errors"] == 1
    assert abs(row["cpu_ms_per_req"] - 1.5) < 1e-9 and abs(row["client_cpu_ms_per_req"] - 0.5) < 1e-9
    assert abs(row["gateway_cores"] - 0.15) < 1e-9 and abs(row["p50_ms"] - 10) < 1e-9


def test_replica_sets_share_the_load_and_are_measured_beside_the_proxy(tmp_path):
    res = run_scaling([1, 2], duration=0.6, out=tmp_path, concurrency=4, block_s=0.3, warmup_s=0.2)
    assert [r["replicas"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        g, p = r["gateway"], r["proxy"]
        assert g["answered"] > 0 and g["errors"] == 0 and p["answered"] > 0 and p["errors"] == 0
        assert g["cpu_ms_per_req"] > 0 and p["cpu_ms_per_req"] > 0 and "redis_cpu_ms_per_req" in g
    for i in range(2):  # both replicas of the pair answered (each writes its own trace store)
        with sqlite3.connect(tmp_path / "replicas-2" / f"r{i}.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM calls WHERE status = 'ok'").fetchone()[0] > 0
    table = markdown_table(res)
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1


def test_bad_replica_counts_are_refused_naming_the_flag():
    from typer.testing import CliRunner

    from chimera.cli import app

    for bad in ("0", "1.5", "x"):
        r = CliRunner().invoke(app, ["bench", "gateway", "--replicas", bad], env={"COLUMNS": "200"})
        assert r.exit_code != 0 and "--replicas" in r.output, r.output
