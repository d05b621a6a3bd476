# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-heavy

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The workflow's rules call the console scripts by name: put the venv first on PATH.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --profile profiles/local --configfile config/demo.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --profile profiles/local --configfile config/demo.yaml --report results/report.html

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not slurm" tests

# Heavier runs (CI runs them after `make test`): the killed-run tests, the demo rerun-after-config-edit test, the
# report in Chromium, MRtrix3 baselines and a real single-node SLURM cluster.
test-heavy: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "slow or slurm" tests
