# virtex-d2: one-command install, tests, demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.virtex_d2_installed

.PHONY: install test test-fast demo lint format clean-venv

install: $(STAMP)

# Re-runs only when an input changed, so a second `make install` is a no-op.
$(STAMP): requirements.txt setup.py tools/build_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) tools/build_detectron2.py
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -c "import virtex_d2, detectron2.modeling; print('virtex_d2', virtex_d2.__version__, 'ready')"
	@touch $(STAMP)

# The README's test command. pytest exits 5 when it collects nothing, which fails here too.
test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) tools/run_demo.py

# ruff (pinned in requirements.txt; settings in ruff.toml): lint, then check the formatting.
LINT_PATHS := virtex_d2 tools tests datasets hubconf.py setup.py

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: install
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

clean-venv:
	rm -rf $(VENV)
