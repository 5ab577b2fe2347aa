# Setup and entry points. `make demo` and `make test` install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this machine's disk; a GPU machine brings its own torch (>= 2.11).
TORCH_SPEC ?= torch==2.13.0 triton==3.7.1
# The tested versions of every other dependency (constraints.txt; `make constraints` writes it from .venv).
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: install install-test test test-fast lint format demo dagster constraints clean

# The product: the package with its s3 and dagster extras, and bubblewrap for the python tool's sandbox.
install: $(VENV)/.installed

# The tests on top: the dev extra (pytest, the parity and S3 references, Playwright) and a browser for the UI test.
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e ".[s3,dagster]"
	# The python tool isolates model-written code with Debian's bubblewrap (README, section Sandbox).
	command -v bwrap || (apt-get update -q && apt-get install -y -q bubblewrap)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[dev,s3,dagster]"
	# The UI test drives Debian's chromium through Playwright (never a downloaded browser).
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver)
	touch $@

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

# ruff, configured in pyproject.toml: the lint rules and the formatter's check (CI runs this before the tests).
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: install
	$(VENV)/bin/k2batch demo

# The Dagster UI and daemon (sensor, schedule, run queue) on the embedded default: http://127.0.0.1:3000
dagster: install
	DAGSTER_HOME=$(CURDIR)/workspace/dagster_home $(VENV)/bin/dagster dev -m k2batch.pipelines.definitions -h 127.0.0.1 -p 3000

# After upgrading a dependency in .venv and passing `make test`: pin the new set (all but torch and triton).
constraints:
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --all --exclude-editable \
	  | grep -viE '^(torch|triton|setuptools|wheel)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info
