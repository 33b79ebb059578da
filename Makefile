# rnnserve: `make serve` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
HOST ?= 127.0.0.1
PORT ?= 50051
PYTEST_ARGS ?=
# When `make bench` started (its report counts the image build and the peers' set-up too).
BENCH_STARTED := $(shell date +%s)
SOAK_SECONDS ?= 60

.PHONY: serve test lint protos models loadgen bench soak container-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Serving dependencies only (no torch).
$(VENV)/.installed-serve: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

# Serving + training + development tools.
$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[train,dev]'
	touch $@ $(VENV)/.installed-serve

serve: $(VENV)/.installed-serve ## serve the bundled models/ on 127.0.0.1:50051
	$(BIN)/rnnserve serve --models models --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev ## run the whole default test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev ## ruff, gofmt, and fail if the generated protobuf code is stale
	$(BIN)/ruff check .
	$(BIN)/python protos/generate.py --check
	@if command -v gofmt >/dev/null; then unformatted=$$(gofmt -l benchmarks/loadgen/src/rnnserve/loadgen); \
	  if [ -n "$$unformatted" ]; then echo "gofmt: not formatted: $$unformatted"; exit 1; fi; \
	else echo "gofmt not installed: Go formatting not checked (apt-get install golang-go)"; fi

protos: $(VENV)/.installed-dev ## regenerate serving/grpc/generated (and the load generator's Go code) from protos/
	$(BIN)/python protos/generate.py

models: $(VENV)/.installed-dev ## retrain the bundled models and export them as new versions in models/
	$(BIN)/rnnserve train sentiment --seeds 5 --export-to models
	$(BIN)/rnnserve train topic --seeds 5 --export-to models
	$(BIN)/rnnserve train keywords --export-to models
	$(BIN)/rnnserve evaluate-stream models/keywords/$$(ls models/keywords | sort -n | tail -1) --write-card

container-test: $(VENV)/.installed-dev ## build the CPU image with podman, smoke-test it, print its size
	PYTHON=$(BIN)/python bash deploy/docker/container-test.sh

# Offline, in GOPATH mode, from the repository and Debian's golang-go and golang-google-grpc-dev.
loadgen: $(VENV)/.installed-serve ## build the Go stream load generator: benchmarks/loadgen/bin/loadgen
	$(BIN)/python benchmarks/stream_load.py --build-only

bench: $(VENV)/.installed-dev ## benchmarks side by side in one run: BENCHMARKS.md, benchmarks/plots, benchmarks/results
	(command -v podman >/dev/null && podman image exists localhost/rnnserve:cpu) || $(MAKE) container-test \
	  || echo "bench: the CPU image could not be built; BENCHMARKS.md reports its size as missing"
	$(MAKE) loadgen || echo "bench: the stream load generator could not be built; BENCHMARKS.md says why"
	RNNSERVE_BENCH_STARTED=$(BENCH_STARTED) PYTHON=$(PYTHON) $(BIN)/rnnserve bench

soak: $(VENV)/.installed-dev ## mixed load on a real server for SOAK_SECONDS (default 60; 10 min: make soak SOAK_SECONDS=600)
	$(BIN)/python benchmarks/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) runs .pytest_cache
