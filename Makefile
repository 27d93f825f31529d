# virgo-exps: `make run` runs the whole study, `make test` the whole test suite.
# `make help` lists every target.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TMUX_SESSION ?= virgo
ARGS ?=
# Workers for `make test` (pytest-xdist); JOBS=0 runs the suite in one process.
JOBS ?= 2

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (a few minutes the first time)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	@touch $(STAMP)

.PHONY: venv
venv: $(STAMP) ## create .venv and install the pinned dependencies

.PHONY: horovod
horovod: $(STAMP) ## build Horovod 0.28.1 into .venv (patched for torch >= 2.1; minutes)
	bash scripts/install_horovod.sh $(PY)

.PHONY: image
image: $(STAMP) ## build the container image from the pinned files into a cache outside the checkout (.virgo/image points at it)
	bash scripts/build_image.sh $(PY)

.PHONY: plots-offline
plots-offline: $(STAMP) ## npm ci the pinned vega libraries and set a `dvc plots show` page that needs no network
	@$(PY) scripts/plots_offline.py

.PHONY: run
run: $(STAMP) ## run the whole pipeline with `dvc exp run` on the active machine (default: local)
	@if $(PY) -c "import sys, yaml; sys.exit(yaml.safe_load(open('params.yaml'))['train']['strategy'] != 'horovod')"; then \
		$(MAKE) --no-print-directory horovod; fi
	@$(MAKE) --no-print-directory plots-offline
	$(VENV)/bin/virgo-exps run $(ARGS)

.PHONY: report
report: $(STAMP) ## scalability report over all experiments into results/scalability (ARGS: --exp/--mlflow/--metrics-files ...)
	$(VENV)/bin/virgo-exps scalability $(ARGS)

.PHONY: slurm-script
slurm-script: $(STAMP) ## print the SLURM batch script of a stage (STAGE=train or generate) on the active machine; submits nothing
	$(PY) -m virgo_exps.launch.slurm $(or $(STAGE),train)

.PHONY: bench-slurm
bench-slurm: $(STAMP) ## submission overhead of a SLURM stage vs running it directly (JSON; root for a local cluster)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/slurm_overhead.py

NODES ?= 2
.PHONY: cluster
cluster: $(STAMP) ## start a local Slurm cluster of $(NODES) nodes in network namespaces (root) for VIRGO_MACHINE=simcluster
	@test "$$(id -u)" = 0 || { echo "make cluster needs root: it starts slurmctld/slurmd and creates network namespaces"; exit 2; }
	bash scripts/install_slurm.sh
	$(PY) -m slurmsim up --dir .slurmsim --nodes $(NODES) --min-job-age 30 >/dev/null
	@echo "cluster of $(NODES) nodes is up (.slurmsim/); use it with:"
	@echo "  VIRGO_MACHINE=simcluster $(VENV)/bin/dvc exp run -S train.strategy=ddp -S train.nodes=2"
	@echo "  (or: echo simcluster > machines/active).  Slurm commands: export SLURM_CONF=$(CURDIR)/.slurmsim/slurm.conf"
	@echo "stop it with: make cluster-down"

.PHONY: cluster-down
cluster-down: ## stop the cluster of `make cluster` (daemons by pid, namespaces, bridge, hosts entries)
	$(PY) -m slurmsim down --dir .slurmsim

.PHONY: share
share: $(STAMP) ## create or join the team's shared experiment store: make share SHARED=/path GROUP=unixgroup
	@test -n "$(SHARED)" -a -n "$(GROUP)" || { echo "usage: make share SHARED=/path/to/shared GROUP=group"; exit 2; }
	$(VENV)/bin/virgo-exps share --dir "$(SHARED)" --group "$(GROUP)" $(ARGS)

.PHONY: tmux
tmux: $(STAMP) ## start `make run` in a tmux session named $(TMUX_SESSION) with your environment (survives logout)
	@bash scripts/tmux_run.sh $(TMUX_SESSION) $(ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff: lint and formatting check (configured in pyproject.toml)
	$(VENV)/bin/ruff check src stages tests benchmarks
	$(VENV)/bin/ruff format --check src stages tests benchmarks

.PHONY: test
test: $(STAMP) ## install what the tests need (Horovod, the image; Slurm, Chromium, charliecloud when root), lint, run the suite
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory horovod
	@if [ "$$(id -u)" = 0 ]; then bash scripts/install_slurm.sh; else \
		echo "not root: Slurm tests will be skipped (they need to install and start slurmctld/slurmd)"; fi
	@if [ "$$(id -u)" = 0 ]; then bash scripts/install_test_system.sh; else \
		echo "not root: the browser test of the plots page is skipped unless chromium and npm are installed"; fi
	@$(MAKE) --no-print-directory plots-offline
	@if command -v ch-run >/dev/null && command -v mmdebstrap >/dev/null && command -v mksquashfs >/dev/null; then \
		$(MAKE) --no-print-directory image; else echo "no charliecloud/mmdebstrap: the container tests will be skipped"; fi
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" JOBS=$(JOBS) bash scripts/test.sh $(ARGS)

.PHONY: test-fast
test-fast: $(STAMP) ## the unit tests only (no dvc, no Slurm, no multi-process runs)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "not slow and not slurm and not horovod" $(ARGS)

.PHONY: check
check: $(STAMP) ## validate params.yaml and the machine profile without running anything
	$(VENV)/bin/virgo-exps check

.PHONY: lock
lock: $(STAMP) ## rewrite requirements.lock from .venv (after changing pyproject.toml)
	( sed -n "1,3p" requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -viE "^(torch|horovod|virgo-exps)( ?==| @)" ) > requirements.lock.new && mv requirements.lock.new requirements.lock

.PHONY: clean
clean: ## remove caches of Python and pytest (keeps .venv, data and DVC cache)
	rm -rf .pytest_cache build src/*.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
