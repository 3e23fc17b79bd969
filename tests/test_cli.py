"""The `chimera` command as a whole: every command documents an example, the CLI imports no private names, the
console script and the subprocess form both start it, and the parsing the commands hand to the packages holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from chimera.cli import app
from chimera.util.procs import chimera_cmd

CLI_DIR = Path(__file__).resolve().parents[1] / "src" / "chimera" / "cli"
runner = CliRunner()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """'line: what' for each private name the source takes from chimera: `from chimera.x import _y`, a private
    module in a chimera import path, or `_y` read off a name a chimera import bound (`import chimera.x as m; m._y`)."""
    tree = ast.parse(source)
    bound: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "chimera":
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{node.lineno}: from {node.module}")
            for a in node.names:
                if _private(a.name):
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
                bound.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "chimera":
                    if any(_private(part) for part in a.name.split(".")):
                        found.append(f"{node.lineno}: import {a.name}")
                    bound.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{node.lineno}: {root.id}….{node.attr}")
    return found


def test_the_cli_imports_no_private_names() -> None:
    files = sorted(CLI_DIR.glob("*.py"))
    assert len(files) > 5, files
    bad = {f.name: private_uses(f.read_text()) for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad


@pytest.mark.parametrize("source", [
    "from chimera.train.predictors import _jsonable\n",
    "def f():\n    from chimera.train import predictors\n    return predictors._jsonable({})\n",
    "import chimera.train.predictors as tp\ntp._params(None)\n",
    "import chimera.train.predictors\nchimera.train.predictors._params(None)\n",
    "from chimera.bench._hidden import x\n",
])
def test_the_private_name_check_catches(source: str) -> None:
    assert private_uses(source), source


def test_the_private_name_check_lets_public_and_local_names_pass() -> None:
    assert private_uses("from chimera.util.jsonable import jsonable\nfrom rich import _x\n"
                        "def _mine():\n    return _mine.__name__\nclass A:\n    def f(self):\n        return self._y\n"
                        "import chimera.cli\nchimera.cli.__doc__\n") == []


def _leaves(cmd, path: tuple[str, ...] = ()):
    """(path, command) of every command under `cmd`, sub-apps walked (typer's groups carry `commands`)."""
    if hasattr(cmd, "commands"):
        assert cmd.commands, path
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


LEAVES = list(_leaves(typer.main.get_command(app)))


def test_the_tree_has_every_command() -> None:
    names = {" ".join(p) for p, _ in LEAVES}
    assert len(names) == 24
    assert {"simulate", "profile", "demo", "bench live", "bench soak", "bench ope", "eval predictors", "eval traces",
            "engines up"} <= names


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_help_shows_an_example(path: tuple[str, ...]) -> None:
    cmd = dict(LEAVES)[path]
    assert "Example" in (cmd.help or ""), path
    r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Example" in r.output and "chimera " + path[0] in r.output


@pytest.mark.parametrize("how", ["chimera_cmd", "module"])
def test_the_cli_starts_in_a_subprocess(how: str) -> None:
    cmd = chimera_cmd("bench", "--help") if how == "chimera_cmd" else [sys.executable, "-m", "chimera.cli", "bench",
                                                                        "--help"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "",
                                                                             "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert all(c in r.stdout for c in ("sim", "speed", "predict", "gateway", "live", "soak"))


def test_console_script_is_main() -> None:
    import tomllib

    from chimera.cli import main

    doc = tomllib.loads((CLI_DIR.parents[2] / "pyproject.toml").read_text())
    assert doc["project"]["scripts"]["chimera"] == "chimera.cli:main" and callable(main)


# ---- parsing the commands hand to the packages -------------------------------------------------------------------
def test_key_value_pairs_read_yaml_scalars_and_name_the_flag() -> None:
    from chimera.util.keyvalue import parse_pairs, parse_value_lists

    assert parse_pairs(["a=0.5", " b =true", "c=null", "d={x: 1}", "e=batch"]) == {
        "a": 0.5, "b": True, "c": None, "d": {"x": 1}, "e": "batch"}
    assert parse_value_lists(["externality=0,1,2", "congestion=batch"], "--grid") == {
        "externality": [0, 1, 2], "congestion": ["batch"]}
    with pytest.raises(ValueError, match=r"--set expects KEY=VALUE, got 'affinity'"):
        parse_pairs(["affinity"], "--set")
    with pytest.raises(ValueError, match=r"--param expects KEY=VALUE, got '=3'"):
        parse_pairs(["=3"])
    with pytest.raises(ValueError, match=r"--grid expects KEY=V1,V2,…, got 'externality='"):
        parse_value_lists(["externality="], "--grid")


def test_sweep_spec_builder_refuses_bad_flags_by_name() -> None:
    from chimera.bench.sweep import build_spec, policy_params
    from chimera.sched.registry import POLICIES

    assert policy_params(["chimera.congestion=batch", "chimera.affinity=true", "sjf.x=1"]) == {
        "chimera": {"congestion": "batch", "affinity": True}, "sjf": {"x": 1}}
    spec = build_spec(None, ["chimera.congestion=batch"], loads=[0.5], lams=[0.02])
    assert list(spec.policies) == list(POLICIES) and spec.params == {"chimera": {"congestion": "batch"}}
    for params, msg in ((["chimera.congestion"], r"--param 'chimera.congestion': expected POLICY.KEY=VALUE"),
                        (["congestion=batch"], r"expected POLICY.KEY=VALUE"),
                        (["chimera.=3"], r"--param expects KEY=VALUE, got '=3'"),
                        (["sjf.x=1"], r"not in the sweep: \['sjf'\]"),
                        (["chimera.congestoin=batch"], "congestoin")):
        with pytest.raises(ValueError, match=msg):
            build_spec(["vllm", "chimera"], params)
    with pytest.raises(ValueError, match=r"unknown policies \['nope'\]; choose from vllm"):
        build_spec(["vllm", "nope"])


def test_tune_spec_builder_names_the_flag() -> None:
    from chimera.bench.tune import build_spec

    spec = build_spec(["externality=0,1"], ["affinity=true"], lams=[2.0])
    assert spec.grid == {"externality": [0, 1]} and spec.fixed == {"affinity": True}
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        build_spec([], ["affinity"])
    with pytest.raises(ValueError, match="--grid expects KEY=V1,V2"):
        build_spec(["externality"])


def test_jsonable_turns_numpy_into_plain_json() -> None:
    import json

    from chimera.util.jsonable import jsonable

    doc = jsonable({1: np.float64(0.5), "a": (np.int64(3), np.arange(2)), "b": [{"c": np.float32(1.0)}]})
    assert doc == {"1": 0.5, "a": [3, [0, 1]], "b": [{"c": 1.0}]}
    assert type(doc["a"][0]) is int and json.loads(json.dumps(doc)) == doc


def test_demo_simulated_compares_every_policy_with_vllm() -> None:
    from chimera.bench.sim_demo import RUNS

    r = runner.invoke(app, ["demo", "--simulated", "--tasks", "30", "-w", "synthetic:200"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if " vs vllm: " in line]
    assert len(lines) == len(RUNS) - 1 and all("mean latency" in line and "points accuracy" in line for line in lines)
    assert "chimera (λ=0.05) vs vllm" in r.output and "(load 0.8; simulated)" in r.output


def test_bench_sim_writes_its_results(tmp_path: Path) -> None:
    import json

    r = runner.invoke(app, ["bench", "sim", "-w", "synthetic:200", "--tasks", "30", "--loads", "0.5", "--lams", "0.02",
                            "--policies", "vllm,chimera", "--param", "chimera.congestion=batch", "--free-context",
                            "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("**What-if bound (`--free-context`):**") and "## Frontier over the λ sweep" in md
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [x["policy"] for x in runs] == ["vllm", "chimera"] and (tmp_path / "frontier.png").stat().st_size > 0
    r = runner.invoke(app, ["bench", "sim", "--policies", "vllm,nope"])
    assert r.exit_code == 2 and "unknown policies ['nope']" in r.output
