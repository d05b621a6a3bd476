# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/trackflow_make_demo results/demo/cohort --subjects 4 --seed 0 -f
	$(BIN)/dwiml_create_hdf5_dataset -f -v INFO results/demo/cohort/dwi_ml_ready results/demo/demo.hdf5 \
	    results/demo/cohort/config/hdf5_config.json results/demo/cohort/config/training_subjs.txt \
	    results/demo/cohort/config/validation_subjs.txt results/demo/cohort/config/testing_subjs.txt
	$(BIN)/dwiml_hdf5_print_architecture results/demo/demo.hdf5

test: install
	$(BIN)/python -m pytest -m "not slow and not slurm" tests
