# make run  : set up and run Django (127.0.0.1:8000) and the websocket worker (127.0.0.1:8765)
# make test : set up and run the whole test suite (ruff and mypy included)
# make matrix : the suite on Python 3.11 + Django 5.2 and Python 3.12 + Django 6.1 (nox)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A stamp file, not .venv/bin/python: touching that symlink touches the system Python.
STAMP := $(VENV)/.installed

.PHONY: run test matrix lint format pg-stop clean

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found %s); run: make PYTHON=python3.12" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m project.devrun

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

# Python 3.11 + Django 5.2 LTS and Python 3.12 + Django 6.1, each in its own nox virtualenv.
matrix: $(STAMP)
	$(PY) -m nox

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Stop the embedded PostgreSQL (make run leaves it up for manage.py shell).
pg-stop: $(STAMP)
	$(PY) -m project.devrun --stop-database

clean:
	rm -rf $(VENV) .nox .pytest_cache .ruff_cache

# make bench       : this project against a floor and Django Channels on this machine (about 18 minutes),
#                    then workload (g), 1 to 16 workers on one PostgreSQL (about 5 minutes); writes
#                    bench/results/results.md, plot.png, scaling.md and scaling.png and prints the table.
# make bench-smoke : the benchmark harness at tiny sizes against this project only, (g) included (a minute).
# make bench-replica: workload (g) with replica reads (python -m bench.scaling --replica, about 4 minutes):
#                    1, 4 and 16 workers reading from the primary and from a streaming replica of it;
#                    writes bench/results/scaling-replica.md, .json and .png.
# make soak        : the real stack for MINUTES (default 20) under churn and faults, on a PostgreSQL of its
#                    own: every client must get exactly its events and the workers must not grow; writes
#                    bench/results/soak.md and soak.png, and fails when a check does. More options go in
#                    SOAK_ARGS, e.g. make soak MINUTES=5 SOAK_ARGS="--out /tmp/soak --keep-logs".
#                    A one-minute soak is part of make test (tests/test_soak.py).
BENCH_STAMP := $(VENV)/.bench-installed
MINUTES ?= 20
SOAK_ARGS ?=

.PHONY: bench bench-smoke bench-replica soak

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "warning: redis-server is not installed: the Channels + Redis rows will be skipped" >&2
	$(PY) -m bench

bench-smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_bench_smoke.py

bench-replica: $(BENCH_STAMP)
	$(PY) -m bench.scaling --replica

soak: $(BENCH_STAMP)
	$(PY) -m bench.soak --minutes $(MINUTES) $(SOAK_ARGS)
