# Two commands on a fresh machine: `make demo` and `make test`. Both make their own .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-quick demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## make test: the whole suite against throwaway PostgreSQL clusters it starts and removes
test: $(STAMP)
	$(PY) -m pytest

## make test-quick: the suite without the slow tests and the other PostgreSQL majors
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow and not versions"

## make demo: the exporter over a throwaway PostgreSQL with a sample workload (Ctrl-C stops all)
demo: $(STAMP)
	$(PY) -m demo

## make bench: side by side with the floor and query-exporter; writes bench/results.md, docs/bench.png
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
