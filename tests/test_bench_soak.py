"""`chimera bench soak`: a few seconds of each phase against real subprocesses (emulators + gateway with trained
predictors): result shape, only 200s while steady, 429s while rejecting, RSS read, nothing left running."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from chimera.bench.soak import CLASSES, SoakConfig, alive, command_line, run_soak
from chimera.cli import app
from chimera.serve.config import load_gateway_config


def test_config_validation_and_command_line() -> None:
    with pytest.raises(ValueError):
        SoakConfig(minutes=0)
    with pytest.raises(ValueError):
        SoakConfig(rate=-1)
    with pytest.raises(ValueError):
        SoakConfig(bogus=1)
    assert command_line(SoakConfig(minutes=0.5, rate=30, window_s=15)) == \
        "chimera bench soak --minutes 0.5 --rate 30 --window-s 15"


def test_soak_tiny(tmp_path) -> None:
    cfg = SoakConfig(minutes=0.1, reject_minutes=0.1, rate=10, window_s=3, train_tasks=300, train_trees=10)
    windows: list[dict] = []
    res = run_soak(cfg, tmp_path, on_window=windows.append)

    # shape
    assert [w["phase"] for w in res["windows"]] == ["steady", "steady", "reject", "reject"]
    assert windows == res["windows"]
    for w in res["windows"]:
        assert set(w["counts"]) == set(CLASSES)
        assert w["rss_end_mib"] > 0 and w["rss_max_mib"] >= w["rss_end_mib"]
        assert w["end_s"] > w["start_s"]
    s = res["summary"]
    assert {"rss_warmup_mib", "rss_end_mib", "rss_growth_pct", "errors", "phases", "held"} <= set(s)
    assert s["rss_warmup_mib"] > 0 and s["rss_end_mib"] > 0 and math.isfinite(s["rss_growth_pct"])

    # phase 1: everything answered 200 (feedback posts included), some of it really served
    st = s["phases"]["steady"]
    assert st["sent"] >= 20
    assert st["counts"]["200"] == st["sent"], st
    steady = [w for w in res["windows"] if w["phase"] == "steady"]
    assert sum(sum(w["per_model"].values()) for w in steady) > 0
    assert all(math.isfinite(w["p50_ms"]) and w["p99_ms"] >= w["p50_ms"] for w in steady)

    # phase 2: refused with 429 (the held model's slots and the queue are full); then the model serves again
    rj = s["phases"]["reject"]
    assert rj["sent"] >= 20
    assert rj["counts"]["429"] >= 0.9 * rj["sent"], rj
    assert s["held"]["sent"] == cfg.held_inflight + cfg.max_queue
    assert s["held"]["recovery"]["200"] == sum(s["held"]["recovery"].values()) > 0
    assert s["errors"] == 0

    # outputs, and every child process has exited
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["phases"]["reject"]["counts"]["429"] == rj["counts"]["429"]
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("`chimera bench soak --minutes 0.1")
    assert "live, emulated backends" in md and "| reject |" in md
    assert (tmp_path / "predictors" / "manifest.json").exists()
    assert load_gateway_config(tmp_path / "gateway.yaml").predictors == str(tmp_path / "predictors")
    assert len(res["pids"]) == 4
    assert not [name for name, pid in res["pids"].items() if alive(pid)]


def test_cli_help_shows_example() -> None:
    r = CliRunner().invoke(app, ["bench", "soak", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "Example: chimera bench soak --minutes" in r.output
    for opt in ("--minutes", "--rate", "--reject-minutes", "--window-s", "--predictors", "--out"):
        assert opt in r.output
