# Setup and entry points. `make test` and `make demo` install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this machine's disk; a GPU machine brings its own torch (>= 2.11).
TORCH_SPEC ?= torch==2.13.0 triton==3.7.1

.PHONY: install test test-fast demo dagster clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,s3,dagster]"
	# The python tool isolates model-written code with Debian's bubblewrap (README, section Sandbox).
	command -v bwrap || (apt-get update -q && apt-get install -y -q bubblewrap)
	# Browser tests drive Debian's chromium through Playwright (never a downloaded browser).
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver)
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/k2batch demo

# The Dagster UI and daemon (sensor, schedule, run queue) on the embedded default: http://127.0.0.1:3000
dagster: install
	DAGSTER_HOME=$(CURDIR)/workspace/dagster_home $(VENV)/bin/dagster dev -m pipelines.definitions -h 127.0.0.1 -p 3000

clean:
	rm -rf $(VENV) build *.egg-info
