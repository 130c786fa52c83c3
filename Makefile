# Two commands on a fresh machine: `make demo` and `make test`. Both make their own .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything the set-up and the suite fetch or write stays in the checkout and the project's cache,
# one folder every checkout shares (a clean clone finds it warm; tools/fetch.py default_cache: as
# root /var/cache/pg-advisory-lock-exporter, PGALE_CACHE to choose): pip's cache, temporary files
# (the clusters' too), the unpacked tools, npm's and buildah's stores.
CACHE := $(shell $(PYTHON) tools/fetch.py --cache)
export PGALE_CACHE := $(CACHE)
export PIP_CACHE_DIR := $(CACHE)/pip
export MPLCONFIGDIR := $(CACHE)/matplotlib
test test-quick dist: export TMPDIR := $(CACHE)/tmp

.PHONY: test test-quick demo bench chaos mutate clean tools dist

$(STAMP): pyproject.toml
	@mkdir -p $(CACHE)/tmp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's prometheus (promtool, prometheus), chromium, pgbouncer, buildah and mmdebstrap, for the
# alert-rule, end-to-end, landing-page, pooler and image tests, erlang-base (erl, to check Ecto's
# phash2), and a PostgreSQL 15 with pg_partman and pg_repack for the preset tests: what the machine
# lacks is downloaded and unpacked into .cache/tools, never installed over what it has (tools/fetch.py).
tools:
	@mkdir -p $(CACHE)/tmp
	$(PYTHON) tools/fetch.py

## make test: the whole suite against throwaway PostgreSQL clusters it starts and removes
test: $(STAMP) tools
	$(PY) -m pytest

## make test-quick: the suite without the slow tests and the other PostgreSQL majors
test-quick: $(STAMP) tools
	$(PY) -m pytest -m "not slow and not versions"

## make dist: the release's artefacts in dist/ (tools/dist.py): the wheel and the sdist (python -m build,
## twine check) and the image as an OCI archive, built by buildah without a Docker engine (storage in the
## project's cache); PYTHON_IMAGE=... builds on another base. Push it: README, Build the image
DIST ?= dist
PYTHON_IMAGE ?=
dist: $(STAMP)
	@mkdir -p $(CACHE)/tmp
	$(PY) -m tools.dist --out $(DIST) $(if $(PYTHON_IMAGE),--python-image $(PYTHON_IMAGE))

## make demo: the exporter over a throwaway PostgreSQL with a sample workload (Ctrl-C stops all)
demo: $(STAMP)
	$(PY) -m demo

## make bench: side by side with the floor and query-exporter; writes bench/results.md, docs/bench.png
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench

## make chaos: the truth test (issue 27): a recorded workload, faults on a seeded schedule, every scrape
## judged against the truth (chaos/run.py); 30 minutes, CHAOS_SECONDS to change, CHAOS_SEED to replay a run;
## writes chaos-out/report.md and chaos-out/timeline.png, and exits 1 on any lie
CHAOS_SECONDS ?= 1800
CHAOS_SEED ?=
chaos: $(STAMP) tools
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m chaos --seconds $(CHAOS_SECONDS) --out chaos-out $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

## make mutate: mutation testing of the modules that decide the figures, with the tests that need no
## server ([tool.mutmut] in pyproject.toml; docs/development.md: Mutation testing); a measurement, not part of make test
mutate: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,mutate]'
	rm -rf mutants
	time $(VENV)/bin/mutmut run --max-children 1
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist *.egg-info mutants chaos-out
