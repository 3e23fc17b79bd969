"""The layer order in pyproject.toml ([tool.importlinter]) holds, and it really catches what it forbids: an upward
import (lazy ones too), an import cycle, a clock in the brain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
N_CONTRACTS = len(tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"])


def lint(src: Path) -> subprocess.CompletedProcess:
    """import-linter over the chimera package found under `src`, in a fresh interpreter so that tree is the one read."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_contracts_kept() -> None:
    r = lint(ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{N_CONTRACTS} kept, 0 broken" in r.stdout


LAYERED, ACYCLIC, PURE = "Packages stay layered", "No import cycles", "The brain opens no sockets"
TERMINAL = "Only the CLI prints"


@pytest.mark.parametrize(("path", "bad", "broken"), [
    # a lazy import up the layers, from the brain into a body (the body imports the brain: a cycle as well)
    ("sched/queue.py", "\n\ndef _up():\n    from chimera.sim import metrics  # noqa: F401\n", {LAYERED, ACYCLIC}),
    # up the layers without a cycle: the brain never imports the helpers
    ("util/procs.py", "\nimport chimera.sched.types  # noqa: F401,E402\n", {LAYERED}),
    # a cycle inside one layer: plan.py already imports schema.py
    ("workload/schema.py", "\n\ndef _cycle():\n    from chimera.workload import plan  # noqa: F401\n", {ACYCLIC}),
    # a clock in the pure brain
    ("sched/monitor.py", "\nimport time  # noqa: F401,E402\n", {PURE}),
    # a package that prints through rich (lazily): printing is the CLI's job
    ("bench/sweep.py", "\n\ndef _say():\n    from rich.console import Console  # noqa: F401\n", {TERMINAL}),
])
def test_contract_catches_violation(tmp_path: Path, path: str, bad: str, broken: set[str]) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "chimera", src / "chimera", ignore=shutil.ignore_patterns("__pycache__", "data"))
    target = src / "chimera" / path
    target.write_text(target.read_text() + bad)
    r = lint(src)
    assert r.returncode == 1, r.stdout + r.stderr
    status = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines() if line.endswith((" KEPT", " BROKEN")))
    assert len(status) == N_CONTRACTS, r.stdout
    broken_names = [name for name, s in status.items() if s == "BROKEN"]
    assert {c for c in (LAYERED, ACYCLIC, PURE, TERMINAL) if any(n.startswith(c) for n in broken_names)} == broken, status
