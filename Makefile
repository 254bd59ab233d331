# DLRM end-to-end benchmark. `make small` runs the pipeline, `make test` the tests;
# both set up .venv from requirements.txt first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

# Makefile variables -> configuration overrides (see bench/profiles/*.yaml).
OVERRIDES := $(if $(DAYS),--set data.days=$(DAYS)) \
             $(if $(ROWS_PER_DAY),--set data.rows_per_day=$(ROWS_PER_DAY)) \
             $(if $(DATA),--set data.source=$(DATA)) \
             $(if $(DATA_DIR),--set data.dir=$(DATA_DIR)) \
             $(if $(SPARK),--set preprocess.engine=$(SPARK)) \
             $(if $(NODES),--set cluster.nodes=$(NODES)) \
             $(if $(RESULTS_DIR),--set results_dir=$(RESULTS_DIR)) \
             $(foreach s,$(SET),--set $(s))

.PHONY: setup small tiny test compare clean help

help:
	@echo "make small   run the whole pipeline on one machine (synthetic Criteo-format data)"
	@echo "make tiny    the same at the smallest scale (a minute or two)"
	@echo "make test    run the test suite"
	@echo "make compare BASELINE=<results.json> [CANDIDATE=<results.json>]   regression check (exit 1 on a regression)"
	@echo "variables:   DAYS ROWS_PER_DAY DATA DATA_DIR SPARK NODES RESULTS_DIR SET='section.key=value ...'"

$(STAMP): requirements.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH; install Python 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

small: setup
	$(PY) -m bench.pipeline --profile small $(OVERRIDES)

tiny: setup
	$(PY) -m bench.pipeline --profile tiny $(OVERRIDES)

test: setup
	$(PY) -m pytest tests

compare: setup
	@test -n "$(BASELINE)" || { echo "error: name the baseline results file: make compare BASELINE=results/baselines/<file>.json"; exit 2; }
	$(PY) -m bench.compare $(BASELINE) $(CANDIDATE)

clean:
	rm -rf results/runs results/latest.json results/*-*T*Z.json spark-warehouse
