# The two README commands: `make demo` and `make test`. `make bench` runs the speed benchmarks
# (the family comparison and quality-vs-steps benchmarks are run by hand: see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ddlm_jax.main --config=experiments/mdlm_demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=10

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.decode_throughput
	$(BIN)/python -m benchmarks.sampler_overhead

clean:
	rm -rf $(VENV) workdirs *.egg-info
