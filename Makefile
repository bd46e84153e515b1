# Two commands do the whole set-up: `make demo` and `make test`.
# Installs come from requirements.lock only (exact versions and hashes, what CI tested);
# `make lock` refreshes it after a change to pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
UV_VERSION := 0.13.9

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

.PHONY: venv demo test quick lint bench lock
venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo

# lint and type checks, then the whole suite, slow end-to-end tests included (what CI runs)
test: lint
	$(PY) -m pytest -q

# ruff over the code, tests and benchmarks; mypy over stmodel/, pipeline/, jobs/ and bench/ (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# everything but the tests marked slow (two-node cluster, overlapping runs, demo, scale)
quick: lint
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.model_speed

lock:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION) uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock
