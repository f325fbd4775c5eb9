# make run  : set up and run Django (127.0.0.1:8000) and the websocket worker (127.0.0.1:8765)
# make test : set up and run the whole test suite (ruff included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A stamp file, not .venv/bin/python: touching that symlink touches the system Python.
STAMP := $(VENV)/.installed

.PHONY: run test lint format pg-stop clean

$(STAMP): requirements.txt
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
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Stop the embedded PostgreSQL (make run leaves it up for manage.py shell).
pg-stop: $(STAMP)
	$(PY) -m project.devrun --stop-database

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
