# `make demo` and `make test` set everything up on a fresh machine (virtual environment, pinned installs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-sim clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chimera demo

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/pytest -q -m slow
	$(BIN)/chimera bench speed
	$(MAKE) bench-sim

clean:
	rm -rf $(VENV) out

# Full simulated sweeps behind BENCHMARKS.md (needs ../shared/data for the two real workloads).
bench-sim: $(STAMP)
	$(BIN)/chimera bench sim -w synthetic --out out/bench-synthetic
	$(BIN)/chimera bench sim -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --out out/bench-mmlu-math
	$(BIN)/chimera bench sim -w source:fireact-hotpotqa -c examples/cluster-fireact-a100.yaml --out out/bench-fireact
