# Quick start: `make demo` (no servers needed) and `make test` (needs PostgreSQL and Redis).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-services test lint typecheck pytest campaigns docs matrix package clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The example on embedded defaults: SQLite, a Celery broker and result store in SQLite files
# of their own (SQLAlchemy), the database cache, all under var/. With DATABASE_URL and
# REDIS_URL set it runs on PostgreSQL and Redis instead.
demo: $(STAMP)
	$(BIN)/python manage.py migrate --verbosity 0
	$(BIN)/python manage.py createcachetable
	EXAMPLE_TIMELINE=1 $(BIN)/python manage.py run_demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	git ls-files -z '*.py' | xargs -0 $(BIN)/django-upgrade --target-version 5.2

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite on PostgreSQL + Redis, then the database-level rules again on SQLite;
# without the long correctness campaigns (marker `campaign`, `make campaigns`).
pytest: $(STAMP)
	$(BIN)/pytest -m "not campaign"
	TEST_DATABASE=sqlite $(BIN)/pytest -m "not services and not postgres and not campaign"

# The long correctness campaigns (tests/campaigns/): the fault campaign for minutes, fairness,
# broker restarts with many tasks, the throttle state machines on a large budget, makespan.
# Needs what `make test` needs, plus root and rabbitmq-server for some; their sizes are set by
# CAMPAIGN_* variables (docs/development.md).
campaigns: $(STAMP)
	$(BIN)/pytest -m campaign

test: lint typecheck pytest

# The documentation site (Sphinx, furo, MyST) into docs/_build/html; any warning fails it.
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html

# The rest of the support matrix (noxfile.py): every other Python/Django pair (one on the
# lowest dependencies), two sessions at a time (MATRIX_JOBS; .ci/run runs them beside
# `make test`); `make test` is the default pair.
PYENV_VERSIONS ?= 3.11.7:3.12.1:3.13.0
matrix: $(STAMP)
	PYENV_VERSION=$(PYENV_VERSIONS) $(BIN)/python .ci/run_matrix.py

# sdist and wheel, twine check, the example run against the installed wheel.
package: $(STAMP)
	$(BIN)/nox -s package

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .nox docs/_build
