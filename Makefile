# The two commands of the README: `make demo` and `make test`. Each creates or reuses the virtual
# environment in .venv, installs the pinned set (constraints.txt locks every transitive version),
# then does its job.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The serving plane's own environment: the Bento's lock alone (no TensorFlow, Dagster or Evidently).
SERVING_VENV ?= .venv-serving
SERVING_STAMP := $(SERVING_VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint lock lock-serving clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off \
		-c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)

$(SERVING_STAMP): serving/requirements.txt serving/requirements-test.txt constraints.txt
	@test -x $(SERVING_VENV)/bin/python || $(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/python -m pip install --quiet --disable-pip-version-check pip==26.3
	$(SERVING_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --progress-bar off \
		-c constraints.txt -r serving/requirements.txt -r serving/requirements-test.txt
	@touch $@

## demo: start the local stack (Dagster UI, daemon, MLflow UI, …) and run the main job on the embedded default
demo: $(STAMP)
	$(BIN)/recsys demo

## test: the whole suite, integration tests with real processes included: the architecture's import
## contracts, the code location as `dg` loads it, the serving plane's tests in its own lean environment,
## then everything else
test: $(STAMP) $(SERVING_STAMP)
	./scripts/test-setup.sh
	$(BIN)/lint-imports
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH dg check defs
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH dg list defs --columns key,group,kinds
	$(SERVING_VENV)/bin/python -m pytest recsys_assets_tests/service --durations=10 $(PYTEST_ARGS)
	$(BIN)/python -m pytest --ignore=recsys_assets_tests/service --durations=20 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## lock: re-resolve the pinned set from pyproject.toml and rewrite constraints.txt
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip==26.3
	.lock-venv/bin/python -m pip install --quiet '.[dev,production]'
	.lock-venv/bin/python -m pip check
	{ echo "# The full lock: every transitive version of the pinned set, for every install (pip install -c constraints.txt …)."; \
	  echo "# Regenerate with: make lock"; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^recsys-assets'; } > constraints.txt
	rm -rf .lock-venv

## lock-serving: re-resolve serving/requirements.in against constraints.txt into serving/requirements.txt
lock-serving:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip==26.3
	.lock-venv/bin/python -m pip install --quiet -c constraints.txt -r serving/requirements.in
	.lock-venv/bin/python -m pip check
	{ echo "# The serving plane's lock (the Bento's requirements): serving/requirements.in resolved against constraints.txt."; \
	  echo "# Regenerate with: make lock-serving"; \
	  .lock-venv/bin/python -m pip freeze; } > serving/requirements.txt
	rm -rf .lock-venv

clean:
	rm -rf .recsys
