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

clean:
	rm -rf gen .run
