# episeg-bids developer commands. Everything installs into .venv from pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO := build/demo

.PHONY: setup test-deps demo test model clean image sif slurm-up slurm-down
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' episeg_bids/__init__.py)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt $(shell find episeg_bids -type f -not -name '*.pyc')
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt . pytest selenium
	touch $@

demo: setup
	rm -rf $(DEMO)/out
	$(PY) run.py tests/data/ds-example $(DEMO)/out participant \
		--model-dir models/demo -w $(DEMO)/work --save-probseg
	$(PY) run.py tests/data/ds-example $(DEMO)/out group -w $(DEMO)/work \
		--ground-truth tests/data/ds-example/derivatives/label
	@echo
	@echo "Outputs: $(DEMO)/out  (masks and sidecars under sub-*/func/, group_bold.tsv, group_bold.json)"

test-deps:
	scripts/ci/test_deps.sh

test: test-deps setup
	$(PY) -m pytest

model: setup
	$(PY) tools/train_demo_model.py

clean:
	rm -rf build

image:
	docker build -t episeg-bids:$(VERSION) .

sif:
	apptainer build episeg-bids_$(VERSION).sif Singularity.def

slurm-up:
	scripts/ci/start_slurm.sh

slurm-down:
	scripts/ci/stop_slurm.sh
