# Everything a fresh machine needs goes through these targets; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
export PYTHONPATH := $(CURDIR):$(CURDIR)/gen

.PHONY: gen lint test run bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

gen/.stamp: $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch gen/.stamp

gen: gen/.stamp

lint: gen
	$(VENV)/bin/buf lint
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

clean:
	rm -rf gen .run

# The whole stack on this machine (see tools/stack.py); Ctrl-C stops it, data stays in .run/.
run: $(STAMP) gen
	$(PY) -m tools.stack

# PYTEST_ARGS narrows a run, e.g. `make test PYTEST_ARGS='tests/unit -x'`. pytest's own exit
# code fails the target, including 5 when no test was collected. Tests mostly wait on
# servers, so more workers than cores pay off; PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 4
test: $(STAMP) gen
	$(PY) -m tools.infra ensure-postgres
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Figures for the closing notes: ratios against a baseline measured in the same run; one
# table, one JSON file under .run/bench/. `make bench BENCH_ARGS="--only credits"` runs one part.
bench: $(STAMP) gen
	$(PY) -m tools.infra ensure-postgres
	$(PY) -m tests.bench $(BENCH_ARGS)
